"""The compiled whole-step route (``kernels.bucket_step``): one call per step
for any number of arrays of one dtype, equal bit for bit to the numpy
backend, and falling back to the general route for anything it cannot read
where it lies."""
import numpy as np
import pytest

import expectigrad_np as eg
from expectigrad_np import schedules


def _pair(shapes, dtype=np.float32, **options):
    rng = np.random.default_rng(11)
    xs = [rng.standard_normal(s).astype(dtype) for s in shapes]
    ys = [x.copy() for x in xs]
    return xs, ys, eg.Expectigrad(xs, **options), eg.Expectigrad(ys, backend="numpy",
                                                                  **options)


def _counting_general(monkeypatch, opt):
    calls = []
    real = opt._flatten_grads
    monkeypatch.setattr(opt, "_flatten_grads", lambda g: calls.append(1) or real(g))
    return calls


SHAPES = [(64, 32), (32,), (32, 10), (10,), ()]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("container", [list, tuple])
def test_many_arrays_take_one_call_and_match_the_reference(monkeypatch, dtype, container):
    xs, ys, opt, ref = _pair(SHAPES, dtype, lr=0.01)
    calls = _counting_general(monkeypatch, opt)
    rng = np.random.default_rng(0)
    for t in range(6):
        gs = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
        if t % 3 == 1:
            gs[1] = None                          # skipped: its step does not advance
        gs[0][::3] = 0
        opt.step(container(gs))
        ref.step([None if g is None else g.copy() for g in gs])
        for a, b in zip(xs, ys):
            assert np.array_equal(a, b), t
    assert calls == []
    assert opt.state_dict()["state"][1]["step"] == 4


def test_scheduled_groups_on_the_compiled_route(monkeypatch):
    def groups(xs):
        return [{"params": xs[:2], "lr": schedules.cosine_decay(0.1, 10)},
                {"params": xs[2:], "lr": 0.02, "beta": 0.5}]
    rng = np.random.default_rng(1)
    xs = [rng.standard_normal(s) for s in SHAPES[:4]]
    ys = [x.copy() for x in xs]
    opt, ref = eg.Expectigrad(groups(xs)), eg.Expectigrad(groups(ys), backend="numpy")
    calls = _counting_general(monkeypatch, opt)
    for _ in range(5):
        gs = [rng.standard_normal(s) for s in SHAPES[:4]]
        opt.step(gs)
        ref.step([g.copy() for g in gs])
    for a, b in zip(xs, ys):
        assert np.array_equal(a, b)
    assert calls == []


def test_what_the_route_cannot_read_takes_the_general_route(monkeypatch):
    xs, ys, opt, ref = _pair(SHAPES[:4], np.float32, lr=0.01)
    calls = _counting_general(monkeypatch, opt)
    rng = np.random.default_rng(2)
    for variant in ("float64", "strided", "list", "nested", "all none"):
        gs = [rng.standard_normal(s).astype(np.float32) for s in SHAPES[:4]]
        given = list(gs)
        if variant == "float64":
            given[2] = gs[2].astype(np.float64)
        elif variant == "strided":
            given[0] = np.asfortranarray(gs[0])
        elif variant == "list":
            given[3] = gs[3].tolist()
        elif variant == "nested":
            given = [given]
        else:
            given = [None] * 4
            gs = given
        before = len(calls)
        opt.step(given)
        ref.step([None if g is None else g.astype(np.float32) for g in gs])
        assert len(calls) == before + 1, variant
        for a, b in zip(xs, ys):
            assert np.array_equal(a, b), variant
    assert opt.step_count == ref.step_count


@pytest.mark.parametrize("dtypes", [(np.float32,) * 4, (np.float32, np.float64) * 2])
def test_unpickled_gradients_and_copied_optimizers_keep_the_compiled_route(monkeypatch,
                                                                           dtypes):
    # An unpickled array (from another process, say), and an optimizer
    # copied or unpickled, carry dtype objects of their own: the route
    # reads them by value.  A byte-swapped gradient is not the bucket's
    # dtype: the general route casts it.
    import copy
    import pickle
    shapes = SHAPES[:4]
    rng = np.random.default_rng(4)
    xs = [rng.standard_normal(s).astype(d) for s, d in zip(shapes, dtypes)]
    ys = [x.copy() for x in xs]
    opt, ref = eg.Expectigrad(xs, lr=0.01), eg.Expectigrad(ys, lr=0.01, backend="numpy")
    general = []
    real = eg.Expectigrad._flatten_grads
    monkeypatch.setattr(eg.Expectigrad, "_flatten_grads",
                        lambda self, g: general.append(self) or real(self, g))
    for copied in (False, True):
        for t in range(3):
            gs = [rng.standard_normal(s).astype(d) for s, d in zip(shapes, dtypes)]
            opt.step(pickle.loads(pickle.dumps(gs)))
            ref.step(gs)
            for a, b in zip(xs, ys):
                assert np.array_equal(a, b), (copied, t)
        calls = [o for o in general if o is opt]
        assert calls == [], copied
        swapped = [g.astype(g.dtype.newbyteorder()) for g in gs]
        opt.step(swapped)
        ref.step(gs)
        assert [o for o in general if o is opt] == [opt]
        for a, b in zip(xs, ys):
            assert np.array_equal(a, b), copied
        opt = pickle.loads(pickle.dumps(opt)) if len(set(dtypes)) > 1 else copy.deepcopy(opt)
        xs = opt.params
        general.clear()


def test_a_refused_step_leaves_no_trace_for_the_next():
    """The kernel's scratch rows are reused: a chunk flagged non-finite on a
    refused step must not refuse a later step that skips that array."""
    xs, ys, opt, ref = _pair([(300,), (5,)], np.float32, lr=0.01)
    bad = [np.full(300, np.nan, np.float32), np.ones(5, np.float32)]
    with pytest.raises(FloatingPointError, match="param group 0 param 0"):
        opt.step(bad)
    opt.step([None, np.ones(5, np.float32)])
    ref.step([None, np.ones(5, np.float32)])
    for a, b in zip(xs, ys):
        assert np.array_equal(a, b)


# --- float32 and float64 arrays in one optimizer: one call for both -------------

MIXED = [((64, 32), np.float32), ((32,), np.float64), ((32, 10), np.float32),
         ((10,), np.float64), ((), np.float32)]


def _mixed(**options):
    rng = np.random.default_rng(5)
    xs = [rng.standard_normal(s).astype(d) for s, d in MIXED]
    ys = [x.copy() for x in xs]
    return xs, ys, eg.Expectigrad(xs, **options), eg.Expectigrad(ys, backend="numpy",
                                                                  **options)


def _mixed_gradients(rng, t):
    gs = [rng.standard_normal(s).astype(d) for s, d in MIXED]
    gs[0][::3] = 0
    if t % 3 == 1:
        gs[1] = None
    if t % 4 == 2:
        gs[0] = gs[2] = gs[4] = None         # a step of the float64 arrays alone
    return gs


@pytest.mark.parametrize("options", [
    {}, dict(clipvalue=0.3), dict(clipnorm=0.5), dict(beta=0.0, sparse_counter=False),
    dict(weight_decay=0.1, maximize=True), dict(lr=schedules.cosine_decay(0.1, 10))])
def test_float32_and_float64_arrays_take_one_call_and_match_the_reference(
        monkeypatch, options):
    xs, ys, opt, ref = _mixed(**options)
    calls = _counting_general(monkeypatch, opt)
    rng = np.random.default_rng(0)
    for t in range(8):
        gs = _mixed_gradients(rng, t)
        opt.step(gs)
        ref.step([None if g is None else g.copy() for g in gs])
        for a, b in zip(xs, ys):
            assert a.dtype == b.dtype and np.array_equal(a, b), t
    assert calls == []
    steps = [opt.state_dict()["state"][i]["step"] for i in range(len(MIXED))]
    assert steps == [6, 5, 6, 8, 6] and opt.step_count == 8


def test_global_norm_clipping_over_both_dtypes_matches_the_general_route(monkeypatch):
    """The joint norm of float32 and float64 arrays: the bits of the route
    that steps them one bucket at a time (the numpy backend sums the squared
    norm in another order, so it agrees to rounding)."""
    from expectigrad_np.backends.cpu.backend import CpuBucket
    xs, ys, opt, ref = _mixed(global_clipnorm=1.0, clipnorm=2.0)
    with monkeypatch.context() as patch:
        patch.setattr(CpuBucket, "pair_path", lambda *a, **k: None)
        zs = [x.copy() for x in xs]
        general = eg.Expectigrad(zs, global_clipnorm=1.0, clipnorm=2.0)
    calls = _counting_general(monkeypatch, opt)
    rng = np.random.default_rng(2)
    for t in range(8):
        gs = _mixed_gradients(rng, t)
        for g in gs:
            if g is not None:
                g *= 10                     # in place: a 0-d array stays an array
        opt.step(gs)
        general.step(gs)
        ref.step(gs)
        for a, b, c in zip(xs, zs, ys):
            assert np.array_equal(a, b), t
            np.testing.assert_allclose(a, c, rtol=1e-5)
    assert calls == []


def test_a_non_finite_gradient_of_either_dtype_changes_nothing_in_both():
    xs, ys, opt, ref = _mixed()
    rng = np.random.default_rng(3)
    for t in range(3):
        gs = _mixed_gradients(rng, 0)
        opt.step(gs)
        ref.step(gs)
    before = [x.copy() for x in xs]
    state = opt.state_dict()
    for bad in (0, 3):                       # a float32 array, then a float64 one
        gs = _mixed_gradients(rng, 0)
        gs[bad].flat[-1] = np.nan
        with pytest.raises(FloatingPointError, match=f"param group 0 param {bad} "):
            opt.step(gs)
        for a, b in zip(xs, before):
            assert np.array_equal(a, b)
        after = opt.state_dict()
        for i, entry in state["state"].items():
            for k, v in entry.items():
                assert np.array_equal(after["state"][i][k], v), (bad, i, k)
    gs = _mixed_gradients(rng, 0)
    opt.step(gs)
    ref.step(gs)
    for a, b in zip(xs, ys):
        assert np.array_equal(a, b)


def test_a_gradient_viewing_the_other_dtypes_parameter_takes_the_general_route(
        monkeypatch):
    """A float32 gradient that is a view of a float64 parameter: the step
    reads it as it was before either bucket wrote (staged), as the numpy
    backend does."""
    a32, b64 = np.linspace(-1, 1, 20).astype(np.float32), np.linspace(1, 2, 10)
    c32, d64 = a32.copy(), b64.copy()
    opt = eg.Expectigrad([a32, b64], lr=0.1)
    ref = eg.Expectigrad([c32, d64], lr=0.1, backend="numpy")
    opt.step([np.ones(20, np.float32), np.ones(10)])
    ref.step([np.ones(20, np.float32), np.ones(10)])
    calls = _counting_general(monkeypatch, opt)
    for _ in range(3):
        assert np.all(np.isfinite(b64.view(np.float32)))
        opt.step([b64.view(np.float32), np.full(10, 0.5)])
        ref.step([d64.view(np.float32).copy(), np.full(10, 0.5)])
        assert np.array_equal(a32, c32) and np.array_equal(b64, d64)
    assert len(calls) == 3


@pytest.mark.parametrize("backend", ["cpu", "numpy"])
def test_a_bad_gradient_is_reported_before_a_bad_schedule_value(backend):
    # The compiled route evaluates schedules before its kernel runs: where a
    # value is bad it leaves the step to the general route, which checks the
    # gradients first and does nothing for an all-None step, as every backend.
    def schedule(t):
        return float("nan") if t == 1 else 0.01
    xs = [np.ones(3, np.float32), np.ones(2)]
    opt = eg.Expectigrad(xs, lr=schedule, backend=backend)
    opt.step([np.ones(3, np.float32), np.ones(2)])
    before = [x.copy() for x in xs]
    opt.step([None, None])
    with pytest.raises(ValueError, match="has shape"):
        opt.step([np.ones(3, np.float32), np.ones(5)])
    with pytest.raises(ValueError, match="schedule returned nan"):
        opt.step([np.ones(3, np.float32), np.ones(2)])
    assert all(np.array_equal(a, b) for a, b in zip(xs, before)) and opt.step_count == 1


@pytest.mark.parametrize("backend", ["cpu", "numpy"])
@pytest.mark.parametrize("dtypes", [(np.float32,), (np.float32, np.float64)])
def test_a_refused_schedule_value_is_asked_for_once(backend, dtypes):
    # A stateful schedule is called once a step attempt, also when its value
    # is refused (the general route raises what the compiled route met), and
    # not for a step of None gradients (no step): every backend alike.
    calls = []

    def schedule(t):
        calls.append(t)
        return float("nan") if t == 1 else 0.01
    xs = [np.ones(3, d) for d in dtypes]
    gs = [np.ones(3, d) for d in dtypes]
    opt = eg.Expectigrad(xs, lr=schedule, backend=backend)
    opt.step(gs)
    opt.step([None] * len(dtypes))
    opt.step(tuple([None] * len(dtypes)))
    assert calls == [0]
    before = [x.copy() for x in xs]
    with pytest.raises(ValueError, match="schedule returned nan"):
        opt.step(gs)
    assert calls == [0, 1]
    assert all(np.array_equal(a, b) for a, b in zip(xs, before)) and opt.step_count == 1


@pytest.mark.parametrize("backend", ["cpu", "numpy"])
@pytest.mark.parametrize("change", ["shape", "transpose", "dtype"])
def test_a_parameter_changed_in_place_is_refused_with_nothing_changed(backend, change):
    xs = [np.arange(12, dtype=np.float32).reshape(4, 3), np.ones(3, np.float32)]
    opt = eg.Expectigrad(xs, lr=0.1, backend=backend)
    gs = [np.ones((4, 3), np.float32), np.ones(3, np.float32)]
    opt.step(gs)
    state = opt.state_dict()
    w = xs[0]
    if change == "shape":
        w.shape = (3, 4)
    elif change == "transpose":
        # The same memory read as the transpose: strides set in place.
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            w.shape = (3, 4)
            try:
                w.strides = (4, 12)
            except AttributeError:
                pytest.skip("this NumPy cannot set strides in place")
    else:
        w.dtype = np.int32
    before = w.copy()
    for given in (gs, [np.ones(w.shape, np.float32), gs[1]]):
        with pytest.raises(ValueError, match="changed in place"):
            opt.step(given)
        assert np.array_equal(w, before)
        after = opt.state_dict()
        assert all(np.array_equal(after["state"][i][k], state["state"][i][k])
                   for i in state["state"] for k in state["state"][i])


@pytest.mark.parametrize("backend", ["cpu", "numpy"])
def test_the_stride_of_an_axis_of_length_one_is_no_change(backend):
    import warnings
    x = np.ones((3, 4), np.float32)[:1]
    opt = eg.Expectigrad([x], lr=0.1, backend=backend)
    opt.step([np.ones((1, 4), np.float32)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            x.strides = (4, 4)             # the same elements in the same memory
        except AttributeError:
            pytest.skip("this NumPy cannot set strides in place")
    opt.step([np.ones((1, 4), np.float32)])
    assert opt.step_count == 2 and np.all(x < 1)


UNION = np.dtype((np.float32, [("a", "<i4")]))     # float32 numbers with a field


@pytest.mark.parametrize("backend", ["cpu", "numpy"])
def test_a_float_dtype_with_fields_is_its_numbers_for_a_gradient_and_refused_for_a_parameter(
        backend):
    with pytest.raises(TypeError, match=r"a float dtype with fields; .*x\.view\(np\.float32\)"):
        eg.Expectigrad([np.ones(3, UNION)], backend=backend)
    xs, ref = [np.ones(3, np.float32)], [np.ones(3, np.float32)]
    opt = eg.Expectigrad(xs, lr=0.1, backend=backend)
    oracle = eg.Expectigrad(ref, lr=0.1, backend="numpy")
    g = np.array([1.0, -2.0, 0.0], np.float32)
    for grads in ([g.view(UNION)], (g.view(UNION).copy(),)):    # list and tuple routes
        opt.step(grads)
        oracle.step([g])
    assert np.array_equal(xs[0], ref[0])
    with pytest.raises(TypeError, match="gradients must be real numbers"):
        opt.step([np.ones(3, [("a", "<f4")])])


@pytest.mark.parametrize("backend", ["cpu", "numpy"])
@pytest.mark.parametrize("strides", [(0, 8), (8, 8)])
def test_a_parameter_whose_elements_share_memory_is_refused(backend, strides):
    x = np.lib.stride_tricks.as_strided(np.zeros(6), (3, 3), strides)   # writeable
    with pytest.raises(ValueError, match=r"param group 0 param 0 has elements that share "
                                         r"memory .*x\.copy\(\)"):
        eg.Expectigrad([x], backend=backend)
