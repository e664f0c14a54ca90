"""augnet.vjp / augnet.jvp against Jᵀ·u and J·v (augnet's full Jacobian) and the backend's plain
per-output gradient loop; compiled once per input signature (no retrace on repeated calls).

The float64 models use tanh where Keras computes it in float64, else sigmoid
(``conftest.f64_activation``), so that the 1e-10 comparisons test augnet, not Keras's promotion."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from conftest import f64_activation, reference_jacobian

import augnet
from augnet import _engine

TOL64 = {"rtol": 1e-10, "atol": 1e-12}


def _single():
    keras.utils.set_random_seed(0)
    inp = keras.Input((3,), dtype="float64")
    h = keras.layers.Dense(5, activation=f64_activation(), dtype="float64")(inp)
    return keras.Model(inp, keras.layers.Dense(2, dtype="float64")(h))


def _multi():
    keras.utils.set_random_seed(1)
    a = keras.Input((3,), dtype="float64", name="a")
    b = keras.Input((2, 2), dtype="float64", name="b")
    h = keras.layers.Concatenate(dtype="float64")([a, keras.layers.Flatten(dtype="float64")(b)])
    h = keras.layers.Dense(4, activation=f64_activation(), dtype="float64")(h)
    out1 = keras.layers.Dense(2, dtype="float64", name="o1")(h)
    out2 = keras.layers.Dense(3, activation="sigmoid", dtype="float64", name="o2")(a)  # a only
    return keras.Model({"a": a, "b": b}, {"o1": out1, "o2": out2})


def _reference_vjp(model, x, u):
    """uᵀ·J per sample from the plain per-output loop's Jacobian (outputs and inputs as dicts or
    single arrays)."""
    J = reference_jacobian(model, x)
    if not isinstance(x, dict):
        return np.einsum("bo,boi->bi", u, J)
    return {k: sum(np.einsum("bo,bo...->b...", u[o], J[o][k]) for o in u) for k in x}


def test_vjp_single_against_jacobian_and_reference():
    model = _single()
    rng = np.random.default_rng(0)
    x, u = rng.normal(size=(6, 3)), rng.normal(size=(6, 2))
    g = augnet.vjp(model, x, u)
    assert g.shape == (6, 3) and g.dtype == np.float64
    J = augnet.jacobian(model, x, strategy="loop")
    np.testing.assert_allclose(g, np.einsum("bo,boi->bi", u, J), **TOL64)
    np.testing.assert_allclose(g, _reference_vjp(model, x, u), **TOL64)


def test_jvp_single_against_jacobian_and_reference():
    model = _single()
    rng = np.random.default_rng(1)
    x, v = rng.normal(size=(6, 3)), rng.normal(size=(6, 3))
    y_dot = augnet.jvp(model, x, v)
    assert y_dot.shape == (6, 2)
    np.testing.assert_allclose(
        y_dot, np.einsum("boi,bi->bo", augnet.jacobian(model, x, strategy="loop"), v), **TOL64
    )
    np.testing.assert_allclose(
        y_dot, np.einsum("boi,bi->bo", reference_jacobian(model, x), v), **TOL64
    )


def test_vjp_jvp_multi_input_output_dicts():
    model = _multi()
    rng = np.random.default_rng(2)
    x = {"a": rng.normal(size=(4, 3)), "b": rng.normal(size=(4, 2, 2))}
    u = {"o1": rng.normal(size=(4, 2)), "o2": rng.normal(size=(4, 3))}
    J = augnet.jacobian(model, x, strategy="loop")  # J[out][in]
    g = augnet.vjp(model, x, u)
    assert set(g) == {"a", "b"} and g["b"].shape == (4, 2, 2)
    ref = _reference_vjp(model, x, u)
    for k in ("a", "b"):
        from_j = sum(np.einsum("bo,bo...->b...", u[o], J[o][k]) for o in ("o1", "o2"))
        np.testing.assert_allclose(g[k], from_j, **TOL64)
        np.testing.assert_allclose(g[k], ref[k], **TOL64)
    v = {"a": rng.normal(size=(4, 3)), "b": rng.normal(size=(4, 2, 2))}
    y_dot = augnet.jvp(model, x, v)
    for o in ("o1", "o2"):
        expected = np.einsum("boi,bi->bo", J[o]["a"], v["a"]) + np.einsum(
            "bojk,bjk->bo", J[o]["b"], v["b"]
        )
        np.testing.assert_allclose(y_dot[o], expected, **TOL64)
    # o2 does not depend on b: zero blocks, no error.
    assert np.all(J["o2"]["b"] == 0)


def test_float32_dtype_kept():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    x = np.ones((2, 3), "float32")
    assert augnet.vjp(model, x, np.ones((2, 2), "float32")).dtype == np.float32
    assert augnet.jvp(model, x, np.ones((2, 3), "float32")).dtype == np.float32


@pytest.mark.parametrize(
    "fn, bad, match",
    [
        ("vjp", np.ones((6, 3)), r"`cotangent` has shape \(6, 3\), expected \(6, 2\)"),
        ("vjp", np.ones((5, 2)), r"`cotangent` has shape \(5, 2\), expected \(6, 2\)"),
        ("jvp", np.ones((6, 2)), r"`tangent` has shape \(6, 2\), expected \(6, 3\)"),
        ("vjp", [np.ones((6, 2))] * 2, r"`cotangent` holds 2 array\(s\)"),
    ],
)
def test_shape_errors(fn, bad, match):
    model = _single()
    with pytest.raises(ValueError, match=match):
        getattr(augnet, fn)(model, np.zeros((6, 3)), bad)


def test_dict_keys_error():
    model = _multi()
    x = {"a": np.zeros((1, 3)), "b": np.zeros((1, 2, 2))}
    with pytest.raises(ValueError, match=r"`cotangent` has keys \['o1'\]"):
        augnet.vjp(model, x, {"o1": np.zeros((1, 2))})


# --------------------------------------------------------------------------------------------------
# Compiled and cached like the Jacobian
# --------------------------------------------------------------------------------------------------


def test_vjp_and_jvp_compile_once_per_input_signature():
    keras.utils.set_random_seed(2)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, activation="tanh")])
    rng = np.random.default_rng(3)
    x = rng.normal(size=(6, 3)).astype("float32")
    u, v = rng.normal(size=(6, 4)).astype("float32"), rng.normal(size=(6, 3)).astype("float32")
    J = reference_jacobian(model, x)
    assert _engine.trace_count(model) == 0
    g = augnet.vjp(model, x, u)
    y_dot = augnet.jvp(model, x, v)
    traced = _engine.trace_count(model)
    assert traced >= 2  # one vjp and one jvp function
    for batch in (6, 6, 2, 5):  # repeated calls, new values, other batch sizes: no retrace
        xb, ub, vb = x[:batch] * 1.5, u[:batch], v[:batch]
        Jb = reference_jacobian(model, xb)
        np.testing.assert_allclose(
            augnet.vjp(model, xb, ub), np.einsum("bo,boi->bi", ub, Jb), rtol=1e-5, atol=1e-6
        )
        np.testing.assert_allclose(
            augnet.jvp(model, xb, vb), np.einsum("boi,bi->bo", Jb, vb), rtol=1e-5, atol=1e-6
        )
    assert _engine.trace_count(model) == traced
    np.testing.assert_allclose(g, np.einsum("bo,boi->bi", u, J), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(y_dot, np.einsum("boi,bi->bo", J, v), rtol=1e-5, atol=1e-6)


def test_vjp_sees_weights_changed_after_it_compiled():
    keras.utils.set_random_seed(4)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    x = np.ones((2, 3), "float32")
    u = np.array([[1.0, 0.0], [0.0, 1.0]], "float32")
    kernel = np.arange(6, dtype="float32").reshape(3, 2)
    model.layers[0].kernel.assign(kernel)
    np.testing.assert_allclose(augnet.vjp(model, x, u), (u @ kernel.T), rtol=1e-6)
    model.layers[0].kernel.assign(-2 * kernel)  # as fit would
    np.testing.assert_allclose(augnet.vjp(model, x, u), (u @ (-2 * kernel).T), rtol=1e-6)
    np.testing.assert_allclose(augnet.jvp(model, x, x), x @ (-2 * kernel), rtol=1e-6)
