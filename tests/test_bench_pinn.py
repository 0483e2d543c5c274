"""``python -m cupynn bench pinn --quick``: the Poisson residual gradient, cupynn and peers.

Every implementation that runs must agree with cupynn's NumPy float64 result before it
is timed; no time is asserted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # every peer's JAX / PyTorch compilation: ~30 s (CI runs it with --slow)
def test_pinn_workload_runs_and_every_implementation_agrees(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-m", "cupynn", "bench", "pinn", "--quick", "--device",
                          "cpu", "--json", "p.json", "--markdown", "p.md"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    doc = json.loads((tmp_path / "p.json").read_text())
    assert doc["results"] == []  # only the pinn workload was named
    rows = {r["impl"]: r for r in doc["derivatives"]}
    assert set(rows) == {"cupynn", "jax-jvp", "jax-hessian", "torch-func", "torch-double"}
    assert rows["cupynn"]["status"] == "ok" and rows["cupynn"]["batch"] == 1024
    for r in rows.values():
        assert r["status"] in ("ok", "skipped"), r
        if r["status"] == "ok":
            assert r["check"]["rel_err"] <= 1e-9 and r["gradient"]["median_s"] > 0
            assert abs(r["loss"] - rows["cupynn"]["loss"]) <= 1e-9 * abs(rows["cupynn"]["loss"])
        else:
            assert r["reason"]
    assert "pinn (2→64→64→64→1, 1,024, float64)" in (tmp_path / "p.md").read_text()
    assert "cupynn (forward Laplacian)" in out.stdout
