"""The invariants of tests/test_properties.py, on the cuda backend.

The property functions are shared; each is shown to fail on a wrong variant
in tests/test_properties.py, and here once more on a wrong cuda kernel.
"""
import numpy as np
import pytest
from devarrays import CudaMirror, simulator_only
from hypothesis import given
from hypothesis import strategies as st
from oracles import PaperExpectigrad
from test_properties import (
    betas,
    bounded_step_violation,
    counter_violations,
    filter_violation,
    gradient_stream,
    linearity_violation,
    scale_violation,
    seeds,
    step_sequences,
    trajectory,
)

from expectigrad_np.backends.cuda import kernels as KC

steps_ = st.integers(1, 12)


@given(seed=seeds, beta=betas, sparse=st.booleans(), steps=steps_,
       lr=st.floats(1e-4, 10.0), eps=st.floats(1e-12, 1e-2))
def test_bounded_steps(seed, beta, sparse, steps, lr, eps):
    grads = gradient_stream(seed, steps, 6)
    assert bounded_step_violation(CudaMirror, grads, lr, beta, eps, sparse) == 0.0


@given(seed=seeds, beta=betas, sparse=st.booleans(), steps=steps_)
def test_displacement_is_bias_corrected_ema_of_adaptive_steps(seed, beta, sparse, steps):
    grads = gradient_stream(seed, steps, 5)
    assert filter_violation(CudaMirror, grads, 0.01, beta, 1e-8, sparse) < 1e-9


@given(seed=seeds, beta=betas, steps=steps_)
def test_superposition_of_step_sequences(seed, beta, steps):
    u1, u2 = step_sequences(seed, steps, 4)
    assert linearity_violation(CudaMirror, u1, u2, 0.01, beta) < 1e-9


@given(seed=seeds, beta=betas, sparse=st.booleans(), steps=steps_, log_c=st.floats(-3, 3))
def test_scale_invariance(seed, beta, sparse, steps, log_c):
    grads = gradient_stream(seed, steps, 5, spread=1.0)
    assert scale_violation(CudaMirror, grads, 10.0 ** log_c, beta, sparse) < 1e-6


@given(seed=seeds, beta=betas, steps=steps_)
def test_sparse_counter_skips_zero_gradients(seed, beta, steps):
    grads = gradient_stream(seed, steps, 6, zero_fraction=0.5)
    assert counter_violations(CudaMirror, grads, beta) == []


@given(seed=seeds, beta=betas, steps=steps_)
def test_dense_counter_counts_every_step(seed, beta, steps):
    grads = gradient_stream(seed, steps, 6, zero_fraction=0.5)
    x0 = np.linspace(-1, 1, 6)
    hyper = dict(lr=0.01, beta=beta, eps=1e-8, sparse_counter=False)
    got = trajectory(CudaMirror, x0, grads, **hyper)
    want = trajectory(PaperExpectigrad, x0, grads, **hyper)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-15)


@simulator_only
def test_properties_fail_on_a_wrong_kernel(monkeypatch):
    """A kernel whose counter saturates at 1 (a running mean that forgets)
    breaks the counter and the EMA-of-steps properties."""
    grads = gradient_stream(3, 8, 6, zero_fraction=0.5)
    assert counter_violations(CudaMirror, grads, 0.9) == []
    monkeypatch.setattr(KC, "_COUNT_MAX", np.uint32(1))
    assert counter_violations(CudaMirror, grads, 0.9) != []
    assert filter_violation(CudaMirror, grads, 0.01, 0.9, 1e-8, True) > 1e-3


@pytest.mark.parametrize("beta", [0.0, 0.9])
@pytest.mark.parametrize("sparse_counter", [True, False])
def test_original_project_sequence(beta, sparse_counter):
    """The original project's test sequence (first 60 of its 1000 steps),
    against the paper's pseudocode."""
    from oracles import original_test_gradient
    hyper = dict(lr=0.5, beta=beta, eps=1.0, sparse_counter=sparse_counter)
    x, x_paper = np.ones(2), np.ones(2)
    opt, paper = CudaMirror(x, **hyper), PaperExpectigrad(x_paper, **hyper)
    for t in range(1, 61):
        opt.step(original_test_gradient(x, t))
        paper.step(original_test_gradient(x_paper, t))
        np.testing.assert_allclose(x, x_paper, rtol=1e-10, atol=1e-18)
