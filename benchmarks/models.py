"""The benchmark's cases: deterministic, seeded float32 Keras networks and their inputs.

``CASES`` is plain data (no TensorFlow import), so child processes that run JAX or torch can read
it. The builders import Keras lazily. ``export_spec`` walks a built functional model and writes the
layer graph and weights in a framework-free form that ``benchmarks/ports.py`` turns into identical
pure-JAX and pure-torch networks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Case:
    name: str
    builder: str  # a function name in this module
    input_shape: tuple[int, ...]  # one sample
    batch: int
    seed: int = 0
    input_kind: str = "normal"  # "normal", "unit" ([0, 1)) or "sym" ([-1, 1))
    select: str | None = None  # None: every output; "top5": the 5 largest classes of sample 0
    streaming_only: bool = False  # only augnet.jacobian_to_npy (the full MobileNetV2 Jacobian)
    notes: str = ""
    tags: tuple[str, ...] = field(default_factory=tuple)


CASES: dict[str, Case] = {
    c.name: c
    for c in [
        Case("mlp", "build_mlp", (4,), 64, seed=1, notes="MLP 4-64-32-16-2 tanh"),
        Case(
            "cnn_b1",
            "build_cnn",
            (256, 256, 1),
            1,
            seed=2,
            input_kind="unit",
            notes="CNN 256x256x1 -> 13",
        ),
        Case(
            "cnn_b8",
            "build_cnn",
            (256, 256, 1),
            8,
            seed=2,
            input_kind="unit",
            notes="CNN 256x256x1 -> 13",
        ),
        Case(
            "cnn_b32",
            "build_cnn",
            (256, 256, 1),
            32,
            seed=2,
            input_kind="unit",
            notes="CNN 256x256x1 -> 13",
        ),
        Case(
            "mobilenet_top5",
            "build_mobilenet",
            (224, 224, 3),
            8,
            seed=3,
            input_kind="sym",
            select="top5",
            notes="MobileNetV2(weights=None) 224x224x3, 5 classes",
        ),
        Case(
            "mobilenet_all",
            "build_mobilenet",
            (224, 224, 3),
            32,
            seed=3,
            input_kind="sym",
            streaming_only=True,
            notes="MobileNetV2, all 1000 classes, streamed to .npy",
        ),
        Case("lstm", "build_lstm", (32, 8), 8, seed=4, notes="LSTM seq 32x8 -> LSTM(32) -> 4"),
        Case("tall", "build_tall", (8,), 8, seed=5, notes="MLP 8-256-4096 tanh (tall)"),
    ]
}

DEFAULT_CASES = ["mlp", "cnn_b1", "cnn_b8", "cnn_b32", "mobilenet_top5", "lstm", "tall"]
QUICK_CASES = ["mlp", "cnn_b1", "lstm", "tall"]


def make_input(case: Case) -> np.ndarray:
    """The case's input batch, float32, the same in every process."""
    rng = np.random.default_rng(1000 + case.seed)
    shape = (case.batch, *case.input_shape)
    if case.input_kind == "unit":
        x = rng.random(shape)
    elif case.input_kind == "sym":
        x = rng.uniform(-1.0, 1.0, shape)
    else:
        x = rng.standard_normal(shape)
    return x.astype(np.float32)


# --------------------------------------------------------------------------------------------
# Keras builders (functional API, so export_spec can walk the graph)


def build_model(case: Case, weights_file=None):
    """The case's network. With ``weights_file`` (an ``.npz`` that ``save_weights`` wrote) the
    weights come from there, which skips data-dependent set-up such as MobileNetV2's BatchNorm
    calibration."""
    import keras

    keras.utils.set_random_seed(case.seed)
    if weights_file is not None:
        model = globals()[case.builder](calibrate=False)
        with np.load(weights_file) as z:  # cast: the model may be built in another floatx
            model.set_weights(
                [np.asarray(z[f"w{i}"], dtype=w.dtype) for i, w in enumerate(model.weights)]
            )
        return model
    return globals()[case.builder]()


def save_weights(model, path) -> None:
    np.savez(path, **{f"w{i}": a for i, a in enumerate(model.get_weights())})


def build_mlp(calibrate=True):
    import keras
    from keras import layers

    x = keras.Input((4,))
    h = layers.Dense(64, activation="tanh")(x)
    h = layers.Dense(32, activation="tanh")(h)
    h = layers.Dense(16, activation="tanh")(h)
    y = layers.Dense(2)(h)
    return keras.Model(x, y, name="mlp")


def build_cnn(calibrate=True):
    """256x256x1 -> 13: 'same' and 'valid' strided convolutions, max pooling, NHWC flatten."""
    import keras
    from keras import layers

    x = keras.Input((256, 256, 1))
    h = layers.Conv2D(8, 3, strides=2, padding="same", activation="relu")(x)  # 128x128x8
    h = layers.MaxPooling2D(2)(h)  # 64x64x8
    h = layers.Conv2D(16, 3, strides=2, padding="valid", activation="relu")(h)  # 31x31x16
    h = layers.MaxPooling2D(2)(h)  # 15x15x16
    h = layers.Flatten()(h)  # 3600, NHWC order
    h = layers.Dense(32, activation="relu")(h)
    y = layers.Dense(13)(h)
    return keras.Model(x, y, name="cnn")


def build_mobilenet(calibrate=True):
    """MobileNetV2(weights=None), its BatchNorm statistics set from a batch of inputs.

    With random weights and the initial statistics (mean 0, variance 1) activations shrink block
    after block: the logits are ~1e-11 and the softmax's Jacobian ~1e-17, so small that backward
    products fall below float32's normal range and XLA's flush-to-zero makes 2% differences. With
    each BatchNorm's moving mean and variance set to its input's statistics (one pass over a
    calibration batch, like a trained network's), activations stay at unit scale.
    """
    import keras

    model = keras.applications.MobileNetV2(weights=None, input_shape=(224, 224, 3))
    if not calibrate:
        return model
    rng = np.random.default_rng(99)
    calibrate_batchnorm(model, rng.uniform(-1.0, 1.0, (8, 224, 224, 3)).astype(np.float32))
    return model


def calibrate_batchnorm(model, x: np.ndarray) -> None:
    """Run ``x`` through the functional ``model`` layer by layer, setting every BatchNormalization
    layer's moving mean and variance to the statistics of its input (inference mode after that)."""
    from keras import ops

    values = {id(model.inputs[0]): ops.convert_to_tensor(x)}
    for depth in sorted(model._nodes_by_depth, reverse=True):
        for node in model._nodes_by_depth[depth]:
            layer = node.operation
            if type(layer).__name__ == "InputLayer":
                continue
            args, kwargs = node.arguments.fill_in(values)
            if type(layer).__name__ == "BatchNormalization":
                inp = args[0]
                axes = tuple(range(len(inp.shape) - 1))
                layer.moving_mean.assign(ops.mean(inp, axis=axes))
                layer.moving_variance.assign(ops.var(inp, axis=axes))
            out = layer(*args, **{**kwargs, "training": False} if "training" in kwargs else kwargs)
            for t, v in zip(
                node.output_tensors,
                [out] if not isinstance(out, (list, tuple)) else out,
                strict=True,
            ):
                values[id(t)] = v


def build_lstm(calibrate=True):
    import keras
    from keras import layers

    x = keras.Input((32, 8))
    h = layers.LSTM(32)(x)
    y = layers.Dense(4)(h)
    return keras.Model(x, y, name="lstm")


def build_tall(calibrate=True):
    import keras
    from keras import layers

    x = keras.Input((8,))
    h = layers.Dense(256, activation="tanh")(x)
    y = layers.Dense(4096, activation="tanh")(h)
    return keras.Model(x, y, name="tall")


# --------------------------------------------------------------------------------------------
# Export for the JAX / torch ports

_CONFIG_KEYS = {
    "Dense": ("activation", "use_bias"),
    "Conv2D": ("activation", "use_bias", "strides", "padding", "dilation_rate", "groups"),
    "DepthwiseConv2D": (
        "activation",
        "use_bias",
        "strides",
        "padding",
        "depth_multiplier",
        "dilation_rate",
    ),
    "BatchNormalization": ("axis", "epsilon", "center", "scale"),
    "ReLU": ("max_value", "negative_slope", "threshold"),
    "Activation": ("activation",),
    "MaxPooling2D": ("pool_size", "strides", "padding"),
    "AveragePooling2D": ("pool_size", "strides", "padding"),
    "GlobalAveragePooling2D": ("keepdims",),
    "ZeroPadding2D": ("padding",),
    "Flatten": (),
    "Add": (),
    "Dropout": (),
    "LSTM": (
        "units",
        "activation",
        "recurrent_activation",
        "use_bias",
        "return_sequences",
        "go_backwards",
        "unit_forget_bias",
    ),
}


def _key(tensor) -> str:
    op, node_index, tensor_index = tensor._keras_history
    return f"{op.name}:{node_index}:{tensor_index}"


def export_spec(model) -> tuple[dict, dict[str, np.ndarray]]:
    """The layer graph of a built functional Keras model and its weights, framework-free.

    Returns ``(spec, weights)``: ``spec = {"input": key, "output": key, "nodes": [...]}`` with each
    node ``{"type", "name", "inputs": [keys], "output": key, "config": {...}}`` in topological
    order; ``weights["<layer>/<i>"]`` are the layer's weights in Keras's order and layout.
    Raises ``NotImplementedError`` for a layer the ports do not know.
    """
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise NotImplementedError("export_spec handles one input and one output")
    nodes, weights = [], {}
    for depth in sorted(model._nodes_by_depth, reverse=True):
        for node in model._nodes_by_depth[depth]:
            layer = node.operation
            kind = type(layer).__name__
            if kind == "InputLayer":
                continue
            if kind not in _CONFIG_KEYS:
                raise NotImplementedError(f"no JAX/torch port for layer type {kind} ({layer.name})")
            cfg = layer.get_config()
            if cfg.get("data_format", "channels_last") != "channels_last":
                raise NotImplementedError(f"{layer.name}: only channels_last is ported")
            config = {k: cfg[k] for k in _CONFIG_KEYS[kind] if k in cfg}
            for k, v in list(config.items()):
                if isinstance(v, tuple):
                    config[k] = [list(e) if isinstance(e, tuple) else e for e in v]
            if len(node.output_tensors) != 1:
                raise NotImplementedError(f"{layer.name}: several outputs")
            nodes.append(
                {
                    "type": kind,
                    "name": layer.name,
                    "inputs": [_key(t) for t in node.input_tensors],
                    "output": _key(node.output_tensors[0]),
                    "config": config,
                }
            )
            for i, w in enumerate(layer.weights):
                weights[f"{layer.name}/{i}"] = np.asarray(w.numpy())
    spec = {"input": _key(model.inputs[0]), "output": _key(model.outputs[0]), "nodes": nodes}
    return spec, weights


def activation_elements(model) -> int:
    """Elements of every layer output for one sample (a rough size of what reverse mode keeps)."""
    total = 0
    for layer in model.layers:
        for t in getattr(layer, "_inbound_nodes", [])[:1]:
            for out in t.output_tensors:
                total += int(np.prod([d for d in out.shape[1:] if d is not None]))
    return total
