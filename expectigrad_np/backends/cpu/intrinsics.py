"""LLVM-level building blocks of the CPU update loops.

Each is a compile-time constant, an intrinsic written in LLVM IR, or a small
``njit`` function that LLVM inlines: saturating 32-bit counts, the Weyl hash
and dither of the float32 stochastic rounding (``reference.dither_offset``),
prefetching, and the clipped, rounded element arithmetic.
"""
from __future__ import annotations

import numpy as np
from numba import njit, types
from numba.extending import intrinsic, overload
from numba.np.numpy_support import as_dtype

from ..layout import SATURATION, WEYL_INDEX, WEYL_STEP
from .jit import OPTS as _OPTS

__all__ = ["BLOCK_BYTES", "PREFETCH_AHEAD_BYTES"]


def _saturation(x):
    """``layout.SATURATION`` of ``x``'s float type (a compile-time constant)."""
    return SATURATION[np.dtype(type(x))]


@overload(_saturation, inline="always")
def _saturation_impl(x):
    sat = as_dtype(x).type(SATURATION[as_dtype(x)])
    return lambda x: sat


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
# arrays arrive late.  Prefetching every line two small blocks ahead keeps
# them coming; fewer lines, or larger bursts, did worse.  The bench's 1e7
# rows against the same-traffic kernel are the measure (README table).
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

    ``g`` is saturated (``_saturate``), so ``g2`` is finite.  The new mean
    is rounded stochastically (``_add_rounded``, hash ``h``)."""
    v = _add_rounded(mean_sq, (g2 - mean_sq) * weight, h)
    return v, g / (eps + np.sqrt(v))


@njit(**_OPTS)
def _saturate(g):
    """``reference.saturate`` for one element: ``clip(g, -G, G)`` with ``G``
    the largest magnitude whose square is finite; NaN stays NaN (selects,
    not min/max, which vectorise the same)."""
    sat = _saturation(g)
    return sat if g > sat else (-sat if g < -sat else g)


@njit(**_OPTS)
def _clip(g, scale, clipvalue, clipping):
    """``clip(g, -clipvalue, clipvalue) * scale``: value clipping first, then
    the norm-clipping factor, as in the original project; just ``g`` when
    ``clipping`` is False (then ``scale == 1`` and ``clipvalue == inf``, so
    the result is the same).  Callers pass ``clipping`` as a constant, so
    each loop is compiled twice and the unclipped one has no clipping
    instructions (three vector operations of about forty)."""
    if clipping:
        return min(max(g, -clipvalue), clipvalue) * scale
    return g
