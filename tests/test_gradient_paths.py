"""No silent zeros: a Jacobian that is zero because a gradient path is cut is a GradientPathError
naming the op or layer that cut it; an output that truly does not depend on an input still gives
zeros.

Layers with no gradient path (custom layers) are tested in test_derivatives.py. Here: operations
between the layers of a functional model (``keras.ops.round``/``floor``/``argmax``/integer casts/
``stop_gradient``), plain callables, and the outputs that are *not* cut (an unused input, an
``argmax`` used as an index, a second path around a rounding, a constant). Written with
``keras.ops`` for every backend; TensorFlow's own ops (``tf.round``, ``tf.numpy_function``) at the
end.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
from conftest import TOL, reference_jacobian

import augnet
from augnet._engine import blocks, rules

ops = keras.ops
L = keras.layers
F32 = TOL["float32"]
X = np.random.default_rng(4).normal(size=(3, 4)).astype("float32") * 3


def _between(middle, name="between"):
    """Dense -> middle(h) (keras.ops between layers) -> Dense."""
    keras.utils.set_random_seed(4)
    i = keras.Input((4,))
    h = L.Dense(5, name="d1")(i)
    return keras.Model(i, L.Dense(2, name="d2")(middle(h)), name=name)


CUTS = {
    "round": (ops.round, "Round"),
    "floor": (ops.floor, "Floor"),
    "argmax": (
        lambda h: ops.expand_dims(ops.cast(ops.argmax(h, axis=-1), "float32"), -1),
        "Argmax",
    ),
    "int-cast": (lambda h: ops.cast(ops.cast(h * 4.0, "int32"), "float32"), "Cast"),
    "stop_gradient": (ops.stop_gradient, "StopGradient"),
}


@pytest.mark.parametrize("case", list(CUTS))
def test_an_op_between_layers_that_cuts_the_path_is_named(case):
    middle, op_class = CUTS[case]
    model = _between(middle, name=f"cut_{case}")
    match = rf"{op_class} '[a-z_0-9]+' between its layers.*silently zero.*register_derivative"
    with pytest.raises(augnet.GradientPathError, match=match) as info:
        augnet.jacobian(model, X, strategy="loop")
    assert f"of model 'cut_{case}'" in str(info.value) and "'d2'" in str(info.value)
    # Every entry point that differentiates the model says the same.
    for call in (
        lambda: augnet.wrap(model).return_jacobian(X),
        lambda: list(augnet.iter_jacobian(model, X)),
        lambda: augnet.vjp(model, X, np.ones((3, 2), "float32")),
        lambda: augnet.jvp(model, X, np.ones_like(X)),
    ):
        with pytest.raises(augnet.GradientPathError, match=match):
            call()


def test_an_op_inside_a_nested_functional_model_is_named():
    keras.utils.set_random_seed(4)
    j = keras.Input((5,))
    inner = keras.Model(j, L.Dense(3)(ops.floor(j)), name="inner")
    i = keras.Input((4,))
    model = keras.Model(i, inner(L.Dense(5)(i)), name="outer")
    with pytest.raises(augnet.GradientPathError, match=r"Floor 'floor"):
        augnet.jacobian(model, X)


def test_the_check_runs_once_per_model_and_signature_before_any_work(monkeypatch):
    model = _between(ops.round, name="cached_check")
    calls = []
    original = rules.find_blocking

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    def no_compile(*args, **kwargs):  # pragma: no cover - must not run
        raise AssertionError("compiled before the gradient-path check")

    monkeypatch.setattr(rules, "find_blocking", counting)
    monkeypatch.setattr(blocks, "compiled", no_compile)
    for x in (X, X[:1], X * 2):  # other batch sizes and values: the same signature
        with pytest.raises(augnet.GradientPathError):
            augnet.jacobian(model, x, strategy="loop")
    assert len(calls) == 1
    with pytest.raises(augnet.GradientPathError):
        augnet.jacobian(model, X.astype("float64"), strategy="loop")
    assert len(calls) in (1, 2)  # the model's dtype: the same tensors, maybe a new key


# --------------------------------------------------------------------------------------------------
# Outputs that are not cut: zeros (or the right numbers), no error
# --------------------------------------------------------------------------------------------------


def test_an_input_an_output_does_not_use_gives_zeros():
    keras.utils.set_random_seed(4)
    a, b = keras.Input((4,), name="a"), keras.Input((3,), name="b")
    both = L.Dense(2)(L.Concatenate()([a, b]))
    only_a = L.Dense(3)(a)  # does not depend on b at all
    model = keras.Model([a, b], [both, only_a])
    xs = [X, np.random.default_rng(5).normal(size=(3, 3)).astype("float32")]
    J = augnet.jacobian(model, xs, strategy="loop")
    assert np.all(J[1][1] == 0)  # ∂only_a/∂b: exactly zero, no error
    ref = reference_jacobian(model, xs)
    for o in range(2):
        for i in range(2):
            np.testing.assert_allclose(J[o][i], ref[o][i], **F32)
    assert np.abs(J[1][0]).max() > 0


def test_argmax_used_as_an_index_is_not_a_cut():
    """max(h) via take_along_axis(h, argmax(h)): the index path has no derivative, the values'
    path has the right one."""
    model = _between(
        lambda h: ops.take_along_axis(h, ops.expand_dims(ops.argmax(h, axis=-1), -1), axis=-1),
        name="max_by_index",
    )
    J = augnet.jacobian(model, X, strategy="loop")
    np.testing.assert_allclose(J, reference_jacobian(model, X), **F32)
    assert np.abs(J).max() > 0


def test_a_second_path_around_a_rounding_is_not_a_cut():
    """Dense(concat[round(h), h]): the output has a gradient path (through h), and the rounding's
    own derivative is zero almost everywhere: the Jacobian is right, not silently zero."""
    model = _between(lambda h: L.Concatenate()([ops.round(h), h]), name="around")
    J = augnet.jacobian(model, X, strategy="loop")
    np.testing.assert_allclose(J, reference_jacobian(model, X), **F32)
    assert np.abs(J).max() > 0


def test_a_constant_output_gives_zeros():
    with pytest.warns(augnet.ZeroJacobianWarning):  # exactly zero: said, but not an error
        J = augnet.jacobian(lambda x: ops.zeros_like(x) + 1.0, X, strategy="loop")
    assert J.shape == (3, 4, 4) and np.all(J == 0)


# --------------------------------------------------------------------------------------------------
# Plain callables
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fn",
    [
        lambda x: ops.round(x * 2.0),
        lambda x: ops.cast(ops.cast(x * 10.0, "int32"), "float32"),
        lambda x: ops.stop_gradient(x) * 3.0,
    ],
    ids=["round", "int-cast", "stop_gradient"],
)
def test_a_plain_callable_with_a_cut_path_is_an_error(fn):
    with pytest.raises(
        augnet.GradientPathError,
        match=r"callable .*<lambda>.* depends on the input but has no gradient path.*silently zero",
    ):
        augnet.jacobian(fn, X, strategy="loop")


def test_a_plain_callable_that_is_connected_gives_its_jacobian():
    def f(x):
        return ops.tanh(x) * 2.0 + ops.round(x)  # round's derivative is 0 a.e.: not a cut

    J = augnet.jacobian(f, X, strategy="loop")
    np.testing.assert_allclose(J, reference_jacobian(f, X), **F32)


# --------------------------------------------------------------------------------------------------
# TensorFlow's own ops (the examples)
# --------------------------------------------------------------------------------------------------


@pytest.mark.tensorflow_only
@pytest.mark.parametrize("case", ["round", "numpy_function"])
def test_tensorflow_callables_with_a_cut_path(tf, case):
    fns = {
        "round": lambda x: tf.round(x),
        "numpy_function": lambda x: tf.ensure_shape(
            tf.numpy_function(lambda a: a * 2, [x], tf.float32), x.shape
        ),
    }
    with pytest.raises(augnet.GradientPathError, match=r"tf\.round, tf\.numpy_function"):
        augnet.jacobian(fns[case], X, strategy="loop")
