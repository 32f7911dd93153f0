"""``model.fit`` on scikit-learn's 8x8 digits with ``expectigrad_np.tensorflow2``
next to Keras Adam, from the same initial weights; prints test accuracy.

Runs on whichever Keras backend is configured (``KERAS_BACKEND``; PyTorch when
it is unset and TensorFlow is absent).  Without scikit-learn a synthetic
10-class problem of the same size stands in.

    python examples/keras_digits.py [--epochs 20]
"""
import argparse
import importlib.util
import os

if "KERAS_BACKEND" not in os.environ and importlib.util.find_spec("tensorflow") is None:
    os.environ["KERAS_BACKEND"] = "torch"

import keras  # noqa: E402
import numpy as np  # noqa: E402

from expectigrad_np.tensorflow2 import Expectigrad  # noqa: E402


def load(seed=0):
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        rng = np.random.default_rng(seed)
        y = rng.integers(0, 10, 1797)
        X = rng.standard_normal((10, 64))[y] + 2.0 * rng.standard_normal((1797, 64))
        return X.astype("float32"), y, "synthetic 10-class data"
    d = load_digits()
    return (d.data / 16.0).astype("float32"), d.target, "scikit-learn digits"


def model():
    return keras.Sequential([keras.Input((64,)), keras.layers.Dense(64, activation="relu"),
                             keras.layers.Dense(10, activation="softmax")])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args(argv)

    X, y, source = load()
    order = np.random.default_rng(0).permutation(len(X))
    X, y = X[order], y[order]
    split = int(0.8 * len(X))
    print(f"{source} on the {keras.backend.backend()} backend: {split} training and "
          f"{len(X) - split} test images")
    keras.utils.set_random_seed(0)
    init = model().get_weights()
    results = {}
    for name, opt in (("Expectigrad", Expectigrad(learning_rate=args.lr)),
                      ("Adam", keras.optimizers.Adam(learning_rate=args.lr))):
        net = model()
        net.set_weights(init)
        net.compile(optimizer=opt, loss="sparse_categorical_crossentropy",
                    metrics=["accuracy"])
        hist = net.fit(X[:split], y[:split], epochs=args.epochs, batch_size=64, verbose=0)
        _, acc = net.evaluate(X[split:], y[split:], verbose=0)
        results[name] = dict(losses=hist.history["loss"], accuracy=float(acc))
        print(f"{name:12s} final loss {hist.history['loss'][-1]:.4f}  test accuracy {acc:.3f}")
    return results


if __name__ == "__main__":
    main()
