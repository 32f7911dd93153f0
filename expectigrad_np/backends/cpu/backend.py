"""The cpu backend: every array of a bucket in one fused Numba kernel call.

``CpuBucket`` implements ``backends.base.Bucket`` on the kernels of
``kernels.py`` (which know nothing of it).  What makes a step cheap lives
here and in ``locate.py`` (gradients located in one compiled call),
``pointers.py`` and ``loading.py``; each piece fails safe: a mismatch of
its contract costs speed, never correctness.
"""
from __future__ import annotations

import contextlib
import threading

import numpy as np

from ..._validation import as_gradient
from .. import background as _background
from .. import layout as L
from ..base import Bucket
from ..numpy import NumpyBucket
from . import kernels as K
from . import locate as _locate
from .closed_forms import CompiledRows
from .loops import ALL_LOOPS, loops_for

__all__ = ["PARALLEL_MIN_SIZE", "CpuBucket"]

# Below this many elements (in one bucket) a step runs serially: a parallel
# launch costs a few microseconds of thread-pool wake-up, and work is split
# in chunks of ``layout.CHUNK`` elements, so a bucket needs two chunks before
# a second thread has anything to do.  ``bench --parallel`` times both
# kernels around the threshold; a module variable, read when optimizers are
# built and when they step, so it can be re-tuned for another machine.
PARALLEL_MIN_SIZE = 1 << 18

# One parallel kernel at a time: Numba's workqueue threading layer (used where
# neither TBB nor OpenMP is available) aborts the process when two threads
# launch parallel regions at once.  Serial kernels run concurrently (nogil).
_PARALLEL_LOCK = threading.Lock()

_NDARRAY = id(np.ndarray)

# Elements of zero gradient a row-sparse step hands the update loop at once
# for consecutive rows without a gradient (eager steps with momentum left).
ZERO_SPAN = 1 << 14


def _address(a):
    """The data address of ``a`` (0 when empty: never read), without a
    compiled call or ``ctypes``."""
    return a.__array_interface__["data"][0] if a.size else 0


class CpuBucket(CompiledRows, Bucket):
    """Steps all arrays of the bucket with one call of a fused kernel.

    Parameters that are not C-contiguous are stepped through a contiguous
    staging copy made once here (copied in before and out after each step);
    gradients that are not C-contiguous arrays of the bucket's dtype are
    copied into a per-array staging buffer allocated on first need.  The
    common case, contiguous arrays of the right dtype, copies nothing.
    """

    backend = "cpu"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.x_stage = [None if p.flags.c_contiguous else np.empty(p.size, self.dtype)
                        for p in self.params]
        self._derive_views()
        self.g_stage = [None] * len(self.params)
        self.g_addr = np.zeros(len(self.params), dtype=np.int64)
        self.g_addr_list = [0] * len(self.params)
        self.shape_table = _locate.shape_table(self.shapes)
        self.g_slow = np.zeros(len(self.params), dtype=np.bool_)
        self.g_flat = [None] * len(self.params)
        self.chunks = L.make_chunks(self.sizes)
        self.single = len(self.params) == 1 and self.total < PARALLEL_MIN_SIZE
        self.ctx = None
        self._update_ctx()

    def ensure_momentum(self):
        super().ensure_momentum()
        if hasattr(self, "ctx"):        # not while Bucket.__init__ runs
            self._update_ctx()

    def __setstate__(self, state):
        """After a copy or unpickling the buffers are new: derive the flat
        views and every recorded address from them again; the state
        buffers move back to their page offsets (``state_zeros``)."""
        self.__dict__.update(state)
        self.dtype = np.dtype(self.dtype.type)     # NumPy's own object, as new arrays carry
        for name in self.STATE_FIELDS:
            old = getattr(self, name)
            setattr(self, name, L.state_zeros(old.size, old.dtype, name))
            getattr(self, name)[...] = old
        self._derive_views()
        self.g_flat = [None] * len(self.params)
        self.g_addr[:] = 0
        self.g_addr_list = [0] * len(self.params)
        self.ctx = None
        self._update_ctx()

    def _update_ctx(self):
        """The context row of ``kernels.bucket_step`` (``BUCKET_FIELDS``),
        once ``bind`` has given it the caller's rows; else None.

        Rebuilt whenever a state buffer is replaced (``ensure_momentum``),
        after copies and on ``bind``, so it never points at freed memory: the
        bucket holds every array it names (the bound rows included).
        """
        bound = getattr(self, "_bound", None)
        if bound is None or self.staged or not self.params:
            self.ctx = None
            return
        steps, lr, hyper, scalars, check, bare, n_items, counter = bound
        if getattr(self, "ctx", None) is None:
            # Allocated once and then updated in place: its address is final.
            self.ctx = np.zeros(len(K.BUCKET_FIELDS), dtype=np.int64)
        addr = _address
        seg, lo, hi = self.chunks
        ndims, dims, dims_start = self.shape_table
        # Scratch of the kernel: scale and sumsq per array, flags and squared
        # norms per chunk (float64 rows; the flags use 1 byte of 8).
        self._scratch = np.zeros(2 * len(self.params) + 2 * seg.size, np.float64)
        self._param_ids = np.array([id(p) for p in self.params], np.int64)  # held: alive
        self._ctx_rows = (seg, lo, hi, ndims, dims, dims_start)     # kept alive
        row = {
            "x_addr": addr(self.x_addr), "g_addr": addr(self.g_addr),
            "offsets": addr(self.offsets), "chunk_seg": addr(seg), "chunk_lo": addr(lo),
            "chunk_hi": addr(hi), "n_chunks": seg.size, "mean_sq": addr(self.mean_sq),
            "count": addr(self.count), "momentum": addr(self.momentum),
            "total": self.total, "count_size": self.count.size,
            "momentum_size": self.momentum.size, "coef": addr(self.coef),
            "flags": addr(self.flags), "n_arrays": len(self.params),
            "steps": addr(steps), "lr": addr(lr), "hyper": addr(hyper),
            "scalars": addr(scalars), "check": int(check), "slots": addr(self.slots64),
            "n_items": n_items, "bare": int(bare), "ndarray_type": _NDARRAY,
            "descr": id(self.dtype), "ndims": addr(ndims), "dims": addr(dims),
            "dims_start": addr(dims_start), "list_type": id(list),
            "tuple_type": id(tuple), "none": id(None), "scratch": addr(self._scratch),
            "step_count": addr(counter), "param_objects": addr(self._param_ids),
            "x_lo": addr(self.x_lo), "x_hi": addr(self.x_hi),
            "itemsize": self.dtype.itemsize}
        self.ctx[:] = [row[name] for name in K.BUCKET_FIELDS]

    def bind(self, steps, lr, hyper, scalars, check, bare, n_items, counter):
        """Give ``bucket_step`` the caller's rows, in bucket order: step
        counts (int64, incremented in place), learning rates (float64, read
        each step) and the float64 ``(n, len(HYPER_FIELDS))`` table of
        beta, weight decay and step sign (``layout.signs``), the float64 scalar row
        (``BUCKET_SCALARS``), the check_finite flag, whether the gradient is
        passed bare (a one-array optimizer), and how many items the
        gradient sequence holds (``slots`` index into it), and the int64
        row of the optimizer's step count (incremented too).  Returns the
        context row (its address never changes), or None where the entry
        does not apply (staged, non-contiguous parameters)."""
        rows = (steps, lr, hyper, scalars, counter)
        if not all(r.flags.c_contiguous for r in rows) or steps.dtype != np.int64 or \
                lr.dtype != np.float64 or hyper.dtype != np.float64 or \
                hyper.shape != (lr.size, len(L.HYPER_FIELDS)) or \
                scalars.dtype != np.float64 or scalars.size != len(K.BUCKET_SCALARS):
            raise TypeError("bind needs an int64 step row, a float64 lr row, a float64 "
                            "(n, 3) hyper table and a float64 scalar row")
        self.slots64 = self.slots.astype(np.int64)
        self._bound = (steps, lr, hyper, scalars, bool(check), bool(bare), int(n_items),
                       counter)
        self._update_ctx()
        return self.ctx

    def step_path(self, steps, lr, hyper, scalars, check, bare, n_items, counter,
                  wait=True):
        """The compiled whole-step entry: ``(entry, ctx_address, lock,
        holds_gil)``, or None where it does not apply (see ``bind``), or
        where the kernels cannot read NumPy's array and sequence objects
        (``locate.layout_ok``).

        ``entry(id(grads), ctx_address, 0.0)`` (under ``lock``, when not
        None: parallel kernels run one at a time) steps with ``grads`` and
        returns ``kernels.BUCKET_STEPPED`` (the step counts in ``steps``
        are incremented), the index of a non-finite gradient (refused,
        nothing written) or another code when the general path must take
        ``grads`` (nothing written).  The caller keeps ``grads`` alive and
        unchanged for the call (a tuple, or a list while holding the GIL).
        With ``wait`` False, ``background.PENDING`` while a child compiles
        the entry: until it is ready, step with ``reference()``.
        """
        if not _locate.layout_ok():
            return None
        ctx = self.bind(steps, lr, hyper, scalars, check, bare, n_items, counter)
        if ctx is None:
            return None
        parallel = self.total >= PARALLEL_MIN_SIZE
        hold_gil = self.total <= K.SINGLE_STEP_GIL_MAX
        entry = K.bucket_step_entry(self.dtype, hold_gil=hold_gil, parallel=parallel,
                                    loops=self._loops(scalars[0]), wait=wait)
        if entry is None:
            return _background.PENDING
        return entry, _address(ctx), (_PARALLEL_LOCK if parallel else None), hold_gil

    def pair_path(self, other, steps, lr, hyper, scalars, check, n_items, counter,
                  wait=True):
        """``step_path`` for an optimizer whose parameters fill this bucket
        and ``other``, one float32 and one float64: both step in one call of
        ``kernels.pair_step`` (both checked before either writes).  The same
        results, or None, or ``background.PENDING``.

        The pair is compiled with every update loop for both dtypes, not
        with the loops of each bucket's mask as ``step_path`` is: per-mask
        pairs would be compiled per combination of two masks (about 5 s a
        combination), so a program whose param groups change would keep
        compiling.  With every loop there are at most four pair kernels
        (GIL held or not, serial or parallel); the loop is chosen per array
        at run time either way."""
        if not _locate.layout_ok():
            return None
        by_dtype = {b.dtype.str: b for b in (self, other)}
        first, second = by_dtype.get("<f4"), by_dtype.get("<f8")
        if first is None or second is None:
            return None
        contexts = [b.bind(steps, lr, hyper, scalars, check, False, n_items, counter)
                    for b in (first, second)]
        if contexts[0] is None or contexts[1] is None:
            return None
        total = first.total + second.total
        parallel = total >= PARALLEL_MIN_SIZE
        hold_gil = total <= K.SINGLE_STEP_GIL_MAX
        entry = K.pair_step_entry(hold_gil=hold_gil, parallel=parallel,
                                  loops_a=ALL_LOOPS, loops_b=ALL_LOOPS, wait=wait)
        if entry is None:
            return _background.PENDING
        # The row of the two context rows' addresses (each updated in place,
        # so the addresses hold), kept alive by this bucket.
        self.pair_row = np.array([_address(c) for c in contexts], np.int64)
        return (entry, _address(self.pair_row), (_PARALLEL_LOCK if parallel else None),
                hold_gil)

    def reference(self):
        """This bucket as a ``NumpyBucket`` on the same state arrays, for the
        steps taken while its kernel compiles (``background.py``); made anew
        for each step, so it sees the state buffers as they are."""
        twin = object.__new__(_ReferenceTwin)
        twin.__dict__.update(self.__dict__)
        return twin

    _loop_masks = None

    def set_coefficients(self, lr, beta, eps, t, clipvalue, clipnorm, active,
                         sparse, momentum, static_key=None, weight_decay=0.0,
                         maximize=False):
        rewrite = static_key is None or static_key is not self._static_key
        super().set_coefficients(lr, beta, eps, t, clipvalue, clipnorm, active,
                                 sparse, momentum, static_key, weight_decay, maximize)
        if rewrite:
            self._loop_masks = None

    def _loops(self, global_clipnorm):
        """The mask of the update loops this bucket's arrays may take
        (``loops.loops_for``), from the flag and coefficient rows as
        ``set_coefficients`` left them; kept until they are rewritten."""
        masks = self._loop_masks
        if masks is None:
            f, c = self.flags, self.coef
            sparse = (f[:, L.SPARSE] != 0).tolist()
            momentum = (f[:, L.MOMENTUM] != 0).tolist()
            clips = ((c[:, L.CLIPVALUE] < np.inf) | (c[:, L.CLIPNORM] < np.inf)).tolist()
            combos = set(zip(sparse, momentum, clips))
            masks = self._loop_masks = {}
            for global_clip in (False, True):
                mask = 0
                for s, m, clip in combos:
                    mask |= loops_for(s, m, clip or global_clip)
                masks[global_clip] = mask
        return masks[bool(global_clipnorm < np.inf)]

    def load_gradients(self, grads, ids=None):
        """Validate this bucket's gradients and record where to read them.

        A bucket of several arrays locates all of them in one compiled call
        (``kernels.locate``: C-contiguous ndarrays of the bucket's dtype and
        the parameters' shapes, about 10 ns each), from their object
        addresses ``ids`` (``id`` of each gradient; computed when not given);
        the others, and every gradient of a one-array bucket, go through
        ``_load_one``.
        """
        if not self.single and _locate.layout_ok():
            if ids is None:
                ids = np.fromiter(map(id, grads), np.int64, len(self.params))
            ndims, dims, dims_start = self.shape_table
            n_slow = _locate.locate_arrays(ids, _NDARRAY, id(self.dtype), ndims, dims,
                                           dims_start, self.g_addr, self.g_slow)
            if n_slow:
                for k in np.flatnonzero(self.g_slow).tolist():
                    self.g_addr[k] = self.g_addr_list[k] = self._load_one(k, grads[k])
        else:
            for k, g in enumerate(grads):
                self.g_addr_list[k] = self._load_one(k, g)
            self.g_addr[:] = self.g_addr_list
        self._unalias(grads, self.x_lo, self.x_hi)

    def _derive_views(self):
        """The flat parameter views the kernels write (a staging buffer for
        a non-contiguous parameter), their addresses and their byte ranges,
        sorted (they do not overlap: parameters share no memory)."""
        self.x_flat = [p.reshape(-1) if s is None else s
                       for p, s in zip(self.params, self.x_stage)]
        self.staged = [(p, s) for p, s in zip(self.params, self.x_stage) if s is not None]
        self.x_addr = np.array([_address(x) for x in self.x_flat], dtype=np.int64)
        nbytes = np.array([x.size for x in self.x_flat], np.int64) * self.dtype.itemsize
        order = np.argsort(self.x_addr, kind="stable")
        self.x_lo = np.ascontiguousarray(self.x_addr[order])
        self.x_hi = np.ascontiguousarray(self.x_addr[order] + nbytes[order])
        self.nbytes = nbytes

    def stage_overlapping(self, grads, lo, hi):
        if lo.size:
            self._unalias(grads, lo, hi)

    def _unalias(self, grads, x_lo, x_hi):
        """Stage every gradient whose memory overlaps a byte range ``[x_lo,
        x_hi)`` (sorted, disjoint; the bucket's own parameters, a view of
        the same buffer or another parameter): the step then reads the
        gradient as it was, not as the update rewrites it."""
        g_lo = self.g_addr
        g_hi = g_lo + self.nbytes
        j = np.searchsorted(x_lo, g_hi, side="left") - 1
        hit = (j >= 0) & (self.nbytes > 0) & (g_lo != 0)
        hit &= x_hi[np.maximum(j, 0)] > g_lo
        for k in np.flatnonzero(hit).tolist():
            stage = self.g_stage[k]
            if stage is not None and self.g_addr[k] == _address(stage):
                continue                            # already a private copy
            if stage is None:
                stage = self.g_stage[k] = np.empty(self.shapes[k], self.dtype)
            np.copyto(stage, np.asarray(grads[k], dtype=self.dtype).reshape(self.shapes[k]))
            self.g_flat[k] = stage.reshape(-1)
            self.g_addr[k] = self.g_addr_list[k] = K.data_address(self.g_flat[k])

    def _load_one(self, k, g):
        """Validate gradient ``k`` and return the address to read it from.

        The common case, a C-contiguous ndarray of the bucket's dtype and the
        parameter's shape, costs a few attribute checks and one
        ``data_address`` call; anything else goes through ``as_gradient`` and
        a staging copy.  Nothing is remembered from step to step: an array
        whose shape was changed in place is checked like any other.
        """
        if g is None:
            self.g_flat[k] = None
            return 0
        dtype = self.dtype
        if not (type(g) is np.ndarray and (g.dtype is dtype or g.dtype == dtype)
                and g.flags.c_contiguous):
            x = self.params[k]
            g = as_gradient(g, x, self.names[k])
            stage = self.g_stage[k]
            if stage is None:
                stage = self.g_stage[k] = np.empty(x.shape, self.dtype)
            np.copyto(stage, g, casting="unsafe")
            g = stage
        elif g.shape != self.shapes[k]:
            as_gradient(g, self.params[k], self.names[k])  # raises with the message
        if g.ndim != 1:
            g = g.reshape(-1)
        self.g_flat[k] = g
        return K.data_address(g)    # never read for an empty array

    def _stage_in(self):
        for p, s in self.staged:
            np.copyto(s.reshape(p.shape), p)

    def _stage_out(self):
        for p, s in self.staged:
            np.copyto(p, s.reshape(p.shape))

    def step(self, check, global_clipnorm, other_sumsq, update=True):
        """One fused step (or, with ``update=False``, only the first pass).

        Returns ``(bad, sumsq)`` from the kernel; ``bad >= 0`` means nothing
        was written.
        """
        if update:
            self._stage_in()
        loops = self._loops(global_clipnorm)
        bad, sumsq = self._run(K.variant(loops), check, global_clipnorm, other_sumsq, update)
        if bad == K.SEGMENTS_NO_LOOP and loops != ALL_LOOPS:
            # A loop this variant lacks (nothing was written): every loop.
            bad, sumsq = self._run(K.variant(ALL_LOOPS), check, global_clipnorm,
                                   other_sumsq, update)
        if update and bad < 0:
            self._stage_out()
        return int(bad), float(sumsq)

    def _run(self, kernels, check, global_clipnorm, other_sumsq, update):
        if self.single and update and other_sumsq == 0.0:
            if self.g_flat[0] is None:
                return -1, 0.0
            code, sumsq = kernels.array_step(
                self.x_flat[0], self.g_flat[0], self.mean_sq, self.count,
                self.momentum, self.coef[0], self.flags[0], check, global_clipnorm)
            bad = {K.STEPPED: -1, K.NONFINITE: 0}.get(code, K.SEGMENTS_NO_LOOP)
            return bad, sumsq
        parallel = self.total >= PARALLEL_MIN_SIZE
        kernel = kernels.segments_step_parallel if parallel else kernels.segments_step
        seg, lo, hi = self.chunks
        with _PARALLEL_LOCK if parallel else contextlib.nullcontext():
            return kernel(
                self.x_addr, self.g_addr, self.offsets, seg, lo, hi,
                self.mean_sq, self.count, self.momentum, self.coef, self.flags,
                check, global_clipnorm, other_sumsq, update)

    # --- row-sparse steps (``rows.py``) -------------------------------------------

    def update_rows(self, k, rows, sel, values, scale, catch=None):
        from . import rows as R
        nrows, rowsize = self.rows_shape(k)
        # Stored, if they were held: the caller ends the array's uniformity
        # (other rows keep their counts), also after a step of no rows.
        count = self.flat_segment("count", k)
        if rowsize == 0 or rows.size == 0:
            return np.zeros(rows.size, np.bool_) if self.flags[k, L.MOMENTUM] else None
        f = self.flags[k].copy()
        f[L.UNIFORM] = 0                    # counts of other rows differ
        live = np.zeros(rows.size, np.bool_)
        none = np.zeros(0)
        B, C, D, Rc = catch if catch is not None else (none,) * 4
        R.rows_step(self.params[k].reshape(-1), self.flat_segment("mean_sq", k),
                    count, self.flat_segment("momentum", k),
                    rows, sel, values, rowsize, self.coef[k], f, self.dtype.type(scale),
                    self._zero_rows(rowsize), live, catch is not None, B, C, D, Rc,
                    bool(f[L.MOMENTUM]), not f[L.SPARSE])
        return live if f[L.MOMENTUM] else None

    def _zero_rows(self, rowsize):
        """A zeroed buffer of whole rows, at least ``ZERO_SPAN`` elements:
        the gradient of runs of rows stepped without one (held, never
        written)."""
        size = max(rowsize, ZERO_SPAN // rowsize * rowsize if rowsize else 0)
        zero = getattr(self, "_zero", None)
        if zero is None or zero.size < size:
            zero = self._zero = np.zeros(size, self.dtype)
        return zero

    def catch_up_rows(self, k, rows, B, C, D, R):
        from . import rows as _rows
        nrows, rowsize = self.rows_shape(k)
        _rows.apply_coefficients(
            self.params[k].reshape(-1), self.flat_segment("momentum", k),
            self.flat_segment("mean_sq", k), rows, rowsize, B, C, D, R,
            bool(self.flags[k, L.MOMENTUM]), not self.flags[k, L.SPARSE])


class _ReferenceTwin(NumpyBucket):
    """The numpy backend's step on a ``CpuBucket``'s own state (shared
    arrays: ``CpuBucket.reference``).  After the step it records, for the
    kernels' uniform loop, whether each sparse-counter array's counts all
    still equal its step count (``layout.UNIFORM``)."""

    def step(self, check, global_clipnorm, other_sumsq, update=True):
        bad, sumsq = super().step(check, global_clipnorm, other_sumsq, update)
        if update and bad < 0:
            f = self.flags
            for k in np.flatnonzero(f[:, L.UNIFORM] & f[:, L.ACTIVE] & f[:, L.SPARSE]):
                f[k, L.UNIFORM] = int(np.all(self.flat_segment("count", k) == f[k, L.T]))
        return bad, sumsq
