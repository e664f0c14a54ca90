"""The compiled units of work, one per strategy, and their cache.

A block is a pure function of backend tensors whose first argument is the model's state
(``target.state()``, read at every call) and which only calls seam primitives
(``B.vjp``/``B.jvp``/``B.vectorized_map``/...). :func:`compiled` compiles it once per callable,
kind, options and input signature (``B.compile_function``) and caches it; the batch axis is
dynamic, so other batch sizes reuse it (on a backend that compiles per shape, by padding them:
:mod:`augnet._engine.padding`).

Kinds:

- ``"loop"``/``"pfor"``: ``(state, xs, sel (b, c)) -> per input (b, c, *in_shape)``: one forward
  pass, then c backward passes, unrolled (loop) or vectorised over the seeds (pfor); with
  ``extra=ALL_OUTPUTS``, ``(state, xs) -> per input (b, M, *in_shape)``, every output in order.
- ``"forward"``: ``(state, xs, cols (c,), sel (b, m)) -> (b, m, c)``: columns ``cols`` of one
  input, by Jacobian-vector products vectorised over the columns.
- ``"predict"``: ``(state, xs) -> (b, M)``, the flat output.
- ``"vjp"``: ``(state, xs, u (b, M)) -> per input (b, *in_shape)``; ``"jvp"``: ``(state, xs,
  tangents) -> (b, M)`` (augnet.vjp / augnet.jvp).
"""

from __future__ import annotations

import numpy as np

from augnet import _backend as B
from augnet._engine import padding, pooling
from augnet._engine.target import Target, cache_for

# ``extra`` of a "loop"/"pfor" block computing every output in order (no ``sel`` argument).
ALL_OUTPUTS = "all outputs"


def reverse_extra(target: Target, kind: str, rows, c0: int, c1: int):
    """The ``extra`` of the "loop"/"pfor" block computing columns ``c0:c1`` of the selected
    output rows ``rows`` (``None``: per-sample or top-k rows): :data:`ALL_OUTPUTS` where those
    columns are every output in order (where that measured faster: ``B.CONSTANT_SEEDS``), else
    the loop's static width (``None`` for pfor). The
    planned job, ``auto``'s timing and the fast lane all ask here, so they share one block."""
    M = target.total_outputs
    if (
        B.CONSTANT_SEEDS
        and rows is not None
        and c0 == 0
        and c1 == M == len(rows)
        and np.array_equal(rows, np.arange(M))
    ):
        return ALL_OUTPUTS
    return c1 - c0 if kind == "loop" else None


def reverse_block(
    target: Target,
    vectorized: bool,
    stacked: bool = True,
    routed: bool = False,
    all_outputs: bool = False,
):
    """``(state, xs, sel (b, c)) -> [ (b, c, *in_shape_i) ]``: one forward pass, then c backward
    passes.

    The loop form unrolls the c backward passes into one graph (c is static per compiled function):
    on CPU that measured about 2x faster than a ``while_loop`` over the seeds, as TensorFlow runs
    independent backward passes side by side. With ``stacked=False`` (the loop form only) it
    returns ``[[ (b, *in_shape_i) ] * c]`` per input instead, for the caller to copy straight into
    its result (stacking in the graph cost one more copy of the whole block, single-threaded).
    ``routed``: max-pooling layers record their maxima once for all c backward passes
    (:mod:`augnet._engine.pooling`). ``all_outputs``: every output in order, ``(state, xs)`` with
    no ``sel``: the seeds are constants of the graph (one argument fewer per call, and a one-hot
    the compiler folds: ~5 µs of a 60 µs MLP Jacobian on JAX).
    """
    M = target.total_outputs

    def backward(state, xs, seeds):
        """``seeds``: the c seeds, each a ``(b,)`` output index per sample or a static int."""
        with pooling.routed_pooling(target.fn if routed else None):
            y, vjp_fn = B.vjp(lambda xs: target.flat_output(state, xs), xs)

        def row_of(column):  # the same output (an int, or a scalar tensor) for every sample
            return vjp_fn(B.unit_tangent(column, M, (M,), y))

        def row(col):  # col: (b,) output index per sample, or a static int
            return row_of(col) if isinstance(col, int) else vjp_fn(B.one_hot(col, M, y.dtype))

        if vectorized:
            if seeds is None:  # every output: vectorised over the static columns 0..M-1
                rows = B.vectorized_map(row_of, B.arange(M))
            else:
                rows = B.vectorized_map(row, seeds)
            return [B.transpose_first_two(r) for r in rows]
        per_seed = [row(col) for col in seeds]
        if not stacked:
            return [list(grads) for grads in zip(*per_seed)]
        return [B.stack(list(grads), axis=1) for grads in zip(*per_seed)]

    if all_outputs:

        def block_all(state, xs):
            return backward(state, xs, None if vectorized else range(M))

        return block_all

    def block(state, xs, sel):
        if vectorized:
            return backward(state, xs, B.transpose_first_two(sel))
        return backward(state, xs, [sel[:, j] for j in range(B.shape_of(sel)[1])])

    return block


def forward_block(target: Target, which: int, all_outputs: bool = False):
    """``(state, xs, cols (c,), sel (b, m)) -> (b, m, c)``: columns ``cols`` of input ``which``.

    One JVP per column, vectorised over the columns: the tangent of column ``j`` is the unit
    vector ``e_j`` for every sample at once (samples are independent), and the forward pass itself
    is loop-invariant, so it runs once, not once per column as with tiled inputs (measured 1.5x
    faster than tiling on the tall benchmark case). ``all_outputs``: ``sel`` is every output in
    order (static), so no gather.
    """
    n = target.in_sizes[which]
    shape = target.in_shapes[which]

    def block(state, xs, cols, sel):
        def column(col):  # (b, M): ∂y/∂x_which[col] for every sample
            tangent = B.unit_tangent(col, n, shape, xs[which])
            tangents = [tangent if i == which else None for i in range(len(xs))]
            return B.jvp(lambda xs: target.flat_output(state, xs), xs, tangents)[1]

        y_dot = B.vectorized_map(column, cols)  # (c, b, M)
        if all_outputs:
            return B.transpose(y_dot, (1, 2, 0))
        picked = B.gather_columns(B.transpose_first_two(y_dot), sel)  # (b, c, m)
        return B.transpose(picked, (0, 2, 1))

    return block


def predict_block(target: Target):
    def block(state, xs):
        return target.flat_output(state, xs)

    return block


def vjp_block(target: Target):
    """``(state, xs, u (b, M)) -> [ (b, *in_shape_i) ]``: one forward and one backward pass."""

    def block(state, xs, u):
        _, vjp_fn = B.vjp(lambda xs: target.flat_output(state, xs), xs)
        return list(vjp_fn(u))

    return block


def jvp_block(target: Target, by_vjp: bool):
    """``(state, xs, tangents) -> (b, M)``: forward mode, or (``by_vjp``) reverse mode by the
    double-VJP trick, which respects derivative rules and works where forward mode does not."""
    product = B.jvp_by_vjp if by_vjp else B.jvp

    def block(state, xs, tangents):
        return product(lambda xs: target.flat_output(state, xs), xs, list(tangents))[1]

    return block


def state_signature(state):
    """The input-signature entry for a model state (a nest of tensors; ``()`` on TensorFlow)."""
    leaves = B.nest_flatten(state)
    return B.nest_pack(state, [B.tensor_spec(B.shape_of(t), t.dtype) for t in leaves])


def compiled(target: Target, kind: str, training: bool, jit_compile: bool, extra=None):
    """The compiled block of ``kind`` for ``target``, cached per callable and input signature."""
    key = (
        kind,
        training,
        jit_compile,
        extra,
        tuple(target.in_shapes),
        B.dtype_name(target.dtype),
        target.in_structure,
        target.rules,
    )
    cache = cache_for(target.fn)
    if key in cache:
        return cache[key]
    state_sig = state_signature(target.state())
    xs_sig = [B.tensor_spec((None, *s), target.dtype) for s in target.in_shapes]
    if kind in ("loop", "pfor"):
        loop = kind == "loop"
        # Routed max pooling has no XLA kernel and no pfor rule: the plain loop only. Derivative
        # rules replace a layer's call themselves: leave those models as they are.
        routed = loop and not jit_compile and target.rules is None
        all_outputs = extra == ALL_OUTPUTS
        # The loop's c results are copied straight into the result where the backend returns
        # outputs cheaply (TensorFlow); stacked in the compiled function where each output costs
        # (JAX: ~7 µs per output buffer, B.STACK_OUTPUTS).
        stacked = not loop or B.STACK_OUTPUTS
        block = reverse_block(
            target, vectorized=not loop, stacked=stacked, routed=routed, all_outputs=all_outputs
        )
        sig = [state_sig, xs_sig]
        if not all_outputs:
            sig.append(B.tensor_spec((None, extra), "int32"))
    elif kind == "forward":  # extra: (which input, every output in order)
        block = forward_block(target, *extra)
        sig = [
            state_sig,
            xs_sig,
            B.tensor_spec((None,), "int32"),
            B.tensor_spec((None, None), "int32"),
        ]
    elif kind == "predict":
        block = predict_block(target)
        sig = [state_sig, xs_sig]
    elif kind == "vjp":
        block = vjp_block(target)
        sig = [state_sig, xs_sig, B.tensor_spec((None, target.total_outputs), target.out_dtype)]
    elif kind == "jvp":  # extra: by the double-VJP trick
        block = jvp_block(target, by_vjp=extra)
        sig = [state_sig, xs_sig, xs_sig]
    else:  # pragma: no cover
        raise AssertionError(kind)
    fn = B.compile_function(block, sig, jit_compile=jit_compile)
    fn = padding.wrap(fn, kind, training)  # a backend that compiles per shape: pad the batch
    cache[key] = fn
    return fn


def trace_count(fn) -> int:
    """How many times augnet traced (compiled) functions for ``fn`` — for tests and diagnostics;
    with those of the callables the engine derived from it and keeps in its cache (the
    ``logits=True`` view, ``wrt=``'s remainder of the model)."""
    cache = cache_for(fn)
    total = sum(f.trace_count() for f in cache.values() if hasattr(f, "trace_count"))
    for key, value in list(cache.items()):
        if key == "logits_view" or (isinstance(key, tuple) and key[:1] == ("wrt",)):
            total += trace_count(value)
    return total
