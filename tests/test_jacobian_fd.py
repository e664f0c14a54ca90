"""float64 central finite differences against the engine, on smooth models (no ReLU kinks).

The smooth activation is tanh where Keras computes it in float64 (TensorFlow), sigmoid where Keras
3.15 computes tanh of float64 tensors in float32 (``conftest.f64_activation``): central differences
of a model that is itself float32 inside would measure its rounding, not the Jacobian.
"""

import keras
import numpy as np
import pytest
from conftest import STRATEGIES, central_fd_jacobian, f64_activation, float64_keras, predict

import augnet

# Central differences with eps=1e-5 in float64: truncation ~eps² and round-off ~1e-16/eps, both
# far below this (STYLE.md: ~1e-6 against central differences).
FD_TOL = {"rtol": 1e-6, "atol": 1e-7}


def _mlp():
    L = keras.layers
    return keras.Sequential(
        [
            keras.Input((5,)),
            L.Dense(8, activation=f64_activation()),
            L.Dense(6, activation="sigmoid"),
            L.Dense(3, activation="softplus"),
        ]
    )


def _cnn():
    L = keras.layers
    return keras.Sequential(
        [
            keras.Input((6, 6, 2)),
            L.Conv2D(3, 3, padding="same", activation=f64_activation()),
            L.AveragePooling2D(2),
            L.Conv2D(2, 2, activation=f64_activation()),
            L.Flatten(),
            L.Dense(4),
        ]
    )


MODELS = {"mlp": _mlp, "cnn": _cnn}


@pytest.fixture(scope="module")
def float64_models():
    """The models, built in float64 once for the module (the settings restored afterwards)."""
    with float64_keras():
        keras.utils.set_random_seed(5)
        return {name: build() for name, build in MODELS.items()}


def _fd(model, x):
    # Call the model directly: predict() would pass float64 data through float32.
    return central_fd_jacobian(lambda v: predict(model, v), x)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("name", list(MODELS))
def test_matches_central_differences(float64_models, name, strategy):
    model = float64_models[name]
    assert model.compute_dtype == "float64"
    x = np.random.default_rng(1).uniform(-1, 1, size=(3, *model.inputs[0].shape[1:]))
    J = augnet.jacobian(model, x, strategy=strategy)
    assert J.dtype == np.float64
    assert J.shape == (3, *model.outputs[0].shape[1:], *x.shape[1:])
    np.testing.assert_allclose(J, _fd(model, x), **FD_TOL)


def test_float64_fixture_model_and_return_jacobian(float64):
    """A float64 AugNet built in the ``float64`` fixture: ``return_jacobian`` against differences."""
    inputs = keras.Input((3,))
    act = f64_activation()
    h = keras.layers.Dense(4, activation=act)(inputs)
    model = augnet.AugNet(inputs=inputs, outputs=keras.layers.Dense(2, activation=act)(h))
    x = np.random.default_rng(2).uniform(-1, 1, size=(4, 3))
    assert model.compute_dtype == "float64" and model.inputs[0].dtype == "float64"
    J = model.return_jacobian(x)
    assert J.dtype == np.float64
    np.testing.assert_allclose(J, _fd(model, x), **FD_TOL)


def test_finite_difference_reference_itself():
    """The reference on a function with a known Jacobian: f(x) = (x0·x1, sin x2)."""

    def f(v):
        return np.stack([v[:, 0] * v[:, 1], np.sin(v[:, 2])], axis=1)

    x = np.random.default_rng(3).uniform(-1, 1, size=(2, 3))
    expected = np.zeros((2, 2, 3))
    expected[:, 0, 0], expected[:, 0, 1], expected[:, 1, 2] = x[:, 1], x[:, 0], np.cos(x[:, 2])
    np.testing.assert_allclose(central_fd_jacobian(f, x), expected, rtol=1e-9, atol=1e-10)


def test_float64_settings_are_restored():
    """Models built after the float64 fixtures are float32 again."""
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    assert model.compute_dtype == "float32" and model.inputs[0].dtype == "float32"
