"""The Keras 3 front end on the TensorFlow backend only: ``tf.IndexedSlices``
gradients (an ``Embedding``'s).  Not collected by name:
tests/test_keras_backends.py runs it with ``KERAS_BACKEND=tensorflow``."""
import os

import numpy as np
import pytest

if os.environ.get("KERAS_BACKEND") != "tensorflow":
    pytest.skip("run by tests/test_keras_backends.py with KERAS_BACKEND=tensorflow",
                allow_module_level=True)

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

import expectigrad_np as eg  # noqa: E402
from expectigrad_np.tensorflow2 import Expectigrad  # noqa: E402


@pytest.mark.parametrize("beta", [0.0, 0.9])
@pytest.mark.parametrize("sparse", [True, False])
@pytest.mark.parametrize("dtype,rtol", [("float32", 1e-5), ("float64", 1e-12)])
def test_indexed_slices_step_as_the_core_row_sparse_step(beta, sparse, dtype, rtol):
    """``tf.IndexedSlices`` (duplicate rows included) against ``eg.RowSparse``
    of the same rows in the core: the same parameters after every step."""
    floatx = keras.config.floatx()
    keras.config.set_floatx(dtype)
    try:
        rng = np.random.default_rng(7)
        table = rng.standard_normal((9, 4)).astype(dtype)
        var = keras.Variable(table.copy(), dtype=dtype)
        mine = table.copy()
        opt = Expectigrad(learning_rate=0.05, beta=beta, sparse_counter=sparse)
        core = eg.Expectigrad([mine], backend="numpy", lr=0.05, beta=beta,
                              sparse_counter=sparse)
        touched = np.array([], int)
        for _ in range(10):
            rows = rng.integers(0, 7, size=rng.integers(1, 6))       # duplicates too
            values = rng.standard_normal((len(rows), 4)).astype(dtype)
            grad = tf.IndexedSlices(tf.constant(values), tf.constant(rows, tf.int64),
                                    dense_shape=tf.constant(table.shape, tf.int64))
            opt.apply([grad], [var])
            core.step([eg.RowSparse(rows, values)])
            touched = np.union1d(touched, rows)
            np.testing.assert_allclose(keras.ops.convert_to_numpy(var), mine, rtol=rtol,
                                       atol=rtol * 1e-2)
        untouched = np.setdiff1d(np.arange(9), touched)
        assert untouched.size                 # rows no gradient reached ...
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(var)[untouched],
                                      table[untouched])       # ... have not moved
    finally:
        keras.config.set_floatx(floatx)


def test_an_embedding_model_fits_through_indexed_slices():
    """``model.fit`` of an ``Embedding`` model: its gradient reaches the
    optimizer as ``tf.IndexedSlices`` (checked), and the loss falls."""
    rng = np.random.default_rng(2)
    ids = rng.integers(0, 50, size=(512, 3))
    y = (ids % 2).sum(axis=1, keepdims=True).astype("float32") / 3.0
    keras.utils.set_random_seed(2)
    model = keras.Sequential([keras.Input((3,), dtype="int32"), keras.layers.Embedding(50, 8),
                              keras.layers.Flatten(), keras.layers.Dense(1)])
    seen = []

    class Recording(Expectigrad):
        def apply(self, grads, trainable_variables=None):
            seen.append(any(isinstance(g, tf.IndexedSlices) for g in grads))
            return super().apply(grads, trainable_variables)

    model.compile(optimizer=Recording(learning_rate=0.02), loss="mse")
    hist = model.fit(ids, y, epochs=6, batch_size=32, verbose=0)
    assert any(seen), "no IndexedSlices gradient reached the optimizer"
    assert hist.history["loss"][-1] < 0.5 * hist.history["loss"][0]
