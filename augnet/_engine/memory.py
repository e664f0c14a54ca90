"""The memory plan: how many samples and outputs one pass takes so that it fits the budget.

``max_memory`` (bytes or ``"2GB"``) bounds one pass's intermediates; :func:`plan` halves the
samples per pass, then the outputs (or, in forward mode, input elements) per pass, until the
estimated cost fits. Pure arithmetic on the target's sizes: no framework.
"""

from __future__ import annotations

import logging
import re

import numpy as np

from augnet import _backend as B
from augnet._engine.target import Target
from augnet._errors import invalid_value

logger = logging.getLogger(__name__)

DEFAULT_MAX_MEMORY = 2 * 1024**3  # bytes of intermediates per pass when max_memory is not given
MAX_UNROLL = 32  # backward passes per compiled "loop" pass (each chunk costs one forward pass)

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1e3,
    "kb": 1e3,
    "m": 1e6,
    "mb": 1e6,
    "g": 1e9,
    "gb": 1e9,
    "t": 1e12,
    "tb": 1e12,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}


def parse_memory(value) -> int | None:
    """``"2GB"``, ``"512MiB"``, ``2e9`` or ``None`` -> bytes (or ``None``)."""
    if value is None:
        return None
    if isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool):
        if value <= 0:
            raise ValueError(
                invalid_value(
                    "max_memory", value, "a positive number of bytes or a string like '2GB'"
                )
            )
        return int(value)
    if isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", value)
        if m and m.group(2).lower() in _UNITS and float(m.group(1)) > 0:
            return int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    raise ValueError(
        invalid_value(
            "max_memory",
            value,
            "a positive number of bytes or a string like '2GB', '512MB', '1.5GiB'",
        )
    )


def check_positive_int(value, argument):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(invalid_value(argument, value, "a positive integer or None"))
    return int(value)


def plan(target: Target, strategy: str, n_samples: int, m: int, batch_size, chunk_size, max_memory):
    """Chooses (samples per pass, chunk per pass) so that one pass fits the memory budget."""
    itemsize = np.dtype(B.dtype_name(target.dtype)).itemsize
    n = sum(target.in_sizes)
    act = target.act_bytes
    M = target.total_outputs
    budget = max_memory or DEFAULT_MAX_MEMORY

    if strategy == "forward":
        total_chunk = max(target.in_sizes)

        def cost(b, c):  # the tangents of c columns for b samples, plus the (b, m, n) result
            return b * c * (2 * act + M * itemsize) + 2 * b * m * n * itemsize
    elif strategy == "pfor":
        total_chunk = m

        def cost(b, c):
            return b * act * (2 + c) + 3 * b * c * n * itemsize
    else:
        total_chunk = min(m, MAX_UNROLL)

        def cost(b, c):  # the taped forward pass, one backward in flight, the result block
            return 2 * b * act + 3 * b * c * n * itemsize

    b = min(batch_size or n_samples, n_samples)
    c = min(chunk_size or total_chunk, total_chunk)
    # Samples per pass first (activations scale with them), then the chunk, then samples again.
    if batch_size is None:
        while b > 1 and cost(b, 1) > budget:
            b = (b + 1) // 2
    if chunk_size is None:
        while c > 1 and cost(b, c) > budget:
            c = (c + 1) // 2
    if batch_size is None:
        while b > 1 and cost(b, c) > budget:
            b = (b + 1) // 2
    if cost(b, c) > budget:
        logger.warning(
            "One pass needs about %.2f GB, more than the memory budget of %.2f GB, even at "
            "batch_size=%d, chunk_size=%d.",
            cost(b, c) / 1e9,
            budget / 1e9,
            b,
            c,
        )
    return b, c
