"""``expectigrad_np.minimize``: scipy-style and stochastic minimisation."""
import os
import subprocess
import sys
import warnings

import numpy as np
import peak_memory
import pytest
import scipy.optimize as so

import expectigrad_np as eg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
X0 = np.array([-1.2, -1.0, -1.0, -1.0, -1.0])


def quad(x, a=3.0):
    return float(a * np.sum((x - 1.0) ** 2))


def quad_grad(x, a=3.0):
    return 2.0 * a * (x - 1.0)


class Counting:
    def __init__(self, f):
        self.f, self.calls = f, 0

    def __call__(self, *a):
        self.calls += 1
        return self.f(*a)


# --- the package and the plug-in ----------------------------------------------

def test_import_does_not_import_scipy_optimize():
    code = ("import sys, expectigrad_np as eg; assert 'scipy.optimize' not in sys.modules;"
            "f = eg.minimize; assert callable(f) and f.__name__ == 'minimize';"
            "assert 'scipy.optimize' not in sys.modules; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": ROOT})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_rosenbrock_5d_converges():
    res = eg.minimize(so.rosen, X0, jac=so.rosen_der, lr=0.05, beta=0.9,
                      maxiter=20_000, gtol=0)
    assert res.fun < 1e-20
    assert res.nit == 20_000 and res.nfev == 20_001 and res.njev == 20_001
    np.testing.assert_allclose(res.x, 1.0, atol=1e-9)
    assert res.status == 1 and not res.success


def test_steps_are_those_of_the_expectigrad_class():
    """minimize is a consumer of Expectigrad: same steps, bit for bit."""
    kw = dict(lr=0.01, beta=0.8, eps=1e-6, sparse_counter=False, clipnorm=5.0)
    res = eg.minimize(so.rosen, X0, jac=so.rosen_der, maxiter=300, gtol=0, **kw)
    x = X0.copy()
    opt = eg.Expectigrad(x, **kw)
    for _ in range(300):
        opt.step(so.rosen_der(x))
    np.testing.assert_array_equal(res.x, x)
    assert res.fun == so.rosen(x)
    np.testing.assert_array_equal(res.jac, so.rosen_der(x))


def test_lr_schedule_passed_through():
    lr = eg.schedules.inverse_time_decay(0.05, rate=0.5, steps=10)
    res = eg.minimize(so.rosen, X0, jac=so.rosen_der, lr=lr, maxiter=100, gtol=0)
    x = X0.copy()
    opt = eg.Expectigrad(x, lr=lr)
    for _ in range(100):
        opt.step(so.rosen_der(x))
    np.testing.assert_array_equal(res.x, x)
    const = eg.minimize(so.rosen, X0, jac=so.rosen_der, lr=0.05, maxiter=100, gtol=0)
    assert not np.array_equal(const.x, x)


def test_demo_rosenbrock_part():
    from expectigrad_np import demo
    lines = []
    res = demo.rosenbrock(maxiter=20_000, out=lines.append)
    assert res["Expectigrad"].success and res["Expectigrad"].fun < 1e-18
    assert any("Expectigrad" in line and "nit" in line for line in lines)


def test_scipy_custom_method():
    seen = []
    res = so.minimize(so.rosen, X0, jac=so.rosen_der, method=eg.minimize,
                      callback=seen.append, options=dict(lr=0.05, maxiter=20_000))
    assert isinstance(res, so.OptimizeResult)
    assert res.success and res.status == 0 and np.max(np.abs(res.jac)) <= 1e-5
    assert len(seen) == res.nit and res.nit < 20_000
    np.testing.assert_array_equal(seen[-1], res.x)
    np.testing.assert_allclose(res.x, 1.0, atol=1e-4)


def test_scipy_plugin_jac_true_and_tol():
    def fg(x):
        return quad(x), quad_grad(x)
    res = so.minimize(fg, np.zeros(3), jac=True, method=eg.minimize, tol=1e-7,
                      options=dict(lr=0.1, maxiter=5000))
    assert res.success and np.max(np.abs(res.jac)) <= 1e-7
    assert res.nit < 5000
    # gtol given explicitly wins over tol
    res2 = so.minimize(fg, np.zeros(3), jac=True, method=eg.minimize, tol=1e-7,
                       options=dict(lr=0.1, maxiter=5000, gtol=1e-2))
    assert res2.success and res2.nit < res.nit


def test_scipy_plugin_unknown_option_and_constraints_refused():
    with pytest.raises(TypeError, match="bogus"):
        so.minimize(quad, np.zeros(2), method=eg.minimize, options=dict(bogus=1))
    with pytest.raises(TypeError):
        eg.minimize(quad, np.zeros(2), learning_rate=0.1)
    cons = {"type": "eq", "fun": lambda x: x[0]}
    with pytest.raises(ValueError, match="constraints"):
        so.minimize(quad, np.zeros(2), method=eg.minimize, constraints=cons)
    with pytest.warns(RuntimeWarning, match="first-order"):
        eg.minimize(quad, np.zeros(2), jac=quad_grad, hess=lambda x: np.eye(2),
                    maxiter=3)


# --- x0, dtype, jac ---------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_x0_untouched_and_dtype_kept(dtype):
    x0 = np.zeros(4, dtype)
    res = eg.minimize(lambda x: quad(x), x0, jac=lambda x: quad_grad(x).astype(dtype),
                      lr=0.1, maxiter=50)
    assert np.all(x0 == 0) and res.x.dtype == dtype and res.x is not x0
    assert np.all(res.x > 0)


def test_int_x0_becomes_float64_and_shape_kept():
    x0 = np.zeros((2, 3), dtype=np.int64)
    res = eg.minimize(quad, x0, jac=quad_grad, lr=0.1, maxiter=20)
    assert res.x.dtype == np.float64 and res.x.shape == (2, 3)
    res = eg.minimize(quad, x0, lr=0.1, maxiter=20)          # finite differences, 2-D
    assert res.x.shape == (2, 3) and np.all(res.x > 0)


def test_bad_x0_refused():
    with pytest.raises(TypeError, match="float16"):
        eg.minimize(quad, np.zeros(2, np.float16))
    with pytest.raises(TypeError, match="complex"):
        eg.minimize(quad, np.zeros(2, complex))
    with pytest.raises(ValueError, match="NaN"):
        eg.minimize(quad, np.array([0.0, np.nan]))
    with pytest.raises(ValueError, match="empty"):
        eg.minimize(quad, np.zeros(0))
    with pytest.raises(ValueError, match="jac"):
        eg.minimize(quad, np.zeros(2), jac="5-point")
    with pytest.raises(ValueError, match="shape"):
        eg.minimize(quad, np.zeros(2), jac=lambda x: np.zeros(3))
    with pytest.raises(ValueError, match="scalar"):
        eg.minimize(lambda x: x, np.zeros(2), jac=quad_grad)


def test_args_passed_through():
    f, g = Counting(quad), Counting(quad_grad)
    res = eg.minimize(f, np.zeros(2), args=(5.0,), jac=g, lr=0.1, maxiter=10, gtol=0)
    assert res.fun == quad(res.x, 5.0) and res.fun != quad(res.x)
    assert f.calls == res.nfev == 11 and g.calls == res.njev == 11


@pytest.mark.parametrize("method, per_grad", [(None, 3), ("2-point", 3), ("3-point", 6)])
def test_finite_differences_count_every_call(method, per_grad):
    f = Counting(quad)
    res = eg.minimize(f, np.zeros(3), jac=method, lr=0.1, maxiter=40, gtol=0)
    assert res.nfev == f.calls == 41 * (1 + per_grad)
    assert res.njev == 41
    np.testing.assert_allclose(res.jac, quad_grad(res.x), atol=1e-5)


def test_finite_differences_match_analytic_steps():
    a = eg.minimize(so.rosen, X0, jac="3-point", lr=0.01, maxiter=100, gtol=0)
    b = eg.minimize(so.rosen, X0, jac=so.rosen_der, lr=0.01, maxiter=100, gtol=0)
    np.testing.assert_allclose(a.x, b.x, rtol=1e-6)


# --- bounds -------------------------------------------------------------------------

def _recording(store):
    def cb(intermediate_result):
        store.append(intermediate_result.x)
    return cb


@pytest.mark.parametrize("bounds", [
    so.Bounds([-np.inf, 0.0, 0.5], [0.2, 0.6, np.inf]),
    [(None, 0.2), (0.0, 0.6), (0.5, None)],
])
def test_bounds_projected_every_iterate_feasible(bounds):
    seen = []
    x0 = np.array([3.0, -2.0, 0.0])                       # infeasible: projected
    res = eg.minimize(quad, x0, jac=quad_grad, bounds=bounds, lr=0.05, maxiter=400,
                      callback=_recording(seen))
    lo, hi = np.array([-np.inf, 0.0, 0.5]), np.array([0.2, 0.6, np.inf])
    xs = np.array(seen + [res.x])
    assert np.all(xs >= lo) and np.all(xs <= hi)
    np.testing.assert_allclose(res.x, [0.2, 0.6, 1.0], atol=1e-3)
    assert np.array_equal(x0, [3.0, -2.0, 0.0])
    assert res.status == 0 and res.success and "projected" in res.message
    start = eg.minimize(quad, x0, jac=quad_grad, bounds=bounds, maxiter=0)
    np.testing.assert_array_equal(start.x, [0.2, 0.0, 0.5])   # x0 projected too
    assert start.fun == quad(start.x) and start.nit == 0


def test_bounds_float32_rounded_inwards_and_checked():
    lo = 0.1                                               # float32(0.1) > 0.1: fine
    hi = 0.3                                               # float32(0.3) > 0.3: rounded down
    res = eg.minimize(lambda x: float(np.sum((x - 2.0) ** 2)), np.zeros(2, np.float32),
                      jac=lambda x: 2 * (x - 2.0), bounds=[(lo, hi)] * 2, lr=0.1,
                      maxiter=50)
    assert res.x.dtype == np.float32
    assert np.all(res.x.astype(np.float64) <= hi) and np.all(res.x.astype(np.float64) >= lo)
    with pytest.raises(ValueError, match="element 1"):
        eg.minimize(quad, np.zeros(2), bounds=[(0, 1), (2, 1)])
    with pytest.raises(ValueError, match="pairs"):
        eg.minimize(quad, np.zeros(2), bounds=[(0, 1)])


# --- callbacks and stopping -----------------------------------------------------------

def test_callback_conventions_and_stopiteration():
    got = []

    def new_style(intermediate_result):
        got.append(intermediate_result)
        if intermediate_result.nit == 7:
            raise StopIteration

    res = eg.minimize(quad, np.zeros(2), jac=quad_grad, lr=0.01, callback=new_style)
    assert res.status == 99 and not res.success and "StopIteration" in res.message
    assert res.nit == 7 and len(got) == 7
    assert isinstance(got[0], so.OptimizeResult) and got[-1].fun == res.fun
    np.testing.assert_array_equal(got[-1].x, res.x)
    got[-1].x[:] = 99.0                                    # a copy: res unaffected
    assert np.all(res.x < 1)

    legacy = []
    res = eg.minimize(quad, np.zeros(2), jac=quad_grad, lr=0.01, maxiter=5,
                      callback=lambda xk: legacy.append(xk))
    assert len(legacy) == 5 and isinstance(legacy[0], np.ndarray)
    assert not np.shares_memory(legacy[-1], res.x)


def _stop(xk):
    raise StopIteration


def test_each_ending_has_its_own_status_and_message():
    runs = {
        "gtol": eg.minimize(quad, np.zeros(2), jac=quad_grad, lr=0.1, maxiter=5000),
        "maxiter": eg.minimize(quad, np.zeros(2), jac=quad_grad, lr=0.1, maxiter=3),
        "nonfinite": eg.minimize(lambda x: np.nan, np.zeros(2), jac=quad_grad),
        "callback": eg.minimize(quad, np.zeros(2), jac=quad_grad, maxiter=5,
                                callback=_stop),
        "budget": eg.minimize(lambda x, b: quad(x), np.zeros(2),
                              jac=lambda x, b: quad_grad(x), data=[0, 1], epochs=2),
    }
    statuses = {k: r.status for k, r in runs.items()}
    assert statuses == {"gtol": 0, "maxiter": 1, "nonfinite": 3, "callback": 99,
                        "budget": 2}
    assert len({r.message for r in runs.values()}) == len(runs)
    assert [k for k, r in runs.items() if r.success] == ["gtol", "budget"]
    assert runs["maxiter"].nit == 3 and runs["gtol"].nit < 5000


def test_nonfinite_objective_stops_at_last_good_x():
    seen = []

    def f(x):           # finite only for x < 0.5: the run walks into the NaN region
        return float(np.sum(x ** 2 - 4 * x)) if np.all(x < 0.5) else np.nan

    res = eg.minimize(f, np.zeros(2), jac=lambda x: 2 * x - 4, lr=0.1, maxiter=100,
                      callback=_recording(seen))
    assert res.status == 3 and not res.success and "NaN" in res.message
    assert np.all(np.isfinite(res.x)) and np.all(res.x < 0.5)
    assert res.nit == len(seen) and res.fun == f(res.x)
    np.testing.assert_array_equal(res.x, seen[-1])


@pytest.mark.parametrize("shape", [(3,), (2, 4), (100,), (10, 12)])   # lists, arrays
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_last_good_x_is_restored_exactly(shape, dtype):
    """Where the objective turns NaN after a step, x is put back to the
    point of the last callback, bit for bit, in its dtype and shape (small
    points are kept as lists, larger ones as copies)."""
    seen = []
    target = np.linspace(1.0, 2.0, int(np.prod(shape))).reshape(shape).astype(dtype)

    def f(x):
        return float(np.sum((x - target) ** 2)) if np.all(x < 0.3) else np.nan

    res = eg.minimize(f, np.zeros(shape, dtype), jac=lambda x: 2 * (x - target),
                      lr=0.01, maxiter=1000, callback=_recording(seen))
    assert res.status == 3 and res.nit == len(seen) > 5
    assert res.x.dtype == dtype and res.x.shape == shape
    np.testing.assert_array_equal(res.x, seen[-1])
    assert np.all(res.x < 0.3) and np.all(res.x > 0.2)


def test_nonfinite_gradient_stops_at_last_good_x():
    calls = {"n": 0}

    def g(x):
        calls["n"] += 1
        return quad_grad(x) if calls["n"] < 6 else np.array([np.inf, 0.0])

    res = eg.minimize(quad, np.zeros(2), jac=g, lr=0.1, maxiter=100)
    assert res.status == 3 and res.nit == 4 and np.all(np.isfinite(res.jac))
    res0 = eg.minimize(quad, np.ones(2) * 7, jac=lambda x: np.full(2, np.nan))
    assert res0.status == 3 and res0.nit == 0 and np.all(res0.x == 7)


# --- stochastic mode ----------------------------------------------------------------

def _least_squares(seed=0, n=256, d=4):
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((n, d))
    w = rng.standard_normal(d)
    y = A @ w + 0.01 * rng.standard_normal(n)
    batches = [(A[i:i + 32], y[i:i + 32]) for i in range(0, n, 32)]

    def f(x, batch):
        a, b = batch
        r = a @ x - b
        return float(r @ r / len(b))

    def g(x, batch):
        a, b = batch
        return 2 * a.T @ (a @ x - b) / len(b)

    return f, g, batches, w


def test_stochastic_one_call_per_batch_and_epochs():
    f, g, batches, w = _least_squares()
    fc, gc = Counting(f), Counting(g)
    res = eg.minimize(fc, np.zeros(4), jac=gc, data=batches, epochs=60, lr=0.05)
    assert res.status == 2 and res.success and res.nepoch == 60
    assert res.nit == 60 * len(batches) == fc.calls == gc.calls == res.nfev
    np.testing.assert_allclose(res.x, w, atol=0.02)
    assert res.fun < 1e-3


def test_stochastic_steps_match_the_class():
    f, g, batches, _ = _least_squares()
    res = eg.minimize(f, np.zeros(4), jac=g, data=batches, epochs=3, lr=0.05)
    x = np.zeros(4)
    opt = eg.Expectigrad(x, lr=0.05)
    losses = []
    for epoch in range(3):
        losses = []
        for b in batches:
            losses.append(f(x, b))
            opt.step(g(x, b))
    np.testing.assert_array_equal(res.x, x)
    assert res.fun == pytest.approx(np.mean(losses), rel=1e-12)


def test_stochastic_maxiter_counts_steps_across_epochs_and_callable_data():
    f, g, batches, _ = _least_squares()
    fresh = {"n": 0}

    def data():
        fresh["n"] += 1
        return iter(batches)

    res = eg.minimize(f, np.zeros(4), jac=g, data=data, maxiter=20, lr=0.05)
    assert res.nit == 20 and res.status == 1 and res.success
    assert fresh["n"] == 3 and res.nepoch == 3           # 8 + 8 + 4 steps
    res = eg.minimize(f, np.zeros(4), jac=g, data=data, epochs=2, maxiter=100)
    assert res.nit == 16 and res.status == 2


def test_stochastic_one_shot_iterator():
    f, g, batches, _ = _least_squares()
    with pytest.raises(ValueError, match="one-shot"):
        eg.minimize(f, np.zeros(4), jac=g, data=iter(batches), epochs=2)
    res = eg.minimize(f, np.zeros(4), jac=g, data=(b for b in batches), maxiter=100)
    assert res.nit == len(batches) and res.status == 2 and "exhausted" in res.message
    with pytest.raises(ValueError, match="no minibatches"):
        eg.minimize(f, np.zeros(4), jac=g, data=[])
    with pytest.raises(ValueError, match="epochs"):
        eg.minimize(quad, np.zeros(2), epochs=2)


def test_stochastic_finite_differences_and_jac_true():
    f, g, batches, w = _least_squares()
    fd = eg.minimize(f, np.zeros(4), data=batches, epochs=2, lr=0.05, jac="3-point")
    an = eg.minimize(f, np.zeros(4), jac=g, data=batches, epochs=2, lr=0.05)
    np.testing.assert_allclose(fd.x, an.x, rtol=1e-5)
    assert fd.nfev == 16 * (1 + 8)
    pair = eg.minimize(lambda x, b: (f(x, b), g(x, b)), np.zeros(4), jac=True,
                       data=batches, epochs=2, lr=0.05)
    np.testing.assert_array_equal(pair.x, an.x)


def test_stochastic_zero_minibatch_gradient_does_not_stop_by_default():
    data = [0.0, 1.0, 0.0, 1.0]                      # batch 0.0 has gradient 0 at x=0
    f = lambda x, b: float(b * np.sum((x - 1) ** 2))  # noqa: E731
    g = lambda x, b: 2 * b * (x - 1)                  # noqa: E731
    res = eg.minimize(f, np.zeros(2), jac=g, data=data, epochs=2)
    assert res.nit == 8 and res.status == 2
    res = eg.minimize(f, np.zeros(2), jac=g, data=data, epochs=2, gtol=0)
    assert res.nit == 0 and res.status == 0


def test_stochastic_nonfinite_batch():
    f, g, batches, _ = _least_squares()
    bad = list(batches)
    bad[5] = (bad[5][0], np.full_like(bad[5][1], np.nan))
    seen = []
    res = eg.minimize(f, np.zeros(4), jac=g, data=bad, lr=0.05, callback=seen.append)
    assert res.status == 3 and not res.success and np.all(np.isfinite(res.x))
    assert res.nit == 4 and "minibatch 6" in res.message
    np.testing.assert_array_equal(res.x, seen[-2])         # before the last good step


# --- progress bar ---------------------------------------------------------------------

def test_progress_without_tqdm_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    with pytest.raises(ImportError, match="pip install tqdm"):
        eg.minimize(quad, np.zeros(2), jac=quad_grad, progress=True)


def test_progress_bar_runs():
    pytest.importorskip("tqdm")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = eg.minimize(quad, np.zeros(2), jac=quad_grad, lr=0.1, maxiter=30,
                          gtol=0, progress=True)
    assert res.nit == 30


@pytest.mark.parametrize("n", [2, 100])        # the list checks and NumPy's reductions
def test_huge_finite_gradients_are_finite_and_nan_is_not(n):
    """A gradient whose elements are finite but whose sum overflows is
    finite; one NaN or infinity anywhere is not (small and large arrays
    take different checks)."""
    res = eg.minimize(lambda x: 0.0, np.zeros(n), jac=lambda x: np.full(n, 1e308),
                      maxiter=1)
    assert "Maximum number of iterations" in res.message and res.nit == 1
    assert np.all(np.isfinite(res.x))
    for bad in (np.nan, np.inf, -np.inf):
        def jac(x, bad=bad):
            g = np.full(n, 1e308)
            g[n // 2] = bad
            return g
        res = eg.minimize(lambda x: 0.0, np.zeros(n), jac=jac, maxiter=1)
        assert res.status != 0 and not res.success and "NaN or infinity" in res.message
        np.testing.assert_array_equal(res.x, np.zeros(n))


def test_a_callback_gets_a_snapshot_of_the_gradient_and_the_result_its_own_jac():
    def f(x):
        return float(np.sum((x - 1) ** 2))

    def jac(x):
        return 2 * (x - 1)

    def meddle(intermediate_result):
        intermediate_result.jac *= 0        # must not reach the run
    plain = eg.minimize(f, np.zeros(3), jac=jac, lr=0.1, maxiter=20)
    meddled = eg.minimize(f, np.zeros(3), jac=jac, lr=0.1, maxiter=20, callback=meddle)
    np.testing.assert_array_equal(plain.x, meddled.x)
    res = eg.minimize(lambda x: 0.5 * float(x @ x), np.ones(3), jac=lambda x: x, lr=0.1,
                      maxiter=5)
    assert not np.shares_memory(res.jac, res.x)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(norm="fro"), ValueError, "norm must be a vector norm order"),
    (dict(norm=True), ValueError, "norm must be a vector norm order"),
    (dict(progress="no"), TypeError, "progress must be True or False"),
    (dict(x0=np.ma.array(np.zeros(3), mask=[0, 1, 0])), TypeError, "x0 is a masked array"),
    (dict(jac=lambda x: None), TypeError, "the gradient is None; jac must return"),
])
def test_bad_options_are_refused_before_the_objective_is_called(kwargs, error, match):
    calls = []

    def f(x):
        calls.append(1)
        return float(np.sum((x - 1) ** 2))
    kw = dict(x0=np.zeros(3), jac=lambda x: 2 * (x - 1))
    kw.update(kwargs)
    with pytest.raises(error, match=match):
        eg.minimize(f, kw.pop("x0"), lr=0.1, maxiter=3, **kw)
    assert len(calls) <= (1 if "jac" in kwargs else 0)


def test_a_big_endian_x0_and_an_order_of_none_are_taken():
    def f(x):
        return float(np.sum((x - 1) ** 2))

    def jac(x):
        return 2 * (x - 1)
    native = eg.minimize(f, np.zeros(3), jac=jac, lr=0.1, maxiter=10)
    swapped = eg.minimize(f, np.zeros(3, ">f8"), jac=jac, lr=0.1, maxiter=10, norm=None)
    assert swapped.x.dtype == np.float64 and swapped.x.dtype.isnative
    np.testing.assert_array_equal(native.x, swapped.x)


def test_a_stochastic_run_of_no_steps_is_refused():
    with pytest.raises(ValueError, match="maxiter must be >= 1 with data="):
        eg.minimize(lambda x, b: float(x @ x), np.ones(2), jac=lambda x, b: 2 * x,
                    data=[0, 1], maxiter=0)



_PEAK_SCRIPT = """
import json, numpy as np, expectigrad_np as eg

n = 1 << 21
x0 = np.full(n, 0.5)
quad = lambda x: (float(x @ x), 2 * x)
eg.minimize(quad, x0, jac=True, maxiter=3, lr=0.1)          # compile, touch pages
grown = {}
for name, opts in (("plain", {}), ("bounds", dict(bounds=[(-1.0, 1.0)] * n)),
                   ("norm=1", dict(norm=1)), ("bounds, norm=3", dict(bounds=[(-1.0, 1.0)] * n,
                                                                    norm=3))):
    base = reset()
    eg.minimize(quad, x0, jac=True, maxiter=3, lr=0.1, **opts)
    grown[name] = peak() - base
print(json.dumps(dict(grown, kib=n * 8 // 1024)))
"""


@peak_memory.needs_proc
def test_the_convergence_check_needs_no_temporary_the_size_of_x():
    # Bounds (the projected gradient) and norms other than 2 and inf are taken
    # in pieces: a run with them peaks no higher than a plain one, beyond the
    # bounds' own two arrays.
    r = peak_memory.run(_PEAK_SCRIPT)
    one = r["kib"]                          # one array the size of x
    plain = r["plain"]
    assert r["norm=1"] < plain + one // 4, r
    # The bounds: lb and ub, two arrays the size of x, kept for the run.
    for name in ("bounds", "bounds, norm=3"):
        assert r[name] < plain + 2 * one + one // 4, r


@pytest.mark.parametrize("norm, g", [(0.5, 1.5e308), (-2, 1e200)])
def test_norms_beyond_the_float_range_are_inf_as_numpy_takes_them(norm, g):
    # numpy.linalg.norm gives inf here (Python's float power raises); the run goes
    # on to maxiter.
    res = eg.minimize(lambda x: (0.0, np.full(3, g)), np.zeros(3), jac=True, norm=norm,
                      maxiter=2, gtol=0.0, lr=1e-300)
    assert res.status == 1 and res.nit == 2, res
