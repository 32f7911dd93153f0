"""Quickstart: fit y = X @ w + b with the stateful Expectigrad optimizer.

    python examples/quickstart.py
"""
import numpy as np

import expectigrad_np as eg

rng = np.random.default_rng(0)
X = rng.standard_normal((512, 8)).astype(np.float32)
y = X @ rng.standard_normal(8).astype(np.float32) + 0.5

w = np.zeros(8, np.float32)                  # parameters: updated in place
b = np.zeros(1, np.float32)
opt = eg.Expectigrad([w, b], lr=0.05)        # beta=0.9, eps=1e-8 by default

for step in range(1, 1001):
    r = X @ w + b - y                        # residuals
    grads = [2 * X.T @ r / len(y), 2 * r.mean(keepdims=True)]
    opt.step(grads)                          # one Expectigrad step, in place
    if step % 200 == 0:
        print(f"step {step:4d}  mse {np.mean(r ** 2):.3e}")
print("bias", float(b[0]), "(true 0.5)")
