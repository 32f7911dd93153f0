"""numba options shared by the CPU kernels, and two helpers.

Every kernel is compiled with ``error_model="numpy"`` (no zero-division
checks, which would block SIMD vectorisation), ``nogil=True`` and
``cache=True``.  Kernels called from Python are loaded from the cache
without refreshing numba's whole CPU target (``loading.py``).
"""
from __future__ import annotations

import types as pytypes

from numba import njit

from .loading import load_without_refresh

__all__ = ["OPTS", "kernel", "twin"]

OPTS = dict(nogil=True, cache=True, error_model="numpy")


def kernel(func=None, **options):
    """``njit`` with ``OPTS`` updated by ``options``, for a kernel called
    from Python: cached, and loaded from the cache without refreshing
    numba's whole CPU target (``loading.py``)."""
    if func is None:
        return lambda f: kernel(f, **options)
    return load_without_refresh(njit(**{**OPTS, **options})(func))


def twin(func, name, **overrides):
    """A copy of ``func`` under another name, its globals updated by
    ``overrides`` (numba reads globals as compile-time constants).

    Numba's on-disk cache is keyed by the function's qualified name and
    signature, not by ``parallel`` or by the values of globals: two
    dispatchers of one function would load each other's cached machine code.
    A twin has its own name, so its own cache entries."""
    namespace = func.__globals__ if not overrides else {**func.__globals__, **overrides}
    copy = pytypes.FunctionType(func.__code__, namespace, name,
                                func.__defaults__, func.__closure__)
    copy.__qualname__ = name
    return copy

