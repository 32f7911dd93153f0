"""``kernels.locate``: many gradients located in one compiled call.

It reads NumPy's array objects directly, so it is checked against Python's
own view of each array, on everything it must accept and everything it must
hand to the Python path, and the optimizer is checked to give the same
results (and the same errors) with it and without it.
"""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import expectigrad_np as eg
from expectigrad_np.backends.cpu import backend as _buckets
from expectigrad_np.backends.cpu import locate


def test_layout_is_recognised_here():
    """On this platform the fast path is in use (else the tests below would
    only test the fallback)."""
    assert locate.layout_ok()


def _candidates(rng, shape, dtype):
    """(object, accepted?) pairs for a parameter of ``shape`` and ``dtype``."""
    size = int(np.prod(shape))
    good = rng.standard_normal(shape).astype(dtype)
    big = rng.standard_normal(2 * size + 2).astype(dtype)
    other = np.float64 if dtype == np.float32 else np.float32
    out = [(good, True), (big[1:size + 1].reshape(shape), True),
           (good.astype(other), False), (big[:2 * size:2].reshape(shape), size <= 1),
           (None, False), (good.tolist(), False), (good.reshape(-1, 1) if good.ndim else good,
                                                   good.ndim == 0 or size == 0 and False),
           (good.view(np.recarray) if good.ndim else good, good.ndim == 0)]
    if good.ndim == 2:
        out.append((np.asfortranarray(good), good.flags.f_contiguous and good.flags.c_contiguous))
    unaligned = np.frombuffer(b"\0" + good.tobytes(), dtype=dtype, count=size, offset=1)
    out.append((unaligned.reshape(shape), False))
    return out


shapes = st.sampled_from([(), (0,), (1,), (7,), (3, 4), (1, 5), (2, 3, 2), (4, 1)])


@settings(max_examples=60, deadline=None)
@given(st.lists(shapes, min_size=1, max_size=6), st.sampled_from([np.float32, np.float64]),
       st.integers(0, 2**32 - 1))
def test_matches_pythons_view(param_shapes, dtype, seed):
    rng = np.random.default_rng(seed)
    objects, shapes_used, expect = [], [], []
    for shape in param_shapes:
        for obj, _ in _candidates(rng, shape, dtype):
            objects.append(obj)
            shapes_used.append(shape)
            expect.append(type(obj) is np.ndarray and obj.dtype is np.dtype(dtype)
                          and obj.flags.c_contiguous and obj.flags.aligned
                          and obj.shape == shape)
    ndims, dims, dims_start = locate.shape_table(shapes_used)
    ids = np.array([id(o) for o in objects], dtype=np.int64)
    addresses = np.full(len(objects), -1, dtype=np.int64)
    slow = np.zeros(len(objects), dtype=bool)
    n_slow = locate.locate_arrays(ids, id(np.ndarray), id(np.dtype(dtype)), ndims, dims,
                                  dims_start, addresses, slow)
    assert slow.tolist() == [not e for e in expect]
    assert n_slow == sum(not e for e in expect)
    for obj, ok, address in zip(objects, expect, addresses):
        if ok:
            assert address == obj.ctypes.data
        else:
            assert address == -1          # left alone


def _run(grads_per_step, monkeypatch, fast):
    monkeypatch.setattr(locate, "_LAYOUT_OK", fast)
    rng = np.random.default_rng(3)
    params = [rng.standard_normal(s).astype(np.float32) for s in [(5,), (3, 4), (0,), (6,)]]
    opt = eg.Expectigrad(params, lr=0.1)
    for grads in grads_per_step:
        opt.step(grads)
    return params, opt.state_dict()


def test_optimizer_same_with_and_without_it(monkeypatch):
    """Every kind of gradient, stepped through the fast path and the Python
    path: the same bits."""
    rng = np.random.default_rng(5)
    steps = []
    for t in range(6):
        g0 = rng.standard_normal(5).astype(np.float32)
        g1 = np.asfortranarray(rng.standard_normal((3, 4)))             # float64, F-order
        g3 = rng.standard_normal(12).astype(np.float32)[::2]             # strided
        steps.append([g0, g1 if t % 2 else g1.astype(np.float32), np.zeros(0, np.float32),
                      None if t == 3 else g3])
    steps.append([s.copy() if s is not None else None for s in steps[0]])
    fast_params, fast_state = _run(steps, monkeypatch, True)
    slow_params, slow_state = _run(steps, monkeypatch, False)
    for a, b in zip(fast_params, slow_params):
        np.testing.assert_array_equal(a, b)
    assert fast_state["state"].keys() == slow_state["state"].keys()
    for i in fast_state["state"]:
        sa, sb = fast_state["state"][i], slow_state["state"][i]
        for key in sa:
            np.testing.assert_array_equal(sa[key], sb[key])


@pytest.mark.parametrize("fast", [True, False])
def test_bad_gradient_still_named_and_harmless(monkeypatch, fast):
    monkeypatch.setattr(locate, "_LAYOUT_OK", fast)
    params = [np.ones(4, np.float32), np.ones((2, 3), np.float32)]
    opt = eg.Expectigrad(params, lr=0.1)
    before = [p.copy() for p in params]
    with pytest.raises(ValueError, match="param 1"):
        opt.step([np.ones(4, np.float32), np.ones((3, 2), np.float32)])
    with pytest.raises(TypeError, match="param 0"):
        opt.step([np.ones(4, np.complex64), np.ones((2, 3), np.float32)])
    for a, b in zip(params, before):
        np.testing.assert_array_equal(a, b)
    assert opt.step_count == 0


def test_many_new_arrays_are_located_without_the_python_path(monkeypatch):
    """New, well-formed gradient arrays each step never reach ``_load_one``."""
    params = [np.zeros(10, np.float32) for _ in range(50)]
    opt = eg.Expectigrad(params, lr=0.1)
    calls = []
    original = _buckets.CpuBucket._load_one
    monkeypatch.setattr(_buckets.CpuBucket, "_load_one",
                        lambda self, k, g: calls.append(k) or original(self, k, g))
    for _ in range(3):
        opt.step([np.ones(10, np.float32) for _ in range(50)])
    assert calls == []
    opt.step([np.ones(10, np.float64)] + [np.ones(10, np.float32)] * 49)
    assert calls == [0]
    assert all(np.all(p < 0) for p in params)


@pytest.mark.parametrize("field", ["_OB_TYPE", "_DATA", "_ND", "_DIMENSIONS", "_STRIDES", "_DESCR",
                                   "_FLAGS"])
def test_layout_check_fails_on_any_wrong_offset(monkeypatch, field):
    """The self-check reads every field the kernels read: moving any one of
    them by 8 bytes makes it fail (so the kernels would not be used)."""
    assert locate._check_layout()
    monkeypatch.setattr(locate, field, getattr(locate, field) + 8)
    assert not locate._check_layout()


def test_without_the_layout_single_arrays_take_the_general_path(monkeypatch):
    monkeypatch.setattr(locate, "_LAYOUT_OK", False)
    x, y = np.ones(5), np.ones(5)
    a = eg.Expectigrad(x, lr=0.1)
    b = eg.Expectigrad(y, lr=0.1, backend="numpy")
    assert a._fast is None
    for g in (np.arange(5.0), np.ones(5)):
        a.step(g)
        b.step(g)
    np.testing.assert_array_equal(x, y)
