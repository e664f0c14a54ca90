"""``augnet info``: what a model is, whether it is differentiable, and its sensitivity at an input.

Used by the command line (augnet._cli) once the model is loaded; TensorFlow is imported here.
"""

from __future__ import annotations

import logging
import math
import warnings
from typing import Any

INFO_TOP_OUTPUTS = 20  # outputs listed by `info --sample`, largest gradient first


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


# Layer classes whose output does not depend differentiably on their input.
NON_DIFFERENTIABLE_LAYERS = {
    "Embedding": "integer lookup",
    "StringLookup": "string lookup",
    "IntegerLookup": "integer lookup",
    "Discretization": "bucketises values (piecewise constant)",
    "Hashing": "hashes values",
    "HashedCrossing": "hashes values",
    "CategoryEncoding": "one-hot/multi-hot encoding of integers",
    "TextVectorization": "string processing",
}


def _all_layers(model) -> list:
    out = []
    for layer in getattr(model, "layers", []):
        out.append(layer)
        if hasattr(layer, "layers") and layer is not model:
            out.extend(_all_layers(layer))
    return out


def _is_float_dtype(dtype) -> bool:
    return str(dtype).startswith(("float", "bfloat", "<dtype: 'float"))


def differentiability_report(model) -> dict[str, Any]:
    """Which layers block the gradient from the model's inputs to its outputs.

    Three checks:

    1. input dtypes: integer/bool/string inputs have no derivative;
    2. layer types that are not differentiable (:data:`NON_DIFFERENTIABLE_LAYERS`);
    3. a gradient on a test input (batch of 1, fixed random normal values): for every layer of
       a functional model, is its output connected to the inputs by a differentiable path? A
       layer whose output is disconnected while one of its inputs is connected has an op
       without a gradient (``argmax``, ``round``, ``cast`` to int, ``stop_gradient``, ...).

    Returns:
        ``{"differentiable": True | False | None, "problems": [str, ...], "notes": [str, ...]}``;
        ``None`` when no problem was found but the gradient check could not run (see ``notes``).
    """
    import numpy as np

    from augnet import _backend

    problems: list[str] = []
    notes: list[str] = []
    inputs = list(model.inputs)
    for t in inputs:
        if not _is_float_dtype(t.dtype):
            problems.append(
                f"input '{t.name}' has dtype {t.dtype}: integer/string inputs have no derivative"
            )
    for layer in _all_layers(model):
        why = NON_DIFFERENTIABLE_LAYERS.get(type(layer).__name__)
        if why:
            problems.append(f"layer '{layer.name}' ({type(layer).__name__}): {why}")

    float_inputs = [t for t in inputs if _is_float_dtype(t.dtype)]
    if float_inputs and len(float_inputs) == len(inputs):
        try:
            probe_tensors, owners = [], []
            # Every operation of a functional graph: layers, and keras.ops between them (a
            # keras.ops.round is named like a layer, as the engine's GradientPathError does).
            for layer in getattr(model, "operations", None) or model.layers:
                for node in getattr(layer, "_inbound_nodes", []):
                    for t in node.output_tensors:
                        probe_tensors.append(t)
                        owners.append((layer, node))
            import keras

            probe = keras.Model(inputs=model.inputs, outputs=probe_tensors)
            rng = np.random.default_rng(0)
            xs = [
                _backend.convert(
                    rng.standard_normal((1, *[d or 8 for d in t.shape[1:]])), str(t.dtype)
                )
                for t in inputs
            ]

            def run(xs):
                values = probe(xs if len(xs) > 1 else xs[0], training=False)
                return list(values) if isinstance(values, list | tuple) else [values]

            _, flags = _backend.connected_outputs(run, xs)  # per probe tensor: a gradient path?
            connected: dict[int, bool] = {id(t): True for t in inputs}
            for t, flag in zip(probe_tensors, flags, strict=True):
                if id(t) not in connected:
                    connected[id(t)] = flag
            reported = set()
            for (layer, node), t in zip(owners, probe_tensors, strict=True):
                if connected.get(id(t), True) or layer.name in reported:
                    continue
                if any(connected.get(id(i), False) for i in node.input_tensors):
                    reported.add(layer.name)
                    if not any(f"'{layer.name}'" in p for p in problems):
                        problems.append(
                            f"layer '{layer.name}' ({type(layer).__name__}): no gradient flows "
                            "through it (an op without a gradient, e.g. argmax, round, cast to "
                            "int or stop_gradient)"
                        )
            for t in model.outputs:
                if not connected.get(id(t), True) and not reported:
                    problems.append(
                        f"output '{t.name}' does not depend differentiably on the input"
                    )
        except Exception as exc:  # the probe is best effort; say so
            notes.append(f"gradient check skipped: {_one_line(str(exc))[:200]}")
    verdict = False if problems else (None if notes else True)
    return {"differentiable": verdict, "problems": problems, "notes": notes}


def _shape_text(shape) -> str:
    return str(tuple(None if d is None else int(d) for d in shape))


def sensitivity_lines(
    model, sample: str, *, quiet: bool = False, logits: bool = False
) -> list[str]:
    """The sensitivity summary of ``augnet info --sample``: Jacobian norms at one input.

    The Jacobian is streamed block by block (``augnet.iter_jacobian``) with a progress line on
    stderr, so that a 1000-class model shows progress instead of silence; the outputs listed are
    the ``INFO_TOP_OUTPUTS`` with the largest gradient (L2), with the model's value for each.
    ``logits``: of the scores before the final softmax/sigmoid (and their values).
    """
    import numpy as np

    import augnet
    from augnet import _analysis, _backend, _engine, _imageio, _runner
    from augnet._compute import without_zero_warning
    from augnet._progress import Progress

    in_shape, _, out_shape = _runner.single_io(model)
    if logits:  # the scores before the final softmax/sigmoid: a view sharing the weights
        model = _engine.logits_view(model)
    items = _imageio.expand_inputs([sample], array_input_shape=in_shape)
    try:
        spec = _imageio.ImageSpec.from_input_shape(in_shape)
    except _imageio.InputFitError:
        spec = None
    x, _ = _imageio.load_batch(items[:1], in_shape, spec)
    n_out = math.prod(out_shape) if out_shape else 1
    prediction = _backend.to_numpy(model(x, training=False)).reshape(-1)
    J = None
    with (
        _runner.StopFlag() as stop,
        Progress(n_out, enabled=not quiet, unit="outputs", tick=0.5) as bar,
    ):
        for chunk in without_zero_warning(augnet.iter_jacobian(model, x)):  # said as one line
            values = np.asarray(chunk.values)
            if J is None:
                J = np.empty((1, n_out, *values.shape[2:]), dtype=values.dtype)
            J[chunk.samples, chunk.columns] = values
            bar.update(values.shape[1])
            stop.check()
    if not J.any():
        logging.getLogger(__name__).warning(
            "the Jacobian at the sample is exactly zero everywhere: "
            + (
                "check the input's range (images are scaled as by 'augnet jacobian' with its "
                "defaults, to [0, 1])"
                if logits
                else "a saturated softmax or sigmoid gives exactly 0.0 in float32; try --logits, "
                "and check the input's range (images are scaled to [0, 1] by default)"
            )
        )
    J = J.reshape(1, *out_shape, *J.shape[2:]) if out_shape else J
    norms = _analysis.jacobian_norms(J, output_ndim=len(out_shape))
    radius = 0.01 * float(np.max(np.abs(x)) or 1.0)
    with warnings.catch_warnings():  # (said once above, if at all)
        warnings.simplefilter("ignore", augnet.ZeroJacobianWarning)
        lipschitz = _analysis.local_lipschitz(model, x, radius=radius, n_samples=4)
    where = f"{items[0].path}{'' if items[0].row is None else f' (row {items[0].row})'}"
    lines = [
        f"sensitivity at {where}"
        + (" (of the scores before the final softmax/sigmoid: --logits)" if logits else "")
        + ":",
        f"  Jacobian {tuple(J.shape[1:])}: Frobenius norm {norms.frobenius[0]:.4g}, "
        f"spectral norm {norms.spectral[0]:.4g}",
        f"  local Lipschitz estimate (lower bound, 4 points within radius {radius:.3g}): "
        f"{float(np.max(lipschitz)):.4g}",
    ]
    l1, l2 = norms.l1[0].reshape(-1), norms.l2[0].reshape(-1)
    shown = np.argsort(-l2, kind="stable")[:INFO_TOP_OUTPUTS]
    if len(l1) > INFO_TOP_OUTPUTS:
        lines.append(
            f"  the {len(shown)} of {len(l1)} outputs with the largest gradient (L2), largest "
            "first: index, model value, L1 and L2 norm of its gradient"
        )
    else:
        lines.append(
            "  per output, largest gradient (L2) first: index, model value, L1 and L2 norm of "
            "its gradient"
        )
    for k in shown:
        lines.append(f"    {int(k):>4}  value {prediction[k]:.4g}  L1 {l1[k]:.4g}  L2 {l2[k]:.4g}")
    if len(l1) > INFO_TOP_OUTPUTS:
        lines.append(f"    ... {len(l1) - INFO_TOP_OUTPUTS} more outputs")
    return lines


def describe(model, path: str) -> list[str]:
    """The lines of ``augnet info MODEL``: inputs, outputs, layers, parameters, differentiability."""
    import numpy as np

    lines = [f"model: {path}  ({type(model).__name__} '{model.name}')"]
    lines.append("inputs:")
    for t in model.inputs:
        lines.append(f"  {t.name:<24} shape {_shape_text(t.shape):<22} dtype {t.dtype}")
    lines.append("outputs:")
    for t in model.outputs:
        history = getattr(t, "_keras_history", None)
        name = getattr(getattr(history, "operation", None), "name", None) or t.name
        n = math.prod(d for d in t.shape[1:] if d is not None) if t.shape[1:] else 1
        lines.append(
            f"  {name:<24} shape {_shape_text(t.shape):<22} dtype {t.dtype}  ({n} values per sample)"
        )
    top = list(model.layers)
    every = _all_layers(model)
    lines.append(
        f"layers: {len(top)}"
        + (f" ({len(every)} including nested)" if len(every) != len(top) else "")
    )
    trainable = int(sum(np.prod(w.shape) for w in model.trainable_weights))
    total = int(model.count_params())
    lines.append(
        f"parameters: {total:,} ({trainable:,} trainable, {total - trainable:,} non-trainable)"
    )
    report = differentiability_report(model)
    if report["differentiable"]:
        lines.append("differentiable with respect to the input: yes (every layer)")
    elif report["differentiable"] is None:
        lines.append(
            "differentiable with respect to the input: unknown (no layer of a type known to "
            "block gradients, but the gradient check could not run)"
        )
    else:
        lines.append("differentiable with respect to the input: NO")
        lines.extend(f"  - {p}" for p in report["problems"])
    lines.extend(f"note: {n}" for n in report["notes"])
    from augnet import _backend

    lines.append(f"backend: Keras on {_backend.name}; devices: {', '.join(_backend.devices())}")
    return lines
