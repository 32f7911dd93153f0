"""Row-sparse steps on the cpu backend: the dense element update on some
rows, and the lazy closed forms (``lazy.py``) compiled.

``rows_step`` runs ``loops._update_span``, the dense step's own loop, on
each visited row, so a visited element gets the dense step's bits.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from ... import lazy as _lazy
from .intrinsics import _prefetch_lines
from .jit import OPTS as _OPTS
from .jit import kernel as _kernel
from .jit import twin as _twin
from .loops import _update_span

# Rows are scattered: each one's lines miss the cache.  The loop prefetches
# the rows this many visits ahead (``bench --sparse`` measures the step).
AHEAD_ROWS = 16

__all__ = ["all_coefficients", "apply_coefficients", "coefficients", "row_coefficients",
           "rows_step", "window_sum"]


_apply_row = njit(inline="always", **_OPTS)(_lazy.apply_row)


@_kernel
def rows_step(x, v, n, m, rows, sel, values, rowsize, c, f, scale, zero, live,
              catch, B, C, D, R, momentum, dense_counter):
    """Step rows ``rows`` (sorted) of the flat array ``x`` (state ``v``,
    ``n``, ``m``, flat; ``n``/``m`` empty when not kept): row ``rows[i]``
    takes gradient ``values[sel[i]]``, or zero where ``sel[i] < 0``.
    Consecutive rows without a gradient are stepped as one span against
    ``zero`` (a zeroed buffer of at least one row), up to its length at a
    time.  ``live[i]``: row ``rows[i]``'s momentum is nonzero somewhere
    afterwards.  With ``catch``, each row is first brought up to date with
    its lazy coefficients ``B[i]``, ``C[i]``, ``D[i]``, ``R[i]``
    (``lazy.apply_row``), while it is in cache."""
    item = x.itemsize
    i = 0
    while i < rows.size:
        if i + AHEAD_ROWS < rows.size:
            ahead = rows[i + AHEAD_ROWS] * rowsize
            _prefetch_lines(x.ctypes.data + ahead * item, rowsize * item)
            _prefetch_lines(v.ctypes.data + ahead * item, rowsize * item)
            if n.size:
                _prefetch_lines(n.ctypes.data + ahead * 4, rowsize * 4)
            if m.size:
                _prefetch_lines(m.ctypes.data + ahead * item, rowsize * item)
        j = i + 1
        if sel[i] < 0:                  # a run of consecutive rows without gradient
            most = zero.size // rowsize
            while (j < rows.size and j - i < most and sel[j] < 0
                   and rows[j] == rows[j - 1] + 1):
                j += 1
        a = rows[i] * rowsize
        b = (rows[j - 1] + 1) * rowsize
        if catch:
            for r in range(i, j):
                _apply_row(x, m, v, rows[r] * rowsize, rowsize, B[r], C[r], D[r], R[r],
                           momentum, dense_counter)
        g = values[sel[i]] if sel[i] >= 0 else zero[:b - a]
        n_span = n[a:b] if n.size else n
        m_span = m[a:b] if m.size else m
        _update_span(x[a:b], g, v[a:b], n_span, m_span, c, f, scale, np.int64(a))
        if m.size:
            for r in range(i, j):
                nonzero = False
                for e in range(rows[r] * rowsize, (rows[r] + 1) * rowsize):
                    if m[e] != 0:
                        nonzero = True
                        break
                live[r] = nonzero
        i = j


@_kernel
def apply_coefficients(x, m, v, rows, rowsize, B, C, D, R, momentum, dense_counter):
    """``lazy.apply_row`` for each of rows ``rows``."""
    for i in range(rows.size):
        _apply_row(x, m, v, rows[i] * rowsize, rowsize, B[i], C[i], D[i], R[i], momentum,
                   dense_counter)


row_coefficients = _kernel(_lazy.row_coefficients)
# ``lazy.coefficients`` calls ``row_coefficients``: its twin calls the compiled one.
coefficients = _kernel(_twin(_lazy.coefficients, "coefficients",
                             row_coefficients=njit(**_OPTS)(_lazy.row_coefficients)))
window_sum = _kernel(_lazy.window_sum)
all_coefficients = _kernel(_lazy.all_coefficients)
