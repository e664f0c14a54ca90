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

import numpy as np

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


def _functions(model, covered: set) -> list:
    """The functional graphs in ``model`` (itself and nested functional models) not covered by
    a rule: their non-layer operations (``keras.ops.round`` between layers, ...) are checked."""
    out = []
    for layer in D.all_layers(model):
        if id(layer) in covered:
            continue
        try:
            ops = layer.operations  # a functional graph (Sequential has none of its own)
        except (AttributeError, ValueError, TypeError):
            continue
        if isinstance(ops, list | tuple):
            out.append(ops)
    return out


def _op_call(op_list: list, op, original: Callable) -> Callable:
    """``op.call`` that records ``op`` in ``op_list`` when none of its outputs has a gradient path
    to its floating arguments (``round``, ``argmax``, a cast to an integer type, ...)."""

    @functools.wraps(original)
    def call(*args, **kwargs):
        structure = (list(args), dict(kwargs))
        flat = B.nest_flatten(structure)
        idx = [i for i, t in enumerate(flat) if B.is_float_tensor(t)]
        if not idx:
            return original(*args, **kwargs)

        def forward(ts):
            full = list(flat)
            for i, t in zip(idx, ts):
                full[i] = t
            a, k = B.nest_pack(structure, full)
            return original(*a, **k)

        y, flags = B.connected_outputs(forward, [flat[i] for i in idx])
        if not any(flags):
            op_list.append(op)
        return y

    return call


def find_blocking(model, run: Callable, xs: list, derivatives=None) -> tuple[list, list]:
    """Runs ``run(xs)`` once and returns ``(layers, operations)``: the layers whose output has no
    gradient path to their floating input (e.g. ``tf.round``, a cast to int,
    ``tf.numpy_function``), innermost first, and the operations of the model's functional graphs
    (``keras.ops.round``/``floor``/``argmax``/``cast``/``stop_gradient`` between layers) of which
    no output has a gradient path to their floating arguments, in the order they ran.

    Layers covered by a rule (and what they contain) are not checked; layers and operations
    without floating inputs (integer indices) are skipped. Operations are only suspects: a
    model's output is cut by one only if it has no gradient path at all (:func:`cut_outputs`),
    as an ``argmax`` feeding an index (``take_along_axis``) is not.
    """
    import keras

    found = D.applicable_rules(model, D.resolve(derivatives))
    covered = {id(sub) for layer in found for sub in D.all_layers(layer)}
    blocking: list = []
    cutting: list = []

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
    for ops in _functions(model, covered):
        for op in ops:
            if isinstance(op, keras.layers.Layer) or op in patches:
                continue
            patches[op] = _op_call(cutting, op, op.call)
    with patched(patches):
        B.run_abstractly(run, xs)  # only the structure matters (JAX: traced, not executed)
    seen: set = set()
    cutting = [op for op in cutting if not (id(op) in seen or seen.add(id(op)))]
    return blocking, cutting


def find_blocking_layers(model, run: Callable, xs: list, derivatives=None) -> list:
    """The layers of :func:`find_blocking` (for callers of the layer-only check)."""
    return find_blocking(model, run, xs, derivatives)[0]


def _perturbed(xs: list, seed: int) -> list:
    """``xs`` plus normal noise as large as the inputs themselves (at least 1): far enough to move
    a rounding, an ``argmax`` or an integer cast."""
    rng = np.random.default_rng(seed)
    out = []
    for x in xs:
        a = np.asarray(B.to_numpy(x))
        scale = max(1.0, float(np.max(np.abs(a)))) if a.size and np.all(np.isfinite(a)) else 1.0
        noisy = a + scale * rng.standard_normal(a.shape)
        out.append(B.convert(noisy.astype(a.dtype), x.dtype))
    return out


def cut_outputs(run: Callable, xs: list) -> list[int]:
    """The (flat) outputs of ``run(xs)`` whose values depend on ``xs`` but which have no gradient
    path to them: their Jacobian would be silently zero.

    "No path" is the seam's structural answer (``B.connected_outputs``). An output without a
    path is cut only if it changes when the inputs change (two perturbations as large as the
    inputs): an output that truly does not depend on the inputs (a constant) has a Jacobian of
    exactly zero, which is the right answer.
    """
    y, flags = B.connected_outputs(lambda ts: run(ts), xs)
    leaves = B.nest_flatten(y)
    suspects = [i for i, flag in enumerate(flags) if not flag]
    if not suspects:
        return []
    base = [np.asarray(B.to_numpy(leaves[i])) for i in suspects]
    cut: set = set()
    for seed in (0, 1):
        moved = B.nest_flatten(run(_perturbed(xs, seed)))
        for i, b in zip(suspects, base):
            value = np.asarray(B.to_numpy(moved[i]))
            if value.shape != b.shape or not np.array_equal(value, b, equal_nan=True):
                cut.add(i)
    return sorted(cut)


def check_gradient_paths(model, run: Callable, xs: list, derivatives=None) -> None:
    """Raises ``augnet.GradientPathError`` when a gradient path of ``model`` is cut.

    Two checks, on one probe sample: every leaf layer with no gradient path from its input to its
    output (named, with the derivative rule that would fix it), then every output of the model
    that depends on the inputs but has no gradient path to them (:func:`cut_outputs`), naming the
    operations of its functional graph that cut it (``keras.ops.round`` between layers, ...).
    ``run(xs)`` runs the model once (eagerly). The result is cached per model, set of rules and
    input signature.
    """
    found = D.applicable_rules(model, D.resolve(derivatives))
    key = (
        D.rules_key(found),
        tuple(tuple(x.shape[1:]) for x in xs),
        tuple(B.dtype_name(x.dtype) for x in xs),
    )
    try:
        cache = _CHECKED.setdefault(model, {})
    except TypeError:
        cache = {}
    if key not in cache:
        probe = [x[:1] for x in xs]
        layers, ops = find_blocking(model, run, probe, derivatives)
        cut: list = []
        if not layers:
            try:
                with apply_rules(model, derivatives):
                    cut = cut_outputs(run, probe)
            except Exception:
                if not found:
                    raise
                # A derivative rule failed on the probe: its own error is raised, with its
                # context, when the Jacobian runs it; this check has nothing to add.
                cut = []
        cache[key] = (layers, ops, cut, _output_names(model) if cut else None)
    layers, ops, cut, names = cache[key]
    where = f" in model {getattr(model, 'name', '')!r}"
    if layers:
        raise D.blocking_error(layers, where)
    if cut:
        raise cut_error(model, cut, ops, names)


def check_callable_paths(fn, run: Callable, xs: list) -> None:
    """:func:`check_gradient_paths` for a plain callable: its outputs that depend on the inputs
    but have no gradient path to them (``tf.round``, ``tf.numpy_function``, ...)."""
    key = (
        "callable",
        tuple(tuple(x.shape[1:]) for x in xs),
        tuple(B.dtype_name(x.dtype) for x in xs),
    )
    try:
        cache = _CHECKED.setdefault(fn, {})
    except TypeError:
        cache = {}
    if key not in cache:
        cache[key] = cut_outputs(run, [x[:1] for x in xs])
    if cache[key]:
        raise cut_error(fn, cache[key], [], None)


def _output_names(model) -> list[str] | None:
    try:
        outs = model.outputs
    except (AttributeError, ValueError):
        return None
    names = []
    for t in outs or []:
        history = getattr(t, "_keras_history", None)
        op = getattr(history, "operation", None)
        names.append(getattr(op, "name", None) or getattr(t, "name", "?"))
    return names or None


def _callable_name(fn) -> str:
    if is_keras_model(fn):
        return f"model {getattr(fn, 'name', '')!r}"
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None)
    return f"callable {name or type(fn).__name__}"


def is_keras_model(fn) -> bool:
    try:
        import keras
    except ImportError:  # pragma: no cover
        return False
    return isinstance(fn, keras.layers.Layer)


def cut_error(fn, outputs: list[int], ops: list, names) -> Exception:
    """The error for outputs whose gradient path is cut, naming the operations that cut it."""
    what = ", ".join(f"{i} ({names[i]!r})" if names and i < len(names) else str(i) for i in outputs)
    plural = "s" if len(outputs) > 1 else ""
    if ops:
        by = ", ".join(f"{type(op).__name__} {getattr(op, 'name', '')!r}" for op in ops)
        cause = (
            f"it is cut by the operation{'s' if len(ops) > 1 else ''} {by} between its layers, "
            "which ha" + ("ve" if len(ops) > 1 else "s") + " no derivative (a rounding, an argmax, "
            "a cast to an integer type, stop_gradient, ...)"
        )
        fix = (
            "An operation between layers cannot take a derivative rule: move it into a custom "
            "layer and declare that layer's derivative with augnet.register_derivative("
            "MyLayer)(rule) (rule=1.0 for a straight-through estimator), or remove it"
        )
    else:
        cause = (
            "an op without a gradient cuts it (such as keras.ops.round/floor/argmax, "
            f"{_framework_examples()}, a cast to an integer type or stop_gradient)"
        )
        fix = (
            "Compute it with differentiable ops, or build it as a Keras model whose "
            "non-differentiable step is a custom layer with a declared derivative "
            "(augnet.register_derivative(MyLayer)(rule))"
        )
    return D.GradientPathError(
        f"Output{plural} {what} of {_callable_name(fn)} depend{'' if plural else 's'} on the input "
        f"but ha{'ve' if plural else 's'} no gradient path to it: {cause}, so {'their' if plural else 'its'} Jacobian "
        f"would be silently zero. {fix}."
    )


def _framework_examples() -> str:
    return {
        "tensorflow": "tf.round, tf.numpy_function, tf.py_function",
        "jax": "jnp.round, jax.pure_callback",
        "torch": "torch.round, .detach(), .numpy()",
    }.get(B.name, "round")


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
        if not B.is_symbolic(*tensors):
            check_callable_paths(fn, lambda xs: call((), xs), tensors)
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
