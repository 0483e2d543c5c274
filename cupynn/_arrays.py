"""Arrays of other libraries in, through DLPack, without a copy.

Where cupynn accepts an array it also accepts any DLPack producer on the
model's device: a PyTorch tensor, a JAX array, a CuPy or NumPy array, ...
:func:`intake` turns one into the backend's own array type — a NumPy array
(``np.from_dlpack``) for memory the CPU can address, a CuPy array
(``cupy.from_dlpack``) for CUDA memory — sharing the producer's memory: no copy
is made, so writing through the result writes the producer's tensor.

On CUDA, ``cupy.from_dlpack`` passes the producer CuPy's current stream
(the protocol's ``stream=`` argument); the producer makes its pending writes
to the tensor visible on that stream before cupynn's kernels read it.

Arrays whose meaning is not their buffer are resolved when that is exact and free,
else refused: a ``np.matrix`` or another ``ndarray`` subclass (``np.memmap``) is read as
the plain ``ndarray`` view of its memory; a NumPy masked array is read as its data when
no element is masked, and refused when one is (cupynn has no notion of a masked row);
a torch tensor with its negative or conjugate bit set (``z.conj().imag``: the memory
holds ``-x``) is refused with the fix (``x.resolve_neg()``), since reading its buffer
would silently compute with the wrong sign.

Nothing is cast or moved: a producer on the wrong device, of the wrong dtype,
or a torch tensor that requires grad (cupynn's plain functions do not record
torch's autograd; :mod:`cupynn.torch` does) is refused with an error that
says what to change. Outputs are always NumPy/CuPy arrays, which every such
library imports through DLPack in turn (``torch.from_dlpack(y)``,
``jax.dlpack.from_dlpack(y)``).
"""

from __future__ import annotations

import numpy as np

from ._devices import array_device
from ._validate import DeviceMismatchError

__all__ = ["intake", "dlpack_device"]

# DLPack device types (dlpack.h): which cupynn device can read them.
_CPU_TYPES = {1: "cpu", 3: "cpu"}  # kDLCPU, kDLCUDAHost (pinned host memory)
_CUDA_TYPES = {2: "cuda", 13: "cuda"}  # kDLCUDA, kDLCUDAManaged


def _library(a) -> str:
    return type(a).__module__.split(".")[0]


def dlpack_device(a) -> tuple[str | None, int]:
    """``("cpu" | "cuda" | None, device id)`` of a DLPack producer (None: no cupynn device)."""
    kind, index = a.__dlpack_device__()
    kind = int(kind)
    return _CPU_TYPES.get(kind) or _CUDA_TYPES.get(kind), int(index)


def _var(what: str) -> str:
    """The name to write the fix with: ``what`` itself when it is one ("x", "W"), else "a"."""
    return what if what.isidentifier() else "a"


def _move_fix(a, to_device: str, var: str) -> str:
    lib = _library(a)
    if lib == "torch":
        return f"{var}.cpu()" if to_device == "cpu" else f"{var}.cuda()"
    if lib in ("jax", "jaxlib"):
        return f"jax.device_put({var}, jax.devices({'cpu' if to_device == 'cpu' else 'gpu'!r})[0])"
    return f"a copy on the '{to_device}' device"


def _dtype_fix(a, dtype: np.dtype, var: str) -> str:
    lib = _library(a)
    if lib == "torch":
        return f"{var}.to(torch.{dtype.name})"
    if lib in ("jax", "jaxlib"):
        extra = " (with jax.config.update('jax_enable_x64', True))" if dtype == np.float64 else ""
        return f"{var}.astype(jax.numpy.{dtype.name}){extra}"
    return f"a {dtype.name} copy made in its own library"


def intake(a, *, what: str, device: str | None = None, dtype: np.dtype | None = None):
    """``a`` as a NumPy/CuPy array sharing its memory, if it is a foreign DLPack producer.

    NumPy and CuPy arrays, and objects that are no DLPack producer, come back
    unchanged (the usual checks then accept or reject them). ``device``
    (``"cpu"``/``"cuda"``) and ``dtype``, when given, are what the model needs;
    a producer that does not match is refused here, with its own library's fix.

    >>> import numpy as np
    >>> x = np.ones((2, 3))
    >>> intake(x, what="x") is x
    True
    """
    if isinstance(a, np.ndarray):
        return a if type(a) is np.ndarray else _plain(a, what)
    if array_device(a) is not None or not hasattr(a, "__dlpack__") \
            or not hasattr(a, "__dlpack_device__"):
        return a
    name = f"{what} ({_library(a)}.{type(a).__name__})"
    var = _var(what)
    for bit, fix in (("is_neg", "resolve_neg"), ("is_conj", "resolve_conj")):
        flag = getattr(a, bit, None)
        if callable(flag) and flag():
            kind = "negative" if bit == "is_neg" else "conjugate"
            raise TypeError(
                f"{name} has its {kind} bit set (a lazy {kind[:3]}ation such as z.conj().imag): "
                f"its memory does not hold its values, and cupynn reads memory: pass "
                f"{var}.{fix}() (one copy)")
    got, index = dlpack_device(a)
    if got is None:
        raise DeviceMismatchError(
            f"{name} is on DLPack device {a.__dlpack_device__()}, which cupynn does not run on: "
            f"pass {_move_fix(a, device or 'cpu', var)}"
        )
    if device is not None and got != device:
        raise DeviceMismatchError(
            f"{name} is on '{got}' but the model is on '{device}': pass {_move_fix(a, device, var)}, "
            f"or move the model with model.to({got!r})"
        )
    if getattr(a, "requires_grad", False):
        raise TypeError(
            f"{name} requires grad, and cupynn's functions do not record torch's autograd: "
            "wrap the model with cupynn.torch.Module(model) to differentiate through it, "
            f"or pass {var}.detach()"
        )
    try:
        if got == "cpu":
            out = np.from_dlpack(a)
        else:
            import cupy

            if index != cupy.cuda.Device().id:
                raise DeviceMismatchError(
                    f"{name} is on CUDA device {index} but cupynn runs on CUDA device "
                    f"{cupy.cuda.Device().id} (CuPy's current device): move it there, or run "
                    f"under `with cupy.cuda.Device({index}):`"
                )
            out = cupy.from_dlpack(a)
    except (BufferError, RuntimeError, TypeError, ValueError) as e:
        if isinstance(e, DeviceMismatchError):
            raise
        want = dtype.name if dtype is not None else "float32 or float64"
        raise TypeError(
            f"{name} of dtype {getattr(a, 'dtype', '?')} could not be read through DLPack "
            f"({type(e).__name__}: {e}); cupynn takes float32 and float64 arrays: pass "
            f"{_dtype_fix(a, np.dtype(dtype if dtype is not None else np.float32), var)} "
            f"(a {want} copy)"
        ) from e
    if dtype is not None and out.dtype != dtype:
        other = (f" or build the model with dtype={out.dtype.name!r}"
                 if out.dtype in (np.float32, np.float64) else " (models are float32 or float64)")
        raise TypeError(
            f"{name} has dtype {out.dtype} but the model is {dtype}; cupynn does not cast "
            f"silently: pass {_dtype_fix(a, dtype, var)}{other}"
        )
    return out


def _plain(a: np.ndarray, what: str) -> np.ndarray:
    """A NumPy subclass as the plain ndarray view of its memory, or an error when the view
    would not mean the same (a masked array with masked elements)."""
    if isinstance(a, np.ma.MaskedArray):
        mask = np.ma.getmask(a)
        if mask is not np.ma.nomask and mask.any():
            raise ValueError(
                f"{what} is a masked array with {int(mask.sum())} masked element(s), and cupynn "
                "has no notion of a masked entry (it would compute with the hidden values): "
                f"pass {_var(what)}.filled(value), or select the unmasked rows, e.g. "
                f"{_var(what)}.data[~{_var(what)}.mask.any(axis=-1)]")
        return np.ma.getdata(a).view(np.ndarray)
    return a.view(np.ndarray)
