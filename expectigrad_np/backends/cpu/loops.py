"""The element update, written once, and the first pass over gradients.

``_update_span`` updates one contiguous span of an array; it picks the loop
its flags call for.  Every loop is ``_blocks``, the element update written
once, with compile-time flags (clipping, counter, uniform counts, momentum,
block size), so each
combination compiles to its own vectorised loop.  Which combinations a
compiled ``_update_span`` holds is itself a compile-time choice
(``LOOPS``, see ``kernels.variant``): a bucket compiles only those its
arrays can take.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from ..layout import (
    BETA,
    CLIPVALUE,
    DECAY,
    EPS,
    FIRST,
    HELD,
    INV_T,
    LAZY,
    MOMENTUM,
    OMB,
    SPARSE,
    STEP,
    UNIFORM,
    UNIFORM_MAX_T,
    T,
)
from .intrinsics import (
    _AHEAD_BLOCKS,
    BLOCK_BYTES,
    _adaptive,
    _block,
    _clip,
    _count_up,
    _prefetch_lines,
    _saturate,
    _weyl,
    _weyl_next,
)
from .jit import OPTS as _OPTS
from .jit import kernel as _kernel

# --- the update loops -----------------------------------------------------------
# ``h`` is the Weyl hash of the current element (``_weyl``), carried from
# element to element (``_weyl_next``); ``clipping``, ``sparse``, ``momentum``,
# ``block`` and ``prefetch`` are constants at every call, so each combination
# compiles to its own loop.  The element updates are written out in the loop
# bodies: moved into a function of scalars they ran 1.2x slower in float64
# (LLVM schedules the inlined call differently), and a function taking the
# arrays would reference-count them inside the loop.

@njit(inline="always", **_OPTS)
def _coefficients(c):
    """``(step, beta, 1 - beta, eps, 1/t, clipvalue, 1, 0, decay)`` from a
    coefficient row, in its dtype: read once per loop, so the loops load
    nothing but array elements."""
    return (c[STEP], c[BETA], c[OMB], c[EPS], c[INV_T], c[CLIPVALUE],
            c.dtype.type(1), c.dtype.type(0), c[DECAY])


@njit(**_OPTS)
def _prefetch_block(x_at, g_at, v_at, n_at, m_at, b, block, sparse, momentum):
    """Prefetch block ``b`` (``block`` elements from element ``b * block``)
    of every array the loop reads, given their data addresses (integers, so
    nothing is reference counted in the loops)."""
    offset = b * BLOCK_BYTES
    _prefetch_lines(x_at + offset, BLOCK_BYTES)
    _prefetch_lines(g_at + offset, BLOCK_BYTES)
    _prefetch_lines(v_at + offset, BLOCK_BYTES)
    if sparse:
        _prefetch_lines(n_at + b * block * 4, block * 4)       # uint32 counts
    if momentum:
        _prefetch_lines(m_at + offset, BLOCK_BYTES)


@njit(inline="always", **_OPTS)
def _addresses(x, g, v, n, m):
    """Data addresses of the five arrays, for ``_prefetch_block`` (read once,
    before a loop; prefetching is only asked for with ``lo == 0``, so block
    ``b`` of the loop is block ``b`` of the arrays)."""
    return (x.ctypes.data, g.ctypes.data, v.ctypes.data, n.ctypes.data,
            m.ctypes.data)


@njit(inline="always", **_OPTS)
def _blocks(x, g, v, n, m, k, scale, h, lo, count, block, prefetch, clipping, sparse,
            momentum, uniform, w_t):
    """The element update, written once: ``count`` blocks of ``block``
    elements from element ``lo``.  Returns the hash of the next element and
    (uniform loop) whether some gradient was zero.

    With the sparse counter an element is counted when its (clipped)
    gradient is not zero, and g**2 enters the mean with weight 1/count (0
    when not counted); with the dense counter with weight 1/t.  In the
    uniform loop (``uniform``: every count is ``t - 1``) a counted element
    gets weight ``w_t = 1/t``, with no division, and the counts are neither
    read nor written (``layout.LAZY``: ``_counts_after`` stores them once
    some gradient was zero).  Then the momentum (when ``momentum``) and the
    parameter step.  Every flag is a compile-time constant at every call.
    """
    step, beta, omb, eps, inv_t, clipvalue, one, zero, decay = k
    missed = False
    x_at, g_at, v_at, n_at, m_at = _addresses(x, g, v, n, m)
    for b in range(count):
        if prefetch and b + _AHEAD_BLOCKS < count:
            _prefetch_block(x_at, g_at, v_at, n_at, m_at, b + _AHEAD_BLOCKS, block,
                            sparse and not uniform, momentum)
        for j in range(block):
            i = lo + np.uint64(b * block + j)      # unsigned: no wraparound code
            gi = _saturate(_clip(g[i], scale, clipvalue, clipping))
            g2 = gi * gi
            if uniform:
                counted = g2 != zero
                missed = missed | (g2 == zero)
                w = w_t if counted else zero
            elif sparse:
                counted = g2 != zero
                cnt = _count_up(n[i], counted)
                n[i] = cnt
                w = one / x.dtype.type(cnt) if counted else zero
            else:
                w = inv_t
            v[i], u = _adaptive(gi, g2, v[i], w, eps, h)
            if momentum:
                m[i] = beta * m[i] + omb * u
                x[i] = x[i] * decay - step * m[i]     # decay = 1: x - step * m
            else:
                x[i] = x[i] * decay - step * u
            h = _weyl_next(h)
    return h, missed


@njit(inline="always", **_OPTS)
def _whole_and_rest(x, g, v, n, m, c, scale, h, clipping, sparse, momentum, uniform, now):
    """Whole blocks (prefetching), then the rest one element at a time (a
    block of one, which LLVM vectorises as a plain loop)."""
    k = _coefficients(c)
    w_t = k[6] / x.dtype.type(now)
    block = _block(x)
    whole = x.size // block
    h, missed = _blocks(x, g, v, n, m, k, scale, h, np.uint64(0), whole, block, True,
                        clipping, sparse, momentum, uniform, w_t)
    _, missed_rest = _blocks(x, g, v, n, m, k, scale, h, np.uint64(whole * block),
                             x.size - whole * block, 1, False, clipping, sparse, momentum,
                             uniform, w_t)
    return missed | missed_rest


@njit(inline="always", **_OPTS)
def _update_general(x, g, v, n, m, c, scale, h, clipping, sparse, momentum):
    """The general loop (``clipping``, ``sparse``, ``momentum`` constants)."""
    _whole_and_rest(x, g, v, n, m, c, scale, h, clipping, sparse, momentum, False,
                    np.uint32(1))


# --- the sparse counter while every count equals the step count ---------------
# An array none of whose gradients has yet been exactly zero has every count
# equal to its step count t - 1 (flag ``UNIFORM``).  Its counted elements
# then all get count t and weight 1/t, one division per span instead of one
# per element; the uncounted ones keep t - 1.  Bit for bit the general loop's
# result (the same uint32 count converted the same way), at about 0.8x its
# time where the step is bound by arithmetic.  The uniform loops return
# whether some element was not counted, which ends uniformity for later
# steps.  Unclipped only: a step that clips takes the general loop and ends
# uniformity without looking (clipping can zero a gradient: a norm that
# overflows gives scale 0; tracking that in the general loop cost 14 % of
# its time at 1e5 elements).
#
# While uniform, the counts are one number, so they are not kept in the count
# array at all (``layout.LAZY``, ``layout.HELD``): the step moves Adam's 28
# bytes an element (float32) instead of 36.  Around the update pass of every
# entry point, ``_counts_before`` decides per array whether it takes the
# uniform loop (then the flag ``LAZY`` is set, and stays fixed while chunks
# of the array run in parallel) or stores its counts for the loop that
# reads them; ``_counts_after`` records the number, or, when some chunk met
# a zero gradient, stores every count of the array from this step's
# gradient (once in the array's life).

@njit(inline="always", **_OPTS)
def _update_uniform(x, g, v, n, m, c, h, t, momentum):
    """The uniform loop, with momentum or not (``momentum`` a constant);
    returns whether some gradient was zero."""
    return _whole_and_rest(x, g, v, n, m, c, x.dtype.type(1), h, False, True, momentum,
                           True, np.uint32(t))


@njit(inline="always", **_OPTS)
def _clipped(scale, clipvalue):
    """Whether an array's step clips (its norm factor ``scale``, in the
    array's dtype, or a finite ``clipvalue``): the one test that picks the
    clipped loops, and with them whether held counts must be stored first
    (``_counts_before``, ``_has_loop`` and ``_update_span`` must agree)."""
    return scale != 1 or clipvalue < np.inf


@njit(inline="always", **_OPTS)
def _takes_uniform(f, clipping):
    """Whether an array with flags ``f`` takes a uniform loop this step."""
    return (f[SPARSE] != 0 and not clipping and f[UNIFORM] != 0
            and f[T] <= UNIFORM_MAX_T)


@njit(inline="always", **_OPTS)
def _counts_before(n, f, clipping):
    """Before the update pass, for an active array with counts ``n``: set
    ``LAZY`` if it takes the uniform loop (its counts are then ``t - 1``,
    stored or not), else store its counts if they are held (``HELD``), for
    the loop that reads them."""
    if _takes_uniform(f, clipping):
        f[LAZY] = 1
    elif f[LAZY] != 0:
        held = np.uint32(f[HELD])
        for i in range(n.size):
            n[i] = held
        f[LAZY] = 0


@njit(inline="always", **_OPTS)
def _counts_after(g, n, f):
    """After the update pass, for an active array that took the uniform
    loop: its counts are now all ``t`` (``HELD``), unless some gradient was
    zero (the loop cleared ``UNIFORM``); then store each count from this
    step's gradient, as the uniform loop counted it, and end ``LAZY``."""
    if f[LAZY] == 0:
        return
    t = f[T]
    if f[UNIFORM] != 0:
        f[HELD] = t
        return
    now, before, zero = np.uint32(t), np.uint32(t - 1), g.dtype.type(0)
    for i in range(g.size):
        gi = _saturate(g[i])
        n[i] = now if gi * gi != zero else before
    f[LAZY] = 0


# --- which loops a compiled span holds ------------------------------------------
# A loop is named by what it does: clipped or plain (unclipped), sparse (s) or
# dense (d) counter, with momentum (m) or without (n); the uniform loops are
# sparse and unclipped.  These module globals are compile-time constants:
# here every loop is on; ``kernels.variant`` compiles twins of
# ``_update_span`` and ``_has_loop`` with only the loops a bucket can take on
# (a loop that is off is pruned before numba types it, so it costs no
# compile time).
LOOPS = ("clip_sm", "clip_sn", "clip_dm", "clip_dn", "plain_sm", "plain_sn",
         "plain_dm", "plain_dn", "uniform_m", "uniform_n")
ALL_LOOPS = (1 << len(LOOPS)) - 1
CLIP_SM = CLIP_SN = CLIP_DM = CLIP_DN = True
PLAIN_SM = PLAIN_SN = PLAIN_DM = PLAIN_DN = True
UNIFORM_M = UNIFORM_N = True
ANY_CLIP = True


def loop_globals(mask):
    """The globals that switch on exactly the loops of bit ``mask`` (bit i:
    ``LOOPS[i]``), and ``ANY_CLIP``: whether some clipped loop is on (else
    the entry points compile no clipping code at all: no value-clipped norm,
    no overflow path)."""
    switches = {name.upper(): bool(mask >> i & 1) for i, name in enumerate(LOOPS)}
    switches["ANY_CLIP"] = any(switches[name.upper()] for name in LOOPS[:4])
    return switches


def loops_for(sparse, momentum, clipping):
    """The mask of the loops an array may take: the plain loop of its counter
    and momentum, the uniform one with the sparse counter, the clipped one
    when it may clip."""
    tag = ("s" if sparse else "d") + ("m" if momentum else "n")
    names = ["plain_" + tag] + (["uniform_" + tag[1]] if sparse else []) \
        + (["clip_" + tag] if clipping else [])
    return sum(1 << LOOPS.index(name) for name in names)


@njit(**_OPTS)
def _has_loop(f, clipping):
    """Whether this compiled span holds the loop for flags ``f`` (clipping or
    not): the entry points ask before writing anything."""
    sparse = f[SPARSE] != 0
    momentum = f[MOMENTUM] != 0
    if clipping:
        return ((CLIP_SM and sparse and momentum) or (CLIP_SN and sparse and not momentum)
                or (CLIP_DM and not sparse and momentum)
                or (CLIP_DN and not sparse and not momentum))
    if _takes_uniform(f, clipping):
        return (UNIFORM_M and momentum) or (UNIFORM_N and not momentum)
    return ((PLAIN_SM and sparse and momentum) or (PLAIN_SN and sparse and not momentum)
            or (PLAIN_DM and not sparse and momentum)
            or (PLAIN_DN and not sparse and not momentum))


@njit(**_OPTS)
def _update_span(x, g, v, n, m, c, f, scale, i0):
    """Update one contiguous span, elements ``i0:i0 + x.size`` of its array
    (``i0 + f[FIRST]`` of the parameter the array is part of: the hash of
    the rounding),
    with the loop its flags call for (the caller has made sure, with
    ``_has_loop``, that this compiled span holds it).

    An array takes the uniform loop when ``_counts_before`` set ``LAZY``
    (fixed while chunks of it run in parallel).  Writes ``f[UNIFORM] = 0``
    when a uniform array meets a zero gradient, or takes a loop that does
    not keep uniformity.
    """
    t = f[T]
    h = _weyl(i0 + f[FIRST], t)
    sparse = f[SPARSE] != 0
    momentum = f[MOMENTUM] != 0
    uniform = f[LAZY] != 0
    if _clipped(scale, c[CLIPVALUE]):
        f[UNIFORM] = 0          # clipping may have zeroed a gradient: not tracked
        if CLIP_SM and sparse and momentum:
            _update_general(x, g, v, n, m, c, scale, h, True, True, True)
        elif CLIP_SN and sparse and not momentum:
            _update_general(x, g, v, n, m, c, scale, h, True, True, False)
        elif CLIP_DM and not sparse and momentum:
            _update_general(x, g, v, n, m, c, scale, h, True, False, True)
        elif CLIP_DN and not sparse and not momentum:
            _update_general(x, g, v, n, m, c, scale, h, True, False, False)
    elif UNIFORM_M and sparse and momentum and uniform:
        if _update_uniform(x, g, v, n, m, c, h, t, True):
            f[UNIFORM] = 0
    elif UNIFORM_N and sparse and not momentum and uniform:
        if _update_uniform(x, g, v, n, m, c, h, t, False):
            f[UNIFORM] = 0
    elif PLAIN_SM and sparse and momentum:
        f[UNIFORM] = 0          # the general loop does not track uniformity
        _update_general(x, g, v, n, m, c, scale, h, False, True, True)
    elif PLAIN_SN and sparse and not momentum:
        f[UNIFORM] = 0
        _update_general(x, g, v, n, m, c, scale, h, False, True, False)
    elif PLAIN_DM and not sparse and momentum:
        _update_general(x, g, v, n, m, c, scale, h, False, False, True)
    elif PLAIN_DN and not sparse and not momentum:
        _update_general(x, g, v, n, m, c, scale, h, False, False, False)


@njit(inline="always", **_OPTS)
def _span_sums(g, norm, clip, clipvalue):
    """(sum of g*0, sum of g**2 in float64, or 0.0 without ``norm``) over
    a span; the body of ``_span_stats``, ``_span_stats_clipped`` and
    ``_span_nonfinite``, which set ``norm`` and ``clip`` as constants and
    compile it with reassociation.  With ``clip`` the squares are those of
    ``clip(g, -clipvalue, clipvalue)``: value clipping comes before the norms,
    as in the original project.

    ``g * 0`` is NaN exactly where ``g`` is NaN or infinite, so the first sum
    is zero iff the span is finite.  The span is read as four interleaved
    streams, its quarters, plus a tail of fewer than four elements: right
    after a step's writes one stream per thread reads memory at about 60 %
    of the rate of four (1e7 float32 elements, two threads, this pass alone:
    1.6 ms with one stream, 1.0 ms with four, 0.8 ms with four and no norm).
    Both sums vectorise because the loop may reassociate them
    (``fastmath={"reassoc"}`` on the kernels: SIMD lanes and several
    accumulators).  That changes only the rounding of the squared norm,
    which feeds norm clipping and is no part of the update's bit-exact
    contract; the NaN test is exact in any order.  The "nnan"/"ninf" flags
    are never set: they would let LLVM fold ``g * 0`` to zero and lose the
    check.
    """
    zero = g.dtype.type(0)
    nonfinite = zero
    sumsq = 0.0
    q = g.size // 4
    a, b, c, d = g[:q], g[q:2 * q], g[2 * q:3 * q], g[3 * q:4 * q]
    for i in range(q):
        nonfinite += (a[i] * zero + b[i] * zero) + (c[i] * zero + d[i] * zero)
        if norm:
            ga = np.float64(_clip_value(a[i], clipvalue, clip))
            gb = np.float64(_clip_value(b[i], clipvalue, clip))
            gc = np.float64(_clip_value(c[i], clipvalue, clip))
            gd = np.float64(_clip_value(d[i], clipvalue, clip))
            sumsq += (ga * ga + gb * gb) + (gc * gc + gd * gd)
    for i in range(4 * q, g.size):
        nonfinite += g[i] * zero
        if norm:
            gi = np.float64(_clip_value(g[i], clipvalue, clip))
            sumsq += gi * gi
    return nonfinite, sumsq


@njit(inline="always", **_OPTS)
def _clip_value(g, clipvalue, clip):
    """``clip(g, -clipvalue, clipvalue)`` when ``clip`` (a constant), else ``g``."""
    if clip:
        return min(max(g, -clipvalue), clipvalue)
    return g


@_kernel(fastmath={"reassoc"})
def _span_stats(g):
    """(sum of g*0, sum of g**2 in float64) over a span: zero first sum iff
    the span is finite (see ``_span_sums``)."""
    return _span_sums(g, True, False, g.dtype.type(0))


@_kernel(fastmath={"reassoc"})
def _span_stats_clipped(g, clipvalue):
    """``_span_stats`` of ``clip(g, -clipvalue, clipvalue)`` (the NaN test
    on ``g`` itself)."""
    return _span_sums(g, True, True, clipvalue)


@_kernel(fastmath={"reassoc"})
def _span_nonfinite(g):
    """(sum of g*0, 0.0) over a span: ``_span_stats`` without the squared
    norm, for a step that checks but does not clip by norm."""
    return _span_sums(g, False, False, g.dtype.type(0))


@njit(inline="always", **_OPTS)
def _first_pass(g, norm, clipvalue):
    """``_span_stats(g)`` when a norm is needed (of the value-clipped
    gradient when ``clipvalue`` is finite), else ``_span_nonfinite(g)``."""
    if norm:
        if clipvalue < np.inf:
            return _span_stats_clipped(g, clipvalue)
        return _span_stats(g)
    return _span_nonfinite(g)


@njit(inline="always", **_OPTS)
def _first_pass_unclipped(g, norm):
    """``_first_pass`` for a variant without clipped loops (no finite
    clipvalue can reach it)."""
    if norm:
        return _span_stats(g)
    return _span_nonfinite(g)


# Norms on the overflow path are kept in units of NORM_UNIT**-1 (times
# 2**-512, exact), so that even a norm beyond the float64 range (float64
# gradients near 1.8e308) stays finite.
NORM_UNIT = 2.0 ** -512


@njit(**_OPTS)
def _scaled_norm(g, clipvalue):
    """The L2 norm of ``clip(g, -clipvalue, clipvalue)`` in float64, times
    ``NORM_UNIT``, computed scaled by its largest element so that no square
    overflows (the rare path of a squared norm beyond the float64 range)."""
    big = 0.0
    for i in range(g.size):
        big = max(big, abs(np.float64(min(max(g[i], -clipvalue), clipvalue))))
    if big == 0.0:
        return 0.0
    acc = 0.0
    for i in range(g.size):
        r = np.float64(min(max(g[i], -clipvalue), clipvalue)) / big
        acc += r * r
    return (big * NORM_UNIT) * np.sqrt(acc)


@njit(**_OPTS)
def _joint_norm(norms, other_sumsq):
    """``sqrt(sum(norms**2) + other_sumsq)`` without squaring a large norm."""
    big = 0.0
    for k in range(norms.size):
        big = max(big, norms[k])
    if big == 0.0:
        return np.sqrt(other_sumsq)
    acc = other_sumsq / big / big
    for k in range(norms.size):
        r = norms[k] / big
        acc += r * r
    return big * np.sqrt(acc)


@_kernel
def _scale(sumsq, clipnorm):
    """Norm-clipping factor min(1, clipnorm / sqrt(sumsq))."""
    norm = np.sqrt(sumsq)
    if norm > clipnorm:
        return clipnorm / norm
    return 1.0
