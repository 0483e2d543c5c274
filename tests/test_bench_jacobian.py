"""bench/jacobian_vs_peers.py runs at its reduced size and checks every peer against cupynn."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_jacobian_bench_quick(tmp_path):
    pytest.importorskip("jax")
    spec = importlib.util.spec_from_file_location("jacobian_vs_peers", ROOT / "bench" / "jacobian_vs_peers.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "j.json"
    report = mod.main(["--quick", "--workloads", "seed", "--repeats", "1", "--json", str(out)])
    rows = report["workloads"]["seed"]["rows"]
    assert "cupynn" in rows and len(rows) >= 3
    assert all(r["check_rel_err"] <= 1e-10 for r in rows.values())
    assert json.loads(out.read_text())["workloads"]["seed"]["shape"] == [100, 2241]
