"""What is particular to augnet on PyTorch (``KERAS_BACKEND=torch``): eval semantics, gradient
paths through round/floor/sign, captured graphs (weights as arguments, no retrace, the layout
pass), float64, devices, and the features a torch user reaches (fit/save/load, backward models,
SavedModel directories, the command line, files shared with TensorFlow).

Run by tests/test_backends.py in its torch subprocess; skipped on the other backends.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from conftest import TOL, backend, predict, reference_jacobian

import augnet

pytestmark = pytest.mark.skipif(backend() != "torch", reason="augnet's torch backend")

if backend() == "torch":
    import torch

    from augnet import _backend as B
    from augnet._backend import _torch_graph as G
    from augnet._backend.torch import CompiledFunction
    from augnet._engine.target import cache_for

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "augnet" / "data" / "region_cnn.keras"
F32 = TOL["float32"]
L = keras.layers
RNG = np.random.default_rng(70)


def _compiled(model) -> list:
    return [f for f in cache_for(model).values() if isinstance(f, CompiledFunction)]


def _mlp(name="mlp", units=5):
    keras.utils.set_random_seed(71)
    return keras.Sequential(
        [keras.Input((4,)), L.Dense(units, activation="tanh"), L.Dense(3)], name=name
    )


def _env(name: str) -> dict:
    env = {**os.environ, "KERAS_BACKEND": name, "TF_CPP_MIN_LOG_LEVEL": "3"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("AUGNET_TEST_BACKEND_SUBRUN", None)
    return env


# --------------------------------------------------------------------------------------------------
# Eval semantics
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bn_dropout():
    keras.utils.set_random_seed(72)
    model = keras.Sequential(
        [
            keras.Input((4,)),
            L.Dense(6),
            L.BatchNormalization(),
            L.Activation("tanh"),
            L.Dropout(0.5),
            L.Dense(3),
        ]
    )
    bn = model.layers[1]
    bn.moving_mean.assign(RNG.normal(size=6))
    bn.moving_variance.assign(RNG.uniform(0.5, 2.0, size=6))
    return model


def test_inference_jacobian_records_nothing_and_changes_nothing(bn_dropout):
    x = RNG.uniform(-1, 1, (5, 4)).astype("float32")
    before = [np.array(v.numpy()) for v in bn_dropout.variables]
    rng = torch.get_rng_state()
    grad_mode = torch.is_grad_enabled()
    for strategy in ("loop", "pfor", "forward"):
        J = augnet.jacobian(bn_dropout, x, strategy=strategy)
        np.testing.assert_allclose(J, reference_jacobian(bn_dropout, x), **F32)
    assert torch.is_grad_enabled() == grad_mode
    assert torch.equal(torch.get_rng_state(), rng)  # no dropout mask drawn
    assert all(p.grad is None for p in bn_dropout.parameters())  # nothing accumulated
    for v, b in zip(bn_dropout.variables, before):
        np.testing.assert_array_equal(v.numpy(), b, err_msg=v.path)


def test_training_true_runs_statelessly_on_a_fork_of_the_random_state(bn_dropout):
    """Keras on torch draws an unseeded Dropout's mask from torch's global generator: augnet
    computes on a copy of it, so training-mode Jacobians repeat and the generator does not move;
    BatchNorm's statistics are not assigned."""
    x = RNG.uniform(-1, 1, (5, 4)).astype("float32")
    before = [np.array(v.numpy()) for v in bn_dropout.variables]
    rng = torch.get_rng_state()
    first = augnet.jacobian(bn_dropout, x, training=True, strategy="loop")
    second = augnet.jacobian(bn_dropout, x, training=True, strategy="loop")
    assert torch.equal(torch.get_rng_state(), rng)
    np.testing.assert_array_equal(first, second)
    inference = augnet.jacobian(bn_dropout, x, strategy="loop")
    assert not np.allclose(first, inference)  # batch statistics and a dropout mask applied
    for v, b in zip(bn_dropout.variables, before):
        np.testing.assert_array_equal(v.numpy(), b, err_msg=v.path)
    # The same mask as the model's own training-mode call from that random state.
    with torch.random.fork_rng():
        reference = augnet.jacobian(bn_dropout, x, training=True, strategy="pfor")
    np.testing.assert_allclose(reference, first, **F32)


# --------------------------------------------------------------------------------------------------
# Gradient paths: round/floor/sign have a grad_fn on torch, with a zero derivative
# --------------------------------------------------------------------------------------------------


class _Op(L.Layer):
    def __init__(self, op, **kwargs):
        super().__init__(**kwargs)
        self.op = op

    def call(self, x):
        return getattr(keras.ops, self.op)(x)


@pytest.mark.parametrize("op", ["round", "floor", "ceil", "sign", "trunc"])
def test_zero_derivative_ops_cut_the_gradient_path(op):
    keras.utils.set_random_seed(73)
    model = keras.Sequential([keras.Input((3,)), L.Dense(4), _Op(op, name="cut"), L.Dense(2)])
    x = RNG.uniform(-2, 2, (2, 3)).astype("float32")
    with pytest.raises(augnet.GradientPathError, match=r"'cut'"):
        augnet.jacobian(model, x)
    # A straight-through rule makes it a path again: J = W2ᵀ W1ᵀ.
    J = augnet.jacobian(model, x, derivatives={_Op: 1.0}, strategy="loop")
    w1, w2 = model.layers[0].kernel.numpy(), model.layers[2].kernel.numpy()
    np.testing.assert_allclose(J, np.broadcast_to((w1 @ w2).T, (2, 2, 3)), **F32)


def test_connected_outputs_walks_the_autograd_graph():
    x = B.convert(np.array([[0.0, 1.5, -2.0]]), "float32")

    def f(ts):
        v = ts[0]
        return [
            v,  # the input itself (an identity layer): a path
            keras.ops.relu(v) * 0.0,  # a zero derivative, but a path
            keras.ops.round(v) + keras.ops.floor(v),  # cut on both branches
            keras.ops.round(v) + v,  # one branch cut, one not
            keras.ops.abs(keras.ops.sign(v)),
            keras.ops.cast(keras.ops.cast(v, "int32"), "float32"),
        ]

    _, flags = B.connected_outputs(f, [x])
    assert flags == [True, True, False, True, False, False]


def test_graph_walk_holds_the_node_objects_it_has_seen():
    """torch (2.11 here) makes a new Python object for a graph node each time one is asked for,
    and frees it when it is dropped; a new object can then take a freed one's id. The walk must
    not take a node for one it has already seen (it did: every Dense layer of a model looked cut).
    Nodes that are new objects on every access, and are freed as soon as they are dropped, stand
    for that here."""
    from augnet._backend import torch as BT

    class Node:
        def __init__(self, kind, children=(), variable=None):
            self.kind, self.children, self.variable = kind, children, variable

    class View:  # a fresh object for each node on every access, as torch's are
        def __init__(self, node):
            self.node, self.variable = node, node.variable

        @property
        def next_functions(self):
            return tuple((view(c), 0) for c in self.node.children)

    kinds: dict = {}

    def view(node):
        if node.kind not in kinds:
            kinds[node.kind] = type(node.kind, (View,), {})
        return kinds[node.kind](node)

    x, w = object(), object()
    for width in (1, 2, 5, 20):
        # out <- add(branch_1 ... branch_width, each a chain to w) + mm(a chain to x, w)
        chains = [Node("AccumulateGrad", variable=w) for _ in range(width)]
        for depth in range(3):
            chains = [Node(f"Mul{depth}Backward0", (c,)) for c in chains]
        to_x = Node("AccumulateGrad", variable=x)
        for depth in range(3):
            to_x = Node(f"Tanh{depth}Backward0", (to_x,))
        mm = Node("MmBackward0", (to_x, chains[0]))
        out = Node("AddBackward0", (*chains, mm))
        assert BT._reaches(view(out), {id(x)}), width
        assert not BT._reaches(view(out), {id(object())}), width
        cut = Node("AddBackward0", (*chains, Node("RoundBackward0", (mm,))))
        assert not BT._reaches(view(cut), {id(x)}), width


# --------------------------------------------------------------------------------------------------
# Captured graphs
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["loop", "pfor", "forward"])
def test_blocks_run_as_captured_graphs_for_every_batch_size(strategy):
    model = _mlp(f"captured_{strategy}")
    x = RNG.uniform(-1, 1, (6, 4)).astype("float32")
    augnet.jacobian(model, x, strategy=strategy)
    traced = augnet._engine.trace_count(model)
    for b in (6, 1, 3, 2):
        np.testing.assert_allclose(
            augnet.jacobian(model, x[:b], strategy=strategy),
            reference_jacobian(model, x[:b]),
            **F32,
        )
    assert augnet._engine.trace_count(model) == traced
    (compiled,) = _compiled(model)
    assert not compiled.eager and len(compiled.variants) == 1


def test_captured_graph_takes_the_weights_as_arguments():
    """Weights assigned after capture (set_weights, fit, a frozen layer) are seen; nothing is
    captured again."""
    model = _mlp("weights_as_arguments")
    model.compile(optimizer="sgd", loss="mse")
    x = RNG.uniform(-1, 1, (8, 4)).astype("float32")
    augnet.jacobian(model, x, strategy="loop")
    traced = augnet._engine.trace_count(model)
    model.layers[1].kernel.assign(-model.layers[1].kernel.numpy())
    np.testing.assert_allclose(
        augnet.jacobian(model, x, strategy="loop"), reference_jacobian(model, x), **F32
    )
    model.fit(x, RNG.normal(size=(8, 3)).astype("float32"), epochs=2, verbose=0)
    model.layers[0].trainable = False  # the state is all variables: its layout does not change
    np.testing.assert_allclose(
        augnet.jacobian(model, x, strategy="loop"), reference_jacobian(model, x), **F32
    )
    assert augnet._engine.trace_count(model) == traced


def test_layout_pass_cancels_keras_transposes_and_keeps_values():
    """Keras computes images channels-last and transposes around every convolution and pooling:
    the layout pass moves those transposes through the pointwise operations until they cancel."""
    keras.utils.set_random_seed(74)
    model = keras.Sequential(
        [
            keras.Input((12, 12, 2)),
            L.Conv2D(4, 3, padding="same", activation="relu"),
            L.MaxPooling2D(2),
            L.BatchNormalization(),
            L.Conv2D(3, 3, strides=2, activation="tanh"),
            L.Flatten(),
            L.Dense(2),
        ]
    )
    x = RNG.uniform(-1, 1, (3, 12, 12, 2)).astype("float32")
    J = augnet.jacobian(model, x, strategy="loop")
    np.testing.assert_allclose(J, reference_jacobian(model, x), **F32)
    (compiled,) = _compiled(model)
    optimized = compiled.variants[0].gm

    def count(gm, op):
        return sum(n.target is op for n in gm.graph.nodes)

    aten = torch.ops.aten

    # The same block captured without the pass, run on the same arguments.
    state = B.model_state(model)
    plain = G.optimize  # capture again, keeping the graph as traced
    try:
        G.optimize = lambda gm: _plain(gm)
        fresh = augnet._backend.compile_function(compiled.fn, _signature(compiled))
        fresh(state, [B.convert(x, "float32")], B.convert(np.tile([0, 1], (3, 1)), "int32"))
    finally:
        G.optimize = plain
    unoptimized = fresh.variants[0].gm
    # Keras's copies into memory formats are gone, and the transposes between layers with them.
    assert count(unoptimized, aten.clone.default) >= 4
    assert count(optimized, aten.clone.default) == 0
    assert count(optimized, aten.permute.default) < count(unoptimized, aten.permute.default)
    args = [*state, B.convert(x, "float32"), B.convert(np.tile([0, 1], (3, 1)), "int32")]
    with torch.no_grad():
        for a, b in zip(optimized(*args), unoptimized(*args)):
            np.testing.assert_allclose(B.to_numpy(a), B.to_numpy(b), rtol=1e-5, atol=1e-6)


def _plain(gm):
    gm.graph._codegen = torch.fx.graph.CodeGen()
    gm.recompile()
    return gm


def _signature(compiled):
    return torch.utils._pytree.tree_unflatten(list(compiled.specs), compiled.in_spec)


# --------------------------------------------------------------------------------------------------
# float64
# --------------------------------------------------------------------------------------------------


def test_float64_is_computed_in_float64_and_keras_is_left_as_it_was():
    """Keras 3.15 on torch computes keras.ops.matmul of float64 tensors in float32; augnet computes
    a float64 model in float64 (the Jacobian of a Dense layer is its kernel, to the last bit) and
    leaves Keras's promotion as it found it."""
    a = torch.ones((2, 3), dtype=torch.float64)
    keras_matmul = keras.ops.matmul(a, a.T).dtype
    keras.utils.set_random_seed(75)
    dense = L.Dense(3, dtype="float64")
    model = keras.Sequential(
        [keras.Input((4,), dtype="float64"), dense, L.Dense(2, dtype="float64")]
    )
    x = RNG.normal(size=(3, 4))
    for strategy in ("loop", "pfor", "forward"):
        J = augnet.jacobian(model, x, strategy=strategy)
        assert J.dtype == np.float64
        expected = (dense.kernel.numpy() @ model.layers[1].kernel.numpy()).T
        np.testing.assert_allclose(J, np.broadcast_to(expected, J.shape), rtol=1e-14, atol=1e-15)
    assert keras.ops.matmul(a, a.T).dtype == keras_matmul
    from keras.src.backend.common import dtypes

    assert dtypes.BIT64_TO_BIT32_DTYPE["float64"] == "float32"  # Keras 3.15 off TensorFlow


# --------------------------------------------------------------------------------------------------
# Devices and conversion
# --------------------------------------------------------------------------------------------------


def test_tensors_on_keras_device_and_numpy_results():
    from keras.src.backend.torch.core import get_device

    assert B.devices()[0] == "CPU:0"
    if torch.cuda.is_available():
        assert any(d.startswith("CUDA:") for d in B.devices())
    t = B.convert(np.ones((2, 3)), "float32")
    assert t.device.type == torch.device(get_device()).type
    model = _mlp("numpy_results")
    for x in (np.ones((2, 4), "float32"), torch.ones(2, 4)):
        J = augnet.jacobian(model, x)
        assert isinstance(J, np.ndarray) and J.shape == (2, 3, 4)
    assert isinstance(augnet.vjp(model, np.ones((2, 4), "float32"), np.ones((2, 3))), np.ndarray)


# --------------------------------------------------------------------------------------------------
# Models: fit, save, load, wrap; backward models; SavedModel directories
# --------------------------------------------------------------------------------------------------


def test_augnet_fit_save_load_and_wrap(tmp_path):
    keras.utils.set_random_seed(76)
    inputs = keras.Input((4,))
    net = augnet.AugNet(inputs=inputs, outputs=L.Dense(2)(L.Dense(5, activation="tanh")(inputs)))
    net.compile(optimizer="adam", loss="mse")
    x = RNG.uniform(-1, 1, (16, 4)).astype("float32")
    net.fit(x, RNG.normal(size=(16, 2)).astype("float32"), epochs=2, verbose=0)
    J = net.return_jacobian(x[:3])
    np.testing.assert_allclose(J, reference_jacobian(net, x[:3]), **F32)
    path = tmp_path / "net.keras"
    net.save(path)
    loaded = augnet.load_model(path)
    np.testing.assert_allclose(loaded.return_jacobian(x[:3]), J, **F32)
    top = loaded.return_jacobian(x[:3], top_k=1)
    np.testing.assert_allclose(top.values[:, 0], predict(loaded, x[:3]).max(axis=1), **F32)
    wrapped = augnet.wrap(keras.models.load_model(path))
    np.testing.assert_allclose(wrapped.return_jacobian(x[:3]), J, **F32)


def test_backward_model_export_off_tensorflow_says_what_to_do(tmp_path):
    model = _mlp("exported")
    bm = augnet.backward_model(model, gradient=np.ones(3))
    bm.summary(print_fn=lambda *a, **k: None)
    with pytest.raises(RuntimeError, match=r"'torch' backend.*KERAS_BACKEND=tensorflow") as err:
        bm.export(str(tmp_path / "served"))
    assert "Traceback" not in str(err.value)


def test_savedmodel_directory_is_a_clear_error_on_torch(tmp_path, capsys):
    saved = tmp_path / "saved"
    saved.mkdir()
    (saved / "saved_model.pb").write_bytes(b"")
    with pytest.raises(ValueError, match=r"SavedModel.*'torch' here.*\.keras"):
        augnet.load_model(saved)
    from augnet import _cli

    assert _cli.main(["info", str(saved)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'torch' here" in err[0] and "Traceback" not in err[0]


# --------------------------------------------------------------------------------------------------
# The command line, and files shared with TensorFlow (subprocesses)
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_command_line_on_torch(tmp_path):
    """``augnet info`` and ``augnet jacobian`` on the shipped model under KERAS_BACKEND=torch; the
    raw Jacobians it writes are augnet's in-process ones."""
    x = RNG.uniform(0, 1, (2, 256, 256, 1)).astype("float32")
    np.save(tmp_path / "x.npy", x)
    cmd = [sys.executable, "-m", "augnet"]
    info = subprocess.run(
        [*cmd, "info", str(SHIPPED)], env=_env("torch"), capture_output=True, text=True, timeout=300
    )
    assert info.returncode == 0, info.stderr
    assert "backend: Keras on torch" in info.stdout
    assert "differentiable with respect to the input: yes" in info.stdout
    out = tmp_path / "out"
    run = subprocess.run(
        [*cmd, "jacobian", str(SHIPPED), str(tmp_path / "x.npy"), "--out", str(out)]
        + ["--format", "png,npy"],
        env=_env("torch"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr
    batch = json.loads((out / "batches" / "000000.json").read_text())
    raw = np.load(out / batch["shard"])
    J = augnet.jacobian(augnet.load_model(SHIPPED), x)
    np.testing.assert_allclose(raw.reshape(J.shape), J, **F32)
    assert len(list((out / "x_0").glob("*.png"))) >= 13


@pytest.mark.slow
def test_files_saved_on_torch_work_on_tensorflow(tmp_path):
    """A model trained and saved on torch, and its backward model, load under TensorFlow with
    the same Jacobian; there the backward model exports as a SavedModel (the way out that the
    torch export error names). The shipped model (saved on TensorFlow) gives the same Jacobian
    on both."""
    if not _have("tensorflow"):
        pytest.skip("TensorFlow is not installed")
    keras.utils.set_random_seed(77)
    inputs = keras.Input((4,))
    net = augnet.AugNet(inputs=inputs, outputs=L.Dense(2)(L.Dense(5, activation="tanh")(inputs)))
    net.compile(optimizer="adam", loss="mse")
    x = RNG.uniform(-1, 1, (4, 4)).astype("float32")
    net.fit(x, RNG.normal(size=(4, 2)).astype("float32"), epochs=1, verbose=0)
    net.save(tmp_path / "net.keras")
    bm = augnet.backward_model(net, gradient=np.array([1.0, -2.0]))
    bm.save(tmp_path / "bm.keras")
    np.save(tmp_path / "x.npy", x)
    xs = RNG.uniform(0, 1, (1, 256, 256, 1)).astype("float32")
    np.save(tmp_path / "xs.npy", xs)
    script = f"""
import numpy as np, keras, tensorflow as tf, augnet
d = {str(tmp_path)!r}
x, xs = np.load(d + "/x.npy"), np.load(d + "/xs.npy")
np.save(d + "/J_tf.npy", augnet.load_model(d + "/net.keras").return_jacobian(x))
np.save(d + "/Js_tf.npy", augnet.load_model({str(SHIPPED)!r}).return_jacobian(xs))
bm = augnet.load_model(d + "/bm.keras")
bm.export(d + "/served", verbose=False)
served = tf.saved_model.load(d + "/served")
np.save(d + "/g_tf.npy", served.serve(tf.constant(x)).numpy())
"""
    proc = subprocess.run(
        [sys.executable, "-c", script],
        env=_env("tensorflow"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    J = net.return_jacobian(x)
    np.testing.assert_allclose(np.load(tmp_path / "J_tf.npy"), J, **F32)
    np.testing.assert_allclose(np.load(tmp_path / "g_tf.npy"), B.to_numpy(bm(x)), **F32)
    Js = augnet.load_model(SHIPPED).return_jacobian(xs)
    np.testing.assert_allclose(np.load(tmp_path / "Js_tf.npy"), Js, rtol=1e-4, atol=1e-6)


def _have(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def test_called_inside_no_grad_and_inference_mode():
    """A caller's ``torch.no_grad()`` or ``torch.inference_mode()`` neither breaks the Jacobian nor
    leaks out of it (the captured graph and the eager paths alike)."""
    model = _mlp("inside_inference_mode")
    x = RNG.uniform(-1, 1, (3, 4)).astype("float32")
    reference = reference_jacobian(model, x)
    for context in (torch.no_grad, torch.inference_mode):
        with context():
            for strategy in ("loop", "forward"):
                np.testing.assert_allclose(
                    augnet.jacobian(model, torch.as_tensor(x), strategy=strategy), reference, **F32
                )
            g = augnet.vjp(model, x, np.ones((3, 3), "float32"))
            assert not torch.is_grad_enabled()
        np.testing.assert_allclose(g, reference.sum(axis=1), **F32)
    model2 = _mlp("first_call_inside_inference_mode")  # the same weights (the same seed)
    with torch.inference_mode():  # the capture itself inside inference mode
        np.testing.assert_allclose(augnet.jacobian(model2, x), reference, **F32)
