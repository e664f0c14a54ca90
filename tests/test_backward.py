"""Backward models: VJP / Jacobian as a keras.Model, summary, plot, .keras round trip, export."""

from __future__ import annotations

import importlib.util
import shutil

import keras
import numpy as np
import pytest
from conftest import backend, to_numpy

import augnet

TOL = {"rtol": 1e-5, "atol": 1e-6}


@pytest.fixture(scope="module")
def model():
    keras.utils.set_random_seed(0)
    inp = keras.Input((3,), name="x")
    h = keras.layers.Dense(5, activation="tanh")(inp)
    return keras.Model(inp, keras.layers.Dense(2)(h), name="mlp")


@pytest.fixture(scope="module")
def data(model):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 3)).astype("float32")
    u = rng.normal(size=(4, 2)).astype("float32")
    return x, u, augnet.jacobian(model, x, strategy="loop")


def test_seed_as_input(model, data):
    x, u, J = data
    bm = augnet.backward_model(model)
    assert [t.shape for t in bm.inputs] == [(None, 3), (None, 2)]
    np.testing.assert_allclose(to_numpy(bm([x, u])), np.einsum("bo,boi->bi", u, J), **TOL)


def test_fixed_seed(model, data):
    x, _, J = data
    seed = np.array([2.0, -1.0])
    bm = augnet.backward_model(model, gradient=seed)
    np.testing.assert_allclose(to_numpy(bm(x)), np.einsum("o,boi->bi", seed, J), **TOL)
    bm1 = augnet.backward_model(model, gradient=seed[None])  # (1, *output_shape) is accepted
    np.testing.assert_allclose(to_numpy(bm1(x)), to_numpy(bm(x)), **TOL)


def test_full_jacobian(model, data):
    x, _, J = data
    bm = augnet.backward_model(model, jacobian=True)
    assert bm.output.shape == (None, 2, 3)
    np.testing.assert_allclose(to_numpy(bm(x)), J, **TOL)


def test_augnet_method_and_summary(model, data, capsys):
    x, _, J = data
    bm = augnet.wrap(model).backward_model(gradient=np.ones(2))
    bm.summary()
    text = capsys.readouterr().out
    assert "VJPLayer" in text and "(None, 3)" in text
    np.testing.assert_allclose(to_numpy(bm(x)), J.sum(axis=1), **TOL)


@pytest.mark.skipif(
    importlib.util.find_spec("pydot") is None or shutil.which("dot") is None,
    reason="keras.utils.plot_model needs pydot and graphviz",
)
def test_plot_model(model, tmp_path):
    path = tmp_path / "backward.png"
    keras.utils.plot_model(augnet.backward_model(model), to_file=str(path))
    assert path.stat().st_size > 0


def _backward_of_kind(model, data, kind):
    x, u, _ = data
    if kind == "seed_input":
        return augnet.backward_model(model), [x, u]
    if kind == "fixed":
        return augnet.backward_model(model, gradient=np.array([1.0, 3.0])), x
    return augnet.backward_model(model, jacobian=True), x


@pytest.mark.parametrize("kind", ["seed_input", "fixed", "jacobian"])
def test_save_and_load(model, data, tmp_path, kind):
    bm, args = _backward_of_kind(model, data, kind)
    expected = to_numpy(bm(args))
    path = tmp_path / "backward.keras"
    bm.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_array_equal(to_numpy(loaded(args)), expected)
    loaded_aug = augnet.load_model(path)  # as an AugNet too
    np.testing.assert_array_equal(to_numpy(loaded_aug(args)), expected)


@pytest.mark.parametrize("kind", ["seed_input", "fixed", "jacobian"])
def test_export_to_a_savedmodel(model, data, tmp_path, kind):
    """Keras exports a SavedModel on TensorFlow, and on JAX through jax2tf (TensorFlow installed):
    the backward model's VJP/Jacobian runs in it (shape-polymorphic in the batch on JAX)."""
    if backend() not in ("tensorflow", "jax"):
        pytest.skip(f"Keras exports SavedModels from TensorFlow and JAX, not {backend()}")
    tf = pytest.importorskip("tensorflow")
    x, u, _ = data
    bm, args = _backward_of_kind(model, data, kind)
    expected = to_numpy(bm(args))
    bm.export(str(tmp_path / "served"), verbose=False)
    served = tf.saved_model.load(str(tmp_path / "served"))
    out = served.serve([tf.constant(x), tf.constant(u)] if kind == "seed_input" else tf.constant(x))
    np.testing.assert_allclose(out.numpy(), expected, **TOL)


def test_predict_on_batch_is_compiled_and_matches(model, data):
    """Keras compiles the backward model's predict step (the layers compute through the seam
    inside it): predict_on_batch gives the same numbers as a direct call."""
    x, u, J = data
    bm = augnet.backward_model(model)
    np.testing.assert_allclose(bm.predict_on_batch([x, u]), np.einsum("bo,boi->bi", u, J), **TOL)
    np.testing.assert_allclose(
        bm.predict_on_batch([x[:2], u[:2]]), to_numpy(bm([x[:2], u[:2]])), **TOL
    )


def test_multi_input_output_fixed_seed():
    keras.utils.set_random_seed(1)
    a, b = keras.Input((2,), name="a"), keras.Input((3,), name="b")
    h = keras.layers.Concatenate()([a, b])
    model = keras.Model([a, b], [keras.layers.Dense(2)(h), keras.layers.Dense(1)(a)])
    x = [np.ones((2, 2), "float32"), np.full((2, 3), 0.5, "float32")]
    seeds = [np.array([1.0, 2.0]), np.array([3.0])]
    bm = augnet.backward_model(model, gradient=seeds)
    ga, gb = (to_numpy(t) for t in bm(x))
    ref = augnet.vjp(model, x, [np.tile(s, (2, 1)).astype("float32") for s in seeds])
    np.testing.assert_allclose(ga, ref[0], **TOL)
    np.testing.assert_allclose(gb, ref[1], **TOL)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"gradient": np.ones(2), "jacobian": True}, ValueError, r"either `gradient`.*not both"),
        ({"gradient": np.ones(3)}, ValueError, r"`gradient` has shape \(3,\), expected.*\(2,\)"),
        ({"gradient": [np.ones(2)] * 2}, ValueError, r"`gradient` holds 2 array\(s\)"),
    ],
)
def test_errors(model, kwargs, error, match):
    with pytest.raises(error, match=match):
        augnet.backward_model(model, **kwargs)


def test_not_a_model():
    with pytest.raises(TypeError, match=r"`model` must be a keras.Model; received.*function"):
        augnet.backward_model(lambda x: x)
