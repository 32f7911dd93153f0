"""The reference backend: each array stepped by ``reference.py`` in NumPy.

It imports no numba, and gives the cpu backend's bits (the kernels follow
``reference.py`` operation for operation).
"""
from __future__ import annotations

import numpy as np

from .._validation import as_gradient
from ..reference import clip_gradient, clip_value, expectigrad_update
from . import layout as L
from .base import Bucket

__all__ = ["NumpyBucket"]


# Norms on the overflow path are kept in units of 2**512 (``NORM_UNIT``, as
# the cpu backend's), so that a norm beyond the float64 range stays finite.
NORM_UNIT = 2.0 ** -512


def _scaled_norm(a, other_sumsq=0.0):
    """``sqrt(sum(a**2) + other_sumsq)`` in float64, computed scaled by the
    largest element so that no square overflows."""
    a = np.abs(np.asarray(a, dtype=np.float64))
    big = float(a.max()) if a.size else 0.0
    if big == 0.0:
        return float(np.sqrt(other_sumsq))
    return big * float(np.sqrt(np.sum((a / big) ** 2) + other_sumsq / big / big))


class NumpyBucket(Bucket):
    """Steps each array with ``reference.expectigrad_update``."""

    backend = "numpy"

    def load_gradients(self, grads, ids=None):
        """Validate this bucket's gradients; keep them as arrays of our dtype."""
        loaded = []
        for k, g in enumerate(grads):
            if g is not None:
                g = as_gradient(g, self.params[k], self.names[k])
                # A copy: a gradient may be (a view of) a parameter stepped first.
                g = np.array(g, dtype=self.dtype, copy=True)
            loaded.append(g)
        self.grads = loaded

    def _stats(self, check, needs_norm):
        """``(bad, sumsq)`` as the kernels return them: the squared norms
        only where ``needs_norm`` (some clipping asks for them), else 0.0."""
        sumsq = []
        for k, g in enumerate(self.grads):
            if g is None or not self.flags[k, L.ACTIVE]:
                sumsq.append(0.0)
                continue
            if check and not np.all(np.isfinite(g)):
                return k, None
            if not needs_norm:
                sumsq.append(0.0)
                continue
            gc = clip_value(g, self.coef[k, L.CLIPVALUE])   # value clipping first
            with np.errstate(over="ignore"):     # an inf norm clips to zero, as on the CPU
                sumsq.append(float(np.sum(np.square(gc, dtype=np.float64))))
        return -1, sumsq

    def _scales(self, sumsq, global_clipnorm, other_sumsq):
        if all(sq < np.inf for sq in sumsq):
            scale = [L.clip_scale(sq, self.coef[k, L.CLIPNORM])
                     for k, sq in enumerate(sumsq)]
            total = sum(sq * s * s for sq, s in zip(sumsq, scale))
            g_scale = L.clip_scale(total + other_sumsq, global_clipnorm)
            return [s * g_scale for s in scale], total
        # A squared norm overflowed: the same clipping from scaled norms, in
        # NORM_UNIT.
        scale, clipped = [], []
        for k, (g, sq) in enumerate(zip(self.grads, sumsq)):
            if sq < np.inf:
                norm = np.sqrt(sq) * NORM_UNIT
            else:
                a = np.abs(clip_value(g, self.coef[k, L.CLIPVALUE]).astype(np.float64))
                norm = _scaled_norm(a * NORM_UNIT)
            clipnorm = float(self.coef[k, L.CLIPNORM]) * NORM_UNIT
            scale.append(clipnorm / norm if norm > clipnorm else 1.0)
            clipped.append(norm * scale[-1])
        joint = _scaled_norm(np.array(clipped), other_sumsq * NORM_UNIT * NORM_UNIT)
        limit = global_clipnorm * NORM_UNIT
        g_scale = limit / joint if joint > limit else 1.0
        with np.errstate(over="ignore"):                  # inf beyond float64
            total = float(np.square(np.float64(joint / NORM_UNIT)))
        return [s * g_scale for s in scale], total

    def step(self, check, global_clipnorm, other_sumsq, update=True):
        needs_norm = global_clipnorm < np.inf or bool(np.any(self.coef[:, L.CLIPNORM] < np.inf))
        bad, sumsq = self._stats(check, needs_norm)
        if bad >= 0:
            return bad, 0.0
        scale, total = self._scales(sumsq, global_clipnorm, other_sumsq)
        if not update:
            return -1, total
        h = self.hyper
        for k, g in enumerate(self.grads):
            c, f = self.coef[k], self.flags[k]
            if g is None or not f[L.ACTIVE]:
                continue
            expectigrad_update(
                self.params[k], clip_gradient(g, scale[k], c[L.CLIPVALUE]),
                self.segment("mean_sq", k),
                self.segment("count", k) if f[L.SPARSE] else None,
                self.segment("momentum", k) if f[L.MOMENTUM] else None,
                t=int(h["t"][k]), lr=float(h["lr"][k]), beta=float(h["beta"][k]),
                eps=float(h["eps"][k]), sparse_counter=bool(f[L.SPARSE]),
                weight_decay=float(h["weight_decay"][k]), maximize=bool(h["maximize"][k]),
                index=None if not f[L.FIRST] else
                f[L.FIRST] + np.arange(self.sizes[k]).reshape(self.shapes[k]))
        return -1, total

    def update_rows(self, k, rows, sel, values, scale, catch=None):
        if catch is not None:
            self.catch_up_rows(k, rows, *catch)
        nrows, rowsize = self.rows_shape(k)
        c, f, h = self.coef[k], self.flags[k], self.hyper
        g = np.zeros((rows.size, rowsize), self.dtype)
        has = sel >= 0
        g[has] = values[sel[has]]
        x2 = self.params[k].reshape(nrows, rowsize)
        v2 = self.flat_segment("mean_sq", k).reshape(nrows, rowsize)
        sparse, momentum = bool(f[L.SPARSE]), bool(f[L.MOMENTUM])
        xs, vs = x2[rows], v2[rows]
        ns = self.flat_segment("count", k).reshape(nrows, rowsize)[rows] if sparse else None
        ms = self.flat_segment("momentum", k).reshape(nrows, rowsize)[rows] if momentum \
            else None
        index = f[L.FIRST] + rows[:, None] * rowsize + np.arange(rowsize)
        expectigrad_update(
            xs, clip_gradient(g, scale, c[L.CLIPVALUE]), vs, ns, ms,
            t=int(h["t"][k]), lr=float(h["lr"][k]), beta=float(h["beta"][k]),
            eps=float(h["eps"][k]), sparse_counter=sparse,
            weight_decay=float(h["weight_decay"][k]), maximize=bool(h["maximize"][k]),
            index=index)
        x2[rows], v2[rows] = xs, vs
        if sparse:
            self.flat_segment("count", k).reshape(nrows, rowsize)[rows] = ns
        if not momentum:
            return None
        self.flat_segment("momentum", k).reshape(nrows, rowsize)[rows] = ms
        return (ms != 0).any(axis=1)
