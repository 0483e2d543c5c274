"""Writing a model file (the ``.npz`` that :func:`cupynn.load` reads).

Its own module so that ``layers`` (``model.save``) and ``io`` (``cupynn.save`` and
``cupynn.load``, which builds layers) need not import each other: ``io`` imports
``layers`` and this module, ``layers`` imports this module only.
"""

from __future__ import annotations

import json

import numpy as np

from . import _npz
from .backends import get_backend

FORMAT = "cupynn-model-1"
FORMAT_VERSION = 2  # meta["version"]; absent: 1


def write(model, path, *, optimizer=None) -> None:
    """Write ``model`` (whose class says ``_FILE_KIND``, "Dense" or "Chain") and ``optimizer``'s
    state to ``path`` (``.npz`` appended when missing, like ``numpy.savez``)."""
    layers = model._dense_layers()
    backend = get_backend(model.device)
    arrays = {}
    for i, layer in enumerate(layers):
        arrays[f"layers.{i}.weight"] = backend.to_host(layer.weight)
        if layer.bias is not None:
            arrays[f"layers.{i}.bias"] = backend.to_host(layer.bias)
    meta = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "kind": model._FILE_KIND,
        "dtype": model.dtype.name,
        "precision": model.precision,
        "activations": [layer.activation.name for layer in layers],
        "layers": [{"in": layer.in_features, "out": layer.out_features,
                    "activation": layer.activation.name, "bias": layer.bias is not None}
                   for layer in layers],
    }
    if optimizer is not None:
        from .optim import state_arrays

        opt_meta, opt_arrays = state_arrays(optimizer.state_dict())
        arrays["optimizer.meta"] = np.array(opt_meta)
        arrays.update(opt_arrays)
    _npz.savez_atomic(path, {"meta": np.array(json.dumps(meta)), **arrays})
