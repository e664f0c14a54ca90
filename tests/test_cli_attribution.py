"""Attribution methods on the command line (augnet/_cli_attribution.py, _compute_attribution.py):
``augnet jacobian --method``, ``augnet compare``, ``augnet evaluate``.

Every number the command line writes is checked against the library's function called on the
same inputs (the library's own tests check the methods against independent references); every
option has a happy path and a one-line error (exit 2).
"""

from __future__ import annotations

import inspect
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_one_line_error
from conftest import run_cli as run
from PIL import Image

from augnet import _cli, _cli_attribution, _imageio, _runner, _store

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (16, 16, 1)


# ----------------------------------------------------------------------------------------------
# fixtures: a tiny CNN, a dense model, images
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """``cnn``: 16x16x1 -> Conv2D(tanh, "conv") -> Flatten -> Dense(3); ``dense``: no conv."""
    import keras

    folder = tmp_path_factory.mktemp("models")
    keras.utils.set_random_seed(0)
    inp = keras.Input(SHAPE)
    h = keras.layers.Conv2D(2, 3, padding="same", activation="tanh", name="conv")(inp)
    keras.Model(inp, keras.layers.Dense(3)(keras.layers.Flatten()(h))).save(folder / "cnn.keras")
    inp = keras.Input(SHAPE)
    out = keras.layers.Dense(3, activation="tanh")(keras.layers.Flatten()(inp))
    keras.Model(inp, out).save(folder / "dense.keras")
    return {"cnn": folder / "cnn.keras", "dense": folder / "dense.keras"}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(1)
    for i in range(5):
        shape = (20, 24, 3) if i % 3 == 0 else (16, 16)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(folder / f"img{i}.png")
    return folder


@pytest.fixture(scope="module")
def inputs(images):
    """The images as the runner reads them: ``(5, 16, 16, 1)``."""
    items = _imageio.expand_inputs([images])
    spec = _imageio.ImageSpec.from_input_shape(SHAPE)
    x, _ = _imageio.load_batch(items, SHAPE, spec)
    return x


@pytest.fixture(scope="module")
def cnn(models):
    import augnet

    return augnet.load_model(models["cnn"])


def _maps(out: Path) -> np.ndarray:
    return _store.load_results(out).to_array()


def _summary(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "summary.jsonl").read_text().splitlines()]


def _settings(out: Path) -> dict:
    return json.loads((out / "run.json").read_text())["settings"]


# ----------------------------------------------------------------------------------------------
# The names and defaults agree with the library
# ----------------------------------------------------------------------------------------------


def test_names_and_defaults_agree_with_the_library():
    import importlib

    from augnet import _attribution

    ig = importlib.import_module("augnet._attribution.integrated_gradients")
    occ = importlib.import_module("augnet._attribution.occlusion")

    assert _cli_attribution.METHODS == tuple(_attribution.METHODS)
    assert _cli_attribution.ALIASES == _attribution.ALIASES
    assert _cli_attribution.NONNEGATIVE == _attribution.NONNEGATIVE
    assert _cli_attribution.RULES == ig.RULES
    assert _cli_attribution.RULE_ALIASES == ig._ALIASES
    assert _cli_attribution.AGGREGATES == occ.AGGREGATES
    assert set(_cli_attribution.DEFAULTS) == set(_attribution.METHODS)
    for method, defaults in _cli_attribution.DEFAULTS.items():
        params = inspect.signature(_attribution.METHODS[method]).parameters
        for kwarg, value in defaults.items():
            default = params[kwarg].default
            if kwarg == "n_samples":  # None in the signature: 50
                from augnet._attribution.smoothgrad import DEFAULT_SAMPLES

                default = DEFAULT_SAMPLES
            if kwarg == "baseline" and method == "integrated_gradients":
                default = "zeros"  # None: zeros
            if kwarg == "seed":
                assert value == 0 and default is None  # the command line is reproducible
                continue
            assert value == default, (method, kwarg)
    for option in _cli_attribution.OPTIONS:
        for method in option.methods:
            assert option.kwarg in inspect.signature(_attribution.METHODS[method]).parameters


def test_help_lists_the_options_without_tensorflow():
    code = (
        "import sys, augnet._cli\n"
        "p = augnet._cli.build_parser()\n"
        "heavy = [m for m in ('tensorflow', 'keras', 'matplotlib') if m in sys.modules]\n"
        "print(heavy)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.stdout.strip() == "[]", done.stderr
    for argv, flags in [
        (["jacobian", "--help"], ["--method", "--samples", "--steps", "--layer", "--window"]),
        (["compare", "--help"], ["--methods", "--out", "--no-metrics", "--curve-steps"]),
        (["evaluate", "--help"], ["--methods", "--metrics", "--subsets", "--top-k"]),
    ]:
        start = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "augnet", *argv], capture_output=True, text=True, cwd=ROOT
        )
        assert done.returncode == 0, done.stderr
        assert time.perf_counter() - start < 3.0
        for flag in flags:
            assert flag in done.stdout, (argv, flag)


# ----------------------------------------------------------------------------------------------
# augnet jacobian --method: every method and option, against the library
# ----------------------------------------------------------------------------------------------


CASES = [
    ("gradient_x_input", [], {}),
    ("saliency", [], {}),  # an alias of gradient: the Jacobian itself
    ("smoothgrad", ["--samples", "5", "--noise-level", "0.2", "--seed", "3"], {}),
    ("squaregrad", ["--samples", "4"], {}),
    ("vargrad", ["--samples", "4", "--seed", "1"], {}),
    ("ig", ["--steps", "6", "--rule", "trapezoid", "--baseline", "0.5"], {}),
    ("integrated_gradients", ["--steps", "5", "--baseline", "blur"], {}),
    ("integrated_gradients", ["--rule", "left", "--steps", "3"], {}),
    ("gradcam", [], {}),
    ("gradcam++", ["--layer", "conv"], {}),
    ("occlusion", ["--window", "4", "--stride", "2", "--aggregate", "sum"], {}),
    ("occlusion", ["--window", "4,8", "--baseline", "0.5"], {}),
    ("occlusion", ["--window", "8", "--baseline", "blur"], {}),
]


def _library(model, x, method, argv):
    """The library's maps for ``--method method argv`` (what the command line must write)."""
    import augnet
    from augnet._compute_attribution import library_options

    args = _cli.build_parser().parse_args(["jacobian", "m", "i", "--method", method, *argv])
    name = args.method
    if name == "gradient":
        return augnet.gradient(model, x, outputs=[0, 1, 2]), None
    opts = _cli_attribution.method_options(args, [name], how="--method")
    opts = library_options(opts, x)[name]
    result = augnet.attribute(model, x, method=name, outputs=[0, 1, 2], **opts)
    return np.asarray(getattr(result, "attributions", result)), result


@pytest.mark.parametrize("method, argv, _", CASES, ids=[f"{c[0]} {' '.join(c[1])}" for c in CASES])
def test_every_method_and_option_writes_the_librarys_maps(
    capsys, models, images, inputs, cnn, tmp_path, method, argv, _
):
    out = tmp_path / "out"
    code, _out, err = run(
        capsys,
        "jacobian",
        models["cnn"],
        images,
        "--out",
        out,
        "--format",
        "npy",
        "--quiet",
        "--method",
        method,
        *argv,
    )
    assert code == 0, err
    expected, result = _library(cnn, inputs, method, argv)
    np.testing.assert_allclose(_maps(out), expected, rtol=1e-5, atol=1e-8)
    settings, summary = _settings(out), _summary(out)
    canonical = _cli_attribution.parse_method(method)
    if canonical == "gradient":  # the plain Jacobian: nothing about a method
        assert "method" not in settings and "method" not in summary[0]
        return
    assert settings["method"] == canonical
    assert all(line["method"] == canonical for line in summary)
    assert settings["mode"] == ("abs" if canonical in _cli_attribution.NONNEGATIVE else "signed")
    if canonical == "integrated_gradients":
        delta = np.array([line["delta"] for line in summary])
        np.testing.assert_allclose(delta, result.delta, rtol=1e-5, atol=1e-7)
    if canonical.startswith("gradcam"):
        assert settings["method_options"]["layer"] == "conv"
        assert all(line["layer"] == "conv" for line in summary)


def test_method_pictures_say_what_they_show(capsys, models, images, tmp_path):
    out = tmp_path / "out"
    code, _, err = run(
        capsys,
        "jacobian",
        models["cnn"],
        images / "img1.png",
        "--out",
        out,
        "--quiet",
        "--method",
        "smoothgrad",
        "--samples",
        "3",
    )
    assert code == 0, err
    with Image.open(out / "img1" / "output_00.png") as png:
        assert png.text["augnet:method"] == "smoothgrad"
    files = _summary(out)[0]["files"]
    assert "img1/contact_sheet.png" in files
    from augnet import _compute, _report

    seen = {}
    real = _report.build_contact_sheet

    def spy(**kwargs):
        seen.update(kwargs)
        return real(**kwargs)

    try:
        _report.build_contact_sheet = spy
        config = _runner.BatchConfig(
            input_shape=SHAPE,
            spec=None,
            outputs=(0,),
            top_k=None,
            k=1,
            digits=2,
            strategy="loop",
            max_memory=None,
            formats=("png",),
            contact_sheet=True,
            mode="signed",
            cmap=None,
            percentile=99.0,
            reduce="maxabs",
            overlay=False,
            alpha=0.8,
            scale="shared",
            colorbar=True,
            method="integrated_gradients",
            method_options=(("baseline", "zeros"), ("rule", "gausslegendre"), ("steps", 7)),
        )
        item = _imageio.InputItem.at(images / "img1.png", name="img1")
        _compute.render_input(item, None, np.ones((1, *SHAPE)), [0], [0.5], config)
    finally:
        _report.build_contact_sheet = real
    assert seen["title"] == "img1 · integrated gradients (7 steps, gausslegendre, baseline zeros)"
    assert "x_0" in seen["quantity"]


def test_noise_does_not_depend_on_the_batch(capsys, models, images, tmp_path):
    """An input's SmoothGrad is the same whichever inputs share its batch."""
    outs = []
    for batch_size in (1, 2, 5):
        out = tmp_path / f"b{batch_size}"
        argv = ["jacobian", models["cnn"], images, "--out", out, "--format", "npy", "--quiet"]
        argv += ["--batch-size", batch_size, "--method", "smoothgrad", "--samples", "4"]
        assert run(capsys, *argv)[0] == 0
        outs.append(_maps(out))
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(outs[0], outs[2], rtol=1e-6, atol=1e-9)


def _job(models, images, out, *extra):
    return [
        "jacobian",
        models["cnn"],
        images,
        "--out",
        out,
        "--format",
        "png,npy",
        "--no-contact-sheet",
        "--batch-size",
        2,
        "--quiet",
        "--method",
        "smoothgrad",
        "--samples",
        4,
        *extra,
    ]


def _raw_files(out: Path) -> dict[str, bytes]:
    return {
        p.relative_to(out).as_posix(): p.read_bytes()
        for p in sorted(out.rglob("*"))
        if p.is_file() and p.name != "run.json"
    }


def test_resume_is_byte_identical_and_refuses_another_method(
    capsys, monkeypatch, models, images, tmp_path
):
    out = tmp_path / "out"
    real_commit = _store.RunStore.commit
    commits = []

    def commit_then_interrupt(self, *args, **kwargs):
        record = real_commit(self, *args, **kwargs)
        commits.append(record)
        if len(commits) == 1:
            raise KeyboardInterrupt  # Ctrl-C right after the 1st batch
        return record

    monkeypatch.setattr(_store.RunStore, "commit", commit_then_interrupt)
    code, _, err = run(capsys, *_job(models, images, out))
    assert code == 130 and "--resume" in err
    monkeypatch.undo()
    assert len(_store.load_results(out)) == 2
    # another method, or other options of the method, are refused
    base = _job(models, images, out)[:-4]  # without --method smoothgrad --samples 4
    code, _, err = run(capsys, *base, "--method", "ig", "--resume")
    assert_one_line_error(
        code, err, r"cannot resume .*method: 'smoothgrad' -> 'integrated_gradients'"
    )
    code, _, err = run(capsys, *base, "--method", "smoothgrad", "--samples", "5", "--resume")
    assert_one_line_error(code, err, r"cannot resume .*method_options: .*'n_samples': 4")
    code, _, err = run(capsys, *base, "--resume")  # no --method: the Jacobian
    assert_one_line_error(code, err, r"cannot resume .*method: 'smoothgrad' -> None")
    code, _, err = run(capsys, *_job(models, images, out, "--resume"))
    assert code == 0, err
    reference = tmp_path / "undisturbed" / "out"  # (the page's title is the folder's name)
    assert run(capsys, *_job(models, images, reference))[0] == 0
    assert _raw_files(out) == _raw_files(reference)


# ----------------------------------------------------------------------------------------------
# Errors: one line, exit 2, nothing written
# ----------------------------------------------------------------------------------------------


BAD_VALUES = [
    (["--method", "lime"], r"argument --method: expected one of gradient, .*received 'lime'"),
    (["--method", "smoothgrad", "--samples", "0"], r"--samples: expected an integer >= 1"),
    (["--method", "smoothgrad", "--samples", "x"], r"--samples: expected an integer >= 1"),
    (["--method", "smoothgrad", "--noise-level", "-1"], r"--noise-level: expected a finite"),
    (["--method", "smoothgrad", "--noise-level", "nan"], r"--noise-level: expected a finite"),
    (["--method", "vargrad", "--seed", "-2"], r"--seed: expected an integer >= 0"),
    (["--method", "ig", "--steps", "0"], r"--steps: expected an integer >= 1"),
    (["--method", "ig", "--rule", "simpson"], r"--rule: expected one of riemann_left"),
    (["--method", "ig", "--baseline", "noise"], r"--baseline: expected zeros, blur or a num"),
    (["--method", "ig", "--baseline", "inf"], r"--baseline: expected zeros, blur or a num"),
    (["--method", "occlusion", "--window", "0"], r"--window: expected a positive integer"),
    (["--method", "occlusion", "--window", "4x"], r"--window: expected a positive integer"),
    (["--method", "occlusion", "--stride", "-1"], r"--stride: expected a positive integer"),
    (["--method", "occlusion", "--aggregate", "max"], r"--aggregate: expected one of mean, sum"),
    (
        ["--method", "smoothgrad", "--steps", "4"],
        r"--steps is an option of --method integ.*"
        r"this run's method is smoothgrad",
    ),
    (
        ["--samples", "4"],
        r"--samples is an option of --method smoothgrad, squaregrad, vargrad; "
        r"pass --method",
    ),
    (["--method", "gradient", "--layer", "conv"], r"--layer is an option of --method gradcam"),
    (["--method", "gradcam", "--baseline", "0"], r"--baseline is an option of --method integ"),
    (["--method", "ig", "--rule", "trapezoid", "--steps", "1"], r"--steps 1: the riemann_trap"),
]


@pytest.mark.parametrize("argv, pattern", BAD_VALUES, ids=[" ".join(a) for a, _ in BAD_VALUES])
def test_option_errors_are_one_line(capsys, models, images, tmp_path, argv, pattern):
    out = tmp_path / "out"
    code, _, err = run(capsys, "jacobian", models["cnn"], images, "--out", out, *argv)
    assert_one_line_error(code, err, pattern)
    assert not out.exists()


MODEL_ERRORS = [
    ("cnn", ["--method", "gradcam", "--layer", "nope"], r"no layer .*'nope'.*--layer|--layer"),
    ("dense", ["--method", "gradcam"], r"has no convolutional layer.*--layer"),
    ("cnn", ["--method", "occlusion", "--window", "32"], r"--window 32 is larger than the inp"),
    (
        "cnn",
        ["--method", "occlusion", "--window", "2,2,2"],
        r"--window 2,2,2: the input .* has 2 "
        r"spatial axes",
    ),
    ("cnn", ["--method", "occlusion", "--stride", "2,2,2"], r"--stride 2,2,2: the input"),
]


@pytest.mark.parametrize(
    "model, argv, pattern", MODEL_ERRORS, ids=[" ".join(a) for _, a, _ in MODEL_ERRORS]
)
def test_errors_found_on_the_model_before_any_work(
    capsys, monkeypatch, models, images, tmp_path, model, argv, pattern
):
    monkeypatch.setattr(_runner, "compute_batch", lambda *a, **k: pytest.fail("computed"))
    out = tmp_path / "out"
    code, _, err = run(capsys, "jacobian", models[model], images, "--out", out, *argv)
    assert_one_line_error(code, err, pattern)
    assert not out.exists()


# ----------------------------------------------------------------------------------------------
# augnet compare
# ----------------------------------------------------------------------------------------------


def test_compare_writes_the_sheet_and_prints_the_aucs(
    capsys, models, images, inputs, cnn, tmp_path
):
    import augnet

    out = tmp_path / "cmp"
    argv = ["compare", models["cnn"], images / "img1.png", "--out", out, "--quiet"]
    argv += ["--methods", "gradient,smoothgrad,ig,gradcam,occlusion", "--top-k", "2"]
    argv += ["--samples", "3", "--steps", "4", "--window", "4", "--curve-steps", "5"]
    code, text, err = run(capsys, *argv)
    assert code == 0, err
    sheet = out / "img1_comparison.png"
    with Image.open(sheet) as png:
        assert png.text["Software"] == "augnet" and png.size[0] > 1000
    lines = text.splitlines()
    assert f"{sheet}" in lines[0] and "outputs" in lines[0]
    x = inputs[1:2]
    top = augnet.gradient(cnn, x, top_k=2).indices
    assert lines[0].startswith(f"comparison of img1.png, outputs {top[0, 0]}, {top[0, 1]}")
    options = {
        "gradient": {},
        "smoothgrad": {"n_samples": 3, "seed": 0},
        "integrated_gradients": {"steps": 4},
        "gradcam": {},
        "occlusion": {"window": 4},
    }
    for method, opts in options.items():
        maps = augnet.attribute(cnn, x, method=method, outputs=top, **opts).attributions
        deletion = augnet.deletion(cnn, x, maps, outputs=top, steps=5).auc.mean()
        insertion = augnet.insertion(cnn, x, maps, outputs=top, steps=5).auc.mean()
        row = next(line for line in lines if line.split() and line.split()[0] == method)
        assert row.split()[1] == f"{deletion:.4g}", (method, row)
        assert row.split()[2] == f"{insertion:.4g}", (method, row)
    assert "layer conv" in next(line for line in lines if "gradcam" in line)
    assert "max |delta|" in next(line for line in lines if "integrated_gradients" in line)
    # Again: refused without --overwrite, before any work; replaced with it.
    code, _, err = run(capsys, *argv)
    assert_one_line_error(code, err, r"img1_comparison.png' already exists; pass --overwrite")
    before = sheet.read_bytes()
    code, text, err = run(capsys, *argv[:-2], "--no-metrics", "--overwrite")
    assert code == 0, err
    assert sheet.read_bytes() != before and "—" in text
    # a file of the user's at that name is never replaced
    sheet.write_bytes(b"the user's")
    code, _, err = run(capsys, *argv, "--overwrite")
    assert_one_line_error(code, err, r"is not a comparison sheet augnet wrote")
    assert sheet.read_bytes() == b"the user's"


def test_compare_takes_the_first_row_of_an_array(capsys, models, tmp_path, inputs):
    np.save(tmp_path / "x.npy", inputs[:2])
    out = tmp_path / "cmp"
    code, text, err = run(
        capsys,
        "compare",
        models["cnn"],
        tmp_path / "x.npy",
        "--out",
        out,
        "--methods",
        "gradient",
        "--outputs",
        "1",
        "--no-metrics",
        "-q",
    )
    assert code == 0, err
    assert [p.name for p in out.iterdir()] == ["x_0_comparison.png"]
    assert "comparison of x.npy[0], outputs 1:" in text


COMPARE_ERRORS = [
    (["--methods", "gradient,lime"], r"argument --methods: expected one of"),
    (["--methods", ","], r"argument --methods: expected method names"),
    (
        ["--methods", "gradient", "--samples", "3"],
        r"--samples is an option of smoothgrad, "
        r"squaregrad, vargrad, which --methods does not list",
    ),
    (["--methods", "gradcam", "--layer", "nope"], r"--layer"),
    (["--outputs", "0,1,2,3"], r"output index 3 is out of range"),
    (["--curve-steps", "1"], r"--curve-steps: expected an integer >= 2"),
]


@pytest.mark.parametrize(
    "argv, pattern", COMPARE_ERRORS, ids=[" ".join(a) for a, _ in COMPARE_ERRORS]
)
def test_compare_errors(capsys, models, images, tmp_path, argv, pattern):
    out = tmp_path / "cmp"
    code, _, err = run(capsys, "compare", models["cnn"], images / "img1.png", "--out", out, *argv)
    assert_one_line_error(code, err, pattern)
    assert not out.exists()


def test_compare_refuses_too_many_outputs(capsys, tmp_path, images):
    import keras

    inp = keras.Input(SHAPE)
    keras.Model(inp, keras.layers.Dense(20)(keras.layers.Flatten()(inp))).save(tmp_path / "m.keras")
    code, _, err = run(
        capsys,
        "compare",
        tmp_path / "m.keras",
        images / "img1.png",
        "--outputs",
        "0-16",
        "--out",
        tmp_path / "cmp",
    )
    assert_one_line_error(code, err, r"shows at most 16 outputs, 17 are selected")
    code, _, err = run(
        capsys,
        "compare",
        tmp_path / "m.keras",
        images / "img1.png",
        "--top-k",
        "17",
        "--out",
        tmp_path / "cmp",
    )
    assert_one_line_error(code, err, r"--top-k 17: a comparison sheet shows at most 16")


# ----------------------------------------------------------------------------------------------
# augnet evaluate
# ----------------------------------------------------------------------------------------------


def test_evaluate_prints_the_metrics_table(capsys, models, images, inputs, cnn):
    import augnet

    argv = ["evaluate", models["cnn"], images, "--methods", "gradient,ig,occlusion", "-q"]
    argv += ["--steps", "4", "--window", "4", "--top-k", "1", "--curve-steps", "6"]
    argv += ["--subsets", "16"]
    code, text, err = run(capsys, *argv)
    assert code == 0, err
    assert text.startswith(f"model: {models['cnn']}; 5 input(s); top 1 output(s)")
    table = augnet.evaluate_attributions(
        cnn,
        inputs,
        methods={"gradient": {}, "integrated_gradients": {"steps": 4}, "occlusion": {"window": 4}},
        top_k=1,
        steps=6,
        n_subsets=16,
    )
    for row in table.rows:
        line = next(x for x in text.splitlines() if x.startswith(row["method"] + " "))
        cells = line.split()
        for i, metric in enumerate(["deletion", "insertion", "mufidelity", "randomization"]):
            assert cells[1 + i] == f"{row[metric]:.3g}", (row["method"], metric, line)
    argv = ["evaluate", models["cnn"], images, "--methods", "gradient", "-q"]
    code, text, err = run(capsys, *argv, "--metrics", "deletion,insertion", "--top-k", "1")
    assert code == 0, err
    header = text.splitlines()[1]
    assert "deletion AUC" in header and "MuFidelity" not in header and "randomised" not in header


EVALUATE_ERRORS = [
    (["--metrics", "accuracy"], r"argument --metrics: expected a comma-separated list of del"),
    (["--subsets", "1"], r"--subsets: expected an integer >= 2"),
    (
        ["--methods", "gradient", "--window", "4"],
        r"--window is an option of occlusion, which "
        r"--methods does not list",
    ),
]


@pytest.mark.parametrize(
    "argv, pattern", EVALUATE_ERRORS, ids=[" ".join(a) for a, _ in EVALUATE_ERRORS]
)
def test_evaluate_errors(capsys, models, images, argv, pattern):
    code, _, err = run(capsys, "evaluate", models["cnn"], images, *argv)
    assert_one_line_error(code, err, pattern)


def test_evaluate_refuses_too_many_inputs(capsys, models, tmp_path):
    np.save(tmp_path / "many.npy", np.zeros((65, *SHAPE), np.float32))
    code, _, err = run(capsys, "evaluate", models["cnn"], tmp_path / "many.npy")
    assert_one_line_error(code, err, r"evaluate takes at most 64 inputs at once, 65 given")


def test_compare_as_a_process(models, images, tmp_path):
    """The installed command end to end (TensorFlow's start-up chatter silenced)."""
    exe = shutil.which("augnet")
    command = [exe] if exe else [sys.executable, "-m", "augnet"]
    out = tmp_path / "cmp"
    done = subprocess.run(
        [
            *command,
            "compare",
            str(models["cnn"]),
            str(images / "img2.png"),
            "--out",
            str(out),
            "--methods",
            "gradient,gradcam",
            "--no-metrics",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert (out / "img2_comparison.png").exists()
    assert done.stderr.strip().splitlines() == ["augnet: running 2 method(s) on img2.png ..."]


def test_a_method_with_logits_maps_the_scores_before_the_softmax(capsys, images, inputs, tmp_path):
    """``--method ... --logits``: the method's maps of the scores before the final softmax, as the
    library gives them for the same network built without it."""
    import keras

    import augnet

    keras.utils.set_random_seed(3)
    inp = keras.Input(SHAPE)
    h = keras.layers.Conv2D(2, 3, padding="same", activation="tanh", name="conv")(inp)
    scores = keras.layers.Dense(3, name="scores")(keras.layers.Flatten()(h))
    plain = keras.Model(inp, scores)
    keras.Model(inp, keras.layers.Softmax()(scores)).save(tmp_path / "soft.keras")
    out = tmp_path / "out"
    argv = ["--out", out, "--format", "npy", "--quiet", "--method", "gradient_x_input"]
    code, _, err = run(capsys, "jacobian", tmp_path / "soft.keras", images, *argv, "--logits")
    assert code == 0, err
    expected = augnet.gradient_x_input(plain, inputs)
    np.testing.assert_allclose(_maps(out), expected, rtol=1e-5, atol=1e-8)
    settings = _settings(out)
    assert settings["logits"] is True and settings["method"] == "gradient_x_input"
    page = (out / "index.html").read_text()
    assert "gradient x input" in page and "--logits" in page
