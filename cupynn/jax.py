"""A cupynn model as a JAX function with a custom VJP, usable inside ``jax.jit``.

``f = cupynn.jax.apply(model)`` is ``f(params, x) -> y``, the model's
function of its parameters and its input, in the functional style of JAX:
``params`` is the pytree :func:`parameters` returns (for a Chain a list of
``{"weight": W (out, in), "bias": b (out,) or None}`` dicts, for a Dense one
dict), ``x (batch, in)`` or ``(in,)``, ``y = act(x @ W.T + b)`` per layer.
``jax.grad`` / ``jax.vjp`` of a function using ``f`` differentiate it through
a ``jax.custom_vjp`` whose forward and backward call cupynn through
``jax.pure_callback``: the forward is ``model(x)``, the backward ONE
:func:`cupynn.functional.vjp` call, the gradients of ``L(y) = sum(y * g)`` for
the incoming cotangent ``g`` (its gradient is ``g``), returning the
parameters' cotangents, and ``x``'s when ``x`` is differentiated. The model fixes the architecture
(sizes, activations, bias or not, dtype, precision, device); the numbers
come from ``params``.

Costs: a callback leaves compiled code for Python. On the CPU, JAX hands
the callback CPU arrays of its own (JAX copies the arguments), which cupynn
reads in place, without a further copy; what a call costs on top of
cupynn's own work is measured by
``bench/jax_callback_cost.py`` (numbers in ``bench/RESULTS.md``). On a GPU,
``pure_callback`` copies its arguments to the host and its results back (a
host round trip per call), and a CUDA model copies them again to and from
its own device: there it pays off only when the network is large enough to
hide those transfers of the batch (not measured on a GPU yet).

``vmap`` runs the callback once per mapped element (``vmap_method="sequential"``);
higher derivatives than the first are not available (cupynn's backward is
not differentiable by JAX).

The other way round, :func:`loss` and :func:`residual` let JAX differentiate a scalar
function of cupynn's outputs: ``cupynn.value_and_grad(model, x, cupynn.jax.loss(f))`` for
an ``f(y)`` written in ``jax.numpy``, ``cupynn.residual_value_and_grad(model, x,
cupynn.jax.residual(r))`` for an ``r(u, du, lap[, x])``. The arrays reach JAX through
DLPack without a copy (on the CPU when 64-byte aligned, as cupynn's outputs are; other
arrays are copied once into an aligned buffer) and the gradients come back the same way.

The model's dtype must be JAX's: a float64 model needs
``jax.config.update("jax_enable_x64", True)``.

>>> import jax, jax.numpy as jnp, cupynn, cupynn.jax
>>> model = cupynn.MLP([1, 16, 1], "tanh", dtype="float32", device="cpu", rng=0)
>>> f, params = cupynn.jax.apply(model), cupynn.jax.parameters(model)
>>> loss = lambda p, x: jnp.sum(f(p, x) ** 2)
>>> x = jnp.linspace(-1, 1, 64, dtype=jnp.float32).reshape(-1, 1)
>>> grads = jax.jit(jax.grad(loss))(params, x)
>>> grads[0]["weight"].shape
(16, 1)
"""

from __future__ import annotations

try:
    import jax
    import jax.numpy as jnp
    from jax.custom_derivatives import SymbolicZero
except ImportError as e:  # pragma: no cover - exercised where jax is absent
    raise ImportError(f"cupynn.jax needs JAX: pip install 'cupynn[jax]' ({e})") from e

import functools

import numpy as np

from . import functional
from ._autodiff import AutodiffLoss, AutodiffResidual, aligned_host, wants_x
from .layers import Chain, Dense

__all__ = ["apply", "parameters", "loss", "residual"]


def _layers(model) -> list[Dense]:
    return list(model.layers) if isinstance(model, Chain) else [model]


def _host(a) -> np.ndarray:
    return a.get() if hasattr(a, "get") else np.asarray(a)


def parameters(model):
    """The model's parameters as JAX arrays (copies), in the pytree :func:`apply` takes.

    A Chain gives ``[{"weight": W, "bias": b}, ...]``, a Dense one dict; a
    layer without bias has ``"bias": None``.

    >>> import cupynn, cupynn.jax
    >>> p = cupynn.jax.parameters(cupynn.MLP([2, 3, 1], "tanh", device="cpu", rng=0))
    >>> [tuple(layer["weight"].shape) for layer in p]
    [(3, 2), (1, 3)]
    """
    def one(layer):
        return {"weight": jnp.array(_host(layer.weight)),
                "bias": None if layer.bias is None else jnp.array(_host(layer.bias))}

    layers = [one(layer) for layer in _layers(model)]
    return layers if isinstance(model, Chain) else layers[0]


def apply(model):
    """``f(params, x) -> y``: the model as a JAX function (``jax.jit``/``jax.grad`` ready).

    ``params``: the pytree of :func:`parameters` (same shapes, the model's dtype);
    ``x``: ``(batch, in)`` or ``(in,)`` in the model's dtype; ``y``: ``(batch, out)``
    or ``(out,)``. The returned function checks shapes and dtypes when traced.

    >>> import jax, jax.numpy as jnp, numpy as np, cupynn, cupynn.jax
    >>> model = cupynn.MLP([2, 3, 1], "tanh", dtype="float32", device="cpu", rng=0)
    >>> f, p = cupynn.jax.apply(model), cupynn.jax.parameters(model)
    >>> x = jnp.ones((4, 2), dtype=jnp.float32)
    >>> grads = jax.grad(lambda p: (f(p, x) ** 2).sum())(p)
    >>> tuple(grads[0]["weight"].shape)
    (3, 2)
    """
    if not isinstance(model, (Dense, Chain)):
        raise TypeError(f"cupynn.jax.apply takes a cupynn Dense or Chain, got {type(model).__name__}")
    layers = _layers(model)
    acts = [layer.activation.name for layer in layers]
    shapes = [((layer.out_features, layer.in_features),
               None if layer.bias is None else (layer.out_features,)) for layer in layers]
    dtype, device, precision = model.dtype, model.device, model.precision
    is_chain = isinstance(model, Chain)
    n_in, n_out = layers[0].in_features, layers[-1].out_features

    def to_device(a):
        """A callback argument (a CPU JAX or NumPy array) where the model computes.

        On the CPU, a read-only NumPy view of it (no copy; ``np.asarray`` of a CPU JAX
        array is a view, and costs a tenth of ``np.from_dlpack``); for a CUDA model a copy
        on its GPU (a host round trip on top of the callback's own).
        """
        host = np.asarray(a)
        if device == "cuda":
            import cupy

            return cupy.asarray(host)
        return host

    def build(leaves):
        """A cupynn model on the callback's arrays (no copy, except for a CUDA model)."""
        it = iter(to_device(a) for a in leaves)
        built = [Dense.from_arrays(next(it), None if bshape is None else next(it), act, copy=False)
                 for (_, bshape), act in zip(shapes, acts)]
        return Chain(*built, precision=precision) if is_chain else built[0]

    def host_forward(x, *leaves):
        return _host(functional.forward(build(leaves), to_device(x)))

    def host_vjp(need_dx, x, g, *leaves):
        grads, dx = functional.vjp(build(leaves), to_device(x), to_device(g), wrt_input=need_dx)
        grads = grads if isinstance(grads, list) else [grads]
        flat = [_host(a) for gr in grads for a in (gr["weight"], gr["bias"]) if a is not None]
        return (_host(dx), *flat) if need_dx else tuple(flat)

    def y_struct(x):
        return jax.ShapeDtypeStruct(x.shape[:-1] + (n_out,), dtype)

    def call_forward(leaves, x):
        return jax.pure_callback(host_forward, y_struct(x), x, *leaves,
                                 vmap_method="sequential")

    @jax.custom_vjp
    def f_leaves(leaves, x):
        return call_forward(leaves, x)

    def f_fwd(leaves, x):
        # symbolic_zeros: the primals say whether they are differentiated (x often is not)
        values = [a.value for a in leaves]
        return call_forward(values, x.value), (values, x.value, x.perturbed)

    def f_bwd(res, g):
        leaves, x, need_dx = res
        if isinstance(g, SymbolicZero):
            g = jnp.zeros(y_struct(x).shape, dtype)
        structs = tuple(jax.ShapeDtypeStruct(a.shape, dtype) for a in ([x] if need_dx else [])
                        + list(leaves))
        out = jax.pure_callback(functools.partial(host_vjp, need_dx), structs, x, g, *leaves,
                                vmap_method="sequential")
        dx, dleaves = (out[0], out[1:]) if need_dx else (None, out)
        return list(dleaves), dx

    f_leaves.defvjp(f_fwd, f_bwd, symbolic_zeros=True)

    def check(leaves, x):
        if jnp.dtype(x.dtype) != dtype:
            hint = (" (enable float64 in JAX with jax.config.update('jax_enable_x64', True))"
                    if dtype == np.float64 else "")
            raise TypeError(f"x has dtype {x.dtype} but the model is {dtype}; cupynn does not cast "
                            f"silently: pass x.astype(jax.numpy.{dtype.name}){hint}")
        if x.ndim not in (1, 2) or x.shape[-1] != n_in:
            raise ValueError(f"x must have shape (batch, {n_in}) or ({n_in},), got {tuple(x.shape)}")
        want = [s for pair in shapes for s in pair if s is not None]
        if len(leaves) != len(want):
            raise ValueError(f"params has {len(leaves)} arrays, the model {len(want)}: pass "
                             "cupynn.jax.parameters(model) (or a pytree shaped like it)")
        for i, (a, s) in enumerate(zip(leaves, want)):
            if tuple(a.shape) != s or jnp.dtype(a.dtype) != dtype:
                raise ValueError(f"params array {i} is {a.dtype} {tuple(a.shape)}; "
                                 f"the model needs {dtype} {s}")

    def flat_leaves(params):
        items = params if is_chain else [params]
        if (not isinstance(items, (list, tuple)) or len(items) != len(layers)
                or not all(isinstance(d, dict) and "weight" in d for d in items)):
            raise ValueError(f"params must be structured like cupynn.jax.parameters(model): "
                             f"{'a list of ' + str(len(layers)) + ' dicts' if is_chain else 'a dict'}"
                             " with 'weight' and 'bias'")
        leaves = []
        for d, (_, bshape) in zip(items, shapes):
            leaves.append(jnp.asarray(d["weight"]))
            if (d.get("bias") is None) != (bshape is None):
                raise ValueError("params: a layer's bias must be None exactly where the model's is")
            if bshape is not None:
                leaves.append(jnp.asarray(d["bias"]))
        return leaves

    def f(params, x):
        x = jnp.asarray(x)
        leaves = flat_leaves(params)
        check(leaves, x)
        return f_leaves(leaves, x)

    f.__doc__ = f"y = {model!r}(x) as a JAX function of (params, x) (cupynn.jax.apply)."
    return f


def _to_jax(a):
    """A NumPy/CuPy array as a JAX array on the same memory (DLPack, no copy).

    On the CPU JAX needs 64-byte aligned, C-contiguous memory: an array that is not is
    copied once into such a buffer (cupynn's own outputs are aligned). A CuPy array needs a
    JAX with a GPU backend.
    """
    if a.dtype == np.float64 and not jax.config.jax_enable_x64:
        raise TypeError("the model is float64 but JAX runs in float32: enable float64 with "
                        "jax.config.update('jax_enable_x64', True) (cupynn does not cast silently)")
    if isinstance(a, np.ndarray):
        return jax.dlpack.from_dlpack(aligned_host(a), copy=False)
    try:
        gpu = jax.devices("gpu")
    except RuntimeError:
        gpu = []
    if not gpu:
        raise RuntimeError("the model is on CUDA but this JAX has no GPU backend: install "
                           "jax[cuda12] (or use cupynn.torch.loss / cupynn.torch.residual with a "
                           "CUDA torch), or move the model to the CPU")
    return jax.dlpack.from_dlpack(a if a.flags.c_contiguous else a.copy())


def _scalar_fn(f, what: str):
    """``f`` checked (when traced) to return one number, as a 0-d array."""
    @functools.wraps(f)
    def g(*args):
        v = jnp.asarray(f(*args))
        if v.size != 1:
            raise ValueError(f"the {what} must return a scalar; it returned an array of shape "
                             f"{tuple(v.shape)} (sum or average it in jax.numpy)")
        return v.reshape(())
    return g


def loss(f, *, jit: bool = True):
    """A loss for :func:`cupynn.value_and_grad` from a scalar function ``f(y)`` in ``jax.numpy``.

    ``f`` takes the network's output ``y`` (``(batch, out)``, or ``(out,)`` for one sample;
    the model's dtype) and returns a scalar; it may couple samples (a log-sum-exp over the
    batch, a quadrature-weighted integral). cupynn hands ``y`` to JAX through DLPack (no
    copy), gets ``f(y)`` and ``dL/dy`` from ``jax.value_and_grad`` (under ``jax.jit`` unless
    ``jit=False``; retraced per batch shape), takes ``dL/dy`` back without a copy and runs its
    own backward. The result is a callable ``y -> (value, dL/dy)``, the protocol of a
    hand-written loss, so it works wherever one does (``cupynn.flat_value_and_grad``,
    :class:`cupynn.LossTerm`). A float64 model needs ``jax_enable_x64``.

    >>> import jax, jax.numpy as jnp, numpy as np, cupynn, cupynn.jax
    >>> jax.config.update("jax_enable_x64", True)
    >>> model = cupynn.MLP([1, 16, 1], "tanh", device="cpu", rng=0)
    >>> x = np.linspace(-1, 1, 100).reshape(-1, 1)
    >>> lse = cupynn.jax.loss(lambda y: jax.nn.logsumexp(y))      # couples the whole batch
    >>> value, grads = cupynn.value_and_grad(model, x, lse)
    >>> grads[0]["weight"].shape
    (16, 1)
    """
    if not callable(f):
        raise TypeError(f"cupynn.jax.loss takes a function f(y) -> scalar, got {type(f).__name__}")
    vg = jax.value_and_grad(_scalar_fn(f, "loss"))
    vg = jax.jit(vg) if jit else vg

    def value_and_grad(y):
        return vg(_to_jax(y))

    return AutodiffLoss("jax", value_and_grad, f)


def residual(r, *, jit: bool = True):
    """A residual for :func:`cupynn.residual_value_and_grad` from a scalar ``r`` in ``jax.numpy``.

    ``r(u, du, lap)`` or ``r(u, du, lap, x)`` (four positional parameters: it also gets the
    points ``x``) takes the arrays :func:`cupynn.input_derivatives` returns (with ``diag=True``
    the second partials ``d2`` instead of ``lap``) and returns a scalar, e.g.
    ``jnp.mean((lap + f) ** 2)``. JAX computes its value and its gradient with respect to
    ``u``, ``du`` and ``lap`` (``jax.value_and_grad``, jitted unless ``jit=False``), handed
    over through DLPack without copies; cupynn runs the reverse of the forward Laplacian.

    >>> import jax, jax.numpy as jnp, numpy as np, cupynn, cupynn.jax
    >>> jax.config.update("jax_enable_x64", True)
    >>> model = cupynn.MLP([2, 16, 1], "tanh", device="cpu", rng=0)
    >>> x = np.random.default_rng(0).uniform(size=(64, 2))
    >>> def r(u, du, lap, x):                        # -lap u = f on the unit square
    ...     f = 2 * jnp.pi ** 2 * jnp.sin(jnp.pi * x[:, 0]) * jnp.sin(jnp.pi * x[:, 1])
    ...     return jnp.mean((lap + f) ** 2)
    >>> value, grads = cupynn.residual_value_and_grad(model, x, cupynn.jax.residual(r))
    >>> grads[0]["weight"].shape
    (16, 2)
    """
    if not callable(r):
        raise TypeError(f"cupynn.jax.residual takes a function r(u, du, lap[, x]) -> scalar, "
                        f"got {type(r).__name__}")
    pass_x = wants_x(r)
    vg = jax.value_and_grad(_scalar_fn(r, "residual"), argnums=(0, 1, 2))
    vg = jax.jit(vg) if jit else vg

    def value_and_grads(*args):
        return vg(*(_to_jax(a) for a in args))

    return AutodiffResidual("jax", value_and_grads, pass_x, r)
