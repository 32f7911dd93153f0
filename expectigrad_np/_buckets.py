"""Flat optimizer state for the parameters of one dtype, and the two host
drivers that step it: ``NumpyBucket`` (the reference, one array at a time)
and ``CpuBucket`` (one fused Numba kernel call for all arrays).

A bucket owns ``mean_sq``, ``count`` and ``momentum`` as flat buffers, one
contiguous segment per parameter, so a single kernel call can step any
number of arrays.  ``count`` is empty when no array of the bucket uses the
sparse counter, ``momentum`` is empty until some array has ``beta > 0``.
"""
from __future__ import annotations

import contextlib
import threading

import numpy as np

from ._validation import as_gradient
from .kernels import cpu as K
from .kernels import locate as _locate
from .reference import clip_gradient, expectigrad_update

__all__ = ["COEF_FIELDS", "CpuBucket", "NumpyBucket", "PARALLEL_MIN_SIZE"]

COEF_FIELDS = K.COEF_FIELDS
COUNT_DTYPE = np.uint32

# Below this many elements (in one bucket) a step runs serially: a parallel
# launch costs a few microseconds of thread-pool wake-up, and work is split
# in chunks of CHUNK = 2**17 elements, so a bucket needs two chunks before a
# second thread has anything to do.  Measured with ``python -m expectigrad_np
# bench --parallel`` (float32, medians of 5, the machine otherwise idle):
# parallel/serial time 1.16-1.26 from 2**15 to 2**17 elements (one chunk),
# 0.55-0.62 from 2**18 to 2**23.  Earlier runs on the same machine while
# other jobs shared its 2 cores gave 0.92-1.19 between 2**15 and 2**20: a
# parallel pass waits for a descheduled thread, and when the second core is
# busy a parallel step can take 2-3x the serial one.  So: parallel from two
# chunks, 2**18 elements (1 MB per float32 array).  To re-tune on another
# machine, time both kernels around the threshold with ``bench --parallel``
# and set this module variable (it is read when optimizers are built and when
# they step).
PARALLEL_MIN_SIZE = 1 << 18

# One parallel kernel at a time: Numba's workqueue threading layer (used where
# neither TBB nor OpenMP is available) aborts the process when two threads
# launch parallel regions at once.  Serial kernels run concurrently (nogil).
_PARALLEL_LOCK = threading.Lock()

_NDARRAY = id(np.ndarray)

# Where the state buffers start within a 4 KiB page.  Large NumPy arrays
# start at the same offset in their pages (16 bytes past the page, from the C
# allocator), parameters and gradients included; loads and stores of one
# element of arrays that agree in their low 12 address bits look alike to the
# core's store-forwarding check (4K aliasing), and 16-byte alignment splits
# every other 32-byte vector access across two cache lines.  The state buffers
# start on their own 64-byte-aligned offsets, 1 KiB apart and away from 16.
# Measured at 1e7 elements, two threads, against all buffers at offset 16:
# float32 0.95-0.96x, float64 0.96-0.97x the step time.
STATE_PAGE_OFFSETS = {"mean_sq": 1024, "count": 2048, "momentum": 3072}


def state_zeros(size, dtype, name):
    """``np.zeros(size, dtype)`` starting ``STATE_PAGE_OFFSETS[name]`` bytes
    into a 4 KiB page (a view into a slightly larger zeroed buffer)."""
    dtype = np.dtype(dtype)
    nbytes = size * dtype.itemsize
    raw = np.zeros(nbytes + 4096, np.uint8)
    start = (STATE_PAGE_OFFSETS[name] - raw.ctypes.data) % 4096
    return raw[start:start + nbytes].view(dtype)


class _Bucket:
    """State layout shared by the host drivers."""

    _static_key = None          # see set_coefficients

    def __init__(self, dtype, slots, params, names, sparse, momentum):
        self.dtype = np.dtype(dtype)
        self.slots = np.asarray(slots, dtype=np.intp)      # global param indices
        self.params = list(params)
        self.names = list(names)
        self.sizes = [p.size for p in self.params]
        self.offsets = np.zeros(len(self.params) + 1, dtype=np.int64)
        np.cumsum(self.sizes, out=self.offsets[1:])
        total = int(self.offsets[-1])
        self.total = total
        self.mean_sq = state_zeros(total, self.dtype, "mean_sq")
        self.stored = {"mean_sq", "count"} if any(sparse) else {"mean_sq"}
        self.count = state_zeros(total if any(sparse) else 0, COUNT_DTYPE, "count")
        self.momentum = np.zeros(0, self.dtype)
        if any(momentum):
            self.ensure_momentum()
        # Per-array coefficient and flag rows, refreshed before each step.
        self.coef = np.zeros((len(self.params), len(COEF_FIELDS)), self.dtype)
        self.flags = np.zeros((len(self.params), len(K.FLAG_FIELDS)), np.int64)
        self.flags[:, K.UNIFORM] = 1       # every count 0, every step count 0

    def ensure_momentum(self):
        if "momentum" not in self.stored:
            self.momentum = state_zeros(self.total, self.dtype, "momentum")
            self.stored.add("momentum")

    def segment(self, name, k):
        """Array ``k``'s piece of the flat state buffer ``name``, in the
        parameter's shape; None if the bucket does not store ``name``."""
        if name not in self.stored:
            return None
        flat = getattr(self, name)
        return flat[self.offsets[k]:self.offsets[k + 1]].reshape(self.params[k].shape)

    STATE_FIELDS = ("mean_sq", "count", "momentum")

    def read_state(self, k):
        """Array ``k``'s state as host copies in the parameter's shape
        (``count``/``momentum`` only where the bucket stores them)."""
        out = {}
        for name in self.STATE_FIELDS:
            seg = self.segment(name, k)
            if seg is not None:
                out[name] = np.array(seg)
        return out

    def write_state(self, k, arrays, t=None):
        """Overwrite array ``k``'s state from host arrays; a stored field
        missing from ``arrays`` is zeroed.  ``t``, the array's step count,
        tells whether its counts are uniform (``kernels.cpu.UNIFORM``);
        without it they are taken not to be."""
        if "momentum" in arrays:
            self.ensure_momentum()
        for name in self.STATE_FIELDS:
            seg = self.segment(name, k)
            if seg is not None:
                seg[...] = arrays.get(name, 0)
        count = self.segment("count", k)
        self.flags[k, K.UNIFORM] = int(t is not None and count is not None
                                       and bool(np.all(count == t)))

    def set_coefficients(self, lr, beta, eps, t, clipvalue, clipnorm, active,
                         sparse, momentum, static_key=None):
        """Fill the coefficient and flag rows from per-array values (bucket
        order): ``t`` is each array's step number counting this step.

        The columns that depend only on the hyperparameters (beta, eps,
        clipping, counter, momentum) are rewritten unless ``static_key`` is
        the key of the last call (the optimizer's key for its current
        hyperparameters, renewed whenever they change); with 200 arrays that
        saves a third of the Python time of a step."""
        beta = np.asarray(beta, dtype=np.float64)
        t = np.maximum(np.asarray(t, dtype=np.int64), 1)
        # 1 - beta**t > 0 for every valid beta in [0, 1): no division by zero.
        step_size = np.where(beta == 0.0, lr, lr / _one_minus_pow(beta, t))
        c, f = self.coef, self.flags
        c[:, K.STEP] = step_size
        c[:, K.INV_T] = 1.0 / t
        f[:, K.ACTIVE] = active
        f[:, K.T] = t
        if static_key is None or static_key is not self._static_key:
            c[:, K.BETA] = beta
            c[:, K.OMB] = 1.0 - beta
            c[:, K.EPS] = eps
            c[:, K.CLIPVALUE] = clipvalue
            c[:, K.CLIPNORM] = clipnorm
            f[:, K.SPARSE] = sparse
            f[:, K.MOMENTUM] = momentum
            self._static_key = static_key
        self.hyper = dict(lr=lr, beta=beta, eps=eps, t=t)


def _one_minus_pow(beta, t):
    """``1 - beta**t`` per array with the C library's ``pow``, as
    ``reference.step_size`` computes it in Python floats (and the kernels in
    float64): NumPy's vectorised power on an integer exponent array can
    round differently (e.g. ``0.99**3``).  A float when it is the same for
    every array."""
    t0 = t[0]
    if (t == t0).all() and (beta == beta[0]).all():
        return 1.0 - float(beta[0]) ** int(t0)            # the same for every array
    return np.array([1.0 - b ** k for b, k in zip(beta.tolist(), t.tolist())])


class NumpyBucket(_Bucket):
    """Steps each array with ``reference.expectigrad_update``."""

    backend = "numpy"

    def load_gradients(self, grads, ids=None):
        """Validate this bucket's gradients; keep them as arrays of our dtype."""
        self.grads = []
        for k, g in enumerate(grads):
            if g is not None:
                g = as_gradient(g, self.params[k], self.names[k])
                g = g.astype(self.dtype, copy=False)
            self.grads.append(g)

    def stats(self, check):
        """``(bad, sumsq)`` as the kernels return them (see ``kernels.cpu``)."""
        sumsq = []
        for k, g in enumerate(self.grads):
            if g is None or not self.flags[k, K.ACTIVE]:
                sumsq.append(0.0)
                continue
            if check and not np.all(np.isfinite(g)):
                return k, None
            with np.errstate(over="ignore"):     # an inf norm clips to zero, as on the CPU
                sumsq.append(float(np.sum(np.square(g, dtype=np.float64))))
        return -1, sumsq

    def scales(self, sumsq, global_clipnorm, other_sumsq):
        scale = [_clip_scale(sq, self.coef[k, K.CLIPNORM]) for k, sq in enumerate(sumsq)]
        total = sum(sq * s * s for sq, s in zip(sumsq, scale))
        g_scale = _clip_scale(total + other_sumsq, global_clipnorm)
        return [s * g_scale for s in scale], total

    def step(self, check, global_clipnorm, other_sumsq, update=True):
        bad, sumsq = self.stats(check)
        if bad >= 0:
            return bad, 0.0
        scale, total = self.scales(sumsq, global_clipnorm, other_sumsq)
        if not update:
            return -1, total
        h = self.hyper
        for k, g in enumerate(self.grads):
            c, f = self.coef[k], self.flags[k]
            if g is None or not f[K.ACTIVE]:
                continue
            expectigrad_update(
                self.params[k], clip_gradient(g, scale[k], c[K.CLIPVALUE]),
                self.segment("mean_sq", k),
                self.segment("count", k) if f[K.SPARSE] else None,
                self.segment("momentum", k) if f[K.MOMENTUM] else None,
                t=int(h["t"][k]), lr=float(h["lr"][k]), beta=float(h["beta"][k]),
                eps=float(h["eps"][k]), sparse_counter=bool(f[K.SPARSE]))
        return -1, total


def _address(a):
    """The data address of ``a`` (0 when empty: never read), without a
    compiled call or ``ctypes``."""
    return a.__array_interface__["data"][0] if a.size else 0


def _clip_scale(sumsq, clipnorm):
    norm = np.sqrt(sumsq)
    return float(clipnorm / norm) if norm > clipnorm else 1.0


_NOT_AN_ARRAY = object()        # what no gradient is


class CpuBucket(_Bucket):
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
        self.x_flat = [p.reshape(-1) if s is None else s
                       for p, s in zip(self.params, self.x_stage)]
        self.staged = [(p, s) for p, s in zip(self.params, self.x_stage) if s is not None]
        self.x_addr = np.array([_address(x) for x in self.x_flat], dtype=np.int64)
        self.g_stage = [None] * len(self.params)
        self.g_addr = np.zeros(len(self.params), dtype=np.int64)
        self.g_addr_list = [0] * len(self.params)
        self.g_last = [_NOT_AN_ARRAY] * len(self.params)
        self.shapes = [p.shape for p in self.params]
        self.shape_table = _locate.shape_table(self.shapes)
        self.g_slow = np.zeros(len(self.params), dtype=np.bool_)
        self.g_flat = [None] * len(self.params)
        self.chunks = K.make_chunks(self.sizes)
        self.single = len(self.params) == 1 and self.total < PARALLEL_MIN_SIZE
        self.ctx = None
        self._update_ctx()

    def ensure_momentum(self):
        super().ensure_momentum()
        if hasattr(self, "ctx"):        # not while _Bucket.__init__ runs
            self._update_ctx()

    def __setstate__(self, state):
        """After a copy or unpickling the buffers are new: derive the flat
        views and every recorded address from them again; the state
        buffers move back to their page offsets (``state_zeros``)."""
        self.__dict__.update(state)
        for name in self.STATE_FIELDS:
            old = getattr(self, name)
            setattr(self, name, state_zeros(old.size, old.dtype, name))
            getattr(self, name)[...] = old
        self.x_flat = [p.reshape(-1) if s is None else s
                       for p, s in zip(self.params, self.x_stage)]
        self.staged = [(p, s) for p, s in zip(self.params, self.x_stage) if s is not None]
        self.x_addr = np.array([_address(x) for x in self.x_flat], dtype=np.int64)
        self.g_flat = [None] * len(self.params)
        self.g_addr[:] = 0
        self.g_addr_list = [0] * len(self.params)
        self.g_last = [_NOT_AN_ARRAY] * len(self.params)
        self.ctx = None
        self._update_ctx()

    def _update_ctx(self):
        """Addresses for ``kernels.cpu.single_step`` (see ``CTX_FIELDS``).

        Set only for a bucket of one C-contiguous, nonempty array below
        ``PARALLEL_MIN_SIZE``; else None.  Rebuilt whenever a state buffer is
        replaced (``ensure_momentum``) or ``bind_single`` is called, so it
        never points at freed memory: the bucket holds every array it names.
        """
        if not (self.single and self.total and self.x_stage[0] is None):
            self.ctx = None
            return
        if getattr(self, "ctx", None) is None:
            # Allocated once and then updated in place: its address is final.
            self.ctx = np.zeros(len(K.CTX_FIELDS), dtype=np.int64)
        addr = _address
        steps, scalars, check = getattr(self, "_bound", (None, None, False))
        self.ctx_shape = np.array(self.shapes[0], dtype=np.int64).reshape(-1)
        self.ctx[:] = [
            addr(self.x_flat[0]), addr(self.mean_sq), addr(self.count),
            addr(self.momentum), addr(self.coef), addr(self.flags),
            self.total, self.count.size, self.momentum.size,
            0 if steps is None else addr(steps),
            0 if scalars is None else addr(scalars), int(check),
            _NDARRAY, id(self.dtype), len(self.shapes[0]),
            self.ctx_shape.__array_interface__["data"][0]]

    def bind_single(self, steps, scalars, check):
        """Give ``single_step`` its step count (int64 array, element 0, kept
        and incremented in place), its float64 scalar row
        (``SCALAR_FIELDS``: lr, beta, global_clipnorm) and the check_finite
        flag.  Returns the context row (its address never changes), or None
        where ``single_step`` does not apply (see ``_update_ctx``)."""
        if steps.dtype != np.int64 or scalars.dtype != np.float64 or \
                scalars.size != len(K.SCALAR_FIELDS) or not steps.flags.c_contiguous:
            raise TypeError("bind_single needs an int64 step count and a float64 "
                            "scalar row")
        self._bound = (steps, scalars, bool(check))
        self._update_ctx()
        return self.ctx

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
            return
        for k, g in enumerate(grads):
            self.g_addr_list[k] = self._load_one(k, g)
        self.g_addr[:] = self.g_addr_list

    def _load_one(self, k, g):
        """Validate gradient ``k`` and return the address to read it from.

        The common case, a C-contiguous ndarray of the bucket's dtype and the
        parameter's shape, costs a few attribute checks and one
        ``data_address`` call (about 0.4 µs), and nothing when it is the very
        array object given last step (a reused gradient buffer: same memory,
        dtype and shape); anything else goes through ``as_gradient`` and a
        staging copy.
        """
        last = self.g_last
        if g is last[k] and g.dtype is self.dtype:
            return self.g_addr_list[k]
        last[k] = _NOT_AN_ARRAY
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
        else:
            last[k] = g             # used in place: skip it next time
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
        if self.single and update and other_sumsq == 0.0:
            k = 0
            if self.g_flat[0] is None:
                return -1, 0.0
            ok, sumsq = K.array_step(
                self.x_flat[0], self.g_flat[0], self.mean_sq, self.count,
                self.momentum, self.coef[0], self.flags[0], check, global_clipnorm)
            bad = -1 if ok else k
        else:
            kernel = (K.segments_step if self.total < PARALLEL_MIN_SIZE
                      else K.segments_step_parallel)
            seg, lo, hi = self.chunks
            with (_PARALLEL_LOCK if kernel is K.segments_step_parallel
                  else contextlib.nullcontext()):
                bad, sumsq = kernel(
                    self.x_addr, self.g_addr, self.offsets, seg, lo, hi,
                    self.mean_sq, self.count, self.momentum, self.coef, self.flags,
                    check, global_clipnorm, other_sumsq, update)
        if update and bad < 0:
            self._stage_out()
        return int(bad), float(sumsq)
