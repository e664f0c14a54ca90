"""The demo task (augnet/_demo.py), the shipped model trained on it, and the two main examples.

The task's true Jacobian is known (output k = mean brightness of region k, so J_k = mask_k / area_k),
which lets these tests check the shipped model's saliency maps, not just draw them.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest

from augnet import _demo

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
MIN_MASS_INSIDE = 0.8


def _example(name: str):
    """Import ``examples/<name>.py`` as a module (the folder is not a package)."""
    spec = importlib.util.spec_from_file_location(f"_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------------------------------
# Regions and targets (NumPy only)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [16, 17, 64, 100, 256])
def test_region_masks_are_13_disjoint_non_empty(size):
    masks = _demo.region_masks(size)
    assert masks.shape == (_demo.N_REGIONS, size, size) == (13, size, size)
    assert masks.dtype == bool
    assert masks.sum(axis=0).max() == 1  # disjoint
    assert (masks.sum(axis=(1, 2)) > 0).all()  # none empty


def test_region_layout_at_256():
    masks = _demo.region_masks()
    assert _demo.IMAGE_SIZE == 256
    # Regions 0-11: 48x48 tiles, one per ring cell of a 4x4 grid, in reading order.
    cells = [(r, c) for r in range(4) for c in range(4) if r in (0, 3) or c in (0, 3)]
    for k, (r, c) in enumerate(cells):
        rows, cols = np.nonzero(masks[k])
        assert (rows.min(), rows.max() + 1) == (64 * r + 8, 64 * r + 56)
        assert (cols.min(), cols.max() + 1) == (64 * c + 8, 64 * c + 56)
        assert masks[k].sum() == 48 * 48
    # Region 12: a disc of radius 56 in the middle.
    assert abs(masks[12].sum() - math.pi * 56**2) < 2 * math.pi * 56
    rows, cols = np.nonzero(masks[12])
    assert (rows.min(), rows.max() + 1) == (cols.min(), cols.max() + 1) == (72, 184)
    # Background separates every pair of regions (no two regions touch, 4-neighbourhood).
    label = np.full((256, 256), -1)
    for k in range(13):
        label[masks[k]] = k
    for a, b in ((label[1:], label[:-1]), (label[:, 1:], label[:, :-1])):
        touching = (a >= 0) & (b >= 0) & (a != b)
        assert not touching.any()


@pytest.mark.parametrize("size", [0, 15, -3, 2.5, "256", True])
def test_region_masks_bad_size(size):
    with pytest.raises(ValueError, match="`size`"):
        _demo.region_masks(size)


def test_region_targets_closed_form():
    masks = _demo.region_masks()
    rng = np.random.default_rng(0)
    images = rng.random((3, 256, 256, 1)).astype(np.float32)
    expected = np.stack([[img[..., 0][m].mean() for m in masks] for img in images])
    np.testing.assert_allclose(_demo.region_targets(images), expected, rtol=1e-5)
    np.testing.assert_allclose(_demo.region_targets(images[..., 0]), expected, rtol=1e-5)
    # The indicator of region j gives e_j; a constant image gives the constant.
    indicators = masks[:, :, :, None].astype(np.float64)
    np.testing.assert_allclose(_demo.region_targets(indicators), np.eye(13), atol=1e-12)
    np.testing.assert_allclose(
        _demo.region_targets(np.full((2, 64, 64, 1), 0.3)), np.full((2, 13), 0.3), rtol=1e-12
    )


def test_region_targets_dtype_and_errors():
    assert _demo.region_targets(np.zeros((1, 32, 32, 1), np.float32)).dtype == np.float32
    assert _demo.region_targets(np.zeros((1, 32, 32, 1), np.float64)).dtype == np.float64
    assert _demo.region_targets(np.zeros((1, 32, 32, 1), np.uint8)).dtype == np.float32
    for bad in (np.zeros((256, 256, 1)), np.zeros((1, 32, 16, 1)), np.zeros((1, 32, 32, 3))):
        with pytest.raises(ValueError, match=r"`images`.*images.shape="):
            _demo.region_targets(bad)
    with pytest.raises(TypeError, match="`images`"):
        _demo.region_targets(np.full((1, 32, 32), "a"))


def test_true_jacobian_is_all_inside():
    jac = _demo.true_jacobian()
    assert jac.shape == (13, 256, 256, 1)
    np.testing.assert_allclose(jac.sum(axis=(1, 2, 3)), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(_demo.mass_inside(jac), np.ones(13))
    # A map that is uniform over the whole image puts area_k / (256*256) inside.
    flat = np.ones((13, 256, 256))
    areas = _demo.region_masks().sum(axis=(1, 2))
    np.testing.assert_allclose(_demo.mass_inside(flat), areas / 256**2)
    np.testing.assert_array_equal(
        _demo.mass_inside(np.zeros((2, 13, 32, 32, 1))), np.zeros((2, 13))
    )
    with pytest.raises(ValueError, match="`jacobian`"):
        _demo.mass_inside(np.ones((12, 32, 32)))


def test_sample_image():
    path = _demo.sample_image_path()
    assert path == ROOT / "sample_input" / "sample_input.jpg" and path.is_file()
    x = _demo.load_sample_image()
    assert x.shape == (1, 256, 256, 1) and x.dtype == np.float32
    assert 0.0 <= x.min() < 0.1 and 0.9 < x.max() <= 1.0
    assert _demo.load_sample_image(64).shape == (1, 64, 64, 1)
    assert _demo.demo_model_path() == ROOT / "augnet" / "data" / "region_cnn.keras"


def test_demo_module_imports_no_tensorflow():
    source = (ROOT / "augnet" / "_demo.py").read_text()
    assert "import tensorflow" not in source and "import keras" not in source


# --------------------------------------------------------------------------------------------------
# The shipped model
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shipped():
    path = _demo.demo_model_path()
    if not path.exists():
        pytest.skip("the demo model is not built yet (examples/train_region_model.py)")
    import keras

    return keras.models.load_model(path)


@pytest.fixture(scope="module")
def synthetic_images():
    train_script = _example("train_region_model")
    return train_script.make_images(64, seed=2024)  # not the training seed


def _tape_jacobian(model, x):
    return _example("load_a_trained_model").tape_loop_jacobian(model, x)


def test_shipped_model_is_small_and_shaped(shipped):
    assert tuple(shipped.input_shape) == (None, 256, 256, 1)
    assert tuple(shipped.output_shape) == (None, 13)
    assert 1_000 <= shipped.count_params() <= 100_000
    assert _demo.demo_model_path().stat().st_size < 1_000_000


def test_shipped_model_predicts_region_means(shipped, synthetic_images):
    x = synthetic_images
    error = np.abs(np.asarray(shipped(x, training=False)) - _demo.region_targets(x))
    assert error.mean() < 0.02, error.mean()
    photo = _demo.load_sample_image()
    error = np.abs(np.asarray(shipped(photo, training=False)) - _demo.region_targets(photo))
    assert error.max() < 0.05, error


def test_shipped_model_jacobian_lies_in_its_region(shipped, synthetic_images):
    black, white = np.zeros((1, 256, 256, 1), np.float32), np.ones((1, 256, 256, 1), np.float32)
    x = np.concatenate([synthetic_images[:8], _demo.load_sample_image(), black, white])
    jac = _tape_jacobian(shipped, x)
    assert jac.shape == (11, 13, 256, 256, 1)
    inside = _demo.mass_inside(jac)
    assert inside.min() >= MIN_MASS_INSIDE, inside.min(axis=0)
    # Positive where it matters: brightening region k raises output k.
    masks = _demo.region_masks()
    for k in range(13):
        assert jac[:, k, ..., 0][:, masks[k]].sum(axis=1).min() > 0.9


def test_augnet_jacobian_matches_tape_on_shipped_model(shipped, synthetic_images):
    import augnet

    if not hasattr(augnet, "jacobian") or not hasattr(augnet, "load_model"):
        pytest.skip("the engine has not landed")
    x = np.concatenate([synthetic_images[:3], _demo.load_sample_image()])
    reference = _tape_jacobian(shipped, x)
    scale = np.abs(reference).max()
    got = augnet.jacobian(shipped, x)
    np.testing.assert_allclose(got, reference, rtol=1e-5, atol=1e-5 * scale)
    model = augnet.load_model(_demo.demo_model_path())
    assert isinstance(model, augnet.AugNet)
    np.testing.assert_allclose(model.return_jacobian(x), reference, rtol=1e-5, atol=1e-5 * scale)
    assert _demo.mass_inside(got).min() >= MIN_MASS_INSIDE


# --------------------------------------------------------------------------------------------------
# The examples, end to end
# --------------------------------------------------------------------------------------------------


def _check_pngs(paths, n=13):
    from PIL import Image

    assert len(paths) == n
    for path in paths:
        with Image.open(path) as img:
            img.load()
            assert img.format == "PNG" and min(img.size) >= 256


def test_example_load_a_trained_model(tmp_path, shipped):
    result = _example("load_a_trained_model").main(tmp_path / "out", verbose=False)
    assert result["jacobian"].shape == (1, 13, 256, 256, 1)
    assert result["mass_inside"].min() >= MIN_MASS_INSIDE
    _check_pngs(result["paths"])
    assert sorted(p.name for p in (tmp_path / "out").glob("output*.png")) == sorted(
        p.name for p in result["paths"]
    )
    if result["contact_sheet"] is not None:
        _check_pngs([result["contact_sheet"]], n=1)
    # Run twice: the images are replaced, not refused.
    _example("load_a_trained_model").main(tmp_path / "out", verbose=False)


@pytest.mark.slow
def test_example_create_train_and_utilize():
    result = _example("create_train_and_utilize").main(verbose=False)
    assert result["fd_max_abs_err"] < 1e-6
    assert result["learned_rel_err"] < 0.25


@pytest.mark.slow
def test_train_region_model_refuses_to_overwrite_and_trains(tmp_path, capsys):
    script = _example("train_region_model")
    existing = tmp_path / "m.keras"
    existing.write_bytes(b"keep me")
    with pytest.raises(SystemExit) as info:
        script.main(["--out", str(existing)])
    assert info.value.code == 2 and existing.read_bytes() == b"keep me"
    assert "--overwrite" in capsys.readouterr().err
    # A tiny run writes a loadable model (quality is not the point here).
    out = tmp_path / "tiny.keras"
    script.main(["--out", str(out), "--epochs", "1", "--n-train", "256"])
    import keras

    assert keras.models.load_model(out).output_shape == (None, 13)
