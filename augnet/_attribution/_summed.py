"""Weighted sums of Jacobians over many points, each computed as the Jacobian of one function.

SmoothGrad and integrated gradients need, for every sample ``i`` and selected output ``k``,

    S_ik = Σ_j w_j ∂y_k/∂x (p_ij)

over ``n`` points ``p_ij`` (noisy copies, points on a path). Computing the Jacobian at every
point and summing afterwards costs ``n`` Jacobian rows per sample and output, all of which pass
through memory. But the points are affine in ``x`` with offsets that do not depend on it, so
the sum is itself a Jacobian:

- SmoothGrad: ``p_ij = x_i + σ_i z_j`` (``z_j`` a standard normal vector, ``σ_i`` the sample's
  noise level). With ``g(x, σ) = Σ_j w_j f(x + σ z_j)``, ``∂g/∂x = Σ_j w_j J(p_j)``: exactly
  ``S``. (``∂g/∂σ``, one number per sample and output, is computed along and dropped.)
- Integrated gradients: ``p_ij = x0_i + α_j (x_i − x0_i)``. With
  ``g(x, x0) = Σ_j w_j f(x0 + α_j (x − x0))``, ``∂g/∂x = Σ_j w_j α_j J(p_j)`` and
  ``∂g/∂x0 = Σ_j w_j (1 − α_j) J(p_j)``: their sum is exactly ``S``.

So one engine call on ``g`` -- a Keras model wrapping the caller's, :class:`PointSum` -- gives
``S`` for a batch of samples: one forward pass over the ``b·n`` stacked points and, per selected
output, ONE backward pass whose cotangents are summed over the copies inside the graph. The
per-point Jacobian rows are never materialised: what leaves the engine is ``(b, k, *input)``
(twice, for IG), not ``(b·n, k, *input)``. The arithmetic of the network's backward pass is the
same as computing every row; what is saved is the memory traffic of the rows, their copy out of
the framework and the sum over them in NumPy.

The copies' ``z_j`` (SmoothGrad) or ``α_j`` (IG) and the weights ``w_j`` are non-trainable
variables of the wrapper: the same compiled function serves every call with the same number of
copies per group and the same input shapes (assigning them does not retrace). When one sample's
copies do not fit the memory budget in one pass they are split into groups, each one engine call,
summed in float64.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import OrderedDict

import numpy as np

from augnet._structure import unflatten as _unflatten

logger = logging.getLogger(__name__)

MAX_WRAPPERS = 8  # PointSum wrappers kept (each keeps its model and a compiled function alive)

_WRAPPERS: OrderedDict = OrderedDict()
_LOCK = threading.Lock()
_CLASSES = None


def _layer_classes():
    """The two Keras layers of a :class:`PointSum` model (Keras imported on first use)."""
    global _CLASSES
    if _CLASSES is not None:
        return _CLASSES
    import keras
    from keras import ops

    class CopyPoints(keras.layers.Layer):
        """``[*xs, *extras] -> [(b·n, *input_shape_i)]``: the ``n`` points of every sample.

        ``kind="noise"``: extras are ``σ`` ``(b, 1)`` per input, ``p_j = x + σ z_j`` (``z_j``:
        the variable ``banks[i][j]``); ``kind="path"``: extras are the baselines ``x0`` per
        input, ``p_j = x0 + α_j (x − x0)`` (``α_j``: the variable ``alphas[j]``).
        """

        def __init__(self, kind, n, in_shapes, **kwargs):
            super().__init__(**kwargs)
            self.kind, self.n = kind, int(n)
            self.in_shapes = [tuple(int(d) for d in s) for s in in_shapes]
            if kind == "noise":
                self.banks = [
                    self.add_weight(
                        shape=(self.n, *s), initializer="zeros", trainable=False, name=f"bank_{i}"
                    )
                    for i, s in enumerate(self.in_shapes)
                ]
            else:
                self.alphas = self.add_weight(
                    shape=(self.n,), initializer="zeros", trainable=False, name="alphas"
                )

        def call(self, inputs):
            n, count = self.n, len(self.in_shapes)
            xs, extras = list(inputs[:count]), list(inputs[count:])
            points = []
            for i, (x, shape) in enumerate(zip(xs, self.in_shapes)):
                ones = (1,) * len(shape)
                if self.kind == "noise":
                    sigma = ops.reshape(extras[i], (-1, 1, *ones))
                    bank = ops.cast(self.banks[i], x.dtype)
                    p = ops.expand_dims(x, 1) + sigma * ops.expand_dims(bank, 0)
                else:
                    x0 = extras[i]
                    alpha = ops.reshape(ops.cast(self.alphas, x.dtype), (1, n, *ones))
                    p = ops.expand_dims(x0, 1) + alpha * ops.expand_dims(x - x0, 1)
                points.append(ops.reshape(p, (-1, *shape)))
            return points

        def compute_output_spec(self, inputs):
            count = len(self.in_shapes)
            return [
                keras.KerasTensor((None, *s), dtype=x.dtype)
                for x, s in zip(inputs[:count], self.in_shapes)
            ]

    class CopyMean(keras.layers.Layer):
        """``[(b·n, *out_shape_o)] -> (b, M)``: ``Σ_j w_j y_j`` per sample, the outputs
        flattened and concatenated (``w_j``: the variable ``copy_weights[j]``)."""

        def __init__(self, n, **kwargs):
            super().__init__(**kwargs)
            self.n = int(n)
            self.copy_weights = self.add_weight(
                shape=(self.n,), initializer="zeros", trainable=False, name="copy_weights"
            )

        def call(self, outputs):
            n = self.n
            # (b·n, *out_shape) per output -> (b, n, M): static sizes (the batch is dynamic)
            flat = [ops.reshape(t, (-1, n, _size(t.shape[1:]))) for t in outputs]
            flat = flat[0] if len(flat) == 1 else ops.concatenate(flat, axis=2)
            w = ops.reshape(ops.cast(self.copy_weights, flat.dtype), (1, n, 1))
            return ops.sum(flat * w, axis=1)

        def compute_output_spec(self, outputs):
            total = sum(_size(t.shape[1:]) for t in outputs)
            return keras.KerasTensor((None, total), dtype=outputs[0].dtype)

    _CLASSES = (CopyPoints, CopyMean)
    return _CLASSES


def _size(shape) -> int:
    return int(np.prod([int(d) for d in shape], dtype=np.int64))


def _leaves(y) -> list:
    if isinstance(y, dict):
        return [y[k] for k in y]
    if isinstance(y, list | tuple):
        return list(y)
    return [y]


class PointSum:
    """The Keras model ``g`` (``model``: ``[*xs, *extras] -> (b, M)``, a functional model whose
    nested model is the caller's, weights shared) and its variables: ``points.banks`` /
    ``points.alphas`` and ``mean.copy_weights``; ``n`` copies per sample; ``lock`` held while
    they are assigned and used."""

    def __init__(self, model, kind: str, n: int, in_shapes, structure, dtype):
        import keras

        CopyPoints, CopyMean = _layer_classes()
        self.n, self.kind = int(n), kind
        self.lock = threading.Lock()
        xs = [keras.Input(s, dtype=dtype) for s in in_shapes]
        extras = [keras.Input((1,) if kind == "noise" else s, dtype=dtype) for s in in_shapes]
        self.points = CopyPoints(kind, n, in_shapes, dtype=dtype, name="augnet_copies")
        self.mean = CopyMean(n, dtype=dtype, name="augnet_copy_mean")
        points = self.points([*xs, *extras])
        y = model(_unflatten(points, structure), training=False)
        self.model = keras.Model([*xs, *extras], self.mean(_leaves(y)), name="augnet_point_sum")


def supported(problem) -> bool:
    """Whether the sums can be one Jacobian: a Keras model (a plain callable cannot be nested in
    a Keras model; its copies' Jacobians are summed instead) that can be called on symbolic
    inputs."""
    try:
        import keras
    except ImportError:  # pragma: no cover
        return False
    if not isinstance(problem.model, keras.Model):
        return False
    try:
        wrapper(problem, "path", 1)
    except Exception as exc:  # a model that cannot be called symbolically: sum the copies
        logger.debug("augnet: summing the copies' Jacobians instead (%s)", exc)
        return False
    return True


def wrapper(problem, kind: str, n: int) -> PointSum:
    """The cached :class:`PointSum` for ``problem``'s model, ``kind`` and ``n`` copies per
    group (the least recently used of more than ``MAX_WRAPPERS`` is dropped)."""
    model = problem.model
    structure = problem.structure  # the caller's nesting, which the model is called with
    key = (id(model), kind, int(n), tuple(problem.in_shapes), problem.dtype.str, structure)
    with _LOCK:
        entry = _WRAPPERS.get(key)
        if entry is not None and entry[0] is model:
            _WRAPPERS.move_to_end(key)
            return entry[1]
    made = PointSum(model, kind, n, problem.in_shapes, structure, problem.dtype.name)
    with _LOCK:
        _WRAPPERS[key] = (model, made)
        while len(_WRAPPERS) > MAX_WRAPPERS:
            _WRAPPERS.popitem(last=False)
    return made


def clear() -> None:
    """Drops every cached wrapper (and with them the models and compiled functions they keep)."""
    with _LOCK:
        _WRAPPERS.clear()


# --------------------------------------------------------------------------------------------------
# Planning: points per engine pass, copies per group
# --------------------------------------------------------------------------------------------------


def points_per_pass(problem) -> int:
    """Points (copies of samples) one engine pass may hold: the caller's ``batch_size``, else
    what fits half of ``max_memory`` (the other half for the pass's result block): per point its
    input and, twice, its activations (the taped forward pass and one backward pass in flight)."""
    if problem.batch_size is not None:
        return problem.batch_size
    per_point = 2 * problem.act_bytes + 2 * sum(
        int(np.prod(s)) * problem.itemsize for s in problem.in_shapes
    )
    return int(max(1, min(1 << 16, (problem.max_memory // 2) // max(per_point, 1))))


def plan_groups(problem, n: int) -> tuple[int, int, int]:
    """``(copies per group, groups, samples per pass)``: the ``n`` copies of a sample split into
    ``groups`` equal groups (the last one padded with zero-weight copies) so that one sample's
    group fits a pass, and as many samples per pass as fit with it."""
    cap = points_per_pass(problem)
    groups = math.ceil(n / max(1, min(cap, n)))
    per_group = math.ceil(n / groups)
    samples = max(1, min(problem.batch, cap // per_group))
    return per_group, groups, samples


# --------------------------------------------------------------------------------------------------
# The sums
# --------------------------------------------------------------------------------------------------


def _engine_outputs(problem):
    if problem.kind == "all":
        return None
    if problem.kind == "per_sample":
        return problem.rows
    return [int(r) for r in problem.rows]


def summed_jacobian(problem, g, extras: list, samples_per_pass: int) -> list[np.ndarray]:
    """``augnet.jacobian`` of the wrapper ``g`` at the problem's inputs plus ``extras``: one
    ``(batch, m, *input_shape_i)`` per input and per extra (a module-level function so that
    tests can count the engine calls)."""
    import augnet

    J = augnet.jacobian(
        g.model,
        [*problem.leaves, *extras],
        outputs=_engine_outputs(problem),
        batch_size=samples_per_pass,
        max_memory=problem.max_memory,
        **problem.engine,
    )
    return [np.asarray(j).reshape(problem.batch, problem.m, *np.shape(j)[2:]) for j in J]


def noise_sums(problem, bank_for, sigmas: list[np.ndarray], n: int) -> list[np.ndarray]:
    """``(1/n) Σ_j J(x_i + σ_i z_j)`` per input ``(batch, m, *input_shape_i)`` float64.

    ``bank_for(start, stop)`` returns the standard normal vectors of copies ``start..stop-1``,
    one ``(stop - start, *input_shape_i)`` array per input (the same for every sample);
    ``sigmas`` one ``(batch,)`` array per input."""
    per_group, groups, samples = plan_groups(problem, n)
    g = wrapper(problem, "noise", per_group)
    extras = [np.asarray(s, dtype=problem.dtype).reshape(-1, 1) for s in sigmas]
    totals = [np.zeros((problem.batch, problem.m, *s)) for s in problem.in_shapes]
    count = len(problem.leaves)
    for start in range(0, n, per_group):
        stop = min(n, start + per_group)
        banks = bank_for(start, stop)
        weights = np.zeros(per_group, dtype=problem.dtype)
        weights[: stop - start] = 1.0 / n
        with g.lock:
            for var, bank in zip(g.points.banks, banks):
                full = np.zeros((per_group, *bank.shape[1:]), dtype=problem.dtype)
                full[: stop - start] = bank
                var.assign(full)
            g.mean.copy_weights.assign(weights)
            J = summed_jacobian(problem, g, extras, samples)
        for i in range(count):
            totals[i] += J[i]
    return totals


def path_sums(problem, x0: list[np.ndarray], alphas, weights) -> list[np.ndarray]:
    """``Σ_j w_j J(x0_i + α_j (x_i − x0_i))`` per input ``(batch, m, *input_shape_i)``
    float64 (``∂g/∂x + ∂g/∂x0``, see the module docstring)."""
    n = len(alphas)
    per_group, groups, samples = plan_groups(problem, n)
    g = wrapper(problem, "path", per_group)
    extras = [np.ascontiguousarray(b, dtype=problem.dtype) for b in x0]
    totals = [np.zeros((problem.batch, problem.m, *s)) for s in problem.in_shapes]
    count = len(problem.leaves)
    for start in range(0, n, per_group):
        stop = min(n, start + per_group)
        a = np.zeros(per_group, dtype=problem.dtype)
        w = np.zeros(per_group, dtype=problem.dtype)
        a[: stop - start] = alphas[start:stop]
        w[: stop - start] = weights[start:stop]
        with g.lock:
            g.points.alphas.assign(a)
            g.mean.copy_weights.assign(w)
            J = summed_jacobian(problem, g, extras, samples)
        for i in range(count):
            totals[i] += J[i]
            totals[i] += J[count + i]
    return totals
