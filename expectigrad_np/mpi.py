"""Data-parallel Expectigrad over MPI (``mpi4py``): every rank steps the mean
of all ranks' gradients.

    # mpiexec -n 4 python train.py
    from expectigrad_np.mpi import Expectigrad
    opt = Expectigrad(params, lr=1e-3)            # comm defaults to MPI.COMM_WORLD
    opt.step(local_grads)                          # the same step on every rank

Gradients are reduced per dtype, as one flat buffer (in chunks of ``chunk``
elements), not per array.  The reduction is deterministic: each chunk is
gathered from every rank and summed in rank order, then divided by the
number of ranks, so every rank gets the same bits whatever the arrival
order, and those are the bits one process gets stepping that mean.  Every
rank keeps the whole optimizer state (``shard_state=False``); sharded state
is not implemented yet.

Collective refusals: a rank whose gradients are malformed, or ranks that
disagree on which gradients are ``None``, make every rank raise the same
``ValueError``/``TypeError`` before anything changes (no rank is left
waiting in a collective).  A NaN or infinity on any rank reaches every
rank through the mean, so with ``check_finite`` every rank refuses the step
with ``FloatingPointError``, nothing changed anywhere.  ``save`` writes one
file from rank 0; ``load`` reads it on every rank; the file is the same as
a single-process optimizer's, so it loads with any number of ranks and
with ``expectigrad_np.Expectigrad``.

Importing this module imports mpi4py; ``import expectigrad_np`` does not.
"""
from __future__ import annotations

import numpy as np
from mpi4py import MPI

from . import _validation as V
from .optimizer import Expectigrad as _Core

__all__ = ["Expectigrad"]


class Expectigrad(_Core):
    """``expectigrad_np.Expectigrad`` stepping the mean gradient over the ranks
    of ``comm`` (default ``MPI.COMM_WORLD``).  Same constructor, plus ``comm``,
    ``shard_state`` (only False for now) and ``chunk`` (elements per
    collective)."""

    def __init__(self, params, *args, comm=None, shard_state=False, chunk=1 << 20,
                 **kwargs):
        if shard_state:
            raise NotImplementedError(
                "shard_state=True (each rank holding 1/P of the optimizer state) is not "
                "implemented yet; pass shard_state=False: every rank keeps the whole state")
        self.comm = MPI.COMM_WORLD if comm is None else comm
        self.chunk = int(chunk)
        error = None
        try:
            super().__init__(params, *args, **kwargs)
        except (TypeError, ValueError) as exc:
            error = exc
        self._agree(error, "constructing the optimizer")
        layout = [(tuple(p.shape), np.dtype(p.dtype).str) for p in self._params]
        if any(other != layout for other in self.comm.allgather(layout)):
            raise ValueError("the ranks were given different parameters (shapes or dtypes "
                             "differ); every rank must build the same optimizer")

    def _agree(self, error, what):
        """Raise on every rank if any rank failed ``what``."""
        report = None if error is None else (type(error).__name__, str(error))
        reports = self.comm.allgather(report)
        for rank, r in enumerate(reports):
            if r is not None:
                if error is not None and rank == self.comm.rank:
                    raise error
                kind = TypeError if r[0] == "TypeError" else ValueError
                raise kind(f"rank {rank} failed {what}: {r[1]}")

    def step(self, grads):
        """Average ``grads`` over the ranks, then step (every rank the same)."""
        error, local = None, None
        try:
            local = self._local_gradients(grads)
        except (TypeError, ValueError) as exc:
            error = exc
        self._agree(error, "reading its gradients")
        present = [g is not None for g in local]
        patterns = self.comm.allgather(present)
        if any(p != patterns[0] for p in patterns):
            raise ValueError("the ranks disagree on which gradients are None (rank "
                             f"{next(r for r, p in enumerate(patterns) if p != patterns[0])}"
                             " differs from rank 0); pass None for the same parameters on "
                             "every rank")
        super().step(self._mean(local))

    def _local_gradients(self, grads):
        """One contiguous array of its parameter's dtype (or None) per
        parameter, checked as the core checks them."""
        flat = self._flatten_grads(grads)
        return [None if g is None else np.ascontiguousarray(
            V.as_gradient(g, p, name), dtype=p.dtype)
            for g, p, name in zip(flat, self._params, self._names)]

    def _mean(self, local):
        """The mean over the ranks, per dtype: one flat buffer, gathered in
        chunks and summed in rank order."""
        size = self.comm.size
        out = list(local)
        for dtype in sorted({g.dtype.str for g in local if g is not None}):
            idx = [i for i, g in enumerate(local) if g is not None and g.dtype.str == dtype]
            flat = np.concatenate([local[i].reshape(-1) for i in idx])
            total = np.empty_like(flat)
            for lo in range(0, flat.size, self.chunk):
                part = flat[lo:lo + self.chunk]
                rows = np.empty((size, part.size), flat.dtype)
                self.comm.Allgather(part, rows)
                acc = total[lo:lo + part.size]
                acc[...] = rows[0]
                for r in range(1, size):               # rank order: the same bits everywhere
                    acc += rows[r]
            total /= flat.dtype.type(size)
            start = 0
            for i in idx:
                n = local[i].size
                out[i] = total[start:start + n].reshape(local[i].shape)
                start += n
        return out

    def save(self, path, *, params=True):
        """Write the checkpoint from rank 0 (every rank holds the same state);
        every rank raises if the write failed."""
        error = None
        if self.comm.rank == 0:
            try:
                super().save(path, params=params)
            except (OSError, TypeError, ValueError) as exc:
                error = exc
        self._agree(error, "writing the checkpoint")

    def load(self, path):
        """Read the checkpoint on every rank; every rank raises if any
        refused it (nothing changed on any rank that refused)."""
        error = None
        try:
            super().load(path)
        except (OSError, TypeError, ValueError) as exc:
            error = exc
        self._agree(error, "loading the checkpoint")
