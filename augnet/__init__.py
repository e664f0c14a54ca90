"""augnet: exact per-sample Jacobians of trained Keras models, and saliency images.

The public names are imported lazily, so that ``import augnet`` (and the ``augnet`` command's
``--help``) does not pay for importing TensorFlow until a Jacobian is asked for.
"""

from __future__ import annotations

import importlib

__version__ = "1.0.0"

_EXPORTS = {
    # the Jacobian engine
    "jacobian": "augnet._engine",
    "iter_jacobian": "augnet._engine",
    "jacobian_to_npy": "augnet._engine",
    "JacobianChunk": "augnet._engine",
    "TopKJacobian": "augnet._engine",
    "STRATEGIES": "augnet._engine",
    # the engine's warning and error for issue 9 (all-zero Jacobians, results too large)
    "ZeroJacobianWarning": "augnet._engine",
    "ResultTooLargeError": "augnet._engine",
    # the model
    "AugNet": "augnet._model",
    "load_model": "augnet._model",
    "wrap": "augnet._model",
    # beyond return_jacobian: products, backward models, derivative rules, analysis
    "vjp": "augnet._backward",
    "jvp": "augnet._backward",
    "backward_model": "augnet._backward",
    "VJPLayer": "augnet._backward",
    "JacobianLayer": "augnet._backward",
    "register_derivative": "augnet._derivatives",
    "unregister_derivative": "augnet._derivatives",
    "registered_derivatives": "augnet._derivatives",
    "use_derivatives": "augnet._derivatives",
    "GradientPathError": "augnet._derivatives",
    "layer_jacobians": "augnet._analysis",
    "intermediate_model": "augnet._analysis",
    "jacobian_wrt": "augnet._analysis",
    "parameter_gradients": "augnet._analysis",
    "jacobian_norms": "augnet._analysis",
    "JacobianNorms": "augnet._analysis",
    "spectral_norm": "augnet._analysis",
    "local_lipschitz": "augnet._analysis",
    "PlusConstant": "augnet._layers",
    "Clip": "augnet._layers",
    # saliency images (NumPy + pillow; no TensorFlow)
    "render_saliency": "augnet._render",
    "save_jacobian_images": "augnet._render",
    "reduce_channels": "augnet._render",
    "robust_scale": "augnet._render",
    "colormap_lut": "augnet._render",
    "contact_sheet": "augnet._report",
    # attribution methods, metrics and the comparison sheet (augnet/_attribution/, _compare.py)
    "attribute": "augnet._attribution",
    "Attribution": "augnet._attribution",
    "ATTRIBUTION_METHODS": "augnet._attribution",
    "gradient": "augnet._attribution",
    "gradient_x_input": "augnet._attribution",
    "smoothgrad": "augnet._attribution",
    "squaregrad": "augnet._attribution",
    "vargrad": "augnet._attribution",
    "integrated_gradients": "augnet._attribution",
    "gradcam": "augnet._attribution",
    "gradcam_plus_plus": "augnet._attribution",
    "occlusion": "augnet._attribution",
    "deletion": "augnet._attribution.metrics",
    "insertion": "augnet._attribution.metrics",
    "mufidelity": "augnet._attribution.metrics",
    "randomization_check": "augnet._attribution.metrics",
    "evaluate_attributions": "augnet._attribution.metrics",
    "AttributionTable": "augnet._attribution.metrics",
    "Curve": "augnet._attribution.metrics",
    "comparison_sheet": "augnet._compare",
    "build_comparison_sheet": "augnet._compare",
}

__all__ = ["__version__", *_EXPORTS]

# public submodules reached as attributes (`augnet.ray.JacobianBatch`), imported on first use
_SUBMODULES = ("ray",)


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"augnet.{name}")
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'augnet' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(__all__)
