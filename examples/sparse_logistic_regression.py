"""A hashed bag-of-words classifier trained with row-sparse gradients.

Synthetic documents of about 30 tokens each are hashed into 2**18 features
(a ``scipy.sparse`` CSR minibatch); a softmax-regression weight table ``W``
(features x classes) is trained twice from the same start:

* dense: the full gradient ``X.T @ (p - y)``, a 2**18 x classes array
  (zero outside the batch's features), steps every row of ``W``;
* row-sparse: only the rows of the features in the minibatch,
  ``RowSparse(features, X[:, features].T @ (p - y))``, eagerly (the
  default: the rows of the batch and those with momentum left);
* row-sparse with ``lazy=True``: only the rows of the batch, each step
  costing what the minibatch touches.

The eager run's table is bit for bit the dense run's.  The lazy run brings
the batch's rows up to date (``opt.sync(W, rows)``) before computing with
them, and its steps equal the dense ones to rounding; the printed
difference is that rounding, fed back through the gradients.

    python examples/sparse_logistic_regression.py [--steps 300] [--features 262144]
"""
import argparse
import os
import time

import numpy as np
import scipy.sparse as sp

import expectigrad_np as eg

# This example times its steps: compile the kernels before the first step rather
# than take the first steps on the NumPy reference while they compile.
os.environ.setdefault("EXPECTIGRAD_NP_COMPILE", "wait")


def make_data(n_docs, n_features, n_classes, vocab=50_000, length=30, seed=0):
    """Documents drawn from class-specific word distributions, hashed."""
    topic_words = np.random.default_rng(123).integers(0, vocab, (n_classes, 200))
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, n_docs)
    rows, cols = [], []
    for d in range(n_docs):
        own = rng.random(length) < 0.3
        words = np.where(own, topic_words[y[d], rng.integers(0, 200, length)],
                         rng.integers(0, vocab, length))
        rows.append(np.full(length, d))
        cols.append((words * 2654435761) % n_features)         # the hashing trick
    X = sp.csr_matrix((np.ones(n_docs * length, np.float32),
                       (np.concatenate(rows), np.concatenate(cols))),
                      shape=(n_docs, n_features))
    X.sum_duplicates()
    return X, y


def residual(X, W, y):
    """Softmax probabilities minus one-hot labels, over the batch size."""
    z = np.asarray(X @ W)
    z -= z.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    p[np.arange(len(y)), y] -= 1.0
    return (p / len(y)).astype(np.float32)


def sparse_gradient(X, W, y):
    """The gradient's nonzero rows: those of the features in the batch."""
    features = np.unique(X.indices)
    r = residual(X, W, y)
    return eg.RowSparse(features, np.asarray(X[:, features].T @ r, dtype=np.float32))


def dense_gradient(X, W, y):
    """The same gradient as a full table (the same sums: Expectigrad's
    normalised step tells a zero from a rounding error of 1e-12, so the two
    runs are compared on equal gradients)."""
    g = sparse_gradient(X, W, y)
    dense = np.zeros_like(W)
    dense[g.indices] = g.values
    return dense


def train(X, y, gradient, steps, batch, n_classes, lazy, seed=1):
    W = np.zeros((X.shape[1], n_classes), np.float32)
    opt = eg.Expectigrad([W], lr=0.05, beta=0.9, lazy=lazy)
    rng = np.random.default_rng(seed)
    batches = [rng.integers(0, X.shape[0], batch) for _ in range(steps)]
    opt.step([gradient(X[batches[0]], W, y[batches[0]])])      # compile before timing
    start = time.perf_counter()
    for b in batches[1:]:
        if lazy:
            # The batch's rows of W may lag (untouched since some steps):
            # bring just those up to date before computing with them.
            opt.sync(W, np.unique(X[b].indices))
        opt.step([gradient(X[b], W, y[b])])
    opt.sync()                                       # every lazy row brought up to date
    return W, time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--features", type=int, default=2**18)
    parser.add_argument("--classes", type=int, default=4)
    args = parser.parse_args(argv)
    X, y = make_data(4000, args.features, args.classes)
    X_test, y_test = make_data(1000, args.features, args.classes, seed=7)
    runs = {"dense gradients": (dense_gradient, False),
            "row-sparse, eager": (sparse_gradient, False),
            "row-sparse, lazy": (sparse_gradient, True)}
    print(f"{args.features:,} hashed features x {args.classes} classes, {args.steps} steps "
          f"of {args.batch} documents")
    results = {}
    for name, (gradient, lazy) in runs.items():
        W, seconds = train(X, y, gradient, args.steps, args.batch, args.classes, lazy)
        acc = float(np.mean(np.argmax(X_test @ W, axis=1) == y_test))
        results[name] = (W, seconds, acc)
        base = results["dense gradients"][1]
        print(f"{name + ':':20s} {seconds:7.2f} s ({base / seconds:5.1f}x), "
              f"test accuracy {acc:.3f}")
    W_dense = results["dense gradients"][0]
    same = np.array_equal(W_dense, results["row-sparse, eager"][0])
    diff = np.max(np.abs(results["row-sparse, lazy"][0] - W_dense)) / np.max(np.abs(W_dense))
    print(f"eager row-sparse weights identical to the dense run's: {same}")
    print(f"lazy row-sparse weights against the dense run's: largest difference {diff:.1e} "
          "of the largest weight")
    return results


if __name__ == "__main__":
    main()
