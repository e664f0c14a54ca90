"""Contact sheet: the input image and one saliency panel per output, in one PNG.

matplotlib's object API on an Agg canvas only (`Figure` + `FigureCanvasAgg`); pyplot and its
global state are never touched, so this is safe in scripts, servers and threads.

Scale: by default every panel uses ONE common scale, the `percentile`-th percentile of |J| pooled
over all shown maps, so that colours compare between panels and the colour bar is in real units
of ∂y/∂x. Each panel's title gives that map's own max |J|, so a map that looks faint is known to
be weak rather than broken. `shared_scale=False` scales each map by its own percentile instead;
the colour bar then is in units of that per-map scale and says so.
"""

from __future__ import annotations

import io
import math
import os
import pathlib
from collections.abc import Sequence

import matplotlib.colors
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.figure import Figure

from augnet import _render, _safeio
from augnet._errors import format_shape, invalid_value

MAX_COLUMNS = 5
MAX_OUTPUTS = 100
PANEL_INCHES = 2.6
DPI = 150
_NAME_CHARS = 28


def _check_predictions(predictions: object, n_outputs: int) -> list[float] | None:
    if predictions is None:
        return None
    array = _render._as_real_array("predictions", predictions)
    if array.shape != (n_outputs,):
        raise ValueError(
            f"`predictions` must hold one value per output of the Jacobian, shape "
            f"({n_outputs},); received shape {format_shape(array.shape)}. Pass the model's "
            "outputs for this sample at the same indices, e.g. top_k.values[i]."
        )
    return [float(v) for v in array]


def _check_output_names(output_names: object, n_outputs: int) -> list[str] | None:
    if output_names is None:
        return None
    if isinstance(output_names, (str, bytes)) or not isinstance(output_names, Sequence):
        raise TypeError(
            invalid_value(
                "output_names",
                output_names,
                f"None or a sequence of {n_outputs} strings, one per output of the Jacobian",
            )
        )
    if len(output_names) != n_outputs:
        raise ValueError(
            f"`output_names` must hold one name per output of the Jacobian ({n_outputs}); "
            f"received {len(output_names)} names. For class names of the whole model pass "
            "[class_names[k] for k in output_indices]."
        )
    return [str(name) for name in output_names]


def _check_path(path: object) -> pathlib.Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(
            invalid_value("path", path, "a file path (str or pathlib.Path) ending in .png")
        )
    result = pathlib.Path(path)
    if result.suffix.lower() != ".png":
        raise ValueError(
            invalid_value(
                "path", str(path), "a file path ending in .png", "Contact sheets are PNG files."
            )
        )
    return result


def grid_shape(n_panels: int, max_columns: int = MAX_COLUMNS) -> tuple[int, int]:
    """Rows and columns for `n_panels`: as few rows as `max_columns` allows, balanced.

    Args:
        n_panels: Number of panels, at least 1.
        max_columns: The most panels in one row.

    Returns:
        `(rows, columns)`, e.g. 6 panels -> `(2, 3)` rather than 5 + 1.

    Example:

    >>> grid_shape(6), grid_shape(4), grid_shape(11)
    ((2, 3), (1, 4), (3, 4))
    """
    rows = math.ceil(n_panels / max_columns)
    return rows, math.ceil(n_panels / rows)


def _format_number(value: float) -> str:
    """Three significant digits: 0.412, 0.00101, 1.2e-05, 3.55."""
    return _render.format_number(value)


def _quantity_label(mode: str, reduce: str, n_channels: int) -> str:
    """The colour bar's quantity, in mathtext."""
    d = r"\partial y_k/\partial x"
    dc = r"\partial y_k/\partial x_c"
    if n_channels == 1:
        return rf"$|{d}|$" if mode == "abs" else rf"${d}$"
    if reduce == "l2":
        return rf"$\|{d}\|_2$ over channels $c$"
    if reduce == "sum":
        inner = rf"\sum_c {dc}"
    elif reduce == "mean":
        inner = rf"\mathrm{{mean}}_c\, {dc}"
    elif mode == "abs":
        return rf"$\max_c |{dc}|$"
    else:
        return rf"${dc}$ of the channel $c$ with the largest $|{dc}|$"
    return rf"$|{inner}|$" if mode == "abs" else rf"${inner}$"


def build_contact_sheet(
    *,
    image: object,
    jacobian: object,
    output_indices: Sequence[int] | np.ndarray | None = None,
    predictions: Sequence[float] | np.ndarray | None = None,
    output_names: Sequence[str] | None = None,
    mode: str = "signed",
    cmap: str | matplotlib.colors.Colormap | None = None,
    percentile: float = 99.0,
    reduce: str = "maxabs",
    title: str | None = None,
    shared_scale: bool = True,
    overlay: bool = False,
    alpha: float = 0.8,
    quantity: str | None = None,
) -> Figure:
    """Builds the contact sheet figure (see `contact_sheet`) without saving it.

    The figure's axes are, in order: the input image (label "input"), one panel per output
    (labels "output {k}") and the colour bar (label "colorbar"); `ax.get_label()` tells them apart.

    Args:
        image: The input image, `(H', W')` or `(H', W', 3)`, uint8 or float in [0, 1]; any size
            (shown as is), normally the model's input for this sample.
        jacobian: One sample's Jacobian, `(n_outputs, H, W)` or `(n_outputs, H, W, C)`, at most
            100 outputs.
        output_indices: `None` or `n_outputs` distinct non-negative ints naming the outputs
            (e.g. top-k class indices); default 0..n_outputs-1.
        predictions: `None` or `(n_outputs,)` model outputs, shown in the titles.
        output_names: `None` or `n_outputs` names (e.g. class names), aligned with the
            Jacobian's first axis like `predictions`.
        mode: "signed" or "abs".
        cmap: Colormap name or `Colormap`; `None` for the mode's default.
        percentile: In (0, 100]; the percentile of |J| that the colour bar's end stands for.
        reduce: Channel reduction, "maxabs", "l2", "sum" or "mean".
        title: Optional figure title.
        shared_scale: One scale for all panels (default; colour bar in units of ∂y/∂x) or one
            per map (colour bar in units of each map's percentile).
        overlay: Blend each panel over `image` (which must then have the maps' height and
            width), as `render_saliency(..., image=image)` does.
        alpha: With `overlay`, the colour's weight where saliency is largest, in [0, 1].
        quantity: What the maps are, for the colour bar (mathtext allowed), when they are not
            the Jacobian (an attribution method's maps); titles then say "|map|", not "|J|".

    Returns:
        A `matplotlib.figure.Figure` with a `FigureCanvasAgg` canvas.

    Example:

    >>> jac = np.random.default_rng(0).normal(size=(3, 28, 28, 1))
    >>> fig = build_contact_sheet(image=np.zeros((28, 28)), jacobian=jac)
    >>> [ax.get_label() for ax in fig.axes]
    ['input', 'output 0', 'output 1', 'output 2', 'colorbar']
    """
    array = _render._check_jacobian(jacobian)
    n_outputs = array.shape[0]
    if n_outputs > MAX_OUTPUTS:
        raise ValueError(
            f"`jacobian` has {n_outputs} outputs (shape {format_shape(array.shape)}); a contact "
            f"sheet shows at most {MAX_OUTPUTS}. Select the outputs to show, e.g. the top-k "
            "(jacobian(..., top_k=5)) or jacobian[:16], and pass their output_indices."
        )
    indices = _render.check_output_indices(output_indices, n_outputs)
    values = _check_predictions(predictions, n_outputs)
    names = _check_output_names(output_names, n_outputs)
    mode = _render._check_choice("mode", mode, _render.MODES)
    reduce = _render._check_choice("reduce", reduce, _render.REDUCTIONS)
    cmap_name = _render.resolve_cmap(cmap, mode)
    colormap = cmap if isinstance(cmap, matplotlib.colors.Colormap) else cmap_name
    percentile = _render._check_percentile(percentile)
    photo = _render._check_image(image, None)
    alpha = _render._check_alpha(alpha)
    if not isinstance(overlay, bool):
        raise TypeError(invalid_value("overlay", overlay, "True or False"))
    if quantity is not None and not isinstance(quantity, str):
        raise TypeError(invalid_value("quantity", quantity, "None or a string"))
    symbol = "J" if quantity is None else "map"
    if overlay:
        _render._check_image(image, tuple(array.shape[1:3]))
    if title is not None and not isinstance(title, str):
        raise TypeError(invalid_value("title", title, "None or a string"))

    reduced = np.stack([_render.reduce_channels(m, reduce) for m in array])
    n_channels = 1 if array.ndim == 3 else array.shape[-1]
    signed = mode == "signed"
    pooled = _render.percentile_scale(reduced, percentile)
    per_map = [_render.percentile_scale(m, percentile) for m in reduced]
    scale = pooled if shared_scale and pooled > 0.0 else None

    rows, columns = grid_shape(1 + n_outputs)
    height, width = reduced.shape[1:]
    aspect = height / width
    title_lines = 2 + (values is not None)
    panel_height = PANEL_INCHES * min(max(aspect, 0.4), 2.5)
    figure = Figure(
        figsize=(
            columns * PANEL_INCHES + 0.3,
            rows * (panel_height + 0.16 * title_lines + 0.12) + 0.9 + (0.35 if title else 0.0),
        ),
        dpi=DPI,
        layout="constrained",
    )
    FigureCanvasAgg(figure)
    grid = figure.add_gridspec(rows, columns)

    axes = []
    ax = figure.add_subplot(grid[0, 0], label="input")
    ax.imshow(photo, cmap="gray" if photo.ndim == 2 else None, vmin=0.0, vmax=1.0)
    ax.set_title(f"input {format_shape(photo.shape)}", fontsize=9)
    axes.append(ax)

    for position, (k, jacobian_map) in enumerate(zip(indices, reduced, strict=True), start=1):
        ax = figure.add_subplot(grid[divmod(position, columns)], label=f"output {k}")
        rgb = _render.render_saliency(
            jacobian_map,
            mode=mode,
            cmap=colormap,
            percentile=percentile,
            scale=scale,
            image=photo if overlay else None,
            alpha=alpha,
        )
        ax.imshow(rgb, interpolation="nearest")
        heading = f"output {k}"
        if names is not None:
            name = names[position - 1]
            if len(name) > _NAME_CHARS:
                name = name[: _NAME_CHARS - 1] + "…"
            heading += f" · {name}"
        lines = [heading]
        if values is not None:
            lines.append(f"pred {_format_number(values[position - 1])}")
        magnitude = float(np.abs(jacobian_map).max())
        if shared_scale:
            lines.append(f"max |{symbol}| {_format_number(magnitude)}")
        else:
            lines.append(f"p{percentile:g} |{symbol}| {_format_number(per_map[position - 1])}")
        ax.set_title("\n".join(lines), fontsize=8.5)
        axes.append(ax)

    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])

    quantity = _quantity_label(mode, reduce, n_channels) if quantity is None else quantity
    lut = (
        _render.signed_lut(colormap)
        if signed
        else _render.colormap_lut(colormap, _render.ABS_LUT_SIZE)
    )
    listed = matplotlib.colors.ListedColormap(lut / 255.0, name=cmap_name)
    pct = f"p{percentile:g}"
    if shared_scale and pooled > 0.0:
        limit = pooled
        note = (
            f"one scale for all panels: colour ends at {'±' if signed else ''}"
            f"{_format_number(pooled)} = {pct} of |{symbol}| over all maps; larger values clipped"
        )
    elif shared_scale:
        limit = 1.0
        note = "all maps are exactly zero"
    else:
        limit = 1.0
        note = (
            f"each map divided by its own {pct} of |{symbol}|, given in its title, and clipped; "
            "colours do not compare between panels"
        )
        quantity = f"{quantity} / {pct}"
    norm = matplotlib.colors.Normalize(vmin=-limit if signed else 0.0, vmax=limit)
    colorbar = figure.colorbar(
        ScalarMappable(norm=norm, cmap=listed),
        ax=axes,
        location="bottom",
        shrink=min(1.0, 0.35 + 0.13 * columns),
        aspect=40,
        pad=0.02,
    )
    colorbar.ax.set_label("colorbar")
    colorbar.set_label(f"{quantity}\n({note})", fontsize=8.5)
    colorbar.ax.tick_params(labelsize=8)
    if title:
        figure.suptitle(title, fontsize=11)
    return figure


def contact_sheet(
    path: str | os.PathLike,
    *,
    image: object,
    jacobian: object,
    output_indices: Sequence[int] | np.ndarray | None = None,
    predictions: Sequence[float] | np.ndarray | None = None,
    output_names: Sequence[str] | None = None,
    mode: str = "signed",
    cmap: str | matplotlib.colors.Colormap | None = None,
    percentile: float = 99.0,
    reduce: str = "maxabs",
    title: str | None = None,
    overwrite: bool = False,
    shared_scale: bool = True,
    dpi: int = DPI,
    overlay: bool = False,
    alpha: float = 0.8,
) -> pathlib.Path:
    """Saves a contact sheet PNG: the input image, then one saliency panel per output.

    Panels are laid out at most 5 per row, balanced (6 panels -> 2 rows of 3). Each output's
    panel is titled with its index, name and prediction when given (e.g. "output 3 · pred
    0.412") and its own max |J|. One colour bar, labelled with the quantity and the scale, is
    shared by all panels: by default all maps use one common scale (the `percentile` of |J| over
    all maps), so colours compare between panels; see `build_contact_sheet`.

    The parent directory is created if needed; the file is written atomically (an exclusive,
    unpredictable temporary name, then a rename; never through a link) and its mode follows the
    umask.

    Args:
        path: Output file, ending in ".png".
        image: The input image, `(H', W')` or `(H', W', 3)`, uint8 or float in [0, 1].
        jacobian: One sample's Jacobian, `(n_outputs, H, W)` or `(n_outputs, H, W, C)`.
        output_indices: `None` or `n_outputs` distinct non-negative ints naming the outputs.
        predictions: `None` or `(n_outputs,)` model outputs for this sample.
        output_names: `None` or `n_outputs` names, aligned with the Jacobian's first axis.
        mode: "signed" or "abs".
        cmap: Colormap name or `Colormap`; `None` for the mode's default.
        percentile: In (0, 100].
        reduce: Channel reduction, "maxabs", "l2", "sum" or "mean".
        title: Optional figure title.
        overwrite: Replace an existing file; otherwise raise `FileExistsError`.
        shared_scale: One scale for all panels (default) or one per map.
        dpi: Resolution of the PNG, 150 by default.
        overlay: Blend each panel over `image` (same height and width as the maps).
        alpha: With `overlay`, the colour's weight where saliency is largest.

    Returns:
        The written path, a `pathlib.Path`.

    Example:

    >>> import tempfile
    >>> jac = np.random.default_rng(0).normal(size=(3, 28, 28, 1))
    >>> path = contact_sheet(
    ...     pathlib.Path(tempfile.mkdtemp()) / "sheet.png",
    ...     image=np.zeros((28, 28)), jacobian=jac, predictions=[0.7, 0.2, 0.1])
    >>> path.name
    'sheet.png'
    """
    target = _check_path(path)
    if not isinstance(overwrite, bool):
        raise TypeError(invalid_value("overwrite", overwrite, "True or False"))
    if (target.exists() or target.is_symlink()) and not overwrite:
        raise _render.existing_file_error(target)
    data = contact_sheet_png(
        image=image,
        jacobian=jacobian,
        output_indices=output_indices,
        predictions=predictions,
        output_names=output_names,
        mode=mode,
        cmap=cmap,
        percentile=percentile,
        reduce=reduce,
        title=title,
        shared_scale=shared_scale,
        dpi=dpi,
        overlay=overlay,
        alpha=alpha,
    )
    try:
        _safeio.write_file(target, data, overwrite=overwrite)
    except FileExistsError:
        raise _render.existing_file_error(target) from None
    return target


def contact_sheet_png(*, dpi: int = DPI, **kwargs) -> bytes:
    """The contact sheet as the bytes of a PNG file (nothing written); the arguments are those
    of `build_contact_sheet`, plus `dpi`."""
    if isinstance(dpi, bool) or not isinstance(dpi, int) or not (30 <= dpi <= 1200):
        raise ValueError(invalid_value("dpi", dpi, "an integer in [30, 1200]"))
    figure = build_contact_sheet(**kwargs)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()
