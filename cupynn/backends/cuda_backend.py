"""The CUDA backend: our own kernels (kernels/dense.cu) launched through CuPy.

The host code is written against an injected array module and kernel provider:

* ``CudaBackend(xp=cupy, module_cls=cupy.RawModule)`` on a GPU;
* ``CudaBackend(xp=numpy, module_cls=cupynn.emulator.EmulatedModule)`` on the CPU,
  where the same tiling choices, workspace sizes, launch parameters and checks
  run the real kernels through the emulator (tests/test_kernels_emulated.py).

This module decides what runs for a layer or a network and with which arguments; the
rest lives beside it: ``cuda_select`` (tiles, math modes, batch splits, kernel names),
``cuda_launch`` (compiling on demand, the pre-launch checks, buffers, the launch with its
NVTX range), ``cuda_plans`` (recording a call's launches once and replaying them) and
``cuda_catalog`` (every instantiation, for the compile check).

What runs per layer:

* forward: ``dense_forward`` -- GEMM with bias + activation (+ the fused loss's
  per-block partials) in the epilogue; saves y (ids 0-4) or z (ids 5-9);
* backward: ``dense_backward_dw`` -- ``[dW | db] = dz.T @ [x | 1]`` with
  ``dz = g * act'(.)`` computed in the operand loads, split over the batch into
  fixed-order partials when that gives more parallelism, then ``reduce_partials``;
  ``dense_backward_dx`` -- ``dx = dz @ W`` (skipped for the first layer unless asked);
* a first layer with fan-in <= 4 (the seed's 1 -> 1000) is never stored: the next
  layer's kernels recompute it in their operand loads, and its own gradient comes
  from ``dense_backward_chain`` (``dz0 = (dz1 @ W1) * act0'`` reduced against
  ``[x0 | 1]`` on chip);
* the built-in losses' gradient ``2 (y - t) * scale`` is computed inside the last
  layer's backward loads, and the value by ``loss_reduce`` over the forward's
  partials.  No float atomics anywhere: results are bit-identical run to run.
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass

import numpy as np

from ..activations import get_activation
from ..losses import call_loss, loss_scale
from . import cuda_jacobian, cuda_optim, cuda_plans, cuda_select, cuda_taylor
from .base import Backend, LayerSpec, LossSpec, NetSpec, OptimizerState, Params, write_into
from .cuda_fused import FusedRunner
from .cuda_fused_layout import MODE_FORWARD, MODE_GRAD, MODE_VALUE, FusedLayout, fused_kernel_names
from .cuda_fused_layout import SOURCE as FUSED_SOURCE
from .cuda_launch import THREADS, CudaLaunchError, Launcher, elem_strides, expect
from .cuda_plans import UNPLANNABLE, PlannedLaunch
from .cuda_select import (
    CHAIN_BN,
    CHAIN_TILE,
    CTYPE,
    RECOMPUTE_MAX_FANIN,
    REDUCE_JOBS,
    SOURCE,
    TILES,
    chain_name,
    dw_name,
    dx_name,
    fwd_name,
    loss_name,
    pick_math,
    pick_tile,
    reduce_multi_name,
    reduce_name,
    splits,
)

__all__ = ["CudaBackend", "CudaLaunchError", "PlannedLaunch", "two_scale_of"]


@dataclass
class _Input:
    """How a layer reads its input: a strided array, or recomputed from a tiny layer."""

    x: object  # (M, K) array, or x0 (M, k0) when recompute
    sxm: int
    sxk: int
    w0: object = None
    b0: object = None
    k0: int = 0
    act0: int = 0


def _one_call_at_a_time(method):
    """Run the method under the backend's call lock (see :class:`CudaBackend`)."""

    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with self._call_lock:
            return method(self, *args, **kwargs)

    return locked


class CudaBackend(Backend):
    """Dense layers on our own CUDA kernels (or on their CPU emulation).

    Thread safety: the backend is one per process and its workspaces (the fused path's
    partials, the split-batch reductions deferred to the end of a backward pass, recorded
    launch plans) are shared by every call with the same key, so each public call runs under
    one re-entrant lock: a call's launches are issued together, in order, and on one stream
    the next call's kernels run after them.  Calls on different streams get workspaces of
    their own (the fused plans are per stream).  The lock costs well under a microsecond per
    call (``python -m cupynn bench --host-overhead``); the kernels themselves still overlap.
    """

    name = "cuda"
    device = "cuda"

    def __init__(self, xp=None, module_cls=None, *, arch: str | None = None):
        if xp is None:
            import cupy as xp  # noqa: PLC0415 - optional dependency, imported lazily
        if module_cls is None:
            module_cls = xp.RawModule
        self.xp = xp
        self.kernels = Launcher(xp, module_cls, arch=arch)  # functions, buffers, launches
        self._emulated = xp is np
        self._plans: dict = {}
        self._inp_override: tuple | None = None
        self._deferred: list | None = None  # split-batch reductions waiting for one launch
        self.fused = FusedRunner(self.kernels, self._x_input)  # kernels/fused.cu, when it applies
        self._call_lock = threading.RLock()  # one public call's launches at a time

    def _empty(self, shape, dtype):
        return self.kernels.empty(shape, dtype)

    def _none(self, dtype):
        return self.kernels.none(dtype)

    def _launch(self, rng: str, name: str, grid, args) -> None:
        self.kernels.launch(rng, SOURCE, name, grid, args)

    def warm_up(self, names=None, *, workers: int | None = None, modules: int | None = None) -> int:
        """Compile kernels ahead of use (default: every instantiation the backend can
        request); see :meth:`Launcher.warm_up`.  Each name goes to the source file the catalog
        lists it under (``kernels/dense.cu``, ``fused.cu``, ``optim.cu``, ``derivatives.cu``);
        names it does not know, to ``kernels/dense.cu``."""
        catalog = (cuda_select.kernel_names_all() + fused_kernel_names()
                   + cuda_optim.kernel_names_all() + cuda_taylor.kernel_names_all()
                   + cuda_jacobian.kernel_names_all())
        owner = {n: src for src, ns in catalog for n in ns}
        if names is None:
            names = list(owner)
        by_source: dict[str, list[str]] = {}
        for n in names:
            by_source.setdefault(owner.get(n, SOURCE), []).append(n)
        total = 0
        for src, ns in by_source.items():
            spread = modules if src in (SOURCE, FUSED_SOURCE) else 1
            total += self.kernels.warm_up(src, ns, workers=workers, modules=spread)
        return total

    # -- arrays ---------------------------------------------------------------------
    def owns(self, array) -> bool:
        return isinstance(array, self.xp.ndarray)

    def asarray_from_host(self, array: np.ndarray):
        return self.xp.asarray(array)

    def to_host(self, array) -> np.ndarray:
        if self.xp is np:
            return np.asarray(array)
        return self.xp.asnumpy(array)

    # -- optimizers (cuda_optim: one kernels/optim.cu launch per step) ------------------
    def optimizer_state(self, kind, shapes, dtype, buffers) -> OptimizerState:
        return cuda_optim.make_state(self.kernels, self.xp, kind, shapes, dtype, buffers)

    @_one_call_at_a_time
    def optimizer_step(self, state, hyper, params, grads) -> None:
        cuda_optim.step(self.kernels, self.xp, state, hyper, params, grads)

    def optimizer_sync(self, state, hyper) -> None:
        cuda_optim.sync(self.xp, state, hyper)

    def optimizer_get_step(self, state) -> int:
        return cuda_optim.get_step(self.to_host, state)

    def optimizer_set_step(self, state, n) -> None:
        cuda_optim.set_step(state, n)

    # -- building blocks (each = one launch) -------------------------------------------
    def _forward(self, rng, inp: _Input, W, b, act: int, M: int, *, y=None, z=None,
                 target=None, loss_partials=None, precision="strict") -> int:
        """One dense_forward launch; returns the number of loss partials written."""
        dtype = W.dtype
        N, K = W.shape
        none = self._none(dtype)
        self._check_input(inp, M, K, dtype)
        expect(W, "W", (N, K), dtype)
        if b is not None:
            expect(b, "b", (N,), dtype)
        for arr, what in ((y, "y"), (z, "z"), (target, "target")):
            if arr is not None:
                expect(arr, what, (M, N), dtype)
        tile = pick_tile(M, N)
        math = pick_math(dtype, precision, tile)
        bm, bn = TILES[tile]
        grid = (-(-M // bm), -(-N // bn), 1)
        nparts = grid[0] * grid[1]
        if loss_partials is not None:
            expect(loss_partials, "loss_partials", (nparts,), dtype)
        i64, i32, T = np.int64, np.int32, dtype.type
        args = (
            inp.x, i64(inp.sxm), i64(inp.sxk),
            inp.w0 if inp.w0 is not None else none, inp.b0 if inp.b0 is not None else none,
            i32(inp.k0), i32(inp.act0), i32(inp.b0 is not None),
            W, b if b is not None else none, i32(b is not None),
            i64(M), i64(N), i64(K),
            y if y is not None else none, i32(y is not None),
            z if z is not None else none, i32(z is not None),
            target if target is not None else none, i32(target is not None),
            i32(loss_partials is not None), loss_partials if loss_partials is not None else none,
            i32(act),
        )
        del T
        self._launch(rng, fwd_name(CTYPE[dtype], act, tile, math), grid, args)
        return nparts

    def _check_input(self, inp: _Input, M, K, dtype):
        if inp.x.ndim == 1:  # emulation's window onto a strided x
            if inp.x.dtype != dtype:
                raise CudaLaunchError(f"x: expected dtype {dtype}, got {inp.x.dtype}")
            if inp.k0:
                expect(inp.w0, "W[0]", (K, inp.k0), dtype)
        elif inp.k0:
            expect(inp.x, "x", (M, inp.k0), dtype, contiguous=False)
            expect(inp.w0, "W[0]", (K, inp.k0), dtype)
            if inp.b0 is not None:
                expect(inp.b0, "b[0]", (K,), dtype)
        else:
            expect(inp.x, "x", (M, K), dtype, contiguous=False)

    def _dz_args(self, g, saved, target, act, loss_two_scale, M, N, dtype):
        """Arguments of the kernels' DzLoad: (g, s, t, act, loss, has_t, two_scale)."""
        none = self._none(dtype)
        expect(saved, "saved activation", (M, N), dtype)
        loss = loss_two_scale is not None
        if not loss:
            expect(g, "g (dL/dy)", (M, N), dtype)
        if target is not None:
            expect(target, "target", (M, N), dtype)
        return (
            g if g is not None else none, saved, target if target is not None else none,
            np.int32(act), np.int32(loss), np.int32(target is not None),
            dtype.type(loss_two_scale if loss else 0.0),
        )

    def _backward_dw(self, rng, dz_args, inp: _Input, M, N, K, has_bias, dW, db, precision):
        dtype = dW.dtype
        expect(dW, "dW", (N, K), dtype)
        if has_bias:
            expect(db, "db", (N,), dtype)
        self._check_input(inp, M, K, dtype)
        K1 = K + int(has_bias)
        dz_rows = int(N >= K1)  # the narrower side goes on the tile's columns
        R, C = (N, K1) if dz_rows else (K1, N)
        tile = pick_tile(R, C)
        math = pick_math(dtype, precision, tile)
        bm, bn = TILES[tile]
        tiles = -(-R // bm) * -(-C // bn)
        S, rows = splits(M, tiles)
        none = self._none(dtype)
        parts = self._empty(S * N * K1, dtype=dtype) if S > 1 else none
        i64, i32 = np.int64, np.int32
        args = dz_args + (
            inp.x, i64(inp.sxm), i64(inp.sxk),
            inp.w0 if inp.w0 is not None else none, inp.b0 if inp.b0 is not None else none,
            i32(inp.k0), i32(inp.act0), i32(inp.b0 is not None),
            i64(M), i64(N), i64(K), i32(has_bias),
            dW, db if has_bias else none, parts, i64(rows),
        )
        self._launch(rng, dw_name(CTYPE[dtype], tile, math, dz_rows),
                     (-(-R // bm), -(-C // bn), S), args)
        if S > 1:
            self._reduce(rng, parts, S, N, K, has_bias, dW, db)

    def _reduce(self, rng, parts, S, N, K, has_bias, dW, db):
        dtype = dW.dtype
        total = N * (K + int(has_bias))
        expect(parts, "partials", (S * total,), dtype)
        if self._deferred is not None:  # a whole backward pass: one launch at the end
            self._deferred.append((parts, S, N, K, has_bias, dW, db))
            return
        args = (parts, np.int64(S), np.int64(N), np.int64(K), np.int32(has_bias), dW,
                db if has_bias else self._none(dtype))
        self._launch(rng, reduce_name(CTYPE[dtype]), (-(-total // THREADS), 1, 1), args)

    def _flush_reductions(self):
        """All deferred [dW | db] reductions, REDUCE_JOBS per launch, in a fixed order."""
        jobs, self._deferred = self._deferred, None
        i64, i32 = np.int64, np.int32
        for c in range(0, len(jobs), REDUCE_JOBS):
            chunk = jobs[c:c + REDUCE_JOBS]
            dtype = chunk[0][5].dtype
            none = self._none(dtype)
            args = [i32(len(chunk))]
            blocks = 0
            for parts, S, N, K, hb, dW, db in chunk + [chunk[-1]] * (REDUCE_JOBS - len(chunk)):
                args += [parts, i64(S), i64(N), i64(K), i32(hb), dW, db if hb else none]
            for job in chunk:
                blocks += -(-(job[2] * (job[3] + int(job[4]))) // THREADS)
            self._launch("Dense.backward.reduce", reduce_multi_name(CTYPE[dtype]),
                         (blocks, 1, 1), tuple(args))

    def _backward_dx(self, rng, dz_args, W, M, dx, precision):
        dtype = W.dtype
        N, K = W.shape
        expect(W, "W", (N, K), dtype)
        expect(dx, "dx", (M, K), dtype)
        tile = pick_tile(M, K)
        math = pick_math(dtype, precision, tile)
        bm, bn = TILES[tile]
        args = dz_args + (W, np.int64(M), np.int64(N), np.int64(K), dx)
        self._launch(rng, dx_name(CTYPE[dtype], tile, math), (-(-M // bm), -(-K // bn), 1), args)

    def _backward_chain(self, rng, dz1_args, W1, inp0: _Input, M, dW0, db0, precision):
        """[dW0 | db0] of a recomputed first layer, through layer 1's dz (one launch + reduce)."""
        dtype = W1.dtype
        N1, N0 = W1.shape
        k0 = inp0.k0
        has_bias = inp0.b0 is not None
        expect(W1, "W[1]", (N1, N0), dtype)
        expect(dW0, "dW[0]", (N0, k0), dtype)
        if has_bias:
            expect(db0, "db[0]", (N0,), dtype)
        self._check_input(inp0, M, N0, dtype)
        math = pick_math(dtype, precision, CHAIN_TILE)
        tiles = -(-N0 // CHAIN_BN)
        S, rows = splits(M, tiles)
        K1 = k0 + int(has_bias)
        none = self._none(dtype)
        parts = self._empty(S * N0 * K1, dtype=dtype) if S > 1 else none
        i64, i32 = np.int64, np.int32
        args = dz1_args + (
            W1, i64(N1), inp0.x, i64(inp0.sxm), i64(inp0.sxk),
            inp0.w0, inp0.b0 if has_bias else none, i32(k0), i32(inp0.act0), i32(has_bias),
            i64(M), i64(N0), dW0, db0 if has_bias else none, parts, i64(rows),
        )
        self._launch(rng, chain_name(CTYPE[dtype], math), (tiles, S, 1), args)
        if S > 1:
            self._reduce(rng, parts, S, N0, k0, has_bias, dW0, db0)

    def _loss_value(self, parts, nparts, scale, dtype):
        value = self._empty((), dtype=dtype)  # 0-d: the kernel writes value[0]
        args = (parts, np.int64(nparts), dtype.type(scale), value)
        self._launch("loss.value", loss_name(CTYPE[dtype]), (1, 1, 1), args)
        return value

    # -- the functional API ---------------------------------------------------------
    def _x_input(self, x) -> _Input:
        """The first layer reads x through its strides (no copy on the GPU)."""
        if self._inp_override is not None and self._inp_override[0] is x:
            return self._inp_override[1]
        sm, sk = elem_strides(x)
        if self._emulated and not x.flags.c_contiguous:
            # The emulator takes C-contiguous arrays only: hand it a 1-D window onto
            # the same memory starting at x[0, 0] (or a copy for negative strides).
            M, K = x.shape
            if sm >= 0 and sk >= 0 and M and K:
                extent = (M - 1) * sm + (K - 1) * sk + 1
                x = np.lib.stride_tricks.as_strided(x, shape=(extent,),
                                                    strides=(x.dtype.itemsize,))
                return _Input(x, sm, sk)
            x = np.ascontiguousarray(x)
            sm, sk = K, 1
        return _Input(x, sm, sk)

    @_one_call_at_a_time
    def dense_forward(self, x, W, b, activation: str, *, precision: str = "strict"):
        act = get_activation(activation).id
        M = x.shape[0]
        y = self._empty((M, W.shape[0]), dtype=W.dtype)
        self._forward("Dense.forward", self._x_input(x), W, b, act, M, y=y, precision=precision)
        return y

    @_one_call_at_a_time
    def dense_forward_train(self, x, W, b, activation: str, *, precision: str = "strict"):
        a = get_activation(activation)
        M = x.shape[0]
        y = self._empty((M, W.shape[0]), dtype=W.dtype)
        z = None if a.from_output else self._empty(y.shape, y.dtype)
        self._forward("Dense.forward", self._x_input(x), W, b, a.id, M, y=y, z=z,
                      precision=precision)
        return y, (y if a.from_output else z)

    @_one_call_at_a_time
    def dense_backward(self, g, x, saved, W, activation: str, *, has_bias: bool,
                       need_dx: bool, precision: str = "strict"):
        act = get_activation(activation).id
        xp = self.xp
        M = x.shape[0]
        N, K = W.shape
        dtype = W.dtype
        g = xp.ascontiguousarray(g)  # the dz loads read g row-major
        dW = xp.zeros((N, K), dtype=dtype) if M == 0 else self._empty((N, K), dtype=dtype)
        db = None
        if has_bias:
            db = xp.zeros((N,), dtype=dtype) if M == 0 else self._empty((N,), dtype=dtype)
        dx = self._empty((M, K), dtype=dtype) if need_dx else None
        if M == 0:
            return dx, dW, db
        dz = self._dz_args(g, saved, None, act, None, M, N, dtype)
        self._backward_dw("Dense.backward", dz, self._x_input(x), M, N, K, has_bias, dW, db,
                          precision)
        if need_dx:
            if K and N:
                self._backward_dx("Dense.backward", dz, W, M, dx, precision)
            else:
                dx[...] = 0
        return dx, dW, db

    # -- derivatives with respect to the inputs (kernels/derivatives.cu) --------------
    @_one_call_at_a_time
    def taylor_activation_forward(self, z, b, activation: str, *, d: int, second: str):
        return cuda_taylor.forward(self.kernels, z, b, get_activation(activation).id, d, second)

    @_one_call_at_a_time
    def taylor_activation_backward(self, g, z, y, b, activation: str, *, d: int, second: str):
        return cuda_taylor.backward(self.kernels, g, z, y, b, get_activation(activation).id, d,
                                    second)

    # -- Jacobians (cupynn/jacobian.py: kernels/jacobian.cu and the dense GEMM) ---------
    def jacobian_rows(self, dz, h, out, col: int, has_bias: bool) -> None:
        cuda_jacobian.jacobian_rows(self.kernels, self.xp, dz, h, out, col, has_bias)

    def gram_update(self, G, J) -> None:
        cuda_jacobian.gram_update(self, G, J)

    # -- whole networks ------------------------------------------------------------
    @staticmethod
    def _recompute_first(net: NetSpec, need_dx: bool) -> bool:
        """Whether layer 0's output is recomputed by layer 1 instead of stored
        (docs/design.md, section 3)."""
        return (len(net.layers) >= 2 and 0 < net.layers[0].in_features <= RECOMPUTE_MAX_FANIN
                and not need_dx)

    def _forward_impl(self, net: NetSpec, params: Params, x):
        M = x.shape[0]
        dtype = np.dtype(net.dtype)
        recompute = self._recompute_first(net, False)
        inp = self._x_input(x)
        y = None
        for l, (spec, (W, b)) in enumerate(zip(net.layers, params)):
            act = get_activation(spec.activation).id
            if l == 0 and recompute:
                inp = _Input(inp.x, inp.sxm, inp.sxk, W, b, spec.in_features, act)
                continue
            y = self._empty((M, spec.out_features), dtype=dtype)
            if M:
                self._forward(f"Dense[{l}].forward", inp, W, b, act, M, y=y,
                              precision=net.precision)
            inp = _Input(y, spec.out_features, 1)
        return y

    def _train_forward(self, net: NetSpec, params: Params, x, loss: LossSpec, target,
                       recompute: bool, save: bool):
        """Forward of a whole chain with the loss; returns (value, inputs, saved, g_last).

        ``save=False`` (value only) writes neither the last layer's output nor any z.
        """
        xp = self.xp
        dtype = np.dtype(net.dtype)
        layers = net.layers
        L = len(layers)
        M = x.shape[0]
        prec = net.precision
        builtin = loss.kind in ("sum_squares", "mse")
        N_out = layers[-1].out_features
        inputs: list[_Input] = []
        saved: list[object] = []
        inp = self._x_input(x)
        value = None
        g_last = None
        for l, (spec, (W, b)) in enumerate(zip(layers, params)):
            a = get_activation(spec.activation)
            inputs.append(inp)
            if l == 0 and recompute:
                saved.append(None)
                inp = _Input(inp.x, inp.sxm, inp.sxk, W, b, spec.in_features, a.id)
                continue
            shape = (M, spec.out_features)
            rng = f"Dense[{l}].forward"
            last = l == L - 1
            if last and builtin:
                s = self._empty(shape, dtype=dtype) if save else None
                parts = None
                if spec.out_features:
                    tile = pick_tile(M, spec.out_features)
                    bm, bn = TILES[tile]
                    parts = self._empty((-(-M // bm)) * (-(-spec.out_features // bn)), dtype=dtype)
                np_ = self._forward(rng, inp, W, b, a.id, M,
                                    y=s if a.from_output else None,
                                    z=None if a.from_output else s,
                                    target=target, loss_partials=parts, precision=prec)
                saved.append(s)
                scale = loss_scale(loss.kind, M * N_out)
                if parts is not None:
                    value = self._loss_value(parts, np_, scale, dtype)
                else:
                    value = xp.zeros((), dtype=dtype)
            else:
                y = self._empty(shape, dtype=dtype)
                z = None if (a.from_output or not save) else self._empty(shape, dtype=dtype)
                self._forward(rng, inp, W, b, a.id, M, y=y, z=z, precision=prec)
                saved.append(y if a.from_output else z)
                inp = _Input(y, spec.out_features, 1)
                if last:
                    value, g_last = call_loss(loss.fn, y, xp.ndarray)
                    g_last = self._contiguous(g_last)
        return value, inputs, saved, g_last

    def _value_impl(self, net: NetSpec, params: Params, x, loss: LossSpec, target):
        xp = self.xp
        dtype = np.dtype(net.dtype)
        if x.shape[0] == 0:
            if loss.kind == "callable":
                return loss.fn(xp.empty((0, net.out_features), dtype=dtype))[0]
            return xp.zeros((), dtype=dtype)
        return self._train_forward(net, params, x, loss, target,
                                   self._recompute_first(net, False), False)[0]

    def _value_and_grad_impl(self, net: NetSpec, params: Params, x, loss: LossSpec, target,
                             need_dx: bool):
        xp = self.xp
        dtype = np.dtype(net.dtype)
        layers: tuple[LayerSpec, ...] = net.layers
        M = x.shape[0]
        prec = net.precision
        acts = [get_activation(s.activation) for s in layers]
        builtin = loss.kind in ("sum_squares", "mse")
        N_out = layers[-1].out_features

        grads = [(xp.zeros((s.out_features, s.in_features), dtype=dtype) if M == 0 else
                  self._empty((s.out_features, s.in_features), dtype=dtype),
                  (xp.zeros((s.out_features,), dtype=dtype) if M == 0 else
                   self._empty((s.out_features,), dtype=dtype)) if s.bias else None)
                  for s in layers]
        dx = None
        if need_dx:
            dx = self._empty(x.shape, dtype) if M else xp.zeros(x.shape, dtype=dtype)
        if M == 0:
            if builtin:
                return xp.zeros((), dtype=dtype), grads, dx
            y = self._empty((0, N_out), dtype=dtype)
            value, _ = loss.fn(y)
            return value, grads, dx

        # ---- forward: save each layer's input and its y or z ----
        recompute = self._recompute_first(net, need_dx)
        value, inputs, saved, g_last = self._train_forward(net, params, x, loss, target,
                                                           recompute, True)
        # ---- backward, last layer first; the split-batch reductions go last, together ----
        self._deferred = []
        try:
            self._backward_layers(layers, params, grads, dx, saved, inputs, acts, target,
                                  two_scale_of(loss, M, N_out), g_last, recompute, need_dx, M,
                                  dtype, prec)
            self._flush_reductions()
        finally:
            self._deferred = None
        return value, grads, dx

    def _backward_layers(self, layers, params, grads, dx, saved, inputs, acts, target, two_scale,
                         g_last, recompute, need_dx, M, dtype, prec):
        L = len(layers)
        g = g_last
        for l in range(L - 1, -1, -1):
            if l == 0 and recompute:
                break  # done by the chain kernel at l == 1
            spec = layers[l]
            W, _b = params[l]
            dW, db = grads[l]
            rng = f"Dense[{l}].backward"
            N, K = spec.out_features, spec.in_features
            last = l == L - 1
            dz = self._dz_args(g, saved[l], target if last else None, acts[l].id,
                               two_scale if last else None, M, N, dtype)
            if N and K + spec.bias:
                self._backward_dw(rng, dz, inputs[l], M, N, K, spec.bias, dW, db, prec)
            elif N == 0:
                dW[...] = 0
                if db is not None:
                    db[...] = 0
            if l == 1 and recompute:
                dW0, db0 = grads[0]
                self._backward_chain("Dense[0].backward", dz, W, inputs[1], M, dW0, db0, prec)
                break
            if l > 0 or need_dx:
                out = dx if l == 0 else self._empty((M, K), dtype=dtype)
                if K:
                    if N:
                        self._backward_dx(rng, dz, W, M, out, prec)
                    else:
                        out[...] = 0
                g = out

    # -- whole networks: public entry points, through cached launch plans ----------
    def execution_path(self, net: NetSpec, batch: int, *, mode: str = "grad",
                       need_dx: bool = False, loss: LossSpec | None = None) -> str:
        """``"fused"`` when a call of this kind runs on kernels/fused.cu, else
        ``"per-layer: <why>"``."""
        m = {"forward": MODE_FORWARD, "value": MODE_VALUE, "grad": MODE_GRAD}[mode]
        lay = self.fused.layout(net, batch, m, need_dx=need_dx, loss=loss)
        return "fused" if isinstance(lay, FusedLayout) else f"per-layer: {lay}"

    @_one_call_at_a_time
    def network_forward(self, net: NetSpec, params: Params, x):
        if x.shape[0]:
            plan = self.fused.plan(MODE_FORWARD, net, x, None, False)
            if plan is not None:
                return self.fused.forward(plan, net, params, x)
        key = self._plan_key("forward", net, x, None, False)
        return self._run_planned(key, net, params, x, None,
                                 lambda: self._forward_impl(net, params, x))

    @_one_call_at_a_time
    def network_value(self, net: NetSpec, params: Params, x, loss: LossSpec):
        """The loss value alone: forward with the loss fused, nothing saved (graph forward)."""
        target = self._target_of(loss)
        if x.shape[0]:
            plan = self.fused.plan(MODE_VALUE, net, x, loss, False)
            if plan is not None:
                return self.fused.value(plan, net, params, x, target)
        key = self._plan_key("value", net, x, loss, False)
        return self._run_planned(key, net, params, x, target,
                                 lambda: self._value_impl(net, params, x, loss, target))

    def network_value_and_grad(self, net: NetSpec, params: Params, x, loss: LossSpec, *,
                               need_dx: bool = False, out=None):
        with self._call_lock:  # inline rather than _one_call_at_a_time: the hottest call
            target = self._target_of(loss)
            if x.shape[0]:
                plan = self.fused.plan(MODE_GRAD, net, x, loss, need_dx)
                if plan is not None:
                    return self.fused.value_and_grad(plan, net, params, x, loss, target, need_dx,
                                                     out)
            key = self._plan_key("grad", net, x, loss, need_dx)
            res = self._run_planned(key, net, params, x, target,
                                    lambda: self._value_and_grad_impl(net, params, x, loss,
                                                                      target, need_dx))
            return res if out is None else write_into(out, res)

    # A launch plan records, once per (network, batch, layout, loss kind), the kernels,
    # grids and scalar arguments a call launches and the buffers it allocates; later
    # calls only allocate fresh buffers and launch (the host cost of a seed step drops
    # from ~100 us of Python to ~30).  Shapes, dtypes and layouts are in the key; the
    # caller's arrays are checked on every call.
    def _target_of(self, loss):
        """The built-in loss's target as the kernels read it (C-contiguous), else None."""
        if loss is None or loss.kind == "callable" or loss.target is None:
            return None
        return self._contiguous(loss.target)

    def _contiguous(self, a):
        """``a`` itself when C-contiguous, else a copy in a buffer from :meth:`_empty`
        (so a captured graph owns the copy it reads, and a launch plan sees it)."""
        if a.flags.c_contiguous:
            return a
        out = self._empty(a.shape, a.dtype)
        out[...] = a
        return out

    def _plan_key(self, what, net, x, loss, need_dx):
        if x.shape[0] == 0 or (loss is not None and loss.kind == "callable"):
            return None
        if any(s.out_features == 0 or s.in_features == 0 for s in net.layers):
            return None
        return (what, self.kernels.device(), net, tuple(x.shape), tuple(x.strides), x.dtype.str, need_dx,
                None if loss is None else loss.kind,
                loss is not None and loss.target is not None, cuda_select.plan_settings())

    @staticmethod
    def _externals(x_read, params, target):
        """The caller's arrays a plan refers to by slot (``x_read``: the array the first
        layer reads, ``_x_input(x).x``); None when one array has two roles."""
        externals = [x_read]
        for W, b in params:
            externals.append(W)
            if b is not None:
                externals.append(b)
        if target is not None:
            externals.append(target)
        if len({id(a) for a in externals}) != len(externals):
            return None  # do not bake an aliasing into a plan
        return externals

    def _run_planned(self, key, net, params, x, target, run):
        if key is None:
            return run()
        plan = self._plans.get(key)
        if plan is UNPLANNABLE:
            return run()
        inp = self._x_input(x)
        externals = self._externals(inp.x, params, target)
        if externals is None:
            return run()
        if plan is None:
            self._inp_override = (x, inp)
            try:
                plan = cuda_plans.record(self.kernels, externals, run)
            finally:
                self._inp_override = None
            self._plans[key] = plan
            if plan is UNPLANNABLE:
                return run()
        dtype = np.dtype(net.dtype)
        for l, (spec, (W, b)) in enumerate(zip(net.layers, params)):
            expect(W, f"W[{l}]", (spec.out_features, spec.in_features), dtype)
            if spec.bias:
                expect(b, f"b[{l}]", (spec.out_features,), dtype)
            elif b is not None:
                raise CudaLaunchError(f"b[{l}]: layer {l} has no bias but an array was given")
        if target is not None:
            expect(target, "target", (x.shape[0], net.out_features), dtype)
        return cuda_plans.replay(self.kernels, plan, externals)

    @_one_call_at_a_time
    def planned_launches(self, net: NetSpec, params: Params, x, loss: LossSpec, *,
                         need_dx: bool = False) -> tuple[list[PlannedLaunch], tuple]:
        """The kernel launches of one ``network_value_and_grad`` call, in order, each bound
        to buffers of its own and callable alone, and the ``(value, grads, dx)`` they write
        once all have run: the per-kernel breakdown of ``python -m cupynn bench --kernels``.
        Kernels only write their outputs (no accumulation), so launching one repeatedly
        leaves the same bytes."""
        target = self._target_of(loss)
        if x.shape[0]:
            fplan = self.fused.plan(MODE_GRAD, net, x, loss, need_dx)
            if fplan is not None:
                return self.fused.planned_launches(fplan, net, params, x, loss, target, need_dx)
        key = self._plan_key("grad", net, x, loss, need_dx)
        self.network_value_and_grad(net, params, x, loss, need_dx=need_dx)  # records the plan
        plan = None if key is None else self._plans.get(key)
        externals = self._externals(self._x_input(x).x, params, self._target_of(loss))
        if plan is None or plan is UNPLANNABLE or externals is None:
            raise ValueError("this call has no launch plan (batch 0, a callable loss, a layer "
                             "of width 0, or one array passed in two roles)")
        return cuda_plans.bind(self.kernels, plan, externals)


def two_scale_of(loss: LossSpec, M: int, N_out: int):
    """2 * scale of the fused built-in loss gradient, None for a callable loss."""
    if loss.kind not in ("sum_squares", "mse"):
        return None
    return 2.0 * loss_scale(loss.kind, M * N_out)
