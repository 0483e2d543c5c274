"""The mutation harness (cupynn.emulator.mutate): its mutant list, and a small sample run.

The full run (every mutant, two schedules; tens of minutes on two cores) is what
``python -m cupynn.emulator.mutate`` does; ``.ci/run`` runs it when kernels/ changed since
the recorded run (cupynn/emulator/mutation_record.json).
"""

from __future__ import annotations

from pathlib import Path

import pytest

mutate = pytest.importorskip("cupynn.emulator.mutate")

pytestmark = pytest.mark.emulator

KERNEL_FILES = {p.name for p in (Path(mutate.REPO) / "kernels").glob("*.cu*")} - {"common.cuh"}


def test_mutants_cover_every_kernel_file_and_bug_class():
    ms = mutate.MUTANTS
    assert len(ms) >= 30
    assert len({m.id for m in ms}) == len(ms)
    assert KERNEL_FILES <= {m.file for m in ms}, KERNEL_FILES - {m.file for m in ms}
    classes = " ".join(m.bug for m in ms)
    for bug in ("barrier", "__syncwarp", "tile-edge", "overlapping shared", "uninitialised accumulator",
                "shuffle lane", "activation-derivative", "fragment layout", "PTX operand", "cp.async",
                "32-bit offset", "reduction order"):
        assert bug in classes, bug
    for m in ms:
        assert m.tests and all(isinstance(t, str) for t in m.tests), m.id


def test_every_mutant_applies_to_the_kernels(tmp_path):
    import shutil

    for m in mutate.MUTANTS:
        k = tmp_path / m.id
        shutil.copytree(Path(mutate.REPO) / "kernels", k)
        mutate.apply(m, k)
        assert (k / m.file).read_text() != (Path(mutate.REPO) / "kernels" / m.file).read_text()
    # the real tree is never touched
    assert "S - 1; z >= 0" not in (Path(mutate.REPO) / "kernels" / "dense.cu").read_text()


def test_apply_refuses_a_stale_mutant(tmp_path):
    import shutil

    shutil.copytree(Path(mutate.REPO) / "kernels", tmp_path / "k")
    stale = mutate.Mutant("X", "dense.cu", "none", "text that is not in the kernel", "", ("tests",))
    with pytest.raises(ValueError, match="occurs 0 times"):
        mutate.apply(stale, tmp_path / "k")


@pytest.mark.parametrize("mid", ["D2", "M2"])
def test_sample_mutants_are_killed(mid):
    """A reduction-order bug and a swapped PTX operand, each run against its tests."""
    m = next(m for m in mutate.MUTANTS if m.id == mid)
    r = mutate.run_mutant(m, ("random:1",), timeout=600)
    assert r.killed, (r.outcome, r.detail)
