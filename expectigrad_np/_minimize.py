r"""``minimize``: Expectigrad behind a ``scipy.optimize.minimize``-style call.

Deterministic mode (``data=None``) minimises ``f(x, *args)``; each
iteration evaluates ``f`` and its gradient ``g`` at ``x`` and takes one
Expectigrad step, per element::

    s <- s + g**2 ;  n <- n + sign(g**2)   (or n = t without the sparse counter)
    m <- beta * m + (1 - beta) * g / (eps + sqrt(s / n))       0/0 := 0
    x <- x - lr / (1 - beta**t) * m       (beta = 0: x <- x - lr * g / (eps + sqrt(s/n)))
    x <- clip(x, lb, ub)                  (with bounds: a projected step)

Stochastic mode (``data`` given) does the same with ``f(x, batch, *args)``
and one step per minibatch.  The steps themselves are those of the
``Expectigrad`` class: ``minimize`` builds one optimizer over a float copy of
``x0`` and only adds evaluation, projection, stopping and reporting.

scipy is imported when ``minimize`` is first called, not with the package.
"""
from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from . import _ranks as R
from . import _validation as V
from .optimizer import Expectigrad

__all__ = ["minimize"]

# status codes, one per way a run ends (0, 1, 3 and 99 as in scipy)
GTOL, MAXITER, BUDGET, NONFINITE, CALLBACK = 0, 1, 2, 3, 99

_FD_METHODS = ("2-point", "3-point", "cs")


def _count_positive_int(name, value, allow_none=True):
    if value is None and allow_none:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return int(value)


def _check_norm(norm):
    """An order ``numpy.linalg.norm`` takes for a vector: None (2), a real
    number or +-inf (not "fro" or "nuc", which are for matrices)."""
    if norm is None:
        return norm
    if isinstance(norm, (bool, np.bool_)) or not isinstance(norm, numbers.Real) \
            or math.isnan(norm):
        raise ValueError(f"norm must be a vector norm order for numpy.linalg.norm (a "
                         f"number such as 2 or np.inf), got {norm!r}")
    return norm


def _nonneg_real(name, value):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    value = float(value)
    if math.isnan(value) or value < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return value


def _start_point(x0):
    """A float copy of ``x0``: float32/float64 kept, integers/bools -> float64."""
    if isinstance(x0, np.ndarray):
        V._refuse_subclass(x0, "x0")        # masked elements would be optimized
    a = np.asarray(x0)
    if a.dtype.kind in "biu":
        dtype = np.dtype(np.float64)
    elif a.dtype.kind == "f" and a.dtype.itemsize in (4, 8) and a.dtype.fields is None:
        dtype = np.dtype(f"f{a.dtype.itemsize}")      # native byte order: x is a copy
    elif a.dtype.kind == "f":
        raise TypeError(f"x0 has dtype {a.dtype}; minimize works in float32 or "
                        "float64 (convert x0 with .astype)")
    else:
        raise TypeError(f"x0 has dtype {a.dtype}; it must hold real numbers")
    if a.size == 0:
        raise ValueError("x0 is empty: give at least one variable")
    x = np.array(a, dtype=dtype, order="C", copy=True)
    if not np.all(np.isfinite(x)):
        raise ValueError("x0 holds NaN or infinity")
    return x


def _bounds_arrays(bounds, x):
    """``(lb, ub)`` in ``x``'s shape and dtype, rounded inwards, or None."""
    if bounds is None:
        return None
    from scipy.optimize import Bounds

    if isinstance(bounds, Bounds):
        lo, hi = bounds.lb, bounds.ub
        try:
            lo = np.broadcast_to(np.asarray(lo, dtype=np.float64), x.shape)
            hi = np.broadcast_to(np.asarray(hi, dtype=np.float64), x.shape)
        except ValueError:
            raise ValueError(f"bounds lb/ub of shapes {np.shape(bounds.lb)} and "
                             f"{np.shape(bounds.ub)} do not fit x0 of shape "
                             f"{x.shape}") from None
    else:
        try:
            pairs = list(bounds)
        except TypeError:
            raise TypeError("bounds must be a scipy.optimize.Bounds or a sequence of "
                            f"(lo, hi) pairs, got {type(bounds).__name__}") from None
        if len(pairs) != x.size:
            raise ValueError(f"bounds has {len(pairs)} (lo, hi) pairs but x0 has "
                             f"{x.size} elements")
        lo = np.empty(x.size)
        hi = np.empty(x.size)
        for i, pair in enumerate(pairs):
            try:
                a, b = pair
                lo[i] = -np.inf if a is None else float(a)
                hi[i] = np.inf if b is None else float(b)
            except (TypeError, ValueError):
                raise TypeError(f"bounds[{i}] must be a (lo, hi) pair of numbers or "
                                f"None, got {pair!r}") from None
        lo, hi = lo.reshape(x.shape), hi.reshape(x.shape)
    if np.isnan(lo).any() or np.isnan(hi).any():
        raise ValueError("bounds hold NaN")
    if np.any(lo == np.inf) or np.any(hi == -np.inf):
        i = int(np.flatnonzero((lo == np.inf) | (hi == -np.inf))[0])
        raise ValueError(f"bounds at element {i} ({lo.flat[i]!r}, {hi.flat[i]!r}) "
                         "admit no finite value; use None or -inf/inf for no bound")
    if np.any(lo > hi):
        i = int(np.flatnonzero(lo > hi)[0])
        raise ValueError(f"bounds are empty at element {i}: lower "
                         f"{lo.flat[i]!r} > upper {hi.flat[i]!r}")
    # In the dtype of x, rounded inwards so that a clipped x satisfies the
    # bounds exactly as given.
    lb, ub = lo.astype(x.dtype), hi.astype(x.dtype)
    np.nextafter(lb, np.inf, out=lb, where=lb < lo)
    np.nextafter(ub, -np.inf, out=ub, where=ub > hi)
    if np.any(lb > ub):
        raise ValueError(f"bounds hold an interval too narrow for {x.dtype}")
    return lb, ub


def _wrap_callback(callback):
    """scipy's rule: a callback whose only parameter is ``intermediate_result``
    gets an ``OptimizeResult``; any other gets a copy of ``xk``."""
    if callback is None:
        return None
    if not callable(callback):
        raise TypeError(f"callback must be callable, got {type(callback).__name__}")
    try:
        params = set(inspect.signature(callback).parameters)
    except (TypeError, ValueError):
        params = set()
    if params == {"intermediate_result"}:
        return lambda res: callback(intermediate_result=res)
    return lambda res: callback(res.x)   # res.x is already a copy


class _Objective:
    """Evaluates ``(f, g)`` at ``x`` and counts calls honestly."""

    def __init__(self, fun, jac, args, x, bounds):
        if not callable(fun):
            raise TypeError(f"fun must be callable, got {type(fun).__name__}")
        self.fun, self.args, self.shape = fun, args, x.shape
        self.nfev = self.njev = 0
        if jac is True:
            self.mode = "pair"
        elif callable(jac):
            self.mode, self.jac = "callable", jac
        elif jac is None or jac is False or (isinstance(jac, str) and jac in _FD_METHODS):
            self.mode = "fd"
            self.fd_method = "2-point" if jac in (None, False) else jac
            self.fd_bounds = ((-np.inf, np.inf) if bounds is None else
                              (bounds[0].ravel(), bounds[1].ravel()))
            from scipy.optimize._numdiff import approx_derivative
            self._approx = approx_derivative
        else:
            raise ValueError("jac must be a callable, True, None, '2-point', "
                             f"'3-point' or 'cs', got {jac!r}")

    def _f(self, x, extra):
        self.nfev += 1
        return self.fun(x, *extra, *self.args)

    @staticmethod
    def _scalar(f):
        if type(f) is float or type(f) is np.float64:       # the common case, cheaply
            return float(f)
        if isinstance(f, (str, bytes)) or np.asarray(f).dtype.kind not in "fiub":
            raise ValueError("the objective must return a real scalar, got "
                             f"{type(f).__name__} {f!r:.40}")
        try:
            return float(np.asarray(f).item())
        except (TypeError, ValueError):
            raise ValueError("the objective must return a scalar, got "
                             f"{type(f).__name__} {np.shape(f)}") from None

    def _grad(self, g):
        if type(g) is np.ndarray and g.shape == self.shape and g.dtype.kind == "f":
            return g                                        # the common case, cheaply
        if g is None:
            raise TypeError("the gradient is None; jac must return the gradient, an "
                            f"array of x0's shape {self.shape}")
        g = np.asarray(g)
        if g.shape != self.shape:
            if g.size == math.prod(self.shape) and g.ndim <= 1 and len(self.shape) <= 1:
                g = g.reshape(self.shape)
            else:
                raise ValueError(f"the gradient has shape {g.shape}, x0 has shape "
                                 f"{self.shape}")
        if g.dtype.kind not in "fiu":
            raise TypeError(f"the gradient has dtype {g.dtype}; it must be real")
        return g

    def __call__(self, x, extra=()):
        """``(f, g)`` at ``x``; ``extra`` is ``(batch,)`` in stochastic mode."""
        if self.mode == "callable":
            # The common case first, with the checks of _f, _scalar and _grad
            # written out (about a microsecond of an iteration on small
            # problems: bench's Rosenbrock row).
            self.nfev += 1
            f = self.fun(x, *extra, *self.args)
            if type(f) is not float and type(f) is not np.float64:
                f = self._scalar(f)
            self.njev += 1
            g = self.jac(x, *extra, *self.args)
            if type(g) is not np.ndarray or g.shape != self.shape or g.dtype.kind != "f":
                g = self._grad(g)
            return float(f), g
        if self.mode == "pair":
            out = self._f(x, extra)
            self.njev += 1
            try:
                f, g = out
            except (TypeError, ValueError):
                raise ValueError("with jac=True, fun must return (f, gradient)") from None
            return self._scalar(f), self._grad(g)
        f = self._scalar(self._f(x, extra))
        self.njev += 1
        if not math.isfinite(f):
            return f, None
        shape = self.shape
        g = self._approx(lambda z: self._f(z.reshape(shape), extra), x.ravel(),
                         method=self.fd_method, f0=f, bounds=self.fd_bounds)
        return f, g.reshape(shape)


def _progress_bar(progress, total):
    if not progress:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        raise ImportError("progress=True needs tqdm, an optional dependency: "
                          "pip install tqdm") from None
    return tqdm(total=total, desc="minimize", unit="step")


def minimize(fun: Callable[..., Any], x0: ArrayLike, args: tuple = (), *,
             jac: Callable[..., Any] | bool | str | None = None,
             bounds: Any = None, callback: Callable[..., Any] | None = None,
             lr: float | Callable[[int], float] = 1e-3, beta: float = 0.9,
             eps: float = 1e-8, sparse_counter: bool = True,
             clipvalue: float | None = None, clipnorm: float | None = None,
             global_clipnorm: float | None = None, backend: str = "auto",
             maxiter: int | None = None, gtol: float | None = None, norm: float = np.inf,
             tol: float | None = None, data: Any = None, epochs: int | None = None,
             progress: bool = False, disp: bool = False, comm: Any = None,
             hess: Any = None, hessp: Any = None, constraints: Any = ()) -> Any:
    r"""Minimise a scalar function with Expectigrad.

    Deterministic mode (``data=None``) minimises ``fun(x, *args)``: each
    iteration takes one Expectigrad step with the gradient at ``x`` (see the
    module docstring for the update), then projects onto ``bounds``.
    Stochastic mode (``data`` given) minimises ``fun(x, batch, *args)`` with
    one step per minibatch.

    Also a custom method for scipy::

        scipy.optimize.minimize(fun, x0, jac=grad, method=expectigrad_np.minimize,
                                options=dict(lr=0.05, maxiter=20000))

    Parameters
    ----------
    fun : callable
        ``fun(x, *args) -> float`` (stochastic: ``fun(x, batch, *args)``); with
        ``jac=True`` it returns ``(f, gradient)``.  ``x`` has ``x0``'s shape and
        dtype and must not be kept or modified by ``fun``.
    x0 : array_like
        Starting point, never modified.  The result keeps its dtype (float32
        or float64; integers become float64).
    args : tuple
        Extra arguments for ``fun`` and ``jac``.
    jac : callable, True, None, '2-point', '3-point' or 'cs'
        The gradient: ``jac(x, *args)`` (stochastic ``jac(x, batch, *args)``),
        returned by ``fun`` (True), or finite differences (None means
        '2-point'; the extra calls count in ``nfev``).
    bounds : scipy.optimize.Bounds or sequence of (lo, hi)
        Box constraints, None for an open end.  ``x0`` and every step are
        projected onto the box, so every iterate is feasible.
    callback : callable
        Called after every step as scipy does: ``callback(intermediate_result)``
        when that is its only parameter (an ``OptimizeResult`` with ``x``,
        ``fun``, ``jac``, ``nit``, ``nfev``, ``njev`` and, stochastic, ``epoch``),
        else ``callback(xk)``.  Raising ``StopIteration`` ends the run (status 99).
    lr, beta, eps, sparse_counter, clipvalue, clipnorm, global_clipnorm, backend
        Passed to ``Expectigrad``; ``lr`` may be a schedule ``step -> lr``.
    maxiter : int
        Most steps to take.  Default 10000 in deterministic mode, unlimited in
        stochastic mode (``epochs`` then sets the budget).
    gtol : float
        Stop when ``norm(gradient) <= gtol``; with bounds, the projected
        gradient (components pushing against an active bound count as 0).
        Default 1e-5 in deterministic mode; off in stochastic mode, where a
        given ``gtol`` tests each minibatch gradient.
    norm : float
        Order of the norm for ``gtol`` (``numpy.linalg.norm``); default inf,
        the largest absolute element, as scipy's BFGS.
    tol : float
        scipy's ``tol=``; used as ``gtol`` when ``gtol`` is not given.
    data : iterable or callable
        Minibatches for stochastic mode: an iterable (a list, a dataset, or a
        one-shot iterator), or a callable returning a fresh iterable per epoch
        (to reshuffle).
    epochs : int
        Passes over ``data``.  Default 1 when ``maxiter`` is not given, else
        as many as ``maxiter`` steps need.  A one-shot iterator allows one.
    progress : bool
        Show a tqdm progress bar with the current loss (needs tqdm).
    disp : bool
        Print the final message.
    comm : mpi4py communicator, optional
        Data parallel over MPI ranks: call ``minimize`` on every rank of
        ``comm`` with the same ``x0`` and options, each with its own ``data``
        (its shard) or its own ``fun``.  Every objective and gradient is
        replaced by its mean over the ranks (gathered and summed in rank
        order, so deterministic), so every rank takes the same steps and
        returns the same ``OptimizeResult``.  An epoch ends when the first
        rank's minibatches do (the others' remaining ones are not used); an
        exception in ``fun`` on one rank is raised on every rank.
    hess, hessp
        Unused (Expectigrad is first-order); giving one warns, as scipy's
        first-order methods do.
    constraints
        Only an empty value is accepted.

    Returns
    -------
    scipy.optimize.OptimizeResult
        ``x`` (x0's dtype and shape, always finite), ``fun`` and ``jac`` at
        ``x``, ``nit`` (steps taken), ``nfev``, ``njev``, ``status``,
        ``success``, ``message``.  In stochastic mode ``fun`` is the mean
        minibatch loss of the last epoch (partial epochs included), ``jac``
        the last minibatch gradient, and ``nepoch`` the passes begun.

    ``status``: 0 gradient norm <= gtol; 1 ``maxiter`` steps taken
    (deterministic: ``success=False``, as in scipy; stochastic: the budget, a
    success); 2 epochs done or data exhausted (success); 3 NaN or infinity in
    the objective or gradient (``x`` is the last point where both were finite,
    ``success=False``); 99 ``callback`` raised ``StopIteration``
    (``success=False``, as in scipy).
    """
    from scipy.optimize import OptimizeResult

    if hess is not None or hessp is not None:
        import warnings
        warnings.warn("Expectigrad is first-order: hess/hessp are not used",
                      RuntimeWarning, stacklevel=2)
    if constraints is not None and (not hasattr(constraints, "__len__")
                                    or len(constraints) > 0):
        raise ValueError("minimize with Expectigrad handles bounds but not "
                         "constraints; give constraints=() or use bounds=")
    if not isinstance(args, tuple):
        args = (args,)
    stochastic = data is not None
    maxiter = _count_positive_int("maxiter", maxiter)
    epochs = _count_positive_int("epochs", epochs)
    if epochs == 0:
        raise ValueError("epochs must be >= 1")
    if epochs is not None and not stochastic:
        raise ValueError("epochs counts passes over data; give data= or use maxiter")
    if gtol is None:
        gtol = tol
    if gtol is None and stochastic:
        gtol = -math.inf               # off: a minibatch gradient may be 0 by chance
    else:
        gtol = _nonneg_real("gtol", 1e-5 if gtol is None else gtol)
    if maxiter is None and not stochastic:
        maxiter = 10_000
    if stochastic and maxiter is None and epochs is None:
        epochs = 1
    if stochastic and maxiter == 0:
        raise ValueError("maxiter must be >= 1 with data= (a stochastic run reports the "
                         "loss of the minibatches it steps on)")
    progress = V.check_bool("progress", progress)
    norm = _check_norm(norm)

    x = _start_point(x0)
    box = _bounds_arrays(bounds, x)
    if box is not None:
        np.clip(x, box[0], box[1], out=x)
    objective = _Objective(fun, jac, args, x, box)
    if comm is not None:
        objective = _MeanOverRanks(objective, comm)
    cb = _wrap_callback(callback)
    if comm is not None and cb is not None:
        cb = _callback_together(cb, comm)
    opt = Expectigrad(x, lr=lr, beta=beta, eps=eps, sparse_counter=sparse_counter,
                      clipvalue=clipvalue, clipnorm=clipnorm,
                      global_clipnorm=global_clipnorm, check_finite=True,
                      backend=backend)
    if stochastic:
        run = _run_stochastic
        if comm is None:
            epoch_source = _epoch_source(data, epochs)
        else:
            # Checked on every rank together: a rank whose data is refused
            # makes every rank raise (none is left waiting).
            try:
                epoch_source, failed = _epoch_source(data, epochs), None
            except Exception as exc:  # noqa: BLE001 - raised on every rank
                epoch_source, failed = None, exc
            R.gathered_or_raise(comm, None, failed, "data")
            epoch_source = _together(epoch_source, comm)
    else:
        run, epoch_source = _run_deterministic, None
    state = dict(x=x, box=box, opt=opt, objective=objective, cb=cb, maxiter=maxiter,
                 gtol=gtol, norm=norm, epochs=epochs, source=epoch_source)
    bar = _progress_bar(progress, maxiter if maxiter is not None else
                        _total_steps(data, epochs))
    try:
        out = run(state, bar)
    finally:
        if bar is not None:
            bar.close()
    jac = out["jac"]
    if jac is not None and np.may_share_memory(jac, out["x"]):
        jac = np.array(jac)             # a jac returning x itself: not res.x
    res = OptimizeResult(
        x=out["x"], fun=out["fun"], jac=jac, nit=out["nit"],
        nfev=objective.nfev, njev=objective.njev, status=out["status"],
        success=out["success"], message=out["message"])
    if stochastic:
        res.nepoch = out["nepoch"]
    if disp:
        print(res.message)
    return res


class _MeanOverRanks:
    """An objective whose ``(f, g)`` is the mean over the ranks of ``comm``:
    gathered from every rank and summed in rank order (every rank gets the
    same bits).  A rank whose ``fun`` raised makes every rank raise."""

    def __init__(self, objective, comm):
        self.objective, self.comm = objective, comm

    @property
    def nfev(self):
        return self.objective.nfev

    @property
    def njev(self):
        return self.objective.njev

    def __call__(self, x, extra=()):
        try:
            mine, failed = self.objective(x, extra), None
        except Exception as exc:  # noqa: BLE001 - raised on every rank below
            mine, failed = None, exc
        parts = R.gathered_or_raise(self.comm, mine, failed, "the objective")
        f = parts[0][0]
        g = np.array(parts[0][1], copy=True)
        for fr, gr in parts[1:]:                     # rank order: deterministic
            f += fr
            g += gr
        size = len(parts)
        return f / size, g / g.dtype.type(size)


def _callback_together(cb, comm):
    """``cb`` on every rank, decided together: a ``StopIteration`` on any
    rank stops every rank, and an exception on any rank is raised on every
    rank (as the objective's are)."""
    def together(res):
        mine = None
        try:
            cb(res)
        except StopIteration:
            mine = "stop"
        except Exception as exc:  # noqa: BLE001 - raised on every rank below
            mine = exc
        error = mine if isinstance(mine, Exception) else None
        parts = R.gathered_or_raise(comm, mine, error, "the callback")
        if "stop" in parts:
            raise StopIteration
    return together


def _together(source, comm):
    """``source`` with every rank's epoch and minibatches in step: a rank
    gets a minibatch only when every rank has one."""
    def batches(it):
        while True:
            batch, failed = None, None
            try:
                batch, ok = next(it), True
            except StopIteration:
                ok = False
            except Exception as exc:  # noqa: BLE001 - raised on every rank
                ok, failed = False, exc
            if not all(R.gathered_or_raise(comm, ok, failed, "data")):
                return
            yield batch

    def together(epoch):
        it, failed = None, None
        try:
            it = source(epoch)
            it = None if it is None else iter(it)
        except Exception as exc:  # noqa: BLE001 - raised on every rank
            failed = exc
        if not all(R.gathered_or_raise(comm, it is not None, failed, "data")):
            return None
        return batches(it)
    return together


def _gradient_norm(g, norm, x=None, box=None, largest=None):
    """``(finite, norm)`` of the gradient; its largest and smallest elements
    (two reductions, no temporary) find NaN/inf.  ``largest``: the largest
    finite value of ``x``'s dtype, if the caller has it.

    With bounds, the norm is that of the projected gradient: components that
    push against an active bound (``x == lb`` and ``g > 0``, or ``x == ub``
    and ``g < 0``) count as zero, as in L-BFGS-B.
    """
    if g is None or g.size == 0:
        gmax = math.nan if g is None else 0.0
    elif g.size <= _SMALL:
        vals = g.ravel().tolist()
        gmax = max(map(abs, vals)) if _finite_list(vals) else math.nan
    else:
        hi, lo = float(g.max()), float(g.min())     # NaN propagates through both
        gmax = max(hi, -lo) if hi == hi and lo == lo else math.nan
    if not math.isfinite(gmax):
        return False, gmax
    if largest is None and x is not None:
        largest = float(np.finfo(x.dtype).max)
    if largest is not None and gmax > largest:
        return False, math.inf      # finite here, but not in x's dtype (float32 x0)
    if box is None and norm == np.inf:
        return True, gmax
    if box is None and norm in (None, 2):
        return True, float(np.linalg.norm(g.ravel()))     # sqrt(dot(g, g)): no temporary
    return True, _piecewise_norm(g, norm, x, box)


# Norms that need a temporary (a projection onto the bounds, |g| for orders
# other than 2) take the gradient in pieces of this many elements, so that
# the temporaries stay this small whatever the size of x.
_PIECE = 1 << 14


def _piecewise_norm(g, norm, x, box):
    """The ``norm``-order norm of ``g`` (projected onto the bounds ``box`` at
    ``x``, when given), as ``numpy.linalg.norm`` takes it of a vector, from
    pieces of ``_PIECE`` elements."""
    flat = [a.reshape(-1) for a in ((g,) if box is None else (g, x, box[0], box[1]))]
    order = 2 if norm is None else norm
    acc = -math.inf if order == np.inf else math.inf if order == -np.inf else 0.0
    for lo in range(0, flat[0].size, _PIECE):
        gp = flat[0][lo:lo + _PIECE]
        if box is not None:
            xp, lbp, ubp = (a[lo:lo + _PIECE] for a in flat[1:])
            gp = np.where(((xp <= lbp) & (gp > 0)) | ((xp >= ubp) & (gp < 0)), 0, gp)
        if order == np.inf:
            acc = max(acc, float(np.max(np.abs(gp))))
        elif order == -np.inf:
            acc = min(acc, float(np.min(np.abs(gp))))
        elif order == 0:
            acc += float(np.count_nonzero(gp))
        elif order == 2:
            acc += float(np.dot(gp, gp))
        else:
            with np.errstate(divide="ignore", over="ignore"):
                acc += float(np.sum(np.abs(gp) ** order))
    if order in (np.inf, -np.inf, 0):
        return acc
    # As NumPy's power: inf beyond the range, and 0 to a negative power is
    # inf (Python's float power raises for both).
    with np.errstate(divide="ignore", over="ignore"):
        return float(np.float64(acc) ** (1.0 / order))


# Up to this many elements the per-iteration checks read the array as a
# Python list: a NumPy reduction's fixed cost (about a microsecond each, three
# an iteration) was most of ``minimize``'s own time on small problems (bench's
# Rosenbrock row).
_SMALL = 64


def _finite_list(vals):
    """Whether every number in ``vals`` is finite: their sum is (NaN and inf
    propagate), or, where it overflows, each one."""
    return math.isfinite(sum(vals)) or all(map(math.isfinite, vals))


def _all_finite(x):
    """Whether every element of ``x`` is finite: its sum is (one reduction, no
    temporary), or, where that sum overflows, the elementwise check."""
    if x.size <= _SMALL:
        return _finite_list(x.ravel().tolist())
    total = float(x.sum())
    return math.isfinite(total) or bool(np.all(np.isfinite(x)))


def _kept(x, kept):
    """``x`` kept as the last good point, or None where it holds NaN or
    infinity.  Small ``x`` is kept as a list of its values (``_SMALL``;
    reading it is also the check), larger ``x`` is copied into ``kept``
    (an array of its shape)."""
    if x.size <= _SMALL:
        vals = (x if x.ndim == 1 else x.ravel()).tolist()
        return vals if _finite_list(vals) else None
    if not _all_finite(x):
        return None
    np.copyto(kept, x)
    return kept


def _restore(x, kept):
    """Put the point ``_kept`` returned back into ``x`` (exactly: a list
    holds the values of ``x``'s dtype as Python floats)."""
    if isinstance(kept, list):
        x[...] = np.asarray(kept, x.dtype).reshape(x.shape)
    else:
        np.copyto(x, kept)


def _step(opt, g, x, box):
    opt.step(g)
    if box is not None:
        np.clip(x, box[0], box[1], out=x)


def _nonfinite_message(where):
    return (f"NaN or infinity in the objective or gradient {where}; x is the last "
            "point where both were finite.")


def _run_deterministic(s, bar):
    x, opt, objective, cb = s["x"], s["opt"], s["objective"], s["cb"]
    maxiter, gtol, norm, box = s["maxiter"], s["gtol"], s["norm"], s["box"]
    x_good = _kept(x, x.copy())             # not None: _start_point refuses NaN
    largest = float(np.finfo(x.dtype).max)
    f, g = objective(x)
    nit = 0
    ok, gnorm = math.isfinite(f), math.nan
    if ok:
        ok, gnorm = _gradient_norm(g, norm, x, box, largest)
    if not ok:
        return dict(x=x, fun=f, jac=g, nit=0, status=NONFINITE, success=False,
                    message=_nonfinite_message("at x0"))
    while True:
        if gnorm <= gtol:
            status, msg = GTOL, (f"Optimization terminated successfully: "
                                 f"{'projected ' if box is not None else ''}gradient "
                                 f"norm {gnorm:.3g} <= gtol {gtol:.3g}.")
            break
        if nit >= maxiter:
            status, msg = MAXITER, (f"Maximum number of iterations has been exceeded "
                                    f"(maxiter={maxiter}).")
            break
        opt.step(g)
        if box is not None:
            np.clip(x, box[0], box[1], out=x)
        nit += 1
        f_new, g_new = objective(x)
        kept = None
        if math.isfinite(f_new):
            ok, gnorm_new = _gradient_norm(g_new, norm, x, box, largest)
            if ok:
                kept = _kept(x, x_good)
        if kept is None:
            _restore(x, x_good)
            nit -= 1
            status, msg = NONFINITE, _nonfinite_message(f"after step {nit + 1}")
            break
        x_good = kept
        f, g, gnorm = f_new, g_new, gnorm_new
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f, refresh=False)
        if cb is not None:
            from scipy.optimize import OptimizeResult
            try:
                cb(OptimizeResult(x=x.copy(), fun=f, jac=np.array(g), nit=nit,
                                  nfev=objective.nfev, njev=objective.njev))
            except StopIteration:
                status, msg = CALLBACK, "`callback` raised `StopIteration`."
                break
    return dict(x=x, fun=f, jac=g, nit=nit, status=status,
                success=status == GTOL, message=msg)


def _epoch_source(data, epochs):
    """A function ``epoch -> iterator over that epoch's batches``."""
    if callable(data):
        def source(epoch):
            it = data()
            try:
                return iter(it)
            except TypeError:
                raise TypeError("data() must return an iterable of minibatches, got "
                                f"{type(it).__name__}") from None
        return source
    try:
        first = iter(data)
    except TypeError:
        raise TypeError("data must be an iterable of minibatches or a callable "
                        f"returning one, got {type(data).__name__}") from None
    one_shot = first is data
    if one_shot and epochs is not None and epochs > 1:
        raise ValueError(f"data is a one-shot iterator ({type(data).__name__}), so it "
                         f"cannot be passed over {epochs} times; give a list, or a "
                         "callable returning a fresh iterable per epoch")

    def source(epoch):
        if epoch == 0:
            return first
        return None if one_shot else iter(data)
    return source


def _total_steps(data, epochs):
    if epochs is None or callable(data):
        return None
    try:
        return epochs * len(data)
    except TypeError:
        return None


def _run_stochastic(s, bar):
    x, opt, objective, cb = s["x"], s["opt"], s["objective"], s["cb"]
    maxiter, gtol, norm, box = s["maxiter"], s["gtol"], s["norm"], s["box"]
    epochs, source = s["epochs"], s["source"]
    x_good = x.copy()
    nit, nit_good, epoch = 0, 0, 0
    f, g = math.nan, None
    loss_sum, loss_n = 0.0, 0          # the current epoch's minibatch losses
    status = msg = None
    while status is None:
        if epochs is not None and epoch >= epochs:
            status, msg = BUDGET, f"Completed {epochs} epoch(s), {nit} steps."
            break
        batches = source(epoch)
        if batches is None:
            status, msg = BUDGET, (f"data exhausted after {nit} steps (a one-shot "
                                   "iterator gives one epoch).")
            break
        epoch += 1
        seen = 0
        for batch in batches:
            if maxiter is not None and nit >= maxiter:
                status, msg = MAXITER, f"Took maxiter={maxiter} steps."
                break
            seen += 1
            f_new, g_new = objective(x, (batch,))
            ok = math.isfinite(f_new)
            if ok:
                ok, gnorm = _gradient_norm(g_new, norm, x, box)
            if not ok:
                np.copyto(x, x_good)
                nit = nit_good
                status, msg = NONFINITE, _nonfinite_message(
                    f"on minibatch {seen} of epoch {epoch}")
                break
            np.copyto(x_good, x)
            nit_good = nit
            if loss_n and seen == 1:
                loss_sum, loss_n = 0.0, 0
            f, g = f_new, g_new
            loss_sum += f
            loss_n += 1
            if gnorm <= gtol:
                status, msg = GTOL, (f"Minibatch gradient norm {gnorm:.3g} <= gtol "
                                     f"{gtol:.3g}.")
                break
            _step(opt, g, x, box)
            nit += 1
            if not np.all(np.isfinite(x)):
                np.copyto(x, x_good)
                status, msg = NONFINITE, _nonfinite_message(f"at step {nit}")
                nit = nit_good
                break
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f, epoch=epoch, refresh=False)
            if cb is not None:
                from scipy.optimize import OptimizeResult
                try:
                    cb(OptimizeResult(x=x.copy(), fun=f, jac=np.array(g), nit=nit,
                                      nfev=objective.nfev, njev=objective.njev,
                                      epoch=epoch))
                except StopIteration:
                    status, msg = CALLBACK, "`callback` raised `StopIteration`."
                    break
        else:
            if seen == 0:
                raise ValueError(f"data gave no minibatches in epoch {epoch}")
        if maxiter is not None and nit >= maxiter and status is None:
            status, msg = MAXITER, f"Took maxiter={maxiter} steps."
    fun = loss_sum / loss_n if loss_n else f
    return dict(x=x, fun=fun, jac=g, nit=nit, nepoch=epoch, status=status,
                success=status in (GTOL, MAXITER, BUDGET), message=msg)
