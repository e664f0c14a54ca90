"""``AugNet``: a Keras model with a ``return_jacobian`` method, and loading/wrapping helpers."""

from __future__ import annotations

import gc
import os
import zipfile
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

    ``AugNet(inputs=m.inputs, outputs=m.outputs)`` keeps ``m``'s nesting: a model whose outputs
    (or inputs) are a dict keeps the dict and its names, as :func:`augnet.wrap` does (Keras's
    ``m.outputs`` is a flat list; the dict is found from ``m`` itself).
    """

    def __init__(self, *args, **kwargs):
        if "inputs" in kwargs and "outputs" in kwargs:
            kwargs["inputs"] = _nesting_of(kwargs["inputs"], "_inputs", "_inputs_struct")
            kwargs["outputs"] = _nesting_of(kwargs["outputs"], "_outputs", "_outputs_struct")
        elif len(args) >= 2:
            args = (
                _nesting_of(args[0], "_inputs", "_inputs_struct"),
                _nesting_of(args[1], "_outputs", "_outputs_struct"),
                *args[2:],
            )
        super().__init__(*args, **kwargs)

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
        logits: bool = False,
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
            logits: the Jacobian of the scores before the final softmax/sigmoid instead of the
                probabilities (the model is not changed; see ``augnet.jacobian``).

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
            logits=logits,
        )

    def attribute(self, x, method: str = "gradient", **options):
        """Attribution maps of this model's outputs by ``method``; see ``augnet.attribute``
        (e.g. ``model.attribute(x, "integrated_gradients", top_k=1)``)."""
        from augnet._attribution import attribute

        return attribute(self, x, method, **options)

    def iter_jacobian(self, x, **kwargs):
        """Streams the Jacobian in blocks; see ``augnet.iter_jacobian``."""
        return _engine.iter_jacobian(self, x, **kwargs)

    def backward_model(self, gradient=None, *, jacobian: bool = False, derivatives=None):
        """A Keras model computing this model's VJP (or Jacobian); see
        ``augnet.backward_model``."""
        from augnet._backward import backward_model

        return backward_model(self, gradient, jacobian=jacobian, derivatives=derivatives)


def _nesting_of(tensors, flat_attr: str, struct_attr: str):
    """The nesting (a dict, a single tensor, ...) that a functional model's flat ``m.inputs`` /
    ``m.outputs`` list stands for, if ``tensors`` is that very list; else ``tensors`` unchanged.

    Keras flattens a model's dict outputs into the list ``m.outputs`` and keeps the dict in
    ``m._outputs_struct``; the model owning the list is found among the list's referrers (only
    the exact list object qualifies, so a list the user built is left as it is).
    """
    if not isinstance(tensors, list) or not tensors:
        return tensors
    for referrer in gc.get_referrers(tensors):
        if isinstance(referrer, dict) and referrer.get(flat_attr) is tensors:
            struct = referrer.get(struct_attr)
            if struct is None or isinstance(struct, list):
                return tensors
            flat = keras.tree.flatten(struct)
            if len(flat) == len(tensors) and all(a is b for a, b in zip(flat, tensors)):
                return struct
    return tensors


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
        safe_mode: ``False`` only for models you trust: it allows arbitrary code in ``Lambda``
            layers (passed to ``keras.models.load_model``) and SavedModel directories, whose
            TensorFlow graph can run any operation; with ``True`` (default) a SavedModel
            directory is refused.
        compile: restore the training configuration too (not needed for Jacobians).
        custom_objects: custom layers/functions the file refers to.

    Returns:
        An :class:`AugNet` sharing the loaded model's weights. A SavedModel directory is wrapped
        through ``keras.layers.TFSMLayer`` (inference only); its ``serving_default`` signature
        must have one input with a known shape.

    Raises:
        FileNotFoundError: nothing at ``path``.
        ValueError: ``path`` is not a model Keras or TensorFlow can read (a truncated or corrupt
            file is named as such); a FIFO, device or socket; a SavedModel directory with
            ``safe_mode=True``.
    """
    from augnet import _safeio

    path = Path(os.fspath(path))
    if not path.exists():
        raise FileNotFoundError(f"No model at {str(path)!r}: the file or directory does not exist.")
    _safeio.check_model_path(path)  # a FIFO or a device is refused before anything reads it
    if path.is_dir():
        if not (path / "saved_model.pb").exists():
            raise ValueError(
                f"{str(path)!r} is a directory but not a TensorFlow SavedModel (no saved_model.pb). "
                "Expected a .keras file, a .h5 file or a SavedModel directory."
            )
        if keras.backend.backend() != "tensorflow":  # (keras.layers.TFSMLayer is TF-only)
            raise ValueError(
                f"{str(path)!r} is a TensorFlow SavedModel, which runs only when Keras runs on "
                f"TensorFlow; Keras runs on {keras.backend.backend()!r} here. Run augnet with "
                "KERAS_BACKEND=tensorflow for this model, or load the model's .keras or .h5 "
                "file instead, which works on every backend."
            )
        if safe_mode:
            raise ValueError(
                f"{str(path)!r} is a TensorFlow SavedModel: loading it runs the TensorFlow graph "
                "it holds, which can do anything (write files, start programs), so augnet loads "
                "one only with safe_mode=False (--unsafe on the command line): pass it only for "
                "a model you trust."
            )
        return _load_saved_model(path)
    if path.suffix not in (".keras", ".h5", ".hdf5"):
        raise ValueError(
            f"Cannot load {str(path)!r}: expected a .keras file, a .h5 file or a SavedModel "
            f"directory; received a file with suffix {path.suffix!r}."
        )
    _check_container(path)
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


def _check_container(path: Path) -> None:
    """A ``.keras`` file is a zip archive and an ``.h5`` file HDF5: a truncated or corrupt one is
    named as such (Keras reports a truncated ``.keras`` file as "File not found")."""
    size = path.stat().st_size
    if path.suffix == ".keras":
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            raise ValueError(
                f"Cannot load {str(path)!r} as a Keras model: it is not a valid .keras file (a "
                f".keras file is a zip archive; this one, {size} bytes, is truncated or corrupt: "
                f"{exc}). Save the model again or copy it again."
            ) from None
        if "config.json" not in names:
            raise ValueError(
                f"Cannot load {str(path)!r} as a Keras model: the zip archive holds no "
                "config.json, so it is not a model saved with model.save('....keras')."
            )
        return
    with open(path, "rb") as f:
        head = f.read(8)
    if head != b"\x89HDF\r\n\x1a\n":
        import h5py

        if not h5py.is_hdf5(path):
            raise ValueError(
                f"Cannot load {str(path)!r} as a Keras model: it is not a valid HDF5 (.h5) file "
                f"({size} bytes; truncated, corrupt or another format). Save the model again or "
                "copy it again."
            )


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
