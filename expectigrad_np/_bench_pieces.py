"""What each piece of the fast step buys: ``python -m expectigrad_np bench --pieces``.

Every piece that makes a step fast has a row here: the step with it against
the same step without it, on the case the piece exists for.  A ratio is the
time without the piece over the time with it (1.25: the piece saves a fifth
of the step), the median of per-block ratios of one interleaved run.

Pieces switched off without compiling anything: the cached small-step route
(``Expectigrad._quick``), kernels that hold the GIL for small buckets
(``kernels.SINGLE_STEP_GIL_MAX``), the compiled route (gradients located and
coefficients computed inside the kernel, ``locate.py``), the division-free
loop while counts are uniform.  Pieces that live in the compiled loops are
switched off in an uncached twin of the kernel (``ablated``): prefetching,
the four-stream check pass, and kernels holding only the loops a bucket
takes (``kernels.variant``), whose row times compiling.
"""
from __future__ import annotations

import time

import numpy as np
from numba import njit
from numba.core.registry import CPUDispatcher

from ._timing import _gradient, time_interleaved
from .optimizer import Expectigrad

__all__ = ["ablated", "bench_pieces"]


def _names(code):
    """The global names ``code`` and the code objects nested in it read."""
    out = set(code.co_names)
    for const in code.co_consts:
        if hasattr(const, "co_names"):
            out |= _names(const)
    return out


def ablated(dispatcher, overrides, suffix, everything=False, memo=None):
    """An uncached twin of the numba function ``dispatcher`` in which the
    globals named in ``overrides`` take the given values, at any depth: each
    numba function on the way down that reads one of them, directly or
    through the functions it calls, is twinned with the same options (its
    own name, so nothing is shared with the package's compiled code).
    ``dispatcher`` itself where nothing below it reads them.  With
    ``everything``, every numba function it reaches is twinned (a compile
    from nothing)."""
    from .backends.cpu.jit import twin
    memo = {} if memo is None else memo
    key = id(dispatcher)
    if key in memo:
        return memo[key]
    memo[key] = dispatcher                      # a recursive call sees the original
    py = dispatcher.py_func
    changed = {}
    for name in _names(py.__code__):
        if name in overrides:
            changed[name] = overrides[name]
            continue
        value = py.__globals__.get(name)
        if isinstance(value, CPUDispatcher):
            below = ablated(value, overrides, suffix, everything, memo)
            if below is not value:
                changed[name] = below
    if not changed and not everything:
        return dispatcher
    options = {k: v for k, v in dispatcher.targetoptions.items() if k != "nopython"}
    made = njit(**options)(twin(py, py.__name__ + suffix, **changed))
    memo[key] = made
    return made


@njit(inline="always", nogil=True, error_model="numpy")
def _no_prefetch(address, nbytes):
    """``intrinsics._prefetch_lines`` doing nothing."""
    return None


@njit(inline="always", nogil=True, error_model="numpy")
def _one_stream_sums(g, norm, clip, clipvalue):
    """``loops._span_sums`` read as one stream (the non-finite sum only: the
    rows time the check, which computes no norm)."""
    zero = g.dtype.type(0)
    nonfinite = zero
    for i in range(g.size):
        nonfinite += g[i] * zero
    return nonfinite, 0.0


def _step_time_pair(with_piece, without, repeat):
    (t_with, t_without), (_, ratio) = time_interleaved([with_piece, without], repeat)
    return t_with * 1e6, t_without * 1e6, float(ratio)


def _row(piece, case, where, with_us, without_us, buys):
    return dict(piece=piece, case=case, where=where, with_us=with_us,
                without_us=without_us, buys=buys)


def _small_routes(repeat):
    """The cached route, the GIL held, the compiled route."""
    from .backends.cpu import kernels as K
    rows = []
    g = _gradient(10, "float64")
    cached = Expectigrad(np.zeros(10), lr=1e-3)
    uncached = Expectigrad(np.zeros(10), lr=1e-3)

    def step_uncached():
        uncached._quick = None
        uncached.step(g)
    rows.append(_row("cached small-step route", "one 10-element float64 array",
                     "optimizer.py: Expectigrad._quick",
                     *_step_time_pair(lambda: cached.step(g), step_uncached, repeat)))

    # Holding the GIL lets the kernel read a list where it lies (no other
    # thread can change it meanwhile); a kernel that releases it reads a
    # tuple copy.  Neither side takes the cached route.
    gs = [g]
    held = Expectigrad([np.zeros(10)], lr=1e-3)
    saved = K.SINGLE_STEP_GIL_MAX
    K.SINGLE_STEP_GIL_MAX = -1
    try:
        released = Expectigrad([np.zeros(10)], lr=1e-3)
        released.step(gs)                        # the route is chosen now
    finally:
        K.SINGLE_STEP_GIL_MAX = saved

    def step_held():
        held._quick = None
        held.step(gs)
    rows.append(_row("the GIL held by the kernels of small buckets",
                     "one 10-element float64 array in a list, without the cached route",
                     "kernels.py: SINGLE_STEP_GIL_MAX",
                     *_step_time_pair(step_held, lambda: released.step(gs), repeat)))

    shapes = [(64, 32), (32,), (32, 10), (10,)]
    gs = [_gradient(int(np.prod(s)), "float64").reshape(s) for s in shapes]
    compiled = Expectigrad([np.zeros(s) for s in shapes], lr=1e-3)
    general = Expectigrad([np.zeros(s) for s in shapes], lr=1e-3)
    general._fast = general._quick = None        # kept until a hyperparameter changes
    rows.append(_row("the compiled route: gradients located, coefficients computed in "
                     "the kernel", "small MLP, 4 float64 arrays",
                     "locate.py, kernels.py: bucket_step",
                     *_step_time_pair(lambda: compiled.step(gs),
                                      lambda: general.step(gs), repeat)))
    return rows


def _uniform_loop(repeat, n=100_000):
    """Dense gradients: one optimizer keeps uniform counts, the other left
    them at one earlier zero and takes the general loop."""
    g = _gradient(n, "float32")
    g = np.where(g == 0, np.float32(1e-3), g)
    uniform = Expectigrad(np.zeros(n, np.float32), lr=1e-3, check_finite=False)
    general = Expectigrad(np.zeros(n, np.float32), lr=1e-3, check_finite=False)
    once = g.copy()
    once[0] = 0
    general.step(once)
    uniform.step(g)
    return _row("the division-free loop while every count equals the step count",
                f"{n:,} float32, gradients without zeros, unchecked",
                "loops.py: _update_uniform, _counts_before/_after",
                *_step_time_pair(lambda: uniform.step(g), lambda: general.step(g), repeat))


def _segments_args(n, dtype):
    """An optimizer on one array of ``n``, its bucket, the arguments of its
    segmented kernels after one step, and the gradient they point at (keep
    it alive while they are used)."""
    x, g = np.zeros(n, dtype), _gradient(n, dtype)
    opt = Expectigrad(x, lr=1e-3, check_finite=False)
    opt.step(g)
    b = opt._buckets[0]
    b.load_gradients([g])
    seg, lo, hi = b.chunks
    args = (b.x_addr, b.g_addr, b.offsets, seg, lo, hi, b.mean_sq, b.count, b.momentum,
            b.coef, b.flags)
    return opt, b, args, g


def _compiled_loops(repeat, n=10_000_000):
    """Prefetching and the four-stream check pass, in twins of the parallel
    segmented kernel without them."""
    from .backends.cpu import kernels as K
    from .backends.cpu.loops import loops_for
    rows = []
    opt, b, args, g = _segments_args(n, "float32")
    kernel = K.variant(loops_for(True, True, False)).segments_step_parallel
    plain = ablated(kernel, {"_prefetch_lines": _no_prefetch}, "_no_prefetch")
    update = args + (False, np.inf, 0.0, True)
    rows.append(_row("prefetching every line two blocks ahead in the update loops",
                     f"{n:,} float32, unchecked update", "intrinsics.py, loops.py: _blocks",
                     *_step_time_pair(lambda: kernel(*update), lambda: plain(*update),
                                      repeat)))
    one = ablated(kernel, {"_span_sums": _one_stream_sums}, "_one_stream")
    check = args + (True, np.inf, 0.0, False)
    rows.append(_row("the check pass read as four streams", f"{n:,} float32, the check alone",
                     "loops.py: _span_sums",
                     *_step_time_pair(lambda: kernel(*check), lambda: one(*check),
                                      repeat)))
    del opt, b, g
    return rows


def _variants(repeat=1):
    """Compiling the serial segmented kernel for float32 with only the loops
    of a default optimizer against compiling it with all ten (uncached twins,
    so both compile here)."""
    from .backends.cpu import kernels as K
    from .backends.cpu.loops import ALL_LOOPS, loops_for
    opt, _, args, g = _segments_args(1000, "float32")
    call = args + (True, np.inf, 0.0, True)
    times = {}
    for label, mask in (("with", loops_for(True, True, False)), ("without", ALL_LOOPS)):
        best = np.inf
        for k in range(max(1, repeat)):
            fresh = ablated(K.variant(mask).segments_step, {}, f"_compile_{label}_{k}",
                            everything=True)
            start = time.perf_counter()
            fresh(*call)
            best = min(best, time.perf_counter() - start)
        times[label] = best
    del opt, g
    return _row("kernels holding only the loops a bucket takes",
                "compiling the serial float32 kernel of a default optimizer",
                "kernels.py: variant", times["with"] * 1e6, times["without"] * 1e6,
                times["without"] / times["with"])


def bench_pieces(repeat):
    """Every row: the small routes, the uniform loop, prefetching, the
    four-stream check, the variants."""
    repeat = max(repeat, 9)
    rows = _small_routes(repeat)
    rows.append(_uniform_loop(repeat))
    rows += _compiled_loops(repeat)
    rows.append(_variants())
    return rows


def format_pieces(rows):
    lines = ["| piece | case | with | without | without / with |",
             "|---|---|---:|---:|---:|"]
    for r in rows:
        unit, scale = ("s", 1e-6) if r["with_us"] > 1e5 else ("µs", 1.0)
        lines.append(f"| {r['piece']} ({r['where']}) | {r['case']} | "
                     f"{r['with_us'] * scale:,.2f} {unit} | "
                     f"{r['without_us'] * scale:,.2f} {unit} | {r['buys']:.2f}x |")
    return "\n".join(lines)
