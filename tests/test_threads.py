"""Independent optimizers stepped in parallel threads give the same bits as
stepped one after another.  (One optimizer must not be stepped from two
threads at once.)"""
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

import expectigrad_np as eg
from expectigrad_np.backends.cpu.backend import PARALLEL_MIN_SIZE

N_THREADS = 4
STEPS = 15


def job(seed, backend):
    """Build one optimizer and the gradient stream it will see."""
    rng = np.random.default_rng(seed)
    dtype = (np.float32, np.float64)[seed % 2]
    sizes = [(17, 3), (1000,), ()] if seed % 3 else [(PARALLEL_MIN_SIZE + 5,), (4, 4)]
    params = [rng.standard_normal(s).astype(dtype) for s in sizes]
    opt = eg.Expectigrad(params, lr=0.01, beta=0.9 if seed % 2 else 0.0,
                         clipnorm=5.0 if seed % 4 == 1 else None,
                         global_clipnorm=20.0 if seed % 4 == 2 else None,
                         backend=backend)
    stream = [[rng.standard_normal(s).astype(dtype) for s in sizes]
              for _ in range(STEPS)]
    return opt, params, stream


def run_job(opt, stream, barrier=None):
    for g in stream:
        if barrier is not None:
            barrier.wait()                    # all threads step at the same time
        opt.step(g)


def results(jobs):
    return [([p.copy() for p in params], opt.state_dict()) for opt, params, _ in jobs]


def assert_same(a, b):
    for (pa, sa), (pb, sb) in zip(a, b):
        for x, y in zip(pa, pb):
            assert x.tobytes() == y.tobytes()
        for i, e in sa["state"].items():
            for k, v in e.items():
                assert np.asarray(v).tobytes() == np.asarray(sb["state"][i][k]).tobytes()


@pytest.mark.parametrize("backend", ["cpu", "numpy"])
def test_parallel_threads_match_sequential(backend):
    seeds = range(2 * N_THREADS)
    sequential = [job(s, backend) for s in seeds]
    for opt, _, stream in sequential:
        run_job(opt, stream)

    threaded = [job(s, backend) for s in seeds]
    barrier = threading.Barrier(len(threaded))
    errors = []

    def target(opt, stream):
        try:
            run_job(opt, stream, barrier)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=target, args=(opt, stream))
               for opt, _, stream in threaded]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    assert_same(results(threaded), results(sequential))


def test_rejected_steps_in_threads_stay_local():
    """A thread whose gradient holds NaN gets FloatingPointError; the
    optimizers of the other threads are not disturbed."""
    jobs = [job(s, "cpu") for s in range(N_THREADS)]
    reference = [job(s, "cpu") for s in range(N_THREADS)]
    for opt, _, stream in reference:
        run_job(opt, stream)
    bad_stream = [[g.copy() for g in step] for step in jobs[0][2]]
    bad_stream[3][0].flat[0] = np.nan
    caught = []

    def target(k):
        opt, _, stream = jobs[k]
        for i, g in enumerate(bad_stream if k == 0 else stream):
            try:
                opt.step(g)
            except FloatingPointError:
                caught.append(i)

    threads = [threading.Thread(target=target, args=(k,)) for k in range(N_THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert caught == [3]
    assert_same(results(jobs[1:]), results(reference[1:]))


_SUBPROCESS = """
import threading, numpy as np, numba, expectigrad_np as eg
def work(seed, out):
    rng = np.random.default_rng(seed)
    x = np.zeros({size}, np.float32)
    opt = eg.Expectigrad([x], lr=0.01)
    for _ in range(5):
        opt.step([rng.standard_normal(x.size).astype(np.float32)])
    out[seed] = x
seq, par = {{}}, {{}}
for s in range(4):
    work(s, seq)
ts = [threading.Thread(target=work, args=(s, par)) for s in range(4)]
[t.start() for t in ts]; [t.join() for t in ts]
assert numba.threading_layer() == "workqueue", numba.threading_layer()
assert all(seq[s].tobytes() == par[s].tobytes() for s in range(4))
print("ok")
"""


def test_parallel_kernels_from_threads_with_workqueue_layer():
    """Numba's workqueue layer aborts the process on concurrent parallel
    launches; large arrays stepped from several threads must not trigger it."""
    env = dict(os.environ, NUMBA_THREADING_LAYER="workqueue", NUMBA_NUM_THREADS="2")
    code = _SUBPROCESS.format(size=PARALLEL_MIN_SIZE * 2)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "ok"


_WHICH_KERNEL = """
import sys, numpy as np, numba
from expectigrad_np.backends import layout as _layout
from expectigrad_np.backends.cpu import kernels as K
x = np.zeros(1 << 16, np.float32); g = np.ones_like(x)
v, m, n = np.zeros_like(x), np.zeros_like(x), np.zeros(x.size, np.uint32)
seg, lo, hi = _layout.make_chunks([x.size])
coef = np.array([[1e-3, .9, .1, 1e-8, 1., np.inf, np.inf, 1.]], np.float32)
flags = np.zeros((1, len(_layout.FLAG_FIELDS)), np.int64)     # a whole flag row
flags[0, [_layout.ACTIVE, _layout.SPARSE, _layout.MOMENTUM, _layout.T]] = 1
kernel = K.segments_step_parallel if sys.argv[1] == "parallel" else K.segments_step
kernel(np.array([K.data_address(x)]), np.array([K.data_address(g)]),
       np.array([0, x.size]), seg, lo, hi, v, n, m, coef, flags,
       True, np.inf, 0.0, True)
try:
    print(numba.threading_layer())
except ValueError:
    print("serial")
"""


@pytest.mark.slow
def test_serial_and_parallel_kernels_do_not_share_a_cache_entry(tmp_path):
    """Compiled into one cache directory one after the other, each variant
    must still run as itself (a shared entry made the 'parallel' kernel run
    serially, or the serial one launch threads, depending on which compiled
    first)."""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path), NUMBA_NUM_THREADS="2")

    def run(which):
        proc = subprocess.run([sys.executable, "-c", _WHICH_KERNEL, which], env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc.stdout.strip()

    assert run("serial") == "serial"
    assert run("parallel") != "serial"
    assert run("serial") == "serial"


@pytest.mark.parametrize("backend", ["cpu", "numpy"])
def test_an_edit_made_while_a_step_takes_in_the_last_one_is_not_lost(backend):
    # Another thread's edit landing while a step recomputes the groups'
    # hyperparameters (simulated by making it there): the next step takes it.
    x, y = np.zeros(3), np.zeros(3)
    g = np.array([1.0, -2.0, 0.5])
    opt = eg.Expectigrad([x], lr=0.1, backend=backend)
    opt.param_groups[0]["lr"] = 0.2
    recompute = opt._recompute_hyper

    def edited_meanwhile():
        recompute()
        opt.param_groups[0]["lr"] = 0.5
    opt._recompute_hyper = edited_meanwhile
    opt.step([g])
    del opt._recompute_hyper
    opt.step([g])
    ref = eg.Expectigrad([y], lr=0.2, backend=backend)
    ref.step([g])
    ref.param_groups[0]["lr"] = 0.5
    ref.step([g])
    np.testing.assert_array_equal(x, y)


_FIRST_OPTIMIZERS = """
import threading, numpy as np, expectigrad_np as eg
errors, start = [], threading.Barrier(4)
def run(k):
    try:
        xs = [np.zeros(1000)] if k % 2 else [np.zeros(10, np.float32), np.zeros(3)]
        start.wait()
        opt = eg.Expectigrad(xs, lr=0.01)
        for _ in range(3):
            opt.step([np.ones_like(x) for x in xs])
    except Exception as exc:
        errors.append(f"{type(exc).__name__}: {exc}")
threads = [threading.Thread(target=run, args=(k,)) for k in range(4)]
for t in threads: t.start()
for t in threads: t.join()
print("errors:", errors)
"""


def test_the_first_optimizers_of_a_process_built_in_threads_at_once():
    # Each thread's optimizer asks for the same kernels at the same moment (in a
    # fresh process, none made yet): every one gets them, none raises.
    out = subprocess.run([sys.executable, "-c", _FIRST_OPTIMIZERS], check=True,
                         capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    assert "errors: []" in out.stdout, out.stdout + out.stderr[-2000:]


_HANDLER_STEPS = """
import signal, numpy as np, expectigrad_np as eg
def handler(sig, frame):
    x = np.zeros(1000, np.float32)
    eg.Expectigrad([x], lr=0.1).step([np.ones(1000, np.float32)])
    print("handler stepped", x[0], flush=True)
signal.signal(signal.SIGALRM, handler)
signal.setitimer(signal.ITIMER_REAL, 1.0)       # while the first kernel compiles
x = np.zeros(1000, np.float32)
eg.Expectigrad([x], lr=0.1).step([np.ones(1000, np.float32)])
print("main stepped", x[0], flush=True)
"""


@pytest.mark.slow
def test_a_signal_handler_that_steps_while_the_same_kernel_compiles(tmp_path):
    # The handler's step asks for the kernel the interrupted step is compiling
    # (an empty cache, compiled in the process): both steps finish.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path),
               NUMBA_CACHE_DIR=str(tmp_path), EXPECTIGRAD_NP_COMPILE="wait")
    out = subprocess.run([sys.executable, "-c", _HANDLER_STEPS], capture_output=True,
                         text=True, timeout=900, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "handler stepped -0.1" in out.stdout and "main stepped -0.1" in out.stdout, (
        out.stdout)
