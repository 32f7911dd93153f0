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
overflow while every ``g**2`` is finite (a finite ``g`` whose square
overflows counts as the largest finite ``g**2``), and in float32 it keeps the adaptive
step accurate over millions of steps where a float32 running sum drifts.
In float32 the new mean is rounded stochastically
(``add_stochastically_rounded``): to one of the two floats around the exact
``mean_sq + increment``, with probability proportional to closeness, the
choice made by ``dither(index, t)``.  Unlike round-to-nearest that is exact
on average, so a float32 mean stays accurate over millions of slowly
changing steps; it is reproducible and the same on every backend.  float64
rounds to nearest (its rounding errors are 2**29 times smaller).
With the sparse counter a coordinate whose gradient is exactly zero keeps
its mean and its count; its ``u`` is then ``0 / (eps + sqrt(mean_sq)) = 0``,
which is the paper's ``0/0 := 0``.

Every scalar is cast to the array's dtype before use, so float32 arithmetic
stays float32, in the same order of operations as the compiled kernels.
"""
from __future__ import annotations

import numpy as np

__all__ = ["add_stochastically_rounded", "clip_gradient", "dither",
           "expectigrad_update", "step_size"]

_MASK32 = np.uint64(0xFFFFFFFF)


def step_size(lr: float, beta: float, t: int) -> float:
    """The scalar multiplying the momentum on step ``t`` (1-based).

    ``lr / (1 - beta**t)`` with momentum, ``lr`` when ``beta == 0``.
    """
    if beta == 0.0:
        return float(lr)
    return float(lr) / (1.0 - float(beta) ** t)


def dither(index, t):
    """Positions in [0, 1) (multiples of 2**-24) for elements ``index`` (an
    int array) on step ``t``: the fractional part of
    ``index * 0x85EBCA77 / 2**32 + t * 0x9E3779B9 / 2**32``.

    For one element, successive steps walk round the unit interval by the
    golden ratio (a Weyl sequence): evenly spread and never periodic in
    practice, so rounding errors cancel over a run, faster than with
    independent random numbers.  Neighbouring elements start at unrelated
    points.  Pure integer arithmetic: the same bits on every backend.
    """
    h = (np.asarray(index, dtype=np.uint64) * np.uint64(0x85EBCA77)
         + np.uint64(t) * np.uint64(0x9E3779B9)) & _MASK32
    return (h >> np.uint64(8)).astype(np.float32) * np.float32(2.0 ** -24)


def add_stochastically_rounded(a, b, t):
    """``a + b`` in float32, rounded to one of its two neighbouring floats
    with probability proportional to closeness (stochastic rounding).

    Round-to-nearest makes nearly the same small error on every step when
    the mean changes smoothly, and a million such errors add up (1.3e-4
    relative on a stream whose gradients shrink a thousandfold).  Stochastic
    rounding is exact on average, so the errors cancel instead (3e-5 on that
    stream).  The choice comes from ``dither(index, t)``: reproducible, and
    the same on every backend.

    ``s = fl(a + b)`` and ``e = a + b - s`` exactly (Knuth's TwoSum); the
    result is the neighbour of ``s`` on ``e``'s side when ``|e| > r * gap``,
    ``gap`` the distance to that neighbour and ``r`` the dither.
    """
    a = np.asarray(a, dtype=np.float32)
    s = np.asarray(a + b, dtype=np.float32)
    bp = s - a
    e = (a - (s - bp)) + (b - bp)                  # a + b = s + e exactly
    step = np.where(e > 0, 1, -1).astype(np.int32)
    with np.errstate(invalid="ignore", over="ignore"):
        neighbour = (s.view(np.int32) + step).view(np.float32)
        gap = np.abs(neighbour - s)
        r = dither(np.arange(s.size).reshape(s.shape), t)
        return np.where(np.abs(e) > r * gap, neighbour, s)


def clip_gradient(g, scale=1.0, clipvalue=np.inf):
    """``clip(g * scale, -clipvalue, clipvalue)`` as a new array.

    ``scale`` is the norm-clipping factor ``min(1, clipnorm / ||g||)`` (and its
    global counterpart); value clipping comes after it.
    """
    dt = g.dtype.type
    out = np.array(g, copy=True)
    out *= dt(scale)
    if np.isfinite(clipvalue):
        np.clip(out, dt(-clipvalue), dt(clipvalue), out=out)
    return out


def expectigrad_update(x, g, mean_sq, count, momentum, *, t, lr, beta, eps,
                       sparse_counter=True):
    """One Expectigrad step on one array, in place.

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
        Outer momentum ``m`` (only when ``beta > 0``).
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
    """
    dt = x.dtype.type
    one, zero = dt(1), dt(0)

    with np.errstate(over="ignore"):                  # an overflowed g**2 counts
        g2 = np.minimum(g * g, np.finfo(x.dtype).max)  # as the largest finite value
    if sparse_counter:
        counted = g2 != zero                                   # sign(g**2)
        count += counted & (count != np.iinfo(count.dtype).max)   # saturates
        weight = np.where(counted, one / np.maximum(count, 1).astype(x.dtype), zero)
    else:
        weight = dt(1.0 / t)                                   # n = t
    increment = (g2 - mean_sq) * weight                         # s / n
    if x.dtype == np.float32:
        mean_sq[...] = add_stochastically_rounded(mean_sq, increment, t)
    else:
        mean_sq += increment
    u = g / (dt(eps) + np.sqrt(mean_sq))                       # 0/0 := 0

    if beta == 0.0:
        x -= dt(step_size(lr, beta, t)) * u
    else:
        momentum *= dt(beta)
        momentum += dt(1.0 - beta) * u                         # outer momentum
        x -= dt(step_size(lr, beta, t)) * momentum             # bias-corrected
