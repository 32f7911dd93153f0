"""Expectigrad as a scipy.optimize method, next to scipy's own methods.

Minimises the 5-D Rosenbrock function from (-1.2, -1, -1, -1, -1) with
``scipy.optimize.minimize(..., method=expectigrad_np.minimize)`` and with
Nelder-Mead, CG, BFGS and L-BFGS-B, then once more with box bounds.

    python examples/scipy_rosenbrock.py [--maxiter 20000]

Expectigrad is a first-order method with a fixed step scale: it needs many
more (cheap) iterations than the quasi-Newton methods on a smooth, small
problem like this one; its home is noisy minibatch gradients (see
logistic_regression.py).  The table shows what each method costs here
(each timed on its second run, the first one warming up).
"""
import argparse
import os
import time

import numpy as np
from scipy.optimize import Bounds, minimize, rosen, rosen_der

import expectigrad_np as eg

# This example times its steps: compile the kernels before the first step rather
# than take the first steps on the NumPy reference while they compile.
os.environ.setdefault("EXPECTIGRAD_NP_COMPILE", "wait")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--maxiter", type=int, default=20_000)
    a = p.parse_args(argv)
    x0 = np.array([-1.2, -1.0, -1.0, -1.0, -1.0])

    runs = [
        ("Expectigrad", dict(method=eg.minimize, jac=rosen_der,
                             options=dict(lr=0.05, beta=0.9, maxiter=a.maxiter,
                                          gtol=1e-10))),
        ("Nelder-Mead", dict(method="Nelder-Mead",
                             options=dict(maxiter=a.maxiter, xatol=1e-10, fatol=1e-14))),
        ("CG", dict(method="CG", jac=rosen_der)),
        ("BFGS", dict(method="BFGS", jac=rosen_der)),
        ("L-BFGS-B", dict(method="L-BFGS-B", jac=rosen_der)),
    ]
    print(f"{'method':<12} {'f(x)':>10} {'|x - 1|max':>11} {'nit':>6} {'nfev':>6} "
          f"{'njev':>6} {'ms':>7}  message")
    results = {}
    for name, kw in runs:
        # Each method runs once untimed: Expectigrad's first call loads or
        # compiles its kernels (about 10 s with an empty compile cache; this
        # example waits for them, see the top).
        minimize(rosen, x0, **kw)
        t = time.perf_counter()
        res = minimize(rosen, x0, **kw)
        ms = 1e3 * (time.perf_counter() - t)
        results[name] = res
        print(f"{name:<12} {res.fun:10.2e} {np.max(np.abs(res.x - 1)):11.2e} "
              f"{res.nit:6d} {res.nfev:6d} {res.get('njev', 0):6d} {ms:7.1f}  "
              f"{res.message}")

    # Bounds: the minimiser of Rosenbrock inside [-2, 0.5]^5.  Expectigrad
    # projects every step onto the box; a callback watches the iterates.
    box = Bounds(-2.0, 0.5)
    worst = [0.0]

    def watch(intermediate_result):
        worst[0] = max(worst[0], float(np.max(intermediate_result.x)))

    print("\nwith bounds [-2, 0.5]^5:")
    for name, kw in [("Expectigrad", dict(method=eg.minimize, callback=watch,
                                          options=dict(lr=0.02, maxiter=a.maxiter,
                                                       gtol=1e-8))),
                     ("L-BFGS-B", dict(method="L-BFGS-B"))]:
        res = minimize(rosen, x0, jac=rosen_der, bounds=box, **kw)
        results[name + " bounded"] = res
        print(f"{name:<12} f = {res.fun:.6f}  x = {np.round(res.x, 4)}  nit = {res.nit}")
    print(f"largest coordinate of any Expectigrad iterate: {worst[0]} (<= 0.5)")
    return results


if __name__ == "__main__":
    main()
