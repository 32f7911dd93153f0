"""Locating many gradient arrays at once.

A step over many arrays needs each gradient's data address, after checking
that it is a C-contiguous ndarray of the right dtype and shape.  Done in
Python that costs about half a microsecond per array (attribute lookups, a
flags object, a call per address): 100 µs a step for 200 new arrays.
``locate_arrays`` does it for all of them in one compiled call, from the
arrays' object addresses (``id``), by reading the fields of NumPy's array
object (``PyArrayObject_fields`` in NumPy's ``ndarraytypes.h``, part of its
C ABI):

    offset  0  ob_refcnt      8  ob_type      16  data
           24  nd (int)      32  dimensions   40  strides
           48  base          56  descr        64  flags (int)

Only an object whose ``ob_type`` is exactly ``numpy.ndarray`` is read
further; anything else (a subclass, a list, None, a different dtype object,
a non-contiguous or misaligned array, a wrong shape) is marked for the
general Python path, which validates, stages or raises as before.  So a
mismatch can only cost speed, never correctness.

The layout is checked once per process against what Python reports for a
set of sample arrays (``layout_ok``); if NumPy or the interpreter ever lays
its objects out differently, the check fails and every array takes the
Python path.
"""
from __future__ import annotations

import numpy as np
from numba import carray, njit

from .cpu import _pointer_of
from .loading import load_without_refresh

__all__ = ["layout_ok", "locate_arrays", "shape_table"]

_OB_TYPE, _DATA, _ND, _DIMENSIONS, _DESCR, _FLAGS = 8, 16, 24, 32, 56, 64
_C_CONTIGUOUS_ALIGNED = 0x0001 | 0x0100    # NPY_ARRAY_C_CONTIGUOUS | NPY_ARRAY_ALIGNED


@load_without_refresh
@njit(cache=True, error_model="numpy")
def locate_arrays(objects, ndarray_type, descr, ndims, dims, dims_start, addresses, slow):
    """For each object address ``objects[k]``: if it is an ndarray whose type
    object is ``ndarray_type``, whose dtype object is ``descr``, C-contiguous
    and aligned, with ``ndims[k]`` dimensions equal to
    ``dims[dims_start[k]:dims_start[k] + ndims[k]]``, store its data address
    in ``addresses[k]`` and clear ``slow[k]``; else set ``slow[k]`` (and
    leave ``addresses[k]`` alone).  Returns the number of slow objects.

    Called with the GIL held, on objects the caller keeps alive.
    """
    n_slow = 0
    for k in range(objects.size):
        p = objects[k]
        ok = carray(_pointer_of(p + _OB_TYPE, np.int64), 1)[0] == ndarray_type
        if ok:                                  # only then is it an array object
            ok = (carray(_pointer_of(p + _DESCR, np.int64), 1)[0] == descr
                  and carray(_pointer_of(p + _ND, np.int32), 1)[0] == ndims[k]
                  and (carray(_pointer_of(p + _FLAGS, np.int32), 1)[0]
                       & _C_CONTIGUOUS_ALIGNED) == _C_CONTIGUOUS_ALIGNED)
        if ok:
            shape = carray(_pointer_of(carray(_pointer_of(p + _DIMENSIONS, np.int64), 1)[0],
                                       np.int64), ndims[k])
            start = dims_start[k]
            for d in range(ndims[k]):
                if shape[d] != dims[start + d]:
                    ok = False
        if ok:
            addresses[k] = carray(_pointer_of(p + _DATA, np.int64), 1)[0]
            slow[k] = False
        else:
            slow[k] = True
            n_slow += 1
    return n_slow


def shape_table(shapes):
    """``(ndims, dims, dims_start)`` for ``locate_arrays`` from a list of shapes."""
    ndims = np.array([len(s) for s in shapes], dtype=np.int64)
    dims_start = np.zeros(len(shapes), dtype=np.int64)
    if len(shapes):
        dims_start[1:] = np.cumsum(ndims)[:-1]
    dims = np.array([d for s in shapes for d in s], dtype=np.int64)
    return ndims, dims, dims_start


_LAYOUT_OK = None


def layout_ok():
    """Whether ``locate_arrays`` reads this process's array objects right:
    compared once with Python's own view of sample arrays (accepted ones
    must give ``ctypes.data``; each kind it must refuse must be refused)."""
    global _LAYOUT_OK
    if _LAYOUT_OK is None:
        _LAYOUT_OK = _check_layout()
    return _LAYOUT_OK


def _check_layout():
    try:
        f32 = np.dtype(np.float32)
        base = np.arange(60, dtype=np.float32)
        accept = [base[:7], base.reshape(3, 4, 5), np.zeros((2, 1), np.float32),
                  np.empty(0, np.float32), base[10:20]]
        refuse = [base.reshape(3, 20).T, base[::2], base.astype(np.float64)[:7],
                  base[:8].view(np.int32), base[:4].reshape(2, 2).view(np.recarray), [1.0], None,
                  base.reshape(4, 15)]             # right dtype, wrong shape below
        objects = accept + refuse
        shapes = [a.shape for a in accept] + [(20, 3), (30,), (7,), (8,), (2, 2), (1,), (0,),
                                              (15, 4)]
        ndims, dims, dims_start = shape_table(shapes)
        ids = np.array([id(o) for o in objects], dtype=np.int64)
        addresses = np.zeros(len(objects), dtype=np.int64)
        slow = np.zeros(len(objects), dtype=np.bool_)
        n_slow = locate_arrays(ids, id(np.ndarray), id(f32), ndims, dims, dims_start,
                               addresses, slow)
        expected = [a.ctypes.data for a in accept]
        return (n_slow == len(refuse) and not slow[:len(accept)].any()
                and bool(slow[len(accept):].all())
                and addresses[:len(accept)].tolist() == expected)
    except Exception:       # any surprise: use the Python path
        return False
