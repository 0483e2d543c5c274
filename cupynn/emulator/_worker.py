"""Helper process that runs sanitized kernels (started by _remote.py; not imported).

It runs with libasan/libtsan preloaded, so the sanitized module .so files can be loaded.
Requests and replies are length-prefixed pickles on stdin / the original stdout; fd 1 is
pointed at stderr so that a kernel's printf cannot corrupt the protocol.
"""

from __future__ import annotations

import ctypes
import os
import sys


def main() -> None:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import _protocol as proto  # noqa: E402  (a sibling file, importable without the package)

    proto_out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    proto_in = os.fdopen(os.dup(0), "rb")
    libs: dict[str, tuple] = {}

    while True:
        try:
            req = proto.recv_msg(proto_in)
        except EOFError:
            return
        op = req[0]
        try:
            if op == "load":
                path = req[1]
                if path not in libs:
                    lib = ctypes.CDLL(path)
                    libs[path] = (lib, proto.read_kernel_table(lib))
                table = libs[path][1]
                reply = ("ok", {k: (0, [tuple(p) for p in v[1]]) for k, v in table.items()})
            elif op == "launch":
                _, path, name, grid, block, shared_mem, items, config = req
                lib, table = libs[path]
                packed = []
                for i, item in enumerate(items):
                    if item[0] == "arr":
                        arr = item[1]
                        if arr is not None and not arr.flags.writeable:
                            arr = arr.copy()
                            items[i] = ("arr", arr)
                        packed.append(("ptr", arr.ctypes.data if arr is not None else 0,
                                       arr.nbytes if arr is not None else 0))
                    else:
                        packed.append(("val", item[1]))
                proto.launch_in_process(lib, table[name][0], grid, block, shared_mem, packed, config)
                sys.stderr.flush()
                reply = ("ok", [item[1] if item[0] == "arr" else None for item in items])
            elif op == "ping":
                reply = ("ok", os.getpid())
            else:
                reply = ("error", f"unknown request {op!r}")
        except proto.EmulatorError as exc:
            reply = ("emulator-error", str(exc))
        except Exception as exc:  # report, keep serving
            reply = ("error", f"{type(exc).__name__}: {exc}")
        proto.send_msg(proto_out, reply)


if __name__ == "__main__":
    main()
