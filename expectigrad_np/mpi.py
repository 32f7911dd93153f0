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
order, and those are the bits one process gets stepping that mean.

``shard_state=True`` (the default; ZeRO stage 1): the flat parameter space
of each dtype is cut into P contiguous shards, and each rank keeps the
optimizer state of its shard only (about 1/P of it).  A step sends each
rank the gradients of its shard from every rank (one ``Alltoallv`` per
dtype: a reduce-scatter summed in rank order, so deterministic), updates
the shard, and all-gathers the parameters (one ``Allgatherv`` per dtype).
Beside the reduce-scatter travels a digest of each rank's settings and
whether it needs more (``_digest``); only then does one small collective
agree on errors, checks and clipping norms (summed over the ranks in rank
order).
Without clipping, every rank ends with the bits one process gets stepping
the mean, float32 rounding included (a shard's elements keep their indices
in their parameter); with norm clipping, to rounding (the norms are summed
in another order).  ``shard_state=False``: every rank keeps the whole state
and steps everything.

Row-sparse gradients: with replicated state, where every rank passes one
for a parameter, the rows of all ranks are gathered and summed in rank
order and their mean stepped row-sparse; where only some do, and with
sharded state, they are made dense.

Collective refusals: a rank whose gradients are malformed, or ranks that
disagree on which gradients are ``None``, make every rank raise the same
``ValueError``/``TypeError`` before anything changes (no rank is left
waiting in a collective); so do ranks stepping with different
hyperparameters (compared every step in the same collective).  A NaN or
infinity on any rank reaches every rank through the mean, so with
``check_finite`` every rank refuses the step with ``FloatingPointError``,
nothing changed anywhere.  ``save`` writes one
file from rank 0; ``load`` reads it on every rank; the file is the same as
a single-process optimizer's, so it loads with any number of ranks and
with ``expectigrad_np.Expectigrad``.

Importing this module imports mpi4py; ``import expectigrad_np`` does not.
"""
from __future__ import annotations

import hashlib
import pickle
import threading

import numpy as np
from mpi4py import MPI

from . import _ranks as R
from . import _validation as V
from .backends import layout as L
from .backends.cpu.collectives import mean_over_ranks, pack_within
from .backends.cpu.collectives import within as within_bound
from .optimizer import Expectigrad as _Core
from .param_groups import Changes, ParamGroup, parse_groups
from .sparse import RowSparse, as_rows, densify, is_row_sparse

__all__ = ["Expectigrad", "ShardedExpectigrad"]


def _agree(comm, error, what):
    """Raise on every rank if any rank failed ``what``."""
    R.raise_reported(error, comm.allgather(R.report(error)),
                     lambda rank, text: f"rank {rank} failed {what}: {text}")


def _all_or_none(comm, what, attempt, snapshot, restore):
    """``attempt()`` on every rank; when some rank refuses (OSError,
    TypeError, ValueError), the ranks that went through go back to their
    ``snapshot()`` (``restore``), and every rank raises: nothing changes
    anywhere."""
    saved = snapshot()
    error = None
    try:
        attempt()
    except (OSError, TypeError, ValueError) as exc:
        error = exc
    try:
        _agree(comm, error, what)
    except BaseException:
        if error is None:
            restore(saved)
        raise


def _copied(state_dict):
    """A state dict whose arrays are copies (a snapshot to go back to)."""
    return {"step": state_dict["step"],
            "state": {i: {k: v.copy() if isinstance(v, np.ndarray) else v
                          for k, v in entry.items()}
                      for i, entry in state_dict["state"].items()},
            "param_groups": [dict(g) for g in state_dict["param_groups"]]}


def _agree_on_gradients(comm, error, local, settings, rows):
    """Raise on every rank if some rank failed reading its gradients, or the
    ranks disagree on which are None or on the hyperparameters
    (``_settings``): one collective, which also gathers what each rank's
    ``rows`` says (which gradients are row-sparse there), returned."""
    present = None if local is None else [g is not None for g in local]
    gathered = comm.allgather((R.report(error), present, settings, rows))
    _raise_agreed(comm, error, [(r, p) for r, p, _, _ in gathered])
    _check_settings([s for _, _, s, _ in gathered])
    return [k for _, _, _, k in gathered]


def _raise_agreed(comm, error, gathered):
    """Raise on every rank if some rank failed reading its gradients or the
    ranks disagree on which are None, from every rank's ``(report,
    present)``."""
    R.raise_reported(error, [r for r, _ in gathered],
                     lambda rank, text: f"rank {rank} refused the step (its gradients, "
                                        f"parameters or schedules): {text}")
    _check_nones([p for _, p in gathered])


def _same_everywhere(comm, layout, chunk, build):
    """Raise on every rank unless every rank built the same optimizer: the
    same kind (``build``: sharded or not, ``lazy``, the number of parameters
    in each group), the same parameters (shapes, dtypes) and the same
    ``chunk`` (the collectives' sizes)."""
    gathered = comm.allgather((layout, chunk, build))
    for rank, (other_layout, other_chunk, other_build) in enumerate(gathered):
        if other_build != build:
            names = ("shard_state", "lazy", "parameters per param group")
            key, mine, theirs = next((k, a, b) for k, a, b in zip(names, build, other_build)
                                     if a != b)
            raise ValueError(f"the ranks built different optimizers: {key} is {mine} here "
                             f"(rank {comm.rank}) and {theirs} on rank {rank}; every rank "
                             "must build the same optimizer")
        if other_layout != layout:
            raise ValueError("the ranks were given different parameters (shapes or dtypes "
                             "differ); every rank must build the same optimizer")
        if other_chunk != chunk:
            raise ValueError(f"the ranks were given different chunk sizes "
                             f"({[c for _, c, _ in gathered]}); chunk sets the size of the "
                             "collectives, so every rank must give the same")


def _check_nones(patterns):
    if any(p != patterns[0] for p in patterns):
        raise ValueError("the ranks disagree on which gradients are None (rank "
                         f"{next(r for r, p in enumerate(patterns) if p != patterns[0])}"
                         " differs from rank 0); pass None for the same parameters on "
                         "every rank")


# What every rank must step with: each group's values of these, and the
# optimizer's ``check_finite`` and ``global_clipnorm`` (``_settings``).
_COMPARED = ("lr", "beta", "eps", "sparse_counter", "weight_decay", "maximize",
             "clipvalue", "clipnorm")


def _settings(groups, lrs, check_finite, global_clipnorm):
    """The hyperparameters a step uses on this rank, as plain numbers (a
    schedule's ``lr`` as its value this step, from ``lrs``; None where no
    gradient is stepped), to be compared over the ranks (``_check_settings``)."""
    def plain(v):
        if v is None or isinstance(v, (bool, np.bool_)):
            return v if v is None else bool(v)
        return float(v)
    rows = tuple(tuple(plain(lrs[gi] if key == "lr" else g[key]) for key in _COMPARED)
                 for gi, g in enumerate(groups))
    return rows, bool(check_finite), plain(global_clipnorm)


def _check_settings(gathered):
    """Raise ``ValueError`` (on every rank: every rank has the same
    ``gathered``) when some rank steps with other hyperparameters than
    rank 0, naming the first that differs."""
    first = gathered[0]
    for rank, mine in enumerate(gathered):
        if mine == first:
            continue
        rows, finite, joint = mine
        if finite != first[1]:
            what = f"check_finite is {first[1]} on rank 0 and {finite} on rank {rank}"
        elif joint != first[2]:
            what = f"global_clipnorm is {first[2]} on rank 0 and {joint} on rank {rank}"
        elif len(rows) != len(first[0]):
            what = (f"rank 0 has {len(first[0])} param groups and rank {rank} has "
                    f"{len(rows)}")
        else:
            gi, key, a, b = next((gi, key, a, b)
                                 for gi, (r0, r) in enumerate(zip(first[0], rows))
                                 for key, a, b in zip(_COMPARED, r0, r) if a != b)
            what = (f"param group {gi}: {key!r}" + (" this step" if key == "lr" else "")
                    + f" is {a} on rank 0 and {b} on rank {rank}")
        raise ValueError(f"the ranks step with different hyperparameters: {what}; every "
                         "rank must use the same values; the step was refused and nothing "
                         "was changed")


class Expectigrad(_Core):
    """``expectigrad_np.Expectigrad`` stepping the mean gradient over the ranks
    of ``comm`` (default ``MPI.COMM_WORLD``).  Same constructor, plus ``comm``,
    ``shard_state`` and ``chunk`` (elements per collective, replicated
    state).  With ``shard_state=True`` (the default) the object is a
    ``ShardedExpectigrad``.

    Parameters
    ----------
    params
        As for ``expectigrad_np.Expectigrad``; the same on every rank.
    *args, **kwargs
        The hyperparameters of ``expectigrad_np.Expectigrad`` (``lr``,
        ``beta``, ``eps``, ``sparse_counter``, ``weight_decay``,
        ``maximize``, the clippings, ``check_finite``, ``lazy``,
        ``backend``), the same on every rank.
    comm : mpi4py communicator, optional
        The ranks that share the steps; default ``MPI.COMM_WORLD``.
    shard_state : bool, default True
        Shard the optimizer state over the ranks (``ShardedExpectigrad``);
        False: every rank keeps the whole state.
    chunk : int, default 2**20
        Elements per collective when reducing the gradients (replicated
        state), >= 1.

    Raises
    ------
    ValueError, TypeError
        As ``expectigrad_np.Expectigrad``, on every rank.
    """

    def __new__(cls, params=None, *args, shard_state=True, **kwargs):
        if shard_state and cls is Expectigrad:
            return ShardedExpectigrad(params, *args, **kwargs)
        return super().__new__(cls)

    def __init__(self, params, *args, comm=None, shard_state=True, chunk=1 << 20,
                 **kwargs):
        self.comm = MPI.COMM_WORLD if comm is None else comm
        error = None
        try:
            self.chunk = _check_chunk(chunk)
            super().__init__(params, *args, **kwargs)
        except (TypeError, ValueError) as exc:
            error = exc
        self._agree(error, "constructing the optimizer")
        layout = [(tuple(p.shape), np.dtype(p.dtype).str) for p in self._params]
        build = (False, self.lazy, [len(g["params"]) for g in self.param_groups])
        _same_everywhere(self.comm, layout, self.chunk, build)

    def _agree(self, error, what):
        _agree(self.comm, error, what)

    def _scheduled_lr(self, gi, schedule):
        """The core's, evaluated once a step: ``step`` checks the value on
        every rank before the collectives, and the core's step then takes the
        same value instead of calling the schedule again."""
        key = (gi, self.step_count)
        memo = self.__dict__.setdefault("_lr_memo", {})
        kept = memo.get(key)
        if kept is None or kept[0] is not schedule:
            if any(k[1] != self.step_count for k in memo):
                memo.clear()
            kept = memo[key] = (schedule, super()._scheduled_lr(gi, schedule))
        return kept[1]

    def step(self, grads):
        """Average ``grads`` over the ranks, then step (every rank the same).

        Parameters
        ----------
        grads : sequence
            This rank's gradients, in the structure of ``params`` (arrays,
            row-sparse gradients or ``None``); every rank must agree on which
            are ``None``.

        Raises
        ------
        ValueError, TypeError, FloatingPointError
            On every rank, when any rank's gradients are malformed or (with
            ``check_finite``) not finite; nothing changes on any rank.
        """
        with self._lock:            # the buffers of _mean are the optimizer's
            try:
                self._step_locked(grads)
            except BaseException:
                # Refused: a retry calls the schedules again, as one process does.
                self.__dict__.pop("_lr_memo", None)
                raise

    def _step_locked(self, grads):
        error, local, settings = None, None, None
        try:
            local = self._local_gradients(grads)
            self._check_writeable([i for i, g in enumerate(local) if g is not None])
            stepping = any(g is not None for g in local)
            # A schedule's value some rank refuses (or a schedule that raises
            # there) is refused on every rank, before anything; the values
            # used are compared over the ranks with the other settings.
            lrs = [None if not stepping else self._scheduled_lr(gi, group["lr"])
                   if callable(group["lr"]) else group["lr"]
                   for gi, group in enumerate(self.param_groups)]
            settings = _settings(self.param_groups, lrs, self.check_finite,
                                 self.global_clipnorm)
        except Exception as exc:  # noqa: BLE001 - raised on every rank by _agree
            error = exc
        rows = None if local is None else [isinstance(g, _Rows) for g in local]
        local = self._sparse_mean(local, _agree_on_gradients(self.comm, error, local,
                                                             settings, rows))
        means = self._mean(local)
        super().step(means[0] if self._bare else means)

    def _local_gradients(self, grads):
        """One array of its parameter's shape (or None) per parameter,
        checked as the core checks them (``_mean`` casts it, copying it into
        its buffer); a row-sparse gradient as ``_Rows`` (its rows and summed
        values)."""
        flat = self._flatten_grads(grads)
        return [None if g is None else _Rows(*as_rows(g, p, name)) if is_row_sparse(g)
                else V.as_gradient(g, p, name)
                for g, p, name in zip(flat, self._params, self._names)]

    def _sparse_mean(self, local, kinds):
        """Row-sparse gradients where every rank has one: their mean as one
        ``RowSparse`` over the rows any rank touched, summed as the dense
        mean sums them (rank 0's rows, then each other rank's added in rank
        order, zero where it has none), over P: the dense mean's bits.
        Where only some ranks have one, theirs is made dense (the dense
        mean then).  ``kinds``: which gradients are row-sparse, from every
        rank (``_agree_on_gradients``)."""
        out = list(local)
        for i, g in enumerate(local):
            p = self._params[i]
            if all(k[i] for k in kinds):             # the same decision on every rank
                parts = self.comm.allgather((g.rows, g.values))
                rows = np.unique(np.concatenate([r for r, _ in parts]))
                values = np.zeros((rows.size, g.values.shape[1]), p.dtype)
                addend = np.empty_like(values)
                for r, (part_rows, part_values) in enumerate(parts):
                    at = np.searchsorted(rows, part_rows)
                    if r == 0:
                        values[at] = part_values
                        continue
                    addend[...] = 0
                    addend[at] = part_values
                    with np.errstate(over="ignore", invalid="ignore"):   # refused later
                        values += addend
                values /= values.dtype.type(self.comm.size)
                out[i] = RowSparse(rows, values.reshape((rows.size,) + p.shape[1:]))
            elif isinstance(g, _Rows):
                out[i] = np.zeros(p.shape, p.dtype)
                out[i].reshape(p.shape[0], -1)[g.rows] = g.values
        return out

    def _mean(self, local):
        """The mean over the ranks, per dtype: the dense gradients packed into
        one flat buffer, gathered in chunks and summed in rank order, the
        mean written over the buffer (views of it are returned).  The
        buffers are the optimizer's, allocated at its first step (``_buffers``):
        a step allocates nothing the size of the gradients."""
        size = self.comm.size
        out = list(local)
        kind = [np.dtype(p.dtype).str if isinstance(g, np.ndarray) else None
                for g, p in zip(local, self._params)]
        for dtype in sorted({k for k in kind if k is not None}):
            idx = [i for i, k in enumerate(kind) if k == dtype]
            flat, rows = self._buffers(dtype, sum(local[i].size for i in idx))
            used = 0
            for i in idx:
                # Cast and made contiguous in the copy itself: no temporary.
                # A cast that overflows gives inf, which the step refuses on
                # every rank (raising here would leave the others waiting).
                with np.errstate(all="ignore"):
                    flat[used:used + local[i].size].reshape(local[i].shape)[...] = local[i]
                used += local[i].size
            c = rows.shape[1]
            for lo in range(0, used, c):
                part = flat[lo:min(lo + c, used)]
                got = rows.reshape(-1)[:size * part.size].reshape(size, part.size)
                self.comm.Allgather(part, got)
                # Sent: free to overwrite with the mean, summed in rank order
                # (the same bits everywhere; NaN and inf are refused by the step).
                mean_over_ranks(got, part.size, part, flat.dtype.type(size))
            start = 0
            for i in idx:
                out[i] = flat[start:start + local[i].size].reshape(local[i].shape)
                start += local[i].size
        return out

    def _buffers(self, dtype, needed):
        """``(flat, rows)`` of a dtype: room for every parameter of that dtype
        (at least ``needed`` elements), and for a chunk from every rank;
        allocated once (again after ``add_param_group`` grows the dtype)."""
        buffers = self.__dict__.setdefault("_mean_buffers", {})
        if dtype not in buffers or buffers[dtype][0].size < needed:
            total = sum(p.size for p in self._params if np.dtype(p.dtype).str == dtype)
            total = max(total, needed)
            buffers[dtype] = (np.empty(total, dtype),
                              np.empty((self.comm.size, max(1, min(self.chunk, total))),
                                       dtype))
        return buffers[dtype]

    def save(self, path, *, params=True):
        """Write the checkpoint from rank 0 (every rank holds the same state);
        every rank raises if the write failed.

        Parameters
        ----------
        path : str, bytes or os.PathLike
            The file rank 0 writes (the same on every rank).
        params : bool, default True
            Also store the parameter values.

        Raises
        ------
        OSError, ValueError, TypeError
            On every rank, when the write failed.
        """
        error = None
        if self.comm.rank == 0:
            try:
                super().save(path, params=params)
            except (OSError, TypeError, ValueError) as exc:
                error = exc
        self._agree(error, "writing the checkpoint")

    def load(self, path):
        """Read the checkpoint on every rank; every rank raises if any
        refused it (nothing changed on any rank that refused).

        Parameters
        ----------
        path : str, bytes or os.PathLike
            A checkpoint every rank can read, written by this class, by the
            other MPI kind or by ``expectigrad_np.Expectigrad.save``.

        Raises
        ------
        OSError, ValueError
            On every rank, when any rank refused the file; nothing changes.
        """
        from .checkpoint import load
        self.sync()                   # on every rank, whatever the file
        with self._lock:
            _all_or_none(self.comm, "loading the checkpoint", lambda: load(_Local(self), path),
                         self._snapshot, self._restore)

    def load_state_dict(self, state_dict):
        """Load ``state_dict`` on every rank; every rank raises if any
        refused it, and nothing changes on any rank.

        Parameters
        ----------
        state_dict : mapping
            As ``expectigrad_np.Expectigrad.load_state_dict`` takes it, the
            same on every rank.

        Raises
        ------
        ValueError, TypeError
            On every rank, when any rank refused it; nothing changes.
        """
        self.sync()
        _all_or_none(self.comm, "loading the state dict",
                     lambda: _Core.load_state_dict(self, state_dict),
                     self._snapshot, self._restore)

    def _snapshot(self):
        return _copied(_Core.state_dict(self)), [p.copy() for p in self._params]

    def _restore(self, saved):
        state, params = saved
        _Core.load_state_dict(self, state)
        for p, value in zip(self._params, params):
            np.copyto(p, value)


_CLIP_KEYS = ("clipvalue", "clipnorm")


class _Local:
    """The replicated optimizer as ``checkpoint.load`` sees it: its own
    ``load_state_dict``, not the collective one."""

    def __init__(self, opt):
        self._opt = opt

    def __getattr__(self, name):
        return getattr(self._opt, name)

    def load_state_dict(self, state_dict):
        _Core.load_state_dict(self._opt, state_dict)


class _Rows:
    """A rank's row-sparse gradient: sorted unique rows, summed values."""

    __slots__ = ("rows", "values")

    def __init__(self, rows, values):
        self.rows, self.values = rows, values


class _Once:
    """A group's ``lr`` schedule as the sharded core holds it: called once a
    step.  ``ShardedExpectigrad._check_step`` calls it first, to check its
    value on every rank; the core's step then reads the value kept for that
    step count instead of calling the schedule again."""

    __slots__ = ("schedule", "_t", "_value")

    def __init__(self, schedule):
        self.schedule, self._t, self._value = schedule, None, None

    def __call__(self, t):
        if t != self._t:
            self._value = self.schedule(t)
            self._t = t
        return self._value

    def forget(self):
        """Call the schedule again at the next call (after a refused step)."""
        self._t = None


def _unwrapped(value):
    return value.schedule if isinstance(value, _Once) else value


def _held(lr):
    """A group's ``lr`` as the sharded core holds it: a schedule (wrapped or
    not) as ``_Once`` around the user's callable, a number as it is."""
    return _Once(_unwrapped(lr)) if callable(lr) else lr


def _check_chunk(chunk):
    if isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)) or chunk < 1:
        raise ValueError(f"chunk must be a positive int (elements a collective), "
                         f"got {chunk!r}")
    return int(chunk)


def _contiguous_parameter(p, where):
    """A host parameter that each rank can update a flat slice of in place."""
    V.check_parameter(p, where)
    if not p.flags.c_contiguous:
        raise ValueError(f"{where} is not C-contiguous; with shard_state=True each "
                         "rank updates a flat slice of it in place: pass a "
                         "contiguous array, or shard_state=False")
    return p


def _parse_groups(params, defaults):
    """Param groups as ``eg.Expectigrad`` takes them (``parse_groups``), of
    C-contiguous host arrays."""
    return parse_groups([params] if isinstance(params, np.ndarray) else params, defaults,
                        _contiguous_parameter, lambda p: isinstance(p, np.ndarray))


def _checked_attribute(name, check, doc):
    """A property stored as ``_<name>``, set through ``check(name, value)``."""
    key = "_" + name
    return property(lambda self: getattr(self, key),
                    lambda self, value: setattr(self, key, check(name, value)), doc=doc)


class ShardedExpectigrad:
    """Data-parallel Expectigrad with sharded optimizer state (ZeRO stage 1):
    ``expectigrad_np.mpi.Expectigrad(..., shard_state=True)``.

    Same constructor and hyperparameters as ``expectigrad_np.Expectigrad``
    (host NumPy arrays, C-contiguous), plus ``comm``.  ``step(local_grads)``
    on every rank steps the mean over the ranks; every rank ends with the
    same parameters.  Rank ``r`` keeps the state of its shard of each
    dtype's flat parameter space (``shard``), in an ``Expectigrad`` over
    views of those slices (``core``); ``state_dict``/``load_state_dict``,
    ``save``/``load`` are collective and speak the single-process format.
    ``clipvalue``/``clipnorm`` of a group are read from ``param_groups``
    each step (the core clips nothing: norms are taken over the ranks).

    Parameters
    ----------
    params
        Arrays or param-group dicts as for ``expectigrad_np.Expectigrad``:
        host NumPy arrays, C-contiguous, the same shapes on every rank.
    lr, beta, eps, sparse_counter, weight_decay, maximize
        As for ``expectigrad_np.Expectigrad`` (the same on every rank).
    clipvalue, clipnorm, global_clipnorm, check_finite, backend
        As for ``expectigrad_np.Expectigrad`` (the same on every rank).
    lazy : bool, default False
        Only False: the shards are flat slices, which do not keep the rows
        a lazy row-sparse step visits.  ``lazy=True`` raises ``ValueError``;
        use ``shard_state=False`` for it.
    comm : mpi4py communicator, optional
        Default ``MPI.COMM_WORLD``.
    chunk : int, optional
        Elements per piece of the collectives, >= 1; default: the class's.

    Raises
    ------
    ValueError, TypeError
        Invalid parameters or hyperparameters, on every rank.
    """

    _bare = False       # for the core's gradient rules (a lone array is taken in step)

    def __init__(self, params, lr=1e-3, beta=0.9, eps=1e-8, sparse_counter=True, *,
                 weight_decay=0.0, maximize=False, clipvalue=None, clipnorm=None,
                 global_clipnorm=None, check_finite=True, lazy=False, backend="auto",
                 comm=None, chunk=None):
        self.comm = MPI.COMM_WORLD if comm is None else comm
        self.chunk = chunk
        self._lock = threading.RLock()
        self._changes = Changes()
        error = None
        try:
            if chunk is not None:
                _check_chunk(chunk)
            self._build(params, dict(lr=lr, beta=beta, eps=eps, sparse_counter=sparse_counter,
                                     weight_decay=weight_decay, maximize=maximize,
                                     clipvalue=clipvalue, clipnorm=clipnorm),
                        global_clipnorm, check_finite, lazy, backend)
        except (TypeError, ValueError) as exc:
            error = exc
        _agree(self.comm, error, "constructing the optimizer")
        layout = [(tuple(p.shape), p.dtype.str) for p in self._params]
        _same_everywhere(self.comm, layout, self.chunk,
                         (True, False, list(self._group_sizes)))

    # --- construction -------------------------------------------------------------

    def _build(self, params, defaults, global_clipnorm, check_finite, lazy, backend):
        if V.check_bool("lazy", lazy):
            raise ValueError("lazy=True needs shard_state=False: sharded state is cut "
                             "into flat slices, which do not keep the rows a lazy step "
                             "visits; pass shard_state=False, or lazy=False")
        defaults = {k: V.check_group_value(k, v, "") for k, v in defaults.items()}
        self.global_clipnorm = V.check_positive_or_none("global_clipnorm", global_clipnorm)
        self.check_finite = V.check_bool("check_finite", check_finite)
        groups = _parse_groups(params, defaults)
        self._params = [p for g in groups for p in g["params"]]
        self._names = [f"param group {gi} param {pi}" for gi, g in enumerate(groups)
                       for pi in range(len(g["params"]))]
        self._group_sizes = [len(g["params"]) for g in groups]
        self._group_of = np.repeat(np.arange(len(groups)), self._group_sizes)
        V.check_no_overlap(self._params, self._names)
        self.param_groups = tuple(ParamGroup(g, f"param group {gi}: ", self._changes)
                                  for gi, g in enumerate(groups))
        self._t = np.zeros(len(self._params), np.int64)
        self._had_momentum = np.array([groups[g]["beta"] > 0 for g in self._group_of],
                                      dtype=bool)       # kept up by _sync_hyper
        self.step_count = 0
        # The flat layout of each dtype and this rank's shard of it.
        size, rank = self.comm.size, self.comm.rank
        self._buckets = {}
        for dt in sorted({p.dtype.str for p in self._params}):
            idx = [i for i, p in enumerate(self._params) if p.dtype.str == dt]
            sizes = np.array([self._params[i].size for i in idx], np.int64)
            offsets = np.concatenate([[0], np.cumsum(sizes)])
            total = int(offsets[-1])
            bounds = np.array([total * r // size for r in range(size + 1)], np.int64)
            self._buckets[dt] = (idx, offsets, bounds)
        # Buffers of a step, allocated once per dtype: the flat gradients (and
        # gathered parameters), a chunk of every rank's shard, and the mean.
        # (Collectives that read the gradients and write the parameters in
        # place, through MPI datatypes at their addresses, made the step
        # slower: see the MPI guide's cost section.)
        chunk = 1 << 20 if self.chunk is None else self.chunk
        self._scratch = {}
        for dt, (idx, offsets, bounds) in self._buckets.items():
            widest = int(np.max(np.diff(bounds)))
            c = max(1, min(chunk, widest))
            self._scratch[dt] = (np.zeros(int(offsets[-1]), np.dtype(dt)),
                                 np.empty((size, c), np.dtype(dt)),
                                 np.empty(int(bounds[rank + 1] - bounds[rank]), np.dtype(dt)))
        # This rank's digest and every rank's (``_digest``).
        self._digests = (np.zeros(3, np.int64), np.zeros((size, 3), np.int64))
        # Pieces: (param index, first element, end element), one per parameter
        # meeting this rank's shard; the core steps views of them.
        self._pieces = []
        for dt, (idx, offsets, bounds) in self._buckets.items():
            lo, hi = bounds[rank], bounds[rank + 1]
            for j, i in enumerate(idx):
                a, b = max(lo, offsets[j]), min(hi, offsets[j + 1])
                if b > a:
                    self._pieces.append((i, int(a - offsets[j]), int(b - offsets[j])))
        self._pieces.sort()
        inner, order = [], []
        for gi, g in enumerate(groups):
            views = [(i, a, b) for (i, a, b) in self._pieces if self._group_of[i] == gi]
            if not views:          # every group exists on every rank: an empty view
                first = int(np.flatnonzero(self._group_of == gi)[0])
                views = [(first, 0, 0)]
            order.extend(views)
            hyper = {k: v for k, v in g.items() if k not in _CLIP_KEYS and k != "params"}
            hyper["lr"] = _held(hyper["lr"])
            inner.append(dict(hyper, params=[self._params[i].reshape(-1)[a:b]
                                             for i, a, b in views]))
        self._order = order                      # the core's arrays, in its order
        self.core = _Core(inner, check_finite=False, backend=backend)
        for j, (i, a, b) in enumerate(order):    # each piece rounds as its parameter
            bucket, k = self.core._where[j]
            bucket.flags[k, L.FIRST] = a
        self._synced = [self._hyper(g) for g in self.param_groups]
        self._changes.dirty = False
        self._sparse = np.array([self.param_groups[g]["sparse_counter"]
                                 for g in self._group_of])

    global_clipnorm = _checked_attribute(
        "global_clipnorm", V.check_positive_or_none,
        "Joint L2-norm threshold over all gradients (None: off), the same on every rank.")
    check_finite = _checked_attribute(
        "check_finite", V.check_bool,
        "Refuse gradients whose mean holds NaN or infinity (True), the same on every rank.")

    @staticmethod
    def _hyper(g):
        return {k: v for k, v in g.items() if k not in _CLIP_KEYS and k != "params"}

    def _sync_hyper(self):
        """Hand changed hyperparameters (other than clipping) to the core."""
        if not self._changes.dirty:
            return
        for gi, g in enumerate(self.param_groups):
            now = self._hyper(g)
            if now != self._synced[gi]:
                for key, value in now.items():
                    if _unwrapped(self.core.param_groups[gi][key]) != value:
                        self.core.param_groups[gi][key] = _held(value) if (
                            key == "lr") else value
                self._synced[gi] = now
                # As the core decides it for its pieces (Expectigrad._refresh).
                self._had_momentum[self._group_of == gi] |= now["beta"] > 0
        self._changes.dirty = False

    # --- what the class offers like Expectigrad --------------------------------

    @property
    def params(self):
        """All parameter arrays, group by group."""
        return list(self._params)

    @property
    def shard(self):
        """This rank's slices: ``[(param index, first, end)]`` of the
        parameters' flat elements."""
        return list(self._pieces)

    def state_nbytes(self):
        """Bytes of optimizer state this rank holds."""
        return sum(getattr(b, name).nbytes for b in self.core._buckets
                   for name in b.stored)

    @property
    def _momentum(self):
        """Which parameters keep momentum: those that have had beta > 0 (as
        ``Expectigrad._refresh`` decides it for the core's pieces)."""
        return self._had_momentum.copy()

    _dirty = False

    def _refresh(self):
        self._sync_hyper()

    # --- stepping ----------------------------------------------------------------

    def step(self, grads):
        """Step the mean of every rank's ``grads`` (collective), each rank
        its shard of the state, then share the parameters.

        Parameters
        ----------
        grads : sequence
            As for ``Expectigrad.step`` (replicated state): this rank's
            gradients, ``None`` for the same parameters on every rank.

        Raises
        ------
        ValueError, TypeError, FloatingPointError
            As for ``Expectigrad.step``: on every rank, and nothing changes
            on any rank.
        """
        with self._lock:
            try:
                self._step_locked(grads)
            except BaseException:
                # Refused: a retry calls the schedules again, as one process does.
                for group in self.core.param_groups:
                    if isinstance(group["lr"], _Once):
                        group["lr"].forget()
                raise

    def _step_locked(self, grads):
        error, local, settings = None, None, None
        try:
            local = self._local_gradients(grads)
            self._sync_hyper()
            settings = _settings(self.param_groups, self._check_step(local),
                                 self.check_finite, self.global_clipnorm)
        except Exception as exc:  # noqa: BLE001 - raised on every rank below
            error = exc
        # Every rank takes part in the reduce-scatter, a rank that failed
        # too (its buffer is sent as it is).  Beside it travels each rank's
        # digest (``_digest``); only where the digests show that some rank
        # failed, differs or needs more does one small collective then agree
        # on errors, on the None pattern and on the check and the norms,
        # before anything changes.
        shard, quick = self._reduce_scatter(local, error, settings)
        active = (np.zeros(len(self._params), bool) if local is None
                  else np.array([g is not None for g in local]))
        pieces = self._piece_gradients(shard, active)
        if quick:
            self._clip_values(pieces)
        else:
            self._check_and_clip(pieces, shard, error, local, settings)
        if not active.any():
            return
        # Schedules see the step count of the whole optimizer, also on a
        # rank whose pieces all had None (its core then took no step).
        self.core.step_count = self.step_count
        self.core.step(pieces)
        self._all_gather()
        self._t += active
        self.step_count += 1

    def _check_step(self, local):
        """What the core would refuse on some rank only: a parameter to step
        made read-only, a schedule's value that this rank's shard of a
        group's dtypes can hold but another's cannot.  Returns each group's
        ``lr`` this step (a schedule's value)."""
        _Core._check_writeable(self, [i for i, g in enumerate(local) if g is not None])
        if all(g is None for g in local):
            return [None] * len(self.param_groups)      # no step: no schedule called
        lrs = []
        for gi, group in enumerate(self.param_groups):
            schedule = self.core.param_groups[gi]["lr"]        # _Once: kept for the core
            if callable(schedule):
                value = schedule(self.step_count)
                V.check_schedule_value(value, self.step_count, group, f"param group {gi}: ")
                lrs.append(value)
            else:
                lrs.append(group["lr"])
        return lrs

    def _local_gradients(self, grads):
        if len(self._params) == 1 and isinstance(grads, np.ndarray):
            grads = [grads]
        grads = _Core._flatten_grads(self, grads)      # the core's rules and messages
        # A row-sparse gradient is made dense: the shards are flat slices.
        # Others are cast into the flat buffer by _reduce_scatter.
        return [None if g is None else densify(g, p, name) if is_row_sparse(g)
                else V.as_gradient(g, p, name)
                for g, p, name in zip(grads, self._params, self._names)]

    def _reduce_scatter(self, local, error, settings):
        """``({dtype: (this rank's shard of the mean gradient, its start,
        whether it holds NaN or infinity)}, quick)``: every rank sends each
        rank that rank's shard (``Alltoallv``, in chunks of ``chunk``
        elements a shard); the P pieces are summed in rank order and divided
        by P (the replicated class's bits) in one compiled pass
        (``mean_over_ranks``).  Into buffers allocated once (``_scratch``).
        ``local`` None (this rank failed to read its gradients): the buffer
        is sent as it is.  The flag may come from a stale element of a
        parameter whose gradient is None (unused): ``_check_and_clip`` then
        checks the pieces one by one.

        Beside the reduce-scatter, and overlapping it, every rank's
        ``_digest`` goes to every rank (``Iallgather``); ``quick`` (the same
        on every rank: it is read from the same digests) says that no rank
        failed or needs a norm, that every rank steps with the same
        settings and None pattern, and (with ``check_finite``) that every
        rank's gradients are finite and small enough that their sum cannot
        overflow: then no collective is needed to agree on the step."""
        size, rank = self.comm.size, self.comm.rank
        within = True
        for dt, (idx, offsets, bounds) in self._buckets.items():
            flat = self._scratch[dt][0]
            bound = flat.dtype.type(np.finfo(flat.dtype).max / (2 * size))
            for j, i in enumerate(idx):
                if local is not None and local[i] is not None:   # None: unused
                    g = local[i]
                    part = flat[offsets[j]:offsets[j + 1]]
                    if g.dtype == flat.dtype and g.flags.c_contiguous:
                        within &= bool(pack_within(g.reshape(-1), part, bound))
                        continue
                    # Cast and made contiguous in the copy itself.  A cast
                    # that overflows gives inf, refused on every rank.
                    with np.errstate(all="ignore"):
                        part.reshape(g.shape)[...] = g
                    within &= bool(within_bound(part, bound))
        mine, gathered = self._digests
        mine[...] = self._digest(error, local, settings, within)
        request = self.comm.Iallgather(mine, gathered)
        out = {}
        try:
            for dt, (idx, offsets, bounds) in self._buckets.items():
                flat, rows, shard_mean = self._scratch[dt]
                c = rows.shape[1]
                starts = bounds[:-1]
                ends = bounds[1:]
                finite = True
                for k in range(-(-int(np.max(ends - starts)) // c)):
                    lo = np.minimum(starts + k * c, ends)
                    counts = np.minimum(lo + c, ends) - lo
                    m = int(counts[rank])
                    self.comm.Alltoallv([flat, (counts, lo)],
                                        [rows, ([m] * size, [c * r for r in range(size)])])
                    # Rank order: deterministic.
                    finite &= bool(mean_over_ranks(rows, m, shard_mean[k * c:k * c + m],
                                                shard_mean.dtype.type(size)))
                out[dt] = (shard_mean, int(bounds[rank]), not finite)
        finally:
            request.Wait()
        quick = (not gathered[:, 0].any() and (gathered[:, 1:] == gathered[0, 1:]).all())
        return out, bool(quick)

    def _digest(self, error, local, settings, within):
        """This rank's part of the agreement that travels beside the
        reduce-scatter: ``[needs the collective agreement, 16 bytes of a hash
        of (the None pattern, the settings)]``.  Equal hashes stand for
        equal settings (a collision of a 128-bit hash aside); unequal ones
        only send the step to the exact comparison (``_check_and_clip``),
        so a hash that differs for equal values costs a collective, never a
        wrong step."""
        needs = (error is not None or local is None or self._clips_by_norm()
                 or (self.check_finite and not within))
        if needs:
            return [1, 0, 0]
        present = [g is not None for g in local]
        key = hashlib.blake2b(pickle.dumps((present, settings), protocol=4), digest_size=16)
        return [0, *np.frombuffer(key.digest(), np.int64)]

    def _piece_gradients(self, shard, active):
        """The mean gradient of each of the core's arrays (None where the
        parameter has none this step)."""
        pieces = []
        for i, a, b in self._order:
            if not active[i]:
                pieces.append(None)
                continue
            p = self._params[i]
            idx, offsets, _ = self._buckets[p.dtype.str]
            acc, lo, _ = shard[p.dtype.str]
            start = int(offsets[idx.index(i)]) + a - lo
            pieces.append(acc[start:start + (b - a)])
        return pieces

    def _clips_by_norm(self):
        """Whether a step clips by a norm (per group or global): then the
        norms are summed over the ranks in the agreement collective."""
        return self.global_clipnorm is not None or any(
            g["clipnorm"] is not None for g in self.param_groups)

    def _clip_values(self, pieces):
        """Each piece clipped in place to its group's ``clipvalue`` (no
        collective needed)."""
        groups = self.param_groups
        for (i, _, _), g in zip(self._order, pieces):
            clipvalue = groups[self._group_of[i]]["clipvalue"]
            if clipvalue is not None and g is not None and g.size:
                np.clip(g, -_in(clipvalue, g.dtype), _in(clipvalue, g.dtype), out=g)

    def _check_and_clip(self, pieces, shard, error, local, settings):
        """Agree on the gradients, refuse non-finite ones and clip, deciding
        over every rank in one collective: whether some rank failed to read
        its gradients (``error``), which are None (``local``), the
        hyperparameters each steps with (``settings``), the first
        non-finite mean gradient, and the squared norms per parameter,
        summed in rank order.  The pieces are clipped in place as the
        kernels would (value, then the per-array and global factors, in the
        parameter's dtype)."""
        n = len(self._params)
        first_bad = n
        sumsq = np.zeros(n)
        groups = self.param_groups
        needs_norm = self._clips_by_norm()
        if error is None:
            for (i, _, _), g in zip(self._order, pieces):
                if (self.check_finite and g is not None and shard[g.dtype.str][2]
                        and not np.isfinite(g).all()):
                    first_bad = min(first_bad, i)
            self._clip_values(pieces)
            for (i, _, _), g in zip(self._order, pieces):
                if needs_norm and g is not None:
                    with np.errstate(over="ignore"):     # inf: summed again in units
                        sumsq[i] += float(np.sum(np.square(g, dtype=np.float64)))
        report = R.report(error)
        present = None if local is None else [g is not None for g in local]
        gathered = self.comm.allgather((report, present, settings, first_bad, sumsq))
        _raise_agreed(self.comm, error, [(r, p) for r, p, _, _, _ in gathered])
        _check_settings([s for _, _, s, _, _ in gathered])
        gathered = [(b, s) for _, _, _, b, s in gathered]
        bad = min(b for b, _ in gathered)
        if bad < n:
            raise FloatingPointError(f"the gradient of {self._names[bad]} (the mean over the "
                                     "ranks) holds NaN or infinity; the step was refused "
                                     "and nothing was changed")
        if not needs_norm:
            return
        total_sq = gathered[0][1].copy()
        for _, part in gathered[1:]:                 # rank order: deterministic
            total_sq += part
        units = np.zeros(n, bool)
        if not np.isfinite(total_sq).all():
            # Squares beyond float64 (float64 gradients near 1e154 and above):
            # those parameters' sums again, in units of 2**-600.
            units = ~np.isfinite(total_sq)
            again = np.zeros(n)
            for (i, _, _), g in zip(self._order, pieces):
                if g is not None and units[i]:
                    again[i] += float(np.sum(np.square(g * _UNIT)))
            total_sq[units] = self._sum_over_ranks(again)[units]
        scale = np.ones(n)
        norms = np.zeros(n)
        for i, p in enumerate(self._params):
            norm = float(np.sqrt(total_sq[i])) / (_UNIT if units[i] else 1.0)
            clipnorm = groups[self._group_of[i]]["clipnorm"]
            if clipnorm is not None and norm > _in(clipnorm, p.dtype):
                scale[i] = _in(clipnorm, p.dtype) / norm
            norms[i] = norm * scale[i]
        if self.global_clipnorm is not None:
            big = norms.max(initial=0.0)
            joint = big * np.sqrt(np.sum((norms / big) ** 2)) if big > 0 else 0.0
            if joint > self.global_clipnorm:
                scale *= self.global_clipnorm / joint
        for (i, _, _), g in zip(self._order, pieces):
            if g is not None and scale[i] != 1.0:
                g *= g.dtype.type(scale[i])

    def _sum_over_ranks(self, values):
        parts = self.comm.allgather(values)
        total = parts[0].copy()
        for part in parts[1:]:                       # rank order: deterministic
            total += part
        return total

    def _all_gather(self):
        """Every rank's updated shard to every rank (``Allgatherv`` per
        dtype, in place in the flat buffer), copied into the parameters
        (the other ranks' shards: this rank's is there already)."""
        rank = self.comm.rank
        for dt, (idx, offsets, bounds) in self._buckets.items():
            flat = self._scratch[dt][0]
            lo, hi = int(bounds[rank]), int(bounds[rank + 1])
            for j, i in enumerate(idx):
                a, b = max(lo, offsets[j]), min(hi, offsets[j + 1])
                if b > a:
                    flat[a:b] = self._params[i].reshape(-1)[a - offsets[j]:b - offsets[j]]
            self.comm.Allgatherv(MPI.IN_PLACE, [flat, (np.diff(bounds), bounds[:-1])])
            for j, i in enumerate(idx):
                p = self._params[i].reshape(-1)
                o0, o1 = int(offsets[j]), int(offsets[j + 1])
                for a, b in ((o0, min(o1, lo)), (max(o0, hi), o1)):   # before, after
                    if b > a:
                        p[a - o0:b - o0] = flat[a:b]

    # --- state ---------------------------------------------------------------------

    def state_dict(self):
        """The whole state in ``expectigrad_np.Expectigrad``'s format, on
        every rank (collective: the shards are all-gathered)."""
        with self._lock:
            self._sync_hyper()
            core = self.core.state_dict()["state"]
            mine = [(i, a, b, core[j]) for j, (i, a, b) in enumerate(self._order) if b > a]
            state = {}
            for i, p in enumerate(self._params):
                entry = {"step": int(self._t[i]), "mean_sq": np.zeros(p.shape, p.dtype)}
                if self._sparse[i]:
                    entry["count"] = np.zeros(p.shape, np.uint32)
                state[i] = entry
            for part in self.comm.allgather(mine):
                for i, a, b, piece in part:
                    for key, value in piece.items():
                        if key == "step":
                            continue
                        if key not in state[i]:
                            state[i][key] = np.zeros(self._params[i].shape, value.dtype)
                        state[i][key].reshape(-1)[a:b] = value
            for i in state:                          # momentum where any rank has it
                if "momentum" not in state[i] and self._momentum[i] and self._t[i] > 0:
                    state[i]["momentum"] = np.zeros(self._params[i].shape,
                                                    self._params[i].dtype)
            groups, start = [], 0
            for g in self.param_groups:
                d = {k: v for k, v in g.items() if k != "params"}
                d["params"] = list(range(start, start + len(g["params"])))
                groups.append(d)
                start += len(g["params"])
            return {"step": self.step_count, "state": state, "param_groups": groups}

    def load_state_dict(self, state_dict):
        """Load a whole state dict (any rank count's, or one process's):
        each rank keeps its shard.  Checked before anything changes; every
        rank raises if any rank refused it.

        Parameters
        ----------
        state_dict : mapping
            A whole state dict, as ``state_dict()`` (collective) or
            ``expectigrad_np.Expectigrad.state_dict()`` returns it.

        Raises
        ------
        ValueError, TypeError
            On every rank, when any rank refused it; nothing changes.
        """
        with self._lock:
            _all_or_none(self.comm, "loading the state dict",
                         lambda: self._load_local(state_dict), self._snapshot,
                         self._restore)

    def _snapshot(self):
        """This rank's part of the state, and the parameters (copies)."""
        self._sync_hyper()
        groups = [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups]
        return (_copied(self.core.state_dict()), groups, self._t.copy(), self.step_count,
                self._had_momentum.copy(), [p.copy() for p in self._params])

    def _restore(self, saved):
        core, groups, t, step_count, had_momentum, params = saved
        self.core.load_state_dict(core)
        for group, values in zip(self.param_groups, groups):
            for key, value in values.items():
                if key != "sparse_counter":
                    group._load(key, value)
        self._synced = [self._hyper(g) for g in self.param_groups]
        self._changes.dirty = False
        self._t[...] = t
        self.step_count = step_count
        self._had_momentum = had_momentum
        for p, value in zip(self._params, params):
            np.copyto(p, value)

    def _load_local(self, state_dict):
        try:
            step, state, groups = (state_dict["step"], state_dict["state"],
                                   state_dict["param_groups"])
        except (KeyError, TypeError):
            raise ValueError("not an Expectigrad state dict: it needs 'step', 'state' "
                             "and 'param_groups'") from None
        if len(groups) != len(self.param_groups):
            raise ValueError(f"state dict has {len(groups)} param groups, the optimizer "
                             f"has {len(self.param_groups)}")
        entries = []
        for i, p in enumerate(self._params):
            entry = state.get(i, state.get(str(i))) if hasattr(state, "get") else None
            if entry is None:
                raise ValueError(f"state dict entry {i} ({self._names[i]}) is missing")
            for key, value in entry.items():
                if key != "step" and np.shape(value) != p.shape:
                    raise ValueError(f"state dict entry {i} ({self._names[i]}) '{key}' has "
                                     f"shape {np.shape(value)}, the parameter has {p.shape}")
            entries.append(entry)
        pieces = {}
        for j, (i, a, b) in enumerate(self._order):
            e = entries[i]
            pieces[j] = {k: (v if k == "step" else np.asarray(v).reshape(-1)[a:b])
                         for k, v in e.items()}
        inner_groups = []
        for gi, g in enumerate(groups):
            members = [j for j, (i, _, _) in enumerate(self._order) if self._group_of[i] == gi]
            inner_groups.append(dict({k: v for k, v in g.items()
                                      if k not in _CLIP_KEYS and k != "params"},
                                     params=members))
        clips = [{k: V.check_group_value(k, g.get(k), f"state dict param group {gi}: ")
                  for k in _CLIP_KEYS if k in g} for gi, g in enumerate(groups)]
        self.core.load_state_dict({"step": step, "state": pieces,
                                   "param_groups": inner_groups})
        # Checked by the core: now the rest.
        for gi, g in enumerate(groups):
            for key, value in g.items():
                if key not in ("params", "sparse_counter") and key not in _CLIP_KEYS:
                    self.param_groups[gi]._load(key, self.core.param_groups[gi][key])
            if callable(self.core.param_groups[gi]["lr"]):
                self.core.param_groups[gi]["lr"] = _held(self.core.param_groups[gi]["lr"])
            for key, value in clips[gi].items():
                self.param_groups[gi]._load(key, value)
        self._synced = [self._hyper(g) for g in self.param_groups]
        self._changes.dirty = False
        self._t[...] = [int(e["step"]) for e in entries]
        self._had_momentum = np.array(["momentum" in e or self.param_groups[g]["beta"] > 0
                                       for e, g in zip(entries, self._group_of)], dtype=bool)
        self.step_count = int(step)

    def save(self, path, *, params=True):
        """Gather the shards and write the whole state from rank 0, as one
        single-process checkpoint (collective).

        Parameters
        ----------
        path, params
            As for ``Expectigrad.save`` (replicated state): the file rank 0
            writes, and whether the parameter values go in it (default True).

        Raises
        ------
        OSError, ValueError, TypeError
            As for ``Expectigrad.save``: on every rank, if the write failed.
        """
        from .checkpoint import save
        sd = self.state_dict()
        error = None
        if self.comm.rank == 0:
            try:
                save(_Snapshot(self, sd), path, params=params)
            except (OSError, TypeError, ValueError) as exc:
                error = exc
        _agree(self.comm, error, "writing the checkpoint")

    def load(self, path):
        """Read a checkpoint (any rank count's, or one process's) on every
        rank, each rank taking its shard of the state.

        Parameters
        ----------
        path : str, bytes or os.PathLike
            As for ``Expectigrad.load`` (replicated state): any of the three
            kinds' checkpoints, readable by every rank.

        Raises
        ------
        OSError, ValueError
            As for ``Expectigrad.load``: on every rank if any refused the
            file, and nothing changes.
        """
        from .checkpoint import load
        with self._lock:
            _all_or_none(self.comm, "loading the checkpoint",
                         lambda: load(_Loading(self), path), self._snapshot, self._restore)

    def __repr__(self):
        return (f"ShardedExpectigrad(ranks={self.comm.size}, rank={self.comm.rank}, "
                f"params={len(self._params)}, shard elements="
                f"{sum(b - a for _, a, b in self._pieces)})")


class _Snapshot:
    """What ``checkpoint.save`` reads, from a state dict already gathered."""

    def __init__(self, opt, sd):
        self._sd, self.params, self.param_groups = sd, opt.params, opt.param_groups
        self.global_clipnorm = opt.global_clipnorm
        self._lock = opt._lock

    def state_dict(self):
        return self._sd


class _Loading:
    """What ``checkpoint.load`` reads and calls, for one rank's shard."""

    _dirty = False

    def __init__(self, opt):
        self._opt = opt
        self.params, self.param_groups = opt.params, opt.param_groups
        self.global_clipnorm, self._names = opt.global_clipnorm, opt._names
        self._sparse, self._momentum = opt._sparse, opt._momentum

    def _refresh(self):
        pass

    def load_state_dict(self, sd):
        self._opt._load_local(sd)


def _in(value, dtype):
    """A threshold as ``dtype`` holds it, back in float64 (inf beyond its range)."""
    value = float(value)
    return np.inf if value > float(np.finfo(dtype).max) else float(np.dtype(dtype).type(value))


# Squares that overflow float64 are summed again in units of 2**-600.
_UNIT = 2.0 ** -600
