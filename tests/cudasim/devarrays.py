"""Device arrays for the cuda backend tests (simulator or GPU)."""
import numpy as np
import pytest
from numba import cuda

import expectigrad_np as eg
from expectigrad_np.backends.cuda import kernels as KC


class InterfaceArray:
    """Exports ``__cuda_array_interface__`` (version 3), as CuPy arrays and
    PyTorch CUDA tensors do, for memory the optimizer must use in place.

    Under the simulator, device memory is host memory: the interface points
    at ``host`` itself.  On a GPU it points at a device copy of ``host`` (or
    at ``device``, a numba device array), except for non-contiguous ``host``
    arrays, which are only ever refused and keep their host address.
    """

    def __init__(self, host=None, readonly=False, stream=1, device=None):
        self.readonly = readonly
        self.stream = stream
        self.host, self.device = host, device
        if device is None and not KC.SIMULATOR and host.flags.c_contiguous:
            self.host, self.device = None, cuda.to_device(host)

    @property
    def __cuda_array_interface__(self):
        if self.device is not None:
            cai = dict(self.device.__cuda_array_interface__)
            cai.update(data=(cai["data"][0], self.readonly), stream=self.stream)
            return cai
        h = self.host
        return {"shape": h.shape, "typestr": h.dtype.str, "version": 3,
                "data": (h.ctypes.data if h.size else 0, self.readonly),
                "strides": None if h.flags.c_contiguous else h.strides,
                "stream": self.stream}

    def values(self):
        """A host copy of the current contents."""
        return self.host.copy() if self.device is None else self.device.copy_to_host()


def views(host, slices):
    """InterfaceArrays over slices of one buffer (to test overlaps)."""
    if KC.SIMULATOR:
        return [InterfaceArray(host[s]) for s in slices]
    device = cuda.to_device(host)
    return [InterfaceArray(device=device[s]) for s in slices]


simulator_only = pytest.mark.skipif(
    not KC.SIMULATOR, reason="patches a kernel global, which compiled GPU kernels "
                             "have frozen; the simulator reads it at run time")


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
