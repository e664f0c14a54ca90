"""Tests for augnet._render: reduction, scaling, colour mapping, overlay and PNG files."""

import os
import pathlib
import re
import subprocess
import sys

import matplotlib
import numpy as np
import pytest
from PIL import Image

from augnet._render import (
    colormap_lut,
    percentile_scale,
    reduce_channels,
    render_saliency,
    robust_scale,
    save_jacobian_images,
)

ROOT = pathlib.Path(__file__).resolve().parents[1]
SIGNED_LUT = colormap_lut("RdBu_r", 257)
CENTRE = SIGNED_LUT[128]


def _random(shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape)


# ------------------------------------------------------------------------------------------------
# colormap_lut
# ------------------------------------------------------------------------------------------------


def test_colormap_lut_shape_dtype_and_ends():
    lut = colormap_lut("RdBu_r")
    assert lut.shape == (256, 3) and lut.dtype == np.uint8
    reference = np.rint(np.asarray(matplotlib.colormaps["RdBu_r"]([0.0, 1.0]))[:, :3] * 255)
    np.testing.assert_array_equal(lut[[0, -1]], reference)


def test_signed_lut_centre_is_exact_colormap_centre_and_neutral():
    # An independent, finely resampled colormap evaluated at exactly 0.5.
    fine = matplotlib.colormaps["RdBu_r"].resampled(1001)
    reference = np.rint(np.asarray(fine(500))[:3] * 255)
    np.testing.assert_allclose(CENTRE, reference, atol=1)
    assert CENTRE.min() >= 240 and int(CENTRE.max()) - int(CENTRE.min()) <= 2


# ------------------------------------------------------------------------------------------------
# reduce_channels
# ------------------------------------------------------------------------------------------------


def test_reduce_2d_passes_through_and_single_channel_squeezes():
    m = _random((5, 4))
    np.testing.assert_array_equal(reduce_channels(m), m)
    for method in ("maxabs", "l2", "sum", "mean"):
        np.testing.assert_array_equal(reduce_channels(m[..., None], method), m)


def test_reduce_maxabs_keeps_sign_of_largest_magnitude_channel():
    m = _random((6, 7, 3))
    result = reduce_channels(m, "maxabs")
    expected = np.empty((6, 7))
    for i in range(6):
        for j in range(7):
            c = int(np.argmax(np.abs(m[i, j])))
            expected[i, j] = m[i, j, c]
    np.testing.assert_allclose(result, expected, rtol=0, atol=0)
    assert (result < 0).any() and (result > 0).any()


def test_reduce_maxabs_closed_form_small():
    m = np.array([[[1.0, -3.0, 2.0], [0.5, 0.2, -0.1]]])
    np.testing.assert_allclose(reduce_channels(m, "maxabs"), [[-3.0, 0.5]])


@pytest.mark.parametrize(
    "method, reference",
    [
        ("l2", lambda m: np.sqrt((m**2).sum(-1))),
        ("sum", lambda m: m.sum(-1)),
        ("mean", lambda m: m.mean(-1)),
    ],
)
def test_reduce_closed_forms(method, reference):
    m = _random((4, 5, 3), seed=1)
    np.testing.assert_allclose(reduce_channels(m, method), reference(m), rtol=1e-12)


def test_reduce_l2_is_euclidean_norm_and_non_negative():
    m = _random((4, 5, 3), seed=2)
    result = reduce_channels(m, "l2")
    np.testing.assert_allclose(result, np.linalg.norm(m, axis=-1), rtol=1e-12)
    assert (result >= 0).all()


# ------------------------------------------------------------------------------------------------
# robust_scale / percentile_scale
# ------------------------------------------------------------------------------------------------


def test_robust_scale_signed_closed_form():
    values = np.array([0.0, 1.0, -2.0, 100.0])  # |values| p50 = 1.5
    np.testing.assert_allclose(
        robust_scale(values, percentile=50), [0.0, 1 / 1.5, -1.0, 1.0], rtol=1e-12
    )


def test_robust_scale_unsigned_closed_form():
    values = np.array([0.0, -1.0, 2.0, -4.0])
    np.testing.assert_allclose(
        robust_scale(values, percentile=100, signed=False), [0.0, 0.25, 0.5, 1.0]
    )


def test_robust_scale_ranges():
    values = _random((30, 30)) * 1e-4
    signed = robust_scale(values)
    unsigned = robust_scale(values, signed=False)
    assert signed.min() >= -1 and signed.max() <= 1 and signed.min() < 0
    assert unsigned.min() >= 0 and unsigned.max() <= 1


def test_robust_scale_all_zero_gives_zeros_without_warning():
    with np.errstate(all="raise"):
        np.testing.assert_array_equal(robust_scale(np.zeros((4, 4))), np.zeros((4, 4)))
        np.testing.assert_array_equal(
            robust_scale(np.zeros((4, 4)), signed=False), np.zeros((4, 4))
        )


@pytest.mark.parametrize("constant", [-3.0, 0.25])
def test_robust_scale_constant_gives_flat(constant):
    result = robust_scale(np.full((5, 5), constant))
    np.testing.assert_array_equal(result, np.full((5, 5), np.sign(constant)))


def test_percentile_scale_sparse_map_falls_back_to_max():
    values = np.zeros((100, 100))
    values[3, 4] = -2.5  # 99.99 % zeros: the 99th percentile is 0
    assert percentile_scale(values) == 2.5
    assert robust_scale(values)[3, 4] == -1.0


def test_robust_scale_fixed_scale():
    np.testing.assert_allclose(robust_scale(np.array([1.0, -4.0]), scale=2.0), [0.5, -1.0])


# ------------------------------------------------------------------------------------------------
# render_saliency
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(9, 11), (9, 11, 1), (9, 11, 3)])
@pytest.mark.parametrize("mode", ["signed", "abs"])
def test_render_shape_and_dtype(shape, mode):
    rgb = render_saliency(_random(shape).astype(np.float32), mode=mode)
    assert rgb.shape == (9, 11, 3) and rgb.dtype == np.uint8


def test_zero_jacobian_renders_pure_white_in_signed_mode():
    # issue 9: zero ("no effect") is pure white, not the colormap's light grey centre
    assert CENTRE.tolist() != [255, 255, 255]
    rgb = render_saliency(np.zeros((8, 8, 1)))
    np.testing.assert_array_equal(rgb, np.full((8, 8, 3), 255, np.uint8))
    # so is anything below half a colour step (scale / 256); one step away is the colormap's
    m = np.zeros((1, 4))
    m[0] = [1.0, 1e-9, 0.99 / 256, 1.01 / 256]
    rgb = render_saliency(m, percentile=100)
    np.testing.assert_array_equal(rgb[0, 1:3], np.full((2, 3), 255))
    np.testing.assert_array_equal(rgb[0, 3], SIGNED_LUT[129])


def test_zero_jacobian_renders_colormap_start_in_abs_mode():
    rgb = render_saliency(np.zeros((8, 8)), mode="abs")
    np.testing.assert_array_equal(rgb, np.broadcast_to(colormap_lut("inferno")[0], (8, 8, 3)))


@pytest.mark.parametrize("value", [-2.0, 1e-9, 5.0])
@pytest.mark.parametrize("mode", ["signed", "abs"])
def test_constant_jacobian_renders_flat(value, mode):
    rgb = render_saliency(np.full((6, 5, 3), value), mode=mode)
    assert (rgb == rgb[0, 0]).all()


def test_sign_mapping_positive_red_negative_blue():
    m = np.zeros((4, 4))
    m[0, 0], m[1, 1] = 1.0, -1.0
    rgb = render_saliency(m, percentile=100)
    np.testing.assert_array_equal(rgb[0, 0], SIGNED_LUT[-1])  # top end of RdBu_r: red
    np.testing.assert_array_equal(rgb[1, 1], SIGNED_LUT[0])  # bottom end: blue
    np.testing.assert_array_equal(rgb[2, 2], [255, 255, 255])  # exactly zero: white
    assert rgb[0, 0, 0] > rgb[0, 0, 2] and rgb[1, 1, 2] > rgb[1, 1, 0]


def test_sign_mapping_is_symmetric():
    m = np.linspace(-1, 1, 257).reshape(1, 257)
    assert m[0, 128] == 0.0
    rgb = render_saliency(m, percentile=100)
    expected = SIGNED_LUT.copy()
    expected[128] = 255  # exactly zero is white
    np.testing.assert_array_equal(rgb[0], expected)


def test_abs_mode_maps_magnitude_to_sequential_colormap():
    m = np.array([[0.0, -1.0, 1.0]])
    rgb = render_saliency(m, mode="abs", percentile=100)
    lut = colormap_lut("inferno")
    np.testing.assert_array_equal(rgb[0], lut[[0, 255, 255]])


def test_single_outlier_does_not_wash_out_map():
    m = _random((50, 50), seed=3)
    m[0, 0] = 1e6
    robust = render_saliency(m)  # p99
    washed = render_saliency(m, percentile=100)
    far_from_centre = lambda rgb: (np.abs(rgb.astype(int) - CENTRE).max(-1) > 40).mean()  # noqa: E731
    assert far_from_centre(robust) > 0.5
    assert far_from_centre(washed) < 0.01


def test_named_and_object_cmap_agree():
    m = _random((5, 5))
    np.testing.assert_array_equal(
        render_saliency(m, cmap="coolwarm"),
        render_saliency(m, cmap=matplotlib.colormaps["coolwarm"]),
    )


def test_fixed_scale_makes_maps_comparable():
    m = _random((10, 10), seed=4)
    strong, weak = render_saliency(m, scale=1.0), render_saliency(0.5 * m, scale=1.0)
    distance = lambda rgb: np.abs(rgb.astype(int) - CENTRE).sum()  # noqa: E731
    assert distance(weak) < distance(strong)
    np.testing.assert_array_equal(render_saliency(m), render_saliency(0.5 * m))  # per-map


# ------------------------------------------------------------------------------------------------
# Overlay
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def photo():
    rng = np.random.default_rng(5)
    return rng.integers(0, 256, size=(12, 10, 3), dtype=np.uint8)


def test_overlay_shape(photo):
    rgb = render_saliency(_random((12, 10, 3)), image=photo)
    assert rgb.shape == (12, 10, 3) and rgb.dtype == np.uint8


@pytest.mark.parametrize("mode", ["signed", "abs"])
def test_zero_saliency_shows_the_grayscale_photo(photo, mode):
    rgb = render_saliency(np.zeros((12, 10)), image=photo, mode=mode)
    gray = np.asarray(Image.fromarray(photo).convert("L")).astype(int)
    np.testing.assert_allclose(rgb.astype(int), np.repeat(gray[..., None], 3, -1), atol=1)


def test_overlay_weight_is_alpha_times_magnitude(photo):
    m = np.ones((12, 10))  # scaled to +1 everywhere
    gray = photo.astype(float) @ np.array([0.299, 0.587, 0.114])
    top = SIGNED_LUT[-1].astype(float)
    for alpha in (0.0, 0.5, 1.0):
        rgb = render_saliency(m, image=photo, alpha=alpha)
        expected = (1 - alpha) * gray[..., None] + alpha * top
        np.testing.assert_allclose(rgb, np.rint(expected), atol=0.51)


def test_overlay_accepts_float_and_grayscale_images(photo):
    m = _random((12, 10))
    as_float = render_saliency(m, image=photo / 255.0)
    np.testing.assert_array_equal(as_float, render_saliency(m, image=photo))
    gray = np.full((12, 10), 0.5)
    np.testing.assert_array_equal(
        render_saliency(m, image=gray), render_saliency(m, image=gray[..., None])
    )


# ------------------------------------------------------------------------------------------------
# save_jacobian_images
# ------------------------------------------------------------------------------------------------


def test_save_names_default_indices(tmp_path):
    paths = save_jacobian_images(_random((3, 28, 28, 1)), tmp_path / "new" / "dir")
    assert [p.name for p in paths] == ["output_00.png", "output_01.png", "output_02.png"]
    assert all(p.is_file() for p in paths)


@pytest.mark.parametrize(
    "indices, names",
    [
        ([7, 1, 12], ["output_07.png", "output_01.png", "output_12.png"]),
        ([5, 1234], ["output_0005.png", "output_1234.png"]),
        (np.array([999, 3]), ["output_999.png", "output_003.png"]),
    ],
)
def test_save_names_from_output_indices(tmp_path, indices, names):
    jac = _random((len(names), 8, 8))
    paths = save_jacobian_images(jac, tmp_path, output_indices=indices, prefix="output")
    assert [p.name for p in paths] == names
    assert sorted(os.listdir(tmp_path)) == sorted(names)  # no temporary files left


def test_save_prefix(tmp_path):
    paths = save_jacobian_images(_random((2, 8, 8)), tmp_path, prefix="cat")
    assert [p.name for p in paths] == ["cat_00.png", "cat_01.png"]


@pytest.mark.parametrize(
    "shape, upscale, size",
    [
        ((28, 28), None, (280, 280)),
        ((28, 28), 1, (28, 28)),
        ((28, 28), 3, (84, 84)),
        ((20, 40, 3), None, (280, 140)),  # (W, H): longer side 40 -> x7
        ((300, 260), None, (260, 300)),
    ],
)
def test_save_files_decode_to_right_size(tmp_path, shape, upscale, size):
    paths = save_jacobian_images(_random((2, *shape)), tmp_path, upscale=upscale)
    for path in paths:
        with Image.open(path) as png:
            assert png.format == "PNG" and png.mode == "RGB" and png.size == size


def test_saved_pixels_equal_render_saliency(tmp_path):
    jac = _random((2, 9, 7, 3))
    paths = save_jacobian_images(jac, tmp_path, upscale=1, mode="abs", reduce="l2")
    for path, m in zip(paths, jac, strict=True):
        expected = render_saliency(m, mode="abs", reduce="l2")
        np.testing.assert_array_equal(np.asarray(Image.open(path)), expected)


def test_saved_upscale_is_nearest_neighbour(tmp_path):
    jac = _random((1, 4, 5))
    (path,) = save_jacobian_images(jac, tmp_path, upscale=3)
    expected = np.repeat(np.repeat(render_saliency(jac[0]), 3, 0), 3, 1)
    np.testing.assert_array_equal(np.asarray(Image.open(path)), expected)


def test_save_shared_scale(tmp_path):
    m = _random((8, 8))
    jac = np.stack([m, 0.1 * m])
    own = save_jacobian_images(jac, tmp_path / "own", upscale=1)
    shared = save_jacobian_images(jac, tmp_path / "shared", upscale=1, shared_scale=True)
    load = lambda p: np.asarray(Image.open(p)).astype(int)  # noqa: E731
    np.testing.assert_array_equal(load(own[0]), load(own[1]))
    assert np.abs(load(shared[1]) - CENTRE).sum() < np.abs(load(shared[0]) - CENTRE).sum()


def test_save_refuses_to_overwrite_before_writing_anything(tmp_path):
    existing = tmp_path / "output_02.png"
    existing.write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match=r"output_02\.png.*pass overwrite=True"):
        save_jacobian_images(_random((3, 8, 8)), tmp_path)
    assert os.listdir(tmp_path) == ["output_02.png"]  # output_00/01 were not written
    assert existing.read_bytes() == b"keep me"


def test_save_overwrite_true_replaces(tmp_path):
    (tmp_path / "output_00.png").write_bytes(b"old")
    (path,) = save_jacobian_images(_random((1, 8, 8)), tmp_path, overwrite=True, upscale=1)
    with Image.open(path) as png:
        assert png.size == (8, 8)


def test_save_with_overlay(tmp_path, photo):
    paths = save_jacobian_images(_random((2, 12, 10, 3)), tmp_path, image=photo, upscale=1)
    with Image.open(paths[0]) as png:
        assert png.size == (10, 12)


def test_accepts_non_numpy_array_likes(tmp_path):
    rgb = render_saliency([[0.0, 1.0], [-1.0, 0.5]])
    assert rgb.shape == (2, 2, 3)


# ------------------------------------------------------------------------------------------------
# Bad inputs
# ------------------------------------------------------------------------------------------------

GOOD_MAP = np.ones((4, 5))
NAN_MAP = np.where(np.eye(4, 5) > 0, np.nan, 1.0)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (
            {"jacobian_map": np.ones((2, 3, 4, 5))},
            ValueError,
            r"\(2, 3, 4, 5\).*Pass jacobian_map\[k\]",
        ),
        ({"jacobian_map": np.ones(5)}, ValueError, r"shape \(H, W\) or \(H, W, C\).*\(5,\)"),
        ({"jacobian_map": np.ones((0, 5))}, ValueError, r"empty.*\(0, 5\)"),
        ({"jacobian_map": NAN_MAP}, ValueError, r"non-finite.*\(0, 0\)"),
        ({"jacobian_map": np.full((3, 3), np.inf)}, ValueError, "non-finite"),
        ({"jacobian_map": np.ones((3, 3), complex)}, TypeError, "real numbers.*complex"),
        ({"jacobian_map": np.ones((3, 3), bool)}, TypeError, "real numbers.*bool"),
        ({"jacobian_map": "abc"}, TypeError, "real numbers"),
        ({"mode": "sign"}, ValueError, r"`mode`.*\('signed', 'abs'\).*mode='sign'"),
        ({"reduce": "max"}, ValueError, r"`reduce`.*'maxabs', 'l2', 'sum', 'mean'"),
        ({"cmap": "RdBu_x"}, ValueError, r"`cmap`.*Did you mean 'RdBu_r'.*'viridis'"),
        ({"cmap": 3}, TypeError, "`cmap`"),
        ({"percentile": 0}, ValueError, r"`percentile`.*\(0, 100\].*percentile=0"),
        ({"percentile": 101}, ValueError, r"`percentile`.*\(0, 100\]"),
        ({"percentile": float("nan")}, ValueError, "`percentile`"),
        ({"percentile": "99"}, TypeError, "`percentile`"),
        ({"percentile": True}, TypeError, "`percentile`"),
        ({"alpha": 1.5}, ValueError, r"`alpha`.*\[0, 1\]"),
        ({"scale": 0.0}, ValueError, "`scale`.*positive"),
        ({"scale": float("inf")}, ValueError, "`scale`"),
        ({"image": np.zeros((5, 4))}, ValueError, r"same height and width.*\(4, 5\).*\(5, 4\)"),
        ({"image": np.zeros((4, 5, 4))}, ValueError, r"\(H, W\) or \(H, W, 3\).*\(4, 5, 4\)"),
        ({"image": np.zeros((2, 4, 5, 3))}, ValueError, r"not a batch"),
        ({"image": np.full((4, 5), 255.0)}, ValueError, r"\[0, 1\].*image / 255"),
        ({"image": np.zeros((4, 5), np.int64)}, TypeError, "uint8"),
    ],
)
def test_render_bad_inputs(kwargs, error, match):
    arguments = {"jacobian_map": GOOD_MAP, **kwargs}
    with pytest.raises(error, match=match):
        render_saliency(**arguments)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (
            {"jacobian": np.ones((2, 13, 16, 16, 1))},
            ValueError,
            re.escape(
                "jacobian` must be one sample's Jacobian of shape (n_outputs, H, W) or "
                "(n_outputs, H, W, C); received shape (2, 13, 16, 16, 1), which looks like a "
                "batch. Pass jacobian[i] for sample i."
            ),
        ),
        ({"jacobian": np.ones((16, 16))}, ValueError, r"\(16, 16\).*jacobian\[None\]"),
        ({"jacobian": np.ones(16)}, ValueError, r"received shape \(16,\)"),
        ({"jacobian": np.full((2, 4, 4), np.nan)}, ValueError, "non-finite"),
        ({"output_indices": [1]}, ValueError, r"`output_indices`.*\(2,\).*\(1,\)"),
        ({"output_indices": [3, 3]}, ValueError, "distinct"),
        ({"output_indices": [-1, 2]}, ValueError, "non-negative"),
        ({"output_indices": [0.0, 1.0]}, TypeError, "`output_indices`.*integers"),
        ({"output_indices": "01"}, TypeError, "`output_indices`"),
        ({"upscale": 0}, ValueError, r"`upscale`.*integer >= 1.*upscale=0"),
        ({"upscale": 2.0}, ValueError, "`upscale`"),
        ({"prefix": "a/b"}, ValueError, "`prefix`"),
        ({"prefix": ""}, ValueError, "`prefix`"),
        ({"mode": "ABS"}, ValueError, "`mode`"),
        ({"reduce": None}, ValueError, "`reduce`"),
        ({"cmap": "nope"}, ValueError, "`cmap`"),
        ({"percentile": -1}, ValueError, "`percentile`"),
        ({"image": np.zeros((3, 3))}, ValueError, r"`image`.*\(4, 4\)"),
        ({"overwrite": "yes"}, TypeError, "`overwrite`"),
    ],
)
def test_save_bad_inputs_write_nothing(tmp_path, kwargs, error, match):
    arguments = {"jacobian": np.ones((2, 4, 4)), **kwargs}
    target = tmp_path / "out"
    with pytest.raises(error, match=match):
        save_jacobian_images(out_dir=target, **arguments)
    assert not target.exists()


@pytest.mark.parametrize(
    "function, kwargs, match",
    [
        (reduce_channels, {"jacobian_map": GOOD_MAP, "method": "max"}, "`method`"),
        (robust_scale, {"values": GOOD_MAP, "percentile": 0}, "`percentile`"),
        (robust_scale, {"values": NAN_MAP}, "non-finite"),
        (percentile_scale, {"values": GOOD_MAP, "percentile": 100.5}, "`percentile`"),
        (colormap_lut, {"name": "not-a-map"}, "`cmap`"),
        (colormap_lut, {"name": "gray", "size": 1}, "`size`"),
    ],
)
def test_helper_bad_inputs(function, kwargs, match):
    with pytest.raises(ValueError, match=match):
        function(**kwargs)


def test_module_imports_neither_tensorflow_nor_pyplot():
    code = (
        "import sys, types, importlib\n"
        "package = types.ModuleType('augnet')\n"
        f"package.__path__ = [{str(ROOT / 'augnet')!r}]\n"
        "sys.modules['augnet'] = package\n"
        "importlib.import_module('augnet._render')\n"
        "bad = [m for m in ('tensorflow', 'keras', 'matplotlib.pyplot') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# ------------------------------------------------------------------------------------------------
# Hardening (issue 9): bounded upscale, TopKJacobian, file modes, links, colour bar
# ------------------------------------------------------------------------------------------------


def test_save_refuses_a_huge_upscale_before_writing(tmp_path):
    from augnet._render import _check_upscale

    with pytest.raises(
        ValueError, match=r"upscale=100000.*2800000x2800000 pixels \(.* TiB of RGB\).*upscale<=292"
    ) as info:
        save_jacobian_images(np.ones((2, 28, 28)), tmp_path / "out", upscale=100000)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()
    assert _check_upscale(292, (28, 28)) == 292  # 8176 pixels: allowed
    with pytest.raises(ValueError, match="upscale<=292"):
        _check_upscale(293, (28, 28))
    assert _check_upscale(1, (20000, 20000)) == 1  # a map's own size is never refused


def test_top_k_result_gets_a_clear_error(tmp_path):
    from augnet._engine import TopKJacobian

    result = TopKJacobian(np.ones((2, 3, 4, 4)), np.zeros((2, 3), int), np.zeros((2, 3)))
    with pytest.raises(
        TypeError, match=r"TopKJacobian.*result\.jacobian\[i\].*output_indices=result\.indices\[i\]"
    ):
        save_jacobian_images(result, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_saved_files_follow_the_umask_and_never_a_link(tmp_path):
    victim = tmp_path / "victim.png"
    victim.write_bytes(b"precious")
    (tmp_path / "out").mkdir()
    os.symlink(victim, tmp_path / "out" / "output_00.png")
    with pytest.raises(FileExistsError):  # a link at the name counts as an existing file
        save_jacobian_images(_random((1, 8, 8)), tmp_path / "out")
    old = os.umask(0o027)
    try:
        paths = save_jacobian_images(_random((2, 8, 8)), tmp_path / "out", overwrite=True)
    finally:
        os.umask(old)
    assert victim.read_bytes() == b"precious"  # the link was replaced, its target untouched
    for p in paths:
        assert not p.is_symlink() and (p.stat().st_mode & 0o777) == 0o640


def test_colorbar_under_each_map_in_real_units(tmp_path):
    from augnet._colorbar import colorbar_strip
    from augnet._render import percentile_scale

    m = _random((16, 16))
    jac = np.stack([m, 1e-13 * m])
    own = save_jacobian_images(jac, tmp_path / "own", upscale=16, colorbar=True)
    shared = save_jacobian_images(
        jac, tmp_path / "shared", upscale=16, colorbar=True, shared_scale=True
    )
    for path, scale in zip(own, [percentile_scale(m), percentile_scale(1e-13 * m)], strict=True):
        pixels = np.asarray(Image.open(path))
        assert pixels.shape[1] == 256 and pixels.shape[0] > 256
        expected_map = np.repeat(np.repeat(render_saliency(m), 16, 0), 16, 1)
        np.testing.assert_array_equal(pixels[:256], expected_map)  # per map: both look the same
        np.testing.assert_array_equal(pixels[256:], colorbar_strip(256, scale=scale))
    pooled = percentile_scale(np.abs(jac))
    weak = np.asarray(Image.open(shared[1]))[:256]
    assert (np.abs(weak.astype(int) - 255) <= 8).all()  # 1e-13 on the shared scale: near white
    np.testing.assert_array_equal(
        np.asarray(Image.open(shared[1]))[256:], colorbar_strip(256, scale=pooled)
    )
    # the strip's ends are the colormap's ends and the labels differ with the scale
    assert not np.array_equal(colorbar_strip(256, scale=1.0), colorbar_strip(256, scale=2.0))
    strip = colorbar_strip(300, scale=1.0)
    row = strip[strip.shape[0] // 4]
    np.testing.assert_array_equal(row[int(300 * 0.12)], SIGNED_LUT[0])


def test_narrow_map_is_centred_above_a_wide_enough_colour_bar():
    from augnet._colorbar import COLORBAR_MIN_WIDTH, with_colorbar

    rgb = render_saliency(_random((40, 10)))
    out = with_colorbar(rgb, scale=1.0)
    left = (COLORBAR_MIN_WIDTH - 10) // 2
    assert out.shape[1] == COLORBAR_MIN_WIDTH
    np.testing.assert_array_equal(out[:40, left : left + 10], rgb)
    assert (out[:40, :left] == 255).all()


def test_save_into_a_file_path_says_so(tmp_path):
    (tmp_path / "out").write_text("a file")
    with pytest.raises(NotADirectoryError, match=r"Not a folder.*out"):
        save_jacobian_images(_random((1, 4, 4)), tmp_path / "out")
    assert (tmp_path / "out").read_text() == "a file"
