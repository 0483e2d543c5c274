"""Run cupynn's CUDA kernels on the CPU: g++ + fibers, with ASan/TSan modes.

    from cupynn.emulator import EmulatedModule
    mod = EmulatedModule(code, options=("-I", "kernels"), name_expressions=("k<double>",))
    mod.get_function("k<double>")((blocks,), (threads,), (x, np.int32(n)))

See kernels/README.md for debugging recipes.
"""

from ._build import EmulatorBuildError, cache_dir
from ._control import SCHEDULES, get_schedule, guarded_arrays, schedule, set_schedule, sparse_array
from ._module import EmulatedFunction, EmulatedModule
from ._protocol import EmulatorError, SanitizerError
from .testing import launch_and_check, sanitizer_available

__all__ = [
    "SCHEDULES",
    "EmulatedFunction",
    "EmulatedModule",
    "EmulatorBuildError",
    "EmulatorError",
    "SanitizerError",
    "cache_dir",
    "get_schedule",
    "guarded_arrays",
    "launch_and_check",
    "sanitizer_available",
    "schedule",
    "set_schedule",
    "sparse_array",
]
