"""The autodiff seam: the only place that knows TensorFlow's GradientTape and ForwardAccumulator.

Everything the Jacobian engine needs from a framework is here, in JAX-like terms:

- ``vjp(f, xs)`` -> ``(y, vjp_fn)``: one forward pass, then any number of vector-Jacobian products.
- ``jvp(f, xs, tangents)`` -> ``(y, y_dot)``: a Jacobian-vector product (forward mode).
- ``vectorized_map(fn, elems)``: apply ``fn`` to every row of ``elems`` in one vectorised pass
  (``pfor``), stacking the results.
- ``compile_function(fn, input_signature, jit_compile)``: trace once per input signature.
- ``max_pool_2d_routed``: max pooling whose backward passes reuse the forward pass's maxima.
- ``to_numpy``, ``convert``, ``is_symbolic``, ``one_hot``, ``gather_rows``: small tensor utilities.

A JAX or PyTorch backend is a second module with the same functions (``jax.vjp``/``jax.jvp``/
``jax.vmap``/``jax.jit``; ``torch.func.vjp``/``jvp``/``vmap``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import tensorflow as tf

name = "tensorflow"


def convert(x, dtype) -> tf.Tensor:
    """Converts an array-like to a tensor of ``dtype`` (a cast when the dtype differs)."""
    if isinstance(x, tf.Tensor | tf.Variable):
        t = tf.convert_to_tensor(x)
    else:
        t = tf.convert_to_tensor(np.asarray(x) if not hasattr(x, "numpy") else x)
    if t.dtype != tf.as_dtype(dtype):
        t = tf.cast(t, dtype)
    return t


def dtype_name(dtype) -> str:
    return tf.as_dtype(dtype).name


def is_floating(dtype) -> bool:
    return tf.as_dtype(dtype).is_floating


def is_symbolic() -> bool:
    """True while being traced inside ``tf.function`` (results are then tensors, not arrays)."""
    return not tf.executing_eagerly()


def is_eager_tensor(t) -> bool:
    return isinstance(t, tf.Tensor) and hasattr(t, "numpy")


def numpy_view(t) -> np.ndarray:
    """A read-only NumPy view of an eager tensor's buffer, without a copy: valid only while the
    tensor itself is referenced (copy out of it before dropping the tensor)."""
    return np.asarray(t)


def to_numpy(t) -> np.ndarray:
    return t.numpy() if hasattr(t, "numpy") else np.asarray(t)


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


def jvp(f: Callable[[list], tf.Tensor], xs: Sequence[tf.Tensor], tangents: Sequence[tf.Tensor]):
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


def vectorized_map(fn: Callable, elems: tf.Tensor):
    """Applies ``fn`` to every row of ``elems`` in one vectorised pass (pfor), stacking the results
    along a new first axis."""
    return tf.vectorized_map(fn, elems, fallback_to_while_loop=True)


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

    def experimental_get_tracing_count(self) -> int:
        return self.function.experimental_get_tracing_count()


def compile_function(fn: Callable, input_signature, jit_compile: bool = False) -> CompiledFunction:
    """Traces ``fn`` once, now, for ``input_signature``; returns a callable (see CompiledFunction)."""
    return CompiledFunction(fn, input_signature, jit_compile)


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


def tensor_spec(shape, dtype):
    return tf.TensorSpec(shape=tuple(shape), dtype=dtype)


def one_hot(indices, depth: int, dtype):
    return tf.one_hot(indices, depth, dtype=dtype)


def stack(ts, axis):
    return tf.stack(ts, axis=axis)


def reshape(t, shape):
    return tf.reshape(t, shape)


def flatten_samples(t):
    """``(batch, *shape)`` -> ``(batch, prod(shape))``."""
    return tf.reshape(t, (tf.shape(t)[0], -1))


def concat(ts, axis):
    return ts[0] if len(ts) == 1 else tf.concat(ts, axis=axis)


def transpose_first_two(t):
    perm = [1, 0] + list(range(2, len(t.shape)))
    return tf.transpose(t, perm)


def gather_columns(t, indices):
    """``t: (batch, c, M)``, ``indices: (batch, m)`` -> ``(batch, c, m)``."""
    return tf.gather(t, indices, axis=2, batch_dims=1)


def repeat_samples(x, times: int):
    """``(batch, ...)`` -> ``(batch * times, ...)``, each sample repeated ``times`` times in a row."""
    return tf.repeat(x, times, axis=0)


def unit_tangent(column, n: int, sample_shape, like):
    """``e_column`` (of ``n`` elements) reshaped to ``sample_shape``, for every sample of ``like``:
    ``(batch, *sample_shape)``."""
    e = tf.one_hot(column, n, dtype=like.dtype)
    return tf.broadcast_to(tf.reshape(e, (1, *sample_shape)), tf.shape(like))


def dim(t, axis: int):
    """The (possibly dynamic) size of ``t`` along ``axis``."""
    return tf.shape(t)[axis]


def transpose(t, perm):
    return tf.transpose(t, perm)


def top_k(y2d, k: int):
    values, indices = tf.math.top_k(y2d, k=k, sorted=True)
    return values, indices


def shape_of(t):
    return tuple(t.shape)


# --------------------------------------------------------------------------------------------------
# Primitives for custom derivative rules, connectivity checks and parameter gradients
# (used by augnet._derivatives, augnet._backward and augnet._analysis)
# --------------------------------------------------------------------------------------------------


def is_float_tensor(t) -> bool:
    return tf.is_tensor(t) and t.dtype.is_floating


def nest_flatten(structure) -> list:
    return tf.nest.flatten(structure)


def nest_pack(structure, flat):
    return tf.nest.pack_sequence_as(structure, flat)


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


def gradient_connected(f: Callable, xs: Sequence[tf.Tensor]):
    """Runs ``f(xs)`` on a tape; returns ``(y, connected)`` where ``connected`` says whether any
    floating output of ``y`` has a gradient path to any of ``xs`` (``None`` gradients = no path)."""
    xs = list(xs)
    with tf.GradientTape(watch_accessed_variables=False) as tape:
        for x in xs:
            tape.watch(x)
        y = f(xs)
    outs = [o for o in tf.nest.flatten(y) if is_float_tensor(o)]
    if not outs:
        return y, False
    grads = tape.gradient(outs, xs, unconnected_gradients=tf.UnconnectedGradients.NONE)
    return y, any(g is not None for g in grads)


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


def variable_vjp(f: Callable[[], tf.Tensor], variables: Sequence):
    """One forward pass of ``f()`` recorded for gradients with respect to ``variables``.

    Returns ``(y, vjp_fn)``; ``vjp_fn(cotangent)`` gives dense gradients (zeros where unconnected).
    """
    variables = list(variables)
    with tf.GradientTape(persistent=True, watch_accessed_variables=False) as tape:
        for v in variables:
            tape.watch(v)
        y = f()

    def vjp_fn(cotangent):
        grads = tape.gradient(
            y,
            variables,
            output_gradients=cotangent,
            unconnected_gradients=tf.UnconnectedGradients.ZERO,
        )
        return [tf.convert_to_tensor(g) for g in grads]

    return y, vjp_fn


def stop_gradient(t):
    return tf.stop_gradient(t)
