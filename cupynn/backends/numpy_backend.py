"""The NumPy backend: the reference implementation, and a fast CPU path.

Speed comes from the memory hierarchy, not from tricks in the arithmetic:

* the batch is processed in chunks of rows small enough that every layer's
  activations for one chunk stay in cache, so a 1000-wide hidden layer is
  never written to and read back from main memory;
* bias, activation and the activation derivative are applied in place in
  preallocated per-chunk workspaces (no temporaries in the hot loop);
* the loss and the whole backward pass run on a chunk right after its
  forward, while its activations are still in cache; weight gradients
  accumulate over chunks in a fixed order (deterministic);
* the first layer's weight gradient, when its activation is the identity and
  the input gradient is not asked for, is reassociated:
  ``dW0 = (dz1 @ W1).T @ x = W1.T @ (dz1.T @ x)`` — the same products in a
  cheaper order, which never forms the ``(batch, width0)`` gradient.

Single-layer functions (``dense_forward`` ...) are plain and unchunked: they
are the formulas of DESIGN.md §3 written out.
"""

from __future__ import annotations

import numpy as np

from ..activations import get_activation
from ..losses import call_loss, loss_scale
from . import numpy_optim, numpy_taylor
from .base import Backend, LossSpec, NetSpec, OptimizerState, Params, write_into

# Rows per chunk are chosen so that one chunk of the widest layer takes about
# this many bytes: large enough for BLAS efficiency, small enough for L2/L3.
_CHUNK_BYTES = 1 << 21
_MIN_CHUNK_ROWS = 512
_MAX_CHUNK_ROWS = 16384
# Layers with at most this fan-in fold their bias into the GEMM (see _Workspace).
_AUGMENT_MAX_FAN_IN = 16


def _chunk_rows(net: NetSpec) -> int:
    widest = max(max(s.in_features, s.out_features) for s in net.layers)
    rows = _CHUNK_BYTES // (widest * net.dtype.itemsize)
    return int(min(_MAX_CHUNK_ROWS, max(_MIN_CHUNK_ROWS, rows)))


def _activate_inplace(act, z, out):
    """Write ``act(z)`` into ``out`` (which may be ``z`` itself)."""
    if act.name == "identity":
        if out is not z:
            out[...] = z
    elif act.name == "tanh":
        np.tanh(z, out=out)
    elif act.name == "relu":
        np.maximum(z, z.dtype.type(0), out=out)  # propagates NaN, like the reference
    else:
        out[...] = act.forward(z)


def _scale_by_derivative(act, g, saved):
    """``g *= act'(saved)`` in place (``saved`` is y or z as the activation needs)."""
    if act.name == "relu":
        np.multiply(g, saved > 0, out=g)  # relu' from y: 1 where y > 0, else 0 (NaN y -> 0)
    elif act.name != "identity":
        g *= act.derivative(saved)


class _Workspace:
    """Per-chunk buffers for one call, reused across chunks.

    A layer with a small fan-in and a bias runs as one GEMM against the
    augmented weight ``[W | b]`` with a constant-1 input column, instead of
    a thin GEMM followed by a full pass adding the bias.
    """

    def __init__(self, net: NetSpec, params: Params, rows: int, *, train: bool):
        dt = net.dtype
        self.out = [np.empty((rows, s.out_features), dt) for s in net.layers]
        # pre-activations, kept only where backward differentiates from z
        self.pre = [
            np.empty((rows, s.out_features), dt)
            if train and not get_activation(s.activation).from_output
            else None
            for s in net.layers
        ]
        self.grad = [np.empty((rows, s.out_features), dt) for s in net.layers] if train else None
        self.aug_w, self.aug_in = [], []
        for spec, (W, b) in zip(net.layers, params):
            if b is not None and spec.in_features <= _AUGMENT_MAX_FAN_IN:
                self.aug_w.append(np.ascontiguousarray(np.concatenate([W, b[:, None]], axis=1).T))
                aug = np.empty((rows, spec.in_features + 1), dt)
                aug[:, -1] = 1
                self.aug_in.append(aug)
            else:
                self.aug_w.append(None)
                self.aug_in.append(None)


class _WeightGrad:
    """Accumulates ``dW += dz.T @ h`` over chunks in the faster GEMM orientation.

    BLAS is slow when the output's leading dimension is tiny (``out`` = 20
    rows of 1000): for ``out < in`` it accumulates ``dW.T = h.T @ dz`` into an
    ``(in, out)`` buffer and transposes once at the end.
    """

    def __init__(self, dW):
        self.dW = dW
        self.transposed = dW.shape[0] < dW.shape[1]
        self.acc = np.zeros(dW.shape[::-1], dW.dtype) if self.transposed else dW
        self.tmp = np.empty_like(self.acc)

    def add(self, dz, h):
        if self.transposed:
            np.matmul(h.T, dz, out=self.tmp)
        else:
            np.matmul(dz.T, h, out=self.tmp)
        self.acc += self.tmp

    def finish(self):
        if self.transposed:
            self.dW[...] = self.acc.T


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
    def _forward_chunk(self, net, params, xc, ws, n, *, train):
        """Forward one chunk of ``n`` rows; return the output view ``ws.out[-1][:n]``."""
        h = xc
        for li, (spec, (W, b)) in enumerate(zip(net.layers, params)):
            act = get_activation(spec.activation)
            out, pre = ws.out[li][:n], ws.pre[li]
            z = pre[:n] if (train and pre is not None) else out
            if ws.aug_w[li] is not None:
                aug = ws.aug_in[li][:n]
                aug[:, :-1] = h
                np.matmul(aug, ws.aug_w[li], out=z)
            else:
                np.matmul(h, W.T, out=z)
                if b is not None:
                    z += b
            _activate_inplace(act, z, out)
            h = out
        return h

    def network_forward(self, net: NetSpec, params: Params, x):
        batch = x.shape[0]
        y = np.empty((batch, net.out_features), net.dtype)
        rows = min(_chunk_rows(net), max(batch, 1))
        ws = _Workspace(net, params, rows, train=False)
        for s in range(0, batch, rows):
            n = min(rows, batch - s)
            y[s:s + n] = self._forward_chunk(net, params, x[s:s + n], ws, n, train=False)
        return y

    def network_value_and_grad(self, net: NetSpec, params: Params, x, loss: LossSpec, *,
                               need_dx=False, out=None):
        res = self._value_and_grad(net, params, x, loss, need_dx)
        return res if out is None else write_into(out, res)

    def _value_and_grad(self, net: NetSpec, params: Params, x, loss: LossSpec, need_dx):
        batch = x.shape[0]
        dt = net.dtype
        grads = [
            (np.zeros_like(W), None if b is None else np.zeros_like(b)) for W, b in params
        ]
        dx = np.empty(x.shape, dt) if need_dx else None
        rows = min(_chunk_rows(net), max(batch, 1))
        ws = _Workspace(net, params, rows, train=True)

        user_g = None
        if loss.kind == "callable":
            y_full = self.network_forward(net, params, x)
            value, user_g = call_loss(loss.fn, y_full, np.ndarray)
            value = np.asarray(value, dtype=dt)
        else:
            two_scale = dt.type(2.0 * loss_scale(loss.kind, batch * net.out_features))
            total = 0.0

        # Reassociated first-layer gradient (see the module docstring).
        reassociate = (
            len(net.layers) > 1
            and not need_dx
            and net.layers[0].activation == "identity"
            and net.layers[1].out_features < net.layers[0].out_features
        )
        if reassociate:
            p_acc = np.zeros((net.layers[1].out_features, net.in_features), dt)
            p_tmp = np.empty_like(p_acc)
            q_acc = np.zeros(net.layers[1].out_features, dt)

        weight_grads = [_WeightGrad(dW) for dW, _ in grads]
        for s in range(0, batch, rows):
            n = min(rows, batch - s)
            xc = x[s:s + n]
            y = self._forward_chunk(net, params, xc, ws, n, train=True)
            g = ws.grad[-1][:n]
            if loss.kind == "dot":  # L = sum(y * t): dL/dy = t, known before the forward
                g[...] = loss.target[s:s + n]
                total += float(np.vdot(y, g))
            elif user_g is None:
                if loss.target is not None:
                    np.subtract(y, loss.target[s:s + n], out=g)
                else:
                    g[...] = y
                flat = g.reshape(-1)
                total += float(np.dot(flat, flat))
                g *= two_scale
            else:
                g[...] = user_g[s:s + n]

            for li in range(len(net.layers) - 1, -1, -1):
                spec = net.layers[li]
                act = get_activation(spec.activation)
                W, _ = params[li]
                dW, db = grads[li]
                saved = ws.pre[li][:n] if ws.pre[li] is not None else ws.out[li][:n]
                _scale_by_derivative(act, g, saved)  # g is now dz of layer li
                h_in = xc if li == 0 else ws.out[li - 1][:n]
                if li == 0 and reassociate:
                    pass  # dW0/db0 come from layer 1's dz below
                else:
                    weight_grads[li].add(g, h_in)
                    if db is not None:
                        db += g.sum(axis=0)
                if li == 1 and reassociate:
                    np.matmul(g.T, xc, out=p_tmp)
                    p_acc += p_tmp
                    if grads[0][1] is not None:
                        q_acc += g.sum(axis=0)
                    break
                if li > 0:
                    g_prev = ws.grad[li - 1][:n]
                    np.matmul(g, W, out=g_prev)
                    g = g_prev
                elif need_dx:
                    np.matmul(g, W, out=dx[s:s + n])

        for wg in weight_grads:
            wg.finish()
        if reassociate:
            W1 = params[1][0]
            dW0, db0 = grads[0]
            np.matmul(W1.T, p_acc, out=dW0)
            if db0 is not None:
                np.matmul(W1.T, q_acc, out=db0)

        if user_g is None:
            value = np.asarray(total * loss_scale(loss.kind, batch * net.out_features), dtype=dt)
        return value, grads, dx
