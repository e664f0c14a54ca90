"""The target of a computation: a callable with flat inputs and one flat ``(batch, M)`` output.

:func:`prepare_target` checks the caller's inputs against the callable (a Keras model's symbolic
inputs when it has them), converts them to tensors of the model's dtype and builds the pure
function the compiled blocks differentiate: ``target.flat_output(state, xs) -> (b, M)``, the
model called through the seam (``B.call_model``) with the state ``B.model_state`` read at every
call. :func:`infer_outputs` learns the output structure and shapes.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import keras
import numpy as np

from augnet import _backend as B
from augnet._engine import rules
from augnet._engine.checks import (
    as_batch_leaf,
    check_finite,
    check_real,
    check_x_kind,
    is_plain_nested,
    samples_list_error,
)
from augnet._errors import format_shape, invalid_value
from augnet._structure import (
    DICT,
    SINGLE,
    Structure,
    check_against_spec,
    check_numeric,
    flatten,
    unflatten,
)

_RECURRENT_HINTS = ("LSTM", "GRU", "RNN", "ConvLSTM")

# Per callable (weakly): compiled functions, prepared calls, estimates. Keyed by tuples.
_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_CACHE_STRONG: dict = {}  # for callables that cannot be weakly referenced


def cache_for(fn) -> dict:
    """The engine's cache for callable ``fn`` (compiled functions, prepared calls, choices)."""
    try:
        cache = _CACHE.get(fn)  # (setdefault would make a weak reference on every call)
        return cache if cache is not None else _CACHE.setdefault(fn, {})
    except TypeError:
        return _CACHE_STRONG.setdefault(id(fn), {})


@dataclass
class Target:
    fn: Any
    call: Callable  # (state, list of input tensors) -> list of output tensors
    keras: bool  # fn is a Keras layer/model (called through the seam, with a state)
    in_structure: Structure
    in_names: list[str]
    in_shapes: list[tuple]  # per sample
    dtype: Any
    out_structure: Structure | None = None
    out_shapes: list[tuple] = field(default_factory=list)
    out_dtype: Any = None  # of the flat output (the first output's)
    act_bytes: int = 0  # estimated activation bytes per sample
    recurrent: bool = False
    rules: Any = None  # active derivative rules (augnet._derivatives.rules_key), part of cache keys

    @property
    def in_sizes(self) -> list[int]:
        return [int(np.prod(s, dtype=np.int64)) for s in self.in_shapes]

    @property
    def out_sizes(self) -> list[int]:
        return [int(np.prod(s, dtype=np.int64)) for s in self.out_shapes]

    @property
    def total_outputs(self) -> int:
        return sum(self.out_sizes)

    def state(self):
        """The model's variable values for one call (``()`` for a plain callable)."""
        return B.model_state(self.fn) if self.keras else ()

    def flat_output(self, state, xs):
        """``(b, M)``: every output flattened per sample and concatenated."""
        outs = self.call(state, xs)
        flat = [B.flatten_samples(o) for o in outs]
        if len(flat) > 1:
            flat = [f if f.dtype == flat[0].dtype else B.convert(f, flat[0].dtype) for f in flat]
        return B.concat(flat, axis=1)


def static_dim(d) -> int | None:
    """A dimension as an int, or ``None`` where it is not known while tracing (``None`` in a
    ``tf.function`` signature; a symbolic dimension of a shape-polymorphic JAX export)."""
    if d is None:
        return None
    try:
        return int(d)
    except Exception:  # e.g. jax's InconclusiveDimensionOperation for a symbolic dimension
        return None


def is_keras_layer(fn) -> bool:
    try:
        import keras
    except ImportError:  # pragma: no cover
        return False
    return isinstance(fn, keras.layers.Layer)


def symbolic_io(model, which: str):
    """A Keras model's symbolic inputs or outputs (``which`` is "input" or "output"), keeping
    their nesting; ``None`` for a model with no functional graph (subclassed, not built)."""
    try:
        return getattr(model, which)
    except (AttributeError, ValueError):
        pass
    try:
        leaves = getattr(model, which + "s")
    except (AttributeError, ValueError):
        return None
    if not leaves:
        return None
    return leaves[0] if len(leaves) == 1 else list(leaves)


def _model_input_spec(fn):
    """The model's symbolic inputs as ``(leaves, structure)``, or ``None`` if it has none."""
    spec = symbolic_io(fn, "input")
    if spec is None:
        return None
    return flatten(spec, "model.input")


def make_call(fn, training: bool, model_structure: Structure | None, keras_layer: bool):
    """Wraps ``fn`` into ``call(state, list_of_tensors) -> list_of_output_tensors``."""

    def to_model_inputs(xs):
        if model_structure is None:
            return xs[0] if len(xs) == 1 else list(xs)
        return unflatten(list(xs), model_structure)

    if keras_layer:

        def call(state, xs):
            out = B.call_model(fn, state, to_model_inputs(xs), training)
            return flatten(out, "outputs")[0]

    else:

        def call(state, xs):
            return flatten(fn(to_model_inputs(xs)), "outputs")[0]

    return call


def _estimate_activation_bytes(fn, itemsize: int, fallback: int) -> tuple[int, bool]:
    """Rough bytes of activations per sample (sum of layer outputs), and whether it is recurrent."""
    total, recurrent = 0, False
    layers = getattr(fn, "layers", None)
    if not layers:
        return fallback, False
    stack = list(layers)
    while stack:
        layer = stack.pop()
        name = type(layer).__name__
        if any(h in name for h in _RECURRENT_HINTS):
            recurrent = True
        if getattr(layer, "layers", None):
            stack.extend(layer.layers)
        try:
            outs, _ = flatten(layer.output, "output")
            for o in outs:
                total += int(np.prod([d or 1 for d in o.shape[1:]])) * itemsize
        except Exception:
            continue
    return max(total, fallback), recurrent


@dataclass
class Inputs:
    """The caller's inputs, checked and converted (:func:`convert_inputs`)."""

    tensors: list
    names: list[str]
    structure: Structure
    model_structure: Structure | None  # the model's input nesting (a functional model)
    dtype: Any  # the compute dtype of all inputs (the model's)


def check_fn(fn) -> None:
    """``fn`` is something the engine can call: a model instance or a callable."""
    if isinstance(fn, type):
        raise TypeError(
            f"`fn` is the class {fn.__module__}.{fn.__qualname__}, not a model: build or load "
            "the model first (e.g. model = keras.Sequential([...]) or augnet.load_model(path)) "
            "and pass the instance."
        )
    if not callable(fn):
        raise TypeError(
            f"`fn` must be a keras.Model or a callable built of the backend's ops (keras.ops); "
            f"received an object of type {type(fn).__name__}."
        )


def convert_inputs(fn, x, keras_layer: bool) -> Inputs:
    """Checks ``x`` against ``fn`` (its symbolic inputs when it has them) and converts it to
    tensors of the model's dtype.

    Refuses, with what to pass instead: what is not a batch of arrays (``None``, Python numbers,
    data sets, generators, ragged or sparse tensors), a list of per-sample arrays for a one-input
    model, ragged nested lists, non-numeric and complex dtypes, wrong shapes, differing batch
    sizes and (eagerly) non-finite values, naming the sample.
    """
    check_x_kind(x)
    spec = _model_input_spec(fn) if keras_layer else None
    if is_plain_nested(x) and (spec is None or len(spec[0]) == 1):
        x = as_batch_leaf(x, "x")  # one array written as nested lists: [[1, 2], [3, 4]]
    leaves, structure = flatten(x)
    names = structure.names()
    if structure.kind != SINGLE:
        for leaf, name in zip(leaves, names):
            check_x_kind(leaf, name)
    leaves = [as_batch_leaf(leaf, name) for leaf, name in zip(leaves, names)]
    for leaf, name in zip(leaves, names):
        check_real(check_numeric(leaf, name), name)

    model_structure = None
    dtypes: list = []
    if spec is not None:
        spec_leaves, model_structure = spec
        if structure.kind != DICT and len(spec_leaves) == 1 and len(leaves) > 1:
            error = samples_list_error(leaves, 1, spec_leaves[0].shape)
            if error is not None:
                raise error
        leaves, names, structure = _match_inputs(leaves, structure, spec_leaves, model_structure)
        for leaf, name, s in zip(leaves, names, spec_leaves):
            input_name = getattr(s, "name", None)
            check_against_spec(leaf, name, s.shape, input_name if len(spec_leaves) > 1 else None)
            if not B.is_floating(s.dtype):
                raise TypeError(
                    f"Model input {input_name!r} (`{name}`) has dtype {s.dtype}: an integer input "
                    f"(e.g. Embedding indices) is not differentiable, so it has no Jacobian. "
                    f"Differentiate with respect to a floating input, or with respect to the "
                    f"embedding's output instead."
                )
            dtypes.append(s.dtype)
    else:
        for leaf, name in zip(leaves, names):
            if len(np.shape(leaf)) < 1:
                raise ValueError(
                    f"`{name}` is a scalar; expected an array with a batch axis first, "
                    f"(batch, *input_shape). Use np.reshape({name}, (1, 1)) for one sample."
                )
            if int(np.shape(leaf)[0]) == 0:
                raise ValueError(
                    f"`{name}` has an empty batch: shape {format_shape(np.shape(leaf))}."
                )
            dt = check_numeric(leaf, name)
            # A Keras model with no functional graph (subclassed) casts its inputs to its compute
            # dtype: use that, so the Jacobian comes back in it (not in the caller's dtype).
            model_dtype = getattr(fn, "compute_dtype", None) if keras_layer else None
            if model_dtype is not None and B.is_floating(model_dtype):
                dt = np.dtype(B.dtype_name(model_dtype))
            dtypes.append(dt if dt.kind == "f" else floatx())
    # One compute dtype for all inputs (the model's), so that the Jacobian comes back in it.
    dtype = dtypes[0]
    tensors = [B.convert(leaf, dt) for leaf, dt in zip(leaves, dtypes)]
    batch = {static_dim(t.shape[0]) for t in tensors} - {None}
    if len(batch) > 1:
        raise ValueError(
            "All inputs must have the same batch size; received batch sizes "
            f"{[static_dim(t.shape[0]) for t in tensors]} for {names}."
        )
    if not B.is_symbolic(*tensors):
        check_finite(tensors, names)
    return Inputs(tensors, names, structure, model_structure, dtype)


def prepare_target(fn, x, training: bool, derivatives=None) -> tuple[Target, list]:
    """Checks ``x`` against ``fn`` and converts it; returns the target and the input tensors."""
    check_fn(fn)
    if not isinstance(training, bool):
        raise TypeError(invalid_value("training", training, "True or False"))
    keras_layer = is_keras_layer(fn)
    inputs = convert_inputs(fn, x, keras_layer)
    tensors, names, structure, dtype = inputs.tensors, inputs.names, inputs.structure, inputs.dtype
    model_structure = inputs.model_structure
    in_shapes = [tuple(int(d) for d in t.shape[1:]) for t in tensors]
    call = make_call(fn, training, model_structure, keras_layer)
    call, rules_key = rules.hook(fn, call, derivatives, tensors, keras_layer)
    itemsize = np.dtype(B.dtype_name(dtype)).itemsize
    fallback = 8 * sum(int(np.prod(s)) for s in in_shapes) * itemsize
    # A model's layers do not change between calls: estimate once per callable and item size.
    cache = cache_for(fn)
    key = ("activation_bytes", itemsize, fallback)
    if key not in cache:
        cache[key] = _estimate_activation_bytes(fn, itemsize, fallback)
    act_bytes, recurrent = cache[key]
    target = Target(
        fn,
        call,
        keras_layer,
        structure,
        names,
        in_shapes,
        dtype,
        act_bytes=act_bytes,
        recurrent=recurrent,
        rules=rules_key,
    )
    return target, tensors


def floatx_name() -> str:
    return keras.config.floatx()


def floatx():
    return np.dtype(floatx_name())


def _match_inputs(leaves, structure, spec_leaves, model_structure):
    """Puts the caller's inputs in the order of the model's inputs."""
    n_model = len(spec_leaves)
    spec_names = [getattr(s, "name", str(i)) for i, s in enumerate(spec_leaves)]
    if structure.kind == DICT:
        if model_structure.kind == DICT:
            keys = list(model_structure.keys)
        else:
            keys = spec_names
        given = dict(zip(structure.keys, leaves))
        missing = [k for k in keys if k not in given]
        extra = [k for k in given if k not in keys]
        if missing or extra:
            raise ValueError(
                f"`x` is a dict with keys {list(given)}, but the model's inputs are {keys}. "
                f"Missing: {missing}; unexpected: {extra}."
            )
        # The leaves now follow the model's order: key the results the same way.
        return [given[k] for k in keys], [f"x[{k!r}]" for k in keys], Structure(DICT, tuple(keys))
    if len(leaves) != n_model:
        kind = "one array" if structure.kind == SINGLE else f"{len(leaves)} arrays"
        raise ValueError(
            f"The model has {n_model} input{'s' if n_model != 1 else ''} {spec_names}, but `x` "
            f"holds {kind}. Pass {'a list (or dict) of ' + str(n_model) + ' arrays' if n_model > 1 else 'one array'}, "
            "each with a batch axis first."
        )
    return leaves, structure.names(), structure


def infer_outputs(target: Target, tensors: list) -> None:
    """Learns the output structure, per-sample shapes and dtype (symbolic outputs, else a probe
    forward pass on two samples, which also finds a callable that drops the batch axis)."""
    fn = target.fn
    outs = None
    if target.keras:
        try:
            outs, structure = flatten(symbolic_io(fn, "output"), "model.output")
            if structure.kind != DICT and len(structure) == 1:
                # A model built with outputs=[y] (e.g. AugNet(inputs=m.inputs, outputs=m.outputs))
                # returns y itself when called (Keras unpacks singletons): so does its Jacobian.
                structure = Structure(SINGLE)
            shapes = [tuple(o.shape[1:]) for o in outs]
            if any(d is None for s in shapes for d in s):
                outs = None
        except Exception:
            outs = None
    if outs is not None:
        for i, o in enumerate(outs):
            if len(o.shape) < 1:
                raise batch_axis_error(fn, (), i, len(outs), None)
    key = None
    if outs is None and not B.is_symbolic(*tensors):
        # A probe forward pass costs one eager call of the model (most of a repeated wrt= call
        # on MobileNetV2): once per callable and input signature.
        key = ("outputs", tuple(target.in_shapes), B.dtype_name(target.dtype), target.in_structure)
        known = cache_for(fn).get(key)
        if known is not None:
            target.out_structure, target.out_shapes, target.out_dtype = known
            return
    if outs is None:
        n_probe = 2 if tensors[0].shape[0] is None or int(tensors[0].shape[0]) >= 2 else 1
        probe = [t[:n_probe] for t in tensors]
        outs = target.call(target.state(), probe)
        for i, o in enumerate(outs):
            shape = tuple(B.shape_of(o))
            if len(shape) < 1 or (shape[0] is not None and int(shape[0]) != n_probe):
                raise batch_axis_error(fn, shape, i, len(outs), n_probe)
        try:
            real = fn(unflatten(probe, target.in_structure)) if not target.keras else None
        except Exception:
            real = None
        _, structure = flatten(real, "outputs") if real is not None else (None, None)
        if structure is None:
            structure = (
                Structure(SINGLE) if len(outs) == 1 else Structure("list", tuple(range(len(outs))))
            )
        shapes = [tuple(int(d) for d in o.shape[1:]) for o in outs]
    target.out_structure = structure
    target.out_shapes = [tuple(int(d) for d in s) for s in shapes]
    out_dtype = getattr(outs[0], "dtype", None) if outs else None
    if out_dtype is None or not B.is_floating(out_dtype):
        out_dtype = target.dtype
    target.out_dtype = np.dtype(B.dtype_name(out_dtype))
    if key is not None:
        cache_for(fn)[key] = (target.out_structure, list(target.out_shapes), target.out_dtype)


def batch_axis_error(fn, shape: tuple, index: int, n_outputs: int, n_probe) -> ValueError:
    """The error for a callable whose output has no batch axis (it reduced over the samples)."""
    which = "its output" if n_outputs == 1 else f"its output {index}"
    got = f"of shape {format_shape(shape)}"
    if n_probe is not None:
        got += f" for a batch of {n_probe} sample{'s' if n_probe > 1 else ''}"
    return ValueError(
        f"`fn` returned {which} {got}: the first axis of every output must be the batch axis, "
        "one row per sample. augnet computes per-sample Jacobians of a function applied to each "
        "sample independently, and a function that reduces over the batch (e.g. keras.ops.sum(x) "
        "or keras.ops.mean(x, axis=0)) has none. Reduce over the other axes only, e.g. "
        "lambda x: keras.ops.sum(x, axis=-1, keepdims=True)."
    )
