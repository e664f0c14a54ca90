"""augnet: exact per-sample Jacobians of trained Keras models, and saliency images."""

__version__ = "1.0.0"
__all__ = ["__version__"]
