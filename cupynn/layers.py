"""Models: :class:`Dense`, :class:`Chain` and :func:`MLP`.

A model holds its parameters on one device (NumPy arrays on ``"cpu"``, CuPy
arrays on ``"cuda"``) in one dtype. Calling it and differentiating it go
through :mod:`cupynn.functional`, which picks the backend.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from . import functional
from ._arrays import intake
from ._devices import array_device, resolve_device
from ._validate import as_float_dtype, check_array, check_precision
from .activations import Activation, get_activation
from .backends import get_backend

__all__ = ["Dense", "Chain", "MLP"]

InitFn = Callable[[np.random.Generator, tuple[int, ...], np.dtype], np.ndarray]


def _init_arrays(init, rng, out_features, in_features, dtype, bias):
    """Host arrays (W, b) drawn by ``init``: "default", "normal", "glorot" or a callable."""
    shape_w, shape_b = (out_features, in_features), (out_features,)
    if callable(init):
        W = np.asarray(init(rng, shape_w, dtype))
        b = np.asarray(init(rng, shape_b, dtype)) if bias else None
        for name, a, shape in (("weight", W, shape_w), ("bias", b, shape_b)):
            if a is not None and (a.shape != shape or a.dtype != dtype):
                raise ValueError(
                    f"init returned a {name} of shape {a.shape} and dtype {a.dtype}; "
                    f"expected {shape} and {dtype}"
                )
        return np.ascontiguousarray(W), None if b is None else np.ascontiguousarray(b)
    if init == "default":  # uniform(-1/sqrt(in), 1/sqrt(in)), as PyTorch's Linear
        k = 1.0 / np.sqrt(max(in_features, 1))
        draw = lambda shape: rng.uniform(-k, k, shape)  # noqa: E731
    elif init == "normal":  # standard normal, as the seed thread's randn
        draw = rng.standard_normal
    elif init == "glorot":
        k = np.sqrt(6.0 / (in_features + out_features))
        draw = lambda shape: rng.uniform(-k, k, shape)  # noqa: E731
    else:
        raise ValueError(f"init must be 'default', 'normal', 'glorot' or a callable, got {init!r}")
    W = draw(shape_w).astype(dtype)
    b = draw(shape_b).astype(dtype) if bias else None
    return W, b


class _Model:
    """What Dense and Chain share: calling, devices, parameters."""

    def __call__(self, x):
        return functional.forward(self, x)

    @property
    def device(self) -> str:
        """``"cpu"`` (NumPy arrays) or ``"cuda"`` (CuPy arrays): where the parameters live."""
        return self._dense_layers()[0]._device

    @property
    def dtype(self) -> np.dtype:
        """The parameters' dtype, ``float32`` or ``float64``; inputs must have it too."""
        return self._dense_layers()[0]._dtype

    @property
    def precision(self) -> str:
        """The float32 matrix-product mode on CUDA: ``"strict"``, ``"tf32"`` or ``"3xtf32"``."""
        return self._precision

    @precision.setter
    def precision(self, value: str) -> None:
        self._precision = check_precision(value, self.dtype)

    def to(self, device: str):
        """Move every parameter to ``"cpu"`` or ``"cuda"`` (in place); return ``self``."""
        device = resolve_device(device)
        layers = self._dense_layers()
        if device == self.device:
            return self
        backend, source = get_backend(device), get_backend(self.device)
        moved = [
            (backend.asarray_from_host(source.to_host(l.weight)),
             None if l.bias is None else backend.asarray_from_host(source.to_host(l.bias)))
            for l in layers
        ]
        for layer, (W, b) in zip(layers, moved):  # all copies made: now commit
            layer.weight, layer.bias, layer._device = W, b, device
        return self

    def load_parameters(self, params) -> None:
        """Replace the parameters by ``params`` (the structure :meth:`parameters` returns).

        Every array is checked (shape, dtype, device) before any is assigned,
        so a failed call leaves the model untouched. The arrays are copied; they may be
        any DLPack producer (a torch tensor, a JAX array) on the model's device.
        """
        layers = self._dense_layers()
        items = self._parameter_items(params)
        if len(items) != len(layers):
            raise ValueError(f"expected parameters for {len(layers)} layers, got {len(items)}")
        staged = []
        for i, (layer, item) in enumerate(zip(layers, items)):
            if not isinstance(item, dict) or "weight" not in item:
                raise TypeError(f"parameters of layer {i} must be a dict with 'weight' (and 'bias')")
            W, b = item["weight"], item.get("bias")
            label = layer._label(i)
            W = intake(W, what=f"{label} weight", device=self.device, dtype=self.dtype)
            if b is not None:
                b = intake(b, what=f"{label} bias", device=self.device, dtype=self.dtype)
            check_array(W, what=f"{label} weight", device=self.device, dtype=self.dtype, ndim=(2,))
            if W.shape != layer.weight.shape:
                raise ValueError(f"{label} weight must have shape {layer.weight.shape}, got {W.shape}")
            if (b is None) != (layer.bias is None):
                raise ValueError(f"{label} bias: expected {'none' if layer.bias is None else 'an array'}")
            if b is not None:
                check_array(b, what=f"{label} bias", device=self.device, dtype=self.dtype, ndim=(1,))
                if b.shape != layer.bias.shape:
                    raise ValueError(f"{label} bias must have shape {layer.bias.shape}, got {b.shape}")
            xp = get_backend(self.device).xp
            staged.append((xp.array(W, order="C", copy=True),
                           None if b is None else xp.array(b, order="C", copy=True)))
        for layer, (W, b) in zip(layers, staged):
            layer.weight, layer.bias = W, b

    def save(self, path, *, optimizer=None) -> None:
        """Save the architecture and parameters to an ``.npz`` file (see :func:`cupynn.load`),
        and ``optimizer``'s state with them if given (see :func:`cupynn.optim.load_state`)."""
        from ._modelfile import write

        write(self, path, optimizer=optimizer)


class Dense(_Model):
    """A dense layer ``y = activation(x @ W.T + b)``.

    ``x`` is ``(batch, in_features)`` (or one sample ``(in_features,)``),
    ``W`` is ``(out_features, in_features)``, ``b`` is ``(out_features,)``.

    Parameters
    ----------
    in_features, out_features : int
    activation : name from :data:`cupynn.activations.ACTIVATIONS`
    bias : whether the layer has a bias
    dtype : ``"float64"`` (default) or ``"float32"``
    device : ``"auto"`` (CUDA when usable), ``"cpu"`` or ``"cuda"``
    init : ``"default"`` (uniform ±1/sqrt(in)), ``"normal"``, ``"glorot"``, or
        ``init(rng, shape, dtype) -> ndarray``
    rng : seed or ``np.random.Generator`` for the initial parameters

    Example
    -------
    >>> import numpy as np, cupynn
    >>> layer = cupynn.Dense(3, 2, "tanh", device="cpu", rng=0)
    >>> layer
    Dense(3 => 2, tanh)
    >>> layer(np.ones((4, 3))).shape
    (4, 2)
    """

    _FILE_KIND = "Dense"  # what a saved file of it loads as (cupynn.load)

    def __init__(self, in_features: int, out_features: int, activation: str = "identity", *,
                 bias: bool = True, dtype="float64", device: str = "auto",
                 init: str | InitFn = "default", rng=None):
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.activation: Activation = get_activation(activation)
        self._dtype = as_float_dtype(dtype)
        self._precision = "strict"
        device = resolve_device(device)
        W, b = _init_arrays(init, np.random.default_rng(rng), self.out_features,
                            self.in_features, self._dtype, bias)
        backend = get_backend(device)
        self.weight = backend.asarray_from_host(W)
        self.bias = None if b is None else backend.asarray_from_host(b)
        self._device = device

    @classmethod
    def from_arrays(cls, W, b=None, activation: str = "identity", *, copy: bool = True) -> Dense:
        """A layer holding ``W (out, in)`` and ``b (out,)`` on their device.

        The seed thread's ``Dense(W1, b1)`` is ``Dense.from_arrays(W1, b1)``.
        ``W`` and ``b`` are NumPy/CuPy arrays or any DLPack producer (a torch
        tensor, a JAX array). With ``copy=True`` (default) the layer holds
        copies; with ``copy=False`` it holds the arrays themselves (read through
        DLPack without a copy; they must be C-contiguous), so a write to ``W``
        changes the layer and the layer's ``weight`` is ``W``'s memory. A read-only
        ``W`` (a read-only ``np.memmap``) serves inference; optimizers, :func:`cupynn.set_flat`
        and :class:`cupynn.torch.Module`, which write parameters in place, refuse it.

        >>> import numpy as np, cupynn
        >>> W = np.ones((2, 3))
        >>> layer = cupynn.Dense.from_arrays(W, None, "tanh", copy=False)
        >>> W[0, 0] = 5.0
        >>> float(layer.weight[0, 0])
        5.0
        """
        W = intake(W, what="W")
        device = array_device(W)
        if device is None:
            raise TypeError(f"W must be a NumPy or CuPy array (or a DLPack producer such as a "
                            f"torch tensor), got {type(W).__name__}")
        dtype = as_float_dtype(W.dtype)
        if b is not None:
            b = intake(b, what="b", device=device, dtype=dtype)
        check_array(W, what="W", device=device, dtype=dtype, ndim=(2,))
        if b is not None:
            check_array(b, what="b", device=device, dtype=dtype, ndim=(1,))
            if b.shape[0] != W.shape[0]:
                raise ValueError(f"b must have shape ({W.shape[0]},) to match W {W.shape}, "
                                 f"got {b.shape}")
        if not copy and not (W.flags.c_contiguous and (b is None or b.flags.c_contiguous)):
            raise ValueError("copy=False needs C-contiguous W and b (the kernels read them in "
                             "place): pass contiguous arrays (x.contiguous() in torch) or copy=True")
        self = cls.__new__(cls)
        self.out_features, self.in_features = (int(n) for n in W.shape)
        if self.in_features < 1 or self.out_features < 1:
            raise ValueError(f"W must have a nonzero shape, got {W.shape}")
        self.activation = get_activation(activation)
        self._dtype, self._device, self._precision = dtype, device, "strict"
        if not copy:
            self.weight, self.bias = W, b
            return self
        xp = get_backend(device).xp
        self.weight = xp.array(W, order="C", copy=True)
        self.bias = None if b is None else xp.array(b, order="C", copy=True)
        return self

    # -- the model protocol used by functional ---------------------------------
    def _dense_layers(self) -> list[Dense]:
        return [self]

    def _label(self, index: int | None) -> str:
        where = "Dense" if index is None else f"Dense[{index}]"
        return f"{where} ({self.in_features} => {self.out_features})"

    def _grads_like_parameters(self, pairs):
        (dW, db), = pairs
        return {"weight": dW, "bias": db}

    def _parameter_items(self, params):
        return [params]

    def parameters(self) -> dict:
        """``{"weight": W, "bias": b}`` (the arrays themselves, not copies)."""
        return {"weight": self.weight, "bias": self.bias}

    def __repr__(self) -> str:
        extra = "" if self.activation.name == "identity" else f", {self.activation.name}"
        if self.bias is None:
            extra += ", bias=false"
        return f"Dense({self.in_features} => {self.out_features}{extra})"


class Chain(_Model):
    """Layers applied in order: ``Chain(l1, l2, l3)(x) == l3(l2(l1(x)))``.

    ``y = l_n(...l_2(l_1(x)))`` for ``x`` of shape ``(batch, l_1.in_features)``;
    the output is ``(batch, l_n.out_features)``.

    All layers must share one dtype and device, and each layer's
    ``in_features`` must equal the previous layer's ``out_features``.
    ``precision`` selects the float32 matrix-product mode on CUDA:
    ``"strict"`` (FP32 FMA), ``"tf32"`` or ``"3xtf32"`` (tensor cores); it has
    no effect on the CPU (a warning says so once).

    Nesting: an argument may itself be a Chain; it is flattened, so
    ``Chain(Chain(a, b), c)`` is the model ``Chain(a, b, c)``: its repr lists
    ``a, b, c``, ``len()`` is 3, ``parameters()`` and the gradients are one
    flat list of three ``{"weight", "bias"}`` dicts, and ``save`` writes a flat
    Chain. The Dense layers are shared with the inner Chain, not copied
    (moving or loading parameters into one moves the other's too). Without an
    explicit ``precision`` the nested Chains' precision is kept (they must
    agree), else ``"strict"``.

    Example
    -------
    >>> import cupynn
    >>> encoder = cupynn.MLP([2, 8, 4], "tanh", device="cpu", rng=0)
    >>> model = cupynn.Chain(encoder, cupynn.Dense(4, 1, device="cpu", rng=1))
    >>> model
    Chain(
      Dense(2 => 8, tanh),
      Dense(8 => 4),
      Dense(4 => 1),
    )
    >>> [p["weight"].shape for p in model.parameters()]
    [(8, 2), (4, 8), (1, 4)]
    """

    _FILE_KIND = "Chain"  # what a saved file of it loads as (cupynn.load)

    def __init__(self, *layers: Dense | Chain, precision: str | None = None):
        if not layers:
            raise ValueError("Chain needs at least one layer")
        flat: list[Dense] = []
        inner_precisions = set()
        for i, layer in enumerate(layers):
            if isinstance(layer, Chain):
                flat.extend(layer.layers)
                inner_precisions.add(layer.precision)
            elif isinstance(layer, Dense):
                flat.append(layer)
            else:
                raise TypeError(f"Chain takes Dense layers or Chains; argument {i} is "
                                f"{type(layer).__name__}")
        if precision is None:
            if len(inner_precisions) > 1:
                raise ValueError(f"the nested Chains have different precisions "
                                 f"{sorted(inner_precisions)}: pass precision= to the outer Chain")
            precision = inner_precisions.pop() if inner_precisions else "strict"
        layers = tuple(flat)
        first = layers[0]
        for i, (prev, layer) in enumerate(zip(layers, layers[1:]), start=1):
            if layer.in_features != prev.out_features:
                raise ValueError(
                    f"{layer._label(i)} expects {layer.in_features} inputs but "
                    f"{prev._label(i - 1)} produces {prev.out_features}"
                )
            if layer.dtype != first.dtype or layer.device != first.device:
                raise ValueError(
                    f"{layer._label(i)} is {layer.dtype} on '{layer.device}' but {first._label(0)} "
                    f"is {first.dtype} on '{first.device}': use one dtype and device"
                )
        self.layers: tuple[Dense, ...] = layers
        self._precision = check_precision(precision, first.dtype)

    def _dense_layers(self) -> list[Dense]:
        return list(self.layers)

    def _grads_like_parameters(self, pairs):
        return [{"weight": dW, "bias": db} for dW, db in pairs]

    def _parameter_items(self, params):
        if not isinstance(params, Sequence):
            raise TypeError("parameters of a Chain must be a list of {'weight', 'bias'} dicts")
        return list(params)

    def parameters(self) -> list[dict]:
        """A list of ``{"weight": W, "bias": b}`` dicts, one per layer."""
        return [layer.parameters() for layer in self.layers]

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, i):
        return self.layers[i]

    def __repr__(self) -> str:
        inner = "".join(f"\n  {layer!r}," for layer in self.layers)
        if self._precision != "strict":
            inner += f"\n  precision={self._precision!r},"
        return f"Chain({inner}\n)"


def MLP(sizes: Sequence[int], activation: str = "tanh", final_activation: str = "identity", *,
        bias: bool = True, dtype="float64", device: str = "auto", init="default", rng=None,
        precision: str = "strict") -> Chain:
    """A :class:`Chain` of ``Dense(sizes[i] => sizes[i+1])`` layers.

    Hidden layers use ``activation``, the last ``final_activation``.

    The default hidden activation is ``"tanh"``: smooth, so every derivative cupynn computes
    (gradients with respect to the inputs, Laplacians, physics-informed residuals) is
    informative. A relu network is piecewise linear, with second derivatives 0 wherever they
    exist; ask for it by name (``cupynn.MLP(sizes, "relu")``) where that does not matter.

    >>> import cupynn
    >>> cupynn.MLP([1, 1000, 20, 1], "tanh", device="cpu", rng=0)
    Chain(
      Dense(1 => 1000, tanh),
      Dense(1000 => 20, tanh),
      Dense(20 => 1),
    )
    """
    sizes = list(sizes)
    if len(sizes) < 2:
        raise ValueError(f"sizes needs at least an input and an output size, got {sizes}")
    generator = np.random.default_rng(rng)
    layers = [
        Dense(n_in, n_out, activation if i < len(sizes) - 2 else final_activation, bias=bias,
              dtype=dtype, device=device, init=init, rng=generator)
        for i, (n_in, n_out) in enumerate(zip(sizes, sizes[1:]))
    ]
    return Chain(*layers, precision=precision)
