"""Loading the cached kernels without initialising all of numba's CPU target.

Numba's on-disk cache (``cache=True``) makes a second process load machine
code instead of compiling it, but before the first load numba refreshes its
CPU target: it imports every module that implements a NumPy or Python
feature for *compiling* (``numba.np.linalg``, ``numba.np.arraymath`` and some
forty more) and, through ``numba.np.arraymath``, ``scipy.linalg`` to probe
for BLAS.  Loaded machine code needs none of it: it needs its own object
code, the symbols of numba's C helpers, and those of its runtime (NRT).
The refresh costs about 1.2x the time of ``import numpy, numba`` itself,
which made it most of the time of a fresh process's first step.

``load_without_refresh(dispatcher)`` changes how *that dispatcher* loads
from its cache: it registers the runtime's C helpers (as numba's own
runtime initialisation does, without compiling the runtime's LLVM module)
and loads, skipping the refresh.  Nothing else changes:

* a cache miss still compiles through numba's compiler, which refreshes the
  target as always (and initialises the runtime fully);
* any error while loading this way falls back to numba's own
  ``load_overload`` (which refreshes, then loads);
* other dispatchers in the process, the user's included, are untouched.

The shortcut uses three of numba's private names (``Cache._load_overload``,
``Cache._guard_against_spurious_io_errors`` and the runtime's
``_nrt_python.c_helpers``), so it is on only for numba versions it has been
checked against (``CHECKED_NUMBA``): with any other version, or with the
environment variable ``EXPECTIGRAD_NP_FULL_REFRESH=1``, dispatchers load the
usual way.  ``tests/test_startup.py`` checks, in fresh processes, that every
kernel loaded this way gives the reference's bits and that the first step
imports neither ``scipy`` nor numba's compiling modules.
"""
from __future__ import annotations

import os
import types

import numba

__all__ = ["CHECKED_NUMBA", "enabled", "load_without_refresh", "loads"]

# numba (major, minor) versions whose cache loading this module was checked
# against: what the refresh does, and which symbols the loaded code needs.
CHECKED_NUMBA = frozenset({(0, 68)})

loads = {"without_refresh": 0, "fallback": 0}
_runtime_symbols_registered = False


def _numba_version():
    try:
        return tuple(int(p) for p in numba.__version__.split(".")[:2])
    except ValueError:
        return None


def enabled():
    """Whether dispatchers passed to ``load_without_refresh`` skip the
    refresh in this process."""
    if os.environ.get("EXPECTIGRAD_NP_FULL_REFRESH", "") not in ("", "0"):
        return False
    return _numba_version() in CHECKED_NUMBA


def _register_runtime_symbols():
    """The symbols of numba's runtime C helpers (``NRT_MemInfo_call_dtor``,
    ``NRT_adapt_ndarray_from_python``, ...), which every kernel's argument
    unboxing calls; registering one twice is harmless."""
    global _runtime_symbols_registered
    if _runtime_symbols_registered:
        return
    import llvmlite.binding as ll
    from numba.core.runtime import _nrt_python
    for name, address in _nrt_python.c_helpers.items():
        ll.add_symbol(name if name.startswith("_") else "NRT_" + name, address)
    _runtime_symbols_registered = True


def _load_overload(cache, sig, target_context, full=None):
    try:
        _register_runtime_symbols()
        with cache._guard_against_spurious_io_errors():
            cres = cache._load_overload(sig, target_context)
    except Exception:                   # noqa: BLE001 - numba's own way instead
        loads["fallback"] += 1
        return full(sig, target_context)
    if cres is not None:
        loads["without_refresh"] += 1
    return cres


def load_without_refresh(dispatcher):
    """Make ``dispatcher`` (a ``cache=True`` CPU dispatcher that has compiled
    nothing yet) load its cached code without refreshing numba's target;
    returns it.  Does nothing where ``enabled()`` is false or the dispatcher
    has no cache."""
    cache = getattr(dispatcher, "_cache", None)
    if not enabled() or cache is None or not (
            hasattr(cache, "_load_overload")
            and hasattr(cache, "_guard_against_spurious_io_errors")):
        return dispatcher
    full = cache.load_overload
    cache.load_overload = types.MethodType(
        lambda self, sig, ctx: _load_overload(self, sig, ctx, full), cache)
    return dispatcher
