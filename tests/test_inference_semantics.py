"""Inference mode by default (Dropout off, BatchNorm on its moving statistics), and no call ever
changes a weight, a BatchNorm statistic or a random-seed state, also with ``training=True``."""

import keras
import numpy as np
import pytest
from conftest import REVERSE, STRATEGIES, TOL, reference_cross_jacobian, reference_jacobian

import augnet

F32 = TOL["float32"]
L = keras.layers


def _bn_dropout_model():
    keras.utils.set_random_seed(31)
    model = augnet.wrap(
        keras.Sequential(
            [
                keras.Input((4,)),
                L.Dense(6),
                L.BatchNormalization(),
                L.Activation("tanh"),
                L.Dropout(0.5),
                L.Dense(3),
            ]
        )
    )
    bn = next(layer for layer in model.layers if isinstance(layer, L.BatchNormalization))
    rng = np.random.default_rng(31)
    bn.moving_mean.assign(rng.normal(size=6))
    bn.moving_variance.assign(rng.uniform(0.5, 2.0, size=6))
    bn.gamma.assign(rng.uniform(0.5, 1.5, size=6))
    bn.beta.assign(rng.normal(size=6))
    return model


def _bn_model():
    keras.utils.set_random_seed(32)
    model = keras.Sequential([keras.Input((3,)), L.Dense(4), L.BatchNormalization(), L.Dense(2)])
    model.layers[1].moving_variance.assign(np.full(4, 3.0))
    return model


@pytest.fixture(scope="module")
def bn_dropout():
    model = _bn_dropout_model()
    x = np.random.default_rng(33).uniform(-1, 1, size=(5, 4)).astype("float32")
    return model, x


def _snapshot(model):
    return {v.path: np.array(v.numpy()) for v in model.variables}


def _assert_unchanged(model, before):
    after = _snapshot(model)
    assert list(after) == list(before)
    for path, value in before.items():
        np.testing.assert_array_equal(after[path], value, err_msg=path)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_default_is_inference_deterministic_and_equals_reference_loop(bn_dropout, strategy):
    model, x = bn_dropout
    first = augnet.jacobian(model, x, strategy=strategy)
    second = augnet.jacobian(model, x, strategy=strategy)
    np.testing.assert_array_equal(first, second)
    np.testing.assert_allclose(first, reference_jacobian(model, x, training=False), **F32)
    np.testing.assert_array_equal(model.return_jacobian(x, strategy=strategy), first)


def test_model_has_state_that_could_change(bn_dropout):
    """The snapshot covers BatchNorm's moving statistics and the Dropout seed state."""
    model, _ = bn_dropout
    paths = list(_snapshot(model))
    assert any("moving_mean" in p for p in paths) and any("moving_variance" in p for p in paths)
    assert any("seed" in p for p in paths)


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda m, x: augnet.jacobian(m, x), id="jacobian"),
        pytest.param(lambda m, x: augnet.jacobian(m, x, strategy="forward"), id="forward"),
        pytest.param(lambda m, x: augnet.jacobian(m, x, top_k=2), id="top_k"),
        pytest.param(lambda m, x: m.return_jacobian(x, training=True), id="return_jacobian-train"),
        pytest.param(
            lambda m, x: augnet.jacobian(m, x, training=True, strategy="pfor"), id="pfor-train"
        ),
        pytest.param(
            lambda m, x: augnet.jacobian(m, x, training=True, batch_size=2, chunk_size=1),
            id="chunked-train",
        ),
        pytest.param(
            lambda m, x: list(augnet.iter_jacobian(m, x, training=True, batch_size=2)),
            id="iter-train",
        ),
    ],
)
def test_no_variable_changes(bn_dropout, call):
    model, x = bn_dropout
    before = _snapshot(model)
    result = call(model, x)
    assert result is not None
    _assert_unchanged(model, before)


@pytest.mark.tensorflow_only
def test_no_variable_changes_inside_tf_function(bn_dropout, tf):
    model, x = bn_dropout
    before = _snapshot(model)
    result = tf.function(lambda v: augnet.jacobian(model, v, training=True))(tf.constant(x))
    assert result is not None
    _assert_unchanged(model, before)


def test_no_variable_changes_vjp_jvp_and_wrt_training(bn_dropout):
    model, x = bn_dropout
    before = _snapshot(model)
    u = np.ones((len(x), 3), "float32")
    assert augnet.vjp(model, x, u, training=True).shape == x.shape
    assert augnet.jvp(model, x, x, training=True).shape == (len(x), 3)
    dense = next(layer.name for layer in model.layers if isinstance(layer, L.Dense))
    assert augnet.jacobian(model, x, wrt=dense, training=True).shape == (len(x), 3, 6)
    _assert_unchanged(model, before)


def test_no_variable_changes_jacobian_to_npy_training(bn_dropout, tmp_path):
    model, x = bn_dropout
    before = _snapshot(model)
    path = augnet.jacobian_to_npy(model, x, tmp_path / "J.npy", training=True, batch_size=2)
    assert np.load(path).shape == (5, 3, 4)
    _assert_unchanged(model, before)


@pytest.mark.parametrize("strategy", REVERSE)
def test_training_true_uses_batch_statistics(strategy):
    """As documented: training=True runs BatchNorm on each pass's batch statistics, so the result
    differs from inference at batch >= 2, couples the samples the way
    ``tf.GradientTape.batch_jacobian`` does (sum over the batch), and is zero at batch 1."""
    model = _bn_model()
    x = np.random.default_rng(34).uniform(-1, 1, size=(4, 3)).astype("float32")
    inference = augnet.jacobian(model, x, strategy=strategy)
    training = augnet.jacobian(model, x, training=True, strategy=strategy)
    assert np.abs(training - inference).max() > 0.1
    alone = augnet.jacobian(model, x[:1], training=True, strategy=strategy)
    np.testing.assert_allclose(alone, 0, atol=1e-6)
    # The statistics were not updated by any of this...
    np.testing.assert_array_equal(model.layers[1].moving_variance.numpy(), 3.0)

    # ... against the full cross-sample Jacobian of the training-mode forward pass:
    full = reference_cross_jacobian(model, x, training=True)  # (batch, m, batch, n): ∂y_b/∂x_i
    # Sample i's rows are sum_b ∂y_b/∂x_i, not the diagonal block ∂y_i/∂x_i.
    np.testing.assert_allclose(training, full.sum(axis=0).transpose(1, 0, 2), **F32)
    diagonal = np.stack([full[i, :, i] for i in range(len(x))])
    assert np.abs(training - diagonal).max() > 0.1
    # ... unlike a plain training-mode call, which updates them.
    model(x, training=True)
    assert not np.array_equal(model.layers[1].moving_variance.numpy(), np.full(4, 3.0))


@pytest.mark.tensorflow_only
def test_training_true_equals_tape_batch_jacobian(tf):
    model = _bn_model()
    x = np.random.default_rng(34).uniform(-1, 1, size=(4, 3)).astype("float32")
    training = augnet.jacobian(model, x, training=True, strategy="loop")
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        y = model(xt, training=True)
    np.testing.assert_allclose(training, tape.batch_jacobian(y, xt).numpy(), **F32)


def test_training_true_activates_dropout(bn_dropout):
    model, x = bn_dropout
    inference = augnet.jacobian(model, x[:1])
    training = augnet.jacobian(model, x[:1], training=True)
    # Dropout at rate 0.5 zeroes some hidden units and scales the others by 2.
    assert not np.allclose(training, inference, atol=1e-3)
    # One mask for the whole call (every chunk of outputs), and the seed state is not advanced.
    np.testing.assert_array_equal(augnet.jacobian(model, x[:1], training=True), training)
    chunked = augnet.jacobian(model, x[:1], training=True, chunk_size=1)
    np.testing.assert_allclose(chunked, training, **F32)


def test_training_semantics_are_documented():
    for doc in (augnet.jacobian.__doc__, augnet.AugNet.return_jacobian.__doc__):
        assert "training" in doc and "Dropout" in doc and "BatchNorm" in doc
        assert "statistics" in doc and "couples the samples" in doc
    assert "batch_jacobian" in augnet.jacobian.__doc__
