"""The benchmark workloads: network shapes, batch, data, and what they cost.

A workload is a chain of dense layers ``y = act(x @ W.T + b)`` followed by
the loss ``sum(y**2)`` (the seed thread's ``sum(abs2, m(x))``). Its *forward*
is that scalar; its *gradient* is the scalar and its gradient with respect
to every weight and bias.

FLOPs count the matrix products only (2 per multiply-add): forward
``2·batch·Σ in·out``; gradient adds ``dW`` for every layer and ``dx`` for
every layer but the first. The minimum bytes are what any implementation
must move through memory: read the input and the parameters once, write the
gradients once (the hidden activations need never leave the chip).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Workload", "WORKLOADS", "DEFAULT_DTYPES", "get_workload", "custom_workload"]


@dataclass(frozen=True)
class Workload:
    """A network shape, its activations and a batch size."""

    name: str
    sizes: tuple[int, ...]  # widths, input first: (1, 1000, 20, 1)
    activation: str  # of the hidden layers
    batch: int
    final_activation: str = "identity"
    data: str = "random"  # "linspace": the seed thread's range(-1, 1, batch)
    init: str = "normal"  # "normal": randn weights (the thread); "he": randn*sqrt(2/fan_in)

    @property
    def layers(self) -> list[tuple[int, int, str]]:
        """``(in, out, activation)`` per layer."""
        n = len(self.sizes) - 1
        return [
            (self.sizes[i], self.sizes[i + 1],
             self.final_activation if i == n - 1 else self.activation)
            for i in range(n)
        ]

    @property
    def shape(self) -> str:
        return "→".join(str(s) for s in self.sizes)

    def describe(self) -> str:
        return f"{self.shape} {self.activation}, batch {self.batch:,}"

    def with_batch(self, batch: int) -> Workload:
        return Workload(self.name, self.sizes, self.activation, batch,
                        self.final_activation, self.data, self.init)

    # -- costs ---------------------------------------------------------------
    def n_params(self) -> int:
        return sum(i * o + o for i, o, _ in self.layers)

    def flops(self, phase: str) -> float:
        fwd = sum(2.0 * self.batch * i * o for i, o, _ in self.layers)
        if phase == "forward":
            return fwd
        dw = fwd
        dx = sum(2.0 * self.batch * i * o for i, o, _ in self.layers[1:])
        return fwd + dw + dx

    def min_bytes(self, phase: str, itemsize: int) -> float:
        x = self.batch * self.sizes[0] * itemsize
        p = self.n_params() * itemsize
        return x + p + (p if phase == "gradient" else 0)

    def activation_bytes(self, itemsize: int) -> float:
        """Bytes of every layer's output for the whole batch (what naive code keeps)."""
        return self.batch * sum(self.sizes[1:]) * itemsize

    # -- data ----------------------------------------------------------------
    def make_params(self, rng: np.random.Generator) -> list[tuple[np.ndarray, np.ndarray]]:
        """Float64 ``(W, b)`` pairs; cast them to the benchmark dtype."""
        params = []
        for fan_in, fan_out, _ in self.layers:
            scale = np.sqrt(2.0 / fan_in) if self.init == "he" else 1.0
            W = rng.standard_normal((fan_out, fan_in)) * scale
            b = rng.standard_normal(fan_out) * (0.1 if self.init == "he" else 1.0)
            params.append((W, b))
        return params

    def make_input(self, rng: np.random.Generator, index: int = 0) -> np.ndarray:
        """Float64 input ``(batch, in)``; index 0 is the one every check uses."""
        if self.data == "linspace" and index == 0:
            return np.linspace(-1.0, 1.0, self.batch).reshape(self.batch, 1).repeat(
                self.sizes[0], axis=1)
        return rng.uniform(-1.0, 1.0, (self.batch, self.sizes[0]))


SEED_SIZES = (1, 1000, 20, 1)

WORKLOADS: dict[str, Workload] = {
    "seed": Workload("seed", SEED_SIZES, "identity", 10_000, data="linspace"),
    "seed-1m": Workload("seed-1m", SEED_SIZES, "identity", 1_000_000, data="linspace"),
    "narrow": Workload("narrow", (32, 64, 64, 64, 64, 1), "relu", 1 << 20, init="he"),
    "wide": Workload("wide", (1024, 4096, 4096, 1024), "relu", 8192, init="he"),
}

# docs/design.md section 5: the seed in both precisions, the others in float32.
DEFAULT_DTYPES: dict[str, tuple[str, ...]] = {
    "seed": ("float64", "float32"),
    "seed-1m": ("float64", "float32"),
    "narrow": ("float32",),
    "wide": ("float32",),
    "custom": ("float64",),
}

# --quick: the same shapes at a size a 2-core CI machine runs in seconds.
QUICK_BATCH = {"seed": 1_000, "seed-1m": 4_000, "narrow": 2_048, "wide": 64, "custom": 512}
QUICK_SIZES = {"wide": (64, 128, 128, 32)}


def get_workload(name: str, *, quick: bool = False, batch: int | None = None) -> Workload:
    try:
        w = WORKLOADS[name]
    except KeyError:
        raise ValueError(
            f"unknown workload {name!r}; known: {', '.join(WORKLOADS)} "
            "(or --sizes 1,1000,20,1 --batch N for your own)"
        ) from None
    if quick:
        w = Workload(w.name, QUICK_SIZES.get(name, w.sizes), w.activation, QUICK_BATCH[name],
                     w.final_activation, w.data, w.init)
    if batch is not None:
        w = w.with_batch(batch)
    return w


def custom_workload(sizes: tuple[int, ...], activation: str, batch: int) -> Workload:
    if len(sizes) < 2 or min(sizes) < 1:
        raise ValueError(f"--sizes needs at least two positive widths, got {sizes}")
    return Workload("custom", tuple(sizes), activation, batch,
                    init="normal" if activation == "identity" else "he")
