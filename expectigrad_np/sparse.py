"""Row-sparse gradients: ``RowSparse`` and the conversions ``step()`` applies.

A row-sparse gradient of a parameter ``x`` (``x.ndim >= 1``) names some rows
of ``x`` (indices along axis 0) and gives their values; every other row is
zero.  It stands for the dense gradient ``densify(g, x)``::

    dense = zeros_like(x);  dense[unique rows] = their summed values

(duplicate indices summed, ``_sum_duplicates``).  ``step()`` gives exactly
the result of stepping that dense gradient (see ``optimizer.Expectigrad``
for what it visits and ``lazy.py`` for ``lazy=True``), reading and writing
only the rows that can change.

Also accepted for 2-D parameters: ``scipy.sparse`` arrays and matrices
(CSR, CSC, COO and the other formats), read as their nonzero rows.
"""
from __future__ import annotations

import numpy as np

__all__ = ["RowSparse", "as_rows", "densify", "is_row_sparse"]


class RowSparse:
    """A row-sparse gradient: rows ``indices`` of the parameter hold
    ``values``; every other row is zero.

    Parameters
    ----------
    indices : 1-D array of integers
        Row indices in ``[0, x.shape[0])``; duplicates are summed.
    values : array of shape ``(len(indices),) + x.shape[1:]``
        The rows' gradients (real; cast to the parameter's dtype).

    The arrays are read at ``step()`` and never written; ``step()`` checks
    them against the parameter and raises ``TypeError``/``ValueError``
    saying what is wrong, with nothing changed.

    Example
    -------
    >>> E = np.zeros((1000, 16), np.float32)
    >>> opt = Expectigrad([E], lr=1e-2, beta=0.0)
    >>> opt.step([RowSparse([3, 7, 3], np.ones((3, 16), np.float32))])
    """

    __slots__ = ("indices", "values")

    def __init__(self, indices, values):
        self.indices = indices
        self.values = values

    def todense(self, param):
        """The dense gradient this stands for, shaped like ``param``.

        Parameters
        ----------
        param : ndarray of float32 or float64
            The parameter the gradient is for (with at least one dimension);
            the result has its shape and dtype, duplicates summed.

        Raises
        ------
        TypeError, ValueError
            The indices or values do not fit ``param``.
        """
        rows, vals = as_rows(self, param, "the gradient")
        return _scatter(rows, vals, param)

    def __repr__(self):
        n = np.shape(self.indices)
        return f"RowSparse(indices: {n[0] if n else '?'} rows, values: {np.shape(self.values)})"


def is_row_sparse(g):
    """``g`` is a row-sparse gradient: a ``RowSparse`` or a ``scipy.sparse``
    array or matrix (checked without importing scipy).

    Parameters
    ----------
    g : object
        A gradient as ``step()`` takes it (an array, ``None``, ...).

    Returns
    -------
    bool
    """
    if g is None or type(g) is np.ndarray:     # the common case, at once
        return False
    if isinstance(g, RowSparse):
        return True
    module = type(g).__module__
    return module.startswith("scipy.sparse") and hasattr(g, "tocsr")


def _host(a, what):
    """``a`` as a host array; a device array (``__cuda_array_interface__``:
    numba, CuPy, PyTorch CUDA) is copied to the host (the row-sparse step
    reads indices and values there: sums duplicates, takes norms).  Masked
    arrays and matrices are refused (``TypeError``), as dense gradients are;
    anything else that cannot be read is a ``TypeError`` naming ``what``."""
    if isinstance(a, np.ndarray):
        from ._validation import _refuse_subclass
        _refuse_subclass(a, what)
        return np.asarray(a)
    try:
        if hasattr(a, "__cuda_array_interface__"):
            from numba import cuda
            return cuda.as_cuda_array(a).copy_to_host()
        return np.asarray(a)
    except Exception as exc:  # noqa: BLE001 - reported with context
        raise TypeError(f"{what} could not be read as an array: {exc}") from None


def _indices(raw, nrows, where):
    idx = _host(raw, f"{where}: its array of indices")
    if idx.size == 0 and idx.dtype.kind == "f":
        idx = idx.astype(np.int64)              # [] reads as float64: no index at all
    if idx.dtype.kind not in "iu" or idx.dtype == np.bool_:
        raise TypeError(f"{where}: indices must be integers, got dtype {idx.dtype}")
    if idx.ndim != 1:
        raise ValueError(f"{where}: indices must be 1-D, got shape {idx.shape}")
    if idx.size:
        lo, hi = idx.min(), idx.max()
        if lo < 0:
            raise ValueError(f"{where}: index {int(lo)} is negative; row indices must be "
                             f"in [0, {nrows})")
        if hi >= nrows:
            raise ValueError(f"{where}: index {int(hi)} is out of range for a parameter "
                             f"with {nrows} rows (indices must be in [0, {nrows}))")
    return idx.astype(np.int64, copy=False)


def _values(raw, n, x, where):
    from ._validation import _REAL_KINDS
    vals = _host(raw, f"{where}: its array of values")
    if vals.dtype.kind not in _REAL_KINDS:
        raise TypeError(f"{where}: values have dtype {vals.dtype}; gradients must be "
                        "real numbers (float or integer)")
    want = (n,) + tuple(x.shape[1:])
    if vals.shape != want:
        raise ValueError(f"{where}: values have shape {vals.shape}, expected {want} "
                         "(one row of the parameter per index)")
    return vals


def _sum_duplicates(idx, vals, dtype, rowsize):
    """Sorted unique rows and their summed values (a new C-contiguous
    ``(len(rows), rowsize)`` array of ``dtype``).  Duplicates are summed by
    ``np.add.reduceat`` after a stable sort (``todense`` sums them the same
    way, so a step equals the dense step of ``todense``; ``np.add.at`` may
    round a sum of three or more differently)."""
    vals = vals.reshape(len(idx), rowsize)
    order = np.argsort(idx, kind="stable")
    rows = idx[order]
    out = vals[order].astype(dtype, copy=False)       # a new array either way
    if rows.size > 1:
        starts = np.flatnonzero(rows[1:] != rows[:-1]) + 1
        if starts.size < rows.size - 1:                # duplicates
            starts = np.concatenate([[0], starts])
            with np.errstate(over="ignore"):        # inf: refused by the finite check
                out = np.add.reduceat(out, starts, axis=0)
            rows = rows[starts]
    return rows, np.ascontiguousarray(out)


def as_rows(g, x, where):
    """``(rows, values)``: the sorted, unique rows of row-sparse ``g`` and
    their summed values, as a C-contiguous ``(len(rows), row size)`` array
    of ``x``'s dtype (a new array: never a view of the caller's memory).

    Parameters
    ----------
    g : RowSparse or scipy.sparse array or matrix
        The gradient; a ``scipy.sparse`` one needs a 2-D ``x`` of its shape.
    x : ndarray
        The parameter (at least one dimension).
    where : str
        How error messages name the parameter.

    Returns
    -------
    rows : ndarray of int64
        The sorted, unique row indices.
    values : ndarray
        Shape ``(len(rows), row size)``, ``x``'s dtype.

    Raises
    ------
    TypeError, ValueError
        Indices that are negative, out of range, not integers or not 1-D,
        values of the wrong shape or kind, or a 0-d ``x``; the message
        names ``where``.
    """
    where = f"the row-sparse gradient of {where}"
    if x.ndim == 0:
        raise ValueError(f"{where}: a 0-d parameter has no rows; pass a dense gradient")
    nrows = int(x.shape[0])
    rowsize = int(np.prod(x.shape[1:], dtype=np.int64))
    if isinstance(g, RowSparse):
        idx = _indices(g.indices, nrows, where)
        vals = _values(g.values, idx.size, x, where)
        return _sum_duplicates(idx, vals, x.dtype, rowsize)
    # scipy.sparse
    if x.ndim != 2:
        raise ValueError(f"{where}: a scipy.sparse gradient needs a 2-D parameter, "
                         f"this one has shape {x.shape}; use RowSparse")
    if tuple(g.shape) != tuple(x.shape):
        raise ValueError(f"{where}: has shape {tuple(g.shape)}, but the parameter has "
                         f"shape {x.shape}")
    if g.dtype.kind not in "fiu" or g.dtype == np.bool_:
        raise TypeError(f"{where}: has dtype {g.dtype}; gradients must be real numbers")
    if getattr(g, "format", None) == "csr":
        csr = g.copy()                  # checked as it is: one copy, not two
        _check_sparse_indices(csr, where, own=True)
    else:
        _check_sparse_indices(g, where)
        csr = g.tocsr(copy=True)
    csr.sum_duplicates()
    counts = np.diff(csr.indptr)
    rows = np.flatnonzero(counts).astype(np.int64)
    out = np.zeros((rows.size, rowsize), dtype=x.dtype)
    if rows.size:
        # Every stored entry lies in a row with a count: entry j is in row
        # number sub_rows[j] of ``rows``.
        sub_rows = np.repeat(np.arange(rows.size), counts[rows])
        out[sub_rows, csr.indices] = csr.data.astype(x.dtype)
    return rows, out


def _check_sparse_indices(g, where, own=False):
    """Raise ``ValueError`` unless every stored index of the scipy.sparse
    ``g`` lies in its shape (scipy's conversions read them unchecked: an
    index out of range writes outside their buffers).  ``own``: ``g`` is a
    copy of the caller's, which the check may change."""
    fmt = getattr(g, "format", None)
    try:
        if fmt in ("csr", "csc", "bsr"):
            # The check may cast the index arrays in place: on a copy.
            (g if own else g.copy()).check_format(full_check=True)
        elif fmt == "coo":
            nrows, ncols = g.shape
            for name, idx, n in (("row", g.row, nrows), ("column", g.col, ncols)):
                idx = np.asarray(idx)
                if idx.shape != np.shape(g.data):
                    raise ValueError(f"{name} indices and data differ in length")
                if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= n):
                    raise ValueError(f"{name} indices must lie in [0, {n}), got "
                                     f"[{int(idx.min())}, {int(idx.max())}]")
    except ValueError as exc:
        raise ValueError(f"{where}: a malformed {fmt} matrix: {exc}") from None


def _scatter(rows, vals, x):
    dense = np.zeros(x.shape, dtype=x.dtype)
    if rows.size:
        dense.reshape(x.shape[0], -1)[rows] = vals
    return dense


def densify(g, x, where="the parameter"):
    """The dense gradient a row-sparse ``g`` stands for, shaped like ``x``.

    Parameters
    ----------
    g : RowSparse or scipy.sparse array or matrix
        The gradient.
    x : ndarray
        The parameter; the result has its shape and dtype.
    where : str, default "the parameter"
        How error messages name the parameter.

    Raises
    ------
    TypeError, ValueError
        As ``as_rows``.
    """
    rows, vals = as_rows(g, x, where)
    return _scatter(rows, vals, x)
