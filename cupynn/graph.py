"""``cupynn.compile``: a whole step -- ``value_and_grad``, or a training step -- as one CUDA graph.

Every kernel of a step is one of ours (no cuBLAS, which CuPy refuses under
capture), so the step can be captured once and replayed: the Python cost per
step drops from one call per kernel to one graph launch (docs/design.md, section 3).

>>> import cupy, cupynn                                  # doctest: +SKIP
>>> model = cupynn.MLP([1, 1000, 20, 1], "identity", device="cuda", rng=0)  # doctest: +SKIP
>>> step = cupynn.compile(model, "sum_squares")  # doctest: +SKIP
>>> x = cupy.linspace(-1, 1, 10_000).reshape(-1, 1)  # doctest: +SKIP
>>> value, grads = step(x)  # as cupynn.value_and_grad(model, x)  # doctest: +SKIP

A training step -- forward, loss, backward and the optimizer's update, one graph:

>>> opt = cupynn.optim.Adam(model.parameters(), lr=1e-3)   # doctest: +SKIP
>>> train = cupynn.compile(model, "mse", optimizer=opt)  # doctest: +SKIP
>>> for _ in range(1000):  # doctest: +SKIP
...     value = train(x, cupy.sin(3 * x))  # one graph launch  # doctest: +SKIP

Semantics (what a captured graph implies):

* ``x`` (and a ``target`` passed per call) is **copied** into a static input
  buffer on every call; its shape and dtype must stay those of the first call
  (a new shape captures a new graph).
* ``value`` and ``grads`` are **static output buffers**, overwritten by the next
  call: copy them (``g.copy()``) to keep them.
* The model's parameters are read (and, with an optimizer, updated) in place on
  every replay: updating them in place is seen by the next step; rebinding them to
  new arrays (``load_parameters``, ``to``) needs a new ``compile`` (a call raises).
* With an optimizer, its step count and hyperparameters live on the device: the
  graph counts its own steps, and changing ``opt.lr`` between calls is seen by the
  next one. The first call of a shape runs the step once for real (compiling the
  kernels, warming the memory pool) and captures it without running it, so every
  call is exactly one step.
* On the CPU backend, ``compile`` returns a plain wrapper with the same call
  signature and the same checks (``value_and_grad``, then ``optimizer.step``; a model
  whose parameters were rebound raises there too). On the CPU emulator of
  the CUDA backend the capture records the launches instead (the same host code,
  minus the CUDA graph), and a call replays them.
"""

from __future__ import annotations

from typing import Any

__all__ = ["compile", "CompiledStep"]


def _flat_params(params) -> list:
    return [a for pair in params for a in pair if a is not None]


class CompiledStep:
    """The callable returned by :func:`compile`: ``step(x[, target])``.

    ``x`` is ``(batch, in)`` of the model's dtype and device. Without an optimizer
    ``step(x)`` returns ``(value, grads)`` with the structure of
    :func:`cupynn.value_and_grad`'s (on a GPU: buffers the next call overwrites); with
    one it returns the loss before the update.

    >>> import numpy as np, cupynn
    >>> step = cupynn.compile(cupynn.Dense(2, 1, device="cpu", rng=0))
    >>> value, grads = step(np.ones((3, 2)))
    >>> sorted(grads)
    ['bias', 'weight']
    """

    def __init__(self, model, loss: Any = "sum_squares", *, target=None, optimizer=None):
        from .functional import _model_parts
        from .losses import make_loss

        self.model = model
        self.optimizer = optimizer
        self._layers, self._net, self._params, self._backend = _model_parts(model)
        self._spec = make_loss(loss, target)
        if self._spec.kind == "callable":
            raise ValueError("cupynn.compile captures the built-in losses ('sum_squares', 'mse') "
                             "only; call cupynn.value_and_grad for a callable loss")
        self._loss = loss
        self._target = target
        self._graphs: dict[tuple, tuple] = {}
        if optimizer is not None:
            mine = [id(a) for a in _flat_params(self._params)]
            if [id(a) for a in optimizer.params] != mine:
                raise ValueError("the optimizer does not hold this model's parameter arrays: "
                                 "make it with cupynn.optim.<Name>(model.parameters(), ...)")

    # -- checks --------------------------------------------------------------------
    def _check_bound(self) -> None:
        """The model still holds the arrays the graph (and optimizer) was built on."""
        layers = self.model._dense_layers()
        if any(l.weight is not W or l.bias is not b for l, (W, b) in zip(layers, self._params)):
            raise RuntimeError("the model's parameters were rebound to new arrays (load_parameters "
                               "or to()) after cupynn.compile: compile again (and make a new "
                               "optimizer for model.parameters())")

    def _check(self, x):
        from ._arrays import intake
        from .functional import _check_batch

        x = intake(x, what="x", device=self.model.device, dtype=self.model.dtype)
        x2, _single = _check_batch(self.model, self._layers, x)
        return x, x2

    def _check_target(self, x, target):
        """``target`` 2-D, checked by the one rule (``functional._check_target``): the shape
        of ``model(x)``."""
        from .functional import _check_target

        return _check_target(self.model, self._net, x, target)

    # -- the CUDA path: capture once per shape, then replay ------------------------------
    def _capture(self, x, target, what: str):
        from .backends.base import LossSpec
        from .backends.cuda_launch import graph_stream, synchronize_current

        be = self._backend
        kl = be.kernels
        xp = be.xp
        key = (what, tuple(x.shape), x.dtype.str, target is not None)
        xs = xp.empty(x.shape, dtype=x.dtype)
        ts = None if target is None else xp.empty(target.shape, dtype=target.dtype)
        spec = self._spec if target is None else LossSpec(self._spec.kind, ts)
        opt = self.optimizer

        def run():
            if what == "forward":
                return be.network_value(self._net, self._params, xs, spec), None
            v, pairs, _ = be.network_value_and_grad(self._net, self._params, xs, spec)
            if what == "train":
                opt.step(self.model._grads_like_parameters(pairs))
                return v, None
            return v, pairs

        # CuPy's memory pool caches freed blocks per stream: warm up on the capture
        # stream itself (compiles the kernels, fills the pool) so that the allocations
        # made during capture are served from the pool, with no cudaMalloc inside it.
        stream = graph_stream(kl)
        if opt is not None:
            opt.prepare()  # the hyperparameters on the device before the capture
        # a non-blocking stream does not wait for the legacy default stream, where x, the
        # parameters and the hyperparameters may still be being written: wait once, here
        synchronize_current(kl)
        # the first call of a training step updates the parameters for real, then captures:
        # if the capture fails, put the parameters and the optimizer back as they were
        undo = self._undo_copies() if what == "train" else None
        try:
            with stream:
                xs[...] = x
                if ts is not None:
                    ts[...] = target
                warm = run()  # a training step runs here for real: the first call's step
            stream.synchronize()
            keep: list = []
            with stream:
                kl.keep_alive = keep  # every buffer the graph touches stays owned by it
                try:
                    stream.begin_capture()
                    try:
                        out = run()
                    finally:
                        graph = stream.end_capture()
                finally:
                    kl.keep_alive = None
            stream.synchronize()
        except BaseException:
            if undo is not None:
                self._undo(undo)
            raise
        entry = (xs, ts, graph, out, keep, stream)
        self._graphs[key] = entry
        return entry, warm

    def _undo_copies(self):
        """Copies of what a training step writes: the parameters, the optimizer's state
        arrays and its step count (device copies, made on a shape's first call only)."""
        opt = self.optimizer
        arrays = _flat_params(self._params) + [b for bufs in opt.state.values() for b in bufs]
        return arrays, [a.copy() for a in arrays], opt.step_count

    def _undo(self, undo) -> None:
        from .functional import optimizer_set_step

        arrays, copies, step = undo
        for dst, src in zip(arrays, copies):
            dst[...] = src
        optimizer_set_step(self.optimizer._state, self.optimizer.params, step)

    def _replay(self, x, target, what: str):
        key = (what, tuple(x.shape), x.dtype.str, target is not None)
        entry = self._graphs.get(key)
        if entry is None:
            entry, warm = self._capture(x, target, what)
            if what == "train":
                return warm  # the warm-up was this call's step
        xs, ts, graph, out, _keep, _stream = entry
        xs[...] = x  # on the current stream, ordered before the graph launch
        if ts is not None:
            ts[...] = target
        if what == "train":
            self.optimizer.prepare()  # a changed lr reaches the device before the launch
        graph.launch()
        return out

    def _graph_path(self) -> bool:
        return self._backend.name == "cuda"

    def __call__(self, x, target=None):
        """One step at ``x`` (``target``: this call's target; default the compiled one).

        Without an optimizer: ``(value, grads)`` of the loss; with one: the loss
        ``value`` before the update, after applying the update to the parameters.
        """
        from .functional import value_and_grad

        self._check_bound()
        if not self._graph_path():
            t = self._target if target is None else target
            value, grads = value_and_grad(self.model, x, self._loss, target=t)
            if self.optimizer is None:
                return value, grads
            self.optimizer.step(grads)
            return value
        x, x2 = self._check(x)
        if target is not None:
            target = self._check_target(x, target)
        if self.optimizer is not None:
            return self._replay(x2, target, "train")[0]
        value, pairs = self._replay(x2, target, "grad")
        return value, self.model._grads_like_parameters(pairs)

    def forward(self, x, target=None):
        """The loss value only (forward pass with the loss fused), from a static buffer.
        Never updates the parameters, with or without an optimizer."""
        self._check_bound()
        if not self._graph_path():
            from .functional import forward, loss_forward

            x, x2 = self._check(x)
            t = self._target if target is None else target
            if t is not None:
                t = self._check_target(x, t)
            return loss_forward(forward(self.model, x2), self._spec.kind, t)
        x, x2 = self._check(x)
        if target is not None:
            target = self._check_target(x, target)
        return self._replay(x2, target, "forward")[0]


def compile(model, loss: Any = "sum_squares", *, target=None, optimizer=None) -> CompiledStep:  # noqa: A001
    """Capture a step of ``model`` as one CUDA graph; return the callable ``step``.

    Without ``optimizer``: ``step(x)`` returns ``(value, grads)`` like
    :func:`cupynn.value_and_grad`, from static buffers that the next call overwrites.
    With ``optimizer`` (a :mod:`cupynn.optim` optimizer made for ``model.parameters()``):
    ``value = step(x)`` (or ``step(x, target)``) runs one training step -- forward,
    loss, backward and the update -- and returns the loss before the update.
    ``step.forward(x)`` replays the loss value alone. ``x`` (and a per-call target) is
    copied into the graph's static input buffers. See the module docstring for what a
    captured graph implies; on the CPU the same calls run eagerly.

    >>> import numpy as np, cupynn
    >>> model = cupynn.MLP([1, 8, 1], "tanh", device="cpu", rng=0)
    >>> opt = cupynn.optim.Adam(model.parameters(), lr=1e-2)
    >>> train = cupynn.compile(model, "mse", optimizer=opt)
    >>> x = np.linspace(-1, 1, 32).reshape(-1, 1)
    >>> first = float(train(x, np.sin(3 * x)))
    >>> for _ in range(200):
    ...     value = train(x, np.sin(3 * x))
    >>> float(value) < first
    True
    """
    return CompiledStep(model, loss, target=target, optimizer=optimizer)
