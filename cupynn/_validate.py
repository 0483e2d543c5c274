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
    """An array lives on a different device (or library) than the model.

    A subclass of ``TypeError``; the message says how to move the array or the model.

    >>> import numpy as np, cupynn
    >>> model = cupynn.Dense(2, 1, device="cpu")
    >>> try:
    ...     model(np.ones((3, 2)).tolist())
    ... except TypeError as exc:
    ...     print(type(exc).__name__)
    TypeError
    """


def as_float_dtype(dtype) -> np.dtype:
    """``"float64"``/``np.float32``/... as a NumPy dtype; only float32 and float64."""
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"dtype must be 'float32' or 'float64', got {dtype!r}") from None
    if dt not in _FLOAT_DTYPES:
        if dt.kind == "f" and not dt.isnative and dt.newbyteorder("=") in _FLOAT_DTYPES:
            native = dt.newbyteorder("=")
            raise TypeError(f"dtype {dt.str!r} is {native} in {'big' if dt.byteorder == '>' else 'little'}"
                            f"-endian byte order; cupynn computes in native byte order: convert "
                            f"the array with a.astype({native.name!r})")
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


def _dtype_message(what: str, got: np.dtype, want: np.dtype) -> str:
    """Why an array of dtype ``got`` is refused by a ``want`` model, and what to change."""
    if got.kind == "f" and got.newbyteorder("=") in _FLOAT_DTYPES and not got.isnative:
        native = got.newbyteorder("=")
        order = "big" if got.byteorder == ">" else "little"
        fix = f"a.astype({want.name!r})"
        if native != want:
            return (f"{what} is {native} in {order}-endian byte order ({got.str!r}) and the model is "
                    f"{want}; cupynn does not cast silently: pass {fix}")
        return (f"{what} is {native} like the model, but in {order}-endian byte order "
                f"({got.str!r}); cupynn computes in native byte order: pass {fix} (one copy)")
    hint = f"pass a.astype({want.name!r})"
    if got in _FLOAT_DTYPES:
        hint += f" or build the model with dtype={got.name!r}"
    else:
        hint += " (models are float32 or float64)"
    return f"{what} has dtype {got} but the model is {want}; cupynn does not cast silently: {hint}"


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
        raise TypeError(_dtype_message(what, a.dtype, dtype))
    if a.ndim not in ndim:
        dims = " or ".join(f"{d}-D" for d in ndim)
        raise ValueError(f"{what} must be {dims}, got shape {tuple(a.shape)}")
