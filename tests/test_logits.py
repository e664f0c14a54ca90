"""``logits=True``: the Jacobian of the scores before the final softmax/sigmoid, against a model
built by hand without that activation and given the same weights; the user's model is never
changed. And the all-zero warning, on a saturated softmax.

References are the backend's own per-output gradient loop (conftest.reference_jacobian) of the
hand-built logits model, and closed forms for the saturated case.
"""

from __future__ import annotations

import warnings

import keras
import numpy as np
import pytest
from conftest import TOL, reference_jacobian, to_numpy

import augnet
from augnet._engine import logits_view, trace_count

L = keras.layers
ops = keras.ops
F32 = TOL["float32"]
RNG = np.random.default_rng(11)
X = RNG.normal(size=(3, 6)).astype("float32")


def _dense(final: str | None, act: str = "softmax"):
    """Input(6) -> Dense(8, tanh) -> the head. ``final``: how the activation is applied."""
    keras.utils.set_random_seed(11)
    i = keras.Input((6,), name="x")
    h = L.Dense(8, activation="tanh", name="hidden")(i)
    if final == "in_layer":
        y = L.Dense(5, activation=act, name="head")(h)
    elif final == "activation_layer":
        y = L.Activation(act, name="act")(L.Dense(5, name="head")(h))
    elif final == "softmax_layer":
        y = L.Softmax(name="act")(L.Dense(5, name="head")(h))
    elif final == "op":
        z = L.Dense(5, name="head")(h)
        y = ops.softmax(z) if act == "softmax" else ops.sigmoid(z)
    elif final == "nested":
        head = keras.Sequential([keras.Input((8,)), L.Dense(5, activation=act)], name="inner")
        y = head(h)
    else:  # the logits model, by hand
        y = L.Dense(5, name="head")(h)
    return keras.Model(i, y, name=f"m_{final}")


def _pair(final: str, act: str = "softmax"):
    model = _dense(final, act)
    reference = _dense(None)
    reference.set_weights(model.get_weights())
    return model, reference


HEADS = [
    ("in_layer", "softmax"),
    ("in_layer", "sigmoid"),
    ("activation_layer", "softmax"),
    ("activation_layer", "sigmoid"),
    ("softmax_layer", "softmax"),
    ("op", "softmax"),
    ("op", "sigmoid"),
    ("nested", "softmax"),
]


def _state(model):
    """Everything of a model that logits=True must leave alone."""
    return (
        [w.copy() for w in model.get_weights()],
        [
            (id(layer), len(layer._inbound_nodes), len(layer._outbound_nodes))
            for layer in model.layers
        ],
        [getattr(layer, "activation", None) for layer in model.layers],
        ["call" in layer.__dict__ for layer in model.layers],
        to_numpy(model(X, training=False)),
    )


def _assert_unchanged(before, after):
    for a, b in zip(before[0], after[0]):
        np.testing.assert_array_equal(a, b)
    assert before[1:4] == after[1:4]
    np.testing.assert_array_equal(before[4], after[4])


@pytest.mark.parametrize("final, act", HEADS)
def test_logits_equal_a_hand_built_logits_model(final, act):
    model, reference = _pair(final, act)
    before = _state(model)
    J = augnet.jacobian(model, X, logits=True, strategy="loop")
    np.testing.assert_allclose(J, reference_jacobian(reference, X), **F32)
    _assert_unchanged(before, _state(model))
    # The probabilities' Jacobian is still there, and different.
    P = augnet.jacobian(model, X, strategy="loop")
    np.testing.assert_allclose(P, reference_jacobian(model, X), **F32)
    assert not np.allclose(P, J)


@pytest.mark.parametrize("strategy", ["loop", "pfor", "forward", "auto"])
def test_every_entry_point_and_strategy(strategy, tmp_path):
    model, reference = _pair("in_layer")
    expected = reference_jacobian(reference, X)
    kw = {"logits": True, "strategy": strategy}
    np.testing.assert_allclose(augnet.jacobian(model, X, **kw), expected, **F32)
    np.testing.assert_allclose(augnet.wrap(model).return_jacobian(X, **kw), expected, **F32)
    streamed = np.zeros_like(expected)
    for chunk in augnet.iter_jacobian(model, X, **kw):
        streamed[chunk.samples, chunk.columns] = chunk.values
    np.testing.assert_allclose(streamed, expected, **F32)
    path = augnet.jacobian_to_npy(model, X, tmp_path / "J.npy", **kw)
    np.testing.assert_allclose(np.load(path), expected, **F32)
    sel = augnet.jacobian(model, X, outputs=[1, 3], **kw)
    np.testing.assert_allclose(sel, expected[:, [1, 3]], **F32)
    if strategy != "forward":  # top_k is a reverse-mode selection
        top = augnet.jacobian(model, X, top_k=2, **kw)
        scores = to_numpy(reference(X))
        order = np.argsort(-scores, axis=1, kind="stable")[:, :2]
        np.testing.assert_array_equal(top.indices, order)  # the softmax keeps the order
        np.testing.assert_allclose(top.values, np.take_along_axis(scores, order, 1), **F32)
        np.testing.assert_allclose(
            top.jacobian, np.take_along_axis(expected, order[:, :, None], 1), **F32
        )


def test_vjp_jvp_and_wrt():
    model, reference = _pair("activation_layer")
    expected = reference_jacobian(reference, X)  # (3, 5, 6)
    u = RNG.normal(size=(3, 5)).astype("float32")
    v = RNG.normal(size=(3, 6)).astype("float32")
    np.testing.assert_allclose(
        augnet.vjp(model, X, u, logits=True), np.einsum("bo,boi->bi", u, expected), **F32
    )
    np.testing.assert_allclose(
        augnet.jvp(model, X, v, logits=True), np.einsum("boi,bi->bo", expected, v), **F32
    )
    # With respect to the hidden layer: the head's kernel, transposed, for every sample.
    J = augnet.jacobian(model, X, wrt="hidden", logits=True, strategy="loop")
    kernel = to_numpy(model.get_layer("head").kernel)
    np.testing.assert_allclose(J, np.broadcast_to(kernel.T, (3, 5, 8)), **F32)
    np.testing.assert_allclose(
        J, augnet.jacobian(reference, X, wrt="hidden", strategy="loop"), **F32
    )


def test_the_view_shares_the_weights_and_is_built_once():
    model, reference = _pair("in_layer")
    view = logits_view(model)
    assert logits_view(model) is view
    head = model.get_layer("head")
    assert {id(v) for v in view.trainable_variables} == {id(v) for v in model.trainable_variables}
    J0 = augnet.jacobian(model, X, logits=True, strategy="loop")
    traces = trace_count(model)
    # Weights changed after the first call (as fit would): the next Jacobian follows them,
    # without tracing again.
    head.kernel.assign(to_numpy(head.kernel) * 3.0)
    reference.set_weights(model.get_weights())
    J1 = augnet.jacobian(model, X, logits=True, strategy="loop")
    np.testing.assert_allclose(J1, reference_jacobian(reference, X), **F32)
    assert not np.allclose(J0, J1)
    assert trace_count(model) == traces


def test_several_outputs_and_a_convolutional_head():
    keras.utils.set_random_seed(12)
    i = keras.Input((6, 6, 2))
    h = L.Conv2D(3, 3, activation="tanh", name="c1")(i)
    a = L.Conv2D(2, 3, activation="sigmoid", name="seg")(h)  # (2, 2, 2) per sample
    b = L.Dense(4, activation="softmax", name="cls")(L.Flatten()(h))
    model = keras.Model(i, [a, b])
    j = keras.Input((6, 6, 2))
    g = L.Conv2D(3, 3, activation="tanh", name="c1")(j)
    reference = keras.Model(
        j, [L.Conv2D(2, 3, name="seg")(g), L.Dense(4, name="cls")(L.Flatten()(g))]
    )
    reference.set_weights(model.get_weights())
    x = RNG.normal(size=(2, 6, 6, 2)).astype("float32")
    J = augnet.jacobian(model, x, logits=True, strategy="loop")
    ref = reference_jacobian(reference, x)
    for o in range(2):
        np.testing.assert_allclose(J[o], ref[o], **F32)


def test_an_output_without_an_activation_to_strip_is_named():
    keras.utils.set_random_seed(12)
    i = keras.Input((6,))
    h = L.Dense(8, activation="tanh")(i)
    model = keras.Model(
        i, [L.Dense(3, activation="softmax")(h), L.Dense(2, activation="relu", name="box")(h)]
    )
    with pytest.raises(ValueError, match=r"ends in Dense 'box' with activation 'relu'"):
        augnet.jacobian(model, X, logits=True)
    flat = keras.Sequential([keras.Input((6,)), L.Flatten(name="flat")])
    with pytest.raises(
        ValueError, match=r"ends in Flatten 'flat', which is not a softmax or sigmoid"
    ):
        augnet.jacobian(flat, X, logits=True)


# --------------------------------------------------------------------------------------------------
# The all-zero warning: a saturated softmax
# --------------------------------------------------------------------------------------------------


def _saturated():
    """uint8-range inputs into a classifier whose scores differ by thousands: the softmax is
    exactly one-hot in float32, so its Jacobian is exactly zero."""
    model = keras.Sequential(
        [keras.Input((16,)), L.Dense(3, activation="softmax", name="head")], name="saturated"
    )
    kernel = np.zeros((16, 3), "float32")
    kernel[:, 0], kernel[:, 1] = 2.0, -2.0
    model.get_layer("head").set_weights([kernel, np.zeros(3, "float32")])
    x = np.full((2, 16), 200.0, "float32")  # 0-255 pixels into a model trained on [0, 1]
    return model, x, kernel


def test_a_saturated_softmax_warns_and_logits_give_its_scores():
    model, x, kernel = _saturated()
    with pytest.warns(augnet.ZeroJacobianWarning, match=r"sample\(s\) 0, 1 is exactly zero") as rec:
        J = augnet.jacobian(model, x, strategy="loop")
    assert np.all(J == 0)
    message = str(rec[0].message)
    assert "logits=True" in message and "0-255 pixels" in message
    with warnings.catch_warnings():
        warnings.simplefilter("error", augnet.ZeroJacobianWarning)
        J = augnet.jacobian(model, x, logits=True, strategy="loop")
    np.testing.assert_allclose(J, np.broadcast_to(kernel.T, (2, 3, 16)), **F32)  # closed form


def test_repeated_calls_warn_as_the_first_does():
    """The first call plans; repeated calls take the prepared fast lane, whose check skips the
    per-sample search when the result has no zero at all: both must warn alike."""
    model, x, kernel = _saturated()
    mixed = np.stack([x[0] / 255.0, x[1]])
    for _ in range(3):
        with pytest.warns(augnet.ZeroJacobianWarning, match=r"sample\(s\) 1 is") as rec:
            J = augnet.jacobian(model, mixed)
        assert len(rec) == 1
        assert np.all(J[1] == 0) and np.any(J[0] != 0)
    for _ in range(3):  # zero entries (output 2's kernel column) but no sample all zero: silent
        with warnings.catch_warnings():
            warnings.simplefilter("error", augnet.ZeroJacobianWarning)
            J = augnet.jacobian(model, x, logits=True)
        np.testing.assert_allclose(J, np.broadcast_to(kernel.T, (2, 3, 16)), **F32)
        assert np.all(J[:, 2] == 0)


def test_the_warning_from_every_entry_point_and_only_for_zero_samples(tmp_path):
    model, x, _ = _saturated()
    with pytest.warns(augnet.ZeroJacobianWarning, match="augnet.iter_jacobian"):
        chunks = list(augnet.iter_jacobian(model, x))
    assert all(np.all(np.asarray(c.values) == 0) for c in chunks)
    with pytest.warns(augnet.ZeroJacobianWarning, match="augnet.jacobian_to_npy"):
        augnet.jacobian_to_npy(model, x, tmp_path / "J.npy")
    with pytest.warns(augnet.ZeroJacobianWarning, match=r"sample\(s\) 1 is"):
        augnet.jacobian(model, np.stack([x[0] / 255.0, x[1]]), strategy="loop")
    ordinary, reference = _pair("in_layer")
    with warnings.catch_warnings():
        warnings.simplefilter("error", augnet.ZeroJacobianWarning)
        augnet.jacobian(ordinary, X)
        list(augnet.iter_jacobian(ordinary, X))


def test_the_all_zero_check_of_small_and_large_results():
    """Small results are checked whole (count_nonzero), large ones per sample from the head on:
    either way a sample whose only non-zero lies far in is non-zero, an all-zero one is not."""
    from augnet._engine import checks

    for shape in [(3, 2, 4), (3, 13, 64, 64)]:  # below and above checks.COUNT_MAX elements
        J = np.zeros(shape, "float32")
        J[0].flat[-1] = 1e-30  # past the head of sample 0
        J[2].flat[0] = -2.0
        np.testing.assert_array_equal(checks.nonzero_samples([J], 3), [True, False, True])
        J[1].flat[J[1].size // 2] = 1.0
        np.testing.assert_array_equal(checks.nonzero_samples([J], 3), [True, True, True])
        full = np.ones(shape, "float32")
        np.testing.assert_array_equal(checks.nonzero_samples([full], 3), [True, True, True])
        split = [np.zeros((3, 5), "float32"), J]  # several inputs: any of them counts
        np.testing.assert_array_equal(checks.nonzero_samples(split, 3), [True, True, True])
