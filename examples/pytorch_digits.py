"""A small CNN on scikit-learn's 8x8 digits with ``expectigrad_np.pytorch``,
against ``torch.optim.Adam`` from the same initial weights.

Prints test accuracy and median step time of each optimizer and, with
matplotlib installed, writes the training-loss curves to
``OUT/pytorch_digits.png``.  Without scikit-learn a synthetic 10-class
problem of the same size stands in.

    python examples/pytorch_digits.py [--epochs 15] [--out DIR]
"""
import argparse
import copy
import os
import time

import numpy as np
import torch

from expectigrad_np.pytorch import Expectigrad

# This example times its steps: compile the kernels before the first step rather
# than take the first steps on the NumPy reference while they compile.
os.environ.setdefault("EXPECTIGRAD_NP_COMPILE", "wait")


def load(seed=0):
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        rng = np.random.default_rng(seed)
        y = rng.integers(0, 10, 1797)
        X = rng.standard_normal((10, 64))[y] + 2.0 * rng.standard_normal((1797, 64))
        return X.reshape(-1, 8, 8), y, "synthetic 10-class data"
    d = load_digits()
    return d.images / 16.0, d.target, "scikit-learn digits"


def model():
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(32 * 4 * 4, 64), torch.nn.ReLU(),
        torch.nn.Linear(64, 10))


def train(net, opt, X, y, epochs, batch=64, seed=0):
    """Minibatch training; returns per-epoch mean losses and the median step
    time in seconds (the first step also loads or compiles the kernels)."""
    gen = torch.Generator().manual_seed(seed)
    losses, step_times = [], []
    for _ in range(epochs):
        order = torch.randperm(len(X), generator=gen)
        total = 0.0
        for i in range(0, len(X), batch):
            idx = order[i:i + batch]
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(net(X[idx]), y[idx])
            loss.backward()
            t0 = time.perf_counter()
            opt.step()
            step_times.append(time.perf_counter() - t0)
            total += loss.item() * len(idx)
        losses.append(total / len(X))
    return losses, float(np.median(step_times))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--out", default=".", help="folder for the plot")
    args = parser.parse_args(argv)

    images, labels, source = load()
    rng = np.random.default_rng(0)
    order = rng.permutation(len(images))
    split = int(0.8 * len(images))
    X = torch.tensor(images[order], dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(labels[order], dtype=torch.long)
    Xtr, ytr, Xte, yte = X[:split], y[:split], X[split:], y[split:]
    print(f"{source}: {split} training and {len(X) - split} test images")

    torch.manual_seed(0)
    init = model()
    results = {}
    for name, make in (("Expectigrad", lambda p: Expectigrad(p, lr=args.lr)),
                       ("Adam", lambda p: torch.optim.Adam(p, lr=args.lr))):
        net = copy.deepcopy(init)
        losses, step_s = train(net, make(net.parameters()), Xtr, ytr, args.epochs)
        with torch.no_grad():
            acc = (net(Xte).argmax(1) == yte).float().mean().item()
        results[name] = dict(losses=losses, accuracy=acc, step_us=step_s * 1e6)
        print(f"{name:12s} final loss {losses[-1]:.4f}  test accuracy {acc:.3f}  "
              f"step {step_s * 1e6:.0f} µs")

    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return results
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, r in results.items():
        ax.plot(range(1, args.epochs + 1), r["losses"], label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.set_title(f"small CNN on {source}")
    ax.legend()
    fig.tight_layout()
    path = os.path.join(args.out, "pytorch_digits.png")
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")
    return results


if __name__ == "__main__":
    main()
