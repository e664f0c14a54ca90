"""Occlusion (Zeiler & Fergus 2014): how much each output drops when a window of the input is
replaced by a baseline value. A perturbation method: model evaluations only, no gradient.

A window of ``window`` elements slides over the spatial axes (all but the channel axis) with
step ``stride``, covering every position (a last window is added flush with the far edge when the
stride does not reach it). For each window ``w`` and selected output ``k``:
``Δ_wk = y_k(x) − y_k(x with window w set to the baseline)``, and each element's attribution is
the mean (``aggregate="mean"``, captum's convention; default) or the sum (``"sum"``, as PAIR
saliency and xplique) of ``Δ_wk`` over the windows that cover it, the same for every channel
(0 for elements no window covers, when the stride is larger than the window).

Every occluded copy of every sample is evaluated once for all selected outputs; the copies go
through the model in batches that fit ``max_memory`` (or ``batch_size``). Cost: one forward pass
per window and sample.
"""

from __future__ import annotations

import itertools
import math
import numbers

import numpy as np

from augnet._attribution import _arrays, _base
from augnet._errors import format_shape, invalid_value

AGGREGATES = ("mean", "sum")
DEFAULT_WINDOWS = 16  # default window: the spatial side / 16 (at least 1)


def _per_axis(value, n_axes: int, argument: str, sizes: tuple) -> tuple[int, ...]:
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        value = (int(value),) * n_axes
    if (
        not isinstance(value, tuple | list)
        or len(value) != n_axes
        or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in value)
        or any(v < 1 for v in value)
    ):
        raise ValueError(
            invalid_value(
                argument,
                value,
                f"a positive integer or a tuple of {n_axes} (one per spatial axis of an input "
                f"{format_shape(sizes)})",
            )
        )
    return tuple(int(v) for v in value)


def anchors(size: int, window: int, stride: int) -> np.ndarray:
    """Start positions of the windows along one axis: ``0, stride, ...`` while the window fits,
    plus ``size - window`` when the last one stops short of the edge."""
    if window > size:
        raise ValueError(
            f"The occlusion window ({window}) is larger than the input along one axis ({size})."
        )
    starts = list(range(0, size - window + 1, stride))
    if starts[-1] != size - window:
        starts.append(size - window)
    return np.asarray(starts)


def coverage(size: int, starts: np.ndarray, window: int) -> np.ndarray:
    """``(size, n_windows)``: 1 where window ``j`` covers position ``i``."""
    pos = np.arange(size)[:, None]
    return ((pos >= starts[None]) & (pos < starts[None] + window)).astype(np.float64)


def occlusion(
    model,
    x,
    *,
    window=None,
    stride=None,
    baseline=0.0,
    aggregate: str = "mean",
    outputs=None,
    top_k: int | None = None,
    batch_size: int | None = None,
    max_memory=None,
):
    """Occlusion: the drop of each selected output when a window of the input is occluded.

    Args:
        model: a ``keras.Model`` or any callable returning the outputs.
        x: ``(batch, *input_shape)``, or a list/dict of arrays for several inputs (each input's
            windows are occluded in turn, the others left as they are).
        window: the window's size along the spatial axes (all but the last, the channels, when a
            sample has two or more axes): an int for every axis or a tuple; default the side / 16.
            Per input as a list/dict.
        stride: the step between windows (default ``window``: no overlap).
        baseline: what the window is set to: a number (default 0) or an array ``(*input_shape)`` /
            ``(batch, *input_shape)`` (e.g. a blurred copy of ``x``); per input as a list/dict.
        aggregate: ``"mean"`` (default) or ``"sum"`` of the drops of the windows covering an
            element.
        outputs, top_k: as :func:`augnet.gradient` (``top_k`` chosen on the clean input).
        batch_size: occluded copies per model evaluation; max_memory: per evaluation (default
            2 GB).

    Returns:
        ``(batch, k, *input_shape)`` per input and output as :func:`augnet.gradient` (an
        :class:`Attribution` with ``top_k`` or per-sample ``outputs``).

    Example:
        >>> occ = augnet.occlusion(model, x, window=16)    # doctest: +SKIP
    """
    problem = _base.prepare(
        model, x, outputs=outputs, top_k=top_k, batch_size=batch_size, max_memory=max_memory
    )
    aggregate = _base.check_choice(aggregate, "aggregate", AGGREGATES)
    windows = _base.per_input(window, problem, "window")
    strides = _base.per_input(stride, problem, "stride")
    baselines = [
        np.ascontiguousarray(_base.broadcast_array(b, problem, i, "baseline"))
        for i, b in enumerate(_base.per_input(baseline, problem, "baseline"))
    ]
    # Per input: the spatial axes, the windows' start positions and their coverage.
    plans = []
    for a, win, step in zip(problem.leaves, windows, strides):
        shape = a.shape[1:]
        axes = _arrays.spatial_axes(shape)
        sizes = tuple(shape[ax] for ax in axes)
        if win is None:
            win = tuple(max(1, math.ceil(s / DEFAULT_WINDOWS)) for s in sizes)
        win = _per_axis(win, len(axes), "window", sizes)
        step = win if step is None else _per_axis(step, len(axes), "stride", sizes)
        starts = [anchors(s, w, st) for s, w, st in zip(sizes, win, step)]
        plans.append((axes, win, starts))
    jobs = [  # (input, start per spatial axis), input by input
        (i, corner)
        for i, (_, _, starts) in enumerate(plans)
        for corner in itertools.product(*[s.tolist() for s in starts])
    ]
    n_windows = len(jobs)
    clean = problem.values().astype(np.float64)  # (B, m)
    drops = np.empty((problem.batch, n_windows, problem.m))
    total = problem.batch * n_windows
    step = _base.round_points(problem, total)
    for p0 in range(0, total, step):
        ids = np.arange(p0, min(total, p0 + step))
        owners, which = ids // n_windows, ids % n_windows
        points = [a[owners] for a in problem.leaves]  # copies
        for r, (u, w) in enumerate(zip(owners, which)):
            i, corner = jobs[w]
            axes, win, _ = plans[i]
            index = [slice(None)] * (points[i].ndim - 1)
            for ax, c, size in zip(axes, corner, win):
                index[ax] = slice(c, c + size)
            index = tuple(index)
            points[i][r][index] = baselines[i][u][index]
        occluded = problem.selected(_base.predict_flat(problem, points), owners)
        drops[owners, which] = clean[owners] - occluded
    flat = []
    offset = 0
    for a, (axes, win, starts) in zip(problem.leaves, plans):
        shape = a.shape[1:]
        grid = tuple(len(s) for s in starts)
        n_here = int(np.prod(grid))
        d = drops[:, offset : offset + n_here].reshape(problem.batch, *grid, problem.m)
        d = np.moveaxis(d, -1, 1)  # (B, m, *grid)
        offset += n_here
        mats = {
            2 + j: coverage(shape[ax], s, size)
            for j, (ax, s, size) in enumerate(zip(axes, starts, win))
        }
        summed = _arrays.apply_along(d, mats)  # (B, m, *spatial sizes)
        if aggregate == "mean":
            counts = np.ones(())
            for j, mat in enumerate(mats.values()):
                shape_j = [1] * len(axes)
                shape_j[j] = -1
                counts = counts * mat.sum(axis=1).reshape(shape_j)
            summed = np.divide(summed, counts, out=np.zeros_like(summed), where=counts > 0)
        if len(shape) > len(axes):  # the channels: the same value in each
            summed = np.repeat(summed[..., None], shape[-1], axis=-1)
        flat.append(summed)
    return problem.result(flat, "occlusion")
