"""The Keras 3 front end (``expectigrad_np.tensorflow2``): the same updates
as ``eg.Expectigrad`` on the same gradients, ``model.fit``, config and
saving round trips, the original's options.

Collected directly, this runs on ``KERAS_BACKEND`` (torch unless set);
tests/test_keras_backends.py runs it again, in its own process, on every
other installed backend (TensorFlow, with tests/keras_tensorflow_cases.py;
JAX)."""
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "torch")
keras = pytest.importorskip("keras", reason="keras is not installed "
                            "(pip install 'expectigrad_np[keras]')")
if keras.backend.backend() == "tensorflow":       # pragma: no cover - other CI setups
    pytest.importorskip("tensorflow")

import expectigrad_np as eg  # noqa: E402
from expectigrad_np.tensorflow2 import Expectigrad  # noqa: E402

SHAPES = [(4, 3), (3,), (2, 2)]
BACKEND = keras.backend.backend()
# On TensorFlow, Keras itself turns a Python float into a float32 tensor
# before casting it to the variable's dtype, in its learning-rate schedules
# and in its weight decay: float64 runs that use them agree to float32's
# rounding of those constants, not to float64's.
KERAS_CONSTANTS_RTOL = 1e-7 if BACKEND == "tensorflow" else 1e-12


def _apply_both(hyper, ours, steps=12, dtype="float32", seed=0, none_p=0.15):
    """Steps keras.Variables with the Keras optimizer and NumPy copies with
    ``eg.Expectigrad`` (``ours``: its keyword arguments) on the same
    gradients; returns both lists of parameters."""
    # Keras keeps the learning rate in floatx: float64 runs need floatx float64.
    floatx = keras.config.floatx()
    keras.config.set_floatx(dtype)
    try:
        return _apply(hyper, ours, steps, dtype, seed, none_p)
    finally:
        keras.config.set_floatx(floatx)


def _apply(hyper, ours, steps, dtype, seed, none_p):
    rng = np.random.default_rng(seed)
    init = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
    kv = [keras.Variable(a.copy(), dtype=dtype) for a in init]
    xs = [a.copy() for a in init]
    opt = Expectigrad(**hyper)
    opt.build(kv)
    core = eg.Expectigrad(xs, backend="numpy", **ours)
    for _ in range(steps):
        grads = [rng.standard_normal(s).astype(dtype) * (rng.random(s) > 0.3) for s in SHAPES]
        for k in range(len(SHAPES)):
            if rng.random() < none_p:
                grads[k] = None
        if all(g is None for g in grads):
            continue
        pairs = [(keras.ops.convert_to_tensor(g), v) for g, v in zip(grads, kv)
                 if g is not None]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt.apply([p[0] for p in pairs], [p[1] for p in pairs])
        core.step(grads)
    return [keras.ops.convert_to_numpy(v) for v in kv], xs, opt


@pytest.mark.parametrize("beta", [0.0, 0.9])
@pytest.mark.parametrize("sparse", [True, False])
@pytest.mark.parametrize("dtype,rtol", [("float32", 1e-5), ("float64", 1e-12)])
def test_the_same_updates_as_the_numpy_optimizer(beta, sparse, dtype, rtol):
    a, b, _ = _apply_both(dict(learning_rate=0.05, beta=beta, sparse_counter=sparse),
                          dict(lr=0.05, beta=beta, sparse_counter=sparse), dtype=dtype)
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=rtol * 1e-2)


def test_clipping_in_the_original_order_weight_decay_and_schedules():
    schedule = keras.optimizers.schedules.InverseTimeDecay(0.1, decay_steps=1, decay_rate=0.5)
    a, b, _ = _apply_both(
        dict(learning_rate=schedule, clipvalue=0.8, clipnorm=1.0, global_clipnorm=1.5),
        dict(lr=lambda step: 0.1 / (1 + 0.5 * step), clipvalue=0.8, clipnorm=1.0,
             global_clipnorm=1.5), dtype="float64", none_p=0.0)
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, rtol=KERAS_CONSTANTS_RTOL)
    a, b, _ = _apply_both(dict(learning_rate=0.1, clipvalue=0.8, clipnorm=1.0,
                               global_clipnorm=1.5),
                          dict(lr=0.1, clipvalue=0.8, clipnorm=1.0, global_clipnorm=1.5),
                          dtype="float64", none_p=0.0)
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, rtol=1e-12)
    a, b, _ = _apply_both(dict(learning_rate=0.05, weight_decay=0.2),
                          dict(lr=0.05, weight_decay=0.2), dtype="float64", none_p=0.0)
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, rtol=KERAS_CONSTANTS_RTOL)


def test_per_variable_step_counts_skip_missing_gradients():
    _, _, opt = _apply_both(dict(learning_rate=0.05), dict(lr=0.05), none_p=0.4, seed=3)
    steps = [int(keras.ops.convert_to_numpy(s)) for s in opt._steps]
    assert len(set(steps)) > 1 and max(steps) <= int(opt.iterations.numpy())


def test_model_fit_trains():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((256, 8)).astype("float32")
    y = (X @ rng.standard_normal(8) > 0).astype("float32")
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="relu"),
                              keras.layers.Dense(1, activation="sigmoid")])
    model.compile(optimizer=Expectigrad(learning_rate=0.01), loss="binary_crossentropy",
                  metrics=["accuracy"])
    hist = model.fit(X, y, epochs=8, batch_size=32, verbose=0)
    assert hist.history["loss"][-1] < 0.6 * hist.history["loss"][0]
    assert hist.history["accuracy"][-1] > 0.85


def test_config_round_trip_and_model_save(tmp_path):
    opt = Expectigrad(learning_rate=0.02, beta=0.5, epsilon=1e-6, sparse_counter=False,
                      clipvalue=1.0, clipnorm=2.0, global_clipnorm=3.0, weight_decay=0.01)
    config = opt.get_config()
    again = Expectigrad.from_config(config)
    assert again.get_config() == config
    assert (again.beta, again.epsilon, again.sparse_counter) == (0.5, 1e-6, False)
    assert (again.clipvalue, again.clipnorm, again.global_clipnorm) == (1.0, 2.0, 3.0)

    rng = np.random.default_rng(1)
    X = rng.standard_normal((64, 4)).astype("float32")
    y = rng.standard_normal((64, 1)).astype("float32")
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3),
                              keras.layers.Dense(1)])
    model.compile(optimizer=Expectigrad(learning_rate=0.01), loss="mse")
    model.fit(X, y, epochs=2, batch_size=16, verbose=0, shuffle=False)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded.optimizer, Expectigrad)
    for a, b in zip(model.optimizer.variables, loaded.optimizer.variables):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(a),
                                      keras.ops.convert_to_numpy(b))
    model.fit(X, y, epochs=1, batch_size=16, verbose=0, shuffle=False)
    loaded.fit(X, y, epochs=1, batch_size=16, verbose=0, shuffle=False)
    for a, b in zip(model.get_weights(), loaded.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_the_original_options_lr_alias_and_decay():
    with pytest.warns(DeprecationWarning, match="lr"):
        opt = Expectigrad(lr=0.3)
    assert float(opt.learning_rate) == pytest.approx(0.3)
    opt = Expectigrad(learning_rate=0.1, decay=0.5)
    assert isinstance(opt._learning_rate, keras.optimizers.schedules.InverseTimeDecay)
    for kwargs, match in ((dict(learning_rate=0.0), "learning_rate must be greater than 0"),
                          (dict(beta=1.0), r"beta must be in \[0,1\)"),
                          (dict(epsilon=0.0), "epsilon must be greater than 0"),
                          (dict(clipnorm=-1.0), "clipnorm must be")):
        with pytest.raises(ValueError, match=match):
            Expectigrad(**kwargs)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(decay=-0.1), ValueError, "Expected decay >= 0, received: -0.1"),
    (dict(decay=float("nan")), ValueError, "Expected decay >= 0"),
    (dict(epsilon=float("inf")), ValueError, "epsilon must be greater than 0"),
    (dict(weight_decay=-0.1), ValueError, "weight_decay must be finite and >= 0"),
    (dict(beta="0.9"), TypeError, "beta must be a real number"),
    (dict(clipnorm="1"), TypeError, "clipnorm must be a real number"),
    (dict(learning_rate=keras.optimizers.schedules.ExponentialDecay(0.1, 10, 0.9),
          decay=0.5), ValueError, "decay applies to a constant learning_rate"),
])
def test_invalid_options_are_refused_clearly(kwargs, error, match):
    with pytest.raises(error, match=match):
        Expectigrad(**kwargs)


def test_numpy_scalars_are_numbers_for_every_option():
    opt = Expectigrad(learning_rate=np.float32(0.1), beta=np.float64(0.5), clipnorm=np.float32(1.0),
                      global_clipnorm=np.float32(2.0), clipvalue=np.int64(1))
    assert (opt.clipnorm, opt.global_clipnorm, opt.clipvalue) == (1.0, 2.0, 1.0)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_variables_say_what_is_supported(dtype):
    opt = Expectigrad()
    with pytest.raises(TypeError, match="has dtype .*float16; Expectigrad steps float32 or "
                                        "float64 variables"):
        opt.build([keras.Variable(np.zeros(3), dtype=dtype)])


@pytest.mark.parametrize("clip", ["clipnorm", "global_clipnorm"])
def test_a_gradient_whose_norm_overflows_is_clipped_not_dropped(clip):
    # sum(g**2) overflows float32: the norm is taken in units of the largest
    # element, as the core takes it, and the step clips instead of vanishing.
    g = np.array([1e20, 1.0, -2.0], "float32")
    v = keras.Variable(np.zeros(3, "float32"))
    opt = Expectigrad(learning_rate=0.1, **{clip: 1.0})
    opt.apply([keras.ops.convert_to_tensor(g)], [v])
    x = np.zeros(3, np.float32)
    eg.Expectigrad([x], lr=0.1, backend="numpy", **{clip: 1.0}).step([g])
    np.testing.assert_allclose(keras.ops.convert_to_numpy(v), x, rtol=1e-6, atol=1e-15)
    assert keras.ops.convert_to_numpy(v)[0] < -0.09


def test_a_gradient_whose_square_overflows_moves_by_lr():
    v = keras.Variable(np.zeros(2, "float32"))
    opt = Expectigrad(learning_rate=0.1, beta=0.0)
    opt.apply([keras.ops.convert_to_tensor(np.array([1e30, -1e30], "float32"))], [v])
    np.testing.assert_allclose(keras.ops.convert_to_numpy(v), [-0.1, 0.1], rtol=1e-6)


def test_importing_the_package_does_not_import_keras():
    code = ("import sys, numpy as np, expectigrad_np as eg\n"
            "eg.Expectigrad(np.zeros(3)).step(np.ones(3))\n"
            "assert 'keras' not in sys.modules and 'tensorflow' not in sys.modules\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]

