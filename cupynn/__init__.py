"""cupynn: dense neural networks and their gradients on many inputs at once.

Fused CUDA kernels through CuPy on NVIDIA GPUs, and a NumPy backend that
computes the same function on any machine.

>>> import numpy as np, cupynn
>>> model = cupynn.MLP([1, 1000, 20, 1], "identity", device="cpu", rng=0)
>>> x = np.linspace(-1, 1, 10_000).reshape(-1, 1)
>>> value, grads = cupynn.value_and_grad(model, x, "sum_squares")

In PyTorch and JAX programs (optional extras, imported only when asked for):
``import cupynn.torch`` (``cupynn.torch.Module(model)``, a ``torch.nn.Module``)
and ``import cupynn.jax`` (``cupynn.jax.apply(model)``, a ``jax.custom_vjp``
function). Torch tensors and JAX arrays are accepted wherever an array is.
A loss or PDE residual written in ``jax.numpy`` or torch is differentiated by that library:
``cupynn.value_and_grad(model, x, cupynn.jax.loss(f))``,
``cupynn.residual_value_and_grad(model, x, cupynn.torch.residual(r))``; losses of several
terms on different points: ``cupynn.ResidualTerm(...) + 10.0 * cupynn.LossTerm(...)``.
On a Dask cluster (the ``dask`` extra): ``cupynn.dask.value_and_grad(model, X)`` for a
``dask.array`` batch ``X``, chunk by chunk on the workers.
"""

from . import optim
from ._config import show_config
from ._devices import cuda_available
from ._validate import DeviceMismatchError, FileFormatError
from .activations import ACTIVATIONS
from .composite import Composite, LossTerm, ResidualTerm, add_grads, scale_grads
from .derivatives import input_derivatives, input_hessian, residual_value_and_grad
from .flat import flat_value_and_grad, get_flat, num_parameters, set_flat
from .functional import execution_path, value_and_grad
from .graph import compile
from .io import load, save
from .jacobian import (
    damped_solve,
    gramian,
    iter_jacobian,
    jacobian,
    jacobian_operator,
    jacobian_transpose_vector,
    jacobian_vector,
    jvp,
    kernel_matrix,
)
from .layers import MLP, Chain, Dense
from .second_order import (
    DataResiduals,
    FitResult,
    PDEResiduals,
    energy_natural_gradient,
    levenberg_marquardt,
    pde_jacobian,
    residual_functions,
    scipy_least_squares,
)

__version__ = "0.1.0"


def __getattr__(name):
    # cupynn.dask (data-parallel value and gradient on a Dask cluster) needs the optional
    # `dask` extra: it is imported on first use of cupynn.dask, never by `import cupynn`.
    if name == "dask":
        import importlib

        return importlib.import_module(".dask", __name__)
    raise AttributeError(f"module 'cupynn' has no attribute {name!r}")


__all__ = [
    "ACTIVATIONS",
    "Chain",
    "Composite",
    "Dense",
    "DeviceMismatchError",
    "FileFormatError",
    "LossTerm",
    "MLP",
    "ResidualTerm",
    "add_grads",
    "compile",
    "cuda_available",
    "execution_path",
    "flat_value_and_grad",
    "get_flat",
    "input_derivatives",
    "input_hessian",
    "load",
    "num_parameters",
    "optim",
    "residual_value_and_grad",
    "save",
    "scale_grads",
    "set_flat",
    "show_config",
    "value_and_grad",
    "damped_solve",
    "gramian",
    "iter_jacobian",
    "jacobian",
    "jacobian_operator",
    "jacobian_transpose_vector",
    "jacobian_vector",
    "jvp",
    "kernel_matrix",
    "DataResiduals",
    "FitResult",
    "PDEResiduals",
    "energy_natural_gradient",
    "levenberg_marquardt",
    "pde_jacobian",
    "residual_functions",
    "scipy_least_squares",
    "__version__",
]
