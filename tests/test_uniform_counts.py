"""The sparse counter's uniform path (``kernels._loops._update_uniform``).

While no gradient element of an array has been exactly zero, every count
equals the array's step count and the kernels skip the per-element division.
That path must give the reference's bits, end at the first zero, and be set
up right by a state load.
"""
import numpy as np
import pytest

import expectigrad_np as eg
from expectigrad_np.backends import layout as _layout


def _assert_same(a, b, xs_a, xs_b):
    for x, y in zip(xs_a, xs_b):
        np.testing.assert_array_equal(x, y)
    sa, sb = a.state_dict()["state"], b.state_dict()["state"]
    for i in sa:
        for key in sa[i]:
            np.testing.assert_array_equal(sa[i][key], sb[i][key], err_msg=f"{i} {key}")


def _uniform_flags(opt):
    return [int(f) for b in opt._buckets for f in b.flags[:, _layout.UNIFORM]]


def _stream(rng, shapes, dtype, steps, zero_at):
    """Nonzero gradients, with exact zeros in array 0 on step ``zero_at``."""
    out = []
    for s in range(steps):
        gs = [(rng.standard_normal(shape) + 3.0).astype(dtype) for shape in shapes]
        if s == zero_at:
            gs[0].reshape(-1)[::3] = 0
        out.append(gs)
    return out


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shapes", [[(10,)], [(7,), (3, 4), (5,)], [(1 << 18,), (9,)]],
                         ids=["single", "segments", "parallel"])
@pytest.mark.parametrize("beta", [0.9, 0.0])
def test_same_bits_as_the_reference_before_and_after_a_zero(dtype, shapes, beta):
    rng = np.random.default_rng(4)
    xs_c = [np.zeros(s, dtype) for s in shapes]
    xs_n = [x.copy() for x in xs_c]
    fast = eg.Expectigrad(xs_c, lr=0.01, beta=beta)
    ref = eg.Expectigrad(xs_n, lr=0.01, beta=beta, backend="numpy")
    assert _uniform_flags(fast) == [1] * len(shapes)
    for s, gs in enumerate(_stream(rng, shapes, dtype, 8, zero_at=4)):
        fast.step(gs)
        ref.step(gs)
        _assert_same(fast, ref, xs_c, xs_n)
        # Only the uniform loop clears the flag: array 0 went through it.
        assert _uniform_flags(fast)[0] == (0 if s >= 4 else 1)
        assert _uniform_flags(fast)[1:] == [1] * (len(shapes) - 1)


def test_none_gradient_keeps_uniformity():
    x, y = np.zeros(6), np.zeros(4)
    opt = eg.Expectigrad([x, y], lr=0.1)
    ref = eg.Expectigrad([x.copy(), y.copy()], lr=0.1, backend="numpy")
    xr, yr = ref.params
    for gs in ([np.ones(6), np.ones(4)], [None, np.full(4, 2.0)], [np.full(6, 3.0), np.ones(4)]):
        opt.step(gs)
        ref.step(gs)
    assert _uniform_flags(opt) == [1, 1]
    _assert_same(opt, ref, [x, y], [xr, yr])
    assert opt.state_dict()["state"][0]["count"].tolist() == [2] * 6
    assert opt.state_dict()["state"][1]["count"].tolist() == [3] * 4


def test_clipping_takes_the_general_loop_and_agrees():
    rng = np.random.default_rng(8)
    xs_c = [np.zeros(9, np.float32), np.zeros(5, np.float32)]
    xs_n = [x.copy() for x in xs_c]
    fast = eg.Expectigrad(xs_c, lr=0.01, clipvalue=2.5)
    ref = eg.Expectigrad(xs_n, lr=0.01, clipvalue=2.5, backend="numpy")
    for gs in _stream(rng, [(9,), (5,)], np.float32, 6, zero_at=2):
        fast.step(gs)
        ref.step(gs)
    _assert_same(fast, ref, xs_c, xs_n)
    assert _uniform_flags(fast) == [0, 0]      # a clipping step ends it, unlooked


@pytest.mark.parametrize("backend_dtype", [np.float64, np.float32])
def test_a_gradient_zeroed_by_clipping_ends_uniformity(backend_dtype):
    """A norm that overflows float64 (1e200**2) gives the clipping factor 0:
    the gradient counts as zero there, in the clipped (general) loop, and the
    next, unclipped step must not take the uniform loop.  Found by the
    backend-agreement test."""
    def run(backend):
        x = np.full((), 0.126, backend_dtype)
        opt = eg.Expectigrad([x], lr=1.0, beta=0.0, eps=1e-12, clipnorm=1.0,
                             backend=backend)
        big = np.float64(1e200) if backend_dtype == np.float64 else np.float32(1e30)
        for g in (None, np.asarray(big, backend_dtype), np.asarray(1.0, backend_dtype)):
            opt.step([g])
        return x, opt
    x_c, fast = run("cpu")
    x_n, ref = run("numpy")
    _assert_same(fast, ref, [x_c], [x_n])


@pytest.mark.parametrize("uniform", [True, False])
def test_state_load_sets_the_flag(uniform):
    rng = np.random.default_rng(2)
    src = eg.Expectigrad([np.zeros(8)], lr=0.1)
    for s in range(5):
        g = rng.standard_normal(8) + 3
        if not uniform and s == 1:
            g[2] = 0
        src.step([g])
    sd = src.state_dict()
    fast = eg.Expectigrad([np.zeros((8,)), np.zeros(3)], lr=0.1)
    ref = eg.Expectigrad([np.zeros((8,)), np.zeros(3)], lr=0.1, backend="numpy")
    for o in (fast, ref):
        full = o.state_dict()
        full["state"][0] = sd["state"][0]
        o.load_state_dict(full)
    assert _uniform_flags(fast) == [int(uniform), 1]
    for _ in range(3):
        gs = [rng.standard_normal(8) + 3, rng.standard_normal(3) + 3]
        fast.step(gs)
        ref.step(gs)
    _assert_same(fast, ref, fast.params, ref.params)


# --- counts held as one number while uniform (layout.LAZY) ------------------------
# The steps below read no state until the end, so the counts stay held in the
# flag row across many steps: every way out of that (a zero in one chunk
# only, a clipping step, a row-sparse step, a checkpoint) must store them.

_SHAPES = {"single": [(10,)], "segments": [(7,), (3, 4), (5,)],
           "parallel": [(1 << 18,), (9,)]}


def _nonzero(rng, shapes, dtype):
    return [(rng.standard_normal(s) + 3.0).astype(dtype) for s in shapes]


def _pair(shapes, dtype, **kw):
    xs_c = [np.zeros(s, dtype) for s in shapes]
    xs_n = [x.copy() for x in xs_c]
    return (eg.Expectigrad(xs_c, **kw), xs_c,
            eg.Expectigrad(xs_n, backend="numpy", **kw), xs_n)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", list(_SHAPES))
def test_count_array_untouched_while_uniform(case, dtype):
    """The stretch of the architecture issue: while an array's counts are
    uniform its steps do not write the count array (it stays as allocated,
    zero), yet the state read afterwards holds the right counts."""
    shapes = _SHAPES[case]
    rng = np.random.default_rng(1)
    fast, xs_c, ref, xs_n = _pair(shapes, dtype, lr=0.01)
    for _ in range(5):
        gs = _nonzero(rng, shapes, dtype)
        fast.step(gs)
        ref.step(gs)
    (bucket,) = fast._buckets
    assert not bucket.count.any()
    assert bucket.flags[:, _layout.LAZY].tolist() == [1] * len(shapes)
    _assert_same(fast, ref, xs_c, xs_n)
    assert fast.state_dict()["state"][0]["count"].min() == 5


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", list(_SHAPES))
@pytest.mark.parametrize("where", ["first", "last"])
def test_zero_in_one_element_stores_every_count(case, dtype, where):
    """After held steps, one zero gradient element (in the first or the
    last chunk of a parallel-size array) ends uniformity: every count of
    the array must then be stored, also in the chunks that met no zero."""
    shapes = _SHAPES[case]
    rng = np.random.default_rng(2)
    fast, xs_c, ref, xs_n = _pair(shapes, dtype, lr=0.01)
    for s in range(9):
        gs = _nonzero(rng, shapes, dtype)
        if s == 4:
            gs[0].reshape(-1)[0 if where == "first" else -1] = 0
        if s == 6 and len(shapes) > 1:
            gs[1] = None                      # held counts of a skipped array
        fast.step(gs)
        ref.step(gs)
    _assert_same(fast, ref, xs_c, xs_n)
    assert _uniform_flags(fast)[0] == 0


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", list(_SHAPES))
def test_clipping_after_held_steps(case, dtype):
    """Small gradients leave norm clipping idle (the uniform loop); a large
    one clips: the clipped loop reads the counts, which must be stored
    first.  Against the same backend with its state read after every step
    (so its counts are stored before each step): the numpy backend sums the
    squared norm in another order, 1 ulp away in float64."""
    shapes = _SHAPES[case]
    rng = np.random.default_rng(3)
    xs_c = [np.zeros(s, dtype) for s in shapes]
    xs_r = [x.copy() for x in xs_c]
    fast = eg.Expectigrad(xs_c, lr=0.01, clipnorm=1e4)
    ref = eg.Expectigrad(xs_r, lr=0.01, clipnorm=1e4)
    for s in range(7):
        gs = _nonzero(rng, shapes, dtype)
        if s == 4:
            gs = [g * 1e4 for g in gs]
        fast.step(gs)
        ref.step(gs)
        ref.state_dict()
    assert _uniform_flags(fast)[0] == 0
    _assert_same(fast, ref, xs_c, xs_r)


def test_row_sparse_step_after_held_steps():
    rng = np.random.default_rng(4)
    shapes = [(50, 4), (6,)]
    fast, xs_c, ref, xs_n = _pair(shapes, np.float64, lr=0.01)
    for s in range(8):
        gs = _nonzero(rng, shapes, np.float64)
        if s == 4:
            gs[0] = eg.RowSparse(np.array([3, 17]), rng.standard_normal((2, 4)) + 3)
        fast.step(gs)
        ref.step(gs)
    _assert_same(fast, ref, xs_c, xs_n)


def test_checkpoint_while_held(tmp_path):
    rng = np.random.default_rng(5)
    shapes = [(7,), (3, 4)]
    fast, xs_c, ref, xs_n = _pair(shapes, np.float32, lr=0.01)
    stream = [_nonzero(rng, shapes, np.float32) for _ in range(8)]
    stream[6][1][1, 2] = 0
    for gs in stream[:4]:
        fast.step(gs)
        ref.step(gs)
    fast.save(tmp_path / "a.npz")
    xs_l = [np.zeros(s, np.float32) for s in shapes]
    loaded = eg.Expectigrad(xs_l, lr=0.01)
    loaded.load(tmp_path / "a.npz")
    for gs in stream[4:]:
        for o in (fast, ref, loaded):
            o.step(gs)
    _assert_same(fast, ref, xs_c, xs_n)
    _assert_same(loaded, ref, xs_l, xs_n)


def test_empty_row_sparse_step_after_held_steps():
    """A row-sparse gradient of no rows still advances the array's step
    count and ends its uniformity: its held counts must then be stored."""
    rng = np.random.default_rng(6)
    shapes = [(30, 4)]
    fast, xs_c, ref, xs_n = _pair(shapes, np.float32, lr=0.01)
    for s in range(7):
        gs = _nonzero(rng, shapes, np.float32)
        if s == 3:
            gs = [eg.RowSparse(np.zeros(0, np.int64), np.zeros((0, 4), np.float32))]
        fast.step(gs)
        ref.step(gs)
    assert not fast._buckets[0].flags[0, _layout.LAZY] or _uniform_flags(fast)[0]
    _assert_same(fast, ref, xs_c, xs_n)
