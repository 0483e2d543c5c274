"""The NumPy backend: the reference implementation, and a fast CPU path.

Speed comes from the memory hierarchy and from doing each pass once:

* the batch is processed in chunks of rows small enough that every buffer of
  one chunk stays in cache, so a 1000-wide hidden layer is never written to
  and read back from main memory;
* hidden activations are stored feature-major (``(width, rows)``), each one
  directly in the next layer's input buffer ``[h; 1]``, whose last row is ones:
  the bias is part of the next product (``[W | b] @ [h; 1]``) and the bias
  gradient part of the weight gradient (``dz @ [h; 1].T = [dW | db]``) -- no
  bias pass, no copy between layers, no reduction for ``db``;
* the activation is applied in place on the product's output, its derivative
  in place on the gradient (no temporaries in the hot loop for identity, relu,
  leaky_relu, tanh and sigmoid);
* the loss and the whole backward pass run on a chunk right after its
  forward, while its activations are still in cache; weight gradients
  accumulate over chunks, and then over groups, in a fixed order (deterministic);
* the first layer's weight gradient, when its activation is the identity and
  the input gradient is not asked for, is reassociated:
  ``dW0 = (dz1 @ W1).T @ x = W1.T @ (dz1.T @ x)`` -- the same products in a
  cheaper order, which never forms the ``(batch, width0)`` gradient;
* BLAS runs with one thread inside the loop, and a large batch is cut into
  groups of chunks that lanes (threads of cupynn's own, one per core) take as
  they finish (see ``cupynn/_threads.py``): a busy core then slows one lane,
  which takes fewer groups, instead of every product;
* workspaces are kept between calls (per network shape, a few per shape);
* a small call (fewer than ``_SMALL_WORK`` multiply-adds, all of it in cache
  anyway) skips all of the above: the whole batch in one row-major pass, about
  eight NumPy calls a layer (``_direct_*``), since there the calls' own cost
  is the time.

Single-layer functions (``dense_forward`` ...) are plain and unchunked: they
are the formulas of ``cupynn/activations.py`` written out.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np

from .. import _threads
from ..activations import get_activation
from ..losses import call_loss, loss_scale
from . import numpy_optim, numpy_taylor
from .base import Backend, LossSpec, NetSpec, OptimizerState, Params, write_into

# Rows per chunk are chosen so that one chunk's buffers (every layer's input, gradient
# and saved pre-activation) take about this many bytes: large enough for BLAS efficiency
# and few NumPy calls per row, small enough for a core's L2 cache (2 MiB on current Xeons;
# only narrow networks reach it: a wider one is held to _MIN_CHUNK_ROWS rows).  A 4->32->16->4
# float32 gradient at batch 10,000 took 1.42-1.64 ms in 2 MiB chunks against 1.55-2.14 ms
# in 1 MiB ones (2-core Xeon VM, medians of three runs each, interleaved).
_CHUNK_BYTES = 2 << 20
_MIN_CHUNK_ROWS = 256
_MAX_CHUNK_ROWS = 16384
# The first layer copies x into [x^T; 1] (folding its bias into the product) when its
# fan-in is at most this; wider inputs are read in place and the bias added after.
_AUGMENT_MAX_FAN_IN = 16
# Below this many multiply-adds per call, a call runs the direct path (_direct_forward):
# no chunks, workspaces or accumulators, and BLAS threads are left alone (a tiny product
# runs on one thread anyway, and setting the limit costs microseconds).
_SMALL_WORK = 1 << 18
# Workspaces kept between calls: network shapes, and free workspaces per shape.
_CACHED_SHAPES = 8

# activations with an in-place forward / derivative below
_INPLACE = ("identity", "relu", "leaky_relu", "tanh", "sigmoid")


def _chunk_rows(net: NetSpec, train: bool = True) -> int:
    """Rows per chunk for ``net`` (the same for forward and gradient calls)."""
    per_row = 0
    for s in net.layers:
        per_row += s.in_features + 1 + 3 * s.out_features  # input, gradient, pre/scratch
    rows = _CHUNK_BYTES // (per_row * net.dtype.itemsize)
    return int(min(_MAX_CHUNK_ROWS, max(_MIN_CHUNK_ROWS, rows)))


def _activate_inplace(act, z, out):
    """Write ``act(z)`` into ``out`` (which may be ``z`` itself)."""
    name = act.name
    if name == "identity":
        if out is not z:
            np.copyto(out, z)
    elif name == "tanh":
        np.tanh(z, out=out)
    elif name == "relu":
        np.maximum(z, 0, out=out)  # propagates NaN, like the reference
    elif name == "leaky_relu" and out is z:
        np.multiply(z, z.dtype.type(0.01), out=z, where=z < 0)
    elif name == "sigmoid" and out is z:
        # 1 / (1 + exp(-z)): exp overflows to inf for z < -709 (float64) and gives 0, as
        # the limit; the errstate keeps that quiet.
        with np.errstate(over="ignore"):
            np.negative(z, out=z)
            np.exp(z, out=z)
            z += 1
            np.reciprocal(z, out=z)
    else:
        out[...] = act.forward(z)


def _scale_by_derivative(act, g, saved, scratch):
    """``g *= act'(saved)`` in place (``saved`` is y or z as the activation needs)."""
    name = act.name
    if name == "identity":
        return
    if name == "tanh":  # 1 - y^2
        np.multiply(saved, saved, out=scratch)
        np.subtract(1, scratch, out=scratch)
        g *= scratch
    elif name == "relu":
        np.multiply(g, saved > 0, out=g)  # relu' from y: 1 where y > 0, else 0 (NaN y -> 0)
    elif name == "sigmoid":  # y (1 - y)
        np.subtract(1, saved, out=scratch)
        scratch *= saved
        g *= scratch
    elif name == "leaky_relu":
        np.multiply(g, g.dtype.type(0.01), out=g, where=~(saved > 0))
    else:
        g *= act.derivative(saved)


class _Layer:
    """What one layer of a network needs in the hot loop (built once per shape)."""

    __slots__ = ("K", "N", "act", "bias", "aug", "first", "last", "save_z")

    def __init__(self, spec, first, last):
        self.K, self.N = spec.in_features, spec.out_features
        self.act = get_activation(spec.activation)
        self.bias = spec.bias
        self.first, self.last = first, last
        # the input is [h; 1] (bias folded into the product): hidden layers with a bias
        # always (the previous layer writes h there), the first one for a small fan-in
        self.aug = spec.bias and (not first or spec.in_features <= _AUGMENT_MAX_FAN_IN)
        self.save_z = not self.act.from_output


class _Workspace:
    """Buffers for one chunk of ``rows`` rows, flat so that every view of ``n`` rows is
    contiguous; reused across chunks, calls and lanes (one lane at a time)."""

    def __init__(self, net: NetSpec, layers: list[_Layer], rows: int, train: bool):
        dt = net.dtype
        self.rows = rows
        self.layers = layers
        L = len(layers)
        # inp[l]: layer l's input, feature-major (K [+1], rows); None: read x in place
        self.inp = []
        for lay in layers:
            if lay.first and not lay.aug:
                self.inp.append(None)
            else:
                self.inp.append(np.empty((lay.K + lay.aug) * rows, dt))
        self.y = np.empty(rows * layers[-1].N, dt)  # the last layer's output, row-major
        self.pre = [np.empty(rows * lay.N, dt) if lay.save_z else None for lay in layers]
        self.grad = [np.empty(rows * lay.N, dt) for lay in layers] if train else None
        widest = max(lay.N for lay in layers)
        self.scratch = np.empty(rows * widest, dt)
        self.ones = np.ones(rows, dt)
        self._views = {}
        self.L = L

    def views(self, n: int):
        """Per-layer (inp, out, pre, grad, scratch) views for a chunk of ``n`` rows."""
        v = self._views.get(n)
        if v is not None:
            if n != self.rows:  # the full chunks' h rows overlap this view's row of ones
                for l, lay in enumerate(self.layers):
                    if lay.aug:
                        v[l][0][lay.K] = 1
            return v
        v = []
        for l, lay in enumerate(self.layers):
            K, N = lay.K, lay.N
            inp = None
            if self.inp[l] is not None:
                inp = self.inp[l][:(K + lay.aug) * n].reshape(K + lay.aug, n)
                if lay.aug:
                    inp[K] = 1
            if lay.last:
                shape = (n, N)
                out = self.y[:n * N].reshape(shape)
            else:
                shape = (N, n)
                nxt = self.layers[l + 1]
                out = self.inp[l + 1][:(N + nxt.aug) * n].reshape(N + nxt.aug, n)[:N]
            pre = self.pre[l][:n * N].reshape(shape) if lay.save_z else None
            grad = self.grad[l][:n * N].reshape(shape) if self.grad is not None else None
            scratch = self.scratch[:n * N].reshape(shape)
            v.append((inp, out, pre, grad, scratch))
        if len(self._views) > 4:
            self._views.clear()
        self._views[n] = v
        return v


class _Shape:
    """One network shape: its layers, and the free workspaces per (rows, train)."""

    __slots__ = ("net", "layers", "free", "chunk_rows", "macs_per_row", "acc_bytes")

    def __init__(self, net: NetSpec):
        self.net = net
        n = len(net.layers)
        self.layers = [_Layer(s, i == 0, i == n - 1) for i, s in enumerate(net.layers)]
        self.free: dict = {}
        self.chunk_rows = _chunk_rows(net)
        self.macs_per_row = sum(s.in_features * s.out_features for s in net.layers)
        self.acc_bytes = net.dtype.itemsize * sum((s.in_features + 1) * s.out_features
                                                  for s in net.layers)

    def checkout(self, rows: int, train: bool) -> _Workspace:
        free = self.free.get((rows, train))
        if free:
            try:
                return free.pop()
            except IndexError:  # another thread took the last one
                pass
        return _Workspace(self.net, self.layers, rows, train)

    def checkin(self, ws: _Workspace, train: bool) -> None:
        free = self.free.get((ws.rows, train))
        if free is None:
            if len(self.free) >= _CACHED_SHAPES:
                self.free.clear()
            free = self.free.setdefault((ws.rows, train), [])
        if len(free) < 16:
            free.append(ws)


_CACHE_LOCK = threading.Lock()
_SHAPES: OrderedDict = OrderedDict()  # NetSpec -> _Shape


_LAST_SHAPE: tuple = (None, None)  # (NetSpec, _Shape) of the latest call: no hashing for a repeat


def _shape_of(net: NetSpec) -> _Shape:
    global _LAST_SHAPE
    last = _LAST_SHAPE
    if last[0] is net:
        return last[1]
    shape = _SHAPES.get(net)
    if shape is None:
        with _CACHE_LOCK:
            shape = _SHAPES.get(net)
            if shape is None:
                shape = _SHAPES[net] = _Shape(net)
                while len(_SHAPES) > _CACHED_SHAPES:
                    _SHAPES.popitem(last=False)
    _LAST_SHAPE = (net, shape)
    return shape


def _blasable(x) -> bool:
    """Whether BLAS can read the 2-D view ``x`` in place (else NumPy loops slowly)."""
    item = x.itemsize
    s0, s1 = x.strides
    return (s1 == item and s0 >= item * x.shape[1] and s0 % item == 0) or (
        s0 == item and s1 >= item * x.shape[0] and s1 % item == 0)


class _Acc:
    """``sum_chunks dz @ h`` as an (N, K') array, accumulated in the faster orientation.

    BLAS is slow when the output's leading dimension is tiny (20 rows of 1000): for
    ``N < K'`` it accumulates the transpose ``h.T @ dz.T``.  The first chunk writes the
    product directly; later ones go through one temporary."""

    __slots__ = ("t", "buf", "tmp")

    def __init__(self, N, K):
        self.t = N < K
        self.buf = None
        self.tmp = None

    def add(self, D, H):
        """``+= D @ H`` for ``D`` (N, n) and ``H`` (n, K')."""
        a, b = (H.T, D.T) if self.t else (D, H)
        if self.buf is None:
            self.buf = np.matmul(a, b)
            return
        if self.tmp is None:
            self.tmp = np.empty_like(self.buf)
        np.matmul(a, b, out=self.tmp)
        self.buf += self.tmp

    def merge(self, other: _Acc) -> None:
        if other.buf is None:
            return
        if self.buf is None:
            self.buf = other.buf
        else:
            self.buf += other.buf

    def result(self, shape, dtype):
        """The (N, K') sum (zeros when no chunk was added)."""
        if self.buf is None:
            return np.zeros(shape, dtype)
        return self.buf.T if self.t else self.buf


class _Partial:
    """One group's partial results: the per-layer accumulators and the loss sum."""

    __slots__ = ("w", "b", "p", "q", "total")

    def __init__(self, layers, reassociate):
        self.w = [_Acc(lay.N, lay.K + lay.aug) for lay in layers]
        # a bias of a layer that reads x in place: dz @ ones, accumulated separately
        self.b = [_Acc(lay.N, 1) if lay.bias and not lay.aug else None for lay in layers]
        if reassociate:
            l0, l1 = layers[0], layers[1]
            self.p = _Acc(l1.N, l0.K + l0.aug)
            self.q = _Acc(l1.N, 1) if l0.bias and not l0.aug else None
        else:
            self.p = self.q = None
        self.total = 0.0

    def merge(self, other: _Partial) -> None:
        for a, o in zip(self.w, other.w):
            a.merge(o)
        for a, o in zip(self.b, other.b):
            if a is not None:
                a.merge(o)
        if self.p is not None:
            self.p.merge(other.p)
            if self.q is not None:
                self.q.merge(other.q)
        self.total += other.total



def _merged_groups(group, n_groups: int, lanes: int):
    """Run ``group(i)`` for every lane group (BLAS at one thread) and merge the groups'
    partial states in group order: the fixed order that keeps the bits independent of
    which lane finishes first."""
    with _threads.blas_single_thread():
        states = _threads.run_groups(group, n_groups, lanes)
    st = states[0]
    for other in states[1:]:
        st.merge(other)
    return st

def _gradients(st, layers, params, dt, reassociate):
    """``[(dW, db), ...]`` from the merged per-layer accumulators of a backward pass."""
    grads = []
    for l, lay in enumerate(layers):
        if l == 0 and reassociate:
            W1 = params[1][0]
            P = st.p.result((layers[1].N, lay.K + lay.aug), dt)
            M = W1.T @ P  # (N0, K0 [+1])
            dW = np.ascontiguousarray(M[:, :lay.K])
            db = None
            if lay.bias:
                db = M[:, lay.K].copy() if lay.aug else (
                    W1.T @ st.q.result((layers[1].N, 1), dt))[:, 0]
            grads.append((dW, db))
            continue
        M = st.w[l].result((lay.N, lay.K + lay.aug), dt)
        dW = np.ascontiguousarray(M[:, :lay.K]) if lay.aug or st.w[l].t else M
        db = None
        if lay.bias:
            db = M[:, lay.K].copy() if lay.aug else np.ascontiguousarray(
                st.b[l].result((lay.N, 1), dt)[:, 0])
        grads.append((dW, db))
    return grads


# network_forward_saved keeps the outputs of layers with at least this fan-in (cheaper to
# store and reload than to recompute), up to _SAVE_MAX_BYTES in all; beyond that the
# backward recomputes the forward chunk by chunk instead.
_KEEP_MIN_FAN_IN = 128
_SAVE_MAX_BYTES = 1 << 30


def _aligned_empty(shape, dtype) -> np.ndarray:
    """An uninitialised C-contiguous array on 64-byte aligned memory: what JAX on the CPU
    reads through DLPack without a copy (``cupynn.jax.loss`` hands it the output ``y``)."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape)) * dtype.itemsize
    buf = np.empty(n + 64, dtype=np.uint8)
    off = (-buf.ctypes.data) % 64
    return buf[off:off + n].view(dtype).reshape(shape)


def _direct_forward(layers, params, x):
    """``(y, inputs, saved)`` of a small batch in one row-major pass: ``inputs[l]`` is layer
    ``l``'s input (``x`` itself for the first), ``saved[l]`` what its derivative reads
    (``z``, or ``y`` when the activation's derivative comes from its output)."""
    inputs, saved = [], []
    h = x
    for lay, (W, b) in zip(layers, params):
        inputs.append(h)
        z = np.matmul(h, W.T)
        if b is not None:
            z += b
        if lay.save_z:
            h = np.empty_like(z)
            _activate_inplace(lay.act, z, h)
            saved.append(z)
        else:
            _activate_inplace(lay.act, z, z)
            h = z
            saved.append(h)
    return h, inputs, saved


def _direct_value_and_grad(layers, params, x, target, dot, two_scale, user_g, need_dx):
    """``(sum, [(dW, db)], dx)`` of a small batch without chunks: ``sum`` is the loss before
    its scale (``sum((y - t)**2)`` or, for ``dot``, ``sum(y * t)``; unused with ``user_g``,
    the caller's ``dL/dy``)."""
    y, inputs, saved = _direct_forward(layers, params, x)
    total = 0.0
    if user_g is not None:
        g = np.array(user_g, dtype=y.dtype, order="C")  # scaled in place below: a copy
    elif dot:  # L = sum(y * t): dL/dy = t
        g = np.array(target, dtype=y.dtype, order="C")
        total = float(np.vdot(y, g))
    elif target is not None:
        g = np.subtract(y, target)
        total = float(np.vdot(g, g))
        g *= two_scale
    else:
        total = float(np.vdot(y, y))
        g = np.multiply(y, two_scale)
    grads = [None] * len(layers)
    for l in range(len(layers) - 1, -1, -1):
        lay, W = layers[l], params[l][0]
        _scale_by_derivative(lay.act, g, saved[l], np.empty_like(g))  # g = dL/dz
        grads[l] = (np.matmul(g.T, inputs[l]), g.sum(axis=0) if lay.bias else None)
        if l > 0 or need_dx:
            g = np.matmul(g, W)
    return total, grads, (g if need_dx else None)


# Partial gradients kept at once (one per group, see _groups) take at most this much memory.
_GROUP_ACC_BYTES = 64 << 20


def _lanes(batch: int, rows: int, work: int) -> int:
    """How many threads a batch runs on (1 for a small one)."""
    n_chunks = -(-batch // rows)
    if n_chunks < 2 or work < 8 * _SMALL_WORK:
        return 1
    return min(_threads.lanes_available(), n_chunks)


def _groups(batch: int, rows: int, lanes: int, acc_bytes: int) -> int:
    """How many groups of whole chunks a gradient call is cut into.

    Each group accumulates its own partial gradients, and the groups are added in
    order at the end, so the result depends on the group count only (a function of the
    batch and of the lane count), never on which thread ran which group. Threads take
    the next group when they finish one, so a thread slowed by a busy core takes fewer:
    four groups per lane, as far as the partials' memory allows."""
    n_chunks = -(-batch // rows)
    if lanes <= 1:
        return 1
    by_memory = max(lanes, _GROUP_ACC_BYTES // max(acc_bytes, 1))
    return max(1, min(n_chunks, 4 * lanes, by_memory))


def _ranges(batch: int, rows: int, groups: int) -> list[tuple[int, int]]:
    """Contiguous row ranges, whole chunks each, one per group."""
    n_chunks = -(-batch // rows)
    bounds = [min(batch, (n_chunks * i // groups) * rows) for i in range(groups + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(groups)]


class NumpyBackend(Backend):
    name = "numpy"
    device = "cpu"
    xp = np
    loss_kinds = ("sum_squares", "mse", "dot")  # "dot": one forward, no full-batch pass first

    # -- arrays ---------------------------------------------------------------
    def owns(self, array) -> bool:
        return isinstance(array, np.ndarray)

    def asarray_from_host(self, array):
        return np.array(array, copy=True)

    def to_host(self, array):
        return np.asarray(array)

    # -- optimizers (numpy_optim: in-place NumPy) ------------------------------
    def optimizer_state(self, kind, shapes, dtype, buffers) -> OptimizerState:
        return numpy_optim.make_state(kind, shapes, dtype, buffers)

    def optimizer_step(self, state, hyper, params, grads) -> None:
        numpy_optim.step(state, hyper, params, grads)

    def optimizer_get_step(self, state) -> int:
        return state.impl.step

    def optimizer_set_step(self, state, n) -> None:
        state.impl.step = int(n)

    # -- one layer ------------------------------------------------------------
    def dense_forward(self, x, W, b, activation, *, precision="strict"):
        return self.dense_forward_train(x, W, b, activation, precision=precision)[0]

    def dense_forward_train(self, x, W, b, activation, *, precision="strict"):
        act = get_activation(activation)
        z = x @ W.T
        if b is not None:
            z += b
        y = act.forward(z) if act.name != "identity" else z
        return y, (y if act.from_output else z)

    def dense_backward(self, g, x, saved, W, activation, *, has_bias, need_dx,
                       precision="strict"):
        act = get_activation(activation)
        dz = g * act.derivative(saved) if act.name != "identity" else g
        dW = dz.T @ x
        db = dz.sum(axis=0) if has_bias else None
        dx = dz @ W if need_dx else None
        return dx, dW, db

    # -- derivatives with respect to the inputs -----------------------------------
    def taylor_activation_forward(self, z, b, activation, *, d, second):
        return numpy_taylor.taylor_forward(z, b, activation, d, second)

    def taylor_activation_backward(self, g, z, y, b, activation, *, d, second):
        return numpy_taylor.taylor_backward(g, z, y, b, activation, d, second)

    # -- a chain of layers ------------------------------------------------------
    @staticmethod
    def _weights(layers, params):
        """Per layer, the matrix its product uses: ``[W | b]`` (N, K+1) or ``W``."""
        mats = []
        for lay, (W, b) in zip(layers, params):
            if lay.aug:
                m = np.empty((lay.N, lay.K + 1), W.dtype)
                m[:, :lay.K] = W
                m[:, lay.K] = b
                mats.append(m)
            else:
                mats.append(W)
        return mats

    @staticmethod
    def _forward_chunk(ws, views, mats, params, xc, y_out=None, restore=None):
        """Forward one chunk (``xc``: its rows of x); return the output (n, N_last).
        ``restore``: ``{layer: (out, pre)}`` copied in instead of computing those layers."""
        layers = ws.layers
        for l, lay in enumerate(layers):
            inp, out, pre, _, _ = views[l]
            if lay.last and y_out is not None:
                out = y_out
            if restore is not None and l in restore:
                if lay.first and inp is not None:  # the backward reads the layer's input
                    np.copyto(inp[:lay.K], xc.T)
                kept_out, kept_pre = restore[l]
                np.copyto(out, kept_out)
                if pre is not None:
                    np.copyto(pre, kept_pre)
                continue
            z = pre if lay.save_z else out
            if inp is None:  # the first layer reads x in place
                a = xc if _blasable(xc) else np.ascontiguousarray(xc)
                if lay.last:
                    np.matmul(a, mats[l].T, out=z)
                    if lay.bias:
                        z += params[l][1]
                else:
                    np.matmul(mats[l], a.T, out=z)
                    if lay.bias:
                        z += params[l][1][:, None]
            else:
                if lay.first:
                    np.copyto(inp[:lay.K], xc.T)
                if lay.last:
                    np.matmul(inp.T, mats[l].T, out=z)
                else:
                    np.matmul(mats[l], inp, out=z)
            _activate_inplace(lay.act, z, out)
        return out

    def network_forward(self, net: NetSpec, params: Params, x):
        batch = x.shape[0]
        shape = _shape_of(net)
        work = batch * shape.macs_per_row
        if work < _SMALL_WORK:  # batch 0 included
            return _direct_forward(shape.layers, params, x)[0]
        y = _aligned_empty((batch, net.out_features), net.dtype)
        rows = min(shape.chunk_rows, batch)
        lanes = _lanes(batch, rows, work)
        mats = self._weights(shape.layers, params)
        # every chunk is a group: outputs are independent, any order gives the same bits
        ranges = _ranges(batch, rows, -(-batch // rows) if lanes > 1 else 1)

        def group(i):
            ws = shape.checkout(rows, False)
            try:
                lo, hi = ranges[i]
                for s in range(lo, hi, rows):
                    n = min(rows, hi - s)
                    self._forward_chunk(ws, ws.views(n), mats, params, x[s:s + n], y[s:s + n])
            finally:
                shape.checkin(ws, False)

        with _threads.blas_single_thread():
            _threads.run_groups(group, len(ranges), lanes)
        return y

    def network_value_and_grad(self, net: NetSpec, params: Params, x, loss: LossSpec, *,
                               need_dx=False, out=None):
        res = self._value_and_grad(net, params, x, loss, need_dx)
        return res if out is None else write_into(out, res)

    def network_forward_saved(self, net: NetSpec, params: Params, x):
        """``(y, saved)``: the output, and what :meth:`network_backward_saved` needs so that
        the backward does not run the whole forward again (an autograd framework's forward).

        Per chunk of rows it keeps the outputs (and pre-activations) of the layers that are
        expensive to recompute -- a fan-in of at least ``_KEEP_MIN_FAN_IN`` -- and nothing of
        the others: a narrow layer costs a few multiply-adds per element to recompute, less
        than storing and reloading it (the seed network keeps its 20-wide layer and
        recomputes its 1000-wide fan-in-1 layer). ``saved`` is None (the backward recomputes
        everything) for a small batch, or beyond ``_SAVE_MAX_BYTES``."""
        batch = x.shape[0]
        shape = _shape_of(net)
        work = batch * shape.macs_per_row
        layers = shape.layers
        keep = [lay.K + lay.aug >= _KEEP_MIN_FAN_IN for lay in layers]
        per_row = net.dtype.itemsize * sum(lay.N * (1 + lay.save_z)
                                           for lay, k in zip(layers, keep) if k)
        if work < _SMALL_WORK or batch * per_row > _SAVE_MAX_BYTES:
            return self.network_forward(net, params, x), None
        y = _aligned_empty((batch, net.out_features), net.dtype)
        rows = min(shape.chunk_rows, batch)
        lanes = _lanes(batch, rows, work)
        mats = self._weights(layers, params)
        ranges = _ranges(batch, rows, -(-batch // rows) if lanes > 1 else 1)

        def group(i):
            kept = []
            ws = shape.checkout(rows, True)
            try:
                lo, hi = ranges[i]
                for s in range(lo, hi, rows):
                    n = min(rows, hi - s)
                    views = ws.views(n)
                    y[s:s + n] = self._forward_chunk(ws, views, mats, params, x[s:s + n])
                    kept.append((s, n, {l: (views[l][1].copy(), None if views[l][2] is None
                                            else views[l][2].copy())
                                        for l in range(len(layers)) if keep[l]}))
            finally:
                shape.checkin(ws, True)
            return kept

        with _threads.blas_single_thread():
            chunks = [c for part in _threads.run_groups(group, len(ranges), lanes) for c in part]
        return y, (net, x, chunks, rows)

    def network_backward_saved(self, net: NetSpec, params: Params, saved, g, *, need_dx=False):
        """``(grads, dx)`` of ``L = sum(y * g)`` from :meth:`network_forward_saved`'s state:
        per chunk the kept layers are restored and only the others recomputed (``saved``
        must come from the same parameters)."""
        net_s, x, chunks, rows = saved
        if net_s is not net:
            raise ValueError("the saved forward state belongs to another network")
        batch = x.shape[0]
        shape = _shape_of(net)
        layers = shape.layers
        dt = net.dtype
        dx = np.empty(x.shape, dt) if need_dx else None
        reassociate = (len(net.layers) > 1 and not need_dx
                       and net.layers[0].activation == "identity"
                       and net.layers[1].out_features < net.layers[0].out_features)
        mats = self._weights(layers, params)
        lanes = _lanes(batch, rows, batch * shape.macs_per_row)
        ranges = _ranges(len(chunks), 1, _groups(batch, rows, lanes, shape.acc_bytes))

        def group(i):
            ws = shape.checkout(rows, True)
            st = _Partial(layers, reassociate)
            try:
                lo, hi = ranges[i]
                for s, n, kept in chunks[lo:hi]:
                    views = ws.views(n)
                    self._forward_chunk(ws, views, mats, params, x[s:s + n], restore=kept)
                    gbuf = views[-1][3]
                    np.copyto(gbuf, g[s:s + n])
                    self._backward_chunk(ws, views, st, params, x[s:s + n], gbuf, reassociate,
                                         None if dx is None else dx[s:s + n])
            finally:
                shape.checkin(ws, True)
            return st

        st = _merged_groups(group, len(ranges), lanes)
        return _gradients(st, layers, params, dt, reassociate), dx

    def _value_and_grad(self, net: NetSpec, params: Params, x, loss: LossSpec, need_dx):
        batch = x.shape[0]
        dt = net.dtype
        shape = _shape_of(net)
        work = batch * shape.macs_per_row

        user_g = None
        if loss.kind == "callable":
            # the forward keeps what the backward needs (network_forward_saved): after the
            # loss has given dL/dy, the backward does not run the whole forward again
            y_full, saved = self.network_forward_saved(net, params, x)
            value, user_g = call_loss(loss.fn, y_full, np.ndarray)
            value = np.asarray(value, dtype=dt)
            if saved is not None:
                grads, dx = self.network_backward_saved(net, params, saved, user_g, need_dx=need_dx)
                return value, grads, dx
            two_scale = None
        else:
            scale = loss_scale(loss.kind, batch * net.out_features)
            two_scale = dt.type(2.0 * scale)
        target = loss.target
        dot = loss.kind == "dot"
        if work < _SMALL_WORK:  # batch 0 included
            total, grads, dx_small = _direct_value_and_grad(shape.layers, params, x, target, dot,
                                                            two_scale, user_g, need_dx)
            if user_g is None:
                value = np.asarray(total * scale, dtype=dt)
            return value, grads, dx_small

        rows = min(shape.chunk_rows, batch)
        dx = np.empty(x.shape, dt) if need_dx else None
        # Reassociated first-layer gradient (see the module docstring).
        reassociate = (
            len(net.layers) > 1
            and not need_dx
            and net.layers[0].activation == "identity"
            and net.layers[1].out_features < net.layers[0].out_features
        )
        layers = shape.layers
        mats = self._weights(layers, params)
        forward_chunk = self._forward_chunk
        lanes = _lanes(batch, rows, work)
        ranges = _ranges(batch, rows, _groups(batch, rows, lanes, shape.acc_bytes))

        def group(i):
            ws = shape.checkout(rows, True)
            st = _Partial(layers, reassociate)
            try:
                lo, hi = ranges[i]
                for s in range(lo, hi, rows):
                    n = min(rows, hi - s)
                    views = ws.views(n)
                    xc = x[s:s + n]
                    y = forward_chunk(ws, views, mats, params, xc)
                    g = views[-1][3]
                    if dot:  # L = sum(y * t): dL/dy = t, known before the forward
                        np.copyto(g, target[s:s + n])
                        st.total += float(np.vdot(y, g))
                    elif user_g is None:
                        if target is not None:
                            np.subtract(y, target[s:s + n], out=g)
                            st.total += float(np.vdot(g, g))
                            g *= two_scale
                        else:
                            st.total += float(np.vdot(y, y))
                            np.multiply(y, two_scale, out=g)
                    else:
                        np.copyto(g, user_g[s:s + n])
                    self._backward_chunk(ws, views, st, params, xc, g, reassociate,
                                         None if dx is None else dx[s:s + n])
            finally:
                shape.checkin(ws, True)
            return st

        st = _merged_groups(group, len(ranges), lanes)
        grads = _gradients(st, layers, params, dt, reassociate)
        if user_g is None:
            value = np.asarray(st.total * scale, dtype=dt)
        return value, grads, dx

    @staticmethod
    def _backward_chunk(ws, views, st, params, xc, g, reassociate, dx_rows):
        """Backward of one chunk from ``g = dL/dy`` (the last layer's gradient buffer)."""
        layers = ws.layers
        for l in range(len(layers) - 1, -1, -1):
            lay = layers[l]
            inp, out, pre, _, scratch = views[l]
            _scale_by_derivative(lay.act, g, pre if lay.save_z else out, scratch)
            D = g.T if lay.last else g  # dz, (N, n)
            if not (l == 0 and reassociate):
                H = xc if inp is None else inp.T  # the layer's input, (n, K [+1])
                if inp is None and not _blasable(xc):
                    H = np.ascontiguousarray(xc)
                st.w[l].add(D, H)
                if st.b[l] is not None:
                    st.b[l].add(D, ws.ones[:D.shape[1], None])
            if l == 1 and reassociate:
                inp0 = views[0][0]
                H0 = xc if inp0 is None else inp0.T
                if inp0 is None and not _blasable(xc):
                    H0 = np.ascontiguousarray(xc)
                st.p.add(D, H0)
                if st.q is not None:
                    st.q.add(D, ws.ones[:D.shape[1], None])
                return
            W = params[l][0]
            if l > 0:
                g_prev = views[l - 1][3]  # (K, n), feature-major
                np.matmul(W.T, D, out=g_prev)
                g = g_prev
            elif dx_rows is not None:
                np.matmul(D.T, W, out=dx_rows)
