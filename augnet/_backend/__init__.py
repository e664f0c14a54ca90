"""The autodiff seam: one module per Keras backend, chosen from ``keras.backend.backend()`` at import.

Laid out like Keras's own ``keras/src/backend/``: ``augnet/_backend/tensorflow.py`` (and, as they
land, ``jax.py`` and ``torch.py``) each give the same small set of primitives, and this package
exposes the active one's, so that everything above the seam writes ``from augnet import _backend
as B; B.vjp(...)`` and never imports a framework. A backend without a module (``numpy`` and
``openvino`` always; ``jax``/``torch`` until their modules land) raises
:class:`UnsupportedBackendError` (an ``ImportError``) on import, naming the backend and what is
supported. A module that misses a primitive of the contract is refused the same way.

The contract
============

Conventions: "tensor" is the backend's array type (``tf.Tensor``, ``jax.Array``,
``torch.Tensor``); ``xs`` is a list of tensors; ``(b, ...)`` shapes have the batch axis first. A
"compiled block" is a function the engine hands to :func:`compile_function`; inside it every
primitive is traced, so it may only use tensors and the primitives below. Primitives marked
*eager* are only called outside compiled blocks.

Capabilities (constants):

- ``name``: ``"tensorflow"`` | ``"jax"`` | ``"torch"``.
- ``FORWARD_RECURRENT``: forward mode works through recurrent layers (LSTM/GRU/RNN) inside a
  compiled block. If ``False`` the engine refuses ``strategy="forward"`` on them and computes
  ``augnet.jvp`` by :func:`jvp_by_vjp`.
- ``FORWARD_TRAINING``: forward mode vectorised over tangents supports ``training=True``.
- ``XLA_OPTIONAL``: ``jit_compile`` is a real choice, so ``"loop_xla"`` differs from ``"loop"``
  (TensorFlow). JAX always compiles with XLA and sets it ``False``; ``strategy="auto"`` then does
  not time ``"loop_xla"`` separately.

The model as a pure function (how a Keras model becomes ``(state, xs) -> ys``):

- ``model_state(model) -> state``: the model's current variable values as a pytree, read *at
  every call* and passed as the first argument of every compiled block, so that weights changed
  later by ``fit`` are seen and no traced value is ever stored in a Keras variable. TensorFlow:
  ``()`` (``tf.function`` reads variables by reference). JAX: the values of ``model.variables``,
  one list, or ``{PACKED: [one flat buffer per dtype of the small variables, then each large
  variable's own array]}`` (jit's dispatch costs per argument; the buffers are reused while the
  variables hold the same arrays). torch: one
  list, the values of ``model.variables`` (the compiled graphs take the weights as arguments).
- ``call_model(model, state, inputs, training) -> outputs``: calls ``model`` on ``inputs`` (the
  model's own nesting) with no side effect: no BatchNorm statistic, seed state or any other
  variable may change, with ``training=True`` too. TensorFlow: ``model(inputs,
  training=False)``, or ``stateless_call`` for ``training=True``. JAX: ``model.stateless_call(
  *state, inputs, training=training)[0]`` (the new state is dropped). torch: the model's call
  inside a ``keras.StatelessScope`` holding the state (with ``training=True`` on a fork of torch's
  random state).
- ``parameter_vjp(model, variables, f) -> (y, vjp_fn)`` *eager*: ``y = f(state)`` with ``f`` the
  engine's pure function of the state; ``vjp_fn(u) -> [grad per variable]``, dense (zeros where
  unconnected), for ``variables`` a subset of ``model.trainable_variables``.

Autodiff (``f`` maps a list of tensors to one tensor, or to a list for
:func:`connected_outputs`/:func:`with_custom_vjp`):

- ``vjp(f, xs) -> (y, vjp_fn)``: one forward pass; ``vjp_fn(u)`` with ``u`` shaped like ``y``
  returns ``[uᵀ·∂y/∂x for x in xs]``, zeros (never ``None``) where ``y`` does not depend on ``x``.
  ``vjp_fn`` may be called any number of times (the Jacobian's loop calls it once per output).
- ``jvp(f, xs, tangents) -> (y, y_dot)``: forward mode; a tangent of ``None`` leaves that input
  constant; ``y_dot`` shaped like ``y``, zeros where unconnected.
- ``jvp_by_vjp(f, xs, tangents) -> (y, y_dot)``: the same product in reverse mode (the double-VJP
  trick ``J·v = ∂/∂u (uᵀJ·v)``), which respects custom derivative rules (none of the three
  frameworks runs a custom VJP in forward mode).
- ``vectorized_map(fn, elems)``: ``fn`` applied to every row ``elems[i]`` in one vectorised pass
  (``tf.vectorized_map``/``jax.vmap``/``torch.func.vmap``), results (a tensor or a list of
  tensors) stacked along a new first axis.
- ``with_custom_vjp(forward, xs, rule_vjp) -> y``: ``y = forward(xs)`` whose reverse-mode
  derivative is ``rule_vjp(xs, y, upstream) -> [cotangent or None per x]`` (``upstream`` has
  ``y``'s structure); the engine wraps a layer's call with it to apply a derivative rule.
  (``tf.custom_gradient`` / ``jax.custom_vjp`` / ``torch.autograd.Function``.)
- ``connected_outputs(f, xs) -> (y, flags)`` *eager*: one ``bool`` per leaf of ``y``: ``True``
  where that floating output has a gradient path to any ``x``. "No path" is the framework's
  structural answer (TensorFlow's ``None`` gradient; a JAX symbolic zero / jaxpr dependency; a
  torch output with no ``grad_fn``), not a numerically zero gradient: ``round`` or a cast to an
  integer type cuts the path, ``relu`` at a kink does not. Used by the gradient-path check
  (``augnet.GradientPathError``) and by ``augnet info``.
- ``stop_gradient(t)``.
- ``max_pool_2d_routed(x, pool_size, strides, padding)`` or ``None``: an optional optimisation of
  the reverse loop (max pooling whose backward passes reuse the forward pass's maxima). A backend
  declines it by setting it to ``None``; the engine then leaves pooling layers alone.

Compilation:

- ``tensor_spec(shape, dtype)``: an input-signature entry, ``None`` for a dynamic axis.
- ``compile_function(fn, input_signature, jit_compile=False) -> compiled``: ``fn`` compiled once
  per input signature (``tf.function``/``jax.jit``/torch eager or ``torch.compile``); the
  signature is a list (one entry per positional argument) of nests of :func:`tensor_spec`, with
  the model state's entry first where the block takes one. ``compiled(*args)`` takes tensors (or
  NumPy arrays) and returns tensors; ``compiled.trace_count()`` says how many times it traced or
  compiled (the engine's "no retrace" tests read it). The batch axis is dynamic: a backend that
  specialises on shapes (``jax.jit``) decides how to avoid recompiling for every batch size.
- ``is_symbolic(*values) -> bool``: ``True`` while the caller itself is tracing (inside a
  ``tf.function``, or JAX tracers among ``values``): the engine then returns backend tensors
  from one uncompiled pass instead of NumPy arrays.

Conversion, dtypes, devices:

- ``convert(x, dtype)``: an array-like or tensor to a tensor of ``dtype`` (cast if needed), on the
  backend's default device; ``to_numpy(t)``: a NumPy array (a copy the caller owns);
  ``numpy_view(t)``: a zero-copy read-only view, valid while ``t`` lives (the engine copies out
  of it at once); ``is_eager_tensor(t)``; ``is_float_tensor(t)``; ``dtype_name(dtype) -> str``
  (``"float32"``); ``is_floating(dtype)``; ``devices() -> list[str]`` (e.g. ``["CPU:0"]``);
  ``set_threads(n)``: limits the framework's CPU threads where it still can (no error once fixed).

Tensor utilities (inside compiled blocks): ``one_hot(indices, depth, dtype)``, ``stack(ts,
axis)``, ``concat(ts, axis)``, ``reshape(t, shape)``, ``transpose(t, perm)``,
``transpose_first_two(t)``, ``flatten_samples(t)`` ``(b, *s) -> (b, prod(s))``,
``gather_columns(t, idx)`` ``(b, c, M), (b, m) -> (b, c, m)``, ``repeat_samples(x, times)``,
``unit_tangent(column, n, sample_shape, like) -> (b, *sample_shape)``, ``rows_for_batch(rows,
like) -> (b, m)`` int32, ``arange(n)`` int32, ``cast(t, dtype)``, ``dim(t, axis)`` (possibly
dynamic), ``shape_of(t) -> tuple`` (static, ``None`` where unknown), ``top_k(y, k) -> (values,
indices)`` largest first, ``nest_flatten(s)``, ``nest_pack(s, flat)``.

How a backend plugs in: write ``augnet/_backend/<name>.py`` with every name above in its
``__all__`` (``tensorflow.py`` is the worked example), add its import below, and run the numeric
suite with ``KERAS_BACKEND=<name>`` (see tests/test_backends.py).
"""

from __future__ import annotations

import importlib.util

import keras

SUPPORTED = ("tensorflow", "jax", "torch")  # the Keras backends augnet is built for

# Every backend module provides these (its __all__); checked at import.
CONTRACT = (
    # capabilities
    "name",
    "FORWARD_RECURRENT",
    "FORWARD_TRAINING",
    "XLA_OPTIONAL",
    # the model as a pure function
    "model_state",
    "call_model",
    "parameter_vjp",
    # autodiff
    "vjp",
    "jvp",
    "jvp_by_vjp",
    "vectorized_map",
    "with_custom_vjp",
    "connected_outputs",
    "stop_gradient",
    "max_pool_2d_routed",
    # compilation
    "tensor_spec",
    "compile_function",
    "is_symbolic",
    # conversion, dtypes, devices
    "convert",
    "to_numpy",
    "numpy_view",
    "is_eager_tensor",
    "is_float_tensor",
    "dtype_name",
    "is_floating",
    "devices",
    "set_threads",
    # tensor utilities
    "one_hot",
    "stack",
    "concat",
    "reshape",
    "transpose",
    "transpose_first_two",
    "flatten_samples",
    "gather_columns",
    "repeat_samples",
    "unit_tangent",
    "rows_for_batch",
    "arange",
    "cast",
    "dim",
    "shape_of",
    "top_k",
    "nest_flatten",
    "nest_pack",
)


class UnsupportedBackendError(ImportError):
    """Keras runs on a backend augnet has no seam module for (or an incomplete one)."""


def available_backends() -> list[str]:
    """The Keras backends with a seam module in this installation of augnet."""
    return [b for b in SUPPORTED if importlib.util.find_spec(f"{__name__}.{b}") is not None]


def _unsupported(backend: str) -> UnsupportedBackendError:
    have = available_backends()
    if backend in SUPPORTED:
        why = f"augnet's {backend} backend is not available in this version"
    else:
        why = f"the {backend!r} backend has no automatic differentiation augnet can use"
    return UnsupportedBackendError(
        f"augnet cannot compute Jacobians with the Keras backend {backend!r}: {why}. Supported "
        f"backends: {', '.join(have)}. Set the environment variable KERAS_BACKEND to one of them "
        f"before Keras is imported (e.g. KERAS_BACKEND={have[0]} python ...)."
    )


_BACKEND = keras.backend.backend()
if _BACKEND not in SUPPORTED or importlib.util.find_spec(f"{__name__}.{_BACKEND}") is None:
    raise _unsupported(_BACKEND)
if _BACKEND == "tensorflow":
    from augnet._backend.tensorflow import *  # noqa: E402,F403
elif _BACKEND == "jax":
    from augnet._backend.jax import *  # noqa: E402,F403
elif _BACKEND == "torch":
    from augnet._backend.torch import *  # noqa: E402,F403


def _no_wait(values):
    return values


def _run(fn, *args):
    return fn(*args)


def _convert_argument(x, dtype):
    return convert(x, dtype)  # noqa: F405 (the backend module's)


# Optional primitives, with the default a backend that does not define them gets:
# - ``SHAPE_SPECIALIZED``: compiled functions specialise on argument shapes (``jax.jit``), so the
#   engine pads a pass's batch to a size already compiled instead of compiling for every batch
#   size (augnet/_engine/padding.py). ``False``: the batch axis is dynamic (``tf.function`` with
#   ``None`` batch axes, torch eager).
# - ``wait(values) -> values``: blocks until asynchronously dispatched results are computed
#   (``jax.block_until_ready``), so that a call can be timed; the default returns them as they are.
# - ``as_argument(x, dtype)``: ``x`` (the caller's array) in the form a compiled function takes
#   fastest, cast to ``dtype``: a NumPy array on JAX (jit's C++ dispatch moves it to the device
#   for ~3 µs, where ``jax.device_put`` costs ~60 µs of Python); by default :func:`convert`.
# - ``STACK_OUTPUTS``: every output of a compiled function has a cost of its own (JAX: ~7 µs per
#   output buffer, measured on the MLP benchmark), so the reverse loop stacks its c backward passes
#   into one array inside the compiled function; ``False`` (TensorFlow): it returns them one by
#   one and the engine copies each straight into the result (stacking in the graph cost a copy).
# - ``CONSTANT_SEEDS``: a reverse block of every output in order takes no ``sel`` argument and
#   makes its seeds constants of the graph (JAX: one jit argument fewer, ~1.6 µs of dispatch each,
#   and a one-hot the compiler folds: ~5 µs of the MLP's ~60 µs compiled call). ``False``
#   (TensorFlow, torch): the seeds stay an argument (with constant seeds augnet was 1.57x and
#   1.67x the fastest on the headline CNN at batch 1, against 1.00x and 0.99x before).
# - ``run_abstractly(fn, *args)``: runs ``fn`` where only the structure of the computation matters
#   (the gradient-path check, which asks :func:`connected_outputs` of every layer): JAX traces it
#   (``jax.eval_shape``) instead of executing it op by op, which compiles every operation on first
#   use (MobileNetV2: 14 s executed, ~1.5 s traced). By default ``fn(*args)``.
OPTIONAL = {
    "SHAPE_SPECIALIZED": False,
    "STACK_OUTPUTS": False,
    "CONSTANT_SEEDS": False,
    "wait": _no_wait,
    "as_argument": _convert_argument,
    "run_abstractly": _run,
}
for _name, _default in OPTIONAL.items():
    globals().setdefault(_name, _default)

_missing = [n for n in CONTRACT if n not in globals()]
if _missing:
    raise UnsupportedBackendError(
        f"augnet/_backend/{_BACKEND}.py is incomplete: it does not define {_missing} (see the "
        "contract in augnet/_backend/__init__.py)."
    )
