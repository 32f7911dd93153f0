"""Fresh processes load the cached kernels without refreshing numba's whole
CPU target (``expectigrad_np/kernels/loading.py``), and what they load gives
the NumPy backend's bits."""
import json
import os
import subprocess
import sys
import textwrap
import types

import pytest

from expectigrad_np.backends.cpu import loading

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Every kernel called from Python, each on its own path, against the NumPy
# backend; then what the process compiled, loaded and imported.
_CHILD = textwrap.dedent("""
    import json, sys
    import numpy as np
    import expectigrad_np as eg
    from expectigrad_np.backends.cpu import backend as _buckets
    from expectigrad_np.backends.cpu import kernels as K, loading, locate

    def run(backend, dtype):
        rng = np.random.default_rng(7)
        big = _buckets.PARALLEL_MIN_SIZE + 5
        cases = [
            ([10], {}, lambda g: g),                         # bucket_step, GIL held
            ([5000], {}, lambda g: g),                     # bucket_step, GIL released
            ([12], {"clipvalue": 0.5}, lambda g: g[::-1]),   # array_step, data_address
            ([300, 7, 40], {"check_finite": True, "clipvalue": 1.0}, lambda g: g),
            ([big, 3], {}, lambda g: g),                              # parallel
        ]
        out = []
        for sizes, options, view in cases:
            xs = [rng.standard_normal(n).astype(dtype) for n in sizes]
            opt = eg.Expectigrad(xs if len(xs) > 1 else xs[0], lr=0.1,
                                 backend=backend, **options)
            for t in range(3):
                gs = [view(rng.standard_normal(2 * n).astype(dtype)[:n].copy())
                      for n in sizes]
                gs[0][::5] = 0
                opt.step(gs if len(gs) > 1 else gs[0])
            out += xs
        return out

    same = True
    for dtype in (np.float32, np.float64):
        ours, reference = run("cpu", dtype), run("numpy", dtype)
        same = same and all(np.array_equal(a, b) for a, b in zip(ours, reference))
    # Every kernel the steps above used: the variants' entry points (only
    # the loops those arrays take) and the single-array ones.
    kernels = {"data_address": K.data_address, "locate_arrays": locate.locate_arrays}
    for mask, v in K._VARIANTS.items():
        for name in ("array_step", "segments_step", "segments_step_parallel"):
            kernels[f"{name}_{mask:x}"] = getattr(v, name)
    for (dtype, hold_gil, parallel, mask), d in K._BUCKET_STEP.items():
        kernels[f"bucket_step_{dtype.name}_{hold_gil}_{parallel}_{mask:x}"] = d
    kernels = {k: d for k, d in kernels.items()
               if sum(d.stats.cache_hits.values()) + sum(d.stats.cache_misses.values())}
    print(json.dumps(dict(
        same=same,
        hits={k: sum(d.stats.cache_hits.values()) for k, d in kernels.items()},
        misses={k: sum(d.stats.cache_misses.values()) for k, d in kernels.items()},
        loads=loading.loads, enabled=loading.enabled(),
        imported=[m for m in ("scipy.linalg", "numba.np.linalg", "numba.np.arraymath")
                  if m in sys.modules])))
""")


def _child(**env):
    out = subprocess.run([sys.executable, "-c", _CHILD], cwd=ROOT, capture_output=True,
                         text=True, timeout=900, env={**os.environ, **env})
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def warm_cache():
    """A first process fills the on-disk cache (compiling what is missing)."""
    return _child(EXPECTIGRAD_NP_FULL_REFRESH="1")


def test_a_fresh_process_loads_every_kernel_without_the_refresh(warm_cache):
    result = _child(EXPECTIGRAD_NP_FULL_REFRESH="")
    assert result["same"], "kernels loaded this way differ from the NumPy backend"
    used = {name.rsplit("_", 1)[0] for name in result["hits"]}
    for entry in ("array_step", "bucket_step_float32_True_False",
                  "bucket_step_float64_False_False", "bucket_step_float32_False_True"):
        assert entry in used, (entry, sorted(result["hits"]))
    assert all(result["hits"].values()), result["hits"]          # each one loaded
    assert not any(result["misses"].values()), result["misses"]  # none compiled
    if not result["enabled"]:
        # A numba this was not checked against: the usual loading, untouched.
        assert result["loads"] == {"without_refresh": 0, "fallback": 0}
        return
    assert result["loads"] == {"without_refresh": sum(result["hits"].values()), "fallback": 0}
    assert result["imported"] == []


def test_the_variable_restores_numbas_own_loading(warm_cache):
    """``EXPECTIGRAD_NP_FULL_REFRESH=1``: numba refreshes its target on the
    first load as usual, importing its compiling modules (and scipy.linalg),
    which the test above checks are not imported."""
    result = warm_cache
    assert result["same"]
    assert not result["enabled"]
    assert result["loads"] == {"without_refresh": 0, "fallback": 0}
    assert {"scipy.linalg", "numba.np.linalg", "numba.np.arraymath"} <= set(
        result["imported"])


def test_enabled_only_for_checked_numba_versions(monkeypatch):
    monkeypatch.delenv("EXPECTIGRAD_NP_FULL_REFRESH", raising=False)
    monkeypatch.setattr(loading.numba, "__version__", "0.68.1")
    assert loading.enabled() == ((0, 68) in loading.CHECKED_NUMBA)
    monkeypatch.setattr(loading.numba, "__version__", "99.1.0")
    assert not loading.enabled()
    monkeypatch.setattr(loading.numba, "__version__", "0.68.0")
    monkeypatch.setenv("EXPECTIGRAD_NP_FULL_REFRESH", "1")
    assert not loading.enabled()


class _FakeCache:
    """Stands in for numba's cache object: records which way it was asked."""

    def __init__(self, fail):
        self.fail, self.calls = fail, []

    def _guard_against_spurious_io_errors(self):
        import contextlib
        return contextlib.nullcontext()

    def _load_overload(self, sig, ctx):
        self.calls.append(("without_refresh", sig))
        if self.fail:
            raise RuntimeError("unreadable cache entry")
        return "loaded"

    def load_overload(self, sig, ctx):
        self.calls.append(("full", sig))
        return "loaded the usual way"


@pytest.mark.parametrize("fail", [False, True])
def test_a_failed_load_falls_back_to_numbas_own(monkeypatch, fail):
    monkeypatch.setattr(loading, "enabled", lambda: True)
    monkeypatch.setattr(loading, "loads", {"without_refresh": 0, "fallback": 0})
    cache = _FakeCache(fail)
    dispatcher = types.SimpleNamespace(_cache=cache)
    assert loading.load_without_refresh(dispatcher) is dispatcher
    got = cache.load_overload("sig", None)
    if fail:
        assert got == "loaded the usual way"
        assert cache.calls == [("without_refresh", "sig"), ("full", "sig")]
        assert loading.loads == {"without_refresh": 0, "fallback": 1}
    else:
        assert got == "loaded"
        assert cache.calls == [("without_refresh", "sig")]
        assert loading.loads == {"without_refresh": 1, "fallback": 0}


def test_dispatchers_without_a_cache_are_left_alone(monkeypatch):
    monkeypatch.setattr(loading, "enabled", lambda: True)
    cache = types.SimpleNamespace(load_overload=lambda sig, ctx: None)   # NullCache-like
    dispatcher = types.SimpleNamespace(_cache=cache)
    before = cache.load_overload
    loading.load_without_refresh(dispatcher)
    assert cache.load_overload is before
