"""tests/test_keras.py again on the Keras backends this process does not
use, each in its own process (Keras picks its backend once, at import):
TensorFlow, with the IndexedSlices cases of tests/keras_tensorflow_cases.py,
and JAX, with 64-bit floats enabled so the float64 cases run in float64."""
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FILES = {"tensorflow": ["tests/test_keras.py", "tests/keras_tensorflow_cases.py"],
         "jax": ["tests/test_keras.py"]}
ENV = {"tensorflow": {"TF_CPP_MIN_LOG_LEVEL": "2"}, "jax": {"JAX_ENABLE_X64": "1"}}


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["tensorflow", "jax"])
def test_the_keras_front_end_on(backend):
    if importlib.util.find_spec("keras") is None:
        pytest.skip("keras is not installed (pip install 'expectigrad_np[keras]')")
    if importlib.util.find_spec(backend) is None:
        pytest.skip(f"{backend} is not installed (pip install 'expectigrad_np[{backend}]')")
    env = dict(os.environ, KERAS_BACKEND=backend, **ENV[backend])
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *FILES[backend]],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    out = result.stdout
    assert result.returncode == 0, out[-6000:] + result.stderr[-3000:]
    passed = re.search(r"(\d+) passed", out)
    assert passed and int(passed.group(1)) >= 15, out[-2000:]
    assert "skipped" not in out and "failed" not in out, out[-2000:]
