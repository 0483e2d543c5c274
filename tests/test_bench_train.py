"""The benchmark's training-step workload (``python -m cupynn bench --train``): every
implementation that runs here passes its first-step check; a wrong update is caught."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from cupynn.bench import train as bt
from cupynn.bench.workloads import custom_workload

ROOT = Path(__file__).resolve().parents[1]


def test_every_available_step_matches_the_reference():
    w = custom_workload((3, 7, 1), "tanh", 64)
    results = bt.run_train([(w, "float64"), (w, "float32")], "cpu", budget_s=0.2, cap_s=0.02,
                           floor_s=0.005, progress=False)
    ran = [r for r in results if r["status"] != "skipped"]
    assert {r["impl"] for r in ran} >= {"cupynn", "cupynn-graph"}
    bad = [(r["impl"], r["dtype"], r["reason"]) for r in ran if r["status"] != "ok"]
    assert not bad, bad
    for r in ran:
        assert r["check"]["params_rel_err"] <= r["check"]["tolerance"]
        assert r["step"]["median_s"] > 0
    assert all(r["reason"] for r in results if r["status"] == "skipped")


def test_a_step_that_forgets_the_bias_correction_is_wrong():
    def prepare(problem):
        params = [(W.astype(np.float64), b.astype(np.float64)) for W, b in problem.params]
        _, grads = bt.compute_reference(problem)

        def step(i):  # Adam without bias correction: m / (sqrt(v) + eps)
            for (W, b), (dW, db) in zip(params, grads):
                for p, g in ((W, dW), (b, db)):
                    p -= bt.LR * (0.1 * g) / (np.sqrt(0.001 * g * g) + bt.EPS)
            return bt.compute_reference(problem)[0]

        return bt.TrainRunner(step, lambda: params)

    w = custom_workload((2, 5, 1), "tanh", 32)
    (r,) = bt.run_train([(w, "float64")], "cpu", budget_s=0.1, cap_s=0.01, floor_s=0.005,
                        progress=False, impls=[bt.TrainImpl("bad", "bad", prepare)])
    assert r["status"] == "wrong" and "parameters" in r["reason"]


def test_cli_writes_the_training_table(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run(
        [sys.executable, "-m", "cupynn", "bench", "--sizes", "3,7,1", "--batch", "64",
         "--activation", "tanh", "--device", "cpu", "--train", "--peers", "cupynn,cupynn-graph",
         "--budget-s", "0.5", "--no-roofline", "--no-thread", "-q", "--json", "t.json",
         "--markdown", "t.md"], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    doc = json.loads((tmp_path / "t.json").read_text())
    assert {r["impl"] for r in doc["train"]} == {"cupynn", "cupynn-graph"}
    assert all(r["status"] == "ok" for r in doc["train"]), doc["train"]
    assert "Adam step" in out.stdout and "Training step" in (tmp_path / "t.md").read_text()
