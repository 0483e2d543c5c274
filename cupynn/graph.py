"""``cupynn.compile``: a whole ``value_and_grad`` step as one CUDA graph launch.

Every kernel of a step is one of ours (no cuBLAS, which CuPy refuses under
capture), so the step can be captured once and replayed: the Python cost per
step drops from one call per kernel to one graph launch (docs/design.md, section 3).

On a GPU (these lines need one, so they are not run as a test):

>>> import cupy, cupynn                                                    # doctest: +SKIP
>>> model = cupynn.MLP([1, 1000, 20, 1], "identity", device="cuda", rng=0)  # doctest: +SKIP
>>> step = cupynn.compile(model, "sum_squares")                            # doctest: +SKIP
>>> x = cupy.linspace(-1, 1, 10_000).reshape(-1, 1)                        # doctest: +SKIP
>>> value, grads = step(x)   # the structure of value_and_grad(model, x)   # doctest: +SKIP

Semantics (what a captured graph implies):

* ``x`` is **copied** into a static input buffer on every call; its shape and
  dtype must stay those of the first call (a new shape captures a new graph).
* ``value`` and ``grads`` are **static output buffers**, overwritten by the next
  call: copy them (``g.copy()``) to keep them.
* The model's parameters are read in place on every replay: updating them
  in place (``W -= lr * dW``) is seen by the next step; rebinding them to new
  arrays (``load_parameters``) needs a new ``compile``.
* On the CPU backend, ``compile`` returns a plain wrapper around
  ``value_and_grad`` with the same call signature.
"""

from __future__ import annotations

from typing import Any

__all__ = ["compile", "CompiledStep"]


class CompiledStep:
    """The callable returned by :func:`compile`: ``step(x) -> (value, grads)``.

    ``x`` is ``(batch, in)`` of the model's dtype and device; ``value`` and ``grads`` have
    the structure of :func:`cupynn.value_and_grad`'s (on a GPU: buffers the next call
    overwrites).

    >>> import numpy as np, cupynn
    >>> step = cupynn.compile(cupynn.Dense(2, 1, device="cpu", rng=0))
    >>> value, grads = step(np.ones((3, 2)))
    >>> sorted(grads)
    ['bias', 'weight']
    """

    def __init__(self, model, loss: Any = "sum_squares", *, target=None):
        from .functional import _model_parts
        from .losses import make_loss

        self.model = model
        self._layers, self._net, self._params, self._backend = _model_parts(model)
        self._spec = make_loss(loss, target)
        if self._spec.kind == "callable":
            raise ValueError("cupynn.compile captures the built-in losses ('sum_squares', 'mse') "
                             "only; call cupynn.value_and_grad for a callable loss")
        self._loss = loss
        self._target = target
        self._graphs: dict[tuple, tuple] = {}

    # -- the GPU path --------------------------------------------------------------
    def _capture(self, x, what: str):
        import cupy

        be = self._backend
        key = (what, tuple(x.shape), x.dtype.str)
        xs = cupy.empty(x.shape, dtype=x.dtype)

        def run():
            if what == "grad":
                v, pairs, _ = be.network_value_and_grad(self._net, self._params, xs, self._spec)
                return v, pairs
            return be.network_value(self._net, self._params, xs, self._spec), None

        # CuPy's memory pool caches freed blocks per stream: warm up on the capture
        # stream itself (compiles the kernels, fills the pool) so that the allocations
        # made during capture are served from the pool, with no cudaMalloc inside it.
        stream = cupy.cuda.Stream(non_blocking=True)
        # a non-blocking stream does not wait for the legacy default stream, where x and
        # the parameters may still be being written: wait once, here
        cupy.cuda.get_current_stream().synchronize()
        with stream:
            xs[...] = x
            run()
        stream.synchronize()
        keep: list = []
        with stream:
            be.kernels.keep_alive = keep  # every buffer the graph touches stays owned by it
            try:
                stream.begin_capture()
                try:
                    out = run()
                finally:
                    graph = stream.end_capture()
            finally:
                be.kernels.keep_alive = None
        stream.synchronize()
        entry = (xs, graph, out, keep, stream)
        self._graphs[key] = entry
        return entry

    def _replay(self, x, what: str):
        key = (what, tuple(x.shape), x.dtype.str)
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._capture(x, what)
        xs, graph, out, _keep, _stream = entry
        xs[...] = x  # on the current stream, ordered before the graph launch
        graph.launch()
        return out

    def __call__(self, x):
        """``(value, grads)`` of the loss at ``x``, from static buffers (see module doc)."""
        from .functional import value_and_grad

        if self._backend.name != "cuda" or self._backend.xp.__name__ != "cupy":
            return value_and_grad(self.model, x, self._loss, target=self._target)
        x2 = self._check(x)
        value, pairs = self._replay(x2, "grad")
        return value, self.model._grads_like_parameters(pairs)

    def forward(self, x):
        """The loss value only (forward pass with the loss fused), from a static buffer."""
        if self._backend.name != "cuda" or self._backend.xp.__name__ != "cupy":
            from .functional import forward
            from .losses import loss_forward

            return loss_forward(forward(self.model, x), self._spec.kind, self._target)
        return self._replay(self._check(x), "forward")[0]

    def _check(self, x):
        from .functional import _check_batch

        x2, _single = _check_batch(self.model, self._layers, x)
        return x2


def compile(model, loss: Any = "sum_squares", *, target=None) -> CompiledStep:  # noqa: A001
    """Capture ``value_and_grad(model, x, loss)`` as a CUDA graph; return ``step(x)``.

    ``step(x)`` returns ``(value, grads)`` like :func:`cupynn.value_and_grad`,
    from static buffers that the next call overwrites; ``x`` is copied into the
    graph's static input buffer. ``step.forward(x)`` replays the loss value alone.
    On a CPU model ``step`` is a plain wrapper of :func:`cupynn.value_and_grad`.

    Example
    -------
    >>> import numpy as np, cupynn
    >>> model = cupynn.MLP([1, 16, 1], "tanh", device="cpu", rng=0)
    >>> step = cupynn.compile(model, "sum_squares")
    >>> value, grads = step(np.linspace(-1, 1, 50).reshape(-1, 1))
    >>> grads[0]["weight"].shape
    (16, 1)
    """
    return CompiledStep(model, loss, target=target)
