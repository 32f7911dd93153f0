"""The demo command and the import footprint, each in a fresh interpreter."""
import os
import subprocess
import sys

import numpy as np
import pytest

from expectigrad_np import demo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_python(*args):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=300)


def test_reddi_counterexample_adam_fails_expectigrad_succeeds():
    C = 3.0
    adam = demo.run_adam(30_000, 0.1, beta1=0.0, beta2=1 / (1 + C * C), C=C)
    ours = demo.run_expectigrad(30_000, 0.1, beta=0.9, C=C)
    assert adam[-1] == 1.0           # the worst point of [-1, 1]
    assert ours[-1] == -1.0          # the optimum


def test_demo_command_prints_both_parts():
    proc = run_python("-m", "expectigrad_np", "demo")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    adam = next(line for line in lines if "Adam (beta1=0, beta2" in line)
    ours = next(line for line in lines if "Expectigrad (beta=0.9)" in line)
    assert "WORST POINT" in adam and "+1.000" in adam
    assert "optimum" in ours and "-1.000" in ours
    losses = [float(line.split("loss")[1].split()[0]) for line in lines if "epoch" in line]
    assert len(losses) >= 3 and losses[-1] < 0.5 * losses[0]


def test_softmax_regression_loss_goes_down():
    losses = demo.softmax_regression(epochs=3, n=600, out=lambda *a: None)
    assert np.all(np.diff(losses[:2]) < 0) and losses[-1] < 0.5 * losses[0]


def test_cli_rejects_unknown_command():
    proc = run_python("-m", "expectigrad_np", "nonsense")
    assert proc.returncode != 0 and "invalid choice" in proc.stderr


def test_import_is_light():
    """`import expectigrad_np` loads neither scipy.optimize nor numba.cuda.

    (numba's own ``__init__`` imports the top-level ``scipy`` package for a
    version check whenever scipy is installed; that costs ~10 ms and no
    scipy submodule.)"""
    code = ("import sys, expectigrad_np; "
            "bad = [m for m in ('scipy.optimize', 'numba.cuda') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    proc = run_python("-c", code)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_bare_command_prints_the_help():
    proc = run_python("-m", "expectigrad_np")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage:") and "demo" in proc.stdout and "bench" in proc.stdout


def test_bench_help_is_plain_text_with_defaults(capsys):
    from expectigrad_np import bench
    with pytest.raises(SystemExit) as exit_:
        bench.main(["--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0
    assert "``" not in out and "default 7" in out and "per-block ratios" in out


@pytest.mark.parametrize("sizes,message", [
    ("1e20", "needs more memory than this machine has"), ("inf", "not a whole number"),
    ("nan", "not a whole number"), ("0", "not a whole number >= 1"),
    ("1.5", "not a whole number"), ("10,x", "'x' is not a number")])
def test_bench_refuses_bad_sizes_with_a_message(sizes, message, capsys):
    from expectigrad_np import bench
    with pytest.raises(SystemExit) as exit_:
        bench.main(["--sizes", sizes])
    said = str(exit_.value.code) + capsys.readouterr().err
    assert exit_.value.code != 0 and message in said, said


def test_bench_extras_use_no_array_larger_than_the_sizes(monkeypatch):
    """Every extra row is sized from the largest of ``--sizes``."""
    from expectigrad_np import bench
    seen = {}

    def record(name, sizes_of):
        def fake(*args, **kwargs):
            seen[name] = sizes_of(kwargs)
            return [] if name in ("uniform", "model_shapes", "pytorch") else {}
        monkeypatch.setattr(bench, f"bench_{name}", fake)

    record("size", lambda kw: [])
    monkeypatch.setattr(bench, "bench_size", lambda n, dtype, *a: dict(n=n, dtype=dtype,
                                                                       check_ratio=1.0))
    record("many_small", lambda kw: [200 * kw["size"]])
    record("uniform", lambda kw: list(kw["sizes"]))
    record("sparse", lambda kw: [32 * kw["rows"]])
    record("model_shapes", lambda kw: [kw["cap"]])
    record("pytorch", lambda kw: [kw["cap"]])
    for name in ("small", "small_lists", "minimize", "cold", "startup"):
        record(name, lambda kw: [])
    bench.run([10, 1000], ["float32"], 1)
    assert set(seen) >= {"many_small", "uniform", "sparse", "model_shapes", "pytorch"}
    assert all(n <= 1000 for sizes in seen.values() for n in sizes), seen


def test_bench_pieces_prints_each_piece(monkeypatch, capsys):
    from expectigrad_np import _bench_pieces, bench
    row = dict(piece="a piece", case="a case", where="here.py", with_us=1.0,
               without_us=2.0, buys=2.0)
    monkeypatch.setattr(_bench_pieces, "bench_pieces", lambda repeat: [row])
    assert bench.main(["--pieces"]) == 0
    out = capsys.readouterr().out
    assert "| a piece (here.py) | a case | 1.00 µs | 2.00 µs | 2.00x |" in out

