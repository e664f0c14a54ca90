"""Shared fixtures for the Jacobian tests: seeds, a small model zoo, and independent references.

The references never call augnet. Each is the backend's own plain per-output gradient loop (samples
are independent in inference mode, so row ``j`` of sample ``i`` is the gradient of output ``j``
summed over the batch, taken at sample ``i``):

- :func:`reference_jacobian` (alias :func:`tape_loop_jacobian`): on TensorFlow one forward pass
  under a plain ``tf.GradientTape``, then one ``tape.gradient`` per output element with a one-hot
  ``output_gradients``; on JAX one ``jax.grad`` of one output per element, through
  ``model.stateless_call``; on torch one forward pass, then one ``torch.autograd.grad`` per
  output element.
- :func:`reference_cross_jacobian`: the full ``(batch, m, batch, n)`` Jacobian across samples
  (``tape.jacobian`` / ``jax.jacrev`` / ``torch.autograd.functional.jacobian``), for the
  training-mode BatchNorm tests where samples are coupled.
- :func:`reference_weight_gradients`: gradients of a scalar function of the model's output with
  respect to its trainable weights.
- :func:`central_fd_jacobian`: float64 central finite differences (NumPy).

Tests TensorFlow-specific by nature (``tf.function``, pfor, XLA, routed max pooling, SavedModel)
are marked ``@pytest.mark.tensorflow_only`` and skipped on the other backends; they take the
``tf`` fixture instead of importing TensorFlow at module level. Everything else is written with
``keras.ops`` and NumPy and runs on every backend (see tests/test_backends.py).

Keras and the frameworks are imported inside the helpers, so that test files that need neither
(the renderer's, say) do not pay for importing them.
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


def backend() -> str:
    """The Keras backend this test run uses (``KERAS_BACKEND``)."""
    import keras

    return keras.backend.backend()


_BACKEND_SUITES = "test_numeric_suite_on_backend"  # tests/test_backends.py


def _backend_suites(items) -> list:
    """The per-backend numeric suite tests among ``items``."""
    return [item for item in items if getattr(item, "originalname", "") == _BACKEND_SUITES]


def pytest_collection_modifyitems(config, items):
    """Skips ``tensorflow_only`` tests on the other backends; the per-backend numeric suites go
    last (they wait for subprocesses that run beside the rest of the session)."""
    last = _backend_suites(items)
    if last:
        ids = {id(item) for item in last}
        items[:] = [item for item in items if id(item) not in ids] + last
    marked = [item for item in items if item.get_closest_marker("tensorflow_only")]
    if not marked or backend() == "tensorflow":
        return
    skip = pytest.mark.skip(reason=f"TensorFlow-specific; Keras runs on {backend()!r}")
    for item in marked:
        item.add_marker(skip)


@pytest.fixture
def tf():
    """TensorFlow, for tests marked ``tensorflow_only`` (imported only when they run)."""
    import tensorflow

    return tensorflow


def to_numpy(value):
    """A backend tensor (or anything array-like) as a NumPy array; lists/dicts of them as lists/
    dicts of arrays."""
    import keras

    return keras.tree.map_structure(keras.ops.convert_to_numpy, value)


def predict(model, x):
    """``model(x, training=False)`` as NumPy (called directly: ``predict()`` would pass float64
    inputs through float32)."""
    with float64_compute(x):
        return to_numpy(model(x, training=False))


@contextlib.contextmanager
def float64_compute(values):
    """Computes float64 in float64 while the block runs, where ``values`` hold float64 arrays.

    Keras 3.15's type promotion maps float64 to float32 on every backend but TensorFlow
    (``keras.src.backend.common.dtypes.BIT64_TO_BIT32_DTYPE``), so there ``keras.ops.matmul`` of
    two float64 tensors, and with it every float64 ``Dense`` layer, computes in float32. augnet
    computes float64 models in float64 on every backend (it lifts that mapping while it runs
    one); the references do the same, independently, so that float64 tests compare float64
    numbers. A no-op on TensorFlow.
    """
    import keras

    leaves = keras.tree.flatten(values)
    if backend() == "tensorflow" or not any(
        "float64" in str(getattr(v, "dtype", "")) for v in leaves
    ):
        yield
        return
    from keras.src.backend.common import dtypes

    table = dtypes.BIT64_TO_BIT32_DTYPE
    saved = table.get("float64")
    table["float64"] = "float64"
    try:
        yield
    finally:
        table["float64"] = saved


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same Keras, NumPy and Python random state."""
    if "keras" in sys.modules:
        sys.modules["keras"].utils.set_random_seed(0)
    yield


def keeps_float64(op: str = "tanh") -> bool:
    """Whether Keras computes ``keras.ops.<op>`` of a float64 tensor in float64 on this backend.

    Keras 3.15's type promotion (``keras.src.backend.common.dtypes``) maps float64 to float32 on
    every backend but TensorFlow for ``tanh``, ``sin``, ``cos``, ``floor``, ``ceil`` and a few
    other ops, also with ``JAX_ENABLE_X64=1``: called by Keras outside augnet, a float64 model
    built with them computes them in float32 there (augnet and the references here lift that
    mapping while they run one: :func:`float64_compute`; ARCHITECTURE.md, "float64").
    """
    import keras

    x = keras.ops.convert_to_tensor(np.zeros((1,), "float64"))
    return keras.backend.standardize_dtype(getattr(keras.ops, op)(x).dtype) == "float64"


def f64_activation() -> str:
    """A smooth activation Keras computes in float64 on this backend, for the float64 tests that
    compare against closed forms and central differences: ``"tanh"`` where Keras keeps it in
    float64 (TensorFlow), else ``"sigmoid"`` (see :func:`keeps_float64`)."""
    return "tanh" if keeps_float64("tanh") else "sigmoid"


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


def reference_jacobian(model, x, *, training=False):
    """Per-sample Jacobian by the backend's plain per-output gradient loop, as NumPy.

    Args:
        model: a Keras model (called as ``model(x, training=training)``) or a callable.
        x: ``(batch, *input_shape)`` array, or a list/dict of them.

    Returns:
        ``(batch, *output_shape, *input_shape)``; ``J[out][in]`` (outputs outer, inputs inner,
        each in the structure the model returns / the caller gave) for several of them.
    """
    loop = {"tensorflow": _tf_loop, "jax": _jax_loop, "torch": _torch_loop}[backend()]
    leaves, rebuild_in = _flatten(x)
    rows, ys = loop(model, leaves, rebuild_in, training)  # rows[o][j][i]: (batch, *in_shape_i)
    per_output = []
    for yo_shape, out_rows in zip(ys, rows):
        batch, out_shape = yo_shape[0], tuple(yo_shape[1:])
        inner = [
            np.stack([r[i] for r in out_rows], axis=1).reshape(
                batch, *out_shape, *np.shape(leaves[i])[1:]
            )
            for i in range(len(leaves))
        ]
        per_output.append(rebuild_in(inner))
    return ys.rebuild(per_output)


tape_loop_jacobian = reference_jacobian  # its name when TensorFlow was the only backend


class _Outputs(list):
    """The output shapes, and how to rebuild the model's output structure."""

    def __init__(self, ys):
        leaves, self.rebuild = _flatten(ys)
        super().__init__(tuple(int(d) for d in y.shape) for y in leaves)


def _m(shape) -> int:
    return int(np.prod(shape[1:], dtype=np.int64))


def _call(model, xs, training):
    import keras

    with float64_compute(xs):
        if isinstance(model, keras.layers.Layer):
            return model(xs, training=training)
        return model(xs)


def _tf_loop(model, leaves, rebuild_in, training):
    import tensorflow as tf

    xs = [tf.convert_to_tensor(v) for v in leaves]
    with tf.GradientTape(persistent=True) as tape:
        for t in xs:
            tape.watch(t)
        y = _call(model, rebuild_in(xs), training)
    ys = _Outputs(y)
    rows = []
    for yo in _flatten(y)[0]:
        batch = int(yo.shape[0])
        out_rows = []
        for j in range(_m(yo.shape)):
            seed = tf.reshape(
                tf.one_hot(tf.fill([batch], j), _m(yo.shape), dtype=yo.dtype), yo.shape
            )
            grads = tape.gradient(
                yo, xs, output_gradients=seed, unconnected_gradients=tf.UnconnectedGradients.ZERO
            )
            out_rows.append([g.numpy() for g in grads])
        rows.append(out_rows)
    del tape
    return rows, ys


def _stateless_call(model, trainable, non_trainable, x, training):
    """``model.stateless_call(...)[0]``, with ``training`` only for a call that takes it (it goes
    to ``call`` itself, unfiltered)."""
    kwargs = {"training": training} if getattr(model, "_call_has_training_arg", True) else {}
    with float64_compute(x):  # float64 in float64 (read when JAX traces the call)
        return model.stateless_call(trainable, non_trainable, x, **kwargs)[0]


def _jax_loop(model, leaves, rebuild_in, training):
    import jax
    import jax.numpy as jnp
    import keras

    xs = [jnp.asarray(v) for v in leaves]
    if isinstance(model, keras.layers.Layer):
        trainable = [v.value for v in model.trainable_variables]
        non_trainable = [v.value for v in model.non_trainable_variables]

        def f(xs):
            return _stateless_call(model, trainable, non_trainable, rebuild_in(xs), training)

    else:

        def f(xs):
            return model(rebuild_in(xs))

    # Traced (and so computed) in float64 for float64 inputs, as augnet computes them.
    with float64_compute(leaves):
        y = f(xs)
        ys = _Outputs(y)
        rows = []
        for o, shape in enumerate(ys):

            def one_output(xs, j, o=o):  # output j of every sample, summed over the batch
                yo = _flatten(f(xs))[0][o]
                return jnp.sum(jnp.take(jnp.reshape(yo, (yo.shape[0], -1)), j, axis=1))

            # jax.grad of one output at a time; jitted with the output index as an argument
            # (compiled once, not traced op by op for every output).
            grad = jax.jit(jax.grad(one_output))
            rows.append([[np.asarray(g) for g in grad(xs, jnp.int32(j))] for j in range(_m(shape))])
    return rows, ys


def _torch_loop(model, leaves, rebuild_in, training):
    import torch

    xs = [torch.tensor(np.asarray(v)).requires_grad_(True) for v in leaves]
    y = _call(model, rebuild_in(xs), training)
    ys = _Outputs(y)
    rows = []
    for yo in _flatten(y)[0]:
        flat = yo.reshape(yo.shape[0], -1)
        out_rows = []
        for j in range(flat.shape[1]):
            grads = torch.autograd.grad(flat[:, j].sum(), xs, retain_graph=True, allow_unused=True)
            out_rows.append(
                [
                    np.zeros(x.shape, dtype=np.asarray(v).dtype)
                    if g is None
                    else g.detach().cpu().numpy()
                    for g, x, v in zip(grads, xs, leaves)
                ]
            )
        rows.append(out_rows)
    return rows, ys


def reference_cross_jacobian(model, x, *, training=False):
    """The full Jacobian across samples, ``(batch, m, batch, n)``: ``[b, :, i]`` is
    ``∂y_b/∂x_i`` (one input, one output; by the backend's own full-Jacobian routine)."""
    name = backend()
    if name == "tensorflow":
        import tensorflow as tf

        xt = tf.convert_to_tensor(x)
        with tf.GradientTape() as tape:
            tape.watch(xt)
            y = model(xt, training=training)
        full = tape.jacobian(y, xt).numpy()
    elif name == "jax":
        import jax
        import jax.numpy as jnp

        trainable = [v.value for v in model.trainable_variables]
        non_trainable = [v.value for v in model.non_trainable_variables]

        def f(v):
            return _stateless_call(model, trainable, non_trainable, v, training)

        full = np.asarray(jax.jacrev(f)(jnp.asarray(x)))
    else:
        import torch

        def f(v):
            return model(v, training=training)

        full = torch.autograd.functional.jacobian(f, torch.tensor(np.asarray(x))).numpy()
    batch = np.shape(x)[0]
    return full.reshape(batch, -1, batch, *np.shape(x)[1:])


def reference_weight_gradients(model, x, scalar):
    """Gradients of ``scalar(model(x, training=False))`` (a scalar function of the output, written
    with ``keras.ops``) with respect to ``model.trainable_weights``, as NumPy, in their order."""
    name = backend()
    weights = list(model.trainable_weights)
    if name == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            value = scalar(model(x, training=False))
        return [g.numpy() for g in tape.gradient(value, weights)]
    if name == "jax":
        import jax

        non_trainable = [v.value for v in model.non_trainable_variables]

        def f(trainable):
            return scalar(_stateless_call(model, trainable, non_trainable, x, False))

        return [np.asarray(g) for g in jax.grad(f)([v.value for v in model.trainable_variables])]
    import torch

    with float64_compute(x):
        value = scalar(model(x, training=False))
        grads = torch.autograd.grad(value, [w.value for w in weights], allow_unused=True)
    return [
        np.zeros(tuple(w.shape)) if g is None else g.detach().cpu().numpy()
        for g, w in zip(grads, weights)
    ]


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


# --------------------------------------------------------------------------------------------------
# The command line, in-process
# --------------------------------------------------------------------------------------------------


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """``augnet ARGV`` in this process: ``(exit code, stdout, stderr)``."""
    from augnet import _cli

    code = _cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code: int, err: str, pattern: str) -> None:
    """A user's mistake as the command line promises it: exit 2, one line ``augnet: error: ...``
    matching ``pattern``, no traceback."""
    import re

    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("augnet: error: "), err
    assert re.search(pattern, lines[0]), lines[0]
    assert "Traceback" not in err


def pytest_collection_finish(session):
    """Starts the per-backend numeric suites in the background as soon as the session knows it
    runs them (tests/test_backends.py), so that they run beside the other tests."""
    suites = _backend_suites(session.items)
    if suites and not session.config.option.collectonly:
        suites[0].module.start_in_background([item.callspec.params["name"] for item in suites])


def pytest_sessionfinish(session, exitstatus):
    suites = _backend_suites(getattr(session, "items", []))
    if suites:
        suites[0].module.stop_background()
