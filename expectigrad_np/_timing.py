"""Timing shared by ``bench`` and ``bench --pieces``: interleaved blocks,
medians of per-block ratios, and the bench's gradients."""
from __future__ import annotations

import time

import numpy as np

__all__ = ["BLOCK_SECONDS", "time_interleaved"]

BLOCK_SECONDS = 0.02       # each timed block runs the function this long at least


def _calibrate(fn):
    """Calls per block so that a block lasts about BLOCK_SECONDS."""
    t0 = time.perf_counter()
    fn()
    dt = max(time.perf_counter() - t0, 1e-7)
    return max(1, min(100_000, int(BLOCK_SECONDS / dt)))


def _block(fn, k):
    t0 = time.perf_counter()
    for _ in range(k):
        fn()
    return (time.perf_counter() - t0) / k


def time_interleaved(fns, repeat, base=0, blocks=False):
    """Median seconds per call of each function, and the median per-block
    ratio of each to ``fns[base]``, timing the functions in turn block by
    block (with ``blocks``, also the per-block times, one row per block)."""
    for fn in fns:
        fn()                                               # warm up
    ks = [_calibrate(fn) for fn in fns]
    rows = []
    for _ in range(repeat):
        rows.append([_block(fn, k) for fn, k in zip(fns, ks)])
    rows = np.asarray(rows)
    times = np.median(rows, axis=0)
    ratios = np.median(rows / rows[:, base:base + 1], axis=0)
    return (times, ratios, rows) if blocks else (times, ratios)


def _gradient(n, dtype, seed=0):
    """The bench's gradient: standard normal, an exact zero in every seventh
    element."""
    g = np.random.default_rng(seed).standard_normal(n).astype(dtype)
    g[::7] = 0                        # some exact zeros exercise the sparse counter
    return g
