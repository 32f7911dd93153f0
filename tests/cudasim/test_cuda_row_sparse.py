"""Row-sparse gradients on the cuda backend (simulator or GPU): the same
semantics as on the host, each step equal to the dense step of the
densified gradient (the numpy backend's, to 1e-12 in float64, 1e-5 in
float32), eager and lazy."""
import numpy as np
import pytest
from devarrays import to_device, to_host
from hypothesis import given
from hypothesis import strategies as st
from numba import cuda

import expectigrad_np as eg

TOL = {np.float64: 1e-12, np.float32: 1e-5}


def run(dtype, lazy, hyper, steps, seed, shape=(12, 3), device_values=False):
    rng = np.random.default_rng(seed)
    table = rng.standard_normal(shape).astype(dtype)
    bias = rng.standard_normal(4).astype(dtype)
    xs_dev = to_device([table, bias])
    xs_ref = [table.copy(), bias.copy()]
    gpu = eg.Expectigrad(xs_dev, lazy=lazy, **hyper)
    ref = eg.Expectigrad(xs_ref, backend="numpy", **hyper)
    assert gpu.backend == "cuda"
    for _ in range(steps):
        n = int(rng.integers(0, 5))
        idx = rng.integers(0, shape[0], n)
        vals = rng.standard_normal((n,) + shape[1:]).astype(dtype)
        vals[rng.random(vals.shape) < 0.2] = 0
        gb = rng.standard_normal(4).astype(dtype)
        sparse = eg.RowSparse(cuda.to_device(idx) if device_values and n else idx,
                              cuda.to_device(vals) if device_values and n else vals)
        gpu.step([sparse, to_device([gb])[0]])
        ref.step([eg.RowSparse(idx, vals).todense(xs_ref[0]), gb])
    gpu.sync()
    return gpu, ref, to_host(xs_dev), xs_ref


def agree(gpu, ref, xs_gpu, xs_ref, dtype):
    for a, b in zip(xs_gpu, xs_ref):
        np.testing.assert_allclose(a, b, rtol=TOL[dtype], atol=TOL[dtype] * np.abs(b).max())
    sa, sb = gpu.state_dict()["state"], ref.state_dict()["state"]
    for i in sb:
        for key, value in sb[i].items():
            if key != "step":
                np.testing.assert_allclose(sa[i][key], value, rtol=TOL[dtype],
                                           atol=TOL[dtype] * max(np.abs(value).max(), 1e-30))
            else:
                assert sa[i][key] == value


@given(seed=st.integers(0, 2**32 - 1), dtype=st.sampled_from([np.float32, np.float64]),
       lazy=st.booleans(), beta=st.sampled_from([0.0, 0.9]),
       decay=st.sampled_from([0.0, 0.1]), counter=st.booleans(),
       clip=st.sampled_from([{}, dict(clipvalue=0.5, clipnorm=1.0, global_clipnorm=1.5)]))
def test_row_sparse_steps_on_the_device_equal_the_dense_steps(seed, dtype, lazy, beta, decay,
                                                              counter, clip):
    hyper = dict(lr=0.05, beta=beta, weight_decay=decay, sparse_counter=counter, **clip)
    agree(*run(dtype, lazy, hyper, 6, seed), dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_device_indices_and_values_are_read(dtype):
    agree(*run(dtype, True, dict(lr=0.05), 5, 3, device_values=True), dtype)


def test_long_lags_on_the_device():
    """Rows untouched beyond the window (70 steps at beta=0.5)."""
    agree(*run(np.float64, True, dict(lr=0.05, beta=0.5, weight_decay=0.01), 160, 5,
               shape=(200, 2)), np.float64)


def test_bad_indices_on_the_device_change_nothing():
    xs = to_device([np.ones((5, 2))])
    opt = eg.Expectigrad(xs)
    with pytest.raises(ValueError, match="out of range"):
        opt.step([eg.RowSparse([7], np.ones((1, 2)))])
    np.testing.assert_array_equal(to_host(xs)[0], 1.0)


@pytest.mark.parametrize("beta", [0.0, 0.9])
def test_eager_row_sparse_steps_on_the_device_are_the_dense_device_steps_bit_for_bit(beta):
    """Against the cuda backend's own dense step (the same update kernel):
    identical bits, float32 rounding included (each row's elements keep
    their indices in the parameter)."""
    rng = np.random.default_rng(0)
    table = rng.standard_normal((20, 3)).astype(np.float32)
    a, b = to_device([table]), to_device([table.copy()])
    opt_a = eg.Expectigrad(a, lr=0.05, beta=beta, weight_decay=0.1)
    opt_b = eg.Expectigrad(b, lr=0.05, beta=beta, weight_decay=0.1)
    for _ in range(6):
        idx = rng.integers(0, 20, 4)
        vals = rng.standard_normal((4, 3)).astype(np.float32)
        g = eg.RowSparse(idx, vals)
        opt_a.step([g])
        opt_b.step(to_device([g.todense(table)]))
    np.testing.assert_array_equal(to_host(a)[0], to_host(b)[0])
    for key, value in opt_b.state_dict()["state"][0].items():
        np.testing.assert_array_equal(opt_a.state_dict()["state"][0][key], value)


def test_eager_steps_on_the_device_visit_only_rows_with_momentum_left(monkeypatch):
    from expectigrad_np.backends.cuda.backend import CudaBucket
    seen = []
    real = CudaBucket.update_rows

    def spy(self, k, rows, sel, values, scale, catch=None):
        seen.append(rows.size)
        return real(self, k, rows, sel, values, scale, catch)

    monkeypatch.setattr(CudaBucket, "update_rows", spy)
    xs = to_device([np.zeros((1000, 2), np.float32)])
    opt = eg.Expectigrad(xs, beta=0.5)
    opt.step([eg.RowSparse([7], np.ones((1, 2), np.float32))])
    for _ in range(200):
        opt.step([eg.RowSparse([3], np.ones((1, 2), np.float32))])
    # Row 7's momentum halves each step and is exactly zero after ~150.
    assert seen[0] == 1 and seen[1] == 2 and seen[-1] == 1


def test_a_huge_dense_gradient_keeps_lazy_rows_lazy():
    """A dense float64 gradient whose squared norm overflows (1e200) beside
    a row-sparse one, with no norm clipping: the rows the step does not
    touch stay lagging (as on the host backends), not brought up to date by
    a densified step."""
    xs = to_device([np.zeros((6, 3)), np.zeros(4)])
    opt = eg.Expectigrad(xs, lr=0.1, lazy=True)
    opt.step([eg.RowSparse(np.arange(6), np.ones((6, 3))), to_device([np.ones(4)])[0]])
    first = to_host(xs)[0]
    opt.step([eg.RowSparse(np.array([1]), np.ones((1, 3))),
              to_device([np.full(4, 1e200)])[0]])
    now = to_host(xs)[0]
    rest = [r for r in range(6) if r != 1]
    np.testing.assert_array_equal(now[rest], first[rest])
    assert not np.array_equal(now[1], first[1])
