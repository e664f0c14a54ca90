"""Every attribution method on the shipped model, checked against what its true sensitivity says.

The shipped model (``augnet/data/region_cnn.keras``) maps a 256x256 grayscale image to 13 numbers:
output ``k`` is the mean brightness of region ``k`` (12 tiles and a centre disc, see
``augnet/_demo.py``). A faithful map of output ``k`` keeps its mass inside region ``k``. This
example:

1. runs each method for all 13 outputs of ``sample_input/sample_input.jpg`` (one call each: every
   output in the same passes) and prints the share of each map's mass inside its region;
2. checks what the model being linear implies: SmoothGrad = the gradient, VarGrad = 0, integrated
   gradients complete (``delta`` ~ 0) and equal to gradient x input;
3. prints ``augnet.evaluate_attributions``'s table (deletion / insertion AUC, MuFidelity, the
   randomisation check) for outputs 0, 5 and 12;
4. writes a comparison sheet of five methods to ``attribution_results/comparison.png``.

Run it from the repository root::

    python examples/attribution_methods.py            # ~30 s on 2 cores
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

import augnet
from augnet._demo import demo_model_path, load_sample_image, mass_inside, sample_image_path

METHODS = {
    "gradient": {},
    "gradient_x_input": {},
    "smoothgrad": {"n_samples": 16, "seed": 0},
    "squaregrad": {"n_samples": 16, "seed": 0},
    "vargrad": {"n_samples": 16, "seed": 0},
    "integrated_gradients": {"steps": 16},
    "gradcam": {},
    "gradcam_plus_plus": {},
    "occlusion": {"window": 8},
}
LOCALISING = ("gradient", "gradient_x_input", "smoothgrad", "squaregrad")
LOCALISING += ("integrated_gradients", "occlusion")
MIN_INSIDE = 0.9


def main(out_dir: str | Path = "attribution_results", *, verbose: bool = True) -> dict:
    """Runs, checks and compares the methods; returns ``{"inside": {method: (13,)}, "table":
    AttributionTable, "sheet": path}``."""
    say = print if verbose else (lambda *a, **k: None)
    model = augnet.load_model(demo_model_path())
    x = load_sample_image()  # (1, 256, 256, 1)
    say(f"{demo_model_path().name} on {sample_image_path().name}: 13 outputs, one call per method")

    maps, inside = {}, {}
    for method, options in METHODS.items():
        start = time.perf_counter()
        result = augnet.attribute(model, x, method=method, **options)
        seconds = time.perf_counter() - start
        maps[method] = result
        a = np.asarray(getattr(result, "attributions", result))
        assert a.shape == (1, 13, 256, 256, 1), a.shape
        inside[method] = mass_inside(a[0])
        extra = f", layer {result.layer}" if getattr(result, "layer", None) else ""
        say(
            f"  {method:22s} {seconds:5.2f} s   mass inside its region: worst "
            f"{inside[method].min():.3f}, mean {inside[method].mean():.3f}{extra}"
        )
    for method in LOCALISING:
        if inside[method].min() < MIN_INSIDE:
            raise AssertionError(f"{method}: {inside[method].round(3)} inside, expected >= 0.9")

    # The model is linear: what that implies, checked.
    g = maps["gradient"]
    np.testing.assert_allclose(maps["smoothgrad"], g, rtol=1e-4, atol=1e-6 * np.abs(g).max())
    np.testing.assert_array_equal(maps["vargrad"], 0.0)
    ig = maps["integrated_gradients"]
    assert np.abs(ig.delta).max() < 1e-4, ig.delta
    gx = maps["gradient_x_input"]
    np.testing.assert_allclose(ig.attributions, gx, rtol=1e-4, atol=1e-6 * np.abs(gx).max())
    say(
        "  linear model: SmoothGrad = gradient, VarGrad = 0, IG = gradient x input, "
        f"max |IG delta| {np.abs(ig.delta).max():.1e}"
    )

    shown = [0, 5, 12]
    table = augnet.evaluate_attributions(
        model, x, methods={m: METHODS[m] for m in METHODS}, outputs=shown
    )
    say(f"\nmetrics for outputs {shown}:\n{table}")
    if table["gradcam"]["randomization"] < 0.99:
        raise AssertionError("expected the randomisation check to flag Grad-CAM on this model")

    out_dir = Path(out_dir)
    sheet = augnet.comparison_sheet(
        out_dir / "comparison.png",
        model,
        x,
        methods={
            "gradient": {},
            "smoothgrad": METHODS["smoothgrad"],
            "integrated_gradients": METHODS["integrated_gradients"],
            "gradcam": {},
            "occlusion": METHODS["occlusion"],
        },
        outputs=shown,
        title=f"{demo_model_path().name}: output k = mean brightness of region k",
        overwrite=True,
    )
    say(f"\nwrote {sheet}")
    return {"inside": inside, "table": table, "sheet": sheet}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out-dir", default="attribution_results", help="where the sheet goes")
    main(parser.parse_args().out_dir)
