"""Softmax regression, data parallel over MPI ranks with sharded optimizer state.

    mpiexec -n 3 python examples/mpi_logistic_regression.py [--steps 200]

Every rank draws its own minibatches of a synthetic 10-class problem and
steps ``expectigrad_np.mpi.Expectigrad`` (``shard_state=True``: each rank
keeps a third of the optimizer state).  The optimizer steps the mean of the
ranks' gradients, so all ranks hold the same weights; rank 0 also replays
the run in one process (the mean gradient of the same minibatches) and
prints the largest difference, and the test accuracy.
"""
import argparse

import numpy as np
from mpi4py import MPI

import expectigrad_np as eg
from expectigrad_np.mpi import Expectigrad


def data(n=6000, d=64, k=10, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((k, d))
    y = rng.integers(0, k, n)
    X = centers[y] + 2.0 * rng.standard_normal((n, d))
    return X, y


def gradient(W, b, X, y):
    z = X @ W + b
    z -= z.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    p[np.arange(len(y)), y] -= 1.0
    p /= len(y)
    return X.T @ p, p.sum(axis=0)


def batches(rank, steps, n, size=32):
    rng = np.random.default_rng(1000 + rank)               # each rank its own draws
    return [rng.integers(0, n, size) for _ in range(steps)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args(argv)
    comm = MPI.COMM_WORLD
    X, y = data()
    train, test = slice(0, 5000), slice(5000, None)
    W, b = np.zeros((64, 10)), np.zeros(10)
    opt = Expectigrad([W, b], lr=0.02)                      # shard_state=True by default
    for idx in batches(comm.rank, args.steps, 5000):
        opt.step(gradient(W, b, X[train][idx], y[train][idx]))
    same = comm.allgather(W.tobytes() + b.tobytes())
    assert all(s == same[0] for s in same), "the ranks' weights differ"
    if comm.rank == 0:
        # One process stepping the mean of the ranks' gradients.
        W1, b1 = np.zeros((64, 10)), np.zeros(10)
        one = eg.Expectigrad([W1, b1], lr=0.02)
        draws = [batches(r, args.steps, 5000) for r in range(comm.size)]
        for step in range(args.steps):
            gs = [gradient(W1, b1, X[train][d[step]], y[train][d[step]]) for d in draws]
            mean = [gs[0][j].copy() for j in range(2)]
            for g in gs[1:]:
                for j in range(2):
                    mean[j] += g[j]
            one.step([m / comm.size for m in mean])
        acc = float(np.mean(np.argmax(X[test] @ W + b, axis=1) == y[test]))
        diff = max(float(np.max(np.abs(W - W1))), float(np.max(np.abs(b - b1))))
        print(f"{comm.size} ranks, {args.steps} steps of 32 examples each: test accuracy "
              f"{acc:.3f}; state on rank 0: {opt.state_nbytes():,} bytes of "
              f"{sum(a.nbytes * 2 + a.size * 4 for a in (W, b)):,}")
        print(f"largest difference from one process stepping the mean: {diff:.1e}")
        return acc, diff
    return None


if __name__ == "__main__":
    main()
