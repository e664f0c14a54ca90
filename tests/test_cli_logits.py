"""``--logits`` on the command line (``augnet jacobian``, ``augnet info --sample``), the all-zero
warning as one line, and ``augnet info`` naming a ``keras.ops`` op between layers.

A tiny saturated classifier: 8x8 grayscale images, Flatten, Dense(3, softmax) with weights of
+-2. Fed 0-255 pixels (``--preprocess none``) its softmax is exactly one-hot in float32, so the
Jacobian of its probabilities is exactly zero, while that of its scores is the kernel (closed form).
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_one_line_error
from conftest import run_cli as run
from PIL import Image

import augnet


def warning_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("augnet: warning:")]


@pytest.fixture(scope="module")
def saturated(tmp_path_factory):
    import keras

    folder = tmp_path_factory.mktemp("logits")
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Flatten(),
            keras.layers.Dense(3, activation="softmax", name="probabilities"),
        ]
    )
    kernel = np.zeros((64, 3), "float32")
    kernel[:, 0], kernel[:, 1] = 2.0, -2.0
    kernel[:, 2] = np.linspace(-1, 1, 64)
    model.get_layer("probabilities").set_weights([kernel, np.zeros(3, "float32")])
    path = folder / "classifier.keras"
    model.save(path)
    images = []
    for i in range(3):
        images.append(folder / f"img{i}.png")
        Image.fromarray(np.full((8, 8), 200 + i, np.uint8)).save(images[-1])
    linear = keras.Sequential(
        [keras.Input((8, 8, 1)), keras.layers.Flatten(), keras.layers.Dense(3, name="scores")]
    )
    linear_path = folder / "linear.keras"
    linear.save(linear_path)
    return path, images, kernel, linear_path


def _jacobians(out: Path) -> np.ndarray:
    shards = sorted((out / "jacobians").glob("*.npy"))
    return np.concatenate([np.load(p) for p in shards])


def _job(model, images, out, *extra):
    return ("jacobian", model, *images, "--out", out, "--preprocess", "none", "--format", "png,npy",
            "--batch-size", "1", "--strategy", "loop", "-q", *extra)  # fmt: skip


def test_logits_maps_the_scores_and_is_kept_for_resume(capsys, saturated, tmp_path):
    model, images, kernel, _ = saturated
    out = tmp_path / "run"
    code, _, err = run(capsys, *_job(model, images[:2], out, "--logits"))
    assert code == 0, err
    assert warning_lines(err) == []
    J = _jacobians(out)  # (2, 3, 8, 8, 1): the kernel, for every image
    expected = np.broadcast_to(kernel.T.reshape(1, 3, 8, 8, 1), (2, 3, 8, 8, 1))
    np.testing.assert_allclose(J, expected, rtol=1e-6, atol=1e-6)
    settings = json.loads((out / "run.json").read_text())["settings"]
    assert settings["logits"] is True
    # --resume keeps it: without the flag the settings differ (one line), with it the run goes on.
    code, _, err = run(capsys, *_job(model, images, out, "--resume"))
    assert_one_line_error(code, err, r"different settings \(logits: True -> None\)")
    code, _, err = run(capsys, *_job(model, images, out, "--resume", "--logits"))
    assert code == 0, err
    assert len(_jacobians(out)) == 3


def test_probabilities_of_a_saturated_softmax_give_one_warning_line(capsys, saturated, tmp_path):
    model, images, _, _ = saturated
    out = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("error", augnet.ZeroJacobianWarning)
        code, _, err = run(capsys, *_job(model, images, out))  # three batches, all zero
    assert code == 0, err
    assert np.all(_jacobians(out) == 0)
    lines = warning_lines(err)
    assert len(lines) == 1, err
    assert "exactly zero" in lines[0] and "--logits" in lines[0] and "--preprocess" in lines[0]
    assert "Traceback" not in err and "ZeroJacobianWarning" not in err
    assert "logits" not in json.loads((out / "run.json").read_text())["settings"]


def test_logits_on_a_model_without_a_final_activation(capsys, saturated, tmp_path):
    _, images, _, linear = saturated
    out = tmp_path / "never"
    code, _, err = run(capsys, *_job(linear, images, out, "--logits"))
    assert_one_line_error(
        code, err, r"logits=True .* ends in Dense 'scores' with activation 'linear'"
    )
    assert not out.exists()  # refused before the run started


def test_info_sample_with_logits(capsys, saturated):
    model, images, kernel, _ = saturated
    code, out, err = run(capsys, "info", model, "--sample", images[0], "--logits")
    assert code == 0, err
    assert "(of the scores before the final softmax/sigmoid: --logits)" in out
    scores = np.full(64, 200.0 / 255.0) @ kernel  # the image as `augnet jacobian` prepares it
    assert f"value {scores[0]:.4g}" in out and f"L2 {np.linalg.norm(kernel[:, 0]):.4g}" in out
    assert warning_lines(err) == []
    code, _, err = run(capsys, "info", model, "--logits")
    assert_one_line_error(
        code, err, r"--logits applies to the sensitivity at an input: pass --sample"
    )


def test_info_sample_saturated_warns_once(capsys, saturated, tmp_path):
    model, _, _, _ = saturated
    x = np.full((1, 8, 8, 1), 200.0, "float32")
    np.save(tmp_path / "x.npy", x)
    with warnings.catch_warnings():  # none escapes as a Python warning (two lines, a path)
        warnings.simplefilter("error", augnet.ZeroJacobianWarning)
        code, out, err = run(capsys, "info", model, "--sample", tmp_path / "x.npy")
    assert code == 0, err
    lines = warning_lines(err)
    assert len(lines) == 1 and "--logits" in lines[0], err


def test_info_names_an_op_between_layers(capsys, tmp_path):
    import keras

    i = keras.Input((4,))
    h = keras.layers.Dense(3)(i)
    path = tmp_path / "round.keras"
    keras.Model(i, keras.layers.Dense(2)(keras.ops.round(h))).save(path)
    code, out, _ = run(capsys, "info", path)
    assert code == 0
    assert "differentiable with respect to the input: NO" in out
    assert re.search(r"layer 'round(_\d+)?' \(Round\): no gradient flows through it", out), out
