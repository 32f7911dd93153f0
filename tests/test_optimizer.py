"""The stateful API: the original project's test, backend agreement, structure,
groups, clipping, schedules, state, and basic validation."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from oracles import PaperExpectigrad, original_test_gradient

import expectigrad_np as eg
from expectigrad_np import schedules

# --- the original project's own test ----------------------------------------------

@pytest.mark.parametrize("backend", ["cpu", "numpy"])
@pytest.mark.parametrize("beta", [0.0, 0.9])
@pytest.mark.parametrize("sparse_counter", [True, False])
def test_original_project_sequence(backend, beta, sparse_counter):
    """f_t(x) = 3 x0^2 (odd t), x0^2 + 8 x1^2 (even t), from (1, 1), 1000 steps,
    lr=0.5, eps=1: every iterate matches the in-package reference to rtol 1e-10,
    and the paper's pseudocode transcribed literally as well."""
    hyper = dict(lr=0.5, beta=beta, eps=1.0, sparse_counter=sparse_counter)
    x, x_ref, x_paper = np.ones(2), np.ones(2), np.ones(2)
    opt = eg.Expectigrad([x], backend=backend, **hyper)
    ref = eg.Expectigrad([x_ref], backend="numpy", **hyper)
    paper = PaperExpectigrad(x_paper, **hyper)
    for t in range(1, 1001):
        opt.step([original_test_gradient(x, t)])
        ref.step([original_test_gradient(x_ref, t)])
        paper.step(original_test_gradient(x_paper, t))
        np.testing.assert_allclose(x, x_ref, rtol=1e-10, atol=0)
        # The paper keeps s and divides by n; the package keeps s/n.  The two
        # roundings differ by ~1e-16 relative per step, which the iterates
        # only show once they have converged to ~1e-20 (absolute 1e-18 covers it).
        np.testing.assert_allclose(x, x_paper, rtol=1e-10, atol=1e-18)
    assert np.all(np.abs(x) < 1.0)   # it did make progress towards 0


# --- backend agreement ---------------------------------------------------------------

shapes = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5)


@st.composite
def problems(draw):
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    n_arrays = draw(st.integers(1, 4))
    arrays = [draw(hnp.arrays(dtype, draw(shapes), elements=st.floats(-10, 10, width=32)))
              for _ in range(n_arrays)]
    hyper = dict(
        lr=draw(st.floats(1e-4, 1.0)), beta=draw(st.sampled_from([0.0, 0.5, 0.9])),
        eps=draw(st.sampled_from([1e-8, 1e-3, 1.0])), sparse_counter=draw(st.booleans()),
        clipvalue=draw(st.sampled_from([None, 0.5])), clipnorm=draw(st.sampled_from([None, 1.0])))
    global_clipnorm = draw(st.sampled_from([None, 2.0]))
    steps = draw(st.integers(1, 8))
    seed = draw(st.integers(0, 2**32 - 1))
    return dtype, arrays, hyper, global_clipnorm, steps, seed


@given(problems())
def test_backends_agree(problem):
    dtype, arrays, hyper, gclip, steps, seed = problem
    rng = np.random.default_rng(seed)
    xs_cpu = [a.copy() for a in arrays]
    xs_np = [a.copy() for a in arrays]
    cpu = eg.Expectigrad(xs_cpu, backend="cpu", global_clipnorm=gclip, **hyper)
    ref = eg.Expectigrad(xs_np, backend="numpy", global_clipnorm=gclip, **hyper)
    for _ in range(steps):
        grads = []
        for a in arrays:
            g = np.asarray(rng.standard_normal(a.shape) * 3, dtype=dtype)
            g[rng.random(a.shape) < 0.3] = 0
            grads.append(None if rng.random() < 0.15 else g)
        cpu.step(grads)
        ref.step(grads)
    rtol = 1e-5 if dtype == np.float32 else 1e-12
    for a, b in zip(xs_cpu, xs_np):
        assert a.dtype == dtype
        np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * 1e-3)
    sa, sb = cpu.state_dict()["state"], ref.state_dict()["state"]
    for i in sa:
        assert sa[i]["step"] == sb[i]["step"]
        for key in sa[i]:
            if key != "step":
                np.testing.assert_allclose(sa[i][key], sb[i][key], rtol=rtol, atol=0)


def test_backend_agreement_check_detects_a_wrong_reference(monkeypatch):
    """The agreement test can fail: give the reference a wrong momentum decay."""
    import expectigrad_np.backends.numpy as buckets
    real = buckets.expectigrad_update

    def wrong(x, g, *args, **kw):
        real(x, g, *args, **{**kw, "beta": kw["beta"] * 0.99})

    monkeypatch.setattr(buckets, "expectigrad_update", wrong)
    x1, x2 = np.ones(3), np.ones(3)
    a, b = eg.Expectigrad(x1, backend="cpu"), eg.Expectigrad(x2, backend="numpy")
    for k in range(3):
        g = np.array([1.0, -2.0, 0.5]) * (-3.0) ** k
        a.step(g)
        b.step(g)
    with pytest.raises(AssertionError):
        np.testing.assert_allclose(x1, x2, rtol=1e-12)


# --- structure -------------------------------------------------------------------------

def test_bare_array_takes_bare_gradient():
    x = np.zeros(3)
    opt = eg.Expectigrad(x, lr=0.1, beta=0.0)
    opt.step(np.array([1.0, -1.0, 0.0]))
    np.testing.assert_allclose(x, [-0.1, 0.1, 0.0], rtol=1e-7)
    with pytest.raises(ValueError, match=r"gradient of param group 0 param 0 has shape \(1, 3\)"):
        opt.step([np.ones(3)])  # read as an array of shape (1, 3)


def test_zero_d_and_empty_arrays():
    a = np.array(2.0)
    e = np.zeros((0, 3), np.float32)
    opt = eg.Expectigrad([a, e], lr=0.5, beta=0.0)
    opt.step([np.array(4.0), np.zeros((0, 3), np.float32)])
    assert a.shape == () and a == pytest.approx(1.5)
    assert opt.state_dict()["state"][1]["mean_sq"].shape == (0, 3)


@pytest.mark.parametrize("backend", ["cpu", "numpy"])
def test_strided_views_update_in_place(backend):
    base = np.arange(24, dtype=np.float64).reshape(4, 6)
    view = base[::2, 1::2]            # not contiguous
    fview = np.asfortranarray(np.ones((3, 4)))[:, ::-1]
    untouched = base.copy()
    opt = eg.Expectigrad([view, fview], lr=0.1, beta=0.0, backend=backend)
    g1 = np.ones(view.shape)
    g2 = np.arange(12.0).reshape(3, 4)[:, ::-1]  # negative strides
    opt.step([g1, g2])
    np.testing.assert_allclose(view, untouched[::2, 1::2] - 0.1)
    mask = np.ones(base.shape, bool)
    mask[::2, 1::2] = False
    np.testing.assert_array_equal(base[mask], untouched[mask])
    expected = 1 - 0.1 * np.sign(np.arange(12.0).reshape(3, 4)[:, ::-1])
    np.testing.assert_allclose(fview, expected, rtol=1e-7)


def test_strided_and_contiguous_give_the_same_result():
    rng = np.random.default_rng(0)
    data = rng.standard_normal((6, 8))
    a = data.copy()[:, ::2]
    b = np.ascontiguousarray(data[:, ::2])
    oa, ob = eg.Expectigrad(a, lr=0.1), eg.Expectigrad(b, lr=0.1)
    for _ in range(5):
        g = rng.standard_normal(b.shape)
        oa.step(np.asfortranarray(g))
        ob.step(g)
    np.testing.assert_array_equal(a, b)


def test_none_gradient_skips_array_and_its_step_count():
    x, y = np.ones(2), np.ones(2)
    opt = eg.Expectigrad([x, y], lr=0.1)
    opt.step([np.ones(2), None])
    np.testing.assert_array_equal(y, 1.0)
    opt.step([np.ones(2), np.ones(2)])
    state = opt.state_dict()["state"]
    assert state[0]["step"] == 2 and state[1]["step"] == 1
    # y's first step is bias-corrected as a first step: it moves by lr exactly
    np.testing.assert_allclose(y, 1.0 - 0.1, rtol=1e-7)


def test_float32_stays_float32():
    x = np.ones(5, np.float32)
    opt = eg.Expectigrad(x, lr=np.float64(0.1))
    opt.step(np.ones(5, np.float64))    # other precision: cast, not an error
    assert x.dtype == np.float32
    assert all(v.dtype in (np.float32, np.uint32)
               for v in opt.state_dict()["state"][0].values() if isinstance(v, np.ndarray))


def test_mixed_dtypes_in_one_optimizer():
    a, b = np.ones(3, np.float32), np.ones(3, np.float64)
    ra, rb = a.copy(), b.copy()
    opt = eg.Expectigrad([a, b], lr=0.1, global_clipnorm=0.5)
    ref = eg.Expectigrad([ra, rb], lr=0.1, global_clipnorm=0.5, backend="numpy")
    for k in range(4):
        # The arrays' norms change differently from step to step, so a wrong
        # global norm changes the result (a constant scale would not: the
        # update is scale invariant).
        gs = [np.array([1, 2, 3], np.float32) * (k + 1), np.array([3, 2, 1.0]) * (4 - k)]
        opt.step(gs)
        ref.step(gs)
    np.testing.assert_allclose(a, ra, rtol=1e-6)
    np.testing.assert_allclose(b, rb, rtol=1e-12)


@pytest.mark.parametrize("check_finite", [True, False])
def test_global_clipnorm_spans_dtypes_on_the_cpu_kernels(check_finite):
    # Two buckets (float32, float64), large enough for the segmented kernel.
    rng = np.random.default_rng(3)
    xs = [np.zeros(3000, np.float32), np.zeros(2000)]
    rs = [x.copy() for x in xs]
    opt = eg.Expectigrad(xs, lr=0.1, global_clipnorm=1.0, check_finite=check_finite)
    ref = eg.Expectigrad(rs, lr=0.1, global_clipnorm=1.0, backend="numpy")
    for k in range(4):
        gs = [rng.standard_normal(3000).astype(np.float32) * (k + 1),
              rng.standard_normal(2000) * (4 - k)]
        opt.step(gs)
        ref.step(gs)
    np.testing.assert_allclose(xs[0], rs[0], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(xs[1], rs[1], rtol=1e-12, atol=1e-14)


# --- param groups -----------------------------------------------------------------------

def test_param_groups_have_their_own_hyperparameters():
    a, b = np.zeros(2), np.zeros(2)
    opt = eg.Expectigrad([{"params": [a]}, {"params": [b], "lr": 0.5}], lr=0.1, beta=0.0)
    opt.step([[np.ones(2)], [np.ones(2)]])         # one sequence per group
    np.testing.assert_allclose(a, -0.1, rtol=1e-7)
    np.testing.assert_allclose(b, -0.5, rtol=1e-7)
    opt.param_groups[0]["lr"] = 0.2                 # changed between steps
    opt.step([np.ones(2), np.ones(2)])              # flat sequence works too
    np.testing.assert_allclose(a, -0.3, rtol=1e-7)
    np.testing.assert_allclose(b, -1.0, rtol=1e-7)


def test_param_group_rejects_bad_values_and_keeps_old_one():
    x = np.zeros(2)
    opt = eg.Expectigrad([x], lr=0.1)
    for key, value in [("lr", -1.0), ("lr", float("nan")), ("beta", 1.0), ("eps", 0.0),
                       ("clipnorm", -2.0)]:
        with pytest.raises(ValueError, match=key):
            opt.param_groups[0][key] = value
    with pytest.raises(ValueError, match="unknown hyperparameter"):
        opt.param_groups[0]["momentum"] = 0.9
    with pytest.raises(ValueError, match="sparse_counter"):
        opt.param_groups[0]["sparse_counter"] = False
    assert opt.param_groups[0]["lr"] == 0.1 and opt.param_groups[0]["beta"] == 0.9


def test_beta_switched_on_later_allocates_momentum():
    x, y = np.zeros(3), np.zeros(3)
    opt = eg.Expectigrad(x, lr=0.1, beta=0.0)
    ref = eg.Expectigrad(y, lr=0.1, beta=0.0, backend="numpy")
    for o in (opt, ref):
        o.step(np.ones(3))
        o.param_groups[0]["beta"] = 0.9
        o.step(np.ones(3))
    assert "momentum" in opt.state_dict()["state"][0]
    np.testing.assert_allclose(x, y, rtol=1e-12)


@pytest.mark.parametrize("backend", ["cpu", "numpy"])
def test_momentum_switched_on_later_does_not_depend_on_what_shares_the_dtype(backend):
    # A group built with beta=0 keeps no momentum until its beta becomes
    # positive, whether or not another array of its dtype keeps momentum;
    # one built with beta > 0 keeps m = u while its beta is 0, and resumes.
    def run(with_other, first_beta):
        x = np.linspace(-1, 1, 13).astype(np.float32)
        groups = [{"params": [x], "beta": first_beta}]
        if with_other:
            groups.append({"params": [np.ones(4, np.float32)], "beta": 0.5})
        opt = eg.Expectigrad(groups, lr=0.01, backend=backend)
        rng = np.random.default_rng(0)
        for step, beta in enumerate([None, 0.0, 0.3, None, 0.0, 0.6]):
            if beta is not None:
                opt.param_groups[0]["beta"] = beta
            g = [rng.standard_normal(13).astype(np.float32)]
            opt.step(g + ([np.ones(4, np.float32)] if with_other else []))
        return x, "momentum" in opt.state_dict()["state"][0]
    for first_beta in (0.0, 0.9):
        (alone, kept_alone), (shared, kept_shared) = run(False, first_beta), run(True,
                                                                                 first_beta)
        assert np.array_equal(alone, shared), first_beta
        assert kept_alone and kept_shared
    assert not np.array_equal(run(False, 0.0)[0], run(False, 0.9)[0])


# --- clipping -----------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["cpu", "numpy"])
def test_clipping_matches_explicit_clipping(backend):
    rng = np.random.default_rng(5)
    gs = [rng.standard_normal(4) * 5 for _ in range(6)]
    # clipvalue
    x, y = np.zeros(4), np.zeros(4)
    a = eg.Expectigrad(x, clipvalue=0.3, backend=backend, lr=0.1)
    b = eg.Expectigrad(y, backend=backend, lr=0.1)
    for g in gs:
        a.step(g)
        b.step(np.clip(g, -0.3, 0.3))
    np.testing.assert_allclose(x, y, rtol=1e-12)
    # clipnorm per array and global norm over arrays
    x1, x2, y1, y2 = np.zeros(4), np.zeros(4), np.zeros(4), np.zeros(4)
    a = eg.Expectigrad([x1, x2], clipnorm=2.0, global_clipnorm=1.5, backend=backend, lr=0.1)
    b = eg.Expectigrad([y1, y2], backend=backend, lr=0.1)
    for g in gs:
        h1 = g * min(1, 2.0 / np.linalg.norm(g))
        h2 = (g[::-1] * 2) * min(1, 2.0 / np.linalg.norm(g * 2))
        joint = np.sqrt(np.sum(h1 ** 2) + np.sum(h2 ** 2))
        scale = min(1, 1.5 / joint)
        a.step([g, g[::-1] * 2])
        b.step([h1 * scale, h2 * scale])
    np.testing.assert_allclose(x1, y1, rtol=1e-10)
    np.testing.assert_allclose(x2, y2, rtol=1e-10)


# --- schedules ------------------------------------------------------------------------------

def test_lr_schedule_is_called_with_the_step_count():
    seen = []

    def lr(step):
        seen.append(step)
        return 0.1

    x = np.zeros(2)
    opt = eg.Expectigrad(x, lr=lr, beta=0.0)
    for _ in range(3):
        opt.step(np.ones(2))
    assert seen == [0, 1, 2]
    np.testing.assert_allclose(x, -0.3, rtol=1e-7)


def test_schedules_values():
    assert schedules.constant(0.1)(7) == 0.1
    assert schedules.inverse_time_decay(1.0, 0.5)(2) == pytest.approx(0.5)
    assert schedules.inverse_time_decay(1.0, 1.0, steps=10, staircase=True)(19) == 0.5
    assert schedules.exponential_decay(1.0, 0.5, steps=2)(4) == pytest.approx(0.25)
    c = schedules.cosine_decay(1.0, 100, alpha=0.1)
    assert c(0) == 1.0 and c(50) == pytest.approx(0.55) and c(100) == c(500) == pytest.approx(0.1)
    w = schedules.warmup(c, 10)
    assert w(0) == 0.0 and w(5) == pytest.approx(0.5) and w(10) == 1.0 and w(60) == c(50)
    j = schedules.join([schedules.constant(1.0), schedules.constant(0.5)], [3])
    assert [j(i) for i in range(5)] == [1.0, 1.0, 1.0, 0.5, 0.5]
    with pytest.raises(ValueError):
        schedules.cosine_decay(1.0, 0)
    with pytest.raises(ValueError):
        schedules.join([schedules.constant(1.0)], [3])


@pytest.mark.parametrize("make, error, match", [
    (lambda: schedules.constant("0.1"), TypeError, "value must be a real number"),
    (lambda: schedules.constant(True), TypeError, "value must be a real number"),
    (lambda: schedules.constant(None), TypeError, "value must be a real number"),
    (lambda: schedules.constant(10**400), ValueError, "value must be finite"),
    (lambda: schedules.cosine_decay(True, 10), TypeError, "lr must be a real number"),
    (lambda: schedules.cosine_decay(0.1, 10, alpha="0.5"), TypeError, "alpha must be a real"),
    (lambda: schedules.cosine_decay(0.1, np.True_), TypeError, "steps must be a real"),
    (lambda: schedules.cosine_decay(0.1, float("inf")), ValueError, "steps must be an integer"),
    (lambda: schedules.cosine_decay(0.1, 2.5), ValueError, "steps must be an integer"),
    (lambda: schedules.inverse_time_decay(0.1, 0.5, staircase="no"), TypeError,
     "staircase must be True or False"),
    (lambda: schedules.join([schedules.constant(1.0)] * 2, [2.5]), ValueError,
     "boundaries must be increasing integers"),
    (lambda: schedules.join([schedules.constant(1.0)] * 2, ["3"]), ValueError,
     "boundaries must be increasing integers"),
])
def test_schedule_settings_are_checked_when_the_schedule_is_built(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_schedule_settings_that_are_whole_floats_are_their_integers():
    assert schedules.cosine_decay(1.0, 10.0).steps == 10
    assert schedules.join([schedules.constant(1.0)] * 2, [np.int64(3)]).boundaries == (3,)


def test_a_growing_exponential_past_the_float_range_is_refused_by_the_step():
    x = np.ones(2)
    opt = eg.Expectigrad([x], lr=schedules.exponential_decay(0.1, 2.0))
    assert schedules.exponential_decay(0.1, 2.0)(2000) == np.inf
    opt.step_count = 2000
    with pytest.raises(ValueError, match="lr schedule returned inf at step 2000"):
        opt.step([np.ones(2)])
    assert np.all(x == 1)


def test_schedule_returning_nan_is_refused_before_any_change():
    x = np.ones(2)
    opt = eg.Expectigrad(x, lr=lambda step: float("nan"))
    with pytest.raises(ValueError, match="lr schedule returned nan at step 0"):
        opt.step(np.ones(2))
    np.testing.assert_array_equal(x, 1.0)
    assert opt.step_count == 0


# --- validation basics ------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, match", [
    (dict(lr=0.0), "lr must be > 0"), (dict(lr=-1.0), "lr must be > 0"),
    (dict(lr=float("inf")), "lr must be finite"), (dict(beta=1.0), r"beta must be in \[0, 1\)"),
    (dict(beta=-0.1), "beta"), (dict(eps=0.0), "eps must be > 0"),
    (dict(eps=-1.0), "eps must be > 0"),
])
def test_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        eg.Expectigrad(np.zeros(2), **kwargs)


@pytest.mark.parametrize("param, exc", [
    (np.zeros(3, np.int64), TypeError), (np.zeros(3, np.complex128), TypeError),
    (np.zeros(3, object), TypeError), ([1.0, 2.0], TypeError),
])
def test_non_float_parameters(param, exc):
    with pytest.raises(exc):
        eg.Expectigrad([param])


def test_rejected_step_changes_nothing():
    x = np.ones(3)
    opt = eg.Expectigrad(x, lr=0.1)
    opt.step(np.ones(3))
    before_x, before_state = x.copy(), opt.state_dict()
    for bad, exc in [(np.ones(4), ValueError), (np.array([1, np.nan, 0.0]), FloatingPointError),
                     (np.array(["a", "b", "c"]), TypeError), (np.ones(3) * 1j, TypeError)]:
        with pytest.raises(exc):
            opt.step(bad)
        np.testing.assert_array_equal(x, before_x)
        after = opt.state_dict()
        assert after["step"] == before_state["step"]
        for k, v in before_state["state"][0].items():
            np.testing.assert_array_equal(after["state"][0][k], v)


@pytest.mark.parametrize("backend", ["numpy", "cpu"])
def test_integer_gradients_are_cast_as_astype_would(backend):
    """Integer gradients step as their ``astype(param.dtype)`` (documented in
    ``step``); boolean ones are refused."""
    g = np.array([3, 0, -2, 1 << 25], np.int64)
    a, b = np.ones(4, np.float32), np.ones(4, np.float32)
    eg.Expectigrad(a, lr=0.1, backend=backend).step(g)
    eg.Expectigrad(b, lr=0.1, backend=backend).step(g.astype(np.float32))
    np.testing.assert_array_equal(a, b)
    assert a[1] == 1.0 and a[0] < 1.0 < a[2]
    with pytest.raises(TypeError, match="has dtype bool"):
        eg.Expectigrad(np.ones(2), backend=backend).step(np.array([True, False]))
