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

from .backends import get_backend

__all__ = ["save", "load"]

_FORMAT = "cupynn-model-1"


def save(model, path, *, optimizer=None) -> None:
    """Write ``model`` (a Dense or Chain), and ``optimizer``'s state if given, to ``path`` (``.npz``)."""
    from .layers import Dense

    layers = model._dense_layers()
    backend = get_backend(model.device)
    arrays = {}
    for i, layer in enumerate(layers):
        arrays[f"layers.{i}.weight"] = backend.to_host(layer.weight)
        if layer.bias is not None:
            arrays[f"layers.{i}.bias"] = backend.to_host(layer.bias)
    meta = {
        "format": _FORMAT,
        "kind": "Dense" if isinstance(model, Dense) else "Chain",
        "precision": model.precision,
        "activations": [layer.activation.name for layer in layers],
    }
    if optimizer is not None:
        from .optim import state_arrays

        opt_meta, opt_arrays = state_arrays(optimizer.state_dict())
        arrays["optimizer.meta"] = np.array(opt_meta)
        arrays.update(opt_arrays)
    np.savez(path, meta=np.array(json.dumps(meta)), **arrays)


def load(path, *, device: str = "auto"):
    """Read a model written by :meth:`save` onto ``device`` ("auto", "cpu" or "cuda")."""
    from .layers import Chain, Dense

    with np.load(path, allow_pickle=False) as data:
        meta = json.loads(str(data["meta"]))
        if meta.get("format") != _FORMAT:
            raise ValueError(f"{path}: not a cupynn model file (format {meta.get('format')!r})")
        layers = []
        for i, act in enumerate(meta["activations"]):
            bias_key = f"layers.{i}.bias"
            layers.append(Dense.from_arrays(data[f"layers.{i}.weight"],
                                            data[bias_key] if bias_key in data else None, act))
    model = layers[0] if meta["kind"] == "Dense" else Chain(*layers)
    model.precision = meta["precision"]
    return model.to(device)
