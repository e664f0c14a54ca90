"""Custom derivative rules for Keras layer classes, and the check for layers with no gradient path.

A rule replaces the reverse-mode derivative of every instance of a layer class while augnet
computes (``augnet.jacobian``, ``AugNet.return_jacobian``, ``augnet.vjp``/``jvp``, backward
models). Rules are registered globally with :func:`register_derivative` or passed per call as
``derivatives={LayerClass: rule}`` (a per-call rule wins over a registered one).

A rule is one of:

- **a number or array** (input-independent): the elementwise derivative ``∂out/∂in``, e.g.
  ``1.0`` for ``PlusConstant``. The input cotangent is ``upstream * rule``.
- **a callable** ``rule(inputs, outputs)`` or ``rule(inputs, outputs, layer)`` (input-dependent),
  called with the layer's input and output tensors ``(batch, ...)``. It returns either
  the elementwise derivative (a tensor broadcastable to the input, e.g. ``1`` inside a clipping
  range and ``0`` outside), or a function ``vjp(upstream) -> input cotangent`` for a layer that is
  not elementwise (a linear layer: ``lambda g: keras.ops.matmul(g, keras.ops.transpose(W))``). For a layer with several
  inputs, return a list (one entry per input).

This module only holds the rules: it registers them, resolves the rules in force for a call and
finds the layers they cover. It imports no framework. Applying them is the engine's work
(``augnet/_engine/rules.py``): while augnet computes, the ``call`` of each instance of a ruled
class is wrapped in the seam's custom derivative (``augnet._backend.with_custom_vjp``:
``tf.custom_gradient`` / ``jax.custom_vjp`` / ``torch.autograd.Function``) and restored
afterwards, always. Rules act in reverse mode (no framework runs a custom VJP in forward mode),
so the engine runs ``strategy="forward"`` as ``"loop"`` when a rule is active, and
``augnet.jvp`` uses the double-VJP trick.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

_REGISTRY: dict[type, _Rule] = {}


class GradientPathError(ValueError):
    """A layer on the way from the inputs to the outputs has no gradient path (see
    :func:`register_derivative`)."""


@dataclass(frozen=True, eq=False)
class _Rule:
    value: Any  # a constant derivative, or a callable
    takes_layer: bool = False

    @classmethod
    def make(cls, rule, argument: str) -> _Rule:
        if isinstance(rule, _Rule):
            return rule
        if callable(rule):
            try:
                params = inspect.signature(rule).parameters
            except (TypeError, ValueError):  # builtins: assume (inputs, outputs)
                params = {}
            takes_layer = (
                "layer" in params
                or len(
                    [
                        p
                        for p in params.values()
                        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
                    ]
                )
                >= 3
            )
            return cls(rule, takes_layer)
        try:
            value = np.asarray(rule, dtype="float64")
        except (TypeError, ValueError):
            value = None
        if value is None or value.dtype.kind != "f":
            raise TypeError(
                f"`{argument}` must be a number/array (a constant derivative) or a callable "
                f"rule(inputs, outputs[, layer]); received an object of type "
                f"{type(rule).__name__}."
            )
        return cls(value, False)


def _check_layer_class(layer_class, argument: str) -> None:
    import keras

    if not (isinstance(layer_class, type) and issubclass(layer_class, keras.layers.Layer)):
        raise TypeError(
            f"`{argument}` must be a keras.layers.Layer subclass (the class, not an instance); "
            f"received {layer_class!r}."
        )


def register_derivative(layer_class: type, rule=None):
    """Declares the derivative of a Keras layer class, for every augnet computation.

    Args:
        layer_class: a ``keras.layers.Layer`` subclass; subclasses inherit the rule.
        rule: a constant elementwise derivative (number or array, input-independent), or a callable
            ``rule(inputs, outputs[, layer])`` (input-dependent) returning an elementwise
            derivative broadcastable to ``inputs`` ``(batch, ...)`` or a function
            ``vjp(upstream) -> input cotangent``. Omit it to use this as a decorator.

    Returns:
        ``rule`` (so that it works as a decorator).

    Example:
        >>> augnet.register_derivative(PlusConstant, 1.0)               # doctest: +SKIP
        >>> @augnet.register_derivative(Clip)                           # doctest: +SKIP
        ... def clip_derivative(inputs, outputs, layer):
        ...     inside = (inputs >= layer.vmin) & (inputs <= layer.vmax)
        ...     return keras.ops.cast(inside, inputs.dtype)
    """
    _check_layer_class(layer_class, "layer_class")

    def register(r):
        _REGISTRY[layer_class] = _Rule.make(r, "rule")
        return r

    return register if rule is None else register(rule)


def unregister_derivative(layer_class: type) -> None:
    """Removes a registered rule (no error if there is none)."""
    _REGISTRY.pop(layer_class, None)


def registry_key() -> tuple:
    """A hashable snapshot of the registry, for caches of prepared calls."""
    if not _REGISTRY:  # (this runs on every prepared call)
        return ()
    return tuple((id(cls), id(rule)) for cls, rule in _REGISTRY.items())


def registered_derivatives() -> dict:
    """A copy of the registry: ``{layer_class: rule}``."""
    return {k: v.value for k, v in _REGISTRY.items()}


def resolve(derivatives) -> dict[type, _Rule]:
    """The registry merged with a per-call ``derivatives={LayerClass: rule}`` (which wins)."""
    rules = dict(_REGISTRY)
    if derivatives is None:
        return rules
    if not isinstance(derivatives, Mapping):
        raise TypeError(
            f"`derivatives` must be a dict {{LayerClass: rule}}; received an object of type "
            f"{type(derivatives).__name__}. Example: derivatives={{Clip: clip_rule}}."
        )
    for cls, rule in derivatives.items():
        _check_layer_class(cls, "derivatives")
        rules[cls] = _Rule.make(rule, f"derivatives[{cls.__name__}]")
    return rules


def _rule_for(layer, rules: dict) -> _Rule | None:
    for cls in type(layer).__mro__:
        if cls in rules:
            return rules[cls]
    return None


def all_layers(model) -> list:
    """``model`` and every layer inside it, recursively (each once)."""
    try:
        layers = list(model._flatten_layers(include_self=True, recursive=True))
    except (AttributeError, TypeError):
        layers = [model]
    seen, out = set(), []
    for layer in layers:
        if id(layer) not in seen:
            seen.add(id(layer))
            out.append(layer)
    return out


def direct_children(layer) -> list:
    """The layers directly inside ``layer`` (none for a leaf layer)."""
    try:
        return list(layer._flatten_layers(include_self=False, recursive=False))
    except (AttributeError, TypeError):
        return []


def applicable_rules(model, rules: dict) -> dict:
    """``{layer: rule}`` for the layers in ``model`` that a rule covers (outermost only)."""
    found, covered = {}, set()
    for layer in all_layers(model):
        if id(layer) in covered:
            continue
        rule = _rule_for(layer, rules)
        if rule is not None:
            found[layer] = rule
            covered.update(id(sub) for sub in all_layers(layer))
    return found


def rules_key(found: dict):
    """A hashable key for a set of active rules ``{layer: rule}`` (for compiled-function caches)."""
    if not found:
        return None
    return tuple(sorted((id(layer), id(rule)) for layer, rule in found.items()))


def use_derivatives(model, derivatives=None):
    """A context manager applying the derivative rules to the layers of ``model`` while the block
    runs (for your own autodiff code; augnet's functions apply them themselves).

    Yields ``{layer: rule}`` for the layers covered. Restores every layer on exit, also on errors.

    Example:
        >>> with augnet.use_derivatives(model, {Clip: clip_rule}):   # doctest: +SKIP
        ...     grads = my_own_gradient(model, x)
    """
    # The engine applies rules (augnet/_engine/rules.py); this module only holds them, so the
    # import goes one way at module level: the engine imports this module, never the reverse.
    from augnet._engine.rules import apply_rules

    return apply_rules(model, derivatives)


def blocking_error(layers: list, where: str = "") -> GradientPathError:
    """The error for layers with no gradient path, naming them and the rule that would fix it."""
    names = ", ".join(f"{type(layer).__name__} {layer.name!r}" for layer in layers)
    first = type(layers[0]).__name__
    return GradientPathError(
        f"Layer {names}{where} has no gradient path from its input to its output (an op "
        "without a gradient or with a zero one everywhere, such as round, floor, sign, a cast to "
        "an integer type, a NumPy call (tf.numpy_function) or stop_gradient), so every Jacobian "
        "through it would be silently zero. Declare its derivative with augnet.register_derivative("
        f"{first})(rule) or pass derivatives={{{first}: rule}}, e.g. rule=1.0 for a "
        f"straight-through estimator, or rule=0.0 if a zero derivative is intended."
    )


__all__ = [
    "GradientPathError",
    "register_derivative",
    "registered_derivatives",
    "unregister_derivative",
    "use_derivatives",
]
