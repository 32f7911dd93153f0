"""Once a small optimizer's step has gone the compiled route with nothing
else to consider (no schedule, nothing lagging, nothing compiling), later
steps call its kernel directly.  Everything that can change the route must
end that: each event below is followed by steps that must equal, bit for
bit, the numpy backend given the same events."""
import copy
import pickle

import numpy as np
import pytest

import expectigrad_np as eg
from expectigrad_np import schedules

SHAPES = [(6, 4), (4,), (5,)]


def _twins(dtype=np.float64, **options):
    rng = np.random.default_rng(3)
    xs = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
    ys = [x.copy() for x in xs]
    return (xs, eg.Expectigrad(xs, lr=0.01, **options),
            ys, eg.Expectigrad(ys, lr=0.01, backend="numpy", **options))


def _grads(rng, dtype=np.float64):
    gs = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
    gs[0][::3] = 0
    return gs


def _steps(opt, ref, xs, ys, rng, n=3):
    for _ in range(n):
        gs = _grads(rng, xs[0].dtype)
        opt.step(gs)
        ref.step([g.copy() for g in gs])
    for a, b in zip(xs, ys):
        assert np.array_equal(a, b)


def _on_quick_route(opt):
    return opt._quick is not None


EVENTS = {
    "lr": lambda o: o.param_groups[0].__setitem__("lr", 0.05),
    "beta": lambda o: o.param_groups[0].__setitem__("beta", 0.0),
    "weight decay": lambda o: o.param_groups[0].__setitem__("weight_decay", 0.1),
    "maximize": lambda o: o.param_groups[0].__setitem__("maximize", True),
    "clipvalue": lambda o: o.param_groups[0].__setitem__("clipvalue", 0.5),
    "clipnorm": lambda o: o.param_groups[0].__setitem__("clipnorm", 0.5),
    "global clipnorm": lambda o: setattr(o, "global_clipnorm", 0.5),
    "schedule": lambda o: o.param_groups[0].__setitem__("lr",
                                                        schedules.exponential_decay(0.1, 0.5, 2)),
    "check_finite off": lambda o: setattr(o, "check_finite", False),
    "step_count": lambda o: setattr(o, "step_count", 40),
}


@pytest.mark.parametrize("event", sorted(EVENTS))
def test_each_change_reaches_the_steps_after_the_quick_route(event):
    xs, opt, ys, ref = _twins()
    rng = np.random.default_rng(0)
    _steps(opt, ref, xs, ys, rng)
    assert _on_quick_route(opt)
    EVENTS[event](opt)
    EVENTS[event](ref)
    _steps(opt, ref, xs, ys, rng, n=4)


def test_a_loaded_state_reaches_the_steps_after_the_quick_route():
    xs, opt, ys, ref = _twins()
    rng = np.random.default_rng(1)
    _steps(opt, ref, xs, ys, rng)
    saved = opt.state_dict()
    _steps(opt, ref, xs, ys, rng)
    assert _on_quick_route(opt)
    opt.load_state_dict(saved)
    ref.load_state_dict(saved)
    _steps(opt, ref, xs, ys, rng)


def test_lazy_rows_lagging_are_synced_before_a_dense_step_after_the_quick_route():
    xs, opt, ys, ref = _twins(lazy=True)
    rng = np.random.default_rng(2)
    _steps(opt, ref, xs, ys, rng)
    assert _on_quick_route(opt)
    for _ in range(2):
        rows = eg.RowSparse(np.array([1, 4]), rng.standard_normal((2, 4)))
        opt.step([rows, None, None])
        ref.step([rows, None, None])
        assert not _on_quick_route(opt)
    _steps(opt, ref, xs, ys, rng)      # dense: the lagging rows are caught up first


@pytest.mark.parametrize("copier", [copy.deepcopy, lambda o: pickle.loads(pickle.dumps(o))])
def test_a_copy_steps_its_own_arrays_after_the_quick_route(copier):
    xs, opt, ys, ref = _twins(np.float32)
    rng = np.random.default_rng(4)
    _steps(opt, ref, xs, ys, rng)
    assert _on_quick_route(opt)
    twin = copier(opt)
    before = [x.copy() for x in xs]
    twin.step(_grads(rng, np.float32))
    assert all(np.array_equal(a, b) for a, b in zip(xs, before))
    assert not all(np.array_equal(a, b) for a, b in zip(twin.params, before))
    _steps(opt, ref, xs, ys, rng)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_what_the_quick_route_cannot_read_goes_the_general_way(dtype):
    xs, opt, ys, ref = _twins(dtype)
    rng = np.random.default_rng(5)
    _steps(opt, ref, xs, ys, rng)
    assert _on_quick_route(opt)
    gs = _grads(rng, dtype)
    staged = [np.asfortranarray(gs[0]), gs[1].astype(np.float16), gs[2][::-1].copy()[::-1]]
    opt.step(staged)                       # non-contiguous, another dtype: staged
    ref.step(staged)
    opt.step(iter(gs))                     # any iterable
    ref.step(list(gs))
    opt.step(g for g in gs)
    ref.step(list(gs))
    for a, b in zip(xs, ys):
        assert np.array_equal(a, b)
    before = [x.copy() for x in xs]
    for bad, kind in ((gs[0], TypeError), (gs[:2], ValueError), (None, TypeError),
                      ([gs[0], gs[1], np.zeros(3, dtype)], ValueError), (3.0, TypeError)):
        with pytest.raises(kind):
            opt.step(bad)
    nan = [g.copy() for g in gs]
    nan[2][1] = np.nan
    with pytest.raises(FloatingPointError, match="param group 0 param 2"):
        opt.step(nan)
    xs[1].flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        opt.step(gs)
    xs[1].flags.writeable = True
    for a, b in zip(xs, before):
        assert np.array_equal(a, b)
    _steps(opt, ref, xs, ys, rng)


def test_a_bare_optimizer_takes_the_quick_route_and_refuses_what_it_should():
    x, y = np.zeros(10), np.zeros(10)
    opt, ref = eg.Expectigrad(x, lr=0.1), eg.Expectigrad(y, lr=0.1, backend="numpy")
    rng = np.random.default_rng(6)
    for _ in range(3):
        g = rng.standard_normal(10)
        opt.step(g)
        ref.step(g)
    assert _on_quick_route(opt)
    opt.step([1.0] * 10)                   # a list for a bare optimizer: converted
    ref.step(np.ones(10))
    with pytest.raises(ValueError):
        opt.step(np.ones(9))
    g = rng.standard_normal(10)
    opt.step(g)
    ref.step(g)
    assert np.array_equal(x, y)
