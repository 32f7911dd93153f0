"""Record the figures the Performance page is built from.

    python docs/_data/record.py [bench options...]

Runs ``python -m expectigrad_np bench --json``, ``bench --pieces --json``
(and ``bench --mpi --json`` when mpi4py and mpiexec are installed) and writes
their output to ``docs/_data/bench.json`` (``bench_pieces.json``,
``bench_mpi.json``).  The bench's JSON records the
CPU, core count, system, date, Python, NumPy and Numba versions and the
kernel threads; this script adds what it does not know to ``docs/_data/machine.json``: the
CPU model, the operating system, the date, the torch version and the load
average when the run started (the bench is best run on an otherwise idle
machine).
"""
import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
import sys

from expectigrad_np.bench import _cpu_model  # noqa: E402 - the bench's own reading

HERE = os.path.dirname(os.path.abspath(__file__))


def virtual():
    """Whether /proc/cpuinfo says the CPU runs under a hypervisor."""
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and " hypervisor" in line for line in f)
    except OSError:
        return None


def version(dist):
    """The installed version of ``dist``, or None."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine():
    """What the bench's own record leaves out."""
    return dict(
        cpu=_cpu_model(), virtual_machine=virtual(), logical_cpus=os.cpu_count(),
        arch=platform.machine(),
        system=f"{platform.system()} {platform.release()}",
        python=platform.python_version(),
        packages={d: version(d) for d in ("expectigrad_np", "numpy", "numba", "scipy",
                                          "torch", "expectigrad", "mpi4py")},
        date=datetime.date.today().isoformat(),
        loadavg_at_start=os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    )


def bench(*args):
    out = subprocess.run([sys.executable, "-m", "expectigrad_np", "bench", "--json", *args],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def main(argv):
    info = machine()
    result = bench(*argv)
    with open(os.path.join(HERE, "bench.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(HERE, "machine.json"), "w") as f:
        json.dump(info, f, indent=1)
    with open(os.path.join(HERE, "bench_pieces.json"), "w") as f:
        json.dump(bench("--pieces"), f, indent=1)
    if version("mpi4py"):
        try:
            mpi = bench("--mpi")
        except subprocess.CalledProcessError as e:
            print("bench --mpi failed; bench_mpi.json left as it was:\n" + e.stderr,
                  file=sys.stderr)
        else:
            with open(os.path.join(HERE, "bench_mpi.json"), "w") as f:
                json.dump(mpi, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1:])
