"""Independent statements of Expectigrad and deliberately wrong variants.

``PaperExpectigrad`` transcribes the published pseudocode literally (sum of
squares ``s``, counter ``n``, ``0/0 := 0`` by masking) so the package, which
stores ``s / n`` instead, is checked against the equations as printed.

The mutants each break one property the tests claim; every property test
is also run against the mutant it should catch, to show it can fail.
All share the stateful API of ``Expectigrad`` for one array:
``opt = Cls(x, lr=..., beta=..., eps=..., sparse_counter=...); opt.step(g)``.
"""
import numpy as np


class PaperExpectigrad:
    """The pseudocode of Daley & Amato (2020), line by line, in float64."""

    def __init__(self, x, lr=1e-3, beta=0.9, eps=1e-8, sparse_counter=True):
        self.x, self.lr, self.beta, self.eps = x, lr, beta, eps
        self.sparse_counter = sparse_counter
        self.s = np.zeros(x.shape)
        self.n = np.zeros(x.shape)
        self.m = np.zeros(x.shape)
        self.t = 0

    def adaptive(self, g):
        """u = g / (eps + sqrt(s / n)) with 0/0 := 0, after updating s and n."""
        self.t += 1
        self.s += g * g
        self.n = self.n + np.sign(g * g) if self.sparse_counter else np.full(g.shape, self.t)
        mean = np.divide(self.s, self.n, out=np.zeros(g.shape), where=self.n > 0)
        return g / (self.eps + np.sqrt(mean))

    def step(self, g):
        u = self.adaptive(np.asarray(g, dtype=np.float64))
        if self.beta == 0:
            self.x -= self.lr * u
        else:
            self.m = self.beta * self.m + (1 - self.beta) * u
            self.x -= self.lr / (1 - self.beta ** self.t) * self.m


class EmaMutant(PaperExpectigrad):
    """Wrong: an exponential moving average of g**2 (RMSProp/Adam style)."""

    def adaptive(self, g):
        self.t += 1
        self.s = 0.999 * self.s + 0.001 * g * g
        return g / (self.eps + np.sqrt(self.s))


class InnerMomentumMutant(PaperExpectigrad):
    """Wrong: momentum on the raw gradient, normalised afterwards (Adam style)."""

    def step(self, g):
        g = np.asarray(g, dtype=np.float64)
        self.t += 1
        self.s += g * g
        self.n = self.n + np.sign(g * g) if self.sparse_counter else np.full(g.shape, self.t)
        mean = np.divide(self.s, self.n, out=np.zeros(g.shape), where=self.n > 0)
        self.m = self.beta * self.m + (1 - self.beta) * g
        corr = 1 - self.beta ** self.t if self.beta else 1.0
        self.x -= self.lr / corr * self.m / (self.eps + np.sqrt(mean))


class NoSqrtMutant(PaperExpectigrad):
    """Wrong: divides by the mean square instead of its root."""

    def adaptive(self, g):
        super().adaptive(g)  # updates s, n and t
        mean = np.divide(self.s, self.n, out=np.zeros(g.shape), where=self.n > 0)
        return g / (self.eps + mean)


class DenseCountMutant(PaperExpectigrad):
    """Wrong: counts every step even when the sparse counter is asked for."""

    def __init__(self, x, **kw):
        kw["sparse_counter"] = False
        super().__init__(x, **kw)


def original_test_gradient(x, t):
    """Gradient of the original project's test problem:
    f_t(x) = 3 x0**2 on odd t, x0**2 + 8 x1**2 on even t."""
    a = np.array([3.0, 0.0]) if t % 2 == 1 else np.array([1.0, 8.0])
    return 2.0 * a * x
