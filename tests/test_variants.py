"""Loop variants (``backends/cpu/kernels.variant``): a bucket compiles only
the update loops its arrays can take, a variant that lacks a loop writes
nothing and says so, and changing hyperparameters moves to a variant that
holds the new loops.  Results equal the numpy backend's bits throughout."""
import numpy as np
import pytest

import expectigrad_np as eg
from expectigrad_np.backends import layout as _layout
from expectigrad_np.backends.cpu import kernels as K
from expectigrad_np.backends.cpu import loops as _loops


def test_default_optimizer_takes_two_loops():
    mask = _loops.loops_for(True, True, False)
    names = [n for i, n in enumerate(_loops.LOOPS) if mask >> i & 1]
    assert names == ["plain_sm", "uniform_m"]
    opt = eg.Expectigrad([np.zeros(10, np.float32), np.zeros(3, np.float32)])
    opt.step([np.ones(10, np.float32), np.ones(3, np.float32)])
    assert opt._buckets[0]._loops(np.inf) == mask


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_variant_without_the_loop_writes_nothing(dtype):
    n = 50
    x, g = np.zeros(n, dtype), np.full(n, 0.5, dtype)
    v, m, cnt = np.zeros(n, dtype), np.zeros(n, dtype), np.zeros(n, np.uint32)
    coef = np.array([1e-3, .9, .1, 1e-8, 1., np.inf, np.inf, 1.], dtype)
    flags = np.zeros(len(_layout.FLAG_FIELDS), np.int64)
    flags[[_layout.ACTIVE, _layout.SPARSE, _layout.MOMENTUM, _layout.T]] = 1  # sparse, momentum
    wrong = K.variant(_loops.loops_for(False, False, False))    # dense, no momentum
    code, _ = wrong.array_step(x, g, v, cnt, m, coef, flags, True, np.inf)
    assert code == K.NO_LOOP
    assert not x.any() and not v.any() and not cnt.any() and not m.any()
    seg = [np.array(a, np.int64) for a in ([0], [0], [n])]
    bad, _ = wrong.segments_step(
        np.array([x.ctypes.data]), np.array([g.ctypes.data]), np.array([0, n]), *seg,
        v, cnt, m, coef[None], flags[None], True, np.inf, 0.0, True)
    assert bad == K.SEGMENTS_NO_LOOP
    assert not x.any() and not v.any() and not cnt.any() and not m.any()
    right = K.variant(_loops.loops_for(True, True, False))
    code, _ = right.array_step(x, g, v, cnt, m, coef, flags, True, np.inf)
    assert code == K.STEPPED and x.all()


def test_a_bucket_with_a_too_small_mask_still_steps_right(monkeypatch):
    """Fail-safe: if a bucket ever asked for too few loops, the step retries
    with every loop and gives the reference's bits."""
    xs = [np.linspace(-1, 1, 20), np.linspace(0, 2, 7)]
    ref = [x.copy() for x in xs]
    opt = eg.Expectigrad(xs, lr=0.1, clipvalue=0.3)
    oref = eg.Expectigrad(ref, lr=0.1, clipvalue=0.3, backend="numpy")
    b = opt._buckets[0]
    monkeypatch.setattr(type(b), "_loops", lambda self, gclip: _loops.loops_for(
        False, False, False))
    for t in range(3):
        gs = [np.cos(np.arange(20) + t), np.sin(np.arange(7) * t)]
        opt.step(gs)
        oref.step([g.copy() for g in gs])
        for a, r in zip(xs, ref):
            assert np.array_equal(a, r)


@pytest.mark.parametrize("change,masks_seen", [({"clipnorm": 0.1}, 2), ({"clipvalue": 0.05}, 2),
                                               ({"beta": 0.0}, 1)])
@pytest.mark.parametrize("single", [True, False])
def test_changed_hyperparameters_move_to_a_variant_with_their_loops(change, masks_seen,
                                                                    single):
    """(beta 0 keeps the momentum loop: momentum follows m = u from then on.)"""
    rng = np.random.default_rng(3)
    sizes = [33] if single else [33, 5]
    xs = [rng.standard_normal(s).astype(np.float32) for s in sizes]
    ref = [x.copy() for x in xs]
    opt = eg.Expectigrad(xs, lr=0.05)
    oref = eg.Expectigrad(ref, lr=0.05, backend="numpy")
    masks = set()
    for t in range(6):
        if t == 3:
            opt.param_groups[0].update(change)
            oref.param_groups[0].update(change)
        gs = [rng.standard_normal(s).astype(np.float32) for s in sizes]
        gs[0][::4] = 0
        opt.step(gs)
        oref.step([g.copy() for g in gs])
        masks.add(opt._buckets[0]._loops(np.inf))
        for a, r in zip(xs, ref):
            assert np.array_equal(a, r), (t, change)
    assert len(masks) == masks_seen
