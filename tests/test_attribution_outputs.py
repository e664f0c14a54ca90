"""The engine's per-sample output selection: ``outputs=`` a ``(batch, k)`` integer array.

Row ``i`` selects sample ``i``'s flat output indices, so ``J[i, j] = ∂y[i, rows[i, j]]/∂x[i]``:
what the attribution methods need for ``top_k`` (chosen on the clean input, followed through
every noisy copy or path point). Checked against selecting one sample at a time and against a
plain per-output gradient loop (the backend's own, tests/conftest.py), for every strategy, chunked
and not, eagerly and (TensorFlow) inside ``tf.function``.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import TOL, tape_loop_jacobian

STRATEGIES = ("loop", "pfor", "forward", "loop_xla", "auto")


@pytest.fixture(scope="module")
def mlp():
    import keras

    keras.utils.set_random_seed(11)
    model = keras.Sequential(
        [keras.Input((5,)), keras.layers.Dense(7, activation="tanh"), keras.layers.Dense(6)]
    )
    x = np.random.default_rng(0).normal(size=(4, 5)).astype("float32")
    return model, x, tape_loop_jacobian(model, x)


ROWS = np.array([[0, 3], [5, 1], [2, 2], [4, 0]])


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_per_sample_rows_equal_the_reference(mlp, strategy):
    import augnet

    model, x, ref = mlp
    expected = np.stack([ref[i, ROWS[i]] for i in range(len(x))])
    J = augnet.jacobian(model, x, outputs=ROWS, strategy=strategy)
    assert J.shape == (4, 2, 5)
    np.testing.assert_allclose(J, expected, **TOL["float32"])
    # The same as selecting one sample at a time with shared indices.
    for i in range(len(x)):
        one = augnet.jacobian(model, x[i : i + 1], outputs=list(ROWS[i]), strategy=strategy)
        np.testing.assert_allclose(J[i], one[0], **TOL["float32"])


@pytest.mark.parametrize("strategy", ["loop", "pfor", "forward"])
def test_per_sample_rows_chunked_equal_unchunked(mlp, strategy):
    import augnet

    model, x, _ = mlp
    whole = augnet.jacobian(model, x, outputs=ROWS, strategy=strategy)
    chunked = augnet.jacobian(model, x, outputs=ROWS, strategy=strategy, batch_size=3, chunk_size=1)
    np.testing.assert_allclose(chunked, whole, **TOL["float32"])


def test_per_sample_rows_list_of_lists_and_iter_jacobian(mlp):
    import augnet

    model, x, ref = mlp
    J = augnet.jacobian(model, x, outputs=ROWS.tolist(), strategy="loop")
    np.testing.assert_allclose(J, np.stack([ref[i, ROWS[i]] for i in range(4)]), **TOL["float32"])
    out = np.zeros((4, 2, 5), dtype="float32")
    seen = np.zeros((4, 2), dtype=int)
    for chunk in augnet.iter_jacobian(
        model, x, outputs=ROWS, strategy="loop", batch_size=3, chunk_size=1
    ):
        assert chunk.outputs.shape == chunk.values.shape[:2]  # (b, c) per sample
        out[chunk.samples, chunk.columns] = chunk.values
        seen[chunk.samples, chunk.columns] = chunk.outputs
    np.testing.assert_array_equal(seen, ROWS)
    np.testing.assert_allclose(out, J, **TOL["float32"])


@pytest.mark.tensorflow_only
def test_per_sample_rows_inside_tf_function(mlp, tf):
    import augnet

    model, x, ref = mlp
    expected = np.stack([ref[i, ROWS[i]] for i in range(4)])

    @tf.function
    def traced(x):
        return augnet.jacobian(model, x, outputs=ROWS)

    np.testing.assert_allclose(traced(tf.constant(x)).numpy(), expected, **TOL["float32"])


def test_per_sample_rows_to_npy(mlp, tmp_path):
    import augnet

    model, x, ref = mlp
    expected = np.stack([ref[i, ROWS[i]] for i in range(4)])
    path = augnet.jacobian_to_npy(model, x, tmp_path / "J.npy", outputs=ROWS, batch_size=3)
    np.testing.assert_allclose(np.load(path), expected, **TOL["float32"])


def test_per_sample_rows_float64_and_wrt(float64):
    import keras

    import augnet

    i = keras.Input((3,))
    h = keras.layers.Dense(4, activation="tanh", name="hidden")(i)
    model = keras.Model(i, keras.layers.Dense(3)(h))
    x = np.random.default_rng(1).normal(size=(2, 3))
    rows = np.array([[2], [0]])
    ref = tape_loop_jacobian(model, x)
    J = augnet.jacobian(model, x, outputs=rows)
    assert J.dtype == np.float64
    np.testing.assert_allclose(J[:, 0], ref[[0, 1], [2, 0]], **TOL["float64"])
    full_wrt = augnet.jacobian(model, x, wrt="hidden")
    per_wrt = augnet.jacobian(model, x, wrt="hidden", outputs=rows)
    np.testing.assert_allclose(per_wrt[:, 0], full_wrt[[0, 1], [2, 0]], **TOL["float64"])


@pytest.mark.parametrize(
    "outputs, message",
    [
        (np.array([[0, 1], [2, 3], [4, 5]]), r"one row per sample is expected, \(4, k\)"),
        (np.array([[0], [1], [6], [2]]), "index 6, which is out of range"),
        (np.array([[0], [1], [-1], [2]]), "index -1, which is out of range"),
        ([[0, 1], [2], [3, 4], [5, 0]], "the same number of flat output indices"),
        (np.array([[0.0], [1.0], [2.0], [3.0]]), "integer array"),
        (np.zeros((4, 0), int), "integer array"),
    ],
)
def test_per_sample_rows_errors(mlp, outputs, message):
    import augnet

    model, x, _ = mlp
    with pytest.raises(ValueError, match=message):
        augnet.jacobian(model, x, outputs=outputs)


def test_per_sample_rows_need_one_output():
    import keras

    import augnet

    i = keras.Input((3,))
    model = keras.Model(i, [keras.layers.Dense(2)(i), keras.layers.Dense(2)(i)])
    with pytest.raises(ValueError, match="need a model with one output"):
        augnet.jacobian(model, np.ones((2, 3), "float32"), outputs=np.array([[0], [1]]))
