"""Messages a user meets: each says what was expected, what was got and what to change
(and never suggests something cupynn does not support). Also nested Chains."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import cupynn
from cupynn import _selfcheck, functional

from . import reference as ref
from .conftest import host_params


@pytest.fixture
def model():
    return cupynn.MLP([3, 5, 1], "tanh", device="cpu", rng=0)


@pytest.mark.parametrize("dtype", [np.int64, np.int32, bool, np.complex128])
def test_non_float_input_does_not_suggest_an_unsupported_dtype(model, dtype):
    with pytest.raises(TypeError) as info:
        model(np.ones((2, 3), dtype))
    msg = str(info.value)
    assert f"has dtype {np.dtype(dtype)} but the model is float64" in msg
    assert "astype('float64')" in msg and "models are float32 or float64" in msg
    assert "build the model with" not in msg


def test_float_input_of_the_other_precision_suggests_both_fixes(model):
    with pytest.raises(TypeError, match=r"astype\('float64'\) or build the model with "
                                        r"dtype='float32'"):
        model(np.ones((2, 3), np.float32))


def test_big_endian_input_says_byte_order_not_dtype(model):
    x = np.ones((2, 3), ">f8")
    with pytest.raises(TypeError) as info:
        model(x)
    msg = str(info.value)
    assert "float64 like the model, but in big-endian byte order ('>f8')" in msg
    assert "astype('float64')" in msg and "but the model is float64" not in msg
    np.testing.assert_array_equal(model(x.astype("float64")), model(np.ones((2, 3))))
    with pytest.raises(TypeError, match=r"\('>f4'\) and the model is float64.*astype\('float64'\)"):
        model(np.ones((2, 3), ">f4"))
    with pytest.raises(TypeError, match=r"'>f8' is float64 in big-endian byte order.*astype"):
        cupynn.Dense.from_arrays(np.ones((2, 3), ">f8"))


def test_one_dimensional_target_names_the_expected_shape(model):
    x = np.ones((100, 3))
    with pytest.raises(ValueError, match=r"target must have the output's shape \(100, 1\) "
                                         r"\(batch, out_features\), got \(100,\): reshape it "
                                         r"with target.reshape\(100, 1\)"):
        cupynn.value_and_grad(model, x, target=np.ones(100))
    with pytest.raises(ValueError, match=r"shape \(100, 1\) \(batch, out_features\), got "
                                         r"\(100, 2\)$"):
        cupynn.value_and_grad(model, x, target=np.ones((100, 2)))
    v, _ = cupynn.value_and_grad(model, x, target=np.ones(100).reshape(100, 1))
    assert np.isfinite(v)


def test_save_without_suffix_loads_without_suffix(tmp_path, model):
    path = tmp_path / "m"
    model.save(path)
    assert (tmp_path / "m.npz").exists() and not path.exists()
    loaded = cupynn.load(path, device="cpu")
    np.testing.assert_array_equal(loaded(np.ones((4, 3))), model(np.ones((4, 3))))
    loaded = cupynn.load(str(path), device="cpu")
    assert repr(loaded) == repr(model)
    with pytest.raises(FileNotFoundError):
        cupynn.load(tmp_path / "other", device="cpu")


def test_load_of_a_foreign_npz_says_what_it_holds(tmp_path):
    np.savez(tmp_path / "data.npz", inputs=np.ones(3), labels=np.zeros(3))
    with pytest.raises(cupynn.FileFormatError, match=r"data.npz \[meta\]: is missing: not a cupynn "
                                                     r"model file \(its arrays: inputs, labels\); "
                                                     r"cupynn.load reads files written by model.save"):
        cupynn.load(tmp_path / "data.npz", device="cpu")
    np.save(tmp_path / "one.npy", np.ones(3))
    with pytest.raises(cupynn.FileFormatError, match=r"holds a single array \(.npy\), not a cupynn model"):
        cupynn.load(tmp_path / "one.npy", device="cpu")
    np.savez(tmp_path / "other.npz", meta=np.array('{"format": "someone-else"}'))
    with pytest.raises(ValueError, match=r"not a cupynn model file \(format 'someone-else'"):
        cupynn.load(tmp_path / "other.npz", device="cpu")


def test_damaged_model_file_names_the_missing_array(tmp_path, model):
    model.save(tmp_path / "m.npz")
    with np.load(tmp_path / "m.npz") as data:
        kept = {k: data[k] for k in data.files if k != "layers.1.weight"}
    np.savez(tmp_path / "broken.npz", **kept)
    with pytest.raises(cupynn.FileFormatError, match=r"broken.npz \[layers.1.weight\]: is missing: the "
                                                     r"file is damaged"):
        cupynn.load(tmp_path / "broken.npz", device="cpu")


@pytest.mark.parametrize("container", [False, True])
def test_selfcheck_hint_fits_where_it_runs(monkeypatch, capsys, container):
    monkeypatch.setattr(cupynn, "cuda_available", lambda: False)
    monkeypatch.setattr(_selfcheck, "in_container", lambda: container)
    assert _selfcheck.main([]) == 2
    out = capsys.readouterr().out
    assert ("--gpus all" in out) == container
    if not container:
        assert "nvidia-smi" in out and "cupynn[cuda12]" in out


def test_tf32_on_the_cpu_is_said_once(monkeypatch):
    monkeypatch.setattr(functional, "_CPU_PRECISION_WARNED", set())
    m = cupynn.MLP([3, 4, 1], dtype="float32", device="cpu", precision="tf32", rng=0)
    x = np.ones((2, 3), np.float32)
    with pytest.warns(UserWarning, match=r"precision='tf32' has no effect on the CPU.*strict FP32"):
        m(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m(x)  # once per process
        cupynn.value_and_grad(m, x)
        cupynn.MLP([3, 4, 1], dtype="float32", device="cpu", rng=0)(x)  # strict: nothing
    with pytest.warns(UserWarning, match="precision='3xtf32'"):
        m.precision = "3xtf32"
        cupynn.value_and_grad(m, x)


# -- nested Chains ---------------------------------------------------------------------

def test_nested_chains_flatten(rng):
    inner = cupynn.MLP([2, 8, 4], "tanh", device="cpu", rng=0)
    last = cupynn.Dense(4, 1, "sigmoid", device="cpu", rng=1)
    model = cupynn.Chain(inner, last)
    flat = cupynn.Chain(*inner.layers, last)
    assert repr(model) == repr(flat) == (
        "Chain(\n  Dense(2 => 8, tanh),\n  Dense(8 => 4),\n  Dense(4 => 1, sigmoid),\n)")
    assert len(model) == 3 and model[2] is last and model[0] is inner[0]
    assert [p["weight"].shape for p in model.parameters()] == [(8, 2), (4, 8), (1, 4)]
    x = rng.standard_normal((11, 2))
    v, grads = cupynn.value_and_grad(model, x)
    rv, rgrads, _ = ref.value_and_grad(host_params(model), ["tanh", "identity", "sigmoid"], x,
                                       "sum_squares", None)
    assert ref.rel_err(v, rv) < 1e-12
    assert len(grads) == 3 and all(ref.rel_err(g["weight"], r[0]) < 1e-12
                                   for g, r in zip(grads, rgrads))
    deeper = cupynn.Chain(cupynn.Chain(cupynn.Chain(inner[0]), inner[1]), cupynn.Chain(last))
    assert repr(deeper) == repr(model)
    np.testing.assert_array_equal(deeper(x), model(x))


def test_nested_chain_saves_flat(tmp_path):
    model = cupynn.Chain(cupynn.MLP([2, 3, 2], device="cpu", rng=0), cupynn.Dense(2, 1, device="cpu"))
    model.save(tmp_path / "n.npz")
    loaded = cupynn.load(tmp_path / "n.npz", device="cpu")
    assert repr(loaded) == repr(model) and len(loaded) == 3


def test_nested_chain_precision_rules():
    a = cupynn.MLP([2, 3], dtype="float32", device="cpu", precision="tf32")
    b = cupynn.MLP([3, 1], dtype="float32", device="cpu", precision="3xtf32")
    assert cupynn.Chain(a, cupynn.Dense(3, 1, dtype="float32", device="cpu")).precision == "tf32"
    with pytest.raises(ValueError, match=r"nested Chains have different precisions "
                                         r"\['3xtf32', 'tf32'\]: pass precision="):
        cupynn.Chain(a, b)
    assert cupynn.Chain(a, b, precision="strict").precision == "strict"
    with pytest.raises(ValueError, match=r"Dense\[1\] \(4 => 1\) expects 4 inputs but "
                                         r"Dense\[0\] \(2 => 3\) produces 3"):
        cupynn.Chain(a, cupynn.Dense(4, 1, dtype="float32", device="cpu"))
    with pytest.raises(TypeError, match="Chain takes Dense layers or Chains; argument 1 is list"):
        cupynn.Chain(a, [b])


def test_callable_loss_returning_only_a_value_asks_for_the_pair(model):
    x = np.ones((3, 3))
    with pytest.raises(TypeError, match=r"must return a pair \(value, dL/dy\); got float64\. "
                                        r"Two ways out: .*cupynn\.jax\.loss\(f\).*"
                                        r"cupynn\.torch\.loss\(f\).* or return the gradient too"):
        cupynn.value_and_grad(model, x, lambda y: (y ** 2).sum())
