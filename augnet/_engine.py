"""The Jacobian engine: exact per-sample Jacobians of any callable built of TensorFlow ops.

Works on ``(callable, inputs)`` and knows nothing of images. Reaches the framework only through
``augnet._backend`` (vjp, jvp, vectorized_map, compile_function).

Strategies (all give the same numbers; ``strategy="auto"`` picks one from the shapes):

- ``"loop"``: one forward pass, then one backward pass (a vector-Jacobian product) per selected
  output, in a compiled loop. The cost floor of reverse mode; the fastest on CPU for convolutional
  networks, with the smallest memory. Max-pooling layers record their window maxima once in the
  forward pass and route every backward pass through them (``MaxPoolGradWithArgmax``) instead of
  searching every window again per output: the same numbers, ~0.6x the time on the CNN benchmark.
- ``"pfor"``: the same backward passes vectorised over the outputs (``tf.vectorized_map``). Faster
  for small dense networks; memory grows with the chunk of outputs.
- ``"loop_xla"``: the loop compiled with XLA (``jit_compile=True``): 3-5x faster for recurrent
  networks on CPU, about the same for convolutional ones, and seconds of compiling on first call.
- ``"forward"``: forward mode (Jacobian-vector products with unit tangents, vectorised over the
  input elements; the forward pass itself runs once). Wins when a sample has far fewer input
  elements than selected outputs (a "tall" Jacobian).

Per call, the Python around the compiled function is kept to a minimum (a Jacobian of a small model
takes well under a millisecond): compiled functions are called directly, and an eager call with one
array of a shape and dtype seen before, with the same options, reuses the checked and planned call
(``_prepared``). Loop results are copied once, straight from the backward passes' tensors into the
result; a one-pass result is returned without a copy.

Memory is bounded per pass by ``batch_size`` (samples per pass), ``chunk_size`` (outputs, or for
forward mode input elements, per pass) and ``max_memory`` (from which both are derived).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from augnet import _backend as B
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

logger = logging.getLogger(__name__)

STRATEGIES = ("auto", "loop", "pfor", "forward", "loop_xla")
DEFAULT_MAX_MEMORY = 2 * 1024**3  # bytes of intermediates per pass when max_memory is not given
_AUTO_MARGIN = 0.8  # auto leaves the loop only for a candidate timed this much faster
_MAX_PLANS = 16  # prepared calls remembered per callable (shapes x options)
MAX_UNROLL = 32  # backward passes per compiled "loop" pass (each chunk costs one forward pass)
_RECURRENT_HINTS = ("LSTM", "GRU", "RNN", "ConvLSTM")


class TopKJacobian(NamedTuple):
    """The Jacobians of each sample's ``k`` largest outputs.

    Attributes:
        jacobian: ``(batch, k, *input_shape)`` (the input structure for several inputs).
        indices: ``(batch, k)`` flat indices of the selected outputs, largest first.
        values: ``(batch, k)`` the outputs' values.
    """

    jacobian: Any
    indices: Any
    values: Any


class JacobianChunk(NamedTuple):
    """One block of a streamed Jacobian (see :func:`iter_jacobian`).

    Attributes:
        samples: the slice of the batch this block covers.
        outputs: flat output indices of the block's rows: ``(c,)``, or ``(b, c)`` per sample
            with ``top_k`` or per-sample ``outputs``.
        values: ``(b, c, *input_shape)`` (the input structure for several inputs).
        columns: where the block's rows go among the selected outputs: the full Jacobian's
            ``[samples, columns]`` (``(batch, m, *input_shape)`` with ``m`` selected outputs).
    """

    samples: slice
    outputs: np.ndarray
    values: Any
    columns: slice = slice(None)


# --------------------------------------------------------------------------------------------------
# The target: a callable with flat inputs and one flat (batch, M) output
# --------------------------------------------------------------------------------------------------


@dataclass
class _Target:
    fn: Any
    call: Callable  # list of input tensors -> list of output tensors
    in_structure: Structure
    in_names: list[str]
    in_shapes: list[tuple]  # per sample
    dtype: Any
    out_structure: Structure | None = None
    out_shapes: list[tuple] = field(default_factory=list)
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

    def flat_output(self, xs):
        outs = self.call(xs)
        flat = [B.flatten_samples(o) for o in outs]
        if len(flat) > 1:
            flat = [f if f.dtype == flat[0].dtype else B.convert(f, flat[0].dtype) for f in flat]
        return B.concat(flat, axis=1)


def _is_keras_layer(fn) -> bool:
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


def _make_call(fn, training: bool, model_structure: Structure | None):
    """Wraps ``fn`` into ``call(list_of_tensors) -> list_of_output_tensors``."""
    keras_layer = _is_keras_layer(fn)

    def to_model_inputs(xs):
        if model_structure is None:
            return xs[0] if len(xs) == 1 else list(xs)
        return unflatten(list(xs), model_structure)

    def outputs_to_list(out):
        leaves, _ = flatten(out, "outputs")
        return leaves

    if keras_layer and training and getattr(fn, "stateless_call", None) is not None:
        # training=True must not update BatchNorm statistics (or anything): run statelessly.
        def call(xs):
            trainable = [v.value for v in fn.trainable_variables]
            non_trainable = [v.value for v in fn.non_trainable_variables]
            out, _ = fn.stateless_call(trainable, non_trainable, to_model_inputs(xs), training=True)
            return outputs_to_list(out)

    elif keras_layer:

        def call(xs):
            return outputs_to_list(fn(to_model_inputs(xs), training=training))

    else:

        def call(xs):
            return outputs_to_list(fn(to_model_inputs(xs)))

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


def _prepare_target(fn, x, training: bool, derivatives=None) -> tuple[_Target, list]:
    """Checks ``x`` against ``fn`` and converts it; returns the target and the input tensors."""
    if not callable(fn):
        raise TypeError(
            f"`fn` must be a keras.Model or a callable built of TensorFlow ops; received an object "
            f"of type {type(fn).__name__}."
        )
    if not isinstance(training, bool):
        raise TypeError(invalid_value("training", training, "True or False"))
    leaves, structure = flatten(x)
    names = structure.names()
    for leaf, name in zip(leaves, names):
        check_numeric(leaf, name)

    spec = _model_input_spec(fn) if _is_keras_layer(fn) else None
    model_structure = None
    dtypes: list = []
    if spec is not None:
        spec_leaves, model_structure = spec
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
            if len(leaf.shape) < 1:
                raise ValueError(
                    f"`{name}` is a scalar; expected an array with a batch axis first, "
                    f"(batch, *input_shape). Use np.reshape({name}, (1, 1)) for one sample."
                )
            if int(leaf.shape[0]) == 0:
                raise ValueError(f"`{name}` has an empty batch: shape {format_shape(leaf.shape)}.")
            dt = check_numeric(leaf, name)
            # A Keras model with no functional graph (subclassed) casts its inputs to its compute
            # dtype: use that, so the Jacobian comes back in it (not in the caller's dtype).
            model_dtype = getattr(fn, "compute_dtype", None) if _is_keras_layer(fn) else None
            if model_dtype is not None and B.is_floating(model_dtype):
                dt = np.dtype(B.dtype_name(model_dtype))
            dtypes.append(dt if dt.kind == "f" else _floatx())
    # One compute dtype for all inputs (the model's), so that the Jacobian comes back in it.
    dtype = dtypes[0]
    tensors = [B.convert(leaf, dt) for leaf, dt in zip(leaves, dtypes)]
    batch = {int(t.shape[0]) for t in tensors if t.shape[0] is not None}
    if len(batch) > 1:
        raise ValueError(
            "All inputs must have the same batch size; received batch sizes "
            f"{[int(t.shape[0]) for t in tensors]} for {names}."
        )
    in_shapes = [tuple(int(d) for d in t.shape[1:]) for t in tensors]
    call = _make_call(fn, training, model_structure)
    from augnet import _derivatives  # custom derivative rules and the gradient-path check

    call, rules = _derivatives.engine_hook(fn, call, derivatives, tensors)
    itemsize = np.dtype(B.dtype_name(dtype)).itemsize
    fallback = 8 * sum(int(np.prod(s)) for s in in_shapes) * itemsize
    # A model's layers do not change between calls: estimate once per callable and item size.
    cache = _cache_for(fn)
    key = ("activation_bytes", itemsize, fallback)
    if key not in cache:
        cache[key] = _estimate_activation_bytes(fn, itemsize, fallback)
    act_bytes, recurrent = cache[key]
    target = _Target(
        fn, call, structure, names, in_shapes, dtype, act_bytes=act_bytes, recurrent=recurrent
    )
    target.rules = rules
    return target, tensors


def _floatx_name() -> str:
    try:
        import keras

        return keras.config.floatx()
    except Exception:  # pragma: no cover
        return "float32"


def _floatx():
    return np.dtype(_floatx_name())


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


def _infer_outputs(target: _Target, tensors: list) -> None:
    """Learns the output structure and per-sample shapes (symbolic shapes, else one probe sample)."""
    fn = target.fn
    outs = None
    if _is_keras_layer(fn):
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
    if outs is None:
        probe = [t[:1] for t in tensors]
        out = target.call(probe)
        try:
            real = fn(unflatten(probe, target.in_structure)) if not _is_keras_layer(fn) else None
        except Exception:
            real = None
        _, structure = flatten(real, "outputs") if real is not None else (None, None)
        if structure is None:
            structure = (
                Structure(SINGLE) if len(out) == 1 else Structure("list", tuple(range(len(out))))
            )
        shapes = [tuple(int(d) for d in o.shape[1:]) for o in out]
    target.out_structure = structure
    target.out_shapes = [tuple(int(d) for d in s) for s in shapes]


# --------------------------------------------------------------------------------------------------
# Output selection
# --------------------------------------------------------------------------------------------------


@dataclass
class _Selection:
    rows: np.ndarray | None  # (m,) flat indices into the concatenated outputs; None with top_k
    groups: list  # per output: (start, stop) rows of the selection, or None when not selected
    full: bool  # every output element, in order: reshape rows to the output shapes
    top_k: int | None = None
    per_sample: np.ndarray | None = None  # (batch, k) flat indices, row i for sample i

    @property
    def size(self) -> int:
        if self.per_sample is not None:
            return int(self.per_sample.shape[1])
        return self.top_k if self.top_k is not None else len(self.rows)


def _select(target: _Target, outputs, top_k) -> _Selection:
    sizes = target.out_sizes
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    n_out = len(sizes)
    if outputs is not None and top_k is not None:
        raise ValueError("Pass either `outputs` or `top_k`, not both.")
    if top_k is not None:
        if isinstance(top_k, bool) or not isinstance(top_k, int | np.integer) or top_k < 1:
            raise ValueError(invalid_value("top_k", top_k, "a positive integer"))
        if n_out != 1:
            raise ValueError(
                f"`top_k` needs a model with one output; this one has {n_out}. Select output "
                "elements with `outputs=` instead."
            )
        if top_k > sizes[0]:
            raise ValueError(
                f"`top_k={top_k}` is larger than the number of outputs, {sizes[0]} "
                f"(output shape {format_shape(target.out_shapes[0])})."
            )
        return _Selection(None, [(0, int(top_k))], full=False, top_k=int(top_k))
    if outputs is None:
        rows = np.arange(offsets[-1], dtype=np.int64)
        return _Selection(
            rows, [(int(offsets[o]), int(offsets[o + 1])) for o in range(n_out)], full=True
        )
    per_sample = _per_sample_indices(outputs, n_out, sizes[0], target.out_shapes[0])
    if per_sample is not None:
        return _Selection(None, [(0, per_sample.shape[1])], full=False, per_sample=per_sample)
    if n_out == 1:
        per_output = [outputs]
    else:
        per_output = _per_output_selection(outputs, target.out_structure)
    rows, groups, start = [], [], 0
    for o, sel in enumerate(per_output):
        if sel is None:
            idx = np.arange(sizes[o])
        else:
            idx = _check_indices(
                sel, sizes[o], target.out_shapes[o], "outputs" if n_out == 1 else f"outputs[{o}]"
            )
        rows.append(idx + offsets[o])
        groups.append((start, start + len(idx)))
        start += len(idx)
    return _Selection(np.concatenate(rows).astype(np.int64), groups, full=False)


def _per_sample_indices(outputs, n_out: int, size: int, shape: tuple) -> np.ndarray | None:
    """``outputs`` as a ``(batch, k)`` int64 array when it selects per sample (a 2-D integer
    array, or a list of equal-length lists: row ``i`` for sample ``i``), else ``None``."""
    if isinstance(outputs, np.ndarray):
        if outputs.ndim != 2:
            return None
        arr = outputs
    elif (
        isinstance(outputs, list | tuple)
        and len(outputs) > 0
        and all(isinstance(o, list | tuple | np.ndarray) for o in outputs)
        and n_out == 1
    ):
        try:
            arr = np.asarray(outputs)
        except ValueError:
            arr = None
        if arr is None or arr.ndim != 2:
            raise ValueError(
                "Per-sample `outputs` must hold the same number of flat output indices for every "
                f"sample, a (batch, k) integer array; received rows of lengths "
                f"{[len(o) for o in outputs]}."
            )
    else:
        return None
    if n_out != 1:
        raise ValueError(
            f"Per-sample `outputs` (a (batch, k) array) need a model with one output; this one "
            f"has {n_out}. Select output elements with a list (or dict) per output instead."
        )
    if arr.size == 0 or arr.dtype.kind not in "iu":
        raise ValueError(
            invalid_value(
                "outputs",
                outputs,
                "a (batch, k) integer array of flat output indices per sample, k >= 1",
            )
        )
    bad = arr[(arr < 0) | (arr >= size)]
    if bad.size:
        raise ValueError(
            f"`outputs` holds index {int(bad.flat[0])}, which is out of range for an output of "
            f"{size} elements (per-sample shape {format_shape(shape)}); valid flat indices are "
            f"0..{size - 1}."
        )
    return arr.astype(np.int64)


def _per_output_selection(outputs, out_structure: Structure):
    if out_structure.kind == DICT and isinstance(outputs, dict):
        extra = [k for k in outputs if k not in out_structure.keys]
        if extra:
            raise ValueError(
                f"`outputs` names {extra}, which are not outputs of the model; its outputs are "
                f"{list(out_structure.keys)}."
            )
        return [outputs.get(k) for k in out_structure.keys]
    if (
        isinstance(outputs, list | tuple)
        and len(outputs) == len(out_structure)
        and all(o is None or not isinstance(o, int | np.integer) for o in outputs)
    ):
        return list(outputs)
    raise ValueError(
        f"The model has {len(out_structure)} outputs, so `outputs` must be a list (or dict) with one "
        f"entry per output, each a list of flat indices or None for all; received outputs={outputs!r}."
    )


def _check_indices(sel, size: int, shape: tuple, argument: str) -> np.ndarray:
    if isinstance(sel, int | np.integer) and not isinstance(sel, bool):
        sel = [sel]
    arr = np.asarray(sel)
    if arr.ndim != 1 or arr.size == 0 or arr.dtype.kind not in "iu":
        raise ValueError(
            invalid_value(
                argument, sel, "a non-empty list of integer flat output indices, e.g. [0, 3, 7]"
            )
        )
    bad = arr[(arr < 0) | (arr >= size)]
    if bad.size:
        raise ValueError(
            f"`{argument}` holds index {int(bad[0])}, which is out of range for an output of "
            f"{size} elements (per-sample shape {format_shape(shape)}); valid flat indices are "
            f"0..{size - 1}."
        )
    return arr.astype(np.int64)


# --------------------------------------------------------------------------------------------------
# Blocks: the compiled units of work
# --------------------------------------------------------------------------------------------------


def _reverse_block(target: _Target, vectorized: bool, stacked: bool = True, routed: bool = False):
    """``(xs, sel (b, c)) -> [ (b, c, *in_shape_i) ]``: one forward pass, then c backward passes.

    The loop form unrolls the c backward passes into one graph (c is static per compiled function):
    on CPU that measured about 2x faster than a ``while_loop`` over the seeds, as TensorFlow runs
    independent backward passes side by side. With ``stacked=False`` (the loop form only) it
    returns ``[[ (b, *in_shape_i) ] * c]`` per input instead, for the caller to copy straight into
    its result (stacking in the graph cost one more copy of the whole block, single-threaded).
    ``routed``: max-pooling layers record their maxima once for all c backward passes
    (:func:`_routed_pooling`).
    """
    M = target.total_outputs

    def block(xs, sel):
        with _routed_pooling(target.fn if routed else None):
            y, vjp_fn = B.vjp(target.flat_output, xs)

        def row(col):  # col: (b,) output index per sample
            return vjp_fn(B.one_hot(col, M, y.dtype))

        if vectorized:
            rows = B.vectorized_map(row, B.transpose_first_two(sel))
            return [B.transpose_first_two(r) for r in rows]
        per_seed = [row(sel[:, j]) for j in range(B.shape_of(sel)[1])]
        if not stacked:
            return [list(grads) for grads in zip(*per_seed)]
        return [B.stack(list(grads), axis=1) for grads in zip(*per_seed)]

    return block


def _routable_pools(fn) -> list:
    """The Keras ``MaxPooling2D`` layers (channels_last, not overridden) inside ``fn``."""
    try:
        import keras
    except ImportError:  # pragma: no cover
        return []
    from augnet._derivatives import all_layers

    if not isinstance(fn, keras.layers.Layer):
        return []
    cls = keras.layers.MaxPooling2D
    return [
        layer
        for layer in all_layers(fn)
        if isinstance(layer, cls)
        and type(layer).call is cls.call  # (MaxPooling2D and AveragePooling2D share it)
        and getattr(layer, "pool_mode", "max") == "max"
        and "call" not in layer.__dict__
        and getattr(layer, "data_format", None) == "channels_last"
    ]


@contextlib.contextmanager
def _routed_pooling(fn):
    """While tracing a reverse-mode block: ``fn``'s max-pooling layers pool with
    ``B.max_pool_2d_routed``, whose backward passes reuse the maxima of the one forward pass
    (TensorFlow's ``MaxPoolGrad`` searches every window again in each of the m backward passes).
    The numbers are the same; every layer's ``call`` is restored on exit."""
    from augnet._derivatives import _patched  # replaces instances' `call`, always restores

    def routed_call(layer):
        def call(inputs):
            return B.max_pool_2d_routed(inputs, layer.pool_size, layer.strides, layer.padding)

        return call

    layers = _routable_pools(fn) if fn is not None else []
    with _patched({layer: routed_call(layer) for layer in layers}):
        yield


def _forward_block(target: _Target, which: int, all_outputs: bool = False):
    """``(xs, cols (c,), sel (b, m)) -> (b, m, c)``: columns ``cols`` of input ``which``.

    One JVP per column, vectorised over the columns (pfor): the tangent of column ``j`` is the unit
    vector ``e_j`` for every sample at once (samples are independent), and the forward pass itself
    is loop-invariant, so it runs once, not once per column as with tiled inputs (measured 1.5x
    faster than tiling on the tall benchmark case). ``all_outputs``: ``sel`` is every output in
    order (static), so no gather.
    """
    n = target.in_sizes[which]
    shape = target.in_shapes[which]

    def block(xs, cols, sel):
        def column(col):  # (b, M): ∂y/∂x_which[col] for every sample
            tangent = B.unit_tangent(col, n, shape, xs[which])
            tangents = [tangent if i == which else None for i in range(len(xs))]
            return B.jvp(target.flat_output, xs, tangents)[1]

        y_dot = B.vectorized_map(column, cols)  # (c, b, M)
        if all_outputs:
            return B.transpose(y_dot, (1, 2, 0))
        picked = B.gather_columns(B.transpose_first_two(y_dot), sel)  # (b, c, m)
        return B.transpose(picked, (0, 2, 1))

    return block


def _predict_block(target: _Target):
    def block(xs):
        return target.flat_output(xs)

    return block


# Compiled functions, cached per callable (weakly) and per input signature.
_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_CACHE_STRONG: dict = {}  # for callables that cannot be weakly referenced


def _cache_for(fn) -> dict:
    try:
        return _CACHE.setdefault(fn, {})
    except TypeError:
        return _CACHE_STRONG.setdefault(id(fn), {})


def _compiled(target: _Target, kind: str, training: bool, jit_compile: bool, extra=None):
    key = (
        kind,
        training,
        jit_compile,
        extra,
        tuple(target.in_shapes),
        B.dtype_name(target.dtype),
        target.in_structure,
        target.rules,
    )
    cache = _cache_for(target.fn)
    if key in cache:
        return cache[key]
    xs_sig = [B.tensor_spec((None, *s), target.dtype) for s in target.in_shapes]
    if kind in ("loop", "pfor"):
        loop = kind == "loop"
        # Routed max pooling has no XLA kernel and no pfor rule: the plain loop only. Derivative
        # rules replace a layer's call themselves: leave those models as they are.
        routed = loop and not jit_compile and target.rules is None
        block = _reverse_block(target, vectorized=not loop, stacked=not loop, routed=routed)
        sig = [xs_sig, B.tensor_spec((None, extra), "int32")]
    elif kind == "forward":  # extra: (which input, every output in order)
        block = _forward_block(target, *extra)
        sig = [xs_sig, B.tensor_spec((None,), "int32"), B.tensor_spec((None, None), "int32")]
    elif kind == "predict":
        block = _predict_block(target)
        sig = [xs_sig]
    else:  # pragma: no cover
        raise AssertionError(kind)
    fn = B.compile_function(block, sig, jit_compile=jit_compile)
    cache[key] = fn
    return fn


def trace_count(fn) -> int:
    """How many times augnet traced (compiled) functions for ``fn`` — for tests and diagnostics."""
    cache = _cache_for(fn)
    return sum(
        f.experimental_get_tracing_count()
        for f in cache.values()
        if hasattr(f, "experimental_get_tracing_count")
    )


# --------------------------------------------------------------------------------------------------
# Planning: strategy and chunk sizes
# --------------------------------------------------------------------------------------------------


_UNITS = {
    "": 1,
    "b": 1,
    "k": 1e3,
    "kb": 1e3,
    "m": 1e6,
    "mb": 1e6,
    "g": 1e9,
    "gb": 1e9,
    "t": 1e12,
    "tb": 1e12,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}


def parse_memory(value) -> int | None:
    """``"2GB"``, ``"512MiB"``, ``2e9`` or ``None`` -> bytes (or ``None``)."""
    if value is None:
        return None
    if isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool):
        if value <= 0:
            raise ValueError(
                invalid_value(
                    "max_memory", value, "a positive number of bytes or a string like '2GB'"
                )
            )
        return int(value)
    if isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", value)
        if m and m.group(2).lower() in _UNITS and float(m.group(1)) > 0:
            return int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    raise ValueError(
        invalid_value(
            "max_memory",
            value,
            "a positive number of bytes or a string like '2GB', '512MB', '1.5GiB'",
        )
    )


def _check_positive_int(value, argument):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(invalid_value(argument, value, "a positive integer or None"))
    return int(value)


def _plan(
    target: _Target, strategy: str, n_samples: int, m: int, batch_size, chunk_size, max_memory
):
    """Chooses (samples per pass, chunk per pass) so that one pass fits the memory budget."""
    itemsize = np.dtype(B.dtype_name(target.dtype)).itemsize
    n = sum(target.in_sizes)
    act = target.act_bytes
    M = target.total_outputs
    budget = max_memory or DEFAULT_MAX_MEMORY

    if strategy == "forward":
        total_chunk = max(target.in_sizes)

        def cost(b, c):  # the tangents of c columns for b samples, plus the (b, m, n) result
            return b * c * (2 * act + M * itemsize) + 2 * b * m * n * itemsize
    elif strategy == "pfor":
        total_chunk = m

        def cost(b, c):
            return b * act * (2 + c) + 3 * b * c * n * itemsize
    else:
        total_chunk = min(m, MAX_UNROLL)

        def cost(b, c):  # the taped forward pass, one backward in flight, the result block
            return 2 * b * act + 3 * b * c * n * itemsize

    b = min(batch_size or n_samples, n_samples)
    c = min(chunk_size or total_chunk, total_chunk)
    # Samples per pass first (activations scale with them), then the chunk, then samples again.
    if batch_size is None:
        while b > 1 and cost(b, 1) > budget:
            b = (b + 1) // 2
    if chunk_size is None:
        while c > 1 and cost(b, c) > budget:
            c = (c + 1) // 2
    if batch_size is None:
        while b > 1 and cost(b, c) > budget:
            b = (b + 1) // 2
    if cost(b, c) > budget:
        logger.warning(
            "One pass needs about %.2f GB, more than the memory budget of %.2f GB, even at "
            "batch_size=%d, chunk_size=%d.",
            cost(b, c) / 1e9,
            budget / 1e9,
            b,
            c,
        )
    return b, c


# --------------------------------------------------------------------------------------------------
# The public functions
# --------------------------------------------------------------------------------------------------


@dataclass
class _Run:
    target: _Target
    tensors: list
    selection: _Selection
    strategy: str
    batch_size: int
    chunk_size: int
    training: bool
    jit_compile: bool
    memo: dict = field(default_factory=dict)  # per prepared call: the blocks' seed tensors

    @property
    def n_samples(self) -> int:
        return int(self.tensors[0].shape[0])


def _setup(
    fn,
    x,
    outputs,
    top_k,
    training,
    strategy,
    batch_size,
    chunk_size,
    max_memory,
    jit_compile,
    derivatives=None,
) -> _Run:
    if strategy not in STRATEGIES:
        raise ValueError(invalid_value("strategy", strategy, f"one of {STRATEGIES}"))
    batch_size = _check_positive_int(batch_size, "batch_size")
    chunk_size = _check_positive_int(chunk_size, "chunk_size")
    max_memory = parse_memory(max_memory)
    target, tensors = _prepare_target(fn, x, training, derivatives)
    _infer_outputs(target, tensors)
    selection = _select(target, outputs, top_k)
    n_samples = int(tensors[0].shape[0]) if tensors[0].shape[0] is not None else 1
    if selection.per_sample is not None and len(selection.per_sample) != n_samples:
        raise ValueError(
            f"Per-sample `outputs` has shape {format_shape(selection.per_sample.shape)}: one row "
            f"per sample is expected, ({n_samples}, k) for a batch of {n_samples}."
        )
    if strategy == "auto":
        strategy = _auto_strategy(
            target, tensors, selection, training, n_samples, batch_size, chunk_size, max_memory
        )
    if strategy == "loop_xla":  # the reverse loop, compiled with XLA
        strategy, jit_compile = "loop", True
    if strategy == "forward" and target.rules is not None:
        # Forward mode ignores custom gradients inside tf.function: rules act in reverse mode.
        logger.info("augnet.jacobian: derivative rules are active, using strategy='loop'.")
        strategy = "loop"
    elif strategy == "forward" and training:
        raise ValueError(
            "strategy='forward' computes the model as it predicts only (it runs the forward pass "
            "inside a loop vectorised over the input elements, where training-mode layers such as "
            "Dropout and BatchNorm are not supported); use strategy='loop' or 'pfor' with "
            "training=True."
        )
    elif strategy == "forward" and target.recurrent:
        # TensorFlow's forward mode fails on the RNN while_loop inside tf.function (a cryptic
        # "dtype variant" TypeError from the layer): say so instead.
        raise ValueError(
            "strategy='forward' does not support recurrent layers (LSTM, GRU, RNN): TensorFlow's "
            "forward mode fails on their loops inside tf.function. Use strategy='loop', 'pfor' "
            "or 'auto'."
        )
    b, c = _plan(target, strategy, n_samples, selection.size, batch_size, chunk_size, max_memory)
    logger.debug("augnet.jacobian: strategy=%s batch_size=%d chunk_size=%d", strategy, b, c)
    return _Run(target, tensors, selection, strategy, b, c, training, bool(jit_compile))


def auto_candidates(target: _Target, m: int, training: bool) -> list[str]:
    """The strategies ``"auto"`` considers for ``m`` selected outputs.

    Forward mode alone when a sample's input elements are at most half the selected outputs (a
    tall Jacobian: one pass per input element beats one per output); the loop alone for
    convolutional networks; the loop with and without XLA for recurrent ones; otherwise the
    reverse modes, plus forward mode while the input is not much larger than the output. Forward
    mode is left out with ``training=True`` (it supports inference only), recurrent layers
    (TensorFlow's forward mode fails on their loops) and custom derivative rules (they act in
    reverse mode).
    """
    n = sum(target.in_sizes)
    forward_ok = not training and not target.recurrent and getattr(target, "rules", None) is None
    if forward_ok and 2 * n <= m:
        return ["forward"]
    if _has_convolutions(target.fn):
        # Measured (benchmarks/RESULTS.md, shared/REFERENCE.md): on CPU the reverse loop beats
        # pfor on every convolutional network tried (pfor falls back to a while_loop for
        # depthwise convolutions), and XLA gained at most ~10% there for seconds of compiling;
        # skip timing the candidates.
        return ["loop"]
    if target.recurrent:
        # XLA makes the loop 3-6x faster on the LSTM benchmark; pfor was 4x slower than that and
        # took ~9 s to trace, so timing it would only lengthen the first call.
        return ["loop", "loop_xla"]
    # Small dense networks: every candidate is timed; XLA for the reverse loop only, never forward
    # mode, where XLA gave wrong JVPs through MaxPooling2D.
    candidates = ["loop", "pfor", "loop_xla"]
    if forward_ok and n <= 8 * m:
        candidates.append("forward")
    return candidates


def _has_convolutions(fn) -> bool:
    stack = list(getattr(fn, "layers", None) or [])
    while stack:
        layer = stack.pop()
        if "Conv" in type(layer).__name__:
            return True
        stack.extend(getattr(layer, "layers", None) or [])
    return False


def _auto_strategy(
    target, tensors, selection, training, n_samples, batch_size, chunk_size, max_memory
):
    """Resolves ``strategy="auto"``: by rule where one candidate is left, else by timing one block
    of each candidate once per callable and input signature (cached), extrapolated to the job."""
    candidates = auto_candidates(target, selection.size, training)
    if len(candidates) == 1:
        return candidates[0]
    if B.is_symbolic():  # no timing inside a caller's tf.function: the reverse loop
        return candidates[0]
    key = (
        "auto",
        tuple(target.in_shapes),
        B.dtype_name(target.dtype),
        training,
        selection.size,
        n_samples,
        batch_size,
        chunk_size,
        max_memory,
        target.in_structure,
    )
    cache = _cache_for(target.fn)
    if key not in cache:
        runs = {}
        for name in candidates:
            kind, jit = ("loop", True) if name == "loop_xla" else (name, False)
            b, c = _plan(
                target, kind, n_samples, selection.size, batch_size, chunk_size, max_memory
            )
            runs[name] = _Run(target, tensors, selection, kind, b, c, training, jit)
        estimates = _probe_estimates(runs)
        if not estimates:
            return "loop"
        best = min(estimates, key=estimates.get)
        first = candidates[0]  # the reverse loop
        if first in estimates and estimates[best] > _AUTO_MARGIN * estimates[first]:
            # A near tie goes to the loop: strategies differ in the last bits, and a choice that
            # flipped with timing noise would make two runs (or a reloaded model) differ.
            best = first
        cache[key] = best
        logger.debug("augnet: auto strategy estimates (s): %s -> %s", estimates, cache[key])
    return cache[key]


def _probe_estimates(runs: dict) -> dict:
    """``{name: seconds}``: how long the whole job would take with each candidate run, from timed
    blocks after a warm-up; candidates TensorFlow cannot run here are left out.

    The candidates are timed in turns (one call each per round) so that drift in the machine's
    speed hits them alike, each for at least 3 calls and, for fast ones, up to ~20 ms of calls:
    a few sub-millisecond calls are too noisy to rank strategies by. Each takes its best call.
    """
    calls = {}
    for name, run in runs.items():
        try:
            call, blocks = _probe_call(run)
            call()  # trace and warm up
            calls[name] = (call, blocks)
        except Exception as exc:  # a strategy TensorFlow cannot run here: skip it
            logger.debug("augnet: strategy %r failed in the auto probe: %s", name, exc)
    best = dict.fromkeys(calls, math.inf)
    spent = dict.fromkeys(calls, 0.0)
    for reps in range(50):
        if reps >= 3 and all(t >= 0.02 for t in spent.values()):
            break
        for name, (call, _) in calls.items():
            t0 = time.perf_counter()
            call()
            elapsed = time.perf_counter() - t0
            best[name] = min(best[name], elapsed)
            spent[name] += elapsed
    return {name: best[name] * blocks for name, (_, blocks) in calls.items()}


def _probe_call(run: _Run) -> tuple[Callable, int]:
    """A call computing one block of ``run`` (to NumPy, as the job would), and the number of such
    blocks in the whole job."""
    target, sel = run.target, run.selection
    b = min(run.batch_size, run.n_samples)
    xs = [t[:b] for t in run.tensors]
    rows = np.arange(sel.size) if sel.rows is None else sel.rows  # top_k: any k rows cost the same
    rows = np.broadcast_to(rows, (b, sel.size))
    sample_blocks = math.ceil(run.n_samples / b)
    if run.strategy == "forward":
        all_outputs = sel.full  # (never with top_k)
        fn = _compiled(target, "forward", run.training, run.jit_compile, extra=(0, all_outputs))
        c = min(run.chunk_size, target.in_sizes[0])
        args = (xs, B.convert(np.arange(c), "int32"), B.convert(rows, "int32"))
        blocks = sample_blocks * sum(math.ceil(n / run.chunk_size) for n in target.in_sizes)
    else:
        c = min(run.chunk_size, sel.size)
        width = c if run.strategy == "loop" else None
        fn = _compiled(target, run.strategy, run.training, run.jit_compile, extra=width)
        # Tensors, as the job passes them (NumPy arguments take a slower call path).
        args = (xs, B.convert(np.ascontiguousarray(rows[:, :c]), "int32"))
        blocks = sample_blocks * math.ceil(sel.size / c)

    def call():
        _values_to_numpy(fn(*args))

    return call, blocks


def _iter_blocks(run: _Run) -> Iterator[tuple[slice, np.ndarray, list]]:
    """Yields ``(samples, columns, output_indices, [ (b, c, *in_shape_i) per input ])`` as NumPy.

    ``samples`` and ``columns`` are the block's slices of the ``(batch, m)`` selected rows.
    """
    target, sel = run.target, run.selection
    n_samples = run.n_samples
    kind = run.strategy
    for s0 in range(0, n_samples, run.batch_size):
        s1 = min(n_samples, s0 + run.batch_size)
        xs = run.tensors if s1 - s0 == n_samples else [t[s0:s1] for t in run.tensors]
        b = s1 - s0
        if sel.top_k is not None:
            predict = _compiled(target, "predict", run.training, run.jit_compile)
            preds = B.to_numpy(predict(xs))
            order = np.argsort(-preds, axis=1, kind="stable")[:, : sel.top_k]
            rows_all = order.astype(np.int64)  # (b, k)
        elif sel.per_sample is not None:
            rows_all = sel.per_sample[s0:s1]  # (b, k)
        else:
            rows_all = np.broadcast_to(sel.rows, (b, len(sel.rows)))
        if kind == "forward":
            all_outputs = sel.full  # (never with top_k)
            sel_t = _memo(run, ("rows", b), lambda r=rows_all: r, fixed=sel.rows is not None)
            values = []
            for i, (n_i, shape) in enumerate(zip(target.in_sizes, target.in_shapes)):
                fwd = _compiled(
                    target, "forward", run.training, run.jit_compile, extra=(i, all_outputs)
                )
                if run.chunk_size >= n_i:  # one pass: its result is the block
                    cols = _memo(run, ("cols", 0, n_i), lambda n_i=n_i: np.arange(n_i))
                    values.append(B.to_numpy(fwd(xs, cols, sel_t)).reshape(b, sel.size, *shape))
                    continue
                value = np.empty((b, sel.size, *shape), dtype=B.dtype_name(target.dtype))
                flat = value.reshape(b, sel.size, n_i)
                for c0 in range(0, n_i, run.chunk_size):
                    c1 = min(n_i, c0 + run.chunk_size)
                    cols = _memo(run, ("cols", c0, c1), lambda c0=c0, c1=c1: np.arange(c0, c1))
                    flat[:, :, c0:c1] = B.to_numpy(fwd(xs, cols, sel_t))
                values.append(value)
            outs = rows_all if sel.rows is None else sel.rows
            yield slice(s0, s1), slice(0, sel.size), outs, values
        else:
            for c0 in range(0, sel.size, run.chunk_size):
                c1 = min(sel.size, c0 + run.chunk_size)
                chunk = _memo(
                    run,
                    ("rows", b, c0, c1),
                    lambda r=rows_all, c0=c0, c1=c1: r[:, c0:c1],
                    fixed=sel.rows is not None,
                )
                width = c1 - c0 if kind == "loop" else None  # the loop is unrolled: static width
                rev = _compiled(target, kind, run.training, run.jit_compile, extra=width)
                outs = rows_all[:, c0:c1] if sel.rows is None else sel.rows[c0:c1]
                yield slice(s0, s1), slice(c0, c1), outs, _values_to_numpy(rev(xs, chunk))


def _memo(run: _Run, key, make, fixed: bool = True):
    """``make()`` as an int32 tensor, remembered in the prepared call when ``fixed`` (the same on
    every call with these options: seeds and columns, not top_k's per-sample rows)."""
    value = run.memo.get(key) if fixed else None
    if value is None:
        value = B.convert(np.ascontiguousarray(make()), "int32")
        if fixed:
            run.memo[key] = value
    return value


def _values_to_numpy(values) -> list:
    """A block's values per input: a NumPy array ``(b, c, *in_shape)``, or (the loop) the list of
    c ``(b, *in_shape)`` result tensors, which the caller copies once, straight into its result
    (:func:`_write_block`), through zero-copy views that live only while the tensors do."""
    if not isinstance(values, list | tuple):  # forward mode: one tensor
        return B.to_numpy(values)
    return [list(v) if isinstance(v, list | tuple) else B.to_numpy(v) for v in values]


def _write_block(out: np.ndarray, samples: slice, columns: slice, value) -> None:
    """``out[samples, columns] = value`` for either form of :func:`_values_to_numpy`."""
    if isinstance(value, list):
        for j, column in enumerate(value):
            out[samples, columns.start + j] = B.numpy_view(column)
    else:
        out[samples, columns] = value


def _owned(value, like: np.ndarray) -> bool:
    """Whether ``value`` can stand in for the result array ``like``: a writable array of its own
    (not a view of a tensor) with the same shape and dtype."""
    return (
        isinstance(value, np.ndarray)
        and value.flags.writeable
        and value.flags.c_contiguous
        and value.shape == like.shape
        and value.dtype == like.dtype
    )


def _stacked(value) -> np.ndarray:
    if isinstance(value, list):
        return np.stack([B.numpy_view(t) for t in value], axis=1)
    return value


def _restore_state(fn, training: bool):
    """Snapshots a Keras model's non-trainable state; returns a function that restores it.

    Inference calls change nothing, and training-mode calls run statelessly; this is a second line
    of defence for custom layers that assign to their variables in ``call`` with ``training=True``.
    """
    keep = training and _is_keras_layer(fn)
    variables = list(getattr(fn, "non_trainable_variables", []) or []) if keep else []
    saved = [np.array(v.numpy()) for v in variables]

    def restore():
        for v, value in zip(variables, saved):
            if not np.array_equal(v.numpy(), value):
                v.assign(value)

    return restore


def iter_jacobian(
    fn,
    x,
    *,
    outputs=None,
    top_k: int | None = None,
    training: bool = False,
    strategy: str = "auto",
    batch_size: int | None = None,
    chunk_size: int | None = None,
    max_memory=None,
    jit_compile: bool = False,
    derivatives=None,
) -> Iterator[JacobianChunk]:
    """Streams the per-sample Jacobian block by block, in bounded memory.

    Same arguments as :func:`jacobian`. Each block covers ``batch_size`` samples and ``chunk_size``
    outputs (all selected outputs at once in forward mode), so that one pass fits ``max_memory``.

    Yields:
        :class:`JacobianChunk` ``(samples, outputs, values)`` with ``values`` of shape
        ``(b, c, *input_shape)`` (a list/dict per input for several inputs) and ``outputs`` the flat
        indices of its rows (``(c,)``, or ``(b, c)`` per sample with ``top_k``).

    Example:
        >>> for chunk in augnet.iter_jacobian(model, x, max_memory="2GB"):  # doctest: +SKIP
        ...     out[chunk.samples, chunk_start:chunk_end] = chunk.values
    """
    if B.is_symbolic():
        raise RuntimeError(
            "iter_jacobian runs eagerly; inside tf.function call augnet.jacobian instead."
        )
    run = _setup(
        fn,
        x,
        outputs,
        top_k,
        training,
        strategy,
        batch_size,
        chunk_size,
        max_memory,
        jit_compile,
        derivatives,
    )
    restore = _restore_state(fn, run.training)
    try:
        for samples, columns, outs, values in _iter_blocks(run):
            values = [_stacked(v) for v in values]
            yield JacobianChunk(
                samples, np.asarray(outs), unflatten(values, run.target.in_structure), columns
            )
    finally:
        restore()


def jacobian(
    fn,
    x,
    *,
    outputs=None,
    top_k: int | None = None,
    training: bool = False,
    strategy: str = "auto",
    batch_size: int | None = None,
    chunk_size: int | None = None,
    max_memory=None,
    jit_compile: bool = False,
    derivatives=None,
    wrt=None,
):
    """The exact per-sample Jacobian ∂fn(x)/∂x.

    Args:
        fn: a ``keras.Model`` (called as ``fn(x, training=training)``) or any callable built of
            TensorFlow ops (called as ``fn(x)``). Samples must be independent (no batch statistics).
        x: ``(batch, *input_shape)`` NumPy array or tensor, or a list/tuple/dict of them for a
            model with several inputs. Cast to the model's input dtype (float16/32/64 kept).
        outputs: select output elements by flat index (per sample): ``[0, 3, 7]`` gives
            ``(batch, 3, *input_shape)``. For a model with several outputs, a list/dict with one
            entry per output (a list of indices, or ``None`` for all of it). Per-sample
            selection (a model with one output): a ``(batch, k)`` integer array whose row ``i``
            holds sample ``i``'s flat output indices, giving ``(batch, k, *input_shape)`` with
            ``J[i, j] = ∂y[i, outputs[i, j]]/∂x[i]`` (what ``top_k`` does with its own indices;
            attribution methods use it to follow each sample's class through noisy copies).
        top_k: per sample, the Jacobians of the ``k`` largest outputs (classifiers); returns a
            :class:`TopKJacobian` ``(jacobian, indices, values)``.
        training: ``False`` (default): the model as it predicts (Dropout off, BatchNorm on its moving
            statistics). ``True``: the training-mode forward pass. Dropout applies one random mask
            (from the layer's seed state, which is not advanced: repeated calls agree). BatchNorm
            uses the statistics of each pass's batch, which couples the samples: sample ``i``'s
            rows are ``sum_b ∂y_b/∂x_i`` over the pass's batch (what
            ``tf.GradientTape.batch_jacobian`` gives), not ``∂y_i/∂x_i``; exactly zero for Dense +
            BatchNorm at batch 1. Never changes the model: BatchNorm statistics are kept.
        strategy: ``"auto"`` (default), ``"loop"``, ``"pfor"``, ``"forward"`` or ``"loop_xla"``
            (the loop compiled with XLA); all give the same numbers to float rounding (see the
            module docstring).
        batch_size: samples per pass (default: all, within ``max_memory``).
        chunk_size: outputs per pass (input elements per pass in forward mode).
        max_memory: a budget for one pass's intermediates, bytes or a string like ``"2GB"``
            (default 2 GiB); the result itself is on top of it. For Jacobians larger than memory,
            use :func:`iter_jacobian` or :func:`jacobian_to_npy`.
        jit_compile: compile with XLA. Off by default: on CPU it was slower in our benchmarks.
        derivatives: ``{LayerClass: rule}`` custom derivative rules for this call, on top of those
            registered with ``augnet.register_derivative`` (see ``augnet._derivatives``). A Keras
            layer with no gradient path and no rule raises ``augnet.GradientPathError``.
        wrt: the name of a layer of ``fn`` (a Keras model): the Jacobian of the outputs with
            respect to that layer's output activation instead, ``(batch, *output_shape,
            *activation_shape)`` (see ``augnet.jacobian_wrt``).

    Returns:
        ``(batch, *output_shape, *input_shape)`` — a NumPy array when called eagerly, a tensor when
        traced inside ``tf.function``. With ``outputs=`` the output axes become ``(k,)``. For a
        model with several inputs or outputs, ``J[out][in]``: the outer list/dict follows the
        model's outputs, the inner one the inputs as given. Outputs that do not depend on an input
        give zeros.

    Raises:
        ValueError: a missing batch axis, a wrong shape or number of inputs, an output index out
            of range, an invalid option.
        TypeError: a non-numeric input, or an integer model input (not differentiable).

    Example:
        >>> import numpy as np, keras, augnet
        >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        >>> J = augnet.jacobian(model, np.ones((5, 3), "float32"))
        >>> J.shape
        (5, 2, 3)
        >>> np.allclose(J[0], model.layers[0].kernel.numpy().T)
        True
    """
    if wrt is not None:
        from augnet._analysis import jacobian_wrt

        return jacobian_wrt(
            fn,
            x,
            wrt,
            outputs=outputs,
            top_k=top_k,
            training=training,
            strategy=strategy,
            batch_size=batch_size,
            chunk_size=chunk_size,
            max_memory=max_memory,
            jit_compile=jit_compile,
            derivatives=derivatives,
        )
    options = (outputs, top_k, training, strategy, batch_size, chunk_size, max_memory, jit_compile)
    run = _prepared(fn, x, options, derivatives)
    if B.is_symbolic():
        return _symbolic_jacobian(run)
    target, sel = run.target, run.selection
    n_samples = run.n_samples
    dtype = B.dtype_name(target.dtype)
    results = [np.empty((n_samples, sel.size, *s), dtype=dtype) for s in target.in_shapes]
    indices = np.empty((n_samples, sel.size), dtype=np.int64) if sel.top_k is not None else None
    restore = _restore_state(fn, run.training)
    try:
        whole = (slice(0, n_samples), slice(0, sel.size))
        for samples, columns, outs, values in _iter_blocks(run):
            for i, v in enumerate(values):
                if (samples, columns) == whole and _owned(v, results[i]):
                    results[i] = v  # one block is the whole result: no copy
                else:
                    _write_block(results[i], samples, columns, v)
            if indices is not None:
                indices[samples, columns] = outs
    finally:
        restore()
    return _assemble(run, results, indices)


def _prepared(fn, x, options: tuple, derivatives) -> _Run:
    """``_setup(fn, x, *options, derivatives)``, remembered per callable for repeated eager calls
    with one array of the same shape and dtype and the same options.

    Checking and converting the arguments, finding the outputs and planning cost ~0.2 ms per call
    (more for a subclassed model, which needs a probe forward pass): as much as a small model's
    whole Jacobian. A cached plan is reused with the new input converted; anything else (lists,
    dicts, per-call ``derivatives``, inside ``tf.function``) is prepared afresh.
    """
    key = _call_key(x, options, derivatives)
    plans = _cache_for(fn).setdefault("plans", OrderedDict()) if key is not None else None
    if plans is not None:
        plan = plans.get(key)
        if plan is not None:
            plans.move_to_end(key)
            return replace(plan, tensors=[B.convert(x, plan.target.dtype)])  # memo shared
    run = _setup(fn, x, *options, derivatives)
    if plans is not None:
        plans[key] = replace(run, tensors=[])  # not the caller's data
        while len(plans) > _MAX_PLANS:
            plans.popitem(last=False)
    return run


def _call_key(x, options: tuple, derivatives):
    """A hashable key for a prepared call, or ``None`` where the call must be prepared afresh."""
    if derivatives is not None or B.is_symbolic():
        return None
    if isinstance(x, np.ndarray):
        sig = ("ndarray", x.shape, x.dtype)
    elif B.is_eager_tensor(x):
        sig = ("tensor", x.shape, x.dtype)  # TensorShape and DType hash by value
    else:
        return None
    outputs = options[0]
    if outputs is not None:
        if not isinstance(outputs, list | tuple | range) or not all(
            isinstance(o, int) and not isinstance(o, bool) for o in outputs
        ):
            return None
        outputs = (type(outputs).__name__, tuple(outputs))
    rest = options[1:]
    try:
        hash(rest)
    except TypeError:
        return None
    from augnet._derivatives import registry_key

    return ("call", sig, outputs, rest, registry_key(), _floatx_name())


# Inside a caller's tf.function, autograph would rewrite this whole module's source on the first
# call (12-30 s on a 2-core CPU, measured) for nothing: the engine has no tensor-dependent Python
# control flow. TensorFlow calls a function carrying this marker as it is, and so everything it
# calls (tf.autograph.experimental.do_not_convert sets the same marker, but would also switch
# autograph off inside the caller's model).
jacobian.autograph_info__ = None


def _assemble(run: _Run, results: list, indices):
    """Reshapes ``(batch, m, *in_shape)`` blocks into the documented nesting."""
    target, sel = run.target, run.selection
    symbolic = not isinstance(results[0], np.ndarray)

    def reshape(a, shape):
        return B.reshape(a, (-1, *shape)) if symbolic else a.reshape((a.shape[0], *shape))

    if sel.top_k is not None:
        jac = unflatten(results, target.in_structure)
        if symbolic:
            return TopKJacobian(jac, indices[0], indices[1])
        preds = _outputs_at(run, indices)
        return TopKJacobian(jac, indices, preds)
    per_output = []
    for o, group in enumerate(sel.groups):
        start, stop = group
        inner = []
        for res, in_shape in zip(results, target.in_shapes):
            block = res[:, start:stop]
            out_shape = target.out_shapes[o] if sel.full else (stop - start,)
            inner.append(reshape(block, (*out_shape, *in_shape)))
        per_output.append(unflatten(inner, target.in_structure))
    return unflatten(per_output, target.out_structure)


def _outputs_at(run: _Run, indices: np.ndarray) -> np.ndarray:
    predict = _compiled(run.target, "predict", run.training, run.jit_compile)
    values = np.empty(indices.shape, dtype=B.dtype_name(run.target.dtype))
    for s0 in range(0, run.n_samples, run.batch_size):
        s1 = min(run.n_samples, s0 + run.batch_size)
        preds = B.to_numpy(predict([t[s0:s1] for t in run.tensors]))
        values[s0:s1] = np.take_along_axis(preds, indices[s0:s1], axis=1)
    return values


def _symbolic_jacobian(run: _Run):
    """Inside ``tf.function``: one pass over the whole (symbolic) batch, returning tensors."""
    import tensorflow as tf

    target, sel = run.target, run.selection
    xs = run.tensors
    b = tf.shape(xs[0])[0]
    topk = None
    if sel.top_k is not None:
        values, idx = B.top_k(target.flat_output(xs), sel.top_k)
        rows = idx
        topk = (idx, values)
    elif sel.per_sample is not None:
        rows = tf.constant(sel.per_sample, dtype=tf.int32)
    else:
        rows = tf.tile(tf.constant(sel.rows, dtype=tf.int32)[None], (b, 1))
        rows = tf.ensure_shape(rows, (None, sel.size))
    if run.strategy == "forward":
        results = []
        for i, (n_i, shape) in enumerate(zip(target.in_sizes, target.in_shapes)):
            block = _forward_block(target, i, sel.full)(
                xs, tf.range(n_i, dtype=tf.int32), tf.cast(rows, tf.int32)
            )
            results.append(tf.reshape(block, (b, sel.size, *shape)))
    else:
        results = _reverse_block(target, run.strategy == "pfor")(xs, tf.cast(rows, tf.int32))
    return _assemble(run, results, topk)


def jacobian_to_npy(fn, x, path, *, overwrite: bool = False, **kwargs) -> Path:
    """Streams the Jacobian of a single-input model into a ``.npy`` file, pass by pass.

    The file holds ``(batch, m, *input_shape)`` (``m`` the selected outputs, all of them flattened
    by default) and is written under a temporary name, then renamed: a file at ``path`` is always
    complete. Peak memory is one pass's (``max_memory``), not the whole Jacobian.

    Args:
        fn, x: as in :func:`jacobian` (one input).
        path: the ``.npy`` file to write.
        overwrite: replace an existing file (otherwise ``FileExistsError``).
        **kwargs: ``outputs``, ``training``, ``strategy``, ``batch_size``, ``chunk_size``,
            ``max_memory``, ``jit_compile`` as in :func:`jacobian` (not ``top_k``).

    Returns:
        The path written, which ``np.load(path, mmap_mode="r")`` opens without reading it all.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{str(path)!r} exists; pass overwrite=True to replace it.")
    if "top_k" in kwargs:
        raise ValueError("jacobian_to_npy does not take `top_k`; select outputs with `outputs=`.")
    allowed = {
        "outputs",
        "training",
        "strategy",
        "batch_size",
        "chunk_size",
        "max_memory",
        "jit_compile",
        "derivatives",
    }
    unknown = set(kwargs) - allowed
    if unknown:
        raise TypeError(
            f"jacobian_to_npy() got unexpected keyword arguments {sorted(unknown)}; expected some of {sorted(allowed)}."
        )
    run = _setup(
        fn,
        x,
        kwargs.get("outputs"),
        None,
        kwargs.get("training", False),
        kwargs.get("strategy", "auto"),
        kwargs.get("batch_size"),
        kwargs.get("chunk_size"),
        kwargs.get("max_memory"),
        kwargs.get("jit_compile", False),
        kwargs.get("derivatives"),
    )
    if len(run.target.in_shapes) != 1:
        raise ValueError(
            f"jacobian_to_npy writes one array, but the model has {len(run.target.in_shapes)} inputs; "
            "use iter_jacobian and write each input's blocks yourself."
        )
    shape = (run.n_samples, run.selection.size, *run.target.in_shapes[0])
    dtype = np.dtype(B.dtype_name(run.target.dtype))
    row_bytes = int(np.prod(shape[2:], dtype=np.int64)) * dtype.itemsize  # one (sample, output)
    tmp = path.with_name(path.name + ".partial")
    restore = _restore_state(fn, run.training)
    try:
        # Positioned writes, not a memory map: the pages of a written map count in the process's
        # resident memory, which would grow with the whole Jacobian instead of one pass.
        with open(tmp, "wb") as f:
            np.lib.format.write_array_header_1_0(
                f,
                {
                    "descr": np.lib.format.dtype_to_descr(dtype),
                    "fortran_order": False,
                    "shape": shape,
                },
            )
            offset = f.tell()
            f.truncate(offset + shape[0] * shape[1] * row_bytes)
            for samples, columns, _, values in _iter_blocks(run):
                block = np.ascontiguousarray(_stacked(values[0]), dtype=dtype)
                for i, s in enumerate(range(samples.start, samples.stop)):
                    start = offset + (s * shape[1] + columns.start) * row_bytes
                    os.pwrite(f.fileno(), block[i].tobytes(), start)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        raise
    finally:
        restore()
    return path


__all__ = [
    "STRATEGIES",
    "JacobianChunk",
    "TopKJacobian",
    "auto_candidates",
    "iter_jacobian",
    "jacobian",
    "jacobian_to_npy",
    "parse_memory",
    "trace_count",
]
