"""Metrics that say which attribution map to trust, for any attribution array.

- :func:`deletion` / :func:`insertion` (Petsiuk et al. 2018): remove (or add) the input's
  features in the order of their attribution, most important first, re-evaluate the model after
  each step, and integrate the explained output over the fraction of features changed. A good map
  makes the output fall fast on deletion (a *low* AUC) and rise fast on insertion (a *high* AUC).
- :func:`mufidelity` (Bhatt et al. 2020): over random subsets ``S`` of features (grid cells for
  images), the correlation between ``Σ_{i∈S} attribution_i`` and the output's drop when ``S`` is
  set to the baseline. 1 is perfectly faithful (a linear model's gradient × input has 1).
- :func:`randomization_check` (Adebayo et al. 2018): the Spearman rank correlation between the
  maps of the trained model and those of a copy with randomised weights
  (``keras.models.clone_model``, then each trained weight tensor's entries shuffled, or the
  clone's freshly initialised weights). A map that barely changes (correlation near 1) explains
  the input, not the model.
- :func:`evaluate_attributions`: all of them for several methods, as a table.

A *feature* is one spatial position of an input with channels last (a pixel, all its channels
together; the attribution is summed over the channels) or one element of a 1-D input. The model is
evaluated on the perturbed copies in batches that fit ``max_memory`` (or ``batch_size``).
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from augnet._attribution import _arrays, _base
from augnet._errors import format_shape, invalid_value

DEFAULT_STEPS = 20
METRICS = ("deletion", "insertion", "mufidelity", "randomization")
_BETTER = {"deletion": "lower", "insertion": "higher", "mufidelity": "higher"}
_BETTER["randomization"] = "lower"


class Curve(NamedTuple):
    """A deletion or insertion curve.

    Attributes:
        fractions: ``(steps + 1,)`` the fraction of features removed (or added) at each step,
            from 0 to 1.
        scores: ``(batch, k, steps + 1)`` the explained output after each step.
        auc: ``(batch, k)`` the area under ``scores`` over ``fractions`` (trapezoid rule).
        indices: ``(batch, k)`` the flat output index each curve follows.
    """

    fractions: np.ndarray
    scores: np.ndarray
    auc: np.ndarray
    indices: np.ndarray


class RandomizationCheck(NamedTuple):
    """The model-randomisation sanity check.

    Attributes:
        correlation: ``(batch, k)`` Spearman rank correlation between each map of the trained
            model and the same map of the re-initialised model (low is good).
        method: the attribution method checked.
        trained, randomized: the two sets of maps, ``(batch, k, *input_shape)``.
    """

    correlation: np.ndarray
    method: str
    trained: np.ndarray
    randomized: np.ndarray


# --------------------------------------------------------------------------------------------------
# Attributions in, features out
# --------------------------------------------------------------------------------------------------


def _resolve(model, x, attributions, outputs, batch_size, max_memory):
    """``(problem, maps (B, k, *input_shape), indices (B, k))`` for a single-input model."""
    if isinstance(attributions, _base.Attribution):
        if outputs is not None:
            raise ValueError(
                "`attributions` is an Attribution, which says which outputs its maps explain "
                "(its .indices): do not pass `outputs` too."
            )
        outputs, maps = attributions.indices, attributions.attributions
    else:
        maps = attributions
    problem = _base.prepare(model, x, outputs=outputs, batch_size=batch_size, max_memory=max_memory)
    if len(problem.leaves) != 1:
        raise ValueError(
            f"The attribution metrics take a model with one input; this one has "
            f"{len(problem.leaves)}. Evaluate each input's maps with a model of that input alone."
        )
    if isinstance(maps, list | tuple | dict):
        raise ValueError(
            "`attributions` must be one array (batch, k, *input_shape) for a model with one "
            f"input and one output; received a {type(maps).__name__}."
        )
    maps = np.asarray(_base.to_numpy(maps), dtype=np.float64)
    shape = problem.in_shapes[0]
    expected = (problem.batch, problem.m, *shape)
    if maps.shape != expected:
        if maps.size == np.prod(expected):
            maps = maps.reshape(expected)  # (batch, *output_shape, *input_shape) for all outputs
        else:
            hint = "; pass outputs= the flat output indices they explain" if outputs is None else ""
            raise ValueError(
                f"`attributions` has shape {format_shape(maps.shape)}, but the model, `x` and "
                f"the selected outputs call for {format_shape(expected)} (batch, k, "
                f"*input_shape){hint}."
            )
    return problem, maps, problem.indices()


def _features(maps: np.ndarray, shape: tuple) -> tuple[np.ndarray, tuple]:
    """``(B, k, F)`` feature scores (summed over the channels) and the feature grid's shape."""
    axes = _arrays.spatial_axes(shape)
    grid = tuple(shape[ax] for ax in axes)
    if len(shape) > len(axes):
        maps = maps.sum(axis=-1)
    return maps.reshape(maps.shape[0], maps.shape[1], -1), grid


def _expand(mask: np.ndarray, shape: tuple) -> np.ndarray:
    """``(r, F)`` feature mask -> ``(r, *shape)`` (every channel of a feature)."""
    axes = _arrays.spatial_axes(shape)
    grid = tuple(shape[ax] for ax in axes)
    mask = mask.reshape(mask.shape[0], *grid)
    if len(shape) > len(axes):
        mask = np.broadcast_to(mask[..., None], (*mask.shape, shape[-1]))
    return mask


def _baseline(problem, baseline) -> np.ndarray:
    if isinstance(baseline, str):
        if baseline != "blur":
            raise ValueError(invalid_value("baseline", baseline, "a number, an array or 'blur'"))
        from augnet._attribution.integrated_gradients import DEFAULT_BLUR, blur

        a = problem.leaves[0]
        spatial = [a.shape[1 + ax] for ax in _arrays.spatial_axes(a.shape[1:])]
        return blur(a, DEFAULT_BLUR * max(spatial))
    return np.ascontiguousarray(_base.broadcast_array(baseline, problem, 0, "baseline"))


def _evaluate(problem, owners, make_batch, n_points, columns) -> np.ndarray:
    """Evaluates ``n_points`` perturbed copies made by ``make_batch(ids)`` in rounds; returns the
    selected output ``columns[id]`` (an index into the m selected rows) of each: ``(n_points,)``,
    or all m selected rows ``(n_points, m)`` when ``columns`` is None."""
    step = _base.round_points(problem, n_points)
    out = np.empty(n_points) if columns is not None else np.empty((n_points, problem.m))
    for p0 in range(0, n_points, step):
        ids = np.arange(p0, min(n_points, p0 + step))
        points = make_batch(ids)
        sel = problem.selected(_base.predict_flat(problem, [points]), owners[ids])
        out[ids] = sel[np.arange(len(ids)), columns[ids]] if columns is not None else sel
    return out


def _curve(model, x, attributions, *, insert, outputs, steps, baseline, batch_size, max_memory):
    problem, maps, indices = _resolve(model, x, attributions, outputs, batch_size, max_memory)
    steps = _base.check_positive_int(steps, "steps")
    shape = problem.in_shapes[0]
    scores, _ = _features(maps, shape)  # (B, k, F)
    n_features = scores.shape[-1]
    # Rank of each feature, most important (largest attribution) first; ties by position.
    order = np.argsort(-scores, axis=-1, kind="stable")
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(n_features)[None, None], axis=-1)
    counts = np.round(np.linspace(0, n_features, steps + 1)).astype(np.int64)
    x0 = problem.leaves[0]
    base = _baseline(problem, baseline)
    batch, k = problem.batch, problem.m
    n_points = batch * k * (steps + 1)
    ids_all = np.arange(n_points)
    owners = ids_all // (k * (steps + 1))
    columns = (ids_all // (steps + 1)) % k

    def make_batch(ids):
        u, c, j = owners[ids], columns[ids], ids % (steps + 1)
        changed = ranks[u, c] < counts[j][:, None]  # (r, F): removed (or inserted) features
        mask = _expand(changed, shape)
        if insert:
            return np.where(mask, x0[u], base[u])
        return np.where(mask, base[u], x0[u])

    values = _evaluate(problem, owners, make_batch, n_points, columns)
    curve = values.reshape(batch, k, steps + 1)
    fractions = counts / n_features
    auc = np.trapezoid(curve, fractions, axis=-1)
    return Curve(fractions, curve, auc, indices)


def deletion(
    model,
    x,
    attributions,
    *,
    outputs=None,
    steps: int = DEFAULT_STEPS,
    baseline=0.0,
    batch_size: int | None = None,
    max_memory=None,
) -> Curve:
    """The deletion curve: the explained output as features are set to ``baseline``, most
    important first (``steps`` steps from none to all); lower AUC is better.

    Args:
        model: a ``keras.Model`` (or callable) with one input.
        x: ``(batch, *input_shape)``.
        attributions: ``(batch, k, *input_shape)``, or an :class:`Attribution` (which carries the
            output indices).
        outputs: the flat output indices the maps explain (a list, or ``(batch, k)``), when
            ``attributions`` is an array and not every output's; default all outputs.
        steps: the number of steps; ``round(j · F / steps)`` features changed at step ``j``.
        baseline: a number, an array ``(*input_shape)`` / ``(batch, *input_shape)``, or
            ``"blur"`` (a blurred copy of ``x``).
        batch_size, max_memory: per model evaluation.

    Returns:
        :class:`Curve` ``(fractions, scores, auc, indices)``.

    Example:
        >>> curve = augnet.deletion(model, x, augnet.gradient_x_input(model, x, outputs=[3]),
        ...                         outputs=[3])                        # doctest: +SKIP
        >>> curve.auc.shape                                             # doctest: +SKIP
        (8, 1)
    """
    return _curve(
        model,
        x,
        attributions,
        insert=False,
        outputs=outputs,
        steps=steps,
        baseline=baseline,
        batch_size=batch_size,
        max_memory=max_memory,
    )


def insertion(
    model,
    x,
    attributions,
    *,
    outputs=None,
    steps: int = DEFAULT_STEPS,
    baseline=0.0,
    batch_size: int | None = None,
    max_memory=None,
) -> Curve:
    """The insertion curve: start from ``baseline`` (default 0, as xplique; ``"blur"`` for
    Petsiuk et al.'s blurred start) and put back the input's features, most important first;
    higher AUC is better.

    Arguments and result as :func:`deletion`.
    """
    return _curve(
        model,
        x,
        attributions,
        insert=True,
        outputs=outputs,
        steps=steps,
        baseline=baseline,
        batch_size=batch_size,
        max_memory=max_memory,
    )


def mufidelity(
    model,
    x,
    attributions,
    *,
    outputs=None,
    n_subsets: int = 128,
    subset_fraction: float = 0.2,
    grid: int | None = 9,
    baseline=0.0,
    seed=0,
    batch_size: int | None = None,
    max_memory=None,
) -> np.ndarray:
    """MuFidelity: the Pearson correlation, over random feature subsets ``S``, between
    ``Σ_{i∈S} attribution_i`` and ``y(x) − y(x with S set to the baseline)``.

    Args:
        model, x, attributions, outputs, baseline, batch_size, max_memory: as :func:`deletion`.
        n_subsets: random subsets per sample (shared by every output: one model evaluation each).
        subset_fraction: the probability that a feature (or grid cell) is in a subset.
        grid: features are grouped into a ``grid × grid`` grid of cells over the spatial axes
            (at most one cell per position), as xplique; ``None`` for single features.
        seed: an int, a ``numpy.random.Generator`` or ``None``.

    Returns:
        ``(batch, k)`` correlations in ``[-1, 1]`` (0 where either side does not vary).
    """
    problem, maps, _ = _resolve(model, x, attributions, outputs, batch_size, max_memory)
    n_subsets = _base.check_positive_int(n_subsets, "n_subsets", minimum=2)
    p = _base.check_nonnegative_float(subset_fraction, "subset_fraction")
    if not 0 < p < 1:
        raise ValueError(invalid_value("subset_fraction", subset_fraction, "a number in (0, 1)"))
    rng = _base.make_rng(seed)
    shape = problem.in_shapes[0]
    scores, grid_shape = _features(maps, shape)  # (B, k, F)
    cells = _cells(grid_shape, grid)  # (F,) cell of each feature
    n_cells = int(cells.max()) + 1
    batch = problem.batch
    chosen = rng.random((batch, n_subsets, n_cells)) < p  # (B, n, cells)
    in_subset = chosen[:, :, cells]  # (B, n, F)
    x0 = problem.leaves[0]
    base = _baseline(problem, baseline)
    owners = np.repeat(np.arange(batch), n_subsets)

    def make_batch(ids):
        u = owners[ids]
        mask = _expand(in_subset[u, ids % n_subsets], shape)
        return np.where(mask, base[u], x0[u])

    values = _evaluate(problem, owners, make_batch, batch * n_subsets, None)
    drops = problem.values().astype(np.float64)[:, None, :] - values.reshape(
        batch, n_subsets, problem.m
    )  # (B, n, k)
    sums = np.einsum("bnf,bkf->bnk", in_subset.astype(np.float64), scores)  # (B, n, k)
    return _pearson(sums, drops, axis=1)


def _cells(grid_shape: tuple, grid) -> np.ndarray:
    """``(F,)`` the grid cell of each feature (``grid`` cells along each spatial axis)."""
    if grid is None:
        return np.arange(int(np.prod(grid_shape)))
    grid = _base.check_positive_int(grid, "grid")
    ids = np.zeros(grid_shape, dtype=np.int64)
    stride = 1
    for ax in reversed(range(len(grid_shape))):
        size = grid_shape[ax]
        g = min(grid, size)
        cell = (np.arange(size) * g) // size
        shape = [1] * len(grid_shape)
        shape[ax] = size
        ids = ids + cell.reshape(shape) * stride
        stride *= g
    return ids.reshape(-1)


def _pearson(a: np.ndarray, b: np.ndarray, axis: int, undefined: float = 0.0) -> np.ndarray:
    """Pearson correlation along ``axis``; ``undefined`` where either side is constant."""
    a = a - a.mean(axis=axis, keepdims=True)
    b = b - b.mean(axis=axis, keepdims=True)
    num = (a * b).sum(axis=axis)
    den = np.sqrt((a * a).sum(axis=axis) * (b * b).sum(axis=axis))
    return np.divide(num, den, out=np.full_like(num, undefined), where=den > 0)


def rankdata(a: np.ndarray) -> np.ndarray:
    """Ranks along the last axis, ties given their average rank (as ``scipy.stats.rankdata``)."""
    a = np.asarray(a)
    flat = a.reshape(-1, a.shape[-1])
    out = np.empty(flat.shape, dtype=np.float64)
    for i, row in enumerate(flat):
        order = np.argsort(row, kind="stable")
        sorted_row = row[order]
        starts = np.flatnonzero(np.r_[True, sorted_row[1:] != sorted_row[:-1]])
        ends = np.r_[starts[1:], len(row)]
        avg = (starts + ends - 1) / 2.0 + 1.0
        ranks = np.repeat(avg, ends - starts)
        out[i, order] = ranks
    return out.reshape(a.shape)


def spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman rank correlation along the last axis (average ranks for ties); NaN where
    either side is constant (no ranking to compare)."""
    return _pearson(rankdata(a), rankdata(b), axis=-1, undefined=np.nan)


RANDOMIZATIONS = ("shuffle", "reinit")


def randomized_copy(model, randomize: str = "shuffle", seed=None):
    """A copy of ``model`` (``keras.models.clone_model``; ``model`` is not changed) with
    randomised weights.

    ``"shuffle"``: each trained trainable weight tensor's entries permuted at random (a seeded
    ``numpy.random.Generator``; the weights keep their scale, the learned structure is gone;
    non-trainable state such as BatchNorm statistics is kept). ``"reinit"``: the clone's freshly
    initialised weights (its layers' initializers; a zero or constant initializer gives a
    degenerate copy, and ``seed`` is passed to ``keras.utils.set_random_seed``, which seeds
    Python, NumPy and the backend globally).
    """
    import keras

    randomize = _base.check_choice(randomize, "randomize", RANDOMIZATIONS)
    if not isinstance(model, keras.Model):
        raise TypeError(
            f"`model` must be a keras.Model to randomise its weights; received "
            f"{type(model).__name__}."
        )
    if randomize == "reinit" and seed is not None:
        keras.utils.set_random_seed(int(seed))
    try:
        clone = keras.models.clone_model(model)
    except Exception as exc:
        raise TypeError(
            f"Cannot copy {type(model).__name__} {model.name!r} with keras.models.clone_model "
            f"({exc}); the randomisation check needs a functional or Sequential model."
        ) from exc
    if randomize == "shuffle":
        rng = _base.make_rng(seed)
        trainable = {id(v) for v in model.trainable_weights}
        values = []
        for v in model.weights:
            w = np.asarray(v.numpy())
            if id(v) in trainable:
                w = rng.permutation(w.reshape(-1)).reshape(w.shape)
            values.append(w)
        clone.set_weights(values)
    return clone


def randomization_check(
    model,
    x,
    method: str = "gradient",
    *,
    randomize: str = "shuffle",
    randomize_seed=0,
    absolute: bool = True,
    **options,
) -> RandomizationCheck:
    """The model-randomisation sanity check of an attribution method.

    The method's maps for ``model`` are compared with its maps for a copy with randomised
    weights (:func:`randomized_copy`: ``model`` is not changed), by Spearman rank correlation per
    sample and output (of ``|map|`` summed over the channels by default, as Adebayo et al.). A
    method whose maps depend on what the model learned gives a low correlation.

    Args:
        model: a functional or Sequential ``keras.Model`` with one input.
        x: ``(batch, *input_shape)``.
        method: the attribution method's name (see ``augnet.attribute``).
        randomize: ``"shuffle"`` (default: each trained weight tensor's entries permuted) or
            ``"reinit"`` (the clone's freshly initialised weights; see :func:`randomized_copy`).
        randomize_seed: for the randomisation: an int, a ``numpy.random.Generator`` or
            ``None``.
        absolute: rank ``|map|`` (default) or the signed map.
        **options: the method's options (``outputs``, ``top_k``, ``n_samples``, ...); with
            ``top_k`` the randomised model explains the same outputs as the trained one.

    Returns:
        :class:`RandomizationCheck` ``(correlation (batch, k), method, trained, randomized)``;
        the correlation is NaN where a map is constant (e.g. all zero: a randomised copy whose
        output does not depend on the input).
    """
    from augnet._attribution import attribute, method_name

    name = method_name(method)
    clone = randomized_copy(model, randomize, randomize_seed)
    trained = attribute(model, x, method=name, **options)
    indices = None
    if isinstance(trained, _base.Attribution):
        indices = trained.indices
        trained_maps = trained.attributions
    else:
        trained_maps = trained
    again = dict(options)
    if indices is not None:  # explain the same outputs (not the random model's own top-k)
        again.pop("top_k", None)
        again["outputs"] = indices
    randomized = attribute(clone, x, method=name, **again)
    random_maps = (
        randomized.attributions if isinstance(randomized, _base.Attribution) else randomized
    )
    t = np.asarray(_base.to_numpy(trained_maps), dtype=np.float64)
    r = np.asarray(_base.to_numpy(random_maps), dtype=np.float64)
    shape = np.shape(_base.to_numpy(x))[1:]
    b = t.shape[0]
    t = t.reshape(b, -1, *shape)
    r = r.reshape(b, -1, *shape)
    if absolute:
        t, r = np.abs(t), np.abs(r)
    ft, _ = _features(t, shape)
    fr, _ = _features(r, shape)
    return RandomizationCheck(spearman(ft, fr), name, trained_maps, random_maps)


# --------------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------------


@dataclass
class AttributionTable:
    """The metrics of several attribution methods, one row per method (means over the samples
    and outputs); ``details`` holds the per-sample, per-output arrays ``(batch, k)``.

    ``str(table)`` is a readable table; ``table.rows`` a list of dicts; ``table["smoothgrad"]``
    one row.
    """

    rows: list[dict] = field(default_factory=list)
    details: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def __getitem__(self, method: str) -> dict:
        for row in self.rows:
            if row["method"] == method:
                return row
        raise KeyError(method)

    def __iter__(self):
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __str__(self) -> str:
        columns = ["method"] + [c for c in _COLUMNS if any(c in row for row in self.rows)]
        header = [_HEADINGS.get(c, c) for c in columns]
        body = [[_cell(row.get(c)) for c in columns] for row in self.rows]
        widths = [max(len(h), *(len(r[i]) for r in body)) for i, h in enumerate(header)]
        lines = [
            "  ".join(
                h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths))
            ),
            "  ".join("-" * w for w in widths),
        ]
        for r in body:
            lines.append(
                "  ".join(
                    v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths))
                )
            )
        lines.extend(self.notes)
        return "\n".join(lines)


_COLUMNS = ["deletion", "insertion", "mufidelity", "randomization", "seconds"]
_HEADINGS = {
    "deletion": "deletion AUC ↓",
    "insertion": "insertion AUC ↑",
    "mufidelity": "MuFidelity ↑",
    "randomization": "randomised rank corr ↓",
    "seconds": "seconds",
}


def _cell(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, str):
        return value
    return f"{value:.3g}"


def evaluate_attributions(
    model,
    x,
    attributions=None,
    *,
    methods=None,
    outputs=None,
    top_k: int | None = None,
    metrics=None,
    steps: int = DEFAULT_STEPS,
    deletion_baseline=0.0,
    insertion_baseline=0.0,
    n_subsets: int = 128,
    seed=0,
    batch_size: int | None = None,
    max_memory=None,
) -> AttributionTable:
    """Deletion and insertion AUC, MuFidelity and the randomisation check for several methods.

    Args:
        model: a ``keras.Model`` with one input.
        x: ``(batch, *input_shape)``.
        attributions: maps to evaluate: ``{name: maps or Attribution}``, or one
            :class:`Attribution`. Arrays explain ``outputs`` (default all outputs).
        methods: methods to run and evaluate: names (``["gradient", "smoothgrad"]``) or
            ``{name: options}`` (``{"integrated_gradients": {"steps": 32}}``), with ``outputs``
            / ``top_k`` for all of them.
        outputs, top_k: which outputs the methods explain.
        metrics: a subset of ``("deletion", "insertion", "mufidelity", "randomization")``;
            default all (the randomisation check only for ``methods``, which it re-runs on a
            re-initialised copy of the model).
        steps: deletion/insertion steps; deletion_baseline, insertion_baseline: as
            :func:`deletion` / :func:`insertion`; n_subsets: for :func:`mufidelity`.
        seed: for the noise of the methods that draw it, MuFidelity's subsets and the shuffled
            weights of the randomisation check.
        batch_size, max_memory: per engine pass / model evaluation.

    Returns:
        :class:`AttributionTable`: one row per method with the means over samples and outputs.

    Example:
        >>> print(augnet.evaluate_attributions(model, x, methods=["gradient", "ig"],
        ...                                    top_k=1))                   # doctest: +SKIP
    """
    from augnet._attribution import METHODS, attribute, method_name

    if attributions is None and methods is None:
        raise ValueError("Pass `attributions` (maps to evaluate) or `methods` (to run), or both.")
    chosen = list(METRICS if metrics is None else metrics)
    for metric in chosen:
        _base.check_choice(metric, "metrics", METRICS)
    entries: list[tuple[str, Any, float | None, dict | None]] = []
    if isinstance(attributions, _base.Attribution):
        attributions = {attributions.method or "attributions": attributions}
    for name, maps in (attributions or {}).items():
        entries.append((str(name), maps, None, None))
    if methods is not None:
        specs = methods.items() if isinstance(methods, dict) else [(m, {}) for m in methods]
        for method, options in specs:
            name = method_name(method)
            opts = dict(options or {})
            if outputs is not None:
                opts.setdefault("outputs", outputs)
            if top_k is not None:
                opts.setdefault("top_k", top_k)
            if "seed" in inspect.signature(METHODS[name]).parameters and "seed" not in opts:
                opts["seed"] = seed
            opts.setdefault("batch_size", batch_size)
            opts.setdefault("max_memory", max_memory)
            start = time.perf_counter()
            result = attribute(model, x, method=name, **opts)
            entries.append((name, result, time.perf_counter() - start, opts))
    table = AttributionTable()
    for name, maps, seconds, opts in entries:
        out = None if isinstance(maps, _base.Attribution) else outputs
        row: dict = {"method": name}
        detail: dict[str, np.ndarray] = {}
        common = dict(outputs=out, batch_size=batch_size, max_memory=max_memory)
        if "deletion" in chosen:
            c = deletion(model, x, maps, steps=steps, baseline=deletion_baseline, **common)
            detail["deletion"] = c.auc
        if "insertion" in chosen:
            c = insertion(model, x, maps, steps=steps, baseline=insertion_baseline, **common)
            detail["insertion"] = c.auc
        if "mufidelity" in chosen:
            detail["mufidelity"] = mufidelity(
                model, x, maps, n_subsets=n_subsets, seed=seed, **common
            )
        if "randomization" in chosen and opts is not None:
            check = randomization_check(model, x, name, randomize_seed=seed, **opts)
            detail["randomization"] = check.correlation
        for metric, values in detail.items():
            finite = values[np.isfinite(values)]
            row[metric] = float(np.mean(finite)) if finite.size else None
        if seconds is not None:
            row["seconds"] = seconds
        table.rows.append(row)
        table.details[name] = detail
    table.notes.append(
        "means over samples and outputs; deletion AUC: lower is better, insertion AUC and "
        "MuFidelity: higher, randomised rank correlation: lower (the maps depend on the weights)"
    )
    return table
