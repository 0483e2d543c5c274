"""Jacobians of a model's outputs with respect to its parameters, and the products built on them.

For a model with ``P`` parameters (:func:`cupynn.num_parameters`) and ``m`` outputs, on a batch
``x`` of ``B`` samples, the Jacobian ``J`` is the ``(B * m, P)`` matrix whose row ``b * m + o``
is the gradient of output ``o`` of sample ``b`` with respect to every weight and bias, the
columns in :func:`cupynn.get_flat` order (each layer's ``W`` row-major, then its ``b``).

Method. With ``z_l = h_{l-1} W_l^T + b_l`` and ``h_l = f_l(z_l)``, let ``δ_l = ∂y_o/∂z_l`` for
one sample and one output (``δ_L = e_o ∘ f_L'``, ``δ_{l-1} = (δ_l W_l) ∘ f_{l-1}'``). That
sample's row holds ``[δ_l ⊗ h_{l-1} | δ_l]`` for each layer: the outer products the backward
pass sums over the batch into ``dW``, kept per sample. One forward (saving each layer's input
and ``f'``) and one backward over ``B * m`` rows per chunk of samples, then the outer products
(:func:`cupynn.functional.jacobian_rows`).

Memory. ``J`` itself is ``8 B m P`` bytes in float64: the seed network 1→1000→20→1 has
``P = 22,041``, so 10,000 samples take 1.76 GB. Everything but :func:`jacobian` works chunk
by chunk: ``chunk_rows`` samples at a time (default: as many as fit ``max_bytes``, 64 MiB),
and nothing bigger than one chunk of ``J`` (plus ``G``'s ``8 P²`` bytes for :func:`gramian`)
is allocated. :func:`jacobian` refuses to allocate more than ``max_bytes`` when it is given.

* :func:`jacobian` -- ``J`` itself; :func:`iter_jacobian` -- its row chunks;
* :func:`jvp` -- forward mode: ``(y, J v)`` for a parameter direction ``v`` (and an input
  direction); :func:`jacobian_vector` ``J v`` and :func:`jacobian_transpose_vector`
  ``J^T u`` flat, both matrix-free;
* :func:`gramian` -- ``G = J^T J`` (``P × P``) summed over row chunks;
  :func:`kernel_matrix` -- ``J J^T`` (``Bm × Bm``) from per-layer Gram matrices,
  ``Σ_l (Δ_l Δ_l^T) ∘ (H_{l-1} H_{l-1}^T + 1)``, without forming ``J``;
* :func:`jacobian_operator` -- ``J`` as a SciPy ``LinearOperator`` (matrix-free);
* :func:`damped_solve` -- ``(J^T J + λ I) δ = J^T r`` by Cholesky, the kernel (Woodbury)
  form, CG or LSMR.
"""

from __future__ import annotations

import contextlib

import numpy as np

from . import _threads
from . import functional as F
from ._arrays import intake
from ._validate import check_array
from .backends import get_backend
from .flat import num_parameters

__all__ = [
    "jacobian",
    "iter_jacobian",
    "jvp",
    "jacobian_vector",
    "jacobian_transpose_vector",
    "gramian",
    "kernel_matrix",
    "jacobian_operator",
    "damped_solve",
    "DEFAULT_MAX_BYTES",
]

DEFAULT_MAX_BYTES = 64 << 20  # one chunk of Jacobian rows, by default


def _layers(model):
    try:
        return model._dense_layers()
    except AttributeError:
        raise TypeError(f"model must be a cupynn Dense or Chain, got {type(model).__name__}") from None


def _x2(model, x, what="x"):
    """``x`` on the model's device and dtype, checked, as 2-D (any strides)."""
    layers = _layers(model)
    x = intake(x, what=what, device=model.device, dtype=model.dtype)
    check_array(x, what=what, device=model.device, dtype=model.dtype, ndim=(1, 2))
    d = layers[0].in_features
    if x.shape[-1] != d:
        raise ValueError(f"{layers[0]._label(0)} expects {what} of shape (batch, {d}) or ({d},), "
                         f"got {tuple(x.shape)}")
    return x.reshape(1, -1) if x.ndim == 1 else x


def _chunk_samples(model, chunk_rows, max_bytes, per_sample_bytes) -> int:
    """Samples per chunk: ``chunk_rows`` if given, else what ``max_bytes`` (default 64 MiB) allows."""
    if chunk_rows is not None:
        if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, (int, np.integer)) or chunk_rows < 1:
            raise ValueError(f"chunk_rows must be a positive integer (samples per chunk), got {chunk_rows!r}")
        return int(chunk_rows)
    limit = DEFAULT_MAX_BYTES if max_bytes is None else _check_bytes(max_bytes)
    rows = limit // max(per_sample_bytes, 1)
    if rows < 1:
        raise ValueError(f"max_bytes={limit} is less than one sample's Jacobian rows "
                         f"({per_sample_bytes} bytes): raise it")
    return int(rows)


def _check_bytes(max_bytes) -> int:
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, (int, np.integer)) or max_bytes < 1:
        raise ValueError(f"max_bytes must be a positive integer (bytes), got {max_bytes!r}")
    return int(max_bytes)


def _cpu_blas(model):
    """BLAS at one thread on the CPU (cupynn/_threads.py): the products here are small or
    tall-skinny, where a threaded BLAS spins its threads against each other (3-30x slower
    as soon as another process holds a core)."""
    if model.device != "cpu":
        return contextlib.nullcontext()
    return _threads.blas_single_thread()


def _forward_saved(model, xc):
    """The output and, per layer, (input h, f' or None for identity), on one chunk."""
    saved = []
    h = xc
    for layer in _layers(model):
        y, ctx = F.dense_forward(h, layer.weight, layer.bias, layer.activation.name,
                                 precision=model.precision, save=True)
        deriv = None if layer.activation.name == "identity" else layer.activation.derivative(ctx.saved)
        saved.append((h, deriv))
        h = y
    return h, saved


def _column_offsets(layers):
    offsets, off = [], 0
    for layer in layers:
        n, k = layer.out_features, layer.in_features
        width = n * k + (n if layer.bias is not None else 0)
        offsets.append((off, off + width))
        off += width
    return offsets


def _deltas(model, xc):
    """Per layer ``(h_{l-1}, Δ_l)``: the inputs ``(B, k)`` and ``δ`` rows ``(B, m, n)``."""
    xp = get_backend(model.device).xp
    layers = _layers(model)
    _, saved = _forward_saved(model, xc)
    B, m = xc.shape[0], layers[-1].out_features
    eye = xp.eye(m, dtype=model.dtype)
    h, deriv = saved[-1]
    delta = xp.broadcast_to(eye, (B, m, m)) if deriv is None else eye[None] * deriv[:, None, :]
    out = [None] * len(layers)
    for li in range(len(layers) - 1, -1, -1):
        h, _ = saved[li]
        out[li] = (h, delta)
        if li:
            layer, (_, d_prev) = layers[li], saved[li - 1]
            n = layer.out_features
            delta = (xp.ascontiguousarray(delta).reshape(B * m, n) @ layer.weight).reshape(B, m, -1)
            if d_prev is not None:
                delta *= d_prev[:, None, :]
    return out


def _jacobian_chunk(model, xc, out) -> None:
    """Write the Jacobian rows of the samples ``xc`` into ``out`` ``(len(xc) * m, P)``."""
    layers = _layers(model)
    with _cpu_blas(model):
        for layer, (h, delta), (a, _) in zip(layers, _deltas(model, xc), _column_offsets(layers)):
            F.jacobian_rows(delta[None], h[None], out, col=a, has_bias=layer.bias is not None)


def _ranges(B, rows):
    return [(s, min(B, s + rows)) for s in range(0, B, rows)]


def iter_jacobian(model, x, *, chunk_rows=None, max_bytes=None):
    """Yield ``(start, stop, J_chunk)``: the Jacobian rows of samples ``start:stop``.

    ``J_chunk`` is ``((stop - start) * m, P)``, rows ``(b - start) * m + o``. The chunks share
    one buffer of at most ``max_bytes`` (default 64 MiB) or ``chunk_rows`` samples: use each
    chunk before asking for the next (copy it to keep it).

    >>> import numpy as np, cupynn
    >>> m = cupynn.MLP([2, 8, 1], "tanh", device="cpu", rng=0)
    >>> x = np.random.default_rng(0).standard_normal((10, 2))
    >>> [(s, e, J.shape) for s, e, J in cupynn.iter_jacobian(m, x, chunk_rows=4)]
    [(0, 4, (4, 33)), (4, 8, (4, 33)), (8, 10, (2, 33))]
    """
    x = _x2(model, x)
    layers = _layers(model)
    P, m = num_parameters(model), layers[-1].out_features
    rows = _chunk_samples(model, chunk_rows, max_bytes, m * P * model.dtype.itemsize)
    B = x.shape[0]
    xp = get_backend(model.device).xp
    buf = xp.empty((min(rows, B) * m, P), dtype=model.dtype) if B else None
    for s, e in _ranges(B, rows):
        J = buf[:(e - s) * m]
        _jacobian_chunk(model, x[s:e], J)
        yield s, e, J


def jacobian(model, x, *, chunk_rows=None, max_bytes=None):
    """The Jacobian of the outputs w.r.t. every parameter: ``(B * m, P)``, row ``b * m + o``.

    Row ``b * m + o`` is the gradient of output ``o`` of sample ``b``; the columns are in
    :func:`cupynn.get_flat` order. ``x`` is ``(B, in)`` (any strides; ``(in,)`` is one sample)
    on the model's device and dtype; the result is a new array there.

    ``chunk_rows``: samples per pass (bounds the working arrays of the forward and backward);
    ``max_bytes``: refuse (``MemoryError``) to allocate a Jacobian larger than this. ``J`` is
    ``B * m * P * itemsize`` bytes: for products with it that must not store it, use
    :func:`iter_jacobian`, :func:`gramian`, :func:`jacobian_vector` or
    :func:`jacobian_transpose_vector`.

    >>> import numpy as np, cupynn
    >>> m = cupynn.MLP([2, 8, 3], "tanh", device="cpu", rng=0)
    >>> x = np.random.default_rng(0).standard_normal((5, 2))
    >>> J = cupynn.jacobian(m, x)
    >>> J.shape, cupynn.num_parameters(m)
    ((15, 51), 51)
    """
    x = _x2(model, x)
    layers = _layers(model)
    P, m = num_parameters(model), layers[-1].out_features
    B = x.shape[0]
    nbytes = B * m * P * model.dtype.itemsize
    if max_bytes is not None and nbytes > _check_bytes(max_bytes):
        raise MemoryError(f"the Jacobian is {B * m} x {P} = {nbytes} bytes, more than max_bytes="
                          f"{max_bytes}: use iter_jacobian, gramian or the matrix-free products")
    rows = _chunk_samples(model, chunk_rows, None, 0) if chunk_rows is not None else max(B, 1)
    xp = get_backend(model.device).xp
    J = xp.empty((B * m, P), dtype=model.dtype)
    for s, e in _ranges(B, rows):
        _jacobian_chunk(model, x[s:e], J[s * m:e * m])
    return J


def _flat_direction(model, v, what="v"):
    """``v`` as per-layer ``(V_W, v_b)`` views on the model's device (a flat vector of length P
    or a structure like ``model.parameters()``)."""
    layers = _layers(model)
    P = num_parameters(model)
    backend = get_backend(model.device)
    if isinstance(v, (dict, list, tuple)):
        items = [v] if isinstance(v, dict) else list(v)
        if len(items) != len(layers):
            raise ValueError(f"{what} must have one entry per layer ({len(layers)}), got {len(items)}")
        parts = []
        for i, (layer, item) in enumerate(zip(layers, items)):
            W = intake(item["weight"], what=f"{what}[{i}]['weight']", device=model.device, dtype=model.dtype)
            if tuple(W.shape) != tuple(layer.weight.shape):
                raise ValueError(f"{what}[{i}]['weight'] must have shape {tuple(layer.weight.shape)}, "
                                 f"got {tuple(W.shape)}")
            b = item.get("bias") if layer.bias is not None else None
            if layer.bias is not None:
                if b is None:
                    raise ValueError(f"{what}[{i}] needs a 'bias' of shape {tuple(layer.bias.shape)}")
                b = intake(b, what=f"{what}[{i}]['bias']", device=model.device, dtype=model.dtype)
                if tuple(b.shape) != tuple(layer.bias.shape):
                    raise ValueError(f"{what}[{i}]['bias'] must have shape {tuple(layer.bias.shape)}, "
                                     f"got {tuple(b.shape)}")
            parts.append((backend.xp.ascontiguousarray(W), None if b is None else backend.xp.ascontiguousarray(b)))
        return parts
    if isinstance(v, np.ndarray) and model.device != "cpu":
        if v.ndim != 1 or v.shape[0] != P:
            raise ValueError(f"{what} must be a vector of length {P} (num_parameters(model)), got shape {v.shape}")
        v = backend.asarray_from_host(np.ascontiguousarray(v, dtype=model.dtype))
    v = intake(v, what=what, device=model.device, dtype=model.dtype)
    check_array(v, what=what, device=model.device, dtype=model.dtype, ndim=(1,))
    if v.shape[0] != P:
        raise ValueError(f"{what} must be a vector of length {P} (num_parameters(model): every weight "
                         f"and bias in get_flat order), got length {v.shape[0]}")
    v = backend.xp.ascontiguousarray(v)
    parts, off = [], 0
    for layer in layers:
        n, k = layer.out_features, layer.in_features
        W = v[off:off + n * k].reshape(n, k)
        off += n * k
        b = None
        if layer.bias is not None:
            b = v[off:off + n]
            off += n
        parts.append((W, b))
    return parts


def jvp(model, x, v, *, x_dot=None):
    """Forward mode: the outputs ``y`` and their derivative ``ẏ`` along a direction.

    ``ẏ = J v + (∂y/∂x) ẋ``: ``v`` is a parameter direction (a vector of length ``P`` in
    :func:`cupynn.get_flat` order, or a structure like ``model.parameters()``, or ``None``
    for 0); ``x_dot`` (optional) an input direction shaped like ``x``. Per layer
    ``ż = ḣ W^T + h V_W^T + v_b`` and ``ḣ' = f'(z) ∘ ż``: one forward pass carrying the
    tangent, no Jacobian stored. Returns ``(y, y_dot)``, both ``(B, m)`` (``(m,)`` for one sample).

    >>> import numpy as np, cupynn
    >>> m = cupynn.MLP([2, 8, 1], "tanh", device="cpu", rng=0)
    >>> x = np.random.default_rng(0).standard_normal((5, 2))
    >>> v = np.random.default_rng(1).standard_normal(cupynn.num_parameters(m))
    >>> y, y_dot = cupynn.jvp(m, x, v)
    >>> bool(np.allclose(y_dot.ravel(), cupynn.jacobian(m, x) @ v))
    True
    """
    single = getattr(x, "ndim", 2) == 1
    x2 = _x2(model, x)
    parts = None if v is None else _flat_direction(model, v)
    t = None
    if x_dot is not None:
        x_dot = intake(x_dot, what="x_dot", device=model.device, dtype=model.dtype)
        check_array(x_dot, what="x_dot", device=model.device, dtype=model.dtype, ndim=(x2.ndim if not single else 1,))
        if tuple(x_dot.shape) != (tuple(x2.shape) if not single else (x2.shape[1],)):
            raise ValueError(f"x_dot must have x's shape {tuple(x.shape)}, got {tuple(x_dot.shape)}")
        t = x_dot.reshape(x2.shape)
    if parts is None and t is None:
        raise ValueError("jvp needs a direction: v (parameters) and/or x_dot (inputs)")
    h = x2
    for li, layer in enumerate(_layers(model)):
        y, ctx = F.dense_forward(h, layer.weight, layer.bias, layer.activation.name,
                                 precision=model.precision, save=True)
        zdot = None
        if t is not None:
            zdot = t @ layer.weight.T
        if parts is not None:
            VW, vb = parts[li]
            term = F.dense_forward(h, VW, vb, "identity", precision=model.precision)
            zdot = term if zdot is None else zdot + term
        if layer.activation.name != "identity":
            zdot = zdot * layer.activation.derivative(ctx.saved)
        t, h = zdot, y
    if single:
        return h.reshape(-1), t.reshape(-1)
    return h, t


def jacobian_vector(model, x, v):
    """``J v`` (length ``B * m``, entry ``b * m + o``) for a parameter vector ``v`` of length ``P``,
    matrix-free (one forward pass with a tangent: :func:`jvp`).

    >>> import numpy as np, cupynn
    >>> m = cupynn.MLP([1, 4, 2], "tanh", device="cpu", rng=0)
    >>> cupynn.jacobian_vector(m, np.ones((3, 1)), np.ones(cupynn.num_parameters(m))).shape
    (6,)
    """
    return jvp(model, x, v)[1].reshape(-1)


def jacobian_transpose_vector(model, x, u):
    """``J^T u`` (length ``P``, :func:`cupynn.get_flat` order) for ``u`` of length ``B * m`` (or
    shape ``(B, m)``), matrix-free: one backward pass (:func:`cupynn.functional.vjp`).

    >>> import numpy as np, cupynn
    >>> m = cupynn.MLP([1, 4, 2], "tanh", device="cpu", rng=0)
    >>> cupynn.jacobian_transpose_vector(m, np.ones((3, 1)), np.ones(6)).shape
    (18,)
    """
    x2 = _x2(model, x)
    layers = _layers(model)
    B, m = x2.shape[0], layers[-1].out_features
    backend = get_backend(model.device)
    if isinstance(u, np.ndarray) and model.device != "cpu":
        u = backend.asarray_from_host(np.ascontiguousarray(u, dtype=model.dtype))
    u = intake(u, what="u", device=model.device, dtype=model.dtype)
    check_array(u, what="u", device=model.device, dtype=model.dtype, ndim=(1, 2))
    if int(u.size) != B * m or (u.ndim == 2 and tuple(u.shape) != (B, m)):
        raise ValueError(f"u must have length {B * m} (batch * out_features) or shape ({B}, {m}), "
                         f"got shape {tuple(u.shape)}")
    xp = backend.xp
    if B == 0:
        return xp.zeros(num_parameters(model), dtype=model.dtype)
    grads, _ = F.vjp(model, x2, u.reshape(B, m), wrt_input=False)
    items = [grads] if isinstance(grads, dict) else grads
    parts = []
    for item in items:
        parts.append(item["weight"].reshape(-1))
        if item["bias"] is not None:
            parts.append(item["bias"].reshape(-1))
    return xp.concatenate(parts)


def gramian(model, x, *, chunk_rows=None, max_bytes=None):
    """The Gauss-Newton Gramian ``G = J^T J`` (``P × P``), summed over row chunks of ``J``.

    ``G = Σ_chunks J_c^T J_c`` in chunk order (deterministic); ``J`` is never stored whole:
    memory ``8 P²`` bytes for ``G`` plus one chunk (``chunk_rows`` samples, or what
    ``max_bytes``, default 64 MiB, allows). Cost ``B m P²`` multiply-adds (one GEMM per chunk).

    >>> import numpy as np, cupynn
    >>> m = cupynn.MLP([2, 8, 1], "tanh", device="cpu", rng=0)
    >>> x = np.random.default_rng(0).standard_normal((50, 2))
    >>> G = cupynn.gramian(m, x, chunk_rows=16)
    >>> J = cupynn.jacobian(m, x)
    >>> G.shape, bool(np.allclose(G, J.T @ J))
    ((33, 33), True)
    """
    P = num_parameters(model)
    x2 = _x2(model, x)
    xp = get_backend(model.device).xp
    G = xp.zeros((P, P), dtype=model.dtype)
    for _, _, J in iter_jacobian(model, x2, chunk_rows=chunk_rows, max_bytes=max_bytes):
        with _cpu_blas(model):
            F.gram_update(G, J)
    return G


def kernel_matrix(model, x):
    """The kernel form ``K = J J^T`` (``(B m) × (B m)``), without forming ``J``.

    ``K = Σ_l (Δ_l Δ_l^T) ∘ (H_{l-1} H_{l-1}^T + 1)`` (the ``+ 1`` for a layer with a bias),
    ``Δ_l`` the per-row ``δ`` of layer ``l`` and ``H_{l-1}`` its inputs (each repeated for the
    ``m`` outputs). Memory ``8 (B m)²`` bytes plus the per-layer ``δ``; cost
    ``Σ_l (B m)² (n_l + k_l)``: the route to ``(J^T J + λI)^{-1} J^T r = J^T (J J^T + λI)^{-1} r``
    when ``B m < P``.

    >>> import numpy as np, cupynn
    >>> m = cupynn.MLP([1, 16, 2], "tanh", device="cpu", rng=0)
    >>> x = np.random.default_rng(0).standard_normal((4, 1))
    >>> J = cupynn.jacobian(m, x)
    >>> bool(np.allclose(cupynn.kernel_matrix(m, x), J @ J.T))
    True
    """
    x2 = _x2(model, x)
    layers = _layers(model)
    xp = get_backend(model.device).xp
    B, m = x2.shape[0], layers[-1].out_features
    K = xp.zeros((B * m, B * m), dtype=model.dtype)
    if B == 0:
        return K
    K4 = K.reshape(B, m, B, m)
    with _cpu_blas(model):
        _kernel_sum(layers, _deltas(model, x2), K4, B, m, xp)
    return K


def _kernel_sum(layers, deltas, K4, B, m, xp):
    for layer, (h, delta) in zip(layers, deltas):
        D = xp.ascontiguousarray(delta).reshape(B * m, -1)
        HH = h @ h.T
        if layer.bias is not None:
            HH += 1
        DD = (D @ D.T).reshape(B, m, B, m)
        DD *= HH[:, None, :, None]
        K4 += DD


def jacobian_operator(model, x):
    """``J`` as a ``scipy.sparse.linalg.LinearOperator`` (``(B m) × P``), float64 on the host:
    ``matvec`` is :func:`jacobian_vector`, ``rmatvec`` :func:`jacobian_transpose_vector`
    (needs SciPy; each product is one forward or one backward pass).

    >>> import numpy as np, cupynn
    >>> m = cupynn.MLP([1, 4, 1], "tanh", device="cpu", rng=0)
    >>> A = cupynn.jacobian_operator(m, np.ones((3, 1)))
    >>> A.shape, (A @ np.ones(13)).shape
    ((3, 13), (3,))
    """
    from scipy.sparse.linalg import LinearOperator

    x2 = _x2(model, x)
    backend = get_backend(model.device)
    P, m = num_parameters(model), _layers(model)[-1].out_features
    R = x2.shape[0] * m

    def mv(v):
        return np.asarray(backend.to_host(jacobian_vector(model, x2, np.ravel(v))), dtype=np.float64)

    def rmv(u):
        return np.asarray(backend.to_host(jacobian_transpose_vector(model, x2, np.ravel(u))),
                          dtype=np.float64)

    return LinearOperator((R, P), matvec=mv, rmatvec=rmv, dtype=np.float64)


# -- the damped least-squares solve -------------------------------------------------------

SOLVE_METHODS = ("auto", "cholesky", "kernel", "cg", "lsmr")


def _xp_of(a):
    if isinstance(a, np.ndarray):
        return np
    import cupy

    return cupy


def _cholesky_solve(A, rhs):
    """Solve ``A δ = rhs`` for a symmetric positive definite ``A`` (Cholesky on the host via
    SciPy when present; else an LU solve, NumPy's or CuPy's)."""
    xp = _xp_of(A)
    if xp is np:
        try:
            from scipy.linalg import cho_factor, cho_solve
        except ImportError:  # pragma: no cover - scipy is in the test extra
            return np.linalg.solve(A, rhs)
        # G + λI can be numerically indefinite when λ is tiny next to G's scale: then add
        # 10^j * 1e-15 * mean(diag) (j = 0, 1, ...) until the factorization succeeds
        shift, base = 0.0, 1e-15 * max(float(np.trace(A)) / max(A.shape[0], 1), np.finfo(A.dtype).tiny)
        for _ in range(16):
            try:
                M = A if shift == 0.0 else A + shift * np.eye(A.shape[0], dtype=A.dtype)
                return cho_solve(cho_factor(M, lower=True, check_finite=False), rhs, check_finite=False)
            except np.linalg.LinAlgError:
                shift = base if shift == 0.0 else shift * 10.0
        return np.linalg.lstsq(A, rhs, rcond=None)[0]
    return xp.linalg.solve(A, rhs)


def damped_solve(J, r, damping, *, method="auto", G=None, tol=1e-12, maxiter=None):
    """``δ`` solving ``(J^T J + λ I) δ = J^T r``: the damped Gauss-Newton step, ``λ = damping``.

    Equivalently ``δ = argmin ||J δ - r||² + λ ||δ||²``. ``J`` is a dense ``(R, P)`` array
    (NumPy or CuPy) or a SciPy ``LinearOperator`` (matrix-free, e.g. :func:`jacobian_operator`);
    ``r`` has length ``R``. ``method``:

    * ``"cholesky"``: ``G = J^T J`` (or the ``G`` given), then a Cholesky solve: ``R P²`` +
      ``P³ / 3`` flops, ``8 P²`` bytes;
    * ``"kernel"``: ``δ = J^T (J J^T + λ I)^{-1} r`` (Woodbury): ``P R²`` + ``R³ / 3`` flops,
      ``8 R²`` bytes -- the cheaper one when ``R < P``;
    * ``"cg"``: conjugate gradients on ``J^T J + λ I`` with products only;
    * ``"lsmr"``: SciPy's LSMR on ``J`` with ``damp = sqrt(λ)``, products only;
    * ``"auto"``: ``"cholesky"`` if ``R >= P`` (or ``G`` is given), ``"kernel"`` if
      ``R < P``, ``"lsmr"`` for a ``LinearOperator``.

    ``λ`` should be ``> 0`` for ``"kernel"`` and ``"cholesky"`` when ``J`` is rank deficient; when
    the Cholesky factorization fails all the same (``λ`` tiny next to ``G``'s scale), a shift
    of ``1e-15 * mean(diag)``, then 10 times that, ... is added until it succeeds.
    The iterative methods need SciPy and run on the host in float64.

    >>> import numpy as np, cupynn
    >>> rng = np.random.default_rng(0)
    >>> J, r = rng.standard_normal((30, 5)), rng.standard_normal(30)
    >>> d = cupynn.damped_solve(J, r, 1e-3)
    >>> bool(np.allclose((J.T @ J + 1e-3 * np.eye(5)) @ d, J.T @ r))
    True
    """
    if method not in SOLVE_METHODS:
        raise ValueError(f"method must be one of {SOLVE_METHODS}, got {method!r}")
    damping = float(damping)
    if not np.isfinite(damping) or damping < 0:
        raise ValueError(f"damping must be a finite number >= 0, got {damping!r}")
    dense = hasattr(J, "__array_namespace__") or isinstance(J, np.ndarray) or type(J).__module__.startswith("cupy")
    if J is None or not hasattr(J, "shape") or len(J.shape) != 2:
        raise TypeError("J must be a 2-D array (NumPy/CuPy) or a scipy LinearOperator")
    R, P = J.shape
    r_len = getattr(r, "shape", (None,))
    if len(r_len) != 1 or r_len[0] != R:
        raise ValueError(f"r must be a vector of length {R} (the rows of J), got shape {tuple(r_len)}")
    if G is not None and tuple(G.shape) != (P, P):
        raise ValueError(f"G must have shape ({P}, {P}), got {tuple(G.shape)}")
    if method == "auto":
        method = "cholesky" if (G is not None or (dense and R >= P)) else ("kernel" if dense else "lsmr")
    if method in ("cholesky", "kernel") and not dense:
        raise ValueError(f"method={method!r} needs a dense J; use 'cg' or 'lsmr' with a LinearOperator")
    if method == "cholesky":
        xp = _xp_of(J)
        if G is None:
            G = xp.zeros((P, P), dtype=J.dtype)
            F.gram_update(G, J)
        A = G + damping * xp.eye(P, dtype=G.dtype)
        return _cholesky_solve(A, J.T @ r)
    if method == "kernel":
        xp = _xp_of(J)
        A = J @ J.T
        A[xp.diag_indices(R)] += damping
        return J.T @ _cholesky_solve(A, r)
    from scipy.sparse.linalg import LinearOperator, aslinearoperator, cg, lsmr

    host = _xp_of(J) is not np if dense else False
    if dense and host:
        Jh = J.get().astype(np.float64)
        rh = r.get().astype(np.float64)
    else:
        Jh, rh = J, np.asarray(r, dtype=np.float64)
    op = aslinearoperator(Jh)
    if method == "lsmr":
        res = lsmr(op, rh, damp=np.sqrt(damping), atol=tol, btol=tol, maxiter=maxiter)
        d = res[0]
    else:
        N = LinearOperator((P, P), matvec=lambda v: op.rmatvec(op.matvec(v)) + damping * v,
                           dtype=np.float64)
        d, _ = cg(N, op.rmatvec(rh), rtol=tol, atol=0.0, maxiter=maxiter)
    if dense and host:
        return _xp_of(J).asarray(d)
    return d
