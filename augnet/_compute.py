"""Computing one batch of a data-set run: inputs in, Jacobians, pictures and summary lines out.

:func:`compute_batch` ``(model, batch, config) -> BatchResult`` is the part of a run that a worker
does (on this machine, or on another one of a Ray cluster): it reads the batch's inputs, computes
their Jacobians block by block through ``augnet.iter_jacobian``, renders the PNGs to bytes and
builds the ``summary.jsonl`` lines, and writes nothing. The result is plain data (NumPy arrays,
bytes, dicts) that pickles, and :func:`augnet._runner.commit_batch` writes it. See augnet/_runner.py
for the whole run.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math
import os
import time
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from augnet import _imageio
from augnet._store import BatchResult, InputResult

if TYPE_CHECKING:
    from augnet._runner import Batch, BatchConfig

logger = logging.getLogger(__name__)

TOP_INPUTS = 5  # most sensitive input elements listed per output in summary.jsonl
CONTACT_SHEET = "contact_sheet.png"
THUMBNAIL = "thumbnail.png"  # the input as the model saw it, small, for the report page
THUMBNAIL_SIDE = 128


def load_model(path: str | os.PathLike[str], *, unsafe: bool = False):
    """Load the run's model as :func:`augnet.load_model` does (for workers)."""
    import augnet

    return augnet.load_model(path, safe_mode=not unsafe)


def resolve_strategy_for_x(model, x, *, outputs, top_k, max_memory, logits=False) -> str:
    """The strategy ``strategy="auto"`` picks for batch ``x`` (by rule, or by timing the
    candidates).

    The engine's choice can depend on timings, and strategies differ in the last bits of the
    result; a run therefore resolves it once, on its first batch, records it in run.json, and
    passes it explicitly to every batch of the run and of its ``--resume``.
    """
    from augnet import _engine

    return _engine.resolve_strategy(
        model,
        x,
        outputs=outputs,
        top_k=top_k,
        training=False,
        max_memory=max_memory,
        logits=logits,
    )


def resolve_strategy(model, batch: Batch, config: BatchConfig) -> str:
    """The concrete strategy for a run whose config says ``"auto"``, decided on ``batch`` (the
    run's first); a distributed scheduler calls it once (on the driver or one worker) and then
    :func:`set_strategy`."""
    if config.strategy is not None and config.strategy != "auto":
        return config.strategy
    x, _ = _imageio.load_batch(batch.items, config.input_shape, config.spec, payload=batch.payload)
    outputs = list(config.outputs) if config.outputs is not None else None
    return resolve_strategy_for_x(
        model,
        x,
        outputs=outputs,
        top_k=config.top_k,
        max_memory=config.max_memory,
        logits=config.logits,
    )


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
    from augnet import _backend

    b = len(x)
    preds = _backend.to_numpy(model(x, training=False)).reshape(b, -1)
    jac = np.empty((b, config.k, *x.shape[1:]), dtype=np.float32)
    idx = np.empty((b, config.k), dtype=np.int64)
    total = b * config.k
    for chunk in without_zero_warning(
        augnet.iter_jacobian(
            model,
            x,
            outputs=list(config.outputs) if config.outputs is not None else None,
            top_k=config.top_k,
            max_memory=config.max_memory,
            strategy=config.strategy or "auto",
            logits=config.logits,
        )
    ):
        s, c = chunk.samples, chunk.columns
        values = np.asarray(chunk.values)
        jac[s, c] = values.reshape(values.shape[0], values.shape[1], *x.shape[1:])
        idx[s, c] = chunk.outputs
        if on_progress is not None:
            on_progress(weight * values.shape[0] * values.shape[1] / total * b)
        if check_stop is not None:
            check_stop()
    warn_all_zero(jac, config.logits)
    return preds, idx, jac


ZERO_WARNING = (
    "the Jacobian of some inputs is exactly zero everywhere (jacobian_l2 0 in summary.jsonl): "
    "a saturated softmax or sigmoid gives exactly 0.0 in float32; try --logits (the scores "
    "before it), and check that --preprocess gives the range the model was trained on (e.g. "
    "0-255 pixels fed to a model trained on [0, 1]: --preprocess unit)"
)
ZERO_WARNING_LOGITS = (
    "the Jacobian of some inputs is exactly zero everywhere (jacobian_l2 0 in summary.jsonl), "
    "even of the scores before the final activation (--logits): check that --preprocess gives "
    "the range the model was trained on, and that the model's layers are active there"
)


def without_zero_warning(chunks):
    """The engine's blocks with its all-zero warning held back: a run says it once, as one line
    (:func:`warn_all_zero`)."""
    import augnet

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", augnet.ZeroJacobianWarning)
        yield from chunks


def warn_all_zero(jac, logits: bool) -> None:
    """One warning line (the command line prints each once per run) when an input's whole
    Jacobian is exactly zero."""
    if len(jac) and not jac.reshape(len(jac), -1).any(axis=1).all():
        logger.warning(ZERO_WARNING_LOGITS if logits else ZERO_WARNING)


def thumbnail_png(display) -> bytes:
    """A small picture of an input (its display image, what the model saw) as PNG bytes: at most
    ``THUMBNAIL_SIDE`` pixels on its longer side (Lanczos), small inputs enlarged by a whole factor
    (nearest neighbour, so that their pixels stay sharp). The report page shows it, so that it
    need not link the original input (which breaks when the folder moves)."""
    import numpy as np
    from PIL import Image

    pixels = np.ascontiguousarray(display)
    h, w = pixels.shape[:2]
    longer = max(h, w)
    img = Image.fromarray(pixels)  # (h, w) uint8: grayscale; (h, w, 3): RGB
    if longer > THUMBNAIL_SIDE:
        size = (
            max(1, round(w * THUMBNAIL_SIDE / longer)),
            max(1, round(h * THUMBNAIL_SIDE / longer)),
        )
        img = img.resize(size, Image.Resampling.LANCZOS)
    elif longer * 2 <= THUMBNAIL_SIDE:
        factor = THUMBNAIL_SIDE // longer
        img = img.resize((w * factor, h * factor), Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return buffer.getvalue()


def render_input(
    item: _imageio.InputItem, display, jacobian, indices, predictions, config: BatchConfig
) -> dict[str, bytes]:
    """The PNG files of one input, as ``{relative path: bytes}``: one map per selected output
    (on the input's shared scale by default, with a colour bar in real units), the contact
    sheet and a thumbnail of the input (when it has a picture). Nothing is written."""
    import numpy as np

    from augnet import _colorbar, _render, _report

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
            rgb = _colorbar.with_colorbar(rgb, scale=scale, mode=config.mode, cmap=config.cmap)
        text = {
            "Software": "augnet",
            "augnet:output": str(int(k)),
            "augnet:scale": repr(float(scale)),
            "augnet:scaling": "shared" if shared is not None else "per-map",
        }
        if config.method is not None:  # an attribution method's map, not the Jacobian
            text["augnet:method"] = config.method
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
            shared_scale=config.scale == "shared",
            **_sheet_labels(item.name, config),
            overlay=config.overlay and display is not None,
            alpha=config.alpha,
        )
    if display is not None:
        files[f"{item.name}/{THUMBNAIL}"] = thumbnail_png(display)
    return files


def _sheet_labels(name: str, config: BatchConfig) -> dict[str, str]:
    """The contact sheet's title (the input's name) and, for an attribution method's maps, the
    quantity its colour bar measures."""
    if config.method is None:
        return {"title": name}
    from augnet._compute_attribution import sheet_labels

    return sheet_labels(name, config)


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
    if batch.payload is None:  # the files, where the batch is computed
        fingerprints = _imageio.fingerprints(items, config.input_shape)  # before: safe side
        x, displays = _imageio.load_batch(items, config.input_shape, config.spec)
    else:  # their content, read by the driver (workers without its file system)
        fingerprints = _imageio.fingerprints(items, config.input_shape, batch.payload)
        x, displays = _imageio.load_batch(
            items, config.input_shape, config.spec, payload=batch.payload
        )
    if config.strategy is None or config.strategy == "auto":  # the run's first batch
        outputs = list(config.outputs) if config.outputs is not None else None
        strategy = resolve_strategy_for_x(
            model,
            x,
            outputs=outputs,
            top_k=config.top_k,
            max_memory=config.max_memory,
            logits=config.logits,
        )
        config = dataclasses.replace(config, strategy=strategy)
    weight = 0.5 if config.pictures else 1.0
    extras = None
    if config.method is not None:  # an attribution method's maps instead of the Jacobian
        from augnet._compute_attribution import attribute_batch

        preds, idx, jac, extras = attribute_batch(model, x, config, on_progress, check_stop, weight)
    else:
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
        if extras is not None:
            inputs[-1].summary.update(extras[i])
    return BatchResult(
        batch_id=batch.batch_id,
        inputs=inputs,
        jacobian=jac if "npy" in config.formats else None,
        strategy=config.strategy,
        seconds=time.monotonic() - start,
    )
