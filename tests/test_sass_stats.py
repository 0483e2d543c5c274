"""python -m cupynn.sass_stats: the SASS reading (canned text), and -- where ptxas and
nvdisasm are installed -- the structure of a hot kernel's K-step loop: the multiply is
there, and the runtime activation switch is taken once per fragment, not per element
(the seed forward's loop had 32 indirect jumps per K-step when it was per element)."""

from __future__ import annotations

import json

import pytest

from cupynn import sass_stats

CANNED = """\
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_1:
        /*0010*/                   LDG.E.64 R2, desc[UR4][R4.64] ;
.L_x_2:
        /*0020*/                   LDS.64 R6, [R8] ;
        /*0030*/                   DMMA.8x8x4 R10, R6, R2, R10 ;
        /*0040*/               @P0 IMAD.WIDE R4, R3, 0x8, R4 ;
        /*0050*/              @!P1 BRA `(.L_x_2) ;
        /*0060*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0070*/                   BRA `(.L_x_1) ;
        /*0080*/                   EXIT ;
"""


def test_loop_body_is_the_innermost_loop_around_the_mma():
    lines = CANNED.splitlines()
    first, last = sass_stats.loop_body(lines)
    assert lines[first].startswith(".L_x_2") and "BRA `(.L_x_2)" in lines[last]
    body = sass_stats.op_counts(lines[first:last + 1])
    assert body == {"LDS": 1, "DMMA": 1, "IMAD": 1, "BRA": 1}
    assert sass_stats.op_counts(lines)["BRA"] == 2
    assert sass_stats.loop_body(["        /*0000*/                   EXIT ;"]) is None


def _tools_or_skip():
    missing = [t for t in ("ptxas", "nvdisasm") if not sass_stats.find_tool(t)]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (compile-check extra / CUDA toolkit)")
    pytest.importorskip("cupy_backends.cuda.libs.nvrtc")


@pytest.mark.slow
def test_seed_forward_loop_takes_one_activation_switch_per_fragment(tmp_path, capsys):
    _tools_or_skip()
    name = "cupynn::dense_forward<double, 0, 2, 1>"  # seed 1000 -> 20, float64 DMMA
    out = tmp_path / "one.json"
    assert sass_stats.main(["--activation", "identity", "--json", str(out), name]) == 0
    assert name in capsys.readouterr().out
    (one,) = json.loads(out.read_text())
    assert one["loop"].get("DMMA") == 32  # warp tile 32 x 16, BK 16: 4 x 2 x 4 mma per K-step
    assert "BRX" not in one["loop"] and one["spill_bytes"] == 0
    full = sass_stats.loop_stats(name)
    assert full["loop"].get("DMMA") == 32
    assert full["loop"].get("BRX", 0) <= 8, full["loop"]  # a switch per fragment, not per element
