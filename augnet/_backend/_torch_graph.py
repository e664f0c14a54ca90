"""Graph capture for the torch backend: a compiled block as one plain graph of ATen operations.

A Keras model called on torch runs a few hundred lines of Python per layer call (argument checks,
dtype policies, ``convert_to_tensor``): ~0.8 ms for a 4-layer MLP at batch 64, more than a pure-
torch port of the same network takes for its whole Jacobian. :func:`capture` removes all of it,
and autograd's own per-call bookkeeping with it: the engine's block (a forward pass and its
backward passes, through ``torch.func``) is traced once with :func:`torch.fx.experimental.
proxy_tensor.make_fx` on fake tensors whose batch axis (every ``None`` axis of the signature) is
symbolic. The result is a :class:`torch.fx.GraphModule` of ATen operations (the backward
operations written out), which later calls run under ``torch.no_grad()`` for any batch size.

- **Weights are arguments.** The model's variable values are the block's first argument (read
  at every call), never constants of the graph, so weights changed later (``fit``,
  ``set_weights``) are seen without capturing again.
- **Dynamic sizes, checked.** The capture records the shape guards torch's symbolic tracing
  placed on the dynamic sizes (with 0/1 not specialised); a call whose sizes break one is
  captured again for them (:class:`Captured` holds every variant).
- **Layout.** Keras computes images channels-last and transposes around every convolution and
  pooling layer (and copies to force memory formats); :func:`optimize_layout` moves those
  transposes through elementwise operations until they cancel and drops the format copies, so
  that the graph computes like a hand-written channels-first network (the same values: only
  transposes and copies move; measured ~1.5x faster on the benchmark CNN).

Nothing here knows about Keras: it traces any function of tensors built of torch operations.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable

import torch
import torch.fx as fx

logger = logging.getLogger("augnet")

aten = torch.ops.aten

# Pointwise ATen operations not tagged so.
_EXTRA_POINTWISE = {aten.hardtanh_backward.default}
# Operations whose result depends on the strides of an input: the layout pass leaves graphs with
# them alone.
_STRIDE_DEPENDENT = {
    aten.as_strided.default,
    aten.as_strided_.default,
    aten.as_strided_scatter.default,
}
_MAX_VARIANTS = 8  # graphs kept per compiled function (one per set of shape guards broken)


# --------------------------------------------------------------------------------------------------
# Capture
# --------------------------------------------------------------------------------------------------


class Variant:
    """One captured graph and the conditions on the dynamic sizes under which it is valid."""

    def __init__(self, gm: fx.GraphModule, symbols: list, guards: list, out_spec):
        self.gm = gm
        self.forward = gm.forward
        self.symbols = symbols  # one sympy symbol (or None where specialised) per dynamic size
        self.guards = guards  # sympy boolean expressions over the symbols
        self.out_spec = out_spec
        # Random operations (a training-mode Dropout): run on a fork of torch's random state.
        self.random = any(
            n.op == "call_function"
            and isinstance(n.target, torch._ops.OpOverload)
            and torch.Tag.nondeterministic_seeded in n.target.tags
            for n in gm.graph.nodes
        )
        self._ok: dict = {}

    def pinned(self, position: int) -> int | None:
        """The one value the graph holds for at dynamic size ``position``, if its capture pinned
        it (torch's forward mode under ``vmap`` reads some sizes as integers), else ``None``."""
        s = self.symbols[position]
        for g in self.guards:
            if getattr(g, "is_Equality", False) and s in (g.lhs, g.rhs):
                other = g.rhs if g.lhs == s else g.lhs
                if getattr(other, "is_Integer", False):
                    return int(other)
        return None

    def accepts(self, sizes: tuple) -> bool:
        ok = self._ok.get(sizes)
        if ok is None:
            subs = {s: v for s, v in zip(self.symbols, sizes) if s is not None}
            try:
                ok = all(bool(g.xreplace(subs)) for g in self.guards)
            except TypeError:  # a condition on a size this graph cannot read: not valid
                ok = False
            if len(self._ok) < 256:
                self._ok[sizes] = ok
        return ok


def capture(fn: Callable, fakes_for: Callable) -> Variant:
    """Traces ``fn(*flat_args) -> flat list of tensors`` into a graph with symbolic sizes.

    ``fakes_for(mode)`` returns the fake arguments (made with ``mode``'s ``from_tensor`` and a
    symbolic context marking the dynamic axes) and the list of their dynamic ``SymInt`` sizes.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    shape_env = ShapeEnv(duck_shape=False, specialize_zero_one=False)
    mode = FakeTensorMode(shape_env=shape_env, allow_non_fake_inputs=True)
    fakes, dyn_sizes = fakes_for(mode)
    out_spec = []

    def traced(*flat):
        out = fn(*flat)
        leaves, spec = torch.utils._pytree.tree_flatten(out)
        out_spec.append(spec)
        return leaves

    with _size_oblivious(), _forward_mode_on_symbolic_sizes(), _quiet_fake_tensors():
        gm = make_fx(torch.func.functionalize(traced), tracing_mode="symbolic")(*fakes)
    symbols = []
    for size in dyn_sizes:
        node = getattr(size, "node", None)
        expr = getattr(node, "_expr", None) or getattr(node, "expr", None)
        symbols.append(expr if expr is not None and expr.free_symbols else None)
    guards = [g.expr for g in shape_env.guards]
    replacements = getattr(shape_env, "replacements", {})
    for s in symbols:
        if s is not None and s in replacements:
            # Unified with another size, or specialised: the graph holds under that equality.
            import sympy

            guards.append(sympy.Eq(s, replacements[s]))
    gm = optimize(gm)
    return Variant(gm, symbols, guards, out_spec[-1])


@contextlib.contextmanager
def _quiet_fake_tensors():
    """torch logs a failed fake-tensor kernel at ERROR with a C++ stack before raising; a failed
    capture is not an error for augnet (it runs the block eagerly, and says so at DEBUG)."""
    log = logging.getLogger("torch._subclasses.fake_tensor")
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        log.setLevel(level)


def _size_oblivious():
    """torch's own checks (contiguity, broadcasting) treat dynamic sizes as not 1 without a guard
    (as ``torch.export`` does), so one graph serves batch 1 too; code that branches on a size
    still records a guard."""
    try:
        from torch.fx.experimental import _config

        return _config.patch(backed_size_oblivious=True)
    except Exception:  # pragma: no cover - an older torch: batch 1 is captured on its own
        return contextlib.nullcontext()


@contextlib.contextmanager
def _forward_mode_on_symbolic_sizes():
    """A fake-tensor rule for ``aten._new_zeros_with_same_feature_meta``, which forward mode under
    ``vmap`` (a JVP per input element) calls and whose meta kernel reads a storage offset that
    symbolic sizes do not have (torch 2.13). Only while augnet captures a graph."""
    try:
        from torch._subclasses import fake_impls
    except ImportError:  # pragma: no cover
        yield
        return
    op = aten._new_zeros_with_same_feature_meta.default
    table = fake_impls.op_implementations_dict

    def zeros_like_feature(fake_mode, func, self, other, self_num_batch_dims=0):
        # As the C++ kernel lays it out: ``other``'s sizes and strides (and storage offset),
        # preceded by ``self``'s leading batch axes, each spanning a whole copy of other's storage.
        k = self_num_batch_dims
        span = 1 + other.storage_offset()
        for size, stride in zip(other.shape, other.stride()):
            span = span + (size - 1) * stride
        strides = [0] * k + list(other.stride())
        total = span
        for i in reversed(range(k)):
            strides[i] = total
            total = total * self.shape[i]
        sizes = [*self.shape[:k], *other.shape]
        # (Operations on a fake tensor here dispatch through its own fake mode.)
        return other.new_zeros([total]).as_strided(sizes, strides, other.storage_offset())

    added = op not in table
    if added:
        table[op] = zeros_like_feature
    try:
        yield
    finally:
        if added:
            table.pop(op, None)


def optimize(gm: fx.GraphModule) -> fx.GraphModule:
    """Plain positional arguments, the layout pass (when it applies) and dead code removed."""
    try:
        out = optimize_layout(gm)
    except Exception as exc:  # pragma: no cover - the pass bails out on anything unusual
        logger.debug("augnet: layout pass skipped: %s", exc)
        out = gm
    if out is gm:
        out.graph._codegen = fx.graph.CodeGen()  # no pytree flattening per call
    eliminate_common_subexpressions(out.graph)
    out.graph.eliminate_dead_code()
    out.recompile()
    return out


def eliminate_common_subexpressions(graph: fx.Graph) -> None:
    """One node for each repeated pure operation on the same arguments (the backward passes of a
    Jacobian repeat the weights' transposes, index ranges, ...)."""
    seen: dict = {}
    for n in list(graph.nodes):
        if n.op != "call_function" or not isinstance(n.target, torch._ops.OpOverload):
            continue
        schema = n.target._schema
        if schema.is_mutable or torch.Tag.nondeterministic_seeded in n.target.tags:
            continue
        try:
            key = (n.target, _hashable(n.args), _hashable(n.kwargs))
            hash(key)
        except TypeError:
            continue
        if key in seen:
            n.replace_all_uses_with(seen[key])
            graph.erase_node(n)
        else:
            seen[key] = n


def _hashable(value):
    if isinstance(value, list | tuple):
        return (type(value).__name__, tuple(_hashable(v) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple((k, _hashable(v)) for k, v in sorted(value.items())))
    if isinstance(value, torch.SymInt | torch.SymFloat | torch.Tensor):
        raise TypeError("not a constant")
    return value


# --------------------------------------------------------------------------------------------------
# The layout pass
# --------------------------------------------------------------------------------------------------


def _is_pointwise(target) -> bool:
    return isinstance(target, torch._ops.OpOverload) and (
        torch.Tag.pointwise in target.tags or target in _EXTRA_POINTWISE
    )


def _is_view(target) -> bool:
    if not isinstance(target, torch._ops.OpOverload):
        return False
    returns = target._schema.returns
    return bool(returns) and returns[0].alias_info is not None and not target._schema.is_mutable


# Operations that compute the same values from any strides (a copy into a memory format ahead
# of them can go); others (e.g. native_layer_norm_backward) may need the copy.
_ANY_LAYOUT = {
    aten.convolution.default,
    aten.convolution_backward.default,
    aten.max_pool2d_with_indices.default,
    aten.max_pool2d_with_indices_backward.default,
    aten.avg_pool2d.default,
    aten.avg_pool2d_backward.default,
    aten.permute.default,
    aten.clone.default,
    aten.view.default,
    aten._unsafe_view.default,
    aten.mm.default,
}


def _takes_any_layout(user) -> bool:
    return user.op == "call_function" and (user.target in _ANY_LAYOUT or _is_pointwise(user.target))


def _root(node):
    """The node whose storage ``node`` views (following view operations)."""
    while (
        isinstance(node, fx.Node)
        and node.op == "call_function"
        and _is_view(node.target)
        and node.args
        and isinstance(node.args[0], fx.Node)
    ):
        node = node.args[0]
    return node


def _mutated_roots(graph: fx.Graph) -> set:
    roots = set()
    for n in graph.nodes:
        if n.op != "call_function" or not isinstance(n.target, torch._ops.OpOverload):
            continue
        if not n.target._schema.is_mutable:
            continue
        for spec, arg in zip(n.target._schema.arguments, n.args):
            if spec.alias_info is not None and spec.alias_info.is_write:
                for a in arg if isinstance(arg, list | tuple) else [arg]:
                    if isinstance(a, fx.Node):
                        roots.add(_root(a))
    return roots


def _val(node):
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def optimize_layout(gm: fx.GraphModule) -> fx.GraphModule:
    """Moves transposes (``permute``) through pointwise operations until they cancel, drops copies
    that only change a memory format, and gives convolutions contiguous kernels.

    Every value keeps its logical shape and contents; only strides (and so which kernels torch
    picks) change. A node is left as it is when its storage is written in place anywhere in the
    graph (aliasing matters there); a graph with stride-dependent operations (``as_strided``) is
    returned unchanged. Returns a new module (or ``gm`` itself when the pass does not apply).
    """
    graph = gm.graph
    if any(n.op == "call_function" and n.target in _STRIDE_DEPENDENT for n in graph.nodes):
        return gm
    mutated = _mutated_roots(graph)
    new = fx.Graph()
    env: dict = {}  # old node -> (new node, permutation or None): old value = permute(new, perm)
    memo: dict = {}

    def materialize(old):
        base, perm = env[old]
        if perm is None:
            return base
        key = ("permute", base, perm)
        if key not in memo:
            memo[key] = new.call_function(aten.permute.default, (base, list(perm)))
        return memo[key]

    def contiguous(node):
        key = ("contiguous", node)
        if key not in memo:
            memo[key] = new.call_method("contiguous", (node,))
        return memo[key]

    def plain(n):
        return new.node_copy(n, materialize)

    for n in graph.nodes:
        if n.op == "placeholder":
            env[n] = (new.node_copy(n), None)
            continue
        if n.op == "output":
            new.output(fx.node.map_arg(n.args[0], materialize))
            continue
        if n.op != "call_function":
            env[n] = (plain(n), None)
            continue
        target = n.target
        safe = _root(n) not in mutated and all(
            _root(u) not in mutated for u in n.users if u.op == "call_function"
        )
        if not safe:
            env[n] = (plain(n), None)
            continue
        if target is aten.detach.default:
            env[n] = env[n.args[0]]
            continue
        if target is aten.permute.default:
            base, p0 = env[n.args[0]]
            rank = len(n.args[1])
            dims = [d % rank for d in n.args[1]]
            p0 = p0 or tuple(range(rank))
            composed = tuple(p0[d] for d in dims)
            env[n] = (base, None if composed == tuple(range(rank)) else composed)
            continue
        if (
            target is aten.clone.default
            and len(n.args) == 1
            and all(_takes_any_layout(u) for u in n.users)
        ):
            env[n] = env[n.args[0]]  # a copy into a memory format: the same values
            continue
        if target in (aten.view.default, aten._unsafe_view.default):
            # The input's strides may differ from the original graph's: reshape copies if needed.
            args = fx.node.map_arg(n.args, materialize)
            env[n] = (new.call_function(aten.reshape.default, args), None)
            continue
        if target in (aten.convolution.default, aten.convolution_backward.default):
            # Keras hands torch a transposed view of its (kh, kw, in, out) kernel, which makes
            # torch choose channels-last kernels; a contiguous kernel computes as a port would.
            args = list(fx.node.map_arg(n.args, materialize))
            w = 1 if target is aten.convolution.default else 2
            args[w] = contiguous(args[w])
            node = new.create_node("call_function", target, tuple(args), dict(n.kwargs))
            node.meta = dict(n.meta)
            env[n] = (node, None)
            continue
        if _is_pointwise(target):
            moved = _pointwise(n, env, new)
            if moved is not None:
                env[n] = moved
                continue
        env[n] = (plain(n), None)
    new.eliminate_dead_code()
    new.lint()
    return fx.GraphModule(gm, new)


def _pointwise(n, env: dict, new: fx.Graph):
    """``op(permute(a, P), ...) -> permute(op(a, ...), P)`` when every full-rank operand carries the
    same pending transpose ``P`` and the others broadcast (they are reshaped and transposed by
    ``P``'s inverse). ``None`` when that does not apply."""
    out = _val(n)
    if not isinstance(out, torch.Tensor):
        return None
    rank = out.dim()
    perms = {env[a][1] for a in n.all_input_nodes if env[a][1] is not None}
    if len(perms) != 1:
        return None
    (perm,) = perms
    if len(perm) != rank:
        return None
    inverse = [perm.index(i) for i in range(rank)]
    ok = True

    def convert(a):
        nonlocal ok
        if not isinstance(a, fx.Node):
            return a
        base, pa = env[a]
        if pa == perm:
            return base
        v = _val(a)
        if pa is not None or not isinstance(v, torch.Tensor) or v.dim() > rank:
            ok = False
            return base
        if v.dim() == 0:
            return base
        if v.dim() == rank and any(isinstance(d, torch.SymInt) or d != 1 for d in v.shape[:1]):
            # A full-size operand without the transpose: transposing it would make the
            # operation strided; leave this node as it is.
            ok = False
            return base
        shape = [1] * (rank - v.dim()) + list(v.shape)
        x = base if v.dim() == rank else new.call_function(aten.view.default, (base, shape))
        return new.call_function(aten.permute.default, (x, inverse))

    args = fx.node.map_aggregate(n.args, convert)
    kwargs = fx.node.map_aggregate(n.kwargs, convert)
    if not ok:
        return None
    node = new.create_node("call_function", n.target, args, kwargs)
    node.meta = dict(n.meta)
    return node, perm
