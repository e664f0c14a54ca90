"""The data-set run, in four parts that any scheduler combines: plan, compute, commit, schedule.

``augnet jacobian MODEL INPUTS --out DIR`` (and ``augnet demo``) is built from:

1. **Planning**, :func:`plan_run` (the driver, once): list the inputs (paths only), load the
   model's shapes, settle the settings, open and lock the output folder, check it against this
   run (:meth:`augnet._store.RunStore.prepare`), and cut the inputs into positional batches
   (:class:`Batch`: batch ``b`` is inputs ``b*batch_size ...``). On ``--resume`` a batch whose
   record still matches its inputs (content fingerprints) is done; any other is discarded and
   redone. The result is a :class:`Plan` with the batches still to do and a :class:`BatchConfig`.
2. **Computing one batch**, :func:`compute_batch` ``(model, batch, config) -> BatchResult``: read
   the inputs, compute the Jacobians (through ``augnet.iter_jacobian``, block by block), render
   the PNGs to bytes and build the summary lines. It touches no file of the output folder, so a
   remote worker can run it and ship the :class:`augnet._store.BatchResult` (plain data:
   arrays, bytes, dicts) back.
3. **Committing one batch**, :func:`commit_batch` ``(store, result)``: the store, the only writer,
   writes it atomically; idempotent by batch id, so a batch computed twice (a worker that died
   and its replacement) is written once.
4. **Scheduling**: :func:`run_plan` is the one-process scheduler (a loop over the batches with a
   progress bar, SIGINT/SIGTERM handling and clean-up). A distributed scheduler (Ray) uses the
   same three functions: it plans on the driver, calls :func:`resolve_strategy` once, sends
   ``(batch, config)`` to workers that each load the model once (:func:`load_model`) and call
   :func:`compute_batch`, and commits the results on the driver, in any order.

The command line only parses arguments into :class:`RunOptions` and calls :func:`run`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from augnet import _imageio, _safeio, _store
from augnet._store import BatchResult, InputResult

logger = logging.getLogger(__name__)

ALL_OUTPUTS_UP_TO = 16  # models with more outputs default to top_k=DEFAULT_TOP_K
DEFAULT_TOP_K = 5
TOP_INPUTS = 5  # most sensitive input elements listed per output in summary.jsonl
FORMATS = ("png", "npy")
CONTACT_SHEET = "contact_sheet.png"
MAX_SHEET_OUTPUTS = 100
DEFAULT_MEMORY = 2 * 1024**3  # the engine's default budget for one pass, and one batch's results
_RENDER_BYTES_PER_PIXEL = 48  # float64 temporaries + RGB while one map is rendered


class RunError(ValueError):
    """A user error found while planning or running (reported as one line by the CLI)."""


# --------------------------------------------------------------------------------------------
# What a run is asked to do
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunOptions:
    """The options of a data-set run (what ``augnet jacobian`` parses from its arguments).

    Attributes:
        model: path of the model file or SavedModel folder.
        inputs: image files, folders, glob patterns or ``.npy`` files.
        out: the output folder.
        outputs / top_k: which outputs (flat indices), or each input's ``top_k`` largest;
            both ``None``: all outputs up to 16, else the top 5.
        formats: ``("png",)``, ``("npy",)`` or both.
        contact_sheet: one contact sheet per input (with ``png``).
        mode, cmap, percentile, reduce, overlay, alpha: how maps are drawn (augnet._render).
        scale: ``"shared"`` (default: every map of an input on the contact sheet's scale) or
            ``"per-map"`` (each map on its own percentile).
        colorbar: a colour bar with the scale in real units under each per-output PNG.
        preprocess, resize, crop, size: how images become inputs (augnet._imageio).
        batch_size: inputs per batch (bounds memory; batches are the unit of resume).
        max_memory: bytes for one Jacobian pass and for one batch's results (``None``: 2 GiB).
        strategy: the engine's strategy; ``"auto"`` is resolved on the first batch and kept.
        resume / overwrite: continue / replace the run in ``out``.
        unsafe: allow code in the model file (Lambda layers, SavedModel graphs).
        command: ``"jacobian"`` or ``"demo"`` (kept in run.json).
        command_line: shown to another run that finds the folder locked.
    """

    model: str | None
    inputs: tuple[str, ...]
    out: str = "jacobian_results"
    outputs: tuple[int, ...] | None = None
    top_k: int | None = None
    formats: tuple[str, ...] = ("png",)
    contact_sheet: bool = True
    mode: str = "signed"
    cmap: str | None = None
    percentile: float = 99.0
    reduce: str = "maxabs"
    overlay: bool = False
    alpha: float = 0.8
    scale: str = "shared"
    colorbar: bool = True
    preprocess: str = "unit"
    resize: str = "bilinear"
    crop: str = "none"
    size: tuple[int, int] | None = None
    batch_size: int = 32
    max_memory: int | None = None
    strategy: str = "auto"
    resume: bool = False
    overwrite: bool = False
    unsafe: bool = False
    command: str = "jacobian"
    command_line: str = ""


@dataclass(frozen=True)
class BatchConfig:
    """Everything :func:`compute_batch` needs besides the model and the inputs. Picklable.

    Attributes:
        input_shape: the model's per-sample input shape (sizes filled in).
        spec: how image files become inputs (``None``: ``.npy`` inputs only).
        outputs: selected flat output indices, or ``None`` with ``top_k``.
        top_k: per input, the ``top_k`` largest outputs, or ``None``.
        k: outputs per input.
        digits: zero-padding of the output index in file names.
        strategy: the engine strategy (never ``"auto"`` when batches are computed).
        max_memory: the engine's budget for one pass (bytes) or ``None``.
        formats, contact_sheet, mode, cmap, percentile, reduce, overlay, alpha, scale, colorbar:
            as in :class:`RunOptions`.
    """

    input_shape: tuple[int, ...]
    spec: _imageio.ImageSpec | None
    outputs: tuple[int, ...] | None
    top_k: int | None
    k: int
    digits: int
    strategy: str | None
    max_memory: int | None
    formats: tuple[str, ...]
    contact_sheet: bool
    mode: str
    cmap: str | None
    percentile: float
    reduce: str
    overlay: bool
    alpha: float
    scale: str
    colorbar: bool

    @property
    def pictures(self) -> bool:
        return "png" in self.formats


@dataclass(frozen=True)
class Batch:
    """One batch of a run: its position ``batch_id`` and its inputs (plain data, picklable)."""

    batch_id: int
    items: tuple[_imageio.InputItem, ...]


@dataclass
class RunStats:
    """What a run did; filled in while it runs (readable after an interruption).

    Attributes:
        inputs: inputs in the run; skipped: finished by an earlier run; computed: in this one.
        seconds: wall time of the computing part.
        interrupted: the signal number that stopped it (``signal.SIGINT``/``SIGTERM``), or None.
        folder_removed: the output folder was created by this run and removed again (nothing
            was written).
    """

    inputs: int = 0
    skipped: int = 0
    computed: int = 0
    seconds: float = 0.0
    interrupted: int | None = None
    folder_removed: bool = False


@dataclass
class Plan:
    """A planned run: the store (open and locked), the batches still to do, their config.

    Attributes:
        options: the run's options.
        store: the output folder's :class:`augnet._store.RunStore`, open and locked.
        config: the :class:`BatchConfig` for :func:`compute_batch`.
        settings: the settings recorded in run.json (compared on resume).
        items: every input of the run, in order.
        todo: the batches still to compute, in order.
        n_batches: batches in the whole run.
        stats: filled in while the run goes.
    """

    options: RunOptions
    store: _store.RunStore
    config: BatchConfig
    settings: dict[str, Any]
    items: list[_imageio.InputItem]
    todo: list[Batch]
    n_batches: int
    stats: RunStats = field(default_factory=RunStats)

    @property
    def out(self) -> Path:
        return self.store.out_dir

    def close(self) -> None:
        """Release the folder (its lock; the folder itself if this run created it and wrote
        nothing)."""
        self.store.close()


# --------------------------------------------------------------------------------------------
# Planning
# --------------------------------------------------------------------------------------------


def _shape_text(shape) -> str:
    return str(tuple(None if d is None else int(d) for d in shape))


def _is_float_dtype(dtype) -> bool:
    return str(dtype).startswith(("float", "bfloat", "<dtype: 'float"))


def single_io(model) -> tuple[tuple, str, tuple]:
    """``(input_shape, input_dtype, output_shape)`` of a one-input, one-output model.

    Raises:
        RunError: several inputs/outputs, an integer input, an output of unknown size.
    """
    inputs, outputs = list(model.inputs), list(model.outputs)
    if len(inputs) != 1 or len(outputs) != 1:
        raise RunError(
            f"the model has {len(inputs)} inputs and {len(outputs)} outputs; the command line "
            "handles models with one input and one output (use augnet.jacobian in Python)"
        )
    in_shape = tuple(None if d is None else int(d) for d in inputs[0].shape[1:])
    out_shape = tuple(None if d is None else int(d) for d in outputs[0].shape[1:])
    if not _is_float_dtype(inputs[0].dtype):
        raise RunError(
            f"the model's input has dtype {inputs[0].dtype}; integer inputs have no derivative "
            "(see 'augnet info')"
        )
    if any(d is None for d in out_shape):
        raise RunError(
            f"the model's output shape {_shape_text(('batch',) + out_shape)} is not fixed; the "
            "command line needs a known number of outputs"
        )
    return in_shape, str(inputs[0].dtype), out_shape


def select_outputs(outputs, top_k, n_outputs: int) -> tuple[list[int] | None, int | None]:
    """The run's output selection: explicit ``outputs``, ``top_k``, or the default.

    Raises:
        RunError: an index out of range, ``top_k`` larger than the outputs.
    """
    if outputs is None and top_k is None:
        if n_outputs <= ALL_OUTPUTS_UP_TO:
            outputs = list(range(n_outputs))
        else:
            top_k = DEFAULT_TOP_K
    if outputs is not None:
        outputs = [int(i) for i in outputs]
        bad = [i for i in outputs if i >= n_outputs]
        if bad:
            raise RunError(
                f"output index {bad[0]} is out of range: the model has {n_outputs} outputs "
                f"(valid indices 0..{n_outputs - 1})"
            )
    if top_k is not None and top_k > n_outputs:
        raise RunError(f"--top-k {top_k} is larger than the model's {n_outputs} outputs")
    return outputs, top_k


def model_fingerprint(path: str | os.PathLike[str] | None) -> str | None:
    """Content hash of a model file or SavedModel folder (``None`` without a path)."""
    if path is None:
        return None
    p = Path(path)
    if p.is_dir():
        return _safeio.hash_tree(p)
    if p.is_file():
        return _safeio.hash_file(p)
    return None


def check_memory(
    *,
    batch_size: int,
    k: int,
    input_shape: Sequence[int],
    pictures: bool,
    upscale_to: int,
    max_memory: int | None,
) -> None:
    """Refuse, before any work, a run whose batch cannot fit the memory budget.

    One batch holds its inputs and its ``(batch, k, *input_shape)`` float32 Jacobian, and
    renders one map at a time; that must fit ``max_memory`` (default 2 GiB, the engine's budget
    for one pass).

    Raises:
        RunError: with the sizes and the ways out.
    """
    budget = max_memory or DEFAULT_MEMORY
    n = math.prod(int(d) for d in input_shape)
    per_input = (k + 1) * n * 4
    render = 0
    if pictures and len(input_shape) >= 2:
        h, w = int(input_shape[0]), int(input_shape[1])
        factor = max(1, math.ceil(upscale_to / max(h, w)))
        render = h * w * _RENDER_BYTES_PER_PIXEL + h * w * factor * factor * 3
    need = batch_size * per_input + render
    if need <= budget:
        return
    fmt = _safeio.format_bytes
    what = f"{k} output(s) x input {_shape_text(input_shape)} in float32" + (
        ", plus rendering one map" if render else ""
    )
    one = per_input + render
    if one <= budget:
        fit = max(1, (budget - render) // per_input)
        way = f"lower --batch-size to {fit} or less, select fewer outputs (--outputs/--top-k)"
    else:
        way = (
            f"one input alone needs {fmt(one)}: use a smaller --size, select fewer outputs "
            "(--outputs/--top-k)"
        )
    raise RunError(
        f"one batch needs about {fmt(need)} of memory (--batch-size {batch_size} x {what}), "
        f"more than the memory budget of {fmt(budget)}; {way}, or raise --max-memory"
    )


def expand(options: RunOptions, input_shape=None) -> list[_imageio.InputItem]:
    """The run's inputs (paths only; checks that every one exists)."""
    return _imageio.expand_inputs(
        options.inputs, array_input_shape=input_shape, reserved=_store.RESERVED_NAMES
    )


def plan_run(
    options: RunOptions,
    *,
    model=None,
    load: Callable[[RunOptions], Any] | None = None,
) -> tuple[Plan, Any]:
    """Plan a run: inputs, settings, the output folder (opened, locked, checked), the batches.

    Cheap checks come first (inputs exist, the folder is not someone else's), then the model is
    loaded with ``load(options)`` unless ``model`` is given.

    Returns:
        ``(plan, model)``. The plan holds the folder's lock: :meth:`Plan.close` (or
        :func:`run_plan`) releases it.

    Raises:
        RunError, ValueError, OSError: a user error, as one line of text.
        augnet._store.ExistingResultsError: results or files of the user in the way.
        augnet._safeio.FolderLockedError: another run writes the folder.
    """
    out = Path(options.out)
    _safeio.check_not_locked(out)  # another run writes there: say which, before anything else
    if (out / _store.RUN_FILE).exists() and not (options.resume or options.overwrite):
        raise _store.ExistingResultsError(
            f"'{out}' already holds results; pass --resume to continue that run or "
            "--overwrite to replace it"
        )
    items = expand(options)  # every input exists, checked before the model (and TensorFlow)
    if "png" in options.formats:
        from augnet import _render

        _render.resolve_cmap(options.cmap, options.mode)  # a bad --cmap before any work
    if model is None:
        if load is None:
            raise TypeError("plan_run needs `model` or `load`")
        model = load(options)
    in_shape, _, out_shape = single_io(model)
    n_outputs = math.prod(out_shape) if out_shape else 1
    outputs, top_k = select_outputs(options.outputs, options.top_k, n_outputs)
    k = len(outputs) if outputs is not None else top_k
    if any(it.is_array for it in items):  # a .npy of exactly input_shape is one sample
        items = expand(options, in_shape)
    try:
        spec = _imageio.ImageSpec.from_input_shape(
            in_shape,
            size=options.size,
            preprocess=options.preprocess,
            resize=options.resize,
            crop=options.crop,
        )
    except _imageio.InputFitError:
        if any(not it.is_array for it in items):
            raise
        spec = None
    if spec is not None:
        in_shape = tuple(
            s if s is not None else d for s, d in zip(in_shape, spec.input_shape, strict=True)
        )
    elif any(d is None for d in in_shape):
        raise RunError(
            f"the model's input shape {_shape_text(('batch',) + in_shape)} is not fixed; "
            "pass .npy inputs of the full shape"
        )
    pictures = "png" in options.formats
    if pictures:
        if len(in_shape) not in (2, 3):
            raise RunError(
                f"saliency pictures need an image-shaped input (height, width[, channels]), "
                f"but the model takes {_shape_text(('batch',) + in_shape)}; use --format npy"
            )
        if options.contact_sheet and k > MAX_SHEET_OUTPUTS:
            raise RunError(
                f"a contact sheet shows at most {MAX_SHEET_OUTPUTS} outputs, {k} are selected; "
                "select fewer with --outputs/--top-k, or pass --no-contact-sheet"
            )
    from augnet import _render

    check_memory(
        batch_size=options.batch_size,
        k=k,
        input_shape=in_shape,
        pictures=pictures,
        upscale_to=_render.AUTO_UPSCALE_MIN_SIDE,
        max_memory=options.max_memory,
    )
    settings = {
        "model": model_fingerprint(options.model),
        "outputs": outputs,
        "top_k": top_k,
        "input_shape": list(in_shape),
        "preprocess": options.preprocess,
        "resize": options.resize,
        "crop": options.crop,
        "size": list(options.size) if options.size else None,
        "format": list(options.formats),
        "contact_sheet": bool(options.contact_sheet),
        "mode": options.mode,
        "cmap": options.cmap,
        "percentile": options.percentile,
        "reduce": options.reduce,
        "overlay": bool(options.overlay),
        "alpha": options.alpha,
        "scale": options.scale,
        "colorbar": bool(options.colorbar),
        "batch_size": options.batch_size,
        "max_memory": options.max_memory,
        "strategy": options.strategy,
    }
    root = _imageio.input_root(items)
    info = {
        "model_file": Path(options.model).name if options.model else None,
        "input_root": os.path.relpath(root, out.absolute()).replace(os.sep, "/"),
    }
    store = _store.RunStore(out)
    store.open(command_line=options.command_line)
    try:
        committed = store.prepare(
            settings,
            command=options.command,
            info=info,
            resume=options.resume,
            overwrite=options.overwrite,
            planned_names=[it.name for it in items] if pictures else (),
        )
        size = options.batch_size
        batches = [
            Batch(b, tuple(items[b * size : (b + 1) * size]))
            for b in range(math.ceil(len(items) / size))
        ]
        done = _check_committed(store, committed, batches, in_shape)
        if committed:
            store.rewrite_summary()  # what the records say (also after a kill mid-append)
        todo = [bt for bt in batches if bt.batch_id not in done]
        if options.resume and not options.overwrite:
            _check_targets_free(store, todo, pictures, "npy" in options.formats)
        strategy = options.strategy if options.strategy != "auto" else None
        if strategy is None:
            strategy = store.resolved.get("strategy")
        config = BatchConfig(
            input_shape=tuple(int(d) for d in in_shape),
            spec=spec,
            outputs=tuple(outputs) if outputs is not None else None,
            top_k=top_k,
            k=int(k),
            digits=max(2, len(str(n_outputs - 1))),
            strategy=strategy,
            max_memory=options.max_memory,
            formats=tuple(options.formats),
            contact_sheet=bool(options.contact_sheet),
            mode=options.mode,
            cmap=options.cmap,
            percentile=float(options.percentile),
            reduce=options.reduce,
            overlay=bool(options.overlay),
            alpha=float(options.alpha),
            scale=options.scale,
            colorbar=bool(options.colorbar),
        )
    except BaseException:
        store.close()
        raise
    skipped = sum(len(bt.items) for bt in batches if bt.batch_id in done)
    plan = Plan(options, store, config, settings, items, todo, len(batches))
    plan.stats.inputs, plan.stats.skipped = len(items), skipped
    return plan, model


def _check_committed(store, committed, batches: list[Batch], input_shape) -> set[int]:
    """Which committed batches are still valid for this plan; the others are discarded.

    A batch is valid when its record lists the same inputs (keys and names) as the plan's batch
    at its position, their content still has the recorded fingerprints, and its files are all
    there. Anything else (inputs changed, deleted, renamed, added; files removed) is discarded:
    its provable files are deleted and the batch is redone, so that the index, the summary and
    the folder stay in step with the inputs.
    """
    done = set()
    for b in committed:
        record = store.read_record(b)  # checks every path in it first
        ok = b < len(batches)
        if ok:
            items = batches[b].items
            entries = record["inputs"]
            ok = len(entries) == len(items) and all(
                e.get("key") == it.key and e.get("name") == it.name
                for e, it in zip(entries, items, strict=False)
            )
            if ok:
                try:
                    fps = _imageio.fingerprints(items, input_shape)
                except _imageio.InputReadError:
                    ok = False
                else:
                    ok = all(e.get("fingerprint") == fp for e, fp in zip(entries, fps, strict=True))
            ok = ok and store.record_is_complete(record)
        if ok:
            done.add(b)
        else:
            store.discard(b)
    return done


def _check_targets_free(store, todo: list[Batch], pictures: bool, npy: bool) -> None:
    """On resume: the batches to compute must not find files augnet cannot prove it wrote
    (after the clean-up of discarded batches, their folders are empty or absent)."""
    for bt in todo:
        if npy:
            store.check_free([f"{_store.SHARD_DIR}/{bt.batch_id:06d}.npy"])
        if pictures:
            for it in bt.items:
                if store.holds_files(it.name):
                    raise _store.ExistingResultsError(
                        f"'{store.out_dir / it.name}' holds files that are not in this run's "
                        "records; augnet does not replace files it cannot prove it wrote: "
                        "move them away, or pass --overwrite"
                    )


# --------------------------------------------------------------------------------------------
# Computing one batch (no file of the output folder is touched)
# --------------------------------------------------------------------------------------------


def load_model(path: str | os.PathLike[str], *, unsafe: bool = False):
    """Load the run's model as :func:`augnet.load_model` does (for workers)."""
    import augnet

    return augnet.load_model(path, safe_mode=not unsafe)


def resolve_strategy_for_x(model, x, *, outputs, top_k, max_memory) -> str:
    """The strategy ``strategy="auto"`` picks for batch ``x`` (by rule, or by timing the
    candidates).

    The engine's choice can depend on timings, and strategies differ in the last bits of the
    result; a run therefore resolves it once, on its first batch, records it in run.json, and
    passes it explicitly to every batch of the run and of its ``--resume``.
    """
    from augnet import _engine

    try:
        run = _engine._setup(
            model,
            x,
            outputs=outputs,
            top_k=top_k,
            training=False,
            strategy="auto",
            batch_size=None,
            chunk_size=None,
            max_memory=max_memory,
            jit_compile=False,
        )
        return "loop_xla" if run.strategy == "loop" and run.jit_compile else str(run.strategy)
    except (AttributeError, TypeError) as exc:  # the engine's internals changed
        logger.debug("could not resolve strategy='auto' (%s); using 'loop'", exc)
        return "loop"


def resolve_strategy(model, batch: Batch, config: BatchConfig) -> str:
    """The concrete strategy for a run whose config says ``"auto"``, decided on ``batch`` (the
    run's first); a distributed scheduler calls it once (on the driver or one worker) and then
    :func:`set_strategy`."""
    if config.strategy is not None and config.strategy != "auto":
        return config.strategy
    x, _ = _imageio.load_batch(batch.items, config.input_shape, config.spec)
    outputs = list(config.outputs) if config.outputs is not None else None
    return resolve_strategy_for_x(
        model, x, outputs=outputs, top_k=config.top_k, max_memory=config.max_memory
    )


def set_strategy(plan: Plan, strategy: str) -> None:
    """Fix the run's strategy: recorded in run.json (for ``--resume``) and in ``plan.config``."""
    plan.store.set_resolved("strategy", strategy)
    plan.config = dataclasses.replace(plan.config, strategy=strategy)


def summarize(
    key: str, name: str, outputs, predictions, jacobian, files: Sequence[str]
) -> dict[str, Any]:
    """One line of summary.jsonl for one input.

    Args:
        key: the input (its path relative to the input root, plus ``[row]`` for a row of a
            ``.npy`` array).
        name: its output folder's name.
        outputs: ``(k,)`` the selected output indices.
        predictions: ``(k,)`` the model's values for those outputs.
        jacobian: ``(k, *input_shape)``.
        files: the files written for it, relative to the output folder.

    Returns:
        ``{"input", "name", "outputs", "predictions", "jacobian_l2", "jacobian_max_abs",
        "top_inputs", "files"}``: per output, the Jacobian's L2 (Frobenius) norm and largest
        ``|J|``, and the ``TOP_INPUTS`` input elements with the largest ``|J|`` as
        ``{"index": [row, col, channel], "value": signed J}``, largest first.
    """
    import numpy as np

    j = np.asarray(jacobian, dtype=np.float64)
    flat = j.reshape(len(j), -1)
    mag = np.abs(flat)
    n = min(TOP_INPUTS, flat.shape[1])
    # largest |J| first, ties by position: deterministic
    top = np.argsort(-mag, axis=1, kind="stable")[:, :n] if n else np.zeros((len(j), 0), int)
    shape = j.shape[1:]
    return {
        "input": key,
        "name": name,
        "outputs": [int(o) for o in outputs],
        "predictions": [float(p) for p in predictions],
        "jacobian_l2": np.sqrt(np.sum(flat * flat, axis=1)).tolist(),
        "jacobian_max_abs": (mag.max(axis=1) if n else np.zeros(len(j))).tolist(),
        "top_inputs": [
            [
                {"index": [int(v) for v in np.unravel_index(i, shape)], "value": float(row[i])}
                for i in order
            ]
            for row, order in zip(flat, top, strict=True)
        ],
        "files": list(files),
    }


def _upscale(rgb, side: int):
    import numpy as np

    factor = max(1, math.ceil(side / max(rgb.shape[:2])))
    if factor > 1:
        rgb = np.repeat(np.repeat(rgb, factor, axis=0), factor, axis=1)
    return rgb


def _jacobian(model, x, config: BatchConfig, on_progress, check_stop, weight: float):
    """Predictions ``(b, n_outputs)``, selected output indices ``(b, k)`` and the Jacobian
    ``(b, k, *input_shape)`` float32 of one batch, streamed block by block."""
    import numpy as np

    import augnet

    b = len(x)
    preds = np.asarray(model(x, training=False)).reshape(b, -1)
    jac = np.empty((b, config.k, *x.shape[1:]), dtype=np.float32)
    idx = np.empty((b, config.k), dtype=np.int64)
    total = b * config.k
    for chunk in augnet.iter_jacobian(
        model,
        x,
        outputs=list(config.outputs) if config.outputs is not None else None,
        top_k=config.top_k,
        max_memory=config.max_memory,
        strategy=config.strategy or "auto",
    ):
        s, c = chunk.samples, chunk.columns
        values = np.asarray(chunk.values)
        jac[s, c] = values.reshape(values.shape[0], values.shape[1], *x.shape[1:])
        idx[s, c] = chunk.outputs
        if on_progress is not None:
            on_progress(weight * values.shape[0] * values.shape[1] / total * b)
        if check_stop is not None:
            check_stop()
    return preds, idx, jac


def render_input(
    item: _imageio.InputItem, display, jacobian, indices, predictions, config: BatchConfig
) -> dict[str, bytes]:
    """The PNG files of one input, as ``{relative path: bytes}``: one map per selected output
    (on the input's shared scale by default, with a colour bar in real units) and the contact
    sheet. Nothing is written."""
    import numpy as np

    from augnet import _render, _report

    files: dict[str, bytes] = {}
    reduced = [_render.reduce_channels(m, config.reduce) for m in jacobian]
    shared = None
    if config.scale == "shared":
        shared = _render.percentile_scale(np.stack(reduced), config.percentile) or None
    image = display if config.overlay and display is not None else None
    for j, k in enumerate(indices):
        scale = (
            shared
            if shared is not None
            else _render.percentile_scale(reduced[j], config.percentile)
        )
        rgb = _render.render_saliency(
            reduced[j],
            mode=config.mode,
            cmap=config.cmap,
            percentile=config.percentile,
            image=image,
            alpha=config.alpha,
            scale=scale or None,
        )
        rgb = _upscale(rgb, _render.AUTO_UPSCALE_MIN_SIDE)
        if config.colorbar:
            rgb = _render.with_colorbar(rgb, scale=scale, mode=config.mode, cmap=config.cmap)
        text = {
            "Software": "augnet",
            "augnet:output": str(int(k)),
            "augnet:scale": repr(float(scale)),
            "augnet:scaling": "shared" if shared is not None else "per-map",
        }
        files[f"{item.name}/output_{int(k):0{config.digits}d}.png"] = _render.png_bytes(rgb, text)
    if config.contact_sheet:
        picture = display if display is not None else np.zeros(jacobian.shape[1:3], np.uint8)
        files[f"{item.name}/{CONTACT_SHEET}"] = _report.contact_sheet_png(
            image=picture,
            jacobian=jacobian,
            output_indices=[int(k) for k in indices],
            predictions=[float(p) for p in predictions],
            mode=config.mode,
            cmap=config.cmap,
            percentile=config.percentile,
            reduce=config.reduce,
            title=item.name,
            shared_scale=config.scale == "shared",
            overlay=config.overlay and display is not None,
            alpha=config.alpha,
        )
    return files


def compute_batch(
    model,
    batch: Batch,
    config: BatchConfig,
    *,
    on_progress: Callable[[float], None] | None = None,
    check_stop: Callable[[], None] | None = None,
) -> BatchResult:
    """Compute one batch: read its inputs, their Jacobians, the pictures and summary lines.

    Writes nothing: the result is plain data (NumPy arrays, PNG bytes, dicts), ready to be
    shipped from a worker and committed by :func:`commit_batch`.

    Args:
        model: the loaded model.
        batch: the batch (its position and inputs).
        config: the run's :class:`BatchConfig`. With ``config.strategy`` ``None`` (``"auto"`` not
            yet resolved: the run's first batch) the strategy is resolved on this batch and
            returned in ``result.strategy``; the scheduler records it (:func:`set_strategy`)
            before computing any other batch, so that every batch uses the same one.
        on_progress: called with the work done since the last call, in inputs (fractions while
            the Jacobian's blocks and the pictures are computed).
        check_stop: called between blocks and pictures; raises to stop (signals).

    Returns:
        :class:`augnet._store.BatchResult`.
    """
    start = time.monotonic()
    items = batch.items
    fingerprints = _imageio.fingerprints(items, config.input_shape)  # before reading: safe side
    x, displays = _imageio.load_batch(items, config.input_shape, config.spec)
    if config.strategy is None or config.strategy == "auto":  # the run's first batch
        outputs = list(config.outputs) if config.outputs is not None else None
        strategy = resolve_strategy_for_x(
            model, x, outputs=outputs, top_k=config.top_k, max_memory=config.max_memory
        )
        config = dataclasses.replace(config, strategy=strategy)
    weight = 0.5 if config.pictures else 1.0
    preds, idx, jac = _jacobian(model, x, config, on_progress, check_stop, weight)
    inputs = []
    for i, it in enumerate(items):
        sel_preds = preds[i][idx[i]]
        files: dict[str, bytes] = {}
        if config.pictures:
            files = render_input(it, displays[i], jac[i], idx[i], sel_preds, config)
            if on_progress is not None:
                on_progress(1.0 - weight)
            if check_stop is not None:
                check_stop()
        inputs.append(
            InputResult(
                key=it.key,
                name=it.name,
                fingerprint=fingerprints[i],
                outputs=[int(v) for v in idx[i]],
                files=files,
                summary=summarize(it.key, it.name, idx[i], sel_preds, jac[i], list(files)),
            )
        )
    return BatchResult(
        batch_id=batch.batch_id,
        inputs=inputs,
        jacobian=jac if "npy" in config.formats else None,
        strategy=config.strategy,
        seconds=time.monotonic() - start,
    )


def commit_batch(store: _store.RunStore, result: BatchResult) -> bool:
    """Write a computed batch (the store is the only writer); ``False`` if it was already
    committed (idempotent by batch id)."""
    return store.commit(result)


# --------------------------------------------------------------------------------------------
# The one-process scheduler
# --------------------------------------------------------------------------------------------


class StopFlag:
    """SIGINT/SIGTERM during a run: stop at once, cleanly, every time.

    The handler records the signal and raises ``KeyboardInterrupt``. Where Python swallows that
    exception (a signal landing in a ``__del__`` or weakref callback prints "Exception ignored"
    and goes on), the recorded signal is raised again at the next :meth:`check`, which the run
    calls between blocks, pictures and batches. Inside :meth:`deferred` (a batch being
    committed) the handler only records the signal; the commit completes, then the run stops.
    """

    def __init__(self):
        self.signum: int | None = None
        self._defer = 0
        self._previous: dict[int, Any] = {}

    def _handler(self, signum, frame):
        self.signum = signum
        if not self._defer:
            raise KeyboardInterrupt

    def check(self) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        self._defer += 1
        try:
            yield
        finally:
            self._defer -= 1
        self.check()

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()


def run_plan(plan: Plan, model, *, quiet: bool = False, stream=None) -> RunStats:
    """The one-process scheduler: compute and commit every batch of ``plan`` in order.

    A signal (Ctrl-C, ``kill``) stops the run after cleaning up: every committed batch is kept,
    the batch in progress leaves nothing; ``stats.interrupted`` says which signal. Any other
    error propagates after the same clean-up. The folder's lock is released in every case.
    """
    from augnet._progress import Progress

    stats = plan.stats
    total = sum(len(bt.items) for bt in plan.todo)
    started = time.monotonic()
    try:
        with (
            StopFlag() as stop,
            Progress(
                total, enabled=not quiet, skipped=stats.skipped, stream=stream, tick=0.5
            ) as bar,
        ):
            try:
                for batch in plan.todo:
                    stop.check()
                    before = bar.work
                    result = compute_batch(
                        model, batch, plan.config, on_progress=bar.advance, check_stop=stop.check
                    )
                    with stop.deferred():
                        if plan.config.strategy is None:
                            set_strategy(plan, result.strategy)
                        commit_batch(plan.store, result)
                    bar.advance(len(batch.items) - (bar.work - before))
                    bar.update(len(batch.items))
                    stats.computed += len(batch.items)
            except KeyboardInterrupt:
                stats.interrupted = stop.signum or signal.SIGINT
    finally:
        stats.seconds = time.monotonic() - started
        _close(plan)
    return stats


def _close(plan: Plan) -> None:
    store = plan.store
    try:
        if store.committed:
            store.finish()
    finally:
        existed = store.out_dir.exists()
        store.close()
        plan.stats.folder_removed = existed and not store.out_dir.exists()


def run(
    options: RunOptions,
    *,
    model=None,
    load: Callable[[RunOptions], Any] | None = None,
    quiet: bool = False,
    stream=None,
) -> tuple[Plan, RunStats]:
    """Plan and run a data-set run in this process; see :func:`plan_run` and :func:`run_plan`."""
    plan, model = plan_run(options, model=model, load=load or _default_load)
    return plan, run_plan(plan, model, quiet=quiet, stream=stream)


def _default_load(options: RunOptions):
    return load_model(options.model, unsafe=options.unsafe)
