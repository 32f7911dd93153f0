"""The stochastic rounding of the float32 mean (``reference.add_stochastically_rounded``).

What it must do: leave the mean alone when the increment is zero, land on
one of the two floats around the exact sum, and be exact on average where
round-to-nearest is biased.  Each property is also run against round-to-nearest,
which must fail the unbiasedness checks, so the checks can fail.
"""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from expectigrad_np import reference as R

F32 = np.float32


def spacing_above(a):
    return np.nextafter(a, F32(np.inf)) - a


def spacing_below(a):
    return a - np.nextafter(a, F32(0))


def rounded(a, b, t):
    return R.add_stochastically_rounded(np.asarray(a, F32), np.asarray(b, F32), t)


def round_to_nearest(a, b, t):
    return np.asarray(a, F32) + np.asarray(b, F32)


def mean_change(add, a, b, steps=4096):
    """Average of ``add(a, b) - a`` over ``steps`` steps, per element, in float64."""
    total = np.zeros(np.shape(a))
    for t in range(1, steps + 1):
        total += add(a, b, t).astype(np.float64) - a
    return total / steps


positive_normal = st.floats(min_value=2.0 ** -60, max_value=2.0 ** 100, width=32,
                            allow_subnormal=False)


def test_dither_is_odd_symmetric_and_inside_half():
    d = R.dither(np.arange(1 << 16), 7)
    assert d.dtype == np.float32
    assert np.all(np.abs(d) < 0.5)
    k = d.astype(np.float64) * 2 ** 25
    assert np.all(k == np.round(k)) and np.all(k % 2 == 1)
    assert abs(d.astype(np.float64).mean()) < 1e-3          # centred
    assert np.array_equal(R.dither(np.arange(5), 3), R.dither(np.arange(5), 3))


@settings(max_examples=200, deadline=None)
@given(positive_normal, st.integers(1, 2 ** 40))
def test_zero_increment_keeps_the_mean(a, t):
    for value in (F32(a), F32(2.0) ** np.round(np.log2(a)).astype(F32), F32(0)):
        out = rounded(np.full(64, value), np.zeros(64, F32), t)
        assert np.all(out == value), value


@settings(max_examples=200, deadline=None)
@given(positive_normal, st.floats(-0.99, 0.99), st.integers(1, 2 ** 40))
def test_lands_on_a_float_around_the_exact_sum(a, frac, t):
    a = F32(a)
    b = F32(frac * float(spacing_above(a) if frac > 0 else spacing_below(a)))
    out = rounded(np.full(256, a), np.full(256, b), t)
    exact = np.float64(a) + np.float64(b)
    lo = np.nextafter(F32(exact), F32(0)) if F32(exact) > exact else F32(exact)
    hi = np.nextafter(lo, F32(np.inf)) if lo < exact else lo
    assert np.all((out == lo) | (out == hi)), (a, b, np.unique(out))


@pytest.mark.parametrize("add, unbiased", [(rounded, True), (round_to_nearest, False)])
@pytest.mark.parametrize("a", [F32(1.3), F32(3.0e-20), F32(7.5e12), F32(4.0)])
def test_exact_on_average(add, unbiased, a):
    """Increments smaller than one spacing: round-to-nearest loses them (or
    rounds them up to a whole spacing); dithered rounding averages to them.
    At a power of two (4.0: the spacing below is half the one above) that
    holds up to half the spacing below, which is what is claimed."""
    up, down = spacing_above(a), spacing_below(a)
    largest = 0.7 * up if up == down else 0.45 * up
    b = np.array([0.3 * up, 0.05 * up, -0.3 * down, -0.45 * down, largest], F32)
    a_vec = np.full(b.size, a)
    got = mean_change(add, a_vec, b)
    err = np.abs(got - b.astype(np.float64)) / np.float64(up)
    if unbiased:
        assert err.max() < 0.01, err
    else:
        assert err.max() > 0.1, err


def test_many_elements_one_step_is_unbiased_too():
    """Across elements (fixed step) the dither is spread as well."""
    a = np.full(1 << 16, F32(1.7))
    b = np.full(a.size, F32(0.25) * spacing_above(F32(1.7)))
    change = (rounded(a, b, 11).astype(np.float64) - a).mean()
    assert abs(change - float(b[0])) < 0.01 * float(spacing_above(F32(1.7)))
    assert (round_to_nearest(a, b, 11) == a).all()
