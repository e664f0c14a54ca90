"""Jacobian norms (against NumPy) and the local Lipschitz estimate (closed form on linear models)."""

from __future__ import annotations

import keras
import numpy as np
import pytest

import augnet


def test_norms_against_numpy():
    rng = np.random.default_rng(0)
    J = rng.normal(size=(5, 4, 7))
    n = augnet.jacobian_norms(J)
    np.testing.assert_allclose(n.frobenius, np.linalg.norm(J, axis=(1, 2)), rtol=1e-12)
    np.testing.assert_allclose(n.spectral, np.linalg.norm(J, ord=2, axis=(1, 2)), rtol=1e-8)
    np.testing.assert_allclose(n.l1, np.abs(J).sum(axis=2), rtol=1e-12)
    np.testing.assert_allclose(n.l2, np.linalg.norm(J, axis=2), rtol=1e-12)
    assert n.l1.shape == (5, 4) and n.spectral.shape == (5,)


def test_norms_with_image_shaped_axes():
    rng = np.random.default_rng(1)
    J = rng.normal(size=(2, 3, 2, 6, 5, 1))  # (batch, *output_shape (3, 2), *input_shape)
    n = augnet.jacobian_norms(J, output_ndim=2)
    flat = J.reshape(2, 6, 30)
    assert n.l2.shape == (2, 3, 2)
    np.testing.assert_allclose(n.spectral, np.linalg.norm(flat, ord=2, axis=(1, 2)), rtol=1e-8)
    np.testing.assert_allclose(n.l2.reshape(2, 6), np.linalg.norm(flat, axis=2), rtol=1e-12)


def test_spectral_norm_edge_cases():
    zero = np.zeros((1, 3, 4))
    assert augnet.spectral_norm(zero)[0] == 0.0
    diag = np.diag([3.0, 2.0, 1.0])[None]
    np.testing.assert_allclose(augnet.spectral_norm(diag), [3.0], rtol=1e-10)


@pytest.mark.parametrize(
    "J, kwargs, error, match",
    [
        ([np.zeros((1, 2, 3))], {}, TypeError, r"`J` must be one array"),
        (np.zeros((2, 3)), {}, ValueError, r"`J` has shape \(2, 3\), but output_ndim=1"),
        (np.zeros((2, 3, 4)), {"output_ndim": -1}, ValueError, r"`output_ndim`"),
    ],
)
def test_norm_errors(J, kwargs, error, match):
    with pytest.raises(error, match=match):
        augnet.jacobian_norms(J, **kwargs)


def _linear():
    keras.utils.set_random_seed(0)
    layer = keras.layers.Dense(3, dtype="float64")
    model = keras.Sequential([keras.Input((4,), dtype="float64"), layer])
    return model, layer.kernel.numpy()


def test_local_lipschitz_of_a_linear_model_is_its_spectral_norm():
    model, W = _linear()
    x = np.random.default_rng(0).normal(size=(3, 4))
    L = augnet.local_lipschitz(model, x, radius=0.5, n_samples=4, strategy="loop")
    np.testing.assert_allclose(L, np.full(3, np.linalg.norm(W, ord=2)), rtol=1e-8)


def test_local_lipschitz_is_a_lower_bound_that_grows_with_samples():
    keras.utils.set_random_seed(1)
    model = keras.Sequential(
        [
            keras.Input((2,), dtype="float64"),
            keras.layers.Dense(3, activation="tanh", dtype="float64"),
        ]
    )
    x = np.random.default_rng(1).normal(size=(2, 2))
    centre = augnet.jacobian_norms(augnet.jacobian(model, x, strategy="loop")).spectral
    np.testing.assert_allclose(augnet.local_lipschitz(model, x, 0.0, 0, strategy="loop"), centre)
    L = augnet.local_lipschitz(model, x, 1.0, 8, strategy="loop")
    assert np.all(L >= centre - 1e-12)
    W = model.layers[0].kernel.numpy()
    assert np.all(L <= np.linalg.norm(W, ord=2) + 1e-12)  # |tanh'| <= 1: a global upper bound


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"radius": -1.0}, r"`radius`, expected a non-negative number"),
        ({"radius": 1.0, "n_samples": -2}, r"`n_samples`, expected a non-negative integer"),
    ],
)
def test_local_lipschitz_errors(kwargs, match):
    model, _ = _linear()
    with pytest.raises(ValueError, match=match):
        augnet.local_lipschitz(model, np.zeros((1, 4)), **kwargs)
