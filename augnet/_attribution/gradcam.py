"""Grad-CAM and Grad-CAM++: class activation maps from a convolutional layer's activations and
the gradients of the outputs with respect to them.

With ``A`` the layer's activation ``(batch, *spatial, C)`` and ``G = ∂y_k/∂A`` (the engine's
layer sensitivity, every selected output at once):

- Grad-CAM (Selvaraju et al. 2017): ``α_kc = mean_spatial G_kc``,
  ``cam_k = ReLU(Σ_c α_kc A_c)``;
- Grad-CAM++ (Chattopadhyay et al. 2018, in the common form of pytorch-grad-cam):
  ``a = G² / (2 G² + (Σ_spatial A) G³)`` (0 where the denominator is 0),
  ``w_kc = Σ_spatial a ReLU(G_kc)``, ``cam_k = ReLU(Σ_c w_kc A_c)``.

The map is resized to the input's spatial size (bilinear, half-pixel centres, as
``tf.image.resize``; or nearest) and repeated over the input's channels, so it has the input's
shape. No normalisation: values are in the units of ``y·A``, comparable between outputs.

The layer: by name (searched inside nested models too, e.g. a backbone inside a classifier), a
path ``"backbone/Conv_1"``, a layer object, or by default the last convolutional layer followed
through the layers that keep its shape right after it (BatchNorm, activation): MobileNetV2's
``out_relu``. The result says which layer was used. Cost: one forward pass for ``A`` and one
Jacobian with respect to ``A`` (one backward pass per selected output), per batch.
"""

from __future__ import annotations

import contextlib
import weakref

import numpy as np

from augnet._attribution import _arrays, _base
from augnet._errors import format_shape, invalid_value
from augnet._structure import DICT, SINGLE, Structure

INTERPOLATIONS = ("bilinear", "nearest")

# Per model: (layer path, input structure, rules) -> the function the engine differentiates, and
# layer path -> the model computing the activation. Kept so that repeated calls reuse the
# engine's compiled functions instead of tracing again.
_FUNCTIONS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


# --------------------------------------------------------------------------------------------------
# Finding the layer
# --------------------------------------------------------------------------------------------------


def _walk(model, prefix: str = "") -> list[tuple[str, object, object]]:
    """``(path, layer, parent)`` for every layer, depth first, in each model's layer order."""
    out = []
    for layer in getattr(model, "layers", None) or []:
        if type(layer).__name__ == "InputLayer":
            continue
        path = prefix + layer.name
        out.append((path, layer, model))
        if getattr(layer, "layers", None):
            out.extend(_walk(layer, path + "/"))
    return out


def _output_rank(layer) -> int | None:
    try:
        return len(layer.output.shape)
    except Exception:
        return None


def _is_conv(layer) -> bool:
    return "Conv" in type(layer).__name__ and (_output_rank(layer) or 0) >= 3


def _follow(parent, layer):
    """The last of the layers right after ``layer`` in ``parent`` that take its output alone and
    keep its shape (BatchNorm, activation): where the convolution's features are final."""
    layers = [lyr for lyr in getattr(parent, "layers", []) if type(lyr).__name__ != "InputLayer"]
    try:
        i = layers.index(layer)
    except ValueError:
        return layer
    current = layer
    for nxt in layers[i + 1 :]:
        try:
            made = {id(t) for n in current._inbound_nodes for t in n.output_tensors}
            ok = any(
                len(n.input_tensors) == 1 and id(n.input_tensors[0]) in made
                for n in nxt._inbound_nodes
            ) and tuple(nxt.output.shape) == tuple(current.output.shape)
        except (AttributeError, ValueError):
            ok = False
        if not ok:
            break
        current = nxt
    return current


def find_layer(model, layer=None) -> tuple[str, object]:
    """``(path, layer)`` of the layer Grad-CAM uses (see the module docstring).

    Raises:
        ValueError: no such layer, an ambiguous name, a layer without a spatial output
            ``(batch, *spatial, channels)``, or (``layer=None``) a model without convolutional
            layers; the message names the ``layer`` option.
    """
    entries = _walk(model)
    if layer is None:
        convs = [(p, lyr, parent) for p, lyr, parent in entries if _is_conv(lyr)]
        if not convs:
            raise ValueError(
                f"Model {getattr(model, 'name', '')!r} has no convolutional layer (Conv1D/2D/3D, "
                "DepthwiseConv2D, SeparableConv2D...), so Grad-CAM has no default layer. Pass "
                "`layer=` the name of a layer whose output is a feature map (batch, *spatial, "
                "channels)."
            )
        path, conv, parent = convs[-1]
        chosen = _follow(parent, conv)
        prefix = path[: len(path) - len(conv.name)]
        return prefix + chosen.name, chosen
    if isinstance(layer, str):
        matches = [(p, lyr) for p, lyr, _ in entries if p == layer]
        if not matches:
            matches = [(p, lyr) for p, lyr, _ in entries if lyr.name == layer]
        if not matches:
            names = [p for p, lyr, _ in entries if (_output_rank(lyr) or 0) >= 3]
            raise ValueError(
                f"Model {getattr(model, 'name', '')!r} has no layer named {layer!r} (searched "
                f"nested models too). Pass `layer=` one of the layers with a spatial output: "
                f"{names[-12:]}{' (the last 12)' if len(names) > 12 else ''}."
            )
        if len(matches) > 1:
            raise ValueError(
                f"`layer={layer!r}` names {len(matches)} layers: {[p for p, _ in matches]}. Pass "
                "the path instead, e.g. layer='backbone/conv'."
            )
        path, found = matches[0]
    else:
        found_paths = [p for p, lyr, _ in entries if lyr is layer]
        if not found_paths:
            raise ValueError(
                invalid_value("layer", layer, "a layer of the model, its name or path, or None")
            )
        path, found = found_paths[0], layer
    rank = _output_rank(found)
    if rank is None or rank < 3:
        shape = format_shape(found.output.shape) if rank is not None else "unknown"
        raise ValueError(
            f"Grad-CAM needs a layer whose output is a feature map (batch, *spatial, channels); "
            f"layer {path!r} ({type(found).__name__}) outputs {shape}. Pass `layer=` a "
            "convolutional layer (or the activation right after one)."
        )
    return path, found


# --------------------------------------------------------------------------------------------------
# The activation and its sensitivity
# --------------------------------------------------------------------------------------------------


def _cache(model) -> dict:
    try:
        return _FUNCTIONS.setdefault(model, {})
    except TypeError:  # pragma: no cover - models are weakly referenceable
        return {}


@contextlib.contextmanager
def _swap_call(layer, call):
    """Replaces ``layer.call`` on the instance for the duration; always restores."""
    had = "call" in layer.__dict__
    old = layer.__dict__.get("call")
    object.__setattr__(layer, "call", call)
    try:
        yield
    finally:
        if had:
            object.__setattr__(layer, "call", old)
        else:
            object.__delattr__(layer, "call")


def _split(model, path: str, layer):
    """For a layer of the model's own graph: ``(x -> A, head)`` as Keras models sharing its
    weights, where ``head`` computes the outputs from ``A`` (and from ``x`` too when a skip
    connection needs it: ``takes_x``). ``None`` when the graph cannot be cut there (a nested or
    shared layer, a subclassed model). Cached per model and layer."""
    import keras

    cache = _cache(model)
    key = ("split", path)
    if key not in cache:
        parts = None
        if "/" not in path:
            try:
                inputs = _base.symbolic_io(model, "input")
                outputs = _base.symbolic_io(model, "output")
                activation = keras.Model(inputs, layer.output)
                try:
                    head, takes_x = keras.Model(layer.output, outputs), False
                except ValueError:  # a skip connection around the layer: x is needed too
                    head, takes_x = keras.Model([layer.output, *model.inputs], outputs), True
                parts = (activation, head, takes_x)
            except (AttributeError, ValueError, TypeError):
                parts = None
        cache[key] = parts
    return cache[key]


def _recorded_activation(problem, path: str, layer, leaves: list) -> np.ndarray:
    """The layer's output at ``leaves``, recorded during one forward pass (nested layers)."""
    seen = []
    original = layer.call

    def recording(*args, **kwargs):
        y = original(*args, **kwargs)
        seen.append(y)
        return y

    with _swap_call(layer, recording):
        problem.model(problem.wrap(leaves), training=False)
    if len(seen) != 1:
        raise ValueError(
            f"Layer {path!r} ran {len(seen)} times in one forward pass (a shared layer); "
            "Grad-CAM needs a layer called once."
        )
    return _base.to_numpy(seen[0])


def _replaced_fn(problem, path: str, layer, derivatives):
    """``g([a, *x]) = model(x with the layer's output replaced by a)``, whose Jacobian with
    respect to ``a`` is ``∂y/∂A`` with ``x`` held fixed (the engine's ``wrt=`` construction, for
    layers inside nested models), cached per model and layer."""
    import keras

    import augnet

    key = ("replaced", path, problem.structure, id(derivatives) if derivatives else None)
    cache = _cache(problem.model)
    if key in cache:
        return cache[key]
    model_ref, layer_ref = weakref.ref(problem.model), weakref.ref(layer)
    structure = problem.structure

    def g(inputs):
        a_t, *xs = inputs
        xs = [keras.ops.stop_gradient(t) for t in xs]
        model, target = model_ref(), layer_ref()

        def replaced(*args, **kwargs):
            return a_t

        with _swap_call(target, replaced), augnet.use_derivatives(model, derivatives):
            return model(_unflatten(xs, structure), training=False)

    cache[key] = g
    return g


def _unflatten(leaves, structure):
    from augnet._structure import unflatten

    return unflatten(list(leaves), structure)


def _activation_rows(problem, J, act_shape, nested: bool) -> np.ndarray:
    """The engine's result -> ``(b, m, *act_shape)``, the blocks with respect to ``A``
    (``nested``: the function had several inputs, ``A`` first)."""
    if len(problem.out_shapes) == 1:
        per_output = [J]
    elif problem.out_structure.kind == DICT:
        per_output = [J[k] for k in problem.out_structure.keys]
    else:
        per_output = list(J)
    parts = []
    for value, (start, stop) in zip(per_output, problem.groups):
        block = _base.to_numpy(value[0] if nested else value)
        parts.append(block.reshape(block.shape[0], stop - start, *act_shape))
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)


def layer_sensitivity(problem, path: str, layer, activations=None):
    """Yields ``(samples, A (b, *act), G (b, m, *act))`` over the batch in chunks that fit the
    memory budget: the activation and ``∂y/∂A`` for the selected outputs (``x`` held fixed).

    A layer of the model's own graph: ``A`` from a model ``x -> A`` and ``G`` from
    ``augnet.jacobian`` of the model's head ``A -> y`` (both Keras models sharing the weights,
    so the engine's compiled functions and plans are reused between calls). A layer inside a
    nested model: ``A`` recorded in a forward pass, ``G`` from ``augnet.jacobian`` of the model
    with that layer's output replaced by an input. ``activations``: ``A`` for the whole batch,
    already computed.
    """
    import augnet

    act_shape = tuple(int(d) for d in layer.output.shape[1:])
    act_size = int(np.prod(act_shape))
    in_size = sum(int(np.prod(s)) for s in problem.in_shapes)
    per_sample = 3 * problem.m * (act_size + in_size) * problem.itemsize + 2 * problem.act_bytes
    step = problem.batch_size or max(1, int(problem.max_memory // max(per_sample, 1)))
    engine = dict(problem.engine)
    engine.setdefault("strategy", "loop")  # a convolutional network: no strategy timing
    split = _split(problem.model, path, layer)
    for s0 in range(0, problem.batch, step):
        s1 = min(problem.batch, s0 + step)
        owners = np.arange(s0, s1)
        leaves = [a[s0:s1] for a in problem.leaves]
        if split is not None:
            activation, head, takes_x = split
            if activations is not None:
                A = activations[s0:s1]
            else:
                A = _base.to_numpy(activation.predict_on_batch(problem.wrap(leaves)))
            args = [A, *problem.model_order(leaves)] if takes_x else A
            fn, nested = head, takes_x
        else:
            A = _recorded_activation(problem, path, layer, leaves)
            derivatives = engine.pop("derivatives", None)
            fn, args, nested = _replaced_fn(problem, path, layer, derivatives), [A, *leaves], True
        J = augnet.jacobian(
            fn, args, outputs=problem.outputs_for(owners), max_memory=problem.max_memory, **engine
        )
        yield slice(s0, s1), A, _activation_rows(problem, J, act_shape, nested)


# --------------------------------------------------------------------------------------------------
# The maps
# --------------------------------------------------------------------------------------------------


def cam_from(A: np.ndarray, G: np.ndarray, plus_plus: bool = False) -> np.ndarray:
    """``(b, m, *spatial)`` class activation maps from ``A`` ``(b, *spatial, C)`` and ``G``
    ``(b, m, *spatial, C)`` (float64)."""
    A = A.astype(np.float64)
    G = G.astype(np.float64)
    spatial = tuple(range(2, G.ndim - 1))
    Ab = A[:, None]
    if plus_plus:
        g2, g3 = G**2, G**3
        sum_a = A.sum(axis=tuple(range(1, A.ndim - 1)))  # (b, C)
        sum_a = sum_a.reshape(sum_a.shape[0], 1, *([1] * len(spatial)), sum_a.shape[-1])
        denom = 2.0 * g2 + sum_a * g3
        a = np.divide(g2, denom, out=np.zeros_like(g2), where=denom != 0)
        weights = (a * np.maximum(G, 0.0)).sum(axis=spatial)  # (b, m, C)
    else:
        weights = G.mean(axis=spatial)  # (b, m, C)
    w = weights.reshape(weights.shape[0], weights.shape[1], *([1] * len(spatial)), -1)
    return np.maximum((w * Ab).sum(axis=-1), 0.0)


def _upsample(cams: np.ndarray, in_shape: tuple, interpolation: str) -> np.ndarray:
    """``(b, m, *spatial)`` -> ``(b, m, *in_shape)``: resized to the input's spatial axes and
    repeated over its channels."""
    n_sp = cams.ndim - 2
    axes = _arrays.spatial_axes(in_shape)
    if len(axes) != n_sp:
        raise ValueError(
            f"The Grad-CAM layer's feature map has {n_sp} spatial axis/axes, but the input "
            f"{format_shape(in_shape)} has {len(axes)}: the map cannot be resized onto it. "
            "Pass upsample=False for the layer-sized maps."
        )
    mats = [
        _arrays.interpolation_matrix(cams.shape[2 + i], in_shape[ax], interpolation).astype(
            cams.dtype
        )
        for i, ax in enumerate(axes)
    ]
    if n_sp == 2:  # images: R_h · cam · R_wᵀ, stacked matrix products over (batch, k)
        resized = np.matmul(np.matmul(mats[0], cams), mats[1].T)
    elif n_sp == 1:
        resized = cams @ mats[0].T
    else:
        resized = _arrays.apply_along(cams, {2 + i: m for i, m in enumerate(mats)})
    if len(in_shape) > len(axes):  # channels: the same map in each
        if in_shape[-1] == 1:
            return resized[..., None]
        return np.repeat(resized[..., None], in_shape[-1], axis=-1)
    return resized


def _gradcam(
    method: str,
    model,
    x,
    *,
    layer,
    upsample,
    interpolation,
    outputs,
    top_k,
    batch_size,
    max_memory,
    engine,
):
    problem = _base.prepare(
        model,
        x,
        outputs=outputs,
        top_k=top_k,
        batch_size=batch_size,
        max_memory=max_memory,
        engine=_base.engine_options(engine, method),
        defer=True,
    )
    if not isinstance(upsample, bool):
        raise TypeError(invalid_value("upsample", upsample, "True or False"))
    interpolation = _base.check_choice(interpolation, "interpolation", INTERPOLATIONS)
    path, found = find_layer(model, layer)
    activations = _predict(problem, path, found)
    _base.select(problem, outputs, top_k)
    act_spatial = tuple(int(d) for d in found.output.shape[1:-1])
    cams = np.empty((problem.batch, problem.m, *act_spatial))
    for samples, A, G in layer_sensitivity(problem, path, found, activations):
        cams[samples] = cam_from(A, G, plus_plus=method == "gradcam_plus_plus")
    cams = cams.astype(problem.dtype)
    if not upsample:
        flat_problem = _replace_inputs(problem, act_spatial)
        return flat_problem.result([cams], method, extra=True, layer=path)
    flat = [_upsample(cams, shape, interpolation) for shape in problem.in_shapes]
    return problem.result(flat, method, extra=True, layer=path)


def _predict(problem, path: str, layer):
    """Sets ``problem.predictions``; returns the layer's activations for the whole batch when
    they came with them (the model cut at the layer: ``A`` from the first part, the outputs from
    the small head, one forward pass in all), else ``None``."""
    split = _split(problem.model, path, layer)
    act_size = int(np.prod([int(d) for d in layer.output.shape[1:]]))
    fits = problem.batch * act_size * problem.itemsize <= problem.max_memory // _base.POINTS_SHARE
    if split is None or not fits:
        problem.predictions = _base.predict_flat(problem, problem.leaves, learn=True)
        return None
    activation, head, takes_x = split
    parts = []

    def call(chunk, start):
        A = _base.to_numpy(activation.predict_on_batch(problem.wrap(chunk)))
        parts.append(A)
        return head.predict_on_batch([A, *problem.model_order(chunk)] if takes_x else A)

    problem.predictions = _base.predict_flat(problem, problem.leaves, learn=True, call=call)
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def _replace_inputs(problem, spatial: tuple):
    """A view of ``problem`` whose one "input" has the feature map's spatial shape (for the
    layer-sized maps of ``upsample=False``)."""
    from dataclasses import replace

    leaves = [np.empty((problem.batch, *spatial), dtype=problem.dtype)]
    return replace(problem, leaves=leaves, structure=Structure(SINGLE))


_DOC_ARGS = """
    Args:
        model: a ``keras.Model`` with a convolutional layer (channels last).
        x: ``(batch, *input_shape)``, or a list/dict of arrays for several (image) inputs.
        layer: the layer: a name (searched inside nested models too), a path
            ``"backbone/Conv_1"``, a layer object, or ``None`` (default) for the last
            convolutional layer followed through the BatchNorm/activation layers right after it.
        upsample: resize the maps to the input's spatial size and repeat them over its channels
            (default); ``False`` returns the layer-sized maps ``(batch, k, *spatial)``.
        interpolation: ``"bilinear"`` (default, half-pixel centres as ``tf.image.resize``) or
            ``"nearest"``.
        outputs, top_k: as :func:`augnet.gradient`.
        batch_size: samples per engine pass; max_memory: per pass, as ``augnet.jacobian``.
        **engine: ``strategy`` (default ``"loop"``), ``chunk_size``, ``jit_compile``,
            ``derivatives``.

    Returns:
        :class:`Attribution` with ``attributions`` ``(batch, k, *input_shape)`` (nested per
        input and output as :func:`augnet.gradient`), ``indices``/``values`` ``(batch, k)`` and
        ``layer``, the path of the layer used.

    Raises:
        ValueError: the model has no convolutional layer and no ``layer`` was given, or the
            layer has no spatial output; the message says how to pass ``layer=``.
"""


def gradcam(
    model,
    x,
    *,
    layer=None,
    upsample: bool = True,
    interpolation: str = "bilinear",
    outputs=None,
    top_k: int | None = None,
    batch_size: int | None = None,
    max_memory=None,
    **engine,
) -> _base.Attribution:
    return _gradcam(
        "gradcam",
        model,
        x,
        layer=layer,
        upsample=upsample,
        interpolation=interpolation,
        outputs=outputs,
        top_k=top_k,
        batch_size=batch_size,
        max_memory=max_memory,
        engine=engine,
    )


def gradcam_plus_plus(
    model,
    x,
    *,
    layer=None,
    upsample: bool = True,
    interpolation: str = "bilinear",
    outputs=None,
    top_k: int | None = None,
    batch_size: int | None = None,
    max_memory=None,
    **engine,
) -> _base.Attribution:
    return _gradcam(
        "gradcam_plus_plus",
        model,
        x,
        layer=layer,
        upsample=upsample,
        interpolation=interpolation,
        outputs=outputs,
        top_k=top_k,
        batch_size=batch_size,
        max_memory=max_memory,
        engine=engine,
    )


gradcam.__doc__ = (
    """Grad-CAM: ``ReLU(Σ_c mean_spatial(∂y_k/∂A_c) · A_c)`` on a convolutional layer's
    activation ``A``, resized to the input.
"""
    + _DOC_ARGS
    + """
    Example:
        >>> cam = augnet.gradcam(model, images, top_k=1)          # doctest: +SKIP
        >>> cam.layer, cam.attributions.shape                    # doctest: +SKIP
        ('out_relu', (8, 1, 96, 96, 3))
"""
)
gradcam_plus_plus.__doc__ = (
    """Grad-CAM++: channel weights ``Σ_spatial a · ReLU(∂y_k/∂A_c)`` with
    ``a = G² / (2G² + Σ_spatial A · G³)``, then as Grad-CAM.
"""
    + _DOC_ARGS
)
