"""Custom derivative rules: PlusConstant (derivative 1) and Clip (1 inside [vmin, vmax], 0 outside).

The layers here are computed by NumPy (tf.numpy_function), an op TensorFlow cannot
differentiate: without a rule augnet refuses (GradientPathError naming the layer); with a rule the
Jacobian equals the textbook one.

Run: python examples/custom_derivatives.py  (a few seconds; every number is asserted)
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import tensorflow as tf

import augnet


class NumpyPlusConstant(keras.layers.Layer):
    """y = x + c, computed outside TensorFlow: no gradient."""

    def __init__(self, constant=5.0, **kwargs):
        super().__init__(**kwargs)
        self.constant = constant

    def call(self, x):
        y = tf.numpy_function(lambda a: (a + self.constant).astype(a.dtype), [x], x.dtype)
        return tf.ensure_shape(y, x.shape)


class NumpyClip(keras.layers.Layer):
    """y = clip(x, vmin, vmax), computed outside TensorFlow: no gradient."""

    def __init__(self, vmin=-1.0, vmax=1.0, **kwargs):
        super().__init__(**kwargs)
        self.vmin, self.vmax = vmin, vmax

    def call(self, x):
        y = tf.numpy_function(lambda a: np.clip(a, self.vmin, self.vmax), [x], x.dtype)
        return tf.ensure_shape(y, x.shape)


def clip_derivative(inputs, outputs, layer):
    """Input-dependent rule: 1 inside [vmin, vmax], 0 outside (elementwise)."""
    inside = tf.logical_and(inputs >= layer.vmin, inputs <= layer.vmax)
    return tf.cast(inside, inputs.dtype)


def plus_constant():
    model = keras.Sequential([keras.Input((3,)), NumpyPlusConstant(5.0, name="plus5")])
    x = np.array([[1.0, -2.0, 0.5]], "float32")
    try:
        augnet.jacobian(model, x)
        raise AssertionError("expected a GradientPathError")
    except augnet.GradientPathError as err:
        assert "plus5" in str(err) and "register_derivative" in str(err)
    # Input-independent rule: the constant derivative 1.
    J = augnet.jacobian(model, x, derivatives={NumpyPlusConstant: 1.0})
    np.testing.assert_array_equal(J[0], np.eye(3))
    print("PlusConstant: J = I with the rule 1.0")


def clip():
    augnet.register_derivative(NumpyClip)(clip_derivative)  # for every computation from now on
    try:
        model = keras.Sequential([keras.Input((4,)), NumpyClip(-1.0, 1.0)])
        x = np.array([[-3.0, -0.5, 0.5, 3.0]], "float32")
        J = augnet.jacobian(model, x)
        np.testing.assert_array_equal(J[0], np.diag([0.0, 1.0, 1.0, 0.0]))
        # The same rule serves the backward model and the VJP.
        g = augnet.vjp(model, x, np.ones((1, 4), "float32"))
        np.testing.assert_array_equal(g, [[0.0, 1.0, 1.0, 0.0]])
        g2 = np.asarray(augnet.backward_model(model, gradient=np.ones(4))(x))
        np.testing.assert_array_equal(g2, g)
        print("Clip: diag(J) =", np.diagonal(J[0]))
    finally:
        augnet.unregister_derivative(NumpyClip)


if __name__ == "__main__":
    plus_constant()
    clip()
