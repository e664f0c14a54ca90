"""The memory plan: how many samples and outputs one pass takes so that it fits the budget.

``max_memory`` (bytes or ``"2GB"``) bounds one pass's intermediates; :func:`plan` halves the
samples per pass, then the outputs (or, in forward mode, input elements) per pass, until the
estimated cost fits. Pure arithmetic on the target's sizes: no framework.
"""

from __future__ import annotations

import logging
import math
import os
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
        if not math.isfinite(value):
            raise ValueError(
                invalid_value(
                    "max_memory",
                    value,
                    "a finite, positive number of bytes or a string like '2GB'",
                    "For no budget of your own, leave it out (max_memory=None: the engine's "
                    f"default of {DEFAULT_MAX_MEMORY / 1024**3:.0f} GiB per pass); it bounds one "
                    "pass's intermediates, never the result.",
                )
            )
        if value <= 0:
            raise ValueError(
                invalid_value(
                    "max_memory", value, "a positive number of bytes or a string like '2GB'"
                )
            )
        return int(value)
    if isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*", value)
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


# --------------------------------------------------------------------------------------------------
# The result's size against the memory available, before any work
# --------------------------------------------------------------------------------------------------

CHECK_ABOVE = (
    256 * 1024**2
)  # results smaller than this are not checked (reading /proc costs ~30 µs)
MARGIN = 0.1  # of the available memory left free (at least MIN_MARGIN)
MIN_MARGIN = 256 * 1024**2


class ResultTooLargeError(MemoryError, ValueError):
    """A result that does not fit in the memory available, refused before any work (a
    ``MemoryError``, and a ``ValueError`` like augnet's other argument errors)."""


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def available_memory() -> int | None:
    """Bytes of memory this process can still allocate: the system's available memory
    (``MemAvailable``), or less where a control group limits the process (containers); ``None``
    where neither can be read (the check is then skipped)."""
    free = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    free = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        free = None
    if free is None:
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            free = None
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),  # cgroup v2
        (
            "/sys/fs/cgroup/memory/memory.limit_in_bytes",  # cgroup v1
            "/sys/fs/cgroup/memory/memory.usage_in_bytes",
        ),
    ):
        limit, used = _read_int(limit_file), _read_int(usage_file)
        if limit is not None and used is not None and limit < 2**60:
            room = max(0, limit - used)
            free = room if free is None else min(free, room)
            break
    return free


def _gb(n: float) -> str:
    if n >= 1e8:
        return f"{n / 1e9:.1f} GB"
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def check_result_size(elements: int, dtype, what: str, shapes: str | None, available=None) -> None:
    """Refuses, before any work, a result of ``elements`` values of ``dtype`` that does not fit
    in the memory available minus a margin (10%, at least 256 MiB).

    Args:
        elements: values in the whole result.
        dtype: its dtype.
        what: the function, for the message (``"augnet.jacobian"``).
        shapes: the result's shape(s) as text, for the message.
        available: bytes available (default: :func:`available_memory`).

    Raises:
        ResultTooLargeError: with the size and the ways out.
    """
    size = int(elements) * np.dtype(B.dtype_name(dtype)).itemsize
    if size <= CHECK_ABOVE:
        return
    free = available_memory() if available is None else available
    if free is None:
        return
    margin = max(MIN_MARGIN, int(MARGIN * free))
    if size <= free - margin:
        return
    shape_text = f" ({shapes} {B.dtype_name(dtype)})" if shapes else ""
    if what == "augnet.jacobian":
        ways = (
            "select fewer outputs (outputs=[...], or top_k=k for a classifier), pass fewer "
            "samples per call, or stream it: augnet.iter_jacobian(...) yields it block by block "
            "in bounded memory, augnet.jacobian_to_npy(model, x, 'J.npy') writes it to a file "
            "pass by pass"
        )
    elif what == "augnet.layer_jacobians":
        ways = (
            "pass fewer samples per call, or compute the layers you need one at a time with "
            "augnet.jacobian(layer, activation) (or augnet.iter_jacobian to stream each)"
        )
    else:
        ways = "pass fewer samples per call"
    raise ResultTooLargeError(
        f"{what}: the result would take {_gb(size)}{shape_text}, more than the memory available "
        f"for it ({_gb(free)} free, less a margin of {_gb(margin)}); refused before any work. "
        "`max_memory` bounds one pass's intermediates, not the result, so it cannot make this "
        f"fit. Ways out: {ways}."
    )
