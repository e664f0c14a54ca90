"""Options: output selection, top_k, chunking and memory budgets, streaming, .npy files, batch
independence, no retracing, and parse_memory."""

import functools

import keras
import numpy as np
import pytest
from conftest import STRATEGIES, TOL, predict, reference_jacobian

import augnet
from augnet import _engine

F32 = TOL["float32"]
L = keras.layers
RNG = np.random.default_rng(21)


@functools.cache
def grid_model():
    """(5,) -> (2, 3): a 2-D output, so that flat output indices are tested."""
    keras.utils.set_random_seed(21)
    return keras.Sequential(
        [keras.Input((5,)), L.Dense(8, activation="tanh"), L.Dense(6), L.Reshape((2, 3))],
        name="grid",
    )


@functools.cache
def grid_data():
    x = RNG.uniform(-1, 1, size=(5, 5)).astype("float32")
    return x, reference_jacobian(grid_model(), x)  # (5, 2, 3, 5)


@functools.cache
def classifier():
    keras.utils.set_random_seed(22)
    return keras.Sequential(
        [keras.Input((4, 4, 1)), L.Conv2D(2, 3, activation="tanh"), L.Flatten(), L.Dense(7)],
        name="classifier",
    )


@functools.cache
def classifier_data():
    x = RNG.uniform(-1, 1, size=(4, 4, 4, 1)).astype("float32")
    return x, reference_jacobian(classifier(), x)  # (4, 7, 4, 4, 1)


def _flat(J):
    """(batch, *output_shape, *input_shape) -> (batch, m, *input_shape) for the grid model."""
    return J.reshape(J.shape[0], -1, *J.shape[3:])


# --------------------------------------------------------------------------------------------------
# outputs=[...]
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("selection", [[4], [5, 0, 3], [1, 1], list(range(6))])
def test_outputs_equals_slicing_the_full_jacobian(selection, strategy):
    x, reference = grid_data()
    full = augnet.jacobian(grid_model(), x, strategy=strategy)
    np.testing.assert_allclose(full, reference, **F32)
    J = augnet.jacobian(grid_model(), x, outputs=selection, strategy=strategy)
    assert J.shape == (5, len(selection), 5)
    np.testing.assert_allclose(J, _flat(reference)[:, selection], **F32)
    np.testing.assert_allclose(J, _flat(full)[:, selection], **F32)


def test_outputs_single_integer_and_numpy_indices():
    x, reference = grid_data()
    np.testing.assert_allclose(
        augnet.jacobian(grid_model(), x, outputs=3), _flat(reference)[:, [3]], **F32
    )
    np.testing.assert_allclose(
        augnet.jacobian(grid_model(), x, outputs=np.array([2, 5])),
        _flat(reference)[:, [2, 5]],
        **F32,
    )


@pytest.mark.parametrize("strategy", ["loop", "forward"])
def test_outputs_per_output_of_a_multi_output_model(strategy):
    keras.utils.set_random_seed(23)
    i = keras.Input((3,))
    h = L.Dense(4, activation="tanh")(i)
    model = keras.Model(i, {"p": L.Dense(3)(h), "q": L.Dense(2)(h)})
    x = RNG.uniform(-1, 1, size=(2, 3)).astype("float32")
    reference = reference_jacobian(model, x)
    J = augnet.jacobian(model, x, outputs={"p": [2, 0]}, strategy=strategy)
    np.testing.assert_allclose(J["p"], reference["p"][:, [2, 0]], **F32)
    np.testing.assert_allclose(J["q"], reference["q"], **F32)  # not named: all of it


# --------------------------------------------------------------------------------------------------
# top_k
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("k", [1, 3, 7])
def test_top_k(k, strategy):
    x, reference = classifier_data()
    predictions = predict(classifier(), x)
    result = augnet.jacobian(classifier(), x, top_k=k, strategy=strategy)
    assert isinstance(result, augnet.TopKJacobian)
    expected_indices = np.argsort(-predictions, axis=1)[:, :k]
    np.testing.assert_array_equal(result.indices, expected_indices)
    np.testing.assert_allclose(
        result.values, np.take_along_axis(predictions, expected_indices, 1), **F32
    )
    assert result.jacobian.shape == (4, k, 4, 4, 1)
    rows = np.take_along_axis(reference, expected_indices[:, :, None, None, None], axis=1)
    np.testing.assert_allclose(result.jacobian, rows, **F32)


def test_top_k_with_small_batches_and_return_jacobian():
    x, reference = classifier_data()
    predictions = predict(classifier(), x)
    result = augnet.wrap(classifier()).return_jacobian(x, top_k=2, batch_size=1)
    order = np.argsort(-predictions, axis=1)[:, :2]
    np.testing.assert_array_equal(result.indices, order)
    rows = np.take_along_axis(reference, order[:, :, None, None, None], axis=1)
    np.testing.assert_allclose(result.jacobian, rows, **F32)


@pytest.mark.tensorflow_only
def test_top_k_inside_tf_function(tf):
    x, reference = classifier_data()
    predictions = predict(classifier(), x)
    result = tf.function(lambda v: augnet.jacobian(classifier(), v, top_k=2))(tf.constant(x))
    order = np.argsort(-predictions, axis=1)[:, :2]
    np.testing.assert_array_equal(result.indices.numpy(), order)
    np.testing.assert_allclose(
        result.values.numpy(), np.take_along_axis(predictions, order, 1), **F32
    )
    rows = np.take_along_axis(reference, order[:, :, None, None, None], axis=1)
    np.testing.assert_allclose(result.jacobian.numpy(), rows, **F32)


# --------------------------------------------------------------------------------------------------
# Chunking and memory budgets
# --------------------------------------------------------------------------------------------------

CHUNKINGS = [
    {"batch_size": 2},
    {"chunk_size": 1},
    {"batch_size": 3, "chunk_size": 2},
    {"max_memory": 2000},
    {"max_memory": "3kB", "batch_size": 1},
]


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize(
    "options", CHUNKINGS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items())
)
def test_chunked_equals_unchunked(options, strategy):
    x, reference = grid_data()
    whole = augnet.jacobian(grid_model(), x, strategy=strategy)
    chunked = augnet.jacobian(grid_model(), x, strategy=strategy, **options)
    np.testing.assert_allclose(chunked, whole, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(chunked, reference, **F32)


@pytest.mark.parametrize("strategy", ["loop", "pfor", "forward"])
def test_chunked_with_an_output_selection(strategy):
    x, reference = grid_data()
    J = augnet.jacobian(
        grid_model(), x, outputs=[5, 1, 2], strategy=strategy, batch_size=2, chunk_size=2
    )
    np.testing.assert_allclose(J, _flat(reference)[:, [5, 1, 2]], **F32)


# --------------------------------------------------------------------------------------------------
# iter_jacobian and jacobian_to_npy
# --------------------------------------------------------------------------------------------------


def _reassemble(chunks, n_samples, m, in_shape):
    out = np.full((n_samples, m, *in_shape), np.nan, dtype=np.float32)
    count = np.zeros((n_samples, m), dtype=int)
    for chunk in chunks:
        assert isinstance(chunk, augnet.JacobianChunk)
        rows = np.arange(chunk.samples.start, chunk.samples.stop)[:, None]
        cols = chunk.outputs if chunk.outputs.ndim == 2 else chunk.outputs[None, :]
        out[rows, cols] = chunk.values
        np.add.at(count, (np.broadcast_to(rows, (len(rows), cols.shape[1])), cols), 1)
    return out, count


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_iter_jacobian_blocks_reassemble_to_the_full_jacobian(strategy):
    x, reference = grid_data()
    chunks = list(
        augnet.iter_jacobian(grid_model(), x, strategy=strategy, batch_size=2, chunk_size=2)
    )
    assert len(chunks) >= 3  # three sample blocks at least
    out, count = _reassemble(chunks, 5, 6, (5,))
    np.testing.assert_array_equal(count, 1)  # every (sample, output) exactly once
    np.testing.assert_allclose(out, _flat(reference), **F32)


def test_iter_jacobian_with_top_k_gives_per_sample_indices():
    x, reference = classifier_data()
    chunks = list(augnet.iter_jacobian(classifier(), x, top_k=3, batch_size=3, chunk_size=2))
    assert all(c.outputs.shape == (c.values.shape[0], c.values.shape[1]) for c in chunks)
    out, count = _reassemble(chunks, 4, 7, (4, 4, 1))
    order = np.argsort(-predict(classifier(), x), axis=1)[:, :3]
    expected_count = np.zeros((4, 7), dtype=int)
    np.put_along_axis(expected_count, order, 1, axis=1)
    np.testing.assert_array_equal(count, expected_count)
    mask = count.astype(bool)
    np.testing.assert_allclose(out[mask], reference[mask], **F32)


@pytest.mark.parametrize("strategy", ["loop", "pfor", "forward"])
def test_top_k_chunked_equals_unchunked(strategy):
    # Regression: chunks of fewer than k outputs were all written at column 0.
    x, reference = classifier_data()
    whole = augnet.jacobian(classifier(), x, top_k=3, strategy=strategy)
    chunked = augnet.jacobian(
        classifier(), x, top_k=3, strategy=strategy, chunk_size=2, batch_size=3
    )
    np.testing.assert_array_equal(chunked.indices, whole.indices)
    np.testing.assert_allclose(chunked.values, whole.values, **F32)
    np.testing.assert_allclose(chunked.jacobian, whole.jacobian, **F32)
    expected = np.take_along_axis(reference, whole.indices[:, :, None, None, None], axis=1)
    np.testing.assert_allclose(chunked.jacobian, expected, **F32)


def test_iter_jacobian_columns_place_each_block():
    x, reference = grid_data()
    rows = [4, 0, 2]
    full = np.zeros((x.shape[0], len(rows), *x.shape[1:]), dtype="float32")
    for chunk in augnet.iter_jacobian(
        grid_model(), x, outputs=rows, batch_size=2, chunk_size=2, strategy="loop"
    ):
        full[chunk.samples, chunk.columns] = chunk.values
    np.testing.assert_allclose(
        full, reference.reshape(x.shape[0], -1, *x.shape[1:])[:, rows], **F32
    )


def test_iter_jacobian_several_inputs():
    keras.utils.set_random_seed(24)
    a, b = keras.Input((3,), name="a"), keras.Input((2,), name="b")
    model = keras.Model([a, b], L.Dense(4)(L.Concatenate()([a, L.Dense(2, activation="tanh")(b)])))
    x = [RNG.normal(size=(3, 3)).astype("float32"), RNG.normal(size=(3, 2)).astype("float32")]
    reference = reference_jacobian(model, x)
    got = [np.zeros_like(r) for r in reference]
    for chunk in augnet.iter_jacobian(model, x, batch_size=2, chunk_size=3, strategy="loop"):
        assert isinstance(chunk.values, list) and len(chunk.values) == 2
        for g, v in zip(got, chunk.values):
            g[chunk.samples, chunk.outputs] = v
    for g, r in zip(got, reference):
        np.testing.assert_allclose(g, r, **F32)


@pytest.mark.parametrize("strategy", ["loop", "forward"])
def test_jacobian_to_npy_writes_the_same_numbers(tmp_path, strategy):
    x, reference = grid_data()
    path = augnet.jacobian_to_npy(
        grid_model(), x, tmp_path / "J.npy", strategy=strategy, batch_size=2, chunk_size=4
    )
    assert path == tmp_path / "J.npy"
    stored = np.load(path, mmap_mode="r")
    assert stored.shape == (5, 6, 5) and stored.dtype == np.float32
    np.testing.assert_allclose(stored, _flat(reference), **F32)
    np.testing.assert_allclose(
        stored, _flat(augnet.jacobian(grid_model(), x, strategy=strategy)), rtol=1e-6, atol=1e-6
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["J.npy"]


def test_jacobian_to_npy_with_outputs(tmp_path):
    x, reference = grid_data()
    path = augnet.jacobian_to_npy(grid_model(), x, tmp_path / "sel.npy", outputs=[4, 0])
    np.testing.assert_allclose(np.load(path), _flat(reference)[:, [4, 0]], **F32)


def test_jacobian_to_npy_refuses_to_overwrite(tmp_path):
    x, reference = grid_data()
    path = tmp_path / "J.npy"
    np.save(path, np.arange(3))
    with pytest.raises(FileExistsError, match=r"exists; pass overwrite=True"):
        augnet.jacobian_to_npy(grid_model(), x, path)
    np.testing.assert_array_equal(np.load(path), np.arange(3))  # untouched
    augnet.jacobian_to_npy(grid_model(), x, path, overwrite=True)
    np.testing.assert_allclose(np.load(path), _flat(reference), **F32)


def test_jacobian_to_npy_leaves_no_partial_file_on_failure(tmp_path, monkeypatch):
    x, _ = grid_data()
    real_blocks = _engine.run.iter_blocks

    def failing_blocks(run):
        blocks = real_blocks(run)
        yield next(blocks)
        raise RuntimeError("interrupted after the first block")

    monkeypatch.setattr(_engine.run, "iter_blocks", failing_blocks)
    path = tmp_path / "J.npy"
    with pytest.raises(RuntimeError, match="interrupted"):
        augnet.jacobian_to_npy(grid_model(), x, path, batch_size=2)
    assert list(tmp_path.iterdir()) == []  # neither J.npy nor J.npy.partial


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"top_k": 2}, ValueError, "does not take `top_k`"),
        ({"strides": 2}, TypeError, r"unexpected keyword arguments \['strides'\]"),
    ],
)
def test_jacobian_to_npy_bad_arguments(tmp_path, kwargs, error, match):
    x, _ = grid_data()
    with pytest.raises(error, match=match):
        augnet.jacobian_to_npy(grid_model(), x, tmp_path / "J.npy", **kwargs)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------------
# Batch independence
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_sample_jacobian_does_not_depend_on_the_rest_of_the_batch(zoo, strategy):
    case = zoo("batchnorm")  # inference mode: moving statistics, no coupling between samples
    x = np.concatenate([case.x, RNG.uniform(-1, 1, size=(4, *case.x.shape[1:]))]).astype("float32")
    J_batch = augnet.jacobian(case.model, x, strategy=strategy)
    others = RNG.uniform(-5, 5, size=x.shape).astype("float32")
    for i in (0, 4, 6):
        alone = augnet.jacobian(case.model, x[i : i + 1], strategy=strategy)
        np.testing.assert_allclose(alone[0], J_batch[i], rtol=1e-6, atol=1e-6)
        mixed = others.copy()
        mixed[i] = x[i]
        J_mixed = augnet.jacobian(case.model, mixed, strategy=strategy)
        np.testing.assert_allclose(J_mixed[i], J_batch[i], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(J_batch[:3], case.reference, **F32)


# --------------------------------------------------------------------------------------------------
# Compiled functions are reused: no retracing
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_no_retrace_on_repeated_calls_and_other_batch_sizes(strategy):
    keras.utils.set_random_seed(25)
    model = keras.Sequential([keras.Input((4,)), L.Dense(5, activation="tanh"), L.Dense(3)])
    x = RNG.uniform(-1, 1, size=(6, 4)).astype("float32")
    assert _engine.trace_count(model) == 0
    first = augnet.jacobian(model, x, strategy=strategy)
    traced = _engine.trace_count(model)
    assert traced >= 1
    again = augnet.jacobian(model, x, strategy=strategy)
    np.testing.assert_array_equal(again, first)
    other_values = augnet.jacobian(model, x[::-1].copy(), strategy=strategy)
    np.testing.assert_allclose(other_values, first[::-1], rtol=1e-6, atol=1e-7)
    smaller = augnet.jacobian(model, x[:2], strategy=strategy)
    np.testing.assert_allclose(smaller, first[:2], rtol=1e-6, atol=1e-7)
    assert _engine.trace_count(model) == traced


def test_no_retrace_through_augnet_return_jacobian():
    keras.utils.set_random_seed(26)
    inputs = keras.Input((3,))
    model = augnet.AugNet(inputs=inputs, outputs=L.Dense(2, activation="tanh")(inputs))
    x = RNG.uniform(-1, 1, size=(4, 3)).astype("float32")
    model.return_jacobian(x, strategy="loop")
    traced = _engine.trace_count(model)
    for batch in (4, 1, 3):
        model.return_jacobian(x[:batch], strategy="loop")
    assert _engine.trace_count(model) == traced


# --------------------------------------------------------------------------------------------------
# parse_memory
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, expected",
    [
        (None, None),
        (1000, 1000),
        (2.5e9, 2_500_000_000),
        (np.int64(4096), 4096),
        ("2GB", 2_000_000_000),
        ("2gb", 2_000_000_000),
        ("512MB", 512_000_000),
        ("512MiB", 512 * 1024**2),
        ("1.5GiB", int(1.5 * 1024**3)),
        (" 3 kB ", 3000),
        ("64", 64),
        ("1TB", 10**12),
    ],
)
def test_parse_memory(value, expected):
    assert _engine.parse_memory(value) == expected


@pytest.mark.parametrize("value", [0, -1, -2.5, "lots", "GB", "2 GBs", "-1GB", "0MB", True, [1]])
def test_parse_memory_rejects(value):
    with pytest.raises(ValueError, match=r"Received an invalid value for `max_memory`"):
        _engine.parse_memory(value)


@pytest.mark.parametrize("builder", ["grid", "lstm"])
def test_loop_xla_matches_the_reference_loop(builder):
    """strategy="loop_xla" (the reverse loop compiled with XLA) gives the same numbers."""
    if builder == "grid":
        model, (x, _) = grid_model(), grid_data()
    else:
        keras.utils.set_random_seed(31)
        model = keras.Sequential([keras.Input((6, 3)), L.LSTM(5), L.Dense(2)])
        x = RNG.normal(size=(3, 6, 3)).astype("float32")
    reference = reference_jacobian(model, x)
    got = augnet.jacobian(model, x, strategy="loop_xla")
    np.testing.assert_allclose(got, reference, **F32)
    run = _engine.prepare.setup(model, x, None, None, False, "loop_xla", None, None, None, False)
    assert (run.strategy, run.jit_compile) == ("loop", True)
    assert _engine.resolve_strategy(model, x, strategy="loop_xla") == "loop_xla"
