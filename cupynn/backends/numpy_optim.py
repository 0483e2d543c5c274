"""The optimizers' update on the NumPy backend: in-place NumPy, no temporaries.

The same formulas as ``kernels/optim.cu``, in the same order of operations (so the two
backends agree to rounding; on the emulator, where g++ contracts no multiply-add, they
agree bit for bit). Two scratch arrays of the largest parameter's size, made with the
state, hold the intermediate terms.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .base import OptimizerState

__all__ = ["make_state", "step"]


@dataclass
class _Impl:
    step: int
    scratch: tuple[np.ndarray, np.ndarray]


def make_state(kind: str, shapes, dtype, buffers) -> OptimizerState:
    dtype = np.dtype(dtype)
    biggest = max((int(np.prod(s, dtype=np.int64)) for s in shapes), default=0)
    views = {name: [np.zeros(s, dtype=dtype) for s in shapes] for name in buffers}
    impl = _Impl(0, (np.empty(biggest, dtype), np.empty(biggest, dtype)))
    return OptimizerState(kind, dtype, tuple(tuple(s) for s in shapes), views, impl)


def _scratch(impl: _Impl, shape):
    n = int(np.prod(shape, dtype=np.int64))
    a, b = impl.scratch
    return a[:n].reshape(shape), b[:n].reshape(shape)


def step(state: OptimizerState, hyper: tuple, params, grads) -> None:
    impl: _Impl = state.impl
    t = impl.step + 1
    if state.kind == "sgd":
        _sgd(state, impl, hyper, params, grads, t)
    else:
        _adam(state, impl, hyper, params, grads, t, decoupled=state.kind == "adamw")
    impl.step = t


def _sgd(state, impl, hyper, params, grads, t):
    lr, mu, dampening, _eps, wd, nesterov = hyper[:6]
    bufs = state.buffers.get("momentum_buffer")
    for i, (p, g) in enumerate(zip(params, grads)):
        A, B = _scratch(impl, p.shape)
        gi = g
        if wd != 0:
            np.multiply(p, wd, out=A)
            A += g                                   # g + wd p
            gi = A
        d = gi
        if mu != 0:
            buf = bufs[i]
            if t == 1:
                buf[...] = gi
            else:
                buf *= mu
                np.multiply(gi, 1.0 - dampening, out=B)
                buf += B                             # mu b + (1 - dampening) g
            if nesterov:
                np.multiply(buf, mu, out=B)
                B += gi                              # g + mu b
                d = B
            else:
                d = buf
        np.multiply(d, lr, out=B)
        p -= B                                       # p - lr d


def _adam(state, impl, hyper, params, grads, t, *, decoupled):
    lr, b1, b2, eps, wd = hyper[:5]
    step_size = lr / (1.0 - b1 ** t)
    bc2_sqrt = math.sqrt(1.0 - b2 ** t)
    ms, vs = state.buffers["exp_avg"], state.buffers["exp_avg_sq"]
    for p, g, m, v in zip(params, grads, ms, vs):
        A, B = _scratch(impl, p.shape)
        gi = g
        if wd != 0:
            if decoupled:
                p *= 1.0 - lr * wd                   # AdamW: p (1 - lr wd)
            else:
                np.multiply(p, wd, out=A)
                A += g                               # Adam: g + wd p
                gi = A
        m *= b1
        np.multiply(gi, 1.0 - b1, out=B)
        m += B                                       # b1 m + (1 - b1) g
        v *= b2
        np.multiply(gi, gi, out=B)
        B *= 1.0 - b2
        v += B                                       # b2 v + (1 - b2) g^2
        np.sqrt(v, out=A)
        A /= bc2_sqrt
        A += eps                                     # sqrt(v) / sqrt(1 - b2^t) + eps
        np.multiply(m, step_size, out=B)
        B /= A
        p -= B                                       # p - (lr / (1 - b1^t)) m / denom
