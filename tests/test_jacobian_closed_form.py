"""Closed forms: weights set by hand, the exact Jacobian written out, every strategy and dtype.

- Dense (linear): ``J = kernelᵀ`` for every sample.
- An elementwise activation: ``J = diag(tanh'(x)) = diag(1 - tanh(x)²)``.
- The chain rule, Dense -> tanh -> Dense: ``J = W2ᵀ · diag(1 - h²) · W1ᵀ`` with ``h = tanh(x W1 + b1)``.

In float64 the activation is one that Keras computes in float64 on the backend under test
(``conftest.f64_activation``): tanh on TensorFlow, sigmoid where Keras 3.15 computes tanh of a
float64 tensor in float32 (JAX, torch), whose model is then not float64 to 1e-10 itself.
"""

import functools

import keras
import numpy as np
import pytest
from conftest import STRATEGIES, TOL, f64_activation

import augnet

RNG = np.random.default_rng(0)
W1 = RNG.normal(size=(4, 5))
B1 = RNG.normal(size=5)
W2 = RNG.normal(size=(5, 3))
B2 = RNG.normal(size=3)
X = RNG.uniform(-1, 1, size=(6, 4))


def _sigmoid(z):
    return 1 / (1 + np.exp(-z))


# name -> (the function, its derivative written in terms of its value)
ACTIVATIONS = {"tanh": (np.tanh, lambda y: 1 - y**2), "sigmoid": (_sigmoid, lambda y: y * (1 - y))}


def _act(dtype) -> str:
    """The elementwise activation of the models in ``dtype``: tanh, except in float64 where Keras
    computes tanh in float32 on this backend (``conftest.keeps_float64``)."""
    return f64_activation() if dtype == "float64" else "tanh"


@functools.cache
def dense_model(dtype):
    model = keras.Sequential(
        [keras.Input((4,), dtype=dtype), keras.layers.Dense(5, dtype=dtype)], name=f"dense_{dtype}"
    )
    model.layers[0].set_weights([W1, B1])
    return model


@functools.cache
def elementwise_model(dtype):
    return keras.Sequential(
        [keras.Input((4,), dtype=dtype), keras.layers.Activation(_act(dtype), dtype=dtype)],
        name=f"elementwise_{dtype}",
    )


@functools.cache
def chain_model(dtype):
    model = keras.Sequential(
        [
            keras.Input((4,), dtype=dtype),
            keras.layers.Dense(5, activation=_act(dtype), dtype=dtype),
            keras.layers.Dense(3, dtype=dtype),
        ],
        name=f"chain_{dtype}",
    )
    model.layers[0].set_weights([W1, B1])
    model.layers[1].set_weights([W2, B2])
    return model


def _x(dtype):
    return X.astype(dtype)


def _weights(dtype):
    """The weights as the model holds them (rounded to ``dtype``), in float64 for the closed form."""
    return [np.asarray(w, dtype=dtype).astype(np.float64) for w in (W1, B1, W2, B2)]


def expected_dense(dtype):
    w1 = _weights(dtype)[0]
    return np.broadcast_to(w1.T, (len(X), 5, 4))


def expected_elementwise(dtype):
    f, df = ACTIVATIONS[_act(dtype)]
    x = _x(dtype).astype(np.float64)
    return np.stack([np.diag(df(f(xi))) for xi in x])


def expected_chain(dtype, x=None):
    f, df = ACTIVATIONS[_act(dtype)]
    w1, b1, w2, _ = _weights(dtype)
    x = _x(dtype).astype(np.float64) if x is None else x
    h = f(x @ w1 + b1)  # (batch, 5)
    return np.stack([w2.T @ np.diag(df(hi)) @ w1.T for hi in h])


CASES = {
    "dense": (dense_model, expected_dense),
    "elementwise": (elementwise_model, expected_elementwise),
    "chain": (chain_model, expected_chain),
}


# float16: the chain (which holds the other two) is enough, at a looser tolerance.
PARAMS = [(c, d) for c in CASES for d in ("float32", "float64")] + [("chain", "float16")]


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("case, dtype", PARAMS)
def test_closed_form(case, dtype, strategy):
    build, expected = CASES[case]
    J = augnet.jacobian(build(dtype), _x(dtype), strategy=strategy)
    assert isinstance(J, np.ndarray)
    assert J.dtype == np.dtype(dtype)  # the model's compute dtype is kept
    np.testing.assert_allclose(J.astype(np.float64), expected(dtype), **TOL[dtype])


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_dense_closed_form_every_sample_is_the_transposed_kernel(strategy):
    model = dense_model("float32")
    J = augnet.jacobian(model, _x("float32"), strategy=strategy)
    kernel = model.layers[0].kernel.numpy()
    for i in range(len(X)):
        np.testing.assert_array_equal(J[i], kernel.T)


@pytest.mark.parametrize("given", ["float64", "float16", "int64"])
def test_input_is_cast_to_the_models_dtype(given):
    """A float64 (or float16, or integer) input to a float32 model gives a float32 Jacobian."""
    model = chain_model("float32")
    x = np.round(X * 4) if given == "int64" else X
    J = augnet.jacobian(model, x.astype(given))
    assert J.dtype == np.float32
    reference = augnet.jacobian(model, x.astype(given).astype("float32"))
    np.testing.assert_array_equal(J, reference)


def test_float32_input_to_float64_model_gives_float64():
    model = chain_model("float64")
    J = augnet.jacobian(model, X.astype("float32"))
    assert J.dtype == np.float64
    expected = expected_chain("float64", X.astype("float32").astype("float64"))
    np.testing.assert_allclose(J, expected, **TOL["float64"])


def test_tensor_input_is_accepted_and_gives_numpy():
    J = augnet.jacobian(chain_model("float32"), keras.ops.convert_to_tensor(_x("float32")))
    assert isinstance(J, np.ndarray)
    np.testing.assert_allclose(J, expected_chain("float32"), **TOL["float32"])


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_plain_callable_of_keras_ops(strategy):
    """The engine works on any callable built of the backend's ops, not just Keras models."""
    ops = keras.ops
    w1, b1, w2, b2 = (ops.convert_to_tensor(w) for w in _weights("float64"))
    act = getattr(ops, _act("float64"))

    def f(x):
        return ops.add(ops.matmul(act(ops.add(ops.matmul(x, w1), b1)), w2), b2)

    J = augnet.jacobian(f, _x("float64"), strategy=strategy)
    assert J.dtype == np.float64
    np.testing.assert_allclose(J, expected_chain("float64"), **TOL["float64"])


@pytest.mark.tensorflow_only
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_plain_tensorflow_callable(strategy, tf):
    """The engine works on any callable built of TensorFlow ops, not just Keras models."""
    w1, b1, w2, b2 = (tf.constant(w) for w in _weights("float64"))

    def f(x):
        return tf.matmul(tf.tanh(tf.matmul(x, w1) + b1), w2) + b2

    J = augnet.jacobian(f, _x("float64"), strategy=strategy)
    assert J.dtype == np.float64
    np.testing.assert_allclose(J, expected_chain("float64"), **TOL["float64"])


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_vector_valued_output_shape_is_kept(strategy):
    """``(batch, *output_shape, *input_shape)`` for a 2-D output and a 2-D input: tanh of a matrix."""
    x = RNG.uniform(-1, 1, size=(2, 2, 3))
    act = _act("float64")
    model = keras.Sequential(
        [keras.Input((2, 3), dtype="float64"), keras.layers.Activation(act, dtype="float64")]
    )
    J = augnet.jacobian(model, x, strategy=strategy)
    assert J.shape == (2, 2, 3, 2, 3)
    f, df = ACTIVATIONS[act]
    d = df(f(x))
    expected = np.zeros((2, 2, 3, 2, 3))
    for b in range(2):
        for i in range(2):
            for j in range(3):
                expected[b, i, j, i, j] = d[b, i, j]
    np.testing.assert_allclose(J, expected, **TOL["float64"])
