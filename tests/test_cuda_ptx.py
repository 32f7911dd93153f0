"""PTX of the cuda kernels, compiled through NVVM without a GPU: every
kernel a step launches is there, once, for sm_80 and sm_90, and the float32
kernels hold no double-precision instruction."""
import importlib.util
import os
import re

import numpy as np
import pytest

import expectigrad_np as eg

egc = eg.cuda

CCS = [(8, 0), (9, 0)]
DOUBLE = re.compile(r"^\s*(@%p\d+\s+)?[a-z][a-z0-9_.]*\.f64\b", re.M)   # an f64 instruction


def _skip_reason():
    if importlib.util.find_spec("numba_cuda") is None:
        return "numba-cuda is not installed (pip install 'expectigrad_np[cuda]')"
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        return "PTX cannot be compiled under numba's CUDA simulator"
    try:
        from numba import cuda
        cuda.compile_ptx(lambda a: None, "void(float32[::1])", cc=(8, 0))
    except Exception as exc:  # noqa: BLE001 - the reason is reported
        return f"NVVM is not available to numba-cuda: {type(exc).__name__}: {exc}"
    return None


pytestmark = pytest.mark.skipif(bool(reason := _skip_reason()), reason=reason or "")

_cache = {}


def ptx(dtype, cc):
    key = (np.dtype(dtype).str, cc)
    if key not in _cache:
        _cache[key] = egc.ptx(dtype, cc)
    return _cache[key]


def entries(text):
    return re.findall(r"\.entry\s+(\S+?)\(", text)


@pytest.mark.parametrize("cc", CCS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_one_entry_per_launched_kernel(dtype, cc):
    text = ptx(dtype, cc)
    assert f".target sm_{cc[0]}{cc[1]}" in text
    names = entries(text)
    assert len(names) == len(egc.KERNEL_NAMES)
    for name, kernel in zip(names, egc.KERNEL_NAMES):
        assert kernel in name


@pytest.mark.parametrize("cc", CCS)
def test_float32_kernels_have_no_double_precision(cc):
    text = ptx(np.float32, cc)
    assert DOUBLE.findall(text) == []
    assert "%fd" not in text                   # no double registers either


@pytest.mark.parametrize("cc", CCS)
def test_the_double_precision_check_can_fail(cc):
    """The pattern finds f64 instructions: in the float64 kernels, and in a
    float32 kernel that multiplies by a Python float."""
    from numba import cuda
    assert DOUBLE.search(ptx(np.float64, cc))

    def promoted(a):
        a[0] = a[0] * 0.1

    text, _ = cuda.compile_ptx(promoted, "void(float32[::1])", cc=cc)
    assert DOUBLE.search(text)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_deterministic_reductions(dtype):
    """The norms are combined in a fixed order: no floating-point atomics."""
    text = ptx(dtype, (9, 0))
    assert not re.search(r"\b(atom|red)\.[a-z.]*\.f(32|64)\b", text)
    assert re.search(r"\batom\.global\.inc\.u32\b", text)    # the last-block ticket


def test_unsupported_dtype():
    with pytest.raises(TypeError, match="float32 or float64"):
        egc.ptx(np.float16)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_clipping_keeps_nan_like_the_cpu(dtype):
    """Value clipping compiles to compare-and-select, as Python's max/min do
    on the CPU: no min/max instruction, which would turn a NaN gradient
    into -clipvalue when check_finite is off."""
    pattern = re.compile(r"\b(min|max)(\.[a-z]+)*\.f(32|64)\b")
    assert not pattern.search(ptx(dtype, (9, 0)))
    from numba import cuda

    def builtin_clip(a):                  # what the check exists to catch
        a[0] = min(max(a[0], -a[1]), a[1])

    text, _ = cuda.compile_ptx(builtin_clip, f"void({np.dtype(dtype).name}[::1])", cc=(9, 0))
    assert pattern.search(text)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_last_block_fences_after_winning_the_ticket(dtype):
    """Release (a fence before the ticket's atomic increment) and acquire (a
    fence after it, before the last block reads the other blocks' partial
    sums), in the stats kernel."""
    text = ptx(dtype, (9, 0))
    stats = text[text.index(".entry"):text.index(".entry", text.index(".entry") + 1)]
    lines = [line.strip() for line in stats.splitlines()]
    ticket = [i for i, line in enumerate(lines) if line.startswith("atom.global.inc.u32")]
    fences = [i for i, line in enumerate(lines) if re.match(r"(membar\.gl|fence\.)", line)]
    assert len(ticket) == 1
    assert any(i < ticket[0] for i in fences)
    assert any(i > ticket[0] for i in fences)
    loads = [i for i, line in enumerate(lines) if line.startswith("ld.global")]
    after = [i for i in fences if i > ticket[0]][0]
    assert any(i > after for i in loads)        # the partials are read after it


_modules = {}


def module(dtype, name):
    key = np.dtype(dtype).str
    if key not in _modules:
        from expectigrad_np.backends.cuda import kernels as KC
        _modules[key] = KC.ptx_modules(dtype, (9, 0))
    return _modules[key][name]


def memory_runs(text):
    """The global loads (L) and stores (S) of a PTX module in program order,
    as runs: [("L", 3), ("S", 2), ...]."""
    ops = re.findall(r"^\s*(?:@!?%p\d+\s+)?(ld|st)\.global\b", text, re.M)
    runs = []
    for op in ops:
        kind = op[0].upper()
        if runs and runs[-1][0] == kind:
            runs[-1] = (kind, runs[-1][1] + 1)
        else:
            runs.append((kind, 1))
    return runs


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_update_loads_every_operand_before_it_stores(dtype):
    """The loads of an element's operands (g, x, mean, count, momentum) are not
    interleaved with its stores: each loop variant loads at least g, x and
    the mean before its first store, and no lone load sits between two
    stores (a load waiting on the store before it)."""
    assert _ordered(memory_runs(module(dtype, "update_kernel")))


def _ordered(runs):
    whole = any(k == "L" and c >= 3 and nk == "S" and nc >= 3
                for (k, c), (nk, nc) in zip(runs, runs[1:]))
    lone = any(a[0] == "S" and b == ("L", 1) and c[0] == "S"
               for a, b, c in zip(runs, runs[1:], runs[2:]))
    return whole and not lone


def test_the_ordering_check_can_fail():
    """A body that loads and stores each operand in turn fails the check."""
    interleaved = ("ld.global.f32 %f1, [%rd1];\nst.global.f32 [%rd1], %f2;\n" * 4)
    assert not _ordered(memory_runs(interleaved))
    grouped = "ld.global.f32 %f1, [%rd1];\n" * 4 + "st.global.f32 [%rd1], %f2;\n" * 4
    assert _ordered(memory_runs(grouped))


def _ptxas():
    import glob
    import shutil
    import site
    found = shutil.which("ptxas")
    if found:
        return found
    roots = site.getsitepackages() + [site.getusersitepackages()]
    for root in roots:
        for path in glob.glob(os.path.join(root, "nvidia", "cuda_nvcc", "bin", "ptxas")):
            if os.access(path, os.X_OK):
                return path
    return None


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", ["stats_kernel", "update_kernel"])
def test_ptxas_reports_no_spills(dtype, name, tmp_path, capsys):
    """``ptxas -v`` for sm_90: no spill stores or loads, no stack frame; the
    register count is printed (``pytest -s``) for the record."""
    import subprocess
    ptxas = _ptxas()
    if ptxas is None:
        pytest.skip("ptxas not found (it comes with the cuda extra's "
                    "nvidia-cuda-nvcc wheel)")
    src = tmp_path / f"{name}.ptx"
    src.write_text(module(dtype, name))
    out = subprocess.run([ptxas, "-arch=sm_90", "-v", str(src), "-o", str(tmp_path / "k.cubin")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    info = out.stdout + out.stderr
    assert "0 bytes spill stores, 0 bytes spill loads" in info, info
    assert "0 bytes stack frame" in info, info
    registers = int(re.search(r"Used (\d+) registers", info).group(1))
    assert 0 < registers <= 255
    with capsys.disabled():
        print(f"\n{name} {np.dtype(dtype).name} sm_90: {registers} registers, no spills")


def _ptxas_info(ptxas, text, tmp_path, cap=None):
    """``ptxas -v`` for sm_90 (with ``-maxrregcount cap``, the register
    limit that ``max_registers=`` or ``launch_bounds=`` would impose):
    ``(registers, spill store bytes + spill load bytes)``."""
    import subprocess
    src = tmp_path / "kernel.ptx"
    src.write_text(text)
    args = [ptxas, "-arch=sm_90", "-v", str(src), "-o", str(tmp_path / "kernel.cubin")]
    if cap is not None:
        args += ["-maxrregcount", str(cap)]
    out = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    info = out.stdout + out.stderr
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", info)
    return (int(re.search(r"Used (\d+) registers", info).group(1)),
            int(spills.group(1)) + int(spills.group(2)))


def occupancy(registers, threads=256):
    """Resident threads over the most an sm_90 SM holds (2048): 64K
    registers, allocated per warp in units of 256, at most 32 blocks."""
    per_warp = -(-registers * 32 // 256) * 256
    blocks = min(32, 65536 // (per_warp * (threads // 32)), 2048 // threads)
    return blocks * threads / 2048


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", ["stats_kernel", "update_kernel"])
def test_no_register_limit_would_raise_occupancy_without_spills(dtype, name, tmp_path, capsys):
    """The kernels are compiled without ``max_registers``/``launch_bounds``.
    This measures the limits (every multiple of 8 below the unlimited
    count) with ``ptxas -v``: none reaches a higher occupancy at 256
    threads a block without spilling, so no limit is set.  (The grouped
    loads keep five operands in flight a thread; at the unlimited
    occupancy that is 20-30 KB in flight an SM, above what covers the
    memory latency.)  If a change of the kernels makes a limit pay, this
    fails and names it."""
    ptxas = _ptxas()
    if ptxas is None:
        pytest.skip("ptxas not found (it comes with the cuda extra's "
                    "nvidia-cuda-nvcc wheel)")
    text = module(dtype, name)
    free, spills = _ptxas_info(ptxas, text, tmp_path)
    assert spills == 0
    rows = [f"{name} {np.dtype(dtype).name} sm_90, 256 threads: unlimited {free} registers, "
            f"occupancy {occupancy(free):.0%}"]
    for cap in range(free // 8 * 8, 23, -8):
        if cap >= free:
            continue
        used, spilled = _ptxas_info(ptxas, text, tmp_path, cap)
        rows.append(f"  max {cap}: {used} registers, {spilled} bytes spilled, occupancy "
                    f"{occupancy(used):.0%}")
        assert spilled > 0 or occupancy(used) <= occupancy(free), (
            f"a limit of {cap} registers raises the occupancy from {occupancy(free):.0%} to "
            f"{occupancy(used):.0%} without spills: compile {name} with max_registers={cap}")
    with capsys.disabled():
        print("\n" + "\n".join(rows))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_lazy_catch_up_kernel_compiles_without_spills(dtype, tmp_path):
    """The row-sparse catch-up (``lazy.apply_row`` as a device function):
    one entry; float32 rows computed in float64 and rounded once per store
    (``cvt.rn.f32.f64``); ``ptxas -v`` for sm_90 reports no spills."""
    import subprocess

    from numba import cuda

    from expectigrad_np.backends.cuda import kernels as KC
    text = KC.catch_up_ptx(dtype, (9, 0))
    assert entries(text) and len(entries(text)) == 1
    live = cuda.compile_ptx(KC._live_rows, KC._live_signature(dtype), cc=(9, 0))[0]
    assert len(entries(live)) == 1
    if dtype == np.float32:
        assert re.search(r"cvt\.rn\.f32\.f64", text)
        assert re.search(r"st\.global\.f32", text)
    ptxas = _ptxas()
    if ptxas is None:
        pytest.skip("ptxas not found")
    src = tmp_path / "catch_up.ptx"
    src.write_text(text)
    out = subprocess.run([ptxas, "-arch=sm_90", "-v", str(src), "-o", str(tmp_path / "k.cubin")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "0 bytes spill stores, 0 bytes spill loads" in out.stdout + out.stderr
