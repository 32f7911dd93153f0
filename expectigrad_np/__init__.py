"""expectigrad_np: the Expectigrad optimizer on NumPy arrays, with fused
Numba kernels.

    >>> import numpy as np, expectigrad_np as eg
    >>> W = np.zeros((784, 10), np.float32)
    >>> opt = eg.Expectigrad([W], lr=1e-3)
    >>> opt.step([np.ones_like(W)])          # W changes in place

``RowSparse(indices, values)`` is a gradient that touches some rows of a
parameter (``scipy.sparse`` matrices work too): a step costs what it
touches and equals the dense step.  ``minimize`` is the same optimizer
behind a ``scipy.optimize.minimize``-style call (scipy is imported on first
use).  ``reference`` holds the algorithm in plain NumPy; ``schedules`` the
learning-rate schedules; ``cuda`` the GPU backend's ``ptx`` and
``benchmark`` (importing it does not import numba.cuda).
"""
from .optimizer import Expectigrad
from .param_groups import ParamGroup
from .sparse import RowSparse

__version__ = "0.1.0"
__all__ = ["Expectigrad", "ParamGroup", "RowSparse", "cuda", "minimize", "reference", "schedules",
           "__version__"]


_LAZY = ("cuda", "reference", "schedules")


def __getattr__(name):
    # ``minimize`` needs scipy; it is imported on first use, not with the
    # package.  So are the submodules a step does not need (the schedules'
    # dataclasses alone took half of the package's import time).
    if name == "minimize":
        from ._minimize import minimize
        globals()["minimize"] = minimize
        return minimize
    if name in _LAZY:
        import importlib
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | {"minimize", *_LAZY})
