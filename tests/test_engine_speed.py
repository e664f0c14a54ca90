"""What makes the engine fast changes no number: routed max pooling, prepared calls, the direct
call of the compiled function, and the tie rule of strategy="auto".

Speed itself is measured in benchmarks/ (never asserted here); these tests pin the results against
the plain per-output gradient loop of conftest.py and the bookkeeping around the shortcuts. Routed
max pooling, the traced function's direct call and auto's measured candidate lists are
TensorFlow's (marked ``tensorflow_only``).
"""

import gc

import keras
import numpy as np
import pytest
from conftest import TOL, reference_jacobian

import augnet
from augnet import _backend, _engine
from augnet._engine import auto, pooling, prepare
from augnet._engine.run import Run
from augnet._engine.selection import select
from augnet._engine.target import cache_for, infer_outputs, prepare_target

F32 = TOL["float32"]
F64 = TOL["float64"]
L = keras.layers
RNG = np.random.default_rng(31)


def _pool_model(pool_size, strides, padding, name="pooled"):
    keras.utils.set_random_seed(31)
    return keras.Sequential(
        [
            keras.Input((9, 10, 3)),
            L.Conv2D(4, 3, padding="same", activation="relu"),
            L.MaxPooling2D(pool_size, strides=strides, padding=padding),
            L.Flatten(),
            L.Dense(5),
        ],
        name=name,
    )


def _tied_input(shape):
    """Values on a coarse grid, and negative halves that ReLU turns into zeros: many windows hold
    several equal maxima, where the gradient must go to the first one only."""
    return (np.round(RNG.uniform(-1, 1, size=shape) * 2) / 2).astype("float32")


# --------------------------------------------------------------------------------------------------
# Routed max pooling
# --------------------------------------------------------------------------------------------------


@pytest.mark.tensorflow_only
@pytest.mark.parametrize(
    "pool_size, strides, padding",
    [
        (2, None, "valid"),  # non-overlapping windows
        (3, 2, "same"),  # overlapping windows, padded edges
        ((2, 3), (1, 2), "valid"),  # rectangular window, unequal strides
        (3, 1, "same"),  # stride 1: every element in up to 9 windows
    ],
)
def test_routed_max_pooling_matches_the_reference_loop(pool_size, strides, padding):
    model = _pool_model(pool_size, strides, padding)
    assert len(pooling.routable_pools(model)) == 1
    x = _tied_input((3, 9, 10, 3))
    reference = reference_jacobian(model, x)
    np.testing.assert_allclose(augnet.jacobian(model, x, strategy="loop"), reference, **F32)
    # The unrouted strategies agree with it too.
    np.testing.assert_allclose(augnet.jacobian(model, x, strategy="pfor"), reference, **F32)


@pytest.mark.tensorflow_only
def test_routed_max_pooling_is_bit_identical_on_ties():
    """A model of max pooling alone: the Jacobian is 0/1 routing; ties everywhere (a constant
    block, equal values) must pick the same element as TensorFlow's MaxPoolGrad."""
    model = keras.Sequential([keras.Input((6, 6, 2)), L.MaxPooling2D(3, 2, "same"), L.Flatten()])
    x = np.zeros((2, 6, 6, 2), "float32")
    x[1] = np.round(RNG.uniform(0, 2, size=(6, 6, 2)))  # values 0, 1, 2: ties in most windows
    J = augnet.jacobian(model, x, strategy="loop")
    np.testing.assert_array_equal(J, reference_jacobian(model, x))
    assert set(np.unique(J)) == {0.0, 1.0}
    np.testing.assert_array_equal(J.reshape(2, -1, 72).sum(axis=2), 1.0)  # one element per window


@pytest.mark.tensorflow_only
def test_routed_max_pooling_in_float64(float64):
    model = _pool_model(3, 2, "same", name="pooled64")
    x = _tied_input((2, 9, 10, 3)).astype("float64")
    J = augnet.jacobian(model, x, strategy="loop")
    assert J.dtype == np.float64
    np.testing.assert_allclose(J, reference_jacobian(model, x), **F64)


class _OwnPool(L.MaxPooling2D):
    """A subclass with its own call: not routed (it may do anything)."""

    def call(self, inputs):
        return super().call(inputs) * 2.0


@pytest.mark.tensorflow_only
def test_only_plain_channels_last_max_pooling_2d_is_routed():
    keras.utils.set_random_seed(32)
    inner = keras.Sequential([keras.Input((8, 8, 2)), L.MaxPooling2D(2)], name="inner")
    x_in = keras.Input((16, 16, 2))
    a = L.MaxPooling2D(2, name="max2d")(x_in)
    b = L.AveragePooling2D(2, name="avg2d")(x_in)  # shares MaxPooling2D's `call` in Keras 3
    c = _OwnPool(2, name="own")(x_in)
    d = inner(a)
    e = L.MaxPooling1D(2, name="max1d")(L.Reshape((256, 2))(x_in))
    y = L.Concatenate()(
        [L.Flatten()(t) for t in (L.MaxPooling2D(2, name="max_of_avg")(b), c, d, e)]
    )
    model = keras.Model(x_in, L.Dense(3)(y))
    routed = {layer.name for layer in pooling.routable_pools(model)}
    assert routed == {"max2d", "max_of_avg", inner.layers[0].name}
    x = RNG.uniform(-1, 1, size=(2, 16, 16, 2)).astype("float32")
    np.testing.assert_allclose(
        augnet.jacobian(model, x, strategy="loop"), reference_jacobian(model, x), **F32
    )
    # Every layer got its own `call` back.
    assert not any("call" in layer.__dict__ for layer in pooling.routable_pools(model))
    assert len(pooling.routable_pools(model)) == 3


@pytest.mark.tensorflow_only
def test_routed_pooling_restores_layers_after_an_error(monkeypatch):
    model = _pool_model(2, None, "valid", name="pooled_error")
    pool = pooling.routable_pools(model)[0]

    def failing_vjp(f, xs):
        assert "call" in pool.__dict__  # routed while the forward pass is traced
        raise RuntimeError("failed while tracing")

    monkeypatch.setattr(_backend, "vjp", failing_vjp)
    with pytest.raises(RuntimeError, match="failed while tracing"):
        augnet.jacobian(model, _tied_input((1, 9, 10, 3)), strategy="loop")
    assert "call" not in pool.__dict__
    monkeypatch.undo()
    x = _tied_input((2, 9, 10, 3))
    np.testing.assert_allclose(
        augnet.jacobian(model, x, strategy="loop"), reference_jacobian(model, x), **F32
    )


@pytest.mark.tensorflow_only
def test_routed_pooling_is_not_used_under_xla_or_with_derivative_rules(tf):
    model = _pool_model(2, None, "valid", name="pooled_xla")
    x = _tied_input((2, 9, 10, 3))
    reference = reference_jacobian(model, x)
    np.testing.assert_allclose(augnet.jacobian(model, x, strategy="loop_xla"), reference, **F32)

    # With a rule active (here Dense's true derivative) the pooling keeps TensorFlow's gradient.
    def dense_rule(inputs, outputs, layer):
        return lambda g: tf.matmul(g, layer.kernel, transpose_b=True)

    got = augnet.jacobian(model, x, strategy="loop", derivatives={L.Dense: dense_rule})
    np.testing.assert_allclose(got, reference, **F32)


# --------------------------------------------------------------------------------------------------
# Prepared calls
# --------------------------------------------------------------------------------------------------


def _dense_model(name):
    keras.utils.set_random_seed(33)
    return keras.Sequential(
        [keras.Input((4,)), L.Dense(6, activation="tanh"), L.Dense(3)], name=name
    )


def _count_setups(monkeypatch) -> list:
    calls = []
    real = prepare.setup

    def counting(*args, **kwargs):
        calls.append(args[2:])
        return real(*args, **kwargs)

    monkeypatch.setattr(prepare, "setup", counting)
    return calls


def test_repeated_calls_reuse_the_prepared_call_with_the_new_values(monkeypatch):
    model = _dense_model("prepared")
    setups = _count_setups(monkeypatch)
    for _ in range(3):  # same shape, new values each time: each result is the new input's
        x = RNG.uniform(-1, 1, size=(5, 4)).astype("float32")
        np.testing.assert_allclose(
            augnet.jacobian(model, x, strategy="loop"), reference_jacobian(model, x), **F32
        )
    assert len(setups) == 1
    x = RNG.uniform(-1, 1, size=(5, 4)).astype("float32")
    augnet.jacobian(
        model, keras.ops.convert_to_tensor(x), strategy="loop"
    )  # a tensor: its own entry
    augnet.jacobian(model, x[:2], strategy="loop")  # another batch size
    augnet.jacobian(model, x.astype("float64"), strategy="loop")  # another dtype
    augnet.jacobian(model, x, strategy="pfor")  # other options
    assert len(setups) == 5
    got = augnet.jacobian(model, x, outputs=[2, 0], strategy="loop")
    np.testing.assert_allclose(got, reference_jacobian(model, x)[:, [2, 0]], **F32)
    augnet.jacobian(model, x, outputs=[2, 0], strategy="loop")
    assert len(setups) == 6
    augnet.jacobian(model, x, outputs=[1], strategy="loop")
    assert len(setups) == 7
    # Not remembered: several inputs as a list, per-call derivative rules, index arrays.
    augnet.jacobian(model, [x], strategy="loop")
    augnet.jacobian(model, [x], strategy="loop")
    augnet.jacobian(model, x, strategy="loop", derivatives={})
    augnet.jacobian(model, x, outputs=np.array([1]), strategy="loop")
    assert len(setups) == 11


@pytest.mark.parametrize("strategy", ["loop", "pfor"])
def test_repeated_calls_of_every_output_use_constant_seeds(strategy):
    """A repeated call selecting every output in order (``outputs=None`` or the full list) runs a
    block whose seeds are constants of the graph (no ``sel`` argument) where the backend says so
    (``CONSTANT_SEEDS``, JAX); another selection keeps its seeds as an argument. The numbers are the reference's either way."""
    from augnet._engine import blocks

    model = _dense_model(f"seeds_{strategy}")
    x = RNG.uniform(-1, 1, size=(5, 4)).astype("float32")
    reference = reference_jacobian(model, x)
    for outputs, rows in ((None, [0, 1, 2]), ([0, 1, 2], [0, 1, 2]), ([2, 0], [2, 0])):
        for _ in range(2):  # planned, then the fast lane
            got = augnet.jacobian(model, x, outputs=outputs, strategy=strategy)
            np.testing.assert_allclose(got, reference[:, rows], **F32)
    kinds = {(k[0], k[3]) for k in cache_for(model) if isinstance(k, tuple) and len(k) > 3}
    if _backend.CONSTANT_SEEDS:
        assert (strategy, blocks.ALL_OUTPUTS) in kinds
    else:
        assert (strategy, blocks.ALL_OUTPUTS) not in kinds
    assert (strategy, 2 if strategy == "loop" else None) in kinds  # outputs=[2, 0]


def test_the_fast_lane_checks_the_converted_input():
    """A float64 value too large for a float32 model becomes inf when converted: refused on a
    repeated call as on the first (the check runs on what the model would see)."""
    model = _dense_model("converted")
    x = RNG.uniform(-1, 1, size=(3, 4))  # float64
    augnet.jacobian(model, x)
    augnet.jacobian(model, x)
    x[1, 2] = 1e300
    with pytest.raises(ValueError, match=r"non-finite value \(inf\) at sample 1, element \(2,\)"):
        augnet.jacobian(model, x)


def test_prepared_calls_keep_no_input_and_are_bounded():
    model = _dense_model("bounded")
    x = RNG.uniform(-1, 1, size=(40, 4)).astype("float32")
    for b in range(39, 0, -1):  # (largest first: where jit compiles per shape, once)
        augnet.jacobian(model, x[:b], strategy="loop")
    plans = cache_for(model)["plans"]
    assert len(plans) == prepare.MAX_PLANS
    assert all(plan.tensors == [] for plan in plans.values())
    # The most recent shapes are the ones kept.
    assert {key[1][1][0] for key in plans} == set(range(1, prepare.MAX_PLANS + 1))


def test_a_rule_registered_after_a_call_takes_effect():
    class Doubler(L.Layer):
        def call(self, x):
            return 2.0 * x

    keras.utils.set_random_seed(34)
    model = keras.Sequential([keras.Input((3,)), Doubler(), L.Dense(2)], name="doubled")
    x = RNG.uniform(-1, 1, size=(4, 3)).astype("float32")
    kernel_t = model.layers[-1].kernel.numpy().T
    np.testing.assert_allclose(augnet.jacobian(model, x, strategy="loop")[0], 2 * kernel_t, **F32)
    augnet.register_derivative(Doubler, 1.0)  # a (deliberately different) rule
    try:
        got = augnet.jacobian(model, x, strategy="loop")
        np.testing.assert_allclose(got[0], kernel_t, **F32)
    finally:
        augnet.unregister_derivative(Doubler)
    np.testing.assert_allclose(augnet.jacobian(model, x, strategy="loop")[0], 2 * kernel_t, **F32)


def test_prepared_call_still_checks_nothing_it_skips_would_catch():
    """A prepared call is only reused for the same shape and dtype: a wrong shape still gets the
    full check and its clear error."""
    model = _dense_model("checked")
    x = RNG.uniform(-1, 1, size=(3, 4)).astype("float32")
    augnet.jacobian(model, x)
    with pytest.raises(ValueError, match=r"\(3, 5\)"):
        augnet.jacobian(model, np.ones((3, 5), "float32"))
    with pytest.raises(ValueError, match="batch axis is missing"):
        augnet.jacobian(model, x[0])


def test_inputs_can_be_freed_after_a_call():
    model = _dense_model("freed")
    x = RNG.uniform(-1, 1, size=(3, 4)).astype("float32")
    augnet.jacobian(model, x)
    import weakref

    ref = weakref.ref(x)
    del x
    gc.collect()
    assert ref() is None


# --------------------------------------------------------------------------------------------------
# The compiled function, called directly
# --------------------------------------------------------------------------------------------------


@pytest.mark.tensorflow_only
def test_compiled_function_takes_tensors_and_numpy_alike(tf):
    def block(xs, scale):
        return [xs[0] * tf.cast(scale, xs[0].dtype), xs[0] + 1.0]

    sig = [[tf.TensorSpec((None, 3), tf.float32)], tf.TensorSpec((), tf.int32)]
    f = _backend.compile_function(block, sig)
    x = RNG.uniform(size=(2, 3)).astype("float32")
    for args in (([tf.constant(x)], tf.constant(3)), ([x], np.int32(3))):
        out = f(*args)
        np.testing.assert_allclose(out[0].numpy(), 3 * x, rtol=1e-6)
        np.testing.assert_allclose(out[1].numpy(), x + 1, rtol=1e-6)
    f([np.ones((5, 3), "float32")], np.int32(1))  # another batch size: no retrace
    assert f.experimental_get_tracing_count() == 1
    assert f.trace_count() == 1


# --------------------------------------------------------------------------------------------------
# strategy="auto": near ties go to the loop
# --------------------------------------------------------------------------------------------------


@pytest.mark.tensorflow_only  # the candidates measured on TensorFlow
@pytest.mark.parametrize(
    "seconds, chosen",
    [
        ({"loop": 1.0, "pfor": 0.9, "loop_xla": 0.95, "forward": 1.2}, "loop"),  # a near tie
        ({"loop": 1.0, "pfor": 0.5, "loop_xla": 0.95, "forward": 1.2}, "pfor"),
        ({"loop": 1.0, "pfor": 0.9, "loop_xla": 0.3, "forward": 1.2}, "loop_xla"),
    ],
)
def test_auto_leaves_the_loop_only_for_a_clear_win(monkeypatch, seconds, chosen):
    model = _dense_model(f"auto_{chosen}")
    x = RNG.uniform(-1, 1, size=(5, 4)).astype("float32")
    target, _ = prepare_target(model, x, False)
    assert _engine.auto_candidates(target, 3, False) == ["loop", "pfor", "loop_xla", "forward"]

    def probe(runs):
        assert set(runs) == set(seconds)
        return dict(seconds)

    monkeypatch.setattr(auto, "probe_estimates", probe)
    run = prepare.setup(model, x, None, None, False, "auto", None, None, None, False)
    got = "loop_xla" if run.strategy == "loop" and run.jit_compile else run.strategy
    assert got == chosen
    np.testing.assert_allclose(augnet.jacobian(model, x), reference_jacobian(model, x), **F32)


@pytest.mark.tensorflow_only
def test_auto_candidates_by_kind_of_network():
    keras.utils.set_random_seed(35)
    dense = _dense_model("kinds_dense")
    conv = keras.Sequential([keras.Input((6, 6, 1)), L.Conv2D(2, 3), L.Flatten(), L.Dense(3)])
    rnn = keras.Sequential([keras.Input((5, 2)), L.LSTM(4), L.Dense(3)])
    tall = keras.Sequential([keras.Input((2,)), L.Dense(16)])

    def candidates(model, x, training=False):
        target, tensors = prepare_target(model, x, training)
        infer_outputs(target, tensors)
        return _engine.auto_candidates(target, target.total_outputs, training)

    x4, x6, x5, x2 = (np.zeros(s, "float32") for s in ((1, 4), (1, 6, 6, 1), (1, 5, 2), (1, 2)))
    assert candidates(dense, x4) == ["loop", "pfor", "loop_xla", "forward"]
    assert candidates(dense, x4, training=True) == ["loop", "pfor", "loop_xla"]
    assert candidates(conv, x6) == ["loop"]
    assert candidates(rnn, x5) == ["loop", "loop_xla"]
    assert candidates(tall, x2) == ["forward"]


@pytest.mark.tensorflow_only
def test_routed_max_pooling_with_training_true():
    """training=True runs the model statelessly; routing applies there too (BatchNorm on the
    pass's batch statistics: the reference is the same per-output tape loop in training mode)."""
    keras.utils.set_random_seed(36)
    model = keras.Sequential(
        [
            keras.Input((8, 8, 2)),
            L.Conv2D(3, 3, activation="relu"),
            L.BatchNormalization(),
            L.MaxPooling2D(2),
            L.Flatten(),
            L.Dense(3),
        ]
    )
    x = RNG.uniform(size=(4, 8, 8, 2)).astype("float32")
    moving_mean = model.layers[1].moving_mean.numpy().copy()
    J = augnet.jacobian(model, x, training=True, strategy="loop")
    np.testing.assert_array_equal(model.layers[1].moving_mean.numpy(), moving_mean)  # unchanged
    np.testing.assert_allclose(J, reference_jacobian(model, x, training=True), **F32)


def test_auto_probe_times_every_candidate_and_extrapolates():
    model = _dense_model("probe_real")
    x = RNG.uniform(-1, 1, size=(6, 4)).astype("float32")
    target, tensors = prepare_target(model, x, False)
    infer_outputs(target, tensors)
    selection = select(target, None, None)
    runs = {
        "loop": Run(target, tensors, selection, "loop", 2, 3, False, False),
        "forward": Run(target, tensors, selection, "forward", 6, 4, False, False),
    }
    estimates = auto.probe_estimates(runs)
    assert set(estimates) == {"loop", "forward"}
    assert all(0 < t < 10 for t in estimates.values())
    # A strategy that cannot run is left out rather than failing the call.
    runs["broken"] = Run(target, [], selection, "loop", 2, 3, False, False)
    assert set(auto.probe_estimates(runs)) == {"loop", "forward"}
