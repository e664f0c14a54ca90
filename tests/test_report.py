"""Tests for augnet._report: the contact sheet figure and its PNG file."""

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from augnet._render import render_saliency
from augnet._report import build_contact_sheet, contact_sheet, grid_shape

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _jacobian(n=3, shape=(16, 12, 1), seed=0):
    return np.random.default_rng(seed).normal(size=(n, *shape))


IMAGE = np.linspace(0, 1, 16 * 12).reshape(16, 12)


def _panels(figure):
    return [ax for ax in figure.axes if ax.get_label() != "colorbar"]


def _colorbar(figure):
    (ax,) = [ax for ax in figure.axes if ax.get_label() == "colorbar"]
    return ax


@pytest.mark.parametrize(
    "n_panels, expected",
    [(1, (1, 1)), (4, (1, 4)), (5, (1, 5)), (6, (2, 3)), (10, (2, 5)), (11, (3, 4))],
)
def test_grid_shape_at_most_five_columns(n_panels, expected):
    rows, columns = grid_shape(n_panels)
    assert (rows, columns) == expected
    assert columns <= 5 and rows * columns >= n_panels


@pytest.mark.parametrize("n", [1, 3, 7])
def test_panel_count_is_one_plus_outputs_plus_colour_bar(n):
    figure = build_contact_sheet(image=IMAGE, jacobian=_jacobian(n))
    with_images = [ax for ax in figure.axes if ax.get_images()]
    assert len(with_images) == 1 + n
    assert len(figure.axes) == 1 + n + 1
    assert _colorbar(figure) not in with_images
    assert [ax.get_label() for ax in _panels(figure)] == ["input"] + [
        f"output {k}" for k in range(n)
    ]


def test_titles_contain_indices_names_and_predictions():
    figure = build_contact_sheet(
        image=IMAGE,
        jacobian=_jacobian(3),
        output_indices=[281, 3, 17],
        predictions=[0.412, 0.05, 1e-5],
        output_names=["tabby cat", "tiger shark", "jay"],
        title="sample 0",
    )
    titles = [ax.get_title() for ax in _panels(figure)[1:]]
    assert titles[0].startswith("output 281 · tabby cat\npred 0.412\n")
    assert titles[1].startswith("output 3 · tiger shark\npred 0.05\n")
    assert titles[2].startswith("output 17 · jay\npred 1e-05\n")
    assert all("max |J|" in t for t in titles)
    assert figure.get_suptitle() == "sample 0"


def test_input_panel_shows_the_image():
    figure = build_contact_sheet(image=IMAGE, jacobian=_jacobian(2))
    shown = _panels(figure)[0].get_images()[0].get_array()
    np.testing.assert_allclose(shown, IMAGE)


def test_shared_scale_colour_bar_in_real_units():
    jac = _jacobian(3, shape=(16, 12))
    jac[1] *= 0.1  # a weak output
    figure = build_contact_sheet(image=IMAGE, jacobian=jac)
    scale = np.percentile(np.abs(jac), 99)
    cbar = _colorbar(figure)
    np.testing.assert_allclose(cbar.get_xlim(), (-scale, scale), rtol=1e-12)
    label = cbar.get_xlabel()
    assert "one scale for all panels" in label and "p99" in label and f"{scale:.3g}" in label
    # Every panel is rendered with that one scale, so the weak map stays faint.
    for ax, m in zip(_panels(figure)[1:], jac, strict=True):
        np.testing.assert_array_equal(
            ax.get_images()[0].get_array(), render_saliency(m, scale=scale)
        )


def test_per_map_scale_colour_bar_says_so():
    jac = _jacobian(2, shape=(16, 12))
    figure = build_contact_sheet(image=IMAGE, jacobian=jac, shared_scale=False, mode="abs")
    cbar = _colorbar(figure)
    np.testing.assert_allclose(cbar.get_xlim(), (0.0, 1.0))
    assert "each map divided by its own p99" in cbar.get_xlabel()
    for ax, m in zip(_panels(figure)[1:], jac, strict=True):
        np.testing.assert_array_equal(
            ax.get_images()[0].get_array(), render_saliency(m, mode="abs")
        )
        assert "p99 |J|" in ax.get_title()


def test_all_zero_jacobian_is_labelled():
    figure = build_contact_sheet(image=IMAGE, jacobian=np.zeros((2, 16, 12)))
    assert "all maps are exactly zero" in _colorbar(figure).get_xlabel()


def test_contact_sheet_writes_decodable_png(tmp_path):
    target = tmp_path / "sub" / "sheet.png"
    result = contact_sheet(target, image=IMAGE, jacobian=_jacobian(4), predictions=[1, 2, 3, 4])
    assert result == target and isinstance(result, pathlib.Path)
    with Image.open(result) as png:
        png.load()
        assert png.format == "PNG" and png.size[0] > 300 and png.size[1] > 200
    assert os.listdir(target.parent) == ["sheet.png"]  # no temporary file left


def test_contact_sheet_refuses_to_overwrite(tmp_path):
    target = tmp_path / "sheet.png"
    target.write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match=r"sheet\.png.*pass overwrite=True"):
        contact_sheet(target, image=IMAGE, jacobian=_jacobian(1))
    assert target.read_bytes() == b"keep me"
    contact_sheet(target, image=IMAGE, jacobian=_jacobian(1), overwrite=True)
    with Image.open(target) as png:
        assert png.format == "PNG"


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"predictions": [0.1, 0.2]}, ValueError, r"`predictions`.*\(3,\).*\(2,\)"),
        ({"predictions": ["a", "b", "c"]}, TypeError, "`predictions`"),
        ({"output_names": ["a"]}, ValueError, r"`output_names`.*\(3\).*1 names"),
        ({"output_names": "abc"}, TypeError, "`output_names`"),
        ({"output_indices": [1, 1, 2]}, ValueError, "distinct"),
        ({"jacobian": np.ones((101, 4, 4))}, ValueError, "at most 100"),
        ({"jacobian": np.ones((2, 3, 4, 4, 1))}, ValueError, r"Pass jacobian\[i\] for sample i"),
        ({"jacobian": np.full((3, 4, 4), np.nan)}, ValueError, "non-finite"),
        ({"image": np.full((4, 4), 2.0)}, ValueError, r"`image`.*\[0, 1\]"),
        ({"mode": "both"}, ValueError, "`mode`"),
        ({"cmap": "jett"}, ValueError, "Did you mean 'jet'"),
        ({"percentile": 0}, ValueError, "`percentile`"),
        ({"title": 3}, TypeError, "`title`"),
    ],
)
def test_contact_sheet_bad_inputs(tmp_path, kwargs, error, match):
    arguments = {"image": IMAGE, "jacobian": _jacobian(3), **kwargs}
    target = tmp_path / "sheet.png"
    with pytest.raises(error, match=match):
        contact_sheet(target, **arguments)
    assert not target.exists()


@pytest.mark.parametrize(
    "path, error, match",
    [("sheet.jpg", ValueError, r"`path`.*\.png"), (3, TypeError, "`path`")],
)
def test_contact_sheet_bad_path(tmp_path, path, error, match):
    if isinstance(path, str):
        path = tmp_path / path
    with pytest.raises(error, match=match):
        contact_sheet(path, image=IMAGE, jacobian=_jacobian(1))


def test_module_imports_neither_tensorflow_nor_pyplot():
    code = (
        "import sys, types, importlib\n"
        "package = types.ModuleType('augnet')\n"
        f"package.__path__ = [{str(ROOT / 'augnet')!r}]\n"
        "sys.modules['augnet'] = package\n"
        "importlib.import_module('augnet._report')\n"
        "bad = [m for m in ('tensorflow', 'keras', 'matplotlib.pyplot') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_overlay_applies_to_the_contact_sheet():
    jac = _jacobian(2)
    figure = build_contact_sheet(image=IMAGE, jacobian=jac, overlay=True, alpha=0.6)
    scale = float(np.percentile(np.abs(jac), 99))
    for ax, m in zip(_panels(figure)[1:], jac, strict=True):
        np.testing.assert_array_equal(
            ax.get_images()[0].get_array(),
            render_saliency(m, image=IMAGE, alpha=0.6, scale=scale),
        )
    with pytest.raises(ValueError, match="same height and width"):
        build_contact_sheet(image=np.zeros((4, 4)), jacobian=jac, overlay=True)


def test_contact_sheet_follows_the_umask_and_never_a_link(tmp_path):
    victim = tmp_path / "victim.png"
    victim.write_bytes(b"precious")
    os.symlink(victim, tmp_path / "sheet.png")
    with pytest.raises(FileExistsError):
        contact_sheet(tmp_path / "sheet.png", image=IMAGE, jacobian=_jacobian(1))
    old = os.umask(0o022)
    try:
        contact_sheet(tmp_path / "sheet.png", image=IMAGE, jacobian=_jacobian(1), overwrite=True)
    finally:
        os.umask(old)
    assert victim.read_bytes() == b"precious"
    assert not (tmp_path / "sheet.png").is_symlink()
    assert (tmp_path / "sheet.png").stat().st_mode & 0o777 == 0o644  # was 0600 (mkstemp)
