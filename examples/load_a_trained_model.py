"""Load a trained image model, compute its Jacobian for a photograph, and save saliency images.

The shipped model (``augnet/data/region_cnn.keras``, trained by ``examples/train_region_model.py``)
maps a 256x256 grayscale image to 13 numbers: output ``k`` is the mean brightness of region ``k``
(12 square tiles around a centre disc, see ``augnet/_demo.py``). The true Jacobian of output ``k``
is therefore known -- uniform and positive inside region ``k``, zero elsewhere -- and this example
checks it rather than only drawing it:

1. ``augnet.load_model`` opens the ``.keras`` file and returns an ``AugNet``;
2. ``model.return_jacobian(x)`` for ``sample_input/sample_input.jpg`` -> ``(1, 13, 256, 256, 1)``;
3. the result is compared with a plain per-output ``tf.GradientTape`` loop (asserted);
4. the share of each map's ``|J|`` that lies inside its own region is printed and asserted;
5. one PNG per output goes to ``jacobian_results/`` (plus a contact sheet of all 13).

Run it from the repository root::

    python examples/load_a_trained_model.py              # about 12 s (mostly importing TensorFlow)
"""

from __future__ import annotations

import argparse
import importlib
import time
from pathlib import Path

import numpy as np
import tensorflow as tf

import augnet
from augnet._demo import (
    N_REGIONS,
    demo_model_path,
    load_sample_image,
    mass_inside,
    region_targets,
    sample_image_path,
)

MIN_MASS_INSIDE = 0.8


def tape_loop_jacobian(model, x: np.ndarray) -> np.ndarray:
    """Independent reference: one ``tf.GradientTape`` per output, ``(batch, n_out, *x.shape[1:])``."""
    x = tf.convert_to_tensor(x)
    rows = []
    for k in range(model.output_shape[-1]):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y_k = model(x, training=False)[:, k]
        rows.append(tape.gradient(y_k, x))
    return tf.stack(rows, axis=1).numpy()


def _contact_sheet(
    jacobian: np.ndarray, image: np.ndarray, predictions: np.ndarray, out_dir: Path
) -> Path | None:
    """A one-page overview of all 13 maps, when ``augnet._report.contact_sheet`` is available."""
    try:
        report = importlib.import_module("augnet._report")
    except ImportError:
        return None
    contact_sheet = getattr(report, "contact_sheet", None)
    if contact_sheet is None:
        return None
    return Path(
        contact_sheet(
            out_dir / "contact_sheet.png",
            image=image,
            jacobian=jacobian,
            predictions=predictions,
            title=f"{sample_image_path().name}: d(mean brightness of region k) / d(pixel)",
            overwrite=True,
        )
    )


def main(out_dir: str | Path = "jacobian_results", *, verbose: bool = True) -> dict:
    """Load the demo model, compute, check and save its Jacobian for the sample photograph.

    Args:
        out_dir: folder for the 13 PNGs (created; existing images of the same names are replaced).
        verbose: print what is done.

    Returns:
        dict with ``jacobian`` ``(1, 13, 256, 256, 1)``, ``mass_inside`` ``(13,)``, ``paths`` (the PNGs),
        ``contact_sheet`` (a path or ``None``), ``seconds`` (time of ``return_jacobian``).
    """
    say = print if verbose else (lambda *a, **k: None)
    out_dir = Path(out_dir)

    model = augnet.load_model(demo_model_path())
    say(
        f"loaded {demo_model_path().name} as {type(model).__name__}: "
        f"{model.input_shape} -> {model.output_shape}, {model.count_params()} parameters"
    )

    x = load_sample_image()  # (1, 256, 256, 1) float32 in [0, 1]
    predicted = np.asarray(model(x, training=False))
    say(
        f"input {sample_image_path().name} as {x.shape} {x.dtype}; predicted region means vs true: "
        f"mean |error| {np.abs(predicted - region_targets(x)).mean():.4f}"
    )

    start = time.perf_counter()
    jac = np.asarray(model.return_jacobian(x))
    seconds = time.perf_counter() - start
    assert jac.shape == (1, N_REGIONS, 256, 256, 1), jac.shape
    say(f"return_jacobian(x): shape {jac.shape}, dtype {jac.dtype}, {seconds:.2f} s")

    reference = tape_loop_jacobian(model, x)
    scale = float(np.abs(reference).max())
    np.testing.assert_allclose(jac, reference, rtol=1e-5, atol=1e-5 * scale)
    say(
        f"matches a per-output GradientTape loop: max |diff| {np.abs(jac - reference).max():.2e} "
        f"(largest entry {scale:.2e})"
    )

    fractions = mass_inside(jac[0])
    with np.printoptions(precision=3):
        say(f"share of |J| inside its own region, outputs 0-12: {fractions}")
    if fractions.min() < MIN_MASS_INSIDE:
        raise AssertionError(
            f"output {int(fractions.argmin())} has only {fractions.min():.3f} of its |J| inside "
            f"its region (expected >= {MIN_MASS_INSIDE})"
        )

    paths = augnet.save_jacobian_images(jac[0], out_dir, overwrite=True)
    sheet = _contact_sheet(jac[0], x[0, :, :, 0], predicted[0], out_dir)
    say(
        f"wrote {len(paths)} saliency images to {out_dir.resolve()}/ "
        f"({paths[0].name} ... {paths[-1].name})" + (f" and {sheet.name}" if sheet else "")
    )
    return {
        "jacobian": jac,
        "mass_inside": fractions,
        "paths": paths,
        "contact_sheet": sheet,
        "seconds": seconds,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out-dir", default="jacobian_results", help="where the PNGs go")
    main(parser.parse_args().out_dir)
