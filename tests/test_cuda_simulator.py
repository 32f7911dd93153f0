"""The cuda backend's tests (tests/cudasim) in their own process: under
numba's CUDA simulator (chosen when numba is first imported) and, where
there is one, on a GPU; and the promise that importing the package does not
import numba.cuda."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _env(**extra):
    env = dict(os.environ, **extra)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


@pytest.mark.slow
def test_cuda_backend_under_the_simulator():
    if importlib.util.find_spec("numba_cuda") is None:
        pytest.skip("numba-cuda is not installed (pip install 'expectigrad_np[cuda]'); "
                    "the cuda backend's simulator tests need it")
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        pytest.skip("already running under the simulator: tests/cudasim is collected directly")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/cudasim"],
        cwd=ROOT, env=_env(NUMBA_ENABLE_CUDASIM="1"), capture_output=True, text=True,
        timeout=1800)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout
    assert "failed" not in result.stdout


def test_cuda_backend_on_a_gpu():
    """The same tests on real hardware, where there is a GPU."""
    if importlib.util.find_spec("numba_cuda") is None:
        pytest.skip("numba-cuda is not installed (pip install 'expectigrad_np[cuda]')")
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        pytest.skip("running under the simulator")
    probe = subprocess.run(
        [sys.executable, "-c", "from numba import cuda; print(cuda.is_available())"],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    if probe.stdout.strip() != "True":
        pytest.skip("no CUDA GPU is available (numba.cuda.is_available() is False)")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/cudasim"],
        cwd=ROOT, env=_env(EXPECTIGRAD_CUDA_TESTS="gpu"), capture_output=True, text=True,
        timeout=1800)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert " passed" in result.stdout


def test_import_does_not_load_numba_cuda():
    code = (
        "import sys, numpy as np, expectigrad_np as eg\n"
        "assert callable(eg.cuda.ptx)\n"
        "x = np.zeros(3); eg.Expectigrad(x).step(np.ones(3))\n"
        "loaded = lambda: [m for m in sys.modules\n"
        "                  if m == 'numba.cuda' or m.startswith('numba.cuda.')]\n"
        "assert loaded() == [], loaded()[:5]\n"
        "import expectigrad_np.backends.cuda.backend\n"          # the GPU backend does load it
        "assert 'numba.cuda' in loaded()\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
