"""The cuda backend's contract (simulator or GPU): what a step launches and when it waits,
refused steps, skipped arrays, device-array handling and input errors."""
import types

import numba
import numpy as np
import pytest
from devarrays import InterfaceArray, simulator_only, to_device, to_host, views
from numba import cuda

import expectigrad_np as eg
from expectigrad_np.backends.cuda import backend as _cuda_bucket
from expectigrad_np.backends.cuda import kernels as KC


def snapshot(opt, xs):
    sd = opt.state_dict()
    return to_host(xs), {i: {k: np.copy(v) for k, v in e.items()} for i, e in sd["state"].items()}


def assert_same(a, b):
    xa, sa = a
    xb, sb = b
    for x, y in zip(xa, xb):
        np.testing.assert_array_equal(x, y)
    assert sa.keys() == sb.keys()
    for i in sa:
        assert sa[i].keys() == sb[i].keys()
        for k in sa[i]:
            np.testing.assert_array_equal(sa[i][k], sb[i][k])


# --- what a step launches, and when it waits -------------------------------------------

class LaunchLog:
    """Wraps a bucket's kernels: records (name, argument types) per launch."""

    def __init__(self, bucket):
        self.launches = []
        self.dtype = bucket.dtype
        real = bucket.kernels
        log = self

        class Kernel:
            def __init__(self, name):
                self.name = name

            def __getitem__(self, config):
                def launch(*args):
                    log.launches.append((self.name, tuple(numba.typeof(a) for a in args)))
                    return real[self.name][config](*args)
                return launch

        bucket.kernels = {name: Kernel(name) for name in real}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("hyper, expected", [
    (dict(check_finite=True), ["stats_kernel", "update_kernel"]),
    (dict(check_finite=False), ["update_kernel"]),
    (dict(check_finite=False, clipnorm=1.0), ["stats_kernel", "update_kernel"]),
    (dict(check_finite=False, global_clipnorm=1.0), ["stats_kernel", "update_kernel"]),
])
def test_one_update_launch_per_step_for_all_arrays(dtype, hyper, expected):
    """Five arrays, one bucket: at most a stats and an update launch per
    step, launched with exactly the signatures ``ptx`` compiles."""
    xs = to_device([np.ones(s, dtype) for s in [(3,), (2, 2), (KC.CHUNK * 3,), (1,), (0,)]])
    opt = eg.Expectigrad(xs, lr=0.1, **hyper)
    (bucket,) = opt._buckets
    log = LaunchLog(bucket)
    for _ in range(2):
        opt.step(to_device([np.ones(x.shape, dtype) for x in to_host(xs)]))
    assert [name for name, _ in log.launches] == expected * 2
    sigs = KC.signatures(dtype)
    for name, argtypes in log.launches:
        assert argtypes == tuple(sigs[name]), name


def test_no_synchronisation_without_check_finite(monkeypatch):
    """Without check_finite a step only queues work: no device-to-host copy,
    no wait.  With it, exactly one read-back of [bad, total]."""
    xs = to_device([np.ones(4), np.ones(3)])
    opt = eg.Expectigrad(xs, lr=0.1, check_finite=False, clipnorm=1.0)
    (bucket,) = opt._buckets
    calls = []
    monkeypatch.setattr(bucket.stream, "synchronize", lambda: calls.append("sync"),
                        raising=False)
    real_copy = bucket.d_result.copy_to_host
    bucket.d_result.copy_to_host = lambda *a, **k: calls.append("copy") or real_copy(*a, **k)
    grads = to_device([np.ones(4), np.ones(3)])
    opt.step(grads)
    assert calls == []
    opt.check_finite = True
    opt.step(grads)
    assert calls == ["copy", "sync"]


def test_per_step_table_upload_is_one_copy(monkeypatch):
    xs = to_device([np.ones(4), np.ones(3)])
    opt = eg.Expectigrad(xs, lr=0.1)
    (bucket,) = opt._buckets
    copies = []
    real = bucket.d_buffer.copy_to_device
    bucket.d_buffer.copy_to_device = lambda a, stream=0: copies.append(stream) or real(a, stream)
    for _ in range(3):
        opt.step(to_device([np.ones(4), np.ones(3)]))
    assert len(copies) == 3 and all(s is bucket.stream for s in copies)


# --- refused steps and skipped arrays -----------------------------------------------------

@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")   # simulated inf * 0
@pytest.mark.parametrize("dtypes", [[np.float64] * 3, [np.float32, np.float64, np.float32]])
@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf])
def test_non_finite_gradient_refuses_the_step(dtypes, bad_value):
    """Nothing changes, and the array named is the one the cpu backend names
    (the first in index order within a dtype, dtypes in order of appearance)."""
    rng = np.random.default_rng(0)
    xs = to_device([rng.standard_normal(KC.CHUNK * 2 + 1).astype(d) for d in dtypes])
    opt = eg.Expectigrad(xs, lr=0.1, clipnorm=1.0)
    grads = [rng.standard_normal(KC.CHUNK * 2 + 1).astype(d) for d in dtypes]
    opt.step(to_device(grads))
    before = snapshot(opt, xs)
    grads[1][KC.CHUNK + 3] = bad_value
    grads[2][0] = bad_value
    cpu = eg.Expectigrad([np.ones(g.shape, g.dtype) for g in grads], backend="cpu")
    with pytest.raises(FloatingPointError) as cpu_error:
        cpu.step(grads)
    with pytest.raises(FloatingPointError, match="holds NaN or infinity") as error:
        opt.step(to_device(grads))
    assert str(error.value) == str(cpu_error.value)
    assert_same(snapshot(opt, xs), before)
    assert opt.step_count == 1
    grads[1][KC.CHUNK + 3] = grads[2][0] = 0.5
    opt.step(to_device(grads))               # a later finite step goes through
    assert opt.state_dict()["state"][1]["step"] == 2


def test_non_finite_gradient_passes_through_without_check():
    x = cuda.to_device(np.ones(3))
    opt = eg.Expectigrad(x, lr=0.1, check_finite=False)
    opt.step(cuda.to_device(np.array([np.nan, 1.0, 0.0])))
    out = x.copy_to_host()
    assert np.isnan(out[0]) and out[1] < 1.0 and out[2] == 1.0


def test_none_gradient_skips_array_and_its_step_count():
    xs = to_device([np.ones(3), np.ones(2)])
    opt = eg.Expectigrad(xs, lr=0.1)
    opt.step([None, cuda.to_device(np.ones(2))])
    a, b = to_host(xs)
    np.testing.assert_array_equal(a, 1.0)
    assert np.all(b < 1.0)
    state = opt.state_dict()["state"]
    assert state[0]["step"] == 0 and state[1]["step"] == 1
    np.testing.assert_array_equal(state[0]["mean_sq"], 0.0)


def test_zero_d_and_empty_arrays():
    xs = to_device([np.array(2.0), np.zeros(0), np.zeros((2, 0))])
    opt = eg.Expectigrad(xs, lr=0.5, beta=0.0)
    opt.step(to_device([np.array(1.0), np.zeros(0), np.zeros((2, 0))]))
    assert to_host(xs)[0] == pytest.approx(1.5)
    opt2 = eg.Expectigrad(to_device([np.zeros(0)]), lr=0.5)
    opt2.step(to_device([np.zeros(0)]))


# --- device arrays ---------------------------------------------------------------------------

def test_auto_picks_cuda_and_params_are_device_views():
    w = InterfaceArray(np.zeros(4, np.float32))
    opt = eg.Expectigrad(w)
    assert opt.backend == "cuda" and "backend='cuda'" in repr(opt)
    assert not isinstance(opt.params[0], np.ndarray)
    opt.step(InterfaceArray(np.ones(4, np.float32)))   # bare array, bare gradient
    assert np.all(w.values() < 0)


def test_gradient_interface_stream_values_of_the_default_streams_need_no_wait(monkeypatch):
    waited = []
    monkeypatch.setattr(_cuda_bucket.CudaBucket, "_wait_for",
                        lambda self, stream: waited.append(stream))
    opt = eg.Expectigrad(InterfaceArray(np.zeros(4)))
    for stream in (None, 1, 2):
        opt.step(InterfaceArray(np.ones(4), stream=stream))
    assert waited == []
    opt.step(InterfaceArray(np.ones(4), stream=0x7F00))   # a foreign stream
    assert waited == [0x7F00]


# --- input errors: raised before anything changes ----------------------------------------

def test_mixing_host_and_device_parameters_is_refused():
    with pytest.raises(TypeError, match="param group 0 param 1 is a host numpy array"):
        eg.Expectigrad([cuda.to_device(np.ones(2)), np.ones(2)])
    with pytest.raises(TypeError, match="param group 0 param 0 is a host numpy array"):
        eg.Expectigrad([np.ones(2)], backend="cuda")
    with pytest.raises(TypeError, match="device array"):
        eg.Expectigrad([cuda.to_device(np.ones(2))], backend="cpu")


@pytest.mark.parametrize("make, exc, match", [
    (lambda: InterfaceArray(np.ones(3, np.int32)), TypeError, "dtype int32"),
    (lambda: InterfaceArray(np.ones(3), readonly=True), ValueError, "read-only"),
    (lambda: InterfaceArray(np.ones((3, 4))[:, ::2]), ValueError, "not C-contiguous"),
])
def test_bad_device_parameters(make, exc, match):
    with pytest.raises(exc, match=match):
        eg.Expectigrad([make()])


def test_overlapping_device_parameters():
    buf = np.ones(10)
    with pytest.raises(ValueError, match="share memory"):
        eg.Expectigrad(views(buf, [slice(0, 6), slice(4, 10)]))
    eg.Expectigrad(views(buf, [slice(0, 5), slice(5, 10)]))   # adjacent is fine


@pytest.mark.parametrize("grad, exc, match", [
    (lambda: np.ones(3), TypeError, "host ndarray, but its parameter is on the device"),
    (lambda: [1.0, 2.0, 3.0], TypeError, "host list"),
    (lambda: cuda.to_device(np.ones(3, np.float32)), TypeError, "dtype float32"),
    (lambda: cuda.to_device(np.ones(4)), ValueError, r"shape \(4,\)"),
    (lambda: InterfaceArray(np.ones(6)[::2]), ValueError, "not C-contiguous"),
])
def test_bad_gradients_change_nothing(grad, exc, match):
    xs = to_device([np.ones(2), np.ones(3)])
    opt = eg.Expectigrad(xs, lr=0.1)
    opt.step(to_device([np.ones(2), np.ones(3)]))
    before = snapshot(opt, xs)
    with pytest.raises(exc, match=match):
        opt.step([cuda.to_device(np.ones(2)), grad()])
    assert_same(snapshot(opt, xs), before)
    assert opt.step_count == 1


def test_device_gradients_given_as_one_array_for_many_parameters():
    opt = eg.Expectigrad(to_device([np.ones(2), np.ones(2)]))
    with pytest.raises(TypeError, match="sequence of gradients"):
        opt.step(cuda.to_device(np.ones(2)))


class RefusingInterface:
    """Like a PyTorch CUDA tensor that requires grad: it has the interface
    but raises when asked for it."""

    @property
    def __cuda_array_interface__(self):
        raise RuntimeError("Can't get __cuda_array_interface__ on Variable that requires grad")


def test_an_array_refusing_its_interface_is_explained():
    with pytest.raises(TypeError, match=r"param group 0 param 0 does not give its "
                                        r"__cuda_array_interface__: .*p.detach\(\)"):
        eg.Expectigrad([RefusingInterface()])
    opt = eg.Expectigrad([cuda.to_device(np.ones(2))])
    with pytest.raises(TypeError, match="the gradient of param group 0 param 0 does not give"):
        opt.step([RefusingInterface()])


class FailingLookups:
    """An object whose every attribute lookup fails with an error of its
    own (as a signal handler's exception raised during the lookup would)."""

    def __getattr__(self, name):
        raise RuntimeError(f"lookup of {name} failed")


def test_an_error_of_its_own_is_not_taken_for_a_refused_interface():
    # Only an object whose type defines the interface can be refusing it;
    # any other error propagates as it is.
    with pytest.raises(RuntimeError, match="lookup of __cuda_array_interface__ failed"):
        eg.Expectigrad([FailingLookups()])
    opt = eg.Expectigrad([np.ones(2), np.ones(3)])
    with pytest.raises(RuntimeError, match="lookup of __cuda_array_interface__ failed"):
        opt.step(FailingLookups())
    with pytest.raises(TypeError, match="step\\(\\) takes a sequence"):
        opt.step(RefusingInterface())


def test_host_cost_steps_without_launching_a_kernel(monkeypatch):
    """``eg.cuda.host_cost`` times the host side only: no kernel runs (the
    parameters do not move), and it reports a time per array count and the
    fit through them.  (Timings are not asserted: under load a fit through
    two of them came out negative, in both coefficients.)"""
    made = []

    def make(host):
        made.append(InterfaceArray(host))
        return made[-1]

    out = eg.cuda.host_cost(arrays=(1, 20), steps=5, repeats=1, make=make)
    assert set(out["us"]) == {1, 20} and all(v > 0 for v in out["us"].values())
    assert np.isfinite(out["per_array_us"]) and np.isfinite(out["fixed_us"])
    unmoved = [a for a in made if np.all(a.values() == 0)]
    assert len(unmoved) == 21                   # every parameter (1 + 20) still zero


def test_benchmark_runs():
    """The GPU benchmark's plumbing (its times mean nothing in the simulator)."""
    out = eg.cuda.benchmark(size=50, arrays=3, steps=1, repeats=1, check_finite=True)
    assert out["size"] == 50 and out["arrays"] == 3 and out["dtype"] == "float32"
    assert out["step_s"] > 0 and out["step_gbps"] > 0 and out["copy_gbps"] > 0
    assert eg.cuda.step_bytes(10, np.float32, beta=0.0, sparse_counter=False) == 10 * 4 * 5


# --- misaligned device memory, and the stream --------------------------------------

class _Misaligned(InterfaceArray):
    """An interface whose data address is one byte past an aligned buffer, as
    a byte-offset view of a device allocation would be."""

    @property
    def __cuda_array_interface__(self):
        cai = dict(super().__cuda_array_interface__)
        cai["data"] = (cai["data"][0] + 1, cai["data"][1])
        return cai


@simulator_only
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_misaligned_device_arrays_are_refused_and_change_nothing(dtype):
    """On hardware a misaligned load is CUDA_ERROR_MISALIGNED_ADDRESS (the
    context dies); the simulator would step it, so the check must refuse."""
    buf = np.zeros(9 * np.dtype(dtype).itemsize, np.uint8)
    with pytest.raises(ValueError, match="not a multiple of its itemsize"):
        eg.Expectigrad(_Misaligned(buf[:-np.dtype(dtype).itemsize].view(dtype)), lr=0.1)
    xs = to_device([np.ones(8, dtype)])
    opt = eg.Expectigrad(xs, lr=0.1)
    opt.step(to_device([np.ones(8, dtype)]))
    before = snapshot(opt, xs)
    with pytest.raises(ValueError, match="not a multiple of its itemsize"):
        opt.step([_Misaligned(buf[:-np.dtype(dtype).itemsize].view(dtype))])
    assert_same(before, snapshot(opt, xs))
    assert opt.step_count == 1


def test_steps_run_on_the_legacy_default_stream(monkeypatch):
    """Not cuda.default_stream(), which becomes the per-thread stream under
    CUDA_PYTHON_CUDA_PER_THREAD_DEFAULT_STREAM=1."""
    legacy = cuda.legacy_default_stream()
    monkeypatch.setattr(cuda, "legacy_default_stream", lambda: legacy)
    monkeypatch.setattr(cuda, "default_stream",
                        lambda: pytest.fail("cuda.default_stream() was used"))
    xs = to_device([np.ones(4)])
    opt = eg.Expectigrad(xs, lr=0.1)
    opt.step(to_device([np.ones(4)]))
    assert opt._buckets[0].stream is legacy


def _stub_stream(handle):
    """A stream as numba gives it (``handle.value``, ``synchronize``); the
    simulator runs everything in order whatever the stream."""
    return types.SimpleNamespace(handle=types.SimpleNamespace(value=handle),
                                 synchronize=lambda: None)


def test_stream_argument_runs_the_kernels_there_and_waits_for_other_streams(monkeypatch):
    """``Expectigrad(..., stream=s)``: every launch and copy on ``s``; a
    gradient exported on ``s`` (or with no stream) is not waited for, one on
    any other stream, the legacy default stream included, is."""
    ours = _stub_stream(0x7F00)
    waited, launched = [], []
    monkeypatch.setattr(_cuda_bucket.CudaBucket, "_wait_for",
                        lambda self, stream: waited.append(stream))
    w = InterfaceArray(np.zeros(4))
    opt = eg.Expectigrad(w, lr=0.1, stream=ours)
    bucket = opt._buckets[0]
    assert bucket.stream is ours

    class Recording:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, config):
            launched.append(config[2])
            return self.kernel[config[0], config[1]]

    bucket.kernels = {k: Recording(v) for k, v in bucket.kernels.items()}
    for stream in (0x7F00, None):
        opt.step(InterfaceArray(np.ones(4), stream=stream))
    assert waited == []
    for stream in (1, 2, 0x7E00):
        opt.step(InterfaceArray(np.ones(4), stream=stream))
    assert waited == [1, 2, 0x7E00]
    assert launched and all(s is ours for s in launched)
    assert np.all(w.values() < 0)


def test_stream_argument_takes_numba_cupy_torch_streams_and_handles(monkeypatch):
    made = []
    legacy, per_thread = _stub_stream(1), _stub_stream(2)
    monkeypatch.setattr(cuda, "legacy_default_stream", lambda: legacy)
    monkeypatch.setattr(cuda, "per_thread_default_stream", lambda: per_thread)
    monkeypatch.setattr(cuda, "external_stream",
                        lambda handle: made.append(handle) or _stub_stream(handle))
    as_stream = _cuda_bucket.as_stream
    numba_stream = _stub_stream(0x5000)
    assert as_stream(numba_stream) is numba_stream
    assert as_stream(types.SimpleNamespace(ptr=0x6000)).handle.value == 0x6000       # CuPy
    assert as_stream(types.SimpleNamespace(cuda_stream=0x7000)).handle.value == 0x7000
    assert as_stream(np.int64(0x8000)).handle.value == 0x8000
    assert made == [0x6000, 0x7000, 0x8000]
    assert as_stream(None) is legacy and as_stream(0) is legacy and as_stream(1) is legacy
    assert as_stream(2) is per_thread
    for bad, error in (("s", TypeError), (True, TypeError), (1.5, TypeError),
                       (-3, ValueError)):
        with pytest.raises(error, match="stream"):
            as_stream(bad)


def test_stream_argument_is_refused_on_host_backends_and_bad_streams_change_nothing():
    with pytest.raises(ValueError, match="stream= is for the cuda backend"):
        eg.Expectigrad(np.zeros(3), stream=0x7F00)
    with pytest.raises(TypeError, match="stream must be a numba, CuPy or torch"):
        eg.Expectigrad(InterfaceArray(np.zeros(3)), stream="default")


def test_torch_gradients_are_waited_for_on_torchs_current_stream(monkeypatch):
    """torch tensors export version 2 of the array interface, with no stream:
    the step waits on torch's current stream for them (a stub torch module
    here; the same calls on real torch CUDA tensors) and records its own
    stream's use of them with the caching allocator."""
    import sys
    import types

    class Tensor(InterfaceArray):
        device = "cuda:0"

        def __init__(self, host):
            super().__init__(host, stream=None)
            self.recorded = []

        def record_stream(self, stream):
            self.recorded.append(stream)

        @property
        def __cuda_array_interface__(self):
            cai = dict(super().__cuda_array_interface__)
            cai.pop("stream")
            cai["version"] = 2
            return cai

    side = types.SimpleNamespace(cuda_stream=0x7F00)
    fake = types.ModuleType("torch")
    fake.Tensor = Tensor
    fake.cuda = types.SimpleNamespace(current_stream=lambda device: side,
                                      default_stream=lambda device: "torch default",
                                      ExternalStream=lambda handle, device: ("ext", handle))
    monkeypatch.setitem(sys.modules, "torch", fake)
    waited = []
    monkeypatch.setattr(_cuda_bucket.CudaBucket, "_wait_for",
                        lambda self, stream: waited.append(stream))
    xs = to_device([np.zeros(4)])
    opt = eg.Expectigrad(xs, lr=0.1)
    g = Tensor(np.ones(4))
    opt.step([g])
    assert waited == [0x7F00]
    assert len(g.recorded) == 1
    np.testing.assert_allclose(to_host(xs)[0], -0.1)
    side.cuda_stream = 0                       # torch on the legacy default stream
    opt.step([Tensor(np.ones(4))])
    assert waited == [0x7F00]                  # no wait needed
