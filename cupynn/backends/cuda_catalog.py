"""The kernel catalog: every instantiation the CUDA backend can request, and the hot ones.

``all_instantiations()`` is what the NVRTC compile check (``python -m cupynn.compile_check``)
and ``python -m cupynn selfcheck`` build; it comes from the selection tables of
``cuda_select`` (``kernels/dense.cu``) and from ``cuda_optim`` (``kernels/optim.cu``), so the
check cannot drift from what runs.  ``hot_kernels()`` are the
kernels the public benchmark workloads launch (found by running the real backend host code
on a module class that compiles nothing); the compile check forbids spills there.
"""

from __future__ import annotations

import numpy as np

from . import cuda_jacobian, cuda_optim, cuda_taylor
from .base import LayerSpec, LossSpec, NetSpec
from .cuda_backend import CudaBackend
from .cuda_fused_layout import fused_kernel_names
from .cuda_select import kernel_names_all

__all__ = ["NameCollector", "all_instantiations", "hot_kernels", "kernel_names_for",
           "PUBLIC_WORKLOADS"]


class NameCollector:
    """A module class that compiles nothing: its functions launch nothing."""

    def __init__(self, code=None, options=(), name_expressions=(), **_):
        self.names = tuple(name_expressions)

    def get_function(self, name):
        return lambda *args, **kwargs: None


def all_instantiations() -> list[tuple[str, tuple[str, ...]]]:
    """(source file, name expressions) for every kernel the CUDA backend can request: the
    per-layer kernels (kernels/dense.cu), the fused ones (kernels/fused.cu), the optimizer
    updates, the forward Laplacian's steps and the Jacobian rows."""
    return (kernel_names_all() + fused_kernel_names() + cuda_optim.kernel_names_all()
            + cuda_taylor.kernel_names_all() + cuda_jacobian.kernel_names_all())


def kernel_names_for(net: NetSpec, batch: int, *, need_dx: bool = False,
                     fused: bool = True) -> set[str]:
    """The kernels value_and_grad and forward of ``net`` at ``batch`` launch (nothing runs);
    ``fused=False``: those of the per-layer path."""
    be = CudaBackend(xp=np, module_cls=NameCollector, arch="sm_90")
    be.fused.enabled = fused
    params = [(np.empty((s.out_features, s.in_features), net.dtype),
               np.empty((s.out_features,), net.dtype) if s.bias else None) for s in net.layers]
    x = np.empty((batch, net.in_features), net.dtype)
    be.kernels.launch_log = []
    be.network_value_and_grad(net, params, x, LossSpec("sum_squares"), need_dx=need_dx)
    be.network_forward(net, params, x)
    return {name for _, name in be.kernels.launch_log}


# The public benchmark workloads (bench/README.md): their kernels are the hot ones.
PUBLIC_WORKLOADS = (
    ((1, 1000, 20, 1), "identity", 10_000, ("float64", "float32"), ("strict",)),
    ((1, 1000, 20, 1), "identity", 1_000_000, ("float64", "float32"), ("strict",)),
    ((32, 64, 64, 64, 64, 1), "relu", 1 << 20, ("float32",), ("strict",)),
    ((1024, 4096, 4096, 1024), "relu", 8192, ("float32",), ("strict", "tf32", "3xtf32")),
)


def hot_kernels() -> set[str]:
    """Every kernel the public workloads launch, on the fused path and on the per-layer path
    (which a callable loss or CUPYNN_FUSED=0 takes), their training steps' optimizer update
    and the pinn workload's elementwise step (kernels/derivatives.cu) included: the compile
    check forbids spills there."""
    names: set[str] = {n for _, ns in cuda_optim.kernel_names_all() for n in ns}
    names |= {n for _, ns in cuda_taylor.kernel_names_all() for n in ns}
    for sizes, act, batch, dtypes, precisions in PUBLIC_WORKLOADS:
        acts = [act] * (len(sizes) - 2) + ["identity"]
        for dt in dtypes:
            for prec in precisions:
                net = NetSpec(tuple(LayerSpec(i, o, a) for i, o, a in zip(sizes, sizes[1:], acts)),
                              np.dtype(dt), prec)
                names |= kernel_names_for(net, batch) | kernel_names_for(net, batch, fused=False)
    for _source, fused in fused_kernel_names():  # every precision mode of the fused kernel
        names |= set(fused)
    return names
