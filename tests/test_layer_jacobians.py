"""The chain rule layer by layer, latent sensitivity (wrt=, intermediate_model) and per-sample
parameter gradients, against products of Jacobians, closed forms and the backend's plain gradient.

float64 models use tanh where Keras computes it in float64, else sigmoid (``conftest.f64_activation``)."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from conftest import f64_activation, predict, reference_weight_gradients, to_numpy

import augnet

TOL64 = {"rtol": 1e-10, "atol": 1e-12}
F64 = "float64"


def _sequential():
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((2,), dtype=F64),
            keras.layers.Dense(3, activation=f64_activation(), name="g", dtype=F64),
            keras.layers.Dense(4, activation="sigmoid", name="h", dtype=F64),
            keras.layers.Dense(2, name="k", dtype=F64),
        ]
    )


def _functional_chain():
    keras.utils.set_random_seed(1)
    inp = keras.Input((2, 3), dtype=F64)
    h = keras.layers.Flatten(dtype=F64, name="flat")(inp)
    h = keras.layers.Dense(4, activation=f64_activation(), name="d1", dtype=F64)(h)
    h = keras.layers.Reshape((2, 2), dtype=F64, name="rs")(h)
    return keras.Model(inp, keras.layers.Dense(3, name="d2", dtype=F64)(h))


def _residual():
    keras.utils.set_random_seed(2)
    inp = keras.Input((3,), dtype=F64)
    a = keras.layers.Dense(3, activation=f64_activation(), name="a", dtype=F64)(inp)
    b = keras.layers.Dense(3, activation=f64_activation(), name="b", dtype=F64)(a)
    s = keras.layers.Add(name="skip", dtype=F64)([a, b])
    return keras.Model(inp, keras.layers.Dense(2, name="out", dtype=F64)(s))


@pytest.mark.parametrize("build, x_shape", [(_sequential, (5, 2)), (_functional_chain, (5, 2, 3))])
def test_chain_rule_product_equals_full_jacobian(build, x_shape):
    model = build()
    x = np.random.default_rng(0).normal(size=x_shape)
    per_layer = augnet.layer_jacobians(model, x)
    layers = [la for la in model.layers if not isinstance(la, keras.layers.InputLayer)]
    assert list(per_layer) == [layer.name for layer in layers]
    a = x
    product = None
    for layer in layers:
        J = per_layer[layer.name]
        out = to_numpy(layer(a))
        assert J.shape == (5, *out.shape[1:], *a.shape[1:])
        J2 = J.reshape(5, int(np.prod(out.shape[1:])), int(np.prod(a.shape[1:])))
        product = J2 if product is None else np.einsum("bij,bjk->bik", J2, product)
        a = out
    full = augnet.jacobian(model, x, strategy="loop")
    np.testing.assert_allclose(product, full.reshape(product.shape), **TOL64)


def test_layer_jacobians_closed_form_dense():
    model = _sequential()
    x = np.random.default_rng(3).normal(size=(2, 2))
    J = augnet.layer_jacobians(model, x)
    np.testing.assert_array_equal(J["k"][0], model.get_layer("k").kernel.numpy().T)


def test_layer_jacobians_rejects_non_chain():
    with pytest.raises(ValueError, match=r"not a chain of layers: layer 'skip'.*wrt=layer_name"):
        augnet.layer_jacobians(_residual(), np.zeros((1, 3)))


def test_wrt_is_the_tail_of_the_chain():
    model = _sequential()
    x = np.random.default_rng(4).normal(size=(4, 2))
    per_layer = augnet.layer_jacobians(model, x)
    J_g = augnet.jacobian(model, x, wrt="g", strategy="loop")  # d out / d g's output: J_k · J_h
    assert J_g.shape == (4, 2, 3)
    np.testing.assert_allclose(
        J_g, np.einsum("bij,bjk->bik", per_layer["k"], per_layer["h"]), **TOL64
    )
    J_x_to_g = augnet.jacobian(augnet.intermediate_model(model, "g"), x, strategy="loop")
    np.testing.assert_allclose(J_x_to_g, per_layer["g"], **TOL64)
    # Chain rule through the latent: d out/dx = (d out/d g) (d g/dx).
    np.testing.assert_allclose(
        np.einsum("bij,bjk->bik", J_g, J_x_to_g),
        augnet.jacobian(model, x, strategy="loop"),
        **TOL64,
    )
    wrapped = augnet.wrap(model)
    np.testing.assert_allclose(wrapped.return_jacobian(x, wrt="g", strategy="loop"), J_g, **TOL64)


def test_wrt_with_skip_connection_closed_form():
    """out = D(a + tanh(B a)): ∂out/∂a = W_outᵀ (I + diag(1 - tanh²) W_bᵀ) (sigmoid where Keras
    computes tanh of float64 in float32: ``conftest.f64_activation``)."""
    model = _residual()
    x = np.random.default_rng(5).normal(size=(3, 3))
    J = augnet.jacobian(model, x, wrt="a", strategy="loop")
    a = predict(augnet.intermediate_model(model, "a"), x)
    Wb, bb = (to_numpy(w) for w in model.get_layer("b").weights)
    Wo = model.get_layer("out").kernel.numpy()
    for i in range(3):
        z = a[i] @ Wb + bb
        if f64_activation() == "tanh":
            d = 1 - np.tanh(z) ** 2
        else:
            s = 1 / (1 + np.exp(-z))
            d = s * (1 - s)
        expected = Wo.T @ (np.eye(3) + np.diag(d) @ Wb.T)
        np.testing.assert_allclose(J[i], expected, **TOL64)


def test_wrt_selection_and_errors():
    model = _sequential()
    x = np.random.default_rng(6).normal(size=(3, 2))
    full = augnet.jacobian(model, x, wrt="h", strategy="loop")
    np.testing.assert_allclose(
        augnet.jacobian(model, x, wrt="h", outputs=[1], strategy="loop"), full[:, 1:2], **TOL64
    )
    with pytest.raises(
        ValueError, match=r"no layer named 'nope'; its layers are \['g', 'h', 'k'\]"
    ):
        augnet.jacobian(model, x, wrt="nope")


# -- parameter gradients -----------------------------------------------------------------------


def test_parameter_gradients_of_outputs_against_reference():
    model = _sequential()
    x = np.random.default_rng(7).normal(size=(3, 2))
    grads = augnet.parameter_gradients(model, x)
    names = [v.path for v in model.trainable_weights]
    assert list(grads) == names
    for b in range(3):
        for j in range(2):
            ref = reference_weight_gradients(model, x[b : b + 1], lambda y, j=j: y[0, j])
            for name, r in zip(names, ref):
                np.testing.assert_allclose(grads[name][b, j], r, **TOL64)
    assert grads[names[0]].shape == (3, 2, 2, 3)  # (batch, *output_shape, *kernel_shape)


def test_parameter_gradients_of_a_loss_against_reference():
    model = _sequential()
    rng = np.random.default_rng(8)
    x, y = rng.normal(size=(4, 2)), rng.normal(size=(4, 2))
    grads = augnet.parameter_gradients(model, x, y, loss="mse", weights=["g/kernel", "k/bias"])
    assert [k.split("/", 1)[1] for k in grads] == ["g/kernel", "k/bias"]
    kernel, bias = model.get_layer("g").kernel, model.get_layer("k").bias
    index = {v.path: i for i, v in enumerate(model.trainable_weights)}
    for b in range(4):
        target = keras.ops.convert_to_tensor(y[b : b + 1])  # (a NumPy operand fails on torch)
        ref = reference_weight_gradients(
            model, x[b : b + 1], lambda out, t=target: keras.ops.mean(keras.ops.square(out - t))
        )
        np.testing.assert_allclose(grads[kernel.path][b], ref[index[kernel.path]], **TOL64)
        np.testing.assert_allclose(grads[bias.path][b], ref[index[bias.path]], **TOL64)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"y": np.zeros((2, 2))}, r"Pass both `y` and `loss`"),
        ({"weights": ["nope"]}, r"`weights` names 'nope', which matches 0"),
        (
            {"y": np.zeros((3, 2)), "loss": "mse"},
            r"`y` has shape \(3, 2\), but `x` has a batch of 2",
        ),
    ],
)
def test_parameter_gradients_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        augnet.parameter_gradients(_sequential(), np.zeros((2, 2)), **kwargs)
