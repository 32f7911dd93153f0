"""Tests of the cuda backend, under numba's CUDA simulator or on a GPU.

Run them in their own process, with the simulator switched on before numba
is imported (``tests/test_cuda_simulator.py`` does both)::

    NUMBA_ENABLE_CUDASIM=1 python -m pytest tests/cudasim
    EXPECTIGRAD_CUDA_TESTS=gpu python -m pytest tests/cudasim     # on a GPU

The simulator runs every GPU thread as a Python thread, so it uses tiny
blocks and chunks (``kernels.cuda``), and the example budgets are small;
``CUDASIM_EXAMPLES`` sets the budget.
"""
import os
import sys
import threading

import numpy as np
import pytest
from hypothesis import settings

SIMULATOR = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
if not SIMULATOR and os.environ.get("EXPECTIGRAD_CUDA_TESTS") != "gpu":
    raise pytest.UsageError("tests/cudasim needs NUMBA_ENABLE_CUDASIM=1 (set before numba "
                            "is imported) or EXPECTIGRAD_CUDA_TESTS=gpu on a machine with "
                            "a GPU; see tests/test_cuda_simulator.py")


def _patch_shared_arrays():
    """Make the simulator's ``cuda.shared.array`` thread-safe.

    The simulator creates a block's shared array on the first call from a
    source line (a dict lookup, then an insert, without a lock): two threads
    switched between the two each get their own array, and the block's
    reductions silently go wrong.  Same lookup, under a lock.
    """
    from numba.cuda import types
    from numba.cuda.np import numpy_support
    from numba.cuda.simulator import kernelapi

    lock = threading.Lock()
    original = kernelapi.FakeCUDAShared.array

    def array(self, shape, dtype, alignment=None):
        if shape == 0 or alignment is not None:
            return original(self, shape, dtype, alignment)
        if isinstance(dtype, types.Type):
            dtype = numpy_support.as_dtype(dtype)
        frame = sys._getframe(1)
        caller = (frame.f_code.co_filename, frame.f_lineno)
        with lock:
            res = self._allocations.get(caller)
            if res is None:
                res = self._allocations[caller] = np.empty(shape, dtype)
        return res

    kernelapi.FakeCUDAShared.array = array


if SIMULATOR:
    _patch_shared_arrays()
    # Simulated threads meet at barriers by polling: a short GIL switch
    # interval makes each barrier far cheaper.
    sys.setswitchinterval(2e-5)

settings.register_profile("cudasim", max_examples=int(os.environ.get("CUDASIM_EXAMPLES", 25)),
                          deadline=None)
settings.load_profile("cudasim")
