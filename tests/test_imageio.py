"""Image files and .npy arrays -> model inputs (augnet._imageio). NumPy and pillow only, no TF."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from augnet import _imageio as io
from augnet._imageio import ImageSpec, InputFitError, InputReadError


def _save(path, array, **kwargs):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, **kwargs).save(path)
    return path


@pytest.fixture
def rgb_pixels():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(20, 30, 3), dtype=np.uint8)


# ----------------------------------------------------------------------------------------------
# expand_inputs
# ----------------------------------------------------------------------------------------------


def test_folder_is_sorted_and_filtered(tmp_path):
    for name in ["b.png", "a.jpg", "c.txt", "d.PNG"]:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "e.png").write_bytes(b"x")
    items = io.expand_inputs([tmp_path])
    assert [it.path.name for it in items] == ["a.jpg", "b.png", "d.PNG"]  # not recursive
    assert [it.name for it in items] == ["a", "b", "d"]
    assert all(it.path.is_absolute() and it.row is None for it in items)


def test_glob_recursive_and_dedupe(tmp_path):
    for name in ["x/1.png", "x/y/2.png", "x/y/3.bmp", "x/note.md"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    items = io.expand_inputs([str(tmp_path / "x" / "**" / "*"), tmp_path / "x" / "1.png"])
    assert [it.path.name for it in items] == ["1.png", "2.png", "3.bmp"]


def test_names_are_unique_and_stable(tmp_path):
    for name in ["a/cat.png", "a/cat.jpg", "b/cat.png", "b/dog.png"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    specs = [tmp_path / "a", tmp_path / "b"]
    names = [it.name for it in io.expand_inputs(specs)]
    assert names == ["cat_jpg", "cat_png", "cat_png_2", "dog"]
    assert names == [it.name for it in io.expand_inputs(specs)]


def test_reserved_names_are_avoided(tmp_path):
    for name in ["batches.png", "Jacobians.png", "x.png"]:
        (tmp_path / name).write_bytes(b"x")
    items = io.expand_inputs([tmp_path], reserved=("batches", "jacobians"))
    assert [it.name for it in items] == ["Jacobians_2", "batches_2", "x"]


@pytest.mark.parametrize(
    "make, spec, message",
    [
        (None, "missing.png", "does not exist"),
        ("notes.txt", "notes.txt", "unsupported extension"),
        ("empty/", "empty", "holds no supported file"),
        (None, "nothing-*.png", "no supported input file matches"),
    ],
)
def test_expand_errors_name_the_path(tmp_path, make, spec, message):
    if make == "notes.txt":
        (tmp_path / make).write_text("hi")
    elif make == "empty/":
        (tmp_path / "empty").mkdir()
    with pytest.raises(InputReadError, match=message) as info:
        io.expand_inputs([tmp_path / spec])
    assert spec.rstrip("/") in str(info.value)


def test_npy_rows_become_items(tmp_path):
    np.save(tmp_path / "batch.npy", np.zeros((12, 4, 4, 1), np.float32))
    np.save(tmp_path / "one.npy", np.zeros((4, 4, 1), np.float32))
    items = io.expand_inputs(
        [tmp_path / "batch.npy", tmp_path / "one.npy"], array_input_shape=(4, 4, 1)
    )
    assert [it.row for it in items] == list(range(12)) + [0]
    assert items[0].name == "batch_00" and items[11].name == "batch_11"
    assert items[-1].name == "one_0"
    assert items[3].key.endswith("batch.npy[3]")


def test_corrupt_npy_is_a_read_error(tmp_path):
    (tmp_path / "bad.npy").write_bytes(b"not an array at all")
    with pytest.raises(InputReadError, match="bad.npy"):
        io.expand_inputs([tmp_path / "bad.npy"])


# ----------------------------------------------------------------------------------------------
# ImageSpec
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape, kwargs, message",
    [
        ((784,), {}, r"not an image"),
        ((8, 8, 8, 1), {}, r"not an image"),
        ((16, 16, 5), {}, r"5 channels"),
        ((None, None, 3), {}, r"not fixed .* --size"),
        ((16, 16, 1), {"preprocess": "imagenet_caffe"}, r"3-channel"),
        ((16, 16, 3), {"size": (8, 16)}, r"does not match"),
    ],
)
def test_spec_errors(shape, kwargs, message):
    with pytest.raises(InputFitError, match=message):
        ImageSpec.from_input_shape(shape, **kwargs)


def test_spec_unknown_names():
    with pytest.raises(ValueError, match="`preprocess`"):
        ImageSpec.from_input_shape((4, 4, 1), preprocess="zscore")


def test_spec_free_size_taken_from_size():
    spec = ImageSpec.from_input_shape((None, None, 3), size=(10, 12))
    assert spec.input_shape == (10, 12, 3)
    assert ImageSpec.from_input_shape((7, 9)).input_shape == (7, 9)


# ----------------------------------------------------------------------------------------------
# load_image
# ----------------------------------------------------------------------------------------------


def test_rgb_same_size_unit_is_exact(tmp_path, rgb_pixels):
    path = _save(tmp_path / "a.png", rgb_pixels)
    x, display = io.load_image(path, ImageSpec.from_input_shape((20, 30, 3)))
    assert x.shape == (20, 30, 3) and x.dtype == np.float32
    np.testing.assert_array_equal(x, rgb_pixels.astype(np.float32) / np.float32(255))
    np.testing.assert_array_equal(display, rgb_pixels)


def test_grayscale_and_bilinear_resize_match_pillow(tmp_path, rgb_pixels):
    path = _save(tmp_path / "a.png", rgb_pixels)
    x, display = io.load_image(path, ImageSpec.from_input_shape((8, 10, 1)))
    expected = np.asarray(
        Image.fromarray(rgb_pixels).convert("L").resize((10, 8), Image.Resampling.BILINEAR)
    )
    assert x.shape == (8, 10, 1) and display.shape == (8, 10)
    np.testing.assert_array_equal(display, expected)
    np.testing.assert_array_equal(x[..., 0], expected / np.float32(255))


def test_rank2_input_has_no_channel_axis(tmp_path, rgb_pixels):
    path = _save(tmp_path / "a.png", rgb_pixels)
    x, _ = io.load_image(path, ImageSpec.from_input_shape((20, 30)))
    assert x.shape == (20, 30)


def test_gray_image_to_rgb_model(tmp_path):
    gray = np.arange(16 * 16, dtype=np.uint8).reshape(16, 16)
    x, _ = io.load_image(_save(tmp_path / "g.png", gray), ImageSpec.from_input_shape((16, 16, 3)))
    np.testing.assert_array_equal(x[..., 0], x[..., 2])
    np.testing.assert_array_equal(x[..., 1], gray / np.float32(255))


def test_center_crop_keeps_the_middle(tmp_path):
    pixels = np.zeros((10, 30), np.uint8)
    pixels[:, 10:20] = 255  # the central square is white, the sides black
    path = _save(tmp_path / "wide.png", pixels)
    x, _ = io.load_image(path, ImageSpec.from_input_shape((10, 10, 1), crop="center"))
    assert x.min() == 1.0
    x, _ = io.load_image(path, ImageSpec.from_input_shape((10, 10, 1)))  # squashed instead
    assert x.min() == 0.0


def test_sixteen_bit_png_is_scaled(tmp_path):
    pixels = np.full((4, 4), 65535, np.uint16)
    pixels[0, 0] = 0
    path = tmp_path / "deep.png"
    Image.fromarray(pixels).save(path)
    x, _ = io.load_image(path, ImageSpec.from_input_shape((4, 4, 1)))
    assert x[0, 0, 0] == 0.0 and x[1, 1, 0] == 1.0


@pytest.mark.parametrize(
    "name, expected",
    [
        ("unit", lambda p: p / 255),
        ("minus1_1", lambda p: p / 127.5 - 1),
        ("imagenet_caffe", lambda p: p[..., ::-1] - np.array([103.939, 116.779, 123.68])),
        ("imagenet_torch", lambda p: (p / 255 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]),
        ("none", lambda p: p),
    ],
)
def test_preprocessing(tmp_path, rgb_pixels, name, expected):
    path = _save(tmp_path / "a.png", rgb_pixels)
    x, _ = io.load_image(path, ImageSpec.from_input_shape((20, 30, 3), preprocess=name))
    np.testing.assert_allclose(x, expected(rgb_pixels.astype(np.float64)), rtol=1e-6, atol=1e-5)


def test_resize_none_refuses_other_sizes(tmp_path, rgb_pixels):
    path = _save(tmp_path / "a.png", rgb_pixels)
    with pytest.raises(InputFitError, match=r"a\.png.* 20x30 .* 16x16"):
        io.load_image(path, ImageSpec.from_input_shape((16, 16, 3), resize="none"))


def test_corrupt_and_truncated_images_name_the_file(tmp_path, rgb_pixels):
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"\x00\x01 definitely not a png" * 10)
    with pytest.raises(InputReadError, match="cannot read image '.*garbage.png'"):
        io.load_image(garbage, ImageSpec.from_input_shape((8, 8, 1)))
    good = _save(tmp_path / "good.jpg", rgb_pixels)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    with pytest.raises(InputReadError, match="truncated.jpg"):
        io.load_image(truncated, ImageSpec.from_input_shape((8, 8, 1)))


# ----------------------------------------------------------------------------------------------
# arrays and batches
# ----------------------------------------------------------------------------------------------


def test_array_rows_are_read_as_they_are(tmp_path):
    data = np.arange(5 * 4 * 4, dtype=np.float64).reshape(5, 4, 4) - 10
    np.save(tmp_path / "d.npy", data)
    rows = io.load_array_rows(tmp_path / "d.npy", [3, 1], (4, 4))
    assert rows.dtype == np.float32
    np.testing.assert_array_equal(rows, data[[3, 1]].astype(np.float32))


def test_array_of_wrong_shape_names_the_file(tmp_path):
    np.save(tmp_path / "d.npy", np.zeros((5, 4, 4)))
    with pytest.raises(InputFitError, match=r"d\.npy.*\(5, 4, 4\).*\('batch', 8, 8, 1\)"):
        io.load_array_rows(tmp_path / "d.npy", [0], (8, 8, 1))


def test_batch_mixes_images_and_arrays(tmp_path):
    gray = np.full((6, 6), 51, np.uint8)
    _save(tmp_path / "a.png", gray)
    np.save(tmp_path / "b.npy", np.ones((2, 6, 6, 1), np.float32))
    items = io.expand_inputs([tmp_path], array_input_shape=(6, 6, 1))
    spec = ImageSpec.from_input_shape((6, 6, 1))
    x, displays = io.load_batch(items, (6, 6, 1), spec)
    assert x.shape == (3, 6, 6, 1)
    np.testing.assert_allclose(x[0], 0.2, rtol=1e-6)
    np.testing.assert_array_equal(x[1:], 1.0)
    assert displays[0].shape == (6, 6) and displays[1].dtype == np.uint8


def test_array_display():
    assert io.array_display(np.zeros(10)) is None
    d = io.array_display(np.linspace(-1, 1, 16).reshape(4, 4, 1))
    assert d.shape == (4, 4) and d.min() == 0 and d.max() == 255
    assert io.array_display(np.ones((4, 4, 7))).shape == (4, 4)
