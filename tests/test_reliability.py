"""Refused input: non-finite gradients and malformed arguments raise an error
that says what and where, and leave parameters, state and step counts
bit-identical."""
import copy

import numpy as np
import pytest

import expectigrad_np as eg
from expectigrad_np import schedules

BACKENDS = ["cpu", "numpy"]
NAN, INF = float("nan"), float("inf")


def make(backend="cpu", **kw):
    """Two groups, two dtypes (two buckets), momentum and beta=0, a schedule."""
    rng = np.random.default_rng(0)
    params = [rng.standard_normal((3, 4)).astype(np.float32),
              rng.standard_normal(5),
              rng.standard_normal(6).astype(np.float32),
              rng.standard_normal((2, 2))]
    groups = [{"params": params[:2], "lr": schedules.exponential_decay(0.1, 0.5, 3)},
              {"params": params[2:], "beta": 0.0, "sparse_counter": False}]
    return eg.Expectigrad(groups, lr=0.05, backend=backend, **kw), params


def grads(params, seed=1):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(p.shape).astype(p.dtype) for p in params]


def snapshot(opt):
    sd = opt.state_dict()
    return (copy.deepcopy(sd), [p.copy() for p in opt.params], opt.step_count,
            opt.global_clipnorm, opt.check_finite)


def assert_unchanged(opt, before):
    sd0, params0, count0, gclip0, check0 = before
    sd1, params1, count1, gclip1, check1 = snapshot(opt)
    assert (count1, gclip1, check1) == (count0, gclip0, check0)
    assert sd1["step"] == sd0["step"]
    assert repr(sd1["param_groups"]) == repr(sd0["param_groups"])
    for p0, p1 in zip(params0, params1):
        assert p0.tobytes() == p1.tobytes()
    for i, e0 in sd0["state"].items():
        e1 = sd1["state"][i]
        assert e0.keys() == e1.keys()
        for k in e0:
            assert np.asarray(e0[k]).tobytes() == np.asarray(e1[k]).tobytes(), (i, k)


def refused(opt, call, error, match):
    before = snapshot(opt)
    with pytest.raises(error, match=match):
        call()
    assert_unchanged(opt, before)


# --- non-finite gradients ------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("index, name", [
    (0, "param group 0 param 0"), (1, "param group 0 param 1"),
    (2, "param group 1 param 0"), (3, "param group 1 param 1")])
@pytest.mark.parametrize("bad", [NAN, INF, -INF])
@pytest.mark.parametrize("clip", [{}, {"global_clipnorm": 1.0}])
def test_nonfinite_gradient_is_refused_and_changes_nothing(backend, index, name, bad,
                                                           clip):
    opt, params = make(backend, **clip)
    opt.step(grads(params, seed=1))
    opt.step(grads(params, seed=2))
    twin, twin_params = make(backend, **clip)        # never sees the bad step
    twin.step(grads(twin_params, seed=1))
    twin.step(grads(twin_params, seed=2))

    g = grads(params, seed=3)
    g[index].flat[-1] = bad
    refused(opt, lambda: opt.step(g), FloatingPointError,
            f"gradient of {name} holds NaN or infinity")

    for seed in (4, 5):                                # the run goes on as if
        opt.step(grads(params, seed))                  # nothing had happened
        twin.step(grads(twin_params, seed))
    assert_unchanged(opt, snapshot(twin))


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")
@pytest.mark.parametrize("backend", BACKENDS)
def test_nonfinite_in_non_contiguous_or_cast_gradients(backend):
    opt, params = make(backend)
    opt.step(grads(params))
    g = grads(params)
    big = np.zeros((3, 8), np.float32)
    big[:, ::2] = g[0]
    big[1, 2] = NAN
    g[0] = big[:, ::2]                                  # a strided view
    refused(opt, lambda: opt.step(g), FloatingPointError, "group 0 param 0")
    g = grads(params)
    g[2] = np.full(6, 1e300)                            # float64 -> float32 is inf
    refused(opt, lambda: opt.step(g), FloatingPointError, "group 1 param 0")
    g = grads(params)
    g[3] = [[1.0, 2.0], [INF, 0.0]]                     # a nested list
    refused(opt, lambda: opt.step(g), FloatingPointError, "group 1 param 1")


@pytest.mark.parametrize("backend", BACKENDS)
def test_check_finite_false_lets_nan_through(backend):
    opt, params = make(backend, check_finite=False)
    g = grads(params)
    g[1][0] = NAN
    opt.step(g)
    assert np.isnan(params[1][0]) and np.isfinite(params[0]).all()
    assert opt.step_count == 1


# --- bad gradients ------------------------------------------------------------------

def step_cases(params):
    g = grads(params)

    def replace(i, value):
        out = list(g)
        out[i] = value
        return out

    return [
        (replace(1, np.zeros(4)), ValueError,
         r"the gradient of param group 0 param 1 has shape \(4,\), but the parameter "
         r"has shape \(5,\)"),
        (replace(0, np.zeros((4, 3), np.float32)), ValueError,
         r"param group 0 param 0 has shape \(4, 3\), but the parameter has shape \(3, 4\)"),
        (g[:3], ValueError, "expected 4 gradients, one per parameter .*got 3"),
        (g + [g[0]], ValueError, "expected 4 gradients, one per parameter .*got 5"),
        ([g[:2], g[2:3]], ValueError, "param group 1 has 2 parameters but 1 gradients"),
        (replace(2, np.array(["a"] * 6)), TypeError, "group 1 param 0 has dtype <U1"),
        (replace(2, np.ones(6, dtype=object)), TypeError,
         "group 1 param 0 has dtype object"),
        (replace(3, [[1.0, "x"], [2.0, 3.0]]), TypeError, "group 1 param 1 has dtype <U"),
        (replace(1, [1.0, [2.0, 3.0], 4.0, 5.0, 6.0]), TypeError,
         "group 0 param 1 could not be read as an array"),
        (replace(1, np.ones(5, complex)), TypeError,
         "group 0 param 1 has dtype complex128"),
        (replace(0, np.ones((3, 4), bool)), TypeError, "group 0 param 0 has dtype bool"),
        (replace(3, {"a": 1}), TypeError, "group 1 param 1 has dtype object"),
        (None, TypeError, r"sequence of gradients, one per parameter \(4\)"),
        (g[0], TypeError, "sequence of gradients"),
        (3.0, TypeError, "sequence of gradients"),
        ({"params": g}, TypeError, "sequence of gradients"),
    ]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", range(16))
def test_bad_gradients_are_refused(backend, case):
    opt, params = make(backend)
    opt.step(grads(params))
    g, error, match = step_cases(params)[case]
    refused(opt, lambda: opt.step(g), error, match)


def test_bad_schedule_value_is_refused():
    x = np.ones(3)
    opt = eg.Expectigrad([x], lr=lambda step: 0.1 if step < 1 else NAN)
    opt.step([np.ones(3)])
    refused(opt, lambda: opt.step([np.ones(3)]), ValueError,
            "lr schedule returned nan at step 1")


@pytest.mark.parametrize("backend", BACKENDS)
def test_other_float_precision_is_cast_not_refused(backend):
    """A float64, float16 or integer gradient for a float32 parameter is the
    same step as the float32 gradient it rounds to."""
    g64 = np.random.default_rng(0).standard_normal(7) * 3
    for g in (g64, g64.astype(np.float16), np.arange(7)):
        x, y = np.zeros(7, np.float32), np.zeros(7, np.float32)
        a = eg.Expectigrad([x], lr=0.1, backend=backend)
        b = eg.Expectigrad([y], lr=0.1, backend=backend)
        for _ in range(3):
            a.step([g])
            b.step([np.asarray(g).astype(np.float32)])
        assert x.tobytes() == y.tobytes()


# --- bad parameters and hyperparameters ---------------------------------------------

def read_only():
    a = np.zeros(3)
    a.flags.writeable = False
    return a


shared = np.zeros(10)
CONSTRUCTION = [
    (lambda: [np.zeros(3, np.int64)], {}, TypeError,
     "param group 0 param 0 has dtype int64; parameters must be float32 or float64"),
    (lambda: [np.zeros(3), np.zeros(3, complex)], {}, TypeError,
     "param group 0 param 1 has dtype complex128"),
    (lambda: [np.zeros(3, object)], {}, TypeError,
     "param group 0 param 0 has dtype object"),
    (lambda: [np.zeros(3, np.float16)], {}, TypeError, "has dtype float16"),
    (lambda: [np.zeros(3), read_only()], {}, ValueError,
     "param group 0 param 1 is read-only"),
    (lambda: [[1.0, 2.0]], {}, TypeError,
     "param group 0 param 0 must be a numpy.ndarray"),
    (lambda: [], {}, ValueError, "params is empty"),
    (lambda: [{"params": []}], {}, ValueError, "param group 0: 'params' is empty"),
    (lambda: [{"params": [np.zeros(2)]}, {"lr": 0.1}], {}, ValueError,
     "param group 1: missing the 'params' key"),
    (lambda: [{"params": None}], {}, TypeError, "param group 0: 'params' must be an array"),
    (lambda: 3.0, {}, TypeError, "params must be an array"),
    (lambda: {"params": [np.zeros(2)]}, {}, TypeError, "got a single dict"),
    (lambda: [np.zeros(2), {"params": [np.zeros(2)]}], {}, TypeError, "mixes arrays"),
    (lambda: [shared, shared], {}, ValueError,
     "param group 0 param 0 and param group 0 param 1 share memory"),
    (lambda: [shared[:6], shared[4:]], {}, ValueError, "share memory"),
    (lambda: [{"params": [shared[::2]]}, {"params": [shared.reshape(2, 5)[:, 4]]}], {},
     ValueError, "param group 0 param 0 and param group 1 param 0 share memory"),
    (lambda: [np.zeros(2)], {"lr": NAN}, ValueError, "lr must be finite, got nan"),
    (lambda: [np.zeros(2)], {"lr": -1.0}, ValueError, "lr must be > 0"),
    (lambda: [np.zeros(2)], {"lr": "0.1"}, TypeError, "lr must be a real number"),
    (lambda: [np.zeros(2)], {"beta": INF}, ValueError, "beta must be finite"),
    (lambda: [np.zeros(2)], {"beta": 1.0}, ValueError, r"beta must be in \[0, 1\)"),
    (lambda: [np.zeros(2)], {"eps": NAN}, ValueError, "eps must be finite"),
    (lambda: [np.zeros(2)], {"eps": 0.0}, ValueError, "eps must be > 0"),
    (lambda: [np.zeros(2, np.float32)], {"eps": 1e-50}, ValueError,
     "eps=1e-50 is 0 in float32"),
    (lambda: [np.zeros(2)], {"clipvalue": -INF}, ValueError, "clipvalue must be finite"),
    (lambda: [np.zeros(2)], {"clipnorm": NAN}, ValueError, "clipnorm must be finite"),
    (lambda: [np.zeros(2)], {"global_clipnorm": INF}, ValueError,
     "global_clipnorm must be finite"),
    (lambda: [np.zeros(2)], {"sparse_counter": 1}, TypeError,
     "sparse_counter must be True or False"),
    (lambda: [np.zeros(2)], {"check_finite": "yes"}, TypeError,
     "check_finite must be True or False"),
    (lambda: [np.zeros(2)], {"backend": "gpu"}, ValueError, "backend must be one of"),
    (lambda: [np.zeros(2)], {"lerning_rate": 0.1}, TypeError,
     "unexpected keyword argument 'lerning_rate'"),
    (lambda: [{"params": [np.zeros(2)], "momentum": 0.9}], {}, ValueError,
     "param group 0: unknown hyperparameter 'momentum'"),
    (lambda: [{"params": [np.zeros(2)]}, {"params": [np.zeros(2)], "lr": NAN}], {},
     ValueError, "param group 1: lr must be finite"),
]


@pytest.mark.parametrize("case", range(len(CONSTRUCTION)))
def test_bad_construction_is_refused(case):
    make_params, kw, error, match = CONSTRUCTION[case]
    params = make_params()
    arrays = [p for p in (params if isinstance(params, list) else [])
              if isinstance(p, np.ndarray)]
    before = [a.copy() for a in arrays]
    with pytest.raises(error, match=match):
        eg.Expectigrad(params, **kw)
    for a, b in zip(arrays, before):
        np.testing.assert_array_equal(a, b)


LATER = [
    (0, "lr", NAN, ValueError, "param group 0: lr must be finite"),
    (1, "lr", INF, ValueError, "param group 1: lr must be finite"),
    (1, "lr", 0.0, ValueError, "param group 1: lr must be > 0"),
    (0, "beta", NAN, ValueError, "param group 0: beta must be finite"),
    (0, "eps", -INF, ValueError, "param group 0: eps must be finite"),
    (0, "eps", 1e-60, ValueError, "param group 0: eps=1e-60 is 0 in float32"),
    (1, "clipvalue", NAN, ValueError, "param group 1: clipvalue must be finite"),
    (1, "clipnorm", INF, ValueError, "param group 1: clipnorm must be finite"),
    (0, "sparse_counter", False, ValueError, "param group 0: 'sparse_counter' cannot"),
    (0, "params", [], ValueError, "param group 0: 'params' cannot be changed"),
    (0, "momentum", 0.1, ValueError, "param group 0: unknown hyperparameter"),
    (0, "weight_decay", -0.1, ValueError, "param group 0: weight_decay must be >= 0"),
    (1, "maximize", 1, TypeError, "param group 1: maximize must be True or False"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", range(len(LATER)))
def test_bad_hyperparameter_set_later_is_refused(backend, case):
    gi, key, value, error, match = LATER[case]
    opt, params = make(backend)
    opt.step(grads(params))
    group = opt.param_groups[gi]
    refused(opt, lambda: group.__setitem__(key, value), error, match)
    refused(opt, lambda: group.update({key: value}), error, match)
    opt.step(grads(params))                              # still works


@pytest.mark.parametrize("name, value, error, match", [
    ("global_clipnorm", NAN, ValueError, "global_clipnorm must be finite"),
    ("global_clipnorm", -1.0, ValueError, "global_clipnorm must be > 0"),
    ("check_finite", None, TypeError, "check_finite must be True or False"),
])
def test_bad_optimizer_attribute_set_later_is_refused(name, value, error, match):
    opt, params = make(global_clipnorm=2.0)
    opt.step(grads(params))
    refused(opt, lambda: setattr(opt, name, value), error, match)
    opt.global_clipnorm = None                           # valid values are taken
    assert opt.global_clipnorm is None


def test_valid_views_are_not_overlap():
    """Interleaved views share a buffer but no element: they are allowed."""
    buf = np.zeros(10)
    opt = eg.Expectigrad([buf[::2], buf[1::2]], lr=0.1)
    opt.step([np.ones(5), -np.ones(5)])
    np.testing.assert_allclose(buf[::2], -0.1)
    np.testing.assert_allclose(buf[1::2], 0.1)
