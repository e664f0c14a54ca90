"""Sensitivity to a layer: the Jacobian of the outputs with respect to an intermediate activation
(``augnet.jacobian(model, x, wrt="layer_name")``).

The activation ``a`` of layer ``wrt`` is treated as a free variable and everything else (skip
connections from earlier layers included) as fixed: :func:`prepare` records ``a`` with one forward
pass, then builds ``g([a, *x]) -> outputs``, the model with that layer's output replaced by ``a``
and ``x`` cut from the gradient. The engine computes ``g``'s Jacobian like any other, and
``finish`` keeps the blocks with respect to ``a``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from augnet import _backend as B
from augnet import _derivatives as D
from augnet._engine import rules
from augnet._engine.checks import check_x_kind
from augnet._engine.results import TopKJacobian
from augnet._engine.target import cache_for, floatx, symbolic_io
from augnet._errors import invalid_value
from augnet._structure import flatten, unflatten


def _is_input_layer(layer) -> bool:
    return type(layer).__name__ == "InputLayer"


def find_layer(model, name: str):
    """The top-level layer of ``model`` called ``name``, or a clear error listing the names."""
    import keras

    if not isinstance(model, keras.Model):
        raise TypeError(
            f"`model` must be a keras.Model; received an object of type {type(model).__name__}."
        )
    if not isinstance(name, str):
        raise TypeError(invalid_value("wrt", name, "a layer name (str)"))
    for layer in model.layers:
        if layer.name == name:
            return layer
    names = [layer.name for layer in model.layers if not _is_input_layer(layer)]
    raise ValueError(
        f"Model {model.name!r} has no layer named {name!r}; its layers are {names}. Pass one of "
        "those names (nested models' layers: pass the nested model's own name)."
    )


def record_activation(model, layer, x, training: bool):
    """Runs ``model`` on ``x`` once (without side effects) and returns ``layer``'s output."""
    seen = []
    original = layer.call

    def recording(*args, **kwargs):
        y = original(*args, **kwargs)
        seen.append(y)
        return y

    with rules.patched({layer: recording}):
        B.call_model(model, B.model_state(model), x, training)
    if len(seen) != 1 or not B.is_float_tensor(seen[0]):
        raise ValueError(
            f"Layer {layer.name!r} ran {len(seen)} time(s) in one forward pass or returned "
            "something other than one floating tensor; `wrt` needs a layer called once with one "
            "floating output."
        )
    return seen[0]


def _dtype_of(a):
    return getattr(a, "dtype", np.asarray(a).dtype)


def remainder(model, layer, x_structure, dtype, training: bool, derivatives):
    """``g([a, *x]) -> outputs``: ``model`` with ``layer``'s output replaced by ``a`` (``x`` cut
    from the gradient), derivative rules applied inside.

    Built once per model, layer, input nesting, activation dtype, mode and registry of rules
    (kept in the engine's cache for ``model``), so that the compiled functions the engine caches
    for ``g`` are found again on the next call: a new ``g`` per call traced everything anew
    (2.4-3.2 s per call on MobileNetV2). Per-call ``derivatives`` get a fresh one, as they do
    everywhere in the engine.
    """
    key = None
    if derivatives is None:
        key = (
            "wrt",
            layer.name,
            id(layer),
            x_structure,
            B.dtype_name(dtype),
            training,
            D.registry_key(),
        )
        g = cache_for(model).get(key)
        if g is not None:
            return g

    def g(inputs):
        a_t, *xs = inputs
        xs = [B.stop_gradient(t) for t in xs]

        def replaced(*args, **kwargs):
            return B.convert(a_t, dtype)

        with rules.apply_rules(model, derivatives):
            with rules.patched({layer: replaced}):
                state = B.model_state(model)
                return B.call_model(model, state, unflatten(xs, x_structure), training)

    if key is not None:
        cache_for(model)[key] = g
    return g


def prepare(model, x, wrt: str, *, training: bool = False, derivatives=None, source=None):
    """``(g, inputs, finish)``: ``g`` maps ``[a, *x]`` to the model's outputs, ``inputs`` is
    ``[a, *x]`` at the caller's ``x``, and ``finish(J)`` takes ``g``'s Jacobian to the Jacobian
    with respect to ``a``: ``(batch, *output_shape, *activation_shape)`` (per output for several
    outputs; a ``TopKJacobian`` with ``top_k``). The engine also computes (zero) blocks for ``x``,
    so the memory is that of the Jacobian with respect to ``x`` too.

    ``source``: the model ``wrt`` names a layer of, when ``model`` is a view of it sharing its
    layers (``logits=True``)."""
    layer = find_layer(source if source is not None else model, wrt)
    if source is not None and any(
        getattr(sub, "inner", None) is layer for sub in D.all_layers(model)
    ):
        raise ValueError(
            f"wrt={wrt!r} names the layer whose softmax/sigmoid logits=True removes; with "
            "logits=True its activation is the model's output itself. Pass an earlier layer, or "
            "logits=False."
        )
    check_x_kind(x)
    x_leaves, x_structure = flatten(x)
    x_tensors = [
        B.convert(v, floatx() if np.asarray(v).dtype.kind != "f" else _dtype_of(v))
        for v in x_leaves
    ]
    with rules.apply_rules(model, derivatives):
        a = record_activation(model, layer, unflatten(x_tensors, x_structure), training)
    g = remainder(model, layer, x_structure, a.dtype, training, derivatives)

    out_io = symbolic_io(model, "output")
    if out_io is not None:
        n_out = len(flatten(out_io, "model.output")[0])
    else:
        probe = unflatten([t[:1] for t in x_tensors], x_structure)
        n_out = len(flatten(B.call_model(model, B.model_state(model), probe, training))[0])

    def finish(J):
        if isinstance(J, TopKJacobian):
            return J._replace(jacobian=J.jacobian[0])
        if n_out == 1:
            return J[0]
        leaves, structure = flatten(J, "J")
        return unflatten([leaf[0] for leaf in leaves], structure)

    inputs: list = [B.to_numpy(a), *x_tensors]
    finish_fn: Callable = finish
    return g, inputs, finish_fn
