"""The demo task: a 256x256 grayscale image -> 13 region brightnesses, whose Jacobian is known.

Output ``k`` of the task is the mean brightness of region ``k`` of the image, so the true Jacobian of
output ``k`` is ``mask_k / area_k``: positive and uniform inside region ``k``, zero everywhere else. The
shipped model (``augnet/data/region_cnn.keras``, trained by ``examples/train_region_model.py``) learns
this task, and its saliency maps can therefore be *checked*, not just looked at.

The 13 regions, on a 4x4 grid of 64-pixel cells (at ``size=256``)::

    +----+----+----+----+
    |  0 |  1 |  2 |  3 |    regions 0-11: the 12 cells of the outer ring, in reading order,
    +----+----+----+----+    each a 48x48 square tile inside its cell (8-pixel gutter all round)
    |  4 | .-----. |  5 |
    +----+(  12   )+----+    region 12: a disc of radius 56 centred in the image, inside the
    |  6 | '-----' |  7 |    central 2x2 cells
    +----+----+----+----+
    |  8 |  9 | 10 | 11 |    everything else (gutters, corners of the centre square) is background
    +----+----+----+----+

This module imports no TensorFlow: it is NumPy and pillow only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

N_REGIONS = 13
IMAGE_SIZE = 256

_GRID = 4  # 4x4 cells; the 12 ring cells are regions 0-11
_GUTTER = 8 / 256  # gutter on each side of a tile, as a fraction of the image side
_DISC_RADIUS = 56 / 256  # radius of the centre disc, as a fraction of the image side
_MIN_SIZE = 16


def region_masks(size: int = IMAGE_SIZE) -> np.ndarray:
    """The 13 disjoint regions of a ``size x size`` image.

    Args:
        size: side of the square image in pixels, at least 16.

    Returns:
        Boolean array of shape ``(13, size, size)``; ``masks[k]`` is region ``k``. No pixel belongs to
        two regions; background pixels belong to none.

    Example:
        >>> masks = region_masks(256)
        >>> masks.shape, int(masks[0].sum()), int(masks.sum(axis=0).max())
        ((13, 256, 256), 2304, 1)
    """
    if isinstance(size, bool) or not isinstance(size, int | np.integer) or size < _MIN_SIZE:
        raise ValueError(
            f"Received an invalid value for `size`, expected an integer >= {_MIN_SIZE}. "
            f"Received: size={size!r}"
        )
    size = int(size)
    centres = (np.arange(size) + 0.5) / size  # pixel centres in [0, 1]
    masks = np.zeros((N_REGIONS, size, size), dtype=bool)

    ring = [(r, c) for r in range(_GRID) for c in range(_GRID) if r in (0, 3) or c in (0, 3)]
    for k, (r, c) in enumerate(ring):
        rows = (centres >= r / _GRID + _GUTTER) & (centres < (r + 1) / _GRID - _GUTTER)
        cols = (centres >= c / _GRID + _GUTTER) & (centres < (c + 1) / _GRID - _GUTTER)
        masks[k] = rows[:, None] & cols[None, :]

    dy = centres[:, None] - 0.5
    dx = centres[None, :] - 0.5
    masks[N_REGIONS - 1] = dy**2 + dx**2 < _DISC_RADIUS**2
    return masks


def region_targets(images: np.ndarray) -> np.ndarray:
    """The task's exact answer: the mean brightness of each region.

    Args:
        images: array of shape ``(batch, size, size, 1)`` or ``(batch, size, size)``, values
            typically in ``[0, 1]``.

    Returns:
        Array of shape ``(batch, 13)`` (float32 for float32/integer input, float64 for float64);
        column ``k`` is the mean of ``images`` over region ``k``.

    Example:
        >>> region_targets(np.full((2, 256, 256, 1), 0.25, dtype=np.float32)).shape
        (2, 13)
    """
    images = np.asarray(images)
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    if images.ndim != 3 or images.shape[1] != images.shape[2]:
        raise ValueError(
            "Received an invalid value for `images`, expected shape (batch, size, size, 1) or "
            f"(batch, size, size). Received: images.shape={tuple(np.shape(images))}"
        )
    if not (np.issubdtype(images.dtype, np.number) or images.dtype == bool):
        raise TypeError(
            f"Received an invalid value for `images`, expected a numeric array. "
            f"Received: images.dtype={images.dtype}"
        )
    dtype = np.float64 if images.dtype == np.float64 else np.float32
    masks = region_masks(images.shape[1])
    weights = (masks / masks.sum(axis=(1, 2), keepdims=True)).reshape(N_REGIONS, -1).astype(dtype)
    flat = images.reshape(images.shape[0], -1).astype(dtype, copy=False)
    return flat @ weights.T


def true_jacobian(size: int = IMAGE_SIZE) -> np.ndarray:
    """The exact Jacobian of :func:`region_targets` for one sample.

    Returns:
        float32 array of shape ``(13, size, size, 1)``: ``mask_k / area_k``.
    """
    masks = region_masks(size)
    return (masks / masks.sum(axis=(1, 2), keepdims=True)).astype(np.float32)[..., None]


def mass_inside(jacobian: np.ndarray, size: int | None = None) -> np.ndarray:
    """Fraction of each output's ``|J|`` mass that lies inside its own region.

    Args:
        jacobian: one sample's Jacobian, shape ``(13, size, size)`` or ``(13, size, size, 1)``, or a
            batch of them, ``(batch, 13, size, size[, 1])``.
        size: image side; read from ``jacobian`` when omitted.

    Returns:
        ``(13,)`` or ``(batch, 13)`` array of fractions in ``[0, 1]`` (1 means all of output ``k``'s
        sensitivity is inside region ``k``; an all-zero map gives 0).
    """
    jac = np.abs(np.asarray(jacobian, dtype=np.float64))
    if jac.shape[-1] == 1 and jac.ndim in (4, 5):
        jac = jac[..., 0]
    if jac.ndim not in (3, 4) or jac.shape[-3] != N_REGIONS or jac.shape[-1] != jac.shape[-2]:
        raise ValueError(
            "Received an invalid value for `jacobian`, expected shape (13, size, size[, 1]) or "
            f"(batch, 13, size, size[, 1]). Received: jacobian.shape={tuple(np.shape(jacobian))}"
        )
    masks = region_masks(size or jac.shape[-1])
    inside = (jac * masks).sum(axis=(-2, -1))
    total = jac.sum(axis=(-2, -1))
    return np.divide(inside, total, out=np.zeros_like(inside), where=total > 0)


def sample_image_path() -> Path:
    """Path of the repository's sample photograph, ``sample_input/sample_input.jpg``.

    Raises:
        FileNotFoundError: when the package runs outside a checkout of the repository.
    """
    path = Path(__file__).resolve().parents[1] / "sample_input" / "sample_input.jpg"
    if not path.is_file():
        raise FileNotFoundError(
            f"The sample photograph was not found at {path}. It ships with the augnet repository "
            "(sample_input/sample_input.jpg), not with the installed package: run from a checkout "
            "installed with `pip install -e .`, or pass your own image path."
        )
    return path


def demo_model_path() -> Path:
    """Path of the shipped demo model, ``augnet/data/region_cnn.keras`` (256x256x1 -> 13)."""
    return Path(__file__).resolve().parent / "data" / "region_cnn.keras"


def load_image(path: str | Path, size: int = IMAGE_SIZE) -> np.ndarray:
    """Read an image file as a batch of one grayscale square image in ``[0, 1]``.

    The image is converted to grayscale, centre-cropped to a square and resized to
    ``size x size`` (Lanczos).

    Returns:
        float32 array of shape ``(1, size, size, 1)`` with values in ``[0, 1]``.
    """
    from PIL import Image

    if isinstance(size, bool) or not isinstance(size, int | np.integer) or size < 1:
        raise ValueError(
            f"Received an invalid value for `size`, expected a positive integer. Received: size={size!r}"
        )
    with Image.open(path) as img:
        img = img.convert("L")
        w, h = img.size
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        img = img.crop((left, top, left + side, top + side))
        img = img.resize((int(size), int(size)), Image.Resampling.LANCZOS)
        pixels = np.asarray(img, dtype=np.float32) / 255.0
    return pixels[None, :, :, None]


def load_sample_image(size: int = IMAGE_SIZE) -> np.ndarray:
    """The sample photograph as a model input: float32 ``(1, size, size, 1)`` in ``[0, 1]``.

    Example:
        >>> load_sample_image().shape
        (1, 256, 256, 1)
    """
    return load_image(sample_image_path(), size)
