"""The TensorFlow backend of the autodiff seam: GradientTape, ForwardAccumulator, pfor, tf.function.

Implements every function of the contract in ``augnet/_backend/__init__.py`` (read it first); only
what is particular to TensorFlow is said here:

- the model is called directly (``training=False``) or through ``stateless_call``
  (``training=True``); :func:`model_state` is empty because a ``tf.function`` reads the variables
  by reference at every call, so weights changed later by ``fit`` are seen without retracing;
- compiled functions are traced once per input signature with the batch axis ``None`` (no retrace
  for another batch size) and called straight through the traced concrete function;
- reverse-mode max pooling can be routed through ``MaxPoolGradWithArgmax``
  (:func:`max_pool_2d_routed`), which the engine's reverse loop uses;
- forward mode (``ForwardAccumulator``) ignores custom gradients inside ``tf.function`` and fails
  on recurrent layers' loops there: :data:`FORWARD_RECURRENT` is ``False``, and the engine computes
  a JVP with derivative rules active by the double-VJP trick (:func:`jvp_by_vjp`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import tensorflow as tf

name = "tensorflow"

# Capabilities the engine asks about (see the contract).
FORWARD_RECURRENT = False  # forward mode through LSTM/GRU loops fails inside tf.function
FORWARD_TRAINING = False  # forward mode vectorised by pfor: no training-mode layers
XLA_OPTIONAL = True  # jit_compile=True is a real choice ("loop_xla" differs from "loop")


# --------------------------------------------------------------------------------------------------
# Conversion, dtypes, devices
# --------------------------------------------------------------------------------------------------


def convert(x, dtype) -> tf.Tensor:
    """Converts an array-like to a tensor of ``dtype`` (a cast when the dtype differs)."""
    if isinstance(x, tf.Tensor | tf.Variable):
        t = tf.convert_to_tensor(x)
    else:
        t = tf.convert_to_tensor(np.asarray(x) if not hasattr(x, "numpy") else x)
    if t.dtype != tf.as_dtype(dtype):
        t = tf.cast(t, dtype)
    return t


def to_numpy(t) -> np.ndarray:
    return t.numpy() if hasattr(t, "numpy") else np.asarray(t)


def numpy_view(t) -> np.ndarray:
    """A read-only NumPy view of an eager tensor's buffer, without a copy: valid only while the
    tensor itself is referenced (copy out of it before dropping the tensor)."""
    return np.asarray(t)


def is_eager_tensor(t) -> bool:
    return isinstance(t, tf.Tensor) and hasattr(t, "numpy")


def is_float_tensor(t) -> bool:
    return tf.is_tensor(t) and t.dtype.is_floating


def dtype_name(dtype) -> str:
    return tf.as_dtype(dtype).name


def is_floating(dtype) -> bool:
    return tf.as_dtype(dtype).is_floating


def is_symbolic(*values) -> bool:
    """True while being traced inside ``tf.function`` (results are then tensors, not arrays)."""
    return not tf.executing_eagerly()


def devices() -> list[str]:
    """The devices TensorFlow computes on, e.g. ``["CPU:0", "GPU:0"]``."""
    return [d.name.split("device:", 1)[-1] for d in tf.config.list_logical_devices()]


def set_threads(n: int) -> None:
    """Limits the framework's CPU threads to ``n`` (intra- and inter-op) where it still can: once
    TensorFlow has started, its setting stays (no error)."""
    try:
        tf.config.threading.set_intra_op_parallelism_threads(n)
        tf.config.threading.set_inter_op_parallelism_threads(n)
    except RuntimeError:  # TensorFlow already initialised in this process: keep its setting
        pass


# --------------------------------------------------------------------------------------------------
# The model as a pure function
# --------------------------------------------------------------------------------------------------


def model_state(model) -> tuple:
    """Nothing: a traced function reads the model's variables by reference at every call."""
    return ()


def call_model(model, state, inputs, training: bool):
    """``model(inputs)`` without side effects: with ``training=True`` through ``stateless_call``
    (BatchNorm statistics and seed states are computed but not assigned)."""
    if training and getattr(model, "stateless_call", None) is not None:
        trainable = [v.value for v in model.trainable_variables]
        non_trainable = [v.value for v in model.non_trainable_variables]
        out, _ = model.stateless_call(trainable, non_trainable, inputs, training=True)
        return out
    return model(inputs, training=training)


def parameter_vjp(model, variables: Sequence, f: Callable):
    """One forward pass of ``f(model_state(model))`` recorded for gradients w.r.t. ``variables``.

    Returns ``(y, vjp_fn)``; ``vjp_fn(cotangent)`` gives one dense gradient per variable (zeros
    where unconnected).
    """
    variables = [getattr(v, "value", v) for v in variables]
    with tf.GradientTape(persistent=True, watch_accessed_variables=False) as tape:
        for v in variables:
            tape.watch(v)
        y = f(model_state(model))

    def vjp_fn(cotangent):
        grads = tape.gradient(
            y,
            variables,
            output_gradients=cotangent,
            unconnected_gradients=tf.UnconnectedGradients.ZERO,
        )
        return [tf.convert_to_tensor(g) for g in grads]

    return y, vjp_fn


# --------------------------------------------------------------------------------------------------
# Autodiff
# --------------------------------------------------------------------------------------------------


def vjp(f: Callable[[list], tf.Tensor], xs: Sequence[tf.Tensor]):
    """One forward pass of ``f`` recorded for reverse mode.

    Args:
        f: maps a list of input tensors to one tensor ``y``.
        xs: the inputs.

    Returns:
        ``(y, vjp_fn)`` where ``vjp_fn(cotangent)`` (same shape as ``y``) returns a list with
        ``cotangentᵀ·∂y/∂x`` for every input; inputs that ``y`` does not depend on get zeros.
    """
    xs = list(xs)
    with tf.GradientTape(persistent=True, watch_accessed_variables=False) as tape:
        for x in xs:
            tape.watch(x)
        y = f(xs)

    def vjp_fn(cotangent):
        return tape.gradient(
            y, xs, output_gradients=cotangent, unconnected_gradients=tf.UnconnectedGradients.ZERO
        )

    return y, vjp_fn


def jvp(f: Callable[[list], tf.Tensor], xs: Sequence[tf.Tensor], tangents: Sequence):
    """Forward mode: returns ``(y, ∂y/∂x · tangents)``; zeros where ``y`` does not depend on x.

    A tangent of ``None`` leaves that input constant.
    """
    xs = list(xs)
    primals = [x for x, t in zip(xs, tangents) if t is not None]
    tangents = [t for t in tangents if t is not None]
    with tf.autodiff.ForwardAccumulator(primals, tangents) as acc:
        y = f(xs)
    y_dot = acc.jvp(y, unconnected_gradients=tf.UnconnectedGradients.ZERO)
    return y, y_dot


def jvp_by_vjp(f: Callable[[list], tf.Tensor], xs: Sequence[tf.Tensor], tangents: Sequence):
    """``J·v`` in reverse mode (the double-VJP trick): ``J·v = ∂/∂u (uᵀJ·v)``. Respects custom
    gradients (derivative rules), which ``ForwardAccumulator`` ignores inside ``tf.function``."""
    xs = list(xs)
    with tf.GradientTape(watch_accessed_variables=False) as outer:
        with tf.GradientTape(watch_accessed_variables=False) as inner:
            for x in xs:
                inner.watch(x)
            y = f(xs)
        u = tf.zeros_like(y)
        outer.watch(u)
        grads = inner.gradient(
            y, xs, output_gradients=u, unconnected_gradients=tf.UnconnectedGradients.ZERO
        )
        total = tf.add_n(
            [tf.reduce_sum(g * t) for g, t in zip(grads, tangents) if t is not None]
            or [tf.reduce_sum(u) * 0]
        )
    y_dot = outer.gradient(total, u, unconnected_gradients=tf.UnconnectedGradients.ZERO)
    return y, y_dot


def vectorized_map(fn: Callable, elems: tf.Tensor):
    """Applies ``fn`` to every row of ``elems`` in one vectorised pass (pfor), stacking the results
    along a new first axis."""
    return tf.vectorized_map(fn, elems, fallback_to_while_loop=True)


def with_custom_vjp(forward: Callable, xs: Sequence[tf.Tensor], rule_vjp: Callable):
    """Runs ``forward(xs) -> y`` with its reverse-mode derivative replaced by ``rule_vjp``.

    Args:
        forward: maps a list of tensors to a tensor or a list/tuple of tensors.
        xs: the differentiable inputs.
        rule_vjp: ``rule_vjp(xs, y, upstream) -> list`` of cotangents, one per ``x`` (``None`` for
            no gradient); ``upstream`` has the structure of ``y``.

    Returns:
        ``y``. Gradients of any variables ``forward`` reads are ``None`` (the rule replaces them).
        Forward mode (``ForwardAccumulator``) does not see the rule inside ``tf.function``: use
        reverse mode (or :func:`jvp_by_vjp`) when rules are active.
    """
    xs = list(xs)

    @tf.custom_gradient
    def wrapped(*args):
        y = forward(list(args))

        def grad(*upstream, variables=None):
            up = upstream[0] if len(upstream) == 1 and tf.is_tensor(y) else list(upstream)
            cots = list(rule_vjp(list(args), y, up))
            cots = [
                tf.zeros_like(a) if c is None else tf.cast(tf.convert_to_tensor(c), a.dtype)
                for a, c in zip(args, cots)
            ]
            if variables:
                return cots, [None] * len(variables)
            return cots

        return y, grad

    return wrapped(*xs)


def connected_outputs(f: Callable, xs: Sequence[tf.Tensor]):
    """Runs ``f(xs)`` on a tape; returns ``(y, flags)``: one flag per leaf of ``y`` (flattened),
    ``True`` where that floating output has a gradient path to any of ``xs`` (TensorFlow gives a
    ``None`` gradient where there is no path; a path whose derivative is zero counts as a path)."""
    xs = list(xs)
    with tf.GradientTape(persistent=True, watch_accessed_variables=False) as tape:
        for x in xs:
            tape.watch(x)
        y = f(xs)
    flags = []
    for out in tf.nest.flatten(y):
        if not is_float_tensor(out):
            flags.append(False)
            continue
        grads = tape.gradient(out, xs, unconnected_gradients=tf.UnconnectedGradients.NONE)
        flags.append(any(g is not None for g in grads))
    del tape
    return y, flags


def stop_gradient(t):
    return tf.stop_gradient(t)


def max_pool_2d_routed(x, pool_size, strides, padding: str):
    """2-D max pooling (``(batch, h, w, c)``) whose reverse-mode derivative reuses the window maxima
    found in the forward pass.

    TensorFlow's ``MaxPoolGrad`` finds each window's maximum again on every backward pass; a
    Jacobian makes one backward pass per output from the same forward pass, so this records the
    positions once (``max_pool_with_argmax``) and routes each cotangent with
    ``MaxPoolGradWithArgmax``: the same numbers (the same first-maximum rule for ties), ~5x less
    time per backward pass (measured, benchmarks/RESULTS.md). Reverse mode only; no XLA kernel.
    """
    ksize = [1, *pool_size, 1]
    stride = [1, *strides, 1]
    pad = padding.upper()

    @tf.custom_gradient
    def pool(x):
        y, argmax = tf.nn.max_pool_with_argmax(x, ksize, stride, pad, include_batch_in_index=True)

        def grad(upstream):
            return tf.raw_ops.MaxPoolGradWithArgmax(
                input=x,
                grad=upstream,
                argmax=argmax,
                ksize=ksize,
                strides=stride,
                padding=pad,
                include_batch_in_index=True,
            )

        return y, grad

    return pool(x)


# --------------------------------------------------------------------------------------------------
# Compilation
# --------------------------------------------------------------------------------------------------


def tensor_spec(shape, dtype):
    return tf.TensorSpec(shape=tuple(shape), dtype=dtype)


class CompiledFunction:
    """``fn`` traced once for its input signature (batch axes ``None``: batches do not retrace).

    Calls go straight to the traced (concrete) function: ``tf.function``'s own dispatch (binding
    the arguments, looking up the signature) cost ~0.4 ms per call on a 2-core CPU, as much as a
    small model's whole Jacobian.
    """

    def __init__(self, fn: Callable, input_signature, jit_compile: bool = False):
        self.function = tf.function(
            fn, input_signature=input_signature, jit_compile=jit_compile, autograph=False
        )
        self.concrete = self.function.get_concrete_function()
        # TensorFlow's own entry point behind ConcreteFunction.__call__ (private, so optional).
        self._call_flat = getattr(self.concrete, "_call_flat", None)

    def __call__(self, *args):
        flat = tf.nest.flatten(args)
        if self._call_flat is not None and all(isinstance(t, tf.Tensor) for t in flat):
            # Tensors already checked against the signature: skip the argument binding (another
            # ~0.1 ms). The public call below is the fallback, e.g. for NumPy arguments.
            return self._call_flat(flat, self.concrete.captured_inputs)
        return self.concrete(*args)

    def trace_count(self) -> int:
        return self.function.experimental_get_tracing_count()

    experimental_get_tracing_count = trace_count  # tf.function's own name for it


def compile_function(fn: Callable, input_signature, jit_compile: bool = False) -> CompiledFunction:
    """Traces ``fn`` once, now, for ``input_signature``; returns a callable (see CompiledFunction)."""
    return CompiledFunction(fn, input_signature, jit_compile)


# --------------------------------------------------------------------------------------------------
# Tensor utilities (inside compiled blocks)
# --------------------------------------------------------------------------------------------------


def one_hot(indices, depth: int, dtype):
    return tf.one_hot(indices, depth, dtype=dtype)


def stack(ts, axis):
    return tf.stack(ts, axis=axis)


def concat(ts, axis):
    return ts[0] if len(ts) == 1 else tf.concat(ts, axis=axis)


def reshape(t, shape):
    return tf.reshape(t, shape)


def transpose(t, perm):
    return tf.transpose(t, perm)


def transpose_first_two(t):
    perm = [1, 0] + list(range(2, len(t.shape)))
    return tf.transpose(t, perm)


def flatten_samples(t):
    """``(batch, *shape)`` -> ``(batch, prod(shape))``."""
    return tf.reshape(t, (tf.shape(t)[0], -1))


def gather_columns(t, indices):
    """``t: (batch, c, M)``, ``indices: (batch, m)`` -> ``(batch, c, m)``."""
    return tf.gather(t, indices, axis=2, batch_dims=1)


def repeat_samples(x, times):
    """``(batch, ...)`` -> ``(batch * times, ...)``, each sample repeated ``times`` times in a row."""
    return tf.repeat(x, times, axis=0)


def unit_tangent(column, n: int, sample_shape, like):
    """``e_column`` (of ``n`` elements) reshaped to ``sample_shape``, for every sample of ``like``:
    ``(batch, *sample_shape)``."""
    e = tf.one_hot(column, n, dtype=like.dtype)
    return tf.broadcast_to(tf.reshape(e, (1, *sample_shape)), tf.shape(like))


def rows_for_batch(rows: np.ndarray, like):
    """The same ``(m,)`` row indices for every sample of ``like``: ``(batch, m)`` int32."""
    m = len(rows)
    tiled = tf.tile(tf.constant(np.asarray(rows), dtype=tf.int32)[None], (tf.shape(like)[0], 1))
    return tf.ensure_shape(tiled, (None, m))


def arange(n: int):
    """``[0, 1, ..., n - 1]`` as an int32 tensor."""
    return tf.range(n, dtype=tf.int32)


def cast(t, dtype):
    return tf.cast(t, dtype)


def dim(t, axis: int):
    """The (possibly dynamic) size of ``t`` along ``axis``."""
    return tf.shape(t)[axis]


def shape_of(t):
    return tuple(t.shape)


def top_k(y2d, k: int):
    """``(values, indices)`` of the ``k`` largest entries of each row of ``(batch, M)``, largest
    first (the first index wins a tie)."""
    values, indices = tf.math.top_k(y2d, k=k, sorted=True)
    return values, indices


def nest_flatten(structure) -> list:
    return tf.nest.flatten(structure)


def nest_pack(structure, flat):
    return tf.nest.pack_sequence_as(structure, flat)


__all__ = [
    "set_threads",
    "FORWARD_RECURRENT",
    "FORWARD_TRAINING",
    "XLA_OPTIONAL",
    "arange",
    "call_model",
    "cast",
    "compile_function",
    "concat",
    "connected_outputs",
    "convert",
    "devices",
    "dim",
    "dtype_name",
    "flatten_samples",
    "gather_columns",
    "is_eager_tensor",
    "is_float_tensor",
    "is_floating",
    "is_symbolic",
    "jvp",
    "jvp_by_vjp",
    "max_pool_2d_routed",
    "model_state",
    "name",
    "nest_flatten",
    "nest_pack",
    "numpy_view",
    "one_hot",
    "parameter_vjp",
    "repeat_samples",
    "reshape",
    "rows_for_batch",
    "shape_of",
    "stack",
    "stop_gradient",
    "tensor_spec",
    "to_numpy",
    "top_k",
    "transpose",
    "transpose_first_two",
    "unit_tangent",
    "vectorized_map",
    "vjp",
    "with_custom_vjp",
]
