"""Expectigrad in plain NumPy: the readable statement of the algorithm.

This module is the specification the compiled kernels are tested against.
For one parameter array ``x`` with gradient ``g`` on its ``t``-th step
(Daley & Amato, 2020, arXiv:2010.01356)::

    s <- s + g**2                                  arithmetic sum of squares
    n <- n + sign(g**2)      (sparse counter)      or  n = t  (dense counter)
    u  = g / (eps + sqrt(s / n))                   with 0/0 := 0
    m <- beta * m + (1 - beta) * u                 outer momentum
    x <- x - lr / (1 - beta**t) * m                bias-corrected step

With ``beta == 0`` there is no momentum and no bias correction:
``x <- x - lr * u``.

What is stored.  Instead of the sum ``s`` the state keeps the running mean
``mean_sq = s / n``, updated as ``mean_sq += (g**2 - mean_sq) / n``.  It is
the same quantity, but it never grows with the number of steps, so it cannot
overflow (a finite ``g`` whose square would overflow is first saturated,
``saturate``), and in float32 it keeps the adaptive
step accurate over millions of steps where a float32 running sum drifts.
In float32 the new mean is rounded stochastically
(``add_stochastically_rounded``): a dither of up to half a spacing,
``dither(index, t)``, is added to the increment before rounding to nearest,
so the result is one of the two floats around the exact ``mean_sq +
increment`` with probability proportional to closeness.  Unlike
round-to-nearest that is exact on average, so a float32 mean stays accurate
over millions of slowly changing steps; it is reproducible and the same on
every backend.  float64 rounds to nearest (its rounding errors are 2**29
times smaller).
With the sparse counter a coordinate whose gradient is exactly zero keeps
its mean and its count; its ``u`` is then ``0 / (eps + sqrt(mean_sq)) = 0``,
which is the paper's ``0/0 := 0``.

Every scalar is cast to the array's dtype before use, so float32 arithmetic
stays float32, in the same order of operations as the compiled kernels.
"""
from __future__ import annotations

import numpy as np

from .backends.layout import SATURATION

__all__ = ["add_stochastically_rounded", "clip_gradient", "clip_value", "dither", "dither_offset",
           "expectigrad_update", "power_of_two_in", "saturate", "step_size", "weyl"]

_MASK32 = np.uint64(0xFFFFFFFF)


def step_size(lr: float, beta: float, t: int) -> float:
    """The scalar multiplying the momentum on step ``t`` (1-based).

    ``lr / (1 - beta**t)`` with momentum, ``lr`` when ``beta == 0``.

    Parameters
    ----------
    lr : float
        The learning rate of this step, >= 0.
    beta : float
        The momentum decay, in [0, 1).
    t : int
        The array's step number, counting this step (>= 1).

    Returns
    -------
    float
        The bias-corrected step size.
    """
    if beta == 0.0:
        return float(lr)
    return float(lr) / (1.0 - float(beta) ** t)


def weyl(index, t):
    """The uint32 hash ``(index * 0x85EBCA77 + t * 0x9E3779B9) mod 2**32`` of
    elements ``index`` (an int array) on step ``t``.

    For one element, successive steps walk round the 32-bit circle by the
    golden ratio (a Weyl sequence): evenly spread and never periodic in
    practice, so rounding errors cancel over a run, faster than with
    independent random numbers.  Neighbouring elements start at unrelated
    points.  Pure integer arithmetic: the same bits on every backend.

    Parameters
    ----------
    index : int or array_like of int
        The elements' indices in their array (>= 0).
    t : int
        The step number (>= 0).

    Returns
    -------
    ndarray of uint32
        The hash, shaped like ``index``.
    """
    h = (np.asarray(index, dtype=np.uint64) * np.uint64(0x85EBCA77)
         + np.uint64(t) * np.uint64(0x9E3779B9)) & _MASK32
    return h.astype(np.uint32)


def dither(index, t):
    """Offsets in (-1/2, 1/2) from ``weyl(index, t)``: its top 25 bits, read
    as a signed number and made odd, over 2**25.  Odd multiples of 2**-25,
    symmetric about 0, never reaching +-1/2; a float32 holds each exactly.

    Parameters
    ----------
    index, t
        As for ``weyl``: element indices (>= 0, an int or an array of
        them) and the step number (an int >= 0).

    Returns
    -------
    ndarray of float32
        The offsets, shaped like ``index``.
    """
    odd = (weyl(index, t).view(np.int32) >> np.int32(7)) | np.int32(1)
    return odd.astype(np.float32) * np.float32(2.0 ** -25)


def power_of_two_in(a):
    """``2**floor(log2|a|)`` for normal float32 ``a`` (``a`` with its mantissa
    cleared), 0 for zero and subnormals: the exponent bits alone.

    Parameters
    ----------
    a : array_like
        Values, converted to float32 (the sign is kept).

    Returns
    -------
    ndarray of float32
        ``a`` with its mantissa bits cleared.
    """
    a = np.asarray(a, dtype=np.float32)
    return (a.view(np.int32) & np.int32(0x7F800000)).view(np.float32)


_BELOW = np.float32(1.0 - 2.0 ** -24)


def dither_offset(a, t, index=None):
    """The offset ``add_stochastically_rounded`` adds: ``dither(index, t)``
    times the spacing of float32 numbers next to ``a`` (``a >= 0``) on the
    dither's side.

    Above ``a`` the spacing is ``ulp(a) = power_of_two_in(a) * 2**-23``;
    below it is the same, except for a power of two, where it is half that:
    ``power_of_two_in(a * (1 - 2**-24))``, one binade lower, gives it.  The
    product is computed as ``(dither * 2**25) * (power_of_two * 2**-48)``:
    an odd integer times a power of two, exact down to ``a`` about 2**-78
    and underflowing gradually below, the same way on every backend.

    Parameters
    ----------
    a : array_like
        The running means, converted to float32; ``a >= 0``.
    t : int
        The step number (>= 1).
    index : array_like of int, optional
        The elements' indices in their array, shaped like ``a`` (default:
        ``a`` is the whole array, element ``i`` has index ``i``), for a step
        on some rows of it.

    Returns
    -------
    ndarray of float32
        The offsets, shaped like ``a``.
    """
    a = np.asarray(a, dtype=np.float32)
    if index is None:                   # element i of a whole array: index i
        index = np.arange(a.size).reshape(a.shape)
    d = dither(index, t)
    side = np.where(d < 0, a * _BELOW, a)
    return (d * np.float32(2.0 ** 25)) * (power_of_two_in(side) * np.float32(2.0 ** -48))


def add_stochastically_rounded(a, b, t, index=None):
    """``a + b`` in float32 (``a >= 0``), rounded stochastically: a dither of
    up to half a spacing added before rounding to nearest,

        a + (b + dither_offset(a, t))

    Where ``a + b`` lies between ``a``'s two neighbours, it is rounded to one
    of the two floats around it with probability proportional to closeness:
    exact on average.  (When ``a`` is a power of two that holds for ``|b|``
    up to half the spacing below; increments that leave ``a``'s binade are
    large enough for rounding to nearest to be accurate.)  With ``b == 0`` the
    result is ``a``: the offset stays under half a spacing.

    Round-to-nearest makes nearly the same small error on every step when
    the mean changes smoothly, and a million such errors add up (1.3e-4
    relative on a stream whose gradients shrink a thousandfold); dithered
    rounding cancels them (2e-5 on that stream).  The offset depends only on
    ``a``, the element and the step, so the result is reproducible and the
    same on every backend.

    Parameters
    ----------
    a : array_like
        The running means, converted to float32; ``a >= 0``.
    b : array_like
        The increments, converted to float32, broadcastable to ``a``.
    t : int
        The step number (>= 1).
    index : array_like of int, optional
        The elements' indices in their array (see ``dither_offset``).

    Returns
    -------
    ndarray of float32
        The stochastically rounded sums.
    """
    a = np.asarray(a, dtype=np.float32)
    b = np.asarray(b, dtype=np.float32)
    with np.errstate(over="ignore", under="ignore"):
        return a + (b + dither_offset(a, t, index))


def saturate(g):
    """``clip(g, -G, G)`` as a new array, ``G`` the largest magnitude whose
    square is finite in ``g``'s dtype (just below 2**64 in float32, 2**512
    in float64; ``backends.layout.SATURATION``).

    A finite gradient beyond ``G`` would make ``g**2`` overflow; saturated,
    it enters the mean as ``G**2`` and its step as ``G``, so ``|u| <=
    sqrt(n)`` holds for every finite gradient and the mean stays finite.
    NaN stays NaN.

    Parameters
    ----------
    g : ndarray of float32 or float64
        The gradient (not modified).

    Returns
    -------
    ndarray
        The saturated gradient, ``g``'s dtype and shape.
    """
    sat = g.dtype.type(SATURATION[g.dtype])
    return np.clip(g, -sat, sat)


def clip_value(g, clipvalue=np.inf):
    """``clip(g, -clipvalue, clipvalue)`` as a new array (in ``g``'s dtype).

    Parameters
    ----------
    g : ndarray of float32 or float64
        The gradient (not modified).
    clipvalue : float, default inf
        The bound, > 0; infinity (the default) copies ``g`` unclipped.

    Returns
    -------
    ndarray
        The clipped copy.
    """
    dt = g.dtype.type
    out = np.array(g, copy=True)
    if np.isfinite(clipvalue):
        np.clip(out, dt(-clipvalue), dt(clipvalue), out=out)
    return out


def clip_gradient(g, scale=1.0, clipvalue=np.inf):
    """``clip(g, -clipvalue, clipvalue) * scale`` as a new array.

    The order of the original project: value clipping first, then the
    norm-clipping factor ``scale = min(1, clipnorm / ||clip(g)||)`` times its
    global counterpart (norms of the value-clipped gradients).

    Parameters
    ----------
    g : ndarray of float32 or float64
        The gradient (not modified).
    scale : float, default 1.0
        The norm-clipping factor, in (0, 1].
    clipvalue : float, default inf
        The value bound, > 0; infinity: no value clipping.

    Returns
    -------
    ndarray
        The clipped gradient, ``g``'s dtype and shape.
    """
    out = clip_value(g, clipvalue)
    out *= g.dtype.type(scale)
    return out


def expectigrad_update(x, g, mean_sq, count, momentum, *, t, lr, beta, eps,
                       sparse_counter=True, weight_decay=0.0, maximize=False, index=None):
    """One Expectigrad step on one array, in place.

    With ``maximize`` the gradient's sign is flipped first; with
    ``weight_decay`` the parameter decays as in AdamW (decoupled, with this
    step's ``lr``) before the step is subtracted:
    ``x <- x * (1 - lr * weight_decay) - step``.

    Parameters
    ----------
    x : ndarray of float32 or float64
        The parameter, updated in place.
    g : ndarray, same shape and dtype as ``x``
        The gradient (already clipped, if clipping is wanted).
    mean_sq : ndarray like ``x``
        Running mean of ``g**2`` over the counted steps (``s / n``).
    count : ndarray of uint32 like ``x``, or None
        Per-coordinate count of nonzero gradients (sparse counter only).
    momentum : ndarray like ``x``, or None
        Outer momentum ``m``, updated on every step (``m = u`` when
        ``beta == 0``); None: no momentum kept (``beta == 0`` throughout).
    t : int
        This array's step number, counting this step (t >= 1).
    lr : float
        Learning rate for this step, > 0.
    beta : float
        Momentum decay in [0, 1).
    eps : float
        Denominator constant, > 0.
    sparse_counter : bool
        Count only nonzero gradients (True) or every step (False, ``n = t``).
    weight_decay : float
        Decoupled weight decay >= 0: ``x`` is scaled by ``1 - lr *
        weight_decay`` (computed in float64, rounded to ``x``'s dtype).
    maximize : bool
        Ascend instead: the gradient's sign is flipped.
    index : int array like ``x``, or None
        The elements' indices in their parameter array, when ``x`` holds
        some rows of it (they seed the float32 rounding); None: ``x`` is the
        whole array.
    """
    dt = x.dtype.type
    one, zero = dt(1), dt(0)

    g = saturate(-g if maximize else g)                        # g**2 stays finite
    g2 = g * g
    if sparse_counter:
        counted = g2 != zero                                   # sign(g**2)
        count += counted & (count != np.iinfo(count.dtype).max)   # saturates
        weight = np.where(counted, one / np.maximum(count, 1).astype(x.dtype), zero)
    else:
        weight = dt(1.0 / t)                                   # n = t
    increment = (g2 - mean_sq) * weight                         # s / n
    if x.dtype == np.float32:
        mean_sq[...] = add_stochastically_rounded(mean_sq, increment, t, index)
    else:
        mean_sq += increment
    u = g / (dt(eps) + np.sqrt(mean_sq))                       # 0/0 := 0

    x *= dt(1.0 - float(lr) * float(weight_decay))             # decoupled decay (1: none)
    if momentum is None:                                       # beta = 0, never momentum
        x -= dt(step_size(lr, beta, t)) * u
    else:
        momentum *= dt(beta)
        momentum += dt(1.0 - beta) * u                         # outer momentum (= u if beta = 0)
        x -= dt(step_size(lr, beta, t)) * momentum             # bias-corrected
