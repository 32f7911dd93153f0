"""The stateful ``Expectigrad`` optimizer.

The class does bookkeeping only: it gathers parameters into param groups,
validates hyperparameters and gradients, evaluates schedules, keeps the
per-array step counts, and hands flat state to a backend bucket
(``backends/``: numpy, cpu or cuda, peers behind ``backends.base.Bucket``),
which calls its kernels.  The math is in ``reference.py``.
"""
from __future__ import annotations

import numbers
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import numpy as np

from . import _validation as V
from ._atomic import interrupts_deferred
from .backends import background as _background
from .backends import bucket_class
from .backends import layout as L
from .lazy import History
from .param_groups import Changes, ParamGroup, check_saved_groups, parse_groups
from .sparse import as_rows, is_row_sparse

_NONE_ID = id(None)

__all__ = ["Expectigrad", "ParamGroup"]

_BACKENDS = ("auto", "cpu", "numpy", "cuda")

# Public annotations: a parameter is a float32/float64 ndarray (or a device
# array); gradients follow the structure of the parameters.
Schedule = Callable[[int], float]
Gradients = np.ndarray | Sequence[Any] | None
PathLike = str | bytes | os.PathLike[str] | os.PathLike[bytes]


def _locked(method):
    """Run ``method`` holding the optimizer's lock: no step runs meanwhile."""
    import functools

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)
    return wrapper


def _step_number(value, where):
    """A step count: an integer (not a bool) in [0, 2**62)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral) \
            or not 0 <= value < 1 << 62:
        raise ValueError(f"{where} must be an integer in [0, 2**62), got {value!r}")
    return int(value)


def _has_numba():
    """numba can be imported (the cpu backend needs it; numpy does not)."""
    import importlib.util
    try:
        return importlib.util.find_spec("numba") is not None
    except ValueError:              # numba in sys.modules as None (blocked)
        return False


# Row-sparse steps that visit every row of an array take it this many rows
# at a time (the index rows of a visit), and squared norms of row-sparse
# values are summed this many elements at a time in float64: temporaries of
# this size, not of the array's.
_ROW_BLOCK = 1 << 16
_PIECE = 1 << 14


def _sum_of_squares(values):
    """``sum(values**2)`` in float64, a piece at a time (inf where it
    overflows)."""
    flat = values.reshape(-1)
    total = 0.0
    with np.errstate(over="ignore"):
        for lo in range(0, flat.size, _PIECE):
            total += float(np.sum(np.square(flat[lo:lo + _PIECE], dtype=np.float64)))
    return total


def _in_dtype(value, dtype):
    """A float64 threshold as ``dtype`` holds it (inf beyond its range)."""
    if value > float(np.finfo(dtype).max):
        return np.inf
    return float(dtype.type(value))


def _layout_of(p):
    """What a parameter's state is laid out for: shape, strides, dtype and
    data address (None for a device array)."""
    if not isinstance(p, np.ndarray):
        return None
    shape, strides = p.shape, p.strides
    if min(shape, default=2) < 2:
        # The stride of an axis of length 0 or 1 places nothing (NumPy's
        # contiguity flags ignore it too).
        strides = tuple(s if n > 1 else 0 for n, s in zip(shape, strides))
    return shape, strides, p.dtype, p.__array_interface__["data"][0]


def _check_consistent(t, arrays, where):
    """A loaded entry's state is one its step count ``t`` can have made: an
    element is counted at most once a step, and an array never stepped has
    all-zero state."""
    count = arrays.get("count")
    if count is not None and count.size and int(count.max()) > t:
        raise ValueError(f"{where}: 'count' holds {int(count.max())}, more than its step "
                         f"count {t} (an element is counted at most once a step)")
    if t == 0 and any(np.any(a) for a in arrays.values()):
        raise ValueError(f"{where}: its step count is 0 but its state is not all zero")


def _nonfinite(name):
    """The refusal of a step whose gradient of ``name`` is not finite."""
    return FloatingPointError(f"the gradient of {name} holds NaN or infinity; the step "
                              "was refused and nothing was changed")


def _on_device(x):
    """A device array: ``__cuda_array_interface__`` (numba, CuPy, PyTorch CUDA)
    or a device array of numba's CUDA simulator."""
    try:
        if hasattr(x, "__cuda_array_interface__"):
            return True
    except Exception:  # noqa: BLE001
        # It has one but refuses it (a torch CUDA tensor that requires grad):
        # the cuda backend says why.  Only where its type defines one, so an
        # error from elsewhere (a signal handler's) is not taken for that.
        if not hasattr(type(x), "__cuda_array_interface__"):
            raise
        return True
    return getattr(x, "__cuda_ndarray__", False) is True and not isinstance(x, np.ndarray)


class Expectigrad:
    r"""Expectigrad (Daley & Amato, 2020) on NumPy arrays, updated in place.

    Per element of each parameter array, on that array's ``t``-th step::

        s <- s + g**2;  n <- n + sign(g**2)   (or n = t without the sparse counter)
        m <- beta * m + (1 - beta) * g / (eps + sqrt(s / n))      0/0 := 0
        x <- x - lr / (1 - beta**t) * m       (beta = 0: x <- x - lr * g / (eps + sqrt(s/n)))

    Parameters
    ----------
    params : ndarray, sequence of ndarrays, or sequence of dicts
        The arrays to optimise (float32 or float64, any shape, updated in
        place), or param groups: dicts with ``"params"`` and any of the
        hyperparameters below, which override the defaults for that group.
    lr : float or callable, default 1e-3
        Learning rate > 0, or a schedule ``step -> lr`` (see ``schedules``)
        evaluated with the number of steps already taken.
    beta : float in [0, 1), default 0.9
        Outer-momentum decay.  0 disables momentum and bias correction.
    eps : float > 0, default 1e-8
        Added to the denominator.
    sparse_counter : bool, default True
        Count only nonzero gradients (True) or every step (False).
    weight_decay : float >= 0, default 0
        Decoupled weight decay, as in AdamW: before each step ``x <- x * (1
        - lr * weight_decay)`` with that step's (scheduled) ``lr``.
    maximize : bool, default False
        Maximise the objective: the gradient's sign is flipped.
    clipvalue : float > 0 or None
        Clip each gradient element to ``[-clipvalue, clipvalue]`` (first).
    clipnorm : float > 0 or None
        Rescale each (value-clipped) gradient array whose L2 norm exceeds
        ``clipnorm``.
    global_clipnorm : float > 0 or None
        Rescale all gradients together when their joint L2 norm (after
        ``clipvalue`` and ``clipnorm``) exceeds this: the original project's
        order.
    check_finite : bool, default True
        Refuse a step whose gradients hold NaN or infinity with
        ``FloatingPointError``, before anything changes.
    lazy : bool, default False
        Row-sparse gradients (``RowSparse``, ``scipy.sparse``) update only
        the rows they name; every other row of that array lags, and is
        brought up to date exactly, in closed form, when next touched, by a
        dense gradient, by ``sync()``, ``state_dict()`` or ``save()``
        (``lazy.py``).  False: each row-sparse step visits every row whose
        update is not exactly zero (rows with momentum left, or every row
        with weight decay or the dense counter), so parameters are always
        current.
    backend : {"auto", "cpu", "numpy", "cuda"}
        ``"cpu"``: fused Numba kernels; ``"numpy"``: the pure NumPy
        reference; ``"cuda"``: Numba CUDA kernels on device arrays (numba,
        CuPy, PyTorch CUDA: anything with ``__cuda_array_interface__``),
        updated in place with the state on the device; ``"auto"`` picks
        ``"cuda"`` for device arrays and ``"cpu"`` for host arrays.
    stream : CUDA stream or int, optional
        cuda backend only: the stream the kernels run on, a numba stream, a
        CuPy stream, a ``torch.cuda.Stream`` or an integer handle.  None
        (the default): the legacy default stream, which CuPy and PyTorch use
        unless told otherwise.  Gradients that name another stream in their
        array interface, and torch gradients made on another torch stream,
        are waited for on the device.  A stream with a host backend raises
        ``ValueError``.

    Example
    -------
    >>> W = np.zeros((3, 2), np.float32); b = np.zeros(2, np.float32)
    >>> opt = Expectigrad([W, b], lr=1e-2)
    >>> opt.step([np.ones((3, 2), np.float32), np.ones(2, np.float32)])
    """

    def __init__(self, params: np.ndarray | Sequence[np.ndarray] | Sequence[Mapping[str, Any]],
                 lr: float | Schedule = 1e-3, beta: float = 0.9, eps: float = 1e-8,
                 sparse_counter: bool = True, *, weight_decay: float = 0.0,
                 maximize: bool = False, clipvalue: float | None = None,
                 clipnorm: float | None = None, global_clipnorm: float | None = None,
                 check_finite: bool = True, lazy: bool = False,
                 backend: Literal["auto", "cpu", "numpy", "cuda"] = "auto",
                 stream: Any = None) -> None:
        defaults = dict(lr=lr, beta=beta, eps=eps, sparse_counter=sparse_counter,
                        weight_decay=weight_decay, maximize=maximize,
                        clipvalue=clipvalue, clipnorm=clipnorm)
        defaults = {k: V.check_group_value(k, v, "") for k, v in defaults.items()}
        self.global_clipnorm = global_clipnorm      # validated by the setters
        self.check_finite = check_finite
        self._lazy = V.check_bool("lazy", lazy)
        if backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
        self.defaults = defaults

        self._bare = isinstance(params, np.ndarray) or _on_device(params)
        groups = self._parse_groups(params, defaults)
        self._group_sizes = [len(g["params"]) for g in groups]
        self._params = [p for g in groups for p in g["params"]]
        self._names = [f"param group {gi} param {pi}" for gi, g in enumerate(groups)
                       for pi in range(len(g["params"]))]
        self._group_of = np.repeat(np.arange(len(groups)), self._group_sizes)
        V.check_no_overlap(self._params, self._names)
        self._layouts = [_layout_of(p) for p in self._params]

        self.backend = self._resolve_backend(backend)
        if stream is not None and self.backend != "cuda":
            raise ValueError(f"stream= is for the cuda backend (device arrays); this "
                             f"optimizer's backend is {self.backend!r}: leave stream out")
        self._stream = stream
        self._changes = Changes()
        self.param_groups = tuple(
            ParamGroup(g, f"param group {gi}: ", self._changes)
            for gi, g in enumerate(groups))
        self._t = np.zeros(len(self._params), dtype=np.int64)
        self._step_counter = np.zeros(1, dtype=np.int64)      # the kernels advance it
        self._lock = threading.RLock()
        self._buckets = self._make_buckets()
        self._ranges = None        # host_ranges of each bucket (several dtypes)
        self._last_scheduled = {}  # group -> (schedule's last value, checked value)
        # Row-sparse bookkeeping (sparse.py, lazy.py): per array, where it
        # lies (bucket, index), the rows whose momentum may be nonzero (eager)
        # with the step count they were found at, and the lazy history.
        self._where = {int(i): (b, k) for b in self._buckets for k, i in enumerate(b.slots)}
        self._live = {i: (np.zeros(0, np.int64), 0) for i in range(len(self._params))}
        self._histories = {}
        self._lagging = False       # some lazy history is pending
        self._quick = None          # see step(): cleared wherever the route may change
        self._had_momentum = np.zeros(len(self._params), dtype=bool)   # see _refresh
        self._refresh()

    @property
    def lazy(self) -> bool:
        """Whether row-sparse steps leave rows without a gradient lagging
        (fixed at construction: the lagging rows' history is kept for it)."""
        return self._lazy

    @property
    def step_count(self) -> int:
        """Steps taken (``step()`` calls that changed anything)."""
        return int(self._step_counter[0])

    @step_count.setter
    def step_count(self, value: int) -> None:
        # What a checkpoint can hold (schedules see it; save/load store it).
        self._step_counter[0] = _step_number(value, "step_count")

    @property
    def global_clipnorm(self) -> float | None:
        """Joint L2-norm threshold over all gradients (None: off)."""
        return self._global_clipnorm

    @global_clipnorm.setter
    def global_clipnorm(self, value: float | None) -> None:
        self._global_clipnorm = V.check_positive_or_none("global_clipnorm", value)
        self._mark_dirty()              # the single-array fast path reads it once

    @property
    def check_finite(self) -> bool:
        """Refuse gradients holding NaN or infinity (True) or skip the check."""
        return self._check_finite

    @check_finite.setter
    def check_finite(self, value: bool) -> None:
        self._check_finite = V.check_bool("check_finite", value)
        self._mark_dirty()              # the single-array fast path reads it once

    # --- construction -------------------------------------------------------

    def _parse_groups(self, params, defaults):
        return parse_groups([params] if self._bare else params, defaults,
                            self._check_param,
                            lambda p: isinstance(p, np.ndarray) or _on_device(p))

    def _check_param(self, p, where):
        if _on_device(p) and not isinstance(p, np.ndarray):
            from .backends.cuda.backend import as_device_parameter
            return as_device_parameter(p, where)   # zero-copy numba view
        return V.check_parameter(p, where)

    def _resolve_backend(self, backend):
        on_device = [not isinstance(p, np.ndarray) for p in self._params]
        if backend == "auto":
            backend = "cuda" if any(on_device) else ("cpu" if _has_numba() else "numpy")
        if backend == "cuda":
            from .backends.cuda.backend import check_device_parameters
            check_device_parameters(self._params, self._names)
            return backend
        if any(on_device):
            raise TypeError(f"backend {backend!r} needs host numpy arrays, but "
                            f"{self._names[on_device.index(True)]} is a device array")
        return backend

    def _make_buckets(self):
        cls = bucket_class(self.backend)
        extra = {"stream": self._stream} if self._stream is not None else {}
        by_dtype = {}
        for i, p in enumerate(self._params):
            by_dtype.setdefault(p.dtype.str, []).append(i)
        buckets = []
        for slots in by_dtype.values():
            groups = [self.param_groups[self._group_of[i]] for i in slots]
            buckets.append(cls(
                self._params[slots[0]].dtype, slots,
                [self._params[i] for i in slots], [self._names[i] for i in slots],
                sparse=[g["sparse_counter"] for g in groups],
                momentum=[g["beta"] > 0 for g in groups], **extra))
        return buckets

    def _mark_dirty(self):
        changes = self.__dict__.get("_changes")
        if changes is not None:         # None while __init__ sets the first values
            changes.dirty = True

    @property
    def _dirty(self):
        return self._changes.dirty

    def __getstate__(self):
        # The fast path holds a compiled entry point, which does not pickle,
        # and addresses, which a copy must not share: copies rebuild it.
        with self._lock:
            state = self.__dict__.copy()
            state["_fast"] = state["_quick"] = None
            del state["_lock"]
            return state

    def __setstate__(self, state):
        # A copy has new buffers: rebuild the fast path on the next step.
        state = dict(state)
        if "lazy" in state:                 # pickled when it was a plain attribute
            state["_lazy"] = state.pop("lazy")
        self.__dict__.update(state)
        self._layouts = [_layout_of(p) for p in self._params]
        self._lock = threading.RLock()
        self._fast = self._quick = None
        self._ranges = None
        self._changes.dirty = True

    def _refresh(self):
        """Recompute the per-array hyperparameters after a group changed
        (lagging rows of an array whose beta or counter changed are first
        brought up to date under the old ones).  The groups are marked clean
        first, so that an edit another thread makes meanwhile marks them
        again and is taken by the next step, not lost."""
        self._changes.dirty = False
        try:
            self._recompute_hyper()
        except BaseException:
            self._changes.dirty = True
            raise

    def _recompute_hyper(self):
        groups = self.param_groups
        per = lambda key, fill=None: np.array(  # noqa: E731
            [fill if (v := groups[gi][key]) is None else v for gi in self._group_of],
            dtype=np.float64)
        self._beta = per("beta")
        self._eps = per("eps")
        self._clipvalue = per("clipvalue", np.inf)
        self._clipnorm = per("clipnorm", np.inf)
        self._sparse = np.array([groups[gi]["sparse_counter"] for gi in self._group_of])
        for i, hist in self.__dict__.get("_histories", {}).items():
            if hist.pending and not hist.holds(self._beta[i], self._sparse[i]):
                self._sync_array(i)        # the buckets' flags are still the old ones
        self._last_scheduled = {}          # checked against the old hyperparameters
        self._weight_decay = per("weight_decay")
        self._maximize = np.array([groups[gi]["maximize"] for gi in self._group_of],
                                  dtype=bool)
        self._scheduled = any(callable(g["lr"]) for g in groups)
        self._static_lr = None if self._scheduled else per("lr")
        # Names this set of hyperparameters: buckets rewrite the rows that
        # depend only on them when it changes (see set_coefficients).
        self._hyper_key = object()
        # An array's momentum follows m <- beta*m + (1 - beta)*u on every
        # step once the array has had beta > 0, beta = 0 included (then
        # m = u), so switching momentum off and on again resumes from the
        # last u, as in the original optimizer; before that it keeps none
        # (m stays 0).  Per array, whatever else shares its bucket; the
        # bucket gets its buffer when one of its arrays first has beta > 0.
        self._had_momentum |= self._beta > 0
        self._momentum = self._had_momentum.copy()
        for b in self._buckets:
            if self._momentum[b.slots].any():
                b.ensure_momentum()
        self._fast = self._make_fast()

    # --- stepping -----------------------------------------------------------

    def _make_fast(self):
        """``_route()``, recording whether a kernel compiles in the background;
        both attributes change together, after ``_route`` has returned."""
        fast, warming = self._route()
        self._warming = warming
        self._quick = None
        return fast

    def _route(self):
        """Set up the compiled route of ``step`` for an optimizer of one
        dtype (``CpuBucket.step_path``), or of float32 and float64 arrays
        (``CpuBucket.pair_path``: both buckets in one call); None where the
        backend offers none.
        Returns ``(route, warming)``: ``warming``, where the route's kernel
        compiles in the background, is the count of finished compiles
        (``background.finished``) to ask again after, else None.

        Every coefficient but ``step_size``, ``1/t`` and ``decay`` is fixed until a
        param group changes, so it is written here once; the backend's entry
        point does the rest in one call: it locates the gradients in the
        sequence passed to ``step``, computes the coefficients from the
        float64 ``lr`` row, the ``hyper`` table (beta, weight decay, step
        sign) and the step counts (``self._t``, incremented in place),
        checks, clips and updates.
        """
        buckets = self._buckets
        if len(buckets) > 2 or not all(hasattr(b, "step_path") for b in buckets):
            return None, None
        n = len(self._params)
        schedules = [(gi, g["lr"]) for gi, g in enumerate(self.param_groups)
                     if callable(g["lr"])]
        lr = np.array(self._lr_per_array(schedule_step=None), dtype=np.float64)
        scalars = np.array([np.inf if self.global_clipnorm is None
                            else self.global_clipnorm, 0.0], dtype=np.float64)
        self._set_coefficients(lr, self._t + 1, np.ones(n, bool))
        hyper = np.empty((n, len(L.HYPER_FIELDS)), np.float64)
        hyper[:, 0] = self._beta
        hyper[:, 1] = self._weight_decay
        hyper[:, 2] = L.signs(self._maximize, self._momentum)[1]
        # Norm clipping waits for its kernel: the reference sums the squared
        # norm in another order (the kernels' is vectorised), so its steps
        # would agree to rounding, not bit for bit.
        wait = bool(np.isfinite(scalars[0]) or np.isfinite(self._clipnorm).any())
        if len(buckets) == 1:
            path = buckets[0].step_path(self._t, lr, hyper, scalars, self.check_finite,
                                        self._bare, n, self._step_counter, wait=wait)
        else:       # float32 and float64: both in one call, checked before either writes
            path = buckets[0].pair_path(buckets[1], self._t, lr, hyper, scalars,
                                        self.check_finite, n, self._step_counter, wait=wait)
        if path is _background.PENDING:
            # Compiling in the background: the reference steps meanwhile,
            # and the route is asked for again once the worker has finished
            # a job.
            return None, _background.finished()
        if path is None:
            return None, None
        entry, ctx_address, lock, holds_gil = path
        members = [np.flatnonzero(self._group_of == gi) for gi, _ in schedules]
        # lr (rewritten by the schedules each step), hyper and scalars are the
        # rows the kernel reads through the context row.
        return (entry, ctx_address, lock, lr, hyper, scalars, schedules, members,
                holds_gil), None

    def _write_scheduled_lr(self, fast):
        """Evaluate the schedules into the compiled route's float64 lr row.

        The route reads ``grads`` where it lies: a list or tuple with one
        C-contiguous, aligned ndarray (or None) per parameter, of its dtype
        and shape, or the bare array of a one-array optimizer.  Anything
        else returns a code for the general route, which stages, casts or
        says what is wrong.  A list is passed as it is to a kernel that holds
        the GIL, else as a tuple copy, so that no other thread can change it
        while the kernel reads it.
        """
        lr, schedules, members = fast[3], fast[6], fast[7]
        for (gi, schedule), idx in zip(schedules, members):
            lr[idx] = self._scheduled_lr(gi, schedule)

    def _scheduled_lr(self, gi, schedule):
        """Group ``gi``'s schedule at ``step_count``, checked like a
        constructor value and against the largest step size its parameters'
        dtypes can hold (``lr / (1 - beta)``)."""
        raw = schedule(self.step_count)
        last = self._last_scheduled.get(gi)
        if last is not None and last[0] is raw:
            return last[1]               # the same object as last step: checked then
        value = V.check_schedule_value(raw, self.step_count, self.param_groups[gi],
                                       f"param group {gi}: ")
        if isinstance(raw, float):       # immutable: the same object is the same value
            self._last_scheduled[gi] = (raw, value)
        return value

    def _lr_now(self, lr_now):
        """Each array's learning rate for a step on the general route: the
        values the compiled route took (``lr_now``), the exception a
        schedule raised there (raised now, after the gradients were
        checked), or, when it evaluated none, ``_lr_per_array()``."""
        if lr_now is None:
            return self._lr_per_array()
        if isinstance(lr_now, Exception):
            raise lr_now
        return lr_now

    def _lr_per_array(self, schedule_step=-1):
        """Each array's learning rate this step (float64); a schedule is
        evaluated at ``step_count`` (or taken as 0 with ``schedule_step``
        None: the compiled route fills those in every step)."""
        if not self._scheduled:
            return self._static_lr
        lrs = []
        for gi, g in enumerate(self.param_groups):
            lr = g["lr"]
            if callable(lr):
                lr = 0.0 if schedule_step is None else self._scheduled_lr(gi, lr)
            lrs.append(lr)
        return np.asarray(lrs, dtype=np.float64)[self._group_of]

    def _flatten_grads(self, grads):
        """Gradients in the structure of ``params`` -> one entry per array."""
        n = len(self._params)
        if self._bare:
            return [grads]
        if (isinstance(grads, np.ndarray) or grads is None or isinstance(grads, dict)
                or _on_device(grads)):
            raise TypeError("step() takes a sequence of gradients, one per parameter "
                            f"({n}), got {type(grads).__name__}")
        try:
            grads = list(grads)
        except TypeError:
            raise TypeError("step() takes a sequence of gradients, one per parameter "
                            f"({n}), got {type(grads).__name__}") from None
        nested = len(grads) == len(self.param_groups) and all(
            isinstance(g, (list, tuple)) for g in grads)
        if nested and all(len(g) == size for g, size in zip(grads, self._group_sizes)):
            grads = [g for group in grads for g in group]
        elif nested and len(grads) != n:
            for gi, (g, size) in enumerate(zip(grads, self._group_sizes)):
                if len(g) != size:
                    raise ValueError(
                        f"param group {gi} has {size} parameters but {len(g)} gradients "
                        "were given for it; pass one gradient per parameter, as one flat "
                        "sequence or one sequence per param group")
        if len(grads) != n:
            raise ValueError(f"expected {n} gradients, one per parameter (a flat sequence "
                             "in the order of the parameters, or one sequence per param "
                             f"group), got {len(grads)}")
        return grads

    def step(self, grads: Gradients) -> None:
        """Apply one Expectigrad step; parameters change in place.

        ``grads`` has the structure of ``params``: a bare array when the
        optimizer was given one array, else a sequence with one gradient per
        parameter (for param groups, a flat sequence or one sequence per
        group).  A ``None`` gradient skips that array for this step: neither
        it nor its state nor its step count changes.

        Parameters
        ----------
        grads : ndarray, sequence or None
            The gradients, in the structure of ``params``.  Each is a real
            array of its parameter's shape, a ``RowSparse`` or
            ``scipy.sparse`` row-sparse gradient, or ``None``; device arrays
            for the cuda backend.  Another float precision, and integer
            arrays, are cast to the parameter's dtype (as ``astype`` does:
            integers beyond 2**24 round in float32); boolean, complex,
            object and string arrays raise ``TypeError``.

        Raises
        ------
        ValueError, TypeError
            Malformed gradients (wrong number, structure, shape or kind,
            bad row indices), a parameter made read-only; the message names
            the parameter.
        FloatingPointError
            With ``check_finite``: NaN or infinity in a gradient.

        In every case nothing has been modified.
        """
        # A save() or state_dict() from another thread waits.  acquire and
        # release rather than ``with``: half the cost, most of a small step's.
        lock = self._lock
        lock.acquire()
        try:
            quick = self._quick
            if quick is not None and not self._changes.dirty:
                # The compiled route where nothing else can apply (see
                # _compiled_route): it takes any object, and whatever it cannot
                # read where it lies comes back for the general route.
                code, lr_now = quick[0](id(grads), quick[1], 0.0), None
            else:
                code, lr_now = self._compiled_route(grads)
            if code == -1:
                return                  # the kernel advanced every step count
            if code is not None and code >= 0:
                raise _nonfinite(self._names[code])   # code: its place in grads
            with interrupts_deferred():
                self._step_general(grads, lr_now)
        finally:
            lock.release()

    def _compiled_route(self, grads):
        """Step through the compiled route where it applies: ``(code,
        lr_now)``, ``code`` the kernel's (``step_path``) or None where the
        route was not taken, ``lr_now`` the schedules' values when they were
        evaluated, or the exception a schedule raised (the general route must
        not call them again: ``_lr_now``).  Where only
        this route can apply (a GIL-holding kernel, no schedule, nothing
        lagging or compiling), a step that went through sets ``_quick``:
        the next steps call the kernel directly, until something clears it
        (wherever the route may change)."""
        if self._changes.dirty:
            self._refresh()
        fast = self._fast
        if fast is None and self._warming is not None \
                and _background.finished() != self._warming:
            with interrupts_deferred():             # compiled since: take it
                fast = self._fast = self._make_fast()
        if fast is None or self._lagging:
            return None, None
        entry, ctx_address, kernel_lock, _, _, _, schedules, _, holds_gil = fast
        if self._bare or type(grads) is tuple:
            obj = grads
        elif type(grads) is list:
            # A kernel that holds the GIL reads the list itself (no other
            # thread can change it meanwhile); one that releases it reads a
            # tuple copy.
            obj = grads if holds_gil else tuple(grads)
        else:
            return None, None
        lr_now = None
        if schedules:
            if type(obj) is not np.ndarray and all(g is None for g in obj):
                return None, None       # no step: the general route calls no schedule
            try:
                self._write_scheduled_lr(fast)
            except Exception as exc:    # noqa: BLE001 - raised by the general route
                # The general route checks the gradients first and raises
                # this only for a step that happens: a bad gradient is
                # reported before a bad schedule value, as on every backend,
                # an all-None step does not fail, and the schedule is not
                # called twice.
                return None, exc
            lr_now = fast[3]
        if kernel_lock is None:
            code = entry(id(obj), ctx_address, 0.0)
        else:
            with kernel_lock:
                code = entry(id(obj), ctx_address, 0.0)
        if code == -1 and holds_gil and kernel_lock is None and not schedules:
            self._quick = (entry, ctx_address)
        return code, lr_now

    def _step_general(self, grads, lr_now=None):
        """The route for everything the compiled one does not read where it
        lies: gradients staged or cast here, several dtypes, the numpy and
        cuda backends.  Checks every bucket before changing any."""
        grads = self._flatten_grads(grads)
        row_sparse = [i for i, g in enumerate(grads) if is_row_sparse(g)]
        if row_sparse:
            return self._step_rows(grads, row_sparse, lr_now)
        synced = self._sync_for_dense(grads)
        # Object addresses of the gradients: None is one object, so this gives
        # the active arrays, and the buckets locate the rest from it.
        ids = np.fromiter(map(id, grads), np.int64, len(grads))
        active = ids != _NONE_ID
        if not active.any():
            return
        self._check_writeable(np.flatnonzero(active).tolist())
        buckets = self._buckets
        if self._warming is not None:
            # The kernel compiles in the background (a one-bucket optimizer):
            # the numpy backend's step on the same state, with the same bits.
            buckets = [b.reference() for b in buckets]
        single = len(buckets) == 1                 # then its slots are 0..n-1
        for b in buckets:
            b.load_gradients(grads if single else [grads[i] for i in b.slots],
                             ids if single else ids[b.slots])
        if not single:
            self._stage_across_buckets(grads, [True] * len(self._buckets))
        lr = self._lr_now(lr_now)
        t_new = self._t + active
        self._set_coefficients(lr, t_new, active, buckets)
        gclip = np.inf if self.global_clipnorm is None else self.global_clipnorm
        sumsq = [0.0] * len(buckets)
        if len(buckets) > 1 and (self.check_finite or gclip < np.inf):
            # Look at every bucket before changing any.  Passing gclip only
            # says whether the squared norms are needed (the kernels skip
            # them otherwise); a first pass applies no scale.
            for j, b in enumerate(buckets):
                bad, sumsq[j] = b.step(self.check_finite, gclip, 0.0, update=False)
                self._raise_nonfinite(b, bad)
        check = self.check_finite and len(buckets) == 1
        for j, b in enumerate(buckets):
            others = sum(sq for i, sq in enumerate(sumsq) if i != j)   # no inf - inf
            bad, _ = b.step(check, gclip, others)
            self._raise_nonfinite(b, bad)
        self._t[...] = t_new        # in place: the fast path holds this array
        self.step_count += 1
        for i in synced:
            self._histories[i].reset(int(t_new[i]))

    def _stage_across_buckets(self, grads, loaded):
        """A gradient may be (a view of) another dtype's parameter, which that
        bucket's step writes first: each bucket that ``loaded`` its gradients
        reads a copy of those."""
        if self._ranges is None:
            self._ranges = [b.host_ranges() for b in self._buckets]
        for b, here in zip(self._buckets, loaded):
            if not here:
                continue
            mine = [grads[i] for i in b.slots]
            for other, (lo, hi) in zip(self._buckets, self._ranges):
                if other is not b:
                    b.stage_overlapping(mine, lo, hi)

    def _set_coefficients(self, lr, t_new, active, buckets=None):
        """Every bucket's coefficient and flag rows for this step."""
        buckets = self._buckets if buckets is None else buckets
        single = len(buckets) == 1                 # then its slots are 0..n-1
        for b in buckets:
            s = slice(None) if single else b.slots     # a view, not a gathered copy
            b.set_coefficients(lr[s], self._beta[s], self._eps[s], t_new[s],
                               self._clipvalue[s], self._clipnorm[s], active[s],
                               self._sparse[s], self._momentum[s],
                               static_key=self._hyper_key,
                               weight_decay=self._weight_decay[s], maximize=self._maximize[s])

    # --- row-sparse steps -----------------------------------------------------

    def _step_rows(self, grads, row_sparse, lr_now):
        """A step with row-sparse gradients (``sparse.py``): the dense step of
        their densified gradients, visiting only rows that can change.

        Everything is checked first (gradients, finiteness, norms); then the
        dense arrays step as usual, with the row-sparse ones' squared norms
        in the joint norm, and each row-sparse array steps its rows."""
        names = self._names
        rows_of = {}
        dense = list(grads)
        self._check_writeable(row_sparse)
        for i in row_sparse:
            p = self._params[i]
            rows, vals = as_rows(grads[i], p, names[i])
            dense[i] = None
            if self.check_finite and not np.isfinite(vals).all():
                raise FloatingPointError(f"the gradient of {names[i]} holds NaN or "
                                         "infinity; the step was refused and nothing was "
                                         "changed")
            rows_of[i] = (rows, vals)
        if any(isinstance(self._params[i], np.ndarray) and not self._params[i].flags.c_contiguous
               for i in rows_of):
            return self._step_densified(grads, rows_of)
        # Squared norms of the row-sparse gradients, as the dense step takes
        # them: value-clipped first.
        gclip = np.inf if self.global_clipnorm is None else self.global_clipnorm
        sumsq, scale = {}, {}
        for i, (_, vals) in rows_of.items():
            # The thresholds in the array's dtype, as the kernels hold them.
            clipvalue, clipnorm = (_in_dtype(v, vals.dtype)
                                   for v in (self._clipvalue[i], self._clipnorm[i]))
            if clipnorm == np.inf and gclip == np.inf:
                sumsq[i], scale[i] = 0.0, 1.0      # no norm needed
                continue
            if clipvalue != np.inf:     # ``vals`` is a copy (as_rows): clipped in place,
                np.clip(vals, -clipvalue, clipvalue, out=vals)      # as the kernels would
            sumsq[i] = _sum_of_squares(vals)
            scale[i] = L.clip_scale(sumsq[i], clipnorm)
        if not all(sq < np.inf for sq in sumsq.values()):
            return self._step_densified(grads, rows_of)     # the overflow-safe norms
        rows_total = sum(sq * scale[i] ** 2 for i, sq in sumsq.items())

        synced = self._sync_for_dense(dense)
        ids = np.fromiter(map(id, dense), np.int64, len(dense))
        active_dense = ids != _NONE_ID
        active = active_dense.copy()
        active[row_sparse] = True
        self._check_writeable(np.flatnonzero(active_dense).tolist())
        stepping = [bool(active_dense[b.slots].any()) for b in self._buckets]
        for b, dense_here in zip(self._buckets, stepping):
            if dense_here:
                b.load_gradients([dense[i] for i in b.slots], ids[b.slots])
        if len(self._buckets) > 1 and any(stepping):
            self._stage_across_buckets(dense, stepping)
        lr = self._lr_now(lr_now)
        t_new = self._t + active
        if self.lazy:
            for i in rows_of:
                if lr[i] * self._weight_decay[i] >= 1.0:
                    raise ValueError(
                        f"{names[i]}: lazy=True needs lr * weight_decay < 1 (got "
                        f"{lr[i] * self._weight_decay[i]:g}); nothing was changed")
        self._set_coefficients(lr, t_new, active_dense)
        dense_sumsq = [0.0] * len(self._buckets)
        for j, b in enumerate(self._buckets):
            if stepping[j] and (self.check_finite or gclip < np.inf):
                bad, dense_sumsq[j] = b.step(self.check_finite, gclip, 0.0, update=False)
                self._raise_nonfinite(b, bad)
        if not all(sq < np.inf for sq in dense_sumsq):
            return self._step_densified(grads, rows_of)
        g_scale = L.clip_scale(sum(dense_sumsq) + rows_total, gclip)
        # Everything checked: now write.
        for j, b in enumerate(self._buckets):
            if stepping[j]:
                others = sum(sq for i, sq in enumerate(dense_sumsq) if i != j) + rows_total
                b.step(False, gclip, others)
        for i, (rows, vals) in rows_of.items():
            self._step_array_rows(i, rows, vals, scale[i] * g_scale, int(t_new[i]))
        self._t[...] = t_new
        self.step_count += 1
        for i in synced:
            self._histories[i].reset(int(t_new[i]))

    def _step_densified(self, grads, rows_of):
        """The step with each row-sparse gradient made dense: for parameters
        that are not C-contiguous, and norms beyond the float64 range."""
        dense = list(grads)
        for i, (rows, vals) in rows_of.items():
            p = self._params[i]
            g = np.zeros(p.shape, p.dtype)
            g.reshape(p.shape[0], -1)[rows] = vals
            if not isinstance(p, np.ndarray):           # a device parameter
                from numba import cuda
                g = cuda.to_device(g)
            dense[i] = g
        return self._step_general(dense)

    def _step_array_rows(self, i, rows, vals, scale, t_new):
        """Step array ``i``'s rows: lazily (catch the touched rows up, step
        them, record the step) or eagerly (every row that can change)."""
        b, k = self._where[i]
        nrows = b.shapes[k][0]
        if self.lazy:
            hist = self._histories.get(i)
            if hist is None:
                hist = self._histories[i] = History(nrows, t_new - 1, self._beta[i],
                                                    self._sparse[i], b.dtype)
            elif not hist.pending:          # dense steps or a new beta since the last sync
                hist.reset(t_new - 1, self._beta[i], self._sparse[i])
            b.update_rows(k, rows, np.arange(rows.size), vals, scale,
                          self._lazy_coefficients(i, rows, t_new - 1))
            hist.record(b.coef[k, L.STEP], b.coef[k, L.DECAY], b.window_sum)
            hist.last[rows] = t_new
            self._lagging = True
            self._quick = None
        else:
            f = b.flags[k]
            everything = b.coef[k, L.DECAY] != 1 or not f[L.SPARSE]
            live = None
            if f[L.MOMENTUM] and not everything:
                known = self._live.get(i)
                if known is None or known[1] != t_new - 1:
                    everything = True       # other steps since: any row may have momentum
                else:
                    live = known[0]
            if everything or (live is not None and 4 * live.size > nrows):
                # Every row (cheaper than merging the sets), a block of rows
                # at a time: the index rows stay this small, however many
                # rows the array has.
                found = []
                for lo in range(0, nrows, _ROW_BLOCK):
                    hi = min(lo + _ROW_BLOCK, nrows)
                    visit = np.arange(lo, hi)
                    a, z = np.searchsorted(rows, (lo, hi))
                    sel = np.full(hi - lo, -1, np.int64)
                    sel[rows[a:z] - lo] = np.arange(a, z)
                    nonzero = b.update_rows(k, visit, sel, vals, scale)
                    if nonzero is not None:
                        found.append(visit[nonzero])
                if f[L.MOMENTUM]:
                    self._live[i] = (np.concatenate(found) if found
                                     else np.zeros(0, np.int64), t_new)
            else:
                if live is not None and live.size:
                    visit = np.union1d(rows, live)
                    sel = np.full(visit.size, -1, np.int64)
                    sel[np.searchsorted(visit, rows)] = np.arange(rows.size)
                else:
                    visit, sel = rows, np.arange(rows.size)
                nonzero = b.update_rows(k, visit, sel, vals, scale)
                if nonzero is not None:
                    self._live[i] = (visit[nonzero], t_new)
        b.flags[k, L.UNIFORM] = 0           # untouched rows kept their counts

    def _lazy_coefficients(self, i, rows, T):
        """``(B, C, D, R)`` bringing rows ``rows`` of lazy array ``i`` up to
        date after step ``T`` (``lazy.coefficients``); None when none of
        them lags."""
        hist = self._histories[i]
        b, _ = self._where[i]
        B, C, D, R = (np.empty(rows.size) for _ in range(4))
        # The rows' last steps gathered by NumPy first: scattered loads that
        # a tight loop overlaps (the table of a large array misses the cache).
        if not b.coefficients(hist.last[rows], hist.base, T, hist.s, hist.d, hist.cumlog,
                              hist.beta, hist.stop_bound(), hist.decayed, hist.cwin,
                              hist.window, hist.beta_window, B, C, D, R):
            return None
        return B, C, D, R

    def _catch_up(self, i, rows, T):
        """Bring rows ``rows`` of lazy array ``i`` up to date after step ``T``."""
        coefficients = self._lazy_coefficients(i, rows, T)
        if coefficients is not None:
            b, k = self._where[i]
            b.catch_up_rows(k, rows, *coefficients)

    def _sync_array(self, i):
        hist = self._histories[i]
        if not hist.pending:
            return
        self._check_writeable([i])
        b, k = self._where[i]
        T = int(self._t[i])
        n = T - hist.base
        B, C, D = (np.empty(n + 1) for _ in range(3))
        b.all_coefficients(T, hist.base, hist.s, hist.d, hist.beta, B, C, D)
        t0 = np.maximum(hist.last, hist.base)
        rows = np.flatnonzero(t0 < T)
        at = t0[rows] - hist.base
        b.catch_up_rows(k, rows, B[at], C[at], D[at], t0[rows] / T)
        hist.reset(T)

    def _sync_all(self):
        for i in self._histories:
            self._sync_array(i)
        self._lagging = False

    def _check_dense_gradients(self, grads):
        """Raise as the step would for any of the dense ``grads``: a shape or
        kind it cannot take, or (``check_finite``) NaN or infinity in the
        parameter's dtype.  For a step that must write something before the
        kernels check (lagging rows caught up)."""
        for g, p, name in zip(grads, self._params, self._names):
            if g is None or not isinstance(p, np.ndarray):
                continue
            g = V.as_gradient(g, p, name)
            if self.check_finite:
                with np.errstate(over="ignore", invalid="ignore"):
                    finite = np.isfinite(g.astype(p.dtype, copy=False)).all()
                if not finite:
                    raise _nonfinite(name)

    def _sync_for_dense(self, grads):
        """Sync the lazy arrays that take a dense gradient this step; their
        indices (their histories restart after the step)."""
        if not self._histories:
            return []
        synced = [i for i in self._histories if grads[i] is not None]
        if synced:
            # The catch-up writes: only for a step that will happen.
            self._check_dense_gradients(grads)
        self._check_writeable(synced)
        if synced:
            with interrupts_deferred():
                for i in synced:
                    self._sync_array(i)
        self._lagging = any(h.pending for h in self._histories.values())
        return synced

    @_locked
    def sync(self, param: int | np.ndarray | None = None, rows: Any = None) -> None:
        """Bring lagging rows of ``lazy=True`` parameters up to date (a no-op
        for rows that do not lag, and without ``lazy``).

        With no arguments, every row of every parameter: afterwards each
        holds exactly what dense steps would have given it (to rounding).
        ``param`` (the array, or its index in ``params``) limits it to one
        parameter, and ``rows`` (integer indices) to those of its rows, at
        a cost proportional to their number: read the rows a computation
        needs, e.g. an embedding's rows of the next batch, with
        ``opt.sync(E, batch_rows)`` before using them.

        Parameters
        ----------
        param : ndarray or int, optional
            One parameter (the array itself, or its index in ``params``);
            default: every parameter.
        rows : array_like of int, optional
            Rows of ``param`` (indices along its first axis, in range);
            default: every row.  Needs ``param``.

        Raises
        ------
        ValueError, TypeError
            A parameter or rows the optimizer does not have.
        """
        with interrupts_deferred():
            if param is None:
                if rows is not None:
                    raise ValueError("sync(rows=...) needs the parameter they belong to")
                self._sync_all()
                return
            i = self._index_of(param)
            hist = self._histories.get(i)
            if rows is None:
                if hist is not None:
                    self._sync_array(i)
                self._lagging = any(h.pending for h in self._histories.values())
                return
            p = self._params[i]
            if p.ndim == 0:
                raise ValueError(f"{self._names[i]} is 0-d: it has no rows")
            from .sparse import _indices
            rows = np.unique(_indices(rows, p.shape[0], f"sync rows of {self._names[i]}"))
            if hist is not None and hist.pending:
                self._check_writeable([i])
                T = int(self._t[i])
                self._catch_up(i, rows, T)
                hist.last[rows] = T

    def _index_of(self, param):
        if isinstance(param, (int, np.integer)) and not isinstance(param, bool):
            if not 0 <= param < len(self._params):
                raise ValueError(f"parameter index {param} out of range: the optimizer "
                                 f"has {len(self._params)} parameters")
            return int(param)
        for i, p in enumerate(self._params):
            if p is param:
                return i
        raise ValueError("sync(param=...) takes one of the optimizer's parameter arrays "
                         "(the same object) or its index in opt.params")

    def _check_writeable(self, indices):
        """Parameters about to be updated are writeable, and laid out as when
        the optimizer was built (their state is laid out for that)."""
        layouts = getattr(self, "_layouts", None)
        for i in indices:
            p = self._params[i]
            if not isinstance(p, np.ndarray):
                continue
            if not p.flags.writeable:
                raise ValueError(f"{self._names[i]} has been made read-only; parameters "
                                 "are updated in place (set x.flags.writeable = True, or "
                                 "pass None as its gradient); nothing was changed")
            if layouts is not None and _layout_of(p) != layouts[i]:
                then, now = layouts[i], _layout_of(p)
                what = "; ".join(f"{name} {a} -> {b}" for name, a, b in zip(
                    ("shape", "strides", "dtype", "memory at"), then, now) if a != b)
                raise ValueError(f"{self._names[i]} was changed in place since the "
                                 f"optimizer was built ({what}); its state is laid out "
                                 "for the array as it was. Restore it, or build a new "
                                 "optimizer (load_state_dict carries the state over); "
                                 "nothing was changed")

    def _raise_nonfinite(self, bucket, bad):
        if bad >= 0:
            raise _nonfinite(bucket.names[bad])

    # --- state --------------------------------------------------------------

    @property
    def params(self) -> list[np.ndarray]:
        """All parameter arrays, group by group."""
        return list(self._params)

    @_locked
    def state_dict(self) -> dict[str, Any]:
        """Optimizer state as plain NumPy arrays and numbers (copies).

        ``{"step": int, "state": {i: {"step", "mean_sq", ["count"],
        ["momentum"]}}, "param_groups": [{hyperparameters, "params": [i...]}]}``
        where ``i`` indexes the parameters group by group.  ``count`` appears
        for arrays with the sparse counter, ``momentum`` for ``beta > 0``.
        """
        if self._dirty:
            self._refresh()
        self.sync()
        state = {}
        for b in self._buckets:
            for k, i in enumerate(b.slots):
                stored = b.read_state(k)
                entry = {"step": int(self._t[i]), "mean_sq": stored["mean_sq"]}
                if self._sparse[i]:
                    entry["count"] = stored["count"]
                if self._momentum[i]:
                    entry["momentum"] = stored["momentum"]
                state[int(i)] = entry
        groups, start = [], 0
        for g, size in zip(self.param_groups, self._group_sizes):
            d = {k: v for k, v in g.items() if k != "params"}
            d["params"] = list(range(start, start + size))
            groups.append(d)
            start += size
        return {"step": self.step_count, "state": state, "param_groups": groups}

    @_locked
    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load ``state_dict()`` output; everything is checked before anything
        changes, and a mismatch raises ``ValueError`` naming what differs.
        Lagging rows of lazy parameters are brought up to date first (the
        parameters are not part of the state).

        Parameters
        ----------
        state_dict : mapping
            As ``state_dict()`` returns it: ``"step"``, ``"state"`` with
            per-array ``step``, ``mean_sq``, ``count`` and ``momentum``
            entries, and ``"param_groups"``.  Values are copied, and must fit the parameters'
            shapes and dtypes (step counts in [0, 2**62), counts below 2**32).

        Raises
        ------
        ValueError, TypeError
            The state does not match the optimizer; nothing changes.
        """
        self.sync()
        try:
            step = state_dict["step"]
            state = state_dict["state"]
            groups = state_dict["param_groups"]
        except (KeyError, TypeError):
            raise ValueError("not an Expectigrad state dict: it needs 'step', "
                             "'state' and 'param_groups'") from None
        step = _step_number(step, "state dict 'step'")
        if not isinstance(state, Mapping) or not isinstance(groups, (list, tuple)):
            raise ValueError("not an Expectigrad state dict: 'state' must be a mapping "
                             "and 'param_groups' a list")
        check_saved_groups(groups, self._group_sizes)
        new_hyper = []
        for gi, g in enumerate(groups):
            where = f"state dict param group {gi}: "
            hyper = {k: V.check_group_value(k, v, where)
                     for k, v in g.items() if k != "params"}
            if "eps" in hyper:
                V.check_eps_dtypes(hyper["eps"], self.param_groups[gi]["params"], where)
            # As an assignment to the group would check them (param_groups.py).
            merged = {k: hyper.get(k, self.param_groups[gi][k])
                      for k in ("lr", "beta", "weight_decay")}
            V.check_step_size_dtypes(merged["lr"], merged["beta"],
                                     self.param_groups[gi]["params"], where,
                                     merged["weight_decay"])
            if hyper.get("sparse_counter", self.param_groups[gi]["sparse_counter"]) \
                    != self.param_groups[gi]["sparse_counter"]:
                raise ValueError(f"{where}sparse_counter differs from the optimizer's")
            new_hyper.append(hyper)
        if len(state) != len(self._params):
            raise ValueError(f"state dict has state for {len(state)} arrays, the "
                             f"optimizer has {len(self._params)}")
        loaded = []
        for i, p in enumerate(self._params):
            entry = state.get(i, state.get(str(i)))
            where = f"state dict entry {i} ({self._names[i]})"
            if entry is None:
                raise ValueError(f"{where} is missing")
            if not isinstance(entry, Mapping):
                raise ValueError(f"{where} must be a mapping of 'step', 'mean_sq', ..., "
                                 f"got {type(entry).__name__}")
            t = _step_number(entry.get("step"), f"{where}: 'step'")
            arrays = {}
            needed = {"mean_sq": p.dtype}
            if self.param_groups[self._group_of[i]]["sparse_counter"]:
                needed["count"] = np.dtype(np.uint32)
            beta = new_hyper[self._group_of[i]].get(
                "beta", self.param_groups[self._group_of[i]]["beta"])
            for key, dtype in needed.items():
                if key not in entry:
                    raise ValueError(f"{where}: '{key}' is missing")
                arrays[key] = self._state_array(entry[key], p, dtype, f"{where} '{key}'")
            if "momentum" in entry:
                arrays["momentum"] = self._state_array(
                    entry["momentum"], p, p.dtype, f"{where} 'momentum'", nonnegative=False)
            elif beta > 0 and t > 0:
                raise ValueError(f"{where}: 'momentum' is missing but beta > 0")
            _check_consistent(t, arrays, where)
            loaded.append((int(t), arrays))
        # Everything checked: now write, all of it (also under Ctrl-C).
        with interrupts_deferred():
            for gi, hyper in enumerate(new_hyper):
                for key, value in hyper.items():
                    if key != "sparse_counter":
                        self.param_groups[gi]._load(key, value)
            self._had_momentum = np.array(["momentum" in arrays for _, arrays in loaded],
                                          dtype=bool).reshape(len(self._params))
            self._refresh()
            for b in self._buckets:
                for k, i in enumerate(b.slots):
                    t, arrays = loaded[i]
                    self._t[i] = t
                    b.write_state(k, arrays, t)
            self.step_count = int(step)
            self._live, self._histories, self._lagging = {}, {}, False
            self._mark_dirty()          # a loaded momentum buffer changes the flags

    def save(self, path: PathLike, *, params: bool = True) -> None:
        """Write a checkpoint to ``path`` atomically: parameters (unless
        ``params=False``), state, step counts and hyperparameters in a
        versioned ``.npz`` (see ``expectigrad_np.checkpoint``).

        Parameters
        ----------
        path : str, bytes or os.PathLike
            The file to write (exactly this name; no suffix is added).  A
            save interrupted at any point leaves the previous file intact.
        params : bool, default True
            Also store the parameter values.

        Raises
        ------
        ValueError
            ``path`` exists and is not a regular file.
        OSError
            The file cannot be written.
        """
        from .checkpoint import save
        self.sync()
        save(self, path, params=params)

    @_locked
    def load(self, path: PathLike) -> None:
        """Restore a checkpoint written by ``save``; a truncated, corrupt or
        mismatched file raises ``ValueError`` naming it, with nothing changed.

        Parameters
        ----------
        path : str, bytes or os.PathLike
            A checkpoint written by ``save`` for an optimizer with the same
            layout (groups, shapes, dtypes) and hyperparameters.

        Raises
        ------
        FileNotFoundError
            No file at ``path``.
        ValueError
            The file is truncated, corrupt, of another format version or
            does not match; nothing changes.
        """
        from .checkpoint import load
        load(self, path)

    @staticmethod
    def _state_array(value, p, dtype, where, nonnegative=True):
        """``value`` as a state array of ``dtype``: checked to be of the
        parameter's shape, real, finite, within range of ``dtype`` (no
        overflow to inf, no wrapped counts) and, where asked, >= 0."""
        a = np.asarray(value)
        dtype = np.dtype(dtype)
        if a.shape != p.shape:
            raise ValueError(f"{where} has shape {a.shape}, the parameter has {p.shape}")
        if a.dtype.kind not in "fiu" or (dtype.kind == "u" and a.dtype.kind == "f"):
            raise ValueError(f"{where} has dtype {a.dtype}, expected {dtype}")
        if a.dtype.kind == "f" and not np.all(np.isfinite(a)):
            raise ValueError(f"{where} holds NaN or infinity")
        if nonnegative and np.any(a < 0):
            raise ValueError(f"{where} holds negative values")
        if a.size:
            if dtype.kind == "f":
                big = float(np.max(np.abs(a)))
                if big > float(np.finfo(dtype).max):
                    raise ValueError(f"{where} holds {big:.3g}, which overflows {dtype}")
            else:
                info = np.iinfo(dtype)
                if int(np.max(a)) > info.max or int(np.min(a)) < info.min:
                    raise ValueError(f"{where} holds values outside {dtype}'s range "
                                     f"[{info.min}, {info.max}]")
        return a.astype(dtype)

    def __repr__(self):
        groups = ", ".join(
            "{" + ", ".join(f"{k}={v!r}" for k, v in g.items() if k != "params")
            + f", params={len(g['params'])} arrays}}" for g in self.param_groups)
        return (f"Expectigrad(backend={self.backend!r}, check_finite={self.check_finite}, "
                f"global_clipnorm={self.global_clipnorm}, groups=[{groups}])")
