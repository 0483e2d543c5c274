"""Unit tests of the benchmark package's pieces (no timing is asserted)."""

from __future__ import annotations

import time

import numpy as np
import pytest

from cupynn.bench import reference, report, timing
from cupynn.bench.impls import IMPLEMENTATIONS, Implementation, Runner, select
from cupynn.bench.runner import Settings, compute_reference, make_problem, run_one, tolerance
from cupynn.bench.workloads import WORKLOADS, custom_workload, get_workload


@pytest.mark.parametrize("act", ["identity", "relu", "tanh", "sigmoid"])
def test_plain_network_gradient_matches_finite_differences(act):
    rng = np.random.default_rng(7)
    w = custom_workload((3, 7, 5, 2), act, 11)
    params = w.make_params(rng)
    acts = [a for *_, a in w.layers]
    x = rng.standard_normal((11, 3))
    _, grads = reference.value_and_grad(np, params, acts, x)
    dirs = [(rng.standard_normal(W.shape), rng.standard_normal(b.shape)) for W, b in params]
    h = 1e-6

    def f(t):
        p = [(W + t * dW, b + t * db) for (W, b), (dW, db) in zip(params, dirs)]
        return float(reference.forward_loss(np, p, acts, x))

    numeric = (f(h) - f(-h)) / (2 * h)
    analytic = sum(float((gW * dW).sum() + (gb * db).sum())
                   for (gW, gb), (dW, db) in zip(grads, dirs))
    assert abs(numeric - analytic) <= 1e-6 * max(1.0, abs(analytic))


def test_workload_counts():
    seed = WORKLOADS["seed"]
    assert seed.describe() == "1→1000→20→1 identity, batch 10,000"
    assert seed.flops("forward") == 2 * 10_000 * (1 * 1000 + 1000 * 20 + 20 * 1)
    # gradient: forward + dW of every layer + dx of every layer but the first
    assert seed.flops("gradient") == seed.flops("forward") * 2 + 2 * 10_000 * (20_000 + 20)
    assert seed.n_params() == 1000 + 1000 + 20_000 + 20 + 20 + 1
    assert seed.min_bytes("gradient", 8) == 10_000 * 8 + 2 * seed.n_params() * 8
    assert get_workload("wide", quick=True).batch < WORKLOADS["wide"].batch
    assert get_workload("narrow", batch=100).batch == 100
    with pytest.raises(ValueError, match="unknown workload"):
        get_workload("huge")


def test_problem_inputs_are_fresh_and_not_zero():
    p = make_problem(WORKLOADS["seed"].with_batch(100), "float32", "cpu", 0, n_inputs=3)
    assert len(p.inputs) == 3 and all(x.dtype == np.float32 for x in p.inputs)
    assert np.all(p.inputs[0][:, 0] == np.linspace(-1, 1, 100).astype(np.float32))
    assert not np.array_equal(p.inputs[1], p.inputs[2])
    assert all(np.count_nonzero(W) == W.size for W, _ in p.params)


def test_relative_error_flags_nan_and_shape():
    ref = (2.0, [(np.ones((2, 3)), np.ones(2))])
    assert reference.relative_error(ref, ref) == 0.0
    bad = (2.0, [(np.full((2, 3), np.nan), np.ones(2))])
    assert reference.relative_error(bad, ref) == float("inf")
    assert reference.relative_error((2.0, [(np.ones((3, 2)), np.ones(2))]), ref) == float("inf")
    assert tolerance("float64") < tolerance("float32") < tolerance("float32", 1e-4)


def test_measure_picks_a_count_from_the_budget():
    s = timing.measure(lambda i: time.sleep(0.002), budget_s=0.05, min_runs=5)
    assert s.n >= 5 and s.timer == "cpu"
    assert 0.0015 < s.median_s < 0.05 and s.p10_s <= s.median_s <= s.p90_s
    slow = timing.measure(lambda i: time.sleep(0.02), budget_s=0.001)
    assert slow.n == 3
    seen = []
    timing.measure(lambda i: seen.append(i), n_inputs=3, budget_s=0.001, min_runs=6,
                   max_runs=6)
    assert set(seen) == {0, 1, 2}


def test_time_budget_shares_and_clamps():
    b = timing.TimeBudget(10.0, 4, floor_s=0.1, cap_s=1.0)
    assert b.per_measurement() == 1.0
    b = timing.TimeBudget(0.0, 4, floor_s=0.1, cap_s=1.0)
    assert b.per_measurement() == 0.1


def test_peer_selection():
    default = {i.name for i in select(None)}
    assert "torch-compile" not in default and {"cupynn", "numpy", "jax"} <= default
    assert {i.name for i in select("all")} == set(IMPLEMENTATIONS)
    assert [i.name for i in select("jax,cupynn")] == ["cupynn", "jax"]
    with pytest.raises(ValueError, match="unknown implementation"):
        select("tensorflow")
    assert "cuda" in IMPLEMENTATIONS["cupy"].unavailable("cpu")


class _OffByOnePercent(Implementation):
    """The plain NumPy network with a gradient 1% too large: must be reported wrong."""

    name, label = "broken", "broken"

    def prepare(self, problem):
        acts = problem.activations

        def gradient(i):
            loss, grads = reference.value_and_grad(np, problem.params, acts, problem.inputs[i])
            return loss, [(1.01 * dW, db) for dW, db in grads]

        return Runner(
            forward=lambda i: reference.forward_loss(np, problem.params, acts, problem.inputs[i]),
            gradient=gradient, fetch_forward=float,
            fetch_gradient=lambda r: (float(r[0]), r[1]))


def test_a_wrong_implementation_is_reported_and_not_timed():
    w = WORKLOADS["seed"].with_batch(64)
    problem = make_problem(w, "float64", "cpu", 0, n_inputs=1)
    ref = compute_reference(problem)
    settings = Settings(device="cpu", cases=[(w, "float64")], impls=[], progress=False)
    budget = timing.TimeBudget(1.0, 2, floor_s=0.01, cap_s=0.05)
    from cupynn.bench.runner import Progress

    res = run_one(_OffByOnePercent(), problem, ref, settings, budget, Progress(2, False))
    assert res["status"] == "wrong" and "reference" in res["reason"]
    assert res["forward"] is None and res["gradient"] is None
    good = run_one(IMPLEMENTATIONS["numpy"], problem, ref, settings, budget, Progress(2, False))
    assert good["status"] == "ok" and good["check"]["gradient_rel_err"] < 1e-12


def test_finalize_ratios_against_the_best_peer():
    def res(impl, fwd, grad, is_cupynn=False):
        return {"workload": "seed", "shape": "1→1000→20→1", "activation": "identity",
                "batch": 10_000, "dtype": "float64", "impl": impl, "label": impl,
                "is_cupynn": is_cupynn, "status": "ok", "reason": "", "loss": 1.0,
                "forward": {"median_s": fwd, "spread": 0.0},
                "gradient": {"median_s": grad, "spread": 0.0}}

    from cupynn.bench.roofline import Ceilings

    results = [res("cupynn", 1e-3, 1.5e-3, True), res("a", 2e-3, 8e-3), res("b", 4e-3, 6e-3)]
    ceilings = Ceilings("cpu", 1e10, {"float64": 1e10})
    report.finalize(results, ceilings)
    c = results[0]
    assert c["ratio"] == pytest.approx(1.5)
    assert c["vs_best_peer"]["forward"] == pytest.approx(0.5)
    assert c["vs_best_peer"]["gradient"] == pytest.approx(0.25)
    floor = WORKLOADS["seed"].flops("gradient") / 1e10
    assert c["pct_of_floor"]["gradient"] == pytest.approx(100 * floor / 1.5e-3)
    table = report.terminal_table(results)
    assert "0.25×" in table and "1.50" in table


def test_a_time_with_a_wide_spread_is_marked_noisy():
    def res(spread):
        return {"workload": "seed", "shape": "1→1000→20→1", "batch": 10, "dtype": "float64",
                "label": "x", "status": "ok", "loss": 1.0, "ratio": 2.0,
                "forward": {"median_s": 1e-3, "spread": spread},
                "gradient": {"median_s": 2e-3, "spread": 0.01}}

    rows = report.terminal_table([res(0.19), res(0.25)]).splitlines()[2:]
    assert "±19%" in rows[0] and "NOISY" not in rows[0]
    assert "1 ms ±25% NOISY" in rows[1] and rows[1].count("NOISY") == 1
    doc = {"machine": {"device": "cpu", "cpu": "x", "cpu_count": 2, "date": "d"},
           "results": [res(0.5)]}
    md = report.markdown(doc)
    assert "NOISY" in md and "Columns: forward / gradient" in md


def test_profile_wraps_each_timed_cpu_loop_in_a_named_nvtx_range(monkeypatch, capsys):
    """--profile on the CPU: one NVTX range per timed loop, through cupynn._nvtx."""
    from cupynn import _nvtx
    from cupynn.bench import cli

    calls = []
    monkeypatch.setattr(_nvtx, "_BACKEND", "recorder")
    monkeypatch.setattr(_nvtx, "_PUSH", lambda name: calls.append(name))
    monkeypatch.setattr(_nvtx, "_POP", lambda: calls.append(None))
    rc = cli.main(["seed", "--device", "cpu", "--dtype", "float64", "--batch", "64", "--sizes",
                   "1,8,1", "--peers", "cupynn,numpy", "--budget-s", "0.2", "--no-thread",
                   "--no-roofline", "-q", "--profile"])
    capsys.readouterr()
    assert rc == 0
    pushed = [c for c in calls if c is not None]
    assert [c for c in pushed if c.startswith("bench ")] == [
        f"bench {w} float64 {impl} {phase}" for w in ("seed", "custom")
        for impl in ("cupynn", "numpy") for phase in ("forward", "gradient")]
    assert calls.count(None) == len(pushed)  # every range closed
    calls.clear()
    rc = cli.main(["seed", "--device", "cpu", "--dtype", "float64", "--batch", "64", "--sizes",
                   "1,8,1", "--peers", "cupynn", "--budget-s", "0.2", "--no-thread",
                   "--no-roofline", "-q"])
    capsys.readouterr()
    assert rc == 0 and calls == []  # no ranges without --profile


def test_a_failing_peer_is_recorded_and_its_runner_closed_quietly():
    from cupynn.bench.runner import close_quietly, record_error

    res = {"status": "pending"}
    try:
        raise RuntimeError("out of memory\nsecond line")
    except RuntimeError as e:
        record_error(res, e)
    assert res["status"] == "error" and res["reason"] == "RuntimeError: out of memory"
    assert "Traceback" in res["traceback"] and "out of memory" in res["traceback"]

    closed = []

    class Runner:
        def close(self):
            closed.append(True)
            raise ValueError("already closed")

    close_quietly(Runner())
    close_quietly(None)
    assert closed == [True]


def test_cprofile_writes_a_report_of_the_timed_loops(tmp_path, capsys, monkeypatch):
    """--cprofile: where the CPU time of the timed loops goes, without a GPU or nsys."""
    import pstats

    from cupynn.bench import cli

    monkeypatch.setenv("CUPYNN_CPU_THREADS", "1")
    path = tmp_path / "seed.prof"
    rc = cli.main(["seed", "--device", "cpu", "--dtype", "float64", "--batch", "256",
                   "--peers", "cupynn", "--budget-s", "0.2", "--no-thread", "--no-roofline", "-q",
                   "--cprofile", str(path)])
    out = capsys.readouterr().out
    assert rc == 0
    assert f"cProfile of the timed loops (written to {path}" in out
    assert "Ordered by: internal time" in out and "numpy_backend.py" in out
    names = {func for (_, _, func) in pstats.Stats(str(path)).stats}
    assert {"value_and_grad", "network_forward"} <= names, sorted(names)[:40]
    # the checks against the float64 reference run outside the timed loops: not in it
    assert "compute_reference" not in names


def test_profile_says_when_its_ranges_cannot_be_recorded(monkeypatch, capsys):
    from cupynn import _nvtx
    from cupynn.bench import cli

    monkeypatch.setattr(_nvtx, "_BACKEND", "")  # no implementation importable
    monkeypatch.setattr(_nvtx, "_PUSH", None)
    args = ["seed", "--device", "cpu", "--dtype", "float64", "--batch", "64", "--sizes", "1,8,1",
            "--peers", "cupynn", "--budget-s", "0.1", "--no-thread", "--no-roofline", "-q", "--profile"]
    assert cli.main(args) == 0
    err = capsys.readouterr().err
    assert "WARNING: --profile: the benchmark's NVTX ranges cannot be recorded" in err
    assert "no NVTX implementation" in err and "cupynn[profile]" in err

    monkeypatch.setattr(_nvtx, "_BACKEND", "nvtx")  # an nvtx package that nsys drops
    monkeypatch.setattr(_nvtx, "_PUSH", lambda name: None)
    monkeypatch.setattr(_nvtx, "_POP", lambda: None)
    monkeypatch.setattr(_nvtx, "_package_version", lambda: (0, 2, 17))
    assert cli.main(args) == 0
    err = capsys.readouterr().err
    assert "cannot be recorded: the nvtx package 0.2.17 is in use" in err and "nvtx<0.2.12" in err

    monkeypatch.setattr(_nvtx, "_package_version", lambda: (0, 2, 11))
    assert cli.main(args) == 0
    err = capsys.readouterr().err
    assert "WARNING" not in err and "NVTX ranges (through nvtx) around the timed loops" in err


@pytest.mark.parametrize("choice,backend", [("none", None), ("cupy", "cupy.cuda.nvtx"), ("nvtx", "nvtx"),
                                            ("auto", "cupy.cuda.nvtx")])
def test_cupynn_nvtx_picks_the_implementation(monkeypatch, choice, backend):
    """CuPy's binding first (nsys records it), the nvtx package where CuPy is missing."""
    from cupynn import _nvtx

    monkeypatch.setenv("CUPYNN_NVTX", choice)
    monkeypatch.setattr(_nvtx, "_BACKEND", None)
    monkeypatch.setattr(_nvtx, "_PUSH", None)
    monkeypatch.setattr(_nvtx, "_POP", None)
    monkeypatch.setattr(_nvtx, "_from_cupy", lambda: ("cupy.cuda.nvtx", print, print))
    monkeypatch.setattr(_nvtx, "_from_package", lambda: ("nvtx", print, print))
    assert _nvtx.nvtx_backend() == backend
    assert (_nvtx.nvtx_problem() is None) == (backend is not None)


def test_cupynn_nvtx_falls_back_and_refuses_a_bad_choice(monkeypatch):
    from cupynn import _nvtx

    def missing():
        raise ImportError("no cupy here")

    for name, value in (("_BACKEND", None), ("_PUSH", None), ("_POP", None)):
        monkeypatch.setattr(_nvtx, name, value)
    monkeypatch.setattr(_nvtx, "_from_cupy", missing)
    monkeypatch.setattr(_nvtx, "_from_package", lambda: ("nvtx", print, print))
    monkeypatch.setenv("CUPYNN_NVTX", "auto")
    assert _nvtx.nvtx_backend() == "nvtx"
    monkeypatch.setenv("CUPYNN_NVTX", "nvtx-please")
    with pytest.raises(ValueError, match="CUPYNN_NVTX must be one of auto, cupy, nvtx, none"):
        _nvtx.nvtx_problem()
