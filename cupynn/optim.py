"""Optimizers: :class:`SGD`, :class:`Adam`, :class:`AdamW`, updating a model's parameters in place.

>>> import numpy as np, cupynn
>>> model = cupynn.MLP([1, 16, 1], "tanh", device="cpu", rng=0)
>>> opt = cupynn.optim.Adam(model.parameters(), lr=1e-2)
>>> x = np.linspace(-1, 1, 64).reshape(-1, 1)
>>> for _ in range(100):
...     value, grads = cupynn.value_and_grad(model, x, "mse", target=np.sin(3 * x))
...     opt.step(grads)
>>> opt.step_count
100

Each follows the update rule ``torch.optim`` documents for the optimizer of the same
name (checked against it to 1e-12 in float64 by tests/test_optim.py), in the same order
of operations. ``opt.step(grads)`` takes gradients shaped like ``model.parameters()``
(what :func:`cupynn.value_and_grad` returns) and updates the parameter arrays in place:

* on the CPU, in-place NumPy (no temporaries);
* on CUDA, one launch of a multi-tensor kernel of ours (``kernels/optim.cu``) for all
  parameters of a model (up to 16 arrays, i.e. 8 layers with biases, per launch); the
  step count and the hyperparameters live on the device, so the update can be part of
  a captured CUDA graph (``cupynn.compile(model, loss, optimizer=opt)``).

State (moments, momentum buffers, the step count) has the parameters' dtype and device;
``opt.state_dict()`` gives it as NumPy arrays, ``opt.load_state_dict(d)`` writes it back
in place, and ``model.save(path, optimizer=opt)`` / :func:`load_state` keep it in the
model's ``.npz``.

Checks: gradients whose structure, shape, dtype, device or layout differ from the
parameters raise before anything is written (no parameter changes). A NaN or Inf in a
gradient is applied as the formula says (it reaches the parameter and, for Adam, the
moments, which then stay NaN): filter non-finite gradients yourself if they can occur.

The optimizer holds the parameter *arrays*: ``model.load_parameters`` and ``model.to``
bind new arrays, after which the optimizer would update the old ones. Make a new
optimizer then (and ``load_state_dict`` the old one's state).
"""

from __future__ import annotations

import json
import math

import numpy as np

from . import _npz, functional
from ._validate import FileFormatError, check_count
from .backends import get_backend

__all__ = ["Optimizer", "SGD", "Adam", "AdamW", "load_state"]

_STATE_FORMAT = "cupynn-optimizer-1"


def _flatten_params(params):
    """``model.parameters()`` (a dict or a list of dicts) -> (structure, arrays, labels)."""
    if hasattr(params, "parameters") and callable(params.parameters):
        params = params.parameters()
    if isinstance(params, dict):
        items, single = [params], True
    elif isinstance(params, (list, tuple)):
        items, single = list(params), False
    else:
        raise TypeError("an optimizer takes model.parameters() (a {'weight', 'bias'} dict or a "
                        f"list of them), got {type(params).__name__}")
    if not items:
        raise ValueError("an optimizer needs at least one parameter array; got an empty list")
    structure, arrays, labels = [], [], []
    for i, item in enumerate(items):
        where = "" if single else f"layer {i} "
        if not isinstance(item, dict) or "weight" not in item:
            raise TypeError(f"{where or 'the parameters '}must be a dict with 'weight' "
                            f"(and 'bias'), got {type(item).__name__}")
        extra = set(item) - {"weight", "bias"}
        if extra:
            raise ValueError(f"{where}parameters have unknown keys {sorted(extra)}")
        keys = tuple(k for k in ("weight", "bias") if item.get(k) is not None)
        structure.append(keys)
        for k in keys:
            arrays.append(item[k])
            labels.append(f"{where}{k}")
    return (single, tuple(structure)), arrays, labels


class Optimizer:
    """Base class: the parameters, their state, ``step``, ``state_dict``/``load_state_dict``.

    Subclasses set ``kind`` (the update rule), ``_buffers`` (state array names) and
    ``_hyper_names``; hyperparameters are plain attributes that may be changed between
    steps (``opt.lr = 1e-4``: a schedule; also seen by a compiled step).

    >>> import numpy as np, cupynn
    >>> model = cupynn.MLP([1, 4, 1], "tanh", device="cpu", rng=0)
    >>> opt = cupynn.optim.SGD(model.parameters(), lr=0.1)
    >>> isinstance(opt, cupynn.optim.Optimizer)
    True
    >>> value, grads = cupynn.value_and_grad(model, np.ones((8, 1)))
    >>> opt.step(grads)
    """

    kind: str = ""
    _hyper_names: tuple[str, ...] = ()

    def __init__(self, params, buffers: tuple[str, ...]):
        self._structure, self.params, self._labels = _flatten_params(params)
        self._check_hyper()
        self._buffers = tuple(buffers)
        self._state = functional.optimizer_state(self.kind, self.params, self._labels,
                                                 self._buffers)

    # -- subclasses -------------------------------------------------------------------
    def _check_hyper(self) -> None:
        raise NotImplementedError

    def _hyper(self) -> tuple:
        raise NotImplementedError

    # -- the update -------------------------------------------------------------------
    def _flatten_grads(self, grads) -> list:
        single, structure = self._structure
        if single:
            if not isinstance(grads, dict):
                raise TypeError("grads must be a {'weight', 'bias'} dict like the parameters "
                                f"(what cupynn.value_and_grad returns), got {type(grads).__name__}")
            items = [grads]
        else:
            if not isinstance(grads, (list, tuple)):
                raise TypeError("grads must be a list of {'weight', 'bias'} dicts like "
                                "model.parameters() (what cupynn.value_and_grad returns), got "
                                f"{type(grads).__name__}")
            items = list(grads)
            if len(items) != len(structure):
                raise ValueError(f"grads has {len(items)} layers; the parameters have "
                                 f"{len(structure)}")
        flat = []
        for i, (item, keys) in enumerate(zip(items, structure)):
            where = "" if single else f"layer {i} "
            if not isinstance(item, dict):
                raise TypeError(f"grads of {where or 'the model '}must be a dict, got "
                                f"{type(item).__name__}")
            extra = {k for k, v in item.items() if v is not None} - set(keys)
            if extra:
                raise ValueError(f"grads of {where or 'the model '}have {sorted(extra)} but the "
                                 f"parameters have only {list(keys)}")
            for k in keys:
                if item.get(k) is None:
                    raise ValueError(f"grads of {where or 'the model '}lack {k!r}")
                flat.append(item[k])
        return flat

    def step(self, grads) -> None:
        """Update every parameter in place with ``grads`` (shaped like ``model.parameters()``).

        Raises (and changes nothing) when the gradients' structure, shapes, dtypes,
        device or layout differ from the parameters', or a hyperparameter is invalid.
        """
        flat = self._flatten_grads(grads)
        self._check_hyper()
        functional.optimizer_step(self._state, self._hyper(), self.params, flat, self._labels)

    def prepare(self) -> None:
        """Make the device copy of the hyperparameters current (``step`` does it itself;
        a compiled step calls this before each graph launch)."""
        self._check_hyper()
        functional.optimizer_sync(self._state, self._hyper(), self.params)

    @property
    def step_count(self) -> int:
        """Updates applied so far (on CUDA: one small device-to-host copy)."""
        return functional.optimizer_get_step(self._state, self.params)

    @property
    def state(self) -> dict[str, list]:
        """The state arrays by name (``"exp_avg"``, ...), one per parameter, on the
        parameters' device. Views of the optimizer's storage: read them, or write in place."""
        return {k: list(v) for k, v in self._state.buffers.items()}

    # -- saving ---------------------------------------------------------------------------
    def hyperparameters(self) -> dict:
        return {k: getattr(self, k) for k in self._hyper_names}

    def state_dict(self) -> dict:
        """``{"format", "kind", "dtype", "shapes", "step", "hyper", "state": {name: [arrays]}}``
        with NumPy copies of every state array."""
        be = get_backend(self._state.device)
        hyper = {k: (list(v) if isinstance(v, tuple) else v) for k, v in
                 self.hyperparameters().items()}
        return {
            "format": _STATE_FORMAT, "kind": self.kind, "dtype": self._state.dtype.name,
            "shapes": [list(s) for s in self._state.shapes], "step": self.step_count,
            "hyper": hyper,
            "state": {k: [np.array(be.to_host(a)) for a in v]
                      for k, v in self._state.buffers.items()},
        }

    def load_state_dict(self, state_dict: dict) -> None:
        """Write a :meth:`state_dict` back: hyperparameters, step count and state arrays.

        Everything is checked (kind, dtype, shapes, every array) before anything is
        written; arrays are written in place (a compiled step keeps working) and never
        cast: a float64 state does not load into a float32 optimizer.
        """
        sd = state_dict
        if not isinstance(sd, dict) or sd.get("format") != _STATE_FORMAT:
            raise ValueError("not a cupynn optimizer state dict (from opt.state_dict() or "
                             "cupynn.optim.load_state(path))")
        missing = [k for k in ("kind", "dtype", "shapes", "step", "hyper", "state") if k not in sd]
        if missing:
            raise ValueError(f"the optimizer state dict lacks {missing} (it is not what "
                             "opt.state_dict() returns)")
        if sd["kind"] != self.kind:
            raise ValueError(f"the state is of a {sd['kind']!r} optimizer; this one is {self.kind!r}")
        if not isinstance(sd["dtype"], str) or sd["dtype"] not in ("float32", "float64"):
            raise TypeError(f"the state's dtype must be 'float32' or 'float64', got {sd['dtype']!r}")
        if np.dtype(sd["dtype"]) != self._state.dtype:
            raise TypeError(f"the state is {sd['dtype']}; this optimizer's parameters are "
                            f"{self._state.dtype.name} (cupynn does not cast silently)")
        try:
            shapes = tuple(tuple(int(n) for n in s) for s in sd["shapes"])
        except (TypeError, ValueError):
            raise ValueError(f"the state's shapes must be lists of integers, got {sd['shapes']!r}") from None
        if shapes != self._state.shapes:
            raise ValueError(f"the state is for parameters of shapes {shapes}; these have "
                             f"{self._state.shapes}")
        if not isinstance(sd["state"], dict) or set(sd["state"]) != set(self._buffers):
            got = sorted(sd["state"]) if isinstance(sd["state"], dict) else type(sd["state"]).__name__
            raise ValueError(f"the state has arrays {got}; this optimizer keeps "
                             f"{sorted(self._buffers)} (an SGD keeps a momentum buffer only when "
                             "made with momentum != 0)")
        for name, arrays in sd["state"].items():
            if not isinstance(arrays, (list, tuple)) or len(arrays) != len(shapes):
                raise ValueError(f"state {name!r} must be a list of {len(shapes)} arrays")
            for i, (a, shp) in enumerate(zip(arrays, shapes)):
                if type(a) is not np.ndarray or a.shape != shp or a.dtype != self._state.dtype:
                    raise ValueError(f"state {name!r}[{i}]: expected a NumPy array {shp} of "
                                     f"{self._state.dtype}, got {type(a).__name__} "
                                     f"{getattr(a, 'shape', '')} {getattr(a, 'dtype', '')}")
        step = check_count(sd["step"], "the state's step count")
        if not isinstance(sd["hyper"], dict) or set(sd["hyper"]) != set(self._hyper_names):
            got = sorted(sd["hyper"]) if isinstance(sd["hyper"], dict) else type(sd["hyper"]).__name__
            raise ValueError(f"the state's hyperparameters are {got}; this optimizer has "
                             f"{sorted(self._hyper_names)}")
        old = self.hyperparameters()
        try:
            for k in self._hyper_names:
                v = sd["hyper"][k]
                setattr(self, k, tuple(v) if isinstance(v, list) else v)
            self._check_hyper()
        except Exception:
            for k, v in old.items():
                setattr(self, k, v)
            raise
        be = get_backend(self._state.device)
        for name, arrays in sd["state"].items():
            for dst, src in zip(self._state.buffers[name], arrays):
                dst[...] = be.asarray_from_host(src)
        functional.optimizer_set_step(self._state, self.params, step)

    def __repr__(self) -> str:
        hp = ", ".join(f"{k}={v!r}" for k, v in self.hyperparameters().items())
        return f"{type(self).__name__}({len(self.params)} arrays, {hp})"


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


def _finite(x) -> bool:
    return (isinstance(x, (int, float, np.floating, np.integer))
            and not isinstance(x, (bool, np.bool_)) and math.isfinite(float(x)))


class SGD(Optimizer):
    """Stochastic gradient descent with momentum, as ``torch.optim.SGD``.

    For each parameter ``p`` with gradient ``g``, at step ``t`` (from 1)::

        g = g + weight_decay * p                          (if weight_decay != 0)
        b = g  (t == 1),  b = momentum * b + (1 - dampening) * g  (t > 1)   (if momentum != 0)
        g = g + momentum * b  (nesterov)  or  g = b                          (if momentum != 0)
        p = p - lr * g

    ``momentum`` must be nonzero at construction for a momentum buffer to be kept.

    >>> import numpy as np, cupynn
    >>> model = cupynn.MLP([2, 8, 1], "tanh", device="cpu", rng=0)
    >>> opt = cupynn.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    >>> _, grads = cupynn.value_and_grad(model, np.ones((4, 2)))
    >>> opt.step(grads)
    """

    kind = "sgd"
    _hyper_names = ("lr", "momentum", "dampening", "weight_decay", "nesterov")

    def __init__(self, params, lr: float = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False):
        self.lr, self.momentum, self.dampening = lr, momentum, dampening
        self.weight_decay, self.nesterov = weight_decay, nesterov
        super().__init__(params, ("momentum_buffer",) if momentum != 0 else ())

    def _check_hyper(self) -> None:
        _check(_finite(self.lr) and self.lr >= 0, f"lr must be a finite number >= 0, got {self.lr!r}")
        _check(_finite(self.momentum) and self.momentum >= 0,
               f"momentum must be a finite number >= 0, got {self.momentum!r}")
        _check(_finite(self.dampening), f"dampening must be a finite number, got {self.dampening!r}")
        _check(_finite(self.weight_decay) and self.weight_decay >= 0,
               f"weight_decay must be a finite number >= 0, got {self.weight_decay!r}")
        _check(isinstance(self.nesterov, (bool, np.bool_)),
               f"nesterov must be True or False, got {self.nesterov!r}")
        if self.nesterov:
            _check(self.momentum > 0 and self.dampening == 0,
                   "Nesterov momentum needs momentum > 0 and dampening = 0")
        if hasattr(self, "_buffers"):
            _check(self.momentum == 0 or "momentum_buffer" in self._buffers,
                   "momentum was 0 when this SGD was made, so it keeps no momentum buffer: "
                   "make a new SGD with the momentum you want")

    def _hyper(self) -> tuple:
        return (float(self.lr), float(self.momentum), float(self.dampening), 0.0,
                float(self.weight_decay), float(bool(self.nesterov)))


class Adam(Optimizer):
    """Adam, as ``torch.optim.Adam`` (``amsgrad=False``): L2 weight decay in the gradient.

    For each parameter ``p`` with gradient ``g``, at step ``t`` (from 1)::

        g = g + weight_decay * p                          (if weight_decay != 0)
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g**2
        p = p - (lr / (1 - beta1**t)) * m / (sqrt(v) / sqrt(1 - beta2**t) + eps)

    >>> import numpy as np, cupynn
    >>> model = cupynn.MLP([2, 8, 1], "tanh", device="cpu", rng=0)
    >>> opt = cupynn.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.999))
    >>> _, grads = cupynn.value_and_grad(model, np.ones((4, 2)))
    >>> opt.step(grads)
    """

    kind = "adam"
    _hyper_names = ("lr", "betas", "eps", "weight_decay")

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0):
        self.lr, self.betas, self.eps, self.weight_decay = lr, tuple(betas), eps, weight_decay
        super().__init__(params, ("exp_avg", "exp_avg_sq"))

    def _check_hyper(self) -> None:
        _check(_finite(self.lr) and self.lr >= 0, f"lr must be a finite number >= 0, got {self.lr!r}")
        _check(isinstance(self.betas, (tuple, list)) and len(self.betas) == 2
               and all(_finite(b) and 0 <= b < 1 for b in self.betas),
               f"betas must be two numbers in [0, 1), got {self.betas!r}")
        _check(_finite(self.eps) and self.eps >= 0, f"eps must be a finite number >= 0, got {self.eps!r}")
        _check(_finite(self.weight_decay) and self.weight_decay >= 0,
               f"weight_decay must be a finite number >= 0, got {self.weight_decay!r}")

    def _hyper(self) -> tuple:
        return (float(self.lr), float(self.betas[0]), float(self.betas[1]), float(self.eps),
                float(self.weight_decay), 0.0)


class AdamW(Adam):
    """AdamW, as ``torch.optim.AdamW``: Adam with decoupled weight decay.

    For each parameter ``p`` with gradient ``g``, at step ``t`` (from 1)::

        p = p * (1 - lr * weight_decay)
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g**2
        p = p - (lr / (1 - beta1**t)) * m / (sqrt(v) / sqrt(1 - beta2**t) + eps)

    >>> import numpy as np, cupynn
    >>> model = cupynn.MLP([2, 8, 1], "tanh", device="cpu", rng=0)
    >>> opt = cupynn.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-2)
    >>> _, grads = cupynn.value_and_grad(model, np.ones((4, 2)))
    >>> opt.step(grads)
    """

    kind = "adamw"

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


# -- state in a model's .npz --------------------------------------------------------------

def state_arrays(state_dict: dict) -> tuple[str, dict[str, np.ndarray]]:
    """A state dict as (JSON text, {name: array}) for ``np.savez`` (used by ``model.save``)."""
    meta = {k: v for k, v in state_dict.items() if k != "state"}
    meta["buffers"] = {k: len(v) for k, v in state_dict["state"].items()}
    arrays = {f"optimizer.{k}.{i}": a for k, v in state_dict["state"].items()
              for i, a in enumerate(v)}
    return json.dumps(meta), arrays


def load_state(path) -> dict:
    """The optimizer state saved by ``model.save(path, optimizer=opt)``, for
    ``opt.load_state_dict`` (``path`` may omit the ``.npz`` suffix that ``save`` appended).

    Every member is checked against the state's ``optimizer.meta``; a damaged file, or one
    without optimizer state, raises :class:`cupynn.FileFormatError` naming the member.
    The values (kind, step, hyperparameters) are checked when ``load_state_dict`` applies it.

    >>> import numpy as np, cupynn, tempfile, os
    >>> model = cupynn.MLP([1, 4, 1], "tanh", device="cpu", rng=0)
    >>> opt = cupynn.optim.Adam(model.parameters())
    >>> path = os.path.join(tempfile.mkdtemp(), "ckpt.npz")
    >>> model.save(path, optimizer=opt)
    >>> model2 = cupynn.load(path)
    >>> opt2 = cupynn.optim.Adam(model2.parameters())
    >>> opt2.load_state_dict(cupynn.optim.load_state(path))
    """
    with _npz.Reader(path, "a cupynn file") as f:
        if "optimizer.meta" not in f.members:
            raise FileFormatError(f.name, "optimizer.meta", "is missing: the file holds no "
                                  "optimizer state (save it with model.save(path, optimizer=opt))")

        def bad(member, message):
            return FileFormatError(f.name, member, message)

        try:
            meta = json.loads(f.text("optimizer.meta"))
        except ValueError as exc:
            if isinstance(exc, FileFormatError):
                raise
            raise bad("optimizer.meta", f"is not JSON ({exc})") from None
        keys = {"format", "kind", "dtype", "shapes", "step", "hyper", "buffers"}
        if not isinstance(meta, dict) or meta.get("format") != _STATE_FORMAT or set(meta) != keys:
            raise bad("optimizer.meta", f"must be a JSON object with the keys {sorted(keys)} and "
                      f"format {_STATE_FORMAT!r}")
        if meta["dtype"] not in ("float32", "float64"):
            raise bad("optimizer.meta", f"dtype must be 'float32' or 'float64', got {meta['dtype']!r}")
        shapes, buffers = meta["shapes"], meta["buffers"]
        if not (isinstance(shapes, list) and all(
                isinstance(s, list) and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0
                                            for n in s) for s in shapes)):
            raise bad("optimizer.meta", f"shapes must be lists of non-negative integers, got {shapes!r}")
        if not (isinstance(buffers, dict) and all(n == len(shapes) for n in buffers.values())):
            raise bad("optimizer.meta", f"buffers must map each state name to {len(shapes)} "
                      f"(one array per parameter), got {buffers!r}")
        known = {"optimizer.meta"} | {f"optimizer.{k}.{i}" for k in buffers for i in range(len(shapes))}
        extra = sorted(m for m in f.members if m.startswith("optimizer.") and m not in known)
        if extra:
            raise bad(extra[0], f"is not part of the optimizer state the file's meta lists "
                      f"(unexpected members: {extra[:5]})")
        state = {}
        for k in buffers:
            state[k] = []
            for i, shp in enumerate(shapes):
                member = f"optimizer.{k}.{i}"
                a = f.array(member)
                if a.shape != tuple(shp) or a.dtype != np.dtype(meta["dtype"]):
                    raise bad(member, f"must be a {meta['dtype']} array of shape {tuple(shp)}, got "
                              f"shape {a.shape} and dtype {a.dtype}")
                state[k].append(np.array(a))
    meta.pop("buffers")
    meta["state"] = state
    return meta
