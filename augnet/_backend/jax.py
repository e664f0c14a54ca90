"""The JAX backend of the autodiff seam: jax.vjp, jax.jvp, jax.vmap, jax.jit, jax.custom_vjp.

Implements every function of the contract in ``augnet/_backend/__init__.py`` (read it first); only
what is particular to JAX is said here:

- **The model is a pure function of its state.** :func:`model_state` reads the values of
  ``model.variables`` (one flat list, in that order; the list of variables is remembered per
  model; its small variables packed into one buffer per dtype, see ``PACK_VAR_LIMIT``) at every
  call, and every compiled block takes them as its first argument: weights
  changed later by ``fit`` are seen without compiling again, and no traced value is ever stored
  in a Keras variable. :func:`call_model` splits them into ``(trainable, non_trainable)`` by the
  variables' current flags and calls ``model.stateless_call``; the new state it returns is
  dropped, so no BatchNorm statistic or seed ever moves (``training=True`` included).
- **jit specialises on shapes.** :func:`compile_function` is ``jax.jit``; it compiles once per
  shape of its arguments. The engine keeps the batch axis from costing a compile per batch size
  (``SHAPE_SPECIALIZED``: a pass of a new, smaller batch size is padded to one already compiled,
  see ``augnet/_engine/padding.py``).
- **Everything is XLA**: ``jit_compile`` is not a separate choice (``XLA_OPTIONAL = False``).
- Forward mode (``jax.jvp``) works through ``lax.scan`` (recurrent layers) and with
  ``training=True`` (``FORWARD_RECURRENT``/``FORWARD_TRAINING``); ``jax.custom_vjp`` rules act in
  reverse mode only, as on every backend.
- **float64**: JAX computes float64 only with ``JAX_ENABLE_X64=1`` (``jax_enable_x64``) set before
  JAX starts; without it every float64 array silently becomes float32. :func:`convert` refuses a
  float64 request then, with the way out. Keras 3.15's type promotion maps float64 to float32 on
  every backend but TensorFlow, so on JAX ``keras.ops.mean`` (global pooling), ``tanh``, ``sin``...
  of float64 tensors compute in float32; :func:`call_model` lifts that mapping while it runs a
  model on float64 inputs (``augnet/_backend/_float64.py``, shared with torch), so a float64
  model is computed, and differentiated, in float64.
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections.abc import Callable, Sequence

import jax
import jax.extend
import jax.numpy as jnp
import keras
import numpy as np
from keras.src.backend.common.stateless_scope import in_stateless_scope as _in_stateless_scope

from augnet._backend._float64 import any_float64, float64_compute

name = "jax"

# Capabilities the engine asks about (see the contract).
FORWARD_RECURRENT = True  # jax.jvp goes through lax.scan (Keras's RNN loop on JAX)
FORWARD_TRAINING = True  # vmap over tangents works with training-mode layers
XLA_OPTIONAL = False  # everything is compiled by XLA: "loop_xla" is "loop"
SHAPE_SPECIALIZED = True  # jax.jit compiles once per shape: the engine pads the batch axis
STACK_OUTPUTS = True  # each output buffer of a jitted call costs ~7 µs: one stacked array
CONSTANT_SEEDS = True  # every output in order: seeds as graph constants (see the contract)

_Tracer = jax.core.Tracer
_Literal = jax.extend.core.Literal  # a constant in a jaxpr (never a live variable)


def _x64_enabled() -> bool:
    return bool(jax.config.jax_enable_x64)


def _check_dtype(dtype) -> np.dtype:
    dt = jnp.dtype(dtype)
    if dt.itemsize == 8 and dt.kind in "fc" and not _x64_enabled():
        raise ValueError(
            f"augnet was asked for a {dt.name} Jacobian on JAX, but JAX computes in 64 bits only "
            "when the environment variable JAX_ENABLE_X64=1 is set before JAX is imported "
            "(without it every float64 array silently becomes float32). Set it (e.g. "
            "JAX_ENABLE_X64=1 KERAS_BACKEND=jax python ...), or use a float32 model and input."
        )
    return dt


# --------------------------------------------------------------------------------------------------
# Conversion, dtypes, devices
# --------------------------------------------------------------------------------------------------


def convert(x, dtype):
    """An array-like, a Keras variable or a JAX array as a JAX array of ``dtype`` (cast if needed),
    on JAX's default device (a GPU when JAX sees one)."""
    dt = _check_dtype(dtype)
    if isinstance(x, jax.Array | _Tracer):
        return x if x.dtype == dt else x.astype(dt)
    if isinstance(x, keras.Variable):
        return convert(x.value, dt)
    a = np.asarray(x)
    if a.dtype != dt:
        a = a.astype(dt)
    return jax.device_put(a)


def as_argument(x, dtype):
    """The caller's array as a compiled function takes it fastest: NumPy stays NumPy (cast on the
    host if needed; jit's dispatch moves it to the device), a JAX array stays one."""
    if x.dtype == dtype:  # (the engine only passes NumPy arrays and JAX arrays here)
        return x
    if isinstance(x, np.ndarray):
        return x.astype(dtype)
    return convert(x, dtype)


# How long a fetch polls a result that is still being computed before it blocks (seconds).
# JAX dispatches asynchronously: a computation runs on a runtime thread while the caller goes on,
# and ``np.asarray`` of its result puts the caller to sleep until it is done; being woken again
# costs ~10 µs, a third of a small model's whole Jacobian on a 2-core CPU (the MLP of
# bench_jacobian.py: 48 µs per call back to back in pure JAX, 39 µs when the caller polls
# ``is_ready`` instead; benchmarks/bench_jax_dispatch.py). Polling a little first takes a result
# that is ready within SPIN_S without that cost; a longer computation is waited for by blocking
# after at most SPIN_S of polling (50 µs of one core, under 5% of a 1 ms computation).
SPIN_S = 50e-6
_clock = time.perf_counter


def poll(ready: Callable[[], bool], seconds: float) -> bool:
    """Calls ``ready()`` until it is true or ``seconds`` have passed; returns its last answer."""
    end = _clock() + seconds
    while not ready():
        if _clock() >= end:
            return False
    return True


def _await(t) -> None:
    """Polls a JAX array being computed for at most ``SPIN_S`` (see there) before the caller
    fetches it (and blocks, if it is still not ready)."""
    if isinstance(t, jax.Array) and not t.is_ready():
        poll(t.is_ready, SPIN_S)


def to_numpy(t) -> np.ndarray:
    """A NumPy copy the caller owns (writable), fetched from the device if needed."""
    _await(t)
    return np.array(t)


def numpy_view(t) -> np.ndarray:
    """A read-only NumPy view of ``t`` (zero-copy on CPU), valid while ``t`` lives."""
    _await(t)
    return np.asarray(t)


def is_eager_tensor(t) -> bool:
    return isinstance(t, jax.Array) and not isinstance(t, _Tracer)


def is_float_tensor(t) -> bool:
    return isinstance(t, jax.Array | _Tracer) and jnp.issubdtype(t.dtype, jnp.floating)


def dtype_name(dtype) -> str:
    return jnp.dtype(dtype).name


def is_floating(dtype) -> bool:
    return bool(jnp.issubdtype(jnp.dtype(dtype), jnp.floating))


def is_symbolic(*values) -> bool:
    """True while a caller traces (JAX tracers among ``values``): results are then JAX arrays."""
    for v in values:
        if isinstance(v, _Tracer):
            return True
        if not isinstance(v, np.ndarray | jax.Array) and any(
            isinstance(leaf, _Tracer) for leaf in jax.tree_util.tree_leaves(v)
        ):
            return True
    return False


def devices() -> list[str]:
    """The devices JAX computes on, default first, e.g. ``["CPU:0"]`` or ``["GPU:0", "GPU:1"]``."""
    return [f"{d.platform.upper()}:{d.id}" for d in jax.devices()]


def set_threads(n: int) -> None:
    """Limits XLA's CPU threads where it still can: one thread for ``n == 1`` (XLA has no
    finer setting), set in ``XLA_FLAGS`` before JAX starts its CPU client; once it has started,
    its setting stays (no error)."""
    from jax._src import xla_bridge

    if n != 1 or getattr(xla_bridge, "_backends", None):  # (started: the flags were read)
        return
    flags = os.environ.get("XLA_FLAGS", "").split()
    if "--xla_cpu_multi_thread_eigen=false" not in flags:
        os.environ["XLA_FLAGS"] = " ".join([*flags, "--xla_cpu_multi_thread_eigen=false"])


def wait(values):
    """Blocks until ``values`` (a nest of arrays) are computed (JAX dispatches asynchronously)."""
    return jax.block_until_ready(values)


# --------------------------------------------------------------------------------------------------
# The model as a pure function
# --------------------------------------------------------------------------------------------------

# model -> its variables (model.variables, in order), remembered: reading the list walks every
# layer (~8 µs for a 4-layer MLP, ~0.1 ms for MobileNetV2), as much as a small Jacobian.
_VARIABLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _variables(model) -> list:
    found = _VARIABLES.get(model)
    if found is None:
        found = list(model.variables)
        if getattr(model, "built", True):  # an unbuilt model has no variables yet
            _VARIABLES[model] = found
    return found


# Packing. jit's dispatch costs ~1.6 µs per array argument (measured: the 4-64-32-16-2 MLP's 8
# weight arrays as 8 arguments 69-71 µs per Jacobian, packed into one buffer 57-62 µs, the weights
# closed over as constants 55-57), so the small variables of a model go to the compiled blocks as
# one flat buffer per dtype, sliced back into the variables inside the compiled function:
# ``{PACKED: [buffer per dtype, ..., then each large variable's own array]}``. A variable above
# ``PACK_VAR_LIMIT`` bytes travels as its own argument: a slice of a packed buffer that feeds a
# matrix product or a convolution is copied out of the buffer on every call (~0.1 ms per MB:
# packing the tall case's 4 MB kernel made its Jacobian ~25% slower), which is more than the
# argument it saves once the variable is larger than a few KB. The buffers are made once and
# reused while every variable still holds the same array (``fit`` and ``assign`` replace it:
# packed again on the next call), so the small variables are held twice (a few KB each).
PACKED = "augnet_packed_state"
PACK_VAR_LIMIT = 16 * 2**10


def _is_small(a) -> bool:
    """Whether variable value ``a`` goes into a packed buffer (see ``PACK_VAR_LIMIT``)."""
    return a.size * a.dtype.itemsize <= PACK_VAR_LIMIT


class _Packing:
    """One model's packed state: the arrays it was made from and the buffers made of them."""

    __slots__ = ("layout", "originals", "buffers")

    def __init__(self, originals: list):
        groups: dict[str, int] = {}
        sizes: list[int] = []
        small = [_is_small(a) for a in originals]
        for a, packed in zip(originals, small):
            if packed and a.dtype.name not in groups:
                groups[a.dtype.name] = len(groups)
                sizes.append(0)
        layout = []  # per variable: (slot in the buffers, start or None for a whole array, ...)
        large = []
        for a, packed in zip(originals, small):
            if packed:
                g = groups[a.dtype.name]
                layout.append((g, sizes[g], int(a.size), tuple(a.shape)))
                sizes[g] += int(a.size)
            else:
                layout.append((len(groups) + len(large), None, 0, ()))
                large.append(a)
        parts: list[list] = [[] for _ in sizes]
        with jax.ensure_compile_time_eval():  # concrete even if called while a trace is open
            for a, packed in zip(originals, small):
                if packed:
                    parts[groups[a.dtype.name]].append(jnp.ravel(a))
            buffers = [p[0] if len(p) == 1 else jnp.concatenate(p) for p in parts]
        self.buffers = buffers + large
        self.layout = tuple(layout)
        self.originals = tuple(originals)

    def unpack(self, buffers: list) -> list:
        """The variables' values from ``buffers`` (these buffers, or the tracers standing for
        them inside a compiled block)."""
        if not isinstance(buffers[0], _Tracer) and all(
            b is m for b, m in zip(buffers, self.buffers)
        ):
            return list(self.originals)  # eager: the arrays themselves, no slicing
        return [
            buffers[slot] if start is None else buffers[slot][start : start + size].reshape(shape)
            for slot, start, size, shape in self.layout
        ]


# model -> its _Packing (the latest)
_PACKINGS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _packable(values: list) -> bool:
    if not values or any(isinstance(a, _Tracer) or not isinstance(a, jax.Array) for a in values):
        return False
    if sum(map(_is_small, values)) < 2:
        return False  # nothing to gain: at most one small variable
    devices = {d for a in values for d in a.devices()}
    return len(devices) == 1


def model_state(model):
    """The values of ``model.variables`` now, in that order (trainable or not: the split is made
    at trace time from the variables' flags, so freezing a layer later changes nothing here):
    ``{PACKED: [one buffer per dtype of the small variables, then the large ones]}`` (see
    ``PACK_VAR_LIMIT``), or a list where there is nothing to pack."""
    variables = _variables(model)
    if _in_stateless_scope():  # inside a caller's stateless_call: the scope's values
        return [v.value for v in variables]
    packing = _PACKINGS.get(model)
    if packing is not None:
        originals = packing.originals
        if len(originals) == len(variables):
            for v, a in zip(variables, originals):
                if getattr(v, "_value", None) is not a:
                    break
            else:
                return {PACKED: packing.buffers}
    out = []
    for v in variables:
        value = getattr(v, "_value", None)  # the stored array (``.value`` costs ~1 µs more each)
        out.append(v.value if value is None else value)
    if getattr(model, "built", True) and _packable(out):
        packing = _PACKINGS[model] = _Packing(out)
        return {PACKED: packing.buffers}
    return out


def _unpacked(model, state) -> list:
    """``state`` as one value per variable (a packed state is sliced back)."""
    if isinstance(state, dict):
        packing = _PACKINGS.get(model)
        if packing is None:  # pragma: no cover (a packed state comes from model_state)
            raise AssertionError("augnet: a packed state for a model that was never packed")
        return packing.unpack(state[PACKED])
    return state


def _split_state(model, state):
    state = _unpacked(model, state)
    variables = _variables(model)
    if len(state) != len(variables):
        raise ValueError(
            f"augnet: the state of model {getattr(model, 'name', '')!r} has {len(state)} values "
            f"but the model has {len(variables)} variables; was the model changed (layers added) "
            "after augnet first used it? Build the model completely before computing Jacobians."
        )
    position = {id(v): i for i, v in enumerate(variables)}
    try:
        trainable = [state[position[id(v)]] for v in model.trainable_variables]
        non_trainable = [state[position[id(v)]] for v in model.non_trainable_variables]
    except KeyError:  # a variable created after the list was remembered
        _VARIABLES.pop(model, None)
        raise ValueError(
            f"augnet: model {getattr(model, 'name', '')!r} has variables it did not have when "
            "augnet first used it (layers added after building?). Build the model completely "
            "before computing Jacobians, or rebuild it."
        ) from None
    return trainable, non_trainable


def call_model(model, state, inputs, training: bool):
    """``model.stateless_call(trainable, non_trainable, inputs, training=training)[0]``: the new
    state is dropped (no BatchNorm statistic, seed or other variable changes)."""
    if not getattr(model, "built", True):
        if getattr(_ABSTRACT, "on", False):
            raise _NotBuilt(model)
        if is_symbolic(inputs):
            raise ValueError(
                f"Model {getattr(model, 'name', '')!r} is not built: call it once on a batch "
                "(or build it) before computing Jacobians inside a traced function."
            )
        model(inputs, training=False)  # builds it (creates its variables): no other change
        _VARIABLES.pop(model, None)
        state = model_state(model)
    elif len(state) == 0 and _variables(model):
        state = model_state(model)
    trainable, non_trainable = _split_state(model, state)
    # As Keras's own JAX trainer: `training` only for a call that takes it (stateless_call passes
    # its keyword arguments to `call` itself, not through `__call__`, which would filter them).
    kwargs = {"training": training} if getattr(model, "_call_has_training_arg", True) else {}
    # A float64 model in float64: Keras 3.15 would compute `mean` (global pooling), `tanh`... of
    # float64 tensors in float32 on JAX (augnet/_backend/_float64.py); read when traced.
    with float64_compute(any_float64(inputs)):
        return model.stateless_call(trainable, non_trainable, inputs, **kwargs)[0]


def parameter_vjp(model, variables: Sequence, f: Callable):
    """One forward pass of ``f(state)`` recorded for gradients w.r.t. ``variables`` (a subset of
    the model's trainable variables). Returns ``(y, vjp_fn)``; ``vjp_fn(u)`` gives one dense
    gradient per variable (zeros where unconnected)."""
    state = _unpacked(model, model_state(model))
    position = {id(v): i for i, v in enumerate(_variables(model))}
    try:
        where = [position[id(v)] for v in variables]
    except KeyError:
        raise ValueError("`variables` must be variables of the model.") from None

    def g(selected):
        full = list(state)
        for i, s in zip(where, selected):
            full[i] = s
        return f(full)

    y, fn = jax.vjp(g, [state[i] for i in where])
    return y, lambda u: list(fn(u)[0])


# --------------------------------------------------------------------------------------------------
# Autodiff
# --------------------------------------------------------------------------------------------------


def vjp(f: Callable[[list], jax.Array], xs: Sequence):
    """``(y, vjp_fn)``: ``vjp_fn(u)`` returns ``[uᵀ·∂y/∂x for x in xs]`` (zeros where unconnected);
    callable any number of times."""
    y, fn = jax.vjp(f, list(xs))
    return y, lambda u: list(fn(u)[0])


def _tangents(xs, tangents):
    return [jnp.zeros_like(x) if t is None else convert(t, x.dtype) for x, t in zip(xs, tangents)]


def jvp(f: Callable[[list], jax.Array], xs: Sequence, tangents: Sequence):
    """Forward mode: ``(y, ∂y/∂x · tangents)``; a tangent of ``None`` holds that input constant."""
    xs = list(xs)
    return jax.jvp(f, (xs,), (_tangents(xs, tangents),))


def jvp_by_vjp(f: Callable[[list], jax.Array], xs: Sequence, tangents: Sequence):
    """``J·v`` in reverse mode (the double-VJP trick ``J·v = ∂/∂u (uᵀJ·v)``), which respects
    ``jax.custom_vjp`` derivative rules (forward mode does not run them)."""
    xs = list(xs)
    y, fn = jax.vjp(f, xs)
    _, transpose = jax.vjp(lambda u: fn(u)[0], jnp.zeros_like(y))
    return y, transpose(_tangents(xs, tangents))[0]


def vectorized_map(fn: Callable, elems):
    """``fn`` over the rows of ``elems`` in one vectorised pass (``jax.vmap``), stacked on axis 0."""
    return jax.vmap(fn)(elems)


def _zero_cotangent(a):
    if jnp.issubdtype(a.dtype, jnp.inexact):
        return jnp.zeros_like(a)
    return np.zeros(np.shape(a), dtype=jax.dtypes.float0)  # integers have no tangent space


def with_custom_vjp(forward: Callable, xs: Sequence, rule_vjp: Callable):
    """``forward(xs)`` whose reverse-mode derivative is ``rule_vjp(xs, y, upstream)``.

    ``forward`` usually closes over the layer's variables, which are tracers under
    ``stateless_call``: ``jax.closure_convert`` turns them into explicit arguments that get zero
    cotangents (the contract: no gradient to variables through a rule, as with
    ``tf.custom_gradient``).
    """
    xs = list(xs)
    n = len(xs)
    converted, consts = jax.closure_convert(lambda *a: forward(list(a)), *xs)

    @jax.custom_vjp
    def wrapped(*args):
        return converted(*args)

    def fwd(*args):
        y = converted(*args)
        return y, (args, y)

    def bwd(res, upstream):
        args, y = res
        cots = list(rule_vjp(list(args[:n]), y, upstream))
        out = [
            _zero_cotangent(a) if c is None else jnp.asarray(c, a.dtype).reshape(a.shape)
            for a, c in zip(args[:n], cots)
        ]
        return (*out, *(_zero_cotangent(c) for c in args[n:]))

    wrapped.defvjp(fwd, bwd)
    return wrapped(*xs, *consts)


# Call-like primitives whose inner jaxpr maps its inputs and outputs one to one to the equation's:
# the walk goes inside them (a `jit`-wrapped round must not count as a path); any other equation
# with an inner jaxpr (scan, while, cond) is taken as a whole, conservatively.
_CALL_JAXPR_PARAMS = ("jaxpr", "call_jaxpr")


def _inner_jaxpr(eqn):
    for key in _CALL_JAXPR_PARAMS:
        inner = eqn.params.get(key)
        if inner is not None:
            inner = getattr(inner, "jaxpr", inner)  # a ClosedJaxpr's jaxpr
            if len(inner.invars) == len(eqn.invars) and len(inner.outvars) == len(eqn.outvars):
                return inner
    return None


def _live(jaxpr, live_in: list[bool]) -> list[bool]:
    """Which outputs of ``jaxpr`` depend on its inputs marked in ``live_in``: a forward walk over
    the data dependencies (into call-like sub-jaxprs; other sub-jaxprs as a whole)."""
    live = {v for v, on in zip(jaxpr.invars, live_in) if on}
    for eqn in jaxpr.eqns:
        ins = [not isinstance(v, _Literal) and v in live for v in eqn.invars]
        if not any(ins):
            continue
        inner = _inner_jaxpr(eqn)
        outs = _live(inner, ins) if inner is not None else [True] * len(eqn.outvars)
        live.update(v for v, on in zip(eqn.outvars, outs) if on)
    return [not isinstance(v, _Literal) and v in live for v in jaxpr.outvars]


def connected_outputs(f: Callable, xs: Sequence):
    """Runs ``f(xs)``; returns ``(y, flags)``, one flag per leaf of ``y``: ``True`` where that
    floating output has a gradient path to any of ``xs``.

    Structural, from the jaxpr of ``f``'s reverse pass traced abstractly (no arithmetic, so the
    check costs one eager forward pass plus tracing): an output has a path when some input's
    cotangent depends on that output's cotangent. ``round``, ``floor``, ``sign``,
    ``stop_gradient`` and integer casts contribute (symbolic) zeros, which depend on nothing;
    ``relu`` at its kink keeps its equation. ``custom_vjp`` functions are seen through their rule.
    """
    xs = list(xs)
    y = f(xs)
    leaves = keras.tree.flatten(y)
    float_leaf = [is_float_tensor(leaf) for leaf in leaves]
    if not any(float_leaf):
        return y, [False] * len(leaves)
    jax_leaves, treedef = jax.tree_util.tree_flatten(y)
    is_float = [is_float_tensor(leaf) for leaf in jax_leaves]

    def pullback(xs, us):
        out, vjp_fn = jax.vjp(f, xs)
        it = iter(us)
        cot = [next(it) if fl else _zero_cotangent(leaf) for leaf, fl in zip(jax_leaves, is_float)]
        return vjp_fn(jax.tree_util.tree_unflatten(treedef, cot))[0]

    us = [jnp.zeros(leaf.shape, leaf.dtype) for leaf, fl in zip(jax_leaves, is_float) if fl]
    jaxpr = jax.make_jaxpr(pullback)(xs, us).jaxpr
    n_x = len(jaxpr.invars) - len(us)
    live_by_leaf = {}
    k = 0
    for leaf, fl in zip(jax_leaves, is_float):
        if fl:
            start = [False] * len(jaxpr.invars)
            start[n_x + k] = True
            live_by_leaf[id(leaf)] = any(_live(jaxpr, start))
            k += 1
    flags = [bool(fl and live_by_leaf.get(id(leaf), True)) for leaf, fl in zip(leaves, float_leaf)]
    return y, flags


class _NotBuilt(Exception):
    """A model met unbuilt while :func:`run_abstractly` traces: it must run for real once."""


_ABSTRACT = threading.local()


def run_abstractly(fn: Callable, *args):
    """``fn(*args)`` traced with abstract values (``jax.eval_shape``): the same Python runs (the
    layers' calls, :func:`connected_outputs` inside them) without executing or compiling a single
    operation. A model that is not built yet (its variables are created on its first call, which
    must not happen under a trace) makes it run eagerly instead."""
    _ABSTRACT.on = True
    try:
        return jax.eval_shape(fn, *args)
    except _NotBuilt:
        pass
    finally:
        _ABSTRACT.on = False
    return fn(*args)


def stop_gradient(t):
    return jax.lax.stop_gradient(t)


# XLA's max pooling already keeps its backward passes cheap on JAX (select-and-scatter, batched by
# vmap over the seeds): no routed variant.
max_pool_2d_routed = None


# --------------------------------------------------------------------------------------------------
# Compilation
# --------------------------------------------------------------------------------------------------


def tensor_spec(shape, dtype):
    """``(shape, dtype)``: jit needs no signature (it compiles per shape); kept for the contract."""
    return (tuple(shape), jnp.dtype(dtype).name)


def compile_function(fn: Callable, input_signature=None, jit_compile: bool = False):
    """``jax.jit(fn)``, compiled lazily on the first call for each shape of its arguments (XLA
    always, so ``jit_compile`` changes nothing; the signature is not needed).

    The jitted function itself is returned, so that a call is jit's C++ dispatch alone (~5 µs, no
    Python frame of ours); ``trace_count()`` is set on it and counts the traces (each followed by
    an XLA compile).
    """
    count = [0]

    def counted(*args):
        count[0] += 1
        return fn(*args)

    jitted = jax.jit(counted)
    jitted.trace_count = lambda: count[0]
    return jitted


# --------------------------------------------------------------------------------------------------
# Tensor utilities (inside compiled blocks)
# --------------------------------------------------------------------------------------------------


def one_hot(indices, depth: int, dtype):
    return jax.nn.one_hot(jnp.asarray(indices), depth, dtype=dtype)


def stack(ts, axis):
    return jnp.stack(ts, axis=axis)


def concat(ts, axis):
    return ts[0] if len(ts) == 1 else jnp.concatenate(ts, axis=axis)


def reshape(t, shape):
    return jnp.reshape(t, shape)


def transpose(t, perm):
    return jnp.transpose(t, perm)


def transpose_first_two(t):
    return jnp.swapaxes(t, 0, 1)


def flatten_samples(t):
    """``(batch, *shape)`` -> ``(batch, prod(shape))``."""
    return jnp.reshape(t, (t.shape[0], -1))


def gather_columns(t, indices):
    """``t: (batch, c, M)``, ``indices: (batch, m)`` -> ``(batch, c, m)``."""
    return jnp.take_along_axis(t, jnp.asarray(indices)[:, None, :], axis=2)


def repeat_samples(x, times):
    """``(batch, ...)`` -> ``(batch * times, ...)``, each sample repeated ``times`` times in a row."""
    return jnp.repeat(x, times, axis=0)


def unit_tangent(column, n: int, sample_shape, like):
    """``e_column`` (of ``n`` elements) reshaped to ``sample_shape``, for every sample of ``like``:
    ``(batch, *sample_shape)``."""
    e = jax.nn.one_hot(column, n, dtype=like.dtype)
    return jnp.broadcast_to(jnp.reshape(e, (1, *sample_shape)), like.shape)


def rows_for_batch(rows, like):
    """The same ``(m,)`` row indices for every sample of ``like``: ``(batch, m)`` int32."""
    r = jnp.asarray(np.asarray(rows), jnp.int32)[None]
    return jnp.broadcast_to(r, (like.shape[0], len(rows)))


def arange(n: int):
    return jnp.arange(n, dtype=jnp.int32)


def cast(t, dtype):
    return jnp.asarray(t).astype(dtype)


def dim(t, axis: int):
    return t.shape[axis]


def shape_of(t):
    return tuple(t.shape)


def top_k(y2d, k: int):
    """``(values, indices)`` of the ``k`` largest entries of each row, largest first (the lower
    index first on a tie)."""
    return jax.lax.top_k(y2d, k)


def nest_flatten(structure) -> list:
    return keras.tree.flatten(structure)


def nest_pack(structure, flat):
    return keras.tree.pack_sequence_as(structure, flat)


__all__ = [
    "FORWARD_RECURRENT",
    "FORWARD_TRAINING",
    "SHAPE_SPECIALIZED",
    "STACK_OUTPUTS",
    "CONSTANT_SEEDS",
    "XLA_OPTIONAL",
    "arange",
    "as_argument",
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
    "run_abstractly",
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
    "wait",
    "set_threads",
    "with_custom_vjp",
]
