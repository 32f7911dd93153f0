"""``python -m expectigrad_np demo``: what Expectigrad does, in a minute.

1. The counterexample of Reddi et al. (2018) on which Adam converges to the
   worst point while Expectigrad finds the optimum.
2. A small softmax-regression model trained with the stateful API.
3. ``minimize``: the same optimizer as a scipy.optimize method, on Rosenbrock.
"""
from __future__ import annotations

import numpy as np

from .optimizer import Expectigrad


def reddi_gradient(t: int, C: float = 3.0) -> float:
    """Gradient of f_t(x) = C*x on every third step (t = 1, 4, 7, ...), -x
    otherwise.  The average gradient (C - 2)/3 > 0, so the best point of
    [-1, 1] is x = -1."""
    return C if t % 3 == 1 else -1.0


def run_adam(steps, lr, beta1, beta2, eps=1e-8, x0=0.0, C=3.0):
    """A minimal NumPy Adam (Kingma & Ba, with bias correction), clipped to
    [-1, 1].  Returns the iterates."""
    x, m, v = x0, 0.0, 0.0
    xs = np.empty(steps)
    for t in range(1, steps + 1):
        g = reddi_gradient(t, C)
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        m_hat = m / (1 - beta1 ** t) if beta1 > 0 else m
        v_hat = v / (1 - beta2 ** t)
        x = min(1.0, max(-1.0, x - lr * m_hat / (np.sqrt(v_hat) + eps)))
        xs[t - 1] = x
    return xs


def run_expectigrad(steps, lr, beta=0.9, x0=0.0, C=3.0):
    """Expectigrad with the stateful API on the same problem, clipped to
    [-1, 1].  Returns the iterates."""
    x = np.array([x0])
    opt = Expectigrad(x, lr=lr, beta=beta)
    g = np.zeros(1)
    xs = np.empty(steps)
    for t in range(1, steps + 1):
        g[0] = reddi_gradient(t, C)
        opt.step(g)
        np.clip(x, -1.0, 1.0, out=x)
        xs[t - 1] = x[0]
    return xs


def counterexample(steps=30_000, lr=0.1, C=3.0, out=print):
    out(f"1. Reddi et al. (2018): f_t(x) = {C:g}x every third step, -x otherwise, "
        "x in [-1, 1]")
    out(f"   The optimum is x = -1 (the average gradient is (C-2)/3 > 0). "
        f"{steps:,} steps, lr = {lr}, start x = 0.")
    beta2 = 1.0 / (1.0 + C * C)
    rows = [
        (f"Adam (beta1=0, beta2=1/(1+C^2)={beta2:.2f})", run_adam(steps, lr, 0.0, beta2, C=C)),
        ("Adam (beta1=0.9, beta2=0.999)", run_adam(steps, lr, 0.9, 0.999, C=C)),
        ("Expectigrad (beta=0.9)", run_expectigrad(steps, lr, 0.9, C=C)),
        ("Expectigrad (beta=0)", run_expectigrad(steps, lr, 0.0, C=C)),
    ]
    width = max(len(name) for name, _ in rows)
    tail = min(3000, steps)
    out(f"   {'method':<{width}}  final x  mean x, last {tail:,}  verdict")
    for name, xs in rows:
        mean = float(np.mean(xs[-tail:]))
        verdict = "optimum" if mean <= -0.9 else ("WORST POINT" if mean >= 0.9 else "between")
        out(f"   {name:<{width}}  {xs[-1]:+7.3f}  {mean:+15.3f}  {verdict}")
    return {name: xs for name, xs in rows}


def softmax_regression(epochs=20, n=3000, d=20, k=4, batch=100, seed=0, out=print):
    """Train W, b of a softmax classifier on synthetic clusters; print the loss."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((k, d)) * 2.0
    y = rng.integers(0, k, n)
    X = (centers[y] + rng.standard_normal((n, d)) * 3.0).astype(np.float32)
    W = np.zeros((d, k), np.float32)
    b = np.zeros(k, np.float32)
    opt = Expectigrad([W, b], lr=0.005)

    def loss_and_grads(Xb, yb):
        z = Xb @ W + b
        z -= z.max(axis=1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(axis=1, keepdims=True)
        loss = -np.mean(np.log(p[np.arange(len(yb)), yb] + 1e-12))
        p[np.arange(len(yb)), yb] -= 1.0
        p /= len(yb)
        return float(loss), Xb.T @ p, p.sum(axis=0)

    out(f"2. Softmax regression, {n} samples x {d} features, {k} classes, "
        f"minibatches of {batch}, float32:")
    losses = [loss_and_grads(X, y)[0]]
    out(f"   epoch   0   loss {losses[0]:.4f}   (before training)")
    for epoch in range(1, epochs + 1):
        order = rng.permutation(n)
        for start in range(0, n, batch):
            idx = order[start:start + batch]
            _, gW, gb = loss_and_grads(X[idx], y[idx])
            opt.step([gW, gb])
        loss, _, _ = loss_and_grads(X, y)
        losses.append(loss)
        if epoch in (1, 2, 3, 5, 10) or epoch == epochs:
            acc = np.mean(np.argmax(X @ W + b, axis=1) == y)
            out(f"   epoch {epoch:3d}   loss {loss:.4f}   accuracy {acc:6.1%}")
    return losses


def rosenbrock(maxiter=20_000, out=print):
    """5-D Rosenbrock through ``scipy.optimize.minimize(method=minimize)``,
    next to scipy's BFGS."""
    from scipy.optimize import minimize as scipy_minimize
    from scipy.optimize import rosen, rosen_der

    from ._minimize import minimize

    x0 = np.array([-1.2, -1.0, -1.0, -1.0, -1.0])
    out("3. minimize: scipy.optimize.minimize(rosen, x0, jac=rosen_der, "
        "method=expectigrad_np.minimize, ...)")
    out("   5-D Rosenbrock from (-1.2, -1, -1, -1, -1)")
    results = {}
    for name, kw in [("Expectigrad", dict(method=minimize, options=dict(
                         lr=0.05, maxiter=maxiter, gtol=1e-10))),
                     ("BFGS", dict(method="BFGS"))]:
        res = scipy_minimize(rosen, x0, jac=rosen_der, **kw)
        results[name] = res
        out(f"   {name:<11}  f = {res.fun:.2e}  nit = {res.nit:6d}  "
            f"nfev = {res.nfev:6d}  {res.message}")
    return results


def main(argv=None, out=print):
    out("Expectigrad: arithmetic RMS + outer momentum (Daley & Amato, 2020)\n")
    counterexample(out=out)
    out("")
    softmax_regression(out=out)
    out("")
    rosenbrock(out=out)
    return 0
