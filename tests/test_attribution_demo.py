"""Every attribution method on the shipped model, whose true sensitivity is known.

Output ``k`` of ``augnet/data/region_cnn.keras`` is the mean brightness of region ``k`` (12 tiles
and a centre disc), so a faithful map of output ``k`` keeps its mass inside region ``k``. The
model is linear (average pooling, a linear convolution, a dense layer), which fixes what each
method must give. Measured on ``sample_input/sample_input.jpg`` (share of each map's |mass| inside
its own region, worst and mean of the 13 outputs):

==================================  =======  =======
method                              worst    mean
==================================  =======  =======
gradient                            0.960    0.977
gradient × input                    0.953    0.970
SmoothGrad (16 samples)             0.960    0.977
SquareGrad (16 samples)             0.980    0.998
VarGrad                             0 (the maps are exactly zero: the gradient never changes)
integrated gradients (zeros, blur)  0.953    0.970  (blur: 0.944)
Grad-CAM, Grad-CAM++                0.012    0.045  (one channel: see below)
occlusion (8x8 windows)             0.953    0.969
==================================  =======  =======

Grad-CAM localises through the channels of its layer; the shipped model's only convolution has
one channel, so every output's map is the same image (the 8x8 block brightness) scaled by a
positive weight, and the randomisation check flags it (rank correlation 1 with shuffled weights).
"""

from __future__ import annotations

import numpy as np
import pytest

from augnet import _demo

MIN_INSIDE = 0.9


@pytest.fixture(scope="module")
def shipped():
    import augnet

    model = augnet.load_model(_demo.demo_model_path())
    return model, _demo.load_sample_image()


@pytest.mark.parametrize(
    "method, options",
    [
        ("gradient", {}),
        ("gradient_x_input", {}),
        ("smoothgrad", {"n_samples": 16, "seed": 0}),
        ("squaregrad", {"n_samples": 16, "seed": 0}),
        ("integrated_gradients", {"steps": 8}),
        ("integrated_gradients", {"steps": 8, "baseline": "blur"}),
        ("occlusion", {"window": 8}),
    ],
)
def test_maps_keep_their_mass_inside_their_region(shipped, method, options):
    import augnet

    model, x = shipped
    result = augnet.attribute(model, x, method=method, **options)
    maps = getattr(result, "attributions", result)
    assert maps.shape == (1, 13, 256, 256, 1)
    inside = _demo.mass_inside(maps[0])
    assert inside.min() >= MIN_INSIDE, (method, inside.round(3))
    if method == "integrated_gradients":
        assert np.abs(result.delta).max() < 1e-4  # a linear model: complete at any step count


def test_smoothgrad_equals_the_gradient_and_vargrad_is_zero(shipped):
    import augnet

    model, x = shipped
    g = augnet.gradient(model, x)
    sg = augnet.smoothgrad(model, x, n_samples=8, seed=1, noise_level=0.3)
    np.testing.assert_allclose(sg, g, rtol=1e-4, atol=1e-6 * np.abs(g).max())
    var = augnet.vargrad(model, x, n_samples=8, seed=1, noise_level=0.3)
    np.testing.assert_array_equal(var, 0.0)
    assert _demo.mass_inside(var[0]).max() == 0.0


def test_gradcam_cannot_localise_through_one_channel(shipped):
    import augnet

    model, x = shipped
    cam = augnet.gradcam(model, x, upsample=False)
    assert cam.layer == "conv_8x8_blocks"
    maps = cam.attributions[0]  # (13, 32, 32)
    block = np.asarray(augnet.intermediate_model(model, "conv_8x8_blocks")(x))[0, :, :, 0]
    # Every output's map is the block image times its own positive weight: rank one.
    for k in range(13):
        weight = maps[k].sum() / np.maximum(block, 0).sum()
        np.testing.assert_allclose(maps[k], weight * np.maximum(block, 0), rtol=1e-4, atol=1e-7)
    full = augnet.gradcam(model, x).attributions[0]
    assert _demo.mass_inside(full).max() < 0.3


def test_randomisation_check_on_the_shipped_model(shipped):
    import augnet

    model, x = shipped
    check = augnet.randomization_check(model, x, "gradient")
    assert check.correlation.shape == (1, 13)
    assert np.abs(check.correlation).max() < 0.1, check.correlation.round(3)
    weights_before = [w.copy() for w in model.get_weights()]
    cam = augnet.randomization_check(model, x, "gradcam")
    assert cam.correlation.min() > 0.99  # the check flags Grad-CAM here
    for a, b in zip(weights_before, model.get_weights()):
        np.testing.assert_array_equal(a, b)  # the model itself is not changed
    reinit = augnet.randomization_check(model, x, "gradient", randomize="reinit", outputs=[0])
    assert np.isnan(reinit.correlation).all()  # zero-initialised dense layer: no map to rank


def test_example_attribution_methods_runs(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "attribution_methods.py"
    spec = importlib.util.spec_from_file_location("_example_attribution_methods", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = module.main(tmp_path, verbose=False)  # asserts its own figures
    assert out["sheet"].exists() and out["sheet"].parent == tmp_path
    assert out["inside"]["gradient"].min() > 0.95
