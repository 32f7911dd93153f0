"""Reddi et al. (2018): Adam fails on a simple online convex problem.

On x in [-1, 1] the losses are f_t(x) = C*x when t % 3 == 1 and -x otherwise
(C = 3).  Over each cycle of three steps they sum to (C - 2) * x, so the best
point is x = -1.  Adam with beta1 = 0 and beta2 = 1 / (1 + C**2) forgets the
rare large gradient C quickly and drifts to +1, the worst point.  Expectigrad
divides by the arithmetic mean of all squared gradients, which remembers it,
and goes to -1.  Both use lr = 0.1, start at 0 and are projected onto [-1, 1].

    python examples/adam_divergence.py [--steps 30000] [--out DIR]

With matplotlib installed, both trajectories are saved to
DIR/adam_divergence.png (DIR defaults to the current directory).
"""
import argparse
import os

import numpy as np

# The problem, a minimal NumPy Adam and the Expectigrad run (stateful API,
# projected with np.clip after each step) live in the package's demo.
from expectigrad_np.demo import reddi_gradient, run_adam, run_expectigrad

C, LR = 3.0, 0.1


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30_000)
    p.add_argument("--out", default=".", help="folder for the PNG")
    a = p.parse_args(argv)
    adam = run_adam(a.steps, LR, beta1=0.0, beta2=1.0 / (1.0 + C * C), C=C)
    expg = run_expectigrad(a.steps, LR, beta=0.9, C=C)
    regret = lambda xs: float(np.mean([reddi_gradient(t, C) * (x + 1.0)  # noqa: E731
                                       for t, x in enumerate(xs, 1)]))
    print(f"{a.steps} steps, optimum x* = -1")
    print(f"  Adam (beta1=0, beta2={1 / (1 + C * C):.2f}): final x = {adam[-1]:+.4f}, "
          f"average regret {regret(adam):.3f}")
    print(f"  Expectigrad (beta=0.9):          final x = {expg[-1]:+.4f}, "
          f"average regret {regret(expg):.3f}")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(install matplotlib for the plot)")
        return adam, expg
    fig, ax = plt.subplots(figsize=(7, 3.5))
    t = np.arange(1, a.steps + 1)
    ax.plot(t, adam, label="Adam", lw=0.8)
    ax.plot(t, expg, label="Expectigrad", lw=0.8)
    ax.axhline(-1, color="k", ls=":", lw=0.8)
    ax.set(xscale="log", xlabel="step", ylabel="x", ylim=(-1.1, 1.1),
           title="f_t(x) = 3x every third step, -x otherwise")
    ax.legend()
    path = os.path.join(a.out, "adam_divergence.png")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print("saved", path)
    return adam, expg


if __name__ == "__main__":
    main()
