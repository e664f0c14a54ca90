"""``strategy="auto"``: which strategy a call takes, by rule or by timing the candidates.

:func:`auto_candidates` narrows the strategies by the network's kind (measured rules);
:func:`auto_strategy` times one block of each remaining candidate once per callable and input
signature (cached) and extrapolates to the whole job. A near tie stays with the reverse loop.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

import numpy as np

from augnet import _backend as B
from augnet._engine import blocks, memory
from augnet._engine.run import Run, values_to_numpy
from augnet._engine.target import Target, cache_for

logger = logging.getLogger(__name__)

AUTO_MARGIN = 0.8  # auto leaves the loop only for a candidate timed this much faster


def auto_candidates(target: Target, m: int, training: bool) -> list[str]:
    """The strategies ``"auto"`` considers for ``m`` selected outputs.

    Forward mode alone when a sample's input elements are at most half the selected outputs (a
    tall Jacobian: one pass per input element beats one per output); the loop alone for
    convolutional networks; the loop with and without XLA for recurrent ones (on torch the loop
    and pfor); otherwise the reverse modes, plus forward mode while the input is not much larger
    than the output. Forward
    mode is left out with ``training=True`` and recurrent layers where the backend's forward mode
    does not support them (``B.FORWARD_TRAINING``, ``B.FORWARD_RECURRENT``; TensorFlow's fails on
    their loops) and with custom derivative rules (they act in reverse mode). ``"loop_xla"`` only
    where XLA is a choice of its own (``B.XLA_OPTIONAL``; JAX always compiles with XLA).

    The rules were measured on TensorFlow (CPU); a backend whose measurements differ may change
    them here, keyed on ``B.name``.
    """
    n = sum(target.in_sizes)
    forward_ok = (
        (not training or B.FORWARD_TRAINING)
        and (not target.recurrent or B.FORWARD_RECURRENT)
        and getattr(target, "rules", None) is None
    )
    if forward_ok and 2 * n <= m:
        return ["forward"]
    if has_convolutions(target.fn):
        # Measured (benchmarks/RESULTS.md, shared/REFERENCE.md): on CPU the reverse loop beats
        # pfor on every convolutional network tried (pfor falls back to a while_loop for
        # depthwise convolutions), and XLA gained at most ~10% there for seconds of compiling;
        # skip timing the candidates.
        return ["loop"]
    xla = ["loop_xla"] if B.XLA_OPTIONAL else []
    if target.recurrent:
        if B.name == "torch":
            # torch (benchmarks/README.md): the backward passes vectorised over the seeds (pfor)
            # beat the loop ~1.7x on the LSTM case, and capturing them takes about a second.
            return ["loop", "pfor"]
        # XLA makes the loop 3-6x faster on the LSTM benchmark; pfor was 4x slower than that and
        # took ~9 s to trace, so timing it would only lengthen the first call.
        return ["loop", *xla]
    # Small dense networks: every candidate is timed; XLA for the reverse loop only, never forward
    # mode, where XLA gave wrong JVPs through MaxPooling2D.
    candidates = ["loop", "pfor", *xla]
    if forward_ok and n <= 8 * m:
        candidates.append("forward")
    return candidates


def has_convolutions(fn) -> bool:
    stack = list(getattr(fn, "layers", None) or [])
    while stack:
        layer = stack.pop()
        if "Conv" in type(layer).__name__:
            return True
        stack.extend(getattr(layer, "layers", None) or [])
    return False


def auto_strategy(
    target, tensors, selection, training, n_samples, batch_size, chunk_size, max_memory
):
    """Resolves ``strategy="auto"``: by rule where one candidate is left, else by timing one block
    of each candidate once per callable and input signature (cached), extrapolated to the job."""
    candidates = auto_candidates(target, selection.size, training)
    if len(candidates) == 1:
        return candidates[0]
    if B.is_symbolic(*tensors):  # no timing inside a caller's tf.function: the reverse loop
        return candidates[0]
    key = (
        "auto",
        tuple(target.in_shapes),
        B.dtype_name(target.dtype),
        training,
        selection.size,
        n_samples,
        batch_size,
        chunk_size,
        max_memory,
        target.in_structure,
    )
    cache = cache_for(target.fn)
    if key not in cache:
        runs = {}
        for name in candidates:
            kind, jit = ("loop", True) if name == "loop_xla" else (name, False)
            b, c = memory.plan(
                target, kind, n_samples, selection.size, batch_size, chunk_size, max_memory
            )
            runs[name] = Run(target, tensors, selection, kind, b, c, training, jit)
        estimates = probe_estimates(runs)
        if not estimates:
            return "loop"
        best = min(estimates, key=estimates.get)
        first = candidates[0]  # the reverse loop
        if first in estimates and estimates[best] > AUTO_MARGIN * estimates[first]:
            # A near tie goes to the loop: strategies differ in the last bits, and a choice that
            # flipped with timing noise would make two runs (or a reloaded model) differ.
            best = first
        cache[key] = best
        logger.debug("augnet: auto strategy estimates (s): %s -> %s", estimates, cache[key])
    return cache[key]


def probe_estimates(runs: dict) -> dict:
    """``{name: seconds}``: how long the whole job would take with each candidate run, from timed
    blocks after a warm-up; candidates the backend cannot run here are left out.

    The candidates are timed in turns (one call each per round) so that drift in the machine's
    speed hits them alike, each for at least 3 calls and, for fast ones, up to ~20 ms of calls:
    a few sub-millisecond calls are too noisy to rank strategies by. Each takes its best call.
    """
    calls = {}
    for name, run in runs.items():
        try:
            call, n_blocks = probe_call(run)
            call()  # trace and warm up
            calls[name] = (call, n_blocks)
        except Exception as exc:  # a strategy the backend cannot run here: skip it
            logger.debug("augnet: strategy %r failed in the auto probe: %s", name, exc)
    best = dict.fromkeys(calls, math.inf)
    spent = dict.fromkeys(calls, 0.0)
    for reps in range(50):
        if reps >= 3 and all(t >= 0.02 for t in spent.values()):
            break
        for name, (call, _) in calls.items():
            t0 = time.perf_counter()
            call()
            elapsed = time.perf_counter() - t0
            best[name] = min(best[name], elapsed)
            spent[name] += elapsed
    return {name: best[name] * n for name, (_, n) in calls.items()}


def probe_call(run: Run) -> tuple[Callable, int]:
    """A call computing one block of ``run`` (to NumPy, as the job would), and the number of such
    blocks in the whole job."""
    target, sel = run.target, run.selection
    b = min(run.batch_size, run.n_samples)
    xs = [t[:b] for t in run.tensors]
    rows = np.arange(sel.size) if sel.rows is None else sel.rows  # top_k: any k rows cost the same
    rows = np.broadcast_to(rows, (b, sel.size))
    sample_blocks = math.ceil(run.n_samples / b)
    if run.strategy == "forward":
        all_outputs = sel.full  # (never with top_k)
        fn = blocks.compiled(
            target, "forward", run.training, run.jit_compile, extra=(0, all_outputs)
        )
        c = min(run.chunk_size, target.in_sizes[0])
        args = (xs, B.convert(np.arange(c), "int32"), B.convert(rows, "int32"))
        n_blocks = sample_blocks * sum(math.ceil(n / run.chunk_size) for n in target.in_sizes)
    else:
        c = min(run.chunk_size, sel.size)
        extra = blocks.reverse_extra(target, run.strategy, sel.rows, 0, c)
        fn = blocks.compiled(target, run.strategy, run.training, run.jit_compile, extra=extra)
        # Tensors, as the job passes them (NumPy arguments take a slower call path).
        args = (xs,)
        if extra != blocks.ALL_OUTPUTS:
            args = (xs, B.convert(np.ascontiguousarray(rows[:, :c]), "int32"))
        n_blocks = sample_blocks * math.ceil(sel.size / c)

    state = target.state()

    def call():
        values_to_numpy(fn(state, *args))

    return call, n_blocks
