"""``cupynn.dask``: value and gradient over a batch that lives on a Dask cluster.

The loss of a batch is a sum over its rows, so the work splits into chunks of
rows: every chunk of a ``dask.array`` ``X`` (chunked along the batch only) runs
:func:`cupynn.value_and_grad` on a Dask worker, and the chunks' values and
gradients are added up. Dask (``distributed``) does the scheduling, data
movement and recovery from lost workers; this module only builds the graph:

* the model travels to every worker **once** per call
  (``client.scatter(..., broadcast=True)``), not with each chunk (:func:`forward`'s
  lazy array carries it as one key of its graph, which each worker fetches once);
  Dask's memory manager may drop a copy that no queued chunk needs, and a worker
  then fetches it again from a peer;
* chunk ``i`` computes ``sum((y_i - t_i)**2)`` and its gradient with the
  worker's backend: a chunk that is a CuPy array runs on the worker's GPU (the
  worker moves its copy of the model there once), a NumPy chunk on the NumPy
  backend with ``cpu_threads`` lanes (BLAS runs one thread inside every cupynn call,
  through the counted owner of that limit in ``cupynn/_threads.py``; default 1, so
  that worker processes sharing a host, one per core, do not oversubscribe its cores);
* the chunk results are added in a **fixed binary tree over chunk indices**
  (``(0+1), (2+3), ...``, then the sums of those pairs, an odd last one going up
  alone), so the result is bit-identical whatever the number of workers, the
  order in which chunks finish, or a worker that died and had its chunks
  recomputed; ``"mse"`` divides by the total ``y.size`` once, at the end.

``value`` and ``grads`` come back like those of :func:`cupynn.value_and_grad`:
``value`` a 0-d array of the model's dtype, ``grads`` shaped like
``model.parameters()``, on the model's device. A chunk holds ``rows x width``
activations on its worker; the driver holds one gradient.

Needs the ``dask`` extra (``pip install "cupynn[dask]"``: ``dask[distributed]``
and ``threadpoolctl``) on the driver and on every worker, with cupynn itself.

In a script (the workers are new processes, so guard its body; the docstring of
:func:`value_and_grad` has a runnable example on an in-process cluster)::

    if __name__ == "__main__":
        client = distributed.Client(distributed.LocalCluster(n_workers=2, threads_per_worker=1))
        model = cupynn.MLP([1, 1000, 20, 1], "identity", device="cpu", rng=0)
        X = dask.array.from_array(np.linspace(-1, 1, 10**6).reshape(-1, 1), chunks=(10**5, 1))
        value, grads = cupynn.dask.value_and_grad(model, X, "sum_squares")
        Y = cupynn.dask.forward(model, X)      # lazy: a dask.array of outputs
"""

from __future__ import annotations

import contextlib
import copy
import math
import threading
import time
import uuid

import numpy as np

try:
    import dask
    import dask.array as da
    import distributed
except ImportError as _exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        f"cupynn.dask needs Dask's distributed scheduler ({_exc}): "
        'pip install "cupynn[dask]" (dask[distributed] and threadpoolctl)'
    ) from _exc

from . import functional
from .layers import Chain, Dense

__all__ = ["value_and_grad", "forward", "connect", "ChunkError"]

_LOSSES = ("sum_squares", "mse")


class ChunkError(RuntimeError):
    """A chunk's computation raised on a worker.

    ``index`` is the chunk's position along the batch (``X.blocks[index]``),
    ``rows`` its ``(start, stop)`` rows in ``X``, ``error`` the original
    exception's type name and ``detail`` its message.

    >>> import cupynn.dask
    >>> err = cupynn.dask.ChunkError(3, (300, 400), "ValueError", "x has 2 columns")
    >>> str(err), err.index, err.rows
    ('chunk 3 (rows 300:400 of X) failed: ValueError: x has 2 columns', 3, (300, 400))
    """

    def __init__(self, index: int, rows: tuple[int, int], error: str, detail: str):
        self.index, self.rows, self.error, self.detail = index, tuple(rows), error, detail
        super().__init__(f"chunk {index} (rows {rows[0]}:{rows[1]} of X) failed: {error}: {detail}")

    def __reduce__(self):  # travels from the worker to the caller by pickle
        return ChunkError, (self.index, self.rows, self.error, self.detail)


# -- the model on the workers ---------------------------------------------------

def _host(a):
    return None if a is None else (a.get() if hasattr(a, "get") and not isinstance(a, np.ndarray)
                                   else np.asarray(a))


def _build(kind: str, precision: str, layers) -> Dense | Chain:
    dense = [Dense.from_arrays(W, b, act) for W, b, act in layers]
    return dense[0] if kind == "Dense" else Chain(*dense, precision=precision)


class _Shipped:
    """A model as every worker holds it: built once per worker process, moved to the
    device its chunks need once. Pickles as host arrays and the architecture."""

    def __init__(self, model):
        self._models = {model.device: model}
        self._lock = threading.Lock()

    @classmethod
    def _from_parts(cls, kind, precision, layers):
        return cls(_build(kind, precision, layers))

    def __reduce__(self):
        model = next(iter(self._models.values()))
        layers = [(_host(l.weight), _host(l.bias), l.activation.name) for l in model._dense_layers()]
        kind = "Dense" if isinstance(model, Dense) else "Chain"
        return _Shipped._from_parts, (kind, model.precision, layers)

    def on(self, device: str):
        """This worker's copy of the model on ``device`` ("cpu" or "cuda")."""
        model = self._models.get(device)
        if model is not None:
            return model
        with self._lock:
            if device not in self._models:
                source = next(iter(self._models.values()))
                # a new object: tasks still running on the old copy keep theirs; a GPU
                # worker then holds the model on its GPU only
                self._models = {device: copy.deepcopy(source).to(device)}
            return self._models[device]


def _shipped(model) -> _Shipped:
    """A private copy of ``model`` to scatter (the caller's model is never moved)."""
    if not isinstance(model, (Dense, Chain)):
        raise TypeError(f"model must be a cupynn Dense or Chain, got {type(model).__name__}")
    layers = [(_host(l.weight), _host(l.bias), l.activation.name) for l in model._dense_layers()]
    kind = "Dense" if isinstance(model, Dense) else "Chain"
    return _Shipped(_build(kind, model.precision, layers))


# -- CPU threads on CPU workers ------------------------------------------------



def _device_of(x) -> str:
    return "cuda" if type(x).__module__.split(".")[0] == "cupy" else "cpu"


def _flat(grads) -> list:
    items = grads if isinstance(grads, list) else [grads]
    return [a for g in items for a in (g["weight"], g["bias"])]


def _structured(model, flat):
    pairs = [{"weight": flat[i], "bias": flat[i + 1]} for i in range(0, len(flat), 2)]
    return pairs[0] if isinstance(model, Dense) else pairs


# -- tasks (run on the workers) ----------------------------------------------------

@contextlib.contextmanager
def _cpu_threads(n: int | None):
    """A chunk's thread budget: at most ``n`` NumPy-backend lanes for this worker thread
    (``None``: the worker's own settings). BLAS needs no limit of its own here: cupynn's calls
    run it at one thread through the one, counted, owner of that limit (cupynn/_threads.py)."""
    if n is None:
        yield
        return
    from ._threads import lane_limit  # the one owner of cupynn's CPU threads

    with lane_limit(int(n)):
        yield


def _check_rows(a, rows, what):
    """A chunk must have the rows its array's ``chunks`` declare: the value and ``mse``'s
    divisor are computed from them on the driver."""
    want = rows[1] - rows[0]
    got = getattr(a, "shape", (None,))[0] if getattr(a, "ndim", 0) >= 1 else None
    if got != want:
        raise ValueError(f"this chunk of {what} has {got} rows but {what}.chunks declares {want} "
                         f"(rows {rows[0]}:{rows[1]}): a chunk function returned the wrong "
                         "number of rows; fix it or declare the true chunks")


def _chunk_value_and_grad(shipped, x, target, index, rows, cpu_threads):
    """``(sum of squares as a Python float, [dW0, db0, dW1, ...])`` of one chunk."""
    try:
        _check_rows(x, rows, "X")
        if target is not None:
            _check_rows(target, rows, "target")
        with _cpu_threads(cpu_threads):
            model = shipped.on(_device_of(x))
            value, grads = functional.value_and_grad(model, x, "sum_squares", target=target)
            return float(value), _flat(grads)
    except Exception as exc:
        raise ChunkError(index, rows, type(exc).__name__, str(exc)) from None


def _add(a, b):
    if a is None:
        return None
    if type(a) is not type(b):  # chunks of one array on different devices: add on the host
        a, b = _host(a), _host(b)
    return a + b


def _combine(left, right):
    """One node of the fixed summation tree: left + right (in that order)."""
    return left[0] + right[0], [_add(a, b) for a, b in zip(left[1], right[1])]


def _finish(total, scale, dtype):
    """The root: scale once (``1/y.size`` for mse) and bring the gradient to the host."""
    value, flat = total
    dt = np.dtype(dtype)
    s = dt.type(scale)
    grads = [None if a is None else (_host(a) * s if scale != 1.0 else _host(a)) for a in flat]
    return np.asarray(value * scale, dtype=dt), grads


def _chunk_forward(x, shipped, cpu_threads, block_info=None):
    info = block_info[0]
    try:
        _check_rows(x, info["array-location"][0], "X")
        with _cpu_threads(cpu_threads):
            return shipped.on(_device_of(x))(x)
    except Exception as exc:
        raise ChunkError(info["chunk-location"][0], info["array-location"][0],
                         type(exc).__name__, str(exc)) from None


# -- checks on the driver -----------------------------------------------------

def _check_batch_array(a, what: str, width: int, width_name: str, dtype: np.dtype):
    if not isinstance(a, da.Array):
        raise TypeError(
            f"{what} must be a dask.array, got {type(a).__name__}: wrap it, e.g. "
            f"dask.array.from_array({what}, chunks=(100_000, -1)); for an array that "
            "fits one process call cupynn.value_and_grad"
        )
    if a.ndim != 2:
        raise ValueError(f"{what} must be 2-D (batch, {width_name}), got shape {a.shape}")
    if len(a.chunks[1]) != 1:
        raise ValueError(
            f"{what} must be chunked along the batch (axis 0) only; it has {len(a.chunks[1])} "
            f"chunks along axis 1 {a.chunks[1]}: use {what}.rechunk({{1: -1}})"
        )
    if any(math.isnan(c) for c in a.chunks[0]):
        raise ValueError(
            f"{what} has unknown chunk sizes along the batch: call "
            f"{what}.compute_chunk_sizes() first"
        )
    if a.shape[1] != width:
        raise ValueError(f"{what} must have shape (batch, {width}) for this model, got {a.shape}")
    if a.dtype != dtype:
        raise TypeError(
            f"{what} has dtype {a.dtype} but the model is {dtype}; cupynn does not cast silently: "
            f"pass {what}.astype({dtype.name!r}) or build the model with "
            f"dtype={a.dtype.name!r}"
        )


def _check_timeout(timeout, what="timeout"):
    if timeout is None:
        return None
    if isinstance(timeout, (bool, np.bool_)) or not isinstance(timeout, (int, float, np.integer,
                                                                         np.floating)):
        raise TypeError(f"{what} must be a number of seconds > 0 or None, got "
                        f"{type(timeout).__name__} {timeout!r}")
    if not (math.isfinite(float(timeout)) and timeout > 0):
        raise ValueError(f"{what} must be a finite number of seconds > 0 or None, got {timeout!r}")
    return float(timeout)


def _check_workers(client, workers):
    """``workers`` as a list of the cluster's workers (addresses, names or hosts), or None."""
    if workers is None:
        return None
    items = [workers] if isinstance(workers, str) else workers
    if not isinstance(items, (list, tuple, set)) or not items:
        raise TypeError(f"workers must be a worker address or a non-empty list of them, got "
                        f"{workers!r}")
    info = client.scheduler_info()
    known = set()
    for addr, w in info.get("workers", {}).items():
        known |= {addr, str(w.get("name")), w.get("host")}
    unknown = [w for w in items if not isinstance(w, str) or w not in known]
    if unknown:
        shown = sorted(a for a in info.get("workers", {}))[:8]
        raise ValueError(f"workers {unknown!r} are not workers of this cluster; its workers are "
                         f"{shown or 'none'}")
    return list(items)


def _check_cpu_threads(n):
    if n is not None and (not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1):
        raise ValueError(f"cpu_threads must be a positive integer or None, got {n!r}")


def _get_client(client):
    if client is None:
        try:
            client = distributed.default_client()
        except ValueError:
            raise ValueError(
                "no Dask client is running: start one (distributed.Client() for this machine, "
                "cupynn.dask.connect('tcp://host:8786') for a running scheduler) or pass client="
            ) from None
    if not isinstance(client, distributed.Client):
        raise TypeError(f"client must be a distributed.Client, got {type(client).__name__}")
    if client.status != "running":
        raise ConnectionError(
            f"the Dask client is {client.status!r}: its scheduler "
            f"({getattr(client.scheduler, 'address', '?')}) cannot be reached; connect again with "
            "cupynn.dask.connect(address)"
        )
    return client


def _scatter(client, model, workers, timeout):
    t = timeout if timeout is not None else _connect_timeout()
    try:
        return client.scatter(_shipped(model), broadcast=True, hash=False, workers=workers,
                              timeout=t)
    except (OSError, TimeoutError, distributed.comm.CommClosedError) as exc:
        raise ConnectionError(
            f"could not send the model to the Dask workers within {t:g} s ({type(exc).__name__}: "
            f"{exc}); is the scheduler at {getattr(client.scheduler, 'address', '?')} reachable "
            "and does it have workers?"
        ) from exc


def _connect_timeout() -> float:
    from dask.utils import parse_timedelta

    return float(parse_timedelta(dask.config.get("distributed.comm.timeouts.connect"), "s"))


# -- public API -----------------------------------------------------------------

def value_and_grad(model, X, loss="sum_squares", *, target=None, client=None, workers=None,
                   timeout=None, cpu_threads=1):
    """``loss(model(X))`` and its gradient w.r.t. every weight and bias, chunk by chunk on Dask.

    ``L = sum_i sum((model(X_i) - T_i)**2)`` over the chunks ``X_i`` of ``X`` (``"sum_squares"``),
    or the same divided by ``batch * out_features`` (``"mse"``); ``dL/dW`` likewise the sum of
    the chunks' gradients, added in a fixed binary tree over chunk indices (bit-identical
    for any number of workers and any completion order; equal to one
    :func:`cupynn.value_and_grad` on the whole batch up to rounding).

    Parameters
    ----------
    model : Dense or Chain (on any device; it is not modified)
    X : ``dask.array`` of shape ``(batch, in)``, the model's dtype, chunked along the batch
        only (``X.rechunk({1: -1})``); chunks that are CuPy arrays run on the workers' GPUs
        (e.g. ``X.map_blocks(cupy.asarray)``), NumPy chunks on their CPUs
    loss : ``"sum_squares"`` or ``"mse"``
    target : optional ``dask.array`` ``(batch, out)`` with ``X``'s chunks along the batch
    client : a ``distributed.Client`` (default: the current one)
    workers : optional worker addresses to restrict the model and the chunks to
    timeout : seconds to wait for the result (``None``: no limit); a cluster without workers
        fails when the model is scattered, after ``timeout`` or, when ``None``,
        ``distributed.comm.timeouts.connect``
    cpu_threads : threads per running chunk on CPU workers: the NumPy backend's lanes and
        BLAS's threads (default 1: run one single-threaded worker per core; ``None``
        leaves the workers' settings alone: lanes on every core, ``CUPYNN_CPU_THREADS``)

    Returns
    -------
    ``(value, grads)``: ``value`` a 0-d array of the model's dtype, ``grads`` shaped like
    ``model.parameters()``, both on the model's device.

    Raises
    ------
    ChunkError
        a chunk raised on its worker (its index and rows are in the message)
    ConnectionError, TimeoutError
        the scheduler cannot be reached, or the result did not come within ``timeout``

    Example
    -------
    >>> import dask.array as da, cupynn, cupynn.dask
    >>> from distributed import Client, LocalCluster
    >>> cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
    ...                        dashboard_address=":0")
    >>> client = Client(cluster)
    >>> model = cupynn.MLP([3, 64, 1], "tanh", device="cpu", rng=0)
    >>> X = da.random.default_rng(0).uniform(-1, 1, (20_000, 3), chunks=(5_000, 3))
    >>> value, grads = cupynn.dask.value_and_grad(model, X, "mse", target=X[:, :1] ** 2)
    >>> value.dtype, grads[0]["weight"].shape
    (dtype('float64'), (64, 3))
    >>> cupynn.dask.value_and_grad(model, X.rechunk((5_000, 1)))   # chunked along the inputs
    Traceback (most recent call last):
    ...
    ValueError: X must be chunked along the batch (axis 0) only; ... use X.rechunk({1: -1})
    >>> client.close(); cluster.close()
    """
    if loss not in _LOSSES:
        raise ValueError(
            f"cupynn.dask.value_and_grad takes loss={' or '.join(map(repr, _LOSSES))}, got "
            f"{loss!r}: a callable loss sees one chunk at a time, so it is not supported"
        )
    if not isinstance(model, (Dense, Chain)):
        raise TypeError(f"model must be a cupynn Dense or Chain, got {type(model).__name__}")
    _check_cpu_threads(cpu_threads)
    timeout = _check_timeout(timeout)
    layers = model._dense_layers()
    n_in, n_out = layers[0].in_features, layers[-1].out_features
    _check_batch_array(X, "X", n_in, "in", model.dtype)
    if target is not None:
        _check_batch_array(target, "target", n_out, "out", model.dtype)
        if target.chunks[0] != X.chunks[0]:
            raise ValueError(
                f"target must be chunked like X along the batch: X has chunks {X.chunks[0]}, "
                f"target {target.chunks[0]}: use target.rechunk({{0: X.chunks[0], 1: -1}})"
            )
    client = _get_client(client)
    workers = _check_workers(client, workers)

    name = f"cupynn-value-and-grad-{uuid.uuid4().hex[:12]}"
    x_blocks = X.to_delayed().ravel()
    t_blocks = target.to_delayed().ravel() if target is not None else [None] * len(x_blocks)
    starts = np.concatenate([[0], np.cumsum(X.chunks[0])]).astype(int).tolist()
    size = X.shape[0] * n_out
    scale = (1.0 / size if size else 0.0) if loss == "mse" else 1.0

    shipped = _scatter(client, model, workers, timeout)
    future = None
    try:
        level = [
            dask.delayed(_chunk_value_and_grad, pure=True)(
                shipped, xb, tb, i, (starts[i], starts[i + 1]), cpu_threads,
                dask_key_name=f"{name}-chunk-{i}")
            for i, (xb, tb) in enumerate(zip(x_blocks, t_blocks))
        ]
        depth = 0
        while len(level) > 1:  # the fixed tree: pairs (0,1), (2,3), ...; an odd last goes up
            pairs = [dask.delayed(_combine, pure=True)(level[j], level[j + 1],
                                                       dask_key_name=f"{name}-sum-{depth}-{j // 2}")
                     for j in range(0, len(level) - 1, 2)]
            level = pairs + (level[-1:] if len(level) % 2 else [])
            depth += 1
        root = dask.delayed(_finish, pure=True)(level[0], scale, model.dtype.str,
                                                dask_key_name=f"{name}-total")
        future = client.compute(root, workers=workers, allow_other_workers=False)
        try:
            value, flat = future.result(timeout=timeout)
        except (TimeoutError, distributed.TimeoutError):
            raise TimeoutError(
                f"cupynn.dask.value_and_grad: no result within timeout={timeout} s "
                f"({X.numblocks[0]} chunks); the computation was cancelled"
            ) from None
        except ChunkError:
            raise
        except Exception as exc:  # a task of X's (or target's) own graph raised
            index = _blamed_chunk(client, future, len(x_blocks))
            rows = (starts[index], starts[index + 1]) if index is not None else (0, X.shape[0])
            raise ChunkError(-1 if index is None else index, rows, type(exc).__name__,
                             f"computing the input chunk itself failed: {exc}") from None
    except BaseException:
        if future is not None:
            future.cancel()  # stop what still runs; nothing of this call stays on the workers
        raise
    finally:
        if future is not None:
            future.release()
        shipped.release()
    if model.device == "cuda":
        import cupy

        value = cupy.asarray(value)
        flat = [None if a is None else cupy.asarray(a) for a in flat]
    return value, _structured(model, flat)


def _blamed_chunk(client, future, n_chunks):
    """The batch index of the task that raised for ``future`` (dask arrays' keys are
    ``(name, i, j)``, ``i`` the block along the batch), or None when that cannot be told."""
    def blame(dask_scheduler=None, key=None):
        ts = dask_scheduler.tasks.get(key)
        culprit = getattr(ts, "exception_blame", None) if ts is not None else None
        return None if culprit is None else culprit.key

    try:
        key = client.run_on_scheduler(blame, key=future.key)
    except Exception:  # noqa: BLE001 - the scheduler is gone: no index
        return None
    if isinstance(key, tuple) and len(key) >= 2 and isinstance(key[1], int) \
            and 0 <= key[1] < n_chunks:
        return key[1]
    return None


def forward(model, X, *, cpu_threads=1):
    """The model's outputs for ``X``, lazily: a ``dask.array`` ``(batch, out)`` chunked like ``X``.

    ``Y_i = model(X_i)`` for every chunk ``X_i`` (``y = act(x @ W.T + b)`` layer by layer),
    computed where and when ``Y`` is computed (any Dask scheduler); CuPy chunks give CuPy
    output chunks, computed on the worker's GPU. The model is one key of ``Y``'s graph,
    which every worker fetches once (a lazy array holds no state on the cluster, and a
    lost worker's chunks are recomputed). ``X`` must be as for :func:`value_and_grad`, and
    ``cpu_threads`` means what it means there.

    Example
    -------
    >>> import numpy as np, dask.array as da, cupynn, cupynn.dask
    >>> model = cupynn.MLP([3, 16, 2], "tanh", device="cpu", rng=0)
    >>> x = np.random.default_rng(0).uniform(-1, 1, (1000, 3))
    >>> Y = cupynn.dask.forward(model, da.from_array(x, chunks=(300, 3)))
    >>> Y.shape, Y.chunks
    ((1000, 2), ((300, 300, 300, 100), (2,)))
    >>> bool(np.allclose(Y.compute(scheduler="threads"), model(x), rtol=1e-12, atol=0))
    True
    """
    if not isinstance(model, (Dense, Chain)):
        raise TypeError(f"model must be a cupynn Dense or Chain, got {type(model).__name__}")
    _check_cpu_threads(cpu_threads)
    layers = model._dense_layers()
    _check_batch_array(X, "X", layers[0].in_features, "in", model.dtype)
    token = uuid.uuid4().hex[:12]
    shipped = dask.delayed(_shipped(model), name=f"cupynn-model-{token}")
    return X.map_blocks(_chunk_forward, shipped, cpu_threads, dtype=model.dtype,
                        chunks=(X.chunks[0], (layers[-1].out_features,)), meta=X._meta,
                        name=f"cupynn-forward-{token}")


def connect(address: str, *, timeout: float = 10.0) -> distributed.Client:
    """A ``distributed.Client`` for the scheduler at ``address``, or a ``ConnectionError``
    within ``timeout`` seconds (never a hang).

    >>> import cupynn.dask
    >>> cupynn.dask.connect("tcp://127.0.0.1:9", timeout=1)   # nothing listens there
    Traceback (most recent call last):
    ...
    ConnectionError: could not reach a Dask scheduler at 'tcp://127.0.0.1:9' within 1 s ...
    """
    timeout = _check_timeout(timeout)
    if timeout is None:
        raise TypeError("timeout must be a number of seconds > 0 (connect never waits without limit)")
    if not isinstance(address, str):
        raise TypeError(f"address must be a string such as 'tcp://host:8786', got "
                        f"{type(address).__name__}")

    def fail(why):
        return ConnectionError(
            f"could not reach a Dask scheduler at {address!r} within {timeout:g} s ({why}); start "
            "one (`dask scheduler`, or distributed.LocalCluster()) or check the address")

    # distributed.Client waits without a limit for a peer that accepts the connection but
    # never answers; so ask the scheduler for its identity first, on a thread of our own
    # bounded by the timeout, and only then make the client
    t0 = time.monotonic()
    try:
        _probe(address, timeout)
    except Exception as exc:  # noqa: BLE001 - whatever the peer provoked
        raise fail(f"{type(exc).__name__}: {exc}") from None
    left = max(timeout - (time.monotonic() - t0), 0.5)
    try:
        return distributed.Client(address, timeout=left)
    except Exception as exc:  # OSError on a timeout; anything a non-Dask peer provokes
        raise fail(f"{type(exc).__name__}: {exc}") from None


def _probe(address: str, timeout: float) -> None:
    """Raise unless a Dask scheduler at ``address`` answers an identity request within
    ``timeout`` seconds (a thread of our own, so that no event loop of the caller's is
    needed and a silent peer cannot hold the caller)."""
    import asyncio

    async def identity():
        comm = await distributed.comm.connect(address, timeout=timeout)
        try:
            await comm.write({"op": "identity", "reply": True})
            reply = await comm.read()
        finally:
            comm.abort()
        if not isinstance(reply, dict) or reply.get("type") != "Scheduler":
            raise OSError(f"the peer is not a Dask scheduler (it answered {str(reply)[:80]!r})")

    result: dict = {}

    def run():
        try:
            asyncio.run(asyncio.wait_for(identity(), timeout))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            result["error"] = exc

    thread = threading.Thread(target=run, name="cupynn-dask-probe", daemon=True)
    thread.start()
    thread.join(timeout + 1.0)
    if thread.is_alive():
        raise TimeoutError("no answer to an identity request")
    if "error" in result:
        exc = result["error"]
        if isinstance(exc, asyncio.TimeoutError):
            raise TimeoutError("no answer to an identity request")
        raise exc
