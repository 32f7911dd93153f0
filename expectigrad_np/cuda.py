"""The GPU backend: PTX inspection and a benchmark.

``Expectigrad`` picks the cuda backend by itself for device arrays (numba,
CuPy, PyTorch CUDA: anything exporting ``__cuda_array_interface__``).  This
module adds ``ptx`` (the kernels' PTX, no GPU needed) and ``benchmark``
(step time against a device copy).  Importing it does not import
``numba.cuda``; calling either does.
"""
from __future__ import annotations

__all__ = ["KERNEL_NAMES", "benchmark", "host_cost", "ptx"]

# The kernels one step launches per dtype, in launch order: the stats pass
# (only with check_finite or norm clipping) and the fused update.  (Kept in
# step with ``backends.cuda.kernels.KERNEL_NAMES``, which imports numba.cuda.)
KERNEL_NAMES = ("stats_kernel", "update_kernel")


def ptx(dtype, cc=(9, 0)) -> str:
    """PTX of every kernel a step launches for ``dtype`` (float32 or float64)
    on compute capability ``cc``: one ``.entry`` per kernel of
    ``KERNEL_NAMES``.  Compiled through NVVM from the ``cuda`` extra
    (``numba-cuda[cu12]``); no GPU is needed.  Float32 kernels hold no
    double-precision instruction.

    Parameters
    ----------
    dtype : str or numpy dtype
        ``float32`` or ``float64``.
    cc : tuple of two ints, default (9, 0)
        The compute capability to compile for, such as ``(8, 0)`` or
        ``(9, 0)``.

    Returns
    -------
    str
        The PTX module, one ``.entry`` per kernel.

    Raises
    ------
    ImportError
        Without numba-cuda (``pip install ".[cuda]"``).
    """
    from .backends.cuda import kernels
    return kernels.ptx(dtype, cc)


def step_bytes(size, dtype, *, beta=0.9, sparse_counter=True, norms=False):
    """Bytes a step moves for ``size`` elements: the gradient read, the
    parameter and ``mean_sq`` read and written, ``count`` (sparse counter)
    and ``momentum`` (``beta > 0``) read and written, and one more gradient
    read when the stats pass runs (``check_finite`` or norm clipping)."""
    import numpy as np
    item = np.dtype(dtype).itemsize
    per = item * (1 + 2 + 2 + (2 if beta > 0 else 0) + (1 if norms else 0))
    per += 4 * 2 if sparse_counter else 0
    return int(size) * per


def benchmark(size=1 << 26, arrays=1, dtype="float32", steps=50, *, beta=0.9,
              sparse_counter=True, check_finite=False, repeats=3):
    """Time ``Expectigrad`` steps on the current GPU and compare with a
    device-to-device copy measured in the same run.

    ``size`` elements split over ``arrays`` arrays.  Returns a dict:
    ``step_s`` (best of ``repeats`` means over ``steps`` steps),
    ``step_gbps`` (``step_bytes`` / ``step_s``), ``copy_gbps`` (read plus
    write of a copy of the same number of bytes as the parameters,
    ``copy_to_device`` between two device arrays) and their ratio.
    Under numba's simulator it runs, but the times mean nothing.

    Parameters
    ----------
    size : int, default 2**26
        Elements in all, >= ``arrays``.
    arrays : int, default 1
        How many arrays ``size`` is split over (>= 1).
    dtype : str or numpy dtype, default "float32"
        ``float32`` or ``float64``.
    steps : int, default 50
        Steps timed per repeat (>= 1).
    beta : float, default 0.9
        The momentum decay, in [0, 1); 0 keeps no momentum (less traffic).
    sparse_counter : bool, default True
        Keep the per-element count of nonzero gradients.
    check_finite : bool, default False
        Run the stats pass (one more read of the gradients) on every step.
    repeats : int, default 3
        Repeats of the timed steps; the best mean is reported.

    Returns
    -------
    dict
        ``step_s``, ``step_gbps``, ``copy_gbps`` and their ratio.

    Raises
    ------
    ImportError
        Without numba-cuda; numba's CUDA errors without a usable GPU.
    """
    import time

    import numpy as np
    from numba import cuda

    from .optimizer import Expectigrad

    dtype = np.dtype(dtype)
    rng = np.random.default_rng(0)
    sizes = [size // arrays + (1 if k < size % arrays else 0) for k in range(arrays)]
    xs = [cuda.to_device(rng.standard_normal(n).astype(dtype)) for n in sizes]
    gs = [cuda.to_device(rng.standard_normal(n).astype(dtype)) for n in sizes]
    opt = Expectigrad(xs, lr=1e-6, beta=beta, sparse_counter=sparse_counter,
                      check_finite=check_finite)

    def best(run, count):
        times = []
        for _ in range(repeats):
            cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(count):
                run()
            cuda.synchronize()
            times.append((time.perf_counter() - t0) / count)
        return min(times)

    for _ in range(3):                     # compile and warm up
        opt.step(gs)
    step_s = best(lambda: opt.step(gs), steps)
    src = cuda.device_array(size * dtype.itemsize, np.uint8)
    dst = cuda.device_array(size * dtype.itemsize, np.uint8)
    dst.copy_to_device(src)
    copy_s = best(lambda: dst.copy_to_device(src), steps)
    moved = step_bytes(size, dtype, beta=beta, sparse_counter=sparse_counter,
                       norms=check_finite)
    step_gbps = moved / step_s / 1e9
    copy_gbps = 2 * size * dtype.itemsize / copy_s / 1e9
    return {"size": int(size), "arrays": int(arrays), "dtype": dtype.name,
            "step_s": step_s, "step_gbps": step_gbps, "copy_gbps": copy_gbps,
            "fraction_of_copy": step_gbps / copy_gbps,
            "device": str(getattr(cuda.get_current_device(), "name", "simulator"))}


def host_cost(arrays=(1, 10, 200), size=16, dtype="float32", steps=300, *,
              check_finite=False, make=None, repeats=3):
    """The host side of a step: ``step()`` on ``arrays`` arrays of ``size``
    elements with every kernel launch replaced by a no-op, so what remains
    is Python and the small table's copy.  Runs on a GPU or under numba's
    simulator, whose own device arrays are slower to describe than numba's
    or CuPy's.

    Parameters
    ----------
    arrays : sequence of int >= 1, default (1, 10, 200)
        The array counts to time.
    size : int >= 1, default 16
        Elements per array.
    dtype : float32 or float64, default float32
    steps : int >= 1, default 300
        Steps per timed block.
    check_finite : bool, default False
        Passed to the optimizer (with True the stats pass's read-back runs).
    make : callable, optional
        ``make(host_array)`` builds a device array (default
        ``numba.cuda.to_device``; any ``__cuda_array_interface__`` object
        works).
    repeats : int >= 1, default 3
        Timed blocks; the best is kept.

    Returns
    -------
    dict
        ``{"us": {count: µs a step}, "per_array_us": ..., "fixed_us": ...}``:
        a line through the smallest and the largest count.
    """
    import time

    import numpy as np
    from numba import cuda

    from .optimizer import Expectigrad

    make = cuda.to_device if make is None else make

    class _NoLaunch:
        def __getitem__(self, config):
            return lambda *args: None

    us = {}
    for count in arrays:
        xs = [make(np.zeros(size, dtype)) for _ in range(count)]
        gs = [make(np.ones(size, dtype)) for _ in range(count)]
        opt = Expectigrad(xs, lr=1e-3, check_finite=check_finite)
        for bucket in opt._buckets:
            bucket.kernels = {name: _NoLaunch() for name in bucket.kernels}
        for _ in range(3):
            opt.step(gs)
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(steps):
                opt.step(gs)
            best = min(best, (time.perf_counter() - t0) / steps)
        us[int(count)] = best * 1e6
    lo, hi = min(us), max(us)
    per = (us[hi] - us[lo]) / (hi - lo) if hi > lo else 0.0
    return {"us": us, "per_array_us": per, "fixed_us": us[lo] - per * lo}
