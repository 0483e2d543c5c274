// cuda_emu_runtime.cpp -- fibers, barriers, warp collectives and the launch loop of the
// CUDA emulator (see cuda_emu.h).  Linked into every emulated module.
//
// Sanitizer modes:
//   CUPYNN_EMU_ASAN  (built with -fsanitize=address): fiber switches are announced to ASan,
//                    every array argument is copied into an exact-size malloc'd buffer
//                    around the launch (so a one-element overrun hits a redzone).
//   CUPYNN_EMU_TSAN  (this file built WITHOUT -fsanitize=thread, kernels with it): every CUDA
//                    thread is a TSan fiber, switches carry no synchronisation, and barriers
//                    / __syncwarp are release+acquire -- so a shared-memory access that is not
//                    ordered by a barrier is reported as a data race.
#define CUPYNN_EMU_RUNTIME 1
#include "cuda_emu.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdarg>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#if defined(CUPYNN_EMU_ASAN)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif
#if defined(CUPYNN_EMU_TSAN)
#include <link.h>
#include <sanitizer/tsan_interface.h>
// Dynamic-annotation entry point of the TSan runtime: forget all accesses to a range.
extern "C" void AnnotateNewMemory(const char* file, int line, const volatile void* mem,
                                  size_t size);
#endif

#if !defined(__x86_64__)
#include <ucontext.h>
#define CUPYNN_EMU_UCONTEXT 1
#endif

__thread cupynn_emu::ThreadRegs* cupynn_emu_regs = nullptr;

namespace {

// ---------------------------------------------------------------------------------------
// Context switching: a 14-instruction switch on x86-64 (callee-saved registers + stack
// pointer; no signal-mask syscall as in swapcontext), ucontext elsewhere.
// ---------------------------------------------------------------------------------------
#if !defined(CUPYNN_EMU_UCONTEXT)
extern "C" void cupynn_emu_ctx_switch(void** save_sp, void* new_sp);
extern "C" void cupynn_emu_ctx_trampoline();
asm(R"(
    .text
    .globl cupynn_emu_ctx_switch
    .hidden cupynn_emu_ctx_switch
    .type cupynn_emu_ctx_switch,@function
cupynn_emu_ctx_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size cupynn_emu_ctx_switch,.-cupynn_emu_ctx_switch
    .globl cupynn_emu_ctx_trampoline
    .hidden cupynn_emu_ctx_trampoline
    .type cupynn_emu_ctx_trampoline,@function
cupynn_emu_ctx_trampoline:
    movq %r12, %rdi
    callq *%r13
    ud2
    .size cupynn_emu_ctx_trampoline,.-cupynn_emu_ctx_trampoline
)");
#endif

struct Context {
#if defined(CUPYNN_EMU_UCONTEXT)
    ucontext_t uc;
#else
    void* sp = nullptr;
#endif
};

inline void switch_context(Context& from, Context& to) {
#if defined(CUPYNN_EMU_UCONTEXT)
    swapcontext(&from.uc, &to.uc);
#else
    cupynn_emu_ctx_switch(&from.sp, to.sp);
#endif
}

size_t env_size(const char* name, size_t dflt) {
    const char* v = getenv(name);
    if (!v || !*v) return dflt;
    long long x = atoll(v);
    return x > 0 ? (size_t)x : dflt;
}

size_t default_stack_size() {
#if defined(CUPYNN_EMU_ASAN)
    size_t kb = 512;
#elif defined(CUPYNN_EMU_TSAN)
    size_t kb = 256;
#else
    size_t kb = 128;
#endif
    return env_size("CUPYNN_EMU_STACK_KB", kb) * 1024;
}

// ---------------------------------------------------------------------------------------
// Fibers, blocks, workers
// ---------------------------------------------------------------------------------------
enum FiberState : int { READY = 0, WAITING = 1, DONE = 2 };
enum WaitKind : int { WAIT_NONE = 0, WAIT_BARRIER = 1, WAIT_WARP = 2 };
enum WarpPhase : int { WARP_IDLE = 0, WARP_GATHER = 1, WARP_READ = 2 };
enum CollOp : int { OP_SHFL = 0, OP_VOTE = 1, OP_SYNCWARP = 2 };
const char* const kOpNames[] = {"__shfl*_sync", "a vote (__ballot/__any/__all_sync)", "__syncwarp"};

struct Worker;
struct Block;

// A TSan synchronisation object: TSan keys them by 8-byte cell, so each needs its own.
struct alignas(8) TsanSync {
    unsigned long long cell;
};

struct Fiber {
    Context ctx;
    char* stack = nullptr;  // lowest usable address (a PROT_NONE guard page lies below)
    size_t stack_size = 0;
    cupynn_emu::ThreadRegs regs;
    int linear = 0, lane = 0, warp = 0;
    int state = DONE;
    int wait = WAIT_NONE;
    Worker* worker = nullptr;
#if defined(CUPYNN_EMU_TSAN)
    void* tsan_fiber = nullptr;
#endif
};

struct Warp {
    int phase = WARP_IDLE;
    int op = 0;
    unsigned mask = 0, arrived = 0, to_read = 0;
    unsigned exists = 0, exited = 0;
    unsigned long long seq = 0;
    unsigned long long vals[32];
#if defined(CUPYNN_EMU_TSAN)
    TsanSync tsan_sync[2];
#endif
};

struct Launch {
    const cupynn_emu::KernelDesc* kernel;
    void** argv;
    dim3 grid, block;
    size_t shared_mem;
    std::atomic<long long> next_block{0};
    std::atomic<bool> failed{false};
    std::mutex err_mutex;
    std::string error;
#if defined(CUPYNN_EMU_TSAN)
    TsanSync tsan_start;
#endif
    void fail(const std::string& msg) {
        std::lock_guard<std::mutex> lock(err_mutex);
        if (error.empty()) error = msg;
        failed = true;
    }
};

struct Block {
    Launch* launch = nullptr;
    uint3 idx{0, 0, 0};
    int nthreads = 0, live = 0, done = 0;
    int bar_arrived = 0;
    unsigned long long bar_gen = 0;
    std::vector<Warp> warps;
    void* dyn_smem = nullptr;
    bool failed = false;
    std::string error;
#if defined(CUPYNN_EMU_TSAN)
    TsanSync tsan_bar[2];
#endif
};

struct Worker {
    Context sched;
    std::vector<std::unique_ptr<Fiber>> fibers;
    Block* block = nullptr;
    Fiber* current = nullptr;
    bool dirty_stacks = false;  // a block was abandoned: ASan stack shadow must be cleared
#if defined(CUPYNN_EMU_TSAN)
    void* tsan_sched = nullptr;
    unsigned long long blocks_run = 0;  // parity picks this block's "done" sync object
    TsanSync tsan_block_done[2];
    TsanSync tsan_sched_sync;  // the OS thread's own actions (e.g. TLS allocation) -> fibers
#endif
#if defined(CUPYNN_EMU_ASAN)
    void* asan_fake_sched = nullptr;
    const void* sched_stack_bottom = nullptr;
    size_t sched_stack_size = 0;
#endif
    // Fiber stacks come from a few large mappings (one per growth step), not one mapping
    // per fiber: per-fiber mappings (plus guard pages) across dozens of loaded modules
    // exhausted vm.max_map_count.  Overflow is detected by a canary instead of a guard page.
    std::vector<std::pair<char*, size_t>> regions;
    ~Worker() {
        for (auto& f : fibers) {
#if defined(CUPYNN_EMU_TSAN)
            if (f->tsan_fiber) __tsan_destroy_fiber(f->tsan_fiber);
#endif
            (void)f;
        }
        for (auto& r : regions) munmap(r.first, r.second);
    }
    static size_t page_size() { return (size_t)sysconf(_SC_PAGESIZE); }
};

std::mutex g_pool_mutex;
std::vector<Worker*> g_pool;  // idle workers (their fiber stacks are reused)

Worker* acquire_worker() {
    std::lock_guard<std::mutex> lock(g_pool_mutex);
    if (!g_pool.empty()) {
        Worker* w = g_pool.back();
        g_pool.pop_back();
        return w;
    }
    return new Worker();
}
void release_worker(Worker* w) {
    std::lock_guard<std::mutex> lock(g_pool_mutex);
    g_pool.push_back(w);
}

__thread Worker* t_worker = nullptr;

[[noreturn]] void fiber_exit(Fiber* f);
void fiber_main(Fiber* f);

extern "C" void cupynn_emu_fiber_entry(void* arg) {
    fiber_main(static_cast<Fiber*>(arg));
}

void switch_to_fiber(Worker* w, Fiber* f) {
    w->current = f;
    cupynn_emu_regs = &f->regs;
#if defined(CUPYNN_EMU_TSAN)
    __tsan_switch_to_fiber(f->tsan_fiber, __tsan_switch_to_fiber_no_sync);
#endif
#if defined(CUPYNN_EMU_ASAN)
    __sanitizer_start_switch_fiber(&w->asan_fake_sched, f->stack, f->stack_size);
#endif
    switch_context(w->sched, f->ctx);
#if defined(CUPYNN_EMU_ASAN)
    __sanitizer_finish_switch_fiber(w->asan_fake_sched, nullptr, nullptr);
#endif
    w->current = nullptr;
    cupynn_emu_regs = nullptr;
}

// Called on a fiber: go back to the scheduler (and, unless the fiber is finished, come
// back here later).
void switch_to_scheduler(Fiber* f, bool final) {
    Worker* w = f->worker;
#if defined(CUPYNN_EMU_TSAN)
    __tsan_switch_to_fiber(w->tsan_sched, __tsan_switch_to_fiber_no_sync);
#endif
#if defined(CUPYNN_EMU_ASAN)
    void* fake = nullptr;
    __sanitizer_start_switch_fiber(final ? nullptr : &fake, w->sched_stack_bottom,
                                   w->sched_stack_size);
#endif
    switch_context(f->ctx, w->sched);
#if defined(CUPYNN_EMU_ASAN)
    __sanitizer_finish_switch_fiber(fake, &w->sched_stack_bottom, &w->sched_stack_size);
#endif
    (void)final;
}

const unsigned long long kStackCanary = 0x6375707973746b21ull;

// Give stacks to every fiber of w that has none, from one new mapping.
void allocate_stacks(Worker* w) {
    size_t page = Worker::page_size();
    size_t size = (default_stack_size() + page - 1) / page * page;
    size_t n = 0;
    for (auto& f : w->fibers) n += f->stack ? 0 : 1;
    if (!n) return;
    void* mem = mmap(nullptr, n * size, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (mem == MAP_FAILED) {
        fprintf(stderr, "cupynn emulator: cannot map %zu fiber stacks of %zu KiB\n", n, size >> 10);
        abort();
    }
    w->regions.emplace_back(static_cast<char*>(mem), n * size);
    char* p = static_cast<char*>(mem);
    for (auto& f : w->fibers) {
        if (!f->stack) {
            f->stack = p;
            f->stack_size = size;
            p += size;
        }
    }
}

bool canary_intact(const Fiber* f) {
    unsigned long long v;
    memcpy(&v, f->stack, sizeof v);
    return v == kStackCanary;
}

void prepare_fiber(Fiber* f) {
#if defined(CUPYNN_EMU_ASAN)
    __asan_unpoison_memory_region(f->stack, sizeof kStackCanary);
#endif
    memcpy(f->stack, &kStackCanary, sizeof kStackCanary);
#if defined(CUPYNN_EMU_TSAN)
    if (!f->tsan_fiber) f->tsan_fiber = __tsan_create_fiber(0);
#endif
#if defined(CUPYNN_EMU_UCONTEXT)
    getcontext(&f->ctx.uc);
    f->ctx.uc.uc_stack.ss_sp = f->stack;
    f->ctx.uc.uc_stack.ss_size = f->stack_size;
    f->ctx.uc.uc_link = nullptr;
    makecontext(&f->ctx.uc, (void (*)())(void (*)(void*))cupynn_emu_fiber_entry, 1, f);
#else
    // Initial frame popped by cupynn_emu_ctx_switch: r15 r14 r13 r12 rbx rbp, then `ret` into
    // the trampoline, which calls r13(r12) with a 16-byte aligned stack.
    uintptr_t top = (reinterpret_cast<uintptr_t>(f->stack) + f->stack_size) & ~uintptr_t(15);
    void** sp = reinterpret_cast<void**>(top - 72);
    sp[0] = nullptr;                                                  // r15
    sp[1] = nullptr;                                                  // r14
    sp[2] = reinterpret_cast<void*>(&cupynn_emu_fiber_entry);         // r13
    sp[3] = f;                                                        // r12
    sp[4] = nullptr;                                                  // rbx
    sp[5] = nullptr;                                                  // rbp
    sp[6] = reinterpret_cast<void*>(&cupynn_emu_ctx_trampoline);      // return address
    f->ctx.sp = sp;
#endif
}

// ---------------------------------------------------------------------------------------
// Errors: the failing fiber records the message and leaves; the scheduler abandons the block.
// ---------------------------------------------------------------------------------------
std::string fmt(const char* format, ...) {
    char buf[1024];
    va_list ap;
    va_start(ap, format);
    vsnprintf(buf, sizeof buf, format, ap);
    va_end(ap);
    return buf;
}

std::string where(const Fiber* f) {
    const auto& r = f->regs;
    return fmt("block (%u,%u,%u) thread (%u,%u,%u) [warp %d lane %d]", r.block_idx.x, r.block_idx.y,
               r.block_idx.z, r.thread_idx.x, r.thread_idx.y, r.thread_idx.z, f->warp, f->lane);
}

[[noreturn]] void fail_here(Fiber* f, const std::string& msg) {
    Block* b = f->worker->block;
    if (!b->failed) {
        b->failed = true;
        b->error = where(f) + ": " + msg;
    }
    f->state = DONE;
    switch_to_scheduler(f, true);
    abort();  // never resumed
}

Fiber* current_fiber(const char* what) {
    Worker* w = t_worker;
    if (!w || !w->current) {
        fprintf(stderr, "cupynn emulator: %s called outside a kernel\n", what);
        abort();
    }
    return w->current;
}

void wait_here(Fiber* f, int kind) {
    f->state = WAITING;
    f->wait = kind;
    switch_to_scheduler(f, false);
    f->wait = WAIT_NONE;
}

void wake_warp(Block* b, int warp) {
    Worker* w = t_worker;
    int first = warp * 32, last = std::min(b->nthreads, first + 32);
    for (int i = first; i < last; ++i) {
        Fiber* f = w->fibers[i].get();
        if (f->state == WAITING && f->wait == WAIT_WARP) f->state = READY;
    }
}

void release_barrier(Block* b) {
    Worker* w = t_worker;
    b->bar_arrived = 0;
    ++b->bar_gen;
    for (int i = 0; i < b->nthreads; ++i) {
        Fiber* f = w->fibers[i].get();
        if (f->state == WAITING && f->wait == WAIT_BARRIER) f->state = READY;
    }
}

void fiber_main(Fiber* f) {
#if defined(CUPYNN_EMU_ASAN)
    __sanitizer_finish_switch_fiber(nullptr, &f->worker->sched_stack_bottom,
                                    &f->worker->sched_stack_size);
#endif
    Block* b = f->worker->block;
#if defined(CUPYNN_EMU_TSAN)
    // Ordered after the host's launch and the previous block on this worker (whose static
    // __shared__ storage this block reuses), but not after the other fibers of this block.
    __tsan_acquire(&b->launch->tsan_start);
    __tsan_acquire(&f->worker->tsan_sched_sync);
    __tsan_acquire(&f->worker->tsan_block_done[(f->worker->blocks_run + 1) & 1]);
#endif
    b->launch->kernel->run(b->launch->argv);
    fiber_exit(f);
}

void fiber_exit(Fiber* f) {
    Block* b = f->worker->block;
#if defined(CUPYNN_EMU_TSAN)
    __tsan_release(&f->worker->tsan_block_done[f->worker->blocks_run & 1]);
#endif
    f->state = DONE;
    ++b->done;
    --b->live;
    Warp& wp = b->warps[f->warp];
    wp.exited |= 1u << f->lane;
    if (wp.phase == WARP_GATHER && (wp.mask & (1u << f->lane)) && !(wp.arrived & (1u << f->lane))) {
        fail_here(f, fmt("returned while lanes 0x%08x of its warp wait for it in %s (mask 0x%08x)",
                         wp.arrived, kOpNames[wp.op], wp.mask));
    }
    if (b->bar_arrived > 0 && b->bar_arrived >= b->live) release_barrier(b);
    switch_to_scheduler(f, true);
    abort();  // never resumed
}

std::string deadlock_report(Worker* w, Block* b) {
    int at_bar = 0, at_warp = 0, exited = 0;
    std::string warps;
    for (int i = 0; i < b->nthreads; ++i) {
        Fiber* f = w->fibers[i].get();
        if (f->state == DONE) ++exited;
        else if (f->wait == WAIT_BARRIER) ++at_bar;
        else if (f->wait == WAIT_WARP) ++at_warp;
    }
    for (size_t i = 0; i < b->warps.size(); ++i) {
        const Warp& wp = b->warps[i];
        if (wp.phase == WARP_GATHER) {
            warps += fmt("; warp %zu waits in %s with mask 0x%08x, arrived 0x%08x", i,
                         kOpNames[wp.op], wp.mask, wp.arrived);
        }
    }
    return fmt("block (%u,%u,%u): deadlock: %d threads wait at __syncthreads, %d in warp "
               "collectives, %d returned",
               b->idx.x, b->idx.y, b->idx.z, at_bar, at_warp, exited) +
           warps;
}

#if defined(CUPYNN_EMU_TSAN)
// Static __shared__ variables live in this module's TLS block of the running OS thread.
// TSan keeps only 4 accesses per 8 bytes, so the previous block's accesses could push out
// the ones that race in this block: announce the block as new memory before every block.
struct TlsFinder {
    const void* self;
    void* data;
    size_t size;
};
int find_tls(struct dl_phdr_info* info, size_t, void* arg) {
    TlsFinder* f = static_cast<TlsFinder*>(arg);
    bool mine = false;
    for (int i = 0; i < info->dlpi_phnum; ++i) {
        const ElfW(Phdr)& ph = info->dlpi_phdr[i];
        uintptr_t lo = info->dlpi_addr + ph.p_vaddr;
        if (ph.p_type == PT_LOAD && (uintptr_t)f->self >= lo && (uintptr_t)f->self < lo + ph.p_memsz)
            mine = true;
    }
    if (!mine) return 0;
    for (int i = 0; i < info->dlpi_phnum; ++i) {
        if (info->dlpi_phdr[i].p_type == PT_TLS) {
            f->data = info->dlpi_tls_data;
            f->size = info->dlpi_phdr[i].p_memsz;
        }
    }
    return 1;
}
void reset_shared_shadow() {
    // Taking the address of a TLS variable makes sure this thread's block exists.
    volatile void* anchor = &cupynn_emu_regs;
    TlsFinder f{reinterpret_cast<const void*>(&find_tls), nullptr, 0};
    dl_iterate_phdr(find_tls, &f);
    if (getenv("CUPYNN_EMU_DEBUG_TLS"))
        fprintf(stderr, "tls block %p size %zu (anchor %p)\n", f.data, f.size, (void*)anchor);
    if (f.data && f.size) AnnotateNewMemory(__FILE__, __LINE__, f.data, f.size);
}
#endif

bool run_block(Worker* w, Launch* L, long long linear_block) {
#if defined(CUPYNN_EMU_TSAN)
    reset_shared_shadow();
#endif
    const dim3& G = L->grid;
    const dim3& B = L->block;
    Block blk;
    blk.launch = L;
    blk.idx.x = (unsigned)(linear_block % G.x);
    blk.idx.y = (unsigned)((linear_block / G.x) % G.y);
    blk.idx.z = (unsigned)(linear_block / ((long long)G.x * G.y));
    blk.nthreads = (int)(B.x * B.y * B.z);
    blk.live = blk.nthreads;
    blk.warps.resize((blk.nthreads + 31) / 32);
    for (size_t i = 0; i < blk.warps.size(); ++i) {
        int n = std::min(32, blk.nthreads - (int)i * 32);
        blk.warps[i].exists = n == 32 ? 0xffffffffu : ((1u << n) - 1u);
    }
    // Dynamic shared memory: exact size (ASan redzone right behind), 0xff-filled.
    blk.dyn_smem = malloc(L->shared_mem ? L->shared_mem : 1);
    if (L->shared_mem) memset(blk.dyn_smem, 0xff, L->shared_mem);
#if defined(CUPYNN_EMU_ASAN)
    if (!L->shared_mem) __asan_poison_memory_region(blk.dyn_smem, 1);
#endif
    w->block = &blk;

    while ((int)w->fibers.size() < blk.nthreads) {
        w->fibers.emplace_back(new Fiber());
    }
    allocate_stacks(w);
#if defined(CUPYNN_EMU_ASAN)
    if (w->dirty_stacks) {
        for (auto& f : w->fibers)
            if (f->stack) __asan_unpoison_memory_region(f->stack, f->stack_size);
        w->dirty_stacks = false;
    }
#endif
    for (int i = 0; i < blk.nthreads; ++i) {
        Fiber* f = w->fibers[i].get();
        f->worker = w;
        f->linear = i;
        f->lane = i & 31;
        f->warp = i >> 5;
        f->regs.thread_idx.x = (unsigned)(i % B.x);
        f->regs.thread_idx.y = (unsigned)((i / B.x) % B.y);
        f->regs.thread_idx.z = (unsigned)(i / (B.x * B.y));
        f->regs.block_idx = blk.idx;
        f->regs.block_dim = B;
        f->regs.grid_dim = G;
        f->state = READY;
        f->wait = WAIT_NONE;
        prepare_fiber(f);
    }

#if defined(CUPYNN_EMU_TSAN)
    __tsan_release(&w->tsan_sched_sync);  // the setup above happens before every fiber
#endif
    // Round-robin over the runnable fibers until all have returned.
    while (blk.done < blk.nthreads && !blk.failed) {
        bool progressed = false;
        for (int i = 0; i < blk.nthreads && !blk.failed; ++i) {
            Fiber* f = w->fibers[i].get();
            if (f->state == READY) {
                switch_to_fiber(w, f);
                progressed = true;
#if defined(CUPYNN_EMU_ASAN) && !defined(CUPYNN_EMU_UCONTEXT)
                // A finished fiber never returns from its frames, so their redzones stay
                // poisoned; clear them (from the final stack pointer up) before reuse.
                if (f->state == DONE) {
                    char* lo = std::max(f->stack, static_cast<char*>(f->ctx.sp) - 512);
                    __asan_unpoison_memory_region(lo, (size_t)(f->stack + f->stack_size - lo));
                }
#endif
            }
        }
        if (!progressed && blk.done < blk.nthreads && !blk.failed) {
            blk.failed = true;
            blk.error = deadlock_report(w, &blk);
        }
    }
    for (int i = 0; i < blk.nthreads; ++i) {
        if (!canary_intact(w->fibers[i].get())) {
            blk.failed = true;
            blk.error = fmt("block (%u,%u,%u) thread %d overflowed its %zu KiB emulator stack "
                            "(set CUPYNN_EMU_STACK_KB higher)",
                            blk.idx.x, blk.idx.y, blk.idx.z, i, default_stack_size() >> 10);
            break;
        }
    }
#if defined(CUPYNN_EMU_TSAN)
    __tsan_acquire(&w->tsan_block_done[w->blocks_run & 1]);  // fibers' accesses -> free below
    ++w->blocks_run;
    if (blk.failed) blk.dyn_smem = nullptr;  // waiting fibers never released: leak, don't race
#endif
#if defined(CUPYNN_EMU_ASAN) && defined(CUPYNN_EMU_UCONTEXT)
    w->dirty_stacks = true;
#endif
    if (blk.failed) {
        w->dirty_stacks = true;
#if defined(CUPYNN_EMU_ASAN)
        if (!L->shared_mem) __asan_unpoison_memory_region(blk.dyn_smem, 1);
#endif
        free(blk.dyn_smem);
        w->block = nullptr;
        L->fail(blk.error);
        return false;
    }
#if defined(CUPYNN_EMU_ASAN)
    if (!L->shared_mem) __asan_unpoison_memory_region(blk.dyn_smem, 1);
#endif
    free(blk.dyn_smem);
    w->block = nullptr;
    return true;
}

void worker_loop(Launch* L, long long nblocks) {
    Worker* w = acquire_worker();
    t_worker = w;
#if defined(CUPYNN_EMU_TSAN)
    w->tsan_sched = __tsan_get_current_fiber();  // this OS thread's own fiber
    __tsan_acquire(&L->tsan_start);
#endif
    for (;;) {
        if (L->failed) break;
        long long b = L->next_block.fetch_add(1);
        if (b >= nblocks) break;
        if (!run_block(w, L, b)) break;
    }
#if defined(CUPYNN_EMU_TSAN)
    __tsan_acquire(&w->tsan_block_done[0]);
    __tsan_acquire(&w->tsan_block_done[1]);
    // Every TSan fiber is a TSan thread with its own trace: thousands of them (each module
    // has its own runtime and workers) exhaust TSan's internal allocator, so they live for
    // one launch only.  The next launch's fibers are ordered after these by tsan_start.
    for (auto& f : w->fibers) {
        if (f->tsan_fiber) {
            __tsan_destroy_fiber(f->tsan_fiber);
            f->tsan_fiber = nullptr;
        }
    }
#endif
    t_worker = nullptr;
    release_worker(w);
}

struct Range {
    char* begin;
    char* end;
    char* copy;
};

}  // namespace

// ---------------------------------------------------------------------------------------
// The API used by cuda_emu.h
// ---------------------------------------------------------------------------------------
extern "C" void cupynn_emu_fail(const char* message) {
    fail_here(current_fiber("cupynn_emu_fail"), message);
}

extern "C" void* cupynn_emu_dynamic_smem(void) {
    return current_fiber("CUPYNN_DYNAMIC_SHARED")->worker->block->dyn_smem;
}

extern "C" void cupynn_emu_syncthreads(void) {
    Fiber* f = current_fiber("__syncthreads");
    Block* b = f->worker->block;
#if defined(CUPYNN_EMU_TSAN)
    TsanSync* sync = &b->tsan_bar[b->bar_gen & 1];
    __tsan_release(sync);
#endif
    ++b->bar_arrived;
    if (b->bar_arrived >= b->live) {
        release_barrier(b);
    } else {
        unsigned long long gen = b->bar_gen;
        while (b->bar_gen == gen) wait_here(f, WAIT_BARRIER);
    }
#if defined(CUPYNN_EMU_TSAN)
    __tsan_acquire(sync);
#endif
}

namespace {

// Enter a warp collective: deposit this lane's value, wait until every lane of `mask` has
// deposited its own, and return the warp (the caller reads, then calls leave_collective).
Warp& enter_collective(Fiber* f, int op, unsigned mask, unsigned long long value) {
    Block* b = f->worker->block;
    Warp& wp = b->warps[f->warp];
    const unsigned bit = 1u << f->lane;
    if (!(mask & bit)) {
        fail_here(f, fmt("%s with mask 0x%08x that does not include the calling lane %d",
                         kOpNames[op], mask, f->lane));
    }
    if (mask & ~wp.exists) {
        fail_here(f, fmt("%s with mask 0x%08x names lanes 0x%08x that do not exist (the block has "
                         "%d threads, not a multiple of 32)",
                         kOpNames[op], mask, mask & ~wp.exists, b->nthreads));
    }
    if (mask & wp.exited) {
        fail_here(f, fmt("%s with mask 0x%08x names lanes 0x%08x that have already returned",
                         kOpNames[op], mask, mask & wp.exited));
    }
    while (wp.phase == WARP_READ) wait_here(f, WAIT_WARP);  // the previous one is still read
    if (wp.phase == WARP_IDLE) {
        wp.phase = WARP_GATHER;
        wp.op = op;
        wp.mask = mask;
        wp.arrived = 0;
    } else if (wp.mask != mask || wp.op != op) {
        fail_here(f, fmt("divergent warp collectives: this lane calls %s with mask 0x%08x while "
                         "lanes 0x%08x wait in %s with mask 0x%08x",
                         kOpNames[op], mask, wp.arrived, kOpNames[wp.op], wp.mask));
    }
    wp.vals[f->lane] = value;
    wp.arrived |= bit;
#if defined(CUPYNN_EMU_TSAN)
    if (op == OP_SYNCWARP) __tsan_release(&wp.tsan_sync[wp.seq & 1]);
#endif
    if (wp.arrived == mask) {
        wp.phase = WARP_READ;
        wp.to_read = mask;
        ++wp.seq;
        wake_warp(b, f->warp);
    } else {
        unsigned long long seq = wp.seq;
        while (wp.seq == seq) wait_here(f, WAIT_WARP);
    }
#if defined(CUPYNN_EMU_TSAN)
    if (op == OP_SYNCWARP) __tsan_acquire(&wp.tsan_sync[(wp.seq - 1) & 1]);
#endif
    return wp;
}

void leave_collective(Fiber* f, Warp& wp) {
    wp.to_read &= ~(1u << f->lane);
    if (wp.to_read == 0) {
        wp.phase = WARP_IDLE;
        wake_warp(f->worker->block, f->warp);
    }
}

}  // namespace

extern "C" void cupynn_emu_syncwarp(unsigned mask) {
    Fiber* f = current_fiber("__syncwarp");
    Warp& wp = enter_collective(f, OP_SYNCWARP, mask, 0);
    leave_collective(f, wp);
}

extern "C" unsigned long long cupynn_emu_shfl(unsigned mask, unsigned long long value, int mode,
                                              int b, int c) {
    Fiber* f = current_fiber("__shfl_sync");
    const int seg = (c >> 8) & 0x1f;
    const int width = 32 - seg;
    if (width <= 0 || (width & (width - 1)) != 0) {
        fail_here(f, fmt("shuffle width %d is not a power of two in 1..32", width));
    }
    Warp& wp = enter_collective(f, OP_SHFL, mask, value);
    // PTX shfl.sync semantics (segmask = c[12:8], clamp = c[4:0]).
    const int lane = f->lane;
    const int segmask = seg;
    const int max_lane = (lane & segmask) | ((c & 0x1f) & ~segmask);
    const int min_lane = lane & segmask;
    const int bval = b & 0x1f;
    int j = lane;
    bool pval = false;
    switch (mode) {
        case cupynn_emu::SHFL_UP: j = lane - bval; pval = j >= max_lane; break;
        case cupynn_emu::SHFL_DOWN: j = lane + bval; pval = j <= max_lane; break;
        case cupynn_emu::SHFL_BFLY: j = lane ^ bval; pval = j <= max_lane; break;
        default: j = min_lane | (bval & ~segmask); pval = j <= max_lane; break;
    }
    if (!pval) j = lane;
    if (!(wp.mask & (1u << j))) {
        fail_here(f, fmt("shuffle reads lane %d, which is not in the mask 0x%08x (its value is "
                         "undefined on the GPU)",
                         j, wp.mask));
    }
    unsigned long long out = wp.vals[j];
    leave_collective(f, wp);
    return out;
}

extern "C" unsigned cupynn_emu_vote(unsigned mask, int pred, int mode) {
    Fiber* f = current_fiber("__ballot_sync");
    Warp& wp = enter_collective(f, OP_VOTE, mask, pred ? 1u : 0u);
    unsigned ballot = 0;
    for (int i = 0; i < 32; ++i)
        if ((wp.mask >> i) & 1u && wp.vals[i]) ballot |= 1u << i;
    leave_collective(f, wp);
    if (mode == cupynn_emu::VOTE_ANY) return ballot != 0;
    if (mode == cupynn_emu::VOTE_ALL) return ballot == mask;
    return ballot;
}

// Launch a kernel: argv[i] points at the i-th argument's bytes (for arrays: at a pointer).
// arg_nbytes[i] >= 0 marks the argument as an array of that many bytes, -1 as a scalar.
extern "C" int cupynn_emu_launch(const cupynn_emu::KernelDesc* kernel, const unsigned* grid,
                                 const unsigned* block, unsigned long long shared_mem, void** argv,
                                 const long long* arg_nbytes, int nargs, char* err,
                                 unsigned long long errlen) {
    Launch L;
    L.kernel = kernel;
    L.grid = dim3(grid[0], grid[1], grid[2]);
    L.block = dim3(block[0], block[1], block[2]);
    L.shared_mem = (size_t)shared_mem;
    std::vector<void*> args(argv, argv + nargs);
    L.argv = args.data();

    // ASan: arrays into exact-size heap copies (overlapping arrays share one copy).
    std::vector<Range> ranges;
    std::vector<void*> ptr_storage(nargs, nullptr);
#if defined(CUPYNN_EMU_ASAN)
    for (int i = 0; i < nargs; ++i) {
        if (arg_nbytes[i] < 0) continue;
        char* p = *static_cast<char**>(argv[i]);
        if (!p) continue;
        ranges.push_back(Range{p, p + arg_nbytes[i], nullptr});
    }
    std::sort(ranges.begin(), ranges.end(),
              [](const Range& a, const Range& b) { return a.begin < b.begin; });
    std::vector<Range> merged;
    for (const Range& r : ranges) {
        if (!merged.empty() && r.begin < merged.back().end) {
            merged.back().end = std::max(merged.back().end, r.end);
        } else {
            merged.push_back(r);
        }
    }
    for (Range& r : merged) {
        size_t n = (size_t)(r.end - r.begin);
        r.copy = static_cast<char*>(malloc(n ? n : 1));
        if (n) memcpy(r.copy, r.begin, n);
        else __asan_poison_memory_region(r.copy, 1);
    }
    for (int i = 0; i < nargs; ++i) {
        if (arg_nbytes[i] < 0) continue;
        char* p = *static_cast<char**>(argv[i]);
        if (!p) continue;
        for (const Range& r : merged) {
            if (p >= r.begin && p < r.end + (r.end == r.begin ? 1 : 0)) {
                ptr_storage[i] = r.copy + (p - r.begin);
                args[i] = &ptr_storage[i];
                break;
            }
        }
    }
    ranges.swap(merged);
#else
    (void)arg_nbytes;
#endif

    long long nblocks = (long long)L.grid.x * L.grid.y * L.grid.z;
#if defined(CUPYNN_EMU_TSAN)
    const unsigned max_default = 2;  // TSan: fewer live fibers (each is a TSan thread)
#else
    const unsigned max_default = 4;
#endif
    size_t nthreads = env_size("CUPYNN_EMU_THREADS",
                               std::min(max_default, std::max(1u, std::thread::hardware_concurrency())));
    nthreads = std::min<size_t>(nthreads, (size_t)std::max(1LL, nblocks));
#if defined(CUPYNN_EMU_TSAN)
    __tsan_release(&L.tsan_start);
#endif
    if (nthreads <= 1) {
        worker_loop(&L, nblocks);
    } else {
        std::vector<std::thread> threads;
        for (size_t i = 1; i < nthreads; ++i) threads.emplace_back(worker_loop, &L, nblocks);
        worker_loop(&L, nblocks);
        for (auto& t : threads) t.join();
    }

#if defined(CUPYNN_EMU_ASAN)
    for (Range& r : ranges) {
        size_t n = (size_t)(r.end - r.begin);
        if (n) memcpy(r.begin, r.copy, n);
        else __asan_unpoison_memory_region(r.copy, 1);
        free(r.copy);
    }
#endif
    if (L.failed) {
        if (err && errlen) snprintf(err, (size_t)errlen, "%s", L.error.c_str());
        return 1;
    }
    return 0;
}
