"""The demo command and the import footprint, each in a fresh interpreter."""
import os
import subprocess
import sys

import numpy as np

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
