"""The autodiff seam's contract (augnet/_backend/__init__.py), primitive by primitive.

Written with ``keras.ops`` and NumPy only, against closed forms, so that it runs unchanged on every
backend: a new backend module passes these before the numeric suite is worth running.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
from conftest import backend, to_numpy

from augnet import _backend as B

ops = keras.ops
TOL = {"rtol": 1e-6, "atol": 1e-6}
RNG = np.random.default_rng(50)


def _t(a, dtype="float32"):
    return B.convert(np.asarray(a), dtype)


def _f(xs):  # y = sin(x0) * x1, elementwise, (b, 3)
    return ops.sin(xs[0]) * xs[1]


@pytest.fixture
def xs():
    return [RNG.normal(size=(2, 3)).astype("float32"), RNG.normal(size=(2, 3)).astype("float32")]


def test_contract_is_complete_and_exported():
    module = __import__(f"augnet._backend.{B.name}", fromlist=["x"])
    assert B.name == backend()
    assert set(B.CONTRACT) <= set(module.__all__)
    for name in B.CONTRACT:
        assert getattr(B, name) is getattr(module, name), name
    assert B.available_backends()[0] == "tensorflow"
    assert all(isinstance(d, str) and d for d in B.devices())


def test_conversion_and_dtypes():
    a = np.arange(6, dtype="float64").reshape(2, 3)
    t = B.convert(a, "float32")
    assert B.dtype_name(t.dtype) == "float32" and B.is_floating(t.dtype)
    assert B.is_eager_tensor(t) and B.is_float_tensor(t) and not B.is_float_tensor(a)
    assert not B.is_floating(B.convert(a, "int32").dtype)
    back = B.to_numpy(t)
    assert isinstance(back, np.ndarray) and back.dtype == np.float32
    np.testing.assert_array_equal(back, a)
    back[0, 0] = 99.0  # a copy the caller owns
    np.testing.assert_array_equal(B.to_numpy(t)[0, 0], 0.0)
    np.testing.assert_array_equal(B.numpy_view(t), a)
    assert not B.is_symbolic(t)
    assert B.shape_of(t) == (2, 3)


def test_vjp_closed_form_repeatable_and_zeros_where_unconnected(xs):
    x0, x1 = (_t(v) for v in xs)
    z = _t(np.zeros((2, 4)))
    y, vjp_fn = B.vjp(lambda v: _f(v), [x0, x1, z])
    np.testing.assert_allclose(to_numpy(y), np.sin(xs[0]) * xs[1], **TOL)
    for scale in (1.0, -2.0):  # callable any number of times
        u = scale * np.ones((2, 3), "float32")
        g0, g1, gz = vjp_fn(_t(u))
        np.testing.assert_allclose(to_numpy(g0), u * np.cos(xs[0]) * xs[1], **TOL)
        np.testing.assert_allclose(to_numpy(g1), u * np.sin(xs[0]), **TOL)
        np.testing.assert_array_equal(to_numpy(gz), np.zeros((2, 4)))  # zeros, not None


def test_jvp_and_jvp_by_vjp_closed_form(xs):
    t0, t1 = (RNG.normal(size=(2, 3)).astype("float32") for _ in range(2))
    expected = np.cos(xs[0]) * xs[1] * t0 + np.sin(xs[0]) * t1
    for product in (B.jvp, B.jvp_by_vjp):
        x = [_t(v) for v in xs]
        y, y_dot = product(_f, x, [_t(t0), _t(t1)])
        np.testing.assert_allclose(to_numpy(y_dot), expected, **TOL)
        _, only_first = product(_f, x, [_t(t0), None])  # None: that input held constant
        np.testing.assert_allclose(to_numpy(only_first), np.cos(xs[0]) * xs[1] * t0, **TOL)


def test_vectorized_map_stacks_tensors_and_lists():
    elems = _t(np.arange(12).reshape(4, 3))
    out = B.vectorized_map(lambda row: row * 2.0, elems)
    np.testing.assert_allclose(to_numpy(out), 2 * np.arange(12).reshape(4, 3))
    a, b = B.vectorized_map(lambda row: [row + 1.0, ops.sum(row)], elems)
    np.testing.assert_allclose(to_numpy(a), np.arange(12).reshape(4, 3) + 1)
    np.testing.assert_allclose(to_numpy(b), np.arange(12).reshape(4, 3).sum(axis=1))


def test_with_custom_vjp_replaces_the_derivative():
    x = _t([[1.0, -2.0, 3.0]])

    def forward(ts):
        return ops.stop_gradient(ts[0]) ** 2  # no gradient of its own

    def rule(ts, y, upstream):
        return [3.0 * upstream]

    y, vjp_fn = B.vjp(lambda ts: B.with_custom_vjp(forward, ts, rule), [x])
    np.testing.assert_allclose(to_numpy(y), [[1.0, 4.0, 9.0]])
    np.testing.assert_allclose(to_numpy(vjp_fn(_t([[1.0, 2.0, 3.0]]))[0]), [[3.0, 6.0, 9.0]])
    # A rule may return None for an input: a zero cotangent.
    _, vjp_none = B.vjp(lambda ts: B.with_custom_vjp(forward, ts, lambda *a: [None]), [x])
    np.testing.assert_array_equal(to_numpy(vjp_none(_t([[1.0, 1.0, 1.0]]))[0]), 0.0)


def test_connected_outputs_is_structural():
    x = _t([[0.0, 1.5, -2.0]])  # relu's kink at 0: a path with a zero derivative

    def f(ts):
        v = ts[0]
        return [
            v * 2.0,
            ops.stop_gradient(v),
            ops.round(v),
            ops.cast(v, "int32"),
            ops.relu(v) * 0.0,
        ]

    y, flags = B.connected_outputs(f, [x])
    assert len(y) == 5
    assert flags == [True, False, False, False, True]


def test_model_state_and_call_model_have_no_side_effects():
    keras.utils.set_random_seed(51)
    model = keras.Sequential(
        [
            keras.Input((3,)),
            keras.layers.Dense(4),
            keras.layers.BatchNormalization(),
            keras.layers.Dropout(0.5),
        ]
    )
    before = [np.array(v.numpy()) for v in model.variables]
    x = _t(RNG.normal(size=(5, 3)))
    state = B.model_state(model)
    first = to_numpy(B.call_model(model, state, x, True))
    second = to_numpy(B.call_model(model, B.model_state(model), x, True))
    np.testing.assert_array_equal(first, second)  # one dropout mask: the seed is not advanced
    for v, b in zip(model.variables, before):
        np.testing.assert_array_equal(v.numpy(), b, err_msg=v.path)  # BatchNorm statistics kept
    inference = to_numpy(B.call_model(model, B.model_state(model), x, False))
    np.testing.assert_allclose(inference, to_numpy(model(x, training=False)), **TOL)


def test_compiled_function_sees_weights_changed_after_compiling():
    """The state is read at every call and passed in: a weight assigned later (as ``fit`` does)
    is seen, and the function is not compiled again for it."""
    keras.utils.set_random_seed(52)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, use_bias=False)])
    kernel = np.arange(6, dtype="float32").reshape(3, 2)
    model.layers[0].kernel.assign(kernel)

    def block(state, xs):
        return B.call_model(model, state, xs[0], False)

    state = B.model_state(model)
    sig = [
        B.nest_pack(state, [B.tensor_spec(B.shape_of(t), t.dtype) for t in B.nest_flatten(state)]),
        [B.tensor_spec((None, 3), "float32")],
    ]
    f = B.compile_function(block, sig)
    x = np.ones((4, 3), "float32")
    np.testing.assert_allclose(to_numpy(f(B.model_state(model), [_t(x)])), x @ kernel, **TOL)
    traced = f.trace_count()
    assert traced >= 1
    model.layers[0].kernel.assign(-kernel)
    np.testing.assert_allclose(to_numpy(f(B.model_state(model), [_t(x)])), -x @ kernel, **TOL)
    assert f.trace_count() == traced
    # Another batch size gives the right numbers (whether it compiles again is the backend's
    # choice; the engine's tests check that a Jacobian does not).
    np.testing.assert_allclose(
        to_numpy(f(B.model_state(model), [_t(x[:1])])), -x[:1] @ kernel, **TOL
    )


def test_parameter_vjp_closed_form():
    keras.utils.set_random_seed(53)
    dense = keras.layers.Dense(2)
    model = keras.Sequential([keras.Input((3,)), dense])
    x = RNG.normal(size=(4, 3)).astype("float32")
    u = RNG.normal(size=(4, 2)).astype("float32")
    y, vjp_fn = B.parameter_vjp(
        model, [dense.kernel, dense.bias], lambda s: B.call_model(model, s, _t(x), False)
    )
    gk, gb = vjp_fn(_t(u))
    np.testing.assert_allclose(to_numpy(gk), x.T @ u, **TOL)
    np.testing.assert_allclose(to_numpy(gb), u.sum(axis=0), **TOL)


def test_tensor_utilities_inside_a_compiled_function():
    def block(x, cols, rows):
        y = B.flatten_samples(x)  # (b, 6)
        tangent = B.unit_tangent(cols[0], 6, (2, 3), x)
        onehot = B.one_hot(rows[:, 0], 6, "float32")
        picked = B.gather_columns(B.reshape(y, (-1, 1, 6)), rows)  # (b, 1, m)
        values, indices = B.top_k(y, 2)
        return [
            tangent,
            onehot,
            picked,
            values,
            B.cast(indices, "int32"),
            B.rows_for_batch(np.array([5, 0]), x),
            B.arange(4),
            B.transpose_first_two(B.stack([y, -y], axis=0)),
            B.concat([y, y], axis=1),
            B.repeat_samples(y, 2),
            B.transpose(x, (0, 2, 1)),
        ]

    sig = [
        B.tensor_spec((None, 2, 3), "float32"),
        B.tensor_spec((None,), "int32"),
        B.tensor_spec((None, None), "int32"),
    ]
    f = B.compile_function(block, sig)
    x = np.array([[[0, 5, 1], [2, 3, 4]], [[9, 1, 8], [0, 2, 3]]], "float32")
    rows = np.array([[1, 2], [0, 5]], "int32")
    out = [to_numpy(t) for t in f(_t(x), _t([4], "int32"), _t(rows, "int32"))]
    y = x.reshape(2, 6)
    e4 = np.zeros(6, "float32")
    e4[4] = 1
    np.testing.assert_array_equal(out[0], np.broadcast_to(e4.reshape(2, 3), (2, 2, 3)))
    np.testing.assert_array_equal(out[1], np.eye(6)[[1, 0]])
    np.testing.assert_array_equal(out[2], np.take_along_axis(y, rows, 1)[:, None, :])
    np.testing.assert_array_equal(out[3], [[5, 4], [9, 8]])
    np.testing.assert_array_equal(out[4], [[1, 5], [0, 2]])
    np.testing.assert_array_equal(out[5], [[5, 0], [5, 0]])
    np.testing.assert_array_equal(out[6], np.arange(4))
    np.testing.assert_array_equal(out[7], np.stack([y, -y], axis=1))
    np.testing.assert_array_equal(out[8], np.concatenate([y, y], axis=1))
    np.testing.assert_array_equal(out[9], np.repeat(y, 2, axis=0))
    np.testing.assert_array_equal(out[10], x.transpose(0, 2, 1))


def test_nest_round_trip():
    structure = {"a": [1, 2], "b": (3,)}
    flat = B.nest_flatten(structure)
    assert sorted(flat) == [1, 2, 3]
    assert B.nest_pack(structure, flat) == structure


def test_routed_max_pooling_if_offered():
    if B.max_pool_2d_routed is None:
        pytest.skip(f"the {B.name} backend declines routed max pooling")
    x = RNG.normal(size=(2, 4, 4, 1)).astype("float32")
    pool = keras.layers.MaxPooling2D(2)
    xt = _t(x)
    y, vjp_fn = B.vjp(lambda ts: B.max_pool_2d_routed(ts[0], (2, 2), (2, 2), "valid"), [xt])
    np.testing.assert_array_equal(to_numpy(y), to_numpy(pool(xt)))
    _, plain_vjp = B.vjp(lambda ts: pool(ts[0]), [xt])
    u = _t(RNG.normal(size=(2, 2, 2, 1)))
    np.testing.assert_array_equal(to_numpy(vjp_fn(u)[0]), to_numpy(plain_vjp(u)[0]))
