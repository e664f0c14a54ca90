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
TENSORFLOW_LIMITS = {"forward-with-training", "forward-on-recurrent"}


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
    for case in ("output-index-too-large", "bad-strategy", "missing-batch-axis", "top_k-zero"):
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
