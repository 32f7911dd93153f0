"""Numba CUDA kernels for the Expectigrad update.

The per-element math is that of ``backends/cpu/kernels.py`` and ``reference.py``,
operation for operation (see ``reference.py`` for the equations)::

    g  = clip(g, -clipvalue, clipvalue) * scale   (value, then norms)
    g  = clip(g, -G, G)                  (saturated: g**2 stays finite)
    n <- n + [g**2 != 0]                 (sparse counter; w = 1/n or 0)
    w  = 1 / t                           (dense counter)
    v <- v + (g**2 - v) * w              running mean of g**2 (= s / n)
    u  = g / (eps + sqrt(v))             0/0 := 0
    m <- beta * m + (1 - beta) * u ;  x <- x * decay - step_size * m     (beta > 0)
    x <- x * decay - step_size * u                                       (beta = 0)

A step of one bucket (all parameter arrays of one dtype) launches at most
two kernels, whatever the number of arrays:

``stats_kernel``  (only with ``check_finite``, norm clipping, or a
    stats-only pass) reads every gradient once.  Each block reduces
    ``sum(g * 0)`` (NaN iff the chunk holds NaN or infinity) and
    ``sum(g**2)`` over its chunks; the last block to finish (a
    ``threadfence`` + ``atomic.inc`` ticket) sums the chunks of every array
    in a fixed order, forms the clipping factors ``scale[k]`` and writes
    ``result = [first bad array or -1, sum_k sumsq[k] * scale[k]**2]``.
    Deterministic: no floating-point atomics.

``update_kernel`` reads ``result`` on the device and writes nothing when the
    stats pass found a non-finite gradient; otherwise it applies the update
    above to every element of every active array.

Both are grid-stride loops over fixed chunks (``chunk_seg/lo/hi``: chunk
``c`` is elements ``lo:hi`` of array ``seg``, never crossing arrays), each
chunk walked by one block with a block-stride loop, so 200 small arrays and
one large array cost one launch each way.

Arrays are reached through their device addresses (a ``(n_arrays, 3)``
int64 table: parameter, gradient, and the array's step ``t``), read and written with two small
intrinsics; in numba's simulator, where device memory is host memory, the
same kernels use ``ctypes`` views at those addresses instead.  Per-array
coefficients come as one ``(n_arrays, 11)`` table in the array dtype:
``layout.COEF_FIELDS`` followed by the flags
``[active, sparse, momentum]`` as 0/1.

All arithmetic is in the array dtype, including norms: float32 kernels hold
no double-precision instruction (``ptx`` shows it).  Value clipping is
written as the compare-and-select of Python's ``max``/``min``, which the
CPU kernels compile to, not CUDA's ``fmaxf``/``fminf`` (those drop a NaN),
so that with ``check_finite=False`` a NaN gradient propagates as on the CPU.  NVVM contracts
``a * b + c`` into fused multiply-adds, so GPU results agree with the CPU
kernels to rounding, not bit for bit.
"""
from __future__ import annotations

import ctypes
import math

import numpy as np
from numba import config, cuda, types
from numba.cuda.extending import intrinsic

from ... import lazy as _lazy
from ..layout import COEF_FIELDS, FLAG_FIELDS, SATURATION, make_chunks

__all__ = [
    "ADDR_FIELDS", "CHUNK", "KERNEL_NAMES", "SIMULATOR", "TABLE_FIELDS", "THREADS",
    "catch_up_kernel", "catch_up_ptx", "kernels", "live_kernel", "make_layout", "ptx",
    "ptx_modules",
    "signatures", "zero_kernel",
]

SIMULATOR = bool(config.ENABLE_CUDASIM)      # NUMBA_ENABLE_CUDASIM=1

# The kernels one step launches per dtype, in launch order: the stats pass
# (only with check_finite or norm clipping) and the fused update.
KERNEL_NAMES = ("stats_kernel", "update_kernel")

# The int64 address table, per array: its parameter's and gradient's
# addresses, its step number ``t`` (exactly: it seeds the float32 rounding)
# and the index of its element 0 within its parameter (0, except for the
# rows a row-sparse step updates: each row is an array of its own).
ADDR_FIELDS = ("x", "g", "t", "index")

# The flags travel as 0/1 in the coefficient dtype; the step number ``t`` (the
# last flag) travels exactly, as int64, in the address table.
TABLE_FLAGS = FLAG_FIELDS[:3]
TABLE_FIELDS = COEF_FIELDS + TABLE_FLAGS
(STEP, BETA, OMB, EPS, INV_T, CLIPVALUE, CLIPNORM, DECAY,
 ACTIVE, SPARSE, MOMENTUM) = range(len(TABLE_FIELDS))
BAD, TOTAL, TOTAL_HI = 0, 1, 2         # fields of ``result``

# Threads per block (a power of two: the block reductions halve it).  The
# simulator runs every thread as a Python thread, so it gets small blocks,
# small chunks and few blocks, which also exercises the multi-chunk and
# grid-stride paths on tiny arrays.
THREADS = 8 if SIMULATOR else 256
# Elements per chunk (a multiple of THREADS), grown for very large buckets
# so that there are at most MAX_CHUNKS chunks.
CHUNK = 32 if SIMULATOR else 1 << 14
MAX_CHUNKS = 1 << 16
# Blocks per launch: enough to fill the device; the grid-stride loops cover
# the rest.
BLOCKS_PER_SM = 8
SIMULATOR_BLOCKS = 3

_COUNT_MAX = np.uint32(np.iinfo(np.uint32).max)
_MASK32 = np.uint64(0xFFFFFFFF)
_WEYL_INDEX = np.uint64(0x85EBCA77)            # reference.dither
_WEYL_STEP = np.uint64(0x9E3779B9)
_SAT_BITS32 = int(np.float32(SATURATION[np.dtype(np.float32)]).view(np.int32))
_SAT_BITS64 = int(np.float64(SATURATION[np.dtype(np.float64)]).view(np.int64))

# Squared norms as two sums that cannot overflow (``stats_kernel``): squares
# of elements up to NORM_SPLIT, and of larger ones times NORM_SCALE.  With
# ``emax`` the dtype's largest binary exponent (128 or 1024), NORM_SPLIT =
# 2**((emax - 32) / 2) and NORM_SCALE = 2**-((emax + 32) / 2): 2**31
# squares of either kind sum to less than the largest finite value.
NORM_SPLIT = {np.dtype(np.float32): 2.0 ** 48, np.dtype(np.float64): 2.0 ** 496}
NORM_SCALE = {np.dtype(np.float32): 2.0 ** -80, np.dtype(np.float64): 2.0 ** -528}
_SPLIT_BITS32 = int(np.float32(NORM_SPLIT[np.dtype(np.float32)]).view(np.int32))
_SPLIT_BITS64 = int(np.float64(NORM_SPLIT[np.dtype(np.float64)]).view(np.int64))
_SCALE_BITS32 = int(np.float32(NORM_SCALE[np.dtype(np.float32)]).view(np.int32))
_SCALE_BITS64 = int(np.float64(NORM_SCALE[np.dtype(np.float64)]).view(np.int64))


# --- element access through device addresses ---------------------------------

if SIMULATOR:
    def _at(address, index, like):
        dtype = like.dtype
        start = int(address) + int(index) * dtype.itemsize
        return np.frombuffer((ctypes.c_char * dtype.itemsize).from_address(start), dtype)

    def _load(address, index, like):
        """``address[index]`` as ``like``'s dtype."""
        return _at(address, index, like)[0]

    def _store(address, index, like, value):
        """``address[index] = value`` as ``like``'s dtype."""
        _at(address, index, like)[0] = value
else:
    def _element_pointer(context, builder, dtype, address, index):
        ptr = builder.inttoptr(address, context.get_value_type(types.CPointer(dtype)))
        return builder.gep(ptr, [index])

    @intrinsic
    def _load(typingctx, address, index, like):
        """``address[index]`` as ``like``'s dtype."""
        dtype = like.dtype

        def codegen(context, builder, signature, args):
            return builder.load(_element_pointer(context, builder, dtype, args[0], args[1]))

        return dtype(address, index, like), codegen

    @intrinsic
    def _store(typingctx, address, index, like, value):
        """``address[index] = value`` as ``like``'s dtype."""
        dtype = like.dtype

        def codegen(context, builder, signature, args):
            val = context.cast(builder, args[3], signature.args[3], dtype)
            builder.store(val, _element_pointer(context, builder, dtype, args[0], args[1]))
            return context.get_dummy_value()

        return types.none(address, index, like, value), codegen


# --- bit patterns of floats (stochastic rounding of the mean) --------------------

if SIMULATOR:
    def _is_float32(x):
        return np.asarray(x).dtype == np.float32

    def _float_bits(x):
        """The bits of float ``x`` as a signed integer of the same width."""
        x = np.asarray(x)
        return x.view(np.int32 if x.dtype == np.float32 else np.int64)[()]

    def _bits_float(bits, like):
        """The float of ``like``'s dtype whose bits are ``bits``."""
        return np.asarray(bits, like.dtype.str.replace("f", "i")).view(like.dtype)[()]
else:
    @intrinsic
    def _is_float32(typingctx, x):
        """True for a float32 ``x``, as a compile-time constant."""
        single = x.bitwidth == 32

        def codegen(context, builder, signature, args):
            return context.get_constant(types.boolean, single)

        return types.boolean(x), codegen

    @intrinsic
    def _float_bits(typingctx, x):
        """The bits of float ``x`` as a signed integer of the same width."""
        ity = types.int32 if x.bitwidth == 32 else types.int64

        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], context.get_value_type(ity))

        return ity(x), codegen

    @intrinsic
    def _bits_float(typingctx, bits, like):
        """The float of ``like``'s dtype whose bits are ``bits``."""
        fty = like.dtype
        ity = types.int32 if fty.bitwidth == 32 else types.int64

        def codegen(context, builder, signature, args):
            val = context.cast(builder, args[0], signature.args[0], ity)
            return builder.bitcast(val, context.get_value_type(fty))

        return fty(bits, like), codegen


# --- kernels -------------------------------------------------------------------
# Written without device-function calls (everything is inline or an
# intrinsic), so that ``compile_ptx`` works on a machine without a GPU.

def _block_reduce(red, tid, a, b, c):
    """Reduce each thread's ``a``, ``b`` (summed) and ``c`` (maximum) over
    the block in a fixed order, through ``red`` (``(3, THREADS)`` shared);
    the results in ``red[:, 0]``, visible to every thread on return.  The
    one block reduction of the stats pass."""
    red[0, tid] = a
    red[1, tid] = b
    red[2, tid] = c
    cuda.syncthreads()
    width = THREADS // 2
    while width > 0:
        if tid < width:
            red[0, tid] += red[0, tid + width]
            red[1, tid] += red[1, tid + width]
            other = red[2, tid + width]
            if other > red[2, tid]:
                red[2, tid] = other
        cuda.syncthreads()
        width //= 2


def _block_reduce_to(red, tid, a, b, c, sums, flags, row, zero):
    """``_block_reduce``, then thread 0 stores the two sums in ``sums[row]``
    and whether the maximum is nonzero in ``flags[row]``; returns when the
    stores are done."""
    _block_reduce(red, tid, a, b, c)
    if tid == 0:
        sums[row, 0] = red[0, 0]
        sums[row, 1] = red[1, 0]
        flags[row] = red[2, 0] != zero
    cuda.syncthreads()


if not SIMULATOR:
    _block_reduce = cuda.jit(device=True, inline="always")(_block_reduce)
    _block_reduce_to = cuda.jit(device=True, inline="always")(_block_reduce_to)


def stats_kernel(table, addr, chunk_seg, chunk_lo, chunk_hi, chunk_first, big,
                 n_big, chunk_sq, chunk_bad, sumsq, array_bad, scale, result,
                 counter, check, global_clipnorm, other_lo, other_hi):
    """First pass: non-finite check, squared norms, clipping factors.

    Squared norms are of the value-clipped gradient (the original's order)
    and are kept as two sums so that none overflows in the array dtype:
    ``lo`` sums ``g**2`` of the elements with ``|g| <= NORM_SPLIT``, ``hi``
    sums ``(g * NORM_SCALE)**2`` of the larger ones (a power-of-two scale:
    exact), so the squared norm is ``lo + hi / NORM_SCALE**2``.  Writes
    ``sumsq[k] = (lo, hi)``, ``scale[k] = min(1, clipnorm_k / ||g_k||) *
    min(1, global_clipnorm / sqrt(total + other))`` with ``total = sum_k
    ||g_k||**2 min(1, clipnorm_k / ||g_k||)**2`` (``other = other_lo +
    other_hi / NORM_SCALE**2``: the other buckets' part), and ``result =
    [first array with a NaN/inf gradient (if check) or -1, total as (lo,
    hi)]``.  Launch with ``THREADS`` threads per block.
    """
    dt = scale.dtype.type
    zero = dt(0)
    one = dt(1)
    split = _bits_float(_SPLIT_BITS32 if _is_float32(zero) else _SPLIT_BITS64, scale)
    scl = _bits_float(_SCALE_BITS32 if _is_float32(zero) else _SCALE_BITS64, scale)
    tid = cuda.threadIdx.x
    red = cuda.shared.array((3, THREADS), scale.dtype)
    last = cuda.shared.array(1, np.int32)

    # 1. Per chunk: the two sums of squares and whether g * 0 is ever not 0
    #    (a NaN or an infinity), reduced over the block.
    for c in range(cuda.blockIdx.x, chunk_seg.size, cuda.gridDim.x):
        k = chunk_seg[c]
        lo = zero
        hi = zero
        bad = zero
        if table[k, ACTIVE] != zero:
            ga = addr[k, 1]
            clipvalue = table[k, CLIPVALUE]
            for i in range(chunk_lo[c] + tid, chunk_hi[c], THREADS):
                gi = _load(ga, i, scale)
                bad = one if gi * zero != zero else bad
                gc = -clipvalue if -clipvalue > gi else gi
                gc = clipvalue if clipvalue < gc else gc
                if gc > split or gc < -split:
                    gs = gc * scl
                    hi += gs * gs
                else:
                    lo += gc * gc
        _block_reduce_to(red, tid, lo, hi, bad, chunk_sq, chunk_bad, c, zero)

    # 2. The last block to finish combines the chunks.
    cuda.threadfence()                           # release: the chunks above
    if tid == 0:
        ticket = cuda.atomic.inc(counter, 0, np.uint32(cuda.gridDim.x - 1))
        last[0] = ticket == cuda.gridDim.x - 1       # inc wrapped the counter to 0
    cuda.syncthreads()
    if last[0] == 0:
        return
    cuda.threadfence()                           # acquire: every block's chunks
    n_arrays = scale.size
    # Arrays with at most THREADS chunks: one thread each, chunks in order.
    for k in range(tid, n_arrays, THREADS):
        c0 = chunk_first[k]
        c1 = chunk_first[k + 1]
        if c1 - c0 <= THREADS:
            lo = zero
            hi = zero
            b = 0
            for c in range(c0, c1):
                lo += chunk_sq[c, 0]
                hi += chunk_sq[c, 1]
                b |= chunk_bad[c]
            sumsq[k, 0] = lo
            sumsq[k, 1] = hi
            array_bad[k] = b
    # Larger arrays: the whole block, one array at a time.
    for j in range(n_big):
        k = big[j]
        lo = zero
        hi = zero
        b = zero
        for c in range(chunk_first[k] + tid, chunk_first[k + 1], THREADS):
            lo += chunk_sq[c, 0]
            hi += chunk_sq[c, 1]
            b = one if chunk_bad[c] != 0 else b
        _block_reduce_to(red, tid, lo, hi, b, sumsq, array_bad, k, zero)
    cuda.syncthreads()

    # 3. Per-array clipping factors, the clipped total and the first bad
    #    array.  A norm with a nonzero ``hi`` is compared scaled: ``r`` is
    #    the norm times NORM_SCALE.
    part_lo = zero
    part_hi = zero
    first_bad = n_arrays
    for k in range(tid, n_arrays, THREADS):
        lo = sumsq[k, 0]
        hi = sumsq[k, 1]
        clipnorm = table[k, CLIPNORM]
        if hi == zero:
            norm = dt(math.sqrt(lo))
            f = clipnorm / norm if norm > clipnorm else one
            part_lo += lo * f * f
        else:
            r = dt(math.sqrt(hi + (lo * scl) * scl))
            limit = clipnorm * scl
            f = limit / r if r > limit else one
            rf = r * f                       # the clipped norm, scaled
            if rf > split * scl:
                part_hi += rf * rf
            else:                            # clipped back into lo's range
                part_lo += (rf / scl) * (rf / scl)
        scale[k] = f
        if array_bad[k] != 0 and k < first_bad:
            first_bad = k
    _block_reduce(red, tid, part_lo, part_hi, -dt(first_bad))
    total_lo = red[0, 0]
    total_hi = red[1, 0]
    first_bad = -red[2, 0]
    lo = total_lo + other_lo
    hi = total_hi + other_hi
    if hi == zero:
        norm = dt(math.sqrt(lo))
        g_scale = global_clipnorm / norm if norm > global_clipnorm else one
    else:
        r = dt(math.sqrt(hi + (lo * scl) * scl))
        limit = global_clipnorm * scl
        g_scale = limit / r if r > limit else one
    for k in range(tid, n_arrays, THREADS):
        scale[k] *= g_scale
    if tid == 0:
        result[BAD] = first_bad if check and first_bad < dt(n_arrays) else -one
        result[TOTAL] = total_lo
        result[TOTAL_HI] = total_hi


def update_kernel(table, addr, offsets, chunk_seg, chunk_lo, chunk_hi, v, n, m,
                  scale, result, use_stats):
    """The fused update of every element of every active array.

    ``v``, ``n``, ``m``: flat ``mean_sq``, ``count`` and ``momentum``; array
    ``k``'s state starts at ``offsets[k]``; ``addr[k]`` holds its parameter
    and gradient addresses, its step number ``t`` and the index of its
    element 0 in its parameter (``ADDR_FIELDS``).  With ``use_stats``
    the clipping factors come from ``scale`` and nothing is written when
    ``result[BAD] >= 0``; without, the factor is 1.

    The counter and momentum branches depend only on the array, so every
    thread of a block takes the same side.  In float32 the new mean is
    rounded stochastically, with the dither offset of
    ``reference.add_stochastically_rounded``.
    """
    dt = v.dtype.type
    zero = dt(0)
    one = dt(1)
    # layout.SATURATION of the dtype (reference.saturate), from its bits
    sat = _bits_float(_SAT_BITS32 if _is_float32(zero) else _SAT_BITS64, v)
    below = dt(1.0 - 2.0 ** -24)
    if use_stats and result[BAD] >= zero:
        return                                   # refused step: write nothing
    tid = cuda.threadIdx.x
    stride = cuda.blockDim.x
    for c in range(cuda.blockIdx.x, chunk_seg.size, cuda.gridDim.x):
        k = chunk_seg[c]
        if table[k, ACTIVE] == zero:
            continue
        s = scale[k] if use_stats else one
        step = table[k, STEP]
        beta = table[k, BETA]
        omb = table[k, OMB]
        eps = table[k, EPS]
        inv_t = table[k, INV_T]
        clipvalue = table[k, CLIPVALUE]
        decay = table[k, DECAY]
        sparse = table[k, SPARSE] != zero
        momentum = table[k, MOMENTUM] != zero
        xa = addr[k, 0]
        ga = addr[k, 1]
        t = np.uint64(addr[k, 2])
        first = np.uint64(addr[k, 3])
        base = offsets[k]
        for i in range(chunk_lo[c] + tid, chunk_hi[c], stride):
            j = base + i
            # Every operand is loaded before anything is stored: the raw-address
            # loads and stores may alias the state arrays as far as the compiler
            # knows, so it keeps source order, and a store between two loads
            # would make each load wait for the one before.
            gi = _load(ga, i, v)
            xi = _load(xa, i, v)
            vj = v[j]
            nj = n[j] if sparse else np.uint32(0)
            mj = m[j] if momentum else zero
            gi = -clipvalue if -clipvalue > gi else gi      # max(gi, -clipvalue)
            gi = clipvalue if clipvalue < gi else gi        # min(gi, clipvalue)
            gi = gi * s                                     # then the norm factor
            gi = sat if gi > sat else (-sat if gi < -sat else gi)   # saturate
            g2 = gi * gi
            counted = g2 != zero
            if sparse:
                nj = nj + np.uint32(counted and nj != _COUNT_MAX)
                w = one / dt(nj) if counted else zero
            else:
                w = inv_t
            # v + (g**2 - v) * w, in float32 rounded stochastically:
            d = (g2 - vj) * w
            if _is_float32(vj):                             # compile-time
                # reference.dither_offset: an odd integer from the signed
                # top 25 bits of the Weyl hash, times the spacing next to
                # vj on its side (a power of two over 2**23, made 2**-25 smaller)
                h = ((np.uint64(i) + first) * _WEYL_INDEX + t * _WEYL_STEP) & _MASK32
                hs = np.int64(h) - (np.int64(h >> np.uint64(31)) << np.int64(32))
                odd = (hs >> np.int64(7)) | np.int64(1)
                side = vj * below if hs < 0 else vj
                pow2 = _bits_float(_float_bits(side) & 0x7F800000, v)
                d = d + dt(odd) * (pow2 * dt(2.0 ** -48))
            vj = vj + d
            u = gi / (eps + dt(math.sqrt(vj)))
            if momentum:
                u = beta * mj + omb * u
            # ... and stored after.
            v[j] = vj
            if sparse:
                n[j] = nj
            if momentum:
                m[j] = u
            _store(xa, i, v, xi * decay - step * u)


def _zero(a):
    """a[:] = 0 (state initialisation; not part of a step)."""
    zero = a.dtype.type(0)
    for i in range(cuda.grid(1), a.size, cuda.gridsize(1)):
        a[i] = zero


# --- lazy row-sparse steps ---------------------------------------------------------

_apply_row = cuda.jit(device=True, inline="always")(_lazy.apply_row)


def _catch_up(x, m, v, rows, rowsize, B, C, D, R, momentum, dense_counter):
    """Bring rows ``rows`` of the flat arrays ``x``, ``m``, ``v`` up to date
    with their lazy coefficients: ``lazy.apply_row``, a thread a row."""
    for r in range(cuda.grid(1), rows.size, cuda.gridsize(1)):
        _apply_row(x, m, v, rows[r] * rowsize, rowsize, B[r], C[r], D[r], R[r], momentum,
                   dense_counter)


def _live_rows(m, rows, rowsize, live):
    """``live[r]``: row ``rows[r]`` of the flat momentum ``m`` is nonzero
    somewhere (a thread a row)."""
    for r in range(cuda.grid(1), rows.size, cuda.gridsize(1)):
        a = rows[r] * rowsize
        found = np.uint8(0)
        for e in range(a, a + rowsize):
            if m[e] != m.dtype.type(0):
                found = np.uint8(1)
                break
        live[r] = found


def _float(dtype):
    return {np.dtype(np.float32): types.float32, np.dtype(np.float64): types.float64}[
        np.dtype(dtype)]


def _live_signature(dtype):
    return (_float(dtype)[::1], types.int64[::1], types.int64, types.uint8[::1])


def _catch_up_signature(dtype):
    vec, f64 = _float(dtype)[::1], types.float64[::1]
    return (vec, vec, vec, types.int64[::1], types.int64, f64, f64, f64, f64,
            types.boolean, types.boolean)


_row_kernels = {}


def _row_kernel(pyfunc, signature, dtype):
    """``pyfunc`` compiled for ``signature(dtype)``, once."""
    key = (pyfunc.__name__, np.dtype(dtype))
    if key not in _row_kernels:
        _row_kernels[key] = cuda.jit(signature(dtype), cache=True)(pyfunc)
    return _row_kernels[key]


def live_kernel(dtype):
    """The compiled ``_live_rows`` for ``dtype``."""
    return _row_kernel(_live_rows, _live_signature, dtype)


def catch_up_kernel(dtype):
    """The compiled ``_catch_up`` for ``dtype``."""
    return _row_kernel(_catch_up, _catch_up_signature, dtype)


def catch_up_ptx(dtype, cc=(9, 0)):
    """PTX of the catch-up kernel (no GPU needed; not in the simulator)."""
    if SIMULATOR:
        raise RuntimeError("PTX cannot be compiled in numba's CUDA simulator "
                           "(NUMBA_ENABLE_CUDASIM is set)")
    return cuda.compile_ptx(_catch_up, _catch_up_signature(dtype), cc=tuple(cc))[0]


_PYFUNCS = {"stats_kernel": stats_kernel, "update_kernel": update_kernel}


# --- signatures, compilation, PTX ------------------------------------------------

def signatures(dtype):
    """The exact argument types each kernel of a step is launched with."""
    f = {np.dtype(np.float32): types.float32, np.dtype(np.float64): types.float64}.get(
        np.dtype(dtype))
    if f is None:
        raise TypeError(f"the cuda kernels take float32 or float64, not {np.dtype(dtype)}")
    i64, u32, i32 = types.int64[::1], types.uint32[::1], types.int32[::1]
    vec, table, addr = f[::1], f[:, ::1], types.int64[:, ::1]
    return {
        "stats_kernel": (table, addr, i64, i64, i64, i64, i64, types.int64, table, i32,
                         table, i32, vec, vec, u32, types.boolean, f, f, f),
        "update_kernel": (table, addr, i64, i64, i64, i64, vec, u32, vec, vec, vec,
                          types.boolean),
    }


_compiled = {}


def kernels(dtype):
    """``{name: dispatcher}`` of the step kernels for ``dtype``, compiled once
    for exactly the signatures of ``signatures(dtype)``."""
    dtype = np.dtype(dtype)
    if dtype not in _compiled:
        sigs = signatures(dtype)
        _compiled[dtype] = {name: cuda.jit(sigs[name], cache=True)(_PYFUNCS[name])
                            for name in KERNEL_NAMES}
    return _compiled[dtype]


zero_kernel = cuda.jit(cache=True)(_zero)


def ptx_modules(dtype, cc=(9, 0)):
    """``{kernel name: PTX module}`` for every kernel a step launches for
    ``dtype`` (float32 or float64), compiled through NVVM for compute
    capability ``cc``, in launch order (``KERNEL_NAMES``): each a module of
    its own, as ``ptxas`` takes them.  Needs the ``cuda`` extra (numba-cuda
    with NVVM); no GPU is needed."""
    if SIMULATOR:
        raise RuntimeError("PTX cannot be compiled in numba's CUDA simulator "
                           "(NUMBA_ENABLE_CUDASIM is set)")
    sigs = signatures(dtype)
    return {name: cuda.compile_ptx(_PYFUNCS[name], sigs[name], cc=tuple(cc))[0]
            for name in KERNEL_NAMES}


def ptx(dtype, cc=(9, 0)):
    """The PTX of every kernel a step launches for ``dtype``, one ``.entry``
    per kernel in launch order (``ptx_modules`` joined)."""
    return "\n".join(ptx_modules(dtype, cc).values())


def make_layout(sizes, chunk=CHUNK):
    """Chunk tables of a bucket: ``(chunk, seg, lo, hi, first, big)``.

    ``first[k]:first[k+1]`` are array ``k``'s chunks; ``big`` lists the
    arrays with more than ``THREADS`` chunks (summed by a whole block).
    """
    total = int(sum(int(s) for s in sizes))
    while total > chunk * MAX_CHUNKS:
        chunk *= 2
    seg, lo, hi = make_chunks(sizes, chunk)
    first = np.zeros(len(sizes) + 1, np.int64)
    np.cumsum(np.bincount(seg, minlength=len(sizes)), out=first[1:])
    big = np.flatnonzero(np.diff(first) > THREADS).astype(np.int64)
    return chunk, seg, lo, hi, first, big
