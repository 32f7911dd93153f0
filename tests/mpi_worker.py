"""Run under ``mpiexec -n P`` by tests/test_mpi.py: data-parallel steps against
one process stepping the mean gradient, collective refusals, checkpoints.
Prints ``OK <rank>`` at the end; any failed check raises."""
import sys

import numpy as np
from mpi4py import MPI

import expectigrad_np as eg
from expectigrad_np.mpi import Expectigrad

comm = MPI.COMM_WORLD
rank, size = comm.rank, comm.size
tmp = sys.argv[1]
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


xs = params()
groups = [{"params": xs[:2]}, {"params": xs[2:], "lr": 0.1}]
opt = Expectigrad(groups, chunk=8, **HYPER)             # small chunks: several per bucket
ref_xs = params()
ref = eg.Expectigrad([{"params": ref_xs[:2]}, {"params": ref_xs[2:], "lr": 0.1}], **HYPER)
for step in range(6):
    opt.step(grads(step, rank))
    ref.step(mean(step))
    gather_equal(xs)
    for a, b in zip(xs, ref_xs):
        assert np.array_equal(a, b), (step, a, b)

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

# Checkpoints: one file from rank 0, loaded by every rank and by one process.
path = f"{tmp}/mpi.npz"
opt.save(path)
comm.Barrier()
twin_xs = [np.zeros(s, d) for s, d in SHAPES]
twin = Expectigrad([{"params": twin_xs[:2]}, {"params": twin_xs[2:], "lr": 0.1}], **HYPER)
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
    assert np.array_equal(a, b) and np.array_equal(a, c)
gather_equal(xs)
print(f"OK {rank}", flush=True)
