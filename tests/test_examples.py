"""Every example runs, at a small size, and says what it should."""
import importlib.util
import os
import runpy

import numpy as np
import pytest

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "examples")


def load(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}",
                                                  os.path.join(EXAMPLES, name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def has(module):
    return importlib.util.find_spec(module) is not None


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)          # nothing may be written into the repository
    return tmp_path


def test_quickstart(capsys):
    runpy.run_path(os.path.join(EXAMPLES, "quickstart.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "step 1000" in out and "bias 0.5" in out


def test_adam_divergence(tmp_path, capsys):
    adam, expg = load("adam_divergence").main(["--steps", "3000", "--out", str(tmp_path)])
    assert adam[-1] == 1.0 and expg[-1] == -1.0
    out = capsys.readouterr().out
    assert "final x = +1.0000" in out and "final x = -1.0000" in out
    assert os.path.exists(tmp_path / "adam_divergence.png") == has("matplotlib")


def test_scipy_rosenbrock(capsys):
    results = load("scipy_rosenbrock").main(["--maxiter", "2000"])
    assert results["Expectigrad"].nit == 2000 and results["BFGS"].success
    assert np.all(results["Expectigrad bounded"].x <= 0.5)
    out = capsys.readouterr().out
    for name in ("Expectigrad", "Nelder-Mead", "CG", "BFGS", "L-BFGS-B"):
        assert name in out


@pytest.mark.parametrize("extra", [[], ["--synthetic"]])
def test_logistic_regression(extra, capsys):
    res, acc = load("logistic_regression").main(["--epochs", "3", *extra])
    assert res.success and res.status == 2 and res.nepoch == 3
    assert acc > 0.6
    assert "test accuracy" in capsys.readouterr().out


def test_mlp_numpy(tmp_path, capsys):
    curves, acc = load("mlp_numpy").main(["--epochs", "8", "--out", str(tmp_path)])
    for name in ("Expectigrad", "Adam"):
        assert len(curves[name]) == 8 and curves[name][-1] < curves[name][0]
    assert os.path.exists(tmp_path / "mlp_numpy.png") == has("matplotlib")
    assert "accuracy" in capsys.readouterr().out


@pytest.mark.skipif(not has("torch"), reason="torch is not installed "
                    "(pip install 'expectigrad_np[torch]')")
def test_pytorch_digits(tmp_path, capsys):
    results = load("pytorch_digits").main(["--epochs", "3", "--out", str(tmp_path)])
    assert set(results) == {"Expectigrad", "Adam"}
    for r in results.values():
        assert r["losses"][-1] < r["losses"][0] and r["accuracy"] > 0.5
    out = capsys.readouterr().out
    assert "test accuracy" in out
    assert os.path.exists(tmp_path / "pytorch_digits.png") == has("matplotlib")


@pytest.mark.skipif(not has("keras"), reason="keras is not installed "
                    "(pip install 'expectigrad_np[keras]')")
def test_keras_digits(capsys):
    results = load("keras_digits").main(["--epochs", "3"])
    assert set(results) == {"Expectigrad", "Adam"}
    for r in results.values():
        assert r["losses"][-1] < r["losses"][0] and r["accuracy"] > 0.5
    assert "test accuracy" in capsys.readouterr().out


def test_sparse_logistic_regression(capsys):
    results = load("sparse_logistic_regression").main(
        ["--steps", "60", "--features", str(2**14)])
    dense, eager, lazy = (results[k] for k in ("dense gradients", "row-sparse, eager",
                                               "row-sparse, lazy"))
    assert np.array_equal(dense[0], eager[0])
    np.testing.assert_allclose(lazy[0], dense[0], atol=1e-3 * np.abs(dense[0]).max())
    assert dense[2] > 0.5 and abs(lazy[2] - dense[2]) < 0.05
    assert "identical to the dense run's: True" in capsys.readouterr().out
