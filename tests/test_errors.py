"""Every bad input raises ValueError/TypeError naming the argument, what was received, what was
expected and how to fix it (shapes as tuples)."""

import functools
import re

import keras
import numpy as np
import pytest

import augnet

L = keras.layers


@functools.cache
def image_model():
    """Input (None, 256, 256, 1) -> 3 outputs, cheap to build (no Jacobian is ever computed)."""
    return keras.Sequential(
        [keras.Input((256, 256, 1)), L.GlobalAveragePooling2D(), L.Dense(3)], name="image"
    )


@functools.cache
def two_input_model():
    a, b = keras.Input((3,), name="a"), keras.Input((2,), name="b")
    return keras.Model([a, b], [L.Dense(2)(L.Concatenate()([a, b])), L.Dense(4)(a)])


@functools.cache
def embedding_model():
    tokens = keras.Input((5,), dtype="int32", name="token_ids")
    return keras.Model(tokens, L.Dense(2)(L.Flatten()(L.Embedding(10, 3)(tokens))))


@functools.cache
def recurrent_model():
    return keras.Sequential([keras.Input((3, 2)), L.LSTM(2), L.Dense(2)])


@functools.cache
def mlp():
    """Input (None, 3) -> 2 outputs."""
    return keras.Sequential([keras.Input((3,)), L.Dense(2)], name="mlp")


class Subclassed(keras.Model):
    def __init__(self):
        super().__init__(name="subclassed")
        self.dense = L.Dense(2, activation="softmax")

    def call(self, x):
        return self.dense(x)


def _samples():
    yield np.zeros((2, 3), "float32")


def _with_inf(value, sample, element, dtype="float32"):
    x = np.ones((2, 3), dtype)
    x[sample, element] = value
    return x


IMAGE = np.zeros((256, 256, 1), "float32")
BATCH = IMAGE[None]
A, B2 = np.zeros((2, 3), "float32"), np.zeros((2, 2), "float32")


def _image(**kwargs):
    return lambda: augnet.jacobian(image_model(), BATCH, **kwargs)


CASES = {
    # x: shape, batch axis, number of inputs, dtype
    "missing-batch-axis": (
        lambda: augnet.jacobian(image_model(), IMAGE),
        ValueError,
        ["`x` has shape (256, 256, 1)", "expects (None, 256, 256, 1)", "x[None]"],
    ),
    "missing-batch-axis-tensor": (
        lambda: augnet.jacobian(image_model(), keras.ops.convert_to_tensor(IMAGE)),
        ValueError,
        ["(256, 256, 1)", "(None, 256, 256, 1)", "x[None]"],
    ),
    "missing-batch-axis-return_jacobian": (
        lambda: augnet.wrap(image_model()).return_jacobian(IMAGE),
        ValueError,
        ["(256, 256, 1)", "(None, 256, 256, 1)", "x[None]"],
    ),
    "missing-batch-axis-second-input": (
        lambda: augnet.jacobian(two_input_model(), [A, B2[0]]),
        ValueError,
        ["`x[1]` (model input 'b') has shape (2,)", "(None, 2)", "x[1][None]"],
    ),
    "wrong-image-size": (
        lambda: augnet.jacobian(image_model(), np.zeros((2, 128, 128, 1), "float32")),
        ValueError,
        ["`x` has shape (2, 128, 128, 1)", "(None, 256, 256, 1)", "(batch, 256, 256, 1)"],
    ),
    "missing-channel-axis": (
        lambda: augnet.jacobian(image_model(), np.zeros((2, 256, 256), "float32")),
        ValueError,
        ["(2, 256, 256)", "(None, 256, 256, 1)"],
    ),
    "wrong-shape-second-input": (
        lambda: augnet.jacobian(two_input_model(), [A, A]),
        ValueError,
        ["`x[1]` (model input 'b') has shape (2, 3)", "expects (None, 2)"],
    ),
    "empty-batch": (
        lambda: augnet.jacobian(image_model(), np.zeros((0, 256, 256, 1), "float32")),
        ValueError,
        ["empty batch", "(0, 256, 256, 1)"],
    ),
    "one-array-for-two-inputs": (
        lambda: augnet.jacobian(two_input_model(), A),
        ValueError,
        ["The model has 2 inputs ['a', 'b']", "`x` holds one array", "list (or dict) of 2"],
    ),
    "three-arrays-for-two-inputs": (
        lambda: augnet.jacobian(two_input_model(), [A, B2, B2]),
        ValueError,
        ["The model has 2 inputs", "`x` holds 3 arrays"],
    ),
    "two-arrays-for-one-input": (
        lambda: augnet.jacobian(image_model(), [BATCH, BATCH]),
        ValueError,
        ["The model has 1 input", "`x` holds 2 arrays", "Pass one array"],
    ),
    "dict-missing-key": (
        lambda: augnet.jacobian(two_input_model(), {"a": A}),
        ValueError,
        ["`x` is a dict with keys ['a']", "inputs are ['a', 'b']", "Missing: ['b']"],
    ),
    "dict-unknown-key": (
        lambda: augnet.jacobian(two_input_model(), {"a": A, "b": B2, "c": B2}),
        ValueError,
        ["unexpected: ['c']"],
    ),
    "batch-sizes-differ": (
        lambda: augnet.jacobian(two_input_model(), [A, B2[:1]]),
        ValueError,
        ["same batch size", "[2, 1]"],
    ),
    "string-array": (
        lambda: augnet.jacobian(image_model(), np.full((1, 256, 256, 1), "a")),
        TypeError,
        [
            "`x` must be a numeric",
            "dtype <U1",
            "(1, 256, 256, 1)",
            "np.asarray(x, dtype='float32')",
        ],
    ),
    "file-name-instead-of-array": (
        lambda: augnet.jacobian(image_model(), "sample_input.jpg"),
        TypeError,
        ["`x` must be a numeric array", "'sample_input.jpg'", "NumPy array first"],
    ),
    "bool-array": (
        lambda: augnet.jacobian(image_model(), np.zeros((1, 256, 256, 1), bool)),
        TypeError,
        ["`x` must be a numeric", "dtype bool"],
    ),
    "integer-model-input": (
        lambda: augnet.jacobian(embedding_model(), np.zeros((2, 5), "int32")),
        TypeError,
        ["'token_ids'", "int32", "not differentiable", "embedding's output"],
    ),
    "not-callable": (
        lambda: augnet.jacobian("model.keras", BATCH),
        TypeError,
        ["`fn` must be a keras.Model or a callable", "type str"],
    ),
    # outputs= and top_k
    "output-index-too-large": (
        _image(outputs=[0, 3]),
        ValueError,
        ["`outputs` holds index 3", "output of 3 elements", "(3,)", "0..2"],
    ),
    "output-index-negative": (_image(outputs=[-1]), ValueError, ["index -1", "0..2"]),
    "output-index-float": (
        _image(outputs=[0.5]),
        ValueError,
        ["invalid value for `outputs`", "integer flat output indices", "outputs=[0.5]"],
    ),
    "outputs-empty": (_image(outputs=[]), ValueError, ["invalid value for `outputs`"]),
    "outputs-of-second-output": (
        lambda: augnet.jacobian(two_input_model(), [A, B2], outputs=[None, [4]]),
        ValueError,
        ["`outputs[1]` holds index 4", "0..3"],
    ),
    "outputs-not-per-output": (
        lambda: augnet.jacobian(two_input_model(), [A, B2], outputs=[0, 1]),
        ValueError,
        ["2 outputs", "one entry per output", "outputs=[0, 1]"],
    ),
    "top_k-zero": (_image(top_k=0), ValueError, ["invalid value for `top_k`", "top_k=0"]),
    "top_k-float": (_image(top_k=1.5), ValueError, ["invalid value for `top_k`", "top_k=1.5"]),
    "top_k-bool": (_image(top_k=True), ValueError, ["invalid value for `top_k`"]),
    "top_k-too-large": (
        _image(top_k=4),
        ValueError,
        ["`top_k=4` is larger than the number of outputs, 3"],
    ),
    "top_k-multi-output": (
        lambda: augnet.jacobian(two_input_model(), [A, B2], top_k=1),
        ValueError,
        ["`top_k` needs a model with one output", "has 2", "outputs="],
    ),
    "outputs-and-top_k": (
        _image(outputs=[0], top_k=1),
        ValueError,
        ["either `outputs` or `top_k`, not both"],
    ),
    # options
    "bad-strategy": (
        _image(strategy="magic"),
        ValueError,
        ["invalid value for `strategy`", "'auto', 'loop', 'pfor', 'forward'", "strategy='magic'"],
    ),
    "bad-max_memory-string": (
        _image(max_memory="lots"),
        ValueError,
        ["invalid value for `max_memory`", "'2GB'", "max_memory='lots'"],
    ),
    "bad-max_memory-zero": (_image(max_memory=0), ValueError, ["max_memory=0"]),
    "bad-max_memory-negative": (_image(max_memory="-1GB"), ValueError, ["max_memory='-1GB'"]),
    "bad-batch_size": (
        _image(batch_size=0),
        ValueError,
        ["invalid value for `batch_size`", "positive integer", "batch_size=0"],
    ),
    "bad-chunk_size": (_image(chunk_size=2.5), ValueError, ["chunk_size=2.5"]),
    "bad-training": (
        _image(training="yes"),
        TypeError,
        ["invalid value for `training`", "True or False", "training='yes'"],
    ),
    "forward-with-training": (
        _image(training=True, strategy="forward"),
        ValueError,
        ["strategy='forward'", "training=True", "'loop' or 'pfor'"],
    ),
    # issue 9: what is not one batch of arrays, with what to pass instead
    "python-float-x": (
        lambda: augnet.jacobian(mlp(), 3.0),
        TypeError,
        ["`x` is a Python float (3.0), not an array", "(batch, *input_shape)", "np.array([[3.0]])"],
    ),
    "python-int-x": (lambda: augnet.jacobian(mlp(), 3), TypeError, ["`x` is a Python int (3)"]),
    "none-x": (lambda: augnet.jacobian(mlp(), None), TypeError, ["`x` is None", "batch axis"]),
    "iter_jacobian-python-float-x": (
        lambda: list(augnet.iter_jacobian(mlp(), 2.5)),
        TypeError,
        ["`x` is a Python float (2.5)"],
    ),
    "ragged-nested-list": (
        lambda: augnet.jacobian(mlp(), [[1.0, 2.0, 3.0], [4.0, 5.0]]),
        ValueError,
        ["`x` is a ragged nested list", "lengths [3, 2]", "rectangular", "np.asarray(x"],
    ),
    "list-of-samples": (
        lambda: augnet.jacobian(mlp(), [np.zeros(3, "float32"), np.ones(3, "float32")]),
        ValueError,
        [
            "`x` is a list of 2 arrays of shape (3,), one sample each",
            "np.stack(x) has shape (2, 3)",
        ],
    ),
    "list-of-samples-of-different-shapes": (
        lambda: augnet.jacobian(mlp(), [np.zeros(3, "float32"), np.ones(2, "float32")]),
        ValueError,
        ["`x` is a list of 2 arrays of different shapes (2,), (3,)", "np.stack(x)"],
    ),
    "object-array-x": (
        lambda: augnet.jacobian(mlp(), np.array([np.zeros(3), np.zeros(2)], dtype=object)),
        TypeError,
        ["`x` is a NumPy array of Python objects", "different shapes (2,), (3,)", "np.stack"],
    ),
    "generator-x": (
        lambda: augnet.jacobian(mlp(), _samples()),
        TypeError,
        [
            "`x` is a generator, a stream of batches",
            "for xb in data: J = augnet.jacobian(model, xb)",
            "augnet jacobian MODEL INPUTS --out DIR",
        ],
    ),
    "iterator-x": (
        lambda: augnet.jacobian(mlp(), iter([np.zeros((2, 3), "float32")])),
        TypeError,
        ["`x` is an iterator (list_iterator), a stream of batches", "per batch"],
    ),
    "object-x": (
        lambda: augnet.jacobian(mlp(), object()),
        TypeError,
        ["`x` is an object of type object, not an array"],
    ),
    "fn-is-a-class": (
        lambda: augnet.jacobian(keras.Sequential, A),
        TypeError,
        ["`fn` is the class ", "Sequential, not a model", "pass the instance"],
    ),
    "callable-drops-the-batch-axis": (
        lambda: augnet.jacobian(lambda x: keras.ops.sum(x), A),
        ValueError,
        [
            "`fn` returned its output of shape () for a batch of 2 samples",
            "first axis of every output must be the batch axis",
            "keras.ops.sum(x, axis=-1, keepdims=True)",
        ],
    ),
    "callable-sums-over-the-batch": (
        lambda: augnet.jacobian(lambda x: keras.ops.sum(x, axis=0), A),
        ValueError,
        ["`fn` returned its output of shape (3,) for a batch of 2 samples"],
    ),
    # issue 9: complex and non-finite values
    "complex-x": (
        lambda: augnet.jacobian(mlp(), np.ones((2, 3), "complex64")),
        TypeError,
        ["`x` is complex (complex64)", "imaginary part", "np.real(x)"],
    ),
    "inf-x": (
        lambda: augnet.jacobian(mlp(), _with_inf(np.inf, 1, 2)),
        ValueError,
        ["`x` holds a non-finite value (inf) at sample 1, element (2,)", "np.nan_to_num"],
    ),
    "nan-x": (
        lambda: augnet.jacobian(mlp(), _with_inf(np.nan, 0, 1)),
        ValueError,
        ["`x` holds a non-finite value (nan) at sample 0, element (1,)"],
    ),
    "float64-too-large-for-float32": (
        lambda: augnet.jacobian(mlp(), _with_inf(1e300, 1, 0, "float64")),
        ValueError,
        ["non-finite value (inf) at sample 1, element (0,), in float32"],
    ),
    # issue 9: vjp/jvp arguments
    "jvp-tangent-None": (
        lambda: augnet.jvp(mlp(), A, None),
        TypeError,
        ["`tangent` is None", "shaped like `x`", "np.ones_like(x)"],
    ),
    "vjp-cotangent-None": (
        lambda: augnet.vjp(mlp(), A, None),
        TypeError,
        ["`cotangent` is None", "(batch, *output_shape)"],
    ),
    "jvp-tangent-python-float": (
        lambda: augnet.jvp(mlp(), A, 1.0),
        TypeError,
        ["`tangent` is a Python float (1.0)"],
    ),
    "vjp-complex-cotangent": (
        lambda: augnet.vjp(mlp(), A, np.ones((2, 2), "complex128")),
        TypeError,
        ["`cotangent` is complex (complex128)", "imaginary part"],
    ),
    "jvp-complex-tangent": (
        lambda: augnet.jvp(mlp(), A, np.ones((2, 3), "complex64")),
        TypeError,
        ["`tangent` is complex (complex64)"],
    ),
    "jvp-inf-tangent": (
        lambda: augnet.jvp(mlp(), A, _with_inf(np.inf, 1, 0)),
        ValueError,
        ["`tangent` holds a non-finite value (inf) at sample 1", "A product with a non-finite"],
    ),
    # issue 9: options
    "bad-max_memory-inf": (
        _image(max_memory=float("inf")),
        ValueError,
        ["invalid value for `max_memory`", "finite, positive", "max_memory=inf", "leave it out"],
    ),
    "bad-max_memory-nan": (_image(max_memory=float("nan")), ValueError, ["max_memory=nan"]),
    "bad-jit_compile": (
        _image(jit_compile="yes"),
        TypeError,
        ["invalid value for `jit_compile`", "True or False"],
    ),
    "logits-on-a-linear-model": (
        lambda: augnet.jacobian(mlp(), A, logits=True),
        ValueError,
        ["logits=True", "model 'mlp' ends in Dense '", "activation 'linear'", "logits=False"],
    ),
    "logits-not-a-bool": (
        lambda: augnet.jacobian(mlp(), A, logits="yes"),
        TypeError,
        ["invalid value for `logits`", "True or False"],
    ),
    "logits-on-a-callable": (
        lambda: augnet.jacobian(lambda x: x * 2, A, logits=True),
        TypeError,
        ["logits=True needs a Keras model"],
    ),
    "logits-on-a-subclassed-model": (
        lambda: augnet.jacobian(Subclassed(), A, logits=True),
        TypeError,
        ["logits=True needs a functional or Sequential model", "'subclassed'"],
    ),
    # TensorFlow's containers
    "tf-data-Dataset": (
        lambda: augnet.jacobian(mlp(), _tf().data.Dataset.from_tensor_slices(A).batch(2)),
        TypeError,
        ["`x` is a tf.data.Dataset, a stream of batches", "for xb, _ in data"],
    ),
    "tf-RaggedTensor": (
        lambda: augnet.jacobian(mlp(), _tf().ragged.constant([[1.0, 2.0, 3.0], [4.0, 5.0]])),
        TypeError,
        ["`x` is a ragged tensor", "x.to_tensor()"],
    ),
    "tf-SparseTensor": (
        lambda: augnet.jacobian(mlp(), _tf().sparse.from_dense(A)),
        TypeError,
        ["`x` is a sparse array", "tf.sparse.to_dense(x)"],
    ),
    "forward-on-recurrent": (
        lambda: augnet.jacobian(
            recurrent_model(), np.zeros((1, 3, 2), "float32"), strategy="forward"
        ),
        ValueError,
        ["strategy='forward' does not support recurrent layers", "'loop'"],
    ),
}


# Limitations of TensorFlow's forward mode (B.FORWARD_TRAINING / B.FORWARD_RECURRENT are False):
# other backends may support these combinations.
TENSORFLOW_LIMITS = {
    "forward-with-training",
    "forward-on-recurrent",
    "tf-data-Dataset",
    "tf-RaggedTensor",
    "tf-SparseTensor",
}


def _tf():
    import tensorflow

    return tensorflow


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(c, marks=pytest.mark.tensorflow_only) if c in TENSORFLOW_LIMITS else c
        for c in CASES
    ],
)
def test_bad_input_raises_a_clear_error(case):
    call, error, fragments = CASES[case]
    with pytest.raises(error, match=re.escape(fragments[0])) as info:
        call()
    message = str(info.value)
    for fragment in fragments[1:]:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def test_errors_come_before_any_work(monkeypatch):
    """Argument errors are raised before anything is compiled."""
    from augnet._engine import blocks

    def no_compile(*args, **kwargs):  # pragma: no cover - must not run
        raise AssertionError("compiled before checking the arguments")

    monkeypatch.setattr(blocks, "compiled", no_compile)
    for case in (
        "output-index-too-large",
        "bad-strategy",
        "missing-batch-axis",
        "top_k-zero",
        "python-float-x",
        "generator-x",
        "complex-x",
        "inf-x",
        "bad-max_memory-inf",
        "logits-on-a-linear-model",
        "callable-drops-the-batch-axis",
    ):
        call, error, _ = CASES[case]
        with pytest.raises(error):
            call()


@pytest.mark.tensorflow_only
def test_iter_jacobian_inside_tf_function_says_what_to_use(tf):
    model = keras.Sequential([keras.Input((2,)), L.Dense(2)])

    @tf.function
    def traced(x):
        return list(augnet.iter_jacobian(model, x))

    with pytest.raises(RuntimeError, match=r"iter_jacobian runs eagerly.*augnet\.jacobian"):
        traced(tf.zeros((1, 2)))


def test_jacobian_to_npy_several_inputs(tmp_path):
    with pytest.raises(ValueError, match=r"writes one array, but the model has 2 inputs"):
        augnet.jacobian_to_npy(two_input_model(), [A, B2], tmp_path / "J.npy")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("strategy", ["loop", "pfor", "forward", "auto"])
def test_non_finite_inputs_are_refused_by_every_strategy_and_on_repeated_calls(strategy):
    """One behaviour for all strategies (they disagreed: finite in reverse mode, NaN forward),
    also when a call of the same shape was planned before (the prepared call checks values)."""
    model = keras.Sequential([keras.Input((3,)), L.Dense(4, activation="tanh"), L.Dense(2)])
    J = augnet.jacobian(model, np.ones((2, 3), "float32"), strategy=strategy)
    assert np.isfinite(J).all()
    for value, text in ((np.inf, "inf"), (-np.inf, "-inf"), (np.nan, "nan")):
        with pytest.raises(ValueError, match=rf"non-finite value \({text}\) at sample 1"):
            augnet.jacobian(model, _with_inf(value, 1, 2), strategy=strategy)
    with pytest.raises(ValueError, match=r"non-finite value \(inf\) at sample 0"):
        augnet.vjp(model, _with_inf(np.inf, 0, 0), np.ones((2, 2), "float32"))


def test_a_batch_written_as_nested_lists_is_one_array():
    x = [[0.5, -1.0, 2.0], [1.5, 0.0, -0.5]]
    np.testing.assert_array_equal(
        augnet.jacobian(mlp(), x, strategy="loop"),
        augnet.jacobian(mlp(), np.asarray(x, "float32"), strategy="loop"),
    )
