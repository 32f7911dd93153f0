"""Lazy row-sparse steps: untouched rows brought up to date in closed form.

With ``Expectigrad(..., lazy=True)`` a row-sparse step (``sparse.py``)
updates only the rows its gradient names.  Every other row of that array
took a zero gradient on that step, which the dense step would have applied
to it.  A zero gradient gives ``u = 0`` (``0/0 := 0``), so on such a step
``k`` (step size ``s_k = lr_k / (1 - beta**k)``, with the sign of
``maximize``, and decay ``d_k = 1 - lr_k * weight_decay``)::

    mean_sq <- mean_sq                 (sparse counter: n and s unchanged)
    mean_sq <- mean_sq * (k - 1) / k   (dense counter: s unchanged, n = k)
    m       <- beta * m
    x       <- d_k * x - s_k * m

A row last brought up to date after step ``t0`` is therefore, after step
``T`` (``L = T - t0`` steps without a gradient), exactly::

    m(T)       = beta**L * m(t0)
    mean_sq(T) = mean_sq(t0) * t0 / T                  (dense counter)
    x(T)       = D * x(t0) - C * m(t0)
    D = prod_{k=t0+1..T} d_k
    C = sum_{k=t0+1..T} s_k * beta**(k - t0) * prod_{j=k+1..T} d_j

``History`` records ``s_k`` and ``d_k`` for every step since the array was
last synced (in the array's dtype, as the dense step uses them, widened to
float64), so any schedule, bias correction and weight decay is covered.
``C`` and ``D`` are computed in float64 and the row in float64 before one
rounding to its dtype: the result equals the dense steps' to rounding.

Two ways to the same ``C``:

``row_coefficients``
    per row, forward: ``C <- d_k * C + s_k * beta**j``, stopped once the
    remaining terms are provably below ``2**-60`` of ``C`` (for
    ``beta = 0.9`` after about 400 steps, whatever the lag), then scaled by
    the rest of ``D`` from the prefix sums of ``log d_k``.  A lag longer
    than a window of ``J`` steps (``beta**J < 2**-70``) reads the window's
    sum, recorded once per step (``window_sum``, O(J) a step), instead of
    looping.  Used for the rows a step touches: O(1) per row in the lag.
``all_coefficients``
    for every ``t0`` since the last sync at once, backward:
    ``C(t0) = beta * (s_{t0+1} * Q(t0+1) + C(t0+1))``, ``Q`` the decay
    product: O(steps) for a whole ``sync()``.

No power ``beta**t`` of the step count appears (``beta**t`` underflows
for ``t`` in the thousands; the bias correction is in ``s_k``, computed as
the dense step computes it); only ``beta**j`` of a lag, which decays to
exactly zero as the true momentum does.
"""
from __future__ import annotations

import math

import numpy as np

__all__ = ["MAX_WINDOW", "TOL", "History", "all_coefficients", "apply_row", "coefficients",
           "numpy_apply", "row_coefficients", "window_length", "window_sum"]

# The forward sum stops when what it leaves out is provably below this
# fraction of what it has (relative rounding of float64 is 2**-53).
TOL = 2.0 ** -60


class History:
    """The per-step scalars of one lazy array since its last sync.

    ``base`` is the array's step count at that sync; entry ``i`` belongs to
    step ``base + 1 + i``.  ``last[r]`` is the step after which row ``r``
    was last brought up to date (``>= base``).  ``cumlog[i]`` is the sum of
    ``log d`` over the first ``i`` entries, as a double-double ``(hi, lo)``.
    """

    def __init__(self, nrows, t, beta, sparse_counter, dtype):
        self.last = np.full(nrows, t, dtype=np.int64)
        self.dtype = np.dtype(dtype)
        self.reset(t, beta, sparse_counter)

    def holds(self, beta, sparse_counter):
        """The recorded steps were taken with this beta and counter."""
        return self.beta == float(self.dtype.type(beta)) and self.sparse == bool(sparse_counter)

    def reset(self, t, beta=None, sparse_counter=None):
        """Every row current after step ``t``: no history (O(1): a row
        whose ``last`` is below ``base`` counts as current at ``base``).
        ``beta``, ``sparse_counter``: those from now on, if they changed."""
        if beta is not None:
            self.beta = float(self.dtype.type(beta))     # as the dense step rounds it
            self.sparse = bool(sparse_counter)
            self.window = window_length(self.beta)
            self.beta_window = self.beta ** self.window
        self.base = int(t)
        self.n = 0
        self.s = np.zeros(16, np.float64)
        self.d = np.zeros(16, np.float64)
        self.cumlog = np.zeros((17, 2), np.float64)
        self.cwin = np.full(16, np.nan)
        self.s_max = 0.0
        self.d_min = 1.0
        self.decayed = False

    @property
    def pending(self):
        """Some row may lag: a step has been recorded since the last sync."""
        return self.n > 0

    def record(self, step, decay, window_sum=None):
        """Append step ``base + n + 1``: its step size and decay as the
        dense step uses them (rounded to the array's dtype); then the
        window sum that step completes (``window_sum``, a compiled
        ``lazy.window_sum`` where the backend has one)."""
        s = float(self.dtype.type(step))
        d = float(self.dtype.type(decay))
        if self.n == self.s.size:
            grow = lambda a, extra=0, fill=0.0: np.concatenate(  # noqa: E731
                [a, np.full(a.size - extra, fill, a.dtype)])
            self.s, self.d = grow(self.s), grow(self.d)
            self.cumlog = np.concatenate([self.cumlog, np.zeros((self.s.size // 2, 2))])
            self.cwin = grow(self.cwin, fill=np.nan)
        self.s[self.n] = s
        self.d[self.n] = d
        # The prefix sum of log d as a double-double (hi, lo), so that the
        # sum over a lag keeps float64 accuracy however long the history:
        # TwoSum gives hi + x exactly as the rounded sum plus its error.
        hi, lo = self.cumlog[self.n]
        x = math.log(d) if d != 1.0 else 0.0
        total = hi + x
        back = total - hi
        error = (hi - (total - back)) + (x - back)
        self.cumlog[self.n + 1] = total, lo + error
        self.s_max = max(self.s_max, abs(s))
        self.d_min = min(self.d_min, d)
        self.decayed = self.decayed or d != 1.0
        self.n += 1
        if self.window and self.n >= self.window:
            self.cwin[self.n - self.window] = (window_sum or globals()["window_sum"])(
                self.s, self.d, self.n - self.window, self.n, self.beta)

    def stop_bound(self):
        """What bounds the terms the forward sum leaves out, per ``beta**j``
        (``row_coefficients``' ``stop``); -1: never stop early.

        After ``j`` terms every term left is at most ``s_max * beta**i *
        prod(d)`` with ``i > j``; relative to the decay already applied to
        the sum that is at most ``s_max * beta**j * rho / (1 - rho)``,
        ``rho = beta / d_min``, when ``rho < 1``."""
        rho = self.beta / self.d_min if self.d_min > 0 else math.inf
        if rho >= 1.0:
            return -1.0
        return self.s_max * rho / (1.0 - rho)


# Longest window kept (``window_length``): for beta so close to 1 that the
# window would be longer, rows take the forward loop.
MAX_WINDOW = 4096


def window_length(beta):
    """Steps after which ``beta**j`` is below ``2**-70`` (0: no window)."""
    if beta <= 0.0:
        return 1
    j = math.ceil(-70.0 * math.log(2.0) / math.log(beta))
    return j if j <= MAX_WINDOW else 0


def window_sum(s, d, lo, hi, beta):
    """``C(t0, t0 + J)`` for the entries ``lo:hi`` (``J = hi - lo``),
    backward as in ``all_coefficients``: the momentum's whole contribution
    from ``t0`` once ``beta**J`` is negligible.  Recorded once per step."""
    c = 0.0
    q = 1.0
    for i in range(hi - 1, lo - 1, -1):
        c = beta * (s[i] * q + c)
        q = d[i] * q
    return c


def row_coefficients(t0, T, base, s, d, cumlog, beta, stop, decayed, cwin, window,
                     beta_window, B, C, D):
    """Per row ``r``: ``B[r] = beta**L``, ``C[r]``, ``D[r]`` of the module
    docstring for the lag ``L = T - t0[r]``.

    A lag longer than the window ``J`` takes the recorded window sum
    ``cwin`` (``C(t0, t0 + J)``) when the terms beyond it are provably below
    ``TOL`` of it (``stop`` from ``History.stop_bound``, ``beta_window =
    beta**J``): O(1).  Otherwise the forward loop, stopped as early.  Then
    the rest of the decay, from the prefix sums of ``log d``.

    Plain loops over scalars: the cpu backend compiles this function with
    numba, the numpy backend runs it as it is."""
    end = T - base
    for r in range(t0.size):
        lag = T - t0[r]
        i0 = t0[r] - base
        if lag <= 0:
            B[r] = 1.0
            C[r] = 0.0
            D[r] = 1.0
            continue
        c = 0.0
        j = 0
        if window > 0 and lag > window and stop >= 0.0 \
                and stop * beta_window <= TOL * abs(cwin[i0]):
            c = cwin[i0]               # NaN (not recorded) fails the test above
            j = window
        else:
            p = 1.0
            while j < lag:
                p *= beta
                c = d[i0 + j] * c + s[i0 + j] * p
                j += 1
                if p == 0.0 or (stop >= 0.0 and stop * p <= TOL * abs(c)):
                    break
        if decayed:          # sums of log d from the double-double prefix sums
            if j < lag:
                a = i0 + j
                c *= math.exp((cumlog[end, 0] - cumlog[a, 0]) + (cumlog[end, 1] - cumlog[a, 1]))
            D[r] = math.exp((cumlog[end, 0] - cumlog[i0, 0]) + (cumlog[end, 1] - cumlog[i0, 1]))
        else:
            D[r] = 1.0
        C[r] = c
        B[r] = beta ** lag


def coefficients(last, base, T, s, d, cumlog, beta, stop, decayed, cwin, window,
                 beta_window, B, C, D, R):
    """``B``, ``C``, ``D`` and ``R`` (``t0 / T``, the dense counter's mean
    factor) bringing rows up to date after step ``T``, given each row's
    ``last`` step (their ``t0`` is ``max(last, base)``).  Returns whether
    some row lags.

    Lags within the last ``recent`` steps (the window, or ``MAX_WINDOW``
    without one) read a table that one backward pass over those steps
    fills (``all_coefficients``' recurrence: O(recent) a step, O(1) a row);
    longer lags take ``row_coefficients``' route, one row at a time.  Plain
    loops, compiled by the cpu backend."""
    n = T - base
    recent = min(n, window if window > 0 else MAX_WINDOW)
    Bt = np.empty(recent + 1)
    Ct = np.empty(recent + 1)
    Dt = np.empty(recent + 1)
    # The backward pass over the last ``recent`` entries: lag L at entry
    # recent - L.
    c = 0.0
    q = 1.0
    Bt[recent] = 1.0
    Ct[recent] = 0.0
    Dt[recent] = 1.0
    pw = 1.0
    for i in range(recent - 1, -1, -1):
        e = n - recent + i
        c = beta * (s[e] * q + c)
        q = d[e] * q
        pw *= beta
        Ct[i] = c
        Dt[i] = q
        Bt[i] = pw
    lagging = False
    one = np.empty(1, np.int64)
    b1 = np.empty(1)
    c1 = np.empty(1)
    d1 = np.empty(1)
    for r in range(last.size):
        t0 = max(last[r], base)
        lag = T - t0
        R[r] = t0 / T if T > 0 else 1.0
        if lag <= 0:
            B[r] = 1.0
            C[r] = 0.0
            D[r] = 1.0
            continue
        lagging = True
        if lag <= recent:
            B[r] = Bt[recent - lag]
            C[r] = Ct[recent - lag]
            D[r] = Dt[recent - lag]
        else:
            one[0] = t0
            row_coefficients(one, T, base, s, d, cumlog, beta, stop, decayed, cwin, window,
                             beta_window, b1, c1, d1)
            B[r] = b1[0]
            C[r] = c1[0]
            D[r] = d1[0]
    return lagging


def all_coefficients(T, base, s, d, beta, B, C, D):
    """``B``, ``C``, ``D`` for every ``t0`` in ``[base, T]`` (entry
    ``t0 - base``), backward: ``C(t0) = beta * (s_{t0+1} * Q(t0+1) +
    C(t0+1))`` with ``Q(t0) = prod_{k=t0+1..T} d_k``.  O(T - base)."""
    n = T - base
    c = 0.0
    q = 1.0
    B[n] = 1.0
    C[n] = 0.0
    D[n] = 1.0
    for i in range(n - 1, -1, -1):
        c = beta * (s[i] * q + c)
        q = d[i] * q
        C[i] = c
        D[i] = q
        B[i] = beta ** (n - i)


def apply_row(x, m, v, a, rowsize, B, C, D, R, momentum, dense_counter):
    """Bring the row of the flat arrays ``x`` (parameter), ``m`` (momentum)
    and ``v`` (mean of squares) at elements ``a:a + rowsize`` up to date
    with its coefficients: ``x <- D x - C m``, ``m <- B m``, ``v <- R v``
    (dense counter), each in float64 and rounded once to the arrays' dtype.

    Plain loops (compiled by the cpu backend, which calls it row by row
    just before the row's update; the numpy backend has a vectorised twin,
    ``numpy_apply``)."""
    for e in range(a, a + rowsize):
        if momentum:
            mo = np.float64(m[e])
            x[e] = D * np.float64(x[e]) - C * mo
            m[e] = B * mo
        elif D != 1.0:
            x[e] = D * np.float64(x[e])
        if dense_counter:
            v[e] = R * np.float64(v[e])


def numpy_apply(x, m, v, rows, rowsize, B, C, D, R, momentum, dense_counter, block=4096):
    """``apply_row`` for rows ``rows`` in NumPy, ``block`` rows at a time."""
    if rows.size == 0 or rowsize == 0:
        return
    dt = x.dtype
    x2, v2 = x.reshape(-1, rowsize), v.reshape(-1, rowsize)
    m2 = m.reshape(-1, rowsize) if momentum else None
    for lo in range(0, rows.size, block):
        r = rows[lo:lo + block]
        b, c, dd, rr = (a[lo:lo + block, None] for a in (B, C, D, R))
        if momentum:
            mo = m2[r].astype(np.float64)
            x2[r] = (dd * x2[r].astype(np.float64) - c * mo).astype(dt)
            m2[r] = (b * mo).astype(dt)
        elif (dd != 1.0).any():
            x2[r] = (dd * x2[r].astype(np.float64)).astype(dt)
        if dense_counter:
            v2[r] = (rr * v2[r].astype(np.float64)).astype(dt)
