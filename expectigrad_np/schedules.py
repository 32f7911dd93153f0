"""Learning-rate schedules: callables ``step -> lr``.

``step`` is the number of optimizer steps already taken (0 on the first
step).  Any callable with that signature can be given as ``lr``; the ones
here are small frozen dataclasses, so they compare by value, print their
settings and pickle.

========================  =====================================================
``constant(v)``           ``v``
``inverse_time_decay``    ``lr / (1 + rate * step / steps)`` (the original TF2
                          optimizer's ``decay`` option is ``rate=decay, steps=1``)
``exponential_decay``     ``lr * rate ** (step / steps)``
``cosine_decay``          ``lr * (alpha + (1 - alpha) * (1 + cos(pi * min(step,
                          steps) / steps)) / 2)``
``linear``                ``init + (end - init) * min(step, steps) / steps``
``join``                  ``schedules[i](step - boundaries[i-1])`` between
                          consecutive boundaries
``warmup``                linear ramp from ``init`` to ``schedule(0)`` over
                          ``steps``, then ``schedule(step - steps)``
========================  =====================================================

``staircase=True`` makes the decays piecewise constant
(``step // steps`` instead of ``step / steps``).
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

__all__ = ["constant", "cosine_decay", "exponential_decay", "inverse_time_decay",
           "join", "linear", "warmup"]


def _real(name, value):
    """``value`` as a float: a real number (not a bool or a string)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    try:
        return float(value)
    except OverflowError:
        raise ValueError(f"{name} must be finite, got an integer too large for a "
                         "float") from None


def _positive(name, value):
    value = _real(name, value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be finite and > 0, got {value!r}")
    return value


def _nonnegative(name, value):
    value = _real(name, value)
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be finite and >= 0, got {value!r}")
    return value


def _steps(name, value):
    """An integer >= 1 (an integral float such as 10.0 is taken as its integer)."""
    number = _real(name, value)
    if not (math.isfinite(number) and number == int(number) and number >= 1):
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value) if isinstance(value, numbers.Integral) else int(number)


def _flag(name, value):
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return bool(value)


@dataclass(frozen=True)
class constant:
    """``value`` at every step.

    Parameters
    ----------
    value : float >= 0
        The learning rate.

    Raises
    ------
    ValueError
        ``value`` negative or not finite.
    """
    value: float

    def __post_init__(self):
        object.__setattr__(self, "value", _nonnegative("value", self.value))

    def __call__(self, step: int) -> float:
        return self.value


@dataclass(frozen=True)
class _Decay:
    """The fields of the decays of ``lr`` by ``rate`` per ``steps`` steps,
    checked (``_rate`` checks ``rate``)."""
    lr: float
    rate: float
    steps: int = 1
    staircase: bool = False
    _rate = staticmethod(_nonnegative)

    def __post_init__(self):
        object.__setattr__(self, "lr", _positive("lr", self.lr))
        object.__setattr__(self, "rate", self._rate("rate", self.rate))
        object.__setattr__(self, "steps", _steps("steps", self.steps))
        object.__setattr__(self, "staircase", _flag("staircase", self.staircase))

    def _progress(self, step):
        """``step / steps``, or ``step // steps`` with ``staircase``."""
        return step // self.steps if self.staircase else step / self.steps


@dataclass(frozen=True)
class inverse_time_decay(_Decay):
    """``lr / (1 + rate * step / steps)``.

    Parameters
    ----------
    lr : float > 0
        The learning rate at step 0.
    rate : float >= 0
        The decay rate (the original TF2 optimizer's ``decay``, with
        ``steps=1``).
    steps : int >= 1, default 1
        The unit of ``step``.
    staircase : bool, default False
        Use ``step // steps`` (piecewise constant) instead of ``step / steps``.

    Raises
    ------
    ValueError
        A value outside its range, or not finite.
    """

    def __call__(self, step: int) -> float:
        return self.lr / (1.0 + self.rate * self._progress(step))


@dataclass(frozen=True)
class exponential_decay(_Decay):
    """``lr * rate ** (step / steps)``.

    Parameters
    ----------
    rate : float > 0
        The factor per ``steps`` steps (below 1 to decay).
    lr, steps, staircase
        As for ``inverse_time_decay``: the learning rate at step 0 (> 0),
        the unit of ``step`` (an integer >= 1, default 1), and whether
        ``step // steps`` replaces ``step / steps`` (default False).

    Raises
    ------
    ValueError
        ``lr`` or ``rate`` not finite and > 0, or ``steps`` not an integer
        >= 1.
    """
    _rate = staticmethod(_positive)

    def __call__(self, step: int) -> float:
        try:
            return self.lr * self.rate ** self._progress(step)
        except OverflowError:      # rate > 1 long enough: the optimizer refuses inf
            return math.inf


@dataclass(frozen=True)
class cosine_decay:
    """Half a cosine from ``lr`` down to ``alpha * lr`` over ``steps``, then flat:
    ``lr * (alpha + (1 - alpha) * (1 + cos(pi * min(step, steps) / steps)) / 2)``.

    Parameters
    ----------
    lr : float > 0
        The learning rate at step 0.
    steps : int >= 1
        The length of the decay.
    alpha : float in [0, 1], default 0
        The final learning rate as a fraction of ``lr``.

    Raises
    ------
    ValueError
        A value outside its range, or not finite.
    """
    lr: float
    steps: int
    alpha: float = 0.0

    def __post_init__(self):
        object.__setattr__(self, "lr", _positive("lr", self.lr))
        object.__setattr__(self, "steps", _steps("steps", self.steps))
        alpha = _real("alpha", self.alpha)
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha!r}")
        object.__setattr__(self, "alpha", alpha)

    def __call__(self, step: int) -> float:
        frac = min(step, self.steps) / self.steps
        cosine = 0.5 * (1.0 + math.cos(math.pi * frac))
        return self.lr * (self.alpha + (1.0 - self.alpha) * cosine)


@dataclass(frozen=True)
class linear:
    """From ``init`` to ``end`` in a straight line over ``steps``, then ``end``:
    ``init + (end - init) * min(step, steps) / steps``.

    Parameters
    ----------
    init : float >= 0
        The learning rate at step 0.
    end : float >= 0
        The learning rate from step ``steps`` on.
    steps : int >= 1
        The length of the ramp.

    Raises
    ------
    ValueError
        A value outside its range, or not finite.
    """
    init: float
    end: float
    steps: int

    def __post_init__(self):
        object.__setattr__(self, "init", _nonnegative("init", self.init))
        object.__setattr__(self, "end", _nonnegative("end", self.end))
        object.__setattr__(self, "steps", _steps("steps", self.steps))

    def __call__(self, step: int) -> float:
        frac = min(step, self.steps) / self.steps
        return self.init + (self.end - self.init) * frac


@dataclass(frozen=True)
class join:
    """Run ``schedules[0]`` until ``boundaries[0]``, then ``schedules[1]``
    (restarted at step 0) until ``boundaries[1]``, and so on.

    Parameters
    ----------
    schedules : sequence of callables ``step -> lr``
        One more than ``boundaries``.
    boundaries : sequence of int
        Increasing steps >= 1 at which the next schedule takes over.

    Raises
    ------
    ValueError
        Counts that do not match, or boundaries not increasing integers >= 1.
    TypeError
        A schedule that is not callable.
    """
    schedules: tuple
    boundaries: tuple

    def __post_init__(self):
        schedules = tuple(self.schedules)
        try:
            boundaries = tuple(_steps("each boundary", b) for b in self.boundaries)
        except (TypeError, ValueError):
            raise ValueError(f"boundaries must be increasing integers >= 1, got "
                             f"{self.boundaries!r}") from None
        if len(schedules) != len(boundaries) + 1:
            raise ValueError(f"join needs one more schedule than boundaries, got "
                             f"{len(schedules)} schedules and {len(boundaries)} "
                             "boundaries")
        if any(not callable(s) for s in schedules):
            raise TypeError("every schedule given to join must be callable")
        if any(b < 1 for b in boundaries) or list(boundaries) != sorted(set(boundaries)):
            raise ValueError(f"boundaries must be increasing integers >= 1, got "
                             f"{boundaries!r}")
        object.__setattr__(self, "schedules", schedules)
        object.__setattr__(self, "boundaries", boundaries)

    def __call__(self, step: int) -> float:
        start = 0
        for schedule, boundary in zip(self.schedules, self.boundaries):
            if step < boundary:
                return schedule(step - start)
            start = boundary
        return self.schedules[-1](step - start)


def warmup(schedule: Callable[[int], float] | float, steps: int,
           init: float = 0.0) -> join:
    """Linear warm-up from ``init`` to ``schedule(0)`` over ``steps`` steps,
    then ``schedule`` (started at its own step 0).  ``schedule`` may be a number.

    Parameters
    ----------
    schedule : callable ``step -> lr`` or float
        What follows the warm-up.
    steps : int >= 1
        Length of the ramp: step ``k < steps`` has
        ``init + (schedule(0) - init) * k / steps``.
    init : float >= 0, default 0
        The learning rate of the first step.

    Returns
    -------
    join
        The ramp, then ``schedule``.

    Raises
    ------
    ValueError
        ``steps`` not an integer >= 1, or ``init`` negative or not finite.

    Notes
    -----
    With the default ``init=0`` the first step has learning rate 0: the
    parameters do not move on it, though the optimizer's state takes in its
    gradient (sum of squares, count, momentum), so the gradient is not lost.
    Give ``init > 0`` (for example ``schedule(0) / steps``) for a first step
    that moves.
    """
    if not callable(schedule):
        schedule = constant(schedule)
    steps = _steps("steps", steps)
    return join((linear(init, schedule(0), steps), schedule), (steps,))

