"""The GPU backend: PTX inspection and a benchmark.

``Expectigrad`` picks the cuda backend by itself for device arrays (numba,
CuPy, PyTorch CUDA: anything exporting ``__cuda_array_interface__``).  This
module adds ``ptx`` (the kernels' PTX, no GPU needed) and ``benchmark``
(step time against a device copy).  Importing it does not import
``numba.cuda``; calling either does.
"""
from __future__ import annotations

__all__ = ["KERNEL_NAMES", "benchmark", "ptx"]

# The kernels one step launches per dtype, in launch order: the stats pass
# (only with check_finite or norm clipping) and the fused update.  (Kept in
# step with ``backends.cuda.kernels.KERNEL_NAMES``, which imports numba.cuda.)
KERNEL_NAMES = ("stats_kernel", "update_kernel")


def ptx(dtype, cc=(9, 0)) -> str:
    """PTX of every kernel a step launches for ``dtype`` (float32 or float64)
    on compute capability ``cc``: one ``.entry`` per kernel of
    ``KERNEL_NAMES``.  Compiled through NVVM from the ``cuda`` extra
    (``numba-cuda[cu12]``); no GPU is needed.  Float32 kernels hold no
    double-precision instruction."""
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
