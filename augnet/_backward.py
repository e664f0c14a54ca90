"""Vector-Jacobian and Jacobian-vector products per sample, and backward models.

- :func:`vjp` ``(model, x, cotangent)`` -> ``cotangentᵀ·∂y/∂x`` per sample, shaped like ``x``.
- :func:`jvp` ``(model, x, tangent)`` -> ``∂y/∂x·tangent`` per sample, shaped like the outputs.
- :func:`backward_model` ``(model, gradient=None, *, jacobian=False)`` -> a ``keras.Model`` that
  computes the VJP (or the full Jacobian) as its forward pass: it can be summarised, plotted,
  saved to ``.keras``, loaded back and exported to a SavedModel for serving.

``vjp`` and ``jvp`` are the engine's (``augnet/_engine/products.py``: compiled once per input
signature and cached, like the Jacobian), so that inputs and outputs follow the same structure
rules as ``AugNet.return_jacobian`` (one array, or a list/dict of them) and derivative rules
apply. A backward model's layers compute through the autodiff seam (``augnet._backend``) inside
Keras's own call, so Keras compiles them with the model (``predict``, ``predict_on_batch``).
"""

from __future__ import annotations

import keras
import numpy as np

from augnet import _backend as B
from augnet import _engine
from augnet._engine.products import jvp, vjp
from augnet._errors import format_shape
from augnet._structure import DICT, flatten, unflatten

# --------------------------------------------------------------------------------------------------
# Backward models
# --------------------------------------------------------------------------------------------------


def _io_leaves(model, which: str, argument: str = "model"):
    io = _engine.symbolic_io(model, which)
    if io is None:
        raise TypeError(
            f"`{argument}` must be a functional or Sequential keras.Model with known inputs and "
            f"outputs; {type(model).__name__} {getattr(model, 'name', '')!r} has no "
            f"model.{which}. Build it (call it once on data) or use augnet.vjp(model, x, u)."
        )
    return flatten(io, f"model.{which}")


class _ModelLayer(keras.layers.Layer):
    """Common part: holds the forward model (a tracked sublayer, serialised in the config)."""

    def __init__(self, model, derivatives=None, **kwargs):
        kwargs.setdefault("autocast", False)  # keep the inputs' dtype (float64 stays float64)
        super().__init__(**kwargs)
        if isinstance(model, dict):
            model = keras.saving.deserialize_keras_object(model)
        self.model = model
        self.derivatives = derivatives  # Python callables: not saved; registered rules are
        in_leaves, self._in_structure = _io_leaves(model, "input")
        out_leaves, self._out_structure = _io_leaves(model, "output")
        self._in_shapes = [tuple(t.shape[1:]) for t in in_leaves]
        self._out_shapes = [tuple(t.shape[1:]) for t in out_leaves]

    def _forward(self, xs):
        out = self.model(unflatten(list(xs), self._in_structure), training=False)
        leaves, _ = flatten(out, "outputs")
        flat = [B.flatten_samples(o) for o in leaves]
        flat = [B.convert(f, flat[0].dtype) for f in flat]
        return B.concat(flat, axis=1)

    def get_config(self):
        return {**super().get_config(), "model": keras.saving.serialize_keras_object(self.model)}


@keras.saving.register_keras_serializable(package="augnet")
class VJPLayer(_ModelLayer):
    """``(x[, u]) -> uᵀ·∂model(x)/∂x`` per sample, as a Keras layer.

    Inputs: the model's inputs ``(batch, *input_shape)`` followed, when no fixed ``gradient`` is
    given, by one cotangent per model output ``(batch, *output_shape)``. Outputs: one array per
    model input, ``(batch, *input_shape)``.
    """

    def __init__(self, model, gradient=None, derivatives=None, **kwargs):
        super().__init__(model, derivatives, **kwargs)
        if gradient is None:
            self.gradient = None
        else:
            self.gradient = [np.asarray(g, dtype="float64") for g in gradient]

    def call(self, inputs):
        leaves = list(inputs) if isinstance(inputs, list | tuple) else [inputs]
        n = len(self._in_shapes)
        xs, seeds = leaves[:n], leaves[n:]
        with _engine.apply_rules(self.model, self.derivatives):
            y, vjp_fn = B.vjp(self._forward, xs)
        b = B.dim(xs[0], 0)
        if self.gradient is not None:
            flat = [
                B.repeat_samples(B.reshape(B.convert(g, y.dtype), (1, -1)), b)
                for g in self.gradient
            ]
        else:
            flat = [B.flatten_samples(B.convert(s, y.dtype)) for s in seeds]
        grads = vjp_fn(B.concat(flat, axis=1))
        return grads[0] if len(grads) == 1 else list(grads)

    def compute_output_shape(self, input_shape):
        shapes = [(None, *s) for s in self._in_shapes]
        return shapes[0] if len(shapes) == 1 else shapes

    def get_config(self):
        g = None if self.gradient is None else [a.tolist() for a in self.gradient]
        return {**super().get_config(), "gradient": g}


@keras.saving.register_keras_serializable(package="augnet")
class JacobianLayer(_ModelLayer):
    """``x -> ∂model(x)/∂x`` per sample, as a Keras layer: ``(batch, *output_shape, *input_shape)``
    (one output per (model output, model input) pair, outputs major)."""

    def call(self, inputs):
        leaves = list(inputs) if isinstance(inputs, list | tuple) else [inputs]
        x = unflatten(leaves, self._in_structure)
        J = _engine.jacobian(self.model, x, derivatives=self.derivatives, strategy="loop")
        per_out, _ = flatten(J, "J") if len(self._out_shapes) > 1 else ([J], None)
        out = []
        for j in per_out:
            inner = flatten(j, "J")[0] if len(self._in_shapes) > 1 else [j]
            out.extend(B.convert(t, t.dtype) for t in inner)
        return out[0] if len(out) == 1 else out

    def compute_output_shape(self, input_shape):
        shapes = [(None, *o, *i) for o in self._out_shapes for i in self._in_shapes]
        return shapes[0] if len(shapes) == 1 else shapes


def _seed_list(gradient, model, out_leaves, out_structure) -> list:
    leaves, given = flatten(gradient, "gradient")
    if out_structure.kind == DICT and given.kind == DICT:
        if set(given.keys) != set(out_structure.keys):
            raise ValueError(
                f"`gradient` has keys {list(given.keys)}, but the model's outputs are "
                f"{list(out_structure.keys)}; pass one seed per output."
            )
        leaves = [gradient[k] for k in out_structure.keys]
    elif len(leaves) != len(out_leaves):
        raise ValueError(
            f"`gradient` holds {len(leaves)} array(s), but model {model.name!r} has "
            f"{len(out_leaves)} outputs; pass one seed (shaped like a sample's output) per output."
        )
    seeds = []
    for leaf, o in zip(leaves, out_leaves):
        arr = np.asarray(leaf, dtype="float64")
        shape = tuple(o.shape[1:])
        if arr.shape == (1, *shape):
            arr = arr[0]
        if arr.shape != shape:
            raise ValueError(
                f"`gradient` has shape {format_shape(arr.shape)}, expected one sample's output "
                f"shape {format_shape(shape)} (or {format_shape((1, *shape))}); it is the same "
                "seed for every sample. For a seed per sample, pass gradient=None and give the "
                "seed as the backward model's second input."
            )
        seeds.append(arr)
    return seeds


def backward_model(model, gradient=None, *, jacobian: bool = False, derivatives=None, name=None):
    """A Keras model computing the vector-Jacobian product (or the Jacobian) of ``model``.

    Args:
        model: a functional or Sequential ``keras.Model`` (float inputs).
        gradient: a fixed seed ``u`` over the outputs, shaped like one sample's output
            ``output_shape`` (a list/dict for several outputs): the backward model maps
            ``x -> uᵀ·∂y/∂x``. ``None`` (default): the seed is a second input, ``[x, u]`` with
            ``u`` of shape ``(batch, *output_shape)``.
        jacobian: ``True`` for the full per-sample Jacobian ``x -> (batch, *output_shape,
            *input_shape)`` instead (no ``gradient``).
        derivatives: ``{LayerClass: rule}`` derivative rules for this model object. They are
            Python functions and are not saved: after loading, rules registered with
            ``augnet.register_derivative`` apply (register them before loading).
        name: the backward model's name (default ``"backward_<model.name>"``).

    Returns:
        A ``keras.Model``: inputs the model's inputs (then one seed per output when
        ``gradient=None``), outputs ``(batch, *input_shape)`` per model input (the Jacobian:
        one per output/input pair). It supports ``summary()``, ``keras.utils.plot_model``,
        ``save("file.keras")`` and ``export(dir)`` (SavedModel, endpoint ``serve``).

    Raises:
        TypeError: ``model`` is not a functional/Sequential model.
        ValueError: a seed of the wrong shape, ``gradient`` together with ``jacobian=True``.
        GradientPathError: a layer without a gradient path and no rule.

    Example:
        >>> bm = augnet.backward_model(model, gradient=np.ones(2))   # doctest: +SKIP
        >>> bm.summary()                                             # doctest: +SKIP
        >>> grads = bm(x)                # (batch, *input_shape)      # doctest: +SKIP
    """
    if not isinstance(model, keras.Model):
        raise TypeError(
            f"`model` must be a keras.Model; received an object of type {type(model).__name__}."
        )
    if jacobian and gradient is not None:
        raise ValueError(
            "Pass either `gradient` (a vector-Jacobian product) or jacobian=True (the full "
            "Jacobian), not both; received both."
        )
    in_leaves, in_structure = _io_leaves(model, "input")
    out_leaves, out_structure = _io_leaves(model, "output")
    for t in in_leaves:
        if not B.is_floating(t.dtype):
            raise TypeError(
                f"Model input {t.name!r} has dtype {t.dtype}: an integer input has no gradient, "
                "so no backward model. Differentiate with respect to a floating input."
            )
    # The gradient-path check runs eagerly once, on a zero probe sample.
    probe = [B.convert(np.zeros((1, *t.shape[1:])), t.dtype) for t in in_leaves]
    _engine.check_gradient_paths(
        model,
        lambda xs: model(unflatten(list(xs), in_structure), training=False),
        probe,
        derivatives,
    )
    inputs = [
        keras.Input(shape=tuple(t.shape[1:]), dtype=t.dtype, name=_clean(t.name, f"input_{i}"))
        for i, t in enumerate(in_leaves)
    ]
    name = name or f"backward_{model.name}"
    if jacobian:
        layer = JacobianLayer(model, derivatives=derivatives, name="jacobian")
        args = inputs
    elif gradient is None:
        seeds = [
            keras.Input(shape=tuple(o.shape[1:]), dtype=o.dtype, name=f"cotangent_{i}")
            for i, o in enumerate(out_leaves)
        ]
        layer = VJPLayer(model, None, derivatives=derivatives, name="vjp")
        args = inputs + seeds
        inputs = inputs + seeds
    else:
        layer = VJPLayer(
            model, _seed_list(gradient, model, out_leaves, out_structure), derivatives, name="vjp"
        )
        args = inputs
    outputs = layer(args if len(args) > 1 else args[0])
    bm = keras.Model(inputs=inputs if len(inputs) > 1 else inputs[0], outputs=outputs, name=name)
    if B.name != "tensorflow":
        _explain_export_failures(bm)
    return bm


def _explain_export_failures(model) -> None:
    """Off TensorFlow, Keras's ``export`` may fail (Keras 3.15 cannot export even a plain model on
    torch 2.13 here): turn the framework's traceback into what to do instead."""
    keras_export = model.export

    def export(filepath, format="tf_saved_model", **kwargs):
        try:
            return keras_export(filepath, format=format, **kwargs)
        except Exception as exc:
            lines = str(exc).strip().splitlines() or [""]
            raise RuntimeError(
                f"Exporting backward model {model.name!r} (format={format!r}) failed with Keras "
                f"on the {B.name!r} backend ({type(exc).__name__}: {lines[0][:200]}). A backward "
                "model exports as a TensorFlow SavedModel where Keras runs on TensorFlow: save "
                "it here with model.save('backward.keras'), then with KERAS_BACKEND=tensorflow "
                "run `import augnet; augnet.load_model('backward.keras')"
                ".export('backward_savedmodel')`."
            ) from None

    object.__setattr__(model, "export", export)


def _clean(name, fallback: str) -> str:
    name = str(name or fallback).split(":")[0].replace("/", "_")
    return name or fallback


__all__ = ["JacobianLayer", "VJPLayer", "backward_model", "jvp", "vjp"]
