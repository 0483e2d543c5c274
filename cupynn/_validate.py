"""Argument checks shared by the layers and the functional API.

Every check raises before any work is done, with a message that says what
was expected, what was received, and what to change. Nothing is cast or
copied silently.
"""

from __future__ import annotations

import numpy as np

from ._devices import array_device

__all__ = ["DeviceMismatchError", "FileFormatError", "as_float_dtype", "check_array", "check_precision",
           "check_int", "check_count", "check_real", "check_writeable", "check_out_array", "first_overlap",
           "PRECISIONS"]

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


class FileFormatError(ValueError):
    """A file is not a cupynn file, or is damaged: the one error :func:`cupynn.load` and
    :func:`cupynn.optim.load_state` raise for what a file holds.

    A subclass of ``ValueError``. ``path`` is the file, ``member`` the entry of the
    ``.npz`` archive at fault (None for the file as a whole); the message names both and
    says what was expected.

    >>> import cupynn, os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "notes.txt")
    >>> _ = open(path, "w").write("hello")
    >>> try:
    ...     cupynn.load(path)
    ... except cupynn.FileFormatError as exc:
    ...     print(exc.member, "|", str(exc)[-47:])
    None | not an .npz archive (it starts with b'hello')
    """

    def __init__(self, path, member, message: str):
        self.path, self.member = path, member
        where = f"{path}" if member is None else f"{path} [{member}]"
        super().__init__(f"{where}: {message}")

    def __reduce__(self):
        return _file_format_error, (self.path, self.member, str(self), type(self))


def _file_format_error(path, member, text, cls):
    err = cls.__new__(cls)
    ValueError.__init__(err, text)
    err.path, err.member = path, member
    return err


def check_int(value, what: str, *, minimum: int | None = None) -> int:
    """``value`` as an ``int``: a Python or NumPy integer (not a bool, a float or a string),
    at least ``minimum``; else a ``TypeError``/``ValueError`` naming ``what``.

    >>> check_int(np.int64(3), "batch", minimum=0)
    3
    """
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{what} must be an integer, got {type(value).__name__} {value!r}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{what} must be an integer >= {minimum}, got {value}")
    return value


def check_count(value, what: str) -> int:
    """A count read from data (a step count): a non-negative integer -- a Python or NumPy
    integer, or an integral finite float such as JSON may give -- else a ``ValueError``
    naming ``what`` (never a bool, an ``inf`` or a string).

    >>> check_count(7.0, "the step count")
    7
    """
    ok = not isinstance(value, (bool, np.bool_)) and (
        isinstance(value, (int, np.integer))
        or (isinstance(value, (float, np.floating)) and np.isfinite(value) and value == int(value)))
    if not ok or value < 0:
        raise ValueError(f"{what} must be a non-negative integer, got {value!r}")
    return int(value)


def check_real(value, what: str, *, finite: bool = True) -> float:
    """``value`` as a ``float``: a real Python or NumPy number (not a bool, a complex or a
    string), finite unless ``finite=False``; else a ``TypeError``/``ValueError`` naming ``what``.

    >>> check_real(2, "k")
    2.0
    """
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer,
                                                                     np.floating)):
        raise TypeError(f"{what} must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    if finite and not np.isfinite(value):
        raise ValueError(f"{what} must be a finite number, got {value!r}")
    return value


def check_loss_value(value, dtype: np.dtype, who: str):
    """The value a user's loss or residual callable returned, checked: a real scalar -- a
    Python ``int``/``float``, a NumPy real scalar or a 0-d real array (NumPy or CuPy) --
    returned as it is; ``None``, a bool, a complex number, a string or an array with any
    dimension is an error naming ``who`` (never a NaN, a silent ``.real`` or a vector
    passed off as a scalar).

    >>> check_loss_value(1.5, np.dtype("float64"), "the loss callable")
    1.5
    """
    shape = getattr(value, "shape", None)
    kind = getattr(getattr(value, "dtype", None), "kind", None)
    if isinstance(value, (bool, np.bool_)) or kind == "b":
        raise TypeError(f"{who} returned the value {value!r}, a bool: return the loss as a real "
                        "number, e.g. float(((y - t)**2).sum())")
    if isinstance(value, (int, float)) or (shape == () and kind in ("f", "i", "u")):
        return value
    if shape is not None and shape != () and kind in ("f", "i", "u", "c"):
        raise ValueError(f"{who} returned a value of shape {tuple(shape)}; its value must be a "
                         "scalar: sum it (e.g. ((y - t)**2).sum()), or return one number")
    if isinstance(value, complex) or kind == "c":
        raise TypeError(f"{who} returned the complex value {value!r}; the loss must be real "
                        "(cupynn never drops an imaginary part silently)")
    raise TypeError(f"{who} returned the value {type(value).__name__} {value!r:.60}; it must be a "
                    f"real number (a float, or a 0-d {dtype} array)")


def check_writeable(a, what: str) -> None:
    """Refuse an array that cupynn is about to write into but may not (a read-only NumPy
    array, such as a read-only ``np.memmap`` or a broadcast view)."""
    flags = getattr(a, "flags", None)
    if flags is not None and not getattr(flags, "writeable", True):
        raise ValueError(f"{what} is read-only (a read-only np.memmap, a broadcast view or an "
                         "array with writeable=False), and this call writes into it: pass a "
                         f"writeable copy (np.array({_var(what)})) instead")


def _var(what: str) -> str:
    return what if what.isidentifier() else "a"


def _extent(a):
    """``(first byte, one past the last byte)`` an array's elements span, or None when empty."""
    if a.size == 0:
        return None
    if type(a).__module__.startswith("cupy"):
        lo = hi = a.data.ptr
    else:
        lo = hi = a.__array_interface__["data"][0]
    for n, s in zip(a.shape, a.strides):
        if s < 0:
            lo += s * (n - 1)
        else:
            hi += s * (n - 1)
    return lo, hi + a.itemsize


def _owner(a):
    """The array that owns ``a``'s memory when that is known (the end of its chain of
    ``base`` arrays, owning its data), else None (memory from a buffer, DLPack, a memmap)."""
    while True:
        base = a.base
        if base is None:
            flags = getattr(a, "flags", None)
            return a if flags is not None and flags.owndata else None
        if not hasattr(base, "base") or not hasattr(base, "shape"):
            return None  # a buffer object: the owner is not an array
        a = base


def first_overlap(written, others=()):
    """The first pair of names ``(a, b)`` whose arrays' memory overlaps, with ``a`` from
    ``written`` (``[(name, array)]``, which cupynn is about to write) and ``b`` from
    ``written`` or ``others``; None when there is none. Arrays of different owners never
    overlap, so only arrays of one owner (or of an unknown one) are compared, by address
    range (as ``np.may_share_memory``)."""
    items = [(n, a, True) for n, a in written if a is not None]
    items += [(n, a, False) for n, a in others if a is not None]
    groups: dict = {}
    unknown = []
    for i, (_, a, _) in enumerate(items):
        owner = _owner(a)
        if owner is None:
            unknown.append(i)
        else:
            groups.setdefault(id(owner), []).append(i)
    pairs = [(g[i], g[j]) for g in groups.values() if len(g) > 1
             for i in range(len(g)) for j in range(i + 1, len(g))]
    pairs += [(min(i, j), max(i, j)) for i in unknown for j in range(len(items)) if j != i
              and (j not in unknown or j > i)]
    for i, j in sorted(pairs):
        (na, a, wa), (nb, b, wb) = items[i], items[j]
        if not (wa or wb):
            continue
        ea, eb = _extent(a), _extent(b)
        if ea is not None and eb is not None and ea[0] < eb[1] and eb[0] < ea[1]:
            return (na, nb) if wa else (nb, na)
    return None


def check_out_array(a, *, what: str, device: str, dtype: np.dtype, shape: tuple) -> None:
    """An array an ``out=`` argument asks cupynn to overwrite: exactly the result's device,
    dtype and shape (no cast, no broadcast), and writeable."""
    if isinstance(a, np.ndarray) and type(a) is not np.ndarray:
        raise TypeError(f"{what} is a {type(a).__name__}; out= arrays are plain arrays (what an "
                        "earlier call returned): a mask or a matrix type would not describe the result")
    check_array(a, what=what, device=device, dtype=dtype, ndim=(len(shape),))
    if tuple(a.shape) != tuple(shape):
        raise ValueError(f"{what} must have the result's shape {tuple(shape)}, got "
                         f"{tuple(a.shape)} (out= arrays are never broadcast into)")
    check_writeable(a, what)


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
