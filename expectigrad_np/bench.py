"""Benchmark of the fused step: ``python -m expectigrad_np bench``.

For each size ``N`` and dtype it times a whole ``Expectigrad.step()`` on one
array of ``N`` elements (sparse counter and momentum, the defaults) and
reports:

- ``step_us``/``step_unchecked_us``: time per step with ``check_finite``
  True (the default) and False;
- ``gbps``: bytes the unchecked step must move per second.  Per element it
  reads ``x, g, mean_sq, count, momentum`` and writes all but ``g``: 36 B in
  float32, 64 B in float64 (``traffic_bytes``);
- ``vs_traffic``: unchecked step time over the time of a kernel with the same
  memory traffic and trivial arithmetic (``_traffic_kernel``) on buffers laid
  out as the optimizer's, serial or parallel by the same size rule as the
  step, timed in the same run;
- ``vs_reference``: speed-up of the checked step over the pure-NumPy
  reference: ``expectigrad.testing.NumpyExpectigrad`` of the original project
  when that package is installed, else ``expectigrad_np.reference``;
- ``check_ratio``: checked over unchecked step time;
- ``torch_adam_gbps``: ``torch.optim.Adam(fused=True)`` on the same CPU
  (28 B/element in float32), when torch is installed, and ``gbps_vs_torch``,
  our bytes per second over its bytes per second, timed in the same blocks.

Then the extras: the check_finite cost at the largest size, 200 arrays of
5,000 float32 elements against one array of 1M, gradients without exact
zeros against the table's (the sparse counter's uniform loop), the small-N comparison
(10 float64 elements against the reference), parameter lists shaped like
real models against ``torch.optim.Adam(fused=True)`` and the PyTorch front end
against the original PyTorch optimizer and fused Adam (with torch installed),
and start-up (a fresh process importing the package and taking one step,
against ``import numpy, numba``).

Timings interleave the things compared, block by block, and report medians
of times and of per-block ratios, so a noisy machine shifts both sides of a
ratio alike.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import subprocess
import sys
import time

import numpy as np
from numba import njit, prange

from . import reference as R
from ._timing import _gradient, time_interleaved
from .backends import layout as _layout
from .backends.cpu import backend as _buckets
from .backends.cpu import loops as _loops
from .backends.cpu.kernels import _twin
from .optimizer import Expectigrad

DEFAULT_SIZES = (10, 1_000, 100_000, 1_000_000, 10_000_000)
DEFAULT_DTYPES = ("float32", "float64")


def traffic_bytes(n, dtype, sparse=True, momentum=True):
    """Bytes one step must move: read ``x, g, mean_sq`` (+ ``count``,
    ``momentum``), write all of them but ``g``."""
    item = np.dtype(dtype).itemsize
    per_array = item + 4 * sparse + item * momentum     # count is uint32
    return n * (3 * item + per_array - item            # reads: x, g, v, [n], [m]
                + 2 * item + per_array - item)         # writes: x, v, [n], [m]


def adam_bytes(n, dtype):
    """``torch.optim.Adam``: read param, grad, exp_avg, exp_avg_sq; write 3."""
    return n * 7 * np.dtype(dtype).itemsize


# --- same-traffic kernels -----------------------------------------------------

def _traffic_body(x, g, v, n, m):
    """Read x, g, v, n, m and write x, v, n, m, with trivial arithmetic."""
    h = x.dtype.type(0.5)
    for i in prange(x.size):
        gi = g[i]
        x[i] = x[i] - h * gi
        v[i] = v[i] + gi
        n[i] = n[i] + np.uint32(1)
        m[i] = h * m[i] + gi


# Two names: numba's on-disk cache ignores ``parallel``, so two dispatchers of
# one function would load each other's machine code (see backends.cpu.kernels._twin).
_traffic_serial = njit(cache=True, nogil=True, error_model="numpy")(
    _twin(_traffic_body, "_traffic_serial"))
_traffic_parallel = njit(cache=True, nogil=True, parallel=True, error_model="numpy")(
    _twin(_traffic_body, "_traffic_parallel"))


def _traffic_kernel(n):
    return _traffic_serial if n < _buckets.PARALLEL_MIN_SIZE else _traffic_parallel


# --- reference ----------------------------------------------------------------

def _reference_stepper(x, g):
    """A function doing one pure-NumPy reference step on ``x`` with ``g``.

    The original project's ``NumpyExpectigrad`` when installed (it returns the
    step, subtracted here), else the in-package reference, which does the
    same per-array work.
    """
    try:
        from expectigrad.testing import NumpyExpectigrad
    except ImportError:
        v = np.zeros_like(x)
        n = np.zeros(x.shape, np.uint32)
        m = np.zeros_like(x)
        t = [0]

        def step():
            t[0] += 1
            R.expectigrad_update(x, g, v, n, m, t=t[0], lr=1e-3, beta=0.9,
                                 eps=1e-8, sparse_counter=True)
        return step, "expectigrad_np.reference"
    opt = NumpyExpectigrad(learning_rate=1e-3, beta=0.9, epsilon=1e-8)

    def step():
        x.__isub__(opt.step(g))
    return step, "expectigrad.testing.NumpyExpectigrad"


_TORCH_THREADS = []


def _torch_adam(n, dtype):
    """A function doing one fused Adam step on ``n`` elements, or None.

    torch gets the same thread policy as our step: one thread below
    ``PARALLEL_MIN_SIZE``, its default pool from there (on a loaded 2-core
    machine its pool can make a 1e5-element step take milliseconds).
    """
    try:
        import torch
    except ImportError:
        return None
    if not _TORCH_THREADS:
        _TORCH_THREADS.append(torch.get_num_threads())
    torch.set_num_threads(1 if n < _buckets.PARALLEL_MIN_SIZE else _TORCH_THREADS[0])
    tdtype = {"float32": torch.float32, "float64": torch.float64}[np.dtype(dtype).name]
    p = torch.zeros(n, dtype=tdtype, requires_grad=True)
    p.grad = torch.randn(n, dtype=tdtype) * 1e-2
    try:
        opt = torch.optim.Adam([p], lr=1e-3, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return None
    return opt.step


# --- the sections ---------------------------------------------------------------

def bench_size(n, dtype, repeat, reference=True, torch=True):
    """One table row: see the module docstring."""
    g = _gradient(n, dtype)
    x1, x2 = np.zeros(n, dtype), np.zeros(n, dtype)
    checked = Expectigrad(x1, lr=1e-3)
    unchecked = Expectigrad(x2, lr=1e-3, check_finite=False)
    # Filled, not zeros: pages of np.zeros that are only read map to one
    # shared zero page and would never touch memory.  Laid out as the
    # optimizer's arrays are: the parameter and gradient from NumPy, the three
    # state buffers from the buckets' allocator (_layout.state_zeros).
    tx, tg = np.full(n, 0.5, dtype), np.full(n, 0.5, dtype)
    tv, tn, tm = (_layout.state_zeros(n, np.uint32 if name == "count" else dtype, name)
                  for name in ("mean_sq", "count", "momentum"))
    for a in (tv, tn, tm):
        a[...] = 1
    kernel = _traffic_kernel(n)
    fns = [lambda: unchecked.step(g), lambda: checked.step(g),  # noqa: F821 - deleted after the timing
           lambda: kernel(tx, tg, tv, tn, tm)]  # noqa: F821 - deleted after the timing
    adam = _torch_adam(n, dtype) if torch else None
    if adam is not None:
        fns.append(adam)
    times, _, rows = time_interleaved(fns, repeat, blocks=True)
    t_step, t_check, t_plain = times[:3]
    med = lambda a: float(np.median(a))  # noqa: E731
    nbytes = traffic_bytes(n, dtype)
    row = dict(n=n, dtype=np.dtype(dtype).name,
               step_us=t_check * 1e6, step_unchecked_us=t_step * 1e6,
               traffic_kernel_us=t_plain * 1e6, bytes_per_step=nbytes,
               gbps=nbytes / t_step / 1e9, traffic_kernel_gbps=nbytes / t_plain / 1e9,
               vs_traffic=med(rows[:, 0] / rows[:, 2]),
               check_ratio=med(rows[:, 1] / rows[:, 0]))
    if adam is not None:
        t_adam = times[3]
        row["torch_adam_us"] = t_adam * 1e6
        row["torch_adam_gbps"] = adam_bytes(n, dtype) / t_adam / 1e9
        # Our bytes per second over torch's, block by block.
        row["gbps_vs_torch"] = med(nbytes / rows[:, 0] / (adam_bytes(n, dtype) / rows[:, 3]))
    del tx, tg, tv, tn, tm, x2, unchecked, adam, fns
    gc.collect()
    if reference:
        xr = np.zeros(n, dtype)
        ref, row["reference"] = _reference_stepper(xr, g)
        # The reference is slow at large N: fewer blocks there.
        reps = repeat if n <= 100_000 else max(1, min(repeat, 3))
        (t_ours, t_ref), (_, r_ref) = time_interleaved(
            [lambda: checked.step(g), ref], reps)  # noqa: F821 - deleted after the timing
        row["reference_us"] = t_ref * 1e6
        row["vs_reference"] = r_ref
        del xr, ref
    del checked, x1
    gc.collect()
    return row


def bench_many_small(repeat, arrays=200, size=5_000, dtype="float32", sets=3):
    """``arrays`` arrays of ``size`` elements against one of ``arrays*size``.

    Measured twice: passing the same gradient arrays every step (reused
    buffers, which the optimizer recognises) and rotating through ``sets``
    distinct sets of arrays (new arrays every step, as when gradients are
    computed afresh).
    """
    rng = np.random.default_rng(1)
    xs = [np.zeros(size, dtype) for _ in range(arrays)]
    gsets = [[rng.standard_normal(size).astype(dtype) for _ in range(arrays)]
             for _ in range(sets)]
    x1 = np.zeros(arrays * size, dtype)
    g1sets = [np.concatenate(gs) for gs in gsets]
    many = Expectigrad(xs, lr=1e-3)
    one = Expectigrad(x1, lr=1e-3)
    turn = [0]

    def many_new():
        turn[0] += 1
        many.step(gsets[turn[0] % sets])

    def one_new():
        one.step(g1sets[turn[0] % sets])

    gs, g1 = gsets[0], g1sets[0]
    repeat = max(repeat, 9)
    (t_one, t_many), (_, ratio) = time_interleaved(
        [lambda: one.step(g1), lambda: many.step(gs)], repeat)
    (t_one_new, t_many_new), (_, ratio_new) = time_interleaved(
        [one_new, many_new], repeat)
    return dict(arrays=arrays, size=size, dtype=dtype, one_array_us=t_one * 1e6,
                many_arrays_us=t_many * 1e6, ratio=ratio,
                one_array_new_us=t_one_new * 1e6,
                many_arrays_new_us=t_many_new * 1e6, ratio_new=ratio_new)


def bench_uniform(repeat, sizes=(100_000, 1_000_000), dtype="float32"):
    """The table's gradients have an exact zero in every seventh element, so
    the sparse counter takes its general loop.  Gradients without zeros keep
    every count equal to the step count, and the kernels take the uniform
    loop (one division per span instead of one per element): the unchecked
    step with such gradients over the one with zeros."""
    rows = []
    for n in sizes:
        g_zeros = _gradient(n, dtype)
        g_dense = g_zeros.copy()
        g_dense[::7] = 1
        a = Expectigrad(np.zeros(n, dtype), lr=1e-3, check_finite=False)
        b = Expectigrad(np.zeros(n, dtype), lr=1e-3, check_finite=False)
        (t_zeros, t_dense), (_, ratio) = time_interleaved(
            [lambda: a.step(g_zeros), lambda: b.step(g_dense)], max(repeat, 9))
        rows.append(dict(n=n, dtype=np.dtype(dtype).name, zeros_us=t_zeros * 1e6,
                         no_zeros_us=t_dense * 1e6, ratio=ratio))
    return rows


def bench_small(repeat, n=10, dtype="float64"):
    """A whole ``step()`` on one small array against the reference step."""
    g = _gradient(n, dtype)
    x, xr = np.zeros(n, dtype), np.zeros(n, dtype)
    opt = Expectigrad(x, lr=1e-3)
    ref, name = _reference_stepper(xr, g)
    (t_ours, t_ref), (_, r) = time_interleaved([lambda: opt.step(g), ref],
                                               max(repeat, 5))
    return dict(n=n, dtype=dtype, step_us=t_ours * 1e6, reference=name,
                reference_us=t_ref * 1e6, speedup=r)


def bench_small_lists(repeat):
    """A whole ``step()`` against the NumPy reference stepping the same
    arrays: one 10-element array, and the four arrays of a small MLP
    ((64, 32), (32,), (32, 10), (10,)), float64; and a float32 array of 10
    with a float64 array of 3 (two dtypes, one call)."""
    rows = []
    f8, f4 = "float64", "float32"
    for name, shapes, dtypes in (
            ("one 10-element array", [(10,)], [f8]),
            ("small MLP, 4 arrays", [(64, 32), (32,), (32, 10), (10,)], [f8] * 4),
            ("10 float32 + 3 float64 elements, 2 arrays", [(10,), (3,)], [f4, f8])):
        gs = [_gradient(int(np.prod(s)), d).reshape(s) for s, d in zip(shapes, dtypes)]
        xs = [np.zeros(s, d) for s, d in zip(shapes, dtypes)]
        opt = Expectigrad(xs, lr=1e-3)
        steppers = [_reference_stepper(np.zeros(s, d), g)
                    for s, d, g in zip(shapes, dtypes, gs)]

        def ref(steppers=steppers):
            for step, _ in steppers:
                step()
        (t_ours, t_ref), (_, r) = time_interleaved([lambda: opt.step(gs), ref],
                                                   max(repeat, 5))
        rows.append(dict(case=name, step_us=t_ours * 1e6, reference=steppers[0][1],
                         reference_us=t_ref * 1e6, speedup=r))
    return rows


def bench_minimize(repeat, dim=10, iterations=2000):
    """An iteration of ``minimize`` on ``dim``-D Rosenbrock (scipy's ``rosen``
    and ``rosen_der``) against one ``rosen`` + ``rosen_der`` pair."""
    from scipy.optimize import rosen, rosen_der

    from ._minimize import minimize
    x0 = np.full(dim, -1.0)
    x = x0.copy()

    def pairs():
        for _ in range(iterations):
            rosen(x)
            rosen_der(x)

    def run():
        minimize(rosen, x0, jac=rosen_der, maxiter=iterations, gtol=0.0)

    (t_min, t_pair), (_, r) = time_interleaved([run, pairs], max(repeat, 5))
    return dict(dim=dim, iteration_us=t_min / iterations * 1e6,
                fun_jac_us=t_pair / iterations * 1e6, ratio=1.0 / r)


# Parameter lists shaped like real models (float32), for the rows against
# torch.optim.Adam(fused=True) and the original PyTorch optimizer.
def _transformer_like(layers=8, d=256, ff=1024, vocab=10_000):
    shapes = [(vocab, d)]
    for _ in range(layers):
        shapes += [(3 * d, d), (3 * d,), (d, d), (d,), (ff, d), (ff,), (d, ff), (d,),
                   (d,), (d,), (d,), (d,)]
    return shapes + [(d,), (d,), (vocab,)]


MODEL_SHAPES = {
    "MLP 784-256-10": [(256, 784), (256,), (10, 256), (10,)],
    "MLP 3072-1024-1024-100": [(1024, 3072), (1024,), (1024, 1024), (1024,), (100, 1024),
                               (100,)],
    "8x(1000,1000)+8x(1000,)": [(1000, 1000)] * 8 + [(1000,)] * 8,
    "transformer-like, 100 arrays": _transformer_like(),
}


def _torch_adam_on(shapes):
    """``step`` of torch.optim.Adam(fused=True) on float32 tensors of these
    shapes with gradients, or None without torch."""
    try:
        import torch
    except ImportError:
        return None
    if _TORCH_THREADS:
        torch.set_num_threads(_TORCH_THREADS[0])
    ps = [torch.zeros(s, requires_grad=True) for s in shapes]
    for p in ps:
        p.grad = torch.randn(p.shape) * 1e-2
    return torch.optim.Adam(ps, lr=1e-3, fused=True).step


def bench_model_shapes(repeat, cap=None):
    """``step()`` on NumPy float32 arrays shaped like real models against
    torch's fused Adam on the same shapes: bytes per second (ours 36 B, Adam
    28 B per element) and time.  Twice: with the table's gradients (an exact
    zero in every seventh element, so the sparse counter divides per
    element) and with dense gradients (no exact zeros, as a dense layer's
    usually are: the division-free uniform loop, whose counts are not
    moved: 28 B, Adam's traffic).  The dense step is also timed with
    ``check_finite=False``: fused Adam does not check, and the check reads
    every gradient once more (4 B an element); so is the step with the
    table's gradients, whose bytes/s then show what the check costs."""
    rows = []
    for name, shapes in MODEL_SHAPES.items():
        if cap is not None and sum(int(np.prod(s)) for s in shapes) > cap:
            continue
        adam = _torch_adam_on(shapes)
        if adam is None:
            return rows
        n = sum(int(np.prod(s)) for s in shapes)
        xs = [np.zeros(s, np.float32) for s in shapes]
        gs = [_gradient(int(np.prod(s)), "float32").reshape(s) for s in shapes]
        dense = [np.where(g == 0, np.float32(1e-3), g) for g in gs]
        opt = Expectigrad(xs, lr=1e-3)
        opt_dense = Expectigrad([x.copy() for x in xs], lr=1e-3)
        opt_bare = Expectigrad([x.copy() for x in xs], lr=1e-3, check_finite=False)
        opt_zeros_bare = Expectigrad([x.copy() for x in xs], lr=1e-3, check_finite=False)
        (t_ours, t_dense, t_bare, t_adam, t_zb), (_, _, _, r, _), blocks = time_interleaved(
            [lambda: opt.step(gs), lambda: opt_dense.step(dense),  # noqa: F821 - deleted after the timing
             lambda: opt_bare.step(dense), adam,  # noqa: F821
             lambda: opt_zeros_bare.step(gs)], max(repeat, 3), blocks=True)  # noqa: F821
        rows.append(dict(case=name, arrays=len(shapes), elements=n, step_us=t_ours * 1e6,
                         dense_step_us=t_dense * 1e6, torch_adam_us=t_adam * 1e6,
                         time_vs_adam=1.0 / r, bytes_per_s_vs_adam=(36 / 28) * r,
                         dense_bytes_per_s_vs_adam=(36 / 28) * t_adam / t_dense,
                         unchecked_step_us=t_zb * 1e6,
                         unchecked_bytes_per_s_vs_adam=(36 / 28) * float(np.median(
                             blocks[:, 3] / blocks[:, 4])),
                         dense_unchecked_us=t_bare * 1e6,
                         dense_unchecked_time_vs_adam=float(np.median(blocks[:, 2]
                                                                      / blocks[:, 3]))))
        del xs, gs, dense, opt, opt_dense, opt_bare, opt_zeros_bare, adam
        gc.collect()
    return rows


def bench_sparse(repeat, rows=1_000_000, width=32, touched=512, pool=4096):
    """Row-sparse steps (``RowSparse``) on a ``rows x width`` float32 table
    with ``touched`` random rows per step, against the dense step of the
    same table on the densified gradient (beta=0.9): beta=0, beta=0.9 with
    ``lazy=True``, and beta=0.9 eager (which visits every row whose
    momentum has not yet decayed to zero).  The steps cycle through
    ``pool`` random index sets, so a row's lag between touches is as long as
    fresh random indices would give it."""
    from .sparse import RowSparse
    rng = np.random.default_rng(0)
    index_sets = [rng.integers(0, rows, touched) for _ in range(pool)]
    values = rng.standard_normal((touched, width)).astype(np.float32)
    grads = [RowSparse(i, values) for i in index_sets]
    dense = np.zeros((rows, width), np.float32)
    dense[index_sets[0]] = values

    def table():
        return rng.standard_normal((rows, width), dtype=np.float32) * np.float32(0.1)

    def stepper(**kw):
        opt = Expectigrad([table()], lr=1e-3, **kw)
        # One dense step first: every page of the state is written once, as
        # in a run that has gone on for a while (not first-touch page faults).
        opt.step([np.zeros((rows, width), np.float32)])
        count = iter(range(1 << 62))
        return lambda: opt.step([grads[next(count) % pool]])

    dense_opt = Expectigrad([table()], lr=1e-3, beta=0.9)
    fns = [lambda: dense_opt.step([dense]), stepper(beta=0.0),  # noqa: F821 - deleted after the timing
           stepper(beta=0.9, lazy=True), stepper(beta=0.9)]
    times, ratios = time_interleaved(fns, max(repeat, 3))
    result = dict(rows=rows, width=width, touched=touched, dense_us=times[0] * 1e6)
    for name, t in zip(("beta0", "lazy", "eager"), times[1:]):
        result[f"{name}_us"] = t * 1e6
        result[f"{name}_speedup"] = times[0] / t
    del fns, dense, dense_opt
    gc.collect()
    return result


def _format_sparse(r):
    return (f"row-sparse step, {r['touched']} of {r['rows']:,} x {r['width']} float32 rows: "
            f"beta=0 {r['beta0_us']:,.0f} µs ({_fmt(r['beta0_speedup'], 2)}x as fast as the "
            f"dense step, {r['dense_us']:,.0f} µs); beta=0.9 lazy {r['lazy_us']:,.0f} µs "
            f"({_fmt(r['lazy_speedup'], 2)}x); beta=0.9 eager {r['eager_us']:,.0f} µs "
            f"({_fmt(r['eager_speedup'], 2)}x)")


MPI_SHAPES = [(1000, 1000), (1000,), (1000, 1000), (1000,)]      # 2M float32 elements


def bench_mpi(repeat, ranks=3):
    """``expectigrad_np.mpi`` under ``mpiexec -n ranks`` (``_mpi_worker``),
    one kernel thread a rank: the sharded step against the same collectives
    alone and against one process stepping its shard, and the state each
    rank holds.  None without mpi4py or mpiexec."""
    import importlib.util
    import shutil
    import subprocess
    if importlib.util.find_spec("mpi4py") is None:
        return None
    here = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    mpiexec = here if os.path.exists(here) else shutil.which("mpiexec")
    if mpiexec is None:
        return None
    # One kernel thread per rank: ranks are the parallelism (numba's threads
    # of several ranks on the same cores would contend).
    env = dict(os.environ, NUMBA_NUM_THREADS="1")
    out = subprocess.run([mpiexec, "-n", str(ranks), sys.executable, "-c",
                          f"from expectigrad_np.bench import _mpi_worker; _mpi_worker({repeat})"],
                         capture_output=True, text=True, timeout=900, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"bench --mpi failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _mpi_worker(repeat):
    from mpi4py import MPI

    from .mpi import Expectigrad as MpiExpectigrad
    comm = MPI.COMM_WORLD
    rng = np.random.default_rng(comm.rank)
    params = [np.zeros(s, np.float32) for s in MPI_SHAPES]
    grads = [rng.standard_normal(s).astype(np.float32) for s in MPI_SHAPES]
    sharded = MpiExpectigrad([p.copy() for p in params], lr=1e-3)
    replicated = MpiExpectigrad([p.copy() for p in params], lr=1e-3, shard_state=False)
    # The same collectives alone, on buffers of the same sizes.
    _, offsets, bounds = next(iter(sharded._buckets.values()))
    counts = np.diff(bounds)
    flat = np.zeros(int(offsets[-1]), np.float32)
    rows = np.empty((comm.size, int(counts[comm.rank])), np.float32)
    mine = np.empty(int(counts[comm.rank]), np.float32)

    def collectives():
        comm.Alltoallv([flat, (counts, bounds[:-1])],
                       [rows, ([rows.shape[1]] * comm.size,
                               [rows.shape[1] * r for r in range(comm.size)])])
        comm.Allgatherv(mine, [flat, (counts, bounds[:-1])])

    pieces = [g.reshape(-1)[a:b] for g, (i, a, b) in
              zip([grads[i] for i, _, _ in sharded._order], sharded._order)]

    def timed(fn, k=5):
        out = []
        for _ in range(max(repeat, 3)):
            comm.Barrier()
            t0 = time.perf_counter()
            for _ in range(k):
                fn()
            out.append((time.perf_counter() - t0) / k)
        return float(np.median(out))

    t_step = timed(lambda: sharded.step(grads))
    t_comm = timed(collectives)
    t_shard = timed(lambda: sharded.core.step(pieces))
    t_replicated = timed(lambda: replicated.step(grads))
    full = sum(getattr(b, name).nbytes for b in replicated._buckets for name in b.stored)
    row = dict(ranks=comm.size, elements=int(offsets[-1]), step_us=t_step * 1e6,
               collectives_us=t_comm * 1e6, shard_step_us=t_shard * 1e6,
               replicated_step_us=t_replicated * 1e6,
               overhead_vs_shard_step=(t_step - t_comm) / t_shard,
               state_bytes=sharded.state_nbytes(), replicated_state_bytes=full)
    rows_all = comm.gather(row)
    if comm.rank == 0:
        worst = max(rows_all, key=lambda r: r["overhead_vs_shard_step"])
        worst["state_fraction"] = max(r["state_bytes"] for r in rows_all) / full
        print(json.dumps(worst))


def _format_mpi(r):
    return (f"mpi, {r['ranks']} ranks, {r['elements']:,} float32 elements: sharded step "
            f"{r['step_us']:,.0f} µs, its collectives alone {r['collectives_us']:,.0f} µs, one "
            f"process stepping its shard {r['shard_step_us']:,.0f} µs: overhead "
            f"{r['overhead_vs_shard_step']:.2f}x the shard step; replicated step "
            f"{r['replicated_step_us']:,.0f} µs; state per rank {r['state_fraction']:.2f} of "
            "the replicated state (the worst rank)")


def bench_pytorch(repeat, cap=None):
    """The PyTorch front end (``expectigrad_np.pytorch.Expectigrad``) on CPU
    float32 tensors against the original project's PyTorch optimizer (when
    the ``expectigrad`` package is installed) and torch's fused Adam: one
    10-element parameter, the 16 tensors of 8x(1000,1000)+8x(1000,), and the
    parameters of a ``torch.nn.TransformerEncoder`` (about 10M)."""
    try:
        import torch

        from .pytorch import Expectigrad as TorchExpectigrad
    except ImportError:
        return []
    try:
        from expectigrad.pytorch import Expectigrad as Original
    except ImportError:
        Original = None
    if _TORCH_THREADS:
        torch.set_num_threads(_TORCH_THREADS[0])

    def params_of(case):
        if case == "TransformerEncoder":
            layer = torch.nn.TransformerEncoderLayer(512, 8, 2048, batch_first=True)
            model = torch.nn.TransformerEncoder(layer, 5, enable_nested_tensor=False)
            return [p.detach().clone().requires_grad_() for p in model.parameters()]
        shapes = [(10,)] if case == "one 10-element parameter" else MODEL_SHAPES[case]
        return [torch.zeros(s, requires_grad=True) for s in shapes]

    rows = []
    for case in ("one 10-element parameter", "8x(1000,1000)+8x(1000,)",
                 "TransformerEncoder"):
        steps = {}
        for label, make in (("ours", lambda ps: TorchExpectigrad(ps, lr=1e-3)),
                            ("unchecked", lambda ps: TorchExpectigrad(ps, lr=1e-3,
                                                                      check_finite=False)),
                            ("original", None if Original is None
                             else (lambda ps: Original(ps, lr=1e-3))),
                            ("adam", lambda ps: torch.optim.Adam(ps, lr=1e-3, fused=True))):
            if make is None:
                continue
            ps = params_of(case)
            for p in ps:
                p.grad = torch.randn(p.shape) * 1e-2
            steps[label] = make(ps).step
        names = list(steps)
        n = sum(p.numel() for p in params_of(case))
        if cap is not None and n > cap:
            continue
        times, ratios, blocks = time_interleaved([steps[k] for k in names], max(repeat, 3),
                                                 blocks=True)
        row = dict(case=case, elements=n, **{f"{k}_us": t * 1e6 for k, t in zip(names, times)})

        def per_block(a, b):
            return float(np.median(blocks[:, names.index(a)] / blocks[:, names.index(b)]))
        row["time_vs_adam"] = per_block("ours", "adam")
        row["unchecked_time_vs_adam"] = per_block("unchecked", "adam")
        if "original" in steps:
            row["speedup_vs_original"] = float(ratios[names.index("original")])
            row["unchecked_speedup_vs_original"] = per_block("original", "unchecked")
            # The original's time over fused Adam's: the speed-up an optimizer
            # moving Adam's bytes at Adam's rate would have over the original.
            row["original_vs_adam"] = float(times[names.index("original")]
                                            / times[names.index("adam")])
        row["bytes_per_s_vs_adam"] = (36 / 28) * float(ratios[names.index("adam")])
        rows.append(row)
        del steps
        gc.collect()
    return rows


_COLD = """
import json, os, sys, time
import numpy as np, numba
from numba import njit, prange
T = time.perf_counter

def body(x, g, v, n, m):
    for i in prange(x.size):
        g2 = g[i] * g[i]
        c = g2 != 0
        n[i] += c
        w = np.float32(1) / np.float32(n[i]) if c else np.float32(0)
        v[i] += (g2 - v[i]) * w
        u = g[i] / (np.float32(1e-8) + np.sqrt(v[i]))
        m[i] = np.float32(0.9) * m[i] + np.float32(0.1) * u
        x[i] -= np.float32(1e-3) * m[i]

arrays = [np.ones(8, np.float32) for _ in range(3)]
arrays.insert(3, np.zeros(8, np.uint32)); arrays.append(np.zeros(8, np.float32))
t0 = T(); njit(error_model="numpy")(body)(*arrays)
t1 = T(); njit(error_model="numpy", parallel=True)(body)(*arrays)
t2 = T()
import expectigrad_np as eg
from expectigrad_np.backends import background
from expectigrad_np.backends.cpu.backend import PARALLEL_MIN_SIZE
small = np.zeros(10, np.float32)
t3 = T(); opt = eg.Expectigrad(small); opt.step(np.ones(10, np.float32))
t4 = T()
big = np.zeros(2 * PARALLEL_MIN_SIZE, np.float32)
opt_big = eg.Expectigrad(big); opt_big.step(np.ones_like(big))
t5 = T()
background.wait_all()
opt.step(np.ones(10, np.float32)); opt_big.step(np.ones_like(big))
t6 = T()
assert opt._fast is not None and opt_big._fast is not None
print(json.dumps(dict(plain_serial_s=t1 - t0, plain_parallel_s=t2 - t1,
                      first_small_step_s=t4 - t3, first_parallel_step_s=t5 - t4,
                      compiled_after_s=t6 - t3, mode=background.mode())))
"""


def _cold_run(mode):
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, NUMBA_CACHE_DIR=tmp, EXPECTIGRAD_NP_COMPILE=mode,
                   PYTHONPATH=os.pathsep.join(sys.path))
        out = subprocess.run([sys.executable, "-c", _COLD], check=True,
                             capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_cold():
    """First steps with an empty compile cache (a fresh ``NUMBA_CACHE_DIR``,
    a fresh process): a default float32 optimizer on a small array, then on
    a parallel-size one, against compiling a plain ``@njit`` loop of the
    same update, serial plus parallel, in the same process.  Once as a user
    gets it (kernels compiled by a child process while the reference takes
    the steps: ``backends/background.py``), with the time until both
    kernels are in use; once with ``EXPECTIGRAD_NP_COMPILE=wait``, where
    the first steps wait for the compiler in the process."""
    row = _cold_run("background")
    plain = row["plain_serial_s"] + row["plain_parallel_s"]
    ours = row["first_small_step_s"] + row["first_parallel_step_s"]
    row.update(plain_s=plain, first_steps_s=ours, ratio=ours / plain)
    wait = _cold_run("wait")
    wait_plain = wait["plain_serial_s"] + wait["plain_parallel_s"]
    wait_steps = wait["first_small_step_s"] + wait["first_parallel_step_s"]
    row["wait"] = dict(wait, plain_s=wait_plain, first_steps_s=wait_steps,
                       ratio=wait_steps / wait_plain)
    return row


_STARTUP_STEP = ("import numpy as np, expectigrad_np as eg\n"
                 "eg.Expectigrad(np.zeros(10)).step(np.ones(10))\n")
_STARTUP_INFO = (
    _STARTUP_STEP + "import json, sys\n"
    "from expectigrad_np.bench import _compiled_here\n"
    "print(json.dumps(dict(compiled=_compiled_here(), modules=sorted(m for m in "
    "('scipy.linalg', 'scipy.optimize', 'numba.cuda', 'numba.np.linalg') "
    "if m in sys.modules))))\n")
_STARTUP_BASE = "import numpy, numba"
# The floor any numba package pays: the first call of one trivial cached
# function initialises numba's CPU target (which imports scipy.linalg).
_STARTUP_FLOOR_MODULE = ("from numba import njit\n"
                         "@njit(cache=True)\n"
                         "def one(a):\n"
                         "    return a[0]\n")
_STARTUP_FLOOR = "import numpy as np, _eg_numba_floor as m; m.one(np.ones(1))"


def _run_python(code, path=()):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([*path, *sys.path]))
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], check=True,
                         capture_output=True, text=True, env=env)
    return time.perf_counter() - t0, out.stdout


def bench_startup(repeat):
    """Fresh process with a warm compile cache: import + first step against
    ``import numpy, numba`` and against numba's own floor (``import numpy,
    numba`` plus the first call of a trivial cached function); also whether
    that process compiled anything and which heavy modules it imported.

    The package's Python bytecode is written first (``compileall``), as a
    ``pip install`` writes it and as numpy's and numba's is: an editable
    checkout run with ``PYTHONDONTWRITEBYTECODE`` would otherwise compile
    the package's sources in every process (about 30 ms here)."""
    import compileall
    import tempfile
    compileall.compile_dir(os.path.dirname(os.path.abspath(__file__)), quiet=2)
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "_eg_numba_floor.py"), "w") as f:
            f.write(_STARTUP_FLOOR_MODULE)
        _run_python(_STARTUP_FLOOR, [tmp])                # fill the caches
        _, out = _run_python(_STARTUP_INFO)
        _, out = _run_python(_STARTUP_INFO)               # a second run: warm
        info = json.loads(out.strip().splitlines()[-1])
        rows = []
        for _ in range(max(repeat, 3)):
            rows.append([_run_python(_STARTUP_BASE)[0],
                         _run_python(_STARTUP_FLOOR, [tmp])[0],
                         _run_python(_STARTUP_STEP)[0]])
    rows = np.asarray(rows)
    base, floor, step = np.median(rows, axis=0) * 1e3
    return dict(import_step_ms=step, import_numpy_numba_ms=base,
                numba_floor_ms=floor,
                ratio=float(np.median(rows[:, 2] / rows[:, 0])),
                ratio_to_floor=float(np.median(rows[:, 2] / rows[:, 1])),
                compiled_in_fresh_process=info["compiled"],
                heavy_modules_imported=info["modules"])


PARALLEL_SIZES = tuple(1 << k for k in range(15, 24))


def bench_parallel(repeat, sizes=PARALLEL_SIZES, dtypes=DEFAULT_DTYPES):
    """Serial against parallel segmented kernel, per size: the measurement
    behind ``PARALLEL_MIN_SIZE`` (``--parallel``)."""
    from .backends.cpu import kernels as K
    rows = []
    for dtype in dtypes:
        for n in sizes:
            x, g = np.zeros(n, dtype), _gradient(n, dtype)
            opt = Expectigrad(x, lr=1e-3)
            b = opt._buckets[0]
            b.load_gradients([g])
            seg, lo, hi = b.chunks
            opt.step(g)
            args = (b.x_addr, b.g_addr, b.offsets, seg, lo, hi, b.mean_sq, b.count,
                    b.momentum, b.coef, b.flags, True, np.inf, 0.0, True)
            (t_ser, t_par), (_, ratio) = time_interleaved(
                [lambda: K.segments_step(*args),
                 lambda: K.segments_step_parallel(*args)], repeat)
            rows.append(dict(n=n, dtype=np.dtype(dtype).name, serial_us=t_ser * 1e6,
                             parallel_us=t_par * 1e6, parallel_over_serial=ratio))
    return rows


def specialisations():
    """The compiled specialisations of the entry-point kernels in this
    process, by dtype and loop mask (``loops.LOOPS``, hex): ``bucket_step``
    (the whole-step route; holding the GIL up to ``SINGLE_STEP_GIL_MAX``
    elements, releasing it above; serial or parallel), ``array_step``
    (single arrays on the general route), the serial and parallel segmented
    kernels (several or large arrays), and ``locate_arrays`` (one signature for every dtype)."""
    from .backends.cpu import kernels as K
    from .backends.cpu import locate
    out = {"bucket_step": sorted(
        f"{d} loops {mask:x}{' (GIL held)' if gil else ''}{' parallel' if par else ''}"
        for d, gil, par, mask in K._BUCKET_STEP)}
    for name, arg in (("array_step", 0), ("segments_step", 6),
                      ("segments_step_parallel", 6)):
        out[name] = sorted(f"{sig[arg].dtype} loops {mask:x}"
                           for mask, v in K._VARIANTS.items()
                           for sig in getattr(v, name).signatures)
    out["locate_arrays"] = ["any"] * len(locate.locate_arrays.signatures)
    return out


def _compiled_here():
    """How many kernels this process compiled rather than loaded from cache."""
    from .backends.cpu import kernels as K
    from .backends.cpu import locate
    kernels = list(K._BUCKET_STEP.values()) + [
        getattr(v, name) for v in K._VARIANTS.values()
        for name in ("array_step", "segments_step", "segments_step_parallel")] + [
        d for span in K._SPANS.values() for d in span.values() if hasattr(d, "stats")] + [
        _loops._update_span, locate.locate_arrays, K.data_address]
    return sum(sum(k.stats.cache_misses.values()) for k in kernels)


def run(sizes=DEFAULT_SIZES, dtypes=DEFAULT_DTYPES, repeat=7, extras=True,
        reference=True, torch=True, parallel=False):
    """Run the benchmark; returns a JSON-able dict."""
    result = dict(machine=dict(cpu=_cpu_model(), cpus=os.cpu_count(),
                               system=platform.platform(), python=sys.version.split()[0],
                               numpy=np.__version__,
                               date=time.strftime("%Y-%m-%d", time.gmtime())),
                  parallel_min_size=_buckets.PARALLEL_MIN_SIZE, rows=[])
    import numba
    result["machine"]["numba"] = numba.__version__
    result["machine"]["threads"] = numba.get_num_threads()
    for dtype in dtypes:
        for n in sizes:
            result["rows"].append(bench_size(int(n), dtype, repeat, reference, torch))
    if extras:
        # The extras are no larger than the largest size asked for (with the
        # default sizes they keep their own, some larger than 1e7).
        big = max(int(n) for n in sizes)
        cap = None if tuple(sizes) == tuple(DEFAULT_SIZES) else big
        checked = [r for r in result["rows"] if r["n"] == big]
        result["check_finite_ratio"] = {r["dtype"]: r["check_ratio"] for r in checked}
        limit = big if cap is None else cap
        result["many_small"] = bench_many_small(repeat, size=max(1, min(5_000, limit // 200)))
        result["uniform"] = bench_uniform(
            repeat, sizes=tuple(n for n in (100_000, 1_000_000) if n <= limit) or (limit,))
        result["small"] = bench_small(repeat)
        result["small_lists"] = bench_small_lists(repeat)
        result["minimize"] = bench_minimize(repeat)
        rows = 1_000_000 if cap is None else max(1, min(1_000_000, cap // 32))
        result["sparse"] = bench_sparse(repeat, rows=rows, touched=max(1, min(512, rows // 8)))
        if torch:
            result["model_shapes"] = bench_model_shapes(repeat, cap=cap)
            result["pytorch"] = bench_pytorch(repeat, cap=cap)
        result["cold"] = bench_cold()
        result["startup"] = bench_startup(repeat)
    if parallel:
        result["parallel"] = bench_parallel(repeat, dtypes=dtypes)
    result["specialisations"] = specialisations()
    return result


def _cpu_model():
    """The CPU's model name (Linux's /proc/cpuinfo), else the platform's."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _fmt(v, digits=3):
    if v is None:
        return "-"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    return f"{v:.{digits}g}"


def format_table(result):
    """The result as a Markdown table and a few lines of extras."""
    lines = ["| N | dtype | step µs | unchecked µs | GB/s | vs same-traffic kernel "
             "| speed-up vs NumPy reference | torch Adam fused GB/s (ours/torch) |",
             "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        vs_ref = r.get("vs_reference")
        torch = "-" if "torch_adam_gbps" not in r else (
            f"{_fmt(r['torch_adam_gbps'])} ({r['gbps_vs_torch']:.2f})")
        lines.append(
            f"| {r['n']:,} | {r['dtype']} | {_fmt(r['step_us'])} | "
            f"{_fmt(r['step_unchecked_us'])} | {_fmt(r['gbps'])} | "
            f"{r['vs_traffic']:.2f}x | {'-' if vs_ref is None else f'{vs_ref:.1f}x'} | "
            f"{torch} |")
    refs = {r["reference"] for r in result["rows"] if "reference" in r}
    if refs:
        lines.append(f"\nReference: {', '.join(sorted(refs))}.")
    if "check_finite_ratio" in result:
        c = ", ".join(f"{k} {v:.2f}x" for k, v in result["check_finite_ratio"].items())
        lines.append(f"check_finite=True / False at the largest N: {c}")
    for u in result.get("uniform", []):
        lines.append(f"gradients without exact zeros (uniform counts), {u['n']:,} {u['dtype']}: "
                     f"{u['no_zeros_us']:,.1f} µs vs {u['zeros_us']:,.1f} µs with zeros "
                     f"({u['ratio']:.2f}x), unchecked")
    if "many_small" in result:
        m = result["many_small"]
        lines.append(f"{m['arrays']} arrays x {m['size']:,} {m['dtype']} vs one array "
                     f"of {m['arrays'] * m['size']:,}: {m['many_arrays_us']:,.0f} µs vs "
                     f"{m['one_array_us']:,.0f} µs ({m['ratio']:.2f}x) with the same "
                     f"gradient arrays each step; {m['many_arrays_new_us']:,.0f} µs vs "
                     f"{m['one_array_new_us']:,.0f} µs ({m['ratio_new']:.2f}x) with new "
                     f"arrays each step")
    if "small" in result:
        s = result["small"]
        lines.append(f"step() on {s['n']} {s['dtype']} elements: {s['step_us']:.2f} µs, "
                     f"reference {s['reference_us']:.1f} µs ({s['speedup']:.1f}x faster)")
    for row in result.get("small_lists", ()):
        kind = "" if "float32" in row["case"] else " (float64)"
        lines.append(f"step() on {row['case']}{kind}: {row['step_us']:.2f} µs, "
                     f"reference {row['reference_us']:.1f} µs ({row['speedup']:.1f}x faster)")
    if "minimize" in result:
        m = result["minimize"]
        lines.append(f"minimize on {m['dim']}-D Rosenbrock: {m['iteration_us']:.1f} µs an "
                     f"iteration, rosen + rosen_der {m['fun_jac_us']:.1f} µs "
                     f"({m['ratio']:.2f}x)")
    if "sparse" in result:
        lines.append(_format_sparse(result["sparse"]))
    for row in result.get("model_shapes", ()):
        lines.append(f"step() on {row['case']} ({row['elements']:,} float32 in "
                     f"{row['arrays']} arrays): {row['step_us']:,.0f} µs, torch Adam fused "
                     f"{row['torch_adam_us']:,.0f} µs; bytes/s {row['bytes_per_s_vs_adam']:.2f}x"
                     f" Adam's, time {row['time_vs_adam']:.2f}x"
                     + (f" (check_finite=False {row['unchecked_step_us']:,.0f} µs, bytes/s "
                        f"{row['unchecked_bytes_per_s_vs_adam']:.2f}x)"
                        if "unchecked_step_us" in row else "")
                     + "; dense gradients "
                     f"{row['dense_step_us']:,.0f} µs, bytes/s "
                     f"{row['dense_bytes_per_s_vs_adam']:.2f}x Adam's; dense unchecked "
                     f"{row['dense_unchecked_us']:,.0f} µs, time "
                     f"{row['dense_unchecked_time_vs_adam']:.2f}x Adam's")
    for row in result.get("pytorch", ()):
        orig = ("" if "speedup_vs_original" not in row else
                f", original {row['original_us']:,.1f} µs ({row['speedup_vs_original']:.1f}x "
                f"faster; {row['original_vs_adam']:.1f}x fused Adam's time)")
        orig_bare = ("" if "speedup_vs_original" not in row else
                     f", {row['unchecked_speedup_vs_original']:.1f}x faster than the original")
        lines.append(f"PyTorch front end on {row['case']} ({row['elements']:,} float32): "
                     f"{row['ours_us']:,.1f} µs{orig}; torch Adam fused "
                     f"{row['adam_us']:,.1f} µs (time {row['time_vs_adam']:.2f}x Adam's, "
                     f"bytes/s {row['bytes_per_s_vs_adam']:.2f}x); check_finite=False "
                     f"{row['unchecked_us']:,.1f} µs (time "
                     f"{row['unchecked_time_vs_adam']:.2f}x Adam's{orig_bare})")
    if "cold" in result:
        lines.append(_format_cold(result["cold"]))
    if "startup" in result:
        s = result["startup"]
        lines.append(f"fresh process, import + first step: {s['import_step_ms']:.0f} ms vs "
                     f"'import numpy, numba' {s['import_numpy_numba_ms']:.0f} ms "
                     f"({s['ratio']:.2f}x) and numba's floor (one trivial cached "
                     f"function) {s['numba_floor_ms']:.0f} ms "
                     f"({s['ratio_to_floor']:.2f}x); kernels compiled there: "
                     f"{s['compiled_in_fresh_process']}; scipy.linalg/optimize, "
                     f"numba.cuda or numba.np.linalg imported: "
                     f"{s['heavy_modules_imported'] or 'none'}")
    for r in result.get("parallel", []):
        lines.append(f"{r['dtype']} n={r['n']:>10,}: serial {r['serial_us']:10,.1f} µs, "
                     f"parallel {r['parallel_us']:10,.1f} µs "
                     f"(parallel/serial {r['parallel_over_serial']:.2f})")
    spec = result.get("specialisations", {})
    if spec:
        lines.append("compiled kernels: " + "; ".join(
            f"{k} [{', '.join(v)}]" for k, v in spec.items()))
    m = result["machine"]
    lines.append(f"(parallel kernels from {result['parallel_min_size']:,} elements; "
                 f"{m['threads']} threads; {m['cpu']}, {m['cpus']} CPUs, {m['date']})")
    lines.append("Ratios in parentheses are medians of per-block ratios, not the ratio of "
                 "the two median times printed beside them (see bench --help).")
    return "\n".join(lines)


def _format_cold(c):
    w = c["wait"]
    return (f"cold cache: first small + first parallel-size float32 step "
            f"{c['first_small_step_s']:.3f} s + {c['first_parallel_step_s']:.3f} s against "
            f"a plain @njit loop {c['plain_serial_s']:.2f} s serial + "
            f"{c['plain_parallel_s']:.2f} s parallel ({c['ratio']:.2f}x; compiled by a "
            f"child process meanwhile, both kernels in use after "
            f"{c['compiled_after_s']:.1f} s); "
            f"compiling in the process (EXPECTIGRAD_NP_COMPILE=wait) "
            f"{w['first_small_step_s']:.2f} s + {w['first_parallel_step_s']:.2f} s "
            f"({w['ratio']:.1f}x)")


def add_arguments(parser):
    """Options of the ``bench`` subcommand."""
    parser.add_argument("--sizes", type=_sizes, default=list(DEFAULT_SIZES),
                        help="comma-separated array sizes, each from 1 to what memory "
                             "holds (default 10,1e3,1e5,1e6,1e7); given, the extras use "
                             "no array larger than the largest")
    parser.add_argument("--dtypes", type=lambda s: s.split(","),
                        default=list(DEFAULT_DTYPES),
                        help="comma-separated dtypes (default float32,float64)")
    parser.add_argument("--repeat", type=int, default=7,
                        help="timed blocks per measurement (default 7; some rows "
                             "take at least 3 or 9); medians are reported")
    parser.add_argument("--json", action="store_true",
                        help="print the results as JSON instead of a table")
    parser.add_argument("--no-extras", action="store_true",
                        help="only the table: skip the check_finite, many-arrays, "
                             "small-N and start-up measurements")
    parser.add_argument("--no-reference", action="store_true",
                        help="skip the NumPy reference timings")
    parser.add_argument("--no-torch", action="store_true",
                        help="skip torch.optim.Adam even when torch is installed")
    parser.add_argument("--cold", action="store_true",
                        help="only the cold-cache row: the first steps in a fresh "
                             "process with an empty NUMBA_CACHE_DIR, against compiling "
                             "a plain @njit loop of the same update")
    parser.add_argument("--mpi", action="store_true",
                        help="only the MPI row: the sharded step under mpiexec -n 3, "
                             "and on a machine with fewer cores, also with one rank a "
                             "core (needs mpi4py and an MPI)")
    parser.add_argument("--sparse", action="store_true",
                        help="only the row-sparse row: 512 of 1,000,000 x 32 float32 "
                             "rows per step, against the dense step")
    parser.add_argument("--pieces", action="store_true",
                        help="only what each piece of the fast step buys: the step "
                             "with it against the same step without it, on the case it "
                             "exists for (compiles twins of the kernels without prefetching "
                             "and without the four-stream check; about a minute)")
    parser.add_argument("--parallel", action="store_true",
                        help="also time the serial against the parallel kernel from "
                             "2**15 to 2**23 elements (how PARALLEL_MIN_SIZE is chosen)")


def _sizes(text):
    """``--sizes``: comma-separated sizes, ``1e6`` style allowed, each >= 1."""
    sizes = []
    for v in text.split(","):
        try:
            f = float(v)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{v!r} is not a number") from None
        if not (math.isfinite(f) and f >= 1 and f == int(f)):
            raise argparse.ArgumentTypeError(f"{v!r} is not a whole number >= 1")
        sizes.append(int(f))
    return sizes


def _largest_size():
    """The largest ``N`` this machine's memory holds for the bench: the
    step's five arrays, the same-traffic kernel's and the reference's copies,
    about 20 float64 arrays of ``N`` in all."""
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):     # not POSIX: no limit known
        return float("inf")
    return memory // (20 * 8)


def main(argv=None):
    """Entry point of ``python -m expectigrad_np bench [options]``."""
    parser = argparse.ArgumentParser(
        prog="python -m expectigrad_np bench",
        description="Time the fused Expectigrad step against a same-traffic kernel, the "
                    "NumPy reference and (with torch) torch.optim.Adam(fused=True).",
        epilog="Each ratio printed in parentheses is the median of per-block ratios (the "
               "things compared are timed in turn, block by block), not the ratio of the "
               "two median times beside it: the two differ when the machine is noisy.")
    add_arguments(parser)
    args = parser.parse_args(argv)
    # Time the kernels, not the reference steps taken while a kernel compiles
    # in the background (backends/background.py): compile before timing.  The
    # cold-cache row sets its own mode in its own processes.
    os.environ["EXPECTIGRAD_NP_COMPILE"] = "wait"
    for d in args.dtypes:
        if d not in DEFAULT_DTYPES:
            raise SystemExit(f"bench: unknown dtype {d!r}; use float32 and/or float64")
    if args.repeat < 1:
        raise SystemExit(f"bench: --repeat must be >= 1, got {args.repeat}")
    limit = _largest_size()
    too_big = [n for n in args.sizes if n > limit]
    if too_big:
        raise SystemExit(f"bench: --sizes {too_big[0]:.3g} needs more memory than this "
                         f"machine has (at most {limit:.3g} elements here); give smaller "
                         f"sizes")
    if args.mpi:
        row = bench_mpi(args.repeat)
        if row is None:
            raise SystemExit("bench --mpi: mpi4py or mpiexec is missing "
                             "(pip install 'expectigrad_np[mpi]')")
        out = {"mpi": row}
        cores = os.cpu_count() or 1
        if 2 <= cores < row["ranks"]:
            # Three ranks on fewer cores mostly measure ranks waiting for a
            # core: the same row with one rank a core beside it.
            out["mpi_one_rank_a_core"] = bench_mpi(args.repeat, ranks=cores)
        print(json.dumps(out, indent=1) if args.json else
              "\n".join(_format_mpi(r) for r in out.values()))
        return 0
    if args.sparse:
        row = bench_sparse(args.repeat)
        print(json.dumps({"sparse": row}, indent=1) if args.json else _format_sparse(row))
        return 0
    if args.pieces:
        from ._bench_pieces import bench_pieces, format_pieces
        rows = bench_pieces(args.repeat)
        print(json.dumps({"pieces": rows}, indent=1) if args.json else format_pieces(rows))
        return 0
    if args.cold:
        row = bench_cold()
        if args.json:
            print(json.dumps({"cold": row}, indent=1))
        else:
            print(_format_cold(row))
        return 0
    result = run(args.sizes, args.dtypes, args.repeat, extras=not args.no_extras,
                 reference=not args.no_reference, torch=not args.no_torch,
                 parallel=args.parallel)
    if args.json:
        print(json.dumps(result, indent=1, default=float))
    else:
        print(format_table(result))
    return 0
