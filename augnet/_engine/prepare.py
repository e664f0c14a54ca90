"""Preparing a call: check the options, prepare the target, select outputs, choose the strategy
and plan the passes (:func:`setup`), remembered for repeated calls (:func:`prepared`)."""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import replace

import numpy as np

from augnet import _backend as B
from augnet import _derivatives as D
from augnet._engine import auto, memory
from augnet._engine.checks import check_finite
from augnet._engine.logits import maybe_logits
from augnet._engine.run import Run
from augnet._engine.selection import select
from augnet._engine.target import (
    cache_for,
    floatx_name,
    infer_outputs,
    prepare_target,
    static_dim,
)
from augnet._errors import format_shape, invalid_value

logger = logging.getLogger(__name__)

STRATEGIES = ("auto", "loop", "pfor", "forward", "loop_xla")
MAX_PLANS = 16  # prepared calls remembered per callable (shapes x options)


def setup(
    fn,
    x,
    outputs,
    top_k,
    training,
    strategy,
    batch_size,
    chunk_size,
    max_memory,
    jit_compile,
    derivatives=None,
    *,
    whole: bool = False,
) -> Run:
    """Checks every argument and plans the call; nothing is compiled or computed yet (except the
    timing of ``strategy="auto"``'s candidates, once per callable and input signature).

    ``whole``: the caller allocates the whole result (``augnet.jacobian``), which is refused here,
    before any work, if it does not fit in the memory available (:func:`memory.check_result_size`).
    """
    if strategy not in STRATEGIES:
        raise ValueError(invalid_value("strategy", strategy, f"one of {STRATEGIES}"))
    if not isinstance(jit_compile, bool | np.bool_):
        raise TypeError(invalid_value("jit_compile", jit_compile, "True or False"))
    batch_size = memory.check_positive_int(batch_size, "batch_size")
    chunk_size = memory.check_positive_int(chunk_size, "chunk_size")
    max_memory = memory.parse_memory(max_memory)
    target, tensors = prepare_target(fn, x, training, derivatives)
    infer_outputs(target, tensors)
    selection = select(target, outputs, top_k)
    n_samples = static_dim(tensors[0].shape[0]) or 1  # (unknown while a caller traces)
    if selection.per_sample is not None and len(selection.per_sample) != n_samples:
        raise ValueError(
            f"Per-sample `outputs` has shape {format_shape(selection.per_sample.shape)}: one row "
            f"per sample is expected, ({n_samples}, k) for a batch of {n_samples}."
        )
    if whole and not B.is_symbolic(*tensors):
        check_whole_result(target, selection, n_samples)
    if strategy == "auto":
        strategy = auto.auto_strategy(
            target, tensors, selection, training, n_samples, batch_size, chunk_size, max_memory
        )
    if strategy == "loop_xla":  # the reverse loop, compiled with XLA
        strategy, jit_compile = "loop", True
    if strategy == "forward" and target.rules is not None:
        # No framework runs a custom derivative in forward mode: rules act in reverse mode.
        logger.info("augnet.jacobian: derivative rules are active, using strategy='loop'.")
        strategy = "loop"
    elif strategy == "forward" and training and not B.FORWARD_TRAINING:
        raise ValueError(
            "strategy='forward' computes the model as it predicts only (it runs the forward pass "
            "inside a loop vectorised over the input elements, where training-mode layers such as "
            "Dropout and BatchNorm are not supported); use strategy='loop' or 'pfor' with "
            "training=True."
        )
    elif strategy == "forward" and target.recurrent and not B.FORWARD_RECURRENT:
        # TensorFlow's forward mode fails on the RNN while_loop inside tf.function (a cryptic
        # "dtype variant" TypeError from the layer): say so instead.
        raise ValueError(
            "strategy='forward' does not support recurrent layers (LSTM, GRU, RNN): "
            f"{_framework()}'s forward mode fails on their loops inside a compiled function. Use "
            "strategy='loop', 'pfor' or 'auto'."
        )
    b, c = memory.plan(
        target, strategy, n_samples, selection.size, batch_size, chunk_size, max_memory
    )
    logger.debug("augnet.jacobian: strategy=%s batch_size=%d chunk_size=%d", strategy, b, c)
    return Run(target, tensors, selection, strategy, b, c, training, bool(jit_compile))


def check_whole_result(target, selection, n_samples: int) -> None:
    """``augnet.jacobian``'s result, ``(batch, m, *input_shape)`` per input, against the memory
    available (refused before any work if it does not fit)."""
    m = selection.size
    elements = n_samples * m * sum(target.in_sizes)
    shapes = ", ".join(format_shape((n_samples, m, *s)) for s in target.in_shapes)
    memory.check_result_size(elements, target.dtype, "augnet.jacobian", shapes)


def _framework() -> str:
    return {"tensorflow": "TensorFlow", "jax": "JAX", "torch": "PyTorch"}.get(B.name, B.name)


def resolve_strategy(
    fn,
    x,
    *,
    outputs=None,
    top_k=None,
    training: bool = False,
    strategy: str = "auto",
    batch_size=None,
    chunk_size=None,
    max_memory=None,
    jit_compile: bool = False,
    derivatives=None,
    logits: bool = False,
) -> str:
    """The strategy a call with these arguments runs, by name: ``"auto"`` resolved (by rule, or by
    timing the candidates on ``x``), and ``"loop_xla"`` for the loop compiled with XLA.

    The command line resolves ``"auto"`` once, on its first batch, and passes the result to every
    batch of the run, so that a run (and its ``--resume``) uses one strategy throughout.
    """
    run = setup(
        maybe_logits(fn, logits),
        x,
        outputs,
        top_k,
        training,
        strategy,
        batch_size,
        chunk_size,
        max_memory,
        jit_compile,
        derivatives,
    )
    return "loop_xla" if run.strategy == "loop" and run.jit_compile else str(run.strategy)


def prepared(fn, x, options: tuple, derivatives, fast=None) -> Run:
    """``setup(fn, x, *options, derivatives)``, remembered per callable for repeated eager calls
    with one array of the same shape and dtype and the same options.

    Checking and converting the arguments, finding the outputs and planning cost ~0.2 ms per call
    (more for a subclassed model, which needs a probe forward pass): as much as a small model's
    whole Jacobian. A cached plan is reused with the new input converted; anything else (lists,
    dicts, per-call ``derivatives``, inside ``tf.function``) is prepared afresh.

    ``fast(plan, n_samples) -> callable or None`` builds a remembered plan's fast lane once, when it is
    planned; a plan with one is returned as it is (no tensors: the caller calls
    ``run.fast(x)``).
    """
    key = call_key(x, options, derivatives)
    plans = None
    if key is not None:
        cache = cache_for(fn)
        plans = cache.get("plans")
        if plans is None:
            plans = cache["plans"] = OrderedDict()
        plan = plans.get(key)
        if plan is not None:
            plans.move_to_end(key)
            if plan.fast is not None:
                return plan  # (the fast lane converts and checks x itself, on every call)
            tensors = [B.convert(x, plan.target.dtype)]
            check_finite(tensors, plan.target.in_names)
            return replace(plan, tensors=tensors)  # memo shared
    run = setup(fn, x, *options, derivatives, whole=True)
    if plans is not None:
        plan = replace(run, tensors=[])  # not the caller's data
        plan.fast = run.fast = fast(plan, run.n_samples) if fast is not None else None
        plans[key] = plan
        while len(plans) > MAX_PLANS:
            plans.popitem(last=False)
    return run


def call_key(x, options: tuple, derivatives):
    """A hashable key for a prepared call, or ``None`` where the call must be prepared afresh."""
    # Cheapest checks first: this runs on every call (a NumPy array is symbolic only in that the
    # caller may be tracing around it, inside tf.function).
    if derivatives is not None:
        return None
    if isinstance(x, np.ndarray):
        if B.is_symbolic():
            return None
        sig = ("ndarray", x.shape, x.dtype)
    elif B.is_symbolic(x):
        return None
    elif B.is_eager_tensor(x):
        sig = ("tensor", x.shape, x.dtype)  # shapes and dtypes hash by value
    else:
        return None
    outputs = options[0]
    if outputs is not None:
        if not isinstance(outputs, list | tuple | range) or not all(
            isinstance(o, int) and not isinstance(o, bool) for o in outputs
        ):
            return None
        outputs = (type(outputs).__name__, tuple(outputs))
    rest = options[1:]
    try:
        hash(rest)
    except TypeError:
        return None
    return ("call", sig, outputs, rest, D.registry_key(), floatx_name())
