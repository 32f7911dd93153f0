"""The flat-state layout every backend shares (no numba import).

A *bucket* holds the parameters of one dtype.  Its optimizer state lives in
flat buffers, one contiguous segment per parameter: ``mean_sq`` (dtype of
the bucket), ``count`` (uint32, sparse counter only) and ``momentum``.
Per-array hyperparameters travel to the kernels as two small tables:

coefficient rows (one per array, in the bucket's dtype)
    ``COEF_FIELDS = [step_size, beta, 1 - beta, eps, 1/t, clipvalue, clipnorm,
    decay]``, ``decay = 1 - lr * weight_decay``.  ``maximize`` (the
    gradient's sign flipped) is folded into signs: ``1 - beta`` is negated
    for arrays with momentum, ``step_size`` for arrays without
    (``signs``), so it costs the loops nothing and gives the bits of
    negating the gradient.
flag rows (int64)
    ``FLAG_FIELDS = [active, sparse, momentum, t, uniform, first, lazy,
    held]``: ``t`` is the array's step number counting this step (it seeds
    the stochastic rounding), ``uniform`` is set while every count of the
    array equals ``t - 1`` (the CPU kernels' uniform loop; they clear it),
    ``first`` is the index of the array's element 0 in the parameter it is
    part of (0, except for the shards of ``mpi``'s sharded state: the
    rounding hashes an element's index in its parameter, so a shard rounds
    as the whole parameter would).  ``lazy`` is set while the CPU kernels
    do not store the array's counts, which then all equal ``held``: a
    uniform array's counts are one number, so its steps neither read nor
    write the count array (28 bytes an element in float32 instead of 36,
    Adam's traffic).  ``Bucket.segment`` and ``flat_segment`` store them
    before anyone reads them (``store_counts``).

Work is split into chunks (``make_chunks``) that never cross an array, so
one parallel loop or one GPU launch covers 200 small arrays as well as one
large one.
"""
from __future__ import annotations

import numpy as np

__all__ = [
    "CHUNK", "COEF_FIELDS", "COUNT_DTYPE", "FLAG_FIELDS", "HYPER_FIELDS", "SATURATION",
    "STATE_FIELDS", "STATE_PAGE_OFFSETS", "clip_scale", "make_chunks", "one_minus_pow",
    "signs", "state_zeros",
]

COEF_FIELDS = ("step_size", "beta", "one_minus_beta", "eps", "inv_t",
               "clipvalue", "clipnorm", "decay")
STEP, BETA, OMB, EPS, INV_T, CLIPVALUE, CLIPNORM, DECAY = range(len(COEF_FIELDS))
# The float64 per-array table the compiled CPU route reads each step (with
# the lr row) to compute step_size and decay: beta, weight_decay and the
# sign of step_size (``signs``).
HYPER_FIELDS = ("beta", "weight_decay", "step_sign")
FLAG_FIELDS = ("active", "sparse", "momentum", "t", "uniform", "first", "lazy", "held")
ACTIVE, SPARSE, MOMENTUM, T, UNIFORM, FIRST, LAZY, HELD = range(len(FLAG_FIELDS))
UNIFORM_MAX_T = 0xFFFFFFFF           # counts saturate beyond: no longer uniform

STATE_FIELDS = ("mean_sq", "count", "momentum")

# The largest gradient magnitude whose square is finite in each dtype: the
# float just below 2**64 (float32) or 2**512 (float64).  Gradients beyond it
# are saturated to it before they enter the update, so ``g**2`` never
# overflows and ``|u| <= sqrt(n)`` holds for every finite gradient.
SATURATION = {np.dtype(np.float32): float(np.nextafter(np.float32(2.0 ** 64), np.float32(0))),
              np.dtype(np.float64): float(np.nextafter(2.0 ** 512, 0.0))}
COUNT_DTYPE = np.dtype(np.uint32)

# reference.weyl: (index * WEYL_INDEX + t * WEYL_STEP) mod 2**32
WEYL_INDEX = 0x85EBCA77
WEYL_STEP = 0x9E3779B9                # 2**32 / golden ratio

# Elements per work item of the chunked kernels: large enough that a chunk
# costs far more than its scheduling, small enough to balance threads (the
# bench's ``--parallel`` rows justify the figure).
CHUNK = 1 << 17

# Where the state buffers start within a 4 KiB page.  Large NumPy arrays
# start 16 bytes past a page boundary (parameters and gradients included);
# loads and stores of arrays that agree in their low 12 address bits look
# alike to the core's store-forwarding check (4K aliasing), and 16-byte
# alignment splits every other 32-byte vector access across two cache
# lines.  So the state buffers start on their own 64-byte-aligned offsets,
# 1 KiB apart and away from 16 (the README's performance table has the gain).
STATE_PAGE_OFFSETS = {"mean_sq": 1024, "count": 2048, "momentum": 3072}


def state_zeros(size, dtype, name):
    """``np.zeros(size, dtype)`` starting ``STATE_PAGE_OFFSETS[name]`` bytes
    into a 4 KiB page (a view into a slightly larger zeroed buffer)."""
    dtype = np.dtype(dtype)
    nbytes = size * dtype.itemsize
    raw = np.zeros(nbytes + 4096, np.uint8)
    start = (STATE_PAGE_OFFSETS[name] - raw.ctypes.data) % 4096
    return raw[start:start + nbytes].view(dtype)


def make_chunks(sizes, chunk=CHUNK):
    """Split arrays of the given sizes into work items.

    Returns ``(seg, lo, hi)``: chunk ``j`` covers elements ``lo[j]:hi[j]`` of
    array ``seg[j]``.  Empty arrays get no chunk.
    """
    seg, lo, hi = [], [], []
    for k, size in enumerate(sizes):
        for start in range(0, int(size), chunk):
            seg.append(k)
            lo.append(start)
            hi.append(min(start + chunk, int(size)))
    as64 = lambda a: np.asarray(a, dtype=np.int64)  # noqa: E731
    return as64(seg), as64(lo), as64(hi)


def one_minus_pow(beta, t):
    """``1 - beta**t`` per array with the C library's ``pow``, as
    ``reference.step_size`` computes it in Python floats (and the kernels in
    float64): NumPy's vectorised power on an integer exponent array can
    round differently (e.g. ``0.99**3``).  A float when it is the same for
    every array."""
    t0 = t[0]
    if (t == t0).all() and (beta == beta[0]).all():
        return 1.0 - float(beta[0]) ** int(t0)            # the same for every array
    return np.array([1.0 - b ** k for b, k in zip(beta.tolist(), t.tolist())])


def signs(maximize, momentum):
    """``(omb_sign, step_sign)`` per array: ``maximize`` flips the
    gradient's sign, which is ``u``'s sign; with momentum that is the sign
    of ``(1 - beta) * u`` in ``m``, without it the sign of the step.
    ``(-a) * b == a * (-b)`` exactly, so the bits are those of negating
    ``g``."""
    maximize = np.asarray(maximize, dtype=bool)
    momentum = np.asarray(momentum, dtype=bool)
    return (np.where(maximize & momentum, -1.0, 1.0),
            np.where(maximize & ~momentum, -1.0, 1.0))


def clip_scale(sumsq, clipnorm):
    """Norm-clipping factor ``min(1, clipnorm / sqrt(sumsq))``."""
    norm = np.sqrt(sumsq)
    return float(clipnorm / norm) if norm > clipnorm else 1.0
