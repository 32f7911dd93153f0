"""The CPU entry points: a whole step in one compiled call.

The kernels know nothing of the optimizer class.  They take raw arrays (or
their addresses) and per-array coefficient and flag rows
(``layout.COEF_FIELDS``, ``layout.FLAG_FIELDS``), read every gradient and
state element once, and write parameters and state in the same pass
(``reference.py`` states the math; ``loops.py`` holds the element update).

``bucket_step(dtype, hold_gil, parallel, loops)``
    the route every step of a one-dtype optimizer takes: one call with the
    gradients' object address and the address of the bucket's context row
    (``BUCKET_FIELDS``).  It locates the gradients in the list or tuple
    passed to ``step`` (``locate.py``), computes the per-step coefficients
    in float64, runs the first pass and the update, and increments the step
    counts.  Called through its compiled entry point with Python ints, so
    numba's dispatch never types an array.
``segments_step`` / ``segments_step_parallel``
    the same step from arrays of data addresses, for the general route
    (gradients staged or cast in Python, several dtypes).
``array_step``
    one C-contiguous 1-D array passed directly (the general route's
    one-array case).

Every one does the whole step in one call: an optional first pass over the
gradients (non-finite check and squared norms for norm clipping), and only
if that pass finds nothing wrong, the update pass.  A refused step returns
before writing anything.  The work is split into chunks (``layout.CHUNK``
elements, never crossing an array), so one parallel loop covers 200 small
arrays as well as one large one.

Each entry point exists per *variant* (``variant``): compiled with only the
update loops its bucket's arrays can take, which is most of what a cold
first step costs.  All are cached on disk and loaded in later processes
without refreshing numba's whole CPU target (``loading.py``).
"""
from __future__ import annotations

import threading

import numpy as np
from numba import carray, njit, prange, types

from .. import background as _background
from ..layout import (
    ACTIVE,
    CLIPNORM,
    CLIPVALUE,
    COEF_FIELDS,
    DECAY,
    FLAG_FIELDS,
    HYPER_FIELDS,
    INV_T,
    LAZY,
    STEP,
    T,
)
from .jit import OPTS as _OPTS
from .jit import kernel as _kernel
from .jit import twin as _twin
from .locate import is_unchanged, located_address, sequence_item
from .loops import (
    ALL_LOOPS,
    ANY_CLIP,
    NORM_UNIT,
    _clipped,
    _counts_after,
    _counts_before,
    _first_pass,
    _first_pass_unclipped,
    _has_loop,
    _joint_norm,
    _scale,
    _scaled_norm,
    _update_span,
    loop_globals,
)
from .pointers import pointer_like as _pointer_like
from .pointers import pointer_of as _pointer_of
from .pointers import pointer_to as _pointer_to

__all__ = [
    "BUCKET_FIELDS", "BUCKET_SCALARS", "array_step", "bucket_step", "bucket_step_entry",
    "data_address", "pair_step", "pair_step_entry", "segments_step",
    "segments_step_parallel", "variant",
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
        if ANY_CLIP:
            nonfinite, sumsq = _first_pass(g, needs_norm, c[CLIPVALUE])
        else:
            nonfinite, sumsq = _first_pass_unclipped(g, needs_norm)
        if check and nonfinite != 0:
            return NONFINITE, sumsq
        if needs_norm and sumsq < np.inf:
            scale = _scale(sumsq, c[CLIPNORM])
            scale *= _scale(sumsq * scale * scale, global_clipnorm)
        elif ANY_CLIP and needs_norm:   # overflowed: see _segments_body
            norm = _scaled_norm(g, c[CLIPVALUE])              # in NORM_UNIT
            clipnorm = np.float64(c[CLIPNORM]) * NORM_UNIT
            scale = clipnorm / norm if norm > clipnorm else 1.0
            norm *= scale
            limit = global_clipnorm * NORM_UNIT
            scale *= limit / norm if norm > limit else 1.0
            sumsq = (norm / NORM_UNIT) ** 2                    # inf beyond float64
    scale = x.dtype.type(scale)
    clipping = _clipped(scale, c[CLIPVALUE])
    if not _has_loop(f, clipping):
        return NO_LOOP, sumsq
    _counts_before(n, f, clipping)
    _update_span(x, g, v, n, m, c, f, scale, np.int64(0))
    _counts_after(g, n, f)
    return STEPPED, sumsq


# Return codes of ``array_step``.
STEPPED, NONFINITE, NOT_LOCATED, UNBOUND, NO_LOOP = 0, 1, 2, 3, 4
# ``segments_step`` returns an array index, or -1; or this:
SEGMENTS_NO_LOOP = -2

array_step = _kernel(_array_step)



# The whole-step entry holds the GIL for buckets up to this many elements (a
# step there takes a few microseconds, and releasing and taking back the GIL
# would add a tenth of one) and releases it above.
SINGLE_STEP_GIL_MAX = 1 << 12


# --- many arrays, flat state ---------------------------------------------------

def _segments_step(x_addr, g_addr, offsets, chunk_seg, chunk_lo, chunk_hi,
                   v, n, m, coef, flags, check, global_clipnorm, other_sumsq,
                   update):
    """``_segments_body`` with its scratch rows allocated here (see there)."""
    n_arrays = offsets.size - 1
    return _segments_body(x_addr, g_addr, offsets, chunk_seg, chunk_lo, chunk_hi,
                          v, n, m, coef, flags, check, global_clipnorm, other_sumsq,
                          update, np.empty(n_arrays), np.empty(chunk_seg.size, np.bool_),
                          np.empty(chunk_seg.size), np.empty(n_arrays))


def _segments_body(x_addr, g_addr, offsets, chunk_seg, chunk_lo, chunk_hi,
                   v, n, m, coef, flags, check, global_clipnorm, other_sumsq,
                   update, scale, chunk_bad, chunk_sq, sumsq):
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

    ``scale``, ``sumsq`` (one per array) and ``chunk_bad``, ``chunk_sq``
    (one per chunk) are scratch rows, overwritten.
    """
    n_arrays = offsets.size - 1
    n_chunks = chunk_seg.size
    needs_norm = global_clipnorm < np.inf
    for k in range(n_arrays):
        if coef[k, CLIPNORM] < np.inf:
            needs_norm = True
    # Plain loops, not slice assignments: in the parallel twin numba makes
    # each slice assignment a parallel region of its own, compiled as one
    # more kernel (a second each, cold) and launched for a few elements.
    for k in range(n_arrays):
        scale[k] = 1.0
    total = 0.0
    if check or needs_norm:
        for j in prange(n_chunks):
            k = chunk_seg[j]
            if flags[k, ACTIVE]:
                size = offsets[k + 1] - offsets[k]
                g = carray(_pointer_like(g_addr[k], v), size)
                if ANY_CLIP:
                    nonfinite, sq = _first_pass(g[chunk_lo[j]:chunk_hi[j]], needs_norm,
                                                coef[k, CLIPVALUE])
                else:
                    nonfinite, sq = _first_pass_unclipped(g[chunk_lo[j]:chunk_hi[j]],
                                                          needs_norm)
                chunk_bad[j] = nonfinite != 0
                chunk_sq[j] = sq
            else:
                chunk_bad[j] = False
                chunk_sq[j] = 0.0
        if check:
            for j in range(n_chunks):
                if chunk_bad[j]:
                    return chunk_seg[j], total
        for k in range(n_arrays):
            sumsq[k] = 0.0
        for j in range(n_chunks):
            sumsq[chunk_seg[j]] += chunk_sq[j]
        overflow = False
        for k in range(n_arrays):
            if flags[k, ACTIVE] and sumsq[k] == np.inf:
                overflow = True
        if not (ANY_CLIP and overflow):
            for k in range(n_arrays):
                scale[k] = _scale(sumsq[k], coef[k, CLIPNORM])
                total += sumsq[k] * scale[k] * scale[k]
            g_scale = _scale(total + other_sumsq, global_clipnorm)
        else:
            # A squared norm overflowed (float64 gradients beyond 1e154): the
            # same clipping from norms scaled by their largest element, so
            # the step is clipped, not lost; the norms in NORM_UNIT, so that
            # none overflows even beyond 1.8e308.
            for k in range(n_arrays):
                if flags[k, ACTIVE] and sumsq[k] == np.inf:
                    size = offsets[k + 1] - offsets[k]
                    norm = _scaled_norm(carray(_pointer_like(g_addr[k], v), size),
                                        coef[k, CLIPVALUE])
                else:
                    norm = np.sqrt(sumsq[k]) * NORM_UNIT
                clipnorm = np.float64(coef[k, CLIPNORM]) * NORM_UNIT
                scale[k] = clipnorm / norm if norm > clipnorm else 1.0
                sumsq[k] = norm * scale[k]          # now the clipped norm
            joint = _joint_norm(sumsq[:n_arrays], other_sumsq * NORM_UNIT * NORM_UNIT)
            total = (joint / NORM_UNIT) ** 2        # inf beyond float64: for the others
            limit = global_clipnorm * NORM_UNIT
            g_scale = limit / joint if joint > limit else 1.0
        if global_clipnorm < np.inf:
            for k in range(n_arrays):
                scale[k] *= g_scale
    if not update:
        return -1, total
    for k in range(n_arrays):
        if flags[k, ACTIVE] and not _has_loop(
                flags[k], _clipped(v.dtype.type(scale[k]), coef[k, CLIPVALUE])):
            return SEGMENTS_NO_LOOP, total
    for k in range(n_arrays):
        if flags[k, ACTIVE]:
            _counts_before(n[offsets[k]:offsets[k + 1]] if n.size else n, flags[k],
                           _clipped(v.dtype.type(scale[k]), coef[k, CLIPVALUE]))
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
    for k in range(n_arrays):
        if flags[k, ACTIVE] and flags[k, LAZY]:
            size = offsets[k + 1] - offsets[k]
            _counts_after(carray(_pointer_like(g_addr[k], v), size),
                          n[offsets[k]:offsets[k + 1]], flags[k])
    return -1, total


_segments_body = njit(inline="always", **_OPTS)(_segments_body)

segments_step = _kernel(_segments_step)
segments_step_parallel = _kernel(_twin(_segments_step, "_segments_step_parallel"),
                                 parallel=True)


# --- a whole step of one bucket in one call ------------------------------------
# Layout of the int64 context row of ``bucket_step`` (addresses of int64,
# float64 and dtype rows and tables the bucket owns, and counts):
BUCKET_FIELDS = (
    "x_addr", "g_addr", "offsets", "chunk_seg", "chunk_lo", "chunk_hi", "n_chunks",
    "mean_sq", "count", "momentum", "total", "count_size", "momentum_size",
    "coef", "flags", "n_arrays", "steps", "lr", "hyper", "scalars", "check",
    "slots", "n_items", "bare", "ndarray_type", "descr", "ndims", "dims",
    "dims_start", "list_type", "tuple_type", "none", "scratch", "step_count",
    "param_objects", "x_lo", "x_hi", "itemsize")
(BX, BG, BOFF, BSEG, BLO, BHI, BNCH, BV, BN, BM, BTOTAL, BNSIZE, BMSIZE, BCOEF,
 BFLAGS, BNARR, BSTEPS, BLR, BHYPER, BS, BCHECK, BSLOTS, BNITEMS, BBARE, BTYPE,
 BDESCR, BNDIMS, BDIMS, BDSTART, BLIST, BTUPLE, BNONE, BSCRATCH,
 BSTEPCOUNT, BPARAMS, BXLO, BXHI, BITEM) = range(len(BUCKET_FIELDS))
# The float64 scalar row: global_clipnorm in, the bucket's squared norm out.
BUCKET_SCALARS = ("global_clipnorm", "sumsq")
# Return codes of ``bucket_step`` besides an array index (a non-finite
# gradient: refused) and SEGMENTS_NO_LOOP.  Nothing is written unless STEPPED.
BUCKET_STEPPED, BUCKET_NOT_LOCATED = -1, -3


@njit(inline="always", **_OPTS)
def _meets_a_parameter(address, nbytes, ctx):
    """Whether the ``nbytes`` from ``address`` share bytes with a parameter
    of the bucket of context row ``ctx``: a binary search in its sorted,
    disjoint parameter byte ranges ``x_lo``/``x_hi``."""
    if nbytes == 0:
        return False
    n_arrays = ctx[BNARR]
    lo_row = carray(_pointer_of(ctx[BXLO], np.int64), n_arrays)
    hi_row = carray(_pointer_of(ctx[BXHI], np.int64), n_arrays)
    end = address + nbytes
    a, b = 0, n_arrays                  # the last range starting before ``end``
    while a < b:
        mid = (a + b) // 2
        if lo_row[mid] < end:
            a = mid + 1
        else:
            b = mid
    return a > 0 and hi_row[a - 1] > address


@njit(inline="always", **_OPTS)
def _locate(g_object, ctx, other):
    """Locate the bucket's gradients in the object at ``g_object`` (see
    ``_bucket_step``): write each one's address into the ``g_addr`` row and
    its ``ACTIVE`` flag.  ``other`` is the context row's address of another
    bucket stepped in the same call (0: none), whose parameters a gradient
    must not overlap either.  Returns how many are active, or -1 where one
    cannot be read where it lies (the general route takes the step)."""
    n_arrays = ctx[BNARR]
    g_addr = carray(_pointer_of(ctx[BG], np.int64), n_arrays)
    flags = carray(_pointer_of(ctx[BFLAGS], np.int64), (n_arrays, len(FLAG_FIELDS)))
    offsets = carray(_pointer_of(ctx[BOFF], np.int64), n_arrays + 1)
    slots = carray(_pointer_of(ctx[BSLOTS], np.int64), n_arrays)
    ndims = carray(_pointer_of(ctx[BNDIMS], np.int64), n_arrays)
    dims_start = carray(_pointer_of(ctx[BDSTART], np.int64), n_arrays)
    dims = carray(_pointer_of(ctx[BDIMS], np.int64), dims_start[n_arrays - 1]
                  + ndims[n_arrays - 1])
    params = carray(_pointer_of(ctx[BPARAMS], np.int64), n_arrays)
    x_addr = carray(_pointer_of(ctx[BX], np.int64), n_arrays)
    n_active = 0
    for k in range(n_arrays):
        if ctx[BBARE]:
            item = g_object
        else:
            item = sequence_item(g_object, slots[k], ctx[BNITEMS], ctx[BLIST], ctx[BTUPLE])
            if item == 0:
                return -1
        if item == ctx[BNONE]:
            flags[k, ACTIVE] = 0
            g_addr[k] = 0
            continue
        start = dims_start[k]
        address = located_address(item, ctx[BTYPE], ctx[BDESCR], ndims[k],
                                  dims[start:start + ndims[k]])
        if address < 0:
            return -1
        if not is_unchanged(params[k], ctx[BDESCR], ndims[k], dims[start:start + ndims[k]],
                            x_addr[k]):
            return -1                   # read-only or reshaped since: the general route says so
        nbytes = (offsets[k + 1] - offsets[k]) * ctx[BITEM]
        if _meets_a_parameter(address, nbytes, ctx):
            return -1                   # the general route stages it
        if other != 0 and _meets_a_parameter(
                address, nbytes, carray(_pointer_of(other, np.int64), len(BUCKET_FIELDS))):
            return -1
        flags[k, ACTIVE] = 1
        g_addr[k] = address
        n_active += 1
    return n_active


@njit(inline="always", **_OPTS)
def _step_coefficients(ctx, zero):
    """Each array's step count ``t`` after this step (``flags[k, T]``) and the
    coefficients that change every step (see ``_bucket_step``), from the
    caller's rows, which are indexed by the arrays' ``slots``."""
    n_arrays = ctx[BNARR]
    n_items = ctx[BNITEMS]
    flags = carray(_pointer_of(ctx[BFLAGS], np.int64), (n_arrays, len(FLAG_FIELDS)))
    slots = carray(_pointer_of(ctx[BSLOTS], np.int64), n_arrays)
    coef = carray(_pointer_to(ctx[BCOEF], zero), (n_arrays, len(COEF_FIELDS)))
    steps = carray(_pointer_of(ctx[BSTEPS], np.int64), n_items)
    lr = carray(_pointer_of(ctx[BLR], np.float64), n_items)
    hyper = carray(_pointer_of(ctx[BHYPER], np.float64), (n_items, len(HYPER_FIELDS)))
    last_beta, last_t, correction = -1.0, np.int64(-1), 1.0
    for k in range(n_arrays):
        i = slots[k]
        t = max(steps[i] + flags[k, ACTIVE], 1)
        flags[k, T] = t
        tf = np.float64(t)
        beta = hyper[i, 0]
        if beta != last_beta or t != last_t:    # arrays of a group share it
            correction = 1.0 - beta ** tf
            last_beta, last_t = beta, t
        step = lr[i] if beta == 0.0 else lr[i] / correction
        coef[k, STEP] = step * hyper[i, 2]                 # the step's sign
        coef[k, INV_T] = 1.0 / tf
        coef[k, DECAY] = 1.0 - lr[i] * hyper[i, 1]


def _bucket_segments(ctx_address, zero, check, global_clipnorm, other_sumsq, update):
    """``_segments_body`` on the bucket of context row ``ctx_address``:
    ``(bad, sumsq)``, ``bad`` an index into the bucket (see there).

    Compiled on its own per loop mask and serial or parallel
    (``segments_of``), not inlined: the entry points of one bucket and of
    two (``_pair_step``) call the same compiled code, so a pair costs no
    second compile of the update loops."""
    ctx = carray(_pointer_of(ctx_address, np.int64), len(BUCKET_FIELDS))
    n_arrays = ctx[BNARR]
    nch = ctx[BNCH]
    return _segments_inline(
        carray(_pointer_of(ctx[BX], np.int64), n_arrays),
        carray(_pointer_of(ctx[BG], np.int64), n_arrays),
        carray(_pointer_of(ctx[BOFF], np.int64), n_arrays + 1),
        carray(_pointer_of(ctx[BSEG], np.int64), nch),
        carray(_pointer_of(ctx[BLO], np.int64), nch),
        carray(_pointer_of(ctx[BHI], np.int64), nch),
        carray(_pointer_to(ctx[BV], zero), ctx[BTOTAL]),
        carray(_pointer_of(ctx[BN], np.uint32), ctx[BNSIZE]),
        carray(_pointer_to(ctx[BM], zero), ctx[BMSIZE]),
        carray(_pointer_to(ctx[BCOEF], zero), (n_arrays, len(COEF_FIELDS))),
        carray(_pointer_of(ctx[BFLAGS], np.int64), (n_arrays, len(FLAG_FIELDS))),
        check, global_clipnorm, other_sumsq, update,
        carray(_pointer_of(ctx[BSCRATCH], np.float64), n_arrays),
        carray(_pointer_of(ctx[BSCRATCH] + 8 * n_arrays, np.bool_), nch),
        carray(_pointer_of(ctx[BSCRATCH] + 8 * n_arrays + 8 * nch, np.float64), nch),
        carray(_pointer_of(ctx[BSCRATCH] + 8 * n_arrays + 16 * nch, np.float64), n_arrays))


@njit(inline="always", **_OPTS)
def _yes(ctx):
    """True, typed as any bool: the flags passed to ``_bucket_segments``
    must not be literals, which numba would compile it for one by one."""
    return ctx[BNARR] >= 0


@njit(inline="always", **_OPTS)
def _count_steps(ctx):
    """Each active array's step count, incremented (after a step)."""
    n_arrays = ctx[BNARR]
    flags = carray(_pointer_of(ctx[BFLAGS], np.int64), (n_arrays, len(FLAG_FIELDS)))
    slots = carray(_pointer_of(ctx[BSLOTS], np.int64), n_arrays)
    steps = carray(_pointer_of(ctx[BSTEPS], np.int64), ctx[BNITEMS])
    for k in range(n_arrays):
        steps[slots[k]] += flags[k, ACTIVE]


def _bucket_step(g_object, ctx_address, zero):
    """One whole optimizer step of a bucket (every array of one dtype).

    ``g_object`` is the address of the gradients as the user passed them
    (``id`` of a list or tuple holding one gradient per parameter, or of
    the bare gradient array of a one-array optimizer), or 0 when the caller
    has already written each gradient's data address into the ``g_addr``
    row and each array's ``ACTIVE`` flag.  Otherwise each gradient is
    located here (``locate.located_address``): ``None`` skips its array,
    and anything but a C-contiguous ndarray of exactly the parameter's
    dtype and shape returns ``BUCKET_NOT_LOCATED`` (the caller stages it and
    calls again with 0).

    Then, with ``t`` each array's step count after this step, ``lr`` from
    a float64 row and ``beta``, ``weight_decay`` and the step's sign from
    the float64 hyper table (``layout.HYPER_FIELDS``), the coefficients
    that change every step are computed in float64 exactly as
    ``reference.step_size`` does (the same C library ``pow``) and stored in
    the array dtype::

        c[STEP]  = sign * lr / (1 - beta**t)   (sign * lr when beta == 0)
        c[INV_T] = 1 / t
        c[DECAY] = 1 - lr * weight_decay

    and the step is ``segments_step``'s (first pass, then the update).  On
    success every active array's step count, and the optimizer's, is
    incremented in place: a step is one call, whole or not at all, which a
    Python signal (Ctrl-C) cannot interrupt halfway.

    Returns ``BUCKET_STEPPED``; the index of a gradient holding NaN or
    infinity (with check_finite); ``BUCKET_NOT_LOCATED``; or
    ``SEGMENTS_NO_LOOP``.  Nothing but the coefficient rows is written in
    those cases.
    """
    ctx = carray(_pointer_of(ctx_address, np.int64), len(BUCKET_FIELDS))
    if g_object != 0 and _locate(g_object, ctx, 0) <= 0:
        return BUCKET_NOT_LOCATED           # None everywhere: the caller's business
    _step_coefficients(ctx, zero)
    s = carray(_pointer_of(ctx[BS], np.float64), len(BUCKET_SCALARS))
    bad, sumsq = _bucket_segments(ctx_address, zero, ctx[BCHECK] != 0, s[0], 0.0,
                                  _yes(ctx))
    s[1] = sumsq
    if bad != -1:
        return bad
    _count_steps(ctx)
    carray(_pointer_of(ctx[BSTEPCOUNT], np.int64), 1)[0] += 1
    return BUCKET_STEPPED


@njit(inline="always", **_OPTS)
def _loops_present(ctx, zero, global_clipnorm):
    """Whether this bucket's compiled span holds every loop its active
    arrays may take this step: the clipped one where a clipping threshold
    is finite, the unclipped one unless value clipping always applies.
    ``_pair_step`` asks both buckets before either writes anything."""
    n_arrays = ctx[BNARR]
    flags = carray(_pointer_of(ctx[BFLAGS], np.int64), (n_arrays, len(FLAG_FIELDS)))
    coef = carray(_pointer_to(ctx[BCOEF], zero), (n_arrays, len(COEF_FIELDS)))
    for k in range(n_arrays):
        if flags[k, ACTIVE]:
            by_value = coef[k, CLIPVALUE] < np.inf
            if (by_value or coef[k, CLIPNORM] < np.inf or global_clipnorm < np.inf) \
                    and not _has_loop(flags[k], True):
                return False
            if not by_value and not _has_loop(flags[k], False):
                return False
    return True


def _pair_step(g_object, pair_address, zero):
    """One whole step of a float32 and a float64 bucket in one call (an
    optimizer with parameters of both): ``_bucket_step``'s, with the first
    passes of both buckets (non-finite check, squared norms) before either
    writes anything, and global norm clipping over both.

    ``pair_address`` is the address of an int64 row holding the two context
    rows' addresses, the float32 bucket's first; both are bound to the same
    step, lr, hyper and scalar rows and step counter (indexed by ``slots``,
    the arrays' places in the gradient sequence).  ``zero`` is not read.
    Returns as ``_bucket_step`` does; a non-finite gradient's index is its
    place in the gradient sequence."""
    pair = carray(_pointer_of(pair_address, np.int64), 2)
    a = carray(_pointer_of(pair[0], np.int64), len(BUCKET_FIELDS))
    b = carray(_pointer_of(pair[1], np.int64), len(BUCKET_FIELDS))
    za, zb = np.float32(0), np.float64(0)
    if g_object != 0:
        active_a = _locate(g_object, a, pair[1])
        if active_a < 0:
            return BUCKET_NOT_LOCATED
        active_b = _locate(g_object, b, pair[0])
        if active_b < 0 or active_a + active_b == 0:
            return BUCKET_NOT_LOCATED
    _step_coefficients(a, za)
    _step_coefficients(b, zb)
    s = carray(_pointer_of(a[BS], np.float64), len(BUCKET_SCALARS))
    check = a[BCHECK] != 0
    yes = _yes(a)
    no = not yes
    bad, sumsq_a = _segments_a(pair[0], za, check, s[0], 0.0, no)
    if bad != -1:
        return carray(_pointer_of(a[BSLOTS], np.int64), a[BNARR])[bad]
    bad, sumsq_b = _segments_b(pair[1], zb, check, s[0], 0.0, no)
    if bad != -1:
        return carray(_pointer_of(b[BSLOTS], np.int64), b[BNARR])[bad]
    if not (_loops_present_a(a, za, s[0]) and _loops_present_b(b, zb, s[0])):
        return SEGMENTS_NO_LOOP
    _segments_a(pair[0], za, no, s[0], sumsq_b, yes)
    _segments_b(pair[1], zb, no, s[0], sumsq_a, yes)
    s[1] = sumsq_a + sumsq_b
    _count_steps(a)
    _count_steps(b)
    carray(_pointer_of(a[BSTEPCOUNT], np.int64), 1)[0] += 1
    return BUCKET_STEPPED


_segments_inline = njit(inline="always", **_OPTS)(_twin(_segments_body.py_func, "_segments_inline"))

_SEGMENTS = {}


def segments_of(loops, parallel):
    """``_bucket_segments`` compiled with the update loops of mask
    ``loops`` (its own name, so its own cache entries), serial or
    parallel; made once."""
    key = (loops, parallel)
    found = _SEGMENTS.get(key)
    if found is None:
        with _MAKING:
            found = _SEGMENTS.get(key)
            if found is None:
                found = _SEGMENTS[key] = _segments_kernel(loops, parallel)
    return found


def _segments_kernel(loops, parallel):
    """The dispatcher ``segments_of`` keeps (not yet compiled)."""
    inline = _variant_globals(loops).get("_segments_inline", _segments_inline)
    name = "_bucket_segments" + _suffix(loops) + ("_par" if parallel else "")
    return njit(parallel=parallel, **_OPTS)(
        _twin(_bucket_segments, name, _segments_inline=inline))


_segments_a = _segments_b = None                  # set in each twin of _pair_step
_loops_present_a = _loops_present_b = _loops_present

_BUCKET_STEP = {}
_PAIR_STEP = {}
_MADE = {}          # dispatchers made, not yet compiled (``background.ready``)
# Held while a dispatcher is made (not while it compiles), so that threads
# building optimizers at once share one; each made dispatcher has a lock of
# its own, held while it is loaded or compiled (reentrant: a signal
# handler's step may ask for it in the middle).
_MAKING = threading.RLock()


def bucket_step(dtype, hold_gil=False, parallel=False, loops=ALL_LOOPS, wait=True):
    """``_bucket_step`` compiled for one dtype, holding the GIL or not,
    serial or parallel, with the update loops of mask ``loops``; loaded or
    compiled on first use.  Returns the dispatcher, of one signature
    ``(int64, int64, dtype)``; ``bucket_step_entry`` gives its entry point.

    With ``wait`` False, returns None instead of waiting for a compile: the
    kernel is then compiled in the background (``backends/background.py``)
    and a later call returns it."""
    dtype = np.dtype(dtype)
    key = (dtype, hold_gil, parallel, loops)
    kernel = _BUCKET_STEP.get(key)
    if kernel is not None:
        return kernel
    with _MAKING:
        made = _MADE.get(key)
        if made is None:
            from numba import from_dtype
            sig = (types.int64, types.int64, from_dtype(dtype))
            name = ("_bucket_step" + ("_gil" if hold_gil else "")
                    + ("_par" if parallel else "") + _suffix(loops))
            made = _MADE[key] = (_kernel(_twin(_bucket_step, name,
                                               _bucket_segments=segments_of(loops, parallel)),
                                         nogil=not hold_gil), sig, threading.RLock())
    kernel, sig, lock = made
    if parallel:
        _threads_launched()
    recipe = (__name__, "bucket_step", (dtype.name, hold_gil, parallel, loops))
    with lock:                          # one thread makes it ready, the others wait
        if key in _BUCKET_STEP:
            return _BUCKET_STEP[key]
        try:
            if not _background.ready(kernel, sig, recipe, wait=wait):
                return None
        except RuntimeError:
            if key in _BUCKET_STEP:     # made ready meanwhile, by a signal handler's step
                return _BUCKET_STEP[key]
            raise
        kernel.disable_compile()        # as njit([sig]) does: this signature only
        _BUCKET_STEP[key] = kernel
    with _MAKING:
        _MADE.pop(key, None)
    return kernel


def _threads_launched():
    """Start numba's thread pool.  The whole-step entry points are not
    parallel themselves: they call the parallel ``segments_of`` kernel, and
    only a parallel dispatcher called from Python starts the pool (a cached
    entry point loaded in a fresh process would call into no threads)."""
    from numba.np.ufunc.parallel import _launch_threads
    _launch_threads()


def pair_step(hold_gil=False, parallel=False, loops_a=ALL_LOOPS, loops_b=ALL_LOOPS,
              wait=True):
    """``_pair_step`` compiled holding the GIL or not, serial or parallel,
    with the update loops of masks ``loops_a`` (the float32 bucket) and
    ``loops_b`` (float64), as ``bucket_step`` compiles ``_bucket_step``:
    one signature ``(int64, int64, float64)``, None with ``wait`` False
    while it compiles in the background."""
    key = ("pair", hold_gil, parallel, loops_a, loops_b)
    kernel = _PAIR_STEP.get(key[1:])
    if kernel is not None:
        return kernel
    with _MAKING:
        made = _MADE.get(key)
        if made is None:
            va, vb = _variant_globals(loops_a), _variant_globals(loops_b)
            name = ("_pair_step" + ("_gil" if hold_gil else "")
                    + ("_par" if parallel else "") + f"_v{loops_a:03x}_{loops_b:03x}")
            body = _twin(_pair_step, name,
                         _segments_a=segments_of(loops_a, parallel),
                         _segments_b=segments_of(loops_b, parallel),
                         _loops_present_a=va.get("_loops_present", _loops_present),
                         _loops_present_b=vb.get("_loops_present", _loops_present))
            made = _MADE[key] = (_kernel(body, nogil=not hold_gil),
                                 (types.int64, types.int64, types.float64), threading.RLock())
    kernel, sig, lock = made
    if parallel:
        _threads_launched()
    recipe = (__name__, "pair_step", (hold_gil, parallel, loops_a, loops_b))
    with lock:                          # one thread makes it ready, the others wait
        if key[1:] in _PAIR_STEP:
            return _PAIR_STEP[key[1:]]
        try:
            if not _background.ready(kernel, sig, recipe, wait=wait):
                return None
        except RuntimeError:
            if key[1:] in _PAIR_STEP:   # made ready meanwhile, by a signal handler's step
                return _PAIR_STEP[key[1:]]
            raise
        kernel.disable_compile()
        _PAIR_STEP[key[1:]] = kernel
    with _MAKING:
        _MADE.pop(key, None)
    return kernel


def pair_step_entry(hold_gil=False, parallel=False, loops_a=ALL_LOOPS, loops_b=ALL_LOOPS,
                    wait=True):
    """The compiled entry point of ``pair_step(...)`` (see
    ``bucket_step_entry``); None where that returns None."""
    kernel = pair_step(hold_gil, parallel, loops_a, loops_b, wait)
    if kernel is None:
        return None
    return kernel.overloads[kernel.signatures[0]].entry_point


def bucket_step_entry(dtype, hold_gil=False, parallel=False, loops=ALL_LOOPS, wait=True):
    """The compiled entry point of ``bucket_step(...)``: called with two
    Python ints and a float, without numba's dispatch (which would type
    each argument and pick the signature).  Only ints and a float may be
    passed: they are unboxed as ``int64, int64, dtype``.  None where
    ``bucket_step`` returns None (``wait`` False, compiling)."""
    kernel = bucket_step(dtype, hold_gil, parallel, loops, wait)
    if kernel is None:
        return None
    return kernel.overloads[kernel.signatures[0]].entry_point


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
    """Globals of a variant's entry points: its span, its loop check and the
    inlined segments body (the module's own functions for every loop)."""
    if loops == ALL_LOOPS:
        return {}
    found = _SPANS.get(loops)
    if found is None:
        switches = loop_globals(loops)
        span = njit(**_OPTS)(_twin(_update_span.py_func, "_update_span" + _suffix(loops),
                                   **switches))
        has = njit(**_OPTS)(_twin(_has_loop.py_func, "_has_loop" + _suffix(loops),
                                  **switches))
        any_clip = switches["ANY_CLIP"]
        segments = njit(inline="always", **_OPTS)(
            _twin(_segments_body.py_func, "_segments_inline" + _suffix(loops),
                  _update_span=span, _has_loop=has, ANY_CLIP=any_clip))
        body = njit(inline="always", **_OPTS)(
            _twin(_segments_body.py_func, "_segments_body" + _suffix(loops),
                  _update_span=span, _has_loop=has, ANY_CLIP=any_clip))
        present = njit(inline="always", **_OPTS)(
            _twin(_loops_present.py_func, "_loops_present" + _suffix(loops), _has_loop=has))
        found = _SPANS[loops] = {"_update_span": span, "_has_loop": has,
                                 "_segments_inline": segments, "_segments_body": body,
                                 "_loops_present": present, "ANY_CLIP": any_clip}
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
        with _MAKING:
            found = _VARIANTS.get(loops)
            if found is None:
                found = _VARIANTS[loops] = Variant(loops)
    return found

