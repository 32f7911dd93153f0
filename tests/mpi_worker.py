"""Run under ``mpiexec -n P`` by tests/test_mpi.py: data-parallel steps against
one process stepping the mean gradient, collective refusals, checkpoints,
with replicated state (``replicated``) or sharded (``sharded``).
Prints ``OK <rank>`` at the end; any failed check raises."""
import sys

import numpy as np
from mpi4py import MPI

import expectigrad_np as eg
from expectigrad_np.mpi import Expectigrad

comm = MPI.COMM_WORLD
rank, size = comm.rank, comm.size
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
