"""Running a planned Jacobian: the passes over samples and outputs, as NumPy blocks.

A :class:`Run` is everything one call needs (target, input tensors, selection, strategy, samples
and outputs per pass). :func:`iter_blocks` walks it pass by pass through the compiled blocks and
yields each block's values as NumPy; the helpers below copy them into a result with one copy.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from augnet import _backend as B
from augnet._engine import blocks
from augnet._engine.selection import Selection
from augnet._engine.target import Target, is_keras_layer


@dataclass
class Run:
    target: Target
    tensors: list
    selection: Selection
    strategy: str
    batch_size: int
    chunk_size: int
    training: bool
    jit_compile: bool
    memo: dict = field(default_factory=dict)  # per prepared call: the blocks' seed tensors
    # A prepared call's fast lane, ``fast(x) -> result`` (api.fast_lane), where it has one.
    fast: Callable | None = None

    @property
    def n_samples(self) -> int:
        return int(self.tensors[0].shape[0])


def iter_blocks(run: Run) -> Iterator[tuple[slice, slice, np.ndarray, list]]:
    """Yields ``(samples, columns, output_indices, [ (b, c, *in_shape_i) per input ])`` as NumPy.

    ``samples`` and ``columns`` are the block's slices of the ``(batch, m)`` selected rows.
    """
    target, sel = run.target, run.selection
    n_samples = run.n_samples
    kind = run.strategy
    state = target.state()  # the model's weights now (read once per call)
    for s0 in range(0, n_samples, run.batch_size):
        s1 = min(n_samples, s0 + run.batch_size)
        xs = run.tensors if s1 - s0 == n_samples else [t[s0:s1] for t in run.tensors]
        b = s1 - s0
        if sel.top_k is not None:
            predict = blocks.compiled(target, "predict", run.training, run.jit_compile)
            preds = B.to_numpy(predict(state, xs))
            order = np.argsort(-preds, axis=1, kind="stable")[:, : sel.top_k]
            rows_all = order.astype(np.int64)  # (b, k)
        elif sel.per_sample is not None:
            rows_all = sel.per_sample[s0:s1]  # (b, k)
        else:
            rows_all = np.broadcast_to(sel.rows, (b, len(sel.rows)))
        if kind == "forward":
            all_outputs = sel.full  # (never with top_k)
            sel_t = memo(run, ("rows", b), lambda r=rows_all: r, fixed=sel.rows is not None)
            values = []
            for i, (n_i, shape) in enumerate(zip(target.in_sizes, target.in_shapes)):
                fwd = blocks.compiled(
                    target, "forward", run.training, run.jit_compile, extra=(i, all_outputs)
                )
                if run.chunk_size >= n_i:  # one pass: its result is the block
                    cols = memo(run, ("cols", 0, n_i), lambda n_i=n_i: np.arange(n_i))
                    value = B.to_numpy(fwd(state, xs, cols, sel_t))
                    values.append(value.reshape(b, sel.size, *shape))
                    continue
                value = np.empty((b, sel.size, *shape), dtype=B.dtype_name(target.dtype))
                flat = value.reshape(b, sel.size, n_i)
                for c0 in range(0, n_i, run.chunk_size):
                    c1 = min(n_i, c0 + run.chunk_size)
                    cols = memo(run, ("cols", c0, c1), lambda c0=c0, c1=c1: np.arange(c0, c1))
                    flat[:, :, c0:c1] = B.to_numpy(fwd(state, xs, cols, sel_t))
                values.append(value)
            outs = rows_all if sel.rows is None else sel.rows
            yield slice(s0, s1), slice(0, sel.size), outs, values
        else:
            for c0 in range(0, sel.size, run.chunk_size):
                c1 = min(sel.size, c0 + run.chunk_size)
                chunk = memo(
                    run,
                    ("rows", b, c0, c1),
                    lambda r=rows_all, c0=c0, c1=c1: r[:, c0:c1],
                    fixed=sel.rows is not None,
                )
                # The loop is unrolled (static width); every output in order: constant seeds.
                extra = blocks.reverse_extra(target, kind, sel.rows, c0, c1)
                rev = blocks.compiled(target, kind, run.training, run.jit_compile, extra=extra)
                outs = rows_all[:, c0:c1] if sel.rows is None else sel.rows[c0:c1]
                args = (state, xs) if extra == blocks.ALL_OUTPUTS else (state, xs, chunk)
                yield slice(s0, s1), slice(c0, c1), outs, values_to_numpy(rev(*args))


def memo(run: Run, key, make, fixed: bool = True):
    """``make()`` as an int32 tensor, remembered in the prepared call when ``fixed`` (the same on
    every call with these options: seeds and columns, not per-sample rows (top_k's, or per-sample
    ``outputs``))."""
    value = run.memo.get(key) if fixed else None
    if value is None:
        value = B.convert(np.ascontiguousarray(make()), "int32")
        if fixed:
            run.memo[key] = value
    return value


def values_to_numpy(values) -> list:
    """A block's values per input: a NumPy array ``(b, c, *in_shape)``, or (the loop) the list of
    c ``(b, *in_shape)`` result tensors, which the caller copies once, straight into its result
    (:func:`write_block`), through zero-copy views that live only while the tensors do."""
    if not isinstance(values, list | tuple):  # forward mode: one tensor
        return B.to_numpy(values)
    return [list(v) if isinstance(v, list | tuple) else B.to_numpy(v) for v in values]


def write_block(out: np.ndarray, samples: slice, columns: slice, value) -> None:
    """``out[samples, columns] = value`` for either form of :func:`values_to_numpy`."""
    if isinstance(value, list):
        for j, column in enumerate(value):
            out[samples, columns.start + j] = B.numpy_view(column)
    else:
        out[samples, columns] = value


def owned(value, like: np.ndarray) -> bool:
    """Whether ``value`` can stand in for the result array ``like``: a writable array of its own
    (not a view of a tensor) with the same shape and dtype."""
    return (
        isinstance(value, np.ndarray)
        and value.flags.writeable
        and value.flags.c_contiguous
        and value.shape == like.shape
        and value.dtype == like.dtype
    )


def stacked(value) -> np.ndarray:
    """A block's value (either form of :func:`values_to_numpy`) as one ``(b, c, ...)`` array."""
    if isinstance(value, list):
        return np.stack([B.numpy_view(t) for t in value], axis=1)
    return value


def restore_state(fn, training: bool):
    """Snapshots a Keras model's non-trainable state; returns a function that restores it.

    Inference calls change nothing, and training-mode calls run statelessly; this is a second line
    of defence for custom layers that assign to their variables in ``call`` with ``training=True``.
    """
    keep = training and is_keras_layer(fn)
    variables = list(getattr(fn, "non_trainable_variables", []) or []) if keep else []
    saved = [np.array(v.numpy()) for v in variables]

    def restore():
        for v, value in zip(variables, saved):
            if not np.array_equal(v.numpy(), value):
                v.assign(value)

    return restore
