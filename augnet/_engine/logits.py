"""``logits=True``: the Jacobian of the scores before the model's final softmax or sigmoid.

A classifier's probabilities saturate: where the softmax is sure, its derivative is tiny, and in
float32 it is exactly zero once the other classes' probabilities underflow (a blank saliency
map). Saliency tools therefore commonly differentiate the pre-activation scores ("logits").
:func:`logits_view` builds, once per model (cached), a Keras model computing them **without
changing the user's model**: no layer, weight or graph node of it is modified, and the view
shares its weights (so it follows ``fit``):

- a final ``Activation("softmax" | "sigmoid")`` layer, ``Softmax`` layer or ``keras.ops.softmax``
  / ``sigmoid`` operation: the view ends at its input;
- a final layer with ``activation="softmax" | "sigmoid"`` (``Dense``, ``Conv2D``, ...): the view
  ends in :class:`PreActivation`, which runs that layer's own ``call`` with its activation read
  as the identity (through a read-only proxy: the layer object itself is not touched);
- a final nested model: the same, inside it.

The view is a functional model over fresh ``keras.Input``\\ s of the same shapes, dtypes and
nesting: ``body`` (a functional model over the user's graph up to the last layer's input,
sharing its layers) followed by the stripped heads.
"""

from __future__ import annotations

import keras
import numpy as np

from augnet._engine.target import cache_for, is_keras_layer, symbolic_io
from augnet._errors import invalid_value
from augnet._structure import DICT, flatten, unflatten

STRIPPED = ("softmax", "sigmoid")  # final activations that logits=True removes


def _activation_name(fn) -> str | None:
    if fn is None:
        return None
    name = getattr(fn, "__name__", None)
    if name is None:
        try:
            name = keras.activations.serialize(fn)
        except Exception:
            return None
    return name if isinstance(name, str) else None


class _WithoutActivation:
    """A read-only stand-in for a layer whose ``activation`` reads as ``None`` (the identity);
    every other attribute is the layer's own."""

    __slots__ = ("_layer",)

    def __init__(self, layer):
        object.__setattr__(self, "_layer", layer)

    def __getattr__(self, name):
        if name == "activation":
            return None
        return getattr(object.__getattribute__(self, "_layer"), name)

    def __setattr__(self, name, value):  # pragma: no cover - a layer's call does not assign
        raise AttributeError(f"augnet's logits view does not change layer attributes ({name})")


class PreActivation(keras.layers.Layer):
    """``layer``'s output before its activation: ``type(layer).call`` run on a stand-in whose
    ``activation`` is the identity (``Dense``, ``Conv*`` and Keras's other layers apply
    ``self.activation`` last). Shares ``layer``'s weights; changes nothing of it."""

    def __init__(self, layer, **kwargs):
        super().__init__(name=f"{layer.name}_logits", dtype=layer.dtype_policy, **kwargs)
        self.inner = layer
        self.built = True

    def call(self, *args, **kwargs):
        return type(self.inner).call(_WithoutActivation(self.inner), *args, **kwargs)

    def compute_output_spec(self, *args, **kwargs):
        return self.inner.compute_output_spec(*args, **kwargs)


def _describe(op) -> str:
    return f"{type(op).__name__} {getattr(op, 'name', '')!r}"


def _no_activation_error(model, problems: list[str]) -> ValueError:
    return ValueError(
        f"logits=True differentiates the scores before the softmax or sigmoid that ends the "
        f"model, but model {model.name!r} {'; '.join(problems)}. Leave logits=False (its "
        "outputs are then the scores already), or build a model whose last layer is "
        "Activation('softmax'/'sigmoid') or has activation='softmax'/'sigmoid'."
    )


def _head(model, tensor):
    """``(input tensor, head)`` of one output: the symbolic tensor the logits are computed from,
    and a callable making the logits from it (``None``: that tensor is the logits), or a string
    saying why the output has no activation to strip."""
    history = getattr(tensor, "_keras_history", None)
    op = getattr(history, "operation", None)
    if op is None:
        return None, None, "has an output that is one of its inputs"
    node = op._inbound_nodes[history.node_index]
    args = list(node.arguments.args)
    kwargs = dict(node.arguments.kwargs)
    first = args[0] if args else None
    others = list(args[1:]) + list(kwargs.values())
    if (
        first is None
        or not hasattr(first, "_keras_history")
        or any(hasattr(t, "_keras_history") for t in keras.tree.flatten(others))
    ):
        return None, None, f"ends in {_describe(op)}, which takes several tensors"
    name = type(op).__name__
    if isinstance(op, keras.layers.Activation):
        act = _activation_name(op.activation)
        if act in STRIPPED:
            return first, None, None
        return None, None, f"ends in {_describe(op)} with activation {act!r}"
    if isinstance(op, keras.layers.Softmax) or (
        not isinstance(op, keras.layers.Layer) and name.lower() in STRIPPED
    ):
        return first, None, None
    if isinstance(op, keras.Model):
        return first, logits_view(op), None
    act = _activation_name(getattr(op, "activation", None))
    if act in STRIPPED:
        return first, PreActivation(op), None
    if hasattr(op, "activation"):
        return None, None, f"ends in {_describe(op)} with activation {act!r}"
    return None, None, f"ends in {_describe(op)}, which is not a softmax or sigmoid"


def _graph_io(model):
    """A model's own symbolic inputs and outputs (nested): a Sequential's ``.input``/``.output``
    are those of its first call, in another model's graph when it is nested."""
    if isinstance(model, keras.Sequential):
        try:
            return model.inputs[0], model.outputs[0]
        except (AttributeError, IndexError, ValueError):
            return None, None
    return symbolic_io(model, "input"), symbolic_io(model, "output")


def _build(model):
    if not is_keras_layer(model):
        raise TypeError(
            f"logits=True needs a Keras model (functional or Sequential) whose last layer is a "
            f"softmax or sigmoid; `fn` is a {type(model).__name__}. Pass a callable that returns "
            "the scores itself instead."
        )
    inputs, outputs = _graph_io(model)
    if outputs is None or inputs is None:
        raise TypeError(
            f"logits=True needs a functional or Sequential model, whose layers it can follow; "
            f"{type(model).__name__} {model.name!r} has no functional graph (a subclassed model). "
            "Differentiate a model (or callable) that returns the scores before the activation."
        )
    out_leaves, out_structure = flatten(outputs, "model.output")
    if out_structure.kind != DICT and len(out_leaves) == 1:
        out_structure = None  # one output: the view returns it alone, as the model does
    heads, problems = [], []
    for t in out_leaves:
        source, head, problem = _head(model, t)
        if problem is not None:
            problems.append(problem)
        heads.append((source, head))
    if problems:
        raise _no_activation_error(model, problems)
    body = keras.Model(inputs, [source for source, _ in heads], name=f"{model.name}_body")
    fresh = keras.tree.map_structure(
        lambda t: keras.Input(shape=t.shape[1:], dtype=t.dtype, name=getattr(t, "name", None)),
        inputs,
    )
    features = body(fresh)
    if not isinstance(features, list | tuple):
        features = [features]
    logits = [f if head is None else head(f) for f, (_, head) in zip(features, heads)]
    result = logits[0] if out_structure is None else unflatten(logits, out_structure)
    return keras.Model(fresh, result, name=f"{model.name}_logits")


def logits_view(model):
    """A Keras model computing ``model``'s scores before its final softmax/sigmoid, sharing its
    weights (see the module docstring); built once per model.

    Raises:
        TypeError: ``model`` is not a functional or Sequential Keras model.
        ValueError: an output of ``model`` does not end in a softmax or sigmoid (the message
            names the layer).
    """
    cache = cache_for(model)
    view = cache.get("logits_view")
    if view is None:
        view = cache["logits_view"] = _build(model)
    return view


def maybe_logits(fn, logits):
    """``fn`` itself, or (``logits=True``) its :func:`logits_view`."""
    if not isinstance(logits, bool | np.bool_):
        raise TypeError(invalid_value("logits", logits, "True or False"))
    return logits_view(fn) if logits else fn
