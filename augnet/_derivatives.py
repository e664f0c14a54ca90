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
  not elementwise (a linear layer: ``lambda g: g @ tf.transpose(W)``). For a layer with several
  inputs, return a list (one entry per input).

How it works: while augnet computes, the ``call`` of each instance of a ruled class is wrapped in
a custom gradient (``augnet._backend.with_custom_vjp``) and restored afterwards, always. Rules act
in reverse mode: TensorFlow's forward mode ignores custom gradients inside ``tf.function``, so the
engine runs ``strategy="forward"`` as ``"loop"`` when a rule is active, and ``augnet.jvp`` uses
the double-VJP trick.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from augnet import _backend as B

logger = logging.getLogger(__name__)

_REGISTRY: dict[type, _Rule] = {}
_CHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


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

    def cotangents(self, layer, inputs, outputs, upstream) -> list:
        """The input cotangents (flat, one per input leaf) for ``upstream`` (structure of outputs)."""
        if callable(self.value):
            r = (
                self.value(inputs, outputs, layer)
                if self.takes_layer
                else self.value(inputs, outputs)
            )
        else:
            r = self.value
        in_leaves = B.nest_flatten(inputs)
        if callable(r):
            cot = r(upstream)
            leaves = B.nest_flatten(cot) if isinstance(cot, list | tuple | dict) else [cot]
        else:
            up = B.nest_flatten(upstream)
            if len(up) != 1:
                raise ValueError(
                    f"The derivative rule of {type(layer).__name__} {layer.name!r} returned an "
                    f"elementwise derivative, but the layer has {len(up)} outputs; return a "
                    "function vjp(upstream) -> input cotangent(s) instead."
                )
            ds = list(r) if isinstance(r, list | tuple) else [r] * len(in_leaves)
            leaves = [None if d is None else up[0] * B.convert(d, up[0].dtype) for d in ds]
        if len(leaves) != len(in_leaves):
            raise ValueError(
                f"The derivative rule of {type(layer).__name__} {layer.name!r} returned "
                f"{len(leaves)} cotangent(s), but the layer has {len(in_leaves)} input(s); return "
                "one entry per input."
            )
        for c, x in zip(leaves, in_leaves):
            if c is not None and tuple(c.shape)[1:] != tuple(x.shape)[1:]:
                if None in tuple(c.shape)[1:] or None in tuple(x.shape)[1:]:
                    continue
                raise ValueError(
                    f"The derivative rule of {type(layer).__name__} {layer.name!r} gave a "
                    f"cotangent of shape {tuple(c.shape)} for an input of shape "
                    f"{tuple(x.shape)}; an elementwise derivative must broadcast to the input, "
                    "and a vjp function must return the input's shape."
                )
        return leaves


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
        ...     return tf.cast(inside, inputs.dtype)
    """
    _check_layer_class(layer_class, "layer_class")

    def register(r):
        _REGISTRY[layer_class] = _Rule.make(r, "rule")
        _CHECKED.clear()
        return r

    return register if rule is None else register(rule)


def unregister_derivative(layer_class: type) -> None:
    """Removes a registered rule (no error if there is none)."""
    _REGISTRY.pop(layer_class, None)
    _CHECKED.clear()


def registry_key() -> tuple:
    """A hashable snapshot of the registry, for caches of prepared calls."""
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


def _children(layer) -> list:
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


def _split_inputs(args, kwargs):
    """The layer's first (differentiable) argument, and how to call it with a replacement."""
    if args:
        return args[0], lambda new: ((new, *args[1:]), kwargs)
    if kwargs:
        key = "inputs" if "inputs" in kwargs else next(iter(kwargs))
        return kwargs[key], lambda new: (args, {**kwargs, key: new})
    return None, None


def _float_call(original: Callable, args: tuple, kwargs: dict):
    """Splits a layer call into its floating input tensors and a function of them.

    Returns ``None`` when the call has no floating inputs, else ``(replaced, leaves, idx, forward)``:
    ``leaves[i] for i in idx`` are the floating tensors and ``forward(ts)`` calls ``original``
    with them replaced by ``ts`` (every other argument as given); ``replaced(ts)`` the inputs so.
    """
    inputs, rebuild = _split_inputs(args, kwargs)
    leaves = B.nest_flatten(inputs) if inputs is not None else []
    idx = [i for i, t in enumerate(leaves) if B.is_float_tensor(t)]
    if not idx:
        return None

    def replaced(ts):
        full = list(leaves)
        for i, t in zip(idx, ts):
            full[i] = t
        return B.nest_pack(inputs, full)

    def forward(ts):
        a, k = rebuild(replaced(ts))
        return original(*a, **k)

    return replaced, leaves, idx, forward


def _rule_call(layer, original: Callable, rule: _Rule) -> Callable:
    @functools.wraps(original)
    def call(*args, **kwargs):
        split = _float_call(original, args, kwargs)
        if split is None:
            return original(*args, **kwargs)
        replaced, leaves, idx, forward = split

        def rule_vjp(ts, y, upstream):
            cots = rule.cotangents(layer, replaced(ts), y, upstream)
            return [cots[i] for i in idx]

        return B.with_custom_vjp(forward, [leaves[i] for i in idx], rule_vjp)

    return call


@contextlib.contextmanager
def _patched(patches: dict) -> Iterator[None]:
    """Replaces ``layer.call`` by ``patches[layer]`` for the duration; always restores."""
    done = []
    try:
        for layer, call in patches.items():
            had = "call" in layer.__dict__
            old = layer.__dict__.get("call")
            object.__setattr__(layer, "call", call)
            done.append((layer, had, old))
        yield
    finally:
        for layer, had, old in reversed(done):
            if had:
                object.__setattr__(layer, "call", old)
            else:
                object.__delattr__(layer, "call")


@contextlib.contextmanager
def use_derivatives(model, derivatives=None) -> Iterator[dict]:
    """Applies the derivative rules to the layers of ``model`` while the block runs.

    Yields ``{layer: rule}`` for the layers covered. Restores every layer on exit, also on errors.
    """
    found = applicable_rules(model, resolve(derivatives))
    patches = {layer: _rule_call(layer, layer.call, rule) for layer, rule in found.items()}
    with _patched(patches):
        yield found


def rules_key(found: dict):
    """A hashable key for a set of active rules (for compiled-function caches)."""
    if not found:
        return None
    return tuple(sorted((id(layer), id(rule)) for layer, rule in found.items()))


def find_blocking_layers(model, run: Callable, xs: list, derivatives=None) -> list:
    """Runs ``run(xs)`` once and returns the layers whose output has no gradient path to their
    floating input (e.g. ``tf.round``, a cast to int, ``tf.numpy_function``), innermost first.

    Layers covered by a rule are not checked; layers without floating inputs (integer indices)
    are skipped.
    """
    found = applicable_rules(model, resolve(derivatives))
    covered = {id(sub) for layer in found for sub in all_layers(layer)}
    blocking: list = []

    def checking(layer, original):
        @functools.wraps(original)
        def call(*args, **kwargs):
            split = _float_call(original, args, kwargs)
            if split is None:
                return original(*args, **kwargs)
            _, leaves, idx, forward = split
            y, connected = B.gradient_connected(forward, [leaves[i] for i in idx])
            if not connected:
                blocking.append(layer)
            return y

        return call

    patches = {layer: _rule_call(layer, layer.call, rule) for layer, rule in found.items()}
    for layer in all_layers(model):
        if id(layer) in covered or _children(layer) or type(layer).__name__ == "InputLayer":
            continue
        patches[layer] = checking(layer, layer.call)
    with _patched(patches):
        run(xs)
    return blocking


def blocking_error(layers: list, where: str = "") -> GradientPathError:
    names = ", ".join(f"{type(layer).__name__} {layer.name!r}" for layer in layers)
    first = type(layers[0]).__name__
    return GradientPathError(
        f"Layer {names}{where} has no gradient path from its input to its output (an op "
        "without a registered gradient, such as tf.round, a cast to an integer type, "
        "tf.numpy_function or tf.stop_gradient), so every Jacobian through it would be silently "
        "zero. Declare its derivative with augnet.register_derivative("
        f"{first})(rule) or pass derivatives={{{first}: rule}}, e.g. rule=1.0 for a "
        f"straight-through estimator, or rule=0.0 if a zero derivative is intended."
    )


def check_gradient_paths(model, run: Callable, xs: list, derivatives=None) -> None:
    """Raises :class:`GradientPathError` naming the layers of ``model`` with no gradient path.

    The result is cached per model and set of rules (one probe forward pass on one sample).
    """
    found = applicable_rules(model, resolve(derivatives))
    key = (rules_key(found), tuple(tuple(x.shape[1:]) for x in xs))
    try:
        cache = _CHECKED.setdefault(model, {})
    except TypeError:
        cache = {}
    if key not in cache:
        probe = [x[:1] for x in xs]
        cache[key] = find_blocking_layers(model, run, probe, derivatives)
    blocking = cache[key]
    if blocking:
        raise blocking_error(blocking, f" in model {getattr(model, 'name', '')!r}")


def engine_hook(fn, call: Callable, derivatives, tensors: list):
    """For ``augnet._engine``: checks gradient paths and wraps ``call`` so that the rules act.

    Returns ``(call, key)``: ``key`` is ``None`` when no rule applies (``call`` unchanged).
    """
    import keras

    if not isinstance(fn, keras.layers.Layer):
        if derivatives:
            raise TypeError(
                "`derivatives` applies to Keras layers inside a keras.Model; `fn` is a "
                f"{type(fn).__name__}. Pass the Keras model itself."
            )
        return call, None
    if not B.is_symbolic():
        check_gradient_paths(fn, call, tensors, derivatives)
    found = applicable_rules(fn, resolve(derivatives))
    if not found:
        return call, None

    def ruled_call(xs):
        with use_derivatives(fn, derivatives):
            return call(xs)

    return ruled_call, rules_key(found)


__all__ = [
    "GradientPathError",
    "register_derivative",
    "registered_derivatives",
    "unregister_derivative",
    "use_derivatives",
]
