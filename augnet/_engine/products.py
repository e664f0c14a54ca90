"""Vector-Jacobian and Jacobian-vector products per sample, and per-sample parameter gradients.

``augnet.vjp`` and ``augnet.jvp`` go through the same compiled, cached path as the Jacobian: the
target is prepared (and, for one array of a shape seen before, remembered), and the product is one
call of a compiled block (``blocks.compiled(target, "vjp" | "jvp", ...)``), traced once per input
signature; other batch sizes reuse it. Inside a caller's ``tf.function`` the block runs uncompiled
and returns tensors.
"""

from __future__ import annotations

from collections import OrderedDict

import keras
import numpy as np

from augnet import _backend as B
from augnet import _derivatives as D
from augnet._engine import blocks
from augnet._engine.checks import as_batch_leaf, check_finite, check_real, check_x_kind
from augnet._engine.logits import maybe_logits
from augnet._engine.memory import check_result_size
from augnet._engine.target import Target, cache_for, floatx_name, infer_outputs, prepare_target
from augnet._errors import format_shape
from augnet._structure import DICT, SINGLE, check_numeric, flatten, unflatten

_MAX_TARGETS = 16  # prepared targets remembered per callable


def prepared_target(fn, x, training: bool, derivatives) -> tuple[Target, list]:
    """``prepare_target`` + ``infer_outputs``, remembered per callable for repeated eager calls
    with one array of the same shape and dtype (the checks already passed for it)."""
    key = None
    if derivatives is None and not B.is_symbolic(x):
        if isinstance(x, np.ndarray):
            key = ("product", "ndarray", x.shape, x.dtype, training)
        elif B.is_eager_tensor(x):
            key = ("product", "tensor", tuple(x.shape), B.dtype_name(x.dtype), training)
    if key is not None:
        key = (*key, D.registry_key(), floatx_name())
        targets = cache_for(fn).setdefault("targets", OrderedDict())
        target = targets.get(key)
        if target is not None:
            targets.move_to_end(key)
            tensors = [B.convert(x, target.dtype)]
            check_finite(tensors, target.in_names)
            return target, tensors
    target, tensors = prepare_target(fn, x, training, derivatives)
    infer_outputs(target, tensors)
    if key is not None:
        targets[key] = target
        while len(targets) > _MAX_TARGETS:
            targets.popitem(last=False)
    return target, tensors


def _leaves_like(value, structure, names: list[str], argument: str, what: str) -> list:
    """Flattens ``value`` in the order of ``names`` (the leaves of ``structure``)."""
    leaves, given = flatten(value, argument)
    if structure.kind == DICT:
        if given.kind != DICT:
            raise TypeError(
                f"`{argument}` must be a dict with the keys {list(structure.keys)} of the "
                f"{what}; received {type(value).__name__}."
            )
        by_name = {f"x[{k!r}]": v for k, v in zip(given.keys, leaves)}
        missing = [n for n in names if n not in by_name]
        if missing or len(by_name) != len(names):
            raise ValueError(
                f"`{argument}` has keys {list(given.keys)}, but the {what} are "
                f"{list(structure.keys)}. Pass one array per {what[:-1]}."
            )
        return [by_name[n] for n in names]
    if len(leaves) != len(structure):
        raise ValueError(
            f"`{argument}` holds {len(leaves)} array(s), but the model has {len(structure)} "
            f"{what}. Pass {'one array' if structure.kind == SINGLE else 'a list of ' + str(len(structure))}"
            f" with a batch axis first."
        )
    return leaves


def _check_product_argument(value, argument: str) -> None:
    """A tangent/cotangent is an array (or a list/dict of them) of real numbers."""
    if value is None:
        if argument == "tangent":
            raise TypeError(
                "`tangent` is None; pass the direction v of the product ∂y/∂x·v, shaped like `x` "
                "(batch, *input_shape) (a list/dict of arrays for several inputs), e.g. "
                "np.ones_like(x). For the full Jacobian use augnet.jacobian(model, x)."
            )
        raise TypeError(
            "`cotangent` is None; pass the vector u of the product uᵀ·∂y/∂x, shaped like the "
            "model's outputs (batch, *output_shape) (a list/dict for several outputs), e.g. "
            "np.ones((batch, *output_shape)) for the gradient of the outputs' sum. For the full "
            "Jacobian use augnet.jacobian(model, x)."
        )
    shape = "(batch, *input_shape)" if argument == "tangent" else "(batch, *output_shape)"
    check_x_kind(value, argument, shape)


def _real_leaf(leaf, argument: str):
    """One tangent/cotangent leaf, checked: numeric, real, finite."""
    leaf = as_batch_leaf(leaf, argument)
    check_real(check_numeric(leaf, argument), argument)
    return leaf


def _check_batch_shape(leaf, expected: tuple, batch: int, argument: str):
    shape = tuple(np.shape(leaf))
    if shape != (batch, *expected):
        raise ValueError(
            f"`{argument}` has shape {format_shape(shape)}, expected {format_shape((batch, *expected))}"
            f" (batch, *shape) to match the model and `x`. Reshape it, or use np.broadcast_to."
        )


def _out_names(target) -> list[str]:
    s = target.out_structure
    return ["y"] if s.kind == SINGLE else [f"x[{k!r}]" for k in s.keys]


def _flat_rows(leaves: list, batch: int, dtype, symbolic: bool):
    """Leaves ``(batch, *shape_i)`` -> one ``(batch, sum_i prod(shape_i))`` tensor of ``dtype``."""
    if symbolic:
        return B.concat([B.flatten_samples(B.convert(v, dtype)) for v in leaves], axis=1)
    rows = [np.asarray(B.to_numpy(v) if B.is_eager_tensor(v) else v) for v in leaves]
    rows = [r.reshape(batch, -1) for r in rows]
    flat = rows[0] if len(rows) == 1 else np.concatenate(rows, axis=1)
    return B.convert(np.ascontiguousarray(flat, dtype=dtype), dtype)


def vjp(model, x, cotangent, *, training: bool = False, derivatives=None, logits: bool = False):
    """Per-sample vector-Jacobian products ``uᵀ·∂y/∂x`` (one backward pass).

    Args:
        model: a ``keras.Model`` or a callable built of the backend's ops.
        x: ``(batch, *input_shape)``, or a list/dict of them (as for ``return_jacobian``).
        cotangent: ``u``, shaped like the outputs: ``(batch, *output_shape)``, or a list/dict with
            one array per output.
        training: the forward pass's mode (see ``augnet.jacobian``).
        derivatives: ``{LayerClass: rule}`` custom derivative rules for this call.
        logits: the product for the scores before the model's final softmax/sigmoid (see
            ``augnet.jacobian``); ``cotangent`` is then shaped like them (the same shape).

    Returns:
        ``(batch, *input_shape)`` shaped like ``x`` (the same list/dict structure): sample ``b`` is
        ``Σ_o u[b, o] · ∂y[b, o]/∂x[b]``. NumPy arrays (tensors inside ``tf.function``).

    Example:
        >>> g = augnet.vjp(model, x, np.ones((8, 2), "float32"))   # doctest: +SKIP
        >>> g.shape == x.shape                                      # doctest: +SKIP
        True
    """
    model = maybe_logits(model, logits)
    target, tensors = prepared_target(model, x, training, derivatives)
    _check_product_argument(cotangent, "cotangent")
    batch = int(tensors[0].shape[0])
    names = _out_names(target)
    leaves = _leaves_like(cotangent, target.out_structure, names, "cotangent", "outputs")
    leaves = [_real_leaf(v, "cotangent" + n[1:]) for v, n in zip(leaves, names)]
    for leaf, shape, name in zip(leaves, target.out_shapes, names):
        _check_batch_shape(leaf, shape, batch, "cotangent" + name[1:])
    symbolic = B.is_symbolic(*tensors)
    if not symbolic:
        check_result_size(batch * sum(target.in_sizes), target.dtype, "augnet.vjp", None)
    u = _flat_rows(leaves, batch, target.out_dtype, symbolic)
    if not symbolic:
        check_finite([u], ["cotangent"], "cotangent")
    state = target.state()
    if symbolic:
        grads = blocks.vjp_block(target)(state, tensors, u)
    else:
        fn = blocks.compiled(target, "vjp", training, False)
        grads = [B.to_numpy(g) for g in fn(state, tensors, u)]
    return unflatten(grads, target.in_structure)


def jvp(model, x, tangent, *, training: bool = False, derivatives=None, logits: bool = False):
    """Per-sample Jacobian-vector products ``∂y/∂x · v`` (forward mode).

    Args:
        model: a ``keras.Model`` or a callable built of the backend's ops.
        x: ``(batch, *input_shape)``, or a list/dict of them.
        tangent: ``v``, shaped like ``x`` (the same list/dict structure).
        training: the forward pass's mode.
        derivatives: ``{LayerClass: rule}``. With rules active the product is computed in reverse
            mode (the double-VJP trick), as no framework runs a custom derivative in forward mode;
            so it is where the backend's forward mode does not support the model (TensorFlow:
            recurrent layers, ``training=True``).
        logits: the product for the scores before the model's final softmax/sigmoid (see
            ``augnet.jacobian``).

    Returns:
        ``(batch, *output_shape)`` shaped like the outputs (a list/dict for several outputs):
        sample ``b`` is ``∂y[b]/∂x[b] · v[b]``. NumPy arrays (tensors inside ``tf.function``).
    """
    model = maybe_logits(model, logits)
    target, tensors = prepared_target(model, x, training, derivatives)
    _check_product_argument(tangent, "tangent")
    batch = int(tensors[0].shape[0])
    leaves = _leaves_like(tangent, target.in_structure, target.in_names, "tangent", "inputs")
    symbolic = B.is_symbolic(*tensors)
    tangents = []
    for leaf, t, shape, name in zip(leaves, tensors, target.in_shapes, target.in_names):
        leaf = _real_leaf(leaf, "tangent" + name[1:])
        _check_batch_shape(leaf, shape, batch, "tangent" + name[1:])
        tangents.append(B.convert(leaf, t.dtype))
    if not symbolic:
        check_finite(tangents, ["tangent" + name[1:] for name in target.in_names], "tangent")
        check_result_size(batch * target.total_outputs, target.out_dtype, "augnet.jvp", None)
    by_vjp = (
        target.rules is not None
        or (target.recurrent and not B.FORWARD_RECURRENT)
        or (training and not B.FORWARD_TRAINING)
    )
    state = target.state()
    if symbolic:
        y_dot = blocks.jvp_block(target, by_vjp)(state, tensors, tangents)
    else:
        fn = blocks.compiled(target, "jvp", training, False, extra=by_vjp)
        y_dot = B.to_numpy(fn(state, tensors, tangents))
    outs, start = [], 0
    for shape, size in zip(target.out_shapes, target.out_sizes):
        part = y_dot[:, start : start + size]
        outs.append(B.reshape(part, (-1, *shape)) if symbolic else part.reshape(-1, *shape))
        start += size
    return unflatten(outs, target.out_structure)


def parameter_gradients(model, x, variables: list, *, training: bool, derivatives, loss=None):
    """Per-sample gradients with respect to ``variables`` (trainable variables of ``model``).

    Without ``loss``: one row per output element, ``[(batch, M, *w_shape) per variable]`` and the
    target (for the output shapes). With ``loss = (loss_fn, y_leaves, y_structure)``: the gradient
    of each sample's ``sum(loss_fn(y[b:b+1], model(x[b:b+1])))``, ``[(batch, *w_shape)]``.
    Eager, one sample at a time (a loop of backward passes through ``B.parameter_vjp``).
    """
    target, tensors = prepare_target(model, x, training, derivatives)
    infer_outputs(target, tensors)
    batch = int(tensors[0].shape[0])
    results: list[list] = [[] for _ in variables]
    if loss is not None:
        loss_fn, y_leaves, y_structure = loss
        for b in range(batch):
            xs = [t[b : b + 1] for t in tensors]
            y_b = unflatten([np.asarray(v)[b : b + 1] for v in y_leaves], y_structure)

            def f(state, xs=xs, y_b=y_b):
                pred = unflatten(target.call(state, xs), target.out_structure)
                return keras.ops.sum(loss_fn(y_b, pred))

            value, vjp_fn = B.parameter_vjp(model, variables, f)
            for r, g in zip(results, vjp_fn(keras.ops.ones_like(value))):
                r.append(B.to_numpy(g))
        return target, [np.stack(r) for r in results]
    M = target.total_outputs
    for b in range(batch):
        xs = [t[b : b + 1] for t in tensors]
        value, vjp_fn = B.parameter_vjp(
            model, variables, lambda state, xs=xs: target.flat_output(state, xs)
        )
        rows = [vjp_fn(B.one_hot([j], M, value.dtype)) for j in range(M)]
        for i, r in enumerate(results):
            r.append(np.stack([B.to_numpy(row[i]) for row in rows]))  # (M, *w)
    return target, [np.stack(r) for r in results]  # (batch, M, *w)
