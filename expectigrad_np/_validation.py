"""Checks of user input, each raising a specific error before anything changes."""
from __future__ import annotations

import math
import numbers

import numpy as np

# Hyperparameters a param group may set, with their defaults.
GROUP_DEFAULTS = {
    "lr": 1e-3,
    "beta": 0.9,
    "eps": 1e-8,
    "sparse_counter": True,
    "clipvalue": None,
    "clipnorm": None,
    "weight_decay": 0.0,
    "maximize": False,
}


def _real(name, value, where):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{where}{name} must be a real number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{where}{name} must be finite, got {value!r}")
    return value


def check_lr(value, where=""):
    """A learning rate: a finite number > 0, or a callable ``step -> lr``."""
    if callable(value):
        return value
    value = _real("lr", value, where)
    if value <= 0.0:
        raise ValueError(f"{where}lr must be > 0, got {value!r}")
    return value


def check_scheduled_lr(value, step, where=""):
    """The value a schedule returned: a real number (not a bool or a
    string), finite and >= 0."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{where}lr schedule returned {value!r} at step {step}, not a "
                        "number; a schedule must return a float")
    try:
        value = float(value)
    except OverflowError:
        raise ValueError(f"{where}lr schedule returned {value!r} at step {step}, "
                         "too large for a float; it must be finite and >= 0") from None
    if not math.isfinite(value) or value < 0.0:
        raise ValueError(f"{where}lr schedule returned {value!r} at step {step}; "
                         "it must be finite and >= 0")
    return value


def check_beta(value, where=""):
    value = _real("beta", value, where)
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{where}beta must be in [0, 1), got {value!r}")
    return value


def check_eps(value, where=""):
    value = _real("eps", value, where)
    if value <= 0.0:
        raise ValueError(f"{where}eps must be > 0, got {value!r}")
    return value


def check_eps_dtypes(eps, params, where=""):
    """``eps`` must stay > 0 in the dtype of every parameter it applies to
    (1e-50 is 0 in float32, and a zero eps turns the 0/0 := 0 rule into NaN)."""
    for p in params:
        dtype = np.dtype(getattr(p, "dtype", np.float64))
        if dtype.kind != "f":
            continue
        if eps > float(np.finfo(dtype).max):
            # inf in the dtype: every step would be 0 (g / inf).
            raise ValueError(f"{where}eps={eps!r} overflows {dtype}, the dtype of a "
                             f"parameter of this group; use eps <= "
                             f"{float(np.finfo(dtype).max):.6g}")
        if dtype.type(eps) == 0:
            raise ValueError(f"{where}eps={eps!r} is 0 in {dtype}, the dtype of a "
                             f"parameter of this group; use eps >= "
                             f"{np.finfo(dtype).smallest_subnormal}")


def check_schedule_value(raw, step, group, where=""):
    """A schedule's value ``raw`` at ``step`` for param group ``group``:
    checked like a constructor value (``check_scheduled_lr``) and against
    the largest step size its parameters' dtypes can hold."""
    value = check_scheduled_lr(raw, step, where)
    try:
        check_step_size_dtypes(value, group["beta"], group["params"], where,
                               group.get("weight_decay", 0.0))
    except ValueError as exc:
        raise ValueError(f"{where}lr schedule returned {value!r} at step {step}: "
                         f"{str(exc)[len(where):]}") from None
    return value


def check_step_size_dtypes(lr, beta, params, where="", weight_decay=0.0):
    """The largest step size, ``lr / (1 - beta)`` on the first step (``lr``
    when ``beta == 0``), must be finite in the dtype of every parameter it
    applies to (lr=3e38 overflows float32 and would write inf and NaN); the
    decay factor ``1 - lr * weight_decay`` must be >= 0."""
    if callable(lr):
        return
    largest = lr if beta == 0.0 else lr / (1.0 - beta)
    if lr * weight_decay > 1.0:
        raise ValueError(f"{where}lr={lr!r} with weight_decay={weight_decay!r} gives a "
                         f"decay factor 1 - lr * weight_decay of {1.0 - lr * weight_decay:.3g}: "
                         "below 0 it flips the parameters' signs each step, below -1 it "
                         "grows them without bound; use lr * weight_decay <= 1 (decoupled "
                         "decay shrinks the parameters by that fraction a step)")
    for p in params:
        dtype = np.dtype(getattr(p, "dtype", np.float64))
        if dtype.kind != "f":
            continue
        biggest = float(np.finfo(dtype).max)
        if largest > biggest:
            raise ValueError(f"{where}lr={lr!r} with beta={beta!r} gives a first step size "
                             f"of {largest:.3g}, which overflows {dtype}, the dtype of a "
                             f"parameter of this group; use lr <= "
                             f"{biggest * (1.0 - beta):.3g}")


def check_bool(name, value, where=""):
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{where}{name} must be True or False, got {value!r}")
    return bool(value)


def check_positive_or_none(name, value, where=""):
    """Clipping thresholds: None (off) or a finite number > 0."""
    if value is None:
        return None
    value = _real(name, value, where)
    if value <= 0.0:
        raise ValueError(f"{where}{name} must be > 0 or None, got {value!r}")
    return value


def check_group_value(key, value, where=""):
    """Validate one hyperparameter of a param group; returns the stored value."""
    if key == "lr":
        return check_lr(value, where)
    if key == "beta":
        return check_beta(value, where)
    if key == "eps":
        return check_eps(value, where)
    if key in ("sparse_counter", "maximize"):
        return check_bool(key, value, where)
    if key == "weight_decay":
        value = _real(key, value, where)
        if value < 0.0:
            raise ValueError(f"{where}weight_decay must be >= 0 (decoupled decay: "
                             f"x <- x * (1 - lr * weight_decay)), got {value!r}")
        return value
    if key in ("clipvalue", "clipnorm"):
        return check_positive_or_none(key, value, where)
    known = ", ".join(sorted(GROUP_DEFAULTS))
    raise ValueError(f"{where}unknown hyperparameter {key!r}; known: {known}")


def _refuse_subclass(x, what):
    """Masked arrays and matrices change what NumPy's arithmetic means
    (masked elements, ``*`` as a matrix product): the kernels would read
    their raw data and the numpy backend would not, so they are refused."""
    if isinstance(x, np.ma.MaskedArray):
        raise TypeError(f"{what} is a masked array; masks are not supported. Pass "
                        "np.asarray(x) (its data, every element) or fill the masked "
                        "elements first (x.filled(...))")
    if isinstance(x, np.matrix):
        raise TypeError(f"{what} is a numpy.matrix; pass np.asarray(x), a plain "
                        "ndarray viewing the same memory")


def check_parameter(x, where):
    """A parameter: a writeable real floating ndarray (float32 or float64)."""
    if not isinstance(x, np.ndarray):
        kind = f"{type(x).__module__}.{type(x).__qualname__}"
        if type(x).__module__.startswith("torch"):
            hint = ("for a CPU tensor pass t.detach().numpy(), an ndarray sharing its "
                    "memory, which the optimizer updates in place")
        elif isinstance(x, (list, tuple, numbers.Number)):
            hint = ("make it an array first, x = np.asarray(values, dtype=np.float64), "
                    "and keep that array: it is updated in place")
        else:
            hint = "pass an ndarray (np.asarray(x) where it shares x's memory)"
        raise TypeError(f"{where} must be a numpy.ndarray, got {kind}; {hint}")
    _refuse_subclass(x, where)
    if x.dtype.fields is not None and x.dtype.kind == "f":
        # A float dtype with fields (np.dtype((np.float32, [...]))).
        raise TypeError(f"{where} has dtype {x.dtype}, a float dtype with fields; "
                        "parameters must be plain float32 or float64 (x.view("
                        f"np.{x.dtype.type.__name__}) views the same memory)")
    if x.dtype not in (np.float32, np.float64) or x.dtype.fields is not None:
        raise TypeError(f"{where} has dtype {x.dtype}; parameters must be "
                        "float32 or float64 (x.astype(np.float32) makes a copy to "
                        "optimise)")
    if not x.flags.writeable:
        raise ValueError(f"{where} is read-only; parameters are updated in place")
    if _overlaps_itself(x):
        raise ValueError(f"{where} has elements that share memory (a view made with "
                         "as_strided or a zero stride), which an in-place update cannot "
                         "step; pass an array that owns its elements (x.copy())")
    return x


def _overlaps_itself(x):
    """Whether some elements of ``x`` surely share memory: an axis of stride
    0 (``broadcast_to`` made writeable, ``as_strided``), or more bytes of
    elements than the span they lie in.  Strides that interleave elements
    onto each other within a wide enough span are not caught."""
    if x.size < 2:
        return False
    if any(s == 0 and n > 1 for n, s in zip(x.shape, x.strides)):
        return True
    span = x.itemsize + sum((n - 1) * abs(s) for n, s in zip(x.shape, x.strides))
    return span < x.nbytes


# numpy >= 2 moved byte_bounds to numpy.lib.array_utils.
byte_bounds = getattr(getattr(np.lib, "array_utils", None), "byte_bounds", None) \
    or getattr(np, "byte_bounds", None)


def check_no_overlap(arrays, names):
    """Refuse the same memory given twice (same array or overlapping views)."""
    spans = []
    for a, name in zip(arrays, names):
        if not isinstance(a, np.ndarray) or a.size == 0:
            continue  # device arrays are checked by the cuda backend
        lo, hi = byte_bounds(a)
        spans.append((lo, hi, a, name))
    spans.sort(key=lambda s: s[0])
    for i, (lo1, hi1, a1, n1) in enumerate(spans):
        for lo2, hi2, a2, n2 in spans[i + 1:]:
            if lo2 >= hi1:
                break  # sorted by start: no later span reaches back into a1
            # Byte ranges can interleave without sharing elements
            # (x[::2] and x[1::2]); shares_memory decides exactly.
            if np.shares_memory(a1, a2):
                raise ValueError(f"{n1} and {n2} share memory; every parameter "
                                 "must be a distinct, non-overlapping array")


_REAL_KINDS = "fiu"        # float, signed and unsigned integer


def as_gradient(g, x, where):
    """Return ``g`` as an ndarray of ``x``'s shape, or raise.

    Real floating and integer gradients are accepted (cast later to ``x``'s
    dtype); complex, boolean, object and string data are refused.
    """
    if isinstance(g, np.ndarray):
        _refuse_subclass(g, f"the gradient of {where}")
    else:
        try:
            g = np.asarray(g)
        except Exception as exc:  # noqa: BLE001 - reported with context
            raise TypeError(f"the gradient of {where} could not be read as an "
                            f"array: {exc}") from None
    if g.dtype.kind not in _REAL_KINDS:
        raise TypeError(f"the gradient of {where} has dtype {g.dtype}; gradients "
                        "must be real numbers (float or integer)")
    if g.dtype.fields is not None:
        # A number dtype with fields (np.dtype((np.float32, [...]))): its
        # numbers, as the compiled route reads them.
        g = g.view(np.dtype(g.dtype.str))
    if g.shape != x.shape:
        raise ValueError(f"the gradient of {where} has shape {g.shape}, but the "
                         f"parameter has shape {x.shape}")
    return g
