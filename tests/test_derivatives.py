"""Custom derivative rules and the error for layers with no gradient path.

The layers without a gradient path are written with ``keras.ops`` (``round``, ``floor``,
``stop_gradient``), so that the tests run on every backend; the realistic TensorFlow case, a layer
computed by NumPy through ``tf.numpy_function``, is tested on TensorFlow at the end.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
from conftest import backend, to_numpy

import augnet

ops = keras.ops

TOL64 = {"rtol": 1e-10, "atol": 1e-12}
F64 = "float64"


class F64Layer(keras.layers.Layer):
    """Layers in float64 unless told otherwise, so that comparisons are exact."""

    def __init__(self, **kwargs):
        kwargs.setdefault("dtype", F64)
        super().__init__(**kwargs)


class Round(F64Layer):
    """Rounding: no gradient path (TensorFlow has no gradient for round: None)."""

    def call(self, x):
        return ops.round(x)


class NumpyClip(F64Layer):
    """A clip whose gradient path is cut (as if computed outside the framework, by NumPy)."""

    def __init__(self, vmin=-0.5, vmax=0.5, **kwargs):
        super().__init__(**kwargs)
        self.vmin, self.vmax = vmin, vmax

    def call(self, x):
        return ops.clip(ops.stop_gradient(x), self.vmin, self.vmax)


class NumpyPlus(F64Layer):
    """``x + 5`` without a gradient path."""

    def call(self, x):
        return ops.stop_gradient(x) + 5.0


class NumpyLinear(F64Layer):
    """x @ W without a gradient path: a linear layer for an input-independent rule."""

    W = np.array([[1.0, -2.0, 0.5], [3.0, 0.0, -1.0]])  # (in=2, out=3)

    def call(self, x):
        return ops.matmul(ops.stop_gradient(x), ops.convert_to_tensor(self.W, x.dtype))

    def compute_output_shape(self, input_shape):
        return (input_shape[0], 3)


def clip_rule(inputs, outputs, layer):
    inside = ops.logical_and(inputs >= layer.vmin, inputs <= layer.vmax)
    return ops.cast(inside, inputs.dtype)


def _sandwich(middle, n_in=3, width=4):
    keras.utils.set_random_seed(0)
    inp = keras.Input((n_in,), dtype=F64)
    h = keras.layers.Dense(width, dtype=F64, name="d1")(inp)
    h = middle(h)
    return keras.Model(inp, keras.layers.Dense(2, dtype=F64, name="d2")(h))


X = np.random.default_rng(0).normal(size=(6, 3)) * 2


def _loop(model, x, **kw):
    return augnet.jacobian(model, x, strategy="loop", **kw)


def test_no_gradient_path_error_names_layer_everywhere():
    model = _sandwich(Round(name="rounder"))
    match = r"Layer Round 'rounder'.*no gradient path.*augnet.register_derivative\(Round\)"
    with pytest.raises(augnet.GradientPathError, match=match):
        _loop(model, X)
    with pytest.raises(augnet.GradientPathError, match=match):
        augnet.wrap(model).return_jacobian(X)
    with pytest.raises(augnet.GradientPathError, match=match):
        augnet.vjp(model, X, np.ones((6, 2)))
    with pytest.raises(augnet.GradientPathError, match=match):
        augnet.backward_model(model)
    assert issubclass(augnet.GradientPathError, ValueError)
    assert "call" not in model.get_layer("rounder").__dict__  # nothing left patched


@pytest.mark.parametrize("strategy", ["loop", "pfor", "forward"])
def test_straight_through_rule_equals_identity(strategy):
    ruled = _sandwich(Round())
    identity = _sandwich(keras.layers.Identity(dtype=F64))
    J = augnet.jacobian(ruled, X, derivatives={Round: 1.0}, strategy=strategy)
    np.testing.assert_allclose(J, _loop(identity, X), **TOL64)
    # Rules leave no trace: the cache is keyed on them, and the plain call errors again.
    with pytest.raises(augnet.GradientPathError):
        augnet.jacobian(ruled, X, strategy=strategy)


def test_plus_constant_rule_matches_autodiff():
    ruled = _sandwich(NumpyPlus())
    reference = _sandwich(augnet.PlusConstant(5.0, dtype=F64))
    np.testing.assert_allclose(to_numpy(ruled(X)), to_numpy(reference(X)), **TOL64)  # same function
    J = _loop(ruled, X, derivatives={NumpyPlus: 1.0})
    np.testing.assert_allclose(J, _loop(reference, X), **TOL64)


def test_clip_rule_matches_autodiff_inside_and_outside():
    ruled = _sandwich(NumpyClip(-0.5, 0.5))
    reference = _sandwich(augnet.Clip(-0.5, 0.5, dtype=F64))
    h = to_numpy(ruled.get_layer("d1")(X))
    assert (np.abs(h) > 0.5).any() and (np.abs(h) < 0.5).any()  # both regimes are exercised
    J = _loop(ruled, X, derivatives={NumpyClip: clip_rule})
    np.testing.assert_allclose(J, _loop(reference, X), **TOL64)
    # The rule's own values on a single Clip layer: 1 inside, 0 outside.
    single = keras.Sequential([keras.Input((4,), dtype=F64), NumpyClip(-1.0, 1.0)])
    Js = _loop(single, np.array([[-3.0, -0.5, 0.5, 3.0]]), derivatives={NumpyClip: clip_rule})
    np.testing.assert_array_equal(Js[0], np.diag([0.0, 1.0, 1.0, 0.0]))


def test_registered_rule_decorator_and_priority():
    model = _sandwich(NumpyClip(-0.5, 0.5))
    reference = _loop(_sandwich(augnet.Clip(-0.5, 0.5, dtype=F64)), X)
    augnet.register_derivative(NumpyClip)(clip_rule)
    try:
        assert NumpyClip in augnet.registered_derivatives()
        np.testing.assert_allclose(_loop(model, X), reference, **TOL64)
        np.testing.assert_allclose(augnet.wrap(model).return_jacobian(X), reference, **TOL64)
        # A per-call rule wins over the registered one.
        J1 = _loop(model, X, derivatives={NumpyClip: 1.0})
        np.testing.assert_allclose(
            J1, _loop(_sandwich(keras.layers.Identity(dtype=F64)), X), **TOL64
        )
    finally:
        augnet.unregister_derivative(NumpyClip)
    with pytest.raises(augnet.GradientPathError):
        _loop(model, X)


def test_subclasses_inherit_rules():
    class Floor(Round):
        def call(self, x):
            # Cast back: Keras 3.15 computes floor of float64 in float32 off TensorFlow, which
            # would round the rule's cotangent to float32 (conftest.keeps_float64).
            return ops.cast(ops.floor(x), x.dtype)

    J = _loop(_sandwich(Floor()), X, derivatives={Round: 1.0})
    np.testing.assert_allclose(J, _loop(_sandwich(keras.layers.Identity(dtype=F64)), X), **TOL64)


def test_vjp_function_rule_for_a_linear_layer():
    W = ops.convert_to_tensor(NumpyLinear.W)

    def linear_rule(inputs, outputs):  # input-independent: the cotangent times Wᵀ
        return lambda g: ops.matmul(g, ops.transpose(ops.cast(W, g.dtype)))

    model = keras.Sequential([keras.Input((2,), dtype=F64), NumpyLinear()])
    x = np.random.default_rng(1).normal(size=(3, 2))
    J = _loop(model, x, derivatives={NumpyLinear: linear_rule})
    np.testing.assert_allclose(J, np.broadcast_to(NumpyLinear.W.T, (3, 3, 2)), **TOL64)


def test_rules_in_vjp_jvp_and_backward_model(tmp_path):
    model = _sandwich(NumpyClip(-0.5, 0.5))
    rules = {NumpyClip: clip_rule}
    J = _loop(model, X, derivatives=rules)
    rng = np.random.default_rng(2)
    u, v = rng.normal(size=(6, 2)), rng.normal(size=(6, 3))
    np.testing.assert_allclose(
        augnet.vjp(model, X, u, derivatives=rules), np.einsum("bo,boi->bi", u, J), **TOL64
    )
    np.testing.assert_allclose(
        augnet.jvp(model, X, v, derivatives=rules), np.einsum("boi,bi->bo", J, v), **TOL64
    )
    bm = augnet.backward_model(model, derivatives=rules)
    np.testing.assert_allclose(to_numpy(bm([X, u])), np.einsum("bo,boi->bi", u, J), **TOL64)
    bj = augnet.backward_model(model, jacobian=True, derivatives=rules)
    np.testing.assert_allclose(to_numpy(bj(X)), J, **TOL64)


def test_backward_model_with_registered_rule_round_trips(tmp_path):
    keras.saving.get_custom_objects()["test>Round"] = Round
    model = _sandwich(Round())
    augnet.register_derivative(Round, 1.0)
    try:
        bm = augnet.backward_model(model, gradient=np.ones(2))
        expected = to_numpy(bm(X))
        bm.save(tmp_path / "b.keras")
        loaded = keras.models.load_model(tmp_path / "b.keras", custom_objects={"Round": Round})
        np.testing.assert_array_equal(to_numpy(loaded(X)), expected)
    finally:
        augnet.unregister_derivative(Round)
        keras.saving.get_custom_objects().pop("test>Round", None)


def test_ordinary_zero_dependence_is_not_an_error():
    """An output that ignores an input gives zeros (the core rule), not a gradient-path error."""
    a, b = keras.Input((2,), dtype=F64, name="a"), keras.Input((2,), dtype=F64, name="b")
    out = keras.layers.Dense(1, dtype=F64)(a)
    model = keras.Model([a, b], [out, keras.layers.Dense(1, dtype=F64)(b)])
    J = _loop(model, [np.ones((2, 2)), np.ones((2, 2))])
    assert np.all(J[0][1] == 0) and np.all(J[1][0] == 0)


def test_intentional_stop_gradient_with_zero_rule():
    class Frozen(F64Layer):
        def call(self, x):
            return ops.stop_gradient(x)

    model = _sandwich(Frozen())
    with pytest.raises(augnet.GradientPathError, match="Frozen"):
        _loop(model, X)
    assert np.all(_loop(model, X, derivatives={Frozen: 0.0}) == 0)


def test_layer_restored_after_an_error_in_the_rule():
    def bad_rule(inputs, outputs):
        raise RuntimeError("boom")

    model = _sandwich(Round(name="r"))
    with pytest.raises(RuntimeError, match="boom"):
        augnet.vjp(model, X, np.ones((6, 2)), derivatives={Round: bad_rule})
    assert "call" not in model.get_layer("r").__dict__


def test_rule_with_wrong_shape():
    def wrong(inputs, outputs):
        return lambda g: g[:, :1]

    # The batch axis is unknown (None) while TensorFlow traces; other backends trace concrete shapes.
    batch = "None" if backend() == "tensorflow" else r"\d+"
    with pytest.raises(
        ValueError,
        match=rf"rule of Round .* cotangent of shape \({batch}, 1\) for an input of shape \({batch}, 4\)",
    ):
        _loop(_sandwich(Round()), X, derivatives={Round: wrong})


@pytest.mark.parametrize(
    "derivatives, match",
    [
        ([Round], r"`derivatives` must be a dict \{LayerClass: rule\}; received.*list"),
        ({"Round": 1.0}, r"`derivatives` must be a keras.layers.Layer subclass"),
        ({Round(): 1.0}, r"`derivatives` must be a keras.layers.Layer subclass"),
        ({Round: "one"}, r"`derivatives\[Round\]` must be a number/array"),
    ],
)
def test_bad_derivatives_argument(derivatives, match):
    with pytest.raises(TypeError, match=match):
        _loop(_sandwich(Round()), X, derivatives=derivatives)


def test_register_derivative_rejects_non_layer():
    with pytest.raises(TypeError, match=r"`layer_class` must be a keras.layers.Layer subclass"):
        augnet.register_derivative(int)(1.0)


# --------------------------------------------------------------------------------------------------
# TensorFlow: a layer computed by NumPy (tf.numpy_function has no gradient)
# --------------------------------------------------------------------------------------------------


@pytest.mark.tensorflow_only
def test_numpy_function_layer_needs_a_rule_and_takes_one(tf):
    class TFNumpyClip(F64Layer):
        def __init__(self, vmin=-0.5, vmax=0.5, **kwargs):
            super().__init__(**kwargs)
            self.vmin, self.vmax = vmin, vmax

        def call(self, x):
            y = tf.numpy_function(lambda a: np.clip(a, self.vmin, self.vmax), [x], x.dtype)
            return tf.ensure_shape(y, x.shape)

    def tf_clip_rule(inputs, outputs, layer):
        return tf.cast((inputs >= layer.vmin) & (inputs <= layer.vmax), inputs.dtype)

    model = _sandwich(TFNumpyClip(-0.5, 0.5, name="numpy_clip"))
    with pytest.raises(augnet.GradientPathError, match=r"Layer TFNumpyClip 'numpy_clip'"):
        _loop(model, X)
    reference = _loop(_sandwich(augnet.Clip(-0.5, 0.5, dtype=F64)), X)
    for strategy in ("loop", "pfor", "forward"):
        J = augnet.jacobian(model, X, derivatives={TFNumpyClip: tf_clip_rule}, strategy=strategy)
        np.testing.assert_allclose(J, reference, **TOL64)


def test_use_derivatives_patches_and_restores_the_layers():
    model = _sandwich(Round(name="r"))
    layer = model.get_layer("r")
    with augnet.use_derivatives(model, {Round: 1.0}) as found:
        assert list(found) == [layer] and "call" in layer.__dict__
        np.testing.assert_array_equal(to_numpy(model(X)), to_numpy(_sandwich(Round())(X)))
    assert "call" not in layer.__dict__
    with pytest.raises(RuntimeError, match="inside"):
        with augnet.use_derivatives(model, {Round: 1.0}):
            raise RuntimeError("inside")
    assert "call" not in layer.__dict__
