"""The result types of the engine's public functions."""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np


class TopKJacobian(NamedTuple):
    """The Jacobians of each sample's ``k`` largest outputs.

    Attributes:
        jacobian: ``(batch, k, *input_shape)`` (the input structure for several inputs).
        indices: ``(batch, k)`` flat indices of the selected outputs, largest first.
        values: ``(batch, k)`` the outputs' values.
    """

    jacobian: Any
    indices: Any
    values: Any


class JacobianChunk(NamedTuple):
    """One block of a streamed Jacobian (see ``augnet.iter_jacobian``).

    Attributes:
        samples: the slice of the batch this block covers.
        outputs: flat output indices of the block's rows: ``(c,)``, or ``(b, c)`` per sample
            with ``top_k`` or per-sample ``outputs``.
        values: ``(b, c, *input_shape)`` (the input structure for several inputs).
        columns: where the block's rows go among the selected outputs: the full Jacobian's
            ``[samples, columns]`` (``(batch, m, *input_shape)`` with ``m`` selected outputs).
    """

    samples: slice
    outputs: np.ndarray
    values: Any
    columns: slice = slice(None)
