"""Saving and loading models as ``.npz`` files.

The file holds every parameter as ``layers.<i>.weight`` / ``layers.<i>.bias``
(NumPy arrays, whatever the model's device) and a JSON ``meta`` entry with
the architecture, so :func:`load` rebuilds the same model. ``save(model, path,
optimizer=opt)`` adds the optimizer's state (``optimizer.meta`` and
``optimizer.<name>.<i>``), which :func:`cupynn.optim.load_state` reads back.

Format version 2 (``meta["version"]``) lists every layer (sizes, activation, whether it
has a bias) and the dtype, so that every member is checked against it on loading: a
missing or extra member, a wrong shape or dtype, an unknown activation or kind is a
:class:`cupynn.FileFormatError` naming the file and the member. Files without a version
(written before it was added) are version 1 and still load. Files are written
atomically (a temporary file renamed over the old one).
"""

from __future__ import annotations

import json

import numpy as np

from . import _modelfile, _npz
from ._validate import PRECISIONS, FileFormatError
from .activations import ACTIVATIONS
from .layers import Chain, Dense

__all__ = ["save", "load", "FORMAT_VERSION"]

_FORMAT = _modelfile.FORMAT
FORMAT_VERSION = _modelfile.FORMAT_VERSION


def save(model, path, *, optimizer=None) -> None:
    """Write ``model`` (a Dense or Chain), and ``optimizer``'s state if given, to ``path``.

    Like ``numpy.savez``, a path without the ``.npz`` suffix gets it appended
    (``model.save("m")`` writes ``m.npz``; ``cupynn.load("m")`` finds it). A Chain
    that was built from nested Chains is saved flat: it loads as one Chain of
    its Dense layers. The file is written atomically: to a temporary file in the
    same directory, renamed over ``path`` once complete.

    Example
    -------
    >>> import cupynn, tempfile, os
    >>> m = cupynn.MLP([2, 3, 1], "tanh", device="cpu", rng=0)
    >>> path = os.path.join(tempfile.mkdtemp(), "m")
    >>> m.save(path)                      # writes .../m.npz
    >>> cupynn.load(path, device="cpu")
    Chain(
      Dense(2 => 3, tanh),
      Dense(3 => 1),
    )
    """
    if not isinstance(model, (Dense, Chain)):
        raise TypeError(f"model must be a cupynn Dense or Chain, got {type(model).__name__}")
    _modelfile.write(model, path, optimizer=optimizer)


def _meta(f: _npz.Reader) -> dict:
    """The checked ``meta`` of a model file: version, kind, dtype, precision and layers
    ``[(in, out, activation, bias or None (unknown: version 1))]``."""
    if "meta" not in f.members:
        shown = ", ".join(sorted(f.members)[:8]) + (", ..." if len(f.members) > 8 else "")
        raise FileFormatError(f.name, "meta", f"is missing: not a cupynn model file (its arrays: "
                                              f"{shown or 'none'}); cupynn.load reads files "
                                              "written by model.save")
    try:
        meta = json.loads(f.text("meta"))
    except ValueError as exc:
        if isinstance(exc, FileFormatError):
            raise
        raise FileFormatError(f.name, "meta", f"is not JSON ({exc})") from None

    def bad(message):
        return FileFormatError(f.name, "meta", message)

    if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise bad(f"not a cupynn model file (format {got!r}, expected {_FORMAT!r})")
    version = meta.get("version", 1)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise bad(f"the format version must be a positive integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise bad(f"format version {version} was written by a newer cupynn; this one reads "
                  f"versions 1 to {FORMAT_VERSION}: upgrade cupynn")
    kind = meta.get("kind")
    if kind not in ("Dense", "Chain"):
        raise bad(f"kind must be 'Dense' or 'Chain', got {kind!r}")
    precision = meta.get("precision")
    if precision not in PRECISIONS:
        raise bad(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if version == 1:
        acts = meta.get("activations")
        if not isinstance(acts, list) or not acts:
            raise bad(f"activations must be a non-empty list, got {acts!r}")
        layers = [(None, None, a, None) for a in acts]
        dtype = None
    else:
        spec = meta.get("layers")
        if not isinstance(spec, list) or not spec:
            raise bad(f"layers must be a non-empty list, got {spec!r}")
        layers = []
        for i, L in enumerate(spec):
            ok = (isinstance(L, dict) and set(L) == {"in", "out", "activation", "bias"}
                  and all(isinstance(L[k], int) and not isinstance(L[k], bool) and L[k] >= 1
                          for k in ("in", "out")) and isinstance(L["bias"], bool))
            if not ok:
                raise bad(f"layers[{i}] must be {{'in': int >= 1, 'out': int >= 1, 'activation': "
                          f"name, 'bias': bool}}, got {L!r}")
            layers.append((L["in"], L["out"], L["activation"], L["bias"]))
        dtype = meta.get("dtype")
        if dtype not in ("float32", "float64"):
            raise bad(f"dtype must be 'float32' or 'float64', got {dtype!r}")
    for i, (_, _, act, _) in enumerate(layers):
        if act not in ACTIVATIONS:
            raise bad(f"layer {i} has the unknown activation {act!r} (known: {', '.join(ACTIVATIONS)})")
    if kind == "Dense" and len(layers) != 1:
        raise bad(f"kind 'Dense' is one layer, but the file lists {len(layers)}")
    if precision != "strict" and dtype == "float64":
        raise bad(f"precision {precision!r} is for float32 models; this one is float64")
    return {"version": version, "kind": kind, "precision": precision, "dtype": dtype,
            "layers": layers}


def _read_layers(f: _npz.Reader, meta: dict) -> list:
    """``[(W, b)]`` of a model file, every member checked against ``meta``."""
    dtype = None if meta["dtype"] is None else np.dtype(meta["dtype"])
    out, prev = [], None
    for i, (n_in, n_out, _act, has_bias) in enumerate(meta["layers"]):
        wkey, bkey = f"layers.{i}.weight", f"layers.{i}.bias"
        W = f.array(wkey)
        if dtype is None:  # version 1: the first weight says
            if W.dtype not in (np.float32, np.float64):
                raise FileFormatError(f.name, wkey, f"must be float32 or float64, got {W.dtype}")
            dtype = W.dtype
        if W.dtype != dtype or W.ndim != 2 or 0 in W.shape:
            raise FileFormatError(f.name, wkey, f"must be a 2-D non-empty {dtype} array, got shape "
                                                f"{W.shape} and dtype {W.dtype}")
        if n_in is not None and W.shape != (n_out, n_in):
            raise FileFormatError(f.name, wkey, f"must have shape ({n_out}, {n_in}) as the file's "
                                                f"meta lists, got {W.shape}")
        if prev is not None and W.shape[1] != prev:
            raise FileFormatError(f.name, wkey, f"has {W.shape[1]} inputs but layer {i - 1} has "
                                                f"{prev} outputs")
        prev = W.shape[0]
        if has_bias is None:  # version 1: the member says
            has_bias = bkey in f.members
        b = None
        if has_bias:
            b = f.array(bkey)
            if b.dtype != dtype or b.shape != (W.shape[0],):
                raise FileFormatError(f.name, bkey, f"must be a {dtype} array of shape "
                                                    f"({W.shape[0]},), got shape {b.shape} and "
                                                    f"dtype {b.dtype}")
        elif bkey in f.members:
            raise FileFormatError(f.name, bkey, "is present but the file's meta lists layer "
                                                f"{i} without a bias")
        out.append((W, b))
    if meta["precision"] != "strict" and dtype != np.float32:
        raise FileFormatError(f.name, "meta", f"precision {meta['precision']!r} is for float32 "
                                              f"models; this one is {dtype}")
    return out


def _expected_members(f: _npz.Reader, meta: dict) -> None:
    """No member the format does not describe (the optimizer's are checked by its reader)."""
    n = len(meta["layers"])
    known = {"meta"} | {f"layers.{i}.{k}" for i in range(n) for k in ("weight", "bias")}
    extra = sorted(m for m in f.members - known if not m.startswith("optimizer."))
    if extra:
        raise FileFormatError(f.name, extra[0], f"is not part of a cupynn model file of {n} "
                                                f"layer(s) (unexpected members: {extra[:5]})")


def load(path, *, device: str = "auto"):
    """Read a model written by :meth:`save` onto ``device`` ("auto", "cpu" or "cuda").

    ``path`` may omit the ``.npz`` suffix that :func:`save` appended. Every member of the
    file is checked against its ``meta`` before the model is built; a file that is not a
    cupynn model, or is damaged (truncated, altered, a member missing or extra) raises
    :class:`cupynn.FileFormatError` naming the file and the member (a missing file:
    ``FileNotFoundError``). Nothing is ever unpickled.

    Example
    -------
    >>> import cupynn, numpy as np, tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "layer.npz")
    >>> cupynn.Dense(3, 2, "relu", device="cpu", rng=0).save(path)
    >>> layer = cupynn.load(path, device="cpu")
    >>> layer, layer(np.ones((4, 3))).shape
    (Dense(3 => 2, relu), (4, 2))
    """
    from ._devices import resolve_device
    device = resolve_device(device)
    with _npz.Reader(path, "a cupynn model file") as f:
        meta = _meta(f)
        _expected_members(f, meta)
        arrays = _read_layers(f, meta)
    layers = [Dense.from_arrays(W, b, act) for (W, b), (_, _, act, _) in zip(arrays, meta["layers"])]
    model = layers[0] if meta["kind"] == "Dense" else Chain(*layers, precision=meta["precision"])
    if meta["kind"] == "Dense":
        model.precision = meta["precision"]
    return model.to(device)
