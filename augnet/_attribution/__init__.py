"""Attribution methods on the Jacobian engine, one module per method, and metrics to judge them.

- ``gradient.py``: ``gradient``, ``gradient_x_input``;
- ``smoothgrad.py``: ``smoothgrad``, ``squaregrad``, ``vargrad``;
- ``integrated_gradients.py``: ``integrated_gradients`` (baselines, quadrature rules, delta);
- ``gradcam.py``: ``gradcam``, ``gradcam_plus_plus``;
- ``occlusion.py``: ``occlusion`` (model evaluations only);
- ``metrics.py``: deletion/insertion curves and AUC, MuFidelity, the model-randomisation check,
  ``evaluate_attributions``;
- ``_base.py``: inputs, options, output selection and the streaming of Jacobians at many points;
- ``_arrays.py``: spatial axes, resampling, blurring and window coverage as matrices (NumPy).

The gradient methods reach the framework only through the engine's public functions
(``augnet.jacobian``, ``augnet.iter_jacobian``) and Keras's public API, with NumPy above them.
:func:`attribute` is the one entry point by name.
"""

from __future__ import annotations

from augnet._attribution._base import Attribution
from augnet._attribution.gradcam import gradcam, gradcam_plus_plus
from augnet._attribution.gradient import gradient, gradient_x_input
from augnet._attribution.integrated_gradients import integrated_gradients
from augnet._attribution.occlusion import occlusion
from augnet._attribution.smoothgrad import smoothgrad, squaregrad, vargrad
from augnet._errors import invalid_value

METHODS = {
    "gradient": gradient,
    "gradient_x_input": gradient_x_input,
    "smoothgrad": smoothgrad,
    "squaregrad": squaregrad,
    "vargrad": vargrad,
    "integrated_gradients": integrated_gradients,
    "gradcam": gradcam,
    "gradcam_plus_plus": gradcam_plus_plus,
    "occlusion": occlusion,
}
ALIASES = {
    "saliency": "gradient",
    "grad": "gradient",
    "input_x_gradient": "gradient_x_input",
    "gradient_input": "gradient_x_input",
    "ig": "integrated_gradients",
    "gradcam++": "gradcam_plus_plus",
    "gradcampp": "gradcam_plus_plus",
}
ATTRIBUTION_METHODS = tuple(METHODS)
# Methods whose maps are non-negative (shown with a sequential colour map).
NONNEGATIVE = ("squaregrad", "vargrad", "gradcam", "gradcam_plus_plus")


def method_name(method: str) -> str:
    """The canonical name of ``method`` (aliases such as ``"ig"`` resolved)."""
    name = ALIASES.get(method, method) if isinstance(method, str) else method
    if name not in METHODS:
        raise ValueError(
            invalid_value(
                "method",
                method,
                f"one of {sorted(METHODS)} (or an alias: {sorted(ALIASES)})",
            )
        )
    return name


def attribute(model, x, method: str = "gradient", **options):
    """Attributions of ``model``'s outputs at ``x`` by the method named ``method``.

    Args:
        model: a ``keras.Model`` (or a callable the engine can differentiate).
        x: ``(batch, *input_shape)``, or a list/dict of arrays for several inputs.
        method: ``"gradient"``, ``"gradient_x_input"``, ``"smoothgrad"``, ``"squaregrad"``,
            ``"vargrad"``, ``"integrated_gradients"`` (``"ig"``), ``"gradcam"``,
            ``"gradcam_plus_plus"`` (``"gradcam++"``) or ``"occlusion"``.
        **options: the method's options (see its function, e.g. ``help(augnet.smoothgrad)``)
            and the engine's: ``outputs``, ``top_k``, ``batch_size``, ``max_memory``,
            ``strategy``, ...

    Returns:
        What the method returns: ``(batch, k, *input_shape)`` maps (nested for several inputs or
        outputs), or an :class:`Attribution` with the data that comes with them (``top_k``
        indices, the integrated-gradients ``delta``, the Grad-CAM ``layer``).

    Example:
        >>> ig = augnet.attribute(model, x, method="ig", steps=32, top_k=1)   # doctest: +SKIP
    """
    return METHODS[method_name(method)](model, x, **options)


__all__ = [
    "ALIASES",
    "ATTRIBUTION_METHODS",
    "METHODS",
    "NONNEGATIVE",
    "Attribution",
    "attribute",
    "gradcam",
    "gradcam_plus_plus",
    "gradient",
    "gradient_x_input",
    "integrated_gradients",
    "method_name",
    "occlusion",
    "smoothgrad",
    "squaregrad",
    "vargrad",
]
