"""Locating many gradient arrays at once.

A step over many arrays needs each gradient's data address, after checking
that it is a C-contiguous ndarray of the right dtype and shape.  Done in
Python that costs several attribute lookups, a flags object and a call per
array: most of a step's time for many small arrays.
``locate_arrays`` does it for all of them in one compiled call, from the
arrays' object addresses (``id``), by reading the fields of NumPy's array
object (``PyArrayObject_fields`` in NumPy's ``ndarraytypes.h``, part of its
C ABI):

    offset  0  ob_refcnt      8  ob_type      16  data
           24  nd (int)      32  dimensions   40  strides
           48  base          56  descr        64  flags (int)

and of its dtype object (``PyArray_Descr``, the same in NumPy 1 and 2):

    offset 16  typeobj       26  byteorder (char)

A dtype is the bucket's when it is the same object (NumPy's dtype of a new
float32 or float64 array is one shared object), or has the same scalar type
and byte order: arrays unpickled (from another process, say) carry a dtype
object of their own.

Only an object whose ``ob_type`` is exactly ``numpy.ndarray`` is read
further; anything else (a subclass, a list, None, another dtype,
a non-contiguous or misaligned array, a wrong shape) is marked for the
general Python path, which validates, stages or raises as before.  So a
mismatch can only cost speed, never correctness.

``located_address`` does the same for one object inside another kernel
(``kernels.bucket_step`` takes its gradients as an ``id``, so that a step
on a small array passes no array through numba's dispatch).

The layout is checked once per process against what Python reports for a
set of sample arrays (``layout_ok``, through ``ctypes``, without compiling or
loading anything); if NumPy or the interpreter ever lays its objects out
differently, the check fails and every array takes the Python path.
"""
from __future__ import annotations

import numpy as np
from numba import carray, njit

from .loading import load_without_refresh
from .pointers import pointer_of as _pointer_of

__all__ = ["is_unchanged", "layout_ok", "locate_arrays", "located_address", "sequence_item",
           "shape_table"]

_OB_TYPE, _DATA, _ND, _DIMENSIONS, _STRIDES, _DESCR, _FLAGS = 8, 16, 24, 32, 40, 56, 64
_C_CONTIGUOUS_ALIGNED = 0x0001 | 0x0100    # NPY_ARRAY_C_CONTIGUOUS | NPY_ARRAY_ALIGNED
_TYPEOBJ, _BYTEORDER = 16, 26              # of the dtype object


@njit(inline="always", cache=True, error_model="numpy")
def _same_dtype(d, descr):
    """Whether the dtype object at ``d`` is ``descr`` or equal to it: the
    same scalar type object and byte order (a dtype unpickled is a new
    object)."""
    return d == descr or (
        carray(_pointer_of(d + _TYPEOBJ, np.int64), 1)[0]
        == carray(_pointer_of(descr + _TYPEOBJ, np.int64), 1)[0]
        and carray(_pointer_of(d + _BYTEORDER, np.uint8), 1)[0]
        == carray(_pointer_of(descr + _BYTEORDER, np.uint8), 1)[0])


@njit(inline="always", cache=True, error_model="numpy")
def _laid_out(p, flags, descr, ndim, dims):
    """Whether the array object at ``p`` has every flag of ``flags``, dtype
    ``descr`` (``_same_dtype``) and ``ndim`` dimensions equal to
    ``dims[:ndim]``."""
    if not ((carray(_pointer_of(p + _FLAGS, np.int32), 1)[0] & flags) == flags
            and carray(_pointer_of(p + _ND, np.int32), 1)[0] == ndim
            and _same_dtype(carray(_pointer_of(p + _DESCR, np.int64), 1)[0], descr)):
        return False
    shape = carray(_pointer_of(carray(_pointer_of(p + _DIMENSIONS, np.int64), 1)[0],
                               np.int64), ndim)
    for d in range(ndim):
        if shape[d] != dims[d]:
            return False
    return True


@njit(inline="always", cache=True, error_model="numpy")
def located_address(p, ndarray_type, descr, ndim, dims):
    """The data address of the object at address ``p`` if it is an ndarray
    whose type object is ``ndarray_type`` (exactly: no subclass), whose dtype
    is ``descr`` (``_same_dtype``), C-contiguous and aligned, with ``ndim`` dimensions
    equal to ``dims[:ndim]``; else -1.  The caller keeps the object alive."""
    if carray(_pointer_of(p + _OB_TYPE, np.int64), 1)[0] != ndarray_type:
        return -1                           # only then is it an array object
    if not _laid_out(p, _C_CONTIGUOUS_ALIGNED, descr, ndim, dims):
        return -1
    return carray(_pointer_of(p + _DATA, np.int64), 1)[0]


_OB_SIZE, _LIST_ITEMS, _TUPLE_ITEMS = 16, 24, 24
_WRITEABLE = 0x0400                        # NPY_ARRAY_WRITEABLE


@njit(inline="always", cache=True, error_model="numpy")
def is_unchanged(p, descr, ndim, dims, data):
    """Whether the array object at ``p`` (a parameter of the kernels, an
    ndarray or a subclass, kept alive by the caller) is writeable, and still
    C-contiguous and aligned with ``ndim`` dimensions ``dims``, dtype
    ``descr`` and its data at ``data``, as when the kernels recorded it
    (``x.shape = ...``, ``x.dtype = ...`` or ``x.resize`` change it in
    place)."""
    return (carray(_pointer_of(p + _DATA, np.int64), 1)[0] == data
            and _laid_out(p, _WRITEABLE | _C_CONTIGUOUS_ALIGNED, descr, ndim, dims))


@njit(inline="always", cache=True, error_model="numpy")
def sequence_item(p, index, size, list_type, tuple_type):
    """The address of item ``index`` of the object at ``p`` if it is a
    ``list`` or ``tuple`` (exactly: type objects ``list_type``,
    ``tuple_type``) of ``size`` items; else 0.  ``p`` may be any object:
    only its type is read until that is found to be a list or tuple.  The
    caller keeps the object alive and unchanged (a tuple, or a list while
    holding the GIL)."""
    kind = carray(_pointer_of(p + _OB_TYPE, np.int64), 1)[0]
    if kind != tuple_type and kind != list_type:
        return 0                            # any other object: its size is not read
    if carray(_pointer_of(p + _OB_SIZE, np.int64), 1)[0] != size:
        return 0
    if kind == tuple_type:
        return carray(_pointer_of(p + _TUPLE_ITEMS, np.int64), size)[index]
    if kind == list_type:
        items = carray(_pointer_of(p + _LIST_ITEMS, np.int64), 1)[0]
        return carray(_pointer_of(items, np.int64), size)[index]
    return 0


@load_without_refresh
@njit(cache=True, error_model="numpy")
def locate_arrays(objects, ndarray_type, descr, ndims, dims, dims_start, addresses, slow):
    """For each object address ``objects[k]``: if it is an ndarray whose type
    object is ``ndarray_type``, whose dtype is ``descr``, C-contiguous
    and aligned, with ``ndims[k]`` dimensions equal to
    ``dims[dims_start[k]:dims_start[k] + ndims[k]]``, store its data address
    in ``addresses[k]`` and clear ``slow[k]``; else set ``slow[k]`` (and
    leave ``addresses[k]`` alone).  Returns the number of slow objects.

    Called with the GIL held, on objects the caller keeps alive.
    """
    n_slow = 0
    for k in range(objects.size):
        start = dims_start[k]
        address = located_address(objects[k], ndarray_type, descr, ndims[k],
                                  dims[start:start + ndims[k]])
        if address >= 0:
            addresses[k] = address
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
    """Whether the kernels read this process's array objects right: every
    field at its offset, read once through ``ctypes`` from sample arrays of
    every kind the kernels accept or refuse, equals Python's own view."""
    global _LAYOUT_OK
    if _LAYOUT_OK is None:
        _LAYOUT_OK = _check_layout()
    return _LAYOUT_OK


def _reads_like_python(a):
    """Whether every field the kernels read from ``a`` (at their offsets,
    through ``ctypes``) equals Python's own view of it.  Reads nothing
    outside the array object but the shape row, and that only after the
    fields before it have matched and its pointer has been found to sit
    right before the strides (NumPy allocates the two together)."""
    import ctypes
    p = id(a)
    i64 = lambda at: ctypes.c_int64.from_address(at).value  # noqa: E731
    if not (i64(p + _OB_TYPE) == id(type(a))
            and i64(p + _DATA) == a.__array_interface__["data"][0]
            and ctypes.c_int32.from_address(p + _ND).value == a.ndim
            and i64(p + _DESCR) == id(a.dtype)
            and ((ctypes.c_int32.from_address(p + _FLAGS).value & _C_CONTIGUOUS_ALIGNED)
                 == _C_CONTIGUOUS_ALIGNED) == (a.flags.c_contiguous and a.flags.aligned)):
        return False
    if a.ndim == 0:
        return True
    dims_at = i64(p + _DIMENSIONS)
    if dims_at == 0 or i64(p + _STRIDES) != dims_at + 8 * a.ndim:
        return False
    return (tuple(i64(dims_at + 8 * d) for d in range(a.ndim)) == a.shape
            and tuple(i64(dims_at + 8 * (a.ndim + d)) for d in range(a.ndim)) == a.strides)


def _check_layout():
    """The fields the kernels read, on sample arrays of every kind they
    accept or refuse, against Python's own view."""
    try:
        import ctypes
        if ctypes.sizeof(ctypes.c_void_p) != 8 or np.ndarray.__basicsize__ < _FLAGS + 4:
            return False
        base = np.arange(60, dtype=np.float32)
        samples = [base[:7], base.reshape(3, 4, 5), np.zeros((2, 1)), np.empty(0, np.float32),
                   base[10:20], base.reshape(3, 20).T, base[::2], base.astype(np.float64),
                   np.frombuffer(b"\0" + base.tobytes(), np.float32, 7, 1), np.zeros(()),
                   np.zeros(3, np.uint8), base.view(np.recarray)]
        frozen = np.zeros(3)
        frozen.flags.writeable = False
        flag = lambda a: bool(ctypes.c_int32.from_address(id(a) + _FLAGS).value  # noqa: E731
                              & _WRITEABLE)
        return (all(_reads_like_python(a) for a in samples) and _sequences_read_right()
                and _dtypes_read_right() and flag(base) and not flag(frozen))
    except Exception:       # any surprise: use the Python path
        return False


def _dtypes_read_right():
    """Dtype objects hold their scalar type and byte order where
    ``_same_dtype`` reads them (checked on samples through ``ctypes``)."""
    import ctypes
    import pickle
    for dtype in (np.dtype(np.float32), np.dtype(np.float64),
                  pickle.loads(pickle.dumps(np.dtype(np.float32))),
                  np.dtype(np.float32).newbyteorder(), np.dtype(np.uint32)):
        if (ctypes.c_int64.from_address(id(dtype) + _TYPEOBJ).value != id(dtype.type)
                or ctypes.c_char.from_address(id(dtype) + _BYTEORDER).value
                != dtype.byteorder.encode()):
            return False
    return True


def _sequences_read_right():
    """``list`` and ``tuple`` objects hold their size and items where
    ``sequence_item`` reads them (checked on samples through ``ctypes``)."""
    import ctypes
    i64 = lambda at: ctypes.c_int64.from_address(at).value  # noqa: E731
    items = [np.zeros(1), None, np.zeros(2)]
    for seq in (list(items), tuple(items), [], ()):
        p = id(seq)
        if i64(p + _OB_TYPE) != id(type(seq)) or i64(p + _OB_SIZE) != len(seq):
            return False
        if not seq:
            continue
        start = i64(p + _LIST_ITEMS) if type(seq) is list else p + _TUPLE_ITEMS
        if [i64(start + 8 * k) for k in range(len(seq))] != [id(o) for o in seq]:
            return False
    return True
