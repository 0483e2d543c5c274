"""Derivatives of a network with respect to its inputs, and losses built on them.

For a model ``u(x)`` with ``d`` inputs, :func:`input_derivatives` returns the values,
the input gradient and the Laplacian ``Δu = Σ_i ∂²u/∂x_i²`` (or the diagonal second
partials) on a whole batch of points; :func:`residual_value_and_grad` returns a scalar
loss built from ``(u, ∇u, Δu)`` -- a PDE residual, as in physics-informed networks --
and its gradient with respect to every weight and bias.

Method: the *forward Laplacian*. Every layer carries the stack
``S = [h; J_1 .. J_d; L]`` -- its activations, their derivatives along each input and
their Laplacian -- starting from ``[x; e_1 .. e_d; 0]``. With ``z = h W^T + b`` the
three share ``W``: ``Z = S W^T`` is one GEMM over a ``(d + 2)``-times taller batch (the
bias goes on the ``h`` block only), and then, elementwise,

    h' = f(z),   J'_i = f'(z) J_{z,i},   L' = f'(z) L_z + f''(z) Σ_i J_{z,i}².

The cost is ``d + 2`` forwards, with no nested reverse mode. The parameter gradient of
a loss of ``(u, ∇u, Δu)`` is the hand-written reverse of exactly this computation (it
needs f''' as well; :mod:`cupynn.activations`). The GEMMs are cupynn's dense ops
(:func:`cupynn.functional.dense_forward` / ``dense_backward``), the elementwise step
:func:`cupynn.functional.taylor_activation_forward` / ``_backward`` (one CUDA kernel per
layer and direction, ``kernels/derivatives.cu``). Batches are processed in chunks of
rows (cache-sized on the CPU), so memory stays bounded for any batch. On the CPU the
chunks run with BLAS at one thread (``cupynn/_threads.py``, through ``threadpoolctl``): a
threaded BLAS on cache-sized products spins its threads against each other and is 3-10x
slower as soon as another process holds a core. While a call runs, this limit applies
to the whole process.

relu and leaky_relu networks are piecewise linear: their Laplacian is 0 wherever it
exists, so a Laplacian loss gives them no signal (see :mod:`cupynn.activations`). Asking
for second derivatives of such a network (every activation relu, leaky_relu or identity,
at least one not identity) warns; a purely linear network (identity only) has Δu = 0
exactly and does not.

Shapes, for a batch of ``B`` points and a model with ``m`` outputs: one output gives
``u (B,)``, ``du (B, d)``, ``lap (B,)``, ``d2 (B, d)``; ``m > 1`` outputs give
``u (B, m)``, ``du (B, m, d)`` (the Jacobian), ``lap (B, m)``, ``d2 (B, m, d)``.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from . import _threads
from . import functional as F
from ._arrays import intake
from ._autodiff import wants_x
from ._validate import check_array, check_loss_value, check_real
from .backends import get_backend
from .backends.base import taylor_blocks

__all__ = ["input_derivatives", "input_hessian", "residual_value_and_grad", "RESIDUALS",
           "MAX_INPUT_DIM"]

# The forward Laplacian costs (d + 2) forwards (2 d + 1 with diag=True) in time and in
# memory per chunk of rows: beyond this many inputs a reverse-mode or stochastic trace
# estimator is the better method, and cupynn does not provide one.
MAX_INPUT_DIM = 64

RESIDUALS = ("poisson", "helmholtz")

# Rows of the (nb, rows, width) stack per chunk: about this many bytes for the widest
# layer. On the CPU the chunk's stacks stay in cache; on CUDA a chunk is a big launch.
_CHUNK_BYTES = {"cpu": 1 << 18, "cuda": 1 << 28}
_MIN_CHUNK_ROWS = 64

def _cpu_threads(net):
    """A context in which BLAS runs one thread (CPU only; cupynn/_threads.py owns BLAS
    threads, through threadpoolctl)."""
    if net.device != "cpu":
        return contextlib.nullcontext()
    return _threads.blas_single_thread()


@dataclass(frozen=True)
class _Net:
    layers: tuple  # ((W, b or None, activation name), ...)
    precision: str
    xp: Any
    dtype: Any
    device: str
    d: int  # the number of tangent directions the stack carries (the inputs, by default)
    m: int
    widest: int
    label: str  # the first layer's label, for error messages
    n_in: int = 0  # the model's inputs
    dirs: Any = None  # (d, n_in) tangent directions; None: the unit vectors e_1 .. e_n_in


def _net_of(model) -> _Net:
    try:
        layers = model._dense_layers()
    except AttributeError:
        raise TypeError(f"model must be a cupynn Dense or Chain, got {type(model).__name__}") from None
    return _Net(
        tuple((l.weight, l.bias, l.activation.name) for l in layers),
        model.precision, get_backend(model.device).xp, model.dtype, model.device,
        layers[0].in_features, layers[-1].out_features,
        max(max(l.in_features, l.out_features) for l in layers),
        layers[0]._label(None if len(layers) == 1 and layers[0] is model else 0),
        layers[0].in_features,
    )


def _check_x(net: _Net, x, what="x", *, one_sample=False):
    """``x`` as the backend's array (DLPack producers are taken in place), checked; with
    ``one_sample`` a 1-D ``x`` is accepted as one point (returned as ``(1, d)``)."""
    x = intake(x, what=what, device=net.device, dtype=net.dtype)
    check_array(x, what=what, device=net.device, dtype=net.dtype, ndim=(1, 2) if one_sample else (2,))
    if x.shape[-1] != net.n_in:
        one = f" (one point: ({net.n_in},))" if one_sample else ""
        raise ValueError(f"{net.label} expects {what} of shape (batch, {net.n_in}), got "
                         f"{tuple(x.shape)}{one}")
    return x.reshape(1, -1) if x.ndim == 1 else x


def _check_tangents(n: int, what: str):
    if n > MAX_INPUT_DIM:
        raise ValueError(
            f"the forward Laplacian supports at most {MAX_INPUT_DIM} inputs (tangent directions, "
            f"cupynn.derivatives.MAX_INPUT_DIM); {what} has {n}: its cost is (d + 2) "
            "forward passes, so select fewer inputs (dims=) or use a trace estimator")


def _coords(net: _Net, dims, what: str) -> tuple:
    """``dims`` (input coordinates) checked: distinct ints in ``range(n_in)``, not empty."""
    if dims is None:
        return tuple(range(net.n_in))
    try:
        coords = tuple(int(i) for i in dims)
    except TypeError:
        raise TypeError(f"{what} must be a sequence of input coordinates (ints), got "
                        f"{type(dims).__name__}") from None
    if (not coords or len(set(coords)) != len(coords)
            or any(i < 0 or i >= net.n_in or int(i) != j for i, j in zip(coords, dims))):
        raise ValueError(f"{what} must be distinct input coordinates in 0..{net.n_in - 1}, "
                         f"not empty; got {tuple(dims)}")
    return coords


def _along(net: _Net, coords: tuple) -> _Net:
    """The stack description that carries tangents along the input coordinates ``coords``."""
    _check_tangents(len(coords), "this one" if len(coords) == net.n_in else "the selection dims=")
    if coords == tuple(range(net.n_in)):
        return net
    dirs = net.xp.zeros((len(coords), net.n_in), dtype=net.dtype)
    for k, i in enumerate(coords):
        dirs[k, i] = 1
    return replace(net, d=len(coords), dirs=dirs)


_PIECEWISE_LINEAR = ("relu", "leaky_relu")


def _warn_if_piecewise_linear(net: _Net, what: str, stacklevel: int = 3) -> None:
    """Warn when ``what`` (second derivatives) is asked of a network made of relu/leaky_relu
    and identity layers only: its second derivatives are 0 wherever they exist."""
    acts = [a for _, _, a in net.layers]
    if all(a in _PIECEWISE_LINEAR + ("identity",) for a in acts) and any(a != "identity" for a in acts):
        kinked = sorted(set(acts) - {"identity"})
        warnings.warn(
            f"{what}: this network is piecewise linear ({', '.join(kinked)} and identity layers "
            "only), so its second derivatives with respect to x are 0 wherever they exist and a "
            "loss of them gives no gradient signal; use a smooth activation (tanh, silu, gelu, "
            "softplus, sigmoid, elu), e.g. cupynn.MLP(sizes, \"tanh\")", UserWarning, stacklevel=stacklevel)


def _second_of(order, diag):
    if isinstance(order, (bool, np.bool_)) or not isinstance(order, (int, np.integer)) \
            or order not in (1, 2):
        raise ValueError(f"order must be 1 (u, du) or 2 (u, du, and lap or d2), got {order!r}")
    if not isinstance(diag, (bool, np.bool_)):
        raise TypeError(f"diag must be True or False, got {diag!r}")
    if diag and order != 2:
        raise ValueError("diag=True gives the second partials: it needs order=2")
    return "none" if order == 1 else ("diagonal" if diag else "laplacian")


def _chunk_rows(net: _Net, nb: int) -> int:
    per_row = nb * net.widest * net.dtype.itemsize
    return max(_MIN_CHUNK_ROWS, _CHUNK_BYTES[net.device] // per_row)


# -- the forward Laplacian and its reverse, on one chunk of rows -------------------------

def _seed(net: _Net, x, nb: int):
    """``[x; e_1 .. e_d; 0 ...]``: the stack of the input layer, ``(nb, B, d)``."""
    S = net.xp.zeros((nb, x.shape[0], net.n_in), dtype=net.dtype)
    S[0] = x
    if net.dirs is None:
        for i in range(net.d):
            S[1 + i, :, i] = 1
    else:
        S[1:1 + net.d] = net.dirs[:, None, :]
    return S


def _forward(net: _Net, x, second: str, save: bool):
    """The output stack ``(nb, B, m)`` and, with ``save``, what :func:`_backward` needs."""
    nb = taylor_blocks(net.d, second)
    S = _seed(net, x, nb)
    saved = []
    for W, b, act in net.layers:
        rows = S.reshape(nb * x.shape[0], S.shape[2])
        if save:
            Z, ctx = F.dense_forward(rows, W, None, "identity", precision=net.precision, save=True)
        else:
            Z, ctx = F.dense_forward(rows, W, None, "identity", precision=net.precision), None
        Z = Z.reshape(nb, x.shape[0], W.shape[0])
        S = F.taylor_activation_forward(Z, b, act, d=net.d, second=second)
        if save:
            saved.append((ctx, Z, S[0]))
    return S, saved


def _backward(net: _Net, saved, G, grads, second: str):
    """Add the parameter gradient of ``<G, output stack>`` to ``grads`` ([[dW, db], ...])."""
    for li in range(len(net.layers) - 1, -1, -1):
        W, b, act = net.layers[li]
        ctx, Z, y = saved[li]
        gz = F.taylor_activation_backward(G, Z, y, b, act, d=net.d, second=second)
        nb, B, n = gz.shape
        dS, dW, _ = F.dense_backward(gz.reshape(nb * B, n), ctx, need_dx=li > 0)
        grads[li][0] += dW
        if b is not None:
            grads[li][1] += gz[0].sum(axis=0)
        if li > 0:
            G = dS.reshape(nb, B, W.shape[1])


def _split(net: _Net, out, second: str):
    """(u, du, second-order array or None) in the public shapes, from an output stack."""
    xp, d = net.xp, net.d
    u, J, sec = out[0], out[1:1 + d], out[1 + d:]
    if net.m == 1:
        u = u[:, 0].copy()
        du = xp.ascontiguousarray(J[:, :, 0].T)
        if second == "laplacian":
            sec = sec[0][:, 0].copy()
        elif second == "diagonal":
            sec = xp.ascontiguousarray(sec[:, :, 0].T)
    else:
        u = u.copy()
        du = xp.ascontiguousarray(xp.moveaxis(J, 0, -1))
        if second == "laplacian":
            sec = sec[0].copy()
        elif second == "diagonal":
            sec = xp.ascontiguousarray(xp.moveaxis(sec, 0, -1))
    return u, du, (None if second == "none" else sec)


def _seed_gradient(net: _Net, B: int, second: str, gu, gdu, gsec):
    """The gradient w.r.t. the output stack from the partials in the public shapes."""
    xp, d, m = net.xp, net.d, net.m
    G = xp.zeros((taylor_blocks(d, second), B, m), dtype=net.dtype)
    if gu is not None:
        G[0] = gu.reshape(B, m)
    if gdu is not None:
        G[1:1 + d] = xp.moveaxis(gdu.reshape(B, m, d), -1, 0)
    if gsec is not None:
        if second == "laplacian":
            G[1 + d] = gsec.reshape(B, m)
        else:
            G[1 + d:] = xp.moveaxis(gsec.reshape(B, m, d), -1, 0)
    return G


def _chunks(B: int, rows: int):
    return [(s, min(B, s + rows)) for s in range(0, B, rows)]


# -- public functions ---------------------------------------------------------------------

def input_derivatives(model, x, order: int = 2, *, diag: bool = False, dims=None, grad_dims=None):
    """The model's values and derivatives with respect to its inputs, in one pass.

    ``u, du = input_derivatives(model, x, order=1)``;
    ``u, du, lap = input_derivatives(model, x)`` (``lap = Σ_i ∂²u/∂x_i²``);
    ``u, du, d2 = input_derivatives(model, x, diag=True)`` (``d2[..., i] = ∂²u/∂x_i²``);
    ``u, du, lap = input_derivatives(model, x, dims=(1, 2))`` (``lap = Δ`` over ``x_1, x_2``
    alone, ``du`` along them: ``d_sel + 2`` forward passes).

    Parameters
    ----------
    model : Dense or Chain with ``d = in_features`` inputs
    x : array ``(B, d)`` of the model's dtype and device (any strides; any DLPack producer,
        e.g. a torch tensor, is read in place), or one point ``(d,)``
    order : 1 (values and gradient) or 2 (also second derivatives)
    diag : with ``order=2``, the diagonal second partials instead of their sum
    dims : the input coordinates the derivatives are taken along (default: all ``d``):
        ``lap`` is the Laplacian over them, ``d2`` and ``du`` their partials, in this order.
        At most ``MAX_INPUT_DIM`` of them.
    grad_dims : the coordinates of ``du`` when they differ from ``dims`` (e.g. the heat
        equation ``u_t = Δ_x u``: ``dims=`` the space coordinates, ``grad_dims=(0,)`` for
        ``u_t``); those not in ``dims`` cost one more stack of ``1 + their number`` passes.

    Returns
    -------
    With one output: ``u (B,)``, ``du (B, k)`` and ``lap (B,)`` or ``d2 (B, k)``; with
    ``m > 1`` outputs ``u (B, m)``, ``du (B, m, k)`` and ``lap (B, m)`` or ``d2 (B, m, k)``,
    where ``k`` is the number of selected coordinates (``d`` by default). A 1-D ``x`` (one
    point) drops the batch axis: ``u ()``, ``du (k,)``, ``lap ()``. New arrays of the
    model's dtype on its device. A NaN input row gives NaN values, and NaN derivatives once
    it has passed a non-linear activation.

    Method: the forward Laplacian, ``k + 2`` forwards (``2 k + 1`` with ``diag``); see
    :mod:`cupynn.derivatives`. Mixed partials: :func:`input_hessian`.

    Example
    -------
    >>> import numpy as np, cupynn
    >>> model = cupynn.MLP([2, 16, 16, 1], "tanh", device="cpu", rng=0)
    >>> x = np.random.default_rng(0).uniform(size=(5, 2))
    >>> u, du, lap = cupynn.input_derivatives(model, x)
    >>> u.shape, du.shape, lap.shape
    ((5,), (5, 2), (5,))
    >>> u1, du1, lap1 = cupynn.input_derivatives(model, x[0])          # one point
    >>> u1.shape, du1.shape, bool(np.isclose(lap1, lap[0]))
    ((), (2,), True)
    >>> _, ux, uxx = cupynn.input_derivatives(model, x, dims=(0,))     # along x_0 only
    >>> bool(np.allclose(ux[:, 0], du[:, 0]))
    True
    """
    second = _second_of(order, diag)
    net = _net_of(model)
    single = getattr(x, "ndim", None) == 1
    x = _check_x(net, x, one_sample=True)
    if second != "none":
        _warn_if_piecewise_linear(net, "input_derivatives(order=2)")
    A, Bn, perm = _plan(net, second, dims, grad_dims)
    with _cpu_threads(net):
        outA = _outputs(A, x, second)
        outB = None if Bn is None else _outputs(Bn, x, "none")
    u, duA, sec = _split(A, outA, second)
    du = _assemble_du(net.xp, duA, None if Bn is None else _split(Bn, outB, "none")[1], perm)
    res = (u, du) if sec is None else (u, du, sec)
    return tuple(a.reshape(a.shape[1:]) for a in res) if single else res


def input_hessian(model, x, *, dims=None):
    """The values, input gradient and input Hessian ``∂²u/∂x_i∂x_j`` (or a block of it).

    ``u, du, H = input_hessian(model, x)``; ``dims=(i, j, ...)`` gives the block over those
    input coordinates (``du`` along them too), in that order.

    Parameters
    ----------
    model : Dense or Chain with ``d`` inputs; x : ``(B, d)`` or one point ``(d,)``
    dims : the ``k`` input coordinates of the block (default: all ``d``)

    Returns
    -------
    One output: ``u (B,)``, ``du (B, k)``, ``H (B, k, k)`` (symmetric); ``m > 1`` outputs:
    ``u (B, m)``, ``du (B, m, k)``, ``H (B, m, k, k)``; a 1-D ``x`` drops the batch axis.

    Method: the forward Laplacian's diagonal mode along the ``k (k + 1) / 2`` directions
    ``e_i`` and ``e_i + e_j`` gives the second directional derivatives ``v^T H v``, and
    ``H_ij = (D_{e_i+e_j} - H_ii - H_jj) / 2``: ``1 + k (k + 1)`` forward passes, no nested
    reverse mode (float64 keeps the subtraction's rounding near 1e-15 of ``|H|``).

    Example
    -------
    >>> import numpy as np, cupynn
    >>> model = cupynn.MLP([3, 16, 1], "tanh", device="cpu", rng=0)
    >>> x = np.random.default_rng(0).uniform(size=(4, 3))
    >>> u, du, H = cupynn.input_hessian(model, x)
    >>> H.shape, bool(np.allclose(H, H.transpose(0, 2, 1)))
    ((4, 3, 3), True)
    >>> _, _, lap = cupynn.input_derivatives(model, x)
    >>> bool(np.allclose(np.trace(H, axis1=1, axis2=2), lap))
    True
    """
    net = _net_of(model)
    single = getattr(x, "ndim", None) == 1
    x = _check_x(net, x, one_sample=True)
    sel = _coords(net, dims, "dims")
    k = len(sel)
    pairs = [(i, j) for i in range(k) for j in range(i + 1, k)]
    n_t = k + len(pairs)
    _check_tangents(n_t, f"the Hessian over {k} inputs (k (k + 1) / 2 directions)")
    xp = net.xp
    dirs = xp.zeros((n_t, net.n_in), dtype=net.dtype)
    for a, i in enumerate(sel):
        dirs[a, i] = 1
    for p, (i, j) in enumerate(pairs):
        dirs[k + p, sel[i]] = 1
        dirs[k + p, sel[j]] = 1
    H_net = replace(net, d=n_t, dirs=dirs)
    with _cpu_threads(net):
        out = _outputs(H_net, x, "diagonal")
    u, dd, d2 = _split(H_net, out, "diagonal")
    du = xp.ascontiguousarray(dd[..., :k])
    H = xp.empty(d2.shape[:-1] + (k, k), dtype=net.dtype)
    for a in range(k):
        H[..., a, a] = d2[..., a]
    half = net.dtype.type(0.5)
    for p, (i, j) in enumerate(pairs):
        h = (d2[..., k + p] - d2[..., i] - d2[..., j]) * half
        H[..., i, j] = h
        H[..., j, i] = h
    res = (u, du, H)
    return tuple(a.reshape(a.shape[1:]) for a in res) if single else res


def _plan(net: _Net, second: str, dims, grad_dims):
    """The stacks a call runs: ``(A, B, perm)``. ``A`` carries tangents along ``dims`` (and
    the second-order blocks); ``B`` (or None) along the ``grad_dims`` not in ``dims``, first
    order only; ``perm`` picks ``du`` in ``grad_dims`` order from ``[A's, B's]`` (None: A's)."""
    sel = _coords(net, dims, "dims")
    if second == "none":
        return _along(net, sel if grad_dims is None else _coords(net, grad_dims, "grad_dims")), None, None
    A = _along(net, sel)
    if grad_dims is None:
        return A, None, None
    g = _coords(net, grad_dims, "grad_dims")
    extra = tuple(c for c in g if c not in sel)
    B = _along(net, extra) if extra else None
    both = sel + extra
    return A, B, [both.index(c) for c in g]


def _outputs(net: _Net, x, second: str):
    """The output stack ``(nb, B, m)`` of the whole batch, chunk by chunk."""
    nb = taylor_blocks(net.d, second)
    out = net.xp.empty((nb, x.shape[0], net.m), dtype=net.dtype)
    for s, e in _chunks(x.shape[0], _chunk_rows(net, nb)):
        out[:, s:e] = _forward(net, x[s:e], second, save=False)[0]
    return out


def _assemble_du(xp, duA, duB, perm):
    if perm is None:
        return duA
    full = duA if duB is None else xp.concatenate([duA, duB], axis=-1)
    return xp.ascontiguousarray(full[..., perm])


def _split_gdu(xp, gdu, perm, nA: int, nB: int):
    """The reverse of :func:`_assemble_du`: ``dL/d(du)`` split into the stacks' parts."""
    if gdu is None or perm is None:
        return gdu, None
    full = xp.zeros(gdu.shape[:-1] + (nA + nB,), dtype=gdu.dtype)
    full[..., perm] = gdu
    return full[..., :nA], (full[..., nA:] if nB else None)


def _check_partials(net: _Net, out, u, du, sec, second):
    names = ("dL/du", "dL/d(du)", "dL/d(lap)" if second == "laplacian" else "dL/d(d2)")
    if not isinstance(out, tuple) or len(out) != 4:
        got = f"a tuple of {len(out)}" if isinstance(out, tuple) else type(out).__name__
        raise TypeError(
            "the residual function must return (value, dL/du, dL/d(du), "
            f"{names[2]}) -- each partial an array shaped like its argument, or None for 0; "
            f"got {got}. Or let an autodiff library differentiate a scalar residual: write it "
            "in jax.numpy and pass cupynn.jax.residual(r), or in torch and pass "
            "cupynn.torch.residual(r)")
    array_type = net.xp.ndarray
    for name, g, ref in zip(names, out[1:], (u, du, sec)):
        if g is None:
            continue
        if not isinstance(g, array_type) or tuple(g.shape) != tuple(ref.shape):
            raise ValueError(
                f"the residual function's {name} must be None or a {array_type.__module__.split('.')[0]} "
                f"array of shape {tuple(ref.shape)} (the shape of its argument); got "
                f"{type(g).__name__} {tuple(getattr(g, 'shape', ()))}")
        if g.dtype != net.dtype:
            raise TypeError(f"the residual function returned {name} of dtype {g.dtype}; the "
                            f"model is {net.dtype}: return it as {net.dtype}")
    if out[3] is not None:  # the loss depends on the second derivatives
        _warn_if_piecewise_linear(net, f"residual_value_and_grad (a residual that returns {names[2]})",
                                  stacklevel=5)
    value = net.xp.asarray(check_loss_value(out[0], net.dtype, "the residual function"))
    return value.astype(net.dtype, copy=False), out[1], out[2], out[3]


def _builtin(net: _Net, kind: str, x, rhs, k):
    """(rhs array or None, k^2) of a built-in residual, checked."""
    if net.m != 1:
        raise ValueError(
            f"the {kind!r} residual needs a model with one output (a scalar u); this one has "
            f"{net.m}: pass a callable residual(u, du, lap), which gets u of shape (batch, {net.m})")
    B = x.shape[0]
    if isinstance(rhs, (bool, int, float, np.bool_, np.integer, np.floating)):
        rhs = check_real(rhs, "rhs")
    elif rhs is not None:
        rhs = intake(rhs, what="rhs", device=net.device, dtype=net.dtype)
        check_array(rhs, what="rhs", device=net.device, dtype=net.dtype, ndim=(1,))
        if rhs.shape[0] != B:
            raise ValueError(f"rhs must have shape ({B},) (one value per point of x), "
                             f"got {tuple(rhs.shape)}")
    if kind == "helmholtz":
        if k is None:
            raise ValueError("the 'helmholtz' residual needs the wave number: k=...")
        k = check_real(k, "k (the wave number)")
        if abs(k) > np.sqrt(np.finfo(net.dtype).max):
            raise ValueError(f"k (the wave number) = {k!r} is too large: k**2 overflows {net.dtype}")
        k2 = k * k
    else:
        if k is not None:
            raise ValueError("k= is for the 'helmholtz' residual")
        k2 = 0.0
    return rhs, k2


def residual_value_and_grad(model, x, residual, *, rhs=None, k=None, diag: bool = False, dims=None,
                            grad_dims=None):
    """A scalar loss of ``(u, ∇u, Δu)`` on a batch, and its gradient w.r.t. every parameter.

    Parameters
    ----------
    model : Dense or Chain with ``d`` inputs; x : ``(B, d)``, the model's dtype and device
    residual : a built-in name or a callable.

        * ``"poisson"``: ``mean((Δu - f)²)`` (``Δu = f``) with ``f = rhs``;
        * ``"helmholtz"``: ``mean((Δu + k² u - f)²)`` with ``f = rhs`` and ``k``;
        * a callable ``residual(u, du, lap)`` or ``residual(u, du, lap, x)`` (four
          positional parameters: it also gets ``x``) on the model's array type, with the
          shapes of :func:`input_derivatives`, returning
          ``(value, dL/du, dL/d(du), dL/d(lap))``: each partial an array shaped like its
          argument, or ``None`` where it is 0. With ``diag=True`` it gets the diagonal
          second partials ``d2`` instead of ``lap`` (and returns ``dL/d(d2)``).

        * ``cupynn.jax.residual(r)`` / ``cupynn.torch.residual(r)``: a scalar
          ``r(u, du, lap[, x])`` written in ``jax.numpy`` / torch, differentiated by that
          library (the arrays cross through DLPack, without copies).

    rhs : the built-ins' right-hand side ``f``: an array ``(B,)`` or a number (default 0)
    k : the wave number of ``"helmholtz"``
    diag : pass ``d2`` instead of ``lap`` to a callable residual
    dims, grad_dims : as in :func:`input_derivatives`: the Laplacian (or ``d2``) over the input
        coordinates ``dims`` only, at ``len(dims) + 2`` forward passes; ``du`` along
        ``grad_dims`` (default ``dims``). The heat equation ``u_t = Δ_x u`` on points
        ``(t, x_1, x_2)``: ``dims=(1, 2), grad_dims=(0,)`` gives ``du[:, 0] = u_t``.

    The built-ins need a model with one output and are computed chunk by chunk (forward
    and reverse together). A callable sees the whole batch at once; when the batch spans
    several chunks the forward is recomputed chunk by chunk for the reverse pass.

    Returns
    -------
    ``(value, grads)``: ``value`` a 0-d array of the model's dtype on its device,
    ``grads`` shaped like ``model.parameters()``.

    Example
    -------
    >>> import numpy as np, cupynn
    >>> model = cupynn.MLP([2, 16, 16, 1], "tanh", device="cpu", rng=0)
    >>> x = np.random.default_rng(0).uniform(size=(64, 2))
    >>> f = -2 * np.pi**2 * np.sin(np.pi * x[:, 0]) * np.sin(np.pi * x[:, 1])
    >>> value, grads = cupynn.residual_value_and_grad(model, x, "poisson", rhs=f)
    >>> grads[0]["weight"].shape
    (16, 2)
    >>> def res(u, du, lap):                  # the same loss, written out
    ...     r = lap - f
    ...     return (r * r).mean(), None, None, 2 * r / r.size
    >>> v2, g2 = cupynn.residual_value_and_grad(model, x, res)
    >>> bool(np.isclose(v2, value))
    True
    """
    net = _net_of(model)
    x = _check_x(net, x)
    if isinstance(residual, str):
        if grad_dims is not None:
            raise ValueError("grad_dims= is for callable residuals; the built-ins use only u and Δu")
        if residual not in RESIDUALS:
            raise ValueError(f"unknown residual {residual!r}: use one of {RESIDUALS} or a "
                             "callable residual(u, du, lap) -> (value, dL/du, dL/d(du), dL/d(lap))")
        if diag:
            raise ValueError("diag=True is for callable residuals; the built-ins use the Laplacian")
        rhs, k2 = _builtin(net, residual, x, rhs, k)
        second = "laplacian"
    elif callable(residual):
        if rhs is not None or k is not None:
            raise ValueError("rhs= and k= are for the built-in residuals; a callable closes "
                             "over its own data")
        second = "diagonal" if diag else "laplacian"
        k2 = 0.0
    else:
        raise TypeError(f"residual must be a name in {RESIDUALS} or a callable, got "
                        f"{type(residual).__name__}")
    if isinstance(residual, str):
        _warn_if_piecewise_linear(net, f"residual_value_and_grad({residual!r})")

    plan = _plan(net, second, dims, grad_dims)
    with _cpu_threads(net):
        value, grads = _residual_chunks(plan, x, residual, second, rhs, k2)
    return value, model._grads_like_parameters([tuple(p) for p in grads])


def _residual_chunks(plan, x, residual, second, rhs, k2):
    net, Bn, perm = plan
    xp = net.xp
    B = x.shape[0]
    grads = [[xp.zeros_like(W), None if b is None else xp.zeros_like(b)]
             for W, b, _ in net.layers]
    nb = taylor_blocks(net.d, second)
    chunks = _chunks(B, _chunk_rows(net, nb))

    if isinstance(residual, str):
        total = xp.zeros((), dtype=net.dtype)
        scale = net.dtype.type(2.0 / B) if B else net.dtype.type(0)
        for s, e in chunks:
            out, saved = _forward(net, x[s:e], second, save=True)
            u, lap = out[0][:, 0], out[1 + net.d][:, 0]
            r = lap - (0 if rhs is None else (rhs if isinstance(rhs, (int, float)) else rhs[s:e]))
            if k2:
                r += net.dtype.type(k2) * u
            total += (r * r).sum()
            G = xp.zeros(out.shape, dtype=net.dtype)
            G[1 + net.d, :, 0] = scale * r
            if k2:
                G[0, :, 0] = net.dtype.type(k2) * (scale * r)
            _backward(net, saved, G, grads, second)
        value = total * net.dtype.type(1.0 / B) if B else total
    else:
        pass_x = wants_x(residual)
        stacks = [(net, second)] + ([] if Bn is None else [(Bn, "none")])
        outs, saves = [], []
        for n_, sec_ in stacks:
            if len(chunks) <= 1:
                o, sv = _forward(n_, x, sec_, save=True)
            else:
                o, sv = _outputs(n_, x, sec_), None
            outs.append(o)
            saves.append(sv)
        u, du, sec = _split(net, outs[0], second)
        du = _assemble_du(xp, du, None if Bn is None else _split(Bn, outs[1], "none")[1], perm)
        res = residual(u, du, sec, x) if pass_x else residual(u, du, sec)
        value, gu, gdu, gsec = _check_partials(net, res, u, du, sec, second)
        gA, gB = _split_gdu(xp, gdu, perm, net.d, 0 if Bn is None else Bn.d)
        Gs = [_seed_gradient(net, B, second, gu, gA, gsec)]
        if Bn is not None:
            Gs.append(_seed_gradient(Bn, B, "none", None, gB, None))
        for (n_, sec_), G, sv in zip(stacks, Gs, saves):
            if len(chunks) == 1:
                _backward(n_, sv, G, grads, sec_)
            elif len(chunks) > 1:
                for s, e in chunks:
                    _, sv = _forward(n_, x[s:e], sec_, save=True)
                    _backward(n_, sv, xp.ascontiguousarray(G[:, s:e]), grads, sec_)
    return value, grads
