"""Mixed precision: models under the ``mixed_float16`` and ``mixed_bfloat16`` policies, every backend.

Under a mixed policy Keras keeps the inputs and the variables in float32 and computes the layers in
float16 (bfloat16). The Jacobian comes back in the model's input dtype, float32, and is the exact
derivative of the model as it computes: its entries carry the float16 (bfloat16) rounding of the
layers they went through. The figure stated in the README ("how far from the float32 model's") is
tested here: with the same weights, max |J_mixed - J_float32| / max |J_float32| is between 1/100
and 4 machine epsilons of the compute dtype (float16: 9.8e-4, bfloat16: 7.8e-3); measured about
1.1 (float16) and 0.9 (bfloat16) epsilons on this model, on TensorFlow and JAX alike.
"""

from __future__ import annotations

import functools

import keras
import numpy as np
import pytest
from conftest import STRATEGIES, reference_jacobian

import augnet

EPS = {"mixed_float16": float(np.finfo(np.float16).eps), "mixed_bfloat16": 2.0**-7}
POLICIES = list(EPS)
X = np.random.default_rng(70).uniform(-1, 1, (4, 6, 6, 1)).astype("float32")


def _build(policy: str):
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        keras.utils.set_random_seed(70)
        i = keras.Input((6, 6, 1))
        h = keras.layers.Conv2D(4, 3, activation="tanh")(i)
        h = keras.layers.BatchNormalization()(h)
        h = keras.layers.Flatten()(h)
        h = keras.layers.Dense(8, activation="tanh")(h)
        # The usual last layer of a mixed-precision model: float32 outputs.
        out = keras.layers.Dense(3, dtype="float32")(h)
        return keras.Model(i, out, name=f"cnn_{policy}")
    finally:
        keras.config.set_dtype_policy(previous)


@functools.cache
def models(policy: str):
    """The model under ``policy`` and the same model (same weights) in float32."""
    full = _build("float32")
    mixed = _build(policy)
    mixed.set_weights(full.get_weights())
    return mixed, full


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("policy", POLICIES)
def test_mixed_precision_jacobian_dtype_and_distance_from_float32(policy, strategy):
    mixed, full = models(policy)
    assert mixed.layers[1].compute_dtype == policy.split("_")[1]
    J = augnet.jacobian(mixed, X, strategy=strategy)
    assert isinstance(J, np.ndarray) and J.dtype == np.float32 and J.shape == (4, 3, 6, 6, 1)
    J32 = augnet.jacobian(full, X, strategy=strategy)
    rel = np.abs(J.astype(np.float64) - J32).max() / np.abs(J32).max()
    # Computed in the low precision (not silently in float32), and as close as that allows.
    assert EPS[policy] / 100 < rel < 4 * EPS[policy], rel


@pytest.mark.parametrize("policy", POLICIES)
def test_mixed_precision_against_the_backends_own_loop(policy):
    """The exact derivative of the mixed model as it computes: the backend's plain per-output
    gradient loop through the same float16 (bfloat16) layers agrees to a few of their epsilons
    relative to the Jacobian's scale (the two only sum the same products in another order)."""
    mixed, _ = models(policy)
    J = augnet.jacobian(mixed, X, strategy="loop")
    reference = reference_jacobian(mixed, X).astype(np.float64)
    scale = np.abs(reference).max()
    np.testing.assert_allclose(J, reference, rtol=0, atol=2 * EPS[policy] * scale)


@pytest.mark.parametrize("policy", POLICIES)
def test_mixed_precision_products_and_top_k(policy):
    mixed, full = models(policy)
    u = np.random.default_rng(71).normal(size=(4, 3)).astype("float32")
    J = augnet.jacobian(mixed, X, strategy="loop")
    g = augnet.vjp(mixed, X, u)
    assert g.dtype == np.float32 and g.shape == X.shape
    expected = np.einsum("bo,bo...->b...", u, J)
    np.testing.assert_allclose(g, expected, rtol=0, atol=4 * EPS[policy] * np.abs(expected).max())
    y_dot = augnet.jvp(mixed, X, X)
    assert y_dot.dtype == np.float32 and y_dot.shape == (4, 3)
    expected = np.einsum("boi,bi->bo", J.reshape(4, 3, -1), X.reshape(4, -1))
    np.testing.assert_allclose(
        y_dot, expected, rtol=0, atol=4 * EPS[policy] * np.abs(expected).max()
    )
    top = augnet.jacobian(mixed, X, top_k=2)
    assert top.jacobian.dtype == np.float32
    np.testing.assert_array_equal(
        top.indices,
        np.argsort(-keras.ops.convert_to_numpy(mixed(X, training=False)), axis=1)[:, :2],
    )
