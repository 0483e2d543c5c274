"""Smoke test of the benchmark suite: ``python -m cupynn bench --quick`` end to end.

Runs every workload at reduced size with every implementation importable here,
then checks that the JSON, markdown and PNG are written and that every
implementation that ran was correct. No time is asserted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run_bench(tmp_path, *args, timeout=240):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               MPLBACKEND="Agg")
    return subprocess.run([sys.executable, "-m", "cupynn", "bench", *args], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow  # every workload with every peer (PyTorch, JAX compilations)
def test_quick_suite_writes_json_png_markdown_and_every_run_is_correct(tmp_path):
    pytest.importorskip("matplotlib")
    out = _run_bench(tmp_path, "--quick", "--device", "cpu", "--json", "b.json",
                     "--plot", "b.png", "--markdown", "b.md")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    doc = json.loads((tmp_path / "b.json").read_text())
    assert doc["schema"] == "cupynn-bench/1"
    assert doc["machine"]["device"] == "cpu" and doc["machine"]["versions"]["numpy"]
    assert doc["ceilings"]["copy_bytes_per_s"] > 0
    assert set(doc["ceilings"]["matmul_flops_per_s"]) == {"float64", "float32"}
    ran = [r for r in doc["results"] if r["status"] != "skipped"]
    assert {r["workload"] for r in ran} == {"seed", "seed-1m", "narrow", "wide"}
    bad = [(r["workload"], r["dtype"], r["impl"], r["reason"]) for r in ran
           if r["status"] != "ok"]
    assert not bad, bad
    for r in ran:
        assert r["check"]["gradient_rel_err"] <= r["check"]["tolerance"]
        assert r["forward"]["median_s"] > 0 and r["gradient"]["median_s"] > 0
        assert r["ratio"] > 0 and r["pct_of_floor"]["gradient"] > 0
    # cupynn and plain NumPy always run on the CPU
    names = {(r["impl"], r["workload"], r["dtype"]) for r in ran}
    assert ("cupynn", "seed", "float64") in names and ("numpy", "seed", "float64") in names
    skipped = [r for r in doc["results"] if r["status"] == "skipped"]
    assert all(r["reason"] for r in skipped)
    # the seed thread: per-sample vs batched, clearly labelled when extrapolated
    thread = {t["impl"]: t for t in doc["thread"]}
    assert thread["cupynn"]["status"] == "ok", thread["cupynn"]
    for t in thread.values():
        assert t["status"] in ("ok", "skipped"), t
        if t["status"] == "ok":
            ps = t["per_sample_gradient"]
            assert ps["extrapolated"] == (ps["samples_run"] < t["samples_total"])
    assert (tmp_path / "b.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (tmp_path / "b.md").read_text()
    assert "| workload |" in md and "Seed thread" in md
    assert "seed" in out.stdout and "grad/fwd" in out.stdout


def test_seed_command_prints_times_ratio_and_loss(tmp_path):
    out = _run_bench(tmp_path, "seed", "--device", "cpu", "--dtype", "float64", "--batch", "500",
                     "--sizes", "3,7,1", "--activation", "tanh", "--profile",
                     "--peers", "cupynn,numpy", "--budget-s", "1", "--no-thread",
                     "--no-roofline", "-q", "--json", "s.json")
    assert out.returncode == 0, out.stderr[-3000:]
    doc = json.loads((tmp_path / "s.json").read_text())
    assert doc["ceilings"] is None and doc["thread"] == []
    (r,) = [r for r in doc["results"] if r["impl"] == "cupynn" and r["workload"] == "seed"]
    assert r["status"] == "ok" and r["batch"] == 500 and r["dtype"] == "float64"
    custom = [r for r in doc["results"] if r["workload"] == "custom"]
    assert {r["status"] for r in custom} == {"ok"}
    assert custom[0]["shape"] == "3→7→1" and custom[0]["activation"] == "tanh"
    line = next(ln for ln in out.stdout.splitlines() if ln.split()[:1] == ["seed"]
                and "cupynn" in ln)
    assert "ms" in line or "µs" in line
    assert f"{r['loss']:.6g}" in line and f"{r['ratio']:.2f}" in line
    assert out.stdout.count("Columns: forward / gradient") == 1  # explained once


def test_bad_arguments_are_reported(tmp_path):
    out = _run_bench(tmp_path, "nosuch", "--device", "cpu")
    assert out.returncode != 0 and "unknown workload" in out.stderr
    out = _run_bench(tmp_path, "seed", "--device", "cpu", "--peers", "tensorflow")
    assert out.returncode != 0 and "unknown implementation" in out.stderr
