"""Comparison sheet: one image, several attribution methods side by side, one row per output.

matplotlib's object API on an Agg canvas only (``Figure`` + ``FigureCanvasAgg``), as the contact
sheet (``augnet/_report.py``), whose helpers it reuses. Each method is a column with its own
colour bar and scale (methods have different units): a signed method (gradient, gradient × input,
SmoothGrad, integrated gradients, occlusion) on a diverging map centred on zero, a non-negative
one (Grad-CAM, Grad-CAM++, SquareGrad, VarGrad) on a sequential map. Within a column the scale is
shared by every output, so rows compare. Under each column: the method's deletion and insertion
AUC (means over the shown outputs; each panel's title has its own).

- :func:`build_comparison_sheet`: the figure from maps you computed (no model needed);
- :func:`compare_methods`: runs the methods and the metrics on one image (:class:`Comparison`);
- :func:`comparison_sheet`: the same, drawn and written to a PNG.
"""

from __future__ import annotations

import inspect
import io
import os
import pathlib
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import matplotlib.colors
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.figure import Figure

from augnet import _render, _report
from augnet._errors import format_shape, invalid_value

MAX_OUTPUTS = 16
MAX_METHODS = 10
PANEL_INCHES = 2.2
DEFAULT_METHODS = ("gradient", "smoothgrad", "integrated_gradients", "gradcam", "occlusion")
_LABELS = {
    "gradient": "gradient",
    "gradient_x_input": "gradient × input",
    "smoothgrad": "SmoothGrad",
    "squaregrad": "SquareGrad",
    "vargrad": "VarGrad",
    "integrated_gradients": "integrated gradients",
    "gradcam": "Grad-CAM",
    "gradcam_plus_plus": "Grad-CAM++",
    "occlusion": "occlusion",
}
_QUANTITY = {
    "gradient": r"$\partial y_k/\partial x$",
    "gradient_x_input": r"$x \cdot \partial y_k/\partial x$",
    "smoothgrad": r"mean of $\partial y_k/\partial x$ over noise",
    "squaregrad": r"mean of $(\partial y_k/\partial x)^2$ over noise",
    "vargrad": r"variance of $\partial y_k/\partial x$ over noise",
    "integrated_gradients": r"$(x - x_0) \cdot \int \partial y_k/\partial x$",
    "gradcam": r"ReLU$(\sum_c \alpha_{kc} A_c)$",
    "gradcam_plus_plus": r"ReLU$(\sum_c w_{kc} A_c)$",
    "occlusion": r"drop of $y_k$ when occluded",
}


def _display_image(x: np.ndarray) -> np.ndarray:
    """A model input ``(H, W[, C])`` as an image in [0, 1] (min-max scaled; one or three
    channels shown, others averaged)."""
    a = np.asarray(x, dtype=np.float64)
    if a.ndim == 3 and a.shape[-1] not in (1, 3):
        a = a.mean(axis=-1)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    low, high = float(a.min()), float(a.max())
    return (a - low) / (high - low) if high > low else np.zeros_like(a)


def build_comparison_sheet(
    *,
    image: object,
    maps: Mapping[str, object],
    output_indices: Sequence[int] | np.ndarray | None = None,
    predictions: Sequence[float] | np.ndarray | None = None,
    output_names: Sequence[str] | None = None,
    aucs: Mapping[str, Mapping[str, object]] | None = None,
    notes: Mapping[str, str] | None = None,
    percentile: float = 99.0,
    reduce: str = "mean",
    title: str | None = None,
) -> Figure:
    """Builds the comparison figure (see :func:`comparison_sheet`) without saving it.

    Axes, in order: per output row, the input (label ``"input {k}"``) and one panel per method
    (``"{method} {k}"``); then one colour bar per method (``"colorbar {method}"``).

    Args:
        image: the input image ``(H, W)`` or ``(H, W, 3)``, uint8 or float in [0, 1].
        maps: ``{method: (k, H, W) or (k, H, W, C)}`` one sample's maps, the same outputs in the
            same order for every method.
        output_indices: the ``k`` flat output indices (default 0..k-1).
        predictions: ``(k,)`` the model's outputs, shown in the row titles.
        output_names: ``k`` names (e.g. class names) for the row titles.
        aucs: ``{method: {"deletion": (k,), "insertion": (k,)}}`` to print under the panels
            and (means) under the columns.
        notes: ``{method: text}`` one more line under a column (e.g. the Grad-CAM layer).
        percentile: in (0, 100]; the percentile of |map| over a column that its colour bar's
            end stands for.
        reduce: how channels are combined: ``"mean"`` (default), ``"sum"``, ``"maxabs"``, ``"l2"``.
        title: an optional figure title.

    Returns:
        A ``matplotlib.figure.Figure`` with a ``FigureCanvasAgg`` canvas.
    """
    from augnet._attribution import NONNEGATIVE

    if not isinstance(maps, Mapping) or not maps:
        raise TypeError(invalid_value("maps", maps, "a non-empty dict {method: (k, H, W[, C])}"))
    if len(maps) > MAX_METHODS:
        raise ValueError(
            f"`maps` holds {len(maps)} methods; a comparison sheet shows at most {MAX_METHODS}."
        )
    arrays = {name: _render._check_jacobian(m) for name, m in maps.items()}
    shapes = {name: a.shape for name, a in arrays.items()}
    first = next(iter(arrays.values()))
    k = first.shape[0]
    for a in arrays.values():
        if a.shape[:3] != first.shape[:3]:
            raise ValueError(
                f"Every method's maps must have the same (k, H, W); received {shapes}."
            )
    if k > MAX_OUTPUTS:
        raise ValueError(
            f"The maps have {k} outputs; a comparison sheet shows at most {MAX_OUTPUTS}. Select "
            "the outputs to show (outputs=[...] or top_k=)."
        )
    indices = _render.check_output_indices(output_indices, k)
    values = _report._check_predictions(predictions, k)
    names = _report._check_output_names(output_names, k)
    percentile = _render._check_percentile(percentile)
    reduce = _render._check_choice("reduce", reduce, _render.REDUCTIONS)
    photo = _render._check_image(image, first.shape[1:3])
    if title is not None and not isinstance(title, str):
        raise TypeError(invalid_value("title", title, "None or a string"))

    methods = list(arrays)
    reduced = {
        name: np.stack([_render.reduce_channels(m, reduce) for m in a])
        for name, a in arrays.items()
    }
    n_cols = 1 + len(methods)
    height, width = first.shape[1:3]
    panel_h = PANEL_INCHES * min(max(height / width, 0.4), 2.5)
    lines = 1 + (values is not None) + (aucs is not None)
    figure = Figure(
        figsize=(
            n_cols * PANEL_INCHES + 0.3,
            k * (0.85 * panel_h + 0.15 * lines + 0.1) + 1.2 + (0.35 if title else 0),
        ),
        dpi=_report.DPI,
        layout="constrained",
    )
    FigureCanvasAgg(figure)
    # The colour bars sit in a row of their own under the panels, so that every column (the
    # inputs' too) has the same panels and the rows line up.
    grid = figure.add_gridspec(k + 1, n_cols, height_ratios=[1.0] * k + [0.045 * panel_h])
    columns: dict[str, list] = {name: [] for name in methods}
    for row, out in enumerate(indices):
        ax = figure.add_subplot(grid[row, 0], label=f"input {out}")
        ax.imshow(photo, cmap="gray" if photo.ndim == 2 else None, vmin=0.0, vmax=1.0)
        heading = f"output {out}"
        if names is not None:
            heading += f" · {names[row][: _report._NAME_CHARS]}"
        text = [heading]
        if values is not None:
            text.append(f"pred {_report._format_number(values[row])}")
        ax.set_title("\n".join(text), fontsize=8.5)
        ax.set_xticks([])
        ax.set_yticks([])
    scales = {}
    for col, name in enumerate(methods, start=1):
        mode = "abs" if name in NONNEGATIVE else "signed"
        scale = _render.percentile_scale(reduced[name], percentile)
        scales[name] = (mode, scale)
        for row, out in enumerate(indices):
            ax = figure.add_subplot(grid[row, col], label=f"{name} {out}")
            rgb = _render.render_saliency(
                reduced[name][row],
                mode=mode,
                percentile=percentile,
                scale=scale if scale > 0 else None,
            )
            ax.imshow(rgb, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            text = [_LABELS.get(name, name)]  # on every row: the rows line up with the inputs
            if aucs is not None and name in aucs:
                d = np.asarray(aucs[name].get("deletion"))[row]
                i = np.asarray(aucs[name].get("insertion"))[row]
                text.append(f"del {_report._format_number(d)} · ins {_report._format_number(i)}")
            ax.set_title("\n".join(text), fontsize=8.5 if row else 9.5)
            columns[name].append(ax)
    for name in methods:
        mode, scale = scales[name]
        signed = mode == "signed"
        limit = scale if scale > 0 else 1.0
        lut = _render.colormap_lut(
            _render.DEFAULT_CMAPS[mode],
            _render.SIGNED_LUT_SIZE if signed else _render.ABS_LUT_SIZE,
        )
        cax = figure.add_subplot(grid[k, 1 + methods.index(name)])
        bar = figure.colorbar(
            ScalarMappable(
                norm=matplotlib.colors.Normalize(vmin=-limit if signed else 0.0, vmax=limit),
                cmap=matplotlib.colors.ListedColormap(lut / 255.0),
            ),
            cax=cax,
            orientation="horizontal",
        )
        bar.ax.set_label(f"colorbar {name}")
        ticks = [-limit, 0.0, limit] if signed else [0.0, limit / 2, limit]
        bar.set_ticks(ticks, labels=[_report._format_number(t) for t in ticks])
        bar.ax.tick_params(labelsize=7)
        label = [_QUANTITY.get(name, name)]
        if scale == 0:
            label.append("all maps are exactly zero")
        if aucs is not None and name in aucs:
            d = float(np.mean(aucs[name]["deletion"]))
            i = float(np.mean(aucs[name]["insertion"]))
            label.append(
                f"deletion AUC {_report._format_number(d)} ↓\ninsertion AUC "
                f"{_report._format_number(i)} ↑"
            )
        if notes and name in notes:
            label.append(notes[name])
        bar.set_label("\n".join(label), fontsize=8)
    if title:
        figure.suptitle(title, fontsize=11)
    return figure


@dataclass
class Comparison:
    """What :func:`compare_methods` computed for one image.

    Attributes:
        maps: ``{method: (k, *input_shape)}`` the maps of the explained outputs.
        indices: ``(k,)`` the flat output indices explained (the same for every method).
        values: ``(k,)`` the model's outputs there.
        aucs: ``{method: {"deletion": (k,), "insertion": (k,)}}`` (empty without metrics).
        notes: ``{method: text}`` (e.g. the Grad-CAM layer).
        extras: ``{method: {"delta": (k,)} or {"layer": name}}``, what came with the maps.
    """

    maps: dict
    indices: np.ndarray
    values: np.ndarray
    aucs: dict = field(default_factory=dict)
    notes: dict = field(default_factory=dict)
    extras: dict = field(default_factory=dict)


def compare_methods(
    model,
    x,
    *,
    methods: Sequence[str] | Mapping[str, Mapping] = DEFAULT_METHODS,
    outputs=None,
    top_k: int | None = None,
    evaluate: bool = True,
    steps: int = 20,
    seed=0,
    batch_size: int | None = None,
    max_memory=None,
) -> Comparison:
    """Runs several attribution methods on one image (and their deletion and insertion curves).

    Arguments as :func:`comparison_sheet`; every method explains the same outputs (the first
    method's choice, with ``top_k``). Returns a :class:`Comparison`.
    """
    from augnet._attribution import METHODS, Attribution, attribute, method_name
    from augnet._attribution import metrics as M

    sample = np.asarray(x)
    if sample.ndim == 3:
        sample = sample[None]
    if sample.ndim != 4 or sample.shape[0] != 1:
        raise ValueError(
            f"`x` must be one image (1, H, W, C) or (H, W, C); received shape "
            f"{format_shape(np.shape(x))}. Pick one sample, e.g. x[i:i + 1]."
        )
    specs = methods.items() if isinstance(methods, Mapping) else [(m, {}) for m in methods]
    specs = [(method_name(m), dict(opts or {})) for m, opts in specs]
    if not specs:
        raise ValueError(invalid_value("methods", methods, "at least one method name"))
    result = Comparison(maps={}, indices=np.empty((1, 0), np.int64), values=None)
    indices = values = None
    for name, opts in specs:
        if indices is not None:  # every method explains the same outputs
            opts.setdefault("outputs", indices)
        else:
            if outputs is not None:
                opts.setdefault("outputs", outputs)
            if top_k is not None:
                opts.setdefault("top_k", top_k)
        if "seed" in inspect.signature(METHODS[name]).parameters:
            opts.setdefault("seed", seed)
        opts.setdefault("batch_size", batch_size)
        opts.setdefault("max_memory", max_memory)
        out = attribute(model, sample, method=name, **opts)
        if not isinstance(out, Attribution):
            out = Attribution(out, _indices_of(model, sample, opts.get("outputs"), out), None, name)
        if indices is None:
            indices, values = out.indices, out.values
        a = np.asarray(out.attributions)
        result.maps[name] = a.reshape(1, indices.shape[1], *sample.shape[1:])[0]
        if out.layer:
            result.notes[name] = f"layer {out.layer} {_layer_shape(model, out.layer)}"
            result.extras[name] = {"layer": out.layer}
        if out.delta is not None:
            result.extras[name] = {"delta": np.asarray(out.delta)[0]}
        if evaluate:
            common = dict(
                outputs=indices, steps=steps, batch_size=batch_size, max_memory=max_memory
            )
            result.aucs[name] = {
                "deletion": M.deletion(model, sample, a, **common).auc[0],
                "insertion": M.insertion(model, sample, a, **common).auc[0],
            }
    if values is None:
        from augnet._attribution import _base

        values = _base.prepare(model, sample, outputs=indices).values()
    result.indices = np.asarray(indices)[0]
    result.values = np.asarray(values)[0]
    return result


def comparison_figure(
    comparison: Comparison,
    image: object,
    *,
    output_names: Sequence[str] | None = None,
    percentile: float = 99.0,
    reduce: str = "mean",
    title: str | None = None,
) -> Figure:
    """The figure of :func:`build_comparison_sheet` for a :class:`Comparison`."""
    return build_comparison_sheet(
        image=image,
        maps=comparison.maps,
        output_indices=[int(i) for i in comparison.indices],
        predictions=comparison.values,
        output_names=output_names,
        aucs=comparison.aucs or None,
        notes=comparison.notes,
        percentile=percentile,
        reduce=reduce,
        title=title,
    )


def figure_png(figure: Figure, *, dpi: int = _report.DPI, metadata=None) -> bytes:
    """The figure as PNG bytes (``metadata``: PNG text chunks)."""
    stream = io.BytesIO()
    figure.savefig(stream, format="png", dpi=dpi, metadata=metadata)
    return stream.getvalue()


def comparison_sheet(
    path: str | os.PathLike,
    model,
    x,
    *,
    methods: Sequence[str] | Mapping[str, Mapping] = DEFAULT_METHODS,
    outputs=None,
    top_k: int | None = None,
    image: object = None,
    output_names: Sequence[str] | None = None,
    evaluate: bool = True,
    steps: int = 20,
    seed=0,
    percentile: float = 99.0,
    reduce: str = "mean",
    title: str | None = None,
    overwrite: bool = False,
    dpi: int = _report.DPI,
    batch_size: int | None = None,
    max_memory=None,
) -> pathlib.Path:
    """Runs several attribution methods on one image and writes them side by side in a PNG.

    Args:
        path: the PNG to write (``.png``; the parent folder is created; written atomically).
        model: a ``keras.Model`` with one image input (channels last).
        x: one sample ``(1, H, W, C)`` (or ``(H, W, C)``).
        methods: method names (default gradient, SmoothGrad, integrated gradients, Grad-CAM,
            occlusion), or ``{name: options}``; see ``augnet.attribute``.
        outputs, top_k: which outputs to show (at most 16; default all of them, or the model's
            single output); ``top_k`` is chosen on ``x``.
        image: what to show as the input (default ``x`` itself, min-max scaled).
        output_names: names of the shown outputs, for the row titles.
        evaluate: compute each map's deletion and insertion AUC (``augnet.deletion`` /
            ``augnet.insertion`` with ``steps`` steps; a few hundred model evaluations).
        seed: for the methods that draw noise.
        percentile, reduce, title: as :func:`build_comparison_sheet`.
        overwrite: replace an existing file (otherwise ``FileExistsError``).
        dpi: the PNG's resolution.
        batch_size, max_memory: per engine pass / model evaluation.

    Returns:
        The path written.

    Example:
        >>> augnet.comparison_sheet("compare.png", model, x, outputs=[0, 5, 12])  # doctest: +SKIP
    """
    target = _report._check_path(path)
    if not isinstance(overwrite, bool):
        raise TypeError(invalid_value("overwrite", overwrite, "True or False"))
    if target.exists() and not overwrite:
        raise _render.existing_file_error(target)
    if isinstance(dpi, bool) or not isinstance(dpi, int) or not (30 <= dpi <= 1200):
        raise ValueError(invalid_value("dpi", dpi, "an integer in [30, 1200]"))
    comparison = compare_methods(
        model,
        x,
        methods=methods,
        outputs=outputs,
        top_k=top_k,
        evaluate=evaluate,
        steps=steps,
        seed=seed,
        batch_size=batch_size,
        max_memory=max_memory,
    )
    sample = np.asarray(x)
    shown = (
        image if image is not None else _display_image(sample.reshape(-1, *sample.shape[-3:])[0])
    )
    figure = comparison_figure(
        comparison,
        shown,
        output_names=output_names,
        percentile=percentile,
        reduce=reduce,
        title=title,
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(
        prefix=f".{target.name}.", suffix=".tmp", dir=target.parent
    )
    try:
        with os.fdopen(descriptor, "wb") as stream:
            figure.savefig(stream, format="png", dpi=dpi)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)  # as open() would (mkstemp makes it private)
        os.replace(temporary, target)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
    return target


def _layer_shape(model, path: str) -> str:
    from augnet._attribution.gradcam import find_layer

    try:
        _, layer = find_layer(model, path)
        return "×".join(str(d) for d in layer.output.shape[1:])
    except Exception:  # pragma: no cover - only a label
        return ""


def _indices_of(model, sample, outputs, maps) -> np.ndarray:
    """``(1, k)`` the flat output indices of bare maps."""
    from augnet._attribution import _base

    problem = _base.prepare(model, sample, outputs=outputs)
    return problem.indices()
