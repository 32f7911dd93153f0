"""The cpu backend: fused Numba kernels (``kernels.py``) driven by
``backend.CpuBucket``; ``locate``, ``pointers`` and ``loading`` hold the
fail-safe tricks that make a step cheap, each with its contract."""
