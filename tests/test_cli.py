"""The ``augnet`` command line (augnet._cli): in-process through ``main([...])`` and as a process.

Tiny models (16x16x1 -> 3 outputs) saved in temporary folders keep the file fast; TensorFlow is
imported once for the in-process tests, and only three tests start a TensorFlow process.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import weakref
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_one_line_error
from conftest import run_cli as run
from PIL import Image

from augnet import _cli, _compute, _imageio, _runner, _safeio, _store

ROOT = Path(__file__).resolve().parents[1]


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _command() -> list[str]:
    """The installed ``augnet`` script, else ``python -m augnet``."""
    exe = shutil.which("augnet")
    return [exe] if exe else [sys.executable, "-m", "augnet"]


# ----------------------------------------------------------------------------------------------
# fixtures: tiny models and images
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keras():
    import keras

    return keras


def _save_model(keras, folder, name, inputs, outputs):
    path = Path(folder) / name
    keras.Model(inputs, outputs).save(path)
    return path


@pytest.fixture(scope="module")
def tiny_model(keras, tmp_path_factory):
    """16x16x1 -> 3 outputs: Conv2D(tanh) -> Flatten -> Dense(3)."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((16, 16, 1))
    h = keras.layers.Conv2D(2, 3, padding="same", activation="tanh")(inp)
    out = keras.layers.Dense(3)(keras.layers.Flatten()(h))
    return _save_model(keras, tmp_path_factory.mktemp("models"), "tiny.keras", inp, out)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(1)
    for i in range(7):
        shape = (20, 24, 3) if i % 3 == 0 else (16, 16)  # RGB and gray, resized and not
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(folder / f"img{i}.png")
    return folder


@pytest.fixture
def spy_sheets(monkeypatch):
    """Records the axes labels of every contact sheet built."""
    from augnet import _report

    panels = []
    real = _report.build_contact_sheet

    def build(**kwargs):
        figure = real(**kwargs)
        panels.append([ax.get_label() for ax in figure.axes])
        return figure

    monkeypatch.setattr(_report, "build_contact_sheet", build)
    return panels


# ----------------------------------------------------------------------------------------------
# --help and import cost
# ----------------------------------------------------------------------------------------------


def test_importing_the_cli_does_not_import_tensorflow():
    code = (
        "import sys, augnet._cli, augnet.__main__\n"
        "heavy = [m for m in ('tensorflow', 'keras', 'matplotlib', 'h5py') if m in sys.modules]\n"
        "print(heavy)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=_env(), check=True
    )
    assert out.stdout.strip() == "[]"


def test_help_answers_fast_without_tensorflow():
    for argv in (["--help"], ["jacobian", "--help"]):
        start = time.perf_counter()
        done = subprocess.run(
            [*_command(), *argv], capture_output=True, text=True, env=_env(), cwd=ROOT
        )
        elapsed = time.perf_counter() - start
        assert done.returncode == 0, done.stderr
        # ~0.2 s idle; TensorFlow alone takes ~7 s, so 3 s only fails if it were imported
        assert elapsed < 3.0, f"--help took {elapsed:.2f} s"
    for option in (
        "--outputs",
        "--top-k",
        "--signed",
        "--abs",
        "--cmap",
        "--percentile",
        "--overlay",
        "--format",
        "--batch-size",
        "--max-memory",
        "--overwrite",
        "--resume",
        "--quiet",
        "--unsafe",
        "--preprocess",
        "--center-crop",
    ):
        assert option in done.stdout


def test_no_command_prints_help(capsys):
    code, out, _ = run(capsys)
    assert code == 2 and "jacobian" in out


@pytest.mark.parametrize(
    "text, expected",
    [("0,3,7", [0, 3, 7]), ("2-4,0,3", [2, 3, 4, 0]), (" 5 ", [5])],
)
def test_parse_outputs(text, expected):
    assert _cli.parse_outputs(text) == expected


@pytest.mark.parametrize("text", ["", "a", "-1", "3-1", "1,,2"])
def test_parse_outputs_rejects(text):
    import argparse

    with pytest.raises(argparse.ArgumentTypeError, match="output indices"):
        _cli.parse_outputs(text)


def test_parse_memory():
    assert _cli.parse_memory("2GB") == 2 * 10**9
    assert _cli.parse_memory("512MiB") == 512 * 2**20
    assert _cli.parse_memory("1e6") == 10**6


# ----------------------------------------------------------------------------------------------
# what it writes
# ----------------------------------------------------------------------------------------------


def test_jacobian_writes_every_file(capsys, tiny_model, images, tmp_path, spy_sheets):
    import augnet

    out = tmp_path / "out"
    code, stdout, err = run(
        capsys,
        "jacobian",
        tiny_model,
        images / "img[0-3].png",
        "--out",
        out,
        "--format",
        "png,npy",
        "--batch-size",
        3,
        "--overlay",
    )
    assert code == 0, err
    assert "4 input(s) computed" in stdout
    names = [f"img{i}" for i in range(4)]
    for name in names:
        files = sorted(p.name for p in (out / name).iterdir())
        assert files == [
            "contact_sheet.png",
            "output_00.png",
            "output_01.png",
            "output_02.png",
            "thumbnail.png",
        ]
        for f in files:
            with Image.open(out / name / f) as im:
                im.load()
                if f.startswith("output"):
                    # the 256x256 map, and under it the colour bar in real units (issue 9)
                    assert im.size[0] == 256 and 256 < im.size[1] < 320 and im.mode == "RGB"
    # the thumbnail for the report page: the input as the model saw it (16x16 grey), x8
    spec = _imageio.ImageSpec.from_input_shape((16, 16, 1))
    for name in names:
        _, display = _imageio.load_image(images / f"{name}.png", spec)
        with Image.open(out / name / "thumbnail.png") as im:
            np.testing.assert_array_equal(
                np.asarray(im), np.repeat(np.repeat(display, 8, axis=0), 8, axis=1)
            )
    # one contact sheet per input: the input, 3 outputs and the colour bar
    assert spy_sheets == [["input", "output 0", "output 1", "output 2", "colorbar"]] * 4

    # summary.jsonl: one line per input, in input order
    lines = [json.loads(line) for line in (out / "summary.jsonl").read_text().splitlines()]
    assert [s["name"] for s in lines] == names
    first = lines[0]
    assert first["outputs"] == [0, 1, 2] and len(first["predictions"]) == 3
    assert len(first["jacobian_l2"]) == 3 and len(first["top_inputs"][0]) == 5

    # raw Jacobians: the store gives exactly the engine's numbers on the same inputs
    results = _store.load_results(out)
    stored = results.to_array()
    assert stored.shape == (4, 3, 16, 16, 1) and stored.dtype == np.float32
    model = augnet.load_model(tiny_model)
    items = _imageio.expand_inputs([images / "img[0-3].png"])
    x, _ = _imageio.load_batch(items, (16, 16, 1), _imageio.ImageSpec.from_input_shape((16, 16, 1)))
    expected = augnet.jacobian(model, x, outputs=[0, 1, 2])
    np.testing.assert_allclose(stored, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        first["jacobian_l2"], np.linalg.norm(expected[0].reshape(3, -1), axis=1), rtol=1e-5
    )
    preds = np.asarray(model(x[:1]))[0]
    np.testing.assert_allclose(first["predictions"], preds, rtol=1e-5)


def test_output_selection_and_top_k(capsys, tiny_model, images, tmp_path, spy_sheets):
    code, _, err = run(
        capsys,
        "jacobian",
        tiny_model,
        images / "img1.png",
        "--out",
        tmp_path / "a",
        "--outputs",
        "2,0",
        "--abs",
        "--quiet",
    )
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "a" / "img1").glob("output_*")) == [
        "output_00.png",
        "output_02.png",
    ]
    assert spy_sheets[-1] == ["input", "output 2", "output 0", "colorbar"]

    code, _, err = run(
        capsys,
        "jacobian",
        tiny_model,
        images / "img1.png",
        "--out",
        tmp_path / "b",
        "--top-k",
        2,
        "--quiet",
        "--format",
        "npy",
    )
    assert code == 0, err
    summary = json.loads((tmp_path / "b" / "summary.jsonl").read_text())
    order = np.argsort(summary["predictions"])[::-1]
    assert list(order) == [0, 1] and summary["predictions"][0] >= summary["predictions"][1]
    assert not (tmp_path / "b" / "img1").exists()  # npy only: no pictures
    assert _store.load_results(tmp_path / "b").to_array().shape == (1, 2, 16, 16, 1)


def test_npy_inputs(capsys, tiny_model, tmp_path):
    data = np.random.default_rng(0).normal(size=(5, 16, 16, 1)).astype(np.float32)
    np.save(tmp_path / "batch.npy", data)
    code, _, err = run(
        capsys,
        "jacobian",
        tiny_model,
        tmp_path / "batch.npy",
        "--out",
        tmp_path / "out",
        "--format",
        "png,npy",
        "--no-contact-sheet",
        "--quiet",
    )
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if p.name.startswith("batch_")) == [
        f"batch_{i}" for i in range(5)
    ]
    import augnet

    expected = augnet.jacobian(augnet.load_model(tiny_model), data, outputs=[0, 1, 2])
    np.testing.assert_allclose(
        _store.load_results(tmp_path / "out").to_array(), expected, rtol=1e-5, atol=1e-6
    )


# ----------------------------------------------------------------------------------------------
# resume, overwrite
# ----------------------------------------------------------------------------------------------


def _raw_files(out: Path) -> dict[str, bytes]:
    """Every result file except run.json (which holds only settings) and index.html (whose title
    is the folder's name; its data, index_files/, is compared), by relative path."""
    return {
        p.relative_to(out).as_posix(): p.read_bytes()
        for p in sorted(out.rglob("*"))
        if p.is_file() and p.name != "run.json" and p.relative_to(out).as_posix() != "index.html"
    }


def _job_args(model, images, out, batch_size=2, strategy="loop"):
    """Maps and raw Jacobians (contact sheets are tested above; they only cost time here).

    Strategies differ in the last bits, and ``auto`` picks one by timing, so comparisons between
    separate runs name one; a resumed run reuses its run's choice (tested with ``auto`` below).
    """
    return [
        "jacobian",
        model,
        images,
        "--out",
        out,
        "--format",
        "png,npy",
        "--no-contact-sheet",
        "--batch-size",
        batch_size,
        "--quiet",
        "--strategy",
        strategy,
    ]


@pytest.fixture(scope="module")
def reference_run(tiny_model, images, tmp_path_factory):
    """An uninterrupted run: 7 inputs in batches of 2."""
    out = tmp_path_factory.mktemp("reference") / "out"
    assert _cli.main([str(a) for a in _job_args(tiny_model, images, out)]) == 0
    return out


def test_resume_after_interrupt_is_byte_identical(
    capsys, monkeypatch, tiny_model, images, tmp_path
):
    out = tmp_path / "out"
    real_commit = _store.RunStore.commit
    commits = []

    def commit_then_interrupt(self, *args, **kwargs):
        record = real_commit(self, *args, **kwargs)
        commits.append(record)
        if len(commits) == 2:
            raise KeyboardInterrupt  # Ctrl-C right after the 2nd batch
        return record

    monkeypatch.setattr(_store.RunStore, "commit", commit_then_interrupt)
    code, _, err = run(capsys, *_job_args(tiny_model, images, out, strategy="auto"))
    assert code == 130 and "--resume" in err
    assert len(_store.load_results(out)) == 4  # two finished batches, readable
    strategy = json.loads((out / "run.json").read_text())["resolved"]["strategy"]
    assert strategy in ("loop", "pfor", "forward")
    monkeypatch.undo()
    # the resumed run uses the strategy chosen on the first batch, never a new timing
    monkeypatch.setattr(
        _compute, "resolve_strategy_for_x", lambda *a, **k: pytest.fail("resolved again")
    )

    computed = []
    real_compute = _runner.compute_batch

    def spy(model, batch, config, **kwargs):
        computed.append(len(batch.items))
        return real_compute(model, batch, config, **kwargs)

    monkeypatch.setattr(_runner, "compute_batch", spy)
    code, _, err = run(capsys, *_job_args(tiny_model, images, out, strategy="auto"), "--resume")
    assert code == 0, err
    assert computed == [2, 1]  # only the 3 unfinished inputs
    reference = tmp_path / "reference"  # uninterrupted, with the strategy the run chose
    assert _cli.main([str(a) for a in _job_args(tiny_model, images, reference, 2, strategy)]) == 0
    assert _raw_files(out) == _raw_files(reference)

    computed.clear()  # resuming a finished run computes nothing
    assert run(capsys, *_job_args(tiny_model, images, out, strategy="auto"), "--resume")[0] == 0
    assert computed == []


def test_interrupt_inside_a_batch_leaves_no_partial_batch(
    capsys, monkeypatch, tiny_model, images, tmp_path, reference_run
):
    out = tmp_path / "out"
    real_save = _safeio.SafeDir.write_atomic
    calls = []

    def save_then_interrupt(self, name, data, **kwargs):
        if name.endswith(".png"):
            calls.append(name)
            if len(calls) == 10:  # 2nd batch: after img2's 3 maps, at img3's first
                raise KeyboardInterrupt
        return real_save(self, name, data, **kwargs)

    monkeypatch.setattr(_safeio.SafeDir, "write_atomic", save_then_interrupt)
    code, _, _ = run(capsys, *_job_args(tiny_model, images, out))
    assert code == 130
    monkeypatch.undo()
    finished = _store.load_results(out)
    assert [e["name"] for e in finished.entries] == ["img0", "img1"]
    # the interrupted batch's files (img2's maps) are gone, nothing temporary is left
    assert not (out / "img2").exists() and not (out / "img3").exists()
    assert not [p for p in out.rglob(".*") if ".tmp" in p.name]
    assert run(capsys, *_job_args(tiny_model, images, out), "--resume")[0] == 0
    assert _raw_files(out) == _raw_files(reference_run)


def test_refuses_to_overwrite_before_computing(
    capsys, monkeypatch, tiny_model, images, tmp_path, reference_run
):
    out = tmp_path / "out"
    shutil.copytree(reference_run, out)
    before = _raw_files(out)
    monkeypatch.setattr(_runner, "compute_batch", lambda *a, **k: pytest.fail("computed anyway"))
    code, _, err = run(capsys, *_job_args(tiny_model, images, out))
    assert_one_line_error(code, err, r"already holds results; pass --resume .* --overwrite")
    assert _raw_files(out) == before
    # a folder with pictures but no run record is protected too
    (out / "run.json").unlink()
    shutil.rmtree(out / "batches")
    code, _, err = run(capsys, *_job_args(tiny_model, images, out))
    assert_one_line_error(code, err, r"img0' already exists; pass --overwrite")
    monkeypatch.undo()
    code, _, err = run(capsys, *_job_args(tiny_model, images, out), "--overwrite")
    assert code == 0, err
    assert _raw_files(out) == _raw_files(reference_run)


def test_resume_with_other_settings_is_refused(capsys, tiny_model, images, tmp_path, reference_run):
    out = tmp_path / "out"
    shutil.copytree(reference_run, out)
    code, _, err = run(capsys, *_job_args(tiny_model, images, out), "--resume", "--outputs", "1")
    assert_one_line_error(code, err, r"cannot resume .*outputs: \[0, 1, 2\] -> \[1\]")


# ----------------------------------------------------------------------------------------------
# streaming
# ----------------------------------------------------------------------------------------------


def test_streams_a_large_folder_in_bounded_memory(capsys, monkeypatch, keras, tmp_path):
    n, batch_size = 2000, 100
    folder = tmp_path / "many"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        pixels = rng.integers(0, 256, (32, 32), dtype=np.uint8)
        (folder / f"{i:05d}.pgm").write_bytes(
            b"P5\n32 32\n255\n" + pixels.tobytes()
        )  # fast to write
    inp = keras.Input((32, 32, 1))
    model = _save_model(
        keras, tmp_path, "m.keras", inp, keras.layers.Dense(2)(keras.layers.Flatten()(inp))
    )

    live, peak, sizes = [0], [0], []
    real = _imageio.load_batch

    def release(k):
        live[0] -= k

    def counted(items, input_shape, spec):
        x, displays = real(items, input_shape, spec)
        sizes.append(len(items))
        live[0] += len(items)
        peak[0] = max(peak[0], live[0])
        weakref.finalize(x, release, len(items))
        return x, displays

    monkeypatch.setattr(_imageio, "load_batch", counted)
    code, _, err = run(
        capsys,
        "jacobian",
        model,
        folder,
        "--out",
        tmp_path / "out",
        "--format",
        "npy",
        "--batch-size",
        batch_size,
        "--quiet",
    )
    assert code == 0, err
    assert sum(sizes) == n and max(sizes) == batch_size
    assert peak[0] <= 2 * batch_size  # the batch being computed and, at most, the previous one
    assert len(_store.load_results(tmp_path / "out")) == n


# ----------------------------------------------------------------------------------------------
# errors: one line, exit code 2, nothing half-written
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def five_channel_model(keras, tmp_path_factory):
    inp = keras.Input((16, 16, 5))
    out = keras.layers.Dense(2)(keras.layers.Flatten()(inp))
    return _save_model(keras, tmp_path_factory.mktemp("m5"), "five.keras", inp, out)


def _error_case(case, tmp_path, tiny_model, images, five_channel_model):
    out = tmp_path / "out"
    if case == "missing model":
        return [
            "jacobian",
            tmp_path / "nope.keras",
            images,
            "--out",
            out,
        ], r"model file '.*nope.keras' does not exist"
    if case == "not a model":
        (tmp_path / "fake.keras").write_text("this is not a model")
        return [
            "jacobian",
            tmp_path / "fake.keras",
            images,
            "--out",
            out,
        ], r"(?i)cannot load .*fake.keras"
    if case == "corrupt image":
        (tmp_path / "bad.png").write_bytes(b"\x89PNG garbage" * 20)
        return [
            "jacobian",
            tiny_model,
            tmp_path / "bad.png",
            "--out",
            out,
        ], r"cannot read image '.*bad.png'"
    if case == "missing image":
        return [
            "jacobian",
            tiny_model,
            tmp_path / "gone.png",
            "--out",
            out,
        ], r"input '.*gone.png' does not exist"
    if case == "channels":
        return ["jacobian", five_channel_model, images, "--out", out], r"5 channels"
    if case == "size":
        return (
            ["jacobian", tiny_model, images / "img0.png", "--out", out, "--resize", "none"],
            r"img0.png' is 20x24 .* takes 16x16",
        )
    if case == "array shape":
        np.save(tmp_path / "x.npy", np.zeros((2, 8, 8, 1)))
        return [
            "jacobian",
            tiny_model,
            tmp_path / "x.npy",
            "--out",
            out,
        ], r"x.npy' has shape \(2, 8, 8, 1\)"
    if case == "output index":
        return (
            ["jacobian", tiny_model, images, "--out", out, "--outputs", "1,3"],
            r"output index 3 is out of range: the model has 3 outputs \(valid indices 0..2\)",
        )
    if case == "top-k":
        return ["jacobian", tiny_model, images, "--out", out, "--top-k", 4], r"--top-k 4 is larger"
    if case == "unwritable folder":
        (tmp_path / "file.txt").write_text("x")
        return (
            ["jacobian", tiny_model, images, "--out", tmp_path / "file.txt" / "out"],
            r"cannot write to output folder '.*file.txt/out'",
        )
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case",
    [
        "missing model",
        "not a model",
        "corrupt image",
        "missing image",
        "channels",
        "size",
        "array shape",
        "output index",
        "top-k",
        "unwritable folder",
    ],
)
def test_user_errors(capsys, case, tmp_path, tiny_model, images, five_channel_model):
    argv, pattern = _error_case(case, tmp_path, tiny_model, images, five_channel_model)
    code, _, err = run(capsys, *argv)
    assert_one_line_error(code, err, pattern)
    assert not (tmp_path / "out").exists()  # nothing written, not even the folder


def test_disk_full(capsys, monkeypatch, tiny_model, images, tmp_path):
    out = tmp_path / "out"
    real = _safeio._write
    writes = []

    def fill_up(fd, data):
        path = Path(os.readlink(f"/proc/self/fd/{fd}"))  # the temporary file being written
        writes.append(path)
        if path.parent.name == "img3":  # 2nd batch, after img2's maps were written
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data)

    monkeypatch.setattr(_safeio, "_write", fill_up)
    code, _, err = run(capsys, *_job_args(tiny_model, images, out))
    assert_one_line_error(code, err, r"no space left on device while writing '.*'; .* --resume")
    monkeypatch.undo()
    assert [e["name"] for e in _store.load_results(out).entries] == ["img0", "img1"]
    assert not [p for p in out.rglob(".*") if ".tmp" in p.name]
    assert not (out / "img2").exists()


def test_debug_shows_the_traceback(tmp_path, tiny_model):
    with pytest.raises(Exception, match="does not exist"):
        _cli.main(
            [
                "jacobian",
                str(tiny_model),
                str(tmp_path / "gone.png"),
                "--out",
                str(tmp_path / "out"),
                "--debug",
            ]
        )


# ----------------------------------------------------------------------------------------------
# info
# ----------------------------------------------------------------------------------------------


def test_info_differentiable_model(capsys, tiny_model):
    code, out, err = run(capsys, "info", tiny_model)
    assert code == 0, err
    assert "(None, 16, 16, 1)" in out and "float32" in out and "(3 values per sample)" in out
    assert "layers: 4" in out and "parameters: 1,559 (1,559 trainable, 0 non-trainable)" in out
    assert "differentiable with respect to the input: yes" in out


def test_info_names_non_differentiable_layers(capsys, keras, tmp_path):
    tokens = keras.Input((6,), dtype="int32")
    emb = keras.layers.Embedding(10, 4, name="words")(tokens)
    path = _save_model(
        keras, tmp_path, "emb.keras", tokens, keras.layers.Dense(1)(keras.layers.Flatten()(emb))
    )
    code, out, _ = run(capsys, "info", path)
    assert code == 0
    assert "differentiable with respect to the input: NO" in out
    assert "dtype int32" in out and "layer 'words' (Embedding)" in out

    x = keras.Input((4,))
    h = keras.layers.Dense(3)(x)
    rounded = keras.layers.Lambda(lambda t: t // 1.0, name="rounding", output_shape=(3,))(h)
    path = _save_model(keras, tmp_path, "lam.keras", x, keras.layers.Dense(2)(rounded))
    code, _, err = run(capsys, "info", path)  # Lambda layers need --unsafe
    assert_one_line_error(code, err, r"(?i)cannot load .*lam.keras.* --unsafe")
    code, out, _ = run(capsys, "info", path, "--unsafe")
    assert code == 0
    assert "layer 'rounding' (Lambda): no gradient flows through it" in out


# ----------------------------------------------------------------------------------------------
# demo
# ----------------------------------------------------------------------------------------------


def test_demo(capsys, tmp_path, spy_sheets):
    from augnet import _demo

    if not _demo.demo_model_path().exists():
        pytest.skip("the demo model is not built yet")
    code, _, err = run(capsys, "demo", "--out", tmp_path / "demo", "--quiet")
    assert code == 0, err
    folder = tmp_path / "demo" / "sample_input"
    assert len(list(folder.glob("output_*.png"))) == 13
    assert len(spy_sheets[0]) == 1 + 13 + 1
    with Image.open(folder / "contact_sheet.png") as im:
        im.load()
    # Run again: the demo replaces its own earlier results (as on a clone with committed ones).
    first = (folder / "output_00.png").read_bytes()
    code, _, err = run(capsys, "demo", "--out", tmp_path / "demo", "--quiet")
    assert code == 0, err
    assert (folder / "output_00.png").read_bytes() == first


def test_demo_refuses_a_folder_with_other_results(capsys, tmp_path, tiny_model, images):
    from augnet import _demo

    if not _demo.demo_model_path().exists():
        pytest.skip("the demo model is not built yet")
    out = tmp_path / "other"
    code, _, err = run(capsys, "jacobian", tiny_model, images, "--out", out, "--quiet")
    assert code == 0, err
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    code, _, err = run(capsys, "demo", "--out", out, "--quiet")
    assert code == 2
    assert "already holds results" in err and "--overwrite" in err
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before


# ----------------------------------------------------------------------------------------------
# as a process: the installed command (or python -m augnet)
# ----------------------------------------------------------------------------------------------


def test_command_error_as_a_process(tmp_path, images):
    done = subprocess.run(
        [*_command(), "jacobian", str(tmp_path / "missing.keras"), str(images)],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=tmp_path,
        timeout=60,
    )
    assert_one_line_error(
        done.returncode, done.stderr, "model file '.*missing.keras' does not exist"
    )


def test_killed_command_resumes_byte_identical(tiny_model, images, tmp_path):
    """The installed command, SIGKILLed (no clean-up at all) mid-run, then --resume."""
    out = tmp_path / "out"
    args = [str(a) for a in _job_args(tiny_model, images, out, batch_size=1)]
    proc = subprocess.Popen(
        [*_command(), *args],
        env=_env(),
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        # the uninterrupted reference run, while the process starts up
        reference = tmp_path / "reference"
        assert _cli.main([str(a) for a in _job_args(tiny_model, images, reference, 1)]) == 0
        deadline = time.monotonic() + 90
        while not (out / "batches" / "000001.json").exists():
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline
            time.sleep(0.005)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
    finished = len(_store.load_results(out))
    assert 2 <= finished < 7  # killed part-way, with the finished batches readable
    assert _cli.main(args + ["--resume"]) == 0
    assert _raw_files(out) == _raw_files(reference)


def test_info_sample_prints_the_sensitivity_summary(capsys, keras, tmp_path):
    """A linear model: the Jacobian is its kernel transposed, so every printed norm is known."""
    kernel = np.array([[1.0, 0.0], [2.0, -1.0], [0.0, 3.0]], dtype="float32")  # (3 in, 2 out)
    inp = keras.Input((3,))
    dense = keras.layers.Dense(2, use_bias=False)
    model = keras.Model(inp, dense(inp))
    dense.set_weights([kernel])
    path = tmp_path / "linear.keras"
    model.save(path)
    sample = tmp_path / "x.npy"
    np.save(sample, np.ones((2, 3), dtype="float32"))
    code, out, err = run(capsys, "info", path, "--sample", sample)
    assert code == 0, err
    J = kernel.T
    assert f"Frobenius norm {np.linalg.norm(J):.4g}" in out
    assert f"spectral norm {np.linalg.norm(J, 2):.4g}" in out
    for k in range(2):
        assert f"L1 {np.abs(J[k]).sum():.4g}  L2 {np.linalg.norm(J[k]):.4g}" in out


# ----------------------------------------------------------------------------------------------
# issue 9: argument errors, concurrent runs, signals, info's top outputs
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, pattern",
    [
        (["jacobian"], r"required: MODEL, INPUT; see 'augnet jacobian --help'$"),
        (["jacobian", "m", "x", "--outputs", "1,,2"], r"--outputs: expected output indices"),
        (
            ["jacobian", "m", "x", "--bogus"],
            r"unrecognized arguments: --bogus; see 'augnet jacobian --help'$",
        ),
        (["info"], r"required: MODEL; see 'augnet info --help'$"),
        (["demo", "--percentile", "200"], r"--percentile: expected a number in \(0, 100\]"),
        (["frobnicate"], r"invalid choice: 'frobnicate'.*see 'augnet --help'$"),
        (["jacobian", "m", "x", "--overwrite", "--resume"], r"not allowed with argument"),
    ],
)
def test_argument_errors_are_one_line(capsys, argv, pattern):
    code, out, err = run(capsys, *argv)
    assert_one_line_error(code, err, pattern)
    assert out == "" and "usage:" not in err


def test_argument_error_as_a_process_is_one_line():
    done = subprocess.run(
        [*_command(), "jacobian", "--top-k", "0", "m.keras", "x.png"],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=60,
    )
    assert_one_line_error(
        done.returncode, done.stderr, r"--top-k: expected a positive integer.*--help"
    )


def _slow_args(model, images, out):
    """One input per batch, with contact sheets: a run of a few seconds."""
    return [
        "jacobian",
        str(model),
        str(images),
        "--out",
        str(out),
        "--batch-size",
        "1",
        "--quiet",
        "--strategy",
        "loop",
        "--format",
        "png,npy",
    ]


def _wait_for(path: Path, proc, timeout=120):
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else proc.returncode
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.005)


def test_a_second_concurrent_run_is_refused_naming_the_first(tiny_model, images, tmp_path):
    out = tmp_path / "out"
    first = subprocess.Popen(
        [*_command(), *_slow_args(tiny_model, images, out)],
        env=_env(),
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        _wait_for(out / _safeio.LOCK_NAME, first)
        second = subprocess.run(
            [*_command(), *_slow_args(tiny_model, images, out), "--overwrite"],
            capture_output=True,
            text=True,
            env=_env(),
            cwd=tmp_path,
            timeout=120,
        )
        assert_one_line_error(
            second.returncode,
            second.stderr,
            rf"out' is in use by another augnet run \(process {first.pid} on .*augnet jacobian .*\); "
            "wait for it to finish",
        )
        assert first.wait(timeout=300) == 0, first.stderr.read().decode()
    finally:
        if first.poll() is None:
            first.kill()
        first.wait()
        first.stderr.close()
    reference = tmp_path / "reference"
    assert _cli.main(_slow_args(tiny_model, images, reference)) == 0
    assert _raw_files(out) == _raw_files(reference)  # the first run, whole and alone


_KILL_IN_COMMIT = """
import os, signal, sys
from augnet import _safeio
real = _safeio.SafeDir.write_atomic
count = [0]
def write_atomic(self, name, data, **kwargs):
    if name.endswith(".png"):
        count[0] += 1
        if count[0] == int(os.environ["KILL_AT"]):
            os.kill(os.getpid(), signal.SIGKILL)  # no clean-up at all
    return real(self, name, data, **kwargs)
_safeio.SafeDir.write_atomic = write_atomic
from augnet._cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigkill_inside_the_first_batch_then_resume(tiny_model, images, tmp_path):
    """Killed while the first (and only) batch writes its files: --resume cleans up from the
    batch's journal and finishes byte-identical (issue 9: it used to be refused)."""
    out = tmp_path / "out"
    args = _job_args(tiny_model, images, out, batch_size=7)
    done = subprocess.run(
        [sys.executable, "-c", _KILL_IN_COMMIT, *[str(a) for a in args]],
        env={**_env(), "KILL_AT": "5"},
        cwd=tmp_path,
        capture_output=True,
        timeout=300,
    )
    assert done.returncode == -signal.SIGKILL, done.stderr.decode()
    assert (out / "batches" / "000000.pending").exists()  # the journal of the killed batch
    # the 4 PNGs written before the kill: img0's 3 maps and its thumbnail
    assert len(list(out.glob("img*/*.png"))) == 4 and len(_store.load_results(out)) == 0
    assert _cli.main([str(a) for a in args] + ["--resume"]) == 0
    reference = tmp_path / "reference"
    assert _cli.main([str(a) for a in _job_args(tiny_model, images, reference, 7)]) == 0
    assert _raw_files(out) == _raw_files(reference)


def test_sigterm_stops_the_run_cleanly(tiny_model, images, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [*_command(), *_slow_args(tiny_model, images, out)],
        env=_env(),
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        _wait_for(out / "batches" / "000001.json", proc)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=120)
        err = proc.stderr.read().decode()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stderr.close()
    lines = err.strip().splitlines()
    assert code == 143 and len(lines) == 1, err
    assert re.match(
        r"augnet: terminated; \d input\(s\) finished in this run are kept in .*--resume", lines[0]
    )
    finished = len(_store.load_results(out))
    assert 2 <= finished < 7
    assert not list(out.glob("batches/*.pending")) and not (out / _safeio.LOCK_NAME).exists()
    # the summary already lists every finished input (it grows batch by batch)
    assert len((out / "summary.jsonl").read_text().splitlines()) == finished
    assert _cli.main(_slow_args(tiny_model, images, out) + ["--resume"]) == 0
    reference = tmp_path / "reference"
    assert _cli.main(_slow_args(tiny_model, images, reference)) == 0
    assert _raw_files(out) == _raw_files(reference)


def test_info_sample_lists_the_largest_outputs(capsys, keras, tmp_path):
    """30 outputs of a linear model: the 20 with the largest gradient, largest first."""
    rng = np.random.default_rng(3)
    kernel = (rng.normal(size=(4, 30)) * np.linspace(0.1, 3.0, 30)).astype("float32")
    inp = keras.Input((4,))
    dense = keras.layers.Dense(30, use_bias=False)
    model = keras.Model(inp, dense(inp))
    dense.set_weights([kernel])
    model.save(tmp_path / "wide.keras")
    x = np.ones((1, 4), np.float32)
    np.save(tmp_path / "x.npy", x)
    code, out, err = run(capsys, "info", tmp_path / "wide.keras", "--sample", tmp_path / "x.npy")
    assert code == 0, err
    l2 = np.linalg.norm(kernel, axis=0)
    expected = np.argsort(-l2, kind="stable")[:20]
    listed = [int(m.group(1)) for m in re.finditer(r"^\s+(\d+)  value ", out, re.M)]
    assert listed == expected.tolist()
    assert "the 20 of 30 outputs with the largest gradient (L2)" in out and "... 10 more" in out
    y = x @ kernel
    k = int(expected[0])
    assert (
        f"{k:>4}  value {y[0, k]:.4g}  L1 {np.abs(kernel[:, k]).sum():.4g}  L2 {l2[k]:.4g}" in out
    )


def test_info_sample_shows_progress_while_it_computes(capsys, monkeypatch, keras, tmp_path):
    """A convolutional model with 100 outputs (the engine's reverse loop, 32 outputs per block):
    the progress line moves with each block (drawn on a terminal; counted here)."""
    from augnet import _progress

    inp = keras.Input((8, 8, 1))
    h = keras.layers.Flatten()(keras.layers.Conv2D(2, 3, activation="tanh")(inp))
    keras.Model(inp, keras.layers.Dense(100)(h)).save(tmp_path / "hundred.keras")
    np.save(tmp_path / "x.npy", np.ones((1, 8, 8, 1), np.float32))
    updates = []
    real = _progress.Progress.update

    def spy(self, n=1):
        updates.append((self.done + n, self.total))
        return real(self, n)

    monkeypatch.setattr(_progress.Progress, "update", spy)
    code, out, err = run(capsys, "info", tmp_path / "hundred.keras", "--sample", tmp_path / "x.npy")
    assert code == 0, err
    assert len(updates) >= 2 and updates[-1] == (100, 100)  # several steps, not one at the end
    assert "the 20 of 100 outputs with the largest gradient" in out
