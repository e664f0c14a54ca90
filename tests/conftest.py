"""Shared fixtures for the Jacobian tests: seeds, a small model zoo, and independent references.

The references never call augnet:

- :func:`tape_loop_jacobian`: one forward pass under a plain ``tf.GradientTape``, then one
  ``tape.gradient`` per output element with a one-hot ``output_gradients`` (samples are
  independent in inference mode, so row ``j`` of sample ``i`` is the gradient at sample ``i``).
- :func:`central_fd_jacobian`: float64 central finite differences.

Keras and TensorFlow are imported inside the helpers, so that test files that need neither (the
renderer's, say) do not pay for importing them.
"""

from __future__ import annotations

import contextlib
import sys

import numpy as np
import pytest

STRATEGIES = ("loop", "pfor", "forward", "auto")
REVERSE = ("loop", "pfor")

# Tolerances against another autodiff result (STYLE.md, habit 4).
TOL = {
    "float16": {"rtol": 2e-2, "atol": 2e-2},
    "float32": {"rtol": 1e-5, "atol": 1e-5},
    "float64": {"rtol": 1e-10, "atol": 1e-10},
}


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same Keras, NumPy and Python random state."""
    if "keras" in sys.modules:
        sys.modules["keras"].utils.set_random_seed(0)
    yield


@contextlib.contextmanager
def float64_keras():
    """Builds float64 Keras models inside the block, then restores the previous settings.

    Both ``floatx`` (the ``keras.Input`` default) and the global dtype policy (the layers' default)
    are set: Keras fixes the global policy from ``floatx`` the first time it is read, so
    ``set_floatx`` alone has no effect on layers once any layer was built.
    """
    import keras

    previous = keras.config.floatx(), keras.config.dtype_policy()
    keras.config.set_floatx("float64")
    keras.config.set_dtype_policy("float64")
    try:
        yield
    finally:
        keras.config.set_floatx(previous[0])
        keras.config.set_dtype_policy(previous[1])


@pytest.fixture
def float64():
    """Float64 Keras models for one test (see :func:`float64_keras`)."""
    with float64_keras():
        yield


# --------------------------------------------------------------------------------------------------
# Structures: one array, a list/tuple or a dict (independent of augnet._structure)
# --------------------------------------------------------------------------------------------------


def _flatten(value):
    if isinstance(value, dict):
        keys = list(value)
        return [value[k] for k in keys], lambda leaves: dict(zip(keys, leaves))
    if isinstance(value, list | tuple):
        kind = type(value)
        return list(value), lambda leaves: kind(leaves)
    return [value], lambda leaves: leaves[0]


# --------------------------------------------------------------------------------------------------
# References
# --------------------------------------------------------------------------------------------------


def tape_loop_jacobian(model, x, *, training=False):
    """Per-sample Jacobian by a plain per-output GradientTape loop, as NumPy.

    Args:
        model: a Keras model (called as ``model(x, training=training)``) or a callable.
        x: ``(batch, *input_shape)`` array, or a list/dict of them.

    Returns:
        ``(batch, *output_shape, *input_shape)``; ``J[out][in]`` (outputs outer, inputs inner,
        each in the structure the model returns / the caller gave) for several of them.
    """
    import keras
    import tensorflow as tf

    leaves, rebuild_in = _flatten(x)
    xs = [tf.convert_to_tensor(v) for v in leaves]
    with tf.GradientTape(persistent=True) as tape:
        for t in xs:
            tape.watch(t)
        if isinstance(model, keras.layers.Layer):
            y = model(rebuild_in(xs), training=training)
        else:
            y = model(rebuild_in(xs))
    ys, rebuild_out = _flatten(y)
    per_output = []
    for yo in ys:
        batch, out_shape = int(yo.shape[0]), tuple(yo.shape[1:])
        m = int(np.prod(out_shape, dtype=np.int64))
        rows = [[] for _ in xs]
        for j in range(m):
            seed = tf.reshape(tf.one_hot(tf.fill([batch], j), m, dtype=yo.dtype), yo.shape)
            grads = tape.gradient(
                yo, xs, output_gradients=seed, unconnected_gradients=tf.UnconnectedGradients.ZERO
            )
            for i, g in enumerate(grads):
                rows[i].append(g.numpy())
        inner = [
            np.stack(r, axis=1).reshape(batch, *out_shape, *t.shape[1:]) for r, t in zip(rows, xs)
        ]
        per_output.append(rebuild_in(inner))
    del tape
    return rebuild_out(per_output)


def central_fd_jacobian(f, x, eps=1e-5):
    """Per-sample Jacobian by float64 central differences, ``(f(x + eps e_k) - f(x - eps e_k)) / 2eps``.

    Every input element ``k`` is perturbed in all samples at once (samples are independent), and
    all ``2 n`` perturbed batches go through ``f`` in one call.

    Args:
        f: maps a float64 ``(batch, *input_shape)`` array to ``(batch, *output_shape)``.
        x: ``(batch, *input_shape)``.

    Returns:
        ``(batch, *output_shape, *input_shape)`` float64.
    """
    x = np.asarray(x, dtype=np.float64)
    batch, in_shape = x.shape[0], x.shape[1:]
    n = int(np.prod(in_shape))
    steps = (eps * np.eye(n)).reshape(n, 1, *in_shape)  # (n, 1, *in_shape)
    perturbed = np.concatenate([x[None] + steps, x[None] - steps])  # (2n, batch, *in_shape)
    y = np.asarray(f(perturbed.reshape(2 * n * batch, *in_shape)), dtype=np.float64)
    out_shape = y.shape[1:]
    y = y.reshape(2, n, batch, -1)
    diff = (y[0] - y[1]) / (2 * eps)  # (n, batch, m)
    return diff.transpose(1, 2, 0).reshape(batch, *out_shape, *in_shape)


def assert_structure_allclose(actual, expected, **tol):
    """Element-wise ``assert_allclose`` over matching one-level-nested lists/dicts of arrays."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict) and list(actual) == list(expected)
        for k in expected:
            assert_structure_allclose(actual[k], expected[k], **tol)
    elif isinstance(expected, list | tuple):
        assert isinstance(actual, list | tuple) and len(actual) == len(expected)
        for a, e in zip(actual, expected):
            assert_structure_allclose(a, e, **tol)
    else:
        actual = np.asarray(actual)
        assert actual.shape == expected.shape, (actual.shape, expected.shape)
        np.testing.assert_allclose(actual, expected, **tol)


# --------------------------------------------------------------------------------------------------
# The model zoo: small models, one per layer family, with the strategies that apply to each
# --------------------------------------------------------------------------------------------------


def _set_random_bn_statistics(model, rng):
    """Gives every BatchNormalization layer non-trivial moving statistics, gamma and beta."""
    import keras

    stack = list(model.layers)
    while stack:
        layer = stack.pop()
        stack.extend(getattr(layer, "layers", []))
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.moving_mean.shape[0]
            layer.moving_mean.assign(rng.normal(size=n))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, size=n))
            layer.gamma.assign(rng.uniform(0.5, 1.5, size=n))
            layer.beta.assign(rng.normal(size=n))


def build_zoo_model(name: str):
    """One zoo model by name (weights from a fixed seed)."""
    import keras

    L = keras.layers
    keras.utils.set_random_seed(1234)

    def seq(shape, *layers):
        return keras.Sequential([keras.Input(shape), *layers], name=name)

    if name == "sequential_mlp":
        model = seq((4,), L.Dense(6, activation="tanh"), L.Dense(3))
    elif name == "functional":
        i = keras.Input((4,))
        h = L.Dense(5, activation="sigmoid")(i)
        model = keras.Model(i, L.Dense(3)(L.Concatenate()([h, i])), name=name)
    elif name == "nested":
        inner = seq((4,), L.Dense(5, activation="tanh"))
        i = keras.Input((4,))
        model = keras.Model(i, L.Dense(3)(inner(i)), name=name)
    elif name == "conv2d":
        model = seq((6, 6, 2), L.Conv2D(3, 3, activation="tanh"), L.Flatten(), L.Dense(3))
    elif name == "maxpool":
        model = seq(
            (6, 6, 1), L.Conv2D(2, 3, padding="same"), L.MaxPooling2D(2), L.Flatten(), L.Dense(3)
        )
    elif name == "avgpool":
        model = seq(
            (6, 6, 1),
            L.Conv2D(2, 3, activation="tanh"),
            L.AveragePooling2D(2),
            L.Flatten(),
            L.Dense(3),
        )
    elif name == "batchnorm":
        model = seq((4,), L.Dense(5), L.BatchNormalization(), L.Activation("tanh"), L.Dense(3))
    elif name == "dropout":
        model = seq((4,), L.Dense(6, activation="tanh"), L.Dropout(0.5), L.Dense(3))
    elif name == "layernorm":
        model = seq((4,), L.Dense(5), L.LayerNormalization(), L.Dense(3))
    elif name == "depthwise":
        model = seq((5, 5, 2), L.DepthwiseConv2D(3, activation="tanh"), L.Flatten(), L.Dense(3))
    elif name == "lstm":
        model = seq((3, 2), L.LSTM(3), L.Dense(2))
    elif name == "gru":
        model = seq((3, 2), L.GRU(3), L.Dense(2))
    elif name == "simple_rnn":
        model = seq((3, 2), L.SimpleRNN(3), L.Dense(2))
    elif name == "attention":
        i = keras.Input((3, 4))
        h = L.MultiHeadAttention(num_heads=2, key_dim=2)(i, i)
        model = keras.Model(i, L.Dense(2)(L.Flatten()(h)), name=name)
    else:  # pragma: no cover
        raise KeyError(name)
    _set_random_bn_statistics(model, np.random.default_rng(7))
    return model


# name -> strategies that apply. Recurrent layers: the reverse loop only. TensorFlow's forward mode
# fails on their loops inside tf.function (augnet refuses it, see test_errors.py), and pfor over the
# LSTM/GRU gradient loop is right but costs 10-20 s of tracing on a 2-core machine (so does "auto",
# which times pfor as a candidate).
ZOO = {
    "sequential_mlp": STRATEGIES,
    "functional": STRATEGIES,
    "nested": STRATEGIES,
    "conv2d": STRATEGIES,
    "maxpool": STRATEGIES,
    "avgpool": STRATEGIES,
    "batchnorm": STRATEGIES,
    "dropout": STRATEGIES,
    "layernorm": STRATEGIES,
    "depthwise": STRATEGIES,
    "attention": STRATEGIES,
    "lstm": ("loop",),
    "gru": ("loop",),
    "simple_rnn": ("loop",),
}

ZOO_CASES = [(name, s) for name, strategies in ZOO.items() for s in strategies]


class ZooCase:
    """A zoo model, an input batch, and the tape-loop reference Jacobian (computed once)."""

    def __init__(self, name: str):
        self.name = name
        self.model = build_zoo_model(name)
        shape = tuple(self.model.inputs[0].shape[1:])
        self.x = np.random.default_rng(3).uniform(-1, 1, size=(3, *shape)).astype("float32")
        self.reference = tape_loop_jacobian(self.model, self.x)


_ZOO_CACHE: dict = {}


@pytest.fixture(scope="session")
def zoo():
    """``zoo(name) -> ZooCase``, built once per session (the traced functions are reused too)."""

    def get(name: str) -> ZooCase:
        if name not in _ZOO_CACHE:
            _ZOO_CACHE[name] = ZooCase(name)
        return _ZOO_CACHE[name]

    return get
