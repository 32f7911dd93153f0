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

import numpy as np
from numba import carray, njit, prange, types

from ..layout import (
    ACTIVE,
    CLIPNORM,
    CLIPVALUE,
    COEF_FIELDS,
    FLAG_FIELDS,
    INV_T,
    STEP,
    T,
)
from .jit import OPTS as _OPTS
from .jit import kernel as _kernel
from .jit import twin as _twin
from .locate import located_address
from .loops import ALL_LOOPS, _first_pass, _has_loop, _scale, _update_span, loop_globals
from .pointers import pointer_like as _pointer_like
from .pointers import pointer_of as _pointer_of
from .pointers import pointer_to as _pointer_to

__all__ = [
    "CTX_FIELDS", "SCALAR_FIELDS", "array_step",
    "data_address", "segments_step", "segments_step_parallel",
    "single_step",
]


@_kernel
def data_address(a):
    """The address of ``a``'s first element (a fast ``a.ctypes.data``)."""
    return a.ctypes.data


# --- one array ---------------------------------------------------------------

def _array_step(x, g, v, n, m, c, f, check, global_clipnorm):
    """One fused step on one C-contiguous 1-D array.

    Returns ``(code, sumsq)``: ``code`` is ``STEPPED``, or ``NONFINITE``
    when ``check`` is set and ``g`` holds a NaN or an infinity, or
    ``NO_LOOP`` when this compiled variant lacks the loop the array needs
    (nothing was written in either case); ``sumsq`` is the squared norm of
    ``g`` when a norm is needed (finite ``clipnorm`` or ``global_clipnorm``),
    else 0.0 (the check alone skips the norm).
    """
    scale = 1.0
    sumsq = 0.0
    needs_norm = c[CLIPNORM] < np.inf or global_clipnorm < np.inf
    if check or needs_norm:
        nonfinite, sumsq = _first_pass(g, needs_norm)
        if check and nonfinite != 0:
            return NONFINITE, sumsq
        if needs_norm:
            scale = _scale(sumsq, c[CLIPNORM])
            scale *= _scale(sumsq * scale * scale, global_clipnorm)
    scale = x.dtype.type(scale)
    if not _has_loop(f, scale != 1 or c[CLIPVALUE] < np.inf):
        return NO_LOOP, sumsq
    _update_span(x, g, v, n, m, c, f, scale, np.int64(0))
    return STEPPED, sumsq


# Return codes of ``array_step`` and ``single_step``.
STEPPED, NONFINITE, NOT_LOCATED, UNBOUND, NO_LOOP = 0, 1, 2, 3, 4
# ``segments_step`` returns an array index, or -1; or this:
SEGMENTS_NO_LOOP = -2

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
    when ``ctx`` has no step count or scalar row; ``NO_LOOP`` when this
    compiled variant lacks the loop the array needs.  Nothing is written in
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
    code, _ = _array_step_inline(x, g, v, n, m, c, f, ctx[CCHECK] != 0, s[S_GCLIP])
    if code != STEPPED:
        return code
    steps[0] += 1
    return STEPPED


_SINGLE_STEP = {}


def single_step(dtype, hold_gil=False, loops=ALL_LOOPS):
    """``_single_step`` compiled for one array dtype (float32 or float64),
    holding the GIL or releasing it, with the update loops of mask
    ``loops`` (``variant``); loaded or compiled on first use.

    Returns the dispatcher, of one signature ``(int64, int64, dtype)``;
    ``single_step_entry`` gives its compiled entry point.
    """
    dtype = np.dtype(dtype)
    kernel = _SINGLE_STEP.get((dtype, hold_gil, loops))
    if kernel is None:
        from numba import from_dtype
        sig = types.int64(types.int64, types.int64, from_dtype(dtype))
        name = ("_single_step_gil" if hold_gil else "_single_step") + _suffix(loops)
        kernel = _kernel(_twin(_single_step, name, **_variant_globals(loops)),
                         nogil=not hold_gil)
        kernel.compile(sig)             # as njit([sig]) does: this signature only
        kernel.disable_compile()
        _SINGLE_STEP[dtype, hold_gil, loops] = kernel
    return kernel


def single_step_entry(dtype, hold_gil=False, loops=ALL_LOOPS):
    """The compiled entry point of ``single_step(dtype, hold_gil, loops)``:
    called with two Python ints and a float it runs the kernel without
    numba's dispatch (which would type each argument and pick the signature:
    more than half the time of a whole step on a small array).  Its
    arguments are unboxed as ``int64, int64, dtype``, so only ints and a
    float may be passed."""
    kernel = single_step(dtype, hold_gil, loops)
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
    otherwise; ``SEGMENTS_NO_LOOP``, nothing written, when this compiled
    variant lacks a loop an array needs), and the global squared norm after
    per-array clipping when a norm is needed (finite ``global_clipnorm`` or
    some finite clipnorm), else 0.0: the check alone skips the norm, so a
    first pass (``update`` False) that wants the norm passes a finite
    ``global_clipnorm``.
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
    for k in range(n_arrays):
        if flags[k, ACTIVE] and not _has_loop(
                flags[k], v.dtype.type(scale[k]) != 1 or coef[k, CLIPVALUE] < np.inf):
            return SEGMENTS_NO_LOOP, total
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


# --- variants: only the loops a bucket can take -----------------------------------
# Compiling all ten update loops (``loops.LOOPS``) into one span costs most of
# a cold first step; a default optimizer takes two of them.  A variant is the
# set of entry points compiled with a span that holds the loops of a mask:
# twins whose globals switch the other loops off (pruned before typing, so
# they cost no compile time) and point at the variant's own span.  Each entry
# point checks, before writing anything, that its span holds the loop every
# array needs (``_has_loop``), and returns ``NO_LOOP``/``SEGMENTS_NO_LOOP``
# otherwise: a mask that is too small costs a retry, never a wrong step.

def _suffix(loops):
    return "" if loops == ALL_LOOPS else f"_v{loops:03x}"


_SPANS = {}


def _variant_globals(loops):
    """Globals of a variant's entry points: its span, its loop check and its
    inlined one-array step (the module's own functions for every loop)."""
    if loops == ALL_LOOPS:
        return {}
    found = _SPANS.get(loops)
    if found is None:
        switches = loop_globals(loops)
        span = njit(**_OPTS)(_twin(_update_span.py_func, "_update_span" + _suffix(loops),
                                   **switches))
        has = njit(**_OPTS)(_twin(_has_loop.py_func, "_has_loop" + _suffix(loops),
                                  **switches))
        inline = njit(inline="always", **_OPTS)(
            _twin(_array_step, "_array_step_inline" + _suffix(loops),
                  _update_span=span, _has_loop=has))
        found = _SPANS[loops] = {"_update_span": span, "_has_loop": has,
                                 "_array_step_inline": inline}
    return found


class Variant:
    """The entry points compiled with the update loops of mask ``loops``:
    ``array_step``, ``segments_step``, ``segments_step_parallel`` (same
    signatures and results as the module's own, which hold every loop)."""

    def __init__(self, loops):
        self.loops = loops
        if loops == ALL_LOOPS:
            self.array_step = array_step
            self.segments_step = segments_step
            self.segments_step_parallel = segments_step_parallel
            return
        g, sfx = _variant_globals(loops), _suffix(loops)
        self.array_step = _kernel(_twin(_array_step, "_array_step" + sfx, **g))
        self.segments_step = _kernel(_twin(_segments_step, "_segments_step" + sfx, **g))
        self.segments_step_parallel = _kernel(
            _twin(_segments_step, "_segments_step_parallel" + sfx, **g), parallel=True)


_VARIANTS = {}


def variant(loops):
    """The ``Variant`` for mask ``loops`` (``loops.loops_for``), built once;
    its kernels compile or load on first call."""
    found = _VARIANTS.get(loops)
    if found is None:
        found = _VARIANTS[loops] = Variant(loops)
    return found

