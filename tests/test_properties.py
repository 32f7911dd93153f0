"""Invariants of Expectigrad, checked on the package and on wrong variants.

Each property is a function returning the worst violation it found (0.0 or
an empty list when it holds).  The tests assert it holds for both backends
and that it fails for the mutant from ``oracles`` that breaks it.
"""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from oracles import DenseCountMutant, EmaMutant, InnerMomentumMutant, NoSqrtMutant, PaperExpectigrad

import expectigrad_np as eg

BACKENDS = {
    "cpu": lambda x, **kw: eg.Expectigrad(x, backend="cpu", **kw),
    "numpy": lambda x, **kw: eg.Expectigrad(x, backend="numpy", **kw),
}

betas = st.sampled_from([0.0, 0.5, 0.9, 0.99])
seeds = st.integers(0, 2**32 - 1)


def gradient_stream(seed, steps, size, zero_fraction=0.3, spread=3.0):
    """Random gradients with exact zeros and magnitudes over 10**±spread."""
    rng = np.random.default_rng(seed)
    g = rng.standard_normal((steps, size)) * 10.0 ** rng.uniform(-spread, spread, (steps, size))
    g[rng.random((steps, size)) < zero_fraction] = 0.0
    return g


def trajectory(make, x0, grads, **hyper):
    x = np.array(x0, dtype=np.float64)
    opt = make(x, **hyper)
    out = []
    for g in grads:
        opt.step(g.copy())
        out.append(x.copy())
    return np.array(out)


# --- bounded steps -------------------------------------------------------------

def bounded_step_violation(make, grads, lr, beta, eps, sparse_counter):
    """Largest excess of |dx_i| over lr*sqrt(n_i) (n_i: the counter after the
    step), and over lr on the first step.  Since s >= g^2, |u| <= sqrt(n), and
    the bias-corrected momentum is a convex combination of past u."""
    x = np.zeros(grads.shape[1])
    opt = make(x, lr=lr, beta=beta, eps=eps, sparse_counter=sparse_counter)
    n = np.zeros(grads.shape[1])
    worst = 0.0
    for t, g in enumerate(grads, start=1):
        before = x.copy()
        opt.step(g.copy())
        n = n + (g != 0) if sparse_counter else np.full_like(n, t)
        bound = lr * np.sqrt(n)
        if t == 1:
            # |u| = |g| / (eps + |g|) < 1; it rounds to 1 only when eps < ulp(|g|).
            bound = np.minimum(bound, lr)
        # Slack for rounding: a relative 1e-12 and the spacing of x itself.
        slack = bound * 1e-12 + 4 * np.spacing(np.maximum(np.abs(x), np.abs(before)))
        worst = max(worst, float(np.max(np.abs(x - before) - bound - slack, initial=0.0)))
    return worst


@pytest.mark.parametrize("backend", BACKENDS)
@given(seed=seeds, beta=betas, sparse=st.booleans(), steps=st.integers(1, 40),
       lr=st.floats(1e-4, 10.0), eps=st.floats(1e-12, 1e-2))
def test_bounded_steps(backend, seed, beta, sparse, steps, lr, eps):
    grads = gradient_stream(seed, steps, 6)
    assert bounded_step_violation(BACKENDS[backend], grads, lr, beta, eps, sparse) == 0.0


def test_bounded_steps_catches_ema():
    grads = gradient_stream(0, 10, 6)
    assert bounded_step_violation(EmaMutant, grads, 0.1, 0.9, 1e-8, True) > 0.0


# --- superposition: the outer momentum is a linear filter ---------------------------

def momentum_weights(lr, beta, steps):
    """w[k]: the weight of u_{k+1} in x_T - x_0 = -sum_k w[k] u_k, i.e.
    sum_{t>=k} lr/(1-beta^t) (1-beta) beta^(t-k)."""
    if beta == 0:
        return np.full(steps, lr)
    w = np.zeros(steps)
    for t in range(1, steps + 1):
        k = np.arange(1, t + 1)
        w[:t] += lr / (1 - beta ** t) * (1 - beta) * beta ** (t - k)
    return w


def filter_violation(make, grads, lr, beta, eps, sparse_counter):
    """Relative gap between the displacement after T steps and the
    bias-corrected EMA weights applied to the paper's u_1..u_T."""
    oracle = PaperExpectigrad(np.zeros(grads.shape[1]), eps=eps, sparse_counter=sparse_counter)
    u = np.array([oracle.adaptive(g) for g in grads])
    expected = -momentum_weights(lr, beta, len(grads)) @ u
    x = np.zeros(grads.shape[1])
    opt = make(x, lr=lr, beta=beta, eps=eps, sparse_counter=sparse_counter)
    for g in grads:
        opt.step(g.copy())
    return float(np.max(np.abs(x - expected) / (np.abs(expected) + 1e-300), initial=0.0))


def gradients_for_steps(u, eps):
    """Gradients that make the dense-counter adaptive step equal ``u``.

    Solves u = g / (eps + sqrt((s + g^2) / t)) for g, s the sum of earlier
    g^2: the right side increases with |g| from 0 to sqrt(t), and squaring
    gives a quadratic a g^2 - 2 |u| eps g + c = 0 with a = 1 - u^2/t,
    c = u^2 (eps^2 - s/t), whose larger root is the one wanted.
    """
    s = np.zeros(u.shape[1])
    grads = []
    for t, ut in enumerate(u, start=1):
        a = 1.0 - ut * ut / t
        c = ut * ut * (eps * eps - s / t)
        g = np.sign(ut) * (np.abs(ut) * eps + np.sqrt(ut * ut * eps * eps - a * c)) / a
        s = s + g * g
        grads.append(g)
    return np.array(grads)


def linearity_violation(make, u1, u2, lr, beta, eps=1.0):
    """|D(u1) + D(u2) - D(u1 + u2)| relative, D the displacement produced by
    the gradients whose adaptive steps are the given sequences."""
    def displacement(u):
        x = np.zeros(u.shape[1])
        opt = make(x, lr=lr, beta=beta, eps=eps, sparse_counter=False)
        for g in gradients_for_steps(u, eps):
            opt.step(g)
        return x
    d1, d2, d12 = displacement(u1), displacement(u2), displacement(u1 + u2)
    return float(np.max(np.abs(d1 + d2 - d12) / (np.abs(d12) + lr * 1e-3)))


def step_sequences(seed, steps, size):
    """Two adaptive-step sequences in (-0.45, 0.45): their sum is feasible too."""
    rng = np.random.default_rng(seed)
    return rng.uniform(-0.45, 0.45, (2, steps, size))


@pytest.mark.parametrize("backend", BACKENDS)
@given(seed=seeds, beta=betas, sparse=st.booleans(), steps=st.integers(1, 30))
def test_displacement_is_bias_corrected_ema_of_adaptive_steps(backend, seed, beta, sparse, steps):
    grads = gradient_stream(seed, steps, 5)
    assert filter_violation(BACKENDS[backend], grads, 0.01, beta, 1e-8, sparse) < 1e-9


@pytest.mark.parametrize("backend", BACKENDS)
@given(seed=seeds, beta=betas, steps=st.integers(1, 30))
def test_superposition_of_step_sequences(backend, seed, beta, steps):
    u1, u2 = step_sequences(seed, steps, 4)
    assert linearity_violation(BACKENDS[backend], u1, u2, 0.01, beta) < 1e-9


def test_superposition_catches_wrong_variants():
    grads = gradient_stream(1, 20, 5)
    assert filter_violation(InnerMomentumMutant, grads, 0.01, 0.9, 1e-8, True) > 1e-3
    u1, u2 = step_sequences(1, 20, 4)
    assert linearity_violation(EmaMutant, u1, u2, 0.01, 0.9) > 1e-3
    assert linearity_violation(InnerMomentumMutant, u1, u2, 0.01, 0.9) > 1e-3


# --- scale invariance ------------------------------------------------------------

def scale_violation(make, grads, c, beta, sparse_counter, eps=1e-200):
    x0 = np.linspace(-1, 1, grads.shape[1])
    a = trajectory(make, x0, grads, lr=0.01, beta=beta, eps=eps, sparse_counter=sparse_counter)
    b = trajectory(make, x0, grads * c, lr=0.01, beta=beta, eps=eps,
                   sparse_counter=sparse_counter)
    return float(np.max(np.abs(a - b)) / 0.01)


@pytest.mark.parametrize("backend", BACKENDS)
@given(seed=seeds, beta=betas, sparse=st.booleans(), steps=st.integers(1, 30),
       log_c=st.floats(-3, 3))
def test_scale_invariance(backend, seed, beta, sparse, steps, log_c):
    grads = gradient_stream(seed, steps, 5, spread=1.0)
    assert scale_violation(BACKENDS[backend], grads, 10.0 ** log_c, beta, sparse) < 1e-6


def test_scale_invariance_catches_missing_sqrt():
    grads = gradient_stream(2, 10, 5, spread=1.0)
    assert scale_violation(NoSqrtMutant, grads, 100.0, 0.9, True) > 1e-3


# --- sparse counter ---------------------------------------------------------------

def counter_violations(make, grads, beta):
    """Coordinates with an exactly zero gradient must keep s and n (so s/n and
    n); returns the list of (step, coordinate) where they changed."""
    x = np.zeros(grads.shape[1])
    opt = make(x, lr=0.01, beta=beta, eps=1e-8, sparse_counter=True)
    bad = []
    for t, g in enumerate(grads, start=1):
        mean0, n0 = read_counter_state(opt)
        opt.step(g.copy())
        mean1, n1 = read_counter_state(opt)
        zero = g == 0
        changed = zero & ((mean0 != mean1) | (n0 != n1))
        bad += [(t, i) for i in np.flatnonzero(changed)]
        if not np.array_equal(n1[~zero], n0[~zero] + 1):
            bad.append((t, "count"))
    return bad


def read_counter_state(opt):
    if isinstance(opt, eg.Expectigrad):
        state = opt.state_dict()["state"][0]
        return state["mean_sq"].copy(), state["count"].astype(np.float64)
    mean = np.divide(opt.s, opt.n, out=np.zeros(opt.s.shape), where=opt.n > 0)
    return mean, np.asarray(opt.n, dtype=np.float64).copy()


@pytest.mark.parametrize("backend", BACKENDS)
@given(seed=seeds, beta=betas, steps=st.integers(1, 30))
def test_sparse_counter_skips_zero_gradients(backend, seed, beta, steps):
    grads = gradient_stream(seed, steps, 6, zero_fraction=0.5)
    assert counter_violations(BACKENDS[backend], grads, beta) == []


def test_sparse_counter_catches_dense_counting():
    grads = gradient_stream(3, 10, 6, zero_fraction=0.5)
    assert counter_violations(DenseCountMutant, grads, 0.9) != []


@pytest.mark.parametrize("backend", BACKENDS)
@given(seed=seeds, beta=betas, steps=st.integers(1, 30))
def test_dense_counter_counts_every_step(backend, seed, beta, steps):
    """n = t: identical to the paper with the dense counter, and no count is stored."""
    grads = gradient_stream(seed, steps, 6, zero_fraction=0.5)
    x0 = np.linspace(-1, 1, 6)
    hyper = dict(lr=0.01, beta=beta, eps=1e-8, sparse_counter=False)
    got = trajectory(BACKENDS[backend], x0, grads, **hyper)
    want = trajectory(PaperExpectigrad, x0, grads, **hyper)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-15)
    opt = BACKENDS[backend](x0.copy(), **hyper)
    opt.step(grads[0].copy())
    assert "count" not in opt.state_dict()["state"][0]
