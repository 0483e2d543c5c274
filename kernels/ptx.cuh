// ptx.cuh -- one text for the GPU and the emulator: inline PTX through CUPYNN_PTX.
//
//   CUPYNN_PTX("mma.sync.aligned.m8n8k4.row.col.f64.f64.f64.f64 {%0, %1}, {%2}, {%3}, {%4, %5};",
//              (CUPYNN_OUT(d, d[0]), CUPYNN_OUT(d, d[1])),
//              (CUPYNN_IN(d, a), CUPYNN_IN(d, b), CUPYNN_IN(d, c[0]), CUPYNN_IN(d, c[1])));
//
// Under NVRTC this is exactly
//   asm volatile("mma..." : "=d"(d[0]), "=d"(d[1]) : "d"(a), "d"(b), "d"(c[0]), "d"(c[1]));
// (CUPYNN_PTX_MEM adds the "memory" clobber).  Under the emulator (g++ -DCUPYNN_EMULATE) the
// same string and operand list go to the emulator's PTX interpreter, which parses the text,
// checks it against the PTX ISA (operand groups and counts, the register type of every
// position against the constraint letter and the C++ type, every asm operand used once) and
// executes it: mma.sync with the fragment layouts of mma.cuh, cvt.rna.tf32.f32, and cp.async
// with commit groups counted as PTX defines them.  So a swapped or miscounted operand in a
// wrapper fails on the CPU too.  The operand lists are parenthesised; `()` for none.
#pragma once

#define CUPYNN_PTX_UNPAREN_(...) __VA_ARGS__

#ifdef CUPYNN_EMULATE
#define CUPYNN_IN(c, x) ::cupynn_emu::ptx_in(#c[0], x)
#define CUPYNN_OUT(c, x) ::cupynn_emu::ptx_out(#c[0], x)
#define CUPYNN_PTX(text, outs, ins) \
    ::cupynn_emu::ptx_exec(text, {CUPYNN_PTX_UNPAREN_ outs}, {CUPYNN_PTX_UNPAREN_ ins})
#define CUPYNN_PTX_MEM(text, outs, ins) CUPYNN_PTX(text, outs, ins)
#else
#define CUPYNN_IN(c, x) #c(x)
#define CUPYNN_OUT(c, x) "=" #c(x)
#define CUPYNN_PTX(text, outs, ins) asm volatile(text : CUPYNN_PTX_UNPAREN_ outs : CUPYNN_PTX_UNPAREN_ ins)
#define CUPYNN_PTX_MEM(text, outs, ins) \
    asm volatile(text : CUPYNN_PTX_UNPAREN_ outs : CUPYNN_PTX_UNPAREN_ ins : "memory")
#endif
