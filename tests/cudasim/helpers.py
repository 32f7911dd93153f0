"""Device arrays for the simulator tests."""
import numpy as np
from numba import cuda

import expectigrad_np as eg


class InterfaceArray:
    """Exports ``__cuda_array_interface__`` (version 3) for an array's memory,
    as CuPy arrays and PyTorch CUDA tensors do.  Under the simulator device
    memory is host memory, so this stands for a foreign device array whose
    memory the optimizer must update in place."""

    def __init__(self, host, readonly=False, stream=1):
        self.host = host
        self.readonly = readonly
        self.stream = stream

    @property
    def __cuda_array_interface__(self):
        h = self.host
        return {"shape": h.shape, "typestr": h.dtype.str, "version": 3,
                "data": (h.ctypes.data if h.size else 0, self.readonly),
                "strides": None if h.flags.c_contiguous else h.strides,
                "stream": self.stream}


class CudaMirror(eg.Expectigrad):
    """The cuda backend driven with one host array, for the property tests:
    ``x`` is copied to the device once, each gradient is copied in, and ``x``
    is refreshed from the device after each step."""

    def __init__(self, x, **hyper):
        self.host = x
        super().__init__(cuda.to_device(x), backend="cuda", **hyper)

    def step(self, g):
        super().step(cuda.to_device(np.ascontiguousarray(g, dtype=self.host.dtype)))
        self.params[0].copy_to_host(self.host)


def to_device(arrays):
    return [None if a is None else cuda.to_device(a) for a in arrays]


def to_host(arrays):
    return [a.copy_to_host() for a in arrays]
