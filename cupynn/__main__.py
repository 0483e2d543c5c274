"""Command line: ``python -m cupynn {bench,info,selfcheck} ...``.

``bench``      run benchmark workloads (``python -m cupynn bench seed``)
``info``       versions, device, where kernels come from (``cupynn.show_config()``)
``selfcheck``  launch the kernels once and compare them with the NumPy backend
"""

from __future__ import annotations

import importlib
import sys

_COMMANDS = {
    "bench": ("cupynn.bench.cli", "run benchmark workloads, e.g. `bench seed`"),
    "info": ("cupynn._config", "print versions, the device and where kernels are loaded from"),
    "selfcheck": ("cupynn._selfcheck", "run each kernel once against the NumPy backend"),
}


def _usage() -> str:
    lines = ["usage: python -m cupynn COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in _COMMANDS.items()]
    lines += ["", "`python -m cupynn COMMAND --help` for a command's options"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in _COMMANDS:
        print(f"unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(_COMMANDS[command][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
