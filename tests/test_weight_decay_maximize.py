"""Decoupled weight decay and maximize, in the core: their math (against a
transcription written here), bit agreement of the backends and routes,
validation, schedules and checkpoints."""
import numpy as np
import pytest

import expectigrad_np as eg
from expectigrad_np import schedules

BACKENDS = ["cpu", "numpy"]


def _transcription(x, grads, lr, beta, eps, wd, maximize, sparse=True):
    """AdamW-style decoupled decay around Expectigrad, float64, written from
    the equations: x <- x * (1 - lr*wd) - lr / (1 - beta**t) * m."""
    x = x.astype(np.float64).copy()
    s = np.zeros_like(x)
    n = np.zeros_like(x)
    m = np.zeros_like(x)
    for t, g in enumerate(grads, 1):
        g = -g if maximize else g
        s += g * g
        n = n + np.sign(g * g) if sparse else np.full_like(x, t)
        u = np.where(n > 0, g / (eps + np.sqrt(s / np.maximum(n, 1))), 0.0)
        lr_t = lr(t - 1) if callable(lr) else lr
        x = x * (1 - lr_t * wd)
        if beta > 0:
            m = beta * m + (1 - beta) * u
            x = x - lr_t / (1 - beta ** t) * m
        else:
            x = x - lr_t * u
    return x


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("beta", [0.0, 0.9])
@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("sparse", [True, False])
def test_weight_decay_and_maximize_follow_the_equations(backend, beta, maximize, sparse):
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal(9)
    grads = [rng.standard_normal(9) * (rng.random(9) < 0.7) for _ in range(12)]
    lr = schedules.exponential_decay(0.05, 0.9) if beta else 0.05
    x = x0.copy()
    opt = eg.Expectigrad([x], lr=lr, beta=beta, weight_decay=0.2, maximize=maximize,
                         sparse_counter=sparse, backend=backend)
    for g in grads:
        opt.step([g])
    want = _transcription(x0, grads, lr, beta, 1e-8, 0.2, maximize, sparse)
    np.testing.assert_allclose(x, want, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("beta", [0.0, 0.9])
def test_maximize_gives_the_bits_of_the_negated_gradient(dtype, beta):
    """Also when switched on and off mid-run, and with clipping."""
    rng = np.random.default_rng(1)
    grads = [rng.standard_normal((4, 3)).astype(dtype) for _ in range(6)]
    flips = [False, True, True, False, True, False]
    for backend in BACKENDS:
        a, b = np.ones((4, 3), dtype), np.ones((4, 3), dtype)
        oa = eg.Expectigrad([a], lr=0.1, beta=beta, clipnorm=1.5, backend=backend)
        ob = eg.Expectigrad([b], lr=0.1, beta=beta, clipnorm=1.5, backend=backend)
        for g, flip in zip(grads, flips):
            oa.param_groups[0]["maximize"] = flip
            oa.step([g])
            ob.step([-g if flip else g])
        np.testing.assert_array_equal(a, b)


def _run(backend, dtypes, hyper, steps=5, seed=2):
    rng = np.random.default_rng(seed)
    xs = [rng.standard_normal(s).astype(d) for s, d in zip([(7,), (3, 5), (4,)], dtypes)]
    groups = [{"params": xs[:2], "weight_decay": 0.1, "maximize": True},
              {"params": xs[2:]}]
    opt = eg.Expectigrad(groups, backend=backend, **hyper)
    for _ in range(steps):
        opt.step([rng.standard_normal(x.shape).astype(x.dtype) for x in xs])
    return xs, opt


@pytest.mark.parametrize("dtypes", [[np.float32] * 3, [np.float64] * 3,
                                    [np.float32, np.float64, np.float32]])
@pytest.mark.parametrize("hyper", [dict(lr=0.05), dict(lr=0.05, beta=0.0, weight_decay=0.3),
                                   dict(lr=schedules.inverse_time_decay(0.1, 0.5),
                                        clipvalue=0.8)])
def test_backends_and_routes_agree_bit_for_bit(dtypes, hyper):
    """Per-group weight decay and maximize; one dtype (the compiled route) and
    two (the general route)."""
    a, _ = _run("cpu", dtypes, hyper)
    b, _ = _run("numpy", dtypes, hyper)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("dtypes", [[np.float64] * 3, [np.float32, np.float64, np.float32]])
def test_backends_agree_with_norm_clipping(dtypes):
    """Norms are summed in another order on each backend: agreement to
    rounding, not bits."""
    hyper = dict(lr=0.05, clipnorm=1.0, global_clipnorm=2.0)
    a, _ = _run("cpu", dtypes, hyper)
    b, _ = _run("numpy", dtypes, hyper)
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, rtol=1e-5 if x.dtype == np.float32 else 1e-12)


def test_weight_decay_uses_the_scheduled_lr_and_decays_without_gradient_signal():
    """With a zero gradient the step is 0/0 := 0: only the decay moves x."""
    x = np.full(3, 2.0)
    lr = schedules.exponential_decay(0.1, 0.5)
    opt = eg.Expectigrad([x], lr=lr, weight_decay=0.5)
    want = 2.0
    for t in range(4):
        opt.step([np.zeros(3)])
        want *= 1 - lr(t) * 0.5
    np.testing.assert_allclose(x, want, rtol=1e-15)


@pytest.mark.parametrize("key,value,error", [
    ("weight_decay", -0.1, ValueError), ("weight_decay", float("nan"), ValueError),
    ("weight_decay", True, TypeError), ("weight_decay", "0.1", TypeError),
    ("maximize", 1, TypeError), ("maximize", "yes", TypeError)])
def test_bad_values_are_refused_in_the_constructor_and_the_groups(key, value, error):
    x = np.zeros(3)
    with pytest.raises(error, match=key):
        eg.Expectigrad([x], **{key: value})
    opt = eg.Expectigrad([x])
    with pytest.raises(error, match=key):
        opt.param_groups[0][key] = value
    assert opt.param_groups[0][key] == eg.Expectigrad([np.zeros(3)]).param_groups[0][key]
    opt.step([np.ones(3)])                                 # unchanged, still steps
    np.testing.assert_allclose(x, -1e-3)


def test_state_dicts_and_checkpoints_record_them(tmp_path):
    xs, opt = _run("cpu", [np.float64] * 3, dict(lr=0.05))
    groups = opt.state_dict()["param_groups"]
    assert groups[0]["weight_decay"] == 0.1 and groups[0]["maximize"] is True
    assert groups[1]["weight_decay"] == 0.0 and groups[1]["maximize"] is False
    path = tmp_path / "ck.npz"
    opt.save(path)
    ys = [np.zeros_like(x) for x in xs]
    twin = eg.Expectigrad([{"params": ys[:2], "weight_decay": 0.1, "maximize": True},
                           {"params": ys[2:]}], lr=0.05)
    twin.load(path)
    g = [np.ones_like(x) for x in xs]
    opt.step(g)
    twin.step(g)
    for x, y in zip(xs, ys):
        np.testing.assert_array_equal(x, y)
    other = eg.Expectigrad([{"params": [np.zeros_like(x) for x in xs[:2]]},
                            {"params": [np.zeros_like(xs[2])]}], lr=0.05)
    with pytest.raises(ValueError, match="weight_decay|maximize"):
        other.load(path)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("weight_decay", [10.5, 1e40])
def test_a_decay_factor_below_zero_is_refused_everywhere(dtype, weight_decay):
    # lr * weight_decay > 1: the factor 1 - lr * weight_decay flips the
    # parameters' signs each step (and below -1 grows them without bound).
    match = r"decay factor 1 - lr \* weight_decay of .*use lr \* weight_decay <= 1"
    with pytest.raises(ValueError, match=match):
        eg.Expectigrad([np.ones(3, dtype)], lr=0.1, weight_decay=weight_decay)
    x = np.ones(3, dtype)
    opt = eg.Expectigrad([x], lr=0.1)
    with pytest.raises(ValueError, match=match):
        opt.param_groups[0]["weight_decay"] = weight_decay
    assert opt.param_groups[0]["weight_decay"] == 0.0
    sd = opt.state_dict()
    sd["param_groups"][0]["weight_decay"] = weight_decay
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(sd)
    assert opt.param_groups[0]["weight_decay"] == 0.0
    scheduled = eg.Expectigrad([x], lr=lambda t: 0.1, weight_decay=weight_decay)
    with pytest.raises(ValueError, match=match):
        scheduled.step([np.ones(3, dtype)])
    assert np.all(x == 1)
    eg.Expectigrad([np.ones(3, dtype)], lr=0.1, weight_decay=10.0)    # factor 0: allowed
