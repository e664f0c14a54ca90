"""augnet in Ray Data pipelines: per-row Jacobians as columns, one model load per actor.

:class:`JacobianBatch` is a callable class for :meth:`ray.data.Dataset.map_batches`: Ray makes a
pool of actors, each builds the class once (loading the model once), then calls it on batches::

    import ray, augnet.ray

    ds = ray.data.read_images("photos/", size=(96, 96), include_paths=True)
    ds = ds.map_batches(
        augnet.ray.JacobianBatch,
        fn_constructor_kwargs={"model": "model.keras", "top_k": 5, "preprocess": "minus1_1"},
        concurrency=(1, 4),     # 1 to 4 actors as CPUs allow, each with its own model
        batch_size=32,
        num_cpus=1,             # per actor (num_gpus=1 for a GPU each)
    )
    for row in ds.iter_rows():
        row["path"], row["outputs"], row["jacobian"].shape   # (5,), (5, 96, 96, 3)

:func:`map_jacobians` is the same call with augnet's argument names. The class itself does not
need Ray (call it on a dict of arrays to try it); :func:`map_jacobians` imports Ray when called and
says how to install it when it is missing (``pip install "augnet[ray]"``). Importing this module
imports neither Ray nor a framework.

:func:`run_jacobians` is the other way to use Ray: the whole data-set run of
``augnet jacobian ... --ray`` (the same files as on one machine, resumable), from Python.

Columns of a result batch (``b`` rows, ``m`` selected outputs, ``n`` outputs of the model):

=================  ==========================  ====================================================
column             shape, dtype                holds
=================  ==========================  ====================================================
``jacobian``       ``(b, m, *input_shape)``    ∂output/∂input of the selected outputs, float32
                   float32                     (all outputs: ``m = n``, flattened in C order)
``outputs``        ``(b, m)`` int64            the flat output index of each Jacobian row (with
                                               ``top_k``: each row's k largest, largest first)
``output_values``  ``(b, m)`` float32          the model's values of those outputs
``predictions``    ``(b, n)`` float32          the model's whole output, flattened
``saliency``       ``(b, m, H, W, 3)`` uint8   only with ``render=``: the maps as RGB pictures
                                               (:func:`augnet.render_saliency`)
=================  ==========================  ====================================================

plus the input columns (``keep_columns=True``, the default; ``False`` or a list to choose).

**Same numbers as on one machine.** Each row's Jacobian is what :func:`augnet.jacobian` gives
for the row alone: samples are independent in inference mode. ``strategy="auto"`` may decide by
timing on each actor; strategies agree to float rounding, so pass an explicit ``strategy`` (e.g.
``"loop"``) when results must be bit-identical across actors and runs.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = ["JacobianBatch", "map_jacobians", "require_ray", "run_jacobians"]

RESULT_COLUMNS = ("jacobian", "outputs", "output_values", "predictions", "saliency")
_INSTALL = 'pip install "augnet[ray]"'


def require_ray():
    """Import and return the ``ray`` package, or raise ImportError saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise ImportError(
            f"augnet.ray needs Ray with Ray Data, which is not installed ({exc}); install it with: "
            f"{_INSTALL}"
        ) from None
    return ray


def _load(model: Any, *, safe_mode: bool, custom_objects: Mapping | None):
    """A model from a path, a zero-argument factory, or a model object."""
    import augnet

    if isinstance(model, str | os.PathLike):
        return augnet.load_model(model, safe_mode=safe_mode, custom_objects=custom_objects)
    if callable(model) and not hasattr(model, "inputs"):
        return model()
    if hasattr(model, "inputs") and hasattr(model, "outputs"):
        return model
    raise TypeError(
        "`model` must be the path of a saved model (.keras, .h5, SavedModel directory), a "
        f"function that returns a model, or a Keras model. Received: model={model!r}"
    )


def _set_threads(threads: int | None) -> None:
    if threads is None:
        return
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(
            f"Received an invalid value for `threads`, expected a positive int or None. "
            f"Received: threads={threads!r}"
        )
    from augnet import _backend

    _backend.set_threads(threads)


class JacobianBatch:
    """Per-row Jacobians of a Keras model, as a callable class for ``Dataset.map_batches``.

    Args:
        model: the path of a saved model (``.keras``, ``.h5``, SavedModel directory; loaded once
            per actor with :func:`augnet.load_model`), a zero-argument function returning a
            model (built in the actor), or a model object (pickled to every actor: prefer a path).
        column: the column holding the model's inputs, ``(b, *input_shape)`` (images as Ray
            Data's ``read_images`` gives them, ``(b, H, W, C)`` uint8, or any numeric array).
            A missing channel axis is added for a one-channel model.
        outputs: flat output indices to differentiate (``[0, 3, 7]``); default all.
        top_k: instead, each row's ``k`` largest outputs (classifiers).
        preprocess: ``None`` to use the column's values as they are (cast to the model's input
            dtype), a name of :data:`augnet._imageio.PREPROCESSING` for 0-255 pixels (``"unit"``
            is ``x / 255``, ``"minus1_1"``, ``"imagenet_caffe"``, ``"imagenet_torch"``,
            ``"none"``), or a function of the ``(b, *input_shape)`` array.
        strategy: the engine's strategy (see :func:`augnet.jacobian`).
        max_memory: bounds one Jacobian pass, e.g. ``"2GB"``.
        training: the Jacobian of the training-mode forward pass (default: inference).
        render: ``"signed"`` or ``"abs"`` to add a ``saliency`` column of RGB maps (image
            inputs only); ``render_options`` are passed to :func:`augnet.render_saliency`.
        keep_columns: ``True`` keeps the input columns in the result, ``False`` drops them, a
            list keeps those named.
        safe_mode: ``False`` only for model files you trust (Lambda layers run code).
        custom_objects: custom layers the model file refers to.
        threads: TensorFlow's thread pools per actor (set before the model is loaded).

    Example:
        >>> f = JacobianBatch("model.keras", column="x", outputs=[0, 2])  # doctest: +SKIP
        >>> out = f({"x": np.zeros((4, 16, 16, 1), "float32")})
        >>> out["jacobian"].shape, out["outputs"].shape  # (batch, m, *input_shape), (batch, m)
        ((4, 2, 16, 16, 1), (4, 2))
    """

    def __init__(
        self,
        model: Any,
        *,
        column: str = "image",
        outputs: Sequence[int] | None = None,
        top_k: int | None = None,
        preprocess: str | Callable | None = None,
        strategy: str = "auto",
        max_memory: Any = None,
        training: bool = False,
        render: str | None = None,
        render_options: Mapping[str, Any] | None = None,
        keep_columns: bool | Sequence[str] = True,
        safe_mode: bool = True,
        custom_objects: Mapping | None = None,
        threads: int | None = None,
    ):
        if not isinstance(column, str):
            raise TypeError(f"`column` must be a column name (str). Received: column={column!r}")
        if outputs is not None and top_k is not None:
            raise ValueError(
                "Pass `outputs` or `top_k`, not both. "
                f"Received: outputs={outputs!r}, top_k={top_k!r}"
            )
        if render not in (None, "signed", "abs"):
            raise ValueError(
                "Received an invalid value for `render`, expected None, 'signed' or 'abs'. "
                f"Received: render={render!r}"
            )
        if isinstance(preprocess, str):
            from augnet._imageio import PREPROCESSING

            if preprocess not in PREPROCESSING:
                raise ValueError(
                    f"Received an invalid value for `preprocess`, expected one of "
                    f"{', '.join(PREPROCESSING)}, a function or None. "
                    f"Received: preprocess={preprocess!r}"
                )
        elif preprocess is not None and not callable(preprocess):
            raise TypeError(
                "`preprocess` must be a name, a function or None. "
                f"Received: preprocess={preprocess!r}"
            )
        self.column = column
        self.outputs = None if outputs is None else [int(o) for o in outputs]
        self.top_k = top_k
        self.preprocess = preprocess
        self.strategy = strategy
        self.max_memory = max_memory
        self.training = bool(training)
        self.render = render
        self.render_options = dict(render_options or {})
        self.keep_columns = keep_columns
        _set_threads(threads)
        self.model = _load(model, safe_mode=safe_mode, custom_objects=custom_objects)
        if len(self.model.inputs) != 1 or len(self.model.outputs) != 1:
            raise ValueError(
                f"JacobianBatch takes models with one input and one output; this model has "
                f"{len(self.model.inputs)} inputs and {len(self.model.outputs)} outputs. Call "
                "augnet.jacobian in your own map_batches function for such models."
            )
        self.input_shape = tuple(self.model.inputs[0].shape[1:])
        self.input_dtype = str(getattr(self.model.inputs[0], "dtype", "float32"))

    # -- one batch ---------------------------------------------------------------------------

    def _inputs(self, batch: Mapping[str, Any]):
        import numpy as np

        if self.column not in batch:
            raise KeyError(
                f"the batch has no column {self.column!r} (its columns: {sorted(batch)}); pass "
                "column= the name of the column that holds the model's inputs"
            )
        x = batch[self.column]
        if isinstance(x, np.ndarray) and x.dtype == object:
            try:
                x = np.stack([np.asarray(v) for v in x])
            except ValueError:
                shapes = sorted({np.shape(v) for v in x})
                raise ValueError(
                    f"the rows of column {self.column!r} have different shapes {shapes[:4]}; "
                    "resize them to the model's input size first (read_images(size=(H, W)))"
                ) from None
        x = np.asarray(x)
        shape = self.input_shape
        if x.ndim == len(shape) and len(shape) >= 1 and shape[-1] == 1:
            x = x[..., None]  # grayscale images without a channel axis
        if x.ndim != len(shape) + 1 or any(
            d is not None and d != s for d, s in zip(shape, x.shape[1:], strict=False)
        ):
            raise ValueError(
                f"column {self.column!r} holds rows of shape {tuple(x.shape[1:])}; the model "
                f"takes {tuple(shape)} (batch axis first): resize or reshape the rows"
            )
        if isinstance(self.preprocess, str):
            from augnet._imageio import preprocess_pixels

            x = preprocess_pixels(x, self.preprocess)
        elif callable(self.preprocess):
            x = np.asarray(self.preprocess(x))
        if not np.issubdtype(x.dtype, np.floating):
            x = x.astype(self.input_dtype if "float" in self.input_dtype else "float32")
        return x

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """Jacobians of one batch: a dict of columns (see the module docstring)."""
        import keras
        import numpy as np

        import augnet

        def to_numpy(value, dtype):  # from any Keras backend's tensors
            return np.asarray(keras.ops.convert_to_numpy(value), dtype=dtype)

        x = self._inputs(batch)
        b = len(x)
        preds = to_numpy(self.model(x, training=self.training), np.float32).reshape(b, -1)
        result = augnet.jacobian(
            self.model,
            x,
            outputs=self.outputs,
            top_k=self.top_k,
            training=self.training,
            strategy=self.strategy,
            max_memory=self.max_memory,
        )
        if self.top_k is not None:
            jac, idx = result.jacobian, to_numpy(result.indices, np.int64)
        else:
            jac = result
            sel = self.outputs if self.outputs is not None else range(preds.shape[1])
            idx = np.broadcast_to(np.asarray(list(sel), dtype=np.int64), (b, len(sel))).copy()
        jac = to_numpy(jac, np.float32).reshape(b, idx.shape[1], *x.shape[1:])
        out: dict[str, Any] = {}
        keep = self.keep_columns
        if keep is True:
            keep = list(batch)
        elif keep is False:
            keep = []
        for name in keep:
            if name in RESULT_COLUMNS:
                raise ValueError(
                    f"the input column {name!r} has the name of a result column; rename it or "
                    "pass keep_columns= the columns to keep"
                )
            out[name] = batch[name]
        out["jacobian"] = jac
        out["outputs"] = idx
        out["output_values"] = np.take_along_axis(preds, idx, axis=1)
        out["predictions"] = preds
        if self.render is not None:
            out["saliency"] = self._render(jac)
        return out

    def _render(self, jac):
        import numpy as np

        from augnet._render import render_saliency

        if jac.ndim not in (4, 5):
            raise ValueError(
                f"render= needs image inputs (height, width[, channels]); the model takes "
                f"{tuple(jac.shape[2:])}"
            )
        pictures = [
            [render_saliency(m, mode=self.render, **self.render_options) for m in row]
            for row in jac
        ]
        return np.asarray(pictures, dtype=np.uint8)


def map_jacobians(
    dataset,
    model: Any,
    *,
    concurrency: int | tuple[int, int] = 1,
    batch_size: int = 32,
    num_cpus: float | None = None,
    num_gpus: float | None = None,
    max_restarts: int | None = None,
    max_task_retries: int | None = None,
    **options: Any,
):
    """``dataset.map_batches(JacobianBatch, ...)``: a pool of ``concurrency`` actors, each loading
    ``model`` once, computing the Jacobians of ``batch_size`` rows at a time.

    Args:
        dataset: a :class:`ray.data.Dataset`.
        model: as for :class:`JacobianBatch`.
        concurrency: the number of actors, or ``(min, max)`` for an autoscaling pool. A fixed
            pool waits until the cluster can place all its actors and the tasks feeding them
            (on 2 CPUs, ``read_images`` with 2 actors waits forever); ``(1, n)`` starts with
            what there is.
        batch_size: rows per call.
        num_cpus, num_gpus: resources per actor.
        max_restarts, max_task_retries: Ray's actor fault tolerance (a dead actor is restarted
            and its batches redone); Ray Data's defaults when ``None``.
        **options: the other arguments of :class:`JacobianBatch` (``column``, ``top_k``, ...).

    Returns:
        The mapped :class:`ray.data.Dataset` (lazy, as Ray Data is).
    """
    require_ray()
    remote_args: dict[str, Any] = {}
    if max_restarts is not None:
        remote_args["max_restarts"] = max_restarts
    if max_task_retries is not None:
        remote_args["max_task_retries"] = max_task_retries
    kwargs: dict[str, Any] = {}
    if num_cpus is not None:
        kwargs["num_cpus"] = num_cpus
    if num_gpus is not None:
        kwargs["num_gpus"] = num_gpus
    return dataset.map_batches(
        JacobianBatch,
        fn_constructor_kwargs={"model": model, **options},
        concurrency=concurrency,
        batch_size=batch_size,
        **kwargs,
        **remote_args,
    )


# --------------------------------------------------------------------------------------------
# The distributed data-set run (augnet jacobian ... --ray) from Python
# --------------------------------------------------------------------------------------------


def run_jacobians(
    model: str | os.PathLike[str],
    inputs: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    *,
    address: str | None = None,
    workers: int | None = None,
    worker_cpus: float = 1.0,
    worker_gpus: float = 0.0,
    quiet: bool = True,
    **options: Any,
):
    """``augnet jacobian MODEL INPUTS --out OUT --ray [ADDRESS]`` from Python: a data-set run
    whose batches are computed by a Ray cluster's workers and written here, exactly as the
    one-process run writes them (pictures, raw Jacobians, batch records, ``summary.jsonl``,
    ``index.html``; byte for byte the same files). Resumable (``resume=True``) with or without
    Ray.

    Args:
        model: the saved model's path (``.keras``, ``.h5``, or a SavedModel folder with
            ``unsafe=True``); its bytes are sent to the workers, which need not see it.
        inputs: image files, folders, glob patterns or ``.npy`` files (one, or a list); read
            here and sent with each batch.
        out: the output folder (written by this process only).
        address: a running cluster's address (``"host:port"``, ``"auto"``), or ``None``: the
            cluster this process is connected to (``ray.init`` called before), else a local
            one started for the run on 127.0.0.1.
        workers: number of workers (actors), each loading the model once; default: as many as
            the cluster's CPUs allow (a local cluster: this machine's cores).
        worker_cpus, worker_gpus: Ray resources per worker (``num_cpus``, ``num_gpus``).
        quiet: no progress bar.
        **options: the run's options, as ``augnet jacobian``'s, by their
            :class:`augnet._runner.RunOptions` names: ``outputs``, ``top_k``,
            ``formats=("png", "npy")`` (or ``"png,npy"``), ``contact_sheet``, ``batch_size``,
            ``strategy``, ``preprocess``, ``resize``, ``crop``, ``size``, ``mode``, ``overlay``,
            ``resume``, ``overwrite``, ``unsafe``, ...

    Returns:
        ``RayRunStats``: ``inputs``, ``computed``, ``skipped``, ``seconds``, ``workers`` (where
        each ran), ``failures`` and ``redone`` (batches sent again after their worker died),
        ``timing`` (per-batch figures).

    Raises:
        ImportError: Ray is not installed.
        ValueError: a user error (missing inputs, a folder holding other results, a worker that
            cannot load the model, an unreachable cluster, ...), with what to do.
        KeyboardInterrupt: after a clean stop on Ctrl-C (finished batches are kept).

    Example:
        >>> stats = run_jacobians("model.keras", "photos/", "results", workers=2,  # doctest: +SKIP
        ...                       top_k=5, formats="png,npy", preprocess="minus1_1")
        >>> stats.computed, [w["where"] for w in stats.workers]
    """
    import signal

    from augnet import _ray_run, _runner

    if not isinstance(model, str | os.PathLike):
        raise TypeError(
            "`model` must be the path of a saved model (.keras, .h5, SavedModel folder); save an "
            f"in-memory model first (model.save('model.keras')). Received: model={model!r}"
        )
    if isinstance(inputs, str | os.PathLike):
        inputs = [inputs]
    formats = options.pop("formats", ("png",))
    if isinstance(formats, str):
        formats = tuple(f.strip() for f in formats.split(",") if f.strip())
    known = {f.name for f in _dataclass_fields(_runner.RunOptions)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(
            f"run_jacobians() got unknown option(s) {unknown}; expected names of "
            f"augnet._runner.RunOptions: {sorted(known - {'model', 'inputs', 'out'})}"
        )
    for key in ("outputs", "size"):
        if options.get(key) is not None:
            options[key] = tuple(options[key])
    try:
        _ray_run.require_ray()
    except _ray_run.ClusterError as exc:
        raise ImportError(str(exc)) from None
    run_options = _runner.RunOptions(
        model=os.fspath(model),
        inputs=tuple(os.fspath(i) for i in inputs),
        out=os.fspath(out),
        formats=tuple(formats),
        **options,
    )
    cluster = _ray_run.Cluster(
        address=address, workers=workers, worker_cpus=worker_cpus, worker_gpus=worker_gpus
    )
    stats = _ray_run.run(run_options, cluster, quiet=quiet)
    if stats.interrupted == signal.SIGINT:
        raise KeyboardInterrupt
    return stats


def _dataclass_fields(cls):
    import dataclasses

    return dataclasses.fields(cls)
