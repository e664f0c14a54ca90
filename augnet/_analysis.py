"""The chain rule layer by layer, latent and parameter sensitivity, Jacobian norms, Lipschitz.

- :func:`layer_jacobians` ``(model, x)``: each layer's Jacobian w.r.t. its input, for a chain.
- :func:`intermediate_model` ``(model, name)``: ``x -> activation`` (Jacobian: d activation / dx).
- :func:`jacobian_wrt` ``(model, x, name)``: d outputs / d an intermediate activation (also
  ``augnet.jacobian(model, x, wrt=name)`` and ``AugNet.return_jacobian(x, wrt=name)``).
- :func:`parameter_gradients` ``(model, x, y=None, loss=None)``: per-sample gradients w.r.t.
  weights.
- :func:`jacobian_norms` ``(J)``: Frobenius, spectral (power iteration), per-output L1/L2.
- :func:`local_lipschitz` ``(model, x, radius)``: max spectral norm over a neighbourhood.

Everything that differentiates goes through the engine (``augnet._engine``): ``wrt=`` is the
engine's (``augnet/_engine/sensitivity.py``) and parameter gradients are its
``parameter_gradients``; this module checks arguments, walks layers and computes norms in NumPy.
"""

from __future__ import annotations

from typing import NamedTuple

import keras
import numpy as np

from augnet import _backend, _engine
from augnet._errors import format_shape, invalid_value
from augnet._structure import SINGLE, flatten, unflatten

# --------------------------------------------------------------------------------------------------
# Layers: chain, intermediate activations
# --------------------------------------------------------------------------------------------------


def _check_model(model, argument: str = "model"):
    if not isinstance(model, keras.Model):
        raise TypeError(
            f"`{argument}` must be a keras.Model; received an object of type "
            f"{type(model).__name__}."
        )


def _is_input_layer(layer) -> bool:
    return type(layer).__name__ == "InputLayer"


def chain_layers(model) -> list:
    """The layers of a chain model in order (Sequential, or functional with one path).

    Raises:
        ValueError: the model branches, merges or shares layers (not a chain).
    """
    _check_model(model)
    layers = [layer for layer in model.layers if not _is_input_layer(layer)]
    if isinstance(model, keras.Sequential) or not layers:
        return layers
    previous = _engine.symbolic_io(model, "input")
    for layer in layers:
        nodes = getattr(layer, "_inbound_nodes", [])
        try:
            ok = len(nodes) == 1 and layer.input is previous
        except (AttributeError, ValueError):
            ok = False
        if not ok:
            raise ValueError(
                f"`model` {model.name!r} is not a chain of layers: layer {layer.name!r} does not "
                "take the previous layer's output as its only input (a branch, a merge or a "
                "shared layer). layer_jacobians needs a Sequential or single-path functional "
                "model; for other models use augnet.jacobian(model, x, wrt=layer_name) and "
                "augnet.jacobian(augnet.intermediate_model(model, layer_name), x)."
            )
        previous = layer.output
    if _engine.symbolic_io(model, "output") is not previous:
        raise ValueError(
            f"`model` {model.name!r} is not a chain: its output is not its last layer's output."
        )
    return layers


def layer_jacobians(model, x, *, derivatives=None, **engine_kwargs) -> dict:
    """The Jacobian of each layer's output with respect to its input, for a chain of layers.

    By the chain rule their product, last layer first, is the model's Jacobian:
    ``J = J_L · ... · J_2 · J_1`` per sample (with each Jacobian flattened to
    ``(m_i, n_i)``).

    Args:
        model: a Sequential model, or a functional model whose layers form one path.
        x: ``(batch, *input_shape)``.
        derivatives: ``{LayerClass: rule}`` custom derivative rules.
        **engine_kwargs: ``strategy`` (default ``"loop"``), ``batch_size``, ``chunk_size``,
            ``max_memory`` as in ``augnet.jacobian``.

    Returns:
        ``{layer_name: (batch, *layer_output_shape, *layer_input_shape)}`` in the order of the
        layers. Each layer is evaluated at its own input (the previous layer's output).

    Raises:
        ValueError: the model is not a chain (see :func:`chain_layers`).
    """
    layers = chain_layers(model)
    _check_layer_jacobians_size(layers, x)
    # Per-layer Jacobians are many small jobs: the reverse loop, unless told otherwise, rather
    # than timing every strategy for every layer.
    engine_kwargs.setdefault("strategy", "loop")
    a = x
    out = {}
    for layer in layers:
        out[layer.name] = _engine.jacobian(layer, a, derivatives=derivatives, **engine_kwargs)
        # Through the seam, as the engine calls layers (float64 computed in float64 on torch).
        a_t = keras.ops.convert_to_tensor(a)
        a = _backend.to_numpy(_backend.call_model(layer, _backend.model_state(layer), a_t, False))
    return out


def _check_layer_jacobians_size(layers: list, x) -> None:
    """All the layers' Jacobians together against the memory available, before any work."""
    from augnet._engine.memory import check_result_size

    batch = int(np.shape(x)[0]) if np.ndim(x) else 0
    total = 0
    for layer in layers:
        try:
            n_in = np.prod([int(d) for d in layer.input.shape[1:]], dtype=np.int64)
            n_out = np.prod([int(d) for d in layer.output.shape[1:]], dtype=np.int64)
        except (AttributeError, TypeError, ValueError):
            return  # a shape not known before running: each layer's own call checks itself
        total += batch * int(n_in) * int(n_out)
    dtype = x.dtype if isinstance(x, np.ndarray) and x.dtype.kind == "f" else keras.config.floatx()
    check_result_size(total, dtype, "augnet.layer_jacobians", f"{len(layers)} layers")


def intermediate_model(model, layer_name: str) -> keras.Model:
    """``x -> layer_name's output``, sharing ``model``'s weights.

    Its Jacobian, ``augnet.jacobian(intermediate_model(model, name), x)``, is the sensitivity of the
    activation to the input: ``(batch, *activation_shape, *input_shape)``.

    Args:
        model: a functional or Sequential model.
        layer_name: the name of one of its (top-level) layers.
    """
    layer = _engine.find_layer(model, layer_name)
    inputs = _engine.symbolic_io(model, "input")
    if inputs is None:
        raise TypeError(
            f"Model {model.name!r} has no functional graph (subclassed); intermediate_model needs "
            "a functional or Sequential model."
        )
    return keras.Model(inputs=inputs, outputs=layer.output, name=f"{model.name}_to_{layer_name}")


def jacobian_wrt(model, x, wrt: str, *, derivatives=None, training: bool = False, **engine_kwargs):
    """The Jacobian of the outputs with respect to an intermediate activation.

    The activation ``a`` of layer ``wrt`` is treated as a free variable and everything else
    (including skip connections from earlier layers) as fixed: ``∂y/∂a`` per sample. The same as
    ``augnet.jacobian(model, x, wrt=wrt, ...)``.

    Args:
        model: a ``keras.Model`` (functional, Sequential or subclassed) containing layer ``wrt``.
        x: ``(batch, *input_shape)``, or a list/dict of them.
        wrt: the layer's name.
        derivatives, training, **engine_kwargs: as in ``augnet.jacobian`` (``outputs``, ``top_k``,
            ``strategy``, ...).

    Returns:
        ``(batch, *output_shape, *activation_shape)`` (a list/dict per output for several
        outputs; a ``TopKJacobian`` with ``top_k``). The engine also computes (zero) blocks for
        ``x``, so the memory is that of the Jacobian with respect to ``x``.
    """
    return _engine.jacobian(
        model, x, wrt=wrt, derivatives=derivatives, training=training, **engine_kwargs
    )


# --------------------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------------------


def _select_weights(model, weights) -> list:
    variables = list(model.trainable_weights)
    if weights is None:
        return variables
    if isinstance(weights, str):
        weights = [weights]
    by_path = {v.path: v for v in variables}
    chosen = []
    for w in weights:
        if isinstance(w, str):
            matches = [v for v in variables if v.path == w] or [
                v for v in variables if v.path.endswith("/" + w) or v.name == w
            ]
            if len(matches) != 1:
                raise ValueError(
                    f"`weights` names {w!r}, which matches {len(matches)} of the model's trainable "
                    f"weights; expected exactly one. The weights are {sorted(by_path)}."
                )
            chosen.append(matches[0])
        elif any(w is v for v in variables):
            chosen.append(w)
        else:
            raise TypeError(
                invalid_value("weights", w, "weight paths like 'dense/kernel' or the variables")
            )
    return chosen


def parameter_gradients(
    model, x, y=None, loss=None, *, weights=None, training: bool = False, derivatives=None
) -> dict:
    """Per-sample gradients with respect to the model's weights.

    Without ``loss``: the Jacobian of each output element with respect to each weight. With
    ``y`` and ``loss``: the gradient of each sample's loss ``loss(y[b:b+1], model(x[b:b+1]))``.

    Args:
        model: a ``keras.Model``.
        x: ``(batch, *input_shape)``, or a list/dict of them.
        y: targets ``(batch, *output_shape)`` for ``loss``.
        loss: a Keras loss (name such as ``"mse"``, object or function ``loss(y_true, y_pred)``).
        weights: paths (``"dense/kernel"``), names or variables to include; default all trainable
            weights.
        training: the forward pass's mode.
        derivatives: ``{LayerClass: rule}`` (a ruled layer's own weights get zero gradients).

    Returns:
        ``{weight_path: array}`` with ``(batch, *weight_shape)`` per weight for a loss, and
        ``(batch, *output_shape, *weight_shape)`` for the outputs (a list/dict per output for
        several outputs).

    Raises:
        ValueError: ``y`` without ``loss`` or the reverse, an unknown weight name, a ``y`` whose
            batch differs from ``x``'s.
    """
    _check_model(model)
    if (y is None) != (loss is None):
        raise ValueError(
            f"Pass both `y` and `loss` for per-sample loss gradients, or neither for output "
            f"gradients; received y={'None' if y is None else 'an array'}, loss={loss!r}."
        )
    variables = _select_weights(model, weights)
    if not variables:
        raise ValueError(f"Model {model.name!r} has no trainable weights to differentiate.")
    shapes = [tuple(v.shape) for v in variables]
    names = [v.path for v in variables]
    if loss is not None:
        loss_fn = keras.losses.get(loss) if isinstance(loss, str | dict) else loss
        if not callable(loss_fn):
            raise TypeError(invalid_value("loss", loss, "a Keras loss name, object or function"))
        y_leaves, y_structure = flatten(y, "y")
        x_first = flatten(x)[0][0]
        batch = int(np.shape(x_first)[0]) if np.ndim(x_first) else None
        for leaf in y_leaves:
            if batch is not None and int(np.shape(leaf)[0]) != batch:
                raise ValueError(
                    f"`y` has shape {format_shape(np.shape(leaf))}, but `x` has a batch of "
                    f"{batch}; pass one target per sample."
                )
        _, grads = _engine.parameter_gradients(
            model,
            x,
            variables,
            training=training,
            derivatives=derivatives,
            loss=(loss_fn, y_leaves, y_structure),
        )
        return dict(zip(names, grads))
    target, grads = _engine.parameter_gradients(
        model, x, variables, training=training, derivatives=derivatives
    )
    out = {}
    for name, full, shape in zip(names, grads, shapes):  # full: (batch, M, *w)
        batch = full.shape[0]
        per_out, start = [], 0
        for o_shape, size in zip(target.out_shapes, target.out_sizes):
            per_out.append(full[:, start : start + size].reshape((batch, *o_shape, *shape)))
            start += size
        out[name] = unflatten(per_out, target.out_structure)
    return out


# --------------------------------------------------------------------------------------------------
# Norms and Lipschitz estimates
# --------------------------------------------------------------------------------------------------


class JacobianNorms(NamedTuple):
    """Per-sample norms of a Jacobian ``(batch, *output_shape, *input_shape)``.

    Attributes:
        frobenius: ``(batch,)``.
        spectral: ``(batch,)`` the largest singular value (operator 2-norm), by power iteration.
        l1: ``(batch, *output_shape)`` per output, the L1 norm of its gradient.
        l2: ``(batch, *output_shape)`` per output, the L2 norm of its gradient.
    """

    frobenius: np.ndarray
    spectral: np.ndarray
    l1: np.ndarray
    l2: np.ndarray


def spectral_norm(J2, *, n_iter: int = 500, tol: float = 1e-10, seed: int = 0) -> np.ndarray:
    """Largest singular value of each ``(m, n)`` matrix in ``J2`` ``(batch, m, n)``, by power
    iteration on the smaller Gram matrix (``J·Jᵀ`` or ``Jᵀ·J``). Returns ``(batch,)``."""
    J2 = np.asarray(J2, dtype="float64")
    G = J2 @ J2.transpose(0, 2, 1) if J2.shape[1] <= J2.shape[2] else J2.transpose(0, 2, 1) @ J2
    rng = np.random.default_rng(seed)
    v = rng.standard_normal(G.shape[:2])
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    lam = np.zeros(G.shape[0])
    for _ in range(n_iter):
        w = np.einsum("bij,bj->bi", G, v)
        new = np.einsum("bi,bi->b", v, w)
        norm = np.linalg.norm(w, axis=1, keepdims=True)
        v = np.where(norm > 0, w / np.where(norm > 0, norm, 1), v)
        done = np.all(np.abs(new - lam) <= tol * np.maximum(np.abs(new), 1e-300))
        lam = new
        if done:
            break
    return np.sqrt(np.maximum(lam, 0.0))


def jacobian_norms(J, *, output_ndim: int = 1, n_iter: int = 500, seed: int = 0) -> JacobianNorms:
    """Per-sample sensitivity summary of a Jacobian.

    Args:
        J: ``(batch, *output_shape, *input_shape)``, one array (for several inputs/outputs pass
            one block, e.g. ``J[0][1]``).
        output_ndim: how many axes after the batch axis are output axes (``len(output_shape)``),
            default 1, e.g. ``(batch, 13, 256, 256, 1)``.
        n_iter: power-iteration steps at most for the spectral norm.
        seed: the power iteration's starting vector.

    Returns:
        :class:`JacobianNorms` ``(frobenius (batch,), spectral (batch,), l1 (batch,
        *output_shape), l2 (batch, *output_shape))``, float64.
    """
    if isinstance(J, list | tuple | dict):
        raise TypeError(
            "`J` must be one array (batch, *output_shape, *input_shape); received a "
            f"{type(J).__name__}. For several inputs or outputs pass one block, e.g. J[0][1]."
        )
    J = np.asarray(J)
    if isinstance(output_ndim, bool) or not isinstance(output_ndim, int) or output_ndim < 0:
        raise ValueError(invalid_value("output_ndim", output_ndim, "a non-negative integer"))
    if J.ndim < 1 + output_ndim + 1:
        raise ValueError(
            f"`J` has shape {format_shape(J.shape)}, but output_ndim={output_ndim} needs at least "
            f"{output_ndim + 2} axes: (batch, *output_shape, *input_shape). Check output_ndim."
        )
    out_shape = J.shape[1 : 1 + output_ndim]
    J2 = J.reshape(J.shape[0], int(np.prod(out_shape, dtype=np.int64)), -1).astype("float64")
    l1 = np.abs(J2).sum(axis=2).reshape((J.shape[0], *out_shape))
    l2 = np.sqrt((J2**2).sum(axis=2)).reshape((J.shape[0], *out_shape))
    fro = np.sqrt((J2**2).sum(axis=(1, 2)))
    return JacobianNorms(fro, spectral_norm(J2, n_iter=n_iter, seed=seed), l1, l2)


def local_lipschitz(
    model,
    x,
    radius: float,
    n_samples: int = 16,
    *,
    seed: int | None = 0,
    derivatives=None,
    **engine_kwargs,
) -> np.ndarray:
    """Estimates each sample's local Lipschitz constant (L2 -> L2) in a ball around it.

    The maximum spectral norm of the Jacobian over the sample itself and ``n_samples`` points
    drawn uniformly in the L2 ball of ``radius`` around it. This is a **lower bound** on the
    Lipschitz constant in the ball (the true maximum may fall between the points drawn); for a
    linear model it is exact: the spectral norm of its weight matrix.

    Args:
        model: a model (or callable) with one input and one output.
        x: ``(batch, *input_shape)``.
        radius: the ball's radius (>= 0), in input units.
        n_samples: random points per sample (>= 0).
        seed: for the random points.
        derivatives, **engine_kwargs: as in ``augnet.jacobian``.

    Returns:
        ``(batch,)`` float64.
    """
    if isinstance(radius, bool) or not np.isscalar(radius) or not float(radius) >= 0:
        raise ValueError(invalid_value("radius", radius, "a non-negative number"))
    if isinstance(n_samples, bool) or not isinstance(n_samples, int | np.integer) or n_samples < 0:
        raise ValueError(invalid_value("n_samples", n_samples, "a non-negative integer"))
    leaves, structure = flatten(x)
    if structure.kind != SINGLE:
        raise ValueError(
            "local_lipschitz takes a model with one input; received `x` as a "
            f"{structure.kind} of {len(leaves)} arrays."
        )
    x = keras.ops.convert_to_numpy(leaves[0])
    if x.ndim < 2:
        raise ValueError(f"`x` has shape {format_shape(x.shape)}; expected (batch, *input_shape).")
    batch, shape = x.shape[0], x.shape[1:]
    n = int(np.prod(shape))
    rng = np.random.default_rng(seed)
    d = rng.standard_normal((batch, n_samples, n))
    d /= np.maximum(np.linalg.norm(d, axis=2, keepdims=True), 1e-300)
    r = float(radius) * rng.uniform(size=(batch, n_samples, 1)) ** (1.0 / n)
    points = x.reshape(batch, 1, n) + (d * r).astype(x.dtype)
    points = np.concatenate([x.reshape(batch, 1, n), points], axis=1).astype(x.dtype)
    points = points.reshape((batch * (n_samples + 1), *shape))
    J = _engine.jacobian(model, points, derivatives=derivatives, **engine_kwargs)
    if isinstance(J, list | tuple | dict):
        raise ValueError("local_lipschitz takes a model with one output.")
    J2 = np.asarray(J).reshape(batch * (n_samples + 1), -1, n)
    sigma = spectral_norm(J2).reshape(batch, n_samples + 1)
    return sigma.max(axis=1)


__all__ = [
    "JacobianNorms",
    "chain_layers",
    "intermediate_model",
    "jacobian_norms",
    "jacobian_wrt",
    "layer_jacobians",
    "local_lipschitz",
    "parameter_gradients",
    "spectral_norm",
]
