"""``augnet.jacobian``: the exact per-sample Jacobian, assembled in the documented nesting."""

from __future__ import annotations

import numpy as np

from augnet import _backend as B
from augnet._engine import blocks, checks, padding, prepare, sensitivity
from augnet._engine import run as R
from augnet._engine.logits import maybe_logits
from augnet._engine.results import TopKJacobian
from augnet._engine.run import Run
from augnet._structure import unflatten


def jacobian(
    fn,
    x,
    *,
    outputs=None,
    top_k: int | None = None,
    training: bool = False,
    strategy: str = "auto",
    batch_size: int | None = None,
    chunk_size: int | None = None,
    max_memory=None,
    jit_compile: bool = False,
    derivatives=None,
    wrt=None,
    logits: bool = False,
):
    """The exact per-sample Jacobian ∂fn(x)/∂x.

    Args:
        fn: a ``keras.Model`` (called as ``fn(x, training=training)``) or any callable built of
            the backend's ops, e.g. ``keras.ops`` (called as ``fn(x)``). Samples must be
            independent (no batch statistics).
        x: ``(batch, *input_shape)`` NumPy array or tensor, or a list/tuple/dict of them for a
            model with several inputs. Cast to the model's input dtype (float16/32/64 kept).
        outputs: select output elements by flat index (per sample): ``[0, 3, 7]`` gives
            ``(batch, 3, *input_shape)``. For a model with several outputs, a list/dict with one
            entry per output (a list of indices, or ``None`` for all of it). Per-sample
            selection (a model with one output): a ``(batch, k)`` integer array whose row ``i``
            holds sample ``i``'s flat output indices, giving ``(batch, k, *input_shape)`` with
            ``J[i, j] = ∂y[i, outputs[i, j]]/∂x[i]`` (what ``top_k`` does with its own indices;
            attribution methods use it to follow each sample's class through noisy copies).
        top_k: per sample, the Jacobians of the ``k`` largest outputs (classifiers); returns a
            :class:`TopKJacobian` ``(jacobian, indices, values)``.
        training: ``False`` (default): the model as it predicts (Dropout off, BatchNorm on its moving
            statistics). ``True``: the training-mode forward pass. Dropout applies one random mask
            (from the layer's seed state, which is not advanced: repeated calls agree). BatchNorm
            uses the statistics of each pass's batch, which couples the samples: sample ``i``'s
            rows are ``sum_b ∂y_b/∂x_i`` over the pass's batch (what
            ``tf.GradientTape.batch_jacobian`` gives), not ``∂y_i/∂x_i``; exactly zero for Dense +
            BatchNorm at batch 1. Never changes the model: BatchNorm statistics are kept.
        strategy: ``"auto"`` (default), ``"loop"``, ``"pfor"``, ``"forward"`` or ``"loop_xla"``
            (the loop compiled with XLA); all give the same numbers to float rounding (see the
            module docstring).
        batch_size: samples per pass (default: all, within ``max_memory``).
        chunk_size: outputs per pass (input elements per pass in forward mode).
        max_memory: a budget for one pass's intermediates, bytes or a string like ``"2GB"``
            (default 2 GiB); the result itself is on top of it. For Jacobians larger than memory,
            use :func:`iter_jacobian` or :func:`jacobian_to_npy`.
        jit_compile: compile with XLA. Off by default: on CPU it was slower in our benchmarks.
        derivatives: ``{LayerClass: rule}`` custom derivative rules for this call, on top of those
            registered with ``augnet.register_derivative`` (see ``augnet._derivatives``). A Keras
            layer with no gradient path and no rule raises ``augnet.GradientPathError``.
        wrt: the name of a layer of ``fn`` (a Keras model): the Jacobian of the outputs with
            respect to that layer's output activation instead, ``(batch, *output_shape,
            *activation_shape)``: the activation is treated as a free variable, everything
            else (skip connections from earlier layers included) as fixed.
        logits: ``True``: the Jacobian of the scores before the softmax or sigmoid that ends
            the model (its "logits"), as saliency tools commonly show, instead of the
            probabilities, whose derivative vanishes where the model is sure (exactly 0.0 in
            float32 once it saturates). The model is not changed: augnet builds, once, a view
            sharing its weights (a final ``Activation``/``Softmax`` layer, a layer with
            ``activation="softmax"``/``"sigmoid"``, or a ``keras.ops.softmax``/``sigmoid``). A
            functional or Sequential model only; a model that does not end in one is an error
            naming its last layer.

    Returns:
        ``(batch, *output_shape, *input_shape)`` — a NumPy array when called eagerly, a tensor when
        traced inside ``tf.function``. With ``outputs=`` the output axes become ``(k,)``. For a
        model with several inputs or outputs, ``J[out][in]``: the outer list/dict follows the
        model's outputs, the inner one the inputs as given. Outputs that do not depend on an input
        give zeros. A sample whose whole Jacobian is exactly zero gets a
        ``augnet.ZeroJacobianWarning`` (see ``logits``).

    Raises:
        ValueError: a missing batch axis, a wrong shape or number of inputs, an output index out
            of range, an invalid option, a non-finite input (naming the sample; values are
            checked on eager calls, not while a caller's ``tf.function`` traces).
        TypeError: a non-numeric or complex input, something that is not one batch of arrays (a
            data set, a generator: iterate and call per batch), or an integer model input (not
            differentiable).
        augnet.GradientPathError: a gradient path is cut (a layer or an operation without a
            derivative), so the Jacobian would be silently zero.
        augnet.ResultTooLargeError: the result does not fit in the memory available (checked
            before any work; a ``MemoryError`` and a ``ValueError``).

    Example:
        >>> import numpy as np, keras, augnet
        >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        >>> J = augnet.jacobian(model, np.ones((5, 3), "float32"))
        >>> J.shape
        (5, 2, 3)
        >>> np.allclose(J[0], model.layers[0].kernel.numpy().T)
        True
    """
    source = fn
    if logits is not False:
        fn = maybe_logits(fn, logits)
    if wrt is not None:
        # The activation of layer `wrt` becomes an input of a function that runs the rest of the
        # model (derivative rules applied inside it): its Jacobian, trimmed to that input.
        g, inputs, finish = sensitivity.prepare(
            fn, x, wrt, training=training, derivatives=derivatives, source=source
        )
        J = jacobian(
            g,
            inputs,
            outputs=outputs,
            top_k=top_k,
            strategy=strategy,
            batch_size=batch_size,
            chunk_size=chunk_size,
            max_memory=max_memory,
            jit_compile=jit_compile,
        )
        return finish(J)
    options = (outputs, top_k, training, strategy, batch_size, chunk_size, max_memory, jit_compile)
    run = prepare.prepared(fn, x, options, derivatives, fast=fast_lane)
    if run.fast is not None:
        J = run.fast(x)
        if isinstance(J, np.ndarray) and checks.small_without_zero(J):
            return J  # the common case of a small result, checked without the per-sample look
        parts = [J] if isinstance(J, np.ndarray) else B.nest_flatten(J)  # (no walk: hot path)
        checks.warn_zero_samples(parts, len(parts[0]))
        return J
    if B.is_symbolic(*run.tensors):
        return symbolic_jacobian(run)
    target, sel = run.target, run.selection
    n_samples = run.n_samples
    dtype = B.dtype_name(target.dtype)
    results = [np.empty((n_samples, sel.size, *s), dtype=dtype) for s in target.in_shapes]
    indices = np.empty((n_samples, sel.size), dtype=np.int64) if sel.top_k is not None else None
    restore = R.restore_state(fn, run.training)
    try:
        whole = (slice(0, n_samples), slice(0, sel.size))
        for samples, columns, outs, values in R.iter_blocks(run):
            for i, v in enumerate(values):
                if (samples, columns) == whole and R.owned(v, results[i]):
                    results[i] = v  # one block is the whole result: no copy
                else:
                    R.write_block(results[i], samples, columns, v)
            if indices is not None:
                indices[samples, columns] = outs
    finally:
        restore()
    checks.warn_zero_samples(results, n_samples)
    return assemble(run, results, indices)


# Inside a caller's tf.function, autograph would rewrite this whole module's source on the first
# call (12-30 s on a 2-core CPU, measured) for nothing: the engine has no tensor-dependent Python
# control flow. TensorFlow calls a function carrying this marker as it is, and so everything it
# calls (tf.autograph.experimental.do_not_convert sets the same marker, but would also switch
# autograph off inside the caller's model).
jacobian.autograph_info__ = None


def fast_lane(plan: Run, n_samples: int):
    """``fast(x) -> J`` for a remembered plan that is one pass (every sample and every selected
    output, or input element, at once) of one input in inference mode, else ``None``.

    A repeated call with an array of the planned shape, dtype and options then costs what the
    computation costs: the model's state, one compiled call with ``x`` (``B.as_argument``: as the
    compiled function takes it fastest), the finite check of ``x`` while it computes (JAX
    dispatches asynchronously: checking first would delay the call), and one conversion to
    NumPy, reshaped. Everything else (selection, plan, seeds, the compiled function) was done when
    the call was planned.
    """
    target, sel = plan.target, plan.selection
    kind = plan.strategy
    if (
        plan.training  # (the general path snapshots and restores state around training calls)
        or sel.top_k is not None
        or len(target.in_shapes) != 1
        or kind not in ("loop", "pfor", "forward")
        or n_samples > plan.batch_size
    ):
        return None
    (n_in,), (shape,) = target.in_sizes, target.in_shapes
    b = n_samples
    m = sel.size
    if kind == "forward":
        if plan.chunk_size < n_in:
            return None
        extra = (0, sel.full)
    else:
        if plan.chunk_size < m:
            return None
        # Every output in order: the seeds are constants of the compiled block (no `sel`).
        extra = blocks.reverse_extra(target, kind, sel.rows, 0, m)
    dtype = np.dtype(B.dtype_name(target.dtype))
    model, model_state = target.fn, B.model_state
    state = (lambda: model_state(model)) if target.keras else tuple
    single = len(target.out_shapes) == 1 and sel.full
    out_shape = (*target.out_shapes[0], *shape) if single else None
    fn = blocks.compiled(target, kind, False, plan.jit_compile, extra=extra)
    if extra == blocks.ALL_OUTPUTS:
        rest = ()
    else:
        rows = B.convert(np.ascontiguousarray(np.broadcast_to(sel.rows, (b, m)), np.int32), "int32")
        rest = (
            (B.convert(np.arange(n_in, dtype=np.int32), "int32"), rows)
            if kind == "forward"
            else (rows,)
        )
    names = target.in_names

    call = [fn]  # the compiled block; once it has run b samples unpadded, called directly

    def fast(x):
        arg = B.as_argument(x, dtype)
        out = call[0](state(), [arg], *rest)
        checks.check_finite([arg], names)
        if call[0] is fn:
            call[0] = padding.direct(fn, b) or fn
        if kind == "forward":
            value = B.to_numpy(out).reshape(b, m, *shape)
        elif isinstance(out[0], list | tuple):  # the loop: one (b, *shape) tensor per output,
            value = np.empty((b, m, *shape), dtype=dtype)  # copied once, into the result
            for j, column in enumerate(out[0]):
                value[:, j] = B.numpy_view(column)
        else:
            value = B.to_numpy(out[0])
        if single:
            return value.reshape(b, *out_shape)
        return assemble(plan, [value], None)

    return fast


def assemble(run: Run, results: list, indices):
    """Reshapes ``(batch, m, *in_shape)`` blocks into the documented nesting."""
    target, sel = run.target, run.selection
    symbolic = not isinstance(results[0], np.ndarray)

    def reshape(a, shape):
        return B.reshape(a, (-1, *shape)) if symbolic else a.reshape((a.shape[0], *shape))

    if sel.top_k is not None:
        jac = unflatten(results, target.in_structure)
        if symbolic:
            return TopKJacobian(jac, indices[0], indices[1])
        preds = outputs_at(run, indices)
        return TopKJacobian(jac, indices, preds)
    per_output = []
    for o, group in enumerate(sel.groups):
        start, stop = group
        inner = []
        for res, in_shape in zip(results, target.in_shapes):
            block = res[:, start:stop]
            out_shape = target.out_shapes[o] if sel.full else (stop - start,)
            inner.append(reshape(block, (*out_shape, *in_shape)))
        per_output.append(unflatten(inner, target.in_structure))
    return unflatten(per_output, target.out_structure)


def outputs_at(run: Run, indices: np.ndarray) -> np.ndarray:
    predict = blocks.compiled(run.target, "predict", run.training, run.jit_compile)
    values = np.empty(indices.shape, dtype=B.dtype_name(run.target.dtype))
    state = run.target.state()
    for s0 in range(0, run.n_samples, run.batch_size):
        s1 = min(run.n_samples, s0 + run.batch_size)
        preds = B.to_numpy(predict(state, [t[s0:s1] for t in run.tensors]))
        values[s0:s1] = np.take_along_axis(preds, indices[s0:s1], axis=1)
    return values


def symbolic_jacobian(run: Run):
    """While the caller traces (inside ``tf.function``): one uncompiled pass over the whole
    (symbolic) batch, returning backend tensors."""
    target, sel = run.target, run.selection
    xs = run.tensors
    state = target.state()
    topk = None
    if sel.top_k is not None:
        values, idx = B.top_k(target.flat_output(state, xs), sel.top_k)
        rows = B.cast(idx, "int32")
        topk = (idx, values)
    elif sel.per_sample is not None:
        rows = B.convert(np.ascontiguousarray(sel.per_sample), "int32")
    else:
        rows = B.rows_for_batch(sel.rows, xs[0])
    if run.strategy == "forward":
        results = []
        for i, (n_i, shape) in enumerate(zip(target.in_sizes, target.in_shapes)):
            block = blocks.forward_block(target, i, sel.full)(state, xs, B.arange(n_i), rows)
            results.append(B.reshape(block, (-1, sel.size, *shape)))
    else:
        results = blocks.reverse_block(target, run.strategy == "pfor")(state, xs, rows)
    return assemble(run, results, topk)
