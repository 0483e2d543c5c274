"""bench/autodiff_loss_cost.py: its plumbing at a small size (no timing is asserted; the
script itself checks that every variant gives the hand-written value and gradient)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "autodiff_loss_cost.py"


def test_runs_and_reports_every_variant(capsys):
    spec = importlib.util.spec_from_file_location("autodiff_loss_cost", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    jax = None
    if importlib.util.find_spec("jax") is not None:
        import jax
        old = jax.config.jax_enable_x64
    try:
        results = mod.main(["--batch", "300", "--reps", "2", "--warmup", "1"])
    finally:
        if jax is not None:
            jax.config.update("jax_enable_x64", old)
    out = capsys.readouterr().out
    assert "batch 300, 2 interleaved repetitions, load average" in out
    libs = {lib for _, lib in results}
    assert "hand" in libs
    for lib, module in (("jax", "jax"), ("torch", "torch")):
        if importlib.util.find_spec(module) is None:
            continue
        assert lib in libs
    if importlib.util.find_spec("torch") is not None:
        assert ("step", "torch.Module") in results
    for (name, lib), (seconds, ratio) in results.items():
        assert seconds > 0 and ratio > 0
        assert (name, lib) != ("sum_squares", "hand") or ratio == pytest.approx(1.0)
