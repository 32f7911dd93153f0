"""Minibatch softmax regression through ``expectigrad_np.minimize(data=...)``.

Uses scikit-learn's bundled 8x8 digits (1797 images, 10 classes) when
scikit-learn is installed, else a synthetic 10-class problem of the same
size.  ``data`` is a callable that reshuffles the training set into
minibatches of 64 each epoch; ``fun(x, batch)`` returns the mean
cross-entropy of that batch and its gradient (``jac=True``).

    python examples/logistic_regression.py [--epochs 30] [--synthetic] [--progress]
"""
import argparse

import numpy as np

import expectigrad_np as eg


def load(synthetic=False, seed=0):
    if not synthetic:
        try:
            from sklearn.datasets import load_digits
        except ImportError:
            synthetic = True
        else:
            d = load_digits()
            return d.data / 16.0, d.target, "scikit-learn digits"
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((10, 64))
    y = rng.integers(0, 10, 1797)
    X = centers[y] + 2.5 * rng.standard_normal((1797, 64))
    return X, y, "synthetic 10-class data"


def make_loss(d, k, l2):
    def fun(x, batch):
        """Mean cross-entropy of softmax(X W + b) plus l2/2 |W|^2, and its gradient."""
        X, y = batch
        W, b = x[:d * k].reshape(d, k), x[d * k:]
        z = X @ W + b
        z -= z.max(axis=1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(axis=1, keepdims=True)
        n = len(y)
        loss = -np.mean(np.log(p[np.arange(n), y] + 1e-300)) + 0.5 * l2 * np.sum(W * W)
        p[np.arange(n), y] -= 1.0                   # dloss/dz = (p - onehot) / n
        p /= n
        grad = np.concatenate([(X.T @ p + l2 * W).ravel(), p.sum(axis=0)])
        return loss, grad
    return fun


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--synthetic", action="store_true", help="skip scikit-learn")
    ap.add_argument("--progress", action="store_true", help="tqdm progress bar")
    a = ap.parse_args(argv)

    X, y, name = load(a.synthetic)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(y))
    test, train = order[:360], order[360:]
    Xtr, ytr, Xte, yte = X[train], y[train], X[test], y[test]
    d, k = X.shape[1], 10

    def minibatches():
        """A fresh shuffle of the training set per epoch."""
        perm = rng.permutation(len(ytr))
        for i in range(0, len(perm), a.batch):
            j = perm[i:i + a.batch]
            yield Xtr[j], ytr[j]

    def report(intermediate_result):
        r = intermediate_result
        if r.nit % steps_per_epoch == 0 and r.epoch % max(1, a.epochs // 5) == 0:
            print(f"  epoch {r.epoch:3d}  step {r.nit:5d}  batch loss {r.fun:.4f}")

    steps_per_epoch = -(-len(ytr) // a.batch)
    fun = make_loss(d, k, l2=1e-4)
    print(f"{name}: {len(ytr)} train / {len(yte)} test, {d} features, {k} classes")
    res = eg.minimize(fun, np.zeros(d * k + k), jac=True, data=minibatches,
                      epochs=a.epochs, lr=a.lr, callback=report, progress=a.progress)
    W, b = res.x[:d * k].reshape(d, k), res.x[d * k:]
    acc = lambda X_, y_: float(np.mean(np.argmax(X_ @ W + b, axis=1) == y_))  # noqa: E731
    print(res.message, f"({res.nfev} minibatch evaluations)")
    print(f"last-epoch mean loss {res.fun:.4f}   train accuracy {acc(Xtr, ytr):.3f}   "
          f"test accuracy {acc(Xte, yte):.3f}")
    return res, acc(Xte, yte)


if __name__ == "__main__":
    main()
