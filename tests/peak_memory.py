"""Peak resident memory of a script run in a fresh process, for the tests
that promise no temporaries the size of the arrays.

The script resets the peak (writing "5" to /proc/self/clear_refs) and reads
it back (VmHWM in /proc/self/status) itself, and prints a JSON line last.
glibc returns freed blocks to the system only above its mmap threshold,
and reuses them otherwise without the peak moving: the threshold is set
low, so that every temporary shows.  Kernels compile in the process, so
that they, not the NumPy reference, take the steps on a cold cache."""
import json
import os
import subprocess
import sys

import pytest

needs_proc = pytest.mark.skipif(
    not (sys.platform.startswith("linux") and os.access("/proc/self/clear_refs", os.W_OK)),
    reason="needs /proc/self/clear_refs (Linux)")

# Prepended to every script: ``reset()`` sets the peak to the current
# resident size and returns it, ``peak()`` reads it (KiB).
PRELUDE = """
def reset():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return peak()

def peak():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmHWM"))
"""


def run(script, timeout=600):
    """Run ``PRELUDE + script`` in a fresh interpreter; its last line, as JSON."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path),
               MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072",
               EXPECTIGRAD_NP_COMPILE="wait")
    out = subprocess.run([sys.executable, "-c", PRELUDE + script], check=True,
                         capture_output=True, text=True, env=env, timeout=timeout)
    return json.loads(out.stdout.strip().splitlines()[-1])
