"""Second round of hostile input: each test names the promise it checks.
(Param-group guards and freeing by ``del`` are in test_architecture.py.)"""
import os
import signal
import threading
import zipfile

import numpy as np
import pytest

import expectigrad_np as eg
from expectigrad_np import schedules

BACKENDS = ["cpu", "numpy"]


def _state(opt):
    sd = opt.state_dict()
    return sd["step"], {i: {k: np.array(v) for k, v in e.items()}
                        for i, e in sd["state"].items()}


def _same_state(a, b):
    assert a[0] == b[0]
    for i in a[1]:
        for k in a[1][i]:
            assert np.array_equal(a[1][i][k], b[1][i][k]), (i, k)


# --- momentum switched off and on (the original's m = beta*m + (1-beta)*u) ----

def _original(x, grads, betas, lr=0.1, eps=1e-8):
    """The original PyTorch optimizer's arithmetic, per step, with a
    running sum and float counter (float64)."""
    s = np.zeros_like(x)
    n = np.zeros_like(x)
    m = np.zeros_like(x)
    for t, (g, beta) in enumerate(zip(grads, betas), 1):
        s += g * g
        n += np.sign(g * g)
        u = np.where(n > 0, g / (eps + np.sqrt(s / np.maximum(n, 1))), 0.0)
        m = beta * m + (1 - beta) * u
        x = x - lr / (1 - beta ** t if beta > 0 else 1.0) * m
    return x


@pytest.mark.parametrize("backend", BACKENDS)
def test_momentum_switched_off_and_on_follows_the_original(backend):
    rng = np.random.default_rng(0)
    grads = [rng.standard_normal(6) for _ in range(9)]
    betas = [0.9, 0.9, 0.9, 0.0, 0.0, 0.9, 0.9, 0.5, 0.9]
    x = np.zeros(6)
    opt = eg.Expectigrad([x], lr=0.1, beta=betas[0], backend=backend)
    for g, beta in zip(grads, betas):
        opt.param_groups[0]["beta"] = beta
        opt.step([g])
    np.testing.assert_allclose(x, _original(np.zeros(6), grads, betas), rtol=1e-12)


# --- interrupts ---------------------------------------------------------------

@pytest.fixture
def ctrl_c():
    """Python's own SIGINT handler for the test, whatever this process was
    started with (a shell starts background jobs with SIGINT ignored)."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


class _Timeout(Exception):
    pass


def _raise_timeout(signum, frame):
    raise _Timeout


@pytest.mark.parametrize("signum, raised", [
    (signal.SIGINT, KeyboardInterrupt),
    # A handler that raises, as timeouts install on SIGALRM.
    pytest.param(getattr(signal, "SIGALRM", None), _Timeout,
                 marks=pytest.mark.skipif(not hasattr(signal, "SIGALRM"),
                                          reason="no SIGALRM on this platform"))])
def test_ctrl_c_during_a_two_dtype_step_is_delivered_after_it(ctrl_c, signum, raised):
    if signum != signal.SIGINT:
        before = signal.signal(signum, _raise_timeout)
    try:
        _interrupted_two_dtype_step(signum, raised)
    finally:
        if signum != signal.SIGINT:
            signal.signal(signum, before)


def _signalled_between_buckets(*signums):
    """A float64 + float32 optimizer whose first bucket's step sends
    ``signums`` to this process once it has stepped (mid-step)."""
    xs = [np.zeros(50), np.zeros(7, np.float32)]
    opt = eg.Expectigrad(xs, lr=0.1)
    bucket = opt._buckets[0]
    real = type(bucket).step

    def interrupted(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        for signum in signums:
            os.kill(os.getpid(), signum)
        return out
    bucket.step = interrupted.__get__(bucket)
    return opt


def _interrupted_two_dtype_step(signum, raised):
    opt = _signalled_between_buckets(signum)
    with pytest.raises(raised):
        # A strided gradient: the general route, which steps one bucket at a
        # time (contiguous ones take one compiled call for both dtypes).
        opt.step([np.ones(100)[::2], np.ones(7, np.float32)])
    # The whole step happened: both arrays moved and every count advanced.
    assert opt.step_count == 1
    assert all(e["step"] == 1 for e in opt.state_dict()["state"].values())
    assert all(np.all(x < 0) for x in opt.params)


# --- threads: save while stepping ----------------------------------------------

def test_save_while_another_thread_steps_writes_consistent_snapshots(tmp_path):
    xs = [np.zeros(2_000_000, np.float32), np.zeros(3)]        # two buckets
    opt = eg.Expectigrad(xs, lr=0.01)
    stop = threading.Event()
    gs = [np.ones(2_000_000, np.float32), np.ones(3)]

    def stepper():
        while not stop.is_set():
            opt.step(gs)
    th = threading.Thread(target=stepper)
    th.start()
    try:
        for k in range(10):
            path = tmp_path / f"c{k}.npz"
            opt.save(path)
            twin = eg.Expectigrad([np.zeros(2_000_000, np.float32), np.zeros(3)], lr=0.01)
            twin.load(path)
            steps = {e["step"] for e in twin.state_dict()["state"].values()}
            assert steps == {twin.step_count}, (steps, twin.step_count)
            counts = twin.state_dict()["state"][0]["count"]    # ones: count = steps
            assert counts.min() == counts.max() == twin.step_count
            # Parameters equal a run of exactly that many steps.
            ref = eg.Expectigrad([np.zeros(3)], lr=0.01, backend="numpy")
            for _ in range(twin.step_count):
                ref.step([np.ones(3)])
            np.testing.assert_array_equal(twin.params[1], ref.params[0])
    finally:
        stop.set()
        th.join()


# --- checkpoints -----------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_d_parameters_round_trip_through_checkpoints(tmp_path, backend):
    x = np.array(0.5)
    opt = eg.Expectigrad([x, np.zeros(3)], backend=backend)
    opt.step([np.array(1.0), np.ones(3)])
    opt.save(tmp_path / "c.npz")
    y = np.array(0.0)
    twin = eg.Expectigrad([y, np.zeros(3)], backend=backend)
    twin.load(tmp_path / "c.npz")
    assert y == x
    _same_state(_state(opt), _state(twin))


def test_a_zip_bomb_member_is_not_inflated(tmp_path):
    opt = eg.Expectigrad([np.zeros(4)])
    opt.step([np.ones(4)])
    path = tmp_path / "c.npz"
    opt.save(path)
    with zipfile.ZipFile(path, "a", compression=zipfile.ZIP_DEFLATED) as z:
        # An oversized member the metadata names: 64 MiB of zeros for 4 floats.
        z.writestr("param_0x.npy", b"")
    # Replace param_0 by a huge one: rebuild the archive.
    rebuilt = tmp_path / "bomb.npz"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(rebuilt, "w",
                                                       zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename == "param_0.npy":
                header = data[:data.index(b"\n") + 1]
                data = header + bytes(64 << 20)
            dst.writestr(info.filename, data)
    before = opt.params[0].copy()
    with pytest.raises(ValueError, match="inflates to"):
        opt.load(rebuilt)
    assert np.array_equal(opt.params[0], before)


def test_save_writes_through_a_symlink_and_refuses_special_files(tmp_path):
    opt = eg.Expectigrad([np.zeros(4)])
    opt.step([np.ones(4)])
    target = tmp_path / "real.npz"
    link = tmp_path / "link.npz"
    link.symlink_to(target)
    opt.save(link)
    assert link.is_symlink() and target.is_file()
    opt.save(os.fsencode(str(tmp_path / "bytes.npz")))        # bytes paths work
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="not a regular file"):
        opt.save(fifo)
    with pytest.raises(ValueError, match="not a regular file"):
        opt.save(tmp_path)
    eg.Expectigrad([np.zeros(4)]).load(link)


def test_load_into_a_read_only_parameter_changes_nothing(tmp_path):
    opt = eg.Expectigrad([np.zeros(4), np.zeros(2)])
    opt.step([np.ones(4), np.ones(2)])
    opt.save(tmp_path / "c.npz")
    xs = [np.zeros(4), np.zeros(2)]
    twin = eg.Expectigrad(xs)
    xs[1].flags.writeable = False
    before = _state(twin)
    with pytest.raises(ValueError, match="read-only"):
        twin.load(tmp_path / "c.npz")
    _same_state(before, _state(twin))
    assert not xs[0].any()


# --- load_state_dict ranges --------------------------------------------------------

@pytest.mark.parametrize("edit,match", [
    (lambda sd: sd["state"][0].update(mean_sq=np.full(3, 1e300)), "overflows float32"),
    (lambda sd: sd["state"][0].update(count=np.full(3, 2 ** 32 + 5)), "outside uint32"),
    (lambda sd: sd.update(step=True), "integer"),
    (lambda sd: sd["state"][0].update(step=2 ** 63 - 1), "integer in"),
    (lambda sd: sd["state"].update({0: [1, 2]}), "must be a mapping"),
    (lambda sd: sd.update(state=[1]), "must be a mapping"),
])
def test_load_state_dict_refuses_values_out_of_range(edit, match):
    opt = eg.Expectigrad([np.zeros(3, np.float32)])
    opt.step([np.ones(3, np.float32)])
    sd = opt.state_dict()
    edit(sd)
    before = _state(opt)
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(sd)
    _same_state(before, _state(opt))


# --- parameters and gradients -------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("several", [False, True])
def test_a_parameter_made_read_only_after_construction_is_refused(backend, several):
    xs = [np.zeros(5), np.zeros(3, np.float32)] if several else [np.zeros(5)]
    opt = eg.Expectigrad(xs, backend=backend)
    gs = [np.ones(5), np.ones(3, np.float32)] if several else [np.ones(5)]
    opt.step(gs)
    xs[0].flags.writeable = False
    before = _state(opt)
    with pytest.raises(ValueError, match="read-only"):
        opt.step(gs)
    _same_state(before, _state(opt))


@pytest.mark.parametrize("several", [False, True])
def test_a_reused_gradient_whose_shape_changed_in_place_is_refused(several):
    xs = [np.zeros((3, 4))] + ([np.zeros(2, np.float32)] if several else [])
    opt = eg.Expectigrad(xs)
    g = np.ones((3, 4))
    rest = [np.ones(2, np.float32)] if several else []
    opt.step([g] + rest)
    g.shape = (12,)
    with pytest.raises(ValueError, match=r"has shape \(12,\)"):
        opt.step([g] + rest)


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_arrays_and_matrices_are_refused(backend):
    with pytest.raises(TypeError, match="masked array"):
        eg.Expectigrad([np.ma.masked_array(np.zeros(3), [0, 1, 0])], backend=backend)
    with pytest.raises(TypeError, match="numpy.matrix"):
        eg.Expectigrad([np.asmatrix(np.zeros((2, 2)))], backend=backend)
    opt = eg.Expectigrad([np.zeros(3)], backend=backend)
    with pytest.raises(TypeError, match="masked array"):
        opt.step([np.ma.masked_array(np.ones(3), [0, 1, 0])])
    assert opt.step_count == 0


def test_messages_say_what_to_do():
    with pytest.raises(TypeError, match=r"np\.asarray\(values"):
        eg.Expectigrad([[1.0, 2.0]])
    w = np.zeros(3)
    opt = eg.Expectigrad([w])
    opt.step([[1.0, 2.0, 3.0]])               # one gradient, as a list: accepted
    assert np.all(w < 0)
    with pytest.raises(ValueError, match="one per parameter"):
        eg.Expectigrad([np.zeros(3), np.zeros(2)]).step([np.ones(3)])


# --- schedules and step sizes ---------------------------------------------------------

@pytest.mark.parametrize("value,error", [("0.1", TypeError), (True, TypeError),
                                         (10 ** 400, ValueError), (-1.0, ValueError)],
                         ids=["string", "bool", "huge-int", "negative"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_schedule_values_are_checked_like_constructor_values(value, error, backend):
    x = np.zeros(3)
    opt = eg.Expectigrad([x], lr=lambda step: value, backend=backend)
    with pytest.raises(error, match="lr schedule returned"):
        opt.step([np.ones(3)])
    assert opt.step_count == 0 and not x.any()


def test_a_step_size_that_overflows_the_dtype_is_refused():
    with pytest.raises(ValueError, match="overflows float32"):
        eg.Expectigrad([np.zeros(3, np.float32)], lr=3e38)
    opt = eg.Expectigrad([np.zeros(3, np.float32)], lr=1e37, beta=0.0)
    with pytest.raises(ValueError, match="overflows float32"):
        opt.param_groups[0]["beta"] = 0.99
    assert opt.param_groups[0]["beta"] == 0.0
    eg.Expectigrad([np.zeros(3)], lr=3e38)            # fine in float64
    assert schedules                                   # (module imported for the above)


# --- gradients that overlap parameters ---------------------------------------------

@pytest.mark.parametrize("route", ["compiled", "general"])
@pytest.mark.parametrize("case", ["shifted view", "another parameter", "itself"])
def test_a_gradient_overlapping_a_parameter_is_read_as_it_was(route, case):
    """The result is that of a copied gradient, the numpy backend's."""
    def build(backend):
        buf = np.linspace(-1, 1, 4097)
        other = np.linspace(0, 2, 4096)
        params = [buf[1:], other]
        if route == "general":
            params.append(np.zeros(3, np.float32))     # a second dtype: general route
        return buf, params, eg.Expectigrad(params, lr=0.1, backend=backend)

    def grads(buf, params):
        g = {"shifted view": buf[:-1], "another parameter": params[1],
             "itself": params[0]}[case]
        rest = [np.ones(3, np.float32)] if route == "general" else []
        return [g, np.ones(4096)] + rest

    buf, params, opt = build("cpu")
    rbuf, rparams, ref = build("numpy")
    for _ in range(3):
        opt.step(grads(buf, params))
        ref.step([np.array(g) for g in grads(rbuf, rparams)])
    for a, b in zip(params, rparams):
        assert np.array_equal(a, b)


# --- minimize ---------------------------------------------------------------------

def test_minimize_ends_cleanly_on_a_gradient_too_large_for_float32():
    x0 = np.ones(3, np.float32)
    r = eg.minimize(lambda x: float(np.sum(x * x)), x0,
                    jac=lambda x: np.full(3, 1e39), maxiter=5)
    assert r.status == 3 and not r.success
    assert np.array_equal(r.x, x0)


def test_minimize_refuses_a_string_objective_and_bounds_with_no_finite_value():
    with pytest.raises(ValueError, match="real scalar"):
        eg.minimize(lambda x: "3", np.ones(3), jac=lambda x: x)
    with pytest.raises(ValueError, match="admit no finite value"):
        eg.minimize(lambda x: float(x @ x), np.ones(2), jac=lambda x: 2 * x,
                    bounds=[(np.inf, np.inf), (None, None)])


# --- clipping order -------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_clipping_order_is_value_then_norm_then_global(backend):
    """The original TF2 optimizer's order: clip by value, then each array's
    norm, then the global norm (of the value-clipped gradients)."""
    g = [np.array([3.0, -0.5, 4.0]), np.array([0.2, 10.0])]
    xs = [np.zeros(3), np.zeros(2)]
    opt = eg.Expectigrad(xs, lr=1.0, beta=0.0, clipvalue=1.0, clipnorm=1.2,
                         global_clipnorm=1.5, backend=backend)
    opt.step(g)
    # By hand: value, per-array norm, global norm; first step u = sign(g).
    gv = [np.clip(a, -1, 1) for a in g]
    gn = [a * min(1.0, 1.2 / np.linalg.norm(a)) for a in gv]
    total = np.sqrt(sum(np.sum(a * a) for a in gn))
    gg = [a * min(1.0, 1.5 / total) for a in gn]
    means = [a * a for a in gg]
    for x, a, ms in zip(xs, gg, means):
        np.testing.assert_allclose(x, -a / (1e-8 + np.sqrt(ms)), rtol=1e-12)
    np.testing.assert_allclose(opt.state_dict()["state"][1]["mean_sq"], means[1],
                               rtol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("several", [False, True])
def test_a_scheduled_step_size_that_overflows_the_dtype_is_refused(backend, several):
    xs = [np.zeros(3, np.float32)] + ([np.zeros(2)] if several else [])
    opt = eg.Expectigrad(xs, lr=lambda step: 3e38 if step >= 1 else 1e-3, backend=backend)
    gs = [np.ones(3, np.float32)] + ([np.ones(2)] if several else [])
    opt.step(gs)
    before = _state(opt)
    with pytest.raises(ValueError, match="lr schedule returned 3e.*overflows float32"):
        opt.step(gs)
    _same_state(before, _state(opt))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_swapped_parameters_as_gradients_agree_across_backends(dtype):
    """Each gradient is the other parameter: both backends read them as they
    were at the call (the numpy backend once read an updated one)."""
    results = []
    for backend in BACKENDS:
        ps = [np.linspace(-1, 1, 7).astype(dtype), np.linspace(0.5, 2, 7).astype(dtype)]
        opt = eg.Expectigrad(ps, lr=0.1, backend=backend)
        for _ in range(3):
            opt.step([ps[1], ps[0]])
        results.append(ps)
    for a, b in zip(*results):
        assert np.array_equal(a, b)


def test_a_schedule_is_called_once_per_step_on_every_route():
    calls = []
    x = np.zeros((4, 4))
    opt = eg.Expectigrad([x], lr=lambda step: calls.append(step) or 0.1)
    for _ in range(3):
        opt.step([np.ones((4, 4)).T])          # not C-contiguous: the general route
    assert calls == [0, 1, 2]


# --- norms that overflow when squared -------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("clip", [{"global_clipnorm": 1.0}, {"clipnorm": 1.0},
                                  {"clipnorm": 2.0, "global_clipnorm": 1.0, "clipvalue": 1e250}])
@pytest.mark.parametrize("several", [False, True])
def test_a_norm_that_overflows_still_clips_the_step(backend, clip, several):
    """float64 gradients whose squares overflow: the step is clipped by the
    scaled norm, not dropped (before, nothing moved yet step_count advanced)."""
    xs = [np.zeros(2)] + ([np.zeros(2)] + [np.zeros(2, np.float32)] if several else [])
    gs = [np.array([1e200, 1.0])] + ([np.array([1.0, -1.0]),
                                      np.array([1.0, 1.0], np.float32)] if several else [])
    opt = eg.Expectigrad(xs, lr=0.1, backend=backend, **clip)
    opt.step(gs)
    assert opt.step_count == 1
    assert xs[0][0] == pytest.approx(-0.1, rel=1e-6)       # first step: lr * sign(g)
    assert xs[0][1] < 0
    assert opt.state_dict()["state"][0]["step"] == 1
    for x in xs:
        assert np.all(np.isfinite(x))


# --- every finite gradient gives a bounded step --------------------------------

def _huge_gradients(dtype, shape, rng):
    """Finite gradients up to the dtype's largest value, with signs, zeros and
    ordinary values among them."""
    big = np.finfo(dtype).max
    pool = np.array([big, -big, big / 3, 1e30, -1e38, np.sqrt(big) * 1.5, 1.0, -2.5, 0.0,
                     1e-30], dtype=np.float64)
    with np.errstate(over="ignore"):
        pool = pool.astype(dtype)
    return rng.choice(pool[np.isfinite(pool)], shape)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("beta", [0.0, 0.9])
@pytest.mark.parametrize("sparse", [True, False])
def test_every_finite_gradient_gives_a_bounded_step(backend, dtype, beta, sparse):
    """|x_t - x_{t-1}| <= lr * sqrt(t) (lr on the first step), also when g*g
    overflows: the gradient saturates at the largest magnitude whose square
    is finite, so |u| <= sqrt(n) and the bias-corrected momentum step is
    bounded by lr * sqrt(t)."""
    rng = np.random.default_rng(1)
    lr = 0.1
    xs = [np.zeros(37, dtype), np.zeros((3, 4), dtype)]
    opt = eg.Expectigrad(xs, lr=lr, beta=beta, sparse_counter=sparse, backend=backend)
    for t in range(1, 7):
        before = [x.copy() for x in xs]
        opt.step([_huge_gradients(dtype, x.shape, rng) for x in xs])
        for x, b in zip(xs, before):
            assert np.all(np.isfinite(x))
            moved = np.abs(x.astype(np.float64) - b)
            assert moved.max() <= lr * np.sqrt(t) * (1 + 1e-5) + np.spacing(b).max(), t
    st = opt.state_dict()["state"][0]
    assert np.all(np.isfinite(st["mean_sq"]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,g", [(np.float32, 1e30), (np.float32, 1e38),
                                     (np.float64, 1e200)])
def test_a_gradient_whose_square_overflows_moves_x_by_lr(backend, dtype, g):
    """The issue's cases: beta = 0 and beta = 0.9, lr = 0.1, first step."""
    for beta in (0.0, 0.9):
        x = np.zeros(2, dtype)
        eg.Expectigrad([x], lr=0.1, beta=beta, backend=backend).step(
            [np.array([g, -g], dtype)])
        np.testing.assert_allclose(x, [-0.1, 0.1], rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("copied", [False, True])
def test_a_gradient_aliasing_a_parameter_of_another_dtype_is_read_as_it_was(backend, copied):
    """With two dtypes each bucket steps in turn: a float64 gradient that is
    the float32 parameter's memory (and the reverse) must be read as it was
    before either step, as if copied; also in a deep copy of the optimizer."""
    import copy

    def run(alias):
        x32 = (np.arange(1, 9, dtype=np.float32) / 7)
        x64 = np.linspace(1, 2, 4)
        opt = eg.Expectigrad([x32, x64], lr=0.1, backend=backend)
        if copied:
            opt.step([np.ones(8, np.float32), np.ones(4)])
            opt = copy.deepcopy(opt)
            x32, x64 = opt.params
        for _ in range(2):
            g32, g64 = x64.view(np.float32), x32.view(np.float64)
            if not alias:
                g32, g64 = g32.copy(), g64.copy()
            opt.step([g32, g64])
        return x32, x64

    for a, b in zip(run(True), run(False)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("clip", [{"clipnorm": 1.0}, {"global_clipnorm": 1.0},
                                  {"clipnorm": 2.0, "global_clipnorm": 1.0}])
@pytest.mark.parametrize("several", [False, True])
def test_a_norm_beyond_the_float64_range_still_clips_the_step(backend, clip, several):
    """float64 gradients near 1.8e308, whose norm itself overflows: the norms
    are computed in units of 2**512, so the step is clipped, not lost."""
    big = np.finfo(np.float64).max
    g = np.array([big, big / 2, -big, big / 4])
    x = np.zeros(4)
    params = [x, np.zeros(2)] if several else [x]
    grads = [g, np.array([1.0, -1.0])] if several else [g]
    opt = eg.Expectigrad(params, lr=0.1, backend=backend, **clip)
    opt.step(grads)
    st = opt.state_dict()["state"][0]
    assert list(st["count"]) == [1, 1, 1, 1] and st["step"] == 1
    np.testing.assert_allclose(x, [-0.1, -0.1, 0.1, -0.1], rtol=1e-6)
    assert np.all(np.isfinite(st["mean_sq"])) and np.all(st["mean_sq"] > 0)


@pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="no SIGUSR1 on this platform")
def test_signals_held_behind_one_whose_handler_raises_are_still_delivered(ctrl_c):
    # As Python delivers signals pending behind one whose handler raised.
    seen = []
    before = signal.signal(signal.SIGUSR1, lambda signum, frame: seen.append(signum))
    try:
        opt = _signalled_between_buckets(signal.SIGINT, signal.SIGUSR1)
        with pytest.raises(KeyboardInterrupt):
            opt.step([np.ones(100)[::2], np.ones(7, np.float32)])   # the general route
        assert seen == [signal.SIGUSR1]
        assert opt.step_count == 1
    finally:
        signal.signal(signal.SIGUSR1, before)


# --- loading: checked as assignments are, and all or nothing ---------------------

@pytest.mark.parametrize("backend", ["cpu", "numpy"])
def test_a_loaded_lr_is_checked_against_the_dtype_as_an_assigned_one(backend):
    x = np.ones(3, np.float32)
    opt = eg.Expectigrad([x], lr=0.1, backend=backend)
    sd = opt.state_dict()
    sd["param_groups"][0]["lr"] = 1e39
    with pytest.raises(ValueError, match="state dict param group 0: lr=1e\\+39 .* overflows "
                                         "float32"):
        opt.load_state_dict(sd)
    assert opt.param_groups[0]["lr"] == 0.1
    opt.step([np.ones(3, np.float32)])
    assert np.all(np.isfinite(x))


def test_an_eps_that_overflows_the_parameters_dtype_is_refused():
    with pytest.raises(ValueError, match=r"eps=1e\+39 overflows float32, .* use eps <= "):
        eg.Expectigrad([np.ones(3, np.float32)], eps=1e39)
    opt = eg.Expectigrad([np.ones(3, np.float32)])
    with pytest.raises(ValueError, match="overflows float32"):
        opt.param_groups[0]["eps"] = 1e39
    assert opt.param_groups[0]["eps"] == 1e-8
    eg.Expectigrad([np.ones(3)], eps=1e39)          # finite in float64


def test_a_state_its_step_count_cannot_have_made_is_refused():
    opt = eg.Expectigrad([np.ones(3)], lr=0.1)
    opt.step([np.array([1.0, 0.0, 2.0])])
    before = opt.state_dict()
    counted = opt.state_dict()
    counted["state"][0]["count"] = np.array([1, 2, 1], np.uint32)
    with pytest.raises(ValueError, match="'count' holds 2, more than its step count 1"):
        opt.load_state_dict(counted)
    unstepped = opt.state_dict()
    unstepped["state"][0]["step"] = 0
    unstepped["state"][0]["count"] = np.zeros(3, np.uint32)
    with pytest.raises(ValueError, match="its step count is 0 but its state is not all zero"):
        opt.load_state_dict(unstepped)
    after = opt.state_dict()
    assert all(np.array_equal(after["state"][0][k], before["state"][0][k])
               for k in before["state"][0])


@pytest.mark.parametrize("backend", ["cpu", "numpy"])
def test_ctrl_c_during_a_load_is_delivered_after_it(ctrl_c, tmp_path, backend):
    xs = [np.zeros(5), np.zeros(4, np.float32)]
    opt = eg.Expectigrad(xs, lr=0.1, backend=backend)
    for _ in range(3):
        opt.step([np.ones(5), np.ones(4, np.float32)])
    saved = [x.copy() for x in xs]
    expected = opt.state_dict()
    opt.save(tmp_path / "ckpt.npz")
    opt.step([np.ones(5), np.ones(4, np.float32)])
    bucket = opt._buckets[0]
    real = type(bucket).write_state

    def interrupted(self, *args, **kwargs):
        real(self, *args, **kwargs)
        os.kill(os.getpid(), signal.SIGINT)          # after the first array's state
    bucket.write_state = interrupted.__get__(bucket)
    with pytest.raises(KeyboardInterrupt):
        opt.load(tmp_path / "ckpt.npz")
    # The whole checkpoint was restored: every state, step and parameter.
    got = opt.state_dict()
    assert got["step"] == expected["step"] == 3
    for i, entry in expected["state"].items():
        assert all(np.array_equal(got["state"][i][k], v) for k, v in entry.items())
    assert all(np.array_equal(x, y) for x, y in zip(xs, saved))


@pytest.mark.parametrize("value", [-3, 2.7, True, "x", 2**63])
def test_a_step_count_a_checkpoint_cannot_hold_is_refused(value, tmp_path):
    opt = eg.Expectigrad([np.ones(3)], lr=0.1)
    opt.step([np.ones(3)])
    with pytest.raises(ValueError, match=r"step_count must be an integer in \[0, 2\*\*62\)"):
        opt.step_count = value
    assert opt.step_count == 1
    opt.step_count = np.int64(7)                 # a NumPy integer is an integer
    opt.save(tmp_path / "c.npz")
    opt.load(tmp_path / "c.npz")
    assert opt.step_count == 7
