"""What every backend implements, and the plain data passed to it.

The functional layer (``cupynn/functional.py``) validates shapes, dtypes and
devices once, then calls exactly one backend. A backend receives only
well-formed inputs: ``x`` of the network's dtype, shape ``(batch, in)``
(batch may be 0), on the backend's device; parameters as ``(W, b)`` pairs
with ``W`` C-contiguous ``(out, in)`` and ``b`` C-contiguous ``(out,)`` or
``None``. ``x`` may be non-contiguous (a transposed or sliced view).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

Params = Sequence[tuple[Any, Any]]  # [(W, b or None), ...], one pair per layer


@dataclass(frozen=True)
class LayerSpec:
    """Shape and activation of one dense layer: ``y = act(x @ W.T + b)``."""

    in_features: int
    out_features: int
    activation: str
    bias: bool = True


@dataclass(frozen=True)
class NetSpec:
    """A chain of dense layers with one dtype and one float32 precision mode."""

    layers: tuple[LayerSpec, ...]
    dtype: np.dtype
    precision: str = "strict"  # "strict" | "tf32" | "3xtf32" (float32 only)

    @property
    def in_features(self) -> int:
        return self.layers[0].in_features

    @property
    def out_features(self) -> int:
        return self.layers[-1].out_features


@dataclass(frozen=True)
class LossSpec:
    """The scalar function of the network's output.

    ``kind`` is ``"sum_squares"`` (``sum((y - t)**2)``), ``"mse"``
    (``sum((y - t)**2) / y.size``, and 0 for an empty batch),
    ``"callable"`` (``fn(y) -> (value, dL/dy)`` on the backend's arrays) or
    ``"dot"`` (``sum(y * t)``, so ``dL/dy = t``: a vector-Jacobian product,
    sent only to backends that list it in :attr:`Backend.loss_kinds`).
    ``target`` is ``None`` (meaning 0) or an array shaped like ``y``.
    """

    kind: str
    target: Any = None
    fn: Callable[[Any], tuple[Any, Any]] | None = None


SECOND_ORDER = ("none", "laplacian", "diagonal")  # the second-order blocks of a Taylor stack


def taylor_blocks(d: int, second: str) -> int:
    """Blocks of a forward-Laplacian stack ``[h; J_1 .. J_d; second-order blocks]``:
    ``1 + d`` (``second="none"``), ``2 + d`` (``"laplacian"``), ``1 + 2 d`` (``"diagonal"``)."""
    return 1 + d + {"none": 0, "laplacian": 1, "diagonal": d}[second]
OPTIMIZER_KINDS = ("sgd", "adam", "adamw")


@dataclass
class OptimizerState:
    """An optimizer's state on one backend (made by :meth:`Backend.optimizer_state`).

    ``buffers`` maps a state name (``"momentum_buffer"``, ``"exp_avg"``, ``"exp_avg_sq"``)
    to one array per parameter, shaped like it, of its dtype and on its device (they may
    be views into the backend's own storage: write them in place only). The step count
    and anything else the backend needs are in ``impl`` (backend-private).

    ``hyper`` (passed to the backend's optimizer methods) is a tuple of floats:
    ``(lr, beta1, beta2, eps, weight_decay, nesterov)`` for Adam / AdamW, and
    ``(lr, momentum, dampening, 0, weight_decay, nesterov)`` for SGD.
    """

    kind: str
    dtype: np.dtype
    shapes: tuple[tuple[int, ...], ...]
    buffers: dict[str, list]
    impl: Any = None
    device: str | None = None  # the parameters' device (set by cupynn.functional)


class Backend(ABC):
    """One array library and the kernels behind it."""

    name: str  # "numpy" | "cuda"
    device: str  # "cpu" | "cuda"
    xp: Any  # the array module: numpy or cupy
    # LossSpec kinds network_value_and_grad takes besides "callable"; functional turns a
    # "dot" loss into a callable for a backend that does not list it.
    loss_kinds: tuple[str, ...] = ("sum_squares", "mse")

    # -- one layer at a time (the functional API) ------------------------
    @abstractmethod
    def dense_forward(self, x, W, b, activation: str, *, precision: str = "strict"):
        """``act(x @ W.T + b)`` as a new array of shape ``(batch, out)``."""

    @abstractmethod
    def dense_forward_train(self, x, W, b, activation: str, *, precision: str = "strict"):
        """Like :meth:`dense_forward`, and also return what backward needs.

        Returns ``(y, saved)``; ``saved`` is opaque to callers and is passed
        back to :meth:`dense_backward` with the same ``x``.
        """

    @abstractmethod
    def dense_backward(self, g, x, saved, W, activation: str, *, has_bias: bool,
                       need_dx: bool, precision: str = "strict"):
        """Given ``g = dL/dy``, return ``(dx or None, dW, db or None)``."""

    # -- derivatives with respect to the inputs (cupynn.derivatives) --------
    @abstractmethod
    def taylor_activation_forward(self, z, b, activation: str, *, d: int, second: str):
        """The elementwise step of the forward Laplacian: the layer's output stack.

        ``z`` is the GEMM output ``S @ W.T`` of a stack ``(nb, B, N)`` with
        ``nb = taylor_blocks(d, second)``, C-contiguous; ``b`` ``(N,)`` or None.
        Returns a new ``(nb, B, N)`` array (formulas: ``cupynn/backends/numpy_taylor.py``).
        """

    @abstractmethod
    def taylor_activation_backward(self, g, z, y, b, activation: str, *, d: int, second: str):
        """The reverse of :meth:`taylor_activation_forward`: ``dloss/dz`` from
        ``g = dloss/dout`` (``(nb, B, N)``), the forward's ``z`` and ``y = out[0]`` (``(B, N)``)."""

    # -- a whole chain of layers (may fuse across layers) ------------------
    @abstractmethod
    def network_forward(self, net: NetSpec, params: Params, x):
        """The chain's output for a batch ``x``."""

    @abstractmethod
    def network_value_and_grad(self, net: NetSpec, params: Params, x, loss: LossSpec, *,
                               need_dx: bool = False, out=None):
        """Return ``(value, grads, dx)``.

        ``value`` is a 0-d array of the network's dtype on the backend's
        device; ``grads`` is a list of ``(dW, db or None)`` pairs, new arrays
        shaped like the parameters; ``dx`` is ``dL/dx`` or ``None``.  With ``out``
        (the same structure, arrays of the right shapes and dtype) the results are
        written there and ``out`` is returned.
        """

    def execution_path(self, net: NetSpec, batch: int, *, mode: str = "grad",
                       need_dx: bool = False, loss: LossSpec | None = None) -> str:
        """Which implementation a call of this kind runs (the backend's name here)."""
        return self.name

    # -- optimizers (cupynn/optim.py through cupynn/functional.py) --------------
    def optimizer_state(self, kind: str, shapes, dtype, buffers: tuple[str, ...]) -> OptimizerState:
        """Zeroed state, step count 0, for parameters of these shapes and dtype."""
        raise NotImplementedError(f"the {self.name} backend has no optimizers")

    def optimizer_step(self, state: OptimizerState, hyper: tuple, params, grads) -> None:
        """One update of every parameter in place (``params``/``grads``: checked lists)."""
        raise NotImplementedError(f"the {self.name} backend has no optimizers")

    def optimizer_sync(self, state: OptimizerState, hyper: tuple) -> None:
        """Make the hyperparameters the next update reads current (a no-op on the host)."""
        return None

    def optimizer_get_step(self, state: OptimizerState) -> int:
        raise NotImplementedError(f"the {self.name} backend has no optimizers")

    def optimizer_set_step(self, state: OptimizerState, n: int) -> None:
        raise NotImplementedError(f"the {self.name} backend has no optimizers")

    # -- Jacobians and Gauss-Newton matrices (cupynn/jacobian.py) ---------------
    # Written with the array module's operations, so every backend has them; a backend may
    # override them with kernels of its own.
    def jacobian_rows(self, dz, h, out, col: int, has_bias: bool) -> None:
        """Write one layer's per-sample Jacobian columns ``[dz ⊗ h | dz]`` into ``out``.

        ``dz`` ``(nb, B, m, n)``: for each sample ``b`` and output ``o`` the derivative of
        that row's value w.r.t. the layer's pre-activation blocks; ``h`` ``(nb, B, k)``: the
        layer's input blocks (``nb = 1`` for a plain Jacobian; the forward-Laplacian
        stack's blocks for a PDE residual); ``out`` ``(B * m, P)`` C-contiguous, whose
        columns ``col .. col + n k (+ n)`` are written:
        ``out[b*m + o, col + i*k + j] = sum_s dz[s, b, o, i] h[s, b, j]`` (``s`` in order) and,
        with ``has_bias``, ``out[b*m + o, col + n*k + i] = dz[0, b, o, i]``.
        """
        xp = self.xp
        nb, B, m, n = dz.shape
        k = h.shape[2]
        if B == 0:
            return
        view = out[:, col:col + n * k].reshape(B, m, n, k)
        if nb == 1:
            xp.multiply(dz[0, :, :, :, None], h[0, :, None, None, :], out=view)
        else:  # a sum of nb outer products per row: a batched product (B, m, n, nb) @ (B, 1, nb, k)
            xp.matmul(xp.moveaxis(dz, 0, -1), h.transpose(1, 0, 2)[:, None, :, :], out=view)
        if has_bias:
            out[:, col + n * k:col + n * k + n] = dz[0].reshape(B * m, n)

    def gram_update(self, G, J) -> None:
        """``G += J^T J`` for a chunk of Jacobian rows ``J`` ``(R, P)``; ``G`` ``(P, P)``."""
        if J.shape[0]:
            G += J.T @ J

    # -- arrays -------------------------------------------------------------
    @abstractmethod
    def owns(self, array) -> bool:
        """True if ``array`` is an array of this backend's kind and device."""

    @abstractmethod
    def asarray_from_host(self, array: np.ndarray):
        """Copy a NumPy array onto this backend's device."""

    @abstractmethod
    def to_host(self, array) -> np.ndarray:
        """Copy an array of this backend to a NumPy array."""


def write_into(out, res):
    """Write a ``(value, grads, dx)`` result into the arrays of ``out`` (the same structure)
    and return ``out`` (``dx`` None when the result has none)."""
    value, grads, dx = res
    ov, og, odx = out
    ov[...] = value
    for (dW, db), (oW, ob) in zip(grads, og):
        oW[...] = dW
        if db is not None:
            ob[...] = db
    if dx is not None:
        odx[...] = dx
    return ov, list(og), (odx if dx is not None else None)
