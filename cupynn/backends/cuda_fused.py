"""The fused path of the CUDA backend: one kernel per batch range for a whole step.

:class:`FusedRunner` runs ``network_forward`` / ``network_value`` /
``network_value_and_grad`` of the networks ``cuda_fused_layout`` accepts on
``kernels/fused.cu``: ``fused_mlp`` (forward, loss, backward and each block's partial
gradients) and, for a value or gradient, ``fused_reduce`` (the blocks' partials summed in a
fixed order).  Per (network, batch, layout, call kind) it keeps a plan: the layout, the kernel
functions, the configuration table and the partial-gradient workspace on the device, and the
constant part of both argument lists.  A call after the first therefore checks the caller's
arrays, allocates its outputs (one block, sliced into value, gradients and dx; nothing with
``out=``) and launches two kernels.  Workspaces belong to the runner and are reused by every
call with the same key on the same stream (a CUDA graph captures them); the CUDA backend
runs each call under its call lock, so two threads never interleave their launches.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from .._nvtx import nvtx_range
from ..losses import loss_scale
from . import cuda_fused_layout as _fl
from .base import LossSpec, NetSpec, Params
from .cuda_fused_layout import (
    MAX_LAYERS,
    MODE_FORWARD,
    MODE_GRAD,
    MODE_VALUE,
    SOURCE,
    FusedLayout,
    fused_layout,
    smem_limit_for_arch,
)
from .cuda_launch import THREADS, CudaLaunchError, Launcher, expect
from .cuda_plans import PlannedLaunch
from .cuda_select import f64_mma_enabled

__all__ = ["FusedRunner", "FusedPlan"]

_STEP_RANGE = {MODE_FORWARD: "fused.forward", MODE_VALUE: "fused.value", MODE_GRAD: "fused.step"}


@dataclass
class FusedPlan:
    """What a call of one key reuses: layout, functions, device tables, workspace, arguments."""

    layout: FusedLayout
    mode: int
    fn: object            # fused_mlp
    reduce_fn: object     # fused_reduce (None in forward mode)
    cfg: object           # the configuration table on the device
    partials: object      # [grid][P] workspace (a dummy in forward mode)
    two_scale: object     # numpy scalars of the network's dtype
    vscale: object
    n_out: int
    k0: int
    out_shapes: tuple     # ((dW shape, db shape or None), ...) per layer
    flat_size: int        # elements of a plain call's output block (without dx)
    args: list            # fused_mlp's argument list; the per-call slots are replaced
    rargs: list           # fused_reduce's
    dtype: np.dtype
    x_direct: bool        # x goes to the kernel as it is (else through the backend's window)
    rgrid: int            # fused_reduce's blocks
    grid3: tuple          # fused_mlp's grid
    rgrid3: tuple
    checks: tuple         # per layer: (W shape, W strides, b shape or None, b strides)
    views: tuple          # per layer: (dW slice, dW shape, db slice or None) of the output block


# slots of fused_mlp's per-call arguments
_X, _SXM, _SXK, _TGT = 1, 2, 3, 5
_W0, _B0 = 7, 7 + MAX_LAYERS
_Y, _DX, _PART = 7 + 2 * MAX_LAYERS, 8 + 2 * MAX_LAYERS, 9 + 2 * MAX_LAYERS
# fused_reduce: (cfg, partials, G, e0, e1, vscale, value, dw0..dw7, db0..db7)
_RVAL, _RDW, _RDB = 6, 7, 7 + MAX_LAYERS
_BLOCK = (THREADS,)


class FusedRunner:
    """Path choice, cached workspaces and launches of ``kernels/fused.cu``."""

    def __init__(self, launcher: Launcher, x_input):
        self.kernels = launcher
        self._x_input = x_input  # CudaBackend._x_input: (array, row stride, column stride)
        self._plans: dict = {}
        self._smem: dict = {}
        self._sms: dict = {}
        # the emulator's stand-in for the SM count (tests vary it: the bits must not change)
        self.simulated_sms = _fl.FUSED_BLOCKS
        self._last: tuple | None = None  # (key fields, net, plan) of the last call
        # False: every network takes the per-layer path (tests of the per-layer kernels)
        self.enabled = True

    # -- persistent blocks ---------------------------------------------------------------------
    def sm_count(self) -> int:
        """Multiprocessors of the current device (on the emulator: ``simulated_sms``)."""
        if self.kernels.emulated:
            return self.simulated_sms
        dev = self.kernels.device()
        n = self._sms.get(dev)
        if n is None:
            n = self._sms[dev] = int(self.kernels.xp.cuda.Device(dev).attributes["MultiProcessorCount"])
        return n

    def blocks(self, lay: FusedLayout) -> int:
        """fused_mlp's grid: min(slices, SM count, FUSED_BLOCKS) persistent blocks, each
        walking its share of the layout's fixed slices (one wave on any card; the bits do
        not change)."""
        return max(1, min(lay.grid, self.sm_count(), _fl.FUSED_BLOCKS))

    # -- path choice ------------------------------------------------------------------------
    def smem_limit(self) -> int:
        """Opt-in dynamic + static shared memory per block on the current device."""
        dev = self.kernels.device()
        lim = self._smem.get(dev)
        if lim is None:
            if self.kernels.emulated:
                lim = smem_limit_for_arch(self.kernels.arch)
            else:
                attrs = self.kernels.xp.cuda.Device(dev).attributes
                lim = int(attrs.get("MaxSharedMemoryPerBlockOptin",
                                    attrs.get("MaxSharedMemoryPerBlock", 49152)))
            self._smem[dev] = lim
        return lim

    def layout(self, net: NetSpec, batch: int, mode: int, *, need_dx: bool = False,
               loss: LossSpec | None = None):
        """The :class:`FusedLayout` of a call, or the reason it takes the per-layer path."""
        if not self.enabled:
            return "the fused path is switched off on this backend (fused.enabled = False)"
        kind = "sum_squares" if loss is None else loss.kind
        has_t = loss is not None and loss.target is not None
        return fused_layout(net, batch, mode=mode, need_dx=need_dx, has_target=has_t, loss=kind,
                            smem_limit=self.smem_limit(), f64_mma=f64_mma_enabled())

    # -- plans --------------------------------------------------------------------------------
    def plan(self, mode: int, net: NetSpec, x, loss: LossSpec | None, need_dx: bool):
        """The cached :class:`FusedPlan` of a call, or None for the per-layer path."""
        if not self.enabled:
            return None
        # per stream: a workspace written by one stream's fused_mlp and read by its
        # fused_reduce must not be shared with a call on another stream
        fields = (mode, self.kernels.device(), self.kernels.stream_key(), x.shape[0], x.strides,
                  need_dx,
                  None if loss is None else loss.kind,
                  loss is not None and loss.target is not None,
                  f64_mma_enabled(), _fl.WIDE_MIN, _fl.FUSED_BLOCKS, _fl.SLICE_SPLIT,
                  _fl._ENABLED_ENV,
                  self.simulated_sms)
        last = self._last
        if last is not None and last[1] is net and last[0] == fields:
            p = last[2]  # the same network object as the last call: no hashing of its spec
        else:
            key = (net,) + fields
            p = self._plans.get(key)
            if p is None:
                lay = self.layout(net, x.shape[0], mode, need_dx=need_dx, loss=loss)
                p = self._make_plan(lay, mode, net, x, loss, need_dx) \
                    if isinstance(lay, FusedLayout) else lay
                self._plans[key] = p
            self._last = (fields, net, p)
        return p if isinstance(p, FusedPlan) else None

    def _make_plan(self, lay: FusedLayout, mode: int, net: NetSpec, x, loss, need_dx):
        k = self.kernels
        M = x.shape[0]
        xp = k.xp
        dtype = np.dtype(net.dtype)
        T = dtype.type
        fn = k.function(SOURCE, lay.kernel)
        smem = lay.smem_bytes
        if getattr(fn, "max_dynamic_shared_size_bytes", 0) < smem:
            fn.max_dynamic_shared_size_bytes = smem
        cfg = k.empty((len(lay.cfg),), np.int64)  # through the launcher: counted, capturable
        cfg[...] = xp.asarray(np.asarray(lay.cfg, dtype=np.int64))
        none = k.none(dtype)
        partials = k.empty(lay.grid * lay.partial_stride, dtype) if mode != MODE_FORWARD else none
        n_out = net.out_features
        kind = "sum_squares" if loss is None else loss.kind
        scale = loss_scale(kind, M * n_out)
        i64 = np.int64
        args = [cfg, None, i64(0), i64(0), i64(M), none, T(2.0 * scale)]
        args += [none] * (2 * MAX_LAYERS) + [none, none, partials, i64(lay.grid)]
        reduce_fn = None
        rargs = []
        if mode != MODE_FORWARD:
            reduce_fn = k.function(SOURCE, lay.reduce)
            e0 = lay.value_slot if mode == MODE_VALUE else 0
            rargs = [cfg, partials, i64(lay.grid), i64(e0), i64(lay.partial_stride), T(scale),
                     none] + [none] * (2 * MAX_LAYERS)
        shapes = tuple(((s.out_features, s.in_features), (s.out_features,) if s.bias else None)
                       for s in net.layers)
        inp = self._x_input(x)  # the strides are part of the plan's key
        args[_SXM], args[_SXK] = i64(inp.sxm), i64(inp.sxk)
        x_direct = inp.x is x
        rgrid = 1 if mode == MODE_VALUE else -(-lay.partial_stride // THREADS)
        item = dtype.itemsize
        checks = tuple((ws, (ws[1] * item, item), bs, None if bs is None else (item,))
                       for ws, bs in shapes)
        views = tuple((slice(dw, dw + ws[0] * ws[1]), ws,
                       None if bs is None else slice(db, db + bs[0]))
                      for (ws, bs), (dw, db) in zip(shapes, lay.param_offsets))
        return FusedPlan(layout=lay, mode=mode, fn=fn, reduce_fn=reduce_fn, cfg=cfg,
                         partials=partials, two_scale=T(2.0 * scale), vscale=T(scale),
                         n_out=n_out, k0=net.in_features, out_shapes=shapes,
                         flat_size=lay.partial_stride, args=args, rargs=rargs, dtype=dtype,
                         x_direct=x_direct, rgrid=rgrid, grid3=(self.blocks(lay), 1, 1),
                         rgrid3=(rgrid, 1, 1), checks=checks, views=views)

    # -- one call ---------------------------------------------------------------------------
    def _bind_inputs(self, plan: FusedPlan, net: NetSpec, params: Params, x, target):
        """fused_mlp's argument list with this call's x, W, b and target checked and set."""
        dtype = plan.dtype
        args = plan.args.copy()
        args[_X] = x if plan.x_direct else self._x_input(x).x
        if len(params) != len(plan.checks):
            raise CudaLaunchError(f"expected {len(plan.checks)} (W, b) pairs, got {len(params)}")
        l = 0
        for (W, b), (ws, wst, bs, bst) in zip(params, plan.checks):
            # shape, dtype and C-contiguous strides; anything else gets the full check
            if W.shape != ws or W.dtype != dtype or W.strides != wst:
                expect(W, f"W[{l}]", ws, dtype)
            args[_W0 + l] = W
            if bs is not None:
                if b is None:
                    raise CudaLaunchError(f"b[{l}]: layer {l} has a bias but none was given")
                if b.shape != bs or b.dtype != dtype or b.strides != bst:
                    expect(b, f"b[{l}]", bs, dtype)
                args[_B0 + l] = b
            elif b is not None:
                raise CudaLaunchError(f"b[{l}]: layer {l} has no bias but an array was given")
            l += 1
        if target is not None:
            expect(target, "target", (x.shape[0], plan.n_out), dtype)
            args[_TGT] = target
        return args

    def _launch(self, rng: str, name: str, fn, grid3: tuple, args: list, smem: int = 0) -> None:
        k = self.kernels
        local = k._local  # this thread's recording / keep_alive / capture
        if local.recording is not None:
            raise CudaLaunchError("the fused path cannot be recorded into a per-layer launch plan")
        if local.keep_alive is not None:  # a graph capture: what the launch reads stays alive
            local.keep_alive.extend(a for a in args if isinstance(a, k.xp.ndarray))
        if local.capture is not None:  # the emulator's stream capture: replayed by EmulatedGraph
            local.capture.append((rng, name, functools.partial(fn, shared_mem=smem), grid3,
                                  tuple(args)))
            return
        if k.launch_log is not None:
            k.launch_log.append((rng, name))
        if k.emulated:
            fn(grid3, _BLOCK, tuple(args), shared_mem=smem)
        else:
            with nvtx_range(rng, True):
                fn(grid3, _BLOCK, tuple(args), shared_mem=smem)

    def _outputs(self, plan: FusedPlan, M: int, need_dx: bool, dtype, out):
        """(value, grads, dx) arrays the reduction (and fused_mlp for dx) write."""
        if out is not None:
            value, grads, dx = out
            if value.shape != () or value.dtype != dtype:
                expect(value, "out value", (), dtype)
            if len(grads) != len(plan.checks):
                raise CudaLaunchError(f"out: expected {len(plan.checks)} (dW, db) pairs, "
                                      f"got {len(grads)}")
            l = 0
            for (dW, db), (ws, wst, bs, bst) in zip(grads, plan.checks):
                if dW.shape != ws or dW.dtype != dtype or dW.strides != wst:
                    expect(dW, f"out dW[{l}]", ws, dtype)
                if bs is not None and (db is None or db.shape != bs or db.dtype != dtype
                                       or db.strides != bst):
                    if db is None:
                        raise CudaLaunchError(f"out db[{l}]: layer {l} has a bias; pass its array")
                    expect(db, f"out db[{l}]", bs, dtype)
                l += 1
            if need_dx:
                expect(dx, "out dx", (M, plan.k0), dtype)
            return value, grads, dx if need_dx else None
        n = plan.flat_size + (M * plan.k0 if need_dx else 0)
        flat = self.kernels.empty(n, dtype)
        grads = [(flat[wsl].reshape(ws), None if bsl is None else flat[bsl])
                 for wsl, ws, bsl in plan.views]
        P = plan.flat_size
        value = flat[P - 1:P].reshape(())
        dx = flat[P:].reshape(M, plan.k0) if need_dx else None
        return value, grads, dx

    def value_and_grad(self, plan: FusedPlan, net: NetSpec, params: Params, x, loss: LossSpec,
                       target, need_dx: bool, out=None):
        """``(value, grads, dx)`` of one step: fused_mlp then fused_reduce."""
        M = x.shape[0]
        args = self._bind_inputs(plan, net, params, x, target)
        value, grads, dx = self._outputs(plan, M, need_dx, plan.dtype, out)
        if dx is not None:
            args[_DX] = dx
        lay = plan.layout
        rargs = plan.rargs.copy()
        rargs[_RVAL] = value
        for l, (dW, db) in enumerate(grads):
            rargs[_RDW + l] = dW
            if db is not None:
                rargs[_RDB + l] = db
        self._launch(_STEP_RANGE[plan.mode], lay.kernel, plan.fn, plan.grid3, args, lay.smem_bytes)
        self._launch("fused.reduce", lay.reduce, plan.reduce_fn, plan.rgrid3, rargs)
        return value, grads, dx

    def value(self, plan: FusedPlan, net: NetSpec, params: Params, x, target):
        """The loss value alone (no backward, nothing but the value written)."""
        args = self._bind_inputs(plan, net, params, x, target)
        value = self.kernels.empty((), plan.dtype)
        lay = plan.layout
        self._launch(_STEP_RANGE[plan.mode], lay.kernel, plan.fn, plan.grid3, args, lay.smem_bytes)
        rargs = plan.rargs.copy()
        rargs[_RVAL] = value
        self._launch("fused.reduce", lay.reduce, plan.reduce_fn, plan.rgrid3, rargs)
        return value

    def forward(self, plan: FusedPlan, net: NetSpec, params: Params, x, out=None):
        """The network's output: one launch."""
        dtype = plan.dtype
        M = x.shape[0]
        args = self._bind_inputs(plan, net, params, x, None)
        if out is None:
            y = self.kernels.empty((M, plan.n_out), dtype)
        else:
            expect(out, "out", (M, plan.n_out), dtype)
            y = out
        args[_Y] = y
        lay = plan.layout
        self._launch(_STEP_RANGE[plan.mode], lay.kernel, plan.fn, plan.grid3, args, lay.smem_bytes)
        return y

    def planned_launches(self, plan: FusedPlan, net: NetSpec, params: Params, x, loss, target,
                         need_dx: bool):
        """The two launches of one gradient step, each callable alone (bench --kernels)."""
        dtype = np.dtype(net.dtype)
        M = x.shape[0]
        args = self._bind_inputs(plan, net, params, x, target)
        value, grads, dx = self._outputs(plan, M, need_dx, dtype, None)
        if dx is not None:
            args[_DX] = dx
        lay = plan.layout
        rargs = list(plan.rargs)
        rargs[_RVAL] = value
        for l, (dW, db) in enumerate(grads):
            rargs[_RDW + l] = dW
            if db is not None:
                rargs[_RDB + l] = db
        rgrid = -(-lay.partial_stride // THREADS)
        launches = [
            PlannedLaunch(_STEP_RANGE[plan.mode], lay.kernel, plan.grid3,
                          functools.partial(plan.fn, plan.grid3, (THREADS,), tuple(args),
                                            shared_mem=lay.smem_bytes), plan.fn),
            PlannedLaunch("fused.reduce", lay.reduce, (rgrid, 1, 1),
                          functools.partial(plan.reduce_fn, (rgrid, 1, 1), (THREADS,),
                                            tuple(rargs)), plan.reduce_fn),
        ]
        return launches, (value, grads, dx)
