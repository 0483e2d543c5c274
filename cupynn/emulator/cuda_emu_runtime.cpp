// cuda_emu_runtime.cpp -- fibers, barriers, warp collectives and the launch loop of the
// CUDA emulator (see cuda_emu.h).  Linked into every emulated module.  Also: the schedules
// (fiber order per barrier interval, block order), the poisoned static shared memory, the
// guarded array copies and the fault handler of the default mode, and the PTX interpreter
// (mma.sync, cvt.rna.tf32, cp.async with its commit groups) -- see kernels/README.md.
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

#include <link.h>
#include <signal.h>
#include <sys/mman.h>
#include <ucontext.h>
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
#include <unordered_map>
#include <vector>

#if defined(CUPYNN_EMU_ASAN)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif
#if defined(CUPYNN_EMU_TSAN)
#include <sanitizer/tsan_interface.h>
// Dynamic-annotation entry point of the TSan runtime: forget all accesses to a range.
extern "C" void AnnotateNewMemory(const char* file, int line, const volatile void* mem,
                                  size_t size);
#endif

#if !defined(__x86_64__)
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
enum CollOp : int { OP_SHFL = 0, OP_VOTE = 1, OP_SYNCWARP = 2, OP_GATHER = 3 };
const char* const kOpNames[] = {"__shfl*_sync", "a vote (__ballot/__any/__all_sync)", "__syncwarp",
                                "mma.sync"};

// Fiber order per barrier interval (cupynn.emulator.schedule): the default runs fibers in
// thread order and lets the last arrival at a barrier / collective go on first; the others
// reorder every pass of the scheduler and make that last arrival yield too.
enum Schedule : int { SCHED_DEFAULT = 0, SCHED_REVERSED = 1, SCHED_ROTATED = 2, SCHED_RANDOM = 3 };

// One guarded copy of an array argument (default mode): data sits between PROT_NONE pages,
// ends flush (to within 64 bytes) against the upper one, and the slack around it holds 0xff
// canary bytes that are checked after the launch.
struct Guarded {
    char* begin;   // the caller's bytes
    char* end;
    char* map;     // the mapping: [guard page][canary .. data .. canary][guard page]
    size_t map_len;
    char* data;    // the copy the kernel sees
    std::vector<int> args;
};

struct Worker;
struct Block;

// Word copies of the runtime's own bookkeeping.  Not memcpy: ThreadSanitizer intercepts
// memcpy even in this uninstrumented file, and the mma operand exchange must not look like a
// data race (nor order anything: it is a collective, not a barrier).
__attribute__((optimize("no-tree-loop-distribute-patterns"))) void copy_words(
    unsigned long long* dst, const unsigned long long* src, int n) {
    for (int i = 0; i < n; ++i) dst[i] = src[i];
}

// A TSan synchronisation object: TSan keys them by 8-byte cell, so each needs its own.
struct alignas(8) TsanSync {
    unsigned long long cell;
};

// One cp.async in flight: the destination is poisoned at issue, the copy lands at the
// cp.async.wait_group / wait_all that covers its commit group (PTX ISA semantics).
struct CpAsync {
    char* dst;
    const char* src;
    int size, src_size;
    unsigned long long group;  // 0: not committed yet; else the group's number (1, 2, ...)
};

struct Fiber {
    Context ctx;
    std::vector<CpAsync> cp_pending;
    unsigned long long cp_groups = 0;  // commit groups this thread has made
    void* cvta_ring[64];               // __cvta_generic_to_shared handles (see cupynn_emu_cvta_shared)
    unsigned cvta_next = 0;
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
    const void* tag = nullptr;               // OP_GATHER: the instruction text all lanes must run
    int gwords = 0;                          // OP_GATHER: 64-bit words per lane (<= kGatherWords)
    unsigned long long gbuf[32 * 16];        // OP_GATHER: 32 lanes x gwords
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
    int schedule = SCHED_DEFAULT;
    unsigned long long seed = 0;
    long long first_block = 0, nblocks = 0;  // the linear blocks [first_block, first_block + nblocks) run
    std::vector<long long> order;            // SCHED_RANDOM: the block permutation (when small)
    std::vector<Guarded> guards;
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

unsigned long long splitmix64(unsigned long long x) {
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

// The order in which pass `pass` of block `blk` visits its n fibers.
void pass_order(const Launch* L, long long blk, unsigned long long pass, int n, std::vector<int>& order) {
    order.resize((size_t)n);
    switch (L->schedule) {
        case SCHED_REVERSED:
            for (int i = 0; i < n; ++i) order[(size_t)i] = n - 1 - i;
            break;
        case SCHED_ROTATED: {
            // a different first fiber every pass (a stride that is not a multiple of 32, so
            // warps and lanes both move)
            const int r = (int)((L->seed + pass * 37ull + (unsigned long long)blk) % (unsigned long long)n);
            for (int i = 0; i < n; ++i) order[(size_t)i] = (i + r) % n;
            break;
        }
        case SCHED_RANDOM: {
            for (int i = 0; i < n; ++i) order[(size_t)i] = i;
            unsigned long long st = splitmix64(L->seed ^ splitmix64((unsigned long long)blk) ^ (pass << 32));
            for (int i = n - 1; i > 0; --i) {
                st = splitmix64(st);
                const int j = (int)(st % (unsigned long long)(i + 1));
                std::swap(order[(size_t)i], order[(size_t)j]);
            }
            break;
        }
        default:
            for (int i = 0; i < n; ++i) order[(size_t)i] = i;
    }
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

// Non-default schedules: the fiber that completed a barrier / collective does not run on
// first; it goes back to the scheduler, which picks the next fiber in the pass order.
void yield_if_adversarial(Fiber* f) {
    if (f->worker->block->launch->schedule == SCHED_DEFAULT) return;
    f->state = READY;
    f->wait = WAIT_NONE;
    switch_to_scheduler(f, false);
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

// Static __shared__ variables live in this module's TLS block of the running OS thread
// (`static thread_local`).  Before every block it is filled with 0xff bytes (NaN / -1), as
// dynamic shared memory is, so that a block reading shared memory it did not write sees
// poison instead of the previous block's values.  The runtime's own TLS variables live in
// the same block: they are saved around the fill.
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
__thread void* t_tls_data = nullptr;
__thread size_t t_tls_size = 0;

void poison_static_shared() {
    void* data = t_tls_data;
    size_t size = t_tls_size;
    if (!data) {
        // Taking the address of a TLS variable makes sure this thread's block exists.
        volatile void* anchor = &cupynn_emu_regs;
        (void)anchor;
        TlsFinder f{reinterpret_cast<const void*>(&find_tls), nullptr, 0};
        dl_iterate_phdr(find_tls, &f);
        if (getenv("CUPYNN_EMU_DEBUG_TLS"))
            fprintf(stderr, "tls block %p size %zu\n", f.data, f.size);
        data = f.data;
        size = f.size;
        if (!data) return;
    }
    Worker* w = t_worker;
    cupynn_emu::ThreadRegs* regs = cupynn_emu_regs;
    memset(data, 0xff, size);
    // volatile: the compiler must not drop these stores as "unchanged" (it cannot see that the
    // memset covered the variables)
    *static_cast<Worker* volatile*>(&t_worker) = w;
    *static_cast<cupynn_emu::ThreadRegs* volatile*>(&cupynn_emu_regs) = regs;
    *static_cast<void* volatile*>(&t_tls_data) = data;
    *static_cast<volatile size_t*>(&t_tls_size) = size;
    asm volatile("" ::: "memory");
#if defined(CUPYNN_EMU_TSAN)
    // TSan keeps only 4 accesses per 8 bytes, so the previous block's accesses could push out
    // the ones that race in this block: announce the block as new memory before every block.
    AnnotateNewMemory(__FILE__, __LINE__, data, size);
#endif
}

bool run_block(Worker* w, Launch* L, long long linear_block) {
    poison_static_shared();
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
        f->cp_pending.clear();
        f->cp_groups = 0;
        f->cvta_next = 0;
        prepare_fiber(f);
    }

#if defined(CUPYNN_EMU_TSAN)
    __tsan_release(&w->tsan_sched_sync);  // the setup above happens before every fiber
#endif
    // Passes over the runnable fibers (in the schedule's order) until all have returned.
    std::vector<int> order;
    unsigned long long pass = 0;
    while (blk.done < blk.nthreads && !blk.failed) {
        bool progressed = false;
        pass_order(L, linear_block, pass++, blk.nthreads, order);
        for (int oi = 0; oi < blk.nthreads && !blk.failed; ++oi) {
            Fiber* f = w->fibers[(size_t)order[(size_t)oi]].get();
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

// The linear block that the b-th block run is (the schedule permutes the block order too).
long long map_block(const Launch* L, long long b) {
    const long long n = L->nblocks;
    long long i = b;
    switch (L->schedule) {
        case SCHED_REVERSED: i = n - 1 - b; break;
        case SCHED_ROTATED: i = (b + (long long)(L->seed % (unsigned long long)n) + 1) % n; break;
        case SCHED_RANDOM: i = L->order.empty() ? n - 1 - b : L->order[(size_t)b]; break;
        default: break;
    }
    return L->first_block + i;
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
        if (!run_block(w, L, map_block(L, b))) break;
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
        yield_if_adversarial(f);
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
Warp& enter_collective(Fiber* f, int op, unsigned mask, unsigned long long value,
                       const unsigned long long* words = nullptr, int nwords = 0,
                       const void* tag = nullptr) {
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
        wp.tag = tag;
        wp.gwords = nwords;
    } else if (wp.mask != mask || wp.op != op) {
        fail_here(f, fmt("divergent warp collectives: this lane calls %s with mask 0x%08x while "
                         "lanes 0x%08x wait in %s with mask 0x%08x",
                         kOpNames[op], mask, wp.arrived, kOpNames[wp.op], wp.mask));
    } else if (op == OP_GATHER && (wp.tag != tag || wp.gwords != nwords)) {
        fail_here(f, fmt("divergent warp: this lane runs `%s` while lanes 0x%08x wait in `%s` "
                         "(.aligned instructions need every lane at the same one)",
                         static_cast<const char*>(tag), wp.arrived, static_cast<const char*>(wp.tag)));
    }
    wp.vals[f->lane] = value;
    if (op == OP_GATHER) copy_words(&wp.gbuf[f->lane * nwords], words, nwords);
    wp.arrived |= bit;
#if defined(CUPYNN_EMU_TSAN)
    if (op == OP_SYNCWARP) __tsan_release(&wp.tsan_sync[wp.seq & 1]);
#endif
    if (wp.arrived == mask) {
        wp.phase = WARP_READ;
        wp.to_read = mask;
        ++wp.seq;
        wake_warp(b, f->warp);
        yield_if_adversarial(f);
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

// ---------------------------------------------------------------------------------------
// Guarded arrays (default mode) and the fault handler
// ---------------------------------------------------------------------------------------
namespace {

const size_t kGuardMaxDefault = 256u << 20;  // larger arrays (e.g. sparse ones) are not copied

std::string arg_list(const std::vector<int>& args) {
    std::string s;
    for (size_t i = 0; i < args.size(); ++i) s += (i ? "/" : "") + std::to_string(args[i]);
    return s;
}

// "byte offset +N past the end of argument i" for an address near a guarded copy.
std::string locate(const Launch* L, uintptr_t addr) {
    const Guarded* best = nullptr;
    long long best_dist = 0;
    for (const Guarded& g : L->guards) {
        const uintptr_t lo = (uintptr_t)g.map, hi = lo + g.map_len;
        if (addr >= lo && addr < hi) { best = &g; break; }
        long long d = addr < lo ? (long long)(lo - addr) : (long long)(addr - hi);
        if (!best || d < best_dist) { best = &g; best_dist = d; }
    }
    if (!best) return fmt("address %p (no array argument is near it)", (void*)addr);
    const bool inside = addr >= (uintptr_t)best->map && addr < (uintptr_t)best->map + best->map_len;
    const long long n = (long long)(best->end - best->begin);
    const long long off = (long long)addr - (long long)(uintptr_t)best->data;
    std::string where_;
    if (off < 0) where_ = fmt("%lld bytes before the start", -off);
    else if (off >= n) where_ = fmt("byte offset %lld, %lld bytes past the end", off, off - n + 1);
    else where_ = fmt("byte offset %lld", off);
    const int itemsize = best->args.empty() ? 0
        : L->kernel->params[best->args[0]].pointee_size;
    std::string elem = itemsize > 0 ? fmt(" (element %lld of %lld)", off >= 0 ? off / itemsize
                                                                       : -((-off + itemsize - 1) / itemsize),
                                          n / itemsize)
                                    : std::string();
    return fmt("%s of argument %s (%lld bytes)%s%s", where_.c_str(), arg_list(best->args).c_str(), n,
               elem.c_str(), inside ? "" : " (the nearest array)");
}

#if !defined(CUPYNN_EMU_ASAN) && !defined(CUPYNN_EMU_TSAN)
struct sigaction g_prev_segv, g_prev_bus;
std::once_flag g_handler_once;

void chain(int sig, siginfo_t* si, void* uc) {
    struct sigaction& prev = sig == SIGSEGV ? g_prev_segv : g_prev_bus;
    if (prev.sa_flags & SA_SIGINFO) {
        if (prev.sa_sigaction) prev.sa_sigaction(sig, si, uc);
        return;
    }
    if (prev.sa_handler == SIG_IGN) return;
    if (prev.sa_handler == SIG_DFL || prev.sa_handler == nullptr) {
        signal(sig, SIG_DFL);  // the fault repeats on return and ends the process as before
        return;
    }
    prev.sa_handler(sig);
}

// A fault while a fiber of this module runs kernel code is the kernel's: it fails that
// launch (naming the kernel, the array and the offset) instead of killing the process.
void fault_handler(int sig, siginfo_t* si, void* uc) {
    Worker* w = t_worker;
    if (!w || !w->current || !w->block) {
        chain(sig, si, uc);
        return;
    }
    Fiber* f = w->current;
    const Launch* L = w->block->launch;
    bool write = false;
#if defined(__x86_64__)
    write = (static_cast<ucontext_t*>(uc)->uc_mcontext.gregs[REG_ERR] & 2) != 0;
#endif
    if (si->si_code == SI_KERNEL)  // a general-protection fault: no address is reported
        fail_here(f, fmt("kernel %s: invalid memory access at a non-canonical address (an offset far out "
                         "of range, e.g. a wrapped 32-bit index) (%s)",
                         L->kernel->name, sig == SIGSEGV ? "SIGSEGV" : "SIGBUS"));
    fail_here(f, fmt("kernel %s: invalid %s at %s (%s)", L->kernel->name, write ? "write" : "read",
                     locate(L, (uintptr_t)si->si_addr).c_str(), sig == SIGSEGV ? "SIGSEGV" : "SIGBUS"));
}

void install_fault_handler() {
    std::call_once(g_handler_once, [] {
        if (getenv("CUPYNN_EMU_NO_FAULT_HANDLER")) return;
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_sigaction = fault_handler;
        sa.sa_flags = SA_SIGINFO | SA_NODEFER;
        sigemptyset(&sa.sa_mask);
        sigaction(SIGSEGV, &sa, &g_prev_segv);
        sigaction(SIGBUS, &sa, &g_prev_bus);
    });
}
#endif

// Copy the array arguments into guarded mappings (overlapping arrays share one).
void guard_arrays(Launch& L, void** argv, std::vector<void*>& args, std::vector<void*>& ptr_storage,
                  const long long* arg_nbytes, int nargs) {
    const size_t page = Worker::page_size();
    const size_t limit = env_size("CUPYNN_EMU_GUARD_MAX", kGuardMaxDefault);
    std::vector<Guarded> ranges;
    for (int i = 0; i < nargs; ++i) {
        if (arg_nbytes[i] < 0) continue;
        char* p = *static_cast<char**>(argv[i]);
        if (!p || (size_t)arg_nbytes[i] > limit) continue;
        ranges.push_back(Guarded{p, p + arg_nbytes[i], nullptr, 0, nullptr, {i}});
    }
    std::sort(ranges.begin(), ranges.end(),
              [](const Guarded& a, const Guarded& b) { return a.begin < b.begin; });
    for (Guarded& r : ranges) {
        if (!L.guards.empty() && r.begin < L.guards.back().end) {
            Guarded& m = L.guards.back();
            m.end = std::max(m.end, r.end);
            m.args.insert(m.args.end(), r.args.begin(), r.args.end());
        } else {
            L.guards.push_back(r);
        }
    }
    for (Guarded& g : L.guards) {
        const size_t n = (size_t)(g.end - g.begin);
        const size_t body = (n + 128 + page - 1) / page * page;  // >= 64 canary bytes each side
        g.map_len = body + 2 * page;
        void* mem = mmap(nullptr, g.map_len, PROT_READ | PROT_WRITE,
                         MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (mem == MAP_FAILED) {
            g.map = nullptr;
            continue;
        }
        g.map = static_cast<char*>(mem);
        mprotect(g.map, page, PROT_NONE);
        mprotect(g.map + page + body, page, PROT_NONE);
        memset(g.map + page, 0xff, body);
        // the data ends within 64 bytes of the upper guard page, at the caller's alignment mod 64
        const uintptr_t top = (uintptr_t)(g.map + page + body);
        uintptr_t start = top - n - 64;
        start = start - (start & 63) + ((uintptr_t)g.begin & 63);
        g.data = reinterpret_cast<char*>(start);
        if (n) memcpy(g.data, g.begin, n);
    }
    for (int i = 0; i < nargs; ++i) {
        if (arg_nbytes[i] < 0) continue;
        char* p = *static_cast<char**>(argv[i]);
        if (!p) continue;
        for (const Guarded& g : L.guards) {
            if (g.map && p >= g.begin && p <= g.end &&
                (p < g.end || (size_t)arg_nbytes[i] == 0)) {
                ptr_storage[(size_t)i] = g.data + (p - g.begin);
                args[(size_t)i] = &ptr_storage[(size_t)i];
                break;
            }
        }
    }
}

// Copy back, check the canaries, unmap.  Returns an error message ("" if clean).
std::string unguard_arrays(Launch& L) {
    std::string err;
    const size_t page = Worker::page_size();
    for (Guarded& g : L.guards) {
        if (!g.map) continue;
        const size_t n = (size_t)(g.end - g.begin);
        if (n) memcpy(g.begin, g.data, n);
        const char* lo = g.map + page;
        const char* hi = g.map + g.map_len - page;
        const char* bad = nullptr;
        for (const char* q = lo; q < g.data && !bad; ++q)
            if ((unsigned char)*q != 0xff) bad = q;
        for (const char* q = g.data + n; q < hi && !bad; ++q)
            if ((unsigned char)*q != 0xff) bad = q;
        if (bad && err.empty())
            err = fmt("kernel %s: wrote outside an array: %s (caught by the canary bytes around it)",
                      L.kernel->name, locate(&L, (uintptr_t)bad).c_str());
        munmap(g.map, g.map_len);
        g.map = nullptr;
    }
    return err;
}

}  // namespace

// Launch a kernel: argv[i] points at the i-th argument's bytes (for arrays: at a pointer).
// arg_nbytes[i] >= 0 marks the argument as an array of that many bytes, -1 as a scalar.
// config: {schedule, seed, first block, number of blocks (-1: to the end), guard arrays (0/1)}.
extern "C" int cupynn_emu_launch(const cupynn_emu::KernelDesc* kernel, const unsigned* grid,
                                 const unsigned* block, unsigned long long shared_mem, void** argv,
                                 const long long* arg_nbytes, int nargs, char* err,
                                 unsigned long long errlen, const long long* config) {
    Launch L;
    L.kernel = kernel;
    L.grid = dim3(grid[0], grid[1], grid[2]);
    L.block = dim3(block[0], block[1], block[2]);
    L.shared_mem = (size_t)shared_mem;
    std::vector<void*> args(argv, argv + nargs);
    L.argv = args.data();
    const long long total = (long long)L.grid.x * L.grid.y * L.grid.z;
    L.schedule = config ? (int)config[0] : SCHED_DEFAULT;
    L.seed = config ? (unsigned long long)config[1] : 0;
    L.first_block = config ? std::min(std::max(0LL, config[2]), total) : 0;
    L.nblocks = total - L.first_block;
    if (config && config[3] >= 0) L.nblocks = std::min(L.nblocks, config[3]);
    const bool guard = config ? config[4] != 0 : true;
    if (L.schedule == SCHED_RANDOM && L.nblocks > 1 && L.nblocks <= (1LL << 22)) {
        L.order.resize((size_t)L.nblocks);
        for (long long i = 0; i < L.nblocks; ++i) L.order[(size_t)i] = i;
        unsigned long long st = splitmix64(L.seed ^ 0x5bd1e995ull);
        for (long long i = L.nblocks - 1; i > 0; --i) {
            st = splitmix64(st);
            std::swap(L.order[(size_t)i], L.order[(size_t)(st % (unsigned long long)(i + 1))]);
        }
    }

    // ASan: arrays into exact-size heap copies (overlapping arrays share one copy).
    std::vector<Range> ranges;
    std::vector<void*> ptr_storage((size_t)nargs, nullptr);
#if defined(CUPYNN_EMU_ASAN)
    (void)guard;
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
                ptr_storage[(size_t)i] = r.copy + (p - r.begin);
                args[(size_t)i] = &ptr_storage[(size_t)i];
                break;
            }
        }
    }
    ranges.swap(merged);
#elif defined(CUPYNN_EMU_TSAN)
    (void)guard;
    (void)arg_nbytes;
#else
    install_fault_handler();
    if (guard) guard_arrays(L, argv, args, ptr_storage, arg_nbytes, nargs);
#endif

    long long nblocks = L.nblocks;
#if defined(CUPYNN_EMU_TSAN)
    const unsigned max_default = 2;  // TSan: fewer live fibers (each is a TSan thread)
#else
    const unsigned max_default = 4;
#endif
    // Adversarial schedules run the blocks on one OS thread, in the schedule's block order,
    // so that a race between blocks fails (or passes) the same way every time.
    const unsigned dflt = L.schedule == SCHED_DEFAULT
        ? std::min(max_default, std::max(1u, std::thread::hardware_concurrency())) : 1u;
    size_t nthreads = env_size("CUPYNN_EMU_THREADS", dflt);
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
#elif !defined(CUPYNN_EMU_TSAN)
    {
        std::string gerr = unguard_arrays(L);
        if (!gerr.empty()) L.fail(gerr);
    }
#endif
    if (L.failed) {
        if (err && errlen) snprintf(err, (size_t)errlen, "%s", L.error.c_str());
        return 1;
    }
    return 0;
}

// ---------------------------------------------------------------------------------------
// The PTX interpreter: the wrappers' inline PTX (kernels/ptx.cuh: CUPYNN_PTX), run from the
// very instruction text and operand list the GPU receives.  The text is parsed and checked
// against the PTX ISA (operand groups, counts, the register type each position takes, every
// asm operand used exactly once) and executed with the fragment layouts of kernels/mma.cuh.
// ---------------------------------------------------------------------------------------
namespace {

struct PtxGroup {
    char kind;              // 'v' {a, b}, 'a' [a], 's' scalar
    std::vector<int> refs;  // asm operand numbers; -1: a literal immediate
    std::vector<long long> imm;
};
struct PtxParsed {
    std::string op;
    std::vector<PtxGroup> groups;
    std::string error;
};

std::mutex g_ptx_mutex;
std::unordered_map<const char*, PtxParsed> g_ptx_cache;

std::string trim(const std::string& x) {
    size_t a = x.find_first_not_of(" \t\n\r"), b = x.find_last_not_of(" \t\n\r");
    return a == std::string::npos ? std::string() : x.substr(a, b - a + 1);
}

bool parse_ref(const std::string& tok, PtxGroup& g) {
    std::string t = trim(tok);
    if (t.size() >= 2 && t[0] == '%' && isdigit((unsigned char)t[1])) {
        size_t i = 1;
        int v = 0;
        while (i < t.size() && isdigit((unsigned char)t[i])) v = v * 10 + (t[i++] - '0');
        if (i != t.size()) return false;
        g.refs.push_back(v);
        g.imm.push_back(0);
        return true;
    }
    char* end = nullptr;
    long long v = strtoll(t.c_str(), &end, 0);
    if (t.empty() || *end) return false;
    g.refs.push_back(-1);
    g.imm.push_back(v);
    return true;
}

PtxParsed parse_ptx(const char* text) {
    PtxParsed p;
    std::string t = trim(text);
    if (t.empty() || t.back() != ';') {
        p.error = "the statement does not end with ';'";
        return p;
    }
    t = trim(t.substr(0, t.size() - 1));
    if (t.find(';') != std::string::npos) {
        p.error = "more than one statement";
        return p;
    }
    size_t sp = t.find_first_of(" \t");
    p.op = t.substr(0, sp);
    std::string rest = sp == std::string::npos ? std::string() : trim(t.substr(sp));
    size_t i = 0;
    while (i < rest.size()) {
        while (i < rest.size() && isspace((unsigned char)rest[i])) ++i;
        if (i >= rest.size()) break;
        PtxGroup g;
        char open = rest[i];
        if (open == '{' || open == '[') {
            char close = open == '{' ? '}' : ']';
            size_t j = rest.find(close, i);
            if (j == std::string::npos) {
                p.error = fmt("unbalanced '%c'", open);
                return p;
            }
            g.kind = open == '{' ? 'v' : 'a';
            std::string inner = rest.substr(i + 1, j - i - 1);
            size_t k = 0;
            while (true) {
                size_t c = inner.find(',', k);
                if (!parse_ref(inner.substr(k, c == std::string::npos ? std::string::npos : c - k), g)) {
                    p.error = fmt("cannot read operand `%s`", inner.c_str());
                    return p;
                }
                if (c == std::string::npos) break;
                k = c + 1;
            }
            i = j + 1;
        } else {
            size_t j = rest.find(',', i);
            g.kind = 's';
            if (!parse_ref(rest.substr(i, j == std::string::npos ? std::string::npos : j - i), g)) {
                p.error = fmt("cannot read operand `%s`", rest.substr(i, j - i).c_str());
                return p;
            }
            i = j == std::string::npos ? rest.size() : j;
        }
        p.groups.push_back(g);
        while (i < rest.size() && isspace((unsigned char)rest[i])) ++i;
        if (i < rest.size()) {
            if (rest[i] != ',') {
                p.error = fmt("expected ',' between operands at `%s`", rest.substr(i).c_str());
                return p;
            }
            ++i;
        }
    }
    return p;
}

// What one operand group of an instruction must be.
struct GroupSpec {
    char kind;        // 'v', 'a', 's'
    int count;
    char constraint;  // the asm constraint the PTX register type needs ('n': an immediate)
    bool dest;
    const char* what;
};

bool cxx_type_ok(const cupynn_emu::PtxOperand& o) {
    switch (o.constraint) {
        case 'd': return o.cxx_kind == cupynn_emu::KIND_FLOAT && o.cxx_size == 8;
        case 'f': return o.cxx_kind == cupynn_emu::KIND_FLOAT && o.cxx_size == 4;
        case 'r': return (o.cxx_kind == cupynn_emu::KIND_SINT || o.cxx_kind == cupynn_emu::KIND_UINT) && o.cxx_size == 4;
        case 'h': return (o.cxx_kind == cupynn_emu::KIND_SINT || o.cxx_kind == cupynn_emu::KIND_UINT) && o.cxx_size == 2;
        case 'l': return (o.cxx_kind == cupynn_emu::KIND_SINT || o.cxx_kind == cupynn_emu::KIND_UINT ||
                          o.cxx_kind == cupynn_emu::KIND_PTR) && o.cxx_size == 8;
        case 'n': return o.cxx_kind == cupynn_emu::KIND_SINT || o.cxx_kind == cupynn_emu::KIND_UINT;
        default: return false;
    }
}

// Check the parsed statement against the specs; on success `vals[g][i]` holds the operand's
// input bits (or immediate) and `outs[g][i]` the output pointer.
std::string check_ptx(const PtxParsed& p, const std::vector<GroupSpec>& spec,
                      const cupynn_emu::PtxOperand* ops, int nout, int nin,
                      std::vector<std::vector<unsigned long long>>& vals,
                      std::vector<std::vector<void*>>& outs) {
    const int nops = nout + nin;
    if (p.groups.size() != spec.size())
        return fmt("takes %zu operands, the text has %zu", spec.size(), p.groups.size());
    std::vector<int> used((size_t)nops, 0);
    vals.assign(spec.size(), {});
    outs.assign(spec.size(), {});
    for (size_t gi = 0; gi < spec.size(); ++gi) {
        const PtxGroup& g = p.groups[gi];
        const GroupSpec& s = spec[gi];
        if (g.kind != s.kind || (int)g.refs.size() != s.count) {
            const char* shape = s.kind == 'v' ? "a vector {..}" : s.kind == 'a' ? "an address [..]" : "a scalar";
            return fmt("operand %zu (%s) must be %s of %d, the text has %s of %zu", gi + 1, s.what, shape,
                       s.count, g.kind == 'v' ? "a vector" : g.kind == 'a' ? "an address" : "a scalar",
                       g.refs.size());
        }
        for (size_t i = 0; i < g.refs.size(); ++i) {
            const int r = g.refs[i];
            if (r < 0) {
                if (s.constraint != 'n')
                    return fmt("operand %zu (%s) is a literal, PTX wants a register", gi + 1, s.what);
                vals[gi].push_back((unsigned long long)g.imm[i]);
                outs[gi].push_back(nullptr);
                continue;
            }
            if (r >= nops)
                return fmt("%%%d is past the %d asm operands (%d outputs, %d inputs)", r, nops, nout, nin);
            ++used[(size_t)r];
            const cupynn_emu::PtxOperand& o = ops[r];
            if (s.dest != (o.is_output != 0))
                return fmt("%%%d is an asm %s but operand %zu (%s) is %s", r, o.is_output ? "output" : "input",
                           gi + 1, s.what, s.dest ? "a destination" : "a source");
            if (o.constraint != s.constraint)
                return fmt("%%%d has constraint \"%c\" but operand %zu (%s) takes \"%c\"", r, o.constraint,
                           gi + 1, s.what, s.constraint);
            if (!cxx_type_ok(o))
                return fmt("%%%d: constraint \"%c\" on a %d-byte %s expression", r, o.constraint, (int)o.cxx_size,
                           o.cxx_kind == cupynn_emu::KIND_FLOAT ? "floating-point" : "integer/pointer");
            vals[gi].push_back(o.bits);
            outs[gi].push_back(o.out);
        }
    }
    for (int r = 0; r < nops; ++r)
        if (used[(size_t)r] != 1)
            return fmt("asm operand %%%d is used %d times in the text (each exactly once)", r, used[(size_t)r]);
    return std::string();
}

inline double as_f64(unsigned long long b) { double d; memcpy(&d, &b, 8); return d; }
inline float as_f32(unsigned long long b) { unsigned u = (unsigned)b; float f; memcpy(&f, &u, 4); return f; }
inline float tf32_value(unsigned long long b) { return as_f32(b & 0xffffe000ull); }
template <class T>
inline void put(void* out, T v) { memcpy(out, &v, sizeof v); }

// The 32 lanes' A and B registers (one collective); all[lane * nw + i].
std::vector<unsigned long long> warp_gather(Fiber* f, const char* text, const std::vector<unsigned long long>& mine) {
    Block* b = f->worker->block;
    if (b->warps[(size_t)f->warp].exists != 0xffffffffu)
        fail_here(f, fmt("`%s` needs all 32 lanes of the warp (the block has %d threads)", text, b->nthreads));
    if (mine.size() > 16) fail_here(f, fmt("`%s`: more than 16 operand registers per lane", text));
    Warp& wp = enter_collective(f, OP_GATHER, 0xffffffffu, 0, mine.data(), (int)mine.size(), text);
    std::vector<unsigned long long> all((size_t)(32 * wp.gwords));
    copy_words(all.data(), wp.gbuf, 32 * wp.gwords);
    leave_collective(f, wp);
    return all;
}

void run_mma(Fiber* f, const char* text, int M, int K, bool tf32,
             const std::vector<std::vector<unsigned long long>>& v, const std::vector<std::vector<void*>>& o) {
    // groups: 0 D, 1 A, 2 B, 3 C
    const int na = (int)v[1].size(), nb = (int)v[2].size();
    std::vector<unsigned long long> mine(v[1]);
    mine.insert(mine.end(), v[2].begin(), v[2].end());
    const std::vector<unsigned long long> all = warp_gather(f, text, mine);
    const int nw = na + nb;
    const int lane = f->lane, g = lane >> 2, t = lane & 3;
    auto A = [&](int row, int k) -> unsigned long long {  // A[row][k]
        if (M == 8) return all[(size_t)((row * 4 + k) * nw)];
        return all[(size_t)(((row & 7) * 4 + (k & 3)) * nw + (row >> 3) + 2 * (k >> 2))];
    };
    auto B = [&](int k, int n) -> unsigned long long {  // B[k][n]
        return all[(size_t)((n * 4 + (k & 3)) * nw + na + (k >> 2))];
    };
    const int nc = (int)v[3].size();
    for (int i = 0; i < nc; ++i) {
        const int row = M == 8 ? g : g + 8 * (i >> 1);
        const int col = 2 * t + (i & 1);
        if (tf32) {
            double acc = (double)as_f32(v[3][(size_t)i]);
            for (int j = 0; j < 4; ++j)
                acc += (double)tf32_value(A(row, j)) * tf32_value(B(j, col)) +
                       (double)tf32_value(A(row, j + 4)) * tf32_value(B(j + 4, col));
            put<float>(o[0][(size_t)i], (float)acc);
        } else {
            double acc = as_f64(v[3][(size_t)i]);
            for (int k = 0; k < K; ++k) acc = fma(as_f64(A(row, k)), as_f64(B(k, col)), acc);
            put<double>(o[0][(size_t)i], acc);
        }
    }
}

char* shared_from_handle(Fiber* f, unsigned long long h) {
    const unsigned long long slot = (h >> 20) - 1;
    if (h < (1ull << 20) || slot >= 64 || slot >= f->cvta_next)
        return nullptr;
    return static_cast<char*>(f->cvta_ring[slot]) + (h & 0xfffffull);
}

void cp_async_complete(Fiber* f, unsigned long long upto) {
    auto& q = f->cp_pending;
    size_t keep = 0;
    for (size_t i = 0; i < q.size(); ++i) {
        CpAsync& c = q[i];
        if (c.group != 0 && c.group <= upto) {
            memcpy(c.dst, c.src, (size_t)c.src_size);
            memset(c.dst + c.src_size, 0, (size_t)(c.size - c.src_size));
        } else {
            q[keep++] = c;
        }
    }
    q.resize(keep);
}

}  // namespace

extern "C" unsigned long long cupynn_emu_cvta_shared(const void* p) {
    Fiber* f = current_fiber("__cvta_generic_to_shared");
    Block* b = f->worker->block;
    const char* c = static_cast<const char*>(p);
    const char* dyn = static_cast<const char*>(b->dyn_smem);
    const char* tls = static_cast<const char*>(t_tls_data);
    const bool shared = (c >= dyn && c < dyn + b->launch->shared_mem) ||
                        (tls && c >= tls && c < tls + t_tls_size);
    if (!shared)
        fail_here(f, fmt("__cvta_generic_to_shared(%p): not a shared-memory address", p));
    if (f->cvta_next >= 64) f->cvta_next = 0;  // handles are valid for the next 63 conversions
    const unsigned slot = f->cvta_next++;
    f->cvta_ring[slot] = const_cast<void*>(p);
    return ((unsigned long long)slot + 1) << 20;
}

extern "C" void cupynn_emu_ptx(const char* text, int arch, const cupynn_emu::PtxOperand* ops, int nout,
                               int nin) {
    Fiber* f = current_fiber("inline PTX");
    const PtxParsed* pp;
    {
        std::lock_guard<std::mutex> lock(g_ptx_mutex);
        auto it = g_ptx_cache.find(text);
        if (it == g_ptx_cache.end()) it = g_ptx_cache.emplace(text, parse_ptx(text)).first;
        pp = &it->second;
    }
    const PtxParsed& p = *pp;
    auto bad = [&](const std::string& why) {
        fail_here(f, fmt("inline PTX `%s`: %s", trim(text).c_str(), why.c_str()));
    };
    if (!p.error.empty()) bad(p.error);
    std::vector<std::vector<unsigned long long>> v;
    std::vector<std::vector<void*>> o;
    const std::string& op = p.op;
    std::string err;
    if (op == "mma.sync.aligned.m8n8k4.row.col.f64.f64.f64.f64") {
        err = check_ptx(p, {{'v', 2, 'd', true, "D"}, {'v', 1, 'd', false, "A"}, {'v', 1, 'd', false, "B"},
                            {'v', 2, 'd', false, "C"}}, ops, nout, nin, v, o);
        if (err.empty()) run_mma(f, text, 8, 4, false, v, o);
    } else if (op == "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32") {
        err = check_ptx(p, {{'v', 4, 'f', true, "D"}, {'v', 4, 'r', false, "A"}, {'v', 2, 'r', false, "B"},
                            {'v', 4, 'f', false, "C"}}, ops, nout, nin, v, o);
        if (err.empty()) run_mma(f, text, 16, 8, true, v, o);
    } else if (op == "mma.sync.aligned.m16n8k4.row.col.f64.f64.f64.f64" ||
               op == "mma.sync.aligned.m16n8k8.row.col.f64.f64.f64.f64" ||
               op == "mma.sync.aligned.m16n8k16.row.col.f64.f64.f64.f64") {
        const int K = atoi(op.c_str() + strlen("mma.sync.aligned.m16n8k"));
        if (arch < 900) bad(fmt("needs sm_90 (this module is compiled for sm_%d)", arch / 10));
        err = check_ptx(p, {{'v', 4, 'd', true, "D"}, {'v', K / 2, 'd', false, "A"}, {'v', K / 4, 'd', false, "B"},
                            {'v', 4, 'd', false, "C"}}, ops, nout, nin, v, o);
        if (err.empty()) run_mma(f, text, 16, K, false, v, o);
    } else if (op == "cvt.rna.tf32.f32") {
        err = check_ptx(p, {{'s', 1, 'r', true, "d"}, {'s', 1, 'f', false, "a"}}, ops, nout, nin, v, o);
        if (err.empty()) {
            unsigned u = (unsigned)v[1][0];
            unsigned r;
            if ((u & 0x7f800000u) == 0x7f800000u) r = (u & 0x007fffffu) ? 0x7fffffffu : u;
            else r = (u + 0x1000u) & 0xffffe000u;  // round half away from zero to 10 mantissa bits
            put<unsigned>(o[0][0], r);
        }
    } else if (op == "cp.async.ca.shared.global" || op == "cp.async.cg.shared.global") {
        if (arch < 800) bad(fmt("needs sm_80 (this module is compiled for sm_%d)", arch / 10));
        std::vector<GroupSpec> spec = {{'a', 1, 'r', false, "dst (a shared address)"},
                                       {'a', 1, 'l', false, "src (a global address)"},
                                       {'s', 1, 'n', false, "cp-size"}};
        if (p.groups.size() == 4) spec.push_back({'s', 1, 'r', false, "src-size"});
        err = check_ptx(p, spec, ops, nout, nin, v, o);
        if (err.empty()) {
            const long long size = (long long)v[2][0];
            const bool cg = op[9] == 'c' && op[10] == 'g';
            const long long src_size = p.groups.size() == 4 ? (long long)(int)(unsigned)v[3][0] : size;
            if (cg ? size != 16 : (size != 4 && size != 8 && size != 16))
                bad(fmt("cp-size %lld (.%s takes %s)", size, cg ? "cg" : "ca", cg ? "16" : "4, 8 or 16"));
            if (src_size < 0 || src_size > size) bad(fmt("src-size %lld is not in 0..cp-size %lld", src_size, size));
            char* dst = shared_from_handle(f, v[0][0] & 0xffffffffull);
            if (!dst) bad(fmt("dst 0x%llx is not an address from __cvta_generic_to_shared", v[0][0]));
            const char* src = reinterpret_cast<const char*>((uintptr_t)v[1][0]);
            if (((uintptr_t)dst | (uintptr_t)src) % (uintptr_t)size)
                bad(fmt("dst %p / src %p not aligned to cp-size %lld", (void*)dst, (const void*)src, size));
            memset(dst, 0xff, (size_t)size);  // undefined until the wait that covers it
            f->cp_pending.push_back(CpAsync{dst, src, (int)size, (int)src_size, 0});
        }
    } else if (op == "cp.async.commit_group") {
        err = check_ptx(p, {}, ops, nout, nin, v, o);
        if (err.empty()) {
            ++f->cp_groups;
            for (CpAsync& c : f->cp_pending) if (c.group == 0) c.group = f->cp_groups;
        }
    } else if (op == "cp.async.wait_group") {
        err = check_ptx(p, {{'s', 1, 'n', false, "N"}}, ops, nout, nin, v, o);
        if (err.empty()) {
            const unsigned long long n = v[0][0];
            // wait until at most N of the most recent committed groups are pending
            if (n < f->cp_groups) cp_async_complete(f, f->cp_groups - n);
        }
    } else if (op == "cp.async.wait_all") {
        err = check_ptx(p, {}, ops, nout, nin, v, o);
        if (err.empty()) {  // = cp.async.commit_group; cp.async.wait_group 0;
            ++f->cp_groups;
            for (CpAsync& c : f->cp_pending) if (c.group == 0) c.group = f->cp_groups;
            cp_async_complete(f, f->cp_groups);
        }
    } else {
        bad(fmt("`%s` is not an instruction the emulator's PTX interpreter knows", op.c_str()));
    }
    if (!err.empty()) bad(err);
}
