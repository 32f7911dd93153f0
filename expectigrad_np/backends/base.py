"""The interface every backend implements, and the flat state they share.

A backend steps a *bucket*: all parameter arrays of one dtype, with their
state in flat buffers (``layout.py``).  ``Expectigrad`` builds one bucket
per dtype and drives every backend through the same five calls, in this
order on each step::

    bucket.load_gradients(grads, ids)      validate, record where to read
    bucket.set_coefficients(...)           per-array coefficient/flag rows
    bucket.step(check, gclip, other, update=False)   (several buckets only)
    bucket.step(check, gclip, other)       -> (bad, sumsq)

and reads or writes the state with ``read_state``/``write_state``.  The
backends (``numpy.py``, ``cpu/``, ``cuda/``) are peers: same methods, same
signatures, same results (the numpy backend is the bit-exact reference of
the cpu one).  They know nothing of the optimizer class.
"""
from __future__ import annotations

import abc

import numpy as np

from .. import lazy as _lazy
from .._validation import byte_bounds as _byte_bounds
from . import layout as L

__all__ = ["Bucket"]


class Bucket(abc.ABC):
    """State of one dtype's parameters, and the backend interface.

    Parameters
    ----------
    dtype : float32 or float64
    slots : sequence of int
        The arrays' indices among all of the optimizer's parameters.
    params, names : sequences
        The parameter arrays (updated in place) and their names for messages.
    sparse, momentum : sequences of bool
        Per array: the sparse counter is used; a momentum buffer is needed.
    """

    backend: str = ""
    STATE_FIELDS = L.STATE_FIELDS
    _static_key = None          # see set_coefficients

    def __init__(self, dtype, slots, params, names, sparse, momentum):
        self.dtype = np.dtype(dtype)
        self.slots = np.asarray(slots, dtype=np.intp)      # global param indices
        self.params = list(params)
        self.names = list(names)
        self.shapes = [tuple(p.shape) for p in self.params]
        self.sizes = [int(p.size) for p in self.params]
        self.offsets = np.zeros(len(self.params) + 1, dtype=np.int64)
        np.cumsum(self.sizes, out=self.offsets[1:])
        self.total = int(self.offsets[-1])
        self.stored = {"mean_sq", "count"} if any(sparse) else {"mean_sq"}
        self.mean_sq = self._zeros(self.total, self.dtype, "mean_sq")
        self.count = self._zeros(self.total if any(sparse) else 0, L.COUNT_DTYPE, "count")
        self.momentum = self._zeros(0, self.dtype, "momentum")
        # Per-array coefficient and flag rows, refreshed before each step.
        self.coef = np.zeros((len(self.params), len(L.COEF_FIELDS)), self.dtype)
        self.flags = np.zeros((len(self.params), len(L.FLAG_FIELDS)), np.int64)
        self.flags[:, L.UNIFORM] = 1       # every count 0, every step count 0
        if any(momentum):
            self.ensure_momentum()

    # --- state -------------------------------------------------------------------

    def _zeros(self, size, dtype, name):
        """A zeroed flat state buffer (host memory; the cuda backend's are on
        the device)."""
        return L.state_zeros(size, dtype, name)

    def ensure_momentum(self):
        """Allocate the momentum buffer (zero) if the bucket has none."""
        if "momentum" not in self.stored:
            self.momentum = self._zeros(self.total, self.dtype, "momentum")
            self.stored.add("momentum")

    @property
    def has_momentum(self):
        return "momentum" in self.stored

    def store_counts(self, k):
        """Write array ``k``'s counts into the count buffer if the kernels
        hold them as one number (``layout.LAZY``: while uniform they are
        not stored).  ``segment`` and ``flat_segment`` call it: every
        reader of the counts outside the kernels goes through them."""
        f = self.flags[k]
        if f[L.LAZY]:
            self.count[self.offsets[k]:self.offsets[k + 1]] = f[L.HELD]
            f[L.LAZY] = 0

    def segment(self, name, k):
        """Array ``k``'s piece of the flat state buffer ``name``, in the
        parameter's shape; None if the bucket does not store ``name``."""
        if name not in self.stored:
            return None
        if name == "count":
            self.store_counts(k)
        flat = getattr(self, name)
        return flat[self.offsets[k]:self.offsets[k + 1]].reshape(self.shapes[k])

    def read_state(self, k):
        """Array ``k``'s state as host copies in the parameter's shape
        (``count``/``momentum`` only where the bucket stores them)."""
        return {name: np.array(self.segment(name, k)) for name in self.STATE_FIELDS
                if name in self.stored}

    def write_state(self, k, arrays, t=None):
        """Overwrite array ``k``'s state from host arrays; a stored field
        missing from ``arrays`` is zeroed.  ``t``, the array's step count,
        tells whether its counts are uniform (``layout.UNIFORM``); without it
        they are taken not to be."""
        if "momentum" in arrays:
            self.ensure_momentum()
        for name in self.STATE_FIELDS:
            seg = self.segment(name, k)
            if seg is not None:
                seg[...] = arrays.get(name, 0)
        count = self.segment("count", k)
        self.flags[k, L.UNIFORM] = int(t is not None and count is not None
                                       and bool(np.all(count == t)))

    # --- stepping ----------------------------------------------------------------

    def set_coefficients(self, lr, beta, eps, t, clipvalue, clipnorm, active,
                         sparse, momentum, static_key=None, weight_decay=0.0,
                         maximize=False):
        """Fill the coefficient and flag rows from per-array values (bucket
        order): ``t`` is each array's step number counting this step.

        The columns that depend only on the hyperparameters (beta, eps,
        clipping, counter, momentum) are rewritten unless ``static_key`` is
        the key of the last call (the optimizer's key for its current
        hyperparameters, renewed whenever they change)."""
        beta = np.asarray(beta, dtype=np.float64)
        t = np.maximum(np.asarray(t, dtype=np.int64), 1)
        # 1 - beta**t > 0 for every valid beta in [0, 1): no division by zero.
        omb_sign, step_sign = L.signs(maximize, momentum)
        step_size = np.where(beta == 0.0, lr, lr / L.one_minus_pow(beta, t))
        c, f = self.coef, self.flags
        c[:, L.STEP] = step_size * step_sign
        c[:, L.INV_T] = 1.0 / t
        c[:, L.DECAY] = 1.0 - np.asarray(lr, dtype=np.float64) * weight_decay
        f[:, L.ACTIVE] = active
        f[:, L.T] = t
        if static_key is None or static_key is not self._static_key:
            c[:, L.BETA] = beta
            c[:, L.OMB] = (1.0 - beta) * omb_sign
            c[:, L.EPS] = eps
            with np.errstate(over="ignore"):    # a threshold beyond the dtype: inf, off
                c[:, L.CLIPVALUE] = clipvalue
                c[:, L.CLIPNORM] = clipnorm
            f[:, L.SPARSE] = sparse
            f[:, L.MOMENTUM] = momentum
            self._static_key = static_key
        self.hyper = dict(lr=lr, beta=beta, eps=eps, t=t,
                          weight_decay=np.broadcast_to(weight_decay, t.shape),
                          maximize=np.broadcast_to(maximize, t.shape))

    @abc.abstractmethod
    def load_gradients(self, grads, ids=None):
        """Validate this bucket's gradients (one per array, ``None`` to skip)
        and record where to read them; ``ids`` are their ``id()``s where the
        caller has them.  Raises ``TypeError``/``ValueError`` saying what is
        wrong; changes no state."""

    def host_ranges(self):
        """``(lo, hi)``: sorted, disjoint byte ranges covering the host
        memory of the bucket's parameters (int64 arrays; empty for device
        buckets).  Another bucket stages gradients that fall in them
        (``stage_overlapping``), so that no step reads memory another
        bucket's step has already written."""
        spans = sorted(_byte_bounds(p) for p in self.params
                       if isinstance(p, np.ndarray) and p.size)
        lo, hi = [], []
        for a, b in spans:
            if lo and a < hi[-1]:
                hi[-1] = max(hi[-1], b)              # merge overlapping extents
            else:
                lo.append(a)
                hi.append(b)
        return np.array(lo, np.int64), np.array(hi, np.int64)

    def stage_overlapping(self, grads, lo, hi):
        """Copy every loaded gradient whose memory meets one of the byte
        ranges ``[lo, hi)`` (sorted, disjoint), and read the copy instead.
        Backends that copy every gradient, or read device memory, have
        nothing to do."""
        return None

    @abc.abstractmethod
    def step(self, check, global_clipnorm, other_sumsq, update=True):
        """One fused step of every active array (or, with ``update=False``,
        only the first pass: non-finite check and squared norms).

        ``check``: refuse NaN/inf gradients; ``global_clipnorm``: joint norm
        threshold (inf: off); ``other_sumsq``: squared norms of the other
        buckets, for the joint norm.  Returns ``(bad, sumsq)``: the bucket
        index of the first non-finite gradient or -1 (``bad >= 0`` means
        nothing was written), and the bucket's squared norm after per-array
        clipping where a norm is needed."""

    # --- row-sparse steps (``sparse.py``, ``lazy.py``) ---------------------------

    def rows_shape(self, k):
        """``(rows, row size)`` of array ``k``: its shape seen as 2-D."""
        shape = self.shapes[k]
        nrows = shape[0]
        return nrows, (self.sizes[k] // nrows if nrows else int(np.prod(shape[1:])))

    def update_rows(self, k, rows, sel, values, scale, catch=None):
        """The step of array ``k`` on rows ``rows`` (sorted, unique) alone:
        row ``rows[i]`` takes gradient row ``values[sel[i]]`` (``sel[i] <
        0``: a zero gradient), value-clipped and then times ``scale``, with
        the coefficient and flag rows ``set_coefficients`` wrote.  Each
        visited element gets exactly what the dense step gives it.
        ``catch``: ``(B, C, D, R)`` per row, the lazy coefficients that bring
        each row up to date first (``catch_up_rows``).

        Returns, per visited row, whether its momentum is now nonzero
        somewhere (None when the bucket keeps no momentum)."""
        raise NotImplementedError

    coefficients = staticmethod(_lazy.coefficients)
    row_coefficients = staticmethod(_lazy.row_coefficients)
    window_sum = staticmethod(_lazy.window_sum)
    all_coefficients = staticmethod(_lazy.all_coefficients)

    def catch_up_rows(self, k, rows, B, C, D, R):
        """Bring rows ``rows`` of array ``k`` up to date with the lazy
        coefficients (``lazy.apply_coefficients``)."""
        nrows, rowsize = self.rows_shape(k)
        _lazy.numpy_apply(self.params[k].reshape(-1), self.flat_segment("momentum", k),
                          self.flat_segment("mean_sq", k), rows, rowsize, B, C, D, R,
                          bool(self.flags[k, L.MOMENTUM]), not self.flags[k, L.SPARSE])

    def flat_segment(self, name, k):
        """Array ``k``'s piece of the flat buffer ``name`` (1-D; an empty
        array when the bucket does not store ``name``)."""
        if name not in self.stored:
            return np.zeros(0, L.COUNT_DTYPE if name == "count" else self.dtype)
        if name == "count":
            self.store_counts(k)
        return getattr(self, name)[self.offsets[k]:self.offsets[k + 1]]
