"""The PyTorch backend of the autodiff seam: ``torch.func``, ``torch.autograd.Function`` and graph
capture.

Implements every function of the contract in ``augnet/_backend/__init__.py`` (read it first); only
what is particular to torch is said here:

- **The model as a pure function**: :func:`model_state` is the values of ``model.variables`` and
  :func:`call_model` calls the model inside a ``keras.StatelessScope`` holding them, so nothing
  is ever assigned (BatchNorm statistics, seed states), with ``training=True`` too, and compiled
  blocks receive the weights as arguments.
- **Autodiff** is ``torch.func`` (``vjp``, ``jvp``, ``vmap``): functional, composable (the
  vectorised strategies map a VJP function over seeds), and traceable.
- **Compiled blocks are captured graphs** (``augnet/_backend/_torch_graph.py``): each block is
  traced once into a graph of ATen operations with a symbolic batch axis and then run under
  ``torch.no_grad()``. This removes Keras's per-layer Python (~0.8 ms per forward pass of a
  small MLP) and autograd's bookkeeping: the benchmark's Keras models then compute their
  Jacobians as fast as hand-written torch ports (benchmarks/README.md). A block that cannot be
  captured (data-dependent Python, random layers with ``training=True``) runs eagerly instead,
  with the same numbers.
- **Derivative rules** are ``torch.autograd.Function`` s (with ``generate_vmap_rule``, so the
  vectorised strategies and graph capture see them).
- **Gradient paths** are read from the autograd graph: a ``round``/``floor``/``sign`` node has a
  ``grad_fn`` whose derivative is zero everywhere, so :func:`connected_outputs` walks the graph
  and treats those nodes (and the ones without a derivative) as cuts.
- **float64**: Keras 3.15's type promotion maps float64 to float32 on every backend but
  TensorFlow, so on torch ``keras.ops.matmul`` (every ``Dense``), ``mean``, ``var`` (the
  normalisation layers) and ~40 other ops compute float64 tensors in float32. augnet computes a
  float64 model in float64: while it runs one (tracing, eager calls, derivative rules), Keras's
  64→32 table entry for float64 is lifted (:func:`float64_compute`), and restored afterwards.
- **Devices**: tensors are made on Keras's torch device (a CUDA GPU when torch sees one, unless
  ``KERAS_TORCH_DEVICE`` says otherwise); results come back as NumPy arrays.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Sequence
from typing import NamedTuple

import keras
import numpy as np
import torch
from torch.utils import _pytree as pytree

from augnet._backend import _torch_graph as graph
from augnet._backend._float64 import any_float64 as _any_float64
from augnet._backend._float64 import float64_compute

name = "torch"

# Capabilities the engine asks about (see the contract).
FORWARD_RECURRENT = True  # torch.func.jvp runs through Keras's recurrent loops
FORWARD_TRAINING = False  # forward mode vectorised over tangents: no random layers in training
XLA_OPTIONAL = False  # graphs are always captured; there is no separate XLA choice

logger = logging.getLogger("augnet")

_DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
    "int8": torch.int8,
    "int16": torch.int16,
    "int32": torch.int32,
    "int64": torch.int64,
    "uint8": torch.uint8,
    "bool": torch.bool,
    "complex64": torch.complex64,
    "complex128": torch.complex128,
}
_NAMES = {v: k for k, v in _DTYPES.items()}
_FLOATING = {"float16", "bfloat16", "float32", "float64"}


# --------------------------------------------------------------------------------------------------
# float64 in Keras on torch
# --------------------------------------------------------------------------------------------------

# float64_compute (Keras's float64 -> float32 promotion lifted) is shared with the JAX seam
# (augnet/_backend/_float64.py).


# --------------------------------------------------------------------------------------------------
# Conversion, dtypes, devices
# --------------------------------------------------------------------------------------------------


def _torch_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    return _DTYPES[dtype_name(dtype)]


@functools.lru_cache(maxsize=8)
def _device_for(name_: str) -> torch.device:
    return torch.device(name_)


def _device() -> torch.device:
    """The device Keras computes on (``keras.src.backend.torch.core.get_device``)."""
    try:
        from keras.src.backend.torch.core import get_device

        return _device_for(str(get_device()))
    except Exception:  # pragma: no cover
        return _device_for("cpu")


def convert(x, dtype) -> torch.Tensor:
    """An array-like, tensor or Keras variable as a tensor of ``dtype`` on Keras's device."""
    dt = _torch_dtype(dtype)
    if isinstance(x, torch.Tensor):
        t = x
    elif isinstance(getattr(x, "value", None), torch.Tensor):  # a Keras variable
        t = x.value
    else:
        a = np.asarray(x)
        if a.dtype.name == "bfloat16":  # ml_dtypes' bfloat16, which torch.from_numpy lacks
            a = a.astype(np.float32)
        if a.dtype.kind not in "biufc":
            raise TypeError(f"cannot convert an array of dtype {a.dtype} to a tensor")
        if not a.flags.writeable or not a.flags.c_contiguous:
            a = np.array(a, order="C")
        t = torch.from_numpy(a)
    if t.dtype != dt:
        t = t.to(dt)
    device = _device()
    if t.device != device:
        t = t.to(device)
    return t


def to_numpy(t) -> np.ndarray:
    """A NumPy copy the caller owns (bfloat16 as ``ml_dtypes.bfloat16``, as on the other
    backends)."""
    if isinstance(getattr(t, "value", None), torch.Tensor) and not isinstance(t, torch.Tensor):
        t = t.value
    if not isinstance(t, torch.Tensor):
        return np.array(t)
    t = t.detach()
    if t.dtype == torch.bfloat16:
        return _bfloat16(t)
    if t.device.type != "cpu":
        return t.cpu().numpy()
    return t.numpy().copy()


def _bfloat16(t) -> np.ndarray:
    values = t.float().cpu().numpy()
    try:
        import ml_dtypes  # Keras's own dependency

        return values.astype(ml_dtypes.bfloat16)
    except ImportError:  # pragma: no cover
        return values


def numpy_view(t) -> np.ndarray:
    """A NumPy view of a CPU tensor's buffer without a copy (valid while the tensor lives); a
    NumPy array is returned as it is."""
    if isinstance(t, np.ndarray):
        return t
    t = t.detach()
    if t.dtype == torch.bfloat16:
        return _bfloat16(t)
    return t.numpy() if t.device.type == "cpu" else t.cpu().numpy()


def _is_traced(t) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor) or torch._C._functorch.is_functorch_wrapped_tensor(t)


def is_eager_tensor(t) -> bool:
    return isinstance(t, torch.Tensor) and not _is_traced(t)


def is_float_tensor(t) -> bool:
    return isinstance(t, torch.Tensor) and t.is_floating_point()


def dtype_name(dtype) -> str:
    if isinstance(dtype, torch.dtype):
        return _NAMES.get(dtype) or str(dtype).replace("torch.", "")
    text = getattr(dtype, "name", None) if not isinstance(dtype, str) else dtype
    if text is None:
        text = str(dtype)
    text = str(text).replace("torch.", "")
    if text in _DTYPES:
        return text
    return np.dtype(text).name


def is_floating(dtype) -> bool:
    try:
        return dtype_name(dtype) in _FLOATING
    except TypeError:
        return False


def is_symbolic(*values) -> bool:
    """True while torch traces the caller (``torch.compile``, fake or functorch tensors): the
    engine then returns tensors from one uncompiled pass."""
    if torch.compiler.is_compiling():
        return True
    for v in values:
        if type(v) is torch.Tensor or type(v) is np.ndarray:
            continue
        if isinstance(v, list | tuple | dict):
            if is_symbolic(*(v.values() if isinstance(v, dict) else v)):
                return True
        elif isinstance(v, torch.Tensor) and _is_traced(v):
            return True
    return False


def set_threads(n: int) -> None:
    """Limits torch's CPU threads to ``n`` (intra-op; inter-op too while torch still allows it)."""
    torch.set_num_threads(int(n))
    try:
        torch.set_num_interop_threads(int(n))
    except RuntimeError:  # set once per process, before any inter-op work: keep the setting
        pass


def devices() -> list[str]:
    """The devices torch computes on, e.g. ``["CPU:0"]`` or ``["CPU:0", "CUDA:0"]``."""
    found = ["CPU:0"]
    if torch.cuda.is_available():
        found += [f"CUDA:{i}" for i in range(torch.cuda.device_count())]
    return found


# --------------------------------------------------------------------------------------------------
# The model as a pure function
# --------------------------------------------------------------------------------------------------


def model_state(model) -> list:
    """The values of all of ``model.variables`` (weights and seed states, in Keras's order), read
    now, so that later changes are seen. One list: freezing a layer (``trainable=False``) does
    not change its layout."""
    return [v.value for v in model.variables]


def forked_rng():
    """Runs the block on a copy of torch's global random state, restored afterwards: Keras on
    torch draws an unseeded ``Dropout``'s mask from it, so a training-mode pass neither advances
    it nor differs from the next one (as a seed state that ``stateless_call`` does not assign)."""
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    return torch.random.fork_rng(devices=cuda)


def call_model(model, state, inputs, training: bool):
    """``model(inputs, training=training)`` inside a ``keras.StatelessScope`` holding ``state``
    (what ``model.stateless_call`` does, through the layer's ``__call__`` so that a layer without
    a ``training`` argument, and input casting, work as in a plain call): nothing is assigned
    (BatchNorm statistics, seed states) and, with ``training=True``, torch's global random state
    is left as it was (:func:`forked_rng`)."""
    values = state if state else model_state(model)
    mapping = list(zip(model.variables, values))
    with float64_compute(_any_float64(inputs)):
        with forked_rng() if training else contextlib.nullcontext():
            with keras.StatelessScope(state_mapping=mapping):
                return model(inputs, training=training)


def parameter_vjp(model, variables: Sequence, f: Callable):
    """One forward pass of ``f(state)`` recorded for gradients with respect to ``variables`` (some
    of ``model``'s variables); ``vjp_fn(cotangent)`` gives one dense gradient per variable."""
    state = model_state(model)
    where = {id(w): i for i, w in enumerate(model.variables)}
    leaves = []
    for v in variables:
        if id(v) not in where:
            raise ValueError(f"{getattr(v, 'path', v)!r} is not a variable of {model.name!r}.")
        i = where[id(v)]
        leaf = state[i].detach().requires_grad_(True)
        state[i] = leaf
        leaves.append(leaf)
    f64 = _any_float64(state)
    with _recording(), float64_compute(f64):
        y = f(state)

    def vjp_fn(cotangent):
        with _recording(), float64_compute(f64):
            grads = torch.autograd.grad(
                y, leaves, grad_outputs=cotangent, retain_graph=True, allow_unused=True
            )
        return [torch.zeros_like(w) if g is None else g for g, w in zip(grads, leaves)]

    return y, vjp_fn


# --------------------------------------------------------------------------------------------------
# Autodiff
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _recording():
    """Autograd on, also inside a caller's ``torch.no_grad()`` or ``torch.inference_mode()``."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


def _recordable(xs: list) -> list:
    """Tensors made inside ``torch.inference_mode()`` cannot be recorded: copies of them."""
    if not any(isinstance(t, torch.Tensor) and t.is_inference() for t in xs):
        return xs
    with torch.inference_mode(False):
        return [t.clone() if isinstance(t, torch.Tensor) and t.is_inference() else t for t in xs]


def _positional(f: Callable) -> Callable:
    return lambda *args: f(list(args))


def vjp(f: Callable[[list], torch.Tensor], xs: Sequence[torch.Tensor]):
    """One forward pass of ``f`` recorded for reverse mode (``torch.func.vjp``).

    Returns ``(y, vjp_fn)``; ``vjp_fn(cotangent)`` (shaped like ``y``) returns a list with
    ``cotangentᵀ·∂y/∂x`` per input, zeros where ``y`` does not depend on it; it may be called
    any number of times, and under ``vmap``.
    """
    xs = list(xs)
    f64 = _any_float64(xs)
    with _recording(), float64_compute(f64):
        y, fn = torch.func.vjp(_positional(f), *_recordable(xs))

    def vjp_fn(cotangent):
        with _recording(), float64_compute(f64):
            return list(fn(cotangent))

    return y, vjp_fn


def jvp(f: Callable[[list], torch.Tensor], xs: Sequence[torch.Tensor], tangents: Sequence):
    """Forward mode (``torch.func.jvp``): ``(y, ∂y/∂x · tangents)``; a tangent of ``None`` holds
    that input constant."""
    xs = _recordable(list(xs))
    tangents = [torch.zeros_like(x) if t is None else t for x, t in zip(xs, tangents)]
    try:
        with _recording(), float64_compute(_any_float64(xs)), _math_attention():
            return torch.func.jvp(_positional(f), tuple(xs), tuple(tangents))
    except NotImplementedError as exc:
        raise ValueError(
            "Forward mode (strategy='forward', augnet.jvp) is not available for this model on "
            f"PyTorch: an operation in it has no forward-mode derivative in torch ({exc}). Use "
            "strategy='loop' or 'pfor' (reverse mode) instead."
        ) from None


def _math_attention():
    """``scaled_dot_product_attention`` through its composite (math) kernel, which has a
    forward-mode derivative (the fused CPU kernel has none)."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([SDPBackend.MATH])
    except Exception:  # pragma: no cover
        return contextlib.nullcontext()


def jvp_by_vjp(f: Callable[[list], torch.Tensor], xs: Sequence[torch.Tensor], tangents: Sequence):
    """``J·v`` in reverse mode (the double-VJP trick, ``J·v = ∂/∂u (uᵀJ·v)``): respects derivative
    rules, which forward mode does not run."""
    xs = _recordable(list(xs))
    tangents = [torch.zeros_like(x) if t is None else t for x, t in zip(xs, tangents)]
    with _recording(), float64_compute(_any_float64(xs)):
        y, fn = torch.func.vjp(_positional(f), *xs)
        _, transpose = torch.func.vjp(fn, torch.zeros_like(y))
        (y_dot,) = transpose(tuple(tangents))
    return y, y_dot


@contextlib.contextmanager
def _plain_memory_format():
    """Keras's convolutions copy their inputs to channels-last memory, which ``torch.func.vmap``
    does not support: inside a vectorised map they keep their layout (the same values). Keras's
    helper is restored on exit."""
    try:
        from keras.src.backend.torch import nn as keras_nn
    except ImportError:  # pragma: no cover
        yield
        return
    original = getattr(keras_nn, "_maybe_convert_to_channels_last", None)
    if original is None:  # pragma: no cover - another Keras
        yield
        return
    keras_nn._maybe_convert_to_channels_last = _same_tensor
    try:
        yield
    finally:
        keras_nn._maybe_convert_to_channels_last = original


def _same_tensor(tensor):
    return tensor


def vectorized_map(fn: Callable, elems: torch.Tensor):
    """``fn`` applied to every row of ``elems`` in one vectorised pass (``torch.func.vmap``),
    results stacked along a new first axis. Random operations use one draw for all rows."""
    with _plain_memory_format():
        return torch.func.vmap(fn, randomness="same")(elems)


def with_custom_vjp(forward: Callable, xs: Sequence[torch.Tensor], rule_vjp: Callable):
    """Runs ``forward(xs) -> y`` with its reverse-mode derivative replaced by ``rule_vjp`` (a
    ``torch.autograd.Function``; ``rule_vjp(xs, y, upstream) -> [cotangent or None per x]``).

    The forward pass runs without recording, so variables it reads get no gradient (the rule
    replaces the layer's derivative). Forward mode does not see rules: the engine uses reverse
    mode (or :func:`jvp_by_vjp`) while rules are active.
    """
    xs = list(xs)
    box: dict = {}

    class Rule(torch.autograd.Function):
        generate_vmap_rule = True

        @staticmethod
        def forward(*args):
            y = forward(list(args))
            box["structure"] = y
            return tuple(keras.tree.flatten(y))

        @staticmethod
        def setup_context(ctx, inputs, output):
            ctx.n_inputs = len(inputs)
            ctx.save_for_backward(*inputs, *output)

        @staticmethod
        def backward(ctx, *upstream):
            saved = ctx.saved_tensors
            args, outs = list(saved[: ctx.n_inputs]), list(saved[ctx.n_inputs :])
            y = keras.tree.pack_sequence_as(box["structure"], outs)
            up = keras.tree.pack_sequence_as(box["structure"], list(upstream))
            with float64_compute(_any_float64(args)):
                cots = list(rule_vjp(args, y, up))
            return tuple(
                torch.zeros_like(a) if c is None else convert(c, a.dtype).expand_as(a)
                for a, c in zip(args, cots)
            )

    out = Rule.apply(*xs)
    return keras.tree.pack_sequence_as(box["structure"], list(out))


# Autograd nodes whose derivative is zero wherever it exists, or that have none: a path through
# them is no gradient path (torch gives round/floor/sign a grad_fn, unlike TensorFlow's None).
_CUT_NODES = frozenset(
    {
        "RoundBackward0",
        "RoundBackward1",
        "FloorBackward0",
        "CeilBackward0",
        "TruncBackward0",
        "SignBackward0",
        "SgnBackward0",
        "NotImplemented",
    }
)


def _reaches(grad_fn, targets: set) -> bool:
    """Whether the autograd graph from ``grad_fn`` reaches one of ``targets`` (leaf tensors by
    id) without passing through a cut node."""
    # A graph node's Python object lives only while it is referenced: once freed, the same node
    # comes back as a new object, and a new object can take a freed one's id. ``held`` keeps every
    # node met alive for the walk, so each node has one object and ids are not reused (torch
    # 2.11 reused them: a Dense layer's input looked already seen, and so unreachable).
    seen, held, stack = set(), [], [grad_fn]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        held.append(node)
        kind = type(node).__name__
        if kind in _CUT_NODES:
            continue
        if kind == "AccumulateGrad" and id(node.variable) in targets:
            return True
        stack.extend(nxt for nxt, _ in node.next_functions)
    return False


def connected_outputs(f: Callable, xs: Sequence[torch.Tensor]):
    """Runs ``f(xs)`` recording gradients; returns ``(y, flags)``, one flag per leaf of ``y``:
    ``True`` where that floating output has a gradient path to any of ``xs`` (a zero derivative
    such as ``relu``'s at its kink is a path; ``round``, ``floor``, ``sign``, integer casts and
    ``stop_gradient`` are not)."""
    with _recording():
        leaves = [
            x.detach().clone().requires_grad_(True) if is_float_tensor(x) else x
            for x in (list(xs) or [])
        ]
    targets = {id(x) for x in leaves if isinstance(x, torch.Tensor) and x.requires_grad}
    with _recording(), float64_compute(_any_float64(leaves)):
        y = f(leaves)
    flags = []
    for out in keras.tree.flatten(y):
        if not is_float_tensor(out):
            flags.append(False)
        elif out.grad_fn is None:
            flags.append(id(out) in targets)  # an input passed through (Dropout at inference)
        else:
            flags.append(_reaches(out.grad_fn, targets))
    return y, flags


def stop_gradient(t):
    return t.detach()


# torch's max-pooling backward already reuses the indices its forward pass recorded.
max_pool_2d_routed = None


# --------------------------------------------------------------------------------------------------
# Compilation
# --------------------------------------------------------------------------------------------------


class TensorSpec(NamedTuple):
    """An input-signature entry: ``None`` marks a dynamic axis (the batch, a chunk width)."""

    shape: tuple
    dtype: torch.dtype


def tensor_spec(shape, dtype) -> TensorSpec:
    return TensorSpec(tuple(None if d is None else int(d) for d in shape), _torch_dtype(dtype))


_NO_CONTEXT = contextlib.nullcontext()


def _flatten_into(value, out: list) -> None:
    """The leaves of nested lists/tuples/dicts in ``torch.utils._pytree``'s order (faster than it
    for the few leaves of a call)."""
    if isinstance(value, list | tuple):
        for v in value:
            _flatten_into(v, out)
    elif isinstance(value, dict):
        for v in value.values():
            _flatten_into(v, out)
    else:
        out.append(value)


def _is_spec(x) -> bool:
    return isinstance(x, TensorSpec)


class CompiledFunction:
    """``fn`` captured as a graph of ATen operations on its first call, with every ``None`` axis of
    the signature symbolic (other batch sizes reuse it), and run under ``torch.no_grad()``.

    A call whose sizes break a condition the capture recorded (rare: code that branches on a
    size) is captured again for them. A function that cannot be captured runs eagerly. Arguments
    may be tensors or NumPy arrays.
    """

    def __init__(self, fn: Callable, input_signature, jit_compile: bool = False):
        self.fn = fn
        self.specs, self.in_spec = pytree.tree_flatten(list(input_signature), is_leaf=_is_spec)
        self.dynamic = [
            (i, axis)
            for i, spec in enumerate(self.specs)
            for axis, d in enumerate(spec.shape)
            if d is None
        ]
        # The batch: axis 0 of every argument of rank 2 or more whose axis 0 is dynamic.
        self.batch_positions = [
            j
            for j, (i, axis) in enumerate(self.dynamic)
            if axis == 0 and len(self.specs[i].shape) >= 2
        ]
        self.float64 = any(s.dtype == torch.float64 for s in self.specs)
        self.jit_compile = bool(jit_compile)
        self.variants: list = []
        self.eager = False
        self._traces = 0

    def _leaves(self, args) -> list:
        leaves: list = []
        _flatten_into(args, leaves)
        if len(leaves) != len(self.specs):
            raise TypeError(
                f"a compiled function expected {len(self.specs)} tensors as in its signature, "
                f"received {len(leaves)}"
            )
        return [
            t if isinstance(t, torch.Tensor) else convert(t, s.dtype)
            for t, s in zip(leaves, self.specs)
        ]

    def __call__(self, *args):
        leaves = self._leaves(args)
        if not self.eager:
            sizes = tuple(leaves[i].shape[axis] for i, axis in self.dynamic)
            for variant in self.variants:
                if variant.accepts(sizes):
                    break
            else:
                variant = None
                for exact in (False, True):
                    padded = self._padded_call(leaves, sizes)
                    if padded is not None:
                        return padded
                    variant = self._capture(leaves, sizes, exact)
                    if variant is not None or self.eager:
                        break
            if variant is not None:
                with torch.no_grad(), forked_rng() if variant.random else _NO_CONTEXT:
                    out = variant.forward(*leaves)
                return pytree.tree_unflatten(out, variant.out_spec)
        return self._run_eagerly(leaves)

    def _padded_call(self, leaves: list, sizes: tuple):
        """A batch that no captured graph holds for runs padded with copies of its last sample, and
        the results are cut back (samples are independent, so the padding changes no result):
        batch 1 on a graph that holds for batches of 2 or more (a condition torch's ``vmap``
        places), and a smaller batch on a graph pinned to one batch size (forward mode), so that
        a job's batch sizes (full batches, then a last smaller one) need one capture."""
        batch = {sizes[j] for j in self.batch_positions}
        if len(batch) != 1:
            return None
        (b,) = batch
        for variant in self.variants:
            pins = {variant.pinned(j) for j in self.batch_positions} - {None}
            if len(pins) > 1:
                continue
            target = pins.pop() if pins else b + 1
            if target <= b:
                continue
            wanted = list(sizes)
            for j in self.batch_positions:
                wanted[j] = target
            if not variant.accepts(tuple(wanted)):
                continue
            rows = {self.dynamic[j][0] for j in self.batch_positions}
            args = [
                torch.cat([t, t[-1:].expand(target - b, *t.shape[1:])]) if i in rows else t
                for i, t in enumerate(leaves)
            ]
            with torch.no_grad(), forked_rng() if variant.random else _NO_CONTEXT:
                out = variant.forward(*args)
            out = [
                t[:b] if isinstance(t, torch.Tensor) and t.dim() and t.shape[0] == target else t
                for t in out
            ]
            return pytree.tree_unflatten(out, variant.out_spec)
        return None

    def _flat_fn(self, *flat):
        args = pytree.tree_unflatten(_recordable(list(flat)), self.in_spec)
        with _recording():
            return self.fn(*args)

    def _capture(self, leaves: list, sizes: tuple, exact: bool = False):
        """Captures a graph for the call's sizes, traced with them as hints (at least 2 unless
        ``exact``: a size of 1 takes special paths); kept if it holds for other sizes too.
        Returns it if it holds for ``sizes``, else ``None``."""
        if len(self.variants) >= graph._MAX_VARIANTS:
            self.eager = True
            return None
        from torch.fx.experimental.symbolic_shapes import DimDynamic, StatelessSymbolicContext

        hints = sizes if exact else tuple(max(s, 2) for s in sizes)

        def fakes_for(mode, hints=hints):
            hint = iter(hints)
            fakes = []
            for t, spec in zip(leaves, self.specs):
                shape = [next(hint) if d is None else d for d in spec.shape]
                context = StatelessSymbolicContext(
                    dynamic_sizes=[
                        DimDynamic.DYNAMIC if d is None else DimDynamic.STATIC for d in spec.shape
                    ]
                )
                example = torch.empty(shape, dtype=spec.dtype, device=t.device)
                fakes.append(mode.from_tensor(example, symbolic_context=context))
            return fakes, [fakes[i].shape[axis] for i, axis in self.dynamic]

        try:
            with float64_compute(self.float64):
                variant = graph.capture(self._flat_fn, fakes_for)
        except Exception as exc:
            logger.debug("augnet: graph capture failed, running eagerly: %r", exc, exc_info=True)
            self.eager = True
            return None
        self._traces += 1
        self.variants.append(variant)
        if variant.accepts(sizes):
            return variant
        if exact:
            logger.debug("augnet: no captured graph holds for sizes %s, running eagerly", sizes)
            self.eager = True
        return None

    def _run_eagerly(self, leaves: list):
        if self._traces == 0:
            self._traces = 1
        with float64_compute(self.float64):
            out = self._flat_fn(*leaves)
        return pytree.tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, out)

    def trace_count(self) -> int:
        return self._traces


def compile_function(fn: Callable, input_signature, jit_compile: bool = False) -> CompiledFunction:
    """``fn`` to be captured as a graph on its first call (see :class:`CompiledFunction`)."""
    return CompiledFunction(fn, input_signature, jit_compile)


# --------------------------------------------------------------------------------------------------
# Tensor utilities (inside compiled blocks)
# --------------------------------------------------------------------------------------------------


def _index(indices) -> torch.Tensor:
    if not isinstance(indices, torch.Tensor):
        indices = convert(np.asarray(indices), "int64")
    return indices.long()


def one_hot(indices, depth: int, dtype):
    """Written as a comparison (``torch.nn.functional.one_hot`` reads the indices' values)."""
    if not isinstance(indices, torch.Tensor):
        indices = _index(indices)
    positions = torch.arange(depth, dtype=indices.dtype, device=indices.device)
    return (indices[..., None] == positions).to(_torch_dtype(dtype))


def stack(ts, axis):
    return torch.stack(list(ts), dim=axis)


def concat(ts, axis):
    ts = list(ts)
    return ts[0] if len(ts) == 1 else torch.cat(ts, dim=axis)


def reshape(t, shape):
    return torch.reshape(t, tuple(shape))


def transpose(t, perm):
    return t.permute(*perm)


def transpose_first_two(t):
    return t.transpose(0, 1)


def flatten_samples(t):
    """``(batch, *shape)`` -> ``(batch, prod(shape))``."""
    return t.reshape(t.shape[0], -1)


def gather_columns(t, indices):
    """``t: (batch, c, M)``, ``indices: (batch, m)`` -> ``(batch, c, m)``."""
    idx = _index(indices)
    return torch.gather(t, 2, idx[:, None, :].expand(t.shape[0], t.shape[1], idx.shape[1]))


def repeat_samples(x, times):
    """``(batch, ...)`` -> ``(batch * times, ...)``, each sample repeated ``times`` times in a row."""
    return torch.repeat_interleave(x, times, dim=0)


def unit_tangent(column, n: int, sample_shape, like):
    """``e_column`` (of ``n`` elements) reshaped to ``sample_shape``, for every sample of ``like``:
    ``(batch, *sample_shape)``."""
    e = one_hot(column, n, like.dtype)
    # Materialised (not a stride-0 view): a tangent laid out like its primal needs no copy
    # into a new layout when forward mode pairs them, which graph capture cannot trace.
    return e.reshape(1, *sample_shape).expand(like.shape).contiguous()


def rows_for_batch(rows: np.ndarray, like):
    """The same ``(m,)`` row indices for every sample of ``like``: ``(batch, m)`` int32."""
    r = torch.as_tensor(np.asarray(rows), dtype=torch.int32, device=like.device)
    return r[None].expand(like.shape[0], len(rows))


def arange(n: int):
    return torch.arange(n, dtype=torch.int32, device=_device())


def cast(t, dtype):
    return t.to(_torch_dtype(dtype))


def dim(t, axis: int):
    return t.shape[axis]


def shape_of(t):
    """Static sizes, ``None`` for a symbolic one (while a graph is captured)."""
    return tuple(d if isinstance(d, int) else None for d in t.shape)


def top_k(y2d, k: int):
    """``(values, indices)`` of the ``k`` largest entries of each row, largest first."""
    values, indices = torch.topk(y2d, k, dim=1, largest=True, sorted=True)
    return values, indices


def nest_flatten(structure) -> list:
    return keras.tree.flatten(structure)


def nest_pack(structure, flat):
    return keras.tree.pack_sequence_as(structure, list(flat))


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
    "float64_compute",
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
