"""Row-sparse gradients (``RowSparse``, ``scipy.sparse``): every step equals
the dense step of the densified gradient; eager steps bit for bit, lazy ones
to rounding once synced; only the rows that can change are visited."""
import copy
import pickle

import numpy as np
import peak_memory
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st

import expectigrad_np as eg
from expectigrad_np import lazy as lazy_mod
from expectigrad_np.backends.numpy import NumpyBucket

BACKENDS = ["numpy", "cpu"]
DTYPES = [np.float64, np.float32]
TOL = {np.float64: 1e-12, np.float32: 2e-5}


def make_pair(backend, dtype, shape=(40, 3), lazy=False, seed=0, **hyper):
    """Two optimizers on equal parameters (a table and a dense bias): one
    takes row-sparse gradients, the other their dense form."""
    rng = np.random.default_rng(seed)
    x0 = rng.standard_normal(shape).astype(dtype)
    b0 = rng.standard_normal(5).astype(dtype)
    sparse_params = [x0.copy(), b0.copy()]
    dense_params = [x0.copy(), b0.copy()]
    hyper.setdefault("lr", 0.01)
    opt_s = eg.Expectigrad(sparse_params, backend=backend, lazy=lazy, **hyper)
    opt_d = eg.Expectigrad(dense_params, backend=backend, **hyper)
    return opt_s, sparse_params, opt_d, dense_params


def random_rows(rng, nrows, rowshape, dtype, max_rows=8):
    n = int(rng.integers(0, max_rows + 1))
    idx = rng.integers(0, nrows, n)                 # duplicates likely
    vals = (rng.standard_normal((n,) + rowshape) * 10.0 ** rng.uniform(-2, 2)).astype(dtype)
    vals[rng.random(vals.shape) < 0.2] = 0.0        # exact zeros too
    return eg.RowSparse(idx, vals)


def compare_state(opt_a, opt_b, tol):
    sa, sb = opt_a.state_dict(), opt_b.state_dict()
    assert sa["step"] == sb["step"]
    for i, entry in sa["state"].items():
        other = sb["state"][i]
        assert entry["step"] == other["step"], i
        for key, value in entry.items():
            if key == "step":
                continue
            if tol == 0:
                np.testing.assert_array_equal(value, other[key], err_msg=f"{i} {key}")
            else:
                scale = max(1e-30, float(np.max(np.abs(other[key]), initial=0)))
                np.testing.assert_allclose(value, other[key], rtol=tol, atol=tol * scale,
                                           err_msg=f"{i} {key}")


def assert_params(a, b, tol):
    for pa, pb in zip(a, b):
        if tol == 0:
            np.testing.assert_array_equal(pa, pb)
        else:
            np.testing.assert_allclose(pa, pb, rtol=tol, atol=tol * float(np.max(np.abs(pb))))


HYPER = [
    dict(beta=0.9),
    dict(beta=0.0),
    dict(beta=0.9, weight_decay=0.1),
    dict(beta=0.9, sparse_counter=False),
    dict(beta=0.5, weight_decay=0.3, sparse_counter=False, maximize=True),
    dict(beta=0.9, clipvalue=0.5, clipnorm=2.0, global_clipnorm=3.0),
    dict(beta=0.9, weight_decay=0.05,
         lr=eg.schedules.warmup(eg.schedules.cosine_decay(0.05, 60), 5)),
]


def run(backend, dtype, hyper, lazy, steps=40, seed=1, sync_every=None):
    opt_s, ps, opt_d, pd = make_pair(backend, dtype, lazy=lazy, **hyper)
    rng = np.random.default_rng(seed)
    for t in range(steps):
        g = random_rows(rng, 40, (3,), dtype)
        gb = None if rng.random() < 0.2 else rng.standard_normal(5).astype(dtype)
        if rng.random() < 0.1:
            g = None
        opt_s.step([g, gb])
        opt_d.step([None if g is None else g.todense(pd[0]), gb])
        if sync_every and t % sync_every == 0:
            opt_s.sync()
    return opt_s, ps, opt_d, pd


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hyper", HYPER, ids=range(len(HYPER)))
def test_eager_row_sparse_steps_are_the_dense_steps_bit_for_bit(backend, dtype, hyper):
    opt_s, ps, opt_d, pd = run(backend, dtype, hyper, lazy=False)
    assert_params(ps, pd, 0)
    compare_state(opt_s, opt_d, 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hyper", HYPER, ids=range(len(HYPER)))
def test_lazy_row_sparse_steps_equal_the_dense_steps_once_synced(backend, dtype, hyper):
    opt_s, ps, opt_d, pd = run(backend, dtype, hyper, lazy=True)
    opt_s.sync()
    assert_params(ps, pd, TOL[dtype])
    compare_state(opt_s, opt_d, TOL[dtype])


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), beta=st.sampled_from([0.0, 0.5, 0.9, 0.99]),
       decay=st.sampled_from([0.0, 0.05]), counter=st.booleans(),
       backend=st.sampled_from(BACKENDS), sync_every=st.integers(1, 9))
def test_property_lazy_equals_eager_at_random_sync_points(seed, beta, decay, counter, backend,
                                                          sync_every):
    """Random index sets (duplicates, empty steps, None), lazy against eager;
    each sync point compares every row."""
    rng = np.random.default_rng(seed)
    hyper = dict(beta=beta, weight_decay=decay, sparse_counter=counter, lr=0.02)
    lazy, pl, _, _ = make_pair(backend, np.float64, lazy=True, seed=seed, **hyper)
    eager, pe, _, _ = make_pair(backend, np.float64, lazy=False, seed=seed, **hyper)
    for t in range(30):
        g = random_rows(rng, 40, (3,), np.float64) if rng.random() > 0.1 else None
        gb = rng.standard_normal(5) if rng.random() > 0.3 else None
        lazy.step([g, gb])
        eager.step([g, gb])
        if t % sync_every == 0:
            lazy.sync()
            assert_params(pl, pe, 1e-12)
    lazy.sync()
    assert_params(pl, pe, 1e-12)
    compare_state(lazy, eager, 1e-12)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), beta=st.sampled_from([0.0, 0.9]),
       counter=st.booleans(), backend=st.sampled_from(BACKENDS),
       nrows=st.integers(1, 30), rowshape=st.sampled_from([(), (1,), (4,), (2, 3)]))
def test_property_sparse_equals_dense(seed, beta, counter, backend, nrows, rowshape):
    """Any shape with rows: random index sets, duplicates and empty steps."""
    rng = np.random.default_rng(seed)
    x0 = rng.standard_normal((nrows,) + rowshape)
    xs, xd = x0.copy(), x0.copy()
    opt_s = eg.Expectigrad([xs], beta=beta, sparse_counter=counter, backend=backend, lr=0.05)
    opt_d = eg.Expectigrad([xd], beta=beta, sparse_counter=counter, backend=backend, lr=0.05)
    for _ in range(12):
        g = random_rows(rng, nrows, rowshape, np.float64)
        opt_s.step([g])
        opt_d.step([g.todense(xd)])
    np.testing.assert_array_equal(xs, xd)
    compare_state(opt_s, opt_d, 0)


def forget_decay(real, out=-1):
    """A closed form that forgets the decay product D (argument ``out``)."""
    def wrong(*args):
        result = real(*args)
        args[out][:] = 1.0
        return result
    return wrong


@pytest.mark.parametrize("name", ["coefficients", "row_coefficients", "all_coefficients"])
def test_the_lazy_comparison_fails_on_a_wrong_closed_form(monkeypatch, name):
    """Each closed form without the decay is caught: the table of recent lags
    (``coefficients``) and the sync (``all_coefficients``) by the ordinary
    run, the forward one (lags beyond the window) by the long-lag run."""
    if name == "row_coefficients":      # called by lazy.coefficients, a module global
        monkeypatch.setattr(lazy_mod, name, forget_decay(lazy_mod.row_coefficients))
        opt_s, ps, opt_d, pd = long_lags("numpy")
    else:
        out = -2 if name == "coefficients" else -1          # D before R
        monkeypatch.setattr(NumpyBucket, name,
                            staticmethod(forget_decay(getattr(lazy_mod, name), out)))
        opt_s, ps, opt_d, pd = run("numpy", np.float64, dict(beta=0.9, weight_decay=0.1),
                                   lazy=True)
    opt_s.sync()
    with pytest.raises(AssertionError):
        assert_params(ps, pd, TOL[np.float64])


def test_the_eager_comparison_fails_when_momentum_rows_are_skipped(monkeypatch):
    """Visiting only the touched rows (forgetting momentum) is caught."""
    real = NumpyBucket.update_rows

    def touched_only(self, k, rows, sel, values, scale, catch=None):
        keep = sel >= 0
        out = real(self, k, rows[keep], np.arange(keep.sum()), values, scale)
        full = np.zeros(rows.size, bool)
        full[keep] = out
        return full

    monkeypatch.setattr(NumpyBucket, "update_rows", touched_only)
    with pytest.raises(AssertionError):
        opt_s, ps, opt_d, pd = run("numpy", np.float64, dict(beta=0.9), lazy=False)
        assert_params(ps, pd, 0)


# --- what is visited -----------------------------------------------------------

def visits(monkeypatch, opt):
    seen = []
    for b in opt._buckets:
        real = type(b).update_rows

        def spy(self, k, rows, sel, values, scale, catch=None, real=real):
            seen.append(rows.size)
            return real(self, k, rows, sel, values, scale, catch)

        monkeypatch.setattr(type(b), "update_rows", spy)
    return seen


@pytest.mark.parametrize("backend", BACKENDS)
def test_without_momentum_only_touched_rows_are_visited(monkeypatch, backend):
    E = np.zeros((10_000, 4))
    opt = eg.Expectigrad([E], beta=0.0, backend=backend)
    seen = visits(monkeypatch, opt)
    for _ in range(5):
        opt.step([eg.RowSparse([1, 5, 5, 9000], np.ones((4, 4)))])
    assert seen == [3] * 5


@pytest.mark.parametrize("backend", BACKENDS)
def test_eager_momentum_visits_rows_until_their_momentum_is_gone(monkeypatch, backend):
    E = np.zeros((10_000, 4), np.float32)
    opt = eg.Expectigrad([E], beta=0.5, backend=backend)
    seen = visits(monkeypatch, opt)
    opt.step([eg.RowSparse([7], np.ones((1, 4), np.float32))])
    for _ in range(400):
        opt.step([eg.RowSparse([3], np.ones((1, 4), np.float32))])
    # Row 7's momentum halves each step and underflows to zero after ~150.
    assert seen[0] == 1 and seen[1] == 2 and seen[-1] == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_lazy_visits_only_touched_rows_and_lags_until_synced(monkeypatch, backend):
    E = np.zeros((1000, 2))
    opt = eg.Expectigrad([E], beta=0.9, lazy=True, backend=backend, lr=0.1)
    seen = visits(monkeypatch, opt)
    opt.step([eg.RowSparse([4], np.ones((1, 2)))])
    moved = E[4].copy()
    opt.step([eg.RowSparse([5], np.ones((1, 2)))])
    assert seen == [1, 1]
    np.testing.assert_array_equal(E[4], moved)          # lags: momentum not yet applied
    opt.sync()
    assert np.all(E[4] < moved)                         # the momentum moved it on


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_dense_step_syncs_a_lazy_array_first(backend):
    opt_s, ps, opt_d, pd = make_pair(backend, np.float64, lazy=True, beta=0.9)
    rng = np.random.default_rng(3)
    for t in range(20):
        g = random_rows(rng, 40, (3,), np.float64)
        dense = g.todense(pd[0])
        opt_s.step([g if t % 5 else dense, None])       # every fifth step dense
        opt_d.step([dense, None])
    opt_s.sync()
    assert_params(ps, pd, 1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_dict_and_save_sync_lazy_rows(tmp_path, backend):
    opt_s, ps, opt_d, pd = run(backend, np.float64, dict(beta=0.9), lazy=True, steps=10)
    compare_state(opt_s, opt_d, 1e-12)                 # state_dict syncs
    assert_params(ps, pd, 1e-12)
    opt_s2, ps2, _, _ = run(backend, np.float64, dict(beta=0.9), lazy=True, steps=10)
    opt_s2.save(tmp_path / "ck.npz")
    assert_params(ps2, pd, 1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_changing_beta_syncs_under_the_old_beta(backend):
    opt_s, ps, opt_d, pd = make_pair(backend, np.float64, lazy=True, beta=0.9)
    rng = np.random.default_rng(5)
    for t in range(30):
        if t == 15:
            for opt in (opt_s, opt_d):
                opt.param_groups[0]["beta"] = 0.5
                opt.param_groups[0]["lr"] = 0.003
        g = random_rows(rng, 40, (3,), np.float64)
        opt_s.step([g, None])
        opt_d.step([g.todense(pd[0]), None])
    opt_s.sync()
    assert_params(ps, pd, 1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_lazy_closed_forms_hold_at_step_a_million(dtype, backend):
    """Resumed at t = 1e6 (beta**t underflowed long ago), with weight decay
    and the dense counter: lazy equals dense."""
    opt_s, ps, opt_d, pd = make_pair(backend, dtype, lazy=True, beta=0.9, weight_decay=0.01,
                                     sparse_counter=False)
    rng = np.random.default_rng(0)
    warm = [rng.standard_normal((40, 3)).astype(dtype), rng.standard_normal(5).astype(dtype)]
    opt_d.step(warm)
    sd = opt_d.state_dict()
    sd["step"] = 10**6
    for entry in sd["state"].values():
        entry["step"] = 10**6
    opt_s.load_state_dict(sd)
    opt_d.load_state_dict(sd)
    ps[0][...], ps[1][...] = pd[0], pd[1]
    for _ in range(60):
        g = random_rows(rng, 40, (3,), dtype, max_rows=3)
        opt_s.step([g, None])
        opt_d.step([g.todense(pd[0]), None])
    opt_s.sync()
    assert_params(ps, pd, TOL[dtype])
    compare_state(opt_s, opt_d, TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_lag_of_thousands_of_steps_is_caught_up_exactly(dtype):
    """Rows untouched for 3000 steps (momentum decays below float32's range)."""
    opt_s, ps, opt_d, pd = make_pair("cpu", dtype, shape=(4, 2), lazy=True, beta=0.9,
                                     weight_decay=0.001, lr=0.01)
    first = eg.RowSparse([0, 1, 2, 3], np.ones((4, 2), dtype))
    opt_s.step([first, None])
    opt_d.step([first.todense(pd[0]), None])
    g = eg.RowSparse([0], np.full((1, 2), 0.5, dtype))
    for t in range(3000):
        opt_s.step([g, None])
        opt_d.step([g.todense(pd[0]), None])
    opt_s.step([eg.RowSparse([1], np.ones((1, 2), dtype)), None])   # forward closed form
    opt_d.step([eg.RowSparse([1], np.ones((1, 2), dtype)).todense(pd[0]), None])
    np.testing.assert_allclose(ps[0][1], pd[0][1], rtol=50 * TOL[dtype])
    opt_s.sync()                                                       # backward closed form
    assert_params(ps, pd, 50 * TOL[dtype])


# --- mixed gradients, formats, copies --------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_row_sparse_mixes_with_dense_none_and_other_dtypes(backend):
    rng = np.random.default_rng(0)
    shapes = [((30, 4), np.float32), ((6,), np.float64), ((20, 2), np.float64),
              ((3, 3), np.float32)]
    a = [rng.standard_normal(s).astype(d) for s, d in shapes]
    b = [x.copy() for x in a]
    kw = dict(beta=0.9, lr=0.02, global_clipnorm=1.0, clipnorm=0.8, backend=backend)
    opt_a, opt_b = eg.Expectigrad(a, **kw), eg.Expectigrad(b, **kw)
    for t in range(15):
        g0 = random_rows(rng, 30, (4,), np.float32)
        g2 = random_rows(rng, 20, (2,), np.float64)
        g1 = rng.standard_normal(6)
        g3 = None if t % 3 == 0 else rng.standard_normal((3, 3)).astype(np.float32)
        opt_a.step([g0, g1, g2, g3])
        opt_b.step([g0.todense(b[0]), g1, g2.todense(b[2]), g3])
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, rtol=1e-5 if x.dtype == np.float32 else 1e-12)


@pytest.mark.parametrize("fmt", ["csr_matrix", "csc_matrix", "coo_matrix",
                                 "csr_array", "csc_array", "coo_array"])
def test_scipy_sparse_gradients_equal_their_dense_form(fmt):
    if not hasattr(sp, fmt):
        pytest.skip(f"scipy has no {fmt}")
    rng = np.random.default_rng(1)
    W0 = rng.standard_normal((50, 7)).astype(np.float32)
    Ws, Wd = W0.copy(), W0.copy()
    opt_s, opt_d = eg.Expectigrad([Ws], beta=0.9), eg.Expectigrad([Wd], beta=0.9)
    for _ in range(10):
        dense = np.zeros((50, 7))
        r = rng.integers(0, 50, 6)
        c = rng.integers(0, 7, 6)
        dense[r, c] = rng.standard_normal(6)
        opt_s.step([getattr(sp, fmt)(dense)])
        opt_d.step([dense.astype(np.float32)])
    np.testing.assert_array_equal(Ws, Wd)


def test_a_bare_optimizer_takes_a_row_sparse_gradient():
    E, F = np.ones((8, 2)), np.ones((8, 2))
    opt_s, opt_d = eg.Expectigrad(E, beta=0.0), eg.Expectigrad(F, beta=0.0)
    g = eg.RowSparse(np.array([2, 2, 7]), np.arange(6.0).reshape(3, 2))
    opt_s.step(g)
    opt_d.step(g.todense(F))
    np.testing.assert_array_equal(E, F)
    assert opt_s.state_dict()["state"][0]["step"] == 1


def test_a_non_contiguous_parameter_takes_the_dense_route():
    base_s, base_d = np.ones((10, 6)), np.ones((10, 6))
    xs, xd = base_s[:, ::2], base_d[:, ::2]
    opt_s, opt_d = eg.Expectigrad([xs]), eg.Expectigrad([xd])
    g = eg.RowSparse([1, 4], np.ones((2, 3)))
    for _ in range(3):
        opt_s.step([g])
        opt_d.step([g.todense(xd)])
    np.testing.assert_array_equal(base_s, base_d)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copy_of_a_lagging_lazy_optimizer_continues_the_same(how):
    opt_s, ps, opt_d, pd = run("cpu", np.float64, dict(beta=0.9), lazy=True, steps=10)
    clone = copy.deepcopy(opt_s) if how == "deepcopy" else pickle.loads(pickle.dumps(opt_s))
    g = eg.RowSparse([1, 2, 3], np.ones((3, 3)))
    opt_s.step([g, None])
    clone.step([g, None])
    opt_s.sync()
    clone.sync()
    np.testing.assert_array_equal(clone.params[0], ps[0])


# --- refusals --------------------------------------------------------------------

BAD = [
    (eg.RowSparse([0, 40], np.ones((2, 3))), ValueError, "out of range"),
    (eg.RowSparse([-1], np.ones((1, 3))), ValueError, "negative"),
    (eg.RowSparse([0.0, 1.0], np.ones((2, 3))), TypeError, "integers"),
    (eg.RowSparse([True], np.ones((1, 3))), TypeError, "integers"),
    (eg.RowSparse([[0, 1]], np.ones((2, 3))), ValueError, "1-D"),
    (eg.RowSparse([0, 1], np.ones((2, 4))), ValueError, r"expected \(2, 3\)"),
    (eg.RowSparse([0], np.ones((1, 3), complex)), TypeError, "real"),
    (eg.RowSparse([0], np.array([[1.0, np.nan, 0.0]])), FloatingPointError, "NaN"),
    (eg.RowSparse([0, 0], np.full((2, 3), 1e308)), FloatingPointError, "NaN or infinity"),
    (sp.csr_matrix(np.ones((39, 3))), ValueError, "shape"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lazy", [False, True])
@pytest.mark.parametrize("bad,exc,match", BAD, ids=range(len(BAD)))
def test_bad_row_sparse_gradients_are_refused_and_change_nothing(backend, lazy, bad, exc, match):
    opt_s, ps, _, _ = make_pair(backend, np.float64, lazy=lazy, beta=0.9)
    opt_s.step([eg.RowSparse([1, 2], np.ones((2, 3))), np.ones(5)])   # some lag
    params = [p.copy() for p in ps]
    lagging = copy.deepcopy(opt_s)
    with pytest.raises(exc, match=match):
        opt_s.step([bad, np.ones(5)])
    for p, q in zip(ps, params):
        np.testing.assert_array_equal(p, q)
    compare_state(opt_s, lagging, 0)


def test_row_sparse_gradients_of_0d_and_device_parameters_are_refused():
    x = np.zeros(())
    with pytest.raises(ValueError, match="0-d parameter has no rows"):
        eg.Expectigrad([x]).step([eg.RowSparse([0], np.ones(1))])
    with pytest.raises(ValueError, match="2-D parameter"):
        eg.Expectigrad([np.zeros((2, 2, 2))]).step([sp.csr_matrix(np.ones((2, 2)))])


def test_lazy_refuses_a_decay_that_flips_the_sign_or_zeroes():
    E = np.ones((4, 2))
    with pytest.raises(ValueError, match="use lr \\* weight_decay <= 1"):
        eg.Expectigrad([E], lr=0.5, weight_decay=3.0, lazy=True)      # every optimizer
    opt = eg.Expectigrad([E], lr=0.5, weight_decay=2.0, lazy=True)    # factor 0
    with pytest.raises(ValueError, match="lr \\* weight_decay < 1"):
        opt.step([eg.RowSparse([0], np.ones((1, 2)))])
    np.testing.assert_array_equal(E, 1.0)


def long_lags(backend, dtype=np.float64):
    """Few rows per step on a table whose rows lag longer than the window
    (70 steps at beta=0.5), under a schedule and weight decay."""
    opt_s, ps, opt_d, pd = make_pair(backend, dtype, shape=(60, 2), lazy=True, beta=0.5,
                                     weight_decay=0.02,
                                     lr=eg.schedules.cosine_decay(0.05, 400, 0.1))
    rng = np.random.default_rng(11)
    for _ in range(400):
        g = random_rows(rng, 60, (2,), dtype, max_rows=2)
        opt_s.step([g, None])
        opt_d.step([g.todense(pd[0]), None])
    return opt_s, ps, opt_d, pd


@pytest.mark.parametrize("backend", BACKENDS)
def test_long_lags_read_the_recorded_window_sums(monkeypatch, backend):
    used = []
    real = lazy_mod.window_length
    monkeypatch.setattr(lazy_mod, "window_length",
                        lambda beta: used.append(real(beta)) or real(beta))
    opt_s, ps, opt_d, pd = long_lags(backend)
    assert used and used[0] == 70
    hist = opt_s._histories[0]
    assert np.isfinite(hist.cwin[:hist.n - 70]).all()
    opt_s.sync()
    assert_params(ps, pd, 1e-12)


def test_a_wrong_window_sum_is_caught(monkeypatch):
    monkeypatch.setattr(NumpyBucket, "window_sum",
                        staticmethod(lambda *a: 1.01 * lazy_mod.window_sum(*a)))
    opt_s, ps, opt_d, pd = long_lags("numpy")
    opt_s.sync()
    with pytest.raises(AssertionError):
        assert_params(ps, pd, 1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_eager_steps_that_clip_by_norm_agree_to_rounding(backend):
    """With clipping that clips (thresholds far below the norms), the norm of
    the nonzero rows is summed in another order than the dense step's:
    agreement to rounding, not bit for bit."""
    opt_s, ps, opt_d, pd = run(backend, np.float64,
                               dict(beta=0.9, clipnorm=0.05, global_clipnorm=0.03), lazy=False)
    assert_params(ps, pd, 1e-12)
    compare_state(opt_s, opt_d, 1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_load_state_dict_syncs_lagging_rows_first(backend):
    """The parameters are not part of the state: loading keeps the lagging
    rows' pending updates."""
    opt_s, ps, opt_d, pd = run(backend, np.float64, dict(beta=0.9), lazy=True, steps=12)
    sd = opt_d.state_dict()
    opt_s.load_state_dict(sd)
    opt_d.load_state_dict(sd)
    assert_params(ps, pd, 1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_read_only_lagging_parameter_gets_the_clear_error(backend):
    E = np.zeros((6, 2))
    opt = eg.Expectigrad([E], beta=0.9, lazy=True, backend=backend)
    opt.step([eg.RowSparse([1], np.ones((1, 2)))])
    opt.step([eg.RowSparse([2], np.ones((1, 2)))])         # row 1 lags
    E.flags.writeable = False
    for call in (lambda: opt.step([np.ones((6, 2))]), opt.sync, lambda: opt.sync(E, [1])):
        with pytest.raises(ValueError, match="read-only"):
            call()


@pytest.mark.parametrize("backend", BACKENDS)
def test_lazy_parameters_without_columns_and_empty_index_lists(backend):
    opt = eg.Expectigrad([np.zeros((4, 0)), np.zeros((5, 2))], lazy=True, backend=backend)
    for _ in range(3):
        opt.step([eg.RowSparse([1, 2], np.zeros((2, 0))), eg.RowSparse([], np.zeros((0, 2)))])
    opt.sync()
    opt.sync(1, [])
    assert opt.state_dict()["state"][1]["step"] == 3


def test_a_long_history_keeps_the_decay_exact():
    """20,000 steps since the last full sync with lr * weight_decay = 0.1: a
    row caught up over a lag beyond the window stays within 1e-12 (prefix
    sums of log d kept as double-doubles)."""
    x, y = np.ones((3, 2)), np.ones((3, 2))
    kw = dict(lr=0.1, beta=0.0, weight_decay=1.0)
    lazy, dense = eg.Expectigrad([x], lazy=True, **kw), eg.Expectigrad([y], **kw)
    n, lag = 20_000, 200
    for step in range(n):
        rows = [0, 1] if step == n - lag else [1]
        g = eg.RowSparse(rows, np.full((len(rows), 2), 0.5))
        lazy.step([g])
        dense.step([g.todense(y)])
    lazy.sync(x, [0])
    np.testing.assert_allclose(x[0], y[0], rtol=1e-12)


def test_a_huge_dense_gradient_keeps_lazy_rows_lazy_on_every_backend():
    """A dense gradient whose squared norm overflows float64 (1e200) beside a
    row-sparse one, with no norm clipping: the numpy backend used to return
    that infinite norm, which sent its step down the densified path (every
    row brought up to date), while the kernels' step stayed lazy; the
    parameters then differed until a sync.  The norm is only asked for when
    a clipping needs it, on every backend."""
    out = {}
    for backend in ("cpu", "numpy"):
        emb, w = np.zeros((20, 3)), np.zeros(4)
        opt = eg.Expectigrad([emb, w], lr=0.1, lazy=True, backend=backend)
        opt.step([eg.RowSparse(np.array([1, 5]), np.ones((2, 3))), np.ones(4)])
        opt.step([eg.RowSparse(np.array([2]), np.ones((1, 3))), np.full(4, 1e200)])
        out[backend] = (emb.copy(), w.copy())
    for a, b in zip(out["cpu"], out["numpy"]):
        np.testing.assert_array_equal(a, b)


def _corrupted(kind):
    """A valid 4 x 3 scipy.sparse gradient with one stored index made bad."""
    m = sp.coo_matrix((np.ones(2), ([0, 3], [1, 2])), shape=(4, 3))
    if kind.startswith("csr"):
        m = m.tocsr()
        m.indices[0] = -1 if kind == "csr_negative" else 7
    else:
        m.row[0] = -1 if kind == "coo_negative_row" else 4
    return m


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["csr_negative", "csr_beyond", "coo_negative_row",
                                  "coo_row_beyond"])
def test_a_scipy_gradient_with_indices_outside_its_shape_is_refused(backend, kind):
    # scipy's conversions would read such indices unchecked (writing outside
    # their buffers, or wrapping around): they are refused, nothing changed.
    x = np.zeros((4, 3))
    opt = eg.Expectigrad([x], lr=0.1, backend=backend)
    with pytest.raises(ValueError, match="param group 0 param 0: a malformed (csr|coo) "
                                         "matrix"):
        opt.step([_corrupted(kind)])
    assert not x.any() and opt.step_count == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", ["nan", "shape", "kind"])
def test_a_refused_step_leaves_lagging_rows_as_they_were(backend, bad):
    E, w = np.ones((6, 2)), np.ones(3)
    opt = eg.Expectigrad([E, w], lr=0.1, lazy=True, backend=backend)
    opt.step([eg.RowSparse(np.arange(6), np.ones((6, 2))), np.ones(3)])
    opt.step([eg.RowSparse([0], np.ones((1, 2))), np.ones(3)])     # rows 1-5 lag,
    opt.step([eg.RowSparse([0], np.ones((1, 2))), np.ones(3)])     # with momentum
    before = E.copy(), w.copy(), opt.step_count     # (state_dict() would sync E)
    g_w = {"nan": np.array([np.nan, 1.0, 1.0]), "shape": np.ones(4),
           "kind": np.ones(3, bool)}[bad]
    with pytest.raises((ValueError, TypeError, FloatingPointError)):
        opt.step([np.ones((6, 2)), g_w])            # E dense: its rows would catch up
    assert np.array_equal(E, before[0]) and np.array_equal(w, before[1])
    assert opt.step_count == before[2]


@pytest.mark.parametrize("part", ["indices", "values"])
def test_masked_indices_or_values_of_a_row_sparse_gradient_are_refused(part):
    x = np.zeros((4, 2))
    opt = eg.Expectigrad([x], lr=0.1)
    idx, vals = np.array([0, 2]), np.ones((2, 2))
    if part == "indices":
        idx = np.ma.array(idx, mask=[0, 1])
    else:
        vals = np.ma.array(vals, mask=[[0, 1], [0, 0]])
    with pytest.raises(TypeError, match=f"its array of {part} is a masked array"):
        opt.step([eg.RowSparse(idx, vals)])
    assert not x.any()


def test_lazy_is_fixed_at_construction():
    opt = eg.Expectigrad([np.ones((4, 2))], lazy=True)
    with pytest.raises(AttributeError):
        opt.lazy = False
    assert opt.lazy is True
    assert pickle.loads(pickle.dumps(opt)).lazy is True



_ROWS_PEAK = """
import json, numpy as np, expectigrad_np as eg

def grown(opt, grad):
    opt.step([grad()])                          # compile, allocate, touch pages
    base = reset()
    for _ in range(2):
        opt.step([grad()])
    return peak() - base

rng = np.random.default_rng(0)
out = {}
# Eager steps that visit every row of a 2**19-row table (32 MiB) for 128 rows.
few = lambda: eg.RowSparse(np.arange(0, 1 << 19, 4096), np.ones((128, 8)))
for name, opts in (("plain", {}), ("weight_decay", dict(weight_decay=0.01)),
                   ("dense counter", dict(sparse_counter=False))):
    out[name] = grown(eg.Expectigrad([np.zeros((1 << 19, 8))], lr=0.01, **opts), few)
# Clipping a gradient of every row (16 MiB of float32 values).
vals = rng.standard_normal((1 << 19, 8)).astype(np.float32)
every = lambda: eg.RowSparse(np.arange(1 << 19), vals)
for name, opts in (("unclipped", {}), ("clipped", dict(clipnorm=1.0, clipvalue=0.5))):
    out[name] = grown(eg.Expectigrad([np.zeros((1 << 19, 8), np.float32)], lr=0.01,
                                     **opts), every)
print(json.dumps(out))
"""


@peak_memory.needs_proc
def test_row_sparse_steps_need_no_temporary_the_size_of_the_table():
    # Peak memory over two steps after a first: a visit of every row goes a
    # block of rows at a time, and norms of the values are summed in pieces.
    r = peak_memory.run(_ROWS_PEAK)
    table_kib = (1 << 19) * 8 * 8 // 1024               # 32 MiB of float64 parameters
    for name in ("weight_decay", "dense counter"):
        assert r[name] < r["plain"] + table_kib // 16, r
    values_kib = (1 << 19) * 8 * 4 // 1024              # 16 MiB of float32 values
    assert r["clipped"] < r["unclipped"] + values_kib // 8, r
