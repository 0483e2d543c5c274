"""python -m cupynn.compile_check: its parsing, failure detection and cache.

Runs without a GPU or driver (pip's nvidia-cuda-nvrtc-cu12); skips only when NVRTC cannot be
loaded at all.  The full check of every instantiation is not a test: it takes minutes, and
CI runs it once as its own step (``python -m cupynn.compile_check`` in ``.ci/run``).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from cupynn import compile_check as cc

SPILL = Path(__file__).resolve().parents[1] / "cupynn" / "emulator" / "testdata" / "spill.cu"

SAMPLE_LOG = """\
ptxas info    : 289 bytes gmem
ptxas info    : Compiling entry function '_Z1kPd' for 'sm_90'
ptxas info    : Function properties for _Z1kPd
ptxas         .     16 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 35968 bytes smem, 400 bytes cmem[0]
ptxas info    : Compile time = 55.709 ms
ptxas info    : Compiling entry function '_Z1gv' for 'sm_90'
ptxas info    : Function properties for _Z1gv
ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 8 registers, 352 bytes cmem[0]
"""


def test_parse_ptxas_log():
    stats = cc.parse_ptxas_log(SAMPLE_LOG)
    assert stats["_Z1kPd"] == {"registers": 40, "smem": 35968, "stack": 16, "spill_stores": 8,
                               "spill_loads": 12}
    assert stats["_Z1gv"] == {"registers": 8, "smem": 0, "stack": 0, "spill_stores": 0,
                              "spill_loads": 0}


@pytest.fixture(scope="module")
def nvrtc():
    try:
        return cc.load_nvrtc()
    except cc.NvrtcUnavailable as exc:
        pytest.skip(f"NVRTC cannot be loaded: {exc}")


def test_planted_spill_fails_the_check(nvrtc, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("CUPYNN_EMU_CACHE", str(tmp_path))
    rc = cc.main(["--source", str(SPILL), "--name", "spills", "--name", "small",
                  "--option=--maxrregcount=32", "--arch", "sm_90", "--jobs", "1"])
    out, err = capsys.readouterr()
    assert rc == 1
    assert "spills: hot kernel spills registers" in err
    assert "small:" not in err
    assert "spill st/ld" in out  # the table was printed


def test_clean_source_passes(nvrtc, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("CUPYNN_EMU_CACHE", str(tmp_path))
    rc = cc.main(["--source", str(SPILL), "--name", "small", "--jobs", "1"])
    out, _ = capsys.readouterr()
    assert rc == 0, out
    assert "compile check passed" in out
    assert "512" in out  # 128 floats of static shared memory


def test_compile_errors_fail_the_check(nvrtc, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("CUPYNN_EMU_CACHE", str(tmp_path))
    bad = tmp_path / "bad.cu"
    bad.write_text('extern "C" __global__ void k(int* p) { p[0] = no_such_name; }\n')
    rc = cc.main(["--source", str(bad), "--name", "k", "--arch", "sm_90", "--jobs", "1"])
    _, err = capsys.readouterr()
    assert rc == 1 and "no_such_name" in err


def test_results_are_cached_per_kernel(nvrtc, capsys, tmp_path, monkeypatch):
    """A kernel compiled once (by any run) comes from the cache; new ones are compiled."""
    monkeypatch.setenv("CUPYNN_EMU_CACHE", str(tmp_path / "cache"))
    assert cc.main(["--source", str(SPILL), "--name", "small", "--arch", "sm_90"]) == 0
    out, _ = capsys.readouterr()
    assert "0 kernel results cached (by source hash); compiling 1 in 1 NVRTC programs" in out
    argv = ["--source", str(SPILL), "--name", "small", "--name", "spills",
            "--option=--maxrregcount=32", "--arch", "sm_90"]
    assert cc.main(argv) == 1  # a new option: both compiled again
    out, err = capsys.readouterr()
    assert "compiling 2 in 1 NVRTC programs" in out and "spills: hot kernel spills" in err
    assert cc.main(argv) == 1  # all cached, and the spill is still reported
    out, err = capsys.readouterr()
    assert "2 kernel results cached (by source hash); compiling 0" in out
    assert "spills: hot kernel spills registers" in err and "512" in out
    copy = tmp_path / "elsewhere" / "spill.cu"  # the same text in another directory
    copy.parent.mkdir()
    copy.write_text(SPILL.read_text())
    assert cc.main(["--source", str(copy), "--name", "small", "--arch", "sm_90"]) == 0
    assert "1 kernel results cached" in capsys.readouterr().out
    assert cc.main(["--source", str(copy), "--name", "small", "--arch", "sm_90",
                    "--no-cache"]) == 0
    assert "kernel results cached" not in capsys.readouterr().out


def test_sample_covers_every_kind_once_before_any_twice_hot_first():
    names = ("t<double, 0>", "t<double, 1>", "t<double, 2>", "t<float, 0>", "t<float, 1>",
             "u<double>", "u<float>", "v<float, 3>")
    hot = {"t<double, 2>", "t<float, 1>"}
    (one,) = cc.sample_instantiations([("k.cu", names)], 5, lambda n: n in hot)
    # five kinds (t/double, t/float, u/double, u/float, v/float): one each, the hot ones
    assert one == ("k.cu", ("t<double, 2>", "t<float, 1>", "u<double>", "u<float>", "v<float, 3>"))
    (two,) = cc.sample_instantiations([("k.cu", names)], 2, lambda n: n in hot)
    assert two[1] == ("t<double, 2>", "t<float, 1>")  # kinds ordered by template, then dtype
    (every,) = cc.sample_instantiations([("k.cu", names + names[:1])], 100)
    assert every[1] == names  # more than there are: all of them, once, in their order
    with pytest.raises(ValueError, match="at least 1"):
        cc.sample_instantiations([("k.cu", names)], 0)


def test_sample_option_limits_what_is_compiled(nvrtc, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("CUPYNN_EMU_CACHE", str(tmp_path))
    # "spills" would fail the check at 32 registers; a sample of 1 takes only "small"
    rc = cc.main(["--source", str(SPILL), "--name", "small", "--name", "spills", "--sample", "1",
                  "--option=--maxrregcount=32", "--arch", "sm_90", "--jobs", "1"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "1 kernels x 1 archs" in out and "spills" not in out
