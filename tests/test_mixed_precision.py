"""Mixed precision: models under ``mixed_float16`` and ``mixed_bfloat16``, on every backend.

Documented (README, "Mixed precision"): the Jacobian comes back in the model's input dtype
(float32 under the mixed policies, whose layers keep float32 variables and inputs and compute in
float16/bfloat16); it is the exact derivative of the half-precision computation, so it differs
from the float32 model's (same weights) by the half-precision rounding: measured ~1e-3
(float16) and ~5e-3 to 8e-3 (bfloat16) of the largest entry on this test's model, within
``DOCUMENTED`` below. Against the backend's own per-output gradient loop on the same mixed model
every strategy agrees to a few half-precision ulps (``OWN_LOOP``: the same operations, rounded in
another order or, on TensorFlow, compiled).
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
from conftest import STRATEGIES, reference_jacobian

import augnet

L = keras.layers
# Relative to the largest entry of the float32 model's Jacobian (README, "Mixed precision").
DOCUMENTED = {"mixed_float16": 5e-3, "mixed_bfloat16": 4e-2}
# Against the backend's own loop on the mixed model: a few half-precision ulps.
OWN_LOOP = {"mixed_float16": 4e-3, "mixed_bfloat16": 3e-2}


def _build(policy):
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    keras.utils.set_random_seed(0)
    try:
        return keras.Sequential(
            [
                keras.Input((6, 6, 2)),
                L.Conv2D(4, 3, activation="tanh"),
                L.AveragePooling2D(2),
                L.Flatten(),
                L.Dense(16, activation="tanh"),
                L.BatchNormalization(),
                L.Dense(3),
            ],
            name=policy,
        )
    finally:
        keras.config.set_dtype_policy(previous)


@pytest.fixture(scope="module")
def float32_case():
    model = _build("float32")
    x = np.random.default_rng(0).uniform(-1, 1, (4, 6, 6, 2)).astype("float32")
    return model, x, augnet.jacobian(model, x, strategy="loop")


@pytest.fixture(scope="module", params=sorted(DOCUMENTED))
def mixed(request, float32_case):
    model32, x, _ = float32_case
    model = _build(request.param)
    model.set_weights(model32.get_weights())
    assert model.layers[0].compute_dtype == request.param.split("_")[1]
    return request.param, model, reference_jacobian(model, x)


def _rel(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_mixed_policy_jacobian_dtype_and_distance_from_float32(mixed, float32_case, strategy):
    policy, model, own = mixed
    _, x, J32 = float32_case
    J = augnet.jacobian(model, x, strategy=strategy)
    assert J.dtype == np.float32  # the model's input dtype
    assert J.shape == J32.shape
    assert _rel(J, J32) <= DOCUMENTED[policy], _rel(J, J32)
    assert _rel(J, own) <= OWN_LOOP[policy], _rel(J, own)


def test_mixed_policy_products(mixed, float32_case):
    policy, model, _ = mixed
    model32, x, J32 = float32_case
    u = np.ones((4, 3), "float32")
    g = augnet.vjp(model, x, u)
    assert g.dtype == np.float32 and g.shape == x.shape
    assert _rel(g, np.einsum("bo,bo...->b...", u, J32)) <= DOCUMENTED[policy]
    y_dot = augnet.jvp(model, x, x)
    assert np.dtype(y_dot.dtype).name == policy.split("_")[1]  # the outputs' dtype
    expected = np.einsum("boi,bi->bo", J32.reshape(4, 3, -1), x.reshape(4, -1))
    assert _rel(y_dot, expected) <= DOCUMENTED[policy]
