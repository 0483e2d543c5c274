"""Second-order fitting: residual vectors, their Jacobians, Levenberg-Marquardt, energy natural
gradient and a bridge to ``scipy.optimize.least_squares``.

Every method here minimises a sum of squares ``L(θ) = ||r(θ)||²`` of a residual vector ``r``
over the parameters ``θ`` (:func:`cupynn.get_flat` order), using its Jacobian ``J = ∂r/∂θ``:

* :class:`DataResiduals` -- a fit to data: ``r = (model(x) - target).ravel()`` (row ``b m + o``);
  without a target ``L`` is the seed thread's ``sum(abs2, m(x))``.
* :class:`PDEResiduals` -- a physics-informed loss with a residual linear in ``(u, ∇u, Δu)``:
  interior rows ``sqrt(w_Ω / N_Ω) (a u + c·∇u + e Δu - f)`` at the interior points and
  boundary rows ``sqrt(w_∂ / N_∂) (u - g)`` at the boundary points, stacked, so that
  ``L = w_Ω mean(r_Ω²) + w_∂ mean(r_∂²)``. Built in: ``"poisson"`` (``Δu - f``) and
  ``"helmholtz"`` (``Δu + k² u - f``). The interior rows' Jacobian is the per-sample
  reverse of the forward Laplacian (:mod:`cupynn.derivatives`): per layer the stack of
  blocks ``S = [h; ∂_1 h .. ∂_d h; Δh]`` and its per-row cotangents ``dZ`` give
  ``[Σ_s dZ_s ⊗ S_s | dZ_0]`` (:func:`cupynn.functional.jacobian_rows`).
* :func:`pde_jacobian` -- ``(r, J)`` of a :class:`PDEResiduals` in one call.

Optimizers (deterministic, float64 models only, on the CPU and on CUDA):

* :func:`levenberg_marquardt` -- ``(J^T J + λ I) δ = J^T r``, ``θ ← θ - δ`` when the gain
  ratio ``ρ = (L(θ) - L(θ - δ)) / (L(θ) - ||r - J δ||²)`` is positive, with Nielsen's update
  of ``λ`` (``λ ← λ max(1/3, 1 - (2ρ - 1)³)`` on success, ``λ ← ν λ``, ``ν ← 2ν`` on failure).
* :func:`energy_natural_gradient` -- Müller & Zeinhofer (2023): for a residual linear in
  ``u`` the energy Gramian is ``G = J^T J`` of the residual rows, the step is
  ``δ = (G + ε I)^{-1} J^T r`` and ``θ ← θ - η* δ`` with ``η*`` the best of the grid
  ``η ∈ {1, 1/2, 1/4, ...}`` (a line search on ``L``).
* :func:`residual_functions` / :func:`scipy_least_squares` -- ``fun(θ)`` and ``jac(θ)`` (a
  dense array, or a ``LinearOperator`` for ``tr_solver="lsmr"``) in float64 NumPy.

Cost per iteration: one Jacobian (``R × P``, ``8 R P`` bytes; for PDE rows ``d + 2`` times a
forward), one damped solve (``R P² + P³/3`` flops by Cholesky when ``R ≥ P``, ``P R² + R³/3``
by the kernel form when ``R < P``), and one (LM) or up to ``line_search`` (ENG) residual
evaluations.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from . import functional as F
from ._arrays import intake
from ._validate import check_array
from .backends import get_backend
from .backends.base import taylor_blocks
from .flat import get_flat, num_parameters, set_flat
from .jacobian import _chunk_samples, _cpu_blas, _ranges, _x2, damped_solve, jacobian, jacobian_operator

__all__ = [
    "DataResiduals",
    "PDEResiduals",
    "pde_jacobian",
    "levenberg_marquardt",
    "energy_natural_gradient",
    "residual_functions",
    "scipy_least_squares",
    "FitResult",
]

PDE_RESIDUALS = ("poisson", "helmholtz")
# energy_natural_gradient(adaptive=True): the relative damping goes down 10x after a step of
# at least _ENG_DOWN_AT and up 10x after one below _ENG_UP_BELOW
_ENG_DOWN_AT = 0.5
_ENG_UP_BELOW = 0.125


def _layers(model):
    try:
        return model._dense_layers()
    except AttributeError:
        raise TypeError(f"model must be a cupynn Dense or Chain, got {type(model).__name__}") from None


def _xp(model):
    return get_backend(model.device).xp


# -- residual vectors ----------------------------------------------------------------------

class DataResiduals:
    """``r(θ) = (model(x) - target).ravel()``: a least-squares fit to data (``L = ||r||²``).

    Row ``b * m + o`` is output ``o`` of sample ``b`` (the rows of :func:`cupynn.jacobian`);
    ``target`` ``None`` means 0 (the seed thread's ``sum(abs2, m(x))``). ``x`` and ``target``
    are taken on the model's device when the residuals are first evaluated.

    >>> import numpy as np, cupynn
    >>> m = cupynn.MLP([1, 8, 1], "tanh", device="cpu", rng=0)
    >>> x = np.linspace(-1, 1, 20).reshape(-1, 1)
    >>> res = cupynn.DataResiduals(x, np.sin(3 * x))
    >>> r, J = res.jacobian(m)
    >>> r.shape, J.shape
    ((20,), (20, 25))
    """

    def __init__(self, x, target=None, *, chunk_rows=None):
        self.x, self.target, self.chunk_rows = x, target, chunk_rows

    def _args(self, model):
        x = _x2(model, self.x)
        t = None
        if self.target is not None:
            m = _layers(model)[-1].out_features
            t = intake(self.target, what="target", device=model.device, dtype=model.dtype)
            check_array(t, what="target", device=model.device, dtype=model.dtype, ndim=(1, 2))
            if int(t.size) != x.shape[0] * m:
                raise ValueError(f"target must have the output's shape ({x.shape[0]}, {m}), "
                                 f"got {tuple(t.shape)}")
            t = t.reshape(-1)
        return x, t

    def residuals(self, model):
        """``r`` (length ``B m``) at the model's current parameters."""
        x, t = self._args(model)
        y = F.forward(model, x).reshape(-1)
        return y - t if t is not None else y.copy()

    def jacobian(self, model):
        """``(r, J)``: the residuals and their Jacobian ``(B m, P)``."""
        x, _ = self._args(model)
        return self.residuals(model), jacobian(model, x, chunk_rows=self.chunk_rows)

    def operator(self, model):
        """``J`` as a matrix-free SciPy ``LinearOperator`` (float64, host)."""
        x, _ = self._args(model)
        return jacobian_operator(model, x)


def _coef(xp, value, what, B, dtype, device, shape):
    """A residual coefficient as None, a number, or a checked array of ``shape``."""
    if value is None:
        return None
    if isinstance(value, (int, float, np.integer, np.floating)):
        return float(value)
    a = intake(value, what=what, device=device, dtype=dtype)
    check_array(a, what=what, device=device, dtype=dtype, ndim=(len(shape),))
    if tuple(a.shape) != shape:
        raise ValueError(f"{what} must have shape {shape} (one value per interior point), got {tuple(a.shape)}")
    return a


class PDEResiduals:
    """The stacked residual of a PDE linear in ``(u, ∇u, Δu)``, with Dirichlet boundary rows.

    ``r = [sqrt(w_Ω/N_Ω) (a u + c·∇u + e Δu - f) at interior ; sqrt(w_∂/N_∂) (u - g) at boundary]``
    so ``L = ||r||² = w_Ω mean(r_Ω²) + w_∂ mean(r_∂²)``.

    Parameters
    ----------
    interior : ``(N_Ω, d)`` points
    residual : ``"poisson"`` (``a = 0, c = 0, e = 1``: ``Δu - f``), ``"helmholtz"``
        (``a = k², e = 1``: ``Δu + k² u - f``), or a callable ``residual(x) -> (a, c, e, f)``
        giving the coefficients at the interior points ``x``: ``a, e, f`` numbers or arrays
        ``(N_Ω,)``, ``c`` None or ``(N_Ω, d)``, any of them None for 0
    rhs : ``f`` of the built-ins (an array ``(N_Ω,)`` or a number; default 0)
    k : the wave number of ``"helmholtz"``
    boundary, boundary_values : ``(N_∂, d)`` points and ``g`` (an array ``(N_∂,)`` or a number)
    interior_weight, boundary_weight : ``w_Ω`` and ``w_∂`` (default 1)
    chunk_rows : interior points per pass of the forward Laplacian (bounds its work arrays)

    The model must have one output. Rows: the ``N_Ω`` interior rows, then the ``N_∂`` boundary rows.

    >>> import numpy as np, cupynn
    >>> m = cupynn.MLP([2, 8, 1], "tanh", device="cpu", rng=0)
    >>> xi = np.random.default_rng(0).uniform(size=(30, 2))
    >>> xb = np.array([[0.0, 0.5], [1.0, 0.5]])
    >>> res = cupynn.PDEResiduals(xi, "poisson", rhs=1.0, boundary=xb, boundary_values=0.0)
    >>> r, J = res.jacobian(m)
    >>> r.shape, J.shape
    ((32,), (32, 33))
    """

    def __init__(self, interior, residual="poisson", *, rhs=None, k=None, boundary=None,
                 boundary_values=None, interior_weight=1.0, boundary_weight=1.0, chunk_rows=None):
        if isinstance(residual, str):
            if residual not in PDE_RESIDUALS:
                raise ValueError(f"unknown residual {residual!r}: use one of {PDE_RESIDUALS} or a "
                                 "callable residual(x) -> (a, c, e, f)")
            if residual == "helmholtz" and k is None:
                raise ValueError("the 'helmholtz' residual needs the wave number: k=...")
            if residual == "poisson" and k is not None:
                raise ValueError("k= is for the 'helmholtz' residual")
        elif callable(residual):
            if rhs is not None or k is not None:
                raise ValueError("rhs= and k= are for the built-in residuals; a callable returns its "
                                 "own f")
        else:
            raise TypeError(f"residual must be one of {PDE_RESIDUALS} or a callable, got "
                            f"{type(residual).__name__}")
        if (boundary is None) != (boundary_values is None):
            raise ValueError("boundary= and boundary_values= go together")
        for name, w in (("interior_weight", interior_weight), ("boundary_weight", boundary_weight)):
            if not np.isfinite(float(w)) or float(w) < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {w!r}")
        self.interior, self.residual, self.rhs, self.k = interior, residual, rhs, k
        self.boundary, self.boundary_values = boundary, boundary_values
        self.interior_weight, self.boundary_weight = float(interior_weight), float(boundary_weight)
        self.chunk_rows = chunk_rows

    # -- the pieces ---------------------------------------------------------------------
    def _setup(self, model):
        layers = _layers(model)
        if layers[-1].out_features != 1:
            raise ValueError(f"PDEResiduals needs a model with one output (a scalar u); this one "
                             f"has {layers[-1].out_features}")
        xp, dt, dev = _xp(model), model.dtype, model.device
        x = _x2(model, self.interior, "interior")
        N, d = x.shape
        if isinstance(self.residual, str):
            k2 = float(self.k) ** 2 if self.residual == "helmholtz" else None
            a, c, e, f = k2, None, 1.0, self.rhs
        else:
            out = self.residual(x)
            if not isinstance(out, tuple) or len(out) != 4:
                raise TypeError("the residual callable must return (a, c, e, f): the coefficients of "
                                "a u + c·∇u + e Δu - f (None, numbers or arrays)")
            a, c, e, f = out
        a = _coef(xp, a, "a", N, dt, dev, (N,))
        c = _coef(xp, c, "c", N, dt, dev, (N, d))
        if isinstance(c, float):
            c = xp.full((N, d), c, dtype=dt)
        e = _coef(xp, e, "e", N, dt, dev, (N,))
        f = _coef(xp, f, "rhs" if isinstance(self.residual, str) else "f", N, dt, dev, (N,))
        xb = g = None
        if self.boundary is not None:
            xb = _x2(model, self.boundary, "boundary")
            g = _coef(xp, self.boundary_values, "boundary_values", xb.shape[0], dt, dev, (xb.shape[0],))
        return x, (a, c, e, f), xb, g

    def _scales(self, N, Nb):
        si = np.sqrt(self.interior_weight / N) if N else 0.0
        sb = np.sqrt(self.boundary_weight / Nb) if Nb else 0.0
        return si, sb

    def _seed(self, model, coefs, s, e, nb, d):
        """The cotangent of the output stack that gives the interior rows (a, c, e)."""
        xp = _xp(model)
        a, c, ee, _ = coefs
        G = xp.zeros((nb, e - s, 1), dtype=model.dtype)
        if a is not None:
            G[0, :, 0] = a if isinstance(a, float) else a[s:e]
        if c is not None:
            G[1:1 + d, :, 0] = c[s:e].T
        if ee is not None:
            G[1 + d, :, 0] = ee if isinstance(ee, float) else ee[s:e]
        return G

    def _interior_values(self, coefs, out):
        """``a u + c·∇u + e Δu - f`` from an output stack ``(nb, n, 1)``."""
        a, c, ee, f = coefs
        d = out.shape[0] - 2
        r = out[0, :, 0] * 0
        if a is not None:
            r += a * out[0, :, 0]
        if ee is not None:
            r += ee * out[1 + d, :, 0]
        if c is not None:
            r += (c * out[1:1 + d, :, 0].T).sum(axis=1)
        if f is not None:
            r -= f
        return r

    def _stack_forward(self, model, xc, save):
        """The forward Laplacian's output stack ``(d + 2, n, 1)`` and per layer (input stack,
        Z, y) when ``save``."""
        xp = _xp(model)
        n, d = xc.shape
        nb = taylor_blocks(d, "laplacian")
        S = xp.zeros((nb, n, d), dtype=model.dtype)
        S[0] = xc
        for i in range(d):
            S[1 + i, :, i] = 1
        saved = []
        for layer in _layers(model):
            rows = S.reshape(nb * n, S.shape[2])
            Z = F.dense_forward(rows, layer.weight, None, "identity", precision=model.precision)
            Z = Z.reshape(nb, n, layer.out_features)
            S_next = F.taylor_activation_forward(Z, layer.bias, layer.activation.name, d=d,
                                                 second="laplacian")
            if save:
                saved.append((S, Z, S_next[0]))
            S = S_next
        return S, saved

    def _interior_chunk(self, model, xc, coefs, s, e, out, scale):
        """Residuals of interior points ``s:e`` (returned) and their Jacobian rows into ``out``."""
        n, d = xc.shape
        nb = taylor_blocks(d, "laplacian")
        S, saved = self._stack_forward(model, xc, save=True)
        chunk_coefs = tuple(v if v is None or isinstance(v, float) else v[s:e] for v in coefs)
        r = self._interior_values(chunk_coefs, S)
        G = self._seed(model, coefs, s, e, nb, d) * model.dtype.type(scale)
        layers = _layers(model)
        cols = []
        off = 0
        for layer in layers:
            width = layer.out_features * layer.in_features + (layer.out_features if layer.bias is not None else 0)
            cols.append((off, off + width))
            off += width
        for li in range(len(layers) - 1, -1, -1):
            layer = layers[li]
            S_in, Z, y = saved[li]
            gz = F.taylor_activation_backward(G, Z, y, layer.bias, layer.activation.name, d=d,
                                              second="laplacian")
            F.jacobian_rows(gz[:, :, None, :], S_in, out, col=cols[li][0], has_bias=layer.bias is not None)
            if li:
                G = (gz.reshape(nb * n, -1) @ layer.weight).reshape(nb, n, layer.in_features)
        return r * model.dtype.type(scale)

    # -- public ----------------------------------------------------------------------------
    def num_rows(self, model) -> int:
        """``N_Ω + N_∂``."""
        x, _, xb, _ = self._setup(model)
        return x.shape[0] + (0 if xb is None else xb.shape[0])

    def residuals(self, model):
        """The stacked residual vector ``r`` (length ``N_Ω + N_∂``) at the current parameters."""
        with _cpu_blas(model):
            return self._residuals(model)

    def _residuals(self, model):
        xp = _xp(model)
        x, coefs, xb, g = self._setup(model)
        N, d = x.shape
        Nb = 0 if xb is None else xb.shape[0]
        si, sb = self._scales(N, Nb)
        r = xp.empty(N + Nb, dtype=model.dtype)
        rows = self._rows(model, d)
        for s, e in _ranges(N, rows):
            S, _ = self._stack_forward(model, x[s:e], save=False)
            cc = tuple(None if v is None else (v if isinstance(v, float) else v[s:e]) for v in coefs)
            r[s:e] = self._interior_values(cc, S) * model.dtype.type(si)
        if Nb:
            u = F.forward(model, xb).reshape(-1)
            r[N:] = (u - g) * model.dtype.type(sb)
        return r

    def _rows(self, model, d):
        nb = taylor_blocks(d, "laplacian")
        widest = max(max(l.in_features, l.out_features) for l in _layers(model))
        return _chunk_samples(model, self.chunk_rows, 16 << 20, 4 * nb * widest * model.dtype.itemsize)

    def jacobian(self, model):
        """``(r, J)``: the stacked residuals and their Jacobian ``(N_Ω + N_∂, P)`` (columns in
        :func:`cupynn.get_flat` order)."""
        with _cpu_blas(model):
            return self._jacobian(model)

    def _jacobian(self, model):
        xp = _xp(model)
        x, coefs, xb, g = self._setup(model)
        N, d = x.shape
        Nb = 0 if xb is None else xb.shape[0]
        si, sb = self._scales(N, Nb)
        P = num_parameters(model)
        J = xp.empty((N + Nb, P), dtype=model.dtype)
        r = xp.empty(N + Nb, dtype=model.dtype)
        for s, e in _ranges(N, self._rows(model, d)):
            r[s:e] = self._interior_chunk(model, x[s:e], coefs, s, e, J[s:e], si)
        if Nb:
            u = F.forward(model, xb).reshape(-1)
            r[N:] = (u - g) * model.dtype.type(sb)
            J[N:] = jacobian(model, xb)
            J[N:] *= model.dtype.type(sb)
        return r, J

    def operator(self, model):
        """``J`` as a SciPy ``LinearOperator`` (float64, host), from the dense ``J``."""
        from scipy.sparse.linalg import aslinearoperator

        _, J = self.jacobian(model)
        return aslinearoperator(np.asarray(get_backend(model.device).to_host(J), dtype=np.float64))


def pde_jacobian(model, interior, residual="poisson", **kwargs):
    """``(r, J)`` of ``PDEResiduals(interior, residual, **kwargs)`` at the model's parameters.

    >>> import numpy as np, cupynn
    >>> m = cupynn.MLP([2, 8, 1], "tanh", device="cpu", rng=0)
    >>> x = np.random.default_rng(0).uniform(size=(10, 2))
    >>> r, J = cupynn.pde_jacobian(m, x, "helmholtz", k=2.0, rhs=np.ones(10))
    >>> J.shape
    (10, 33)
    """
    return PDEResiduals(interior, residual, **kwargs).jacobian(model)


# -- optimizers ------------------------------------------------------------------------------

@dataclass
class FitResult:
    """What an optimizer did: the loss ``||r||²`` after each iteration (``loss[0]`` at the start),
    the wall time at each (seconds since the start), the final damping, the iterations run
    and why it stopped.

    >>> from cupynn import FitResult
    >>> FitResult(loss=[1.0, 0.5], times=[0.0, 0.1], damping=1e-3, iterations=1, message="max iterations").iterations
    1
    """

    loss: list = field(default_factory=list)
    times: list = field(default_factory=list)
    damping: float = 0.0
    iterations: int = 0
    message: str = ""


def _problem(problem, target):
    if isinstance(problem, (DataResiduals, PDEResiduals)) or (
            hasattr(problem, "residuals") and hasattr(problem, "jacobian")):
        if target is not None:
            raise ValueError("target= is for an array x; a residual object carries its own target")
        return problem
    return DataResiduals(problem, target)


class _NeedsFloat64(TypeError, ValueError):
    """A float32 model given to a second-order optimizer (a wrong dtype: TypeError, as
    cupynn's other dtype errors; also a ValueError, an argument of the right type whose
    value is refused)."""


def _check_float64(model, what):
    layers = _layers(model)
    if layers[0].dtype != np.float64:
        raise _NeedsFloat64(f"{what} needs a float64 model (second-order steps in float32 lose the accuracy "
                        f"they are for); this model is {layers[0].dtype}: build it with dtype='float64'")


def _check_int(name, v, minimum):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {v!r}")
    return int(v)


def _sq(xp, r) -> float:
    return float(xp.dot(r, r))


def levenberg_marquardt(model, problem, target=None, *, iterations=100, damping=1e-3,
                        method="auto", matrix_free=False, tol=0.0, time_limit=None,
                        callback=None) -> FitResult:
    """Minimise ``||r(θ)||²`` by Levenberg-Marquardt, updating the model's parameters in place.

    ``problem``: a residual object (:class:`DataResiduals`, :class:`PDEResiduals`, or anything
    with ``residuals(model)`` and ``jacobian(model) -> (r, J)``), or an array ``x`` (then
    ``DataResiduals(x, target)``: ``target=None`` minimises ``sum(model(x)**2)``).

    Each iteration solves ``(J^T J + λ I) δ = J^T r`` (:func:`cupynn.damped_solve` with
    ``method``) and tries ``θ - δ``; the gain ratio
    ``ρ = (L(θ) - L(θ - δ)) / (L(θ) - ||r - J δ||²)`` accepts it when ``ρ > 0``
    (``λ ← λ max(1/3, 1 - (2ρ - 1)³)``, ``ν ← 2``) and rejects it otherwise (``λ ← ν λ``,
    ``ν ← 2 ν``). ``λ`` starts at ``damping * max(diag(J^T J))``.

    ``matrix_free=True`` never forms ``J``: it uses ``problem.operator(model)`` (for
    :class:`DataResiduals` the products :func:`cupynn.jacobian_vector` and
    :func:`cupynn.jacobian_transpose_vector`, one forward or backward pass each) and LSMR
    (``method="auto"``) or CG, on the host in float64; memory ``O(B m + P)``. ``λ`` then starts
    at ``damping * ||J^T r||² / ||r||²``. Stops after ``iterations``,
    when ``L <= tol``, or after ``time_limit`` seconds; ``callback(iteration, loss)`` is called
    after every iteration (return True to stop).

    The model must be float64; a bad argument raises before any parameter is written.

    >>> import numpy as np, cupynn
    >>> m = cupynn.MLP([1, 16, 1], "tanh", device="cpu", rng=0)
    >>> x = np.linspace(-1, 1, 64).reshape(-1, 1)
    >>> res = cupynn.levenberg_marquardt(m, x, np.sin(3 * x), iterations=50)
    >>> res.loss[-1] < 1e-6 * res.loss[0]
    True
    """
    _check_float64(model, "levenberg_marquardt")
    iterations = _check_int("iterations", iterations, 0)
    damping = float(damping)
    if not np.isfinite(damping) or damping <= 0:
        raise ValueError(f"damping must be a finite number > 0, got {damping!r}")
    problem = _problem(problem, target)
    with _cpu_blas(model):
        xp = _xp(model)
        t0 = time.perf_counter()
        theta = get_flat(model)
        backend = get_backend(model.device)
        if matrix_free:
            if not hasattr(problem, "operator"):
                raise TypeError("matrix_free=True needs a residual object with operator(model)")
            method = "lsmr" if method == "auto" else method
            xp = np

            def jac_at(model):
                return np.asarray(backend.to_host(problem.residuals(model)), dtype=np.float64), \
                    problem.operator(model)

            def res_at(model):
                return np.asarray(backend.to_host(problem.residuals(model)), dtype=np.float64)
        else:
            jac_at, res_at = problem.jacobian, problem.residuals
        r, J = jac_at(model)
        L = _sq(xp, r)
        if matrix_free:
            g = J.rmatvec(r)
            lam = damping * float(g @ g) / L if L > 0 else damping
        else:
            lam = damping * float(xp.max((J * J).sum(axis=0))) if J.size else damping
        lam = lam if lam > 0 else damping
        nu = 2.0
        result = FitResult(loss=[L], times=[0.0], damping=lam, message="max iterations")
        for it in range(iterations):
            if L <= tol:
                result.message = "tol reached"
                break
            if time_limit is not None and time.perf_counter() - t0 > time_limit:
                result.message = "time limit"
                break
            delta = damped_solve(J, r, lam, method=method)
            pred = L - _sq(xp, r - J @ delta)
            trial = theta - np.asarray(backend.to_host(delta), dtype=np.float64)
            set_flat(model, trial)
            r_new = res_at(model)
            L_new = _sq(xp, r_new)
            rho = (L - L_new) / pred if pred > 0 else -1.0
            if rho > 0 and np.isfinite(L_new):
                theta, L = trial, L_new
                r, J = jac_at(model)
                lam *= max(1.0 / 3.0, 1.0 - (2.0 * rho - 1.0) ** 3)
                nu = 2.0
            else:
                set_flat(model, theta)
                lam *= nu
                nu *= 2.0
            result.loss.append(L)
            result.times.append(time.perf_counter() - t0)
            result.iterations = it + 1
            result.damping = lam
            if callback is not None and callback(it, L):
                result.message = "callback"
                break
            if not np.isfinite(lam) or lam > 1e300:
                result.message = "damping overflow: no decrease found"
                break
        return result


def energy_natural_gradient(model, problem, *, iterations=100, damping=1e-10, line_search=30,
                            adaptive=True, method="auto", tol=0.0, time_limit=None,
                            callback=None) -> FitResult:
    """Energy natural gradient descent (Müller & Zeinhofer 2023) on ``L(θ) = ||r(θ)||²``.

    ``problem``: a :class:`PDEResiduals` (or any residual object). Each iteration forms the
    Gramian ``G = J^T J`` of the residual rows -- for a residual linear in ``u`` it is the
    energy inner product's Gramian of the tangent space -- solves
    ``(G + ε I) δ = J^T r`` (``ε = damping * trace(G) / P``; :func:`cupynn.damped_solve`) and
    sets ``θ ← θ - η* δ`` with ``η*`` from the grid ``η ∈ {1, 1/2, ..., 2^{1-line_search}}``,
    walked down from 1: the last ``η`` before ``L`` rises again after a decrease (the grid's
    best when ``L`` is unimodal along the step; no step if no ``η`` decreases ``L``).

    ``adaptive=True`` (default) adapts the relative damping between ``damping`` and
    ``1e12``, deterministically, for starts far from a minimum where the plain Gauss-Newton
    step is poor: ×100 after a step with no decrease (the step is recomputed at the same
    point), ×10 after one with ``η* < 1/8``, ÷10 (not below ``damping``) after one with
    ``η* >= 1/2``. ``adaptive=False`` is the fixed-damping method and stops at the first step
    with no decrease. Stops
    after ``iterations``, at ``L <= tol``, after ``time_limit`` seconds, or when
    ``callback(iteration, loss)`` returns True. On the CPU, BLAS runs one thread meanwhile.
    float64 models only; parameters are untouched when an argument is bad.

    >>> import numpy as np, cupynn
    >>> m = cupynn.MLP([2, 16, 1], "tanh", device="cpu", rng=0)
    >>> xi = np.random.default_rng(0).uniform(size=(200, 2))
    >>> xb = np.random.default_rng(1).uniform(size=(40, 2)).round()
    >>> pde = cupynn.PDEResiduals(xi, "poisson", rhs=-2.0, boundary=xb, boundary_values=0.0)
    >>> res = cupynn.energy_natural_gradient(m, pde, iterations=20)
    >>> res.loss[-1] < 1e-2 * res.loss[0]
    True
    """
    _check_float64(model, "energy_natural_gradient")
    iterations = _check_int("iterations", iterations, 0)
    line_search = _check_int("line_search", line_search, 1)
    damping = float(damping)
    if not np.isfinite(damping) or damping < 0:
        raise ValueError(f"damping must be a finite number >= 0, got {damping!r}")
    problem = _problem(problem, None)
    with _cpu_blas(model):
        xp = _xp(model)
        backend = get_backend(model.device)
        t0 = time.perf_counter()
        theta = get_flat(model)
        r = problem.residuals(model)
        L = _sq(xp, r)
        result = FitResult(loss=[L], times=[0.0], damping=damping, message="max iterations")
        etas = [0.5 ** i for i in range(line_search)]
        rel, fresh, G, scale = damping, False, None, 0.0
        for it in range(iterations):
            if L <= tol:
                result.message = "tol reached"
                break
            if time_limit is not None and time.perf_counter() - t0 > time_limit:
                result.message = "time limit"
                break
            if not fresh:  # a new point: its residuals, Jacobian and (R >= P) Gramian
                r, J = problem.jacobian(model)
                R, P = J.shape
                G = None
                if R >= P:
                    G = xp.zeros((P, P), dtype=J.dtype)
                    F.gram_update(G, J)
                    scale = float(xp.trace(G)) / max(P, 1)
                else:
                    scale = float((J * J).sum()) / max(P, 1)
                fresh = True
            eps = rel * scale
            if G is not None:
                delta = damped_solve(J, r, eps, G=G, method="cholesky" if method == "auto" else method)
            else:
                delta = damped_solve(J, r, eps, method=method)
            step = np.asarray(backend.to_host(delta), dtype=np.float64)
            best_L, best_theta, best_eta = L, None, 0.0
            for eta in etas:
                trial = theta - eta * step
                set_flat(model, trial)
                Lt = _sq(xp, problem.residuals(model))
                if np.isfinite(Lt) and Lt < best_L:
                    best_L, best_theta, best_eta = Lt, trial, eta
                elif best_theta is not None:
                    break  # L rose again after a decrease: the previous eta is the grid's best
            if best_theta is None:
                set_flat(model, theta)
            else:
                theta, L, fresh = best_theta, best_L, False
                set_flat(model, theta)
            if adaptive:
                if best_theta is None:
                    rel = max(rel, 1e-12) * 100.0
                elif best_eta >= _ENG_DOWN_AT:
                    rel = max(rel / 10.0, damping)
                elif best_eta < _ENG_UP_BELOW:
                    rel = max(rel, 1e-12) * 10.0
            result.loss.append(L)
            result.times.append(time.perf_counter() - t0)
            result.iterations = it + 1
            result.damping = rel
            if callback is not None and callback(it, L):
                result.message = "callback"
                break
            if best_theta is None and (not adaptive or rel > 1e12):
                result.message = "no decrease along the step"
                break
        return result


# -- scipy.optimize.least_squares ------------------------------------------------------------

def residual_functions(model, problem, target=None, *, jac="dense"):
    """``(fun, jac)`` for ``scipy.optimize.least_squares(fun, cupynn.get_flat(model), jac=jac)``.

    ``fun(θ)`` writes ``θ`` into the model (:func:`cupynn.set_flat`) and returns ``r(θ)`` as a
    float64 NumPy vector; ``jac(θ)`` returns ``J`` as a float64 NumPy array (``jac="dense"``) or
    as a ``LinearOperator`` (``jac="operator"``; matrix-free for :class:`DataResiduals`) for
    ``tr_solver="lsmr"``. ``problem`` is as for :func:`levenberg_marquardt`. SciPy minimises
    ``½ ||r||²``: the same minimiser.

    >>> import numpy as np, scipy.optimize, cupynn
    >>> m = cupynn.MLP([1, 8, 1], "tanh", device="cpu", rng=0)
    >>> x = np.linspace(-1, 1, 40).reshape(-1, 1)
    >>> fun, jac = cupynn.residual_functions(m, x, np.sin(2 * x))
    >>> sol = scipy.optimize.least_squares(fun, cupynn.get_flat(m), jac=jac, method="lm")
    >>> bool(sol.cost < 1e-8)
    True
    """
    if jac not in ("dense", "operator"):
        raise ValueError(f"jac must be 'dense' or 'operator', got {jac!r}")
    problem = _problem(problem, target)
    backend = get_backend(model.device)

    def host(a):
        return np.asarray(backend.to_host(a), dtype=np.float64)

    def fun(theta):
        set_flat(model, np.asarray(theta, dtype=np.float64))
        return host(problem.residuals(model))

    def jacobian_fn(theta):
        set_flat(model, np.asarray(theta, dtype=np.float64))
        if jac == "operator":
            if hasattr(problem, "operator"):
                return problem.operator(model)
            from scipy.sparse.linalg import aslinearoperator

            return aslinearoperator(host(problem.jacobian(model)[1]))
        return host(problem.jacobian(model)[1])

    return fun, jacobian_fn


def scipy_least_squares(model, problem, target=None, *, jac="dense", **kwargs):
    """Run ``scipy.optimize.least_squares`` on the residuals from the model's parameters and
    write the solution into the model; returns SciPy's result (``**kwargs`` go to SciPy, e.g.
    ``method="lm"``, or ``tr_solver="lsmr"`` with ``jac="operator"``).

    >>> import numpy as np, cupynn
    >>> m = cupynn.MLP([1, 8, 1], "tanh", device="cpu", rng=0)
    >>> x = np.linspace(-1, 1, 40).reshape(-1, 1)
    >>> sol = cupynn.scipy_least_squares(m, x, np.sin(2 * x), method="trf")
    >>> bool(sol.cost < 1e-8)
    True
    """
    import scipy.optimize

    fun, jacobian_fn = residual_functions(model, problem, target, jac=jac)
    theta0 = get_flat(model)
    try:
        sol = scipy.optimize.least_squares(fun, theta0, jac=jacobian_fn, **kwargs)
    except BaseException:
        set_flat(model, theta0)
        raise
    set_flat(model, sol.x)
    return sol
