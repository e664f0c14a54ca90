"""What is particular to augnet on JAX (KERAS_BACKEND=jax; skipped on the other backends).

- jit compiles per shape: other batch sizes are padded to a compiled one, not compiled again;
- the model's state is an argument of every compiled function: weights changed by ``fit`` are seen
  without compiling again, freezing a layer changes nothing, no tracer is left in a variable;
- the structural gradient-path check on JAX primitives (linearised jaxpr);
- float64 needs JAX_ENABLE_X64 (a clear error without it), and Keras 3.15 computes tanh of float64
  in float32 (documented, and the Jacobian is still that model's exact one);
- augnet inside a caller's ``jax.jit``; devices; NumPy results;
- the command line (``augnet info``, ``augnet jacobian``) in a subprocess.
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from conftest import TOL, backend, keeps_float64, reference_jacobian, to_numpy

import augnet
from augnet import _backend as B
from augnet import _engine
from augnet._engine import padding

pytestmark = pytest.mark.skipif(backend() != "jax", reason="JAX-specific (KERAS_BACKEND=jax)")

ROOT = Path(__file__).resolve().parents[1]
F32 = TOL["float32"]
L = keras.layers
RNG = np.random.default_rng(80)


def _mlp(seed=80):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [keras.Input((4,)), L.Dense(6, activation="tanh"), L.Dense(3)], name=f"mlp{seed}"
    )


def _padded(model) -> list:
    return [f for f in _engine.cache_for(model).values() if isinstance(f, padding.Padded)]


# --------------------------------------------------------------------------------------------------
# Compiled once per input signature: padding instead of compiling per batch size
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["loop", "pfor", "forward"])
def test_smaller_batches_are_padded_not_compiled(strategy):
    model = _mlp()
    x = RNG.uniform(-1, 1, size=(6, 4)).astype("float32")
    reference = reference_jacobian(model, x)
    np.testing.assert_allclose(augnet.jacobian(model, x, strategy=strategy), reference, **F32)
    traced = _engine.trace_count(model)
    for b in (2, 5, 1, 6):
        J = augnet.jacobian(model, x[:b], strategy=strategy)
        np.testing.assert_allclose(J, reference[:b], **F32)  # the padded rows are dropped
    assert _engine.trace_count(model) == traced
    (block,) = [f for f in _padded(model) if f.sizes]
    assert set(block.sizes) == {6} and set(block.waste) == {1, 2, 5}


def test_the_last_pass_of_a_run_is_padded_to_the_pass_size():
    model = _mlp(81)
    x = RNG.uniform(-1, 1, size=(10, 4)).astype("float32")
    J = augnet.jacobian(model, x, strategy="loop", batch_size=4)  # passes of 4, 4 and 2
    np.testing.assert_allclose(J, reference_jacobian(model, x), **F32)
    (block,) = [f for f in _padded(model) if f.sizes]
    assert set(block.sizes) == {4}  # one compile; the 2-sample pass ran padded to 4
    assert _engine.trace_count(model) == 1


def test_a_larger_batch_compiles_once_more():
    model = _mlp(82)
    x = RNG.uniform(-1, 1, size=(8, 4)).astype("float32")
    augnet.jacobian(model, x[:2], strategy="pfor")
    first = _engine.trace_count(model)
    np.testing.assert_allclose(
        augnet.jacobian(model, x, strategy="pfor"), reference_jacobian(model, x), **F32
    )
    assert _engine.trace_count(model) == first + 1
    augnet.jacobian(model, x[:5], strategy="pfor")  # padded to 8
    assert _engine.trace_count(model) == first + 1


def test_training_mode_is_never_padded():
    """Batch statistics couple the samples: a training-mode pass runs its own batch size."""
    keras.utils.set_random_seed(83)
    model = keras.Sequential([keras.Input((4,)), L.Dense(5), L.BatchNormalization(), L.Dense(2)])
    x = RNG.uniform(-1, 1, size=(6, 4)).astype("float32")
    augnet.jacobian(model, x, strategy="loop", training=True)
    augnet.jacobian(model, x[:3], strategy="loop", training=True)
    assert not _padded(model)
    assert _engine.trace_count(model) == 2


# --------------------------------------------------------------------------------------------------
# The state as arguments
# --------------------------------------------------------------------------------------------------


def test_weights_changed_by_fit_are_seen_without_compiling_again():
    keras.utils.set_random_seed(84)
    model = augnet.AugNet(
        inputs=(i := keras.Input((4,))),
        outputs=L.Dense(2)(L.BatchNormalization()(L.Dense(5, activation="tanh")(i))),
    )
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss="mse")
    x = RNG.uniform(-1, 1, size=(16, 4)).astype("float32")
    y = RNG.normal(size=(16, 2)).astype("float32")
    before = model.return_jacobian(x, strategy="loop")
    traced = _engine.trace_count(model)
    stats = [np.array(v) for v in model.non_trainable_variables]
    model.fit(x, y, epochs=3, batch_size=8, verbose=0)
    after = model.return_jacobian(x, strategy="loop")
    assert _engine.trace_count(model) == traced
    assert np.abs(after - before).max() > 1e-3  # the new weights are used ...
    np.testing.assert_allclose(after, reference_jacobian(model, x), **F32)  # ... all of them
    # fit moved the BatchNorm statistics; Jacobians (training=True too) never do.
    moved = [np.array(v) for v in model.non_trainable_variables]
    assert any(np.abs(a - b).max() > 0 for a, b in zip(moved, stats))
    model.return_jacobian(x, strategy="loop", training=True)
    for v, m in zip(model.non_trainable_variables, moved):
        np.testing.assert_array_equal(np.array(v), m)
    for v in model.variables:  # no tracer leaked into a Keras variable
        assert B.is_eager_tensor(v.value), v.path


def test_freezing_a_layer_later_changes_nothing():
    model = _mlp(85)
    x = RNG.uniform(-1, 1, size=(3, 4)).astype("float32")
    J = augnet.jacobian(model, x, strategy="pfor")
    traced = _engine.trace_count(model)
    model.layers[0].trainable = False  # the variables move from trainable to non-trainable
    np.testing.assert_array_equal(augnet.jacobian(model, x, strategy="pfor"), J)
    assert _engine.trace_count(model) == traced
    model.layers[0].kernel.assign(np.zeros((4, 6), "float32"))  # a frozen weight still counts
    np.testing.assert_array_equal(augnet.jacobian(model, x, strategy="pfor"), 0.0)


def test_a_small_state_is_packed_once_and_packed_again_when_a_weight_changes():
    """jit's dispatch costs per argument: a small model's state is one buffer per dtype, made
    once and reused while every variable holds the same array."""
    from augnet._backend import jax as BJ

    model = _mlp(86)
    x = RNG.uniform(-1, 1, size=(5, 4)).astype("float32")
    J = augnet.jacobian(model, x)
    state = B.model_state(model)
    assert isinstance(state, dict) and len(state[BJ.PACKED]) == 1  # one dtype: one buffer
    (buffer,) = state[BJ.PACKED]
    values = [np.asarray(v.value) for v in model.variables]
    np.testing.assert_array_equal(np.asarray(buffer), np.concatenate([v.ravel() for v in values]))
    assert B.model_state(model)[BJ.PACKED][0] is buffer  # reused: not packed on every call
    np.testing.assert_array_equal(augnet.jacobian(model, x), J)
    traced = _engine.trace_count(model)
    model.layers[1].kernel.assign(2.0 * values[2])  # the output layer's kernel, doubled
    assert B.model_state(model)[BJ.PACKED][0] is not buffer  # packed again
    J2 = augnet.jacobian(model, x)
    np.testing.assert_allclose(J2, 2.0 * J, **F32)  # linear in the last kernel
    np.testing.assert_allclose(J2, reference_jacobian(model, x), **F32)
    assert _engine.trace_count(model) == traced  # new values, same compiled function
    for v in model.variables:  # the variables keep their own arrays
        assert B.is_eager_tensor(v.value) and not isinstance(v.value, dict)


def test_large_variables_travel_as_their_own_arguments(monkeypatch):
    """Above PACK_VAR_LIMIT bytes a variable is passed as it is (a slice of a packed buffer feeding
    a matrix product would be copied on every call); the small ones are still packed."""
    from augnet._backend import jax as BJ

    model = _mlp(87)  # Dense(6) kernel (4, 6), bias (6,); Dense(3) kernel (6, 3), bias (3,)
    x = RNG.uniform(-1, 1, size=(5, 4)).astype("float32")
    monkeypatch.setattr(BJ, "PACK_VAR_LIMIT", 80)  # bytes: the two kernels (96, 72 B) ...
    state = B.model_state(model)  # ... one kernel above, one below
    large = [v for v in model.variables if v.value.nbytes > 80]
    assert [v.path for v in large] == [model.layers[0].kernel.path]
    assert isinstance(state, dict) and len(state[BJ.PACKED]) == 2  # one buffer, one kernel
    buffer, kernel = state[BJ.PACKED]
    assert kernel is model.layers[0].kernel.value  # the variable's own array, not a copy
    assert buffer.size == sum(v.value.size for v in model.variables) - kernel.size
    for strategy in ("loop", "pfor", "forward"):
        J = augnet.jacobian(model, x, strategy=strategy)
        np.testing.assert_allclose(J, reference_jacobian(model, x), **F32)
    model.layers[0].kernel.assign(2.0 * np.asarray(kernel))  # a large variable changes
    assert B.model_state(model)[BJ.PACKED][1] is model.layers[0].kernel.value
    np.testing.assert_allclose(augnet.jacobian(model, x), reference_jacobian(model, x), **F32)

    BJ._PACKINGS.pop(model, None)
    monkeypatch.setattr(BJ, "PACK_VAR_LIMIT", 0)  # nothing small: one argument per variable
    state = B.model_state(model)
    assert isinstance(state, list) and len(state) == len(model.variables)
    np.testing.assert_allclose(augnet.jacobian(model, x), reference_jacobian(model, x), **F32)


def test_mixed_dtype_state_packs_one_buffer_per_dtype():
    """A model with float32 weights and an integer seed state (Dropout): two buffers; the
    Jacobian is the reference's, in inference and (seeded) training mode alike."""
    from augnet._backend import jax as BJ

    keras.utils.set_random_seed(89)
    model = keras.Sequential(
        [keras.Input((4,)), L.Dense(6, activation="tanh"), L.Dropout(0.5, seed=1), L.Dense(3)]
    )
    x = RNG.uniform(-1, 1, size=(5, 4)).astype("float32")
    np.testing.assert_allclose(augnet.jacobian(model, x), reference_jacobian(model, x), **F32)
    state = B.model_state(model)
    dtypes = sorted({v.dtype for v in model.variables})
    assert isinstance(state, dict) and len(state[BJ.PACKED]) == len(dtypes) > 1
    assert sorted(b.dtype.name for b in state[BJ.PACKED]) == sorted(dtypes)
    J = augnet.jacobian(model, x, training=True)
    np.testing.assert_array_equal(augnet.jacobian(model, x, training=True), J)  # seed not moved


def test_a_state_read_inside_a_callers_trace_is_not_a_tracer():
    import jax

    model = _mlp(90)
    x = RNG.uniform(-1, 1, size=(3, 4)).astype("float32")

    @jax.jit
    def inside(x):
        state = B.model_state(model)  # packed while a trace is open
        return augnet.jacobian(model, x), state

    J, _ = inside(x)
    np.testing.assert_allclose(np.asarray(J), reference_jacobian(model, x), **F32)
    from augnet._backend import jax as BJ

    (buffer,) = BJ._PACKINGS[model].buffers
    assert not isinstance(buffer, jax.core.Tracer)  # the cached buffers are concrete arrays
    np.testing.assert_allclose(augnet.jacobian(model, x), np.asarray(J), **F32)


# --------------------------------------------------------------------------------------------------
# Structural gradient paths
# --------------------------------------------------------------------------------------------------


def test_connected_outputs_on_jax_primitives():
    import jax
    import jax.numpy as jnp

    x = B.convert(np.array([[0.0, 1.5, -2.0]], "float32"), "float32")

    def f(ts):
        v = ts[0]
        cumulative = jax.lax.scan(lambda c, e: (c + e, c * e), 0.0, v[0])[1]
        return [
            jnp.floor(v),
            jnp.ceil(v),
            jnp.sign(v),
            jax.lax.stop_gradient(v) * 3.0,
            v.astype(jnp.int32).astype(jnp.float32),
            jnp.zeros_like(v) + 1.0,
            jax.nn.one_hot(jnp.argmax(v, axis=1), 3),
            jnp.where(v > 0, v, 0.0),  # relu at its kink: a path
            v * 0.0,  # a path with a zero derivative
            cumulative,  # through lax.scan
            jnp.sort(v),
        ]

    _, flags = B.connected_outputs(f, [x])
    assert flags == [False, False, False, False, False, False, False, True, True, True, True]


def test_a_layer_computed_by_a_cast_is_a_gradient_path_error():
    class Quantize(keras.layers.Layer):
        def call(self, x):
            return keras.ops.cast(keras.ops.cast(x * 10.0, "int32"), "float32") / 10.0

    keras.utils.set_random_seed(86)
    i = keras.Input((3,))
    model = keras.Model(i, L.Dense(2)(Quantize(name="quantize")(L.Dense(3)(i))))
    with pytest.raises(augnet.GradientPathError, match="quantize"):
        augnet.jacobian(model, np.ones((2, 3), "float32"))
    J = augnet.jacobian(model, np.ones((2, 3), "float32"), derivatives={Quantize: 1.0})
    w1, w2 = model.layers[1].kernel.numpy(), model.layers[3].kernel.numpy()
    np.testing.assert_allclose(J[0], (w1 @ w2).T, **F32)  # the straight-through rule


def test_an_unbuilt_subclassed_model_is_built_by_its_first_jacobian():
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.hidden = L.Dense(5, activation="tanh")
            self.out = L.Dense(2)

        def call(self, x):
            return self.out(self.hidden(x))

    keras.utils.set_random_seed(92)
    model = Net()
    x = RNG.uniform(-1, 1, size=(3, 4)).astype("float32")
    J = augnet.jacobian(model, x)  # builds it (its variables created eagerly, not under a trace)
    assert model.built
    np.testing.assert_allclose(J, reference_jacobian(model, x), **F32)
    for v in model.variables:
        assert B.is_eager_tensor(v.value)


# --------------------------------------------------------------------------------------------------
# float64
# --------------------------------------------------------------------------------------------------


def test_float64_models_compute_tanh_and_mean_in_float64_on_jax():
    """Documented in ARCHITECTURE.md ("float64"): Keras 3.15's type promotion computes tanh (sin,
    cos, mean, ...) of float64 tensors in float32 on JAX. augnet lifts that mapping while it runs
    a float64 model (``augnet/_backend/_float64.py``), so the Jacobian of a float64 model through
    tanh and a global average pooling (``mean``) is float64's distance from the closed form, and
    Keras's table is left as it was. If the first assertion fails because Keras now keeps
    float64, the float64 tests can use tanh again (conftest.f64_activation does so by itself).
    """
    from keras.src.backend.common import dtypes

    assert not keeps_float64("tanh") and keeps_float64("sigmoid") and keeps_float64("exp")
    table = dict(dtypes.BIT64_TO_BIT32_DTYPE)
    keras.utils.set_random_seed(87)
    model = keras.Sequential(
        [
            keras.Input((5, 4), dtype="float64"),
            L.Dense(3, activation="tanh", dtype="float64"),
            L.GlobalAveragePooling1D(dtype="float64"),
        ]
    )
    x = RNG.uniform(-1, 1, size=(3, 5, 4))
    J = augnet.jacobian(model, x, strategy="loop")
    assert J.dtype == np.float64
    assert dict(dtypes.BIT64_TO_BIT32_DTYPE) == table
    w, b = (np.asarray(v, np.float64) for v in model.layers[0].weights)
    h = np.tanh(x @ w + b)  # (3, 5, 3)
    # y_k = (1/5) Σ_t tanh(x_t · w_k + b_k): ∂y_k/∂x_{t,i} = (1 - h_{t,k}²) w_{i,k} / 5
    exact = np.einsum("btk,ik->bkti", 1 - h**2, w) / 5
    np.testing.assert_allclose(J, exact, **TOL["float64"])
    np.testing.assert_allclose(J, reference_jacobian(model, x), **TOL["float64"])


def test_float64_without_jax_enable_x64_is_a_clear_error():
    code = (
        "import numpy as np, keras, augnet\n"
        "m = keras.Sequential([keras.Input((3,), dtype='float64'), keras.layers.Dense(2)])\n"
        "try:\n"
        "    augnet.jacobian(m, np.ones((2, 3)))\n"
        "except ValueError as exc:\n"
        "    print('ValueError:', exc)\n"
    )
    env = {**os.environ, "KERAS_BACKEND": "jax", "JAX_ENABLE_X64": "0"}
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "JAX_ENABLE_X64=1" in proc.stdout and "float64" in proc.stdout, proc.stdout


# --------------------------------------------------------------------------------------------------
# Inside a caller's jax.jit; devices; results
# --------------------------------------------------------------------------------------------------


def test_inside_a_callers_jit_the_result_is_a_jax_array():
    import jax

    model = _mlp(88)
    x = RNG.uniform(-1, 1, size=(3, 4)).astype("float32")
    u = RNG.normal(size=(3, 3)).astype("float32")
    eager = augnet.jacobian(model, x)

    @jax.jit
    def inside(x, u):
        return augnet.jacobian(model, x, strategy="loop"), augnet.vjp(model, x, u)

    J, g = inside(x, u)
    assert isinstance(J, jax.Array)
    np.testing.assert_allclose(np.asarray(J), eager, **F32)
    np.testing.assert_allclose(np.asarray(g), np.einsum("bo,boi->bi", u, eager), **F32)
    top = jax.jit(lambda x: augnet.jacobian(model, x, top_k=2))(x)
    np.testing.assert_allclose(np.asarray(top.jacobian), augnet.jacobian(model, x, top_k=2)[0])


def test_devices_and_numpy_results():
    import jax

    first = jax.devices()[0]
    assert B.devices()[0] == f"{first.platform.upper()}:{first.id}"
    t = B.convert(np.ones((2, 2), "float32"), "float32")
    assert t.devices() == {first}  # JAX's default device: a GPU where JAX sees one
    J = augnet.jacobian(_mlp(89), np.ones((2, 4), "float32"))
    assert type(J) is np.ndarray and J.flags.writeable
    again = augnet.jacobian(_mlp(89), np.ones((2, 4), "float32"))
    J[...] = 0.0  # the caller's to change: no buffer shared with the next call
    assert np.abs(again).max() > 0


# --------------------------------------------------------------------------------------------------
# The command line on JAX
# --------------------------------------------------------------------------------------------------


def _augnet_cli(*args, cwd):
    env = {**os.environ, "KERAS_BACKEND": "jax"}
    return subprocess.run(
        [sys.executable, "-m", "augnet", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_command_line_info_and_jacobian_on_the_shipped_model(tmp_path):
    model_path = ROOT / "augnet" / "data" / "region_cnn.keras"
    x = np.random.default_rng(90).uniform(0, 1, size=(1, 256, 256, 1)).astype("float32")
    np.save(tmp_path / "x.npy", x)
    info = _augnet_cli("info", str(model_path), cwd=tmp_path)
    assert info.returncode == 0, info.stderr[-2000:]
    assert "region_means" in info.stdout and "(None, 256, 256, 1)" in info.stdout
    run = _augnet_cli(
        "jacobian",
        str(model_path),
        "x.npy",
        "--out",
        "out",
        "--format",
        "npy",
        "--no-contact-sheet",
        "--quiet",
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    files = sorted(glob.glob(str(tmp_path / "out" / "**" / "*.npy"), recursive=True))
    J = np.concatenate([np.load(f) for f in files])
    model = augnet.load_model(model_path)
    np.testing.assert_allclose(J, reference_jacobian(model, x), rtol=1e-5, atol=1e-6)


def test_command_line_savedmodel_is_one_line_and_exit_2(tmp_path, capsys):
    from augnet import _cli

    (tmp_path / "sm").mkdir()
    (tmp_path / "sm" / "saved_model.pb").write_bytes(b"")
    assert _cli.main(["info", str(tmp_path / "sm")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "KERAS_BACKEND=tensorflow" in err[0] and "'jax'" in err[0]


def test_results_of_the_engine_are_numpy_for_every_entry_point(tmp_path):
    model = _mlp(91)
    x = RNG.uniform(-1, 1, size=(3, 4)).astype("float32")
    J = augnet.jacobian(model, x)
    chunks = list(augnet.iter_jacobian(model, x, chunk_size=2, strategy="loop"))
    assert all(isinstance(c.values, np.ndarray) for c in chunks)
    path = augnet.jacobian_to_npy(model, x, tmp_path / "j.npy", strategy="loop")
    np.testing.assert_allclose(np.load(path), J, **F32)
    assert isinstance(to_numpy(augnet.vjp(model, x, np.ones((3, 3), "float32"))), np.ndarray)


def test_a_fetch_polls_a_result_for_a_bounded_time():
    """``to_numpy``/``numpy_view`` poll a result still being computed (``is_ready``) for at most
    ``SPIN_S`` and then block as ``np.asarray`` does: a slow computation is still waited for."""
    from augnet._backend import jax as BJ

    calls = []
    assert BJ.poll(lambda: calls.append(1) or len(calls) >= 3, 10.0) is True
    assert len(calls) == 3  # stops as soon as it is ready
    never = []
    assert BJ.poll(lambda: never.append(1) or False, 0.002) is False  # gives up after 2 ms
    assert len(never) >= 1
    assert 0 < BJ.SPIN_S <= 1e-4  # a bound a long computation hardly notices

    import jax
    import jax.numpy as jnp

    @jax.jit
    def slow(a):  # ~ms: longer than SPIN_S, so the fetch ends up blocking
        return jax.lax.fori_loop(0, 200, lambda i, v: jnp.tanh(v @ v.T @ v / 256.0), a)

    a = jnp.asarray(np.random.default_rng(0).normal(size=(256, 256)).astype("float32"))
    expected = np.asarray(slow(a))
    got = B.to_numpy(slow(a))
    assert got.flags.writeable and got.flags.owndata
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(B.numpy_view(slow(a)), expected)
