"""Two engine speed items for the attribution methods, and that they change no number:

- ``jacobian(..., wrt=layer)`` builds the rest of the model once per model, layer and signature
  (it traced everything anew on every call: 2.4-3.2 s per call on MobileNetV2);
- ``iter_jacobian_columns`` gives augnet's own consumers the blocks without stacking them (the
  attribution methods' running sums), the same numbers as ``iter_jacobian``.

Speed itself is measured in benchmarks/bench_engine_checks.py, never asserted here.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
from conftest import TOL, to_numpy

import augnet
from augnet._engine import iter_jacobian_columns, trace_count

L = keras.layers
F32 = TOL["float32"]
RNG = np.random.default_rng(21)


def _model():
    keras.utils.set_random_seed(21)
    return keras.Sequential(
        [
            keras.Input((5,)),
            L.Dense(7, activation="tanh", name="hidden"),
            L.Dense(6, activation="tanh", name="middle"),
            L.Dense(3, name="out"),
        ]
    )


def test_wrt_traces_once_per_model_layer_and_signature():
    model = _model()
    x = RNG.normal(size=(4, 5)).astype("float32")
    J = augnet.jacobian(model, x, wrt="middle", strategy="loop")
    traces = trace_count(model)
    assert traces > 0
    kernel = to_numpy(model.get_layer("out").kernel)
    np.testing.assert_allclose(J, np.broadcast_to(kernel.T, (4, 3, 6)), **F32)  # closed form
    for scale in (2.0, -1.0, 0.5):  # new values, the same signature: no new trace
        J2 = augnet.jacobian(model, x * scale, wrt="middle", strategy="loop")
        np.testing.assert_allclose(J2, J, **F32)  # the last layer is linear: the same numbers
        assert trace_count(model) == traces
    # With respect to an earlier layer, the numbers follow the activation at each sample.
    H = augnet.jacobian(model, x, wrt="hidden", strategy="loop")
    after_hidden = trace_count(model)
    assert after_hidden > traces  # another layer: its own remainder
    augnet.jacobian(model, x * 2.0, wrt="hidden", strategy="loop")
    assert trace_count(model) == after_hidden
    middle = model.get_layer("middle")
    a = np.tanh(
        to_numpy(model.get_layer("hidden")(x)) @ to_numpy(middle.kernel) + to_numpy(middle.bias)
    )
    expected = np.einsum("oh,bh,mh->bom", kernel.T, 1 - a**2, to_numpy(middle.kernel))
    np.testing.assert_allclose(H, expected, **F32)


@pytest.mark.tensorflow_only
def test_wrt_reuses_the_trace_for_another_batch_size():
    model = _model()
    augnet.jacobian(model, RNG.normal(size=(4, 5)).astype("float32"), wrt="middle", strategy="loop")
    traces = trace_count(model)
    augnet.jacobian(model, RNG.normal(size=(2, 5)).astype("float32"), wrt="middle", strategy="loop")
    assert trace_count(model) == traces


class Triple(keras.layers.Layer):
    def call(self, x):
        return x * 3.0


def test_wrt_with_per_call_rules_is_not_cached_across_rules():
    """A per-call `derivatives` gets its own remainder (as everywhere in the engine), and the
    plain call after it is plain again."""
    keras.utils.set_random_seed(23)
    model = keras.Sequential(
        [keras.Input((5,)), L.Dense(6, activation="tanh", name="middle"), Triple(), L.Dense(3)]
    )
    kernel = to_numpy(model.layers[-1].kernel)
    x = RNG.normal(size=(2, 5)).astype("float32")
    plain = np.broadcast_to(3.0 * kernel.T, (2, 3, 6))
    np.testing.assert_allclose(
        augnet.jacobian(model, x, wrt="middle", strategy="loop"), plain, **F32
    )
    ruled = augnet.jacobian(model, x, wrt="middle", strategy="loop", derivatives={Triple: 1.0})
    np.testing.assert_allclose(ruled, np.broadcast_to(kernel.T, (2, 3, 6)), **F32)
    np.testing.assert_allclose(
        augnet.jacobian(model, x, wrt="middle", strategy="loop"), plain, **F32
    )


@pytest.mark.parametrize("strategy", ["loop", "pfor", "forward"])
def test_column_blocks_equal_iter_jacobian(strategy):
    keras.utils.set_random_seed(22)
    a, b = keras.Input((4,), name="a"), keras.Input((3,), name="b")
    h = L.Dense(6, activation="tanh")(L.Concatenate()([a, b]))
    model = keras.Model({"a": a, "b": b}, L.Dense(5)(h))
    x = {
        "b": RNG.normal(size=(3, 3)).astype("float32"),
        "a": RNG.normal(size=(3, 4)).astype("float32"),
    }
    kw = {"strategy": strategy, "chunk_size": 2, "batch_size": 2}
    stacked = list(augnet.iter_jacobian(model, x, **kw))
    columns = list(iter_jacobian_columns(model, x, **kw))
    assert len(stacked) == len(columns)
    for s, c in zip(stacked, columns):
        assert (s.samples, s.columns) == (c.samples, c.columns)
        np.testing.assert_array_equal(s.outputs, c.outputs)
        assert list(s.values) == list(c.values)  # the same nesting (the model's keys)
        for key in s.values:
            assert isinstance(c.values[key], list) and len(c.values[key]) == s.values[key].shape[1]
            np.testing.assert_array_equal(np.stack(c.values[key], axis=1), s.values[key])


def test_column_blocks_with_top_k():
    model = _model()
    x = RNG.normal(size=(3, 5)).astype("float32")
    stacked = list(augnet.iter_jacobian(model, x, top_k=2, strategy="loop"))
    columns = list(iter_jacobian_columns(model, x, top_k=2, strategy="loop"))
    for s, c in zip(stacked, columns):
        np.testing.assert_array_equal(s.outputs, c.outputs)
        np.testing.assert_array_equal(np.stack(c.values, axis=1), s.values)


def test_the_attribution_sums_receive_column_blocks(monkeypatch):
    """augnet/_attribution/_base.py folds the engine's column blocks (no stacked copy) where it
    needs every point's Jacobian (SquareGrad, VarGrad; SmoothGrad and IG are one Jacobian of a
    summed model instead), and the result is the plain mean of the squared Jacobians."""
    from augnet._attribution import _base

    seen = []
    original = _base.iter_jacobian

    def spy(problem, points, outputs):
        for chunk in original(problem, points, outputs):
            seen.append(type(chunk.values).__name__)
            yield chunk

    monkeypatch.setattr(_base, "iter_jacobian", spy)
    model = _model()
    x = RNG.normal(size=(2, 5)).astype("float32")
    sq = augnet.squaregrad(
        model, x, n_samples=3, noise=np.zeros((3, 5), "float32"), strategy="loop"
    )
    assert seen and set(seen) == {"list"}
    np.testing.assert_allclose(sq, np.square(augnet.jacobian(model, x, strategy="loop")), **F32)
