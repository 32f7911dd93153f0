"""The fast paths agree bit for bit with the reference, fall back where they
must, and steady-state steps allocate nothing proportional to the arrays.

No timing is asserted here: ``python -m expectigrad_np bench`` measures.
"""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import peak_memory
import pytest

import expectigrad_np as eg
from expectigrad_np.backends import layout as _layout
from expectigrad_np.backends.cpu import backend as _buckets
from expectigrad_np.backends.cpu import intrinsics as _intrinsics
from expectigrad_np.backends.cpu import kernels as K
from expectigrad_np.backends.cpu import loops as _loops

CONFIGS = [
    dict(),
    dict(beta=0.0),
    dict(sparse_counter=False),
    dict(beta=0.0, sparse_counter=False),
    dict(clipvalue=0.5),
    dict(beta=0.5, clipvalue=0.3),
]
# Norm clipping sums squares in another order than NumPy's pairwise sum, so
# its factor may differ in the last bit: these agree to rounding only.
NORM_CONFIGS = [dict(clipnorm=0.7), dict(beta=0.5, clipnorm=0.7, clipvalue=0.3)]


def _grads(rng, shape, dtype, steps):
    out = []
    for _ in range(steps):
        g = rng.standard_normal(shape).astype(dtype)
        g[rng.random(shape) < 0.3] = 0          # exact zeros: sparse counter
        out.append(g)
    return out


def _state(opt):
    sd = opt.state_dict()
    return sd["step"], {i: {k: np.array(v) for k, v in e.items()}
                        for i, e in sd["state"].items()}


def _assert_same(a, b, xa, xb):
    for p, q in zip(xa, xb):
        assert p.dtype == q.dtype
        np.testing.assert_array_equal(p, q)
    sa, sb = _state(a), _state(b)
    assert sa[0] == sb[0]
    for i in sa[1]:
        for k in sa[1][i]:
            np.testing.assert_array_equal(sa[1][i][k], sb[1][i][k], err_msg=f"{i} {k}")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("shape", [(10,), (3, 4)])
def test_single_array_fast_path_matches_reference_bitwise(dtype, config, shape):
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal(shape).astype(dtype)
    xf, xr = x0.copy(), x0.copy()
    fast = eg.Expectigrad(xf, lr=0.05, **config)
    ref = eg.Expectigrad(xr, lr=0.05, backend="numpy", **config)
    assert fast._fast is not None
    for g in _grads(rng, shape, dtype, 25):
        fast.step(g)
        ref.step(g)
    _assert_same(fast, ref, [xf], [xr])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("config", CONFIGS)
def test_blocked_loops_match_reference_at_block_boundaries(dtype, config):
    """Sizes around the update loops' blocks (whole blocks with prefetching,
    then the rest element by element) agree bitwise with the reference, in
    the uniform loop (first steps: no zero gradients) and the general one."""
    block = _intrinsics.BLOCK_BYTES // np.dtype(dtype).itemsize
    ahead = _intrinsics.PREFETCH_AHEAD_BYTES // _intrinsics.BLOCK_BYTES
    sizes = [block - 1, block, block + 1, (ahead + 1) * block,
             (ahead + 2) * block + 3, 37 * block + 5]
    for size in sizes:
        rng = np.random.default_rng(size)
        x0 = rng.standard_normal(size).astype(dtype)
        xf, xr = x0.copy(), x0.copy()
        fast = eg.Expectigrad(xf, lr=0.05, **config)
        ref = eg.Expectigrad(xr, lr=0.05, backend="numpy", **config)
        dense = [(rng.standard_normal(size) + 3).astype(dtype) for _ in range(3)]
        for g in dense + _grads(rng, size, dtype, 6):
            fast.step(g)
            ref.step(g)
        _assert_same(fast, ref, [xf], [xr])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("config", NORM_CONFIGS)
def test_single_array_fast_path_with_norm_clipping_matches_reference(dtype, config):
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal(10).astype(dtype)
    xf, xr = x0.copy(), x0.copy()
    fast = eg.Expectigrad(xf, lr=0.05, **config)
    ref = eg.Expectigrad(xr, lr=0.05, backend="numpy", **config)
    for g in _grads(rng, 10, dtype, 25):
        fast.step(g)
        ref.step(g)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(xf, xr, rtol=tol, atol=tol)


def test_fast_path_with_global_clipnorm_and_schedule_matches_reference():
    rng = np.random.default_rng(1)
    x0 = rng.standard_normal(16)
    xf, xr = x0.copy(), x0.copy()
    kw = dict(lr=eg.schedules.exponential_decay(0.1, 0.5, 4), global_clipnorm=50.0)
    fast = eg.Expectigrad(xf, **kw)
    ref = eg.Expectigrad(xr, backend="numpy", **kw)
    for g in _grads(rng, 16, np.float64, 20):
        fast.step(g)
        ref.step(g)
    _assert_same(fast, ref, [xf], [xr])
    for g in _grads(rng, 16, np.float64, 5):
        fast.step(g * 100)                     # now the global norm clips
        ref.step(g * 100)
    np.testing.assert_allclose(xf, xr, rtol=1e-12, atol=1e-12)


def test_fast_and_general_paths_interleave_bitwise():
    """Gradients the fast path refuses (other dtype, strided, lists of
    lists) go the general way; mixing both keeps exact agreement."""
    rng = np.random.default_rng(2)
    x0 = rng.standard_normal(12).astype(np.float32)
    xf, xr = x0.copy(), x0.copy()
    fast = eg.Expectigrad([xf], lr=0.1)
    ref = eg.Expectigrad([xr], lr=0.1, backend="numpy")
    for i, g in enumerate(_grads(rng, 24, np.float32, 12)):
        g = g[::2]                                  # strided
        if i % 3 == 1:
            g = np.ascontiguousarray(g)             # fast
        elif i % 3 == 2:
            g = g.astype(np.float64)                # cast on the general path
        fast.step([g])
        ref.step([g])
        if i == 5:
            fast.step([None])
            ref.step([None])
    _assert_same(fast, ref, [xf], [xr])


def test_hyperparameter_change_and_state_load_reach_the_fast_path():
    rng = np.random.default_rng(3)
    xf, xr = np.zeros(8), np.zeros(8)
    fast = eg.Expectigrad(xf, lr=0.1)
    ref = eg.Expectigrad(xr, lr=0.1, backend="numpy")
    gs = _grads(rng, 8, np.float64, 12)
    for i, g in enumerate(gs):
        if i == 4:
            for o in (fast, ref):
                o.param_groups[0]["lr"] = 0.02
                o.param_groups[0]["beta"] = 0.5
        if i == 8:
            sd = ref.state_dict()
            fast.load_state_dict(sd)
            xf[...] = xr
        fast.step(g)
        ref.step(g)
    _assert_same(fast, ref, [xf], [xr])


def test_changing_check_finite_and_global_clipnorm_reaches_the_fast_path():
    x = np.zeros(4)
    opt = eg.Expectigrad(x, lr=0.1)
    opt.step(np.ones(4))
    opt.check_finite = False
    opt.step(np.array([1.0, np.nan, 1.0, 1.0]))     # not refused any more
    assert opt.step_count == 2 and np.isnan(x[1])
    y, z = np.zeros(4), np.zeros(4)
    fast = eg.Expectigrad(y, lr=0.1)
    ref = eg.Expectigrad(z, lr=0.1, backend="numpy")
    for o in (fast, ref):
        o.step(np.ones(4))
        o.global_clipnorm = 0.01
        o.step(np.full(4, 3.0))
    np.testing.assert_allclose(y, z, rtol=1e-12)


@pytest.mark.parametrize("bad", ["nan", "shape", "size", "dtype"])
def test_fast_path_refusals_change_nothing(bad):
    x = np.linspace(-1, 1, 10)
    opt = eg.Expectigrad(x, lr=0.1)
    opt.step(np.ones(10))
    before = (x.copy(), _state(opt))
    g = {"nan": np.where(np.arange(10) == 3, np.nan, 1.0),
         "shape": np.ones((2, 5)), "size": np.ones(11),
         "dtype": np.ones(10, dtype=complex)}[bad]
    with pytest.raises((ValueError, TypeError, FloatingPointError)):
        opt.step(g)
    np.testing.assert_array_equal(x, before[0])
    after = _state(opt)
    assert after[0] == before[1][0]
    for k, v in before[1][1][0].items():
        np.testing.assert_array_equal(after[1][0][k], v)


def test_many_arrays_match_reference_bitwise():
    rng = np.random.default_rng(4)
    shapes = [(5,), (3, 7), (40_000,), (1,)]
    x0 = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    xf = [x.copy() for x in x0]
    xr = [x.copy() for x in x0]
    fast = eg.Expectigrad(xf, lr=0.05, clipnorm=2.0, global_clipnorm=5.0)
    ref = eg.Expectigrad(xr, lr=0.05, clipnorm=2.0, global_clipnorm=5.0, backend="numpy")
    for _ in range(6):
        gs = [g[0] for g in (_grads(rng, s, np.float32, 1) for s in shapes)]
        fast.step(gs)
        ref.step(gs)
    # Norm clipping sums squares in a different order: equal to rounding.
    for p, q in zip(xf, xr):
        np.testing.assert_allclose(p, q, rtol=1e-5, atol=1e-6)


def test_reused_gradient_buffers_are_read_afresh_every_step():
    """The same gradient array objects, refilled in place between steps (and
    sometimes None, or swapped for a new array), step exactly like fresh
    copies."""
    rng = np.random.default_rng(6)
    shapes = [(7,), (2, 3), (5,)]
    xf = [np.zeros(s) for s in shapes]
    xr = [np.zeros(s) for s in shapes]
    fast = eg.Expectigrad(xf, lr=0.1)
    ref = eg.Expectigrad(xr, lr=0.1, backend="numpy")
    buffers = [np.empty(s) for s in shapes]
    for i in range(10):
        for b in buffers:
            b[...] = rng.standard_normal(b.shape)
        grads = list(buffers)
        if i == 3:
            grads[1] = None
        if i == 6:
            grads[2] = buffers[2].copy()
        fast.step(grads)
        ref.step([None if g is None else g.copy() for g in grads])
    _assert_same(fast, ref, xf, xr)


@pytest.mark.parametrize("shapes", [[(5,)], [(5,), (2, 3)]])
def test_deep_copied_optimizer_steps_its_own_arrays(shapes):
    import copy
    rng = np.random.default_rng(7)
    xs = [np.zeros(s) for s in shapes]
    opt = eg.Expectigrad(xs, lr=0.1)
    opt.step([np.ones(s) for s in shapes])
    twin = copy.deepcopy(opt)
    before = [x.copy() for x in xs]
    ys = twin.params
    for _ in range(3):
        twin.step([rng.standard_normal(s) for s in shapes])
    for x, b, y in zip(xs, before, ys):
        np.testing.assert_array_equal(x, b)            # the original is untouched
        assert not np.array_equal(y, b)                # the copy moved
    ref = eg.Expectigrad([b.copy() for b in before], lr=0.1, backend="numpy")
    ref.load_state_dict(opt.state_dict())
    rng = np.random.default_rng(7)
    for _ in range(3):
        ref.step([rng.standard_normal(s) for s in shapes])
    _assert_same(twin, ref, ys, ref.params)


def test_large_single_array_takes_parallel_kernel_and_matches(monkeypatch):
    monkeypatch.setattr(_buckets, "PARALLEL_MIN_SIZE", 64)
    rng = np.random.default_rng(5)
    x0 = rng.standard_normal(3 * _layout.CHUNK + 17).astype(np.float32)
    xf, xr = x0.copy(), x0.copy()
    fast = eg.Expectigrad(xf, lr=0.05)
    ref = eg.Expectigrad(xr, lr=0.05, backend="numpy")
    assert fast._fast[2] is not None               # above the size: parallel (locked)
    for g in _grads(rng, x0.size, np.float32, 5):
        fast.step(g)
        ref.step(g)
    _assert_same(fast, ref, [xf], [xr])


@pytest.mark.parametrize("kernel", ["_span_stats", "_span_nonfinite"])
def test_span_check_detects_nonfinite_anywhere(kernel):
    # Every position: each of the four interleaved streams and the tail.
    stats = getattr(_loops, kernel)
    for dtype in (np.float32, np.float64):
        for n in (*range(1, 14), 64, 1001):
            g = np.ones(n, dtype)
            for i in range(n):
                for bad in (np.nan, np.inf, -np.inf):
                    h = g.copy()
                    h[i] = bad
                    assert stats(h)[0] != 0, (dtype, n, i, bad)
            assert stats(g)[0] == 0


def test_span_stats_squared_norm_counts_every_element():
    rng = np.random.default_rng(4)
    for dtype in (np.float32, np.float64):
        for n in (*range(0, 14), 1001, 3 * 4096 + 3):
            g = rng.standard_normal(n).astype(dtype)
            want = float(np.sum(g.astype(np.float64) ** 2))
            assert _loops._span_stats(g)[1] == pytest.approx(want, rel=1e-12, abs=0), (dtype, n)
            assert _loops._span_nonfinite(g) == (0, 0.0)


_RSS_SCRIPT = textwrap.dedent("""
    import json, numpy as np, expectigrad_np as eg

    n = 5_000_000
    rng = np.random.default_rng(0)
    xs = [np.zeros(n, np.float32), np.zeros(1000, np.float32)]
    gs = [rng.standard_normal(n).astype(np.float32), np.ones(1000, np.float32)]
    x1 = np.zeros(1000)
    g1 = np.ones(1000)
    many = eg.Expectigrad(xs, clipnorm=1.0, global_clipnorm=2.0)
    one = eg.Expectigrad(x1)
    for _ in range(2):                      # compile/load, touch every page
        many.step(gs); one.step(g1)
    rss = reset()
    for _ in range(5):
        many.step(gs); one.step(g1)
    print(json.dumps(dict(rss=rss, hwm=peak(), kib=n * 4 // 1024)))
""")


@peak_memory.needs_proc
def test_steady_state_steps_do_not_grow_peak_memory():
    r = peak_memory.run(_RSS_SCRIPT)
    # One temporary the size of a gradient would add r["kib"] (20 MB).
    assert r["hwm"] - r["rss"] < r["kib"] // 4, r


@pytest.mark.slow
def test_bench_smoke_emits_json():
    out = subprocess.run(
        [sys.executable, "-m", "expectigrad_np", "bench", "--sizes", "10",
         "--repeat", "1", "--json", "--no-torch"],
        check=True, capture_output=True, text=True,
        env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    result = json.loads(out.stdout)
    row, = [r for r in result["rows"] if r["dtype"] == "float32"]
    assert row["n"] == 10 and row["bytes_per_step"] == 360
    assert {"many_small", "small", "startup", "specialisations"} <= set(result)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_hyperparameter_changes_reach_the_cached_rows_of_many_arrays(dtype):
    """Several arrays: the rows that depend only on hyperparameters are kept
    between steps and rewritten when any of them changes (each change below
    alters the result, so stale rows would show)."""
    rng = np.random.default_rng(9)
    xs_f = [np.zeros(s, dtype) for s in (5, 7, 3)]
    xs_r = [x.copy() for x in xs_f]
    fast = eg.Expectigrad(xs_f, lr=0.1)
    ref = eg.Expectigrad(xs_r, lr=0.1, backend="numpy")
    changes = {3: ("beta", 0.5), 5: ("eps", 1e-2), 7: ("clipvalue", 0.3),
               9: ("lr", 0.05), 11: ("beta", 0.0), 13: ("clipnorm", 0.5)}
    for i in range(16):
        if i in changes:
            key, value = changes[i]
            for o in (fast, ref):
                o.param_groups[0][key] = value
        gs = [rng.standard_normal(x.shape).astype(dtype) for x in xs_f]
        gs[0][::2] = 0
        fast.step(gs)
        ref.step(gs)
        for a, b in zip(xs_f, xs_r):
            np.testing.assert_array_equal(a, b)


def _gradient_kinds(rng, shape, dtype):
    """(gradient, taken by the single-array kernel?) for a parameter of
    ``shape`` and ``dtype``: every way an object can be or fail to be one
    the kernel may read in place."""
    size = int(np.prod(shape))
    good = rng.standard_normal(shape).astype(dtype)
    other = np.float64 if dtype == np.float32 else np.float32
    wide = rng.standard_normal(2 * size + 2).astype(dtype)
    readonly = good.copy()
    readonly.flags.writeable = False
    unaligned = np.frombuffer(b"\0" + good.tobytes(), dtype=dtype, count=size,
                              offset=1).reshape(shape)
    kinds = [(good, True), (wide[1:size + 1].reshape(shape), True), (readonly, True),
             (good.astype(other), False), (wide[:2 * size:2].reshape(shape), False),
             (good.view(np.recarray), False), (good.tolist(), False),
             (unaligned, False), (good.reshape(-1, 1), False)]
    if len(shape) == 2:
        kinds.append((np.asfortranarray(good), False))
    return kinds


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(6,), (3, 4)])
def test_single_array_kernel_reads_only_what_it_may(monkeypatch, dtype, shape):
    """The single-array kernel takes its gradient by object address: it must
    use exactly the C-contiguous, aligned ndarrays of the parameter's dtype
    and shape (checked by counting general-path calls), and every gradient,
    taken or not, must give the NumPy backend's bits."""
    rng = np.random.default_rng(11)
    x0 = rng.standard_normal(shape).astype(dtype)
    xf, xr = x0.copy(), x0.copy()
    fast = eg.Expectigrad(xf, lr=0.05)
    ref = eg.Expectigrad(xr, lr=0.05, backend="numpy")
    assert fast._fast is not None
    general = []
    original = eg.Expectigrad._flatten_grads
    monkeypatch.setattr(eg.Expectigrad, "_flatten_grads",
                        lambda self, g: general.append(1) or original(self, g))
    for g, taken in _gradient_kinds(rng, shape, dtype):
        if isinstance(g, np.ndarray) and g.shape != shape:
            with pytest.raises(ValueError):
                fast.step(g)
            continue
        before = len(general)
        fast.step(g)
        assert (len(general) == before) == taken, (type(g), getattr(g, "flags", None))
        ref.step(g)
        _assert_same(fast, ref, [xf], [xr])


def test_single_array_kernel_holds_the_gil_only_for_small_arrays():
    small = eg.Expectigrad(np.zeros(K.SINGLE_STEP_GIL_MAX, np.float32))
    large = eg.Expectigrad(np.zeros(K.SINGLE_STEP_GIL_MAX + 1, np.float32))
    loops = small._buckets[0]._loops(np.inf)
    assert loops == large._buckets[0]._loops(np.inf)
    assert small._fast[0] is K.bucket_step_entry(np.float32, hold_gil=True, loops=loops)
    assert large._fast[0] is K.bucket_step_entry(np.float32, hold_gil=False, loops=loops)
    assert not K.bucket_step(np.float32, True, False, loops).targetoptions.get("nogil", False)
    assert K.bucket_step(np.float32, False, False, loops).targetoptions["nogil"]


def test_pickled_optimizer_rebuilds_its_fast_path():
    import pickle
    x = np.linspace(-1, 1, 6)
    opt = eg.Expectigrad(x, lr=0.1)
    opt.step(np.ones(6))
    copy = pickle.loads(pickle.dumps(opt))
    assert copy.param_groups[0]["params"][0] is not x
    for o in (opt, copy):
        o.step(np.arange(6.0))
    np.testing.assert_array_equal(copy.param_groups[0]["params"][0], x)
    assert copy._fast is not None and copy.step_count == opt.step_count == 2


def test_state_buffers_start_at_their_page_offsets_after_copies():
    """The state buffers start at ``STATE_PAGE_OFFSETS`` within a page (away
    from where NumPy's large arrays start), zeroed, and keep their offsets
    and contents through deepcopy and pickling."""
    import copy
    import pickle
    x = np.zeros(100_000, np.float32)
    opt = eg.Expectigrad(x)
    (b,) = opt._buckets
    for name, offset in _layout.STATE_PAGE_OFFSETS.items():
        a = getattr(b, name)
        assert a.ctypes.data % 4096 == offset and a.size == x.size and not a.any()
    opt.step(np.linspace(-1, 1, x.size, dtype=np.float32))
    for twin in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        (tb,) = twin._buckets
        for name, offset in _layout.STATE_PAGE_OFFSETS.items():
            a = getattr(tb, name)
            assert a.ctypes.data % 4096 == offset
            np.testing.assert_array_equal(a, getattr(b, name))
            assert a.dtype == getattr(b, name).dtype


@pytest.mark.slow
def test_an_ablated_twin_reaches_the_loops_it_names_and_leaves_the_kernel_alone():
    """``bench --pieces`` switches a piece off in a twin of the kernel: a
    check pass replaced deep inside (``loops._span_sums``) no longer sees a
    NaN in the twin, and still does in the package's kernel."""
    from numba import njit

    from expectigrad_np._bench_pieces import _segments_args, ablated
    from expectigrad_np.backends.cpu import kernels as K
    from expectigrad_np.backends.cpu.loops import loops_for

    @njit(inline="always")
    def blind(g, norm, clip, clipvalue):
        return g.dtype.type(0), 0.0

    opt, _, args, g = _segments_args(1000, "float32")
    g[5] = np.nan
    kernel = K.variant(loops_for(True, True, False)).segments_step
    check_only = args + (True, np.inf, 0.0, False)
    assert kernel(*check_only)[0] == 0
    twin = ablated(kernel, {"_span_sums": blind}, "_blind_test")
    assert twin is not kernel and twin(*check_only)[0] == -1
    assert kernel(*check_only)[0] == 0
    assert ablated(kernel, {"_no_such_global": blind}, "_none") is kernel
    del opt
