"""Expectigrad as a ``tf.compat.v1.train.Optimizer`` (graph mode and eager).

A drop-in for the original project's ``expectigrad.tensorflow1``
``ExpectigradOptimizer``, on current TensorFlow 2.x::

    from expectigrad_np.tensorflow1 import ExpectigradOptimizer
    train_op = ExpectigradOptimizer(learning_rate=1e-3).minimize(loss)

The update is ``reference.py``'s, per variable and in its dtype (see
``expectigrad_np.tensorflow2`` for the equations).  Unlike the original it
works with resource variables and with sparse gradients
(``tf.IndexedSlices``, e.g. from ``tf.gather``), which are summed into a
dense gradient first, so the result is exactly the dense step.  ``t``
counts the steps in which a variable received a gradient (the original
counts the optimizer's global iterations; they agree when every variable
gets a gradient every step).

Importing this module imports TensorFlow; ``import expectigrad_np`` does not.
"""
from __future__ import annotations

import math

import numpy as np
import tensorflow as tf

from .backends.layout import SATURATION

__all__ = ["ExpectigradOptimizer"]


class ExpectigradOptimizer(tf.compat.v1.train.Optimizer):
    """Expectigrad (Daley & Amato, 2020) for ``tf.compat.v1``.

    Parameters
    ----------
    learning_rate : float, Tensor or callable, default 1e-3
    beta : float in [0, 1), default 0.9
    epsilon : float > 0, default 1e-8
    sparse_counter : bool, default True
    use_locking : bool, default False
    name : str, default "Expectigrad"

    Raises ``ValueError`` with the original's messages for ``beta`` and
    ``epsilon``, and for a constant ``learning_rate`` not > 0; ``TypeError``
    for variables neither float32 nor float64.  Like TensorFlow's
    optimizers it does not check gradients for NaN or infinity.
    """

    def __init__(self, learning_rate=0.001, beta=0.9, epsilon=1e-8, sparse_counter=True,
                 use_locking=False, name="Expectigrad"):
        super().__init__(use_locking, name)
        if isinstance(learning_rate, (int, float)) and not isinstance(learning_rate, bool) \
                and not (learning_rate > 0 and math.isfinite(learning_rate)):
            raise ValueError(f"learning_rate must be greater than 0 but got {learning_rate}")
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must be in [0,1) but got {beta}")
        if not (epsilon > 0.0 and math.isfinite(epsilon)):
            raise ValueError(f"epsilon must be greater than 0 but got {epsilon}")
        self._lr = learning_rate
        self._beta = float(beta)
        self._epsilon = float(epsilon)
        self._sparse_counter = bool(sparse_counter)
        self._lr_t = None

    def _create_slots(self, var_list):
        for var in var_list:
            if var.dtype.base_dtype not in (tf.float32, tf.float64):
                raise TypeError(f"variable {var.name} has dtype {var.dtype.base_dtype.name}; "
                                "Expectigrad steps float32 or float64 variables")
        for var in var_list:
            self._zeros_slot(var, "mean_sq", self._name)
            if self._sparse_counter:
                self._zeros_slot(var, "count", self._name)      # whole numbers, var dtype
            if self._beta > 0:
                self._zeros_slot(var, "momentum", self._name)
            self._get_or_make_slot(var, tf.zeros([], var.dtype.base_dtype), "step",
                                   self._name)

    def _prepare(self):
        lr = self._call_if_callable(self._lr)
        # A Python number stays one, so that float64 variables get it exactly
        # (a tensor made from it would be float32).
        self._lr_t = lr if isinstance(lr, (int, float)) else tf.convert_to_tensor(
            lr, name="learning_rate")

    def _update(self, grad, var):
        """The dense step of ``var`` with gradient ``grad``."""
        dtype = var.dtype.base_dtype
        lock = self._use_locking
        sat = float(SATURATION[np.dtype(dtype.as_numpy_dtype)])
        g = tf.clip_by_value(tf.cast(grad, dtype), -sat, sat)
        g2 = tf.square(g)
        step = self.get_slot(var, "step")
        t = step + 1
        updates = [tf.compat.v1.assign(step, t, use_locking=lock)]
        zero = tf.zeros_like(g2)
        if self._sparse_counter:
            count = self.get_slot(var, "count")
            counted = tf.not_equal(g2, zero)
            n = count + tf.cast(counted, dtype)
            updates.append(tf.compat.v1.assign(count, n, use_locking=lock))
            weight = tf.where(counted, 1.0 / tf.where(counted, n, tf.ones_like(n)), zero)
        else:
            weight = 1.0 / t
        mean_sq = self.get_slot(var, "mean_sq")
        v = mean_sq + (g2 - mean_sq) * weight
        updates.append(tf.compat.v1.assign(mean_sq, v, use_locking=lock))
        u = g / (tf.constant(self._epsilon, dtype) + tf.sqrt(v))
        lr = (tf.constant(float(self._lr_t), dtype) if isinstance(self._lr_t, (int, float))
              else tf.cast(self._lr_t, dtype))
        if self._beta > 0:
            beta = tf.constant(self._beta, dtype)
            m_slot = self.get_slot(var, "momentum")
            m = beta * m_slot + (1.0 - beta) * u
            updates.append(tf.compat.v1.assign(m_slot, m, use_locking=lock))
            delta = lr / (1.0 - tf.pow(beta, t)) * m
        else:
            delta = lr * u
        updates.append(tf.compat.v1.assign_sub(var, delta, use_locking=lock))
        return tf.group(*updates)

    def _apply_dense(self, grad, var):
        return self._update(grad, var)

    def _resource_apply_dense(self, grad, handle):
        return self._update(grad, handle)

    def _dense_from_rows(self, values, indices, var):
        """Row-sparse gradient rows (duplicates summed) as a dense gradient."""
        rows = tf.shape(var, out_type=indices.dtype)[0]
        return tf.math.unsorted_segment_sum(values, indices, rows)

    def _apply_sparse(self, grad, var):
        return self._update(self._dense_from_rows(grad.values, grad.indices, var), var)

    def _resource_apply_sparse(self, grad, handle, indices):
        return self._update(self._dense_from_rows(grad, indices, handle), handle)
