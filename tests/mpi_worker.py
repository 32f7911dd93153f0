"""Run under ``mpiexec -n P`` by tests/test_mpi.py: data-parallel steps against
one process stepping the mean gradient, collective refusals, checkpoints,
with replicated state (``replicated``) or sharded (``sharded``).
Prints ``OK <rank>`` at the end; any failed check raises."""
import os
import sys

import numpy as np
from mpi4py import MPI

import expectigrad_np as eg
from expectigrad_np.backends import background
from expectigrad_np.mpi import Expectigrad

comm = MPI.COMM_WORLD
rank, size = comm.rank, comm.size


def _abort_on_failure(kind, value, tb):
    """A failed check on one rank ends every rank at once (the others would
    wait in their next collective until the test's timeout)."""
    sys.__excepthook__(kind, value, tb)
    sys.stderr.flush()
    comm.Abort(1)


sys.excepthook = _abort_on_failure
tmp = sys.argv[1]
SHARDED = sys.argv[2] == "sharded"
SHAPES = [((5, 3), np.float64), ((7,), np.float32), ((2, 2), np.float64)]
HYPER = dict(lr=0.05, global_clipnorm=3.0, weight_decay=0.01)


def params():
    rng = np.random.default_rng(123)
    return [rng.standard_normal(s).astype(d) for s, d in SHAPES]


def grads(step, r):
    rng = np.random.default_rng(1000 * step + r)
    out = [rng.standard_normal(s).astype(d) * (rng.random(s) > 0.2) for s, d in SHAPES]
    if step % 3 == 2:
        out[1] = None                                   # the same on every rank
    return out


def mean(step):
    per_rank = [grads(step, r) for r in range(size)]
    out = []
    for k in range(len(SHAPES)):
        if per_rank[0][k] is None:
            out.append(None)
            continue
        acc = per_rank[0][k].copy()
        for r in range(1, size):
            acc += per_rank[r][k]
        out.append(acc / acc.dtype.type(size))
    return out


def gather_equal(arrays):
    """Every rank holds the same bits."""
    blobs = comm.allgather(b"".join(np.ascontiguousarray(a).tobytes() for a in arrays))
    assert all(b == blobs[0] for b in blobs), "ranks differ"


def same(a, b, clipped, sharded=None):
    """Bit for bit; with norm clipping under sharded state, to rounding
    (the norms are summed over the ranks in another order)."""
    if clipped and (SHARDED if sharded is None else sharded):
        np.testing.assert_allclose(a, b, rtol=1e-12 if a.dtype == np.float64 else 2e-6,
                                   atol=0)
    else:
        assert np.array_equal(a, b), (a, b)


def build(xs, **hyper):
    return Expectigrad([{"params": xs[:2]}, {"params": xs[2:], "lr": 0.1}], chunk=8,
                       shard_state=SHARDED, **hyper)


# Without clipping: every rank has the bits of one process, float32 too.
plain = dict(lr=0.05, weight_decay=0.01, beta=0.9)
xs = params()
opt = build(xs, **plain)
ref_xs = params()
ref = eg.Expectigrad([{"params": ref_xs[:2]}, {"params": ref_xs[2:], "lr": 0.1}], **plain)
for step in range(6):
    opt.step(grads(step, rank))
    ref.step(mean(step))
    gather_equal(xs)
    for a, b in zip(xs, ref_xs):
        same(a, b, False)
if SHARDED:
    assert type(opt).__name__ == "ShardedExpectigrad"
    full = sum(x.nbytes * 2 + x.size * 4 for x in xs)     # mean_sq + momentum + count
    shares = comm.allgather(opt.state_nbytes())
    assert sum(shares) <= full + 64 * size and max(shares) <= full / size + 64 * len(xs), (
        shares, full)
    sd, rsd = opt.state_dict(), ref.state_dict()
    for i in rsd["state"]:
        for key, value in rsd["state"][i].items():
            assert np.array_equal(sd["state"][i][key], value), (i, key)

# With clipping (norms, global norm, value), groups, None gradients.
xs = params()
opt = build(xs, clipvalue=2.0, clipnorm=4.0, **HYPER)
ref_xs = params()
ref = eg.Expectigrad([{"params": ref_xs[:2]}, {"params": ref_xs[2:], "lr": 0.1}],
                     clipvalue=2.0, clipnorm=4.0, **HYPER)
for step in range(6):
    opt.step(grads(step, rank))
    ref.step(mean(step))
    gather_equal(xs)
    for a, b in zip(xs, ref_xs):
        same(a, b, True)
HYPER = dict(HYPER, clipvalue=2.0, clipnorm=4.0)

# A NaN on one rank: every rank refuses, nothing changes anywhere.
before = [x.copy() for x in xs]
g = grads(10, rank)
if rank == size - 1:
    g[0][0, 0] = np.nan
try:
    opt.step(g)
except FloatingPointError:
    pass
else:
    raise AssertionError("a NaN on one rank was not refused")
assert all(np.array_equal(a, b) for a, b in zip(before, xs))

# Ranks disagreeing on None, or a malformed gradient on one rank: every rank raises.
if size > 1:
    g = grads(11, rank)
    if rank == 0:
        g[0] = None
    try:
        opt.step(g)
    except ValueError as exc:
        assert "disagree" in str(exc)
    else:
        raise AssertionError("disagreeing None gradients were accepted")
g = grads(12, rank)
if rank == 1 % size:
    g[2] = np.zeros((3, 3))
try:
    opt.step(g)
except ValueError as exc:
    assert "shape" in str(exc) or "rank" in str(exc), exc
else:
    raise AssertionError("a malformed gradient on one rank was accepted")
assert all(np.array_equal(a, b) for a, b in zip(before, xs))
# Every gradient None on every rank: nothing changes, and no rank is left waiting.
steps_before = opt.step_count
opt.step([None] * len(xs))
assert opt.step_count == steps_before
assert all(np.array_equal(a, b) for a, b in zip(before, xs))

# Checkpoints: one file from rank 0, loaded by every rank and by one process.
path = f"{tmp}/mpi.npz"
opt.save(path)
comm.Barrier()
twin_xs = [np.zeros(s, d) for s, d in SHAPES]
twin = Expectigrad([{"params": twin_xs[:2]}, {"params": twin_xs[2:], "lr": 0.1}],
                   shard_state=not SHARDED, **HYPER)      # the other kind of state
twin.load(path)
single_xs = [np.zeros(s, d) for s, d in SHAPES]
single = eg.Expectigrad([{"params": single_xs[:2]}, {"params": single_xs[2:], "lr": 0.1}],
                        **HYPER)
single.load(path)
for step in range(20, 23):
    opt.step(grads(step, rank))
    twin.step(grads(step, rank))
    single.step(mean(step))
for a, b, c in zip(xs, twin_xs, single_xs):
    same(a, b, True, sharded=True)          # one of the two is sharded
    same(a, c, True)
gather_equal(xs)

# A checkpoint of one process continues under P ranks (sharded or not).
single.save(f"{tmp}/single.npz") if rank == 0 else None
comm.Barrier()
resumed_xs = [np.zeros(s, d) for s, d in SHAPES]
resumed = Expectigrad([{"params": resumed_xs[:2]}, {"params": resumed_xs[2:], "lr": 0.1}],
                      shard_state=SHARDED, **HYPER)
resumed.load(f"{tmp}/single.npz")
for step in range(30, 33):
    resumed.step(grads(step, rank))
    single.step(mean(step))
for a, c in zip(resumed_xs, single_xs):
    same(a, c, True)
gather_equal(resumed_xs)

# minimize(..., comm=): each rank minimises over its own shard of the data;
# every rank returns the same result, that of one process minimising the
# mean over the ranks (the same sums, in rank order).
rng = np.random.default_rng(7)
A = rng.standard_normal((12 * size, 4))
b = A @ np.array([1.0, -2.0, 0.5, 3.0]) + 0.1 * rng.standard_normal(12 * size)


def least_squares(w, batch):
    X, y = batch
    r = X @ w - y
    return 0.5 * float(r @ r) / len(y), X.T @ r / len(y)


def shard(r):
    rows = np.arange(r, 12 * size, size)
    return [(A[rows[i:i + 4]], b[rows[i:i + 4]]) for i in range(0, 12, 4)]


def mean_over_ranks(w, k):
    parts = [least_squares(w, shard(r)[k]) for r in range(size)]
    f, g = parts[0][0], parts[0][1].copy()
    for fr, gr in parts[1:]:
        f += fr
        g += gr
    return f / size, g / size


for stochastic in (True, False):
    if stochastic:
        res = eg.minimize(least_squares, np.zeros(4), jac=True, data=shard(rank), epochs=5,
                          lr=0.05, comm=comm)
        ref_res = eg.minimize(mean_over_ranks, np.zeros(4), jac=True, data=[0, 1, 2],
                              epochs=5, lr=0.05)
    else:
        full = (A[rank::size], b[rank::size])
        res = eg.minimize(lambda w: least_squares(w, full), np.zeros(4), jac=True,
                          maxiter=40, lr=0.05, comm=comm)
        parts = [(A[r::size], b[r::size]) for r in range(size)]

        def full_mean(w):
            vals = [least_squares(w, p) for p in parts]
            f, g = vals[0][0], vals[0][1].copy()
            for fr, gr in vals[1:]:
                f += fr
                g += gr
            return f / size, g / size
        ref_res = eg.minimize(full_mean, np.zeros(4), jac=True, maxiter=40, lr=0.05)
    gather_equal([res.x, np.array([res.fun, res.nit, res.status], float)])
    assert np.array_equal(res.x, ref_res.x), (res.x, ref_res.x)
    assert res.fun == ref_res.fun and res.nit == ref_res.nit and res.status == ref_res.status
print(f"OK {rank}", flush=True)

# Row-sparse gradients: every rank its own rows (replicated: their mean stays
# row-sparse; sharded: made dense), against one process stepping the dense mean.
for dtype in (np.float64, np.float32):
    E, E_ref = np.ones((9, 2), dtype), np.ones((9, 2), dtype)
    opt = Expectigrad([E], lr=0.05, shard_state=SHARDED)
    ref = eg.Expectigrad([E_ref], lr=0.05)
    for step in range(5):
        def rows_of(r):
            g = np.random.default_rng(50 * step + r)
            idx = g.integers(0, 9, 3)
            return eg.RowSparse(idx, g.standard_normal((3, 2)).astype(dtype))
        dense = [rows_of(r).todense(E_ref) for r in range(size)]
        acc = dense[0].copy()
        for d in dense[1:]:
            acc += d
        # one rank passes its gradient dense in the last step: the mean is then dense
        mine = rows_of(rank)
        opt.step([mine.todense(E) if step == 4 and rank == 0 else mine])
        ref.step([acc / dtype(size)])
        gather_equal([E])
        assert np.array_equal(E, E_ref), (dtype, step, E, E_ref)
print(f"row-sparse OK {rank}", flush=True)

# lazy=True: replicated state steps the row-sparse mean lazily, as one lazy
# process does; sharded state refuses it on every rank, saying what to pass.
if SHARDED:
    try:
        Expectigrad([np.ones((9, 2))], lr=0.05, lazy=True, shard_state=True)
    except ValueError as exc:
        assert "shard_state=False" in str(exc), exc
    else:
        raise AssertionError("lazy=True was accepted with sharded state")
else:
    E, E_ref = np.ones((9, 2)), np.ones((9, 2))
    opt = Expectigrad([E], lr=0.05, lazy=True, shard_state=False)
    ref = eg.Expectigrad([E_ref], lr=0.05, lazy=True)
    for step in range(4):
        def rows_of(r):
            g = np.random.default_rng(70 * step + r)
            return eg.RowSparse(g.integers(0, 9, 2), g.standard_normal((2, 2)))
        parts = [rows_of(r) for r in range(size)]
        acc = parts[0].todense(E_ref)
        for part in parts[1:]:
            acc += part.todense(E_ref)
        touched = np.unique(np.concatenate([part.indices for part in parts]))
        opt.step([parts[rank]])
        ref.step([eg.RowSparse(touched, acc[touched] / size)])
        assert np.array_equal(E, E_ref), (step, E, E_ref)
    opt.sync()
    ref.sync()
    gather_equal([E])
    assert np.array_equal(E, E_ref), (E, E_ref)
print(f"lazy OK {rank}", flush=True)


def raises_everywhere(kind, fn, *needles):
    """``fn()`` raises ``kind`` on every rank (no rank left waiting), its
    message holding one of ``needles`` where given."""
    try:
        fn()
    except kind as exc:
        assert not needles or any(n in str(exc) for n in needles), exc
    else:
        raise AssertionError(f"{fn} did not raise {kind.__name__}")
    comm.Barrier()


# A schedule whose value one rank's shard of dtypes refuses (float32 here,
# float64 elsewhere): refused on every rank, nothing changed anywhere.
xs = [np.linspace(-1, 1, 8), np.ones(1, np.float32)]
opt = Expectigrad([{"params": xs, "lr": lambda t: 1e-2 if t == 0 else 1e38}],
                  shard_state=SHARDED)
opt.step([np.ones(8), np.ones(1, np.float32)])
before = [x.copy() for x in xs]
raises_everywhere(ValueError, lambda: opt.step([np.ones(8), np.ones(1, np.float32)]),
                  "lr schedule returned")
assert all(np.array_equal(a, b) for a, b in zip(xs, before)) and opt.step_count == 1

# A schedule and None gradients: the schedule sees the optimizer's step count
# on every rank, also where this rank's pieces all had None.
xs, ref_xs = [np.linspace(-1, 1, 8), np.ones(3)], [np.linspace(-1, 1, 8), np.ones(3)]
schedule = eg.schedules.exponential_decay(0.1, 0.5, 1)
opt = Expectigrad(xs, lr=schedule, shard_state=SHARDED)
ref = eg.Expectigrad(ref_xs, lr=schedule)
for step in range(5):
    g = [None if step % 2 else np.full(8, 0.5), np.full(3, -1.0)]
    opt.step(g)
    ref.step(g)
    assert all(np.array_equal(a, b) for a, b in zip(xs, ref_xs)), step

# A schedule is called once a step on each rank, at the optimizer's step
# count, as by one process (the value checked on every rank is the one used).
calls = []
xs = [np.linspace(-1, 1, 8), np.ones(3, np.float32)]
opt = Expectigrad(xs, lr=lambda t: calls.append(t) or 0.1 / (t + 1), shard_state=SHARDED)
for step in range(4):
    opt.step([np.full(8, 0.5), np.ones(3, np.float32)])
opt.param_groups[0]["beta"] = 0.5          # a changed group keeps the rule
opt.step([np.full(8, 0.5), np.ones(3, np.float32)])
assert calls == [0, 1, 2, 3, 4], calls

# A parameter made read-only on one rank: refused on every rank, nothing changed.
xs = [np.linspace(-1, 1, 8), np.ones(3)]
opt = Expectigrad(xs, lr=0.1, shard_state=SHARDED)
before = [x.copy() for x in xs]
xs[1].flags.writeable = rank != size - 1
raises_everywhere(ValueError, lambda: opt.step([np.ones(8), np.ones(3)]), "read-only")
xs[1].flags.writeable = True
assert all(np.array_equal(a, b) for a, b in zip(xs, before))

# Attributes and constructor arguments that are checked on every rank.
raises_everywhere(ValueError, lambda: Expectigrad([np.zeros(3)], shard_state=SHARDED,
                                                  chunk=0 if rank == 0 else 4), "chunk")
for bad in (-1.0, 0.0, float("nan")):
    raises_everywhere(ValueError, lambda: setattr(opt, "global_clipnorm", bad),
                      "global_clipnorm")
raises_everywhere(TypeError, lambda: setattr(opt, "check_finite", "yes"), "check_finite")

# A 0-d parameter, and a bare one, step as in one process.
x0, y0, xb, yb = np.array(1.5), np.array(1.5), np.linspace(0, 1, 5), np.linspace(0, 1, 5)
o0 = Expectigrad([x0], lr=0.1, shard_state=SHARDED)
r0 = eg.Expectigrad([y0], lr=0.1)
ob = Expectigrad(xb, lr=0.1, shard_state=SHARDED)
rb = eg.Expectigrad(yb, lr=0.1)
for step in range(3):
    o0.step([np.array(0.5 + rank)])
    r0.step([np.array(np.mean([0.5 + r for r in range(size)]))])
    ob.step(np.full(5, 1.0 + rank))
    acc = np.full(5, 1.0)
    for r in range(1, size):
        acc += np.full(5, 1.0 + r)
    rb.step(acc / size)
    assert np.array_equal(x0, y0) and np.array_equal(xb, yb), step

# A load or load_state_dict that one rank refuses changes nothing on any rank.
xs, ref_xs = params(), params()
opt, ref = build(xs, **plain), build(ref_xs, **plain)
for step in range(2):
    opt.step(grads(step, rank))
    ref.step(grads(step, rank))
path = f"{tmp}/refused.npz"
opt.save(path)
saved = opt.state_dict()
for step in range(2, 4):
    opt.step(grads(step, rank))
    ref.step(grads(step, rank))
bad = saved
if rank == size - 1:
    bad = dict(saved, state=dict(saved["state"]))
    bad["state"][0] = dict(bad["state"][0], mean_sq=-np.ones(SHAPES[0][0]))
raises_everywhere(ValueError, lambda: opt.load_state_dict(bad), "negative")
raises_everywhere((OSError, ValueError),
                  lambda: opt.load(path if rank != size - 1 else f"{tmp}/missing.npz"))
for step in range(4, 6):
    opt.step(grads(step, rank))
    ref.step(grads(step, rank))
assert all(np.array_equal(a, b) for a, b in zip(xs, ref_xs))
assert opt.step_count == ref.step_count == 6
gather_equal(xs)

# Momentum switched on later gives the same bits whatever shares a dtype (and
# so whatever each rank's shard holds): a group built with beta=0 keeps none
# until its beta becomes positive.
xs = [np.linspace(-1, 1, 13).astype(np.float32), np.ones(4, np.float32)]
alone = [np.linspace(-1, 1, 13).astype(np.float32)]
opt = Expectigrad([{"params": xs[:1], "beta": 0.0}, {"params": xs[1:], "beta": 0.5}],
                  lr=0.01, shard_state=SHARDED)
ref = eg.Expectigrad([{"params": alone, "beta": 0.0}], lr=0.01)
for step in range(5):
    if step == 2:
        opt.param_groups[0]["beta"] = 0.3
        ref.param_groups[0]["beta"] = 0.3
    g = np.random.default_rng(step).standard_normal(13).astype(np.float32)
    opt.step([g, np.ones(4, np.float32)])
    ref.step([g])
    assert np.array_equal(xs[0], alone[0]), step

# Rows every rank touches, in any overlap: the mean is summed in rank order,
# as the dense mean is (3 and more ranks: a + b + c, not a + (b + c)).
E, E_ref = np.zeros((6, 3)), np.zeros((6, 3))
opt = Expectigrad([E], lr=0.1, shard_state=SHARDED)
ref = eg.Expectigrad([E_ref], lr=0.1)
for step in range(25):
    parts = []
    for r in range(size):
        g = np.random.default_rng(500 * step + r)
        rows = g.integers(0, 6, int(g.integers(1, 5)))
        parts.append(eg.RowSparse(rows, g.standard_normal((rows.size, 3))))
    acc = parts[0].todense(E_ref)
    for part in parts[1:]:
        acc += part.todense(E_ref)
    opt.step([parts[rank]])
    ref.step([acc / size])
    assert np.array_equal(E, E_ref), step

# minimize(comm=): a callback's StopIteration on one rank stops every rank.
def stop_on_rank_0(intermediate_result):
    if rank == 0 and intermediate_result.nit == 4:
        raise StopIteration


res = eg.minimize(lambda w: (float(w @ w), 2 * w), np.ones(3), jac=True, lr=0.05,
                  maxiter=50, callback=stop_on_rank_0, comm=comm)
assert res.status == 99 and res.nit == 4, (res.status, res.nit)

# Errors of one rank only, of any kind, reach every rank (none is left
# waiting in a collective), as their kind where it is an OSError.
if size > 1:
    raises_everywhere(ValueError, lambda: Expectigrad([np.ones(4)], chunk=1 + rank,
                                                      shard_state=SHARDED),
                      "different chunk sizes")

    def failing_on_last(t):
        if rank == size - 1:
            raise RuntimeError("schedule failed")
        return 0.1
    xs = [np.ones(6)]
    opt = Expectigrad(xs, lr=failing_on_last, shard_state=SHARDED)
    raises_everywhere(Exception, lambda: opt.step([np.ones(6)]), "schedule failed")
    assert np.all(xs[0] == 1) and opt.step_count == 0
    opt = Expectigrad(xs, lr=lambda t: float("nan") if rank == size - 1 else 0.1,
                      shard_state=SHARDED)
    raises_everywhere(ValueError, lambda: opt.step([np.ones(6)]), "lr schedule returned nan")
    assert np.all(xs[0] == 1) and opt.step_count == 0
    opt = Expectigrad(xs, lr=0.1, shard_state=SHARDED)
    path = os.path.join(sys.argv[1], f"missing-{size}-{SHARDED}.npz")
    path = comm.bcast(path if rank == 0 else None)
    opt.save(path)                      # collective
    mine = path if rank < size - 1 else path + ".not-there"
    raises_everywhere(OSError, lambda: opt.load(mine), "No such file")

    class Unpicklable(Exception):       # a local class: pickles on no rank
        pass

    # An exception that does not pickle reaches every rank; an OSError as one.
    for kind, message, caught in ((Unpicklable, "bad batch", Exception),
                                  (OSError, "disk gone", OSError)):
        def objective(w, batch, kind=kind, message=message):
            if rank == size - 1:
                raise kind(message)
            return float(w @ w), 2 * w
        raises_everywhere(caught, lambda: eg.minimize(
            objective, np.ones(2), jac=True, data=[0, 1], comm=comm), message)
    one_shot = iter([0, 1]) if rank == size - 1 else [0, 1]
    raises_everywhere(Exception, lambda: eg.minimize(
        lambda w, b: (float(w @ w), 2 * w), np.ones(2), jac=True, data=one_shot, epochs=2,
        comm=comm), "one-shot iterator")

    # Hyperparameters that differ between ranks: every rank refuses the step
    # before anything changes, naming the first that differs.
    def state_of(o):
        return {i: {k: np.array(v) for k, v in e.items()}
                for i, e in o.state_dict()["state"].items()}

    changes = [
        (lambda o: o.param_groups[0].__setitem__("lr", 0.1 + 0.1 * rank),
         "'lr' this step is 0.1 on rank 0"),
        (lambda o: o.param_groups[0].__setitem__("beta", 0.5 if rank else 0.9), "'beta'"),
        (lambda o: o.param_groups[0].__setitem__("eps", 1e-8 if rank else 1e-6), "'eps'"),
        (lambda o: o.param_groups[0].__setitem__("clipnorm", None if rank else 5.0),
         "'clipnorm'"),
        (lambda o: setattr(o, "check_finite", rank == 0), "check_finite"),
        (lambda o: setattr(o, "global_clipnorm", None if rank else 1.0), "global_clipnorm"),
        (lambda o: o.param_groups[0].__setitem__(
            "lr", (lambda t: 0.1 * (1 + rank * (t > 0))) if rank else 0.1),
         "'lr' this step is 0.1 on rank 0 and 0.2"),
    ]
    for change, needle in changes:
        xs = [np.linspace(-1, 1, 6), np.ones(3, np.float32)]
        opt = Expectigrad(xs, lr=0.1, shard_state=SHARDED)
        opt.step([np.ones(6), np.ones(3, np.float32)])
        before, state = [x.copy() for x in xs], state_of(opt)
        change(opt)
        raises_everywhere(ValueError, lambda: opt.step([np.full(6, 2.0),
                                                        np.ones(3, np.float32)]), needle)
        assert all(np.array_equal(a, b) for a, b in zip(xs, before)) and opt.step_count == 1
        after = state_of(opt)
        assert all(np.array_equal(after[i][k], state[i][k]) for i in state for k in state[i])
    # A gradient whose cast to the parameter's dtype overflows on one rank,
    # with floating-point errors raised there: every rank refuses the step (the
    # inf it casts to), none is left waiting.
    xs = [np.zeros(4, np.float32)]
    opt = Expectigrad(xs, lr=0.1, shard_state=SHARDED)
    big = np.full(4, 1e300 if rank == size - 1 else 1.0)
    with np.errstate(all="raise"):
        raises_everywhere(FloatingPointError, lambda: opt.step([big]), "NaN or infinity")
    assert not xs[0].any() and opt.step_count == 0

    # Finite gradients whose sum over the ranks overflows: the mean is inf,
    # refused on every rank; just below the size that needs a look at the
    # mean (the largest float over 2 P), the step goes through.
    for dtype in (np.float32, np.float64):
        top = np.finfo(dtype).max
        xs = [np.zeros(5, dtype)]
        opt = Expectigrad(xs, lr=0.1, shard_state=SHARDED)
        raises_everywhere(FloatingPointError, lambda: opt.step([np.full(5, top * 0.6, dtype)]),
                          "NaN or infinity")
        assert not xs[0].any() and opt.step_count == 0
        g = np.full(5, dtype(top / (2 * size)), dtype)
        g[1::2] *= -1
        opt.step([g])
        assert np.isfinite(xs[0]).all() and xs[0].any() and opt.step_count == 1

    if SHARDED:
        # What a step costs in collectives: a plain one, the reduce-scatter and
        # the all-gather with the agreement on errors and settings beside them
        # (nonblocking); one more small collective only where some rank needs it
        # (here: a NaN on one rank, a norm to clip by, other settings).
        class Counting:
            def __init__(self, comm):
                self.comm, self.calls = comm, []

            def __getattr__(self, name):
                attr = getattr(self.comm, name)
                if not callable(attr):
                    return attr

                def call(*args, **kwargs):
                    self.calls.append(name)
                    return attr(*args, **kwargs)
                return call

        counting = Counting(comm)
        xs = [np.zeros(6), np.zeros(4, np.float32)]
        opt = Expectigrad(xs, lr=0.1, comm=counting)
        g = [np.linspace(-1, 1, 6), np.ones(4, np.float32)]
        counting.calls.clear()
        opt.step(g)
        assert counting.calls == ["Iallgather", "Alltoallv", "Alltoallv", "Allgatherv",
                                  "Allgatherv"], counting.calls
        bad = [g[0].copy(), g[1]]
        bad[0][2] = np.nan if rank == size - 1 else 0.0
        counting.calls.clear()
        raises_everywhere(FloatingPointError, lambda: opt.step(bad), "NaN or infinity")
        assert counting.calls.count("allgather") == 1 and "Allgatherv" not in counting.calls
        opt.param_groups[0]["clipnorm"] = 1.0
        counting.calls.clear()
        opt.step(g)
        assert counting.calls.count("allgather") == 1, counting.calls
        opt.param_groups[0]["clipnorm"] = None
        if size > 1:
            opt.param_groups[0]["lr"] = 0.1 if rank else 0.2
            raises_everywhere(ValueError, lambda: opt.step(g), "different hyperparameters")
            assert opt.step_count == 2

    # Optimizers built differently on different ranks: refused at construction.
    a, b, c = np.zeros(4), np.zeros(4), np.zeros(4)
    groups = ([{"params": [a, b]}, {"params": [c], "lr": 0.2}] if rank == 0 else
              [{"params": [a]}, {"params": [b, c], "lr": 0.2}])
    raises_everywhere(ValueError, lambda: Expectigrad(groups, lr=0.1, shard_state=SHARDED),
                      "parameters per param group")
    raises_everywhere(ValueError, lambda: Expectigrad([a], shard_state=rank == 0, chunk=64),
                      "shard_state")
    if not SHARDED:
        raises_everywhere(ValueError, lambda: Expectigrad([a], shard_state=False,
                                                          lazy=rank == 0), "lazy")

    # A step of None gradients only calls no schedule and compares no lr, as
    # in one process.
    xs = [np.linspace(-1, 1, 6)]
    opt = Expectigrad(xs, lr=0.1 if rank else (lambda t: 0.1 if t == 0 else -1.0),
                      shard_state=SHARDED)
    before = xs[0].copy()
    opt.step([np.ones(6)])
    moved = xs[0].copy()
    opt.step([None])
    assert opt.step_count == 1 and np.array_equal(xs[0], moved)       # as one process
    assert not np.array_equal(moved, before)

    # A refused step leaves no schedule value behind: the retry calls the
    # schedule again (it may answer otherwise now), as one process does.
    scale = [1.0]
    xs, ref_xs = [np.zeros(3)], [np.zeros(3)]
    opt = Expectigrad(xs, lr=lambda t: 0.1 * scale[0], shard_state=SHARDED)
    ref = eg.Expectigrad(ref_xs, lr=lambda t: 0.1 * scale[0])
    bad = np.array([np.nan if rank == 0 else 1.0, 1.0, 1.0])
    raises_everywhere(FloatingPointError, lambda: opt.step([bad]))
    scale[0] = 0.5
    opt.step([np.ones(3)])
    ref.step([np.ones(3)])
    assert np.array_equal(xs[0], ref_xs[0]), (xs[0], ref_xs[0])

    # The values a step uses are compared, not how they were given: a schedule
    # on one rank and the number it gives on another step together.
    xs, ref_xs = [np.linspace(-1, 1, 6)], [np.linspace(-1, 1, 6)]
    opt = Expectigrad(xs, lr=0.1 if rank else (lambda t: 0.1), shard_state=SHARDED)
    ref = eg.Expectigrad(ref_xs, lr=0.1)
    for step in range(3):
        opt.step([np.full(6, 1.0 + step)])
        ref.step([np.full(6, 1.0 + step)])
    assert np.array_equal(xs[0], ref_xs[0])

# A step allocates nothing the size of the gradients: peak resident memory
# over two steps, after a first one has allocated the optimizer's buffers.
def peak_kib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))


if os.access("/proc/self/clear_refs", os.W_OK):
    big, g = [np.zeros(1 << 22)], [np.ones(1 << 22)]          # 32 MiB each
    opt = Expectigrad(big, lr=0.01, shard_state=SHARDED, chunk=1 << 16)
    opt.step(g)
    background.wait_all()       # a cold cache: the kernels, not the reference, step
    opt.step(g)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = peak_kib()
    for _ in range(2):
        opt.step(g)
    assert peak_kib() - base < 8 * 1024, (peak_kib(), base)
    # Gradients of another dtype, or strided: cast and gathered in the copy
    # into the optimizer's buffer, not through a copy of their own.
    g32, strided = [np.ones(1 << 22, np.float32)], [np.ones(1 << 23)[::2]]
    opt.step(g32)
    opt.step(strided)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = peak_kib()
    opt.step(g32)
    opt.step(strided)
    assert peak_kib() - base < 8 * 1024, (peak_kib(), base)

comm.Barrier()
print(f"collective checks OK {rank}", flush=True)
