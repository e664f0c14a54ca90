"""A backward model: the vector-Jacobian product of a network, as a Keras model of its own.

Run: python examples/backward_model.py  (a few seconds; every number is asserted)
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np

import augnet


def main():
    layer = keras.layers.Dense(2, name="dense")
    model = keras.Sequential([keras.Input((3,), name="x"), layer], name="linear")
    W = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], "float32")  # kernel (in=3, out=2)
    layer.set_weights([W, np.zeros(2, "float32")])

    # gradient u = (1, -1) fixed: x -> uᵀ·∂y/∂x = uᵀ·Wᵀ = W·u = (-1, -1, -1) for every x.
    backward = augnet.backward_model(model, gradient=np.array([1.0, -1.0]))
    backward.summary()
    x = np.random.default_rng(0).normal(size=(4, 3)).astype("float32")
    g = np.asarray(backward(x))
    np.testing.assert_array_equal(g, np.full((4, 3), -1.0, "float32"))

    # gradient=None: the seed is the second input, one per sample.
    vjp_model = augnet.backward_model(model)
    u = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, 0.0]], "float32")
    np.testing.assert_array_equal(np.asarray(vjp_model([x, u])), u @ W.T)

    # jacobian=True: the full per-sample Jacobian, Wᵀ for every sample.
    jac_model = augnet.backward_model(model, jacobian=True)
    J = np.asarray(jac_model(x))
    assert J.shape == (4, 2, 3)
    np.testing.assert_array_equal(J[2], W.T)
    print("backward model: W.u =", g[0], "| Jacobian per sample = W^T, shape", J.shape)


if __name__ == "__main__":
    main()
