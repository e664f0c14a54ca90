"""``AugNet``: a Keras model with a ``return_jacobian`` method, and loading/wrapping helpers."""

from __future__ import annotations

import os
from pathlib import Path

import keras

from augnet import _engine


@keras.saving.register_keras_serializable(package="augnet")
class AugNet(keras.Model):
    """A Keras model that can return its exact per-sample Jacobian.

    Build it the functional way, or wrap an existing functional/Sequential model without copying
    its weights (the two share variables, so training one trains the other):

        >>> inputs = keras.Input((4,))                                      # doctest: +SKIP
        >>> model = augnet.AugNet(inputs=inputs, outputs=keras.layers.Dense(2)(inputs))
        >>> wrapped = augnet.AugNet(inputs=m.inputs, outputs=m.outputs)     # doctest: +SKIP

    It compiles, trains with ``fit``, saves to ``.keras`` and loads back with
    ``keras.models.load_model`` as an ``AugNet`` like any Keras model.
    """

    def return_jacobian(
        self,
        x,
        *,
        outputs=None,
        top_k: int | None = None,
        training: bool = False,
        strategy: str = "auto",
        batch_size: int | None = None,
        chunk_size: int | None = None,
        max_memory=None,
        jit_compile: bool = False,
        derivatives=None,
        wrt: str | None = None,
    ):
        """The exact per-sample Jacobian of the model's outputs with respect to its inputs.

        Args:
            x: ``(batch, *input_shape)`` NumPy array or tensor; a list/dict of them for several
                inputs.
            outputs: flat output indices to select, e.g. ``[0, 3, 7]`` (see ``augnet.jacobian``).
            top_k: per sample, the ``k`` largest outputs (classifiers): returns
                ``TopKJacobian(jacobian, indices, values)``.
            training: ``False`` (default) for the model as it predicts. ``True`` runs the
                training-mode forward pass (Dropout active, BatchNorm on each pass's batch
                statistics, which couples the samples: see ``augnet.jacobian``); the model's
                weights and statistics never change.
            strategy, batch_size, chunk_size, max_memory, jit_compile: see ``augnet.jacobian``.
            derivatives: ``{LayerClass: rule}`` custom derivative rules (see
                ``augnet.register_derivative``).
            wrt: a layer name: the Jacobian with respect to that layer's output activation,
                ``(batch, *output_shape, *activation_shape)``, instead of the inputs.

        Returns:
            ``(batch, *output_shape, *input_shape)`` (``(batch, k, *input_shape)`` with a
            selection); ``J[out][in]`` for several inputs/outputs. NumPy when eager, a tensor
            inside ``tf.function``.

        Example:
            >>> J = model.return_jacobian(x)          # doctest: +SKIP
            >>> J.shape                               # doctest: +SKIP
            (8, 13, 256, 256, 1)
        """
        return _engine.jacobian(
            self,
            x,
            outputs=outputs,
            top_k=top_k,
            training=training,
            strategy=strategy,
            batch_size=batch_size,
            chunk_size=chunk_size,
            max_memory=max_memory,
            jit_compile=jit_compile,
            derivatives=derivatives,
            wrt=wrt,
        )

    def iter_jacobian(self, x, **kwargs):
        """Streams the Jacobian in blocks; see ``augnet.iter_jacobian``."""
        return _engine.iter_jacobian(self, x, **kwargs)

    def backward_model(self, gradient=None, *, jacobian: bool = False, derivatives=None):
        """A Keras model computing this model's VJP (or Jacobian); see
        ``augnet.backward_model``."""
        from augnet._backward import backward_model

        return backward_model(self, gradient, jacobian=jacobian, derivatives=derivatives)


def wrap(model) -> AugNet:
    """Wraps a functional or Sequential Keras model as an :class:`AugNet`, sharing its weights.

    Args:
        model: a built ``keras.Model`` with a functional graph (functional or Sequential). An
            ``AugNet`` is returned as is.

    Raises:
        TypeError: ``model`` is not a Keras model, or is a subclassed model with no functional
            graph (``model.inputs`` undefined); such a model still works with
            ``augnet.jacobian(model, x)``.
    """
    if isinstance(model, AugNet):
        return model
    if not isinstance(model, keras.Model):
        raise TypeError(
            f"`model` must be a keras.Model; received an object of type {type(model).__name__}. "
            "For any other callable use augnet.jacobian(fn, x)."
        )
    inputs = _engine.symbolic_io(model, "input")
    outputs = _engine.symbolic_io(model, "output")
    if inputs is None or outputs is None:
        raise TypeError(
            f"Cannot wrap {type(model).__name__} {model.name!r} as an AugNet: it is a subclassed "
            "model with no functional graph (model.inputs is undefined). Compute its Jacobian "
            "with augnet.jacobian(model, x) instead, which works for any callable model."
        )
    # Keep the model's own nesting of inputs and outputs (dicts stay dicts).
    return AugNet(inputs=inputs, outputs=outputs, name=model.name)


def load_model(
    path, *, safe_mode: bool = True, compile: bool = False, custom_objects=None
) -> AugNet:
    """Opens a saved model — ``.keras``, legacy ``.h5``, or a TensorFlow SavedModel directory.

    Args:
        path: the file or SavedModel directory.
        safe_mode: passed to ``keras.models.load_model``; ``False`` only for files you trust
            (it allows arbitrary code in ``Lambda`` layers).
        compile: restore the training configuration too (not needed for Jacobians).
        custom_objects: custom layers/functions the file refers to.

    Returns:
        An :class:`AugNet` sharing the loaded model's weights. A SavedModel directory is wrapped
        through ``keras.layers.TFSMLayer`` (inference only); its ``serving_default`` signature
        must have one input with a known shape.

    Raises:
        FileNotFoundError: nothing at ``path``.
        ValueError: ``path`` is not a model Keras or TensorFlow can read.
    """
    path = Path(os.fspath(path))
    if not path.exists():
        raise FileNotFoundError(f"No model at {str(path)!r}: the file or directory does not exist.")
    if path.is_dir():
        if not (path / "saved_model.pb").exists():
            raise ValueError(
                f"{str(path)!r} is a directory but not a TensorFlow SavedModel (no saved_model.pb). "
                "Expected a .keras file, a .h5 file or a SavedModel directory."
            )
        if keras.backend.backend() != "tensorflow":
            raise ValueError(
                f"{str(path)!r} is a TensorFlow SavedModel directory: a TensorFlow graph, which "
                f"Keras cannot run on the {keras.backend.backend()!r} backend "
                "(keras.layers.TFSMLayer needs TensorFlow). Load it with KERAS_BACKEND=tensorflow, "
                "or load the model's .keras or .h5 file instead (model.save('model.keras'))."
            )
        return _load_saved_model(path)
    if path.suffix not in (".keras", ".h5", ".hdf5"):
        raise ValueError(
            f"Cannot load {str(path)!r}: expected a .keras file, a .h5 file or a SavedModel "
            f"directory; received a file with suffix {path.suffix!r}."
        )
    # augnet's own layers (backward models, derivative-rule layers) register themselves with
    # Keras when their modules are imported; a fresh process may not have imported them yet.
    import augnet._backward  # noqa: F401
    import augnet._layers  # noqa: F401

    try:
        model = keras.models.load_model(
            path, compile=compile, safe_mode=safe_mode, custom_objects=custom_objects
        )
    except Exception as exc:
        raise ValueError(f"Cannot load {str(path)!r} as a Keras model: {exc}") from exc
    return wrap(model)


def _load_saved_model(path: Path) -> AugNet:
    import tensorflow as tf

    try:
        loaded = tf.saved_model.load(str(path))
        signature = loaded.signatures["serving_default"]
    except Exception as exc:
        raise ValueError(
            f"Cannot load {str(path)!r} as a TensorFlow SavedModel with a 'serving_default' "
            f"signature: {exc}"
        ) from exc
    _, kwargs = signature.structured_input_signature
    if len(kwargs) != 1:
        raise ValueError(
            f"The SavedModel at {str(path)!r} has {len(kwargs)} inputs {sorted(kwargs)}; augnet "
            "wraps SavedModels with one input. Load it with tf.saved_model.load and call "
            "augnet.jacobian(fn, x) on its signature function instead."
        )
    ((name, spec),) = kwargs.items()
    if spec.shape.rank is None or any(d is None for d in spec.shape[1:]):
        raise ValueError(
            f"The SavedModel input {name!r} has shape {tuple(spec.shape)}; a known per-sample "
            "shape is needed to wrap it."
        )
    layer = keras.layers.TFSMLayer(str(path), call_endpoint="serving_default")
    inputs = keras.Input(shape=tuple(spec.shape[1:]), dtype=spec.dtype.name, name=name)
    out = layer(inputs)
    if isinstance(out, dict) and len(out) == 1:
        out = next(iter(out.values()))
    return AugNet(inputs=inputs, outputs=out, name=path.name)
