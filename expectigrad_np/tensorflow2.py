"""Expectigrad as a Keras 3 optimizer, written with ``keras.ops``.

A drop-in for the original project's ``expectigrad.tensorflow2.Expectigrad``
(built on Keras 2 internals that Keras 3 no longer has)::

    from expectigrad_np.tensorflow2 import Expectigrad  # was: from expectigrad.tensorflow2 ...
    model.compile(optimizer=Expectigrad(learning_rate=1e-3), loss=...)

It runs on every Keras backend (TensorFlow, JAX, PyTorch).  The update is
``reference.py``'s, per variable and in the variable's dtype::

    g  = clip(g, -G, G)             G: the largest magnitude whose square is finite
    n <- n + [g**2 != 0]            (sparse counter; w = 1/n or 0)    or w = 1/t
    v <- v + (g**2 - v) * w         running mean of g**2 (= s / n)
    u  = g / (eps + sqrt(v))        0/0 := 0
    m <- beta * m + (1 - beta) * u ;  x <- x - lr / (1 - beta**t) * m     (beta > 0)
    x <- x - lr * u                                                      (beta = 0)

``t`` counts the steps in which that variable received a gradient, as in
``expectigrad_np.Expectigrad`` and the original PyTorch optimizer.  (The
original TF optimizers count the optimizer's global iterations instead.)
In float32 the mean is rounded to nearest here, where the NumPy kernels
round it stochastically: the two agree to float32 rounding over a run.

Sparse gradients (``tf.IndexedSlices``, an ``Embedding``'s gradient on the
TensorFlow backend, where the original raises) step as their dense form,
duplicate rows summed: the core's row-sparse semantics with ``lazy=False``.
A row without a gradient is not counted and keeps moving by its momentum,
so a step costs what a dense one does.

Clipping follows the original project's order: by value, then each
gradient's norm, then the global norm (Keras itself allows only one of
the three).  ``weight_decay`` is Keras's decoupled decay.

Importing this module imports keras; ``import expectigrad_np`` does not.
"""
from __future__ import annotations

import math
import numbers
import warnings

import keras
import numpy as np
from keras import ops

from . import _validation as V
from .backends.layout import SATURATION

__all__ = ["Expectigrad"]


def _number(value):
    """Whether ``value`` is a real number (NumPy's too), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _real(name, value):
    if not _number(value):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    return float(value)




@keras.saving.register_keras_serializable(package="expectigrad_np")
class Expectigrad(keras.optimizers.Optimizer):
    """Expectigrad (Daley & Amato, 2020) for Keras 3.

    Parameters
    ----------
    learning_rate : float, ``LearningRateSchedule`` or callable, default 1e-3
        A float > 0, a Keras schedule, or a callable taking no arguments
        (Keras calls it each step).
    beta : float in [0, 1), default 0.9
        Outer-momentum decay; 0: no momentum and no bias correction.
    epsilon : float > 0, default 1e-8
        Added to the denominator.
    sparse_counter : bool, default True
        Count only nonzero gradients (True) or every step (False).
    name : str, default "Expectigrad"
        The optimizer's name (its variables' path).
    clipvalue, clipnorm, global_clipnorm : float > 0 or None
        Applied in this order (the original project's), any combination.
    weight_decay, use_ema, ema_momentum, ema_overwrite_frequency : optional
        As for every Keras optimizer (``weight_decay``: decoupled).
    loss_scale_factor, gradient_accumulation_steps : optional
        As for every Keras optimizer.
    decay : float >= 0, optional
        The original's inverse-time decay: ``lr / (1 + decay * iterations)``
        (a ``keras.optimizers.schedules.InverseTimeDecay``), with a constant
        ``learning_rate``.
    lr : float, optional
        Deprecated alias of ``learning_rate`` (a ``DeprecationWarning``).

    Raises
    ------
    ValueError
        ``learning_rate``, ``epsilon`` or a clipping option not finite and
        > 0, ``beta`` outside [0, 1), ``decay`` or ``weight_decay`` negative
        or not finite, or ``decay`` with a schedule.
    TypeError
        A hyperparameter that is not a real number, ``sparse_counter`` not a
        bool; at ``build``, a variable neither float32 nor float64.

    Unlike ``expectigrad_np.Expectigrad``, and like Keras's optimizers, it
    does not check gradients for NaN or infinity (under XLA or ``jax.jit``
    a step cannot raise on values): a ``LossScaleOptimizer`` (mixed
    precision) skips such steps.
    """

    def __init__(self, learning_rate=0.001, beta=0.9, epsilon=1e-8, sparse_counter=True,
                 name="Expectigrad", clipnorm=None, clipvalue=None, global_clipnorm=None,
                 weight_decay=None, use_ema=False, ema_momentum=0.99,
                 ema_overwrite_frequency=None, loss_scale_factor=None,
                 gradient_accumulation_steps=None, decay=None, lr=None, **kwargs):
        if lr is not None:
            warnings.warn("`lr` is deprecated, use `learning_rate`", DeprecationWarning,
                          stacklevel=2)
            learning_rate = lr
        if _number(learning_rate):
            if not (learning_rate > 0 and math.isfinite(learning_rate)):
                raise ValueError(f"learning_rate must be greater than 0 but got "
                                 f"{learning_rate}")
            learning_rate = float(learning_rate)         # Keras takes Python floats only
        if decay is not None:
            if not (_real("decay", decay) >= 0 and math.isfinite(decay)):
                raise ValueError(f"Expected decay >= 0, received: {decay}")
        if decay:
            if not _number(learning_rate):
                raise ValueError("decay applies to a constant learning_rate; with a "
                                 "schedule, put the decay into the schedule (keras."
                                 "optimizers.schedules.InverseTimeDecay) and leave decay "
                                 "unset")
            learning_rate = keras.optimizers.schedules.InverseTimeDecay(
                float(learning_rate), decay_steps=1, decay_rate=float(decay))
        if not 0.0 <= _real("beta", beta) < 1.0:
            raise ValueError(f"beta must be in [0,1) but got {beta}")
        if not (_real("epsilon", epsilon) > 0.0 and math.isfinite(epsilon)):
            raise ValueError(f"epsilon must be greater than 0 but got {epsilon}")
        if weight_decay is not None and not (_real("weight_decay", weight_decay) >= 0
                                             and math.isfinite(weight_decay)):
            raise ValueError(f"weight_decay must be finite and >= 0 (decoupled decay), got "
                             f"{weight_decay!r}")
        if not isinstance(sparse_counter, (bool, np.bool_)):
            raise TypeError(f"sparse_counter must be True or False, got {sparse_counter!r}")
        clips = {k: V.check_positive_or_none(k, v) for k, v in
                 (("clipvalue", clipvalue), ("clipnorm", clipnorm),
                  ("global_clipnorm", global_clipnorm))}
        super().__init__(learning_rate=learning_rate, name=name, weight_decay=weight_decay,
                         use_ema=use_ema, ema_momentum=ema_momentum,
                         ema_overwrite_frequency=ema_overwrite_frequency,
                         loss_scale_factor=loss_scale_factor,
                         gradient_accumulation_steps=gradient_accumulation_steps, **kwargs)
        # Keras accepts one clipping option; ours are applied together, in order.
        self.clipvalue = clips["clipvalue"]
        self.clipnorm = clips["clipnorm"]
        self.global_clipnorm = clips["global_clipnorm"]
        self.beta = float(beta)
        self.epsilon = float(epsilon)
        self.sparse_counter = bool(sparse_counter)

    def build(self, var_list):
        """Create the state of each variable: ``mean_sq``, ``count`` (sparse
        counter), ``momentum`` (beta > 0) and its step count ``t``.

        Parameters
        ----------
        var_list : list of ``keras.Variable``
            The variables this optimizer will update.
        """
        if self.built:
            return
        for v in var_list:
            dtype = keras.backend.standardize_dtype(v.dtype)
            if dtype not in ("float32", "float64"):
                raise TypeError(f"variable {v.path if hasattr(v, 'path') else v.name} has "
                                f"dtype {dtype}; Expectigrad steps float32 or float64 "
                                "variables (for mixed precision keep float32 variables: "
                                "the 'mixed_float16' policy does)")
        super().build(var_list)
        self._mean_sq, self._count, self._momentum, self._steps = [], [], [], []
        for v in var_list:
            self._mean_sq.append(self.add_variable_from_reference(v, "mean_sq"))
            self._count.append(
                self.add_variable(v.shape, dtype="int32", name=_name(v, "count"))
                if self.sparse_counter else None)
            self._momentum.append(self.add_variable_from_reference(v, "momentum")
                                  if self.beta > 0 else None)
            self._steps.append(self.add_variable((), dtype="int32", name=_name(v, "step")))

    def _clip_gradients(self, grads):
        """By value, then each gradient's norm, then the global norm: the
        factor ``min(1, clipnorm / ||g||)`` as in ``expectigrad_np``.
        (Written with ``where``: ``ops.maximum`` and ``ops.minimum`` can
        return floatx rather than the gradients' float64.)"""
        grads = [_dense(g) for g in grads]
        if self.clipvalue:
            v = self.clipvalue
            grads = [None if g is None else ops.clip(g, -v, v) for g in grads]
        if self.clipnorm:
            grads = [None if g is None else g * _factor(_norm([g]), self.clipnorm)
                     for g in grads]
        if self.global_clipnorm:
            present = [g for g in grads if g is not None]
            wide = ("float64" if any(keras.backend.standardize_dtype(g.dtype) == "float64"
                                     for g in present) else "float32")
            factor = _factor(_norm([ops.cast(g, wide) for g in present]),
                             self.global_clipnorm)
            grads = [None if g is None else g * ops.cast(factor, g.dtype) for g in grads]
        return grads

    def update_step(self, gradient, variable, learning_rate):
        """One Expectigrad step of ``variable`` (see the module docstring).

        Parameters
        ----------
        gradient : tensor or ``tf.IndexedSlices``
            The (clipped) gradient of ``variable``; ``IndexedSlices`` are
            summed into their dense form.
        variable : ``keras.Variable``
            Updated in place.
        learning_rate : tensor
            This iteration's learning rate.
        """
        dtype = keras.backend.standardize_dtype(variable.dtype)
        i = self._get_variable_index(variable)
        lr = ops.cast(learning_rate, dtype)
        sat = float(SATURATION[np.dtype(dtype)])
        g = ops.clip(ops.cast(_dense(gradient), dtype), -sat, sat)
        g2 = ops.square(g)
        step = self._steps[i]
        self.assign_add(step, 1)
        t = ops.cast(step, dtype)
        zero = ops.zeros_like(g2)
        if self.sparse_counter:
            counted = ops.not_equal(g2, zero)
            count = self._count[i]
            self.assign_add(count, ops.cast(counted, "int32"))
            n = ops.cast(count, dtype)
            # (ops.maximum can return floatx rather than float64: no maximum here.)
            n_safe = ops.where(counted, n, ops.ones_like(n))     # counted: n >= 1
            weight = ops.where(counted, 1.0 / n_safe, zero)
        else:
            weight = 1.0 / t
        mean_sq = self._mean_sq[i]
        self.assign_add(mean_sq, (g2 - mean_sq) * weight)
        u = g / (_const(self.epsilon, dtype) + ops.sqrt(mean_sq))
        if self.beta > 0:
            beta = _const(self.beta, dtype)
            m = self._momentum[i]
            self.assign(m, beta * m + (1.0 - beta) * u)
            corrected = lr / (1.0 - ops.power(beta, t))
            self.assign_sub(variable, corrected * m)
        else:
            self.assign_sub(variable, lr * u)

    def get_config(self):
        """The Keras config: the base optimizer's, plus ``beta``,
        ``epsilon`` and ``sparse_counter`` (``from_config`` rebuilds it)."""
        config = super().get_config()
        config.update(beta=self.beta, epsilon=self.epsilon,
                      sparse_counter=self.sparse_counter)
        return config


def _norm(tensors):
    """The joint L2 norm of ``tensors`` (one dtype): ``sqrt(sum(g**2))``,
    or, where that sum overflows (float32 gradients past about 1.8e19),
    the same norm taken in units of the largest magnitude, which cannot
    overflow (the core, too, clips such gradients rather than drop them)."""
    plain = ops.sqrt(sum(ops.sum(ops.square(g)) for g in tensors))

    def scaled():       # read again only where the plain sum overflowed
        largest = ops.max(ops.stack([ops.max(ops.abs(g)) for g in tensors]))
        unit = ops.where(ops.greater(largest, 0), largest, ops.ones_like(largest))
        return largest * ops.sqrt(sum(ops.sum(ops.square(g / unit)) for g in tensors))
    return ops.cond(ops.isinf(plain), scaled, lambda: plain)


def _factor(norm, limit):
    """``limit / norm`` where the norm exceeds ``limit``, else 1 (NaN: 1)."""
    limit = _const(limit, norm.dtype)
    over = ops.greater(norm, limit)
    return ops.where(over, limit / ops.where(over, norm, limit), ops.ones_like(norm))


def _dense(gradient):
    """A ``tf.IndexedSlices`` gradient (an ``Embedding``'s, on the TensorFlow
    backend) as the dense tensor it stands for, duplicate rows summed: the
    core's row-sparse semantics (rows without a gradient are not counted,
    their momentum still moves them).  Other gradients pass through."""
    if gradient is None or keras.backend.backend() != "tensorflow":
        return gradient
    import tensorflow as tf  # the backend: already imported

    if isinstance(gradient, tf.IndexedSlices):
        return tf.convert_to_tensor(gradient)
    return gradient


def _const(value, dtype):
    """A Python float as a tensor of ``dtype``.  (``ops.cast`` of a float
    goes through float32 on the TensorFlow backend: 0.9 would become
    0.89999998 in float64.)"""
    return ops.convert_to_tensor(value, dtype=keras.backend.standardize_dtype(dtype))


def _name(variable, what):
    base = getattr(variable, "path", None) or str(variable.name)
    return f"{base.replace('/', '_').replace(':', '_')}_{what}"
