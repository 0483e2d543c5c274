"""Saving and loading models as ``.npz`` files.

The file holds every parameter as ``layers.<i>.weight`` / ``layers.<i>.bias``
(NumPy arrays, whatever the model's device) and a JSON ``meta`` entry with
the architecture, so :func:`load` rebuilds the same model. ``save(model, path,
optimizer=opt)`` adds the optimizer's state (``optimizer.meta`` and
``optimizer.<name>.<i>``), which :func:`cupynn.optim.load_state` reads back.
"""

from __future__ import annotations

import json

import numpy as np

from . import _modelfile, _npz
from .layers import Chain, Dense

__all__ = ["save", "load"]

_FORMAT = _modelfile.FORMAT


def save(model, path, *, optimizer=None) -> None:
    """Write ``model`` (a Dense or Chain), and ``optimizer``'s state if given, to ``path``.

    Like ``numpy.savez``, a path without the ``.npz`` suffix gets it appended
    (``model.save("m")`` writes ``m.npz``; ``cupynn.load("m")`` finds it). A Chain
    that was built from nested Chains is saved flat: it loads as one Chain of
    its Dense layers.

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
    _modelfile.write(model, path, optimizer=optimizer)


def load(path, *, device: str = "auto"):
    """Read a model written by :meth:`save` onto ``device`` ("auto", "cpu" or "cuda").

    ``path`` may omit the ``.npz`` suffix that :func:`save` appended. A file
    that is not a cupynn model (another ``.npz``, a missing entry) is a
    ``ValueError`` that says what the file holds.

    Example
    -------
    >>> import cupynn, numpy as np, tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "layer.npz")
    >>> cupynn.Dense(3, 2, "relu", device="cpu", rng=0).save(path)
    >>> layer = cupynn.load(path, device="cpu")
    >>> layer, layer(np.ones((4, 3))).shape
    (Dense(3 => 2, relu), (4, 2))
    """
    path = _npz.resolve(path)
    data = np.load(path, allow_pickle=False)
    if not hasattr(data, "files"):
        raise ValueError(f"{path}: holds a single array, not a cupynn model (an .npz written by "
                         "model.save)")
    with data:
        if "meta" not in data.files:
            shown = ", ".join(sorted(data.files)[:8]) + (", ..." if len(data.files) > 8 else "")
            raise ValueError(f"{path}: not a cupynn model file: it has no 'meta' entry (its arrays: "
                             f"{shown or 'none'}); cupynn.load reads files written by model.save")
        try:
            meta = json.loads(str(data["meta"]))
        except ValueError as exc:
            raise ValueError(f"{path}: not a cupynn model file: its 'meta' entry is not JSON "
                             f"({exc})") from None
        if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
            got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
            raise ValueError(f"{path}: not a cupynn model file (format {got!r}, expected "
                             f"{_FORMAT!r})")
        layers = []
        for i, act in enumerate(meta["activations"]):
            weight_key, bias_key = f"layers.{i}.weight", f"layers.{i}.bias"
            if weight_key not in data.files:
                raise ValueError(f"{path}: the model file lists {len(meta['activations'])} layers "
                                 f"but has no {weight_key!r} array: the file is damaged")
            layers.append(Dense.from_arrays(data[weight_key],
                                            data[bias_key] if bias_key in data.files else None, act))
    model = layers[0] if meta["kind"] == "Dense" else Chain(*layers)
    model.precision = meta["precision"]
    return model.to(device)
