"""The MPI front end (``expectigrad_np.mpi``) under ``mpiexec``: every rank
ends every step with the bits of one process stepping the mean gradient;
refusals are collective; a checkpoint from P ranks loads with other counts
and in one process.  The checks run in tests/mpi_worker.py."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mpi4py", reason="mpi4py is not installed (pip install 'expectigrad_np[mpi]')")

ROOT = Path(__file__).resolve().parent.parent


def _mpiexec():
    here = Path(sys.executable).parent / "mpiexec"
    return str(here) if here.exists() else shutil.which("mpiexec")


@pytest.mark.parametrize("state", ["sharded", "replicated"])
@pytest.mark.parametrize("ranks", [1, 2, 3])
def test_data_parallel_steps_match_one_process_on_the_mean(ranks, state, tmp_path):
    mpiexec = _mpiexec()
    if mpiexec is None:
        pytest.skip("no mpiexec (pip install mpich)")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    result = subprocess.run([mpiexec, "-n", str(ranks), sys.executable,
                             str(ROOT / "tests" / "mpi_worker.py"), str(tmp_path), state],
                            capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert sorted(result.stdout.split("OK")[1:]) and all(
        f"OK {r}" in result.stdout for r in range(ranks))


def test_importing_the_package_does_not_import_mpi4py():
    code = ("import sys, numpy as np, expectigrad_np as eg\n"
            "eg.Expectigrad(np.zeros(3)).step(np.ones(3))\n"
            "assert 'mpi4py' not in sys.modules\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


def test_the_mpi_example_runs_under_mpiexec_with_three_ranks():
    mpiexec = _mpiexec()
    if mpiexec is None:
        pytest.skip("no mpiexec (pip install mpich)")
    env = dict(os.environ, NUMBA_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    result = subprocess.run([mpiexec, "-n", "3", sys.executable,
                             str(ROOT / "examples" / "mpi_logistic_regression.py"),
                             "--steps", "60"],
                            capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "3 ranks" in result.stdout
    assert "stepping the mean: 0.0e+00" in result.stdout
    accuracy = float(result.stdout.split("test accuracy ")[1].split(";")[0])
    assert accuracy > 0.8


def test_bench_mpi_row_runs_under_mpiexec():
    """``bench --mpi`` end to end with two ranks: a row with every figure the
    bench prints and the docs render."""
    if _mpiexec() is None:
        pytest.skip("no mpiexec (pip install mpich)")
    from expectigrad_np.bench import _format_mpi, bench_mpi
    row = bench_mpi(1, ranks=2)
    assert row["ranks"] == 2 and row["elements"] == 2_002_000
    for key in ("step_us", "collectives_us", "shard_step_us", "replicated_step_us"):
        assert row[key] > 0, key
    assert 0.4 <= row["state_fraction"] <= 0.6        # half the state on each of 2 ranks
    assert "2 ranks" in _format_mpi(row)
