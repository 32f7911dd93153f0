"""Compiled passes over the MPI front end's flat buffers (``mpi.py``), one
read of each element apiece.

``pack_within(src, dst, bound)``
    ``dst[:] = src`` and whether every element is finite with
    ``|x| <= bound``.  With ``bound`` = the dtype's largest value over
    ``2 P``, P ranks' gradients that all pass cannot overflow when summed,
    so the mean is finite without a look at it: the step needs no
    collective to agree on that.
``within(x, bound)``
    the same test alone (a gradient cast or gathered into the buffer by
    NumPy).
``mean_over_ranks(rows, m, out, count)``
    ``out[i] = (rows[0, i] + rows[1, i] + ...) / count`` for ``i < m``,
    summed in rank order with each addition rounded in the dtype: the bits
    of NumPy's ``out = rows[0]; out += rows[1]; ...; out /= count``, in one
    compiled pass (``mean_of_rows``).  Returns whether every result is
    finite.  Where one is not, the chunk is computed again by those NumPy
    operations: which operand's NaN an addition keeps is the hardware's
    choice, and the compiled loop's vector body and its scalar tail may
    choose differently, so only NumPy's own operations give a NaN the sign
    and payload that one process stepping the mean gets.

``bound`` and ``count`` are scalars of the arrays' dtype (float32 stays
float32).
"""
from __future__ import annotations

import numpy as np

from .jit import kernel as _kernel

__all__ = ["mean_of_rows", "mean_over_ranks", "pack_within", "within"]

_BLOCK = 2048


@_kernel
def pack_within(src, dst, bound):
    ok = True
    for i in range(src.size):
        v = src[i]
        dst[i] = v
        ok &= abs(v) <= bound            # False for NaN and infinity
    return ok


@_kernel
def within(x, bound):
    ok = True
    for i in range(x.size):
        ok &= abs(x[i]) <= bound
    return ok


@_kernel
def mean_of_rows(rows, m, out, count):
    # In blocks that stay in L1 while every rank's row is added: the
    # additions then vectorise, as they do not with the ranks' loop inside
    # the element loop.  Rows are taken as 1-D slices: indexing the 2-D
    # array element by element kept LLVM from vectorising at all.
    finite = True
    for lo in range(0, m, _BLOCK):
        hi = min(lo + _BLOCK, m)
        o = out[lo:hi]
        x = rows[0, lo:hi]
        for i in range(o.size):
            o[i] = x[i]
        for r in range(1, rows.shape[0]):
            x = rows[r, lo:hi]
            for i in range(o.size):
                o[i] += x[i]
        for i in range(o.size):
            v = o[i] / count
            o[i] = v
            finite &= v - v == 0         # False for NaN and infinity
    return finite


def mean_over_ranks(rows, m, out, count):
    if mean_of_rows(rows, m, out, count):
        return True
    o = out[:m]
    with np.errstate(all="ignore"):          # refused, or kept as they are, by the caller
        o[...] = rows[0, :m]
        for r in range(1, rows.shape[0]):
            o += rows[r, :m]
        o /= count
    return False
