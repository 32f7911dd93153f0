"""The GPU backend's public helpers.

``Expectigrad`` picks the cuda backend by itself for device arrays (numba,
CuPy, PyTorch CUDA: anything exporting ``__cuda_array_interface__``).  This
module adds inspection; importing it does not import ``numba.cuda``, calling
``ptx`` does.
"""
from __future__ import annotations

__all__ = ["KERNEL_NAMES", "ptx"]

# The kernels one step launches per dtype, in launch order: the stats pass
# (only with check_finite or norm clipping) and the fused update.
KERNEL_NAMES = ("stats_kernel", "update_kernel")


def ptx(dtype, cc=(9, 0)) -> str:
    """PTX of every kernel a step launches for ``dtype`` (float32 or float64)
    on compute capability ``cc``: one ``.entry`` per kernel of
    ``KERNEL_NAMES``.  Compiled through NVVM from the ``cuda`` extra
    (``numba-cuda[cu12]``); no GPU is needed.  Float32 kernels hold no
    double-precision instruction."""
    from .kernels import cuda as kernels
    return kernels.ptx(dtype, cc)
