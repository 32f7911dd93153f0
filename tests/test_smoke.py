import numpy as np

import expectigrad_np as eg


def test_step_changes_parameters_in_place():
    W = np.ones((3, 2), np.float32)
    opt = eg.Expectigrad([W], lr=0.1)
    opt.step([np.ones((3, 2), np.float32)])
    np.testing.assert_allclose(W, 0.9, rtol=1e-6)


def test_state_dict_round_trip():
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((4, 3)), rng.standard_normal(5)]
    ys = [x.copy() for x in xs]
    a = eg.Expectigrad(xs, lr=0.1)
    gs = [rng.standard_normal(x.shape) for x in xs]
    a.step(gs)
    b = eg.Expectigrad(ys, lr=0.1)
    b.load_state_dict(a.state_dict())
    for x, y in zip(xs, ys):
        y[...] = x
    g2 = [rng.standard_normal(x.shape) for x in xs]
    a.step(g2)
    b.step(g2)
    for x, y in zip(xs, ys):
        np.testing.assert_array_equal(x, y)
