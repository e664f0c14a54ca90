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
from augnet._compute import (  # noqa: F401  (the runner's API: plan, compute, commit, schedule)
    CONTACT_SHEET,
    TOP_INPUTS,
    compute_batch,
    load_model,
    render_input,
    resolve_strategy,
    resolve_strategy_for_x,
    summarize,
)
from augnet._store import BatchResult

logger = logging.getLogger(__name__)

ALL_OUTPUTS_UP_TO = 16  # models with more outputs default to top_k=DEFAULT_TOP_K
DEFAULT_TOP_K = 5
FORMATS = ("png", "npy")
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
        logits: the Jacobian of the scores before the model's final softmax/sigmoid
            (``augnet.jacobian(..., logits=True)``); recorded in run.json when set.
        method, method_options: an attribution method (``augnet._attribution``) whose maps are
            written instead of the Jacobian, with its options as ``(name, value)`` pairs;
            ``None``: the Jacobian (augnet/_compute_attribution.py).
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
    logits: bool = False
    method: str | None = None
    method_options: tuple = ()


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
        logits: Jacobians of the scores before the final softmax/sigmoid.
        method, method_options: the attribution method and its prepared options, or ``None``
            for the Jacobian.
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
    logits: bool = False
    method: str | None = None
    method_options: tuple = ()

    @property
    def pictures(self) -> bool:
        return "png" in self.formats


@dataclass(frozen=True)
class Batch:
    """One batch of a run: its position ``batch_id`` and its inputs (plain data, picklable).

    ``payload``: the inputs' content, read on the driver (:func:`with_payload`), for a worker that
    cannot see the input files; ``None`` (default) reads the files where the batch is computed.
    Results are the same bit for bit either way (the fingerprints too).
    """

    batch_id: int
    items: tuple[_imageio.InputItem, ...]
    payload: tuple | None = None


def with_payload(batch: Batch, config: BatchConfig) -> Batch:
    """``batch`` with its inputs' content attached (image bytes, array rows), for shipping to a
    worker without the driver's file system."""
    payload = _imageio.read_payload(batch.items, config.input_shape)
    return dataclasses.replace(batch, payload=payload)


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
    if options.logits:  # a model without a final softmax/sigmoid: refused before any work
        from augnet._engine import logits_view

        logits_view(model)
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
    if options.logits:  # only when set: earlier runs' folders (and the demo's) resume as they are
        settings["logits"] = True
    method_options = ()
    if options.method is not None:  # an attribution method: its options are settings too
        from augnet._compute_attribution import prepare_options

        prepared = prepare_options(model, options.method, dict(options.method_options), in_shape)
        settings.update(method=options.method, method_options=prepared)
        method_options = tuple(sorted(prepared.items()))
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
            logits=bool(options.logits),
            method=options.method,
            method_options=method_options,
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
# Computing one batch: augnet._compute (no file of the output folder is touched)
# --------------------------------------------------------------------------------------------


def set_strategy(plan: Plan, strategy: str) -> None:
    """Fix the run's strategy: recorded in run.json (for ``--resume``) and in ``plan.config``."""
    plan.store.set_resolved("strategy", strategy)
    plan.config = dataclasses.replace(plan.config, strategy=strategy)


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


class Scheduling:
    """What every scheduler of a run shares, from its first batch to its clean-up: the signals
    (:class:`StopFlag`), the progress bar, the report page and the commit of each computed batch.

    Made by :func:`scheduling`; a scheduler only decides where and when batches are computed
    (:func:`run_plan` here, one after the other; ``augnet._ray_run`` on a Ray cluster) and hands
    each result to :meth:`commit`, so that the two cannot drift apart.

    Attributes:
        plan: the run.
        stop: the run's :class:`StopFlag`; call ``stop.check()`` between pieces of work.
        bar: the progress bar (``bar.advance(work)`` while a batch is computed here).
    """

    def __init__(self, plan: Plan, stop: StopFlag, bar, on_commit, report: bool):
        self.plan, self.stop, self.bar = plan, stop, bar
        self._on_commit, self._report = on_commit, report

    def commit(self, result: BatchResult, *, advanced: float = 0.0) -> bool:
        """Commit one computed batch (idempotent by batch id: ``False`` if it already was), then
        bring the report page up to date and run ``on_commit``; signals wait until the batch is
        written. ``advanced``: progress already shown for this batch while it was computed.

        The first batch of a run whose strategy was ``"auto"`` fixes the strategy
        (:func:`set_strategy`); a scheduler that computes batches elsewhere resolves it before
        sending any (:func:`resolve_strategy`).
        """
        plan = self.plan
        with self.stop.deferred():
            if plan.config.strategy is None:
                set_strategy(plan, result.strategy)
            written = commit_batch(plan.store, result)
        if written:
            if self._report:
                update_report(plan)
            if self._on_commit is not None:
                self._on_commit(plan, result)
        n = len(result.inputs)
        self.bar.advance(n - advanced)
        self.bar.update(n)
        plan.stats.computed += n
        return written


@contextlib.contextmanager
def scheduling(
    plan: Plan,
    *,
    quiet: bool = False,
    stream=None,
    on_commit: Callable[[Plan, BatchResult], None] | None = None,
    report: bool = True,
) -> Iterator[Scheduling]:
    """The frame of a run for any scheduler (``with scheduling(plan) as run: ... run.commit(r)``).

    Before the first batch it writes the report page (``index.html``: a page augnet did not write
    is refused before any work) and installs the signal handlers and the progress bar. A signal
    (Ctrl-C, ``kill``) inside the block stops the run: ``plan.stats.interrupted`` says which, and
    the block's exception is swallowed. Whatever happens, the end is the same: ``summary.jsonl``
    in input order, the final report page (or none, if no batch was ever committed), the
    folder's lock released (:meth:`Plan.close`), ``plan.stats.seconds`` set.
    """
    from augnet._progress import Progress

    stats = plan.stats
    total = sum(len(bt.items) for bt in plan.todo)
    started = time.monotonic()
    page = False  # the page is this run's to finish (it was written before the first batch)
    try:
        if report:
            start_report(plan)
            page = True
        with (
            StopFlag() as stop,
            Progress(
                total, enabled=not quiet, skipped=stats.skipped, stream=stream, tick=0.5
            ) as bar,
        ):
            try:
                yield Scheduling(plan, stop, bar, on_commit, report)
            except KeyboardInterrupt:
                stats.interrupted = stop.signum or signal.SIGINT
    finally:
        stats.seconds = time.monotonic() - started
        _close(plan, page)


def run_plan(
    plan: Plan,
    model,
    *,
    quiet: bool = False,
    stream=None,
    on_commit: Callable[[Plan, BatchResult], None] | None = None,
    report: bool = True,
) -> RunStats:
    """The one-process scheduler: compute and commit every batch of ``plan`` in order.

    ``on_commit(plan, result)`` runs after each committed batch; an error there stops the run
    like any other. ``report``: keep ``OUT/index.html`` up to date (written before the first
    batch, after each committed one and at the end; see :func:`scheduling`).

    A signal (Ctrl-C, ``kill``) stops the run after cleaning up: every committed batch is kept,
    the batch in progress leaves nothing; ``stats.interrupted`` says which signal. Any other
    error propagates after the same clean-up. The folder's lock is released in every case.
    """
    with scheduling(plan, quiet=quiet, stream=stream, on_commit=on_commit, report=report) as run:
        for batch in plan.todo:
            run.stop.check()
            before = run.bar.work
            result = compute_batch(
                model, batch, plan.config, on_progress=run.bar.advance, check_stop=run.stop.check
            )
            run.commit(result, advanced=run.bar.work - before)
    return plan.stats


# --------------------------------------------------------------------------------------------
# The report page (index.html), kept up to date by every scheduler
# --------------------------------------------------------------------------------------------


def start_report(plan: Plan) -> None:
    """Write ``OUT/index.html`` before the first batch: a page augnet did not write stops the run
    here, before any work (:class:`augnet._html.ReportError`); a new run's page says that no
    input has finished yet, a resumed run's lists what its earlier part finished."""
    from augnet import _html

    _html.write_index_html(plan.out, total=plan.stats.inputs, rebuild=True)


def update_report(plan: Plan) -> None:
    """Bring ``OUT/index.html`` up to date after a committed batch (a few tens of milliseconds
    while ``summary.jsonl`` grows in input order)."""
    from augnet import _html

    _html.write_index_html(plan.out, total=plan.stats.inputs)


def _finish_report(plan: Plan) -> None:
    from augnet import _html

    try:
        if plan.store.committed:
            _html.write_index_html(plan.out, total=plan.stats.inputs, final=True)
        else:  # nothing finished, in this run or before: no page (the folder may go too)
            _html.remove_index_html(plan.out)
    except (OSError, ValueError) as exc:  # the results are complete; only the view is stale
        logger.warning("could not bring '%s' up to date: %s", plan.out / "index.html", exc)


def _close(plan: Plan, report: bool = False) -> None:
    store = plan.store
    try:
        if store.committed:
            store.finish()
    finally:
        try:
            if report and store.root is not None:
                _finish_report(plan)
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
