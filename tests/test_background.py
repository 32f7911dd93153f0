"""Kernels compiled in the background (``backends/background.py``): the
steps taken by the reference meanwhile give the kernels' bits, the switch
happens once the kernel is cached, and a child that does not deliver
costs an in-process compile, never a wrong or lost step."""
import json
import os
import subprocess
import sys
import tempfile

import numba
import numpy as np
import pytest

import expectigrad_np as eg
from expectigrad_np.backends import background
from expectigrad_np.backends.cpu import kernels as K
from expectigrad_np.backends.cpu import loading

# The background compile is on where the cache-loading shortcut is (numba
# versions cpu/loading.py was checked against); elsewhere every kernel is
# compiled in the process, which the rest of the suite tests.
needs_background = pytest.mark.skipif(
    not loading.enabled(), reason=f"numba {numba.__version__}: kernels are "
    "compiled in the process (background compile only on checked numba versions)")


def _gradients(dtype, shapes, steps, seed):
    """Gradients with exact zeros on some steps (the sparse counter's
    uniform loop starts, and stops, on them) and one all-zero step."""
    rng = np.random.default_rng(seed)
    out = []
    for t in range(steps):
        gs = [rng.standard_normal(s).astype(dtype) for s in shapes]
        if t in (3, 7):
            for g in gs:
                g.reshape(-1)[::3] = 0
        if t == 5:
            gs = [np.zeros_like(g) for g in gs]
        out.append(gs)
    return out


CONFIGS = [
    dict(),
    dict(beta=0.0),
    dict(sparse_counter=False),
    dict(weight_decay=0.1, maximize=True),
    dict(clipnorm=0.5),
    dict(clipvalue=0.5),
]


@pytest.fixture
def held(monkeypatch):
    """Background mode with every kernel not yet compiled in this process
    pending (fresh dispatchers), no child started; yields a function that
    lets them land (loaded from the cache the wait-mode run filled)."""
    monkeypatch.setenv("EXPECTIGRAD_NP_COMPILE", "background")
    monkeypatch.setattr(K, "_BUCKET_STEP", {})
    monkeypatch.setattr(K, "_MADE", {})
    monkeypatch.setattr(background, "_held", True)

    def release():
        background._held = False
        background._ended += 1      # as when a child ends: optimizers ask again
    yield release


@needs_background
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: ",".join(c) or "default")
def test_steps_while_compiling_give_the_kernels_bits(held, dtype, config):
    shapes = [(40, 3), (7,)]
    grads = _gradients(dtype, shapes, 12, seed=1)

    def run(switch_at):
        xs = [np.linspace(-1, 1, int(np.prod(s)), dtype=dtype).reshape(s) for s in shapes]
        opt = eg.Expectigrad(xs, lr=0.05, **config)
        routes = []
        for t, gs in enumerate(grads):
            if t == switch_at:
                held()
            opt.step(gs)
            routes.append(opt._fast is not None)
        return xs, opt.state_dict(), routes

    background._held = False
    os.environ["EXPECTIGRAD_NP_COMPILE"] = "wait"
    want, want_state, want_routes = run(switch_at=None)     # compiled first, cached
    assert all(want_routes)
    os.environ["EXPECTIGRAD_NP_COMPILE"] = "background"
    for switch_at in (1, 4, 6, 9):
        K._BUCKET_STEP.clear()
        K._MADE.clear()
        background._held = True
        got, got_state, routes = run(switch_at)
        # The reference took the steps before the switch, the kernel after;
        # norm clipping waits for its kernel (the reference's squared norm
        # is summed in another order).
        waits = "clipnorm" in config
        assert routes == [waits or t >= switch_at for t in range(len(grads))]
        for a, b in zip(got, want):
            np.testing.assert_array_equal(a, b)
        assert got_state["state"].keys() == want_state["state"].keys()
        for i, s_want in want_state["state"].items():
            for name, value in s_want.items():
                np.testing.assert_array_equal(got_state["state"][i][name], value,
                                              err_msg=f"{i} {name}")


@needs_background
def test_a_wrong_reference_step_is_caught(held, monkeypatch):
    """The comparison above fails when the steps taken meanwhile are not
    the kernels' (the uniform-count flag left set after a zero gradient)."""
    from expectigrad_np.backends.cpu import backend as B
    monkeypatch.setattr(B._ReferenceTwin, "step", B.NumpyBucket.step)
    dtype, shapes = np.float32, [(40, 3)]
    grads = _gradients(dtype, shapes, 8, seed=2)

    def run(hold):
        x = np.ones(shapes[0], dtype)
        opt = eg.Expectigrad([x], lr=0.05)
        for t, gs in enumerate(grads):
            if t == 5 and hold:
                held()
            opt.step(gs)
        return x

    background._held = False
    os.environ["EXPECTIGRAD_NP_COMPILE"] = "wait"
    want = run(False)
    os.environ["EXPECTIGRAD_NP_COMPILE"] = "background"
    K._BUCKET_STEP.clear()
    K._MADE.clear()
    background._held = True
    assert not np.array_equal(run(True), want)


_COLD = r"""
import json, sys, numpy as np
import expectigrad_np as eg
from expectigrad_np.backends import background
if sys.argv[1] == "fail":
    background._CHILD = "import sys; sys.exit(3)"      # a child that delivers nothing
if sys.argv[1] == "hang":
    background._CHILD = "import time; time.sleep(3600)"   # a child that never ends
    background.CHILD_TIMEOUT = 1.0
x = np.zeros(10, np.float32)
opt = eg.Expectigrad(x, lr=0.1)
g = np.linspace(-1, 1, 10).astype(np.float32)
opt.step(g)
first = dict(route=opt._fast is not None, pending=background.pending())
assert background.wait_all(timeout=600)
opt.step(g)
print(json.dumps(dict(first=first, then=opt._fast is not None, x=x.tolist(),
                      children=background.finished())))
"""


@needs_background
@pytest.mark.slow
@pytest.mark.parametrize("child", ["compiles", "fail", "hang"])
def test_cold_cache_first_step_does_not_wait(child):
    """A fresh cache: the first step is the reference's and a child
    compiles; once it has, the kernel takes over.  A child that ends
    without the kernel in the cache, or is stopped after
    ``CHILD_TIMEOUT``: the process compiles it itself."""
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache, EXPECTIGRAD_NP_COMPILE="background",
                   PYTHONPATH=os.pathsep.join(sys.path))
        out = subprocess.run([sys.executable, "-c", _COLD, child], env=env,
                             capture_output=True, text=True, timeout=900)
        assert out.returncode == 0, out.stderr
        row = json.loads(out.stdout.strip().splitlines()[-1])
        names = os.listdir(cache) if child == "compiles" else []
    assert row["first"] == {"route": False, "pending": 1}
    assert row["then"] is True
    assert row["children"] == 1
    if child == "compiles":
        assert names, "the child left nothing in the cache"
    want = np.zeros(10, np.float32)
    opt = eg.Expectigrad(want, lr=0.1)
    g = np.linspace(-1, 1, 10).astype(np.float32)
    opt.step(g)
    opt.step(g)
    np.testing.assert_array_equal(np.asarray(row["x"], np.float32), want)


def test_wait_mode_and_bad_values(monkeypatch):
    monkeypatch.setenv("EXPECTIGRAD_NP_COMPILE", "later")
    with pytest.raises(ValueError, match="EXPECTIGRAD_NP_COMPILE must be"):
        background.mode()
    monkeypatch.setenv("EXPECTIGRAD_NP_COMPILE", "WAIT")
    assert background.mode() == "wait"
    x = np.zeros(3)
    opt = eg.Expectigrad(x)
    opt.step(np.ones(3))
    assert opt._fast is not None and background.pending() == 0


@needs_background
def test_an_interrupt_while_taking_the_route_does_not_lose_it(held, monkeypatch):
    """A KeyboardInterrupt raised while a step takes up the kernel that has
    just become ready leaves the optimizer asking again: the next step takes
    the compiled route."""
    x = np.zeros(5)
    opt = eg.Expectigrad(x, lr=0.1)
    opt.step(np.ones(5))
    assert opt._fast is None
    real = background._load_cached
    calls = []

    def interrupted(*args):
        calls.append(1)
        monkeypatch.setattr(background, "_load_cached", real)
        raise KeyboardInterrupt

    monkeypatch.setattr(background, "_load_cached", interrupted)
    held()
    with pytest.raises(KeyboardInterrupt):
        opt.step(np.ones(5))
    assert calls and opt._fast is None
    opt.step(np.ones(5))
    assert opt._fast is not None
    want = np.zeros(5)
    ref = eg.Expectigrad(want, lr=0.1, backend="numpy")
    for _ in range(2):                  # the interrupted step changed nothing
        ref.step(np.ones(5))
    np.testing.assert_array_equal(x, want)


_EXIT = r"""
import numpy as np
import expectigrad_np as eg
from expectigrad_np.backends import background
background._CHILD = "import time; time.sleep(2)"      # still at work at exit
opt = eg.Expectigrad(np.zeros(3), lr=0.1)
opt.step(np.ones(3))
assert background.pending() == 1
"""


@needs_background
def test_exit_while_a_child_compiles_is_clean():
    """The process exits at once, with rc 0 and no warning; the child is
    left to finish (it fills the cache for the next process)."""
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache, EXPECTIGRAD_NP_COMPILE="background",
                   PYTHONPATH=os.pathsep.join(sys.path))
        out = subprocess.run([sys.executable, "-X", "dev", "-W", "error", "-c", _EXIT],
                             env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "ResourceWarning" not in out.stderr and "Exception ignored" not in out.stderr, \
        out.stderr
