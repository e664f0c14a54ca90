"""Saliency rendering: Jacobian maps to RGB images and PNG files.

NumPy and pillow only, with matplotlib colormaps used as lookup tables (no pyplot, no
TensorFlow). Every function here is pure except `save_jacobian_images`, which writes files.

Conventions:

- A *map* is one output's Jacobian with respect to one image input, `(H, W)` or `(H, W, C)`
  (channels last, as Keras image models use).
- Signed mode shows the sign of ∂y/∂x with a diverging colormap: zero is exactly the colormap's
  centre, positive values go to its top end (red for "RdBu_r"), negative to its bottom (blue).
- Abs mode shows |∂y/∂x| with a sequential colormap: zero is the colormap's start.
- Values are divided by a robust scale (by default the 99th percentile of |map|) and clipped, so
  a single outlier pixel does not wash the rest of the map out.
"""

from __future__ import annotations

import difflib
import functools
import io
import math
import os
import pathlib
from collections.abc import Sequence
from numbers import Integral, Real

import matplotlib
import matplotlib.colors
import numpy as np
from PIL import Image

from augnet import _safeio
from augnet._errors import format_shape, invalid_value

MODES = ("signed", "abs")
REDUCTIONS = ("maxabs", "l2", "sum", "mean")
DEFAULT_CMAPS = {"signed": "RdBu_r", "abs": "inferno"}

# A signed lookup table has an odd number of entries so that its middle entry, which zero maps
# to, is the colormap sampled at exactly 0.5; 128 levels on each side of it.
SIGNED_LUT_SIZE = 257
ABS_LUT_SIZE = 256

# `save_jacobian_images(upscale=None)` enlarges small maps until the longer side is this long.
AUTO_UPSCALE_MIN_SIDE = 256
# An explicit `upscale` may enlarge a map to at most this many pixels per side.
MAX_UPSCALED_SIDE = 8192  # 67 Mpx: below pillow's decompression-bomb limit when read back
# In signed mode the colormap's centre entry, where zero lands (|value| < scale / 256), is drawn
# in this colour: pure white, "no effect" (RdBu_r's own centre is a light grey, 247).
ZERO_COLOUR = (255, 255, 255)

_PNG_DIGITS_MIN = 2


# ----------------------------------------------------------------------------------------------
# Argument checks
# ----------------------------------------------------------------------------------------------


def _check_choice(argument: str, value: object, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(
            invalid_value(argument, value, f"one of {tuple(choices)}", "Pass one of those names.")
        )
    return value


def _check_percentile(percentile: object) -> float:
    if isinstance(percentile, bool) or not isinstance(percentile, Real):
        raise TypeError(
            invalid_value(
                "percentile",
                percentile,
                "a number in (0, 100]",
                "Pass e.g. percentile=99.0 (100 scales by the maximum).",
            )
        )
    value = float(percentile)
    if not (0.0 < value <= 100.0):
        raise ValueError(
            invalid_value(
                "percentile",
                percentile,
                "a number in (0, 100]",
                "Pass e.g. percentile=99.0 (100 scales by the maximum).",
            )
        )
    return value


def _check_alpha(alpha: object) -> float:
    expected = "a number in [0, 1] (the colour's weight where saliency is largest)"
    if isinstance(alpha, bool) or not isinstance(alpha, Real):
        raise TypeError(invalid_value("alpha", alpha, expected))
    value = float(alpha)
    if not (0.0 <= value <= 1.0):
        raise ValueError(invalid_value("alpha", alpha, expected))
    return value


def _check_scale(scale: object) -> float | None:
    if scale is None:
        return None
    expected = "None or a positive finite number (the |value| that maps to the colormap's end)"
    if isinstance(scale, bool) or not isinstance(scale, Real):
        raise TypeError(invalid_value("scale", scale, expected))
    value = float(scale)
    if not (math.isfinite(value) and value > 0.0):
        raise ValueError(invalid_value("scale", scale, expected))
    return value


def _is_top_k(value: object) -> bool:
    return all(hasattr(value, a) for a in ("jacobian", "indices", "values"))


def _as_real_array(argument: str, value: object) -> np.ndarray:
    """Converts array-likes (NumPy arrays, tensors, lists) to a real floating NumPy array."""
    if _is_top_k(value):
        raise TypeError(
            f"`{argument}` is a TopKJacobian (the result of top_k=...), not an array. Pass one "
            f"sample's maps and their output indices, e.g. {argument}=result.jacobian[i] with "
            "output_indices=result.indices[i] (and predictions=result.values[i] for a contact "
            "sheet)."
        )
    try:
        array = np.asarray(value)
    except Exception as error:
        raise TypeError(
            f"`{argument}` must be a NumPy array or array-like of real numbers. "
            f"Received: {argument} of type {type(value).__name__} ({error})."
        ) from None
    if array.dtype == bool or not (
        np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)
    ):
        raise TypeError(
            f"`{argument}` must hold real numbers (a float or integer dtype). "
            f"Received: {argument} with dtype {array.dtype} and shape {format_shape(array.shape)}."
        )
    return array


def _check_finite(argument: str, array: np.ndarray) -> None:
    finite = np.isfinite(array)
    if not finite.all():
        bad = int(array.size - np.count_nonzero(finite))
        first = tuple(int(i) for i in np.argwhere(~finite)[0])
        raise ValueError(
            f"`{argument}` contains {bad} non-finite value(s) (NaN or inf), the first at index "
            f"{first}: {array[first]!r}. A saliency map needs finite values; check the model "
            "for overflow (e.g. compute the Jacobian in float64) or replace them with "
            "np.nan_to_num before rendering."
        )


def _check_map(argument: str, jacobian_map: object) -> np.ndarray:
    """Validates one map, `(H, W)` or `(H, W, C)`."""
    array = _as_real_array(argument, jacobian_map)
    if array.ndim == 4:
        raise ValueError(
            f"`{argument}` must be one map of shape (H, W) or (H, W, C); received shape "
            f"{format_shape(array.shape)}, which looks like a Jacobian of several outputs "
            f"(n_outputs, H, W, C). Pass {argument}[k] for output k, or use "
            "save_jacobian_images for all of them."
        )
    if array.ndim not in (2, 3):
        raise ValueError(
            f"`{argument}` must be one map of shape (H, W) or (H, W, C); received shape "
            f"{format_shape(array.shape)}. Select one sample and one output first, "
            "e.g. jacobian[i, k] for sample i and output k."
        )
    if array.size == 0:
        raise ValueError(
            f"`{argument}` is empty: received shape {format_shape(array.shape)}. "
            "Every axis must have length at least 1."
        )
    _check_finite(argument, array)
    return array


def _check_image(image: object, spatial_shape: tuple[int, int] | None) -> np.ndarray:
    """Validates an image and returns it as float64 in [0, 1], `(H, W)` or `(H, W, 3)`."""
    try:
        array = np.asarray(image)
    except Exception:
        array = None
    expected = "(H, W) or (H, W, 3), uint8 in [0, 255] or float in [0, 1]"
    if array is None or not (array.dtype == np.uint8 or np.issubdtype(array.dtype, np.floating)):
        dtype = None if array is None else array.dtype
        raise TypeError(
            f"`image` must be an array of shape {expected}. Received: image of type "
            f"{type(image).__name__} with dtype {dtype}. Convert it with "
            "np.asarray(pil_image) (uint8) or image.astype('float32') / 255."
        )
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] != 3):
        raise ValueError(
            f"`image` must have shape {expected}; received shape {format_shape(array.shape)}. "
            "Pass one image (not a batch), grayscale or RGB (drop an alpha channel with "
            "image[..., :3])."
        )
    if spatial_shape is not None and tuple(array.shape[:2]) != tuple(spatial_shape):
        raise ValueError(
            f"`image` must have the same height and width as the Jacobian map, "
            f"{format_shape(spatial_shape)}; received image of shape "
            f"{format_shape(array.shape)}. Pass the model's input image (after resizing), "
            "not the original photo."
        )
    if array.dtype == np.uint8:
        return array.astype(np.float64) / 255.0
    array = array.astype(np.float64)
    _check_finite("image", array)
    low, high = float(array.min()), float(array.max())
    if low < 0.0 or high > 1.0:
        raise ValueError(
            f"A float `image` must have values in [0, 1]; received values in "
            f"[{low:.4g}, {high:.4g}]. Rescale it first, e.g. image / 255.0 for pixel values "
            "in [0, 255], or pass it as uint8."
        )
    return array


def _to_grayscale(image: np.ndarray) -> np.ndarray:
    """`(H, W)` or `(H, W, 3)` float in [0, 1] -> `(H, W)` luma (ITU-R 601, as pillow's "L")."""
    if image.ndim == 2:
        return image
    return image @ np.array([0.299, 0.587, 0.114])


# ----------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------


def resolve_cmap(cmap: str | matplotlib.colors.Colormap | None, mode: str = "signed") -> str:
    """Checks a colormap argument and returns its name (the mode's default for `None`).

    Args:
        cmap: A matplotlib colormap name, a `matplotlib.colors.Colormap`, or `None` for the
            mode's default ("RdBu_r" for "signed", "inferno" for "abs").
        mode: "signed" or "abs".

    Returns:
        The colormap's name, registered in `matplotlib.colormaps`, or the object's own name.

    Example:

    >>> resolve_cmap(None, "abs")
    'inferno'
    """
    mode = _check_choice("mode", mode, MODES)
    if cmap is None:
        return DEFAULT_CMAPS[mode]
    if isinstance(cmap, matplotlib.colors.Colormap):
        return cmap.name
    names = sorted(matplotlib.colormaps)
    if isinstance(cmap, str) and cmap in matplotlib.colormaps:
        return cmap
    if not isinstance(cmap, str):
        raise TypeError(
            invalid_value("cmap", cmap, "None, a matplotlib colormap name or a matplotlib Colormap")
        )
    close = difflib.get_close_matches(cmap, names, n=3)
    hint = f" Did you mean {', '.join(repr(n) for n in close)}?" if close else ""
    base = [n for n in names if not n.endswith("_r")]
    raise ValueError(
        invalid_value("cmap", cmap, "a matplotlib colormap name")
        + hint
        + " Good choices: 'RdBu_r', 'coolwarm', 'bwr' (signed); 'inferno', 'magma', 'viridis',"
        + " 'gray' (abs). All valid names (each also reversed as '<name>_r'): "
        + ", ".join(base)
        + "."
    )


def colormap_lut(name: str | matplotlib.colors.Colormap, size: int = ABS_LUT_SIZE) -> np.ndarray:
    """Samples a matplotlib colormap into an RGB lookup table.

    Entry `i` is the colormap at `i / (size - 1)`, so with an odd `size` the middle entry
    `size // 2` is the colormap's exact centre (0.5).

    Args:
        name: A matplotlib colormap name (see `matplotlib.colormaps`) or a `Colormap`.
        size: Number of entries, at least 2. 256 by default; `render_saliency` uses 257 in
            signed mode so that zero has an exact centre entry.

    Returns:
        A `(size, 3)` uint8 array of RGB colours.

    Example:

    >>> lut = colormap_lut("RdBu_r")
    >>> lut.shape, lut.dtype
    ((256, 3), dtype('uint8'))
    """
    if isinstance(size, bool) or not isinstance(size, Integral) or size < 2:
        raise ValueError(invalid_value("size", size, "an integer >= 2"))
    if isinstance(name, matplotlib.colors.Colormap):
        colormap = name
    else:
        colormap = matplotlib.colormaps[resolve_cmap(name)]
    if isinstance(name, str):
        return _named_lut(colormap.name, int(size)).copy()
    return _sample_lut(colormap, int(size))


def _sample_lut(colormap: matplotlib.colors.Colormap, size: int) -> np.ndarray:
    # `resampled` interpolates segmented colormaps at the new sample points instead of
    # snapping to their stored 256 entries, so the middle of an odd-sized table is exact.
    rgba = colormap.resampled(size)(np.linspace(0.0, 1.0, size))
    return np.rint(np.asarray(rgba)[:, :3] * 255.0).astype(np.uint8)


@functools.lru_cache(maxsize=64)
def _named_lut(name: str, size: int) -> np.ndarray:
    """`colormap_lut` of a registered colormap, computed once (read-only)."""
    lut = _sample_lut(matplotlib.colormaps[name], size)
    lut.flags.writeable = False
    return lut


def signed_lut(name: str | matplotlib.colors.Colormap) -> np.ndarray:
    """The lookup table of signed mode: `colormap_lut(name, 257)` with its centre entry, where
    zero lands, pure white (`ZERO_COLOUR`).

    Example:

    >>> signed_lut("RdBu_r")[128].tolist()
    [255, 255, 255]
    """
    lut = colormap_lut(name, SIGNED_LUT_SIZE).copy()
    lut[(SIGNED_LUT_SIZE - 1) // 2] = ZERO_COLOUR
    return lut


def reduce_channels(jacobian_map: object, method: str = "maxabs") -> np.ndarray:
    """Reduces a map's channel axis: `(H, W, C)` -> `(H, W)`; `(H, W)` passes through.

    Methods:

    - "maxabs": the signed value of the channel with the largest |value| (the first such channel
      on ties), so the sign survives and |result| is the max-abs over channels.
    - "l2": the L2 norm over channels, sqrt(sum_c J_c²) (non-negative; the sign is lost).
    - "sum": the sum over channels (gradient of the channel-summed input).
    - "mean": the mean over channels.

    `(H, W, 1)` is squeezed for every method (even "l2", which keeps the sign then). The result is
    float64.

    Args:
        jacobian_map: One map, `(H, W)` or `(H, W, C)`, channels last.
        method: One of "maxabs", "l2", "sum", "mean".

    Returns:
        A `(H, W)` float64 array.

    Example:

    >>> m = np.array([[[1.0, -3.0], [0.5, 0.2]]])   # (1, 2, 2)
    >>> reduce_channels(m, "maxabs")
    array([[-3. ,  0.5]])
    >>> reduce_channels(m, "l2").round(3)
    array([[3.162, 0.539]])
    """
    method = _check_choice("method", method, REDUCTIONS)
    array = _check_map("jacobian_map", jacobian_map).astype(np.float64)
    if array.ndim == 2:
        return array
    if array.shape[-1] == 1:
        return array[..., 0]
    if method == "maxabs":
        index = np.argmax(np.abs(array), axis=-1)
        return np.take_along_axis(array, index[..., None], axis=-1)[..., 0]
    if method == "l2":
        return np.sqrt(np.sum(np.square(array), axis=-1))
    if method == "sum":
        return np.sum(array, axis=-1)
    return np.mean(array, axis=-1)


def percentile_scale(values: object, percentile: float = 99.0) -> float:
    """The robust scale of an array: the `percentile`-th percentile of |values|.

    If that percentile is 0 (a sparse map, more than `100 - percentile` % zeros) the maximum
    of |values| is used instead, so a sparse map stays visible; an all-zero array gives 0.0.

    Args:
        values: Any real array (NaN/inf are rejected).
        percentile: In (0, 100]; 100 is the maximum of |values|.

    Returns:
        A non-negative Python float.

    Example:

    >>> percentile_scale(np.array([0.0, -1.0, 2.0, -4.0]), percentile=100)
    4.0
    """
    percentile = _check_percentile(percentile)
    array = _as_real_array("values", values)
    if array.size == 0:
        return 0.0
    _check_finite("values", array)
    magnitude = np.abs(array.astype(np.float64))
    scale = float(np.percentile(magnitude, percentile))
    if scale == 0.0:
        scale = float(magnitude.max())
    return scale


def robust_scale(
    values: object,
    percentile: float = 99.0,
    signed: bool = True,
    *,
    scale: float | None = None,
) -> np.ndarray:
    """Divides by a robust scale and clips, so one outlier cannot wash a map out.

    signed=True: `values / s` clipped to [-1, 1]; signed=False: `|values| / s` clipped to
    [0, 1], where `s` is `scale` if given, else `percentile_scale(values, percentile)`. An
    all-zero input returns zeros (no division by zero) and a constant input a flat result
    (±1, or 1 unsigned).

    Args:
        values: Any real array, e.g. a `(H, W)` map. NaN/inf are rejected.
        percentile: In (0, 100]; which percentile of |values| maps to ±1.
        signed: Keep the sign (True) or take magnitudes (False).
        scale: A fixed positive scale instead of the percentile, e.g. one shared by several
            maps so that their colours are comparable.

    Returns:
        A float64 array with the same shape as `values`.

    Example:

    >>> robust_scale(np.array([0.0, 1.0, -2.0, 100.0]), percentile=50)
    array([ 0.        ,  0.66666667, -1.        ,  1.        ])
    """
    signed = bool(signed)
    percentile = _check_percentile(percentile)
    fixed = _check_scale(scale)
    array = _as_real_array("values", values).astype(np.float64)
    _check_finite("values", array)
    s = fixed if fixed is not None else percentile_scale(array, percentile)
    if not signed:
        array = np.abs(array)
    if s == 0.0:
        return np.zeros_like(array)
    return np.clip(array / s, -1.0 if signed else 0.0, 1.0)


def render_saliency(
    jacobian_map: object,
    *,
    mode: str = "signed",
    cmap: str | matplotlib.colors.Colormap | None = None,
    percentile: float = 99.0,
    reduce: str = "maxabs",
    image: object = None,
    alpha: float = 0.8,
    scale: float | None = None,
) -> np.ndarray:
    """Renders one Jacobian map as an RGB image.

    The map is reduced over channels (`reduce_channels`), divided by a robust scale and clipped
    (`robust_scale`), and looked up in a colormap:

    - mode="signed": diverging colormap (default "RdBu_r"). Zero is drawn pure white
      (`ZERO_COLOUR`, "no effect"; so is anything below half a colour step, |value| < scale /
      256); +scale and above its top end (dark red), -scale and below its bottom end (dark
      blue).
    - mode="abs": |map| on a sequential colormap (default "inferno"); zero is the colormap's
      start (black for "inferno"), `scale` and above its end.

    With `image`, the colours are blended over a grayscale version of the image with a per-pixel
    weight `alpha * |scaled value|`: where saliency is zero the photo shows unchanged (in gray),
    where it is largest the colour has weight `alpha`.

    Args:
        jacobian_map: One sample's Jacobian for one output, `(H, W)` or `(H, W, C)`.
        mode: "signed" or "abs".
        cmap: A matplotlib colormap name or `Colormap`; `None` for the mode's default.
        percentile: In (0, 100]; the percentile of |map| that maps to the colormap's end.
        reduce: Channel reduction, one of "maxabs", "l2", "sum", "mean" (see
            `reduce_channels`). In signed mode "l2" is non-negative, so only the upper half of
            the colormap is used.
        image: Optional `(H, W)` or `(H, W, 3)` image to overlay on, uint8 or float in [0, 1].
        alpha: In [0, 1]; the colour's weight in the overlay where saliency is largest.
        scale: Optional fixed positive scale instead of the percentile (e.g. shared by several
            maps so that colours are comparable between them).

    Returns:
        A `(H, W, 3)` uint8 RGB array.

    Example:

    >>> rgb = render_saliency(np.zeros((28, 28, 1)))
    >>> rgb.shape, rgb.dtype, rgb[0, 0].tolist()
    ((28, 28, 3), dtype('uint8'), [255, 255, 255])
    """
    mode = _check_choice("mode", mode, MODES)
    reduce = _check_choice("reduce", reduce, REDUCTIONS)
    cmap_name = resolve_cmap(cmap, mode)
    percentile = _check_percentile(percentile)
    alpha = _check_alpha(alpha)
    scale = _check_scale(scale)
    reduced = reduce_channels(_check_map("jacobian_map", jacobian_map), reduce)
    photo = None if image is None else _check_image(image, reduced.shape)

    scaled = robust_scale(reduced, percentile, signed=(mode == "signed"), scale=scale)
    colormap = cmap if isinstance(cmap, matplotlib.colors.Colormap) else cmap_name
    if mode == "signed":
        lut = signed_lut(colormap)
        half = (SIGNED_LUT_SIZE - 1) // 2
        # 0 -> index `half` exactly; rint(half + y) == half + rint(y) as `half` is even, so
        # +v and -v land symmetrically.
        index = np.rint(half + half * scaled).astype(np.intp)
    else:
        lut = colormap_lut(colormap, ABS_LUT_SIZE)
        index = np.rint(scaled * (ABS_LUT_SIZE - 1)).astype(np.intp)
    rgb = lut[index]
    if photo is None:
        return rgb

    gray = (_to_grayscale(photo) * 255.0)[..., None]
    weight = (alpha * np.abs(scaled))[..., None]
    blended = (1.0 - weight) * gray + weight * rgb.astype(np.float64)
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def _check_jacobian(jacobian: object) -> np.ndarray:
    array = _as_real_array("jacobian", jacobian)
    expected = "one sample's Jacobian of shape (n_outputs, H, W) or (n_outputs, H, W, C)"
    if array.ndim == 5:
        raise ValueError(
            f"`jacobian` must be {expected}; received shape {format_shape(array.shape)}, which "
            "looks like a batch. Pass jacobian[i] for sample i."
        )
    if array.ndim == 2:
        raise ValueError(
            f"`jacobian` must be {expected}; received shape {format_shape(array.shape)}, which "
            "looks like a single map. Pass jacobian[None] to treat it as one output, or use "
            "render_saliency for one map."
        )
    if array.ndim not in (3, 4):
        raise ValueError(
            f"`jacobian` must be {expected}; received shape {format_shape(array.shape)}. "
            "Select one sample first (jacobian[i]); for a flat input reshape it to the image's "
            "(H, W, C) shape."
        )
    if array.size == 0:
        raise ValueError(
            f"`jacobian` is empty: received shape {format_shape(array.shape)}. "
            "Every axis must have length at least 1."
        )
    _check_finite("jacobian", array)
    return array


def check_output_indices(output_indices: object, n_outputs: int) -> list[int]:
    """Validates `output_indices` against `n_outputs`; `None` gives `[0, ..., n_outputs - 1]`.

    Args:
        output_indices: `None` or a sequence / 1-D array of `n_outputs` distinct non-negative
            integers, e.g. the top-k class indices of one sample.
        n_outputs: The length of the Jacobian's first axis.

    Returns:
        A list of Python ints.

    Example:

    >>> check_output_indices(np.array([7, 2]), 2)
    [7, 2]
    """
    if output_indices is None:
        return list(range(n_outputs))
    if isinstance(output_indices, (str, bytes)):
        raise TypeError(
            invalid_value(
                "output_indices", output_indices, "None or a sequence of non-negative integers"
            )
        )
    array = np.asarray(output_indices)
    if array.dtype == bool or not np.issubdtype(array.dtype, np.integer):
        raise TypeError(
            invalid_value(
                "output_indices",
                output_indices,
                "None or a sequence of non-negative integers",
                "Pass e.g. output_indices=top_k.indices[i].",
            )
        )
    if array.shape != (n_outputs,):
        raise ValueError(
            f"`output_indices` must have one index per output of the Jacobian, shape "
            f"({n_outputs},); received shape {format_shape(array.shape)}. Pass the indices of "
            "the outputs in jacobian's first axis, in the same order."
        )
    if (array < 0).any():
        raise ValueError(
            invalid_value(
                "output_indices", array.tolist(), "non-negative integers (flat output indices)"
            )
        )
    if len(set(array.tolist())) != n_outputs:
        raise ValueError(
            invalid_value(
                "output_indices",
                array.tolist(),
                "distinct integers (each names one file / panel)",
                "Remove the repeated indices.",
            )
        )
    return [int(i) for i in array]


def _check_upscale(upscale: object, spatial_shape: tuple[int, int]) -> int:
    if upscale is None:
        longer = max(spatial_shape)
        return max(1, math.ceil(AUTO_UPSCALE_MIN_SIDE / longer))
    if isinstance(upscale, bool) or not isinstance(upscale, Integral) or upscale < 1:
        raise ValueError(
            invalid_value(
                "upscale",
                upscale,
                "None (automatic) or an integer >= 1",
                "Pass upscale=1 to keep the Jacobian's own size.",
            )
        )
    factor = int(upscale)
    height, width = (int(d) for d in spatial_shape)
    if factor > 1 and max(height, width) * factor > MAX_UPSCALED_SIDE:
        largest = max(1, MAX_UPSCALED_SIDE // max(height, width))
        raise ValueError(
            f"Received upscale={upscale}, which would make each PNG {height * factor}x"
            f"{width * factor} pixels ({_safeio.format_bytes(height * width * factor * factor * 3)} of RGB); "
            f"maps are enlarged to at most {MAX_UPSCALED_SIDE} pixels per side. Pass "
            f"upscale<={largest} for these {height}x{width} maps, or upscale=None for the "
            "automatic size. Nothing was written."
        )
    return factor


def format_number(value: float) -> str:
    """Three significant digits: 0.412, 0.00101, 1.2e-05."""
    return f"{value:.3g}"


def png_bytes(rgb: np.ndarray, text: dict[str, str] | None = None) -> bytes:
    """A `(H, W, 3)` uint8 array as the bytes of a PNG file, with optional text chunks."""
    from PIL.PngImagePlugin import PngInfo

    info = None
    if text:
        info = PngInfo()
        for key, value in text.items():
            info.add_text(key, value)
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb), mode="RGB").save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def write_png_atomic(path: pathlib.Path, rgb: np.ndarray, *, overwrite: bool = True) -> None:
    """Writes a `(H, W, 3)` uint8 array as PNG atomically: an exclusive, unpredictable
    temporary name in the same folder, then a rename (never through a link; mode from the
    umask, like any file)."""
    _safeio.write_file(path, png_bytes(rgb), overwrite=overwrite)


def existing_file_error(path: pathlib.Path) -> FileExistsError:
    """The error for a target file that exists while `overwrite=False`."""
    return FileExistsError(
        f"The file {str(path)!r} already exists; pass overwrite=True to replace it, or choose "
        "another directory or prefix. Nothing was written."
    )


def save_jacobian_images(
    jacobian: object,
    out_dir: str | os.PathLike,
    *,
    output_indices: Sequence[int] | np.ndarray | None = None,
    mode: str = "signed",
    cmap: str | matplotlib.colors.Colormap | None = None,
    percentile: float = 99.0,
    reduce: str = "maxabs",
    image: object = None,
    overwrite: bool = False,
    prefix: str = "output",
    upscale: int | None = None,
    shared_scale: bool = False,
    colorbar: bool = False,
) -> list[pathlib.Path]:
    """Writes one saliency PNG per output of one sample's Jacobian.

    Files are named `{prefix}_{k:0Nd}.png`, `k` being the output's index (from `output_indices`,
    e.g. the top-k class indices, else 0..n_outputs-1) and `N` the digit count of the largest
    index, at least 2. `out_dir` is created if needed. All arguments and all target paths are
    checked before any file is written, and each file is written atomically (temporary file +
    `os.replace`), so a failure never leaves a half-written set behind.

    Each map is scaled by its own `percentile` of |map| unless `shared_scale=True`, which uses one
    scale for all (the percentile of |maps| pooled, as `contact_sheet` does), so that colours
    compare between files. With `colorbar=True` each PNG gets a small colour bar under the map
    giving its scale in real units (see `colorbar_strip`), so a file read alone says how strong
    its colours are.

    Files are written with an exclusive, unpredictable temporary name and renamed into place;
    a file (or link) at a target name is replaced only with `overwrite=True`, and never written
    through. Modes follow the umask.

    Args:
        jacobian: One sample's Jacobian, `(n_outputs, H, W)` or `(n_outputs, H, W, C)`.
        out_dir: Directory to write into (created with its parents if missing).
        output_indices: `None` or `n_outputs` distinct non-negative ints naming the outputs.
        mode: "signed" or "abs" (see `render_saliency`).
        cmap: Colormap name or `Colormap`; `None` for the mode's default.
        percentile: In (0, 100]; the percentile of |map| mapped to the colormap's end.
        reduce: Channel reduction, "maxabs", "l2", "sum" or "mean".
        image: Optional `(H, W)` or `(H, W, 3)` image (uint8, or float in [0, 1]) to overlay on.
        overwrite: Replace existing files; otherwise an existing target raises `FileExistsError`
            before anything is written.
        prefix: File name prefix, a non-empty string without path separators.
        upscale: Integer nearest-neighbour magnification. `None` (default) picks the smallest
            factor that makes the longer side at least 256 px (28x28 -> 280x280; 224x224 ->
            448x448; 256 px and larger -> unchanged). Pass 1 for the Jacobian's own size. An
            explicit factor may make at most `MAX_UPSCALED_SIDE` (8192) pixels per side;
            larger is refused before anything is written.
        shared_scale: Use one scale for all outputs instead of one per map.
        colorbar: Add a colour bar with the map's scale in real units under each map (the PNG
            is then taller, and at least 200 pixels wide).

    Returns:
        The written paths, `list[pathlib.Path]`, in the order of the Jacobian's first axis.

    Example:

    >>> import tempfile
    >>> jac = np.random.default_rng(0).normal(size=(3, 28, 28, 1))
    >>> paths = save_jacobian_images(jac, tempfile.mkdtemp(), output_indices=[7, 1, 12])
    >>> [p.name for p in paths]
    ['output_07.png', 'output_01.png', 'output_12.png']
    """
    array = _check_jacobian(jacobian)
    n_outputs = array.shape[0]
    indices = check_output_indices(output_indices, n_outputs)
    mode = _check_choice("mode", mode, MODES)
    reduce = _check_choice("reduce", reduce, REDUCTIONS)
    resolve_cmap(cmap, mode)
    percentile = _check_percentile(percentile)
    spatial_shape = tuple(array.shape[1:3])
    factor = _check_upscale(upscale, spatial_shape)
    if image is not None:
        _check_image(image, spatial_shape)
    if not isinstance(prefix, str) or not prefix or os.sep in prefix or "/" in prefix:
        raise ValueError(
            invalid_value("prefix", prefix, "a non-empty file name prefix without '/'")
        )
    if not isinstance(overwrite, bool):
        raise TypeError(invalid_value("overwrite", overwrite, "True or False"))

    scale = None
    reduced = np.stack([reduce_channels(m, reduce) for m in array])
    if shared_scale:
        scale = percentile_scale(reduced, percentile) or None  # all-zero: per-map (zeros)

    directory = pathlib.Path(out_dir)
    digits = max(_PNG_DIGITS_MIN, len(str(max(indices))))
    names = [f"{prefix}_{k:0{digits}d}.png" for k in indices]
    with _safeio.SafeDir.open(directory, create=True) as folder:
        folder.display = str(directory)
        if not overwrite:
            for name in names:
                if folder.lstat(name) is not None:
                    raise existing_file_error(directory / name)
        for name, jacobian_map in zip(names, reduced, strict=True):
            rgb = render_saliency(
                jacobian_map,
                mode=mode,
                cmap=cmap,
                percentile=percentile,
                image=image,
                scale=scale,
            )
            if factor > 1:
                rgb = np.repeat(np.repeat(rgb, factor, axis=0), factor, axis=1)
            if colorbar:
                from augnet._colorbar import with_colorbar

                own = scale if scale is not None else percentile_scale(jacobian_map, percentile)
                rgb = with_colorbar(rgb, scale=own, mode=mode, cmap=cmap)
            try:
                folder.write_atomic(name, png_bytes(rgb), replace=overwrite)
            except FileExistsError:
                raise existing_file_error(directory / name) from None
    return [directory / name for name in names]
