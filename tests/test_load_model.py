"""Loading models safely (issue 9): SavedModels are code, model paths must be files, damaged
files are named as such, and AugNet(inputs=m.inputs, outputs=m.outputs) keeps dict names."""

from __future__ import annotations

import os
import re
import threading

import numpy as np
import pytest

import augnet
from augnet import _cli

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")


def _one_line_error(capsys, argv, pattern):
    code = _cli.main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("augnet: error: ") and re.search(pattern, lines[0]), lines[0]


@pytest.fixture(scope="module")
def hostile_savedmodel(tmp_path_factory):
    """A SavedModel whose serving function writes a file: y = 2x, plus tf.io.write_file."""
    root = tmp_path_factory.mktemp("hostile")
    marker = root / "side_effect.txt"

    class Hostile(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 3], tf.float32)])
        def serve(self, x):
            tf.io.write_file(str(marker), "this ran")
            return {"y": 2.0 * x}

    module = Hostile()
    tf.saved_model.save(module, str(root / "model"), signatures={"serving_default": module.serve})
    assert not marker.exists()
    return root / "model", marker


def test_savedmodel_is_refused_without_unsafe(hostile_savedmodel, capsys, tmp_path):
    path, marker = hostile_savedmodel
    with pytest.raises(
        ValueError, match=r"is a TensorFlow SavedModel: loading it runs the TensorFlow graph"
    ):
        augnet.load_model(path)
    _one_line_error(capsys, ["info", path], r"SavedModel.*safe_mode=False \(--unsafe")
    np.save(tmp_path / "x.npy", np.ones((2, 3), np.float32))
    _one_line_error(
        capsys,
        ["jacobian", path, tmp_path / "x.npy", "--out", tmp_path / "out", "--format", "npy"],
        r"SavedModel.*--unsafe",
    )
    assert not marker.exists()  # the side effect never happened
    assert not (tmp_path / "out").exists()


def test_savedmodel_loads_with_unsafe_and_its_code_runs(hostile_savedmodel):
    """The control: the same SavedModel with safe_mode=False works, and its side effect
    happens, which is what the refusal above prevents."""
    path, marker = hostile_savedmodel
    model = augnet.load_model(path, safe_mode=False)
    x = np.ones((2, 3), np.float32)
    np.testing.assert_allclose(model.return_jacobian(x), np.broadcast_to(2 * np.eye(3), (2, 3, 3)))
    assert marker.read_text() == "this ran"
    marker.unlink()


def _tiny(tmp_path, suffix):
    inp = keras.Input((3,))
    model = keras.Model(inp, keras.layers.Dense(2)(inp))
    path = tmp_path / f"tiny{suffix}"
    model.save(path)
    return path


def test_fifo_and_device_model_paths_are_refused_at_once(tmp_path, capsys):
    fifo = tmp_path / "model.keras"
    os.mkfifo(fifo)
    errors = []

    def load():
        try:
            augnet.load_model(fifo)
        except ValueError as exc:
            errors.append(str(exc))

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    thread.join(30)
    assert not thread.is_alive(), "load_model hangs on a FIFO"
    assert errors and "is a FIFO (named pipe), not a model file" in errors[0]
    _one_line_error(capsys, ["info", fifo], r"model.keras' is a FIFO \(named pipe\), not a model")
    zero = tmp_path / "zero.h5"
    os.symlink("/dev/zero", zero)
    with pytest.raises(ValueError, match="is a character device"):
        augnet.load_model(zero)
    _one_line_error(capsys, ["info", zero], r"zero.h5' is a character device")


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_truncated_model_file_is_named_truncated(tmp_path, capsys, suffix):
    path = _tiny(tmp_path, suffix)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    pattern = r"truncated|corrupt"
    with pytest.raises(ValueError, match=pattern) as info:
        augnet.load_model(path)
    assert "File not found" not in str(info.value)
    _one_line_error(capsys, ["info", path], rf"(?i)cannot load .*tiny{suffix}.*({pattern})")


def test_augnet_from_model_outputs_keeps_dict_names():
    inp = keras.Input((3,), name="x")
    m = keras.Model(
        inp,
        {
            "alpha": keras.layers.Dense(2, name="d1")(inp),
            "beta": keras.layers.Dense(1, name="d2")(inp),
        },
    )
    x = np.random.default_rng(0).normal(size=(4, 3)).astype("float32")
    wrapped = augnet.wrap(m)
    direct = augnet.AugNet(inputs=m.inputs, outputs=m.outputs)
    y = direct(x)
    assert isinstance(y, dict) and sorted(y) == ["alpha", "beta"]
    J, W = direct.return_jacobian(x), wrapped.return_jacobian(x)
    assert isinstance(J, dict) and sorted(J) == ["alpha", "beta"]
    for name in ("alpha", "beta"):
        np.testing.assert_array_equal(J[name], W[name])
    kernel = m.get_layer("d1").kernel.numpy()
    np.testing.assert_allclose(J["alpha"], np.broadcast_to(kernel.T, (4, 2, 3)), rtol=1e-6)
    # a list the user builds stays a list
    listed = augnet.AugNet(inputs=m.inputs, outputs=list(m.outputs))
    assert isinstance(listed(x), list)
