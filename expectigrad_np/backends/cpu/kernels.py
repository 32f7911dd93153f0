"""Fused Numba CPU kernels for the Expectigrad update.

The kernels know nothing of the optimizer class.  They take raw arrays and
per-array coefficient rows, read every gradient and state element once, and
write parameters and state in the same pass (see ``reference.py`` for the
math, which they follow operation for operation).

Three entry points cover every case:

``single_step(dtype, hold_gil)``
    one small C-contiguous array, for the lowest call overhead (a whole
    ``Expectigrad.step`` on 10 elements takes about 0.4 µs): a kernel of
    fixed signature ``(gradient object address, context address, zero)``,
    called through its compiled entry point with Python ints, so numba's
    dispatch never types an array; the gradient is read from its NumPy
    object (``locate.located_address``) and the parameter, state,
    coefficients, step count and scalars are reached through the context
    row (``CTX_FIELDS``).

``array_step``
    one C-contiguous 1-D array, passed directly with its state and rows
    (serial; the bucket interface's path for a single array).

``segments_step`` / ``segments_step_parallel``
    any number of arrays of one dtype.  Parameters and gradients are reached
    through their data addresses; the state of all arrays lives in flat
    buffers, one segment per array.  The work is split into fixed chunks
    (``CHUNK`` elements, never crossing an array boundary) so one parallel
    loop covers 200 small arrays as well as one large one.

Both do the whole step in one call: an optional first pass over the
gradients (non-finite check and squared norms for norm clipping), and
only if that pass finds nothing wrong, the update pass.  A rejected step
returns before writing anything.

Coefficient rows (one per array, in the array's dtype):
``[step_size, beta, 1 - beta, eps, 1/t, clipvalue, clipnorm]``.
Flag rows (int64): ``[active, sparse_counter, momentum, t, uniform]``, ``t``
the array's step number counting this step (it seeds the stochastic rounding
of the mean, ``_add_rounded``), ``uniform`` set while every count of the array
equals ``t - 1`` (see ``_update_uniform``; the kernels clear it).
All compiled with ``error_model="numpy"`` and branch-free selects so LLVM
vectorises the inner loops (check with ``inspect_asm``: ``vsqrtps``/``vdivps``
on ``ymm`` or ``zmm`` registers), ``nogil=True`` and ``cache=True``.  The update of
a span, ``_update_span``, is one compiled function that every entry point
calls (compiled once per dtype, and linked into the entry points' cached
code); within it the loops and their helpers are inlined, and nothing is
reference counted inside a loop.  The loops run over blocks and prefetch
ahead (see BLOCK_BYTES).  The first pass may reassociate its sums (see
``_span_stats``).

Compiled specialisations: one per dtype (float32, float64) of
``single_step`` (two: holding the GIL up to ``SINGLE_STEP_GIL_MAX``
elements, releasing it above), ``array_step``, ``segments_step``,
``segments_step_parallel`` and the ``_update_span`` they share (with its
small helpers ``_adaptive``, ``_clip``, ``_add_rounded`` and
``_prefetch_block``, which LLVM inlines), plus ``data_address`` on 1-D arrays and
``locate.locate_arrays`` (one signature); each is
compiled once, cached on disk and only loaded in later processes
(``python -m expectigrad_np bench`` lists those of a run), without refreshing
numba's whole CPU target (``loading.py``).
"""
from __future__ import annotations

import types as pytypes

import numpy as np
from numba import carray, njit, prange, types
from numba.extending import intrinsic, overload
from numba.np.numpy_support import as_dtype

from .loading import load_without_refresh
from .locate import located_address
from .pointers import pointer_like as _pointer_like
from .pointers import pointer_of as _pointer_of
from .pointers import pointer_to as _pointer_to

__all__ = [
    "CTX_FIELDS", "SCALAR_FIELDS", "array_step",
    "data_address", "segments_step", "segments_step_parallel",
    "single_step",
]

from ..layout import (
    ACTIVE,
    BETA,
    CLIPNORM,
    CLIPVALUE,
    COEF_FIELDS,
    EPS,
    FLAG_FIELDS,
    INV_T,
    MOMENTUM,
    OMB,
    SPARSE,
    STEP,
    UNIFORM,
    UNIFORM_MAX_T,
    WEYL_INDEX,
    WEYL_STEP,
    T,
)

_OPTS = dict(nogil=True, cache=True, error_model="numpy")


def _kernel(func=None, **options):
    """``njit`` with ``_OPTS`` updated by ``options``, for a kernel called
    from Python: cached, and loaded from the cache without refreshing
    numba's whole CPU target (``loading.py``)."""
    if func is None:
        return lambda f: _kernel(f, **options)
    return load_without_refresh(njit(**{**_OPTS, **options})(func))


def _twin(func, name):
    """A copy of ``func`` under another name.  Numba's on-disk cache is keyed
    by the function's qualified name and signature, not by ``parallel``: two
    dispatchers of one function would load each other's cached machine code."""
    twin = pytypes.FunctionType(func.__code__, func.__globals__, name,
                                func.__defaults__, func.__closure__)
    twin.__qualname__ = name
    return twin


@_kernel
def data_address(a):
    """The address of ``a``'s first element (a fast ``a.ctypes.data``)."""
    return a.ctypes.data


def _max_finite(x):
    """The largest finite value of ``x``'s float type (a compile-time constant)."""
    return np.finfo(type(x)).max


@overload(_max_finite, inline="always")
def _max_finite_impl(x):
    big = as_dtype(x).type(np.finfo(as_dtype(x)).max)
    return lambda x: big


@intrinsic
def _count_up(typingctx, count, counted):
    """``count + 1`` if ``counted`` and ``count`` is below the uint32 maximum,
    else ``count``: a saturating increment in 32-bit IR (numba would widen
    uint32 arithmetic to 64 bits, and the conversions cost as much as the
    increment)."""
    from llvmlite import ir

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        below = builder.icmp_unsigned("!=", args[0], ir.Constant(i32, 0xFFFFFFFF))
        up = builder.and_(builder.zext(args[1], ir.IntType(1)), below)
        return builder.add(args[0], builder.zext(up, i32))

    return types.uint32(types.uint32, types.boolean), codegen


# --- blocks and prefetching ----------------------------------------------------
# The update loops run over blocks of BLOCK_BYTES per array.  Before a block
# they ask for every cache line of each array they read, PREFETCH_AHEAD_BYTES
# further on (``_prefetch_block``), then update the block in a loop of
# constant trip count, which LLVM vectorises with no remainder; the elements
# after the last whole block run as a plain loop.  The hardware prefetchers
# alone leave the fused update 10-15 % slower than a kernel of the same
# traffic and trivial arithmetic on arrays beyond the caches: its divisions
# and square root keep the core busy, fewer loads are in flight, and the
# arrays arrive late.  Measured in a standalone copy of the float32 loop at
# 1e7 elements, two threads, against the same-traffic kernel (medians of
# interleaved blocks): 1.12-1.16x without prefetching; 256-byte blocks, 512
# bytes ahead, every line: 0.99-1.02x; one line in two: 1.06-1.10x; bursts of
# 40 lines (1 KiB blocks): 1.46-1.49x.  float64, 256-byte blocks: 1.09-1.10x
# -> 1.02-1.03x.  At 1e4 to 1e6 elements the blocked loops take the time the
# plain ones did.
BLOCK_BYTES = 256
PREFETCH_AHEAD_BYTES = 512
_AHEAD_BLOCKS = PREFETCH_AHEAD_BYTES // BLOCK_BYTES
_LINE_BYTES = 64


def _block(x):
    """Elements per update block of array ``x`` (a compile-time constant)."""
    return BLOCK_BYTES // x.itemsize


@overload(_block, inline="always")
def _block_impl(x):
    size = BLOCK_BYTES // as_dtype(x.dtype).itemsize
    return lambda x: size


@intrinsic
def _prefetch(typingctx, address):
    """Ask for the cache line holding byte ``address`` (``llvm.prefetch``:
    read, into all cache levels).  A prefetch never faults and reads
    nothing, so the address may lie past the end of an array.  Takes an
    integer, not an array: arrays passed into the loops would be reference
    counted there (atomic operations, and calls that stop vectorisation)."""
    from llvmlite import ir

    def codegen(context, builder, signature, args):
        i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
        fn = builder.module.declare_intrinsic("llvm.prefetch", [i8p], fnty)
        builder.call(fn, [builder.inttoptr(args[0], i8p), ir.Constant(i32, 0),
                          ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return types.void(address), codegen


@njit(**_OPTS)
def _prefetch_lines(address, nbytes):
    """Prefetch the ``nbytes`` from ``address``, a cache line at a time."""
    for offset in range(0, nbytes, _LINE_BYTES):
        _prefetch(address + offset)


@intrinsic
def _is_float32(typingctx, x):
    """True for a float32 ``x``: a compile-time constant, so LLVM drops the
    branch it guards."""
    single = x.bitwidth == 32

    def codegen(context, builder, signature, args):
        return context.get_constant(types.boolean, single)

    return types.boolean(x), codegen


@intrinsic
def _weyl(typingctx, index, t):
    """``reference.weyl``: ``(index * 0x85EBCA77 + t * 0x9E3779B9) mod
    2**32`` as uint32, in 32-bit IR (numba would widen it to 64 bits)."""
    from llvmlite import ir

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        index32 = builder.trunc(args[0], i32)
        t32 = builder.trunc(args[1], i32)
        return builder.add(builder.mul(index32, ir.Constant(i32, WEYL_INDEX)),
                           builder.mul(t32, ir.Constant(i32, WEYL_STEP)))

    return types.uint32(index, t), codegen


@intrinsic
def _weyl_next(typingctx, h):
    """The hash of the next element, ``h + 0x85EBCA77 mod 2**32``.  Carried
    through the loop, so it vectorises as one add (an induction), not a
    multiply per element."""
    from llvmlite import ir

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        return builder.add(args[0], ir.Constant(i32, WEYL_INDEX))

    return types.uint32(h), codegen


@intrinsic
def _dither_offset(typingctx, h, a):
    """``reference.dither_offset`` for one float32 ``a`` with hash ``h``:
    ``odd * (pow2(side) * 2**-48)``, ``odd = (int32(h) >> 7) | 1`` and
    ``side`` ``a`` or, for a negative ``odd``, ``a * (1 - 2**-24)``.  Ten
    instructions of 32-bit integer and float IR.  (Defined for float32 only;
    for float64, which rounds to nearest, it is 0.)"""
    from llvmlite import ir

    def codegen(context, builder, signature, args):
        fty = context.get_value_type(a)
        if a.bitwidth != 32:
            return ir.Constant(fty, 0.0)
        i32 = ir.IntType(32)
        hash_, value = args
        odd = builder.or_(builder.ashr(hash_, ir.Constant(i32, 7)), ir.Constant(i32, 1))
        below = builder.icmp_signed("<", hash_, ir.Constant(i32, 0))
        side = builder.select(below, builder.fmul(value, ir.Constant(fty, 1.0 - 2.0 ** -24)),
                              value)
        pow2 = builder.bitcast(builder.and_(builder.bitcast(side, i32),
                                            ir.Constant(i32, 0x7F800000)), fty)
        step = builder.fmul(pow2, ir.Constant(fty, 2.0 ** -48))
        return builder.fmul(builder.sitofp(odd, fty), step)

    return a(h, a), codegen


@njit(**_OPTS)
def _add_rounded(a, b, h):
    """``a + b``; in float32 ``reference.add_stochastically_rounded`` for one
    element with hash ``h``: ``a + (b + dither_offset)``, an offset of up to
    half the spacing of floats next to ``a`` added before rounding to
    nearest.  The offset depends on ``a`` and ``h`` only, so of the rounding
    only the last two additions wait on ``b``."""
    if not _is_float32(a):
        return a + b
    return a + (b + _dither_offset(h, a))


@njit(**_OPTS)
def _adaptive(g, g2, mean_sq, weight, eps, h):
    """Return (new mean of g**2, adaptive step u = g / (eps + sqrt(mean))).

    A g**2 that overflows to inf counts as the largest finite value, so the
    mean stays finite (an inf mean would turn into NaN on the next step).
    The new mean is rounded stochastically (``_add_rounded``, hash ``h``)."""
    big = _max_finite(mean_sq)
    v = _add_rounded(mean_sq, ((big if g2 > big else g2) - mean_sq) * weight, h)
    return v, g / (eps + np.sqrt(v))


@njit(**_OPTS)
def _clip(g, scale, clipvalue, clipping):
    """``clip(g * scale, -clipvalue, clipvalue)``; just ``g`` when
    ``clipping`` is False (then ``scale == 1`` and ``clipvalue == inf``, so
    the result is the same).  Callers pass ``clipping`` as a constant, so
    each loop is compiled twice and the unclipped one has no clipping
    instructions (three vector operations of about forty)."""
    if clipping:
        return min(max(g * scale, -clipvalue), clipvalue)
    return g


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
    """``(step, beta, 1 - beta, eps, 1/t, clipvalue, 1, 0)`` from a
    coefficient row, in its dtype: read once per loop, so the loops load
    nothing but array elements."""
    return (c[STEP], c[BETA], c[OMB], c[EPS], c[INV_T], c[CLIPVALUE],
            c.dtype.type(1), c.dtype.type(0))


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
def _general_blocks(x, g, v, n, m, k, scale, h, lo, count, block, prefetch,
                    clipping, sparse, momentum):
    """Update ``count`` blocks of ``block`` elements from element ``lo``;
    returns the hash of the next element.

    With the sparse counter an element is counted when its (clipped)
    gradient is not zero, and g**2 enters the mean with weight 1/count (0
    when not counted); with the dense counter with weight 1/t.  Then the
    momentum (when ``momentum``) and the parameter step.
    """
    step, beta, omb, eps, inv_t, clipvalue, one, zero = k
    x_at, g_at, v_at, n_at, m_at = _addresses(x, g, v, n, m)
    for b in range(count):
        if prefetch and b + _AHEAD_BLOCKS < count:
            _prefetch_block(x_at, g_at, v_at, n_at, m_at, b + _AHEAD_BLOCKS, block,
                            sparse, momentum)
        for j in range(block):
            i = lo + np.uint64(b * block + j)      # unsigned: no wraparound code
            gi = _clip(g[i], scale, clipvalue, clipping)
            g2 = gi * gi
            if sparse:
                counted = g2 != zero
                cnt = _count_up(n[i], counted)
                n[i] = cnt
                w = one / x.dtype.type(cnt) if counted else zero
            else:
                w = inv_t
            v[i], u = _adaptive(gi, g2, v[i], w, eps, h)
            if momentum:
                m[i] = beta * m[i] + omb * u
                x[i] -= step * m[i]
            else:
                x[i] -= step * u
            h = _weyl_next(h)
    return h


@njit(inline="always", **_OPTS)
def _update_general(x, g, v, n, m, c, scale, h, clipping, sparse, momentum):
    """The general loop: whole blocks (prefetching), then the rest one
    element at a time (a block of one, which LLVM vectorises as a plain
    loop)."""
    k = _coefficients(c)
    block = _block(x)
    whole = x.size // block
    h = _general_blocks(x, g, v, n, m, k, scale, h, np.uint64(0), whole, block, True,
                        clipping, sparse, momentum)
    _general_blocks(x, g, v, n, m, k, scale, h, np.uint64(whole * block),
                    x.size - whole * block, 1, False, clipping, sparse, momentum)


@njit(inline="always", **_OPTS)
def _update_loops(x, g, v, n, m, c, f, scale, h, clipping):
    """The loop the flags call for, with ``clipping`` a constant.  (An empty
    ``n`` or ``m`` is fine where the loop does not use it.)"""
    if f[SPARSE]:
        if f[MOMENTUM]:
            _update_general(x, g, v, n, m, c, scale, h, clipping, True, True)
        else:
            _update_general(x, g, v, n, m, c, scale, h, clipping, True, False)
    else:
        if f[MOMENTUM]:
            _update_general(x, g, v, n, m, c, scale, h, clipping, False, True)
        else:
            _update_general(x, g, v, n, m, c, scale, h, clipping, False, False)


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

@njit(inline="always", **_OPTS)
def _uniform_blocks(x, g, v, n, m, k, h, now, before, w_t, lo, count, block, prefetch,
                    momentum):
    """``_general_blocks`` for the uniform loop; returns the next hash and
    whether some gradient was zero."""
    step, beta, omb, eps, inv_t, clipvalue, one, zero = k
    missed = False
    x_at, g_at, v_at, n_at, m_at = _addresses(x, g, v, n, m)
    for b in range(count):
        if prefetch and b + _AHEAD_BLOCKS < count:
            _prefetch_block(x_at, g_at, v_at, n_at, m_at, b + _AHEAD_BLOCKS, block,
                            True, momentum)
        for j in range(block):
            i = lo + np.uint64(b * block + j)
            gi = g[i]
            g2 = gi * gi
            counted = g2 != zero
            missed = missed | (g2 == zero)
            n[i] = now if counted else before
            v[i], u = _adaptive(gi, g2, v[i], w_t if counted else zero, eps, h)
            if momentum:
                m[i] = beta * m[i] + omb * u
                x[i] -= step * m[i]
            else:
                x[i] -= step * u
            h = _weyl_next(h)
    return h, missed


@njit(inline="always", **_OPTS)
def _update_uniform(x, g, v, n, m, c, h, t, momentum):
    """The uniform loop, with momentum or not (``momentum`` a constant), in
    blocks as ``_update_general``."""
    k = _coefficients(c)
    now, before = np.uint32(t), np.uint32(t - 1)
    w_t = k[6] / x.dtype.type(now)
    block = _block(x)
    whole = x.size // block
    h, missed = _uniform_blocks(x, g, v, n, m, k, h, now, before, w_t, np.uint64(0),
                                whole, block, True, momentum)
    _, missed_rest = _uniform_blocks(x, g, v, n, m, k, h, now, before, w_t,
                                     np.uint64(whole * block), x.size - whole * block,
                                     1, False, momentum)
    return missed | missed_rest


@njit(**_OPTS)
def _update_span(x, g, v, n, m, c, f, scale, i0):
    """Update one contiguous span, elements ``i0:i0 + x.size`` of its array.

    Writes ``f[UNIFORM] = 0`` when a uniform array meets a zero gradient.
    Chunks of one array may run in parallel and read the flag at different
    times; either loop is right for a span whose counts are uniform.
    """
    t = f[T]
    h = _weyl(i0, t)
    if scale != 1 or c[CLIPVALUE] < np.inf:
        _update_loops(x, g, v, n, m, c, f, scale, h, True)
        f[UNIFORM] = 0          # clipping may have zeroed a gradient: not tracked
    elif f[SPARSE] and f[UNIFORM] and t <= UNIFORM_MAX_T:
        if f[MOMENTUM]:
            missed = _update_uniform(x, g, v, n, m, c, h, t, True)
        else:
            missed = _update_uniform(x, g, v, n, m, c, h, t, False)
        if missed:
            f[UNIFORM] = 0
    else:
        _update_loops(x, g, v, n, m, c, f, scale, h, False)


@njit(inline="always", **_OPTS)
def _span_sums(g, norm):
    """(sum of g*0, sum of g**2 in float64, or 0.0 without ``norm``) over
    a span; the body of ``_span_stats`` and ``_span_nonfinite``, which set
    ``norm`` as a constant and compile it with reassociation.

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
            ga, gb = np.float64(a[i]), np.float64(b[i])
            gc, gd = np.float64(c[i]), np.float64(d[i])
            sumsq += (ga * ga + gb * gb) + (gc * gc + gd * gd)
    for i in range(4 * q, g.size):
        nonfinite += g[i] * zero
        if norm:
            gi = np.float64(g[i])
            sumsq += gi * gi
    return nonfinite, sumsq


@_kernel(fastmath={"reassoc"})
def _span_stats(g):
    """(sum of g*0, sum of g**2 in float64) over a span: zero first sum iff
    the span is finite (see ``_span_sums``)."""
    return _span_sums(g, True)


@_kernel(fastmath={"reassoc"})
def _span_nonfinite(g):
    """(sum of g*0, 0.0) over a span: ``_span_stats`` without the squared
    norm, for a step that checks but does not clip by norm."""
    return _span_sums(g, False)


@njit(inline="always", **_OPTS)
def _first_pass(g, norm):
    """``_span_stats(g)`` when a norm is needed, else ``_span_nonfinite(g)``."""
    if norm:
        return _span_stats(g)
    return _span_nonfinite(g)


@_kernel
def _scale(sumsq, clipnorm):
    """Norm-clipping factor min(1, clipnorm / sqrt(sumsq))."""
    norm = np.sqrt(sumsq)
    if norm > clipnorm:
        return clipnorm / norm
    return 1.0


# --- one array ---------------------------------------------------------------

def _array_step(x, g, v, n, m, c, f, check, global_clipnorm):
    """One fused step on one C-contiguous 1-D array.

    Returns ``(ok, sumsq)``: ``ok`` is False, and nothing was written, when
    ``check`` is set and ``g`` holds a NaN or an infinity; ``sumsq`` is the
    squared norm of ``g`` when a norm is needed (finite ``clipnorm`` or
    ``global_clipnorm``), else 0.0 (the check alone skips the norm).
    """
    scale = 1.0
    sumsq = 0.0
    needs_norm = c[CLIPNORM] < np.inf or global_clipnorm < np.inf
    if check or needs_norm:
        nonfinite, sumsq = _first_pass(g, needs_norm)
        if check and nonfinite != 0:
            return False, sumsq
        if needs_norm:
            scale = _scale(sumsq, c[CLIPNORM])
            scale *= _scale(sumsq * scale * scale, global_clipnorm)
    _update_span(x, g, v, n, m, c, f, x.dtype.type(scale), np.int64(0))
    return True, sumsq


array_step = _kernel(_array_step)
_array_step_inline = njit(inline="always", **_OPTS)(
    _twin(_array_step, "_array_step_inline"))


# Layout of the int64 context row of ``single_step``: data addresses of the
# parameter, the three state buffers, the coefficient and flag rows; the
# element counts of the parameter and of the two optional state buffers; the
# address of the array's int64 step count ``t`` (steps taken so far) and of a
# float64 row ``SCALAR_FIELDS``; the check_finite flag; and what the gradient
# object must be (see ``locate.located_address``): the address of the
# ``numpy.ndarray`` type object and of the parameter's dtype object, the
# parameter's number of dimensions and the address of an int64 row holding
# its shape.
CTX_FIELDS = ("x", "mean_sq", "count", "momentum", "coef", "flags",
              "size", "count_size", "momentum_size", "t", "scalars", "check",
              "ndarray_type", "descr", "ndim", "shape")
(CX, CV, CN, CM, CC, CF, CSIZE, CNSIZE, CMSIZE, CT, CS, CCHECK,
 CTYPE, CDESCR, CNDIM, CSHAPE) = range(len(CTX_FIELDS))
SCALAR_FIELDS = ("lr", "beta", "global_clipnorm")
S_LR, S_BETA, S_GCLIP = range(len(SCALAR_FIELDS))

# Return codes of ``single_step``.
STEPPED, NONFINITE, NOT_LOCATED, UNBOUND = 0, 1, 2, 3

# ``single_step`` holds the GIL for arrays up to this many elements (a step
# there takes a few microseconds, and releasing and taking back the GIL
# would add a tenth of one) and releases it above.
SINGLE_STEP_GIL_MAX = 1 << 12


def _single_step(g_object, ctx_address, zero):
    """``array_step`` for a bucket of one array, with the least call overhead.

    Called with two integers and a scalar: the gradient's object address
    (``id(g)``), the address of the int64 context row (see
    ``CTX_FIELDS``), and a zero of the array dtype, which only selects the
    specialisation.  The gradient is used where it lies if it is a
    C-contiguous, aligned ndarray of exactly the parameter's dtype and shape
    (``locate.located_address``); anything else returns ``NOT_LOCATED`` and
    the caller takes the general path.  Everything else is reached through
    the context row and the addresses in it, all kept alive by their owner,
    as the gradient is by the caller.  No array crosses numba's dispatch:
    passing integers is cheaper, and the caller may call the compiled entry
    point directly.

    With ``t`` the step count after this step and ``lr``, ``beta`` from the
    float64 scalar row, the two coefficients that change every step are
    computed here in float64, exactly as ``reference.step_size`` and
    ``Bucket.set_coefficients`` do (the same C library ``pow``), and stored
    cast to the array dtype::

        c[STEP]  = lr / (1 - beta**t)   (lr when beta == 0)
        c[INV_T] = 1 / t

    the other coefficients are read as ``set_coefficients`` left them.  On
    success the step count is incremented in place.

    Returns ``STEPPED``; ``NONFINITE`` when check_finite is set and the
    gradient holds NaN or infinity; ``NOT_LOCATED`` (see above); ``UNBOUND``
    when ``ctx`` has no step count or scalar row.  Nothing is written in
    those cases.
    """
    ctx = carray(_pointer_of(ctx_address, np.int64), len(CTX_FIELDS))
    if ctx[CT] == 0 or ctx[CS] == 0:
        return UNBOUND
    shape = carray(_pointer_of(ctx[CSHAPE], np.int64), ctx[CNDIM])
    address = located_address(g_object, ctx[CTYPE], ctx[CDESCR], ctx[CNDIM], shape)
    if address < 0:
        return NOT_LOCATED
    size = ctx[CSIZE]
    g = carray(_pointer_to(address, zero), size)
    x = carray(_pointer_like(ctx[CX], g), size)
    v = carray(_pointer_like(ctx[CV], g), size)
    n = carray(_pointer_of(ctx[CN], np.uint32), ctx[CNSIZE])
    m = carray(_pointer_like(ctx[CM], g), ctx[CMSIZE])
    c = carray(_pointer_like(ctx[CC], g), len(COEF_FIELDS))
    f = carray(_pointer_of(ctx[CF], np.int64), len(FLAG_FIELDS))
    steps = carray(_pointer_of(ctx[CT], np.int64), 1)
    s = carray(_pointer_of(ctx[CS], np.float64), len(SCALAR_FIELDS))
    t = np.float64(steps[0] + 1)
    lr, beta = s[S_LR], s[S_BETA]
    c[STEP] = lr if beta == 0.0 else lr / (1.0 - beta ** t)
    c[INV_T] = 1.0 / t
    f[T] = steps[0] + 1
    ok, _ = _array_step_inline(x, g, v, n, m, c, f, ctx[CCHECK] != 0, s[S_GCLIP])
    if not ok:
        return NONFINITE
    steps[0] += 1
    return STEPPED


_SINGLE_STEP = {}


def single_step(dtype, hold_gil=False):
    """``_single_step`` compiled for one array dtype (float32 or float64),
    holding the GIL or releasing it; loaded or compiled on first use.

    Returns the dispatcher, of one signature ``(int64, int64, dtype)``;
    ``single_step_entry`` gives its compiled entry point.
    """
    dtype = np.dtype(dtype)
    kernel = _SINGLE_STEP.get((dtype, hold_gil))
    if kernel is None:
        from numba import from_dtype
        sig = types.int64(types.int64, types.int64, from_dtype(dtype))
        name = "_single_step_gil" if hold_gil else "_single_step"
        kernel = _kernel(_twin(_single_step, name), nogil=not hold_gil)
        kernel.compile(sig)             # as njit([sig]) does: this signature only
        kernel.disable_compile()
        _SINGLE_STEP[dtype, hold_gil] = kernel
    return kernel


def single_step_entry(dtype, hold_gil=False):
    """The compiled entry point of ``single_step(dtype, hold_gil)``: called
    with two Python ints and a float it runs the kernel without numba's
    dispatch (which would type each argument and pick the signature: more
    than half the time of a whole step on a small array).  Its arguments
    are unboxed as ``int64, int64, dtype``, so only ints and a float may be
    passed."""
    kernel = single_step(dtype, hold_gil)
    return kernel.overloads[kernel.signatures[0]].entry_point


# --- many arrays, flat state ---------------------------------------------------

def _segments_step(x_addr, g_addr, offsets, chunk_seg, chunk_lo, chunk_hi,
                   v, n, m, coef, flags, check, global_clipnorm, other_sumsq,
                   update):
    """Body of the segmented kernels (compiled serial and parallel).

    ``x_addr[k]``/``g_addr[k]`` are the data addresses of array ``k``'s
    parameter and gradient (C-contiguous, dtype of ``v``); its state is
    ``v[offsets[k]:offsets[k+1]]`` (and likewise ``n``, ``m``).
    ``other_sumsq`` adds squared norms of arrays outside this call to the
    global norm.  With ``update`` False only the first pass runs.

    Returns ``(bad, sumsq)``: the index of the first array holding a
    non-finite gradient when ``check`` is set (-1 if none; nothing is written
    otherwise), and the global squared norm after per-array clipping when a
    norm is needed (finite ``global_clipnorm`` or some finite clipnorm), else
    0.0: the check alone skips the norm, so a first pass (``update`` False)
    that wants the norm passes a finite ``global_clipnorm``.
    """
    n_arrays = offsets.size - 1
    n_chunks = chunk_seg.size
    needs_norm = global_clipnorm < np.inf
    for k in range(n_arrays):
        if coef[k, CLIPNORM] < np.inf:
            needs_norm = True
    scale = np.ones(n_arrays)
    total = 0.0
    if check or needs_norm:
        chunk_bad = np.zeros(n_chunks, np.bool_)
        chunk_sq = np.zeros(n_chunks)
        for j in prange(n_chunks):
            k = chunk_seg[j]
            if flags[k, ACTIVE]:
                size = offsets[k + 1] - offsets[k]
                g = carray(_pointer_like(g_addr[k], v), size)
                nonfinite, sq = _first_pass(g[chunk_lo[j]:chunk_hi[j]], needs_norm)
                chunk_bad[j] = nonfinite != 0
                chunk_sq[j] = sq
        if check:
            for j in range(n_chunks):
                if chunk_bad[j]:
                    return chunk_seg[j], total
        sumsq = np.zeros(n_arrays)
        for j in range(n_chunks):
            sumsq[chunk_seg[j]] += chunk_sq[j]
        for k in range(n_arrays):
            scale[k] = _scale(sumsq[k], coef[k, CLIPNORM])
            total += sumsq[k] * scale[k] * scale[k]
        if global_clipnorm < np.inf:
            g_scale = _scale(total + other_sumsq, global_clipnorm)
            for k in range(n_arrays):
                scale[k] *= g_scale
    if not update:
        return -1, total
    for j in prange(n_chunks):
        k = chunk_seg[j]
        if flags[k, ACTIVE]:
            size = offsets[k + 1] - offsets[k]
            x = carray(_pointer_like(x_addr[k], v), size)
            g = carray(_pointer_like(g_addr[k], v), size)
            lo, hi = chunk_lo[j], chunk_hi[j]
            a, b = offsets[k] + lo, offsets[k] + hi
            n_span = n[a:b] if n.size else n
            m_span = m[a:b] if m.size else m
            _update_span(x[lo:hi], g[lo:hi], v[a:b], n_span, m_span,
                         coef[k], flags[k], v.dtype.type(scale[k]), lo)
    return -1, total


segments_step = _kernel(_segments_step)
segments_step_parallel = _kernel(_twin(_segments_step, "_segments_step_parallel"),
                                 parallel=True)
