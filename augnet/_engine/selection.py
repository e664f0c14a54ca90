"""Output selection: which rows of the flat ``(batch, M)`` output a Jacobian computes.

``outputs=[i, ...]`` (flat indices into one output, or a list/dict with one entry per output),
``top_k=k`` (per sample, the k largest outputs, found by a forward pass while running), per-sample
``outputs`` (a ``(batch, k)`` integer array: row ``i`` holds sample ``i``'s flat indices) or, by
default, every output in order. All selection logic lives here: the blocks receive a ``(b, c)``
int32 array of row indices per pass and do not care how it was chosen.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from augnet._engine.target import Target
from augnet._errors import format_shape, invalid_value
from augnet._structure import DICT, Structure


@dataclass
class Selection:
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


def select(target: Target, outputs, top_k) -> Selection:
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
        return Selection(None, [(0, int(top_k))], full=False, top_k=int(top_k))
    if outputs is None:
        rows = np.arange(offsets[-1], dtype=np.int64)
        return Selection(
            rows, [(int(offsets[o]), int(offsets[o + 1])) for o in range(n_out)], full=True
        )
    per_sample = _per_sample_indices(outputs, n_out, sizes[0], target.out_shapes[0])
    if per_sample is not None:
        return Selection(None, [(0, per_sample.shape[1])], full=False, per_sample=per_sample)
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
    return Selection(np.concatenate(rows).astype(np.int64), groups, full=False)


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
