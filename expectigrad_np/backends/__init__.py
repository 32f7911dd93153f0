"""Backends: peers behind one interface (``base.Bucket``).

``numpy``
    the reference, ``reference.py`` array by array; imports no numba.
``cpu``
    fused Numba kernels, one call per dtype for any number of arrays.
``cuda``
    Numba CUDA kernels on device arrays (imports ``numba.cuda``).

``bucket_class(name)`` imports a backend only when it is asked for.
"""
from __future__ import annotations

import importlib

__all__ = ["BACKENDS", "bucket_class"]

BACKENDS = {"numpy": ("numpy", "NumpyBucket"), "cpu": ("cpu.backend", "CpuBucket"),
            "cuda": ("cuda.backend", "CudaBucket")}


def bucket_class(name):
    """The ``Bucket`` subclass of backend ``name`` ("numpy", "cpu" or "cuda")."""
    module, cls = BACKENDS[name]
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)
