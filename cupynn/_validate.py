"""Argument checks shared by the layers and the functional API.

Every check raises before any work is done, with a message that says what
was expected, what was received, and what to change. Nothing is cast or
copied silently.
"""

from __future__ import annotations

import numpy as np

from ._devices import array_device

__all__ = ["DeviceMismatchError", "as_float_dtype", "check_array", "check_precision", "PRECISIONS"]

PRECISIONS = ("strict", "tf32", "3xtf32")
_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


class DeviceMismatchError(TypeError):
    """An array lives on a different device (or library) than the model."""


def as_float_dtype(dtype) -> np.dtype:
    """``"float64"``/``np.float32``/... as a NumPy dtype; only float32 and float64."""
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"dtype must be 'float32' or 'float64', got {dtype!r}") from None
    if dt not in _FLOAT_DTYPES:
        raise TypeError(f"dtype must be 'float32' or 'float64', got {dt}")
    return dt


def check_precision(precision: str, dtype: np.dtype) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "strict" and dtype != np.float32:
        raise ValueError(f"precision={precision!r} applies to float32 models only; this one is {dtype}")
    return precision


def _move_hint(to_device: str) -> str:
    if to_device == "cuda":
        return "move it with cupy.asarray(a), or move the model with model.to('cpu')"
    return "move it with cupy.asnumpy(a) (or a.get()), or move the model with model.to('cuda')"


def check_array(a, *, what: str, device: str, dtype: np.dtype, ndim: tuple[int, ...]) -> None:
    """Check that ``a`` is an array on ``device`` with ``dtype`` and one of ``ndim``."""
    got = array_device(a)
    if got is None:
        kind = "a NumPy" if device == "cpu" else "a CuPy"
        raise TypeError(
            f"{what} must be {kind} array of dtype {dtype}, got {type(a).__name__}; "
            f"convert it explicitly, e.g. np.asarray(a, dtype=np.{dtype})"
        )
    if got != device:
        raise DeviceMismatchError(
            f"{what} is on '{got}' but the model is on '{device}': {_move_hint(device)}"
        )
    if a.dtype != dtype:
        raise TypeError(
            f"{what} has dtype {a.dtype} but the model is {dtype}; cupynn does not cast silently: "
            f"pass a.astype({dtype.name!r}) or build the model with dtype={a.dtype.name!r}"
        )
    if a.ndim not in ndim:
        dims = " or ".join(f"{d}-D" for d in ndim)
        raise ValueError(f"{what} must be {dims}, got shape {tuple(a.shape)}")
