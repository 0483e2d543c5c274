"""Client side of the sanitizer helper process (see _worker.py)."""

from __future__ import annotations

import atexit
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np

from . import _build
from ._protocol import EmulatorError, ParamInfo, SanitizerError, recv_msg, send_msg

WORKER = Path(__file__).resolve().parent / "_worker.py"

_ENV = {
    "address": ("ASAN_OPTIONS", "detect_leaks=0:halt_on_error=1:abort_on_error=0:"
                                "allocator_may_return_null=1:detect_stack_use_after_return=0"),
    # Not ignore_noninstrumented_modules=1: it hides races on the dlopen'ed module's TLS
    # (static __shared__ storage), which ld.so allocates.
    "thread": ("TSAN_OPTIONS", "halt_on_error=1:exitcode=66:report_signal_unsafe=0"),
}


def sanitizer_env(sanitizer: str) -> dict[str, str]:
    """Environment that lets a Python process load modules built with `sanitizer`."""
    env = dict(os.environ)
    env["LD_PRELOAD"] = _build.sanitizer_runtime(sanitizer)
    var, opts = _ENV[sanitizer]
    extra = os.environ.get(var)
    env[var] = opts + (":" + extra if extra else "")
    return env


class SanitizerWorker:
    def __init__(self, sanitizer: str):
        self.sanitizer = sanitizer
        self.proc: subprocess.Popen | None = None
        self.lock = threading.Lock()
        self.loaded: dict[str, dict] = {}
        self.log = None

    def _start(self) -> None:
        self.log = tempfile.TemporaryFile(mode="w+b")
        cmd = [sys.executable, "-u", str(WORKER)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, env=sanitizer_env(self.sanitizer))
        self.loaded = {}

    def _stderr_since(self, pos: int) -> str:
        self.log.flush()
        self.log.seek(pos)
        text = self.log.read().decode(errors="replace")
        self.log.seek(0, os.SEEK_END)
        return text

    def _request(self, msg, so_path: str):
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        if so_path not in self.loaded:
            pos = self.log.seek(0, os.SEEK_END)
            self.loaded[so_path] = self._roundtrip(("load", so_path), pos)
        if msg is None:
            return self.loaded[so_path]
        pos = self.log.seek(0, os.SEEK_END)
        return self._roundtrip(msg, pos)

    def _roundtrip(self, msg, pos):
        try:
            send_msg(self.proc.stdin, msg)
            kind, payload = recv_msg(self.proc.stdout)
        except (EOFError, BrokenPipeError, OSError):
            rc = self.proc.wait()
            report = self._stderr_since(pos)
            self.proc = None
            name = {"address": "AddressSanitizer", "thread": "ThreadSanitizer"}[self.sanitizer]
            raise SanitizerError(f"{name} stopped the kernel (helper exit status {rc}):\n{report}",
                                 report) from None
        out = self._stderr_since(pos)
        if out:
            sys.stderr.write(out)
        if kind == "ok":
            return payload
        if kind == "emulator-error":
            raise EmulatorError(payload)
        raise RuntimeError(f"emulator helper process: {payload}")

    def load(self, so_path: str) -> dict:
        with self.lock:
            table = self._request(None, so_path)
        return {k: (0, [ParamInfo(*p) for p in v[1]]) for k, v in table.items()}

    def launch(self, so_path, name, grid, block, shared_mem, packed, args, config) -> None:
        items = [("arr", a if p[1] else None) if p[0] == "ptr" else ("val", p[1])
                 for p, a in zip(packed, args)]
        with self.lock:
            result = self._request(("launch", so_path, name, grid, block, shared_mem, items, config),
                                   so_path)
        for a, r in zip(args, result):
            if r is not None and isinstance(a, np.ndarray) and a.flags.writeable:
                np.copyto(a, r.reshape(a.shape))

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc = None


_workers: dict[str, SanitizerWorker] = {}
_workers_lock = threading.Lock()


def get_worker(sanitizer: str) -> SanitizerWorker:
    with _workers_lock:
        w = _workers.get(sanitizer)
        if w is None:
            w = _workers[sanitizer] = SanitizerWorker(sanitizer)
        return w


@atexit.register
def _close_all() -> None:
    for w in list(_workers.values()):
        w.close()
