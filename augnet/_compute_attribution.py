"""One batch of a data-set run with an attribution method (``augnet jacobian --method``).

:func:`attribute_batch` is what :func:`augnet._compute.compute_batch` calls instead of computing
the Jacobian when the run's :class:`augnet._runner.BatchConfig` names a method: the method's maps
``(b, k, *input_shape)`` take the Jacobian's place (pictures, shards, summary lines), and what
comes with them (integrated gradients' ``delta``, Grad-CAM's ``layer``) goes into the inputs'
summary lines. Like ``compute_batch`` it writes nothing.

The method's options are settings of the run (``run.json``), prepared once on the driver by
:func:`prepare_options` (Grad-CAM's layer found, occlusion's window checked against the input),
so that every batch, and every batch of a ``--resume``, uses the same ones. SmoothGrad's noise
of an input depends on the seed only (``augnet/_attribution/smoothgrad.py``), so a resumed run
writes the same bytes as an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from augnet._runner import BatchConfig


def _cli_text(message: str) -> str:
    """A library message about an option, in the command line's words."""
    for name in ("layer", "window", "stride", "baseline", "steps", "rule"):
        message = message.replace(f"`{name}=`", f"--{name}").replace(f"`{name}`", f"--{name}")
    return message


def prepare_options(model, method: str, options: dict, input_shape=None) -> dict:
    """The options of ``method`` for ``model``, checked before any work (JSON-able).

    Grad-CAM: the layer found (``None``: the default one) and recorded by its path, so that the
    run says which layer it used. Occlusion: ``window``/``stride`` checked against the input's
    spatial axes.

    Raises:
        ValueError: one line naming the command-line option (``--layer``, ``--window``, ...).
    """
    opts = dict(options)
    if method in ("gradcam", "gradcam_plus_plus"):
        from augnet._attribution.gradcam import find_layer

        try:
            path, _ = find_layer(model, opts.get("layer"))
        except (ValueError, TypeError) as exc:
            raise ValueError(_cli_text(str(exc))) from None
        opts["layer"] = path
    if method == "occlusion" and input_shape is not None:
        _check_windows(opts, tuple(int(d) for d in input_shape))
    for key, value in opts.items():
        if isinstance(value, tuple):
            opts[key] = list(value)
    return opts


def _check_windows(opts: dict, input_shape: tuple) -> None:
    from augnet._attribution import _arrays

    axes = _arrays.spatial_axes(input_shape)
    sizes = tuple(input_shape[a] for a in axes)
    for flag in ("window", "stride"):
        value = opts.get(flag)
        if value is None:
            continue
        values = (value,) * len(axes) if isinstance(value, int) else tuple(value)
        given = ",".join(str(v) for v in ((value,) if isinstance(value, int) else value))
        if len(values) != len(axes):
            raise ValueError(
                f"--{flag} {given}: the input {input_shape} has "
                f"{len(axes)} spatial axes {sizes}; give one size for all, or {len(axes)}"
            )
        if flag == "window" and any(v > s for v, s in zip(values, sizes)):
            raise ValueError(f"--window {given} is larger than the input's spatial size {sizes}")


def library_options(methods: dict, x) -> dict:
    """``{method: options}`` as the library's functions take them: windows as tuples, an
    occlusion ``baseline`` of ``"blur"`` made into the blurred inputs ``x``."""
    out = {}
    for method, options in methods.items():
        opts = {k: tuple(v) if isinstance(v, list) else v for k, v in dict(options).items()}
        if method == "occlusion" and opts.get("baseline") == "blur":
            from augnet._attribution import _arrays
            from augnet._attribution.integrated_gradients import DEFAULT_BLUR, blur

            spatial = [x.shape[1 + a] for a in _arrays.spatial_axes(x.shape[1:])]
            opts["baseline"] = blur(x, DEFAULT_BLUR * max(spatial))
        out[method] = opts
    return out


def attribute_batch(
    model,
    x,
    config: BatchConfig,
    on_progress: Callable[[float], None] | None = None,
    check_stop: Callable[[], None] | None = None,
    weight: float = 1.0,
) -> tuple[Any, Any, Any, list[dict]]:
    """The method's maps for one batch, in the Jacobian's place.

    Returns:
        ``(predictions (b, n_outputs), indices (b, k), maps (b, k, *input_shape) float32,
        extras)``: ``extras[i]`` goes into input ``i``'s summary line (``method``, and
        ``delta`` per output for integrated gradients, ``layer`` for Grad-CAM).
    """
    import numpy as np

    from augnet._attribution import METHODS, Attribution

    method = config.method
    opts = library_options({method: dict(config.method_options)}, x)[method]
    b = len(x)
    kwargs: dict[str, Any] = {
        "outputs": list(config.outputs) if config.outputs is not None else None,
        "top_k": config.top_k,
        "max_memory": config.max_memory,
    }
    if method != "occlusion" and config.strategy not in (None, "auto", "none"):
        kwargs["strategy"] = config.strategy
    from augnet import _backend

    preds = _backend.to_numpy(model(x, training=False)).reshape(b, -1)
    if config.logits:  # the scores before the final softmax/sigmoid (a view sharing the weights)
        from augnet._engine import logits_view

        model = logits_view(model)
    result = METHODS[method](model, x, **kwargs, **opts)
    if isinstance(result, Attribution):
        maps, indices = result.attributions, np.asarray(result.indices)
    else:
        maps = result
        indices = np.broadcast_to(np.asarray(config.outputs, dtype=np.int64), (b, config.k))
    maps = np.asarray(maps, dtype=np.float32).reshape(b, config.k, *x.shape[1:])
    extras: list[dict] = [{"method": method} for _ in range(b)]
    if isinstance(result, Attribution) and result.delta is not None:
        for i, row in enumerate(np.asarray(result.delta, dtype=np.float64)):
            extras[i]["delta"] = [float(v) for v in row]
    if isinstance(result, Attribution) and result.layer:
        for extra in extras:
            extra["layer"] = result.layer
    if on_progress is not None:
        on_progress(weight * b)
    if check_stop is not None:
        check_stop()
    return preds, indices.astype(np.int64, copy=False), maps, extras


def sheet_labels(name: str, config: BatchConfig) -> dict[str, str]:
    """The contact sheet's ``title`` (the input and the method with its main option) and
    ``quantity`` (what the colour bar measures) for a run with a method."""
    from augnet._compare import _LABELS, _QUANTITY

    method = config.method
    options = dict(config.method_options)
    label = _LABELS.get(method, method)
    if method in ("smoothgrad", "squaregrad", "vargrad"):
        label += f" ({options.get('n_samples')} noisy copies, noise level {options.get('noise_level'):g})"
    elif method == "integrated_gradients":
        label += f" ({options.get('steps')} steps, {options.get('rule')}, baseline {options.get('baseline')})"
    elif method in ("gradcam", "gradcam_plus_plus"):
        label += f" (layer {options.get('layer')})"
    elif method == "occlusion" and options.get("window") is not None:
        label += f" (window {options.get('window')})"
    quantity = _QUANTITY.get(method, method)
    if config.mode == "abs" and method not in (
        "squaregrad",
        "vargrad",
        "gradcam",
        "gradcam_plus_plus",
    ):
        quantity = f"|{quantity}|"
    return {"title": f"{name} · {label}", "quantity": quantity}
