"""Applying derivative rules to a model's layers, and the check for layers with no gradient path.

The rules themselves are registered and resolved in ``augnet._derivatives``; here the engine
applies them: while a computation runs (and while its compiled function is traced), each covered
layer's ``call`` is replaced by one wrapped in the seam's custom derivative
(``B.with_custom_vjp``), and restored afterwards, always (:func:`patched`). The gradient-path
check runs a model once with every leaf layer's call asking the seam whether its output is
connected to its input (``B.connected_outputs``), and raises ``augnet.GradientPathError`` naming
the layers that are not.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Callable, Iterator

from augnet import _backend as B
from augnet import _derivatives as D

_CHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {key: blocking}


@contextlib.contextmanager
def patched(patches: dict) -> Iterator[None]:
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


def rule_cotangents(rule, layer, inputs, outputs, upstream) -> list:
    """The input cotangents (flat, one per input leaf) that ``rule`` gives for ``upstream`` (the
    structure of the layer's outputs)."""
    if callable(rule.value):
        r = rule.value(inputs, outputs, layer) if rule.takes_layer else rule.value(inputs, outputs)
    else:
        r = rule.value
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


def _rule_call(layer, original: Callable, rule) -> Callable:
    @functools.wraps(original)
    def call(*args, **kwargs):
        split = _float_call(original, args, kwargs)
        if split is None:
            return original(*args, **kwargs)
        replaced, leaves, idx, forward = split

        def rule_vjp(ts, y, upstream):
            cots = rule_cotangents(rule, layer, replaced(ts), y, upstream)
            return [cots[i] for i in idx]

        return B.with_custom_vjp(forward, [leaves[i] for i in idx], rule_vjp)

    return call


@contextlib.contextmanager
def apply_rules(model, derivatives=None) -> Iterator[dict]:
    """Applies the derivative rules in force (registered, and ``derivatives`` for this call) to the
    layers of ``model`` while the block runs; yields ``{layer: rule}`` for the layers covered.
    Restores every layer on exit, also on errors (``augnet.use_derivatives`` is this)."""
    found = D.applicable_rules(model, D.resolve(derivatives))
    patches = {layer: _rule_call(layer, layer.call, rule) for layer, rule in found.items()}
    with patched(patches):
        yield found


def find_blocking_layers(model, run: Callable, xs: list, derivatives=None) -> list:
    """Runs ``run(xs)`` once and returns the layers whose output has no gradient path to their
    floating input (e.g. ``tf.round``, a cast to int, ``tf.numpy_function``), innermost first.

    Layers covered by a rule are not checked; layers without floating inputs (integer indices)
    are skipped.
    """
    found = D.applicable_rules(model, D.resolve(derivatives))
    covered = {id(sub) for layer in found for sub in D.all_layers(layer)}
    blocking: list = []

    def checking(layer, original):
        @functools.wraps(original)
        def call(*args, **kwargs):
            split = _float_call(original, args, kwargs)
            if split is None:
                return original(*args, **kwargs)
            _, leaves, idx, forward = split
            y, flags = B.connected_outputs(forward, [leaves[i] for i in idx])
            if not any(flags):
                blocking.append(layer)
            return y

        return call

    patches = {layer: _rule_call(layer, layer.call, rule) for layer, rule in found.items()}
    for layer in D.all_layers(model):
        if id(layer) in covered or D.direct_children(layer) or type(layer).__name__ == "InputLayer":
            continue
        patches[layer] = checking(layer, layer.call)
    with patched(patches):
        B.run_abstractly(run, xs)  # only the structure matters (JAX: traced, not executed)
    return blocking


def check_gradient_paths(model, run: Callable, xs: list, derivatives=None) -> None:
    """Raises ``augnet.GradientPathError`` naming the layers of ``model`` with no gradient path.

    ``run(xs)`` runs the model once (eagerly) on ``xs``; the check uses one probe sample. The
    result is cached per model, set of rules and input shapes.
    """
    found = D.applicable_rules(model, D.resolve(derivatives))
    key = (D.rules_key(found), tuple(tuple(x.shape[1:]) for x in xs))
    try:
        cache = _CHECKED.setdefault(model, {})
    except TypeError:
        cache = {}
    if key not in cache:
        probe = [x[:1] for x in xs]
        cache[key] = find_blocking_layers(model, run, probe, derivatives)
    blocking = cache[key]
    if blocking:
        raise D.blocking_error(blocking, f" in model {getattr(model, 'name', '')!r}")


def hook(fn, call: Callable, derivatives, tensors: list, keras_layer: bool):
    """Checks gradient paths and wraps ``call(state, xs)`` so that the rules in force act.

    Returns ``(call, key)``: ``key`` is ``None`` when no rule applies (``call`` unchanged), else a
    hashable key of the active rules for the compiled-function caches.
    """
    if not keras_layer:
        if derivatives:
            raise TypeError(
                "`derivatives` applies to Keras layers inside a keras.Model; `fn` is a "
                f"{type(fn).__name__}. Pass the Keras model itself."
            )
        return call, None
    if not B.is_symbolic(*tensors):
        check_gradient_paths(fn, lambda xs: call(B.model_state(fn), xs), tensors, derivatives)
    found = D.applicable_rules(fn, D.resolve(derivatives))
    if not found:
        return call, None

    def ruled_call(state, xs):
        with apply_rules(fn, derivatives):
            return call(state, xs)

    return ruled_call, D.rules_key(found)
