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
