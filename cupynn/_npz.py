"""cupynn's ``.npz`` files: where they are, writing them atomically, reading them safely.

``save("m")`` writes ``m.npz``, as ``numpy.savez`` does, so every reader
(``cupynn.load``, ``cupynn.optim.load_state``) takes the path with or without the suffix.

Writing (:func:`savez_atomic`) goes to a temporary file in the same directory, which is
flushed to disk and then renamed over the destination (``os.replace``, atomic on POSIX
and Windows): a crash or an error mid-save leaves the old file (or none), never a
half-written one.

Reading (:class:`Reader`) never unpickles (``allow_pickle=False``) and turns every way a
file can be wrong -- not a zip archive, empty, truncated, a failed CRC, a member that is
no array -- into a :class:`cupynn.FileFormatError` naming the file and the member.
"""

from __future__ import annotations

import os
import tempfile
import zipfile
import zlib

import numpy as np

from ._validate import FileFormatError

__all__ = ["resolve", "savez_atomic", "Reader"]

_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # a local file header; an empty archive


def resolve(path):
    """``path``, or ``path + ".npz"`` when that is a file and ``path`` is not one (a
    directory ``m`` beside ``m.npz`` included); a file object comes back unchanged."""
    if isinstance(path, (str, os.PathLike)):
        p = os.fspath(path)
        if not os.path.isfile(p) and not p.endswith(".npz") and os.path.isfile(p + ".npz"):
            return p + ".npz"
    return path


def _umask() -> int:
    """The process's umask: from /proc on Linux (reading it elsewhere means setting it, for
    an instant, for every thread)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def savez_atomic(path, arrays: dict) -> None:
    """``numpy.savez(path, **arrays)``, atomically for a path (a file object is written
    directly). A path without the ``.npz`` suffix gets it appended."""
    if not isinstance(path, (str, os.PathLike)):
        np.savez(path, **arrays)
        return
    p = os.fspath(path)
    if not p.endswith(".npz"):
        p += ".npz"
    directory = os.path.dirname(os.path.abspath(p))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(p)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # what a plain open() would have made
        os.replace(tmp, p)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


class Reader:
    """An ``.npz`` archive opened for reading, every failure a ``FileFormatError``.

    ``members`` is the set of array names; :meth:`array` reads one; :meth:`text` reads a
    0-d string member. Use as a context manager.
    """

    def __init__(self, path, what: str):
        self.path = resolve(path)
        self.name = os.fspath(self.path) if isinstance(self.path, (str, os.PathLike)) else \
            getattr(self.path, "name", repr(self.path))
        if isinstance(self.path, (str, os.PathLike)):
            with open(self.path, "rb") as f:  # FileNotFoundError / IsADirectoryError as open's
                head = f.read(4)
        else:
            pos = self.path.tell()
            head = self.path.read(4)
            self.path.seek(pos)
        if not head:
            raise FileFormatError(self.name, None, f"the file is empty, not {what}")
        if head == b"\x93NUM":
            raise FileFormatError(self.name, None, f"holds a single array (.npy), not {what} "
                                                   "(an .npz archive)")
        if head not in _ZIP_MAGIC:
            raise FileFormatError(self.name, None, f"not an .npz archive (it starts with "
                                                   f"{head!r})")
        try:
            self._data = np.load(self.path, allow_pickle=False)
        except (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error) as exc:
            raise FileFormatError(self.name, None, f"not a readable .npz archive "
                                                   f"({_reason(exc)}): the file is damaged "
                                                   "or truncated") from None
        if not hasattr(self._data, "files"):
            raise FileFormatError(self.name, None, "holds a single array, not an .npz archive")
        self.members = set(self._data.files)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._data.close()

    def array(self, member: str) -> np.ndarray:
        if member not in self.members:
            raise FileFormatError(self.name, member, "is missing: the file is damaged or was "
                                                     "not written by this cupynn")
        try:
            return np.asarray(self._data[member])
        except (OSError, EOFError, ValueError, KeyError, TypeError, zipfile.BadZipFile,
                zlib.error, NotImplementedError) as exc:
            raise FileFormatError(self.name, member, f"cannot be read ({_reason(exc)}): the file "
                                                     "is damaged") from None

    def text(self, member: str) -> str:
        a = self.array(member)
        if a.shape != () or a.dtype.kind != "U":
            raise FileFormatError(self.name, member, f"must be a text entry, got an array of shape "
                                                     f"{a.shape} and dtype {a.dtype}")
        return str(a)


def _reason(exc: BaseException) -> str:
    text = str(exc)
    if "pickle" in text.lower():  # never pass numpy's advice about unpickling along
        return "it holds pickled Python objects, which cupynn never loads"
    return f"{type(exc).__name__}: {text}"[:300]
