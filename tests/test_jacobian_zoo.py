"""The layer zoo against the backend's plain per-output gradient loop (float32), for every valid
strategy.

Also: several inputs (list and dict) and outputs (``J[out][in]``), outputs that do not depend on an
input (zeros), subclassed models, and (TensorFlow) calls inside ``tf.function``.
"""

import keras
import numpy as np
import pytest
from conftest import (
    REVERSE,
    STRATEGIES,
    TOL,
    ZOO_CASES,
    assert_structure_allclose,
    keeps_float64,
    reference_jacobian,
)

import augnet

F32 = TOL["float32"]
L = keras.layers


@pytest.mark.parametrize("name, strategy", ZOO_CASES)
def test_zoo_matches_reference_loop(zoo, name, strategy):
    case = zoo(name)
    J = augnet.jacobian(case.model, case.x, strategy=strategy)
    assert isinstance(J, np.ndarray) and J.dtype == np.float32
    assert J.shape == (len(case.x), *case.model.outputs[0].shape[1:], *case.x.shape[1:])
    assert np.abs(case.reference).max() > 0  # a meaningful comparison
    np.testing.assert_allclose(J, case.reference, **F32)


@pytest.mark.tensorflow_only
@pytest.mark.parametrize("name", ["functional", "maxpool", "batchnorm", "attention", "simple_rnn"])
def test_zoo_inside_tf_function_returns_tensors(zoo, name, tf):
    case = zoo(name)
    seen = []

    @tf.function
    def traced(x):
        J = augnet.jacobian(case.model, x)
        seen.append(J)
        return J

    J = traced(tf.constant(case.x))
    assert isinstance(seen[0], tf.Tensor)  # symbolic inside the trace
    assert isinstance(J, tf.Tensor)
    np.testing.assert_allclose(J.numpy(), case.reference, **F32)


def test_augnet_return_jacobian_on_wrapped_zoo_model(zoo):
    case = zoo("batchnorm")
    J = augnet.wrap(case.model).return_jacobian(case.x)
    np.testing.assert_allclose(J, case.reference, **F32)


# --------------------------------------------------------------------------------------------------
# Several inputs and outputs: J[out][in]
# --------------------------------------------------------------------------------------------------


def _two_in_two_out(as_dict: bool):
    """Inputs a (3,), b (2,); outputs o1 (2,) from both, o2 (2, 2) from a only."""
    keras.utils.set_random_seed(11)
    a, b = keras.Input((3,), name="a"), keras.Input((2,), name="b")
    h = L.Dense(4, activation="tanh")(L.Concatenate()([a, b]))
    o1 = L.Dense(2, name="o1")(h)
    o2 = L.Reshape((2, 2), name="o2")(L.Dense(4, activation="sigmoid")(a))
    if as_dict:
        return keras.Model({"a": a, "b": b}, {"o1": o1, "o2": o2})
    return keras.Model([a, b], [o1, o2])


@pytest.fixture(scope="module")
def multi():
    rng = np.random.default_rng(4)
    xa = rng.uniform(-1, 1, size=(3, 3)).astype("float32")
    xb = rng.uniform(-1, 1, size=(3, 2)).astype("float32")
    list_model, dict_model = _two_in_two_out(False), _two_in_two_out(True)
    return {
        "list": (list_model, [xa, xb], reference_jacobian(list_model, [xa, xb])),
        "dict": (
            dict_model,
            {"a": xa, "b": xb},
            reference_jacobian(dict_model, {"a": xa, "b": xb}),
        ),
    }


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_multi_input_multi_output_list_nesting(multi, strategy):
    model, x, reference = multi["list"]
    J = augnet.jacobian(model, x, strategy=strategy)
    # Outer: the model's outputs; inner: the inputs as given.
    assert isinstance(J, list) and len(J) == 2 and all(isinstance(j, list) for j in J)
    assert [[j.shape for j in row] for row in J] == [
        [(3, 2, 3), (3, 2, 2)],
        [(3, 2, 2, 3), (3, 2, 2, 2)],
    ]
    assert_structure_allclose(J, reference, **F32)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_multi_input_multi_output_dict_nesting(multi, strategy):
    model, x, reference = multi["dict"]
    # Keys in another order than the model's: each Jacobian must still sit under its own key.
    J = augnet.jacobian(model, {"b": x["b"], "a": x["a"]}, strategy=strategy)
    assert set(J) == {"o1", "o2"} and all(set(J[o]) == {"a", "b"} for o in J)
    assert J["o1"]["a"].shape == (3, 2, 3) and J["o1"]["b"].shape == (3, 2, 2)
    assert J["o2"]["a"].shape == (3, 2, 2, 3) and J["o2"]["b"].shape == (3, 2, 2, 2)
    for o in ("o1", "o2"):
        for i in ("a", "b"):
            np.testing.assert_allclose(J[o][i], reference[o][i], **F32)


def test_list_model_accepts_dict_keyed_by_input_name(multi):
    model, (xa, xb), reference = multi["list"]
    J = augnet.jacobian(model, {"b": xb, "a": xa})
    for o in range(2):
        np.testing.assert_allclose(J[o]["a"], reference[o][0], **F32)
        np.testing.assert_allclose(J[o]["b"], reference[o][1], **F32)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_output_independent_of_an_input_gives_zeros(multi, strategy):
    model, x, _ = multi["list"]
    J = augnet.jacobian(model, x, strategy=strategy)
    block = J[1][1]  # o2 does not depend on b
    assert isinstance(block, np.ndarray) and block.dtype == np.float32
    assert block.shape == (3, 2, 2, 2)
    np.testing.assert_array_equal(block, np.zeros_like(block))
    assert np.abs(J[1][0]).max() > 0


@pytest.mark.tensorflow_only
def test_multi_io_inside_tf_function(multi, tf):
    model, x, reference = multi["dict"]

    @tf.function
    def traced(a, b):
        return augnet.jacobian(model, {"a": a, "b": b})

    J = traced(tf.constant(x["a"]), tf.constant(x["b"]))
    assert isinstance(J["o2"]["b"], tf.Tensor)
    np.testing.assert_array_equal(J["o2"]["b"].numpy(), 0)
    for o in ("o1", "o2"):
        for i in ("a", "b"):
            np.testing.assert_allclose(J[o][i].numpy(), reference[o][i], **F32)


# --------------------------------------------------------------------------------------------------
# Subclassed models: no functional graph, so the engine functions, not AugNet
# --------------------------------------------------------------------------------------------------


class Subclassed(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.hidden = L.Dense(5, activation="tanh")
        self.norm = L.BatchNormalization()
        self.drop = L.Dropout(0.5)
        self.out = L.Dense(3)

    def call(self, x, training=False):
        h = self.norm(self.hidden(x), training=training)
        return self.out(self.drop(h, training=training))


@pytest.fixture(scope="module")
def subclassed():
    keras.utils.set_random_seed(9)
    model = Subclassed()
    x = np.random.default_rng(5).uniform(-1, 1, size=(3, 4)).astype("float32")
    model(x)  # build
    model.norm.moving_mean.assign(np.linspace(-1, 1, 5))
    model.norm.moving_variance.assign(np.linspace(0.5, 2, 5))
    return model, x, reference_jacobian(model, x)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_subclassed_model_through_the_engine(subclassed, strategy):
    model, x, reference = subclassed
    J = augnet.jacobian(model, x, strategy=strategy)
    assert J.dtype == np.float32
    np.testing.assert_allclose(J, reference, **F32)


@pytest.mark.tensorflow_only
def test_subclassed_model_inside_tf_function(subclassed, tf):
    model, x, reference = subclassed
    J = tf.function(lambda v: augnet.jacobian(model, v))(tf.constant(x))
    assert isinstance(J, tf.Tensor)
    np.testing.assert_allclose(J.numpy(), reference, **F32)


def test_subclassed_model_float64_input_gives_model_dtype(subclassed):
    model, x, reference = subclassed
    J = augnet.jacobian(model, x.astype("float64"))
    assert J.dtype == np.float32
    np.testing.assert_allclose(J, reference, **F32)


def test_subclassed_model_cannot_be_wrapped_and_the_error_says_what_to_use(subclassed):
    model, _, _ = subclassed
    with pytest.raises(TypeError, match=r"subclassed model.*augnet\.jacobian\(model, x\)"):
        augnet.wrap(model)


@pytest.mark.parametrize("strategy", REVERSE)
def test_plain_callable_with_two_inputs(strategy):
    """Any callable of the backend's ops, list in, list out: f(a, b) = (a·b, sin a) (exp a where
    Keras computes sin of float64 in float32: ``conftest.keeps_float64``)."""
    op, derivative = ("sin", np.cos) if keeps_float64("sin") else ("exp", np.exp)

    def f(xs):
        a, b = xs
        return [a * b, getattr(keras.ops, op)(a)]

    rng = np.random.default_rng(6)
    a, b = rng.normal(size=(2, 3)), rng.normal(size=(2, 3))
    J = augnet.jacobian(f, [a, b], strategy=strategy)
    expected = [
        [np.stack([np.diag(bi) for bi in b]), np.stack([np.diag(ai) for ai in a])],
        [np.stack([np.diag(derivative(ai)) for ai in a]), np.zeros((2, 3, 3))],
    ]
    assert_structure_allclose(J, expected, **TOL["float64"])
