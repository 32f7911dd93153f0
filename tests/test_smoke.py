import numpy as np

import expectigrad_np as eg


def test_step_changes_parameters_in_place():
    W = np.ones((3, 2), np.float32)
    opt = eg.Expectigrad([W], lr=0.1)
    opt.step([np.ones((3, 2), np.float32)])
    np.testing.assert_allclose(W, 0.9, rtol=1e-6)
