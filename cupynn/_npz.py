"""Where a ``.npz`` file that cupynn wrote is: ``save("m")`` writes ``m.npz``, as
``numpy.savez`` does, so every reader (``cupynn.load``, ``cupynn.optim.load_state``) takes
the path with or without the suffix."""

from __future__ import annotations

import os

__all__ = ["resolve"]


def resolve(path):
    """``path``, or ``path + ".npz"`` when only that exists (a file object: unchanged)."""
    if isinstance(path, (str, os.PathLike)):
        p = os.fspath(path)
        if not os.path.exists(p) and not p.endswith(".npz") and os.path.exists(p + ".npz"):
            return p + ".npz"
    return path
