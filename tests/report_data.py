"""Synthetic run folders for the report page's tests and benchmark (no model, no TensorFlow).

:func:`make_run` writes what a data-set run writes for the page to read: per input a folder with
``output_XX.png`` maps and a ``contact_sheet.png`` (small real PNGs), the input images themselves
in a separate folder (absolute paths, as the store records them), and ``summary.jsonl`` with the
fields of ``augnet._cli.summarize``. :func:`summary_lines` gives the lines alone (any number, no
files), for timing the page with 100,000 inputs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

ANIMALS = ("cat", "dog", "owl", "fox")


def _entry(i: int, rng: np.random.Generator, *, k: int, n_outputs: int, top_k: bool, name: str):
    if top_k:
        outputs = sorted(rng.choice(n_outputs, size=k, replace=False).tolist())
    else:
        outputs = list(range(k))
    logits = rng.normal(size=k)
    preds = np.exp(logits) / np.exp(logits).sum()
    if top_k:
        order = np.argsort(-preds, kind="stable")
        outputs = [outputs[j] for j in order]
        preds = preds[order]
    l2 = rng.gamma(2.0, 0.5, size=k)
    mx = l2 * rng.uniform(0.01, 0.1, size=k)
    digits = max(2, len(str(n_outputs - 1)))
    files = [f"{name}/output_{o:0{digits}d}.png" for o in outputs] + [f"{name}/contact_sheet.png"]
    return {
        "input": None,  # filled in by the caller
        "name": name,
        "outputs": [int(o) for o in outputs],
        "predictions": [float(p) for p in preds],
        "jacobian_l2": [float(v) for v in l2],
        "jacobian_max_abs": [float(v) for v in mx],
        "top_inputs": [
            [
                {"index": [int(a), int(b), 0], "value": float(v)}
                for a, b, v in rng.normal(size=(5, 3))
            ]
            for _ in range(k)
        ],
        "files": files,
    }


def default_name(i: int) -> str:
    return f"{ANIMALS[i % len(ANIMALS)]}_{i:05d}"


def summary_lines(
    n: int,
    *,
    k: int = 5,
    n_outputs: int = 1000,
    top_k: bool = True,
    seed: int = 0,
    input_dir: str = "/data/images",
):
    """``n`` summary.jsonl lines (text, with newlines) of a top-k classifier run; no files."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        name = default_name(i)
        e = _entry(i, rng, k=k, n_outputs=n_outputs, top_k=top_k, name=name)
        e["input"] = f"{input_dir}/{name}.jpg"
        yield json.dumps(e) + "\n"


def _png(path: Path, rgb: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb.astype(np.uint8)).save(path)


def _picture(i: int, size: int = 48) -> np.ndarray:
    """A colourful input-like picture: a disc on a gradient, different for every i."""
    y, x = np.mgrid[0:size, 0:size] / (size - 1)
    hue = (i * 0.137) % 1.0
    base = np.stack(
        [0.5 + 0.5 * np.cos(2 * math.pi * (hue + c / 3) + 2 * x) for c in range(3)], axis=-1
    )
    cy, cx = 0.3 + 0.4 * ((i * 0.31) % 1), 0.3 + 0.4 * ((i * 0.53) % 1)
    disc = ((y - cy) ** 2 + (x - cx) ** 2) < 0.05
    base[disc] = 1 - base[disc] * 0.6
    return 255 * base


def _saliency(i: int, o: int, size: int = 32) -> np.ndarray:
    """A red/blue/white map like a signed saliency picture."""
    y, x = np.mgrid[0:size, 0:size] / (size - 1)
    v = np.sin(3 * x + o) * np.cos(2 * y + 0.1 * i)
    v = np.clip(v, -1, 1)
    r = np.where(v > 0, 1.0, 1 + v)
    b = np.where(v < 0, 1.0, 1 - v)
    g = 1 - np.abs(v)
    return 255 * np.stack([r, g * 0.95, b], axis=-1)


def make_run(
    out: Path,
    n: int,
    *,
    k: int = 3,
    n_outputs: int = 10,
    top_k: bool = True,
    seed: int = 0,
    names=None,
    input_dir: Path | None = None,
) -> list[dict]:
    """Write a run folder ``out`` with ``n`` inputs (real PNGs) and its summary.jsonl.

    Returns the summary entries as written.
    """
    out.mkdir(parents=True, exist_ok=True)
    input_dir = input_dir if input_dir is not None else out.parent / "inputs"
    input_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    entries = []
    for i in range(n):
        name = names(i) if names is not None else default_name(i)
        e = _entry(i, rng, k=k, n_outputs=n_outputs, top_k=top_k, name=name)
        image = input_dir / f"{name}.png"
        _png(image, _picture(i))
        e["input"] = str(image.resolve())
        for o, rel in zip(e["outputs"], e["files"][:-1], strict=True):
            _png(out / rel, _saliency(i, o))
        sheet = np.concatenate(
            [np.pad(_picture(i, 32), ((4, 4), (4, 4), (0, 0)), constant_values=255)]
            + [
                np.pad(_saliency(i, o), ((4, 4), (4, 4), (0, 0)), constant_values=255)
                for o in e["outputs"]
            ],
            axis=1,
        )
        _png(out / e["files"][-1], sheet)
        entries.append(e)
    write_summary(out, entries)
    return entries


def write_summary(out: Path, entries, *, mode: str = "w") -> None:
    with open(out / "summary.jsonl", mode, encoding="utf-8") as f:
        for e in entries:
            f.write(json.dumps(e) + "\n")
