"""The shared base of the attribution methods: inputs, options, output selection, batching.

Every method works on a :class:`Problem`: the model, its inputs as a flat list of NumPy arrays
(remembering how the caller nested them), the clean predictions, which output rows are explained
for each sample, and the memory options. The gradient methods then differentiate through the
engine's public functions only (``augnet.jacobian`` / ``augnet.iter_jacobian``), with NumPy above
them, so they run on whatever backend the engine supports:

- :func:`stream_sums`: for each sample ``i`` and each of its selected outputs, ``Σ_j w_j J(p_ij)``
  (or the running mean and spread of ``J(p_ij)``) over points ``p_ij`` that a method makes (noisy
  copies, points on a path). The points of all samples are stacked into the batch axis and made
  in rounds that fit the memory budget; each round goes through ``augnet.iter_jacobian`` once,
  for all selected outputs at once, and its blocks are folded into running sums as they come.
  Memory is the budget plus the result, however many points.
- :func:`predict_flat`: the model's outputs, flattened and concatenated, evaluated in batches.

Output selection follows the engine: ``outputs=None`` (all), flat indices ``[0, 3]``, a
``(batch, k)`` array (per sample), a list/dict per output for several outputs, or ``top_k`` --
chosen on the clean input, so that every noisy copy or path point of sample ``i`` differentiates
sample ``i``'s own outputs (the engine's per-sample ``outputs=``).
"""

from __future__ import annotations

import math
import numbers
import os
import re
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from augnet._errors import format_shape, invalid_value
from augnet._structure import DICT, SINGLE, Structure, check_against_spec, check_numeric, flatten
from augnet._structure import unflatten as _unflatten

DEFAULT_MAX_MEMORY = 2 * 1024**3  # bytes per pass when max_memory is not given (the engine's)
MIN_ROUND = 32  # points per round when a job is split for overlap
POINTS_SHARE = 8  # a round's points take at most max_memory / POINTS_SHARE (two rounds live)
ENGINE_OPTIONS = ("strategy", "chunk_size", "jit_compile", "derivatives")


class Attribution(NamedTuple):
    """Attributions with the data that came with them.

    Attributes:
        attributions: one map per selected output, ``(batch, k, *input_shape)`` (nested as
            ``return_jacobian``'s result for several inputs or outputs).
        indices: ``(batch, k)`` the flat output index each map explains (into the model's
            outputs, flattened and concatenated).
        values: ``(batch, k)`` the model's outputs there, on the clean input.
        method: the method's name, e.g. ``"integrated_gradients"``.
        delta: integrated gradients only: ``(batch, k)`` the completeness gap
            ``Σ attributions − (f(x) − f(baseline))`` per sample and output (captum's delta).
        layer: Grad-CAM only: the layer whose activation was used (``"outer/inner"`` inside a
            nested model).
    """

    attributions: Any
    indices: np.ndarray
    values: np.ndarray
    method: str
    delta: np.ndarray | None = None
    layer: str | None = None


# --------------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------------


def check_positive_int(value, argument: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(invalid_value(argument, value, f"an integer >= {minimum}"))
    return int(value)


def check_nonnegative_float(value, argument: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value >= 0:
        raise ValueError(invalid_value(argument, value, "a number >= 0"))
    if not math.isfinite(float(value)):
        raise ValueError(invalid_value(argument, value, "a finite number >= 0"))
    return float(value)


def check_choice(value, argument: str, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(invalid_value(argument, value, f"one of {tuple(choices)}"))
    return value


_UNITS = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 1024, "mib": 1024**2}
_UNITS.update({"gib": 1024**3, "k": 1e3, "m": 1e6, "g": 1e9, "tb": 1e12, "tib": 1024**4})


def parse_memory(value) -> int:
    """``max_memory`` in bytes (``"2GB"``, ``"512MiB"``, ``2e9``); the engine's default for ``None``."""
    if value is None:
        return DEFAULT_MAX_MEMORY
    if isinstance(value, numbers.Real) and not isinstance(value, bool) and value > 0:
        return int(value)
    if isinstance(value, str):
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", value)
        if match and match.group(2).lower() in _UNITS and float(match.group(1)) > 0:
            return int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    raise ValueError(
        invalid_value(
            "max_memory", value, "a positive number of bytes or a string like '2GB', '512MB'"
        )
    )


def engine_options(engine: dict, method: str) -> dict:
    """The engine options passed through ``**engine``; anything else is a clear TypeError."""
    unknown = sorted(set(engine) - set(ENGINE_OPTIONS))
    if unknown:
        raise TypeError(
            f"{method}() got unexpected keyword argument(s) {unknown}; besides its own options "
            f"it takes the engine's {list(ENGINE_OPTIONS)} (see help(augnet.{method}))."
        )
    return engine


def make_rng(seed) -> np.random.Generator:
    """``seed``: ``None`` (fresh entropy), an int, or a ``numpy.random.Generator`` (used as is)."""
    if isinstance(seed, np.random.Generator):
        return seed
    if seed is None or (isinstance(seed, numbers.Integral) and not isinstance(seed, bool)):
        return np.random.default_rng(seed)
    raise TypeError(invalid_value("seed", seed, "None, an integer or a numpy.random.Generator"))


# --------------------------------------------------------------------------------------------------
# The model: calling it, its inputs' dtypes, its size
# --------------------------------------------------------------------------------------------------


def _is_keras_model(model) -> bool:
    try:
        import keras
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, keras.Model)


def symbolic_inputs(model) -> list | None:
    """A Keras model's symbolic inputs as a flat list, or ``None`` (subclassed, a callable)."""
    if not _is_keras_model(model):
        return None
    try:
        inputs = model.inputs
    except (AttributeError, ValueError):
        return None
    return list(inputs) if inputs else None


def symbolic_io(model, which: str):
    """A Keras model's symbolic inputs or outputs (``which``: ``"input"`` or ``"output"``) with
    their nesting (one tensor for one), or ``None``."""
    try:
        return getattr(model, which)
    except (AttributeError, ValueError):
        pass
    try:
        leaves = list(getattr(model, which + "s"))
    except (AttributeError, ValueError, TypeError):
        return None
    if not leaves:
        return None
    return leaves[0] if len(leaves) == 1 else leaves


def to_numpy(value) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    try:
        import keras

        return np.asarray(keras.ops.convert_to_numpy(value))
    except Exception:
        return np.asarray(value)


_ACT_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _activation_bytes(model, itemsize: int, fallback: int) -> int:
    """Rough bytes of activations per sample: the sum of the layers' output sizes (the model's
    layers do not change: computed once per model)."""
    try:
        cache = _ACT_CACHE.setdefault(model, {})
    except TypeError:
        cache = {}
    if itemsize not in cache:
        cache[itemsize] = _sum_layer_outputs(model, itemsize)
    return max(cache[itemsize], fallback)


def _sum_layer_outputs(model, itemsize: int) -> int:
    total = 0
    stack = list(getattr(model, "layers", None) or [])
    while stack:
        layer = stack.pop()
        stack.extend(getattr(layer, "layers", None) or [])
        try:
            outs, _ = flatten(layer.output, "output")
            for o in outs:
                total += int(np.prod([d or 1 for d in o.shape[1:]])) * itemsize
        except Exception:
            continue
    return total


# --------------------------------------------------------------------------------------------------
# The problem: inputs, outputs, selection
# --------------------------------------------------------------------------------------------------


@dataclass
class Problem:
    """One attribution job: the model, its inputs and what is explained (see module docstring)."""

    model: Any
    leaves: list  # the inputs, (batch, *input_shape_i) NumPy arrays in the model's dtype
    structure: Structure  # how the caller nested them
    dtype: np.dtype
    out_structure: Structure
    out_shapes: list  # per output, the per-sample shape
    predictions: np.ndarray  # (batch, M) on the clean input, outputs flattened and concatenated
    kind: str  # "all", "shared" or "per_sample"
    rows: np.ndarray  # (m,) flat indices ("all", "shared") or (batch, k) ("per_sample")
    engine_outputs: Any  # what the engine's `outputs=` takes for the shared selection
    groups: list  # per output, its (start, stop) among the m selected rows
    full: bool  # every output in order: maps take the output shapes
    batch_size: int | None
    max_memory: int
    engine: dict = field(default_factory=dict)
    act_bytes: int = 0  # estimated activation bytes per sample
    order: list | None = None  # per model input (model.inputs order), the index of its leaf

    @property
    def batch(self) -> int:
        return int(self.leaves[0].shape[0])

    @property
    def m(self) -> int:
        return int(self.rows.shape[-1])

    @property
    def in_shapes(self) -> list[tuple]:
        return [tuple(a.shape[1:]) for a in self.leaves]

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize

    def indices(self) -> np.ndarray:
        """``(batch, m)`` the flat output index of each selected row, per sample."""
        if self.kind == "per_sample":
            return self.rows.copy()
        return np.broadcast_to(self.rows, (self.batch, self.m)).copy()

    def values(self) -> np.ndarray:
        """``(batch, m)`` the clean predictions at the selected rows."""
        return self.selected(self.predictions, np.arange(self.batch))

    def selected(self, flat: np.ndarray, owners: np.ndarray) -> np.ndarray:
        """``(r, m)`` the selected rows of flat predictions ``(r, M)`` made from samples
        ``owners`` ``(r,)``."""
        if self.kind == "per_sample":
            return np.take_along_axis(flat, self.rows[owners], axis=1)
        if self.kind == "all":
            return flat
        return flat[:, self.rows]

    def outputs_for(self, owners: np.ndarray):
        """The engine's ``outputs=`` for a stacked batch whose row ``r`` belongs to sample
        ``owners[r]``."""
        if self.kind == "per_sample":
            return self.rows[owners]
        return self.engine_outputs

    def wrap(self, leaves: list):
        """Inputs in the caller's nesting, for the model or the engine."""
        return _unflatten(leaves, self.structure)

    def model_order(self, leaves: list) -> list:
        """``leaves`` (the caller's order) in the order of ``model.inputs``."""
        return list(leaves) if self.order is None else [leaves[i] for i in self.order]

    def leaves_of(self, value) -> list:
        """The flat list of per-input arrays from a value nested like the inputs."""
        if self.structure.kind == SINGLE:
            return [value]
        if self.structure.kind == DICT:
            return [value[k] for k in self.structure.keys]
        return list(value)

    def flat_rows(self, jacobian) -> list[np.ndarray]:
        """``augnet.jacobian``'s nested result -> one ``(batch, m, *input_shape_i)`` per input."""
        if len(self.out_shapes) == 1:
            per_output = [jacobian]
        elif self.out_structure.kind == DICT:
            per_output = [jacobian[k] for k in self.out_structure.keys]
        else:
            per_output = list(jacobian)
        flat = []
        for i, shape in enumerate(self.in_shapes):
            parts = []
            for o, value in enumerate(per_output):
                leaf = to_numpy(self.leaves_of(value)[i])
                start, stop = self.groups[o]
                parts.append(leaf.reshape(leaf.shape[0], stop - start, *shape))
            flat.append(parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1))
        return flat

    def assemble(self, flat: list[np.ndarray]):
        """One ``(batch, m, *input_shape_i)`` per input -> the documented nesting: per output
        ``(batch, k, *input_shape)`` (``(batch, *output_shape, *input_shape)`` when every output
        is selected), ``J[out][in]`` for several inputs or outputs."""
        per_output = []
        for o, (start, stop) in enumerate(self.groups):
            out_shape = self.out_shapes[o] if self.full else (stop - start,)
            inner = [
                np.ascontiguousarray(f[:, start:stop]).reshape(f.shape[0], *out_shape, *shape)
                for f, shape in zip(flat, self.in_shapes)
            ]
            per_output.append(_unflatten(inner, self.structure))
        if len(self.groups) == 1:
            return per_output[0]
        return _unflatten(per_output, self.out_structure)

    def result(self, flat: list[np.ndarray], method: str, *, extra: bool = False, **fields):
        """The maps, as an :class:`Attribution` when there is data to return with them (top-k
        or per-sample indices, ``extra`` methods), else the bare (nested) array."""
        maps = self.assemble([f.astype(self.dtype, copy=False) for f in flat])
        if not extra and self.kind != "per_sample":
            return maps
        return Attribution(maps, self.indices(), self.values(), method, **fields)


def prepare(
    model,
    x,
    *,
    outputs=None,
    top_k=None,
    batch_size=None,
    max_memory=None,
    engine: dict | None = None,
    defer: bool = False,
) -> Problem:
    """Checks the arguments, converts the inputs, predicts once and resolves the selection.

    ``defer``: stop before predicting; the caller sets ``problem.predictions`` (with
    :func:`predict_flat`, ``learn=True``) and calls :func:`select` itself.
    """
    if not callable(model):
        raise TypeError(
            f"`model` must be a keras.Model or a callable; received an object of type "
            f"{type(model).__name__}."
        )
    if batch_size is not None:
        batch_size = check_positive_int(batch_size, "batch_size")
    budget = parse_memory(max_memory)
    engine = {k: v for k, v in (engine or {}).items() if v is not None}
    leaves, structure = flatten(x)
    names = structure.names()
    spec = symbolic_inputs(model)
    if spec is not None and len(spec) != len(leaves):
        raise ValueError(
            f"The model has {len(spec)} input(s) {[getattr(s, 'name', '?') for s in spec]}, but "
            f"`x` holds {len(leaves)} array(s). Pass one array per model input (a list or dict)."
        )
    order = None
    if spec is not None and structure.kind == DICT:
        names_in_model = [getattr(s, "name", None) for s in spec]
        if all(k in names_in_model for k in structure.keys):
            order = [list(structure.keys).index(n) for n in names_in_model]
            spec = [spec[names_in_model.index(k)] for k in structure.keys]
    arrays = []
    for i, (leaf, name) in enumerate(zip(leaves, names)):
        dtype = check_numeric(leaf, name)
        array = to_numpy(leaf)
        if spec is not None:
            check_against_spec(array, name, spec[i].shape, getattr(spec[i], "name", None))
            target = np.dtype(str(getattr(spec[i], "dtype", "float32")))
        elif array.ndim < 1 or array.shape[0] == 0:
            raise ValueError(
                f"`{name}` has shape {format_shape(array.shape)}; expected (batch, *input_shape) "
                "with at least one sample."
            )
        else:
            target = dtype if dtype.kind == "f" else np.dtype(_floatx())
        if target.kind != "f":
            raise TypeError(
                f"Model input `{name}` has dtype {target}: attribution needs floating inputs "
                "(integer inputs such as Embedding indices are not differentiable)."
            )
        arrays.append(np.asarray(array, dtype=target))
    batches = {a.shape[0] for a in arrays}
    if len(batches) > 1:
        raise ValueError(
            f"All inputs must have the same batch size; received {[a.shape[0] for a in arrays]} "
            f"for {names}."
        )
    dtype = arrays[0].dtype
    itemsize = dtype.itemsize
    act = _activation_bytes(model, itemsize, 8 * sum(a[0].size for a in arrays) * itemsize)
    problem = Problem(
        model=model,
        leaves=arrays,
        structure=structure,
        dtype=dtype,
        out_structure=Structure(SINGLE),
        out_shapes=[],
        predictions=np.empty((0, 0)),
        kind="all",
        rows=np.empty(0, np.int64),
        engine_outputs=None,
        groups=[],
        full=True,
        batch_size=batch_size,
        max_memory=budget,
        engine=engine,
        act_bytes=act,
        order=order,
    )
    if not defer:
        problem.predictions = predict_flat(problem, arrays, learn=True)
        select(problem, outputs, top_k)
    return problem


def _floatx() -> str:
    try:
        import keras

        return keras.config.floatx()
    except Exception:  # pragma: no cover
        return "float32"


def select(problem: Problem, outputs, top_k) -> None:
    """Resolves ``outputs=`` / ``top_k=`` into rows, the engine's ``outputs=`` and groups."""
    sizes = [int(np.prod(s, dtype=np.int64)) for s in problem.out_shapes]
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    n_out = len(sizes)
    batch = problem.batch
    if outputs is not None and top_k is not None:
        raise ValueError("Pass either `outputs` or `top_k`, not both.")
    if top_k is not None:
        if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 1:
            raise ValueError(invalid_value("top_k", top_k, "a positive integer"))
        if n_out != 1:
            raise ValueError(
                f"`top_k` needs a model with one output; this one has {n_out}. Select output "
                "elements with `outputs=` instead."
            )
        if top_k > sizes[0]:
            raise ValueError(
                f"`top_k={top_k}` is larger than the number of outputs, {sizes[0]} (output "
                f"shape {format_shape(problem.out_shapes[0])})."
            )
        # As the engine chooses them: the largest first, ties by index.
        order = np.argsort(-problem.predictions, axis=1, kind="stable")[:, : int(top_k)]
        problem.kind, problem.rows = "per_sample", order.astype(np.int64)
        problem.groups, problem.full = [(0, int(top_k))], False
        return
    if outputs is None:
        problem.kind, problem.rows, problem.engine_outputs = "all", np.arange(offsets[-1]), None
        problem.groups = [(int(offsets[o]), int(offsets[o + 1])) for o in range(n_out)]
        problem.full = True
        return
    problem.full = False
    if n_out == 1:
        arr = _index_array(outputs, "outputs")
        if arr.ndim == 2:
            if arr.shape[0] != batch:
                raise ValueError(
                    f"Per-sample `outputs` has shape {format_shape(arr.shape)}: one row per "
                    f"sample is expected, ({batch}, k) for a batch of {batch}."
                )
            _check_range(arr, sizes[0], problem.out_shapes[0], "outputs")
            problem.kind, problem.rows = "per_sample", arr
            problem.groups = [(0, arr.shape[1])]
            return
        _check_range(arr, sizes[0], problem.out_shapes[0], "outputs")
        problem.kind, problem.rows = "shared", arr
        problem.engine_outputs = [int(i) for i in arr]
        problem.groups = [(0, len(arr))]
        return
    # Several outputs: one entry per output (a list of flat indices, or None for all of it).
    keys = problem.out_structure.keys
    if problem.out_structure.kind == DICT and isinstance(outputs, dict):
        extra = [k for k in outputs if k not in keys]
        if extra:
            raise ValueError(
                f"`outputs` names {extra}, which are not outputs of the model; its outputs are "
                f"{list(keys)}."
            )
        per_output = [outputs.get(k) for k in keys]
    elif (
        isinstance(outputs, list | tuple)
        and len(outputs) == n_out
        and all(o is None or not isinstance(o, numbers.Integral) for o in outputs)
    ):
        per_output = list(outputs)
    else:
        raise ValueError(
            f"The model has {n_out} outputs, so `outputs` must be a list (or dict) with one entry "
            f"per output, each a list of flat indices or None for all; received "
            f"outputs={outputs!r}."
        )
    rows, groups, start = [], [], 0
    for o, sel in enumerate(per_output):
        if sel is None:
            idx = np.arange(sizes[o])
        else:
            idx = _index_array(sel, f"outputs[{o}]")
            if idx.ndim != 1:
                raise ValueError(
                    invalid_value(f"outputs[{o}]", sel, "a list of flat output indices")
                )
            _check_range(idx, sizes[o], problem.out_shapes[o], f"outputs[{o}]")
        rows.append(idx + offsets[o])
        groups.append((start, start + len(idx)))
        start += len(idx)
    problem.kind, problem.rows = "shared", np.concatenate(rows).astype(np.int64)
    problem.engine_outputs = outputs
    problem.groups = groups


def _index_array(sel, argument: str) -> np.ndarray:
    if isinstance(sel, numbers.Integral) and not isinstance(sel, bool):
        sel = [sel]
    try:
        arr = np.asarray(sel)
    except ValueError as exc:
        raise ValueError(
            invalid_value(argument, sel, "flat output indices: a list, or a (batch, k) array")
        ) from exc
    if arr.ndim not in (1, 2) or arr.size == 0 or arr.dtype.kind not in "iu":
        raise ValueError(
            invalid_value(
                argument,
                sel,
                "a non-empty list of integer flat output indices, e.g. [0, 3, 7], or a "
                "(batch, k) integer array with one row per sample",
            )
        )
    return arr.astype(np.int64)


def _check_range(arr: np.ndarray, size: int, shape: tuple, argument: str) -> None:
    bad = arr[(arr < 0) | (arr >= size)]
    if bad.size:
        raise ValueError(
            f"`{argument}` holds index {int(bad.flat[0])}, which is out of range for an output "
            f"of {size} elements (per-sample shape {format_shape(shape)}); valid flat indices "
            f"are 0..{size - 1}."
        )


# --------------------------------------------------------------------------------------------------
# Model evaluations, in batches
# --------------------------------------------------------------------------------------------------


def _call(model, inputs):
    if _is_keras_model(model):
        from augnet._backend._float64 import any_float64

        if any_float64(inputs):
            # Through the seam, which computes a float64 model in float64 on every backend
            # (Keras maps float64 to float32 in its type promotion off TensorFlow).
            import keras

            from augnet import _backend as B

            out = B.call_model(model, B.model_state(model), inputs, False)
            return keras.tree.map_structure(B.to_numpy, out)
        return model.predict_on_batch(inputs)  # compiled, inference mode
    return model(inputs)


def predict_batch_size(problem: Problem) -> int:
    """Samples per model evaluation: the caller's ``batch_size``, else what fits the budget."""
    if problem.batch_size is not None:
        return problem.batch_size
    per_sample = 2 * problem.act_bytes + 2 * sum(
        int(np.prod(s)) * problem.itemsize for s in problem.in_shapes
    )
    return int(max(1, min(4096, problem.max_memory // max(per_sample, 1))))


def predict_flat(
    problem: Problem, leaves: list[np.ndarray], *, learn: bool = False, call=None
) -> np.ndarray:
    """The model's outputs at ``leaves`` (flat inputs ``(r, *input_shape_i)``), flattened and
    concatenated: ``(r, M)``, evaluated in batches. ``learn``: record the output structure.
    ``call(chunk, start)``: computes a chunk's outputs instead of the model (e.g. from cached
    activations)."""
    n = int(leaves[0].shape[0])
    step = predict_batch_size(problem)
    parts = []
    for s0 in range(0, n, step):
        chunk = [a[s0 : s0 + step] for a in leaves]
        if call is None:
            out = _call(problem.model, problem.wrap(chunk))
        else:
            out = call(chunk, s0)
        outs, structure = flatten(out, "the model's output")
        if structure.kind != DICT and len(structure) == 1:
            structure = Structure(SINGLE)
        outs = [to_numpy(o) for o in outs]
        if learn and s0 == 0:
            problem.out_structure = structure
            problem.out_shapes = [tuple(int(d) for d in o.shape[1:]) for o in outs]
        parts.append(np.concatenate([o.reshape(o.shape[0], -1) for o in outs], axis=1))
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


# --------------------------------------------------------------------------------------------------
# Jacobians at many points, streamed into running sums
# --------------------------------------------------------------------------------------------------


_POOL: ThreadPoolExecutor | None = None
PARALLEL_MIN_ELEMENTS = 1 << 20  # below this, one thread: starting work on others costs more


def parallel(fn, tasks: list, elements: int = 0) -> None:
    """``fn(*task)`` for every task, on as many threads as cores when there are ``elements``
    enough to be worth it (NumPy's random draws and array operations release the GIL), else in
    order on this thread. One pool for the process, made on first use."""
    global _POOL
    workers = min(len(tasks), os.cpu_count() or 1)
    if workers <= 1 or elements < PARALLEL_MIN_ELEMENTS:
        for task in tasks:
            fn(*task)
        return
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=os.cpu_count() or 1)
    for future in [_POOL.submit(fn, *task) for task in tasks]:
        future.result()


def round_points(problem: Problem, total: int) -> int:
    """Points per round: their inputs take at most ``max_memory / 8`` (two rounds are alive at
    once: one in the engine, the next being made); at least 4 rounds of ``MIN_ROUND`` or more
    points when there are enough, so that making the points overlaps the engine's work; a
    multiple of the caller's ``batch_size`` (no pass cut short inside a round)."""
    per_point = sum(int(np.prod(s)) for s in problem.in_shapes) * problem.itemsize
    cap = max(1, problem.max_memory // (POINTS_SHARE * max(per_point, 1)))
    if total >= 4 * MIN_ROUND:
        cap = min(cap, max(MIN_ROUND, math.ceil(total / 4)))
    if problem.batch_size is not None:
        cap = max(problem.batch_size, cap // problem.batch_size * problem.batch_size)
    return int(min(total, cap))


def iter_jacobian(problem: Problem, points: list[np.ndarray], outputs):
    """``augnet.iter_jacobian`` on a stacked batch of points, with the problem's options (a
    module-level function so that tests can count the engine calls), in the engine's column
    form: each input's value is a list of per-output ``(b, *input_shape)`` arrays, views valid
    until the next block (no copy of each block into a stacked array; folded at once)."""
    from augnet._engine.stream import iter_jacobian_columns

    return iter_jacobian_columns(
        problem.model,
        problem.wrap(points),
        outputs=outputs,
        batch_size=problem.batch_size,
        max_memory=problem.max_memory,
        **problem.engine,
    )


def jacobian(problem: Problem, leaves: list[np.ndarray], outputs) -> list[np.ndarray]:
    """``augnet.jacobian`` at ``leaves`` -> one ``(batch, m, *input_shape_i)`` per input."""
    import augnet

    J = augnet.jacobian(
        problem.model,
        problem.wrap(leaves),
        outputs=outputs,
        batch_size=problem.batch_size,
        max_memory=problem.max_memory,
        **problem.engine,
    )
    return problem.flat_rows(J)


@dataclass
class Sums:
    """What :func:`stream_sums` returns, per input ``(batch, m, *input_shape_i)`` in float64:
    ``total`` (``Σ_j w_j J_ij``) or, with ``moments``, ``mean`` and ``m2`` (``Σ_j (J_ij −
    mean)²``) over the ``n`` points of each sample."""

    total: list | None = None
    mean: list | None = None
    m2: list | None = None
    n: int = 0


def stream_sums(
    problem: Problem,
    make_points: Callable[[np.ndarray, np.ndarray], list[np.ndarray]],
    n: int,
    *,
    weights: np.ndarray | None = None,
    moments: bool = False,
) -> Sums:
    """For each sample ``i`` and selected output, over ``n`` points ``p_ij`` per sample: the
    weighted sum ``Σ_j w_j J(p_ij)`` of the Jacobian rows, or their mean and sum of squared
    deviations (``moments``; merged block by block with Chan's update, exact for equal rows).

    ``make_points(owners, copies)`` returns one ``(r, *input_shape_i)`` array per input: point
    ``copies[r]`` of sample ``owners[r]``. Points go sample by sample (all of sample 0's, then
    sample 1's), in rounds of :func:`round_points`, each through ``augnet.iter_jacobian`` once.
    """
    shapes = problem.in_shapes
    batch, m = problem.batch, problem.m
    mean = m2 = count = total = w_all = None
    if moments:
        mean = [np.zeros((batch, m, *s)) for s in shapes]
        m2 = [np.zeros((batch, m, *s)) for s in shapes]
        count = np.zeros((batch, m), np.int64)
    else:
        w_all = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)
        total = [np.zeros((batch, m, *s)) for s in shapes]
    sums_state = (mean, m2, count, total)
    n_points = batch * n
    step = round_points(problem, n_points)
    rounds = [np.arange(p0, min(n_points, p0 + step)) for p0 in range(0, n_points, step)]
    # The next round's points are made in a thread while the engine works on this one.
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(make_points, rounds[0] // n, rounds[0] % n)
        for r, ids in enumerate(rounds):
            owners, copies = ids // n, ids % n
            points = pending.result()
            if r + 1 < len(rounds):
                nxt = rounds[r + 1]
                pending = pool.submit(make_points, nxt // n, nxt % n)
            _fold(problem, points, owners, copies, w_all if not moments else None, sums_state)
    if moments:
        return Sums(mean=mean, m2=m2, n=n)
    return Sums(total=total, n=n)


def _fold(problem, points, owners, copies, w_all, state) -> None:
    """Runs one round's points through the engine and folds the blocks into the sums."""
    mean, m2, count, total = state
    moments = w_all is None
    for chunk in iter_jacobian(problem, points, problem.outputs_for(owners)):
        values = problem.leaves_of(chunk.values)
        own = owners[chunk.samples]
        cols = chunk.columns
        starts = np.flatnonzero(np.r_[True, own[1:] != own[:-1]])
        ends = np.r_[starts[1:], len(own)]
        for a, b in zip(starts, ends):
            u = own[a]
            for i, columns in enumerate(values):  # per input: one (r, ...) array per column
                for j, column in enumerate(columns):
                    col = slice(cols.start + j, cols.start + j + 1)
                    block = column[a:b, None]
                    if moments:
                        last = i == len(values) - 1
                        _merge_moments(mean[i], m2[i], count, u, col, block, last=last)
                    else:
                        w = w_all[copies[chunk.samples][a:b]].astype(block.dtype)
                        total[i][u, col] += np.tensordot(w, block, axes=1)


def _merge_moments(mean, m2, count, u, cols, block, *, last: bool) -> None:
    """Chan et al.'s parallel update of (count, mean, M2) with ``block`` ``(r, c, ...)``: the
    block's own mean and squared deviations (two passes), then merged; rows that are all equal
    give exactly zero spread."""
    r = block.shape[0]
    n_a = count[u, cols].astype(np.float64).reshape(-1, *([1] * (block.ndim - 2)))
    shift = block[0].astype(np.float64)  # deviations from a row of the block: exact zeros
    dev = block.astype(np.float64) - shift  # for rows equal to it
    d_mean = dev.mean(axis=0)
    b_m2 = np.square(dev - d_mean).sum(axis=0)
    b_mean = shift + d_mean
    n = n_a + r
    delta = b_mean - mean[u, cols]
    mean[u, cols] += delta * (r / n)
    m2[u, cols] += b_m2 + np.square(delta) * (n_a * r / n)
    if last:
        count[u, cols] += r


# --------------------------------------------------------------------------------------------------
# Per-input options (baselines, noise levels)
# --------------------------------------------------------------------------------------------------


def per_input(value, problem: Problem, argument: str) -> list:
    """One entry per input from ``value``: a list/tuple/dict nested like ``x`` is split; anything
    else applies to every input."""
    n = len(problem.leaves)
    if problem.structure.kind == DICT and isinstance(value, dict):
        missing = [k for k in problem.structure.keys if k not in value]
        if missing:
            raise ValueError(
                f"`{argument}` is a dict without the inputs {missing}; give one entry per input "
                f"{list(problem.structure.keys)}."
            )
        return [value[k] for k in problem.structure.keys]
    if (
        n > 1
        and isinstance(value, list | tuple)
        and len(value) == n
        and not all(isinstance(v, numbers.Real) for v in value)
    ):
        return list(value)
    return [value] * n


def broadcast_array(value, problem: Problem, i: int, argument: str) -> np.ndarray:
    """An array for input ``i``, broadcast to ``(batch, *input_shape_i)`` in the model's dtype:
    ``value`` is a number, ``(*input_shape)`` or ``(batch or 1, *input_shape)``."""
    shape = problem.leaves[i].shape
    try:
        arr = np.asarray(value, dtype=problem.dtype)
    except (TypeError, ValueError) as exc:
        raise TypeError(invalid_value(argument, value, "a number or a numeric array")) from exc
    if arr.ndim == len(shape) - 1:
        arr = arr[None]
    try:
        return np.broadcast_to(arr, shape)
    except ValueError as exc:
        raise ValueError(
            f"`{argument}` has shape {format_shape(np.shape(value))}, which does not broadcast "
            f"to the input's {format_shape(shape)} (batch, *input_shape): pass a number, one "
            f"sample {format_shape(shape[1:])} or one per sample {format_shape(shape)}."
        ) from exc
