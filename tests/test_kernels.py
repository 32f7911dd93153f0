"""Properties of the compiled CPU kernels themselves."""
import re

import numba
import numpy as np
import pytest

from expectigrad_np.backends import layout as _layout
from expectigrad_np.backends.cpu import kernels as cpu
from expectigrad_np.backends.cpu import loops as _loops

# (sparse counter, momentum) of the four update loops of _loops._update_general
UPDATE_LOOPS = [(True, True), (True, False), (False, True), (False, False)]


def uncached(dispatcher):
    """The same function compiled with the same options but without the on-disk
    cache (numba does not let one inspect code loaded from its cache)."""
    options = {k: v for k, v in dispatcher.targetoptions.items()
               if k not in ("cache", "nopython")}
    return numba.njit(**options)(dispatcher.py_func)
DOUBLE_MATH = re.compile(r"\b(fadd|fsub|fmul|fdiv|fpext)\b[^\n]*\bdouble\b|fpext float")


def _loop_kernel(sparse, momentum, clipping):
    """An uncached kernel running one update loop of ``_loops._update_general``
    with its flags constants, as ``cpu._update_loops`` calls it (each loop is
    inlined and compiled per constant)."""
    general = _loops._update_general
    env = {"general": general}
    src = (f"def call(x, g, v, n, m, c, scale, h):\n"
           f"    general(x, g, v, n, m, c, scale, h, {clipping}, {sparse}, {momentum})\n")
    exec(src, env)
    return numba.njit(nogil=True, error_model="numpy")(env["call"])


def _compiled_ir(dtype):
    """LLVM IR of each update loop compiled on its own for ``dtype``, with the
    argument types the kernels pass (state arrays of the dtype, a dtype scale,
    a uint32 hash), clipped and unclipped."""
    x, g, v, m = (np.ones(8, dtype) for _ in range(4))
    n = np.zeros(8, np.uint32)
    c = np.array([0.01, 0.9, 0.1, 1e-8, 1.0, np.inf, np.inf, 1.0], dtype)
    scale = dtype(1.0)
    h = np.uint32(12345)
    irs = {}
    for clipping in (True, False):
        for sparse, momentum in UPDATE_LOOPS:
            fresh = _loop_kernel(sparse, momentum, clipping)
            fresh(x, g, v, n, m, c, scale, h)
            irs[sparse, momentum, clipping] = "\n".join(fresh.inspect_llvm().values())
    return irs


@pytest.mark.slow
def test_float32_update_loops_do_no_double_arithmetic():
    irs = _compiled_ir(np.float32)
    assert len(irs) == 2 * len(UPDATE_LOOPS)
    for name, ir in irs.items():
        assert "fmul float" in ir, name
        assert not DOUBLE_MATH.search(ir), f"{name} promotes float32 to double"


@pytest.mark.slow
def test_double_arithmetic_detector_fires_on_float64():
    """The check above can fail: the float64 loops do double arithmetic."""
    irs = _compiled_ir(np.float64)
    assert all(DOUBLE_MATH.search(ir) for ir in irs.values())


@pytest.mark.slow
def test_update_loops_vectorise():
    """error_model="numpy" and branch-free selects let LLVM emit SIMD loops."""
    irs = _compiled_ir(np.float32)
    for name, ir in irs.items():
        assert re.search(r"<\d+ x float>", ir), f"{name} did not vectorise"


@pytest.mark.slow
def test_update_loops_prefetch():
    """Every update loop asks for the blocks ahead (``llvm.prefetch``)."""
    irs = _compiled_ir(np.float32)
    for name, ir in irs.items():
        assert "@llvm.prefetch" in ir, f"{name} does not prefetch"


def test_kernels_are_cached_and_release_the_gil():
    for fn in [cpu.array_step, cpu.segments_step, cpu.segments_step_parallel,
               _loops._update_general, _loops._prefetch_block]:
        assert fn.targetoptions.get("nogil") is True
        assert fn._cache.__class__.__name__ == "FunctionCache"


def test_make_chunks_covers_every_element_once():
    sizes = [0, 5, _layout.CHUNK, _layout.CHUNK + 1, 3 * _layout.CHUNK - 7]
    seg, lo, hi = _layout.make_chunks(sizes)
    covered = [np.zeros(s, int) for s in sizes]
    for k, a, b in zip(seg, lo, hi):
        assert 0 <= a < b <= sizes[k] and b - a <= _layout.CHUNK
        covered[k][a:b] += 1
    assert all(np.all(c == 1) for c in covered)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_serial_and_parallel_segment_kernels_agree_bitwise(dtype):
    rng = np.random.default_rng(0)
    sizes = [3, _layout.CHUNK + 17, 0, 1000]
    results = []
    for kernel in (cpu.segments_step, cpu.segments_step_parallel):
        xs = [np.linspace(-1, 1, s).astype(dtype) for s in sizes]
        total = sum(sizes)
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        v, n, m = np.zeros(total, dtype), np.zeros(total, np.uint32), np.zeros(total, dtype)
        coef = np.tile(np.array([0.01, 0.9, 0.1, 1e-8, 1.0, 0.5, 3.0, 1.0], dtype), (len(sizes), 1))
        flags = np.ones((len(sizes), len(_layout.FLAG_FIELDS)), np.int64)
        flags[:, _layout.T] = 0             # counts 0 = step count 0: uniform
        flags[:, [_layout.LAZY, _layout.HELD]] = 0      # counts stored
        seg, lo, hi = _layout.make_chunks(sizes)
        x_addr = np.array([cpu.data_address(x) if x.size else 0 for x in xs], np.int64)
        rng = np.random.default_rng(1)
        for _ in range(3):
            gs = [rng.standard_normal(s).astype(dtype) for s in sizes]
            g_addr = np.array([cpu.data_address(g) if g.size else 0 for g in gs], np.int64)
            flags[:, _layout.T] += 1
            bad, _ = kernel(x_addr, g_addr, offsets, seg, lo, hi, v, n, m, coef, flags,
                            True, 5.0, 0.0, True)
            assert bad == -1
        results.append([x.copy() for x in xs])
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)



@pytest.mark.parametrize("dtype, bits, quiet", [(np.float32, np.uint32, 0x7FC00000),
                                                (np.float64, np.uint64, 0x7FF8000000000000)])
@pytest.mark.parametrize("m", [1, 17, 2047, 2049, 5000])
def test_the_mpi_mean_has_numpys_bits_nan_included(dtype, bits, quiet, m):
    """``mean_over_ranks`` (mpi.py's rank-order mean) against NumPy's
    ``out = rows[0]; out += rows[1]; ...; out /= P``: finite values, and NaNs
    of several payloads and signs meeting at the same element (the compiled
    loop alone keeps another operand's NaN in its tail), in float32 without
    float64 arithmetic."""
    from expectigrad_np.backends.cpu.collectives import mean_of_rows, mean_over_ranks
    rng = np.random.default_rng(m)
    rows = rng.standard_normal((3, m + 4)).astype(dtype)
    for nan in (False, True):
        if nan:
            at = rng.choice(m, size=max(1, m // 5), replace=False)
            sign = bits(1) << bits(8 * rows.itemsize - 1)
            for r in range(3):
                rows.view(bits)[r, at] = bits(quiet | (r + 1)) | (sign if r == 1 else bits(0))
            assert np.isnan(rows[:, at]).all()
        want = rows[0, :m].copy()
        for r in (1, 2):
            want += rows[r, :m]
        want /= dtype(3)
        out = np.full(m + 4, 7, dtype)
        assert mean_over_ranks(rows, m, out, dtype(3)) is (not nan)
        assert out[:m].tobytes() == want.tobytes() and (out[m:] == 7).all()
    ir = uncached(mean_of_rows)
    ir(rows, m, out, dtype(3))
    if dtype is np.float32:
        assert not any(DOUBLE_MATH.search(t) for t in ir.inspect_llvm().values())
