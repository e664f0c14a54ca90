"""The comparison sheet: several methods side by side, one colour bar per method, AUCs under."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from augnet import _demo


def _maps(k=2, size=16, channels=1, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "gradient": rng.normal(size=(k, size, size, channels)),
        "gradcam": np.abs(rng.normal(size=(k, size, size, channels))),
    }


def test_build_comparison_sheet_layout():
    from augnet._compare import build_comparison_sheet

    aucs = {
        "gradient": {"deletion": [0.1, 0.2], "insertion": [0.7, 0.8]},
        "gradcam": {"deletion": [0.3, 0.4], "insertion": [0.5, 0.6]},
    }
    fig = build_comparison_sheet(
        image=np.zeros((16, 16)),
        maps=_maps(),
        output_indices=[3, 7],
        predictions=[0.5, 0.25],
        aucs=aucs,
        notes={"gradcam": "layer conv"},
    )
    labels = [ax.get_label() for ax in fig.axes]
    assert labels[:6] == [
        "input 3",
        "input 7",
        "gradient 3",
        "gradient 7",
        "gradcam 3",
        "gradcam 7",
    ]
    assert labels[6:] == ["colorbar gradient", "colorbar gradcam"]
    bars = {ax.get_label(): ax for ax in fig.axes}
    text = bars["colorbar gradient"].get_xlabel()
    assert "deletion AUC 0.15 ↓" in text and "insertion AUC 0.75 ↑" in text
    assert "layer conv" in bars["colorbar gradcam"].get_xlabel()
    # Signed methods on a scale symmetric around zero, non-negative ones from zero.
    lo, hi = bars["colorbar gradient"].get_xlim()
    assert lo == pytest.approx(-hi)
    assert bars["colorbar gradcam"].get_xlim()[0] == 0.0
    assert "del 0.1 · ins 0.7" in bars["gradient 3"].get_title()
    assert "pred 0.25" in bars["input 7"].get_title()


@pytest.mark.parametrize(
    "maps, message",
    [
        ({}, "non-empty dict"),
        ({"a": np.zeros((2, 8, 8)), "b": np.zeros((2, 9, 8))}, "the same"),
        ({"a": np.zeros((17, 8, 8))}, "at most 16"),
    ],
)
def test_build_comparison_sheet_errors(maps, message):
    from augnet._compare import build_comparison_sheet

    with pytest.raises((TypeError, ValueError), match=message):
        build_comparison_sheet(image=np.zeros((8, 8)), maps=maps)


def test_comparison_sheet_on_the_shipped_model(tmp_path):
    import augnet

    model = augnet.load_model(_demo.demo_model_path())
    x = _demo.load_sample_image()
    path = augnet.comparison_sheet(
        tmp_path / "sheet.png",
        model,
        x,
        methods=["gradient", "integrated_gradients", "gradcam"],
        outputs=[0, 12],
        steps=5,
    )
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size[0] > 600 and img.size[1] > 400
    with pytest.raises(FileExistsError):
        augnet.comparison_sheet(path, model, x, methods=["gradient"], outputs=[0])
    augnet.comparison_sheet(path, model, x, methods=["gradient"], outputs=[0], overwrite=True)
    with pytest.raises(ValueError, match="one image"):
        augnet.comparison_sheet(tmp_path / "b.png", model, np.concatenate([x, x]), outputs=[0])
    with pytest.raises(ValueError, match=r"\.png"):
        augnet.comparison_sheet(tmp_path / "b.jpg", model, x, outputs=[0])


def test_comparison_sheet_file_mode_follows_the_umask(tmp_path):
    import os

    import augnet
    from augnet._compare import comparison_sheet

    model = augnet.load_model(_demo.demo_model_path())
    path = comparison_sheet(
        tmp_path / "m.png",
        model,
        _demo.load_sample_image(),
        methods=["gradient"],
        outputs=[0],
        evaluate=False,
    )
    umask = os.umask(0)
    os.umask(umask)
    assert (path.stat().st_mode & 0o777) == (0o666 & ~umask)
