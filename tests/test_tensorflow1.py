"""The TF1 front end (``expectigrad_np.tensorflow1``) on TensorFlow 2.x's
``tf.compat.v1``: the original project's own TF1 test ported to a graph and
session, agreement with ``eg.Expectigrad`` (ref and resource variables,
graph and eager), sparse gradients, and the original's messages."""
import subprocess
import sys

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow", reason="tensorflow is not installed "
                         "(pip install 'expectigrad_np[tensorflow]')")

import expectigrad_np as eg  # noqa: E402
from expectigrad_np.tensorflow1 import ExpectigradOptimizer  # noqa: E402

# The original's test: f(x) = x0**2 + 4 x1**2 from (1, 1), lr 0.5, beta 0,
# epsilon 1, dense counter; the points for t = 0..7.
X_TRUE = ([1., 1.], [0.66666667, 0.55555556], [0.41972319, 0.25811745],
          [0.24979281, 0.09721015], [0.14105998, 0.02907569], [0.075971, 0.00675834],
          [0.03922201, 0.00117807], [0.01949826, 0.00014451])


@pytest.mark.parametrize("resource", [False, True])
def test_the_original_tf1_test_in_a_graph_and_session(resource):
    with tf.Graph().as_default():
        x = tf.compat.v1.Variable([1., 1.], use_resource=resource)
        y = tf.reduce_sum(tf.constant([1.0, 4.0]) * tf.square(x))
        opt = ExpectigradOptimizer(learning_rate=0.5, beta=0.0, epsilon=1.0,
                                   sparse_counter=False)
        train_op = opt.minimize(y)
        with tf.compat.v1.Session() as session:
            session.run(tf.compat.v1.global_variables_initializer())
            for t in range(8):
                np.testing.assert_allclose(session.run(x), X_TRUE[t], rtol=0, atol=1e-7)
                session.run(train_op)


def _core_run(x0, grads, hyper):
    x = x0.copy()
    opt = eg.Expectigrad([x], backend="numpy", **hyper)
    for g in grads:
        opt.step([g])
    return x


@pytest.mark.parametrize("beta", [0.0, 0.9])
@pytest.mark.parametrize("sparse", [True, False])
@pytest.mark.parametrize("resource", [False, True])
def test_graph_mode_agrees_with_the_numpy_optimizer(beta, sparse, resource):
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((3, 4))
    grads = [rng.standard_normal((3, 4)) * (rng.random((3, 4)) > 0.3) for _ in range(10)]
    with tf.Graph().as_default():
        x = tf.compat.v1.Variable(x0, use_resource=resource)
        g = tf.compat.v1.placeholder(tf.float64, (3, 4))
        opt = ExpectigradOptimizer(learning_rate=0.05, beta=beta, sparse_counter=sparse)
        train_op = opt.apply_gradients([(g, x)])
        with tf.compat.v1.Session() as session:
            session.run(tf.compat.v1.global_variables_initializer())
            for grad in grads:
                session.run(train_op, {g: grad})
            got = session.run(x)
    want = _core_run(x0, grads, dict(lr=0.05, beta=beta, sparse_counter=sparse))
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)


def test_eager_and_float32():
    rng = np.random.default_rng(1)
    x0 = rng.standard_normal(5).astype(np.float32)
    grads = [rng.standard_normal(5).astype(np.float32) for _ in range(8)]
    x = tf.Variable(x0)
    opt = ExpectigradOptimizer(learning_rate=0.1)
    for grad in grads:
        opt.apply_gradients([(tf.constant(grad), x)])
    want = _core_run(x0, grads, dict(lr=0.1))
    np.testing.assert_allclose(x.numpy(), want, rtol=1e-5)


@pytest.mark.parametrize("resource", [False, True])
def test_sparse_gradients_give_the_dense_step(resource):
    """tf.gather makes IndexedSlices (a duplicate row summed); the result is
    the step on the densified gradient, rows without a gradient included."""
    rng = np.random.default_rng(2)
    table0 = rng.standard_normal((6, 3))
    rows = np.array([1, 4, 1])
    w = rng.standard_normal((3, 3))
    with tf.Graph().as_default():
        table = tf.compat.v1.Variable(table0, use_resource=resource)
        loss = tf.reduce_sum(tf.gather(table, rows) * tf.constant(w))
        opt = ExpectigradOptimizer(learning_rate=0.1)
        (grad, _), = opt.compute_gradients(loss, [table])
        assert isinstance(grad, tf.IndexedSlices)
        train_op = opt.apply_gradients([(grad, table)])
        with tf.compat.v1.Session() as session:
            session.run(tf.compat.v1.global_variables_initializer())
            for _ in range(4):
                session.run(train_op)
            got = session.run(table)
    dense = np.zeros((6, 3))
    np.add.at(dense, rows, w)                  # d loss / d table: w's rows at their indices
    want = _core_run(table0, [dense] * 4, dict(lr=0.1))
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)
    np.testing.assert_array_equal(got[[0, 2, 3, 5]], table0[[0, 2, 3, 5]])


def test_the_original_messages():
    with pytest.raises(ValueError, match=r"beta must be in \[0,1\) but got 1.0"):
        ExpectigradOptimizer(beta=1.0)
    with pytest.raises(ValueError, match="epsilon must be greater than 0 but got 0.0"):
        ExpectigradOptimizer(epsilon=0.0)
    with pytest.raises(ValueError, match="epsilon must be greater than 0 but got inf"):
        ExpectigradOptimizer(epsilon=float("inf"))
    for lr in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="learning_rate must be greater than 0"):
            ExpectigradOptimizer(learning_rate=lr)


def test_half_precision_variables_say_what_is_supported():
    v = tf.Variable(np.zeros(3, np.float16))
    with pytest.raises(TypeError, match="has dtype float16; Expectigrad steps float32 or "
                                        "float64 variables"):
        ExpectigradOptimizer().apply_gradients([(tf.ones(3, tf.float16), v)])


def test_importing_the_package_does_not_import_tensorflow():
    code = ("import sys, numpy as np, expectigrad_np as eg\n"
            "eg.Expectigrad(np.zeros(3)).step(np.ones(3))\n"
            "assert 'tensorflow' not in sys.modules\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
