"""The mean over ranks of ``mpi``'s sharded step, in one pass.

``rank_mean(rows, m, out)`` sums ``rows[0, :m] + rows[1, :m] + ...`` in rank
order in the dtype and divides by the number of ranks: the bits of NumPy's
``acc = rows[0]; acc += rows[1]; ...; acc /= P`` (each element the same
operations in the same order), and whether some result is not finite, in
one pass instead of ``P + 1`` plus an ``isfinite`` pass with its temporary.
"""
from __future__ import annotations

from .jit import kernel

__all__ = ["rank_mean"]

# Elements a block: the block of ``out`` stays in L1 while each rank's row
# is added (a vectorised loop per rank), then is divided and checked.
_BLOCK = 1024


@kernel
def rank_mean(rows, m, out):
    """``out[:m] = (rows[0, :m] + ... + rows[P-1, :m]) / P`` in the dtype of
    ``out``, summed in rank order; returns True when some ``out[i]`` is NaN
    or infinite."""
    ranks = rows.shape[0]
    p = out.dtype.type(ranks)
    bad = False
    for lo in range(0, m, _BLOCK):
        hi = min(lo + _BLOCK, m)
        for i in range(lo, hi):
            out[i] = rows[0, i]
        for r in range(1, ranks):
            for i in range(lo, hi):
                out[i] += rows[r, i]
        for i in range(lo, hi):
            v = out[i] / p
            out[i] = v
            bad |= (v - v) != 0          # NaN exactly where v is NaN or infinite
    return bad
