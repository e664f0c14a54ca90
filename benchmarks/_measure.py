"""Timing, memory and accuracy helpers shared by the benchmark (stdlib + NumPy only).

Nothing here imports TensorFlow, JAX or torch, so a child process that runs one approach pays only
for the framework it uses.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable

import numpy as np

MB = 1024 * 1024


def current_rss_mb(pid: int | None = None, field: str = "VmRSS") -> float:
    """Resident memory now of this process or of ``pid``, in MiB; nan if unreadable.

    ``field``: ``"VmRSS"`` (all of it), or ``"RssAnon"`` (anonymous memory only: without the
    file-backed pages of libraries and of memory-mapped files, which the kernel can drop).
    """
    path = f"/proc/{pid or 'self'}/status"
    try:
        with open(path, encoding="ascii") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def peak_rss_mb() -> float:
    """This process's high-water mark of resident memory, in MiB.

    ``VmHWM`` (the peak of this address space) rather than ``ru_maxrss``: Linux carries the
    parent's RSS at fork into ``ru_maxrss`` across ``exec``, so a fresh interpreter started from a
    process holding TensorFlow would report that process's size. ``VmHWM`` of a forked child starts
    at the RSS it inherited (shared pages count), which is the process the approach really runs in.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def time_calls(
    fn: Callable[[], object], repeats: int, budget_s: float = 0.0, min_sample_s: float = 0.02
) -> dict:
    """Call ``fn`` once as the warm-up (its time reported as ``first_s``), then take ``repeats``
    timed samples; the median is reported.

    A call faster than ``min_sample_s`` is repeated inside each sample (``inner`` calls, timeit
    style) and the sample divided by ``inner``, so timer and scheduler noise do not dominate
    sub-millisecond calls. With ``budget_s > 0`` a slow call is sampled only as often as fits in
    ``budget_s`` seconds (at least once): ``len(times_s)`` says how often. ``fn`` must return only
    when the work is done (a NumPy result, ``block_until_ready``...). Returns
    ``{"first_s", "times_s", "median_s", "inner", "result"}`` with the last call's result.
    """
    t0 = time.perf_counter()
    result = fn()
    first = time.perf_counter() - t0
    inner = 1
    times = []
    if repeats > 0:
        t0 = time.perf_counter()
        result = fn()
        once = time.perf_counter() - t0
        if once < min_sample_s:
            inner = min(1000, max(1, int(np.ceil(min_sample_s / max(once, 1e-7)))))
        else:
            times.append(once)  # a slow call is a sample already
            if budget_s > 0 and once * repeats > budget_s:
                repeats = max(1, int(budget_s // once))
    while len(times) < repeats:
        t0 = time.perf_counter()
        for _ in range(inner):
            result = fn()
        times.append((time.perf_counter() - t0) / inner)
    return {
        "first_s": first,
        "times_s": times,
        "median_s": statistics.median(times) if times else float("nan"),
        "inner": inner,
        "result": result,
    }


def paired_times(
    calls: dict[str, Callable[[], object]],
    rounds: int,
    budget_s: float = 0.0,
    min_sample_s: float = 0.02,
) -> dict:
    """Times several calls in one process, alternating: every round takes one sample of each call
    in turn (repeated inside the sample, as in :func:`time_calls`, for calls under
    ``min_sample_s``), so that the machine's drift hits them alike. The first call is the subject.

    Returns ``{"median_s": {name: median}, "ratio": {name: median over rounds of subject ÷ name},
    "best": the fastest other call by median, "ratio_vs_best": that ratio, "rounds": n}``. With
    ``budget_s > 0`` the rounds stop once they have taken that long (at least 2 rounds).
    """
    inner = {}
    for name, fn in calls.items():  # warm-up, and the repetitions per sample
        fn()
        t0 = time.perf_counter()
        fn()
        once = time.perf_counter() - t0
        inner[name] = min(1000, max(1, int(np.ceil(min_sample_s / max(once, 1e-7)))))
    times = {name: [] for name in calls}
    t_start = time.perf_counter()
    for r in range(rounds):
        for name, fn in calls.items():
            t0 = time.perf_counter()
            for _ in range(inner[name]):
                fn()
            times[name].append((time.perf_counter() - t0) / inner[name])
        if budget_s > 0 and r >= 1 and time.perf_counter() - t_start > budget_s:
            break
    subject = next(iter(calls))
    medians = {name: statistics.median(t) for name, t in times.items()}
    ratios = {
        name: statistics.median(a / b for a, b in zip(times[subject], t))
        for name, t in times.items()
        if name != subject
    }
    others = [name for name in calls if name != subject]
    best = min(others, key=medians.get) if others else None
    return {
        "median_s": medians,
        "ratio": ratios,
        "best": best,
        "ratio_vs_best": ratios.get(best),
        "rounds": len(times[subject]),
    }


def compare(values: np.ndarray, reference: np.ndarray, rel_tol: float = 1e-3) -> dict:
    """Max abs error of ``values`` against ``reference``, that error relative to max |reference|,
    and the fraction of entries off by more than ``rel_tol`` * max |reference| (``frac_off``).

    ``frac_off`` tells a kink from a bug: at a ReLU input or a max-pool tie within rounding of each
    other, two correct implementations may take different branches, which changes a few entries of
    one sample's Jacobian; a wrong port changes many.
    """
    values = np.asarray(values, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    if values.shape != reference.shape:
        raise ValueError(f"shape {values.shape} does not match the reference's {reference.shape}")
    if not values.size:
        return {"max_abs_err": 0.0, "rel_err": 0.0, "ref_scale": 0.0, "frac_off": 0.0}
    diff = np.abs(values - reference)
    err = float(np.max(diff))
    scale = float(np.max(np.abs(reference)))
    off = (
        int(np.count_nonzero(diff > rel_tol * scale)) if scale > 0 else int(np.count_nonzero(diff))
    )
    return {
        "max_abs_err": err,
        "rel_err": err / scale if scale > 0 else err,
        "ref_scale": scale,
        "frac_off": off / diff.size,
        "n_off": off,
    }


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def total_ram_gb() -> float:
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / 1024.0 / 1024.0
    except OSError:
        pass
    return float("nan")


def machine_info(versions: dict[str, str]) -> dict[str, str]:
    """What the numbers were measured on: platform, CPU, cores, RAM, library versions, date."""
    info = {
        "date": _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "cores": str(os.cpu_count()),
        "ram": f"{total_ram_gb():.1f} GiB",
    }
    info.update(versions)
    return info
