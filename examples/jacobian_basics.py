"""Jacobians by hand and by augnet: a scalar chain, a linear layer, ReLU, the chain rule.

Run: python examples/jacobian_basics.py  (a few seconds; every number is asserted)
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import tensorflow as tf

import augnet


def scalar_chain():
    """f(x) = ((x + 5)^3 + 1)^2 at x = -3: f = (2^3 + 1)^2 = 81, f' = 2·9·3·2^2 = 216."""

    def f(x):
        return ((x + 5.0) ** 3 + 1.0) ** 2

    x = np.array([[-3.0]])  # (batch=1, 1)
    value = float(f(tf.constant(x))[0, 0])
    J = augnet.jacobian(f, x)  # (1, 1, 1)
    assert value == 81.0 and J.shape == (1, 1, 1) and J[0, 0, 0] == 216.0, (value, J)
    print(f"scalar chain: f(-3) = {value:g}, f'(-3) = {J[0, 0, 0]:g}")


def linear_layer():
    """y = x·W + b, so ∂y/∂x = Wᵀ: Keras stores the kernel as (in, out), the Jacobian is (out, in)."""
    layer = keras.layers.Dense(2)
    model = keras.Sequential([keras.Input((3,)), layer])
    W = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], "float32")  # (in=3, out=2)
    layer.set_weights([W, np.zeros(2, "float32")])
    J = augnet.jacobian(model, np.random.default_rng(0).normal(size=(4, 3)).astype("float32"))
    assert J.shape == (4, 2, 3)
    np.testing.assert_array_equal(J[0], W.T)  # the same for every sample: the layer is linear
    np.testing.assert_array_equal(J[3], W.T)
    print("linear layer: J = W^T =\n", J[0])


def relu_diagonal():
    """ReLU's Jacobian is diagonal with 1 where the input is positive, 0 where it is not; a dead
    neuron (negative pre-activation for every input) has a zero row for every sample."""
    model = keras.Sequential([keras.Input((4,)), keras.layers.ReLU()])
    x = np.array([[1.0, -2.0, 3.0, -0.5], [2.0, -1.0, -3.0, 4.0]], "float32")
    J = augnet.jacobian(model, x)  # (2, 4, 4)
    np.testing.assert_array_equal(J[0], np.diag([1.0, 0.0, 1.0, 0.0]))
    np.testing.assert_array_equal(J[1], np.diag([1.0, 0.0, 0.0, 1.0]))
    # A dead neuron: its bias is so negative that the pre-activation is always < 0.
    dense = keras.layers.Dense(3, activation="relu")
    net = keras.Sequential([keras.Input((2,)), dense])
    dense.set_weights([np.eye(2, 3, dtype="float32"), np.array([0.0, 0.0, -100.0], "float32")])
    Jd = augnet.jacobian(net, np.random.default_rng(1).uniform(-1, 1, (16, 2)).astype("float32"))
    assert np.all(Jd[:, 2, :] == 0), "neuron 2 is dead: its Jacobian row is zero for every sample"
    print("relu: diag(J) =", np.diagonal(J[0]), "| dead neuron rows all zero:", True)


def chain_rule():
    """f = h ∘ g on 2 -> 3 -> 4: J_f(x) = J_h(g(x)) · J_g(x), checked layer by layer."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential(  # float64, so that the product matches to ~1e-12
        [
            keras.Input((2,), dtype="float64"),
            keras.layers.Dense(3, activation="tanh", name="g", dtype="float64"),
            keras.layers.Dense(4, activation="sigmoid", name="h", dtype="float64"),
        ]
    )
    x = np.random.default_rng(0).normal(size=(5, 2))
    per_layer = augnet.layer_jacobians(model, x)
    J_g, J_h = per_layer["g"], per_layer["h"]  # (5, 3, 2), (5, 4, 3)
    J_f = augnet.jacobian(model, x)  # (5, 4, 2)
    np.testing.assert_allclose(np.einsum("bij,bjk->bik", J_h, J_g), J_f, rtol=1e-12, atol=1e-14)
    print("chain rule: J_f = J_h . J_g holds; shapes", J_h.shape, "x", J_g.shape, "=", J_f.shape)


if __name__ == "__main__":
    scalar_chain()
    linear_layer()
    relu_diagonal()
    chain_rule()
