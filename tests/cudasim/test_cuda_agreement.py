"""The cuda backend against the NumPy reference (simulator or GPU):
float64 to 1e-12, float32 to 1e-5, for every option."""
import numpy as np
import pytest
from devarrays import InterfaceArray, simulator_only, to_device, to_host
from hypothesis import given
from hypothesis import strategies as st
from numba import cuda

import expectigrad_np as eg
from expectigrad_np import schedules
from expectigrad_np.backends.cuda import kernels as KC

SHAPES = [(), (0,), (1,), (5,), (2, 3), (3, 1, 4), (KC.CHUNK * 2 + 5,)]


@st.composite
def problems(draw):
    dtypes = draw(st.sampled_from([[np.float32], [np.float64], [np.float32, np.float64]]))
    n_arrays = draw(st.integers(1, 4))
    shapes = [draw(st.sampled_from(SHAPES)) for _ in range(n_arrays)]
    dts = [dtypes[i % len(dtypes)] for i in range(n_arrays)]
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    arrays = [rng.uniform(-10, 10, s).astype(d) for s, d in zip(shapes, dts)]
    hyper = dict(
        lr=draw(st.floats(1e-4, 1.0)), beta=draw(st.sampled_from([0.0, 0.5, 0.9])),
        eps=draw(st.sampled_from([1e-8, 1e-3, 1.0])), sparse_counter=draw(st.booleans()),
        clipvalue=draw(st.sampled_from([None, 0.5])), clipnorm=draw(st.sampled_from([None, 1.0])),
        global_clipnorm=draw(st.sampled_from([None, 2.0])),
        weight_decay=draw(st.sampled_from([0.0, 0.3])), maximize=draw(st.booleans()),
        check_finite=draw(st.booleans()))
    steps = draw(st.integers(1, 5))
    return arrays, hyper, steps, seed


def run_both(arrays, hyper, steps, seed, none_fraction=0.15):
    rng = np.random.default_rng(seed)
    xs_dev = to_device(arrays)
    xs_ref = [a.copy() for a in arrays]
    gpu = eg.Expectigrad(xs_dev, **hyper)
    ref = eg.Expectigrad(xs_ref, backend="numpy", **hyper)
    assert gpu.backend == "cuda"
    for _ in range(steps):
        grads = []
        for a in arrays:
            g = np.asarray(rng.standard_normal(a.shape) * 3, dtype=a.dtype)
            g[rng.random(a.shape) < 0.3] = 0
            grads.append(None if rng.random() < none_fraction else g)
        gpu.step(to_device(grads))
        ref.step(grads)
    return gpu, ref, to_host(xs_dev), xs_ref


def assert_agree(gpu, ref, xs_gpu, xs_ref):
    # Norms of float32 arrays are summed in float32 on the device (in float64
    # by the reference): with global_clipnorm over float32 and float64 arrays
    # the float64 arrays see them to float32 precision.
    mixed = len({x.dtype for x in xs_ref}) > 1 and gpu.global_clipnorm is not None
    tol = lambda dtype: 1e-5 if dtype == np.float32 or mixed else 1e-12  # noqa: E731
    for a, b in zip(xs_gpu, xs_ref):
        assert a.dtype == b.dtype
        rtol = tol(a.dtype)
        # An element that a step brought near zero keeps the absolute
        # rounding error of the larger numbers it came from (a float32
        # norm's relative 1e-7 times lr = 1 here): absolute slack in the
        # array's own scale.
        scale = float(np.max(np.abs(b), initial=0.0))
        np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * max(scale, 1.0) * 1e-2)
    sa, sb = gpu.state_dict()["state"], ref.state_dict()["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        assert sa[i].keys() == sb[i].keys()
        assert sa[i]["step"] == sb[i]["step"]
        for key in sa[i]:
            if key != "step":
                assert sa[i][key].dtype == sb[i][key].dtype
                rtol = tol(sa[i][key].dtype)
                # Relative to the array's scale: momentum can cancel to ~0.
                atol = rtol * np.max(np.abs(sb[i][key]), initial=0.0)
                np.testing.assert_allclose(sa[i][key], sb[i][key], rtol=rtol, atol=atol)


@given(problems())
def test_cuda_agrees_with_reference(problem):
    assert_agree(*run_both(*problem))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("hyper", [
    dict(), dict(beta=0.0), dict(sparse_counter=False), dict(sparse_counter=False, beta=0.0),
    dict(clipvalue=0.3, clipnorm=0.5, global_clipnorm=0.7),
    dict(global_clipnorm=1.0, check_finite=False),
    dict(weight_decay=0.2, maximize=True), dict(beta=0.0, weight_decay=0.5, maximize=True),
])
def test_every_option_with_multi_chunk_arrays(dtype, hyper):
    """One array long enough for more than THREADS chunks (summed by a whole
    block in the stats kernel), one over a few chunks, small ones."""
    rng = np.random.default_rng(7)
    sizes = [KC.CHUNK * (KC.THREADS + 3) + 1, 3 * KC.CHUNK - 1, 4, 1]
    arrays = [rng.uniform(-1, 1, s).astype(dtype) for s in sizes]
    assert_agree(*run_both(arrays, dict(lr=0.1, **hyper), 3, 11, none_fraction=0.0))


@simulator_only
def test_agreement_check_can_fail(monkeypatch):
    """The comparison sees a wrong kernel: a mean of g instead of g**2."""
    rng = np.random.default_rng(0)
    arrays = [rng.uniform(-1, 1, 7)]
    gpu, ref, a, b = run_both(arrays, dict(lr=0.1), 3, 1, none_fraction=0.0)
    assert_agree(gpu, ref, a, b)
    monkeypatch.setattr(KC, "_COUNT_MAX", np.uint32(1))   # counts saturate at 1
    with pytest.raises(AssertionError):
        assert_agree(*run_both(arrays, dict(lr=0.1), 3, 1, none_fraction=0.0))


def test_schedule_and_param_groups():
    rng = np.random.default_rng(3)
    host = [rng.standard_normal(4), rng.standard_normal((2, 2)).astype(np.float32)]
    groups = lambda xs: [  # noqa: E731
        {"params": [xs[0]], "lr": schedules.cosine_decay(0.1, 5), "beta": 0.0},
        {"params": [xs[1]], "lr": 0.05, "sparse_counter": False}]
    dev = to_device(host)
    gpu = eg.Expectigrad(groups(dev))
    ref = eg.Expectigrad(groups(host), backend="numpy")
    for _ in range(4):
        grads = [rng.standard_normal(h.shape).astype(h.dtype) for h in host]
        gpu.step(to_device(grads))
        ref.step(grads)
    assert_agree(gpu, ref, to_host(dev), host)


def test_beta_switched_on_later_allocates_momentum():
    x_dev, x_ref = cuda.to_device(np.ones(5)), np.ones(5)
    gpu = eg.Expectigrad(x_dev, lr=0.1, beta=0.0)
    ref = eg.Expectigrad(x_ref, lr=0.1, beta=0.0, backend="numpy")
    g = np.linspace(-1, 1, 5)
    for opt, grad in ((gpu, cuda.to_device(g)), (ref, g)):
        opt.step(grad)
        opt.param_groups[0]["beta"] = 0.9
        opt.step(grad)
    assert_agree(gpu, ref, [x_dev.copy_to_host()], [x_ref])


def test_interface_arrays_are_updated_in_place():
    """Objects exporting __cuda_array_interface__ (CuPy, PyTorch CUDA) are used
    zero-copy: the optimizer writes into their memory."""
    w = InterfaceArray(np.ones((3, 2), np.float32))
    opt = eg.Expectigrad([w], lr=0.1)
    assert opt.backend == "cuda"
    opt.step([InterfaceArray(np.ones((3, 2), np.float32))])
    np.testing.assert_allclose(w.values(), 0.9, rtol=1e-6)
    opt.params[0].copy_to_device(np.full((3, 2), 5.0, np.float32))
    assert np.all(w.values() == 5.0)      # the optimizer's view is the same memory


def test_state_dict_round_trips_through_host_arrays():
    rng = np.random.default_rng(5)
    host = [rng.standard_normal((4, 3)), rng.standard_normal(5).astype(np.float32)]
    a_dev = to_device(host)
    a = eg.Expectigrad(a_dev, lr=0.1)
    a.step(to_device([rng.standard_normal(h.shape).astype(h.dtype) for h in host]))
    sd = a.state_dict()
    for entry in sd["state"].values():
        for key, value in entry.items():
            assert key == "step" or type(value) is np.ndarray
    b_dev = to_device(to_host(a_dev))
    b = eg.Expectigrad(b_dev, lr=0.1)
    b.load_state_dict(sd)
    c_host = to_host(a_dev)
    c = eg.Expectigrad(c_host, lr=0.1, backend="cpu")   # device state -> host optimizer
    c.load_state_dict(sd)
    g = [rng.standard_normal(h.shape).astype(h.dtype) for h in host]
    a.step(to_device(g))
    b.step(to_device(g))
    c.step(g)
    for x, y, z in zip(to_host(a_dev), to_host(b_dev), c_host):
        np.testing.assert_array_equal(x, y)
        np.testing.assert_allclose(x, z, rtol=1e-6)


def test_checkpoint_resumes_on_the_device_and_on_the_host(tmp_path):
    """A checkpoint of a cuda optimizer (parameters included) restores a fresh
    cuda optimizer bit for bit, and a cpu optimizer to float32 rounding."""
    rng = np.random.default_rng(9)
    host = [rng.standard_normal((3, 2)).astype(np.float32), rng.standard_normal(4)]
    grads = [[rng.standard_normal(h.shape).astype(h.dtype) for h in host] for _ in range(3)]
    a_dev = to_device(host)
    a = eg.Expectigrad(a_dev, lr=0.1, global_clipnorm=1.0)
    a.step(to_device(grads[0]))
    a.save(tmp_path / "ck.npz")
    b_dev = to_device([np.zeros_like(h) for h in host])
    b = eg.Expectigrad(b_dev, lr=0.1, global_clipnorm=1.0)
    b.load(tmp_path / "ck.npz")
    c_host = [np.zeros_like(h) for h in host]
    c = eg.Expectigrad(c_host, lr=0.1, global_clipnorm=1.0, backend="cpu")
    c.load(tmp_path / "ck.npz")
    for g in grads[1:]:
        a.step(to_device(g))
        b.step(to_device(g))
        c.step(g)
    for x, y, z in zip(to_host(a_dev), to_host(b_dev), c_host):
        np.testing.assert_array_equal(x, y)
        np.testing.assert_allclose(x, z, rtol=1e-5)


# --- overflow: bounded steps and norms that do not overflow ---------------------

def _stepped(xs_host, grads, hyper, backend):
    xs = to_device(xs_host) if backend == "cuda" else [x.copy() for x in xs_host]
    opt = eg.Expectigrad(xs, backend=backend, **hyper)
    for g in grads:
        opt.step(to_device(g) if backend == "cuda" else g)
    return to_host(xs) if backend == "cuda" else xs, opt


@pytest.mark.parametrize("dtype,g", [(np.float32, 1e30), (np.float32, 1e38),
                                     (np.float64, 1e200)])
@pytest.mark.parametrize("beta", [0.0, 0.9])
def test_a_gradient_whose_square_overflows_moves_x_by_lr(dtype, g, beta):
    """The gradient saturates at the largest magnitude whose square is
    finite: the first step is lr, as on the host backends."""
    xs, opt = _stepped([np.zeros(3, dtype)], [[np.array([g, -g, 1.0], dtype)]],
                       dict(lr=0.1, beta=beta), "cuda")
    np.testing.assert_allclose(xs[0], [-0.1, 0.1, -0.1], rtol=1e-6)
    assert np.all(np.isfinite(opt.state_dict()["state"][0]["mean_sq"]))


@pytest.mark.parametrize("dtype,g", [(np.float32, 1e20), (np.float32, 3e38),
                                     (np.float64, 1e200)])
@pytest.mark.parametrize("clip", [dict(clipnorm=1.0), dict(global_clipnorm=1.0),
                                  dict(clipnorm=2.0, global_clipnorm=1.0)])
def test_a_norm_that_overflows_still_clips_the_step(dtype, g, clip):
    """Squared norms beyond the dtype (float32 gradients of 1e20) are kept as
    two scaled sums: the step is clipped, not dropped, and agrees with the
    numpy backend (whose norms are in float64 with a scaled fallback)."""
    sizes = [KC.CHUNK * (KC.THREADS + 3) + 1, 5, 2]       # a whole-block array too
    rng = np.random.default_rng(3)
    xs = [np.zeros(s, dtype) for s in sizes]
    grads = []
    for _ in range(2):
        gs = [rng.standard_normal(s).astype(dtype) for s in sizes]
        gs[0][[0, -1]] = [g, -g]
        gs[1][2] = g
        grads.append(gs)
    got, opt = _stepped(xs, grads, dict(lr=0.1, **clip), "cuda")
    want, ref = _stepped(xs, grads, dict(lr=0.1, **clip), "numpy")
    for a, b in zip(got, want):
        assert np.any(a != 0)                              # the step was taken
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert opt.state_dict()["state"][0]["step"] == 2


def test_two_buckets_share_a_global_norm_that_overflows():
    """A float64 bucket's overflowing squared norm reaches the float32 bucket's
    kernel as two sums; both are clipped as the numpy backend clips them."""
    rng = np.random.default_rng(4)
    xs = [np.zeros(6, np.float32), np.zeros(4)]
    grads = [[rng.standard_normal(6).astype(np.float32), np.array([1e30, 1.0, -2.0, 3.0])]
             for _ in range(2)]
    got, _ = _stepped(xs, grads, dict(lr=0.1, global_clipnorm=1.0), "cuda")
    want, _ = _stepped(xs, grads, dict(lr=0.1, global_clipnorm=1.0), "numpy")
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-9)
