"""Array helpers of the attribution methods: which axes are space, and resampling, blurring and
coverage as matrices applied along axes (NumPy only)."""

from __future__ import annotations

import numpy as np


def spatial_axes(shape: tuple) -> tuple[int, ...]:
    """The per-sample axes that are "space" (not channels): all but the last when a sample has
    two or more axes (``(H, W, C)`` -> ``(0, 1)``), else its one axis."""
    return tuple(range(len(shape) - 1)) if len(shape) >= 2 else (0,)


def interpolation_matrix(size_in: int, size_out: int, method: str = "bilinear") -> np.ndarray:
    """``(size_out, size_in)``: resampling one axis with half-pixel centres (as
    ``tf.image.resize`` / ``jax.image.resize`` without antialiasing; edges clamped)."""
    out = np.zeros((size_out, size_in))
    scale = size_in / size_out
    centres = (np.arange(size_out) + 0.5) * scale - 0.5
    if method == "nearest":
        idx = np.clip(np.floor((np.arange(size_out) + 0.5) * scale).astype(int), 0, size_in - 1)
        out[np.arange(size_out), idx] = 1.0
        return out
    centres = np.clip(centres, 0, size_in - 1)
    lo = np.floor(centres).astype(int)
    hi = np.minimum(lo + 1, size_in - 1)
    frac = centres - lo
    np.add.at(out, (np.arange(size_out), lo), 1.0 - frac)
    np.add.at(out, (np.arange(size_out), hi), frac)
    return out


def gaussian_matrix(size: int, sigma: float, truncate: float = 4.0) -> np.ndarray:
    """``(size, size)``: a 1-D Gaussian blur with ``'reflect'`` borders, as
    ``scipy.ndimage.gaussian_filter1d(mode='reflect', truncate=4.0)``."""
    if sigma <= 0:
        return np.eye(size)
    radius = int(truncate * sigma + 0.5)
    offsets = np.arange(-radius, radius + 1)
    kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
    kernel /= kernel.sum()
    out = np.zeros((size, size))
    rows = np.arange(size)
    period = 2 * size
    for off, k in zip(offsets, kernel):
        j = np.mod(rows + off, period)
        j = np.where(j >= size, period - 1 - j, j)  # reflect: (d c b a | a b c d | d c b a)
        np.add.at(out, (rows, j), k)
    return out


def apply_along(array: np.ndarray, matrices: dict[int, np.ndarray]) -> np.ndarray:
    """Applies ``matrices[axis]`` ``(n_out, n_in)`` along each given axis of ``array`` (one
    matrix product per axis, on a contiguous 2-D view so that BLAS does it)."""
    for axis, mat in matrices.items():
        moved = np.moveaxis(array, axis, -1)
        shape = moved.shape
        flat = np.ascontiguousarray(moved).reshape(-1, shape[-1])
        out = flat @ mat.T.astype(flat.dtype, copy=False)
        array = np.moveaxis(out.reshape(*shape[:-1], mat.shape[0]), -1, axis)
    return np.ascontiguousarray(array)
