"""A small colour bar with its scale in real units, drawn under a saliency map (NumPy + pillow).

A per-output PNG read alone must say how strong its colours are (issue 9: two maps scaled each to
its own percentile looked equally strong at max |J| 2e-13 and 3.6e-3). :func:`with_colorbar` puts
:func:`colorbar_strip` under a map: the colormap as `augnet._render.render_saliency` uses it, labelled
``-s, 0, +s`` (signed) or ``0, s`` (abs) in the Jacobian's units. No TensorFlow, no pyplot.
"""

from __future__ import annotations

import functools

import matplotlib.colors
import numpy as np
from PIL import Image

from augnet._render import (
    ABS_LUT_SIZE,
    MODES,
    _check_choice,
    colormap_lut,
    format_number,
    resolve_cmap,
    signed_lut,
)

# The colour bar under a map is at least this wide (the map is centred on a wider canvas).
COLORBAR_MIN_WIDTH = 200


@functools.lru_cache(maxsize=8)
def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # pragma: no cover - pillow without FreeType
        return ImageFont.load_default()


def colorbar_strip(
    width: int,
    *,
    scale: float,
    mode: str = "signed",
    cmap: str | matplotlib.colors.Colormap | None = None,
) -> np.ndarray:
    """A small colour bar with its scale in real units, to put under a map.

    The bar spans the colormap as `render_saliency` uses it: in signed mode from `-scale` (left)
    through 0 to `+scale` (right), in abs mode from 0 to `scale`; the labels give those values
    (values beyond them are clipped to the ends). `scale` 0 labels the strip "exactly zero".

    Args:
        width: Width of the strip in pixels (at least `COLORBAR_MIN_WIDTH` looks right).
        scale: The |value| at the colormap's ends, in the Jacobian's units (e.g. ∂y/∂x).
        mode: "signed" or "abs".
        cmap: Colormap name or `Colormap`; `None` for the mode's default.

    Returns:
        A `(h, width, 3)` uint8 RGB strip, white background.

    Example:

    >>> colorbar_strip(256, scale=3.6e-3).shape[1]
    256
    """
    mode = _check_choice("mode", mode, MODES)
    if isinstance(cmap, matplotlib.colors.Colormap):
        return _strip(int(width), float(scale), mode, cmap).copy()
    return _cached_strip(int(width), float(scale), mode, resolve_cmap(cmap, mode)).copy()


@functools.lru_cache(maxsize=32)
def _cached_strip(width: int, scale: float, mode: str, cmap: str) -> np.ndarray:
    strip = _strip(width, scale, mode, cmap)
    strip.flags.writeable = False
    return strip


def _strip(width: int, scale: float, mode: str, colormap) -> np.ndarray:
    from PIL import ImageDraw

    size = int(min(28, max(11, width // 24)))
    font = _font(size)
    bar_h = max(6, size * 2 // 3)
    pad = max(3, size // 3)
    height = pad + bar_h + pad // 2 + size + pad
    strip = Image.new("RGB", (width, height), (255, 255, 255))
    x0, x1 = int(width * 0.12), int(width * 0.88)
    n = max(2, x1 - x0)
    lut = signed_lut(colormap) if mode == "signed" else colormap_lut(colormap, ABS_LUT_SIZE)
    positions = np.linspace(0.0, 1.0, n)
    index = np.rint(positions * (len(lut) - 1)).astype(np.intp)
    bar = np.repeat(lut[index][None], bar_h, axis=0)
    strip.paste(Image.fromarray(bar, "RGB"), (x0, pad))
    draw = ImageDraw.Draw(strip)
    draw.rectangle((x0 - 1, pad - 1, x0 + n, pad + bar_h), outline=(120, 120, 120))
    y = pad + bar_h + pad // 2
    if not scale:
        draw.text((width // 2, y), "map is exactly zero", fill=(0, 0, 0), font=font, anchor="ma")
    else:
        text = format_number(float(scale))
        ticks = (
            [(x0, f"-{text}"), ((x0 + x0 + n) // 2, "0"), (x0 + n, f"+{text}")]
            if mode == "signed"
            else [(x0, "0"), (x0 + n, text)]
        )
        for x, label in ticks:
            draw.text((x, y), label, fill=(0, 0, 0), font=font, anchor="ma")
    return np.asarray(strip)


def with_colorbar(
    rgb: np.ndarray,
    *,
    scale: float,
    mode: str = "signed",
    cmap: str | matplotlib.colors.Colormap | None = None,
) -> np.ndarray:
    """`rgb` `(H, W, 3)` with a `colorbar_strip` under it; a map narrower than
    `COLORBAR_MIN_WIDTH` is centred on a white canvas that wide. The map's pixels are unchanged:
    `result[:H, left:left + W] == rgb`, with `left = (width - W) // 2`."""
    height, width = rgb.shape[:2]
    canvas_w = max(width, COLORBAR_MIN_WIDTH)
    strip = colorbar_strip(canvas_w, scale=scale, mode=mode, cmap=cmap)
    out = np.full((height + strip.shape[0], canvas_w, 3), 255, dtype=np.uint8)
    left = (canvas_w - width) // 2
    out[:height, left : left + width] = rgb
    out[height:] = strip
    return out
