"""bench/cpu_numpy_vs_cupynn.py: its plumbing (no timing is asserted)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "cpu_numpy_vs_cupynn.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("cpu_numpy_vs_cupynn", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_runs_quiet_and_loaded_and_writes_json(script, tmp_path, capsys, monkeypatch):
    started = []
    start_load = script.start_load

    def recording(n):
        procs = start_load(n)
        started.extend(procs)
        return procs

    monkeypatch.setattr(script, "start_load", recording)
    out = tmp_path / "cpu.json"
    rc = script.main(["--batch", "257", "--repeats", "3", "--load", "0,1", "--no-narrow",
                      "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0
    data = json.loads(out.read_text())
    assert [r["load"] for r in data["runs"]] == [0, 1]
    for run in data["runs"]:
        seed = run["seed"]
        assert set(seed["stats"]) == {"plain NumPy forward", "plain NumPy gradient",
                                      "cupynn forward", "cupynn value_and_grad"}
        assert all(err <= 1e-10 for err in seed["rel_errors"].values())
        assert set(seed["targets"]) == {"gradient_vs_plain", "gradient_vs_forward"}
    assert "=== load: 1 extra busy process;" in text and "Columns: median" in text
    assert len(started) == 1 and started[0].poll() is not None  # the spinner was stopped


def test_a_wide_spread_is_flagged(script, capsys):
    ok = script.print_rows({"a": {"median": 1.0, "p10": 0.95, "p90": 1.1, "spread": 0.15,
                                  "cpu": 0.9},
                            "b": {"median": 1.0, "p10": 0.8, "p90": 1.3, "spread": 0.5,
                                  "cpu": 1.9}})
    lines = capsys.readouterr().out.splitlines()
    assert not ok
    assert "NOISY" not in lines[0] and lines[1].endswith("NOISY")


def test_bad_load_argument(script):
    with pytest.raises(SystemExit):
        script.main(["--load", "one"])
