"""A two-layer MLP with hand-written backprop: Expectigrad against Adam.

Three interleaved spirals (2-D inputs, 3 classes) are classified by
``softmax(relu(X W1 + b1) W2 + b2)``.  Both optimizers start from the same
float32 initialisation and see the same minibatches; Expectigrad is the
stateful ``expectigrad_np.Expectigrad``, Adam a plain NumPy implementation.

    python examples/mlp_numpy.py [--epochs 300] [--lr 0.01] [--out DIR]

With matplotlib installed the training curves are saved to DIR/mlp_numpy.png
(DIR defaults to the current directory).
"""
import argparse
import os

import numpy as np

import expectigrad_np as eg


def spirals(n_per_class=300, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    X, y = [], []
    for c in range(classes):
        r = np.linspace(0.05, 1.0, n_per_class)
        t = np.linspace(c * 4.0, (c + 1) * 4.0, n_per_class)
        t += 0.2 * rng.standard_normal(n_per_class)
        X.append(np.c_[r * np.sin(t), r * np.cos(t)])
        y.append(np.full(n_per_class, c))
    return np.concatenate(X).astype(np.float32), np.concatenate(y)


def init(hidden, seed=1, d=2, k=3):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((d, hidden)) * np.sqrt(2.0 / d)).astype(np.float32),
            np.zeros(hidden, np.float32),
            (rng.standard_normal((hidden, k)) * np.sqrt(1.0 / hidden)).astype(np.float32),
            np.zeros(k, np.float32)]


def loss_and_grads(params, X, y):
    """Mean cross-entropy and its gradients by backprop."""
    W1, b1, W2, b2 = params
    h_pre = X @ W1 + b1
    h = np.maximum(h_pre, 0)
    z = h @ W2 + b2
    z -= z.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    n = len(y)
    loss = float(-np.mean(np.log(p[np.arange(n), y] + 1e-30)))
    dz = p
    dz[np.arange(n), y] -= 1
    dz /= n                                     # d loss / d z
    dW2, db2 = h.T @ dz, dz.sum(axis=0)
    dh = (dz @ W2.T) * (h_pre > 0)              # back through relu
    dW1, db1 = X.T @ dh, dh.sum(axis=0)
    return loss, [dW1, db1, dW2, db2]


class Adam:
    """Kingma & Ba: m, v moving averages, bias-corrected, x -= lr m^ / (sqrt(v^) + eps)."""

    def __init__(self, params, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8):
        self.params, self.lr, self.b1, self.b2, self.eps = params, lr, beta1, beta2, eps
        self.m = [np.zeros_like(p) for p in params]
        self.v = [np.zeros_like(p) for p in params]
        self.t = 0

    def step(self, grads):
        self.t += 1
        c1, c2 = 1 - self.b1 ** self.t, 1 - self.b2 ** self.t
        for p, g, m, v in zip(self.params, grads, self.m, self.v):
            m += (1 - self.b1) * (g - m)
            v += (1 - self.b2) * (g * g - v)
            p -= (self.lr / c1) * m / (np.sqrt(v / c2) + self.eps)


def train(opt_name, params, X, y, epochs, lr, batch, seed=2):
    opt = (eg.Expectigrad(params, lr=lr) if opt_name == "Expectigrad"
           else Adam(params, lr=lr))
    rng = np.random.default_rng(seed)            # same minibatches for both
    curve = []
    for _ in range(epochs):
        perm = rng.permutation(len(y))
        for i in range(0, len(y), batch):
            j = perm[i:i + batch]
            _, grads = loss_and_grads(params, X[j], y[j])
            opt.step(grads)
        curve.append(loss_and_grads(params, X, y)[0])
    return curve


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=300)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--out", default=".", help="folder for the PNG")
    a = ap.parse_args(argv)

    X, y = spirals()
    start = init(a.hidden)
    curves, accuracy = {}, {}
    for name in ("Expectigrad", "Adam"):
        params = [p.copy() for p in start]       # the same initialisation
        curves[name] = train(name, params, X, y, a.epochs, a.lr, a.batch)
        W1, b1, W2, b2 = params
        pred = np.argmax(np.maximum(X @ W1 + b1, 0) @ W2 + b2, axis=1)
        accuracy[name] = float(np.mean(pred == y))
        c = curves[name]
        print(f"{name:<12} loss: epoch 1 {c[0]:.4f}, epoch {len(c) // 2} "
              f"{c[len(c) // 2 - 1]:.4f}, final {c[-1]:.4f}   "
              f"accuracy {accuracy[name]:.3f}   (dtype {W1.dtype})")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(install matplotlib for the plot)")
        return curves, accuracy
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, c in curves.items():
        ax.plot(np.arange(1, len(c) + 1), c, label=name)
    ax.set(yscale="log", xlabel="epoch", ylabel="training loss",
           title=f"2-layer MLP on spirals, lr={a.lr}")
    ax.legend()
    fig.tight_layout()
    path = os.path.join(a.out, "mlp_numpy.png")
    fig.savefig(path, dpi=120)
    print("saved", path)
    return curves, accuracy


if __name__ == "__main__":
    main()
