"""augnet.ray: the Ray Data class JacobianBatch, against return_jacobian, element by element.

The class is first called directly on dicts of arrays (no Ray), then in Ray Data pipelines on a
local one-node cluster shared by the tests (tests/ray_fixtures.py): on ``from_numpy`` and
``read_images`` data sets, and with an actor killed in the middle of a batch. One test runs on
a cluster of separate node processes. Without Ray those tests are skipped.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from ray_fixtures import _ray_session, ray_cluster, ray_local  # noqa: F401  (fixtures)

from augnet.ray import RESULT_COLUMNS, JacobianBatch

ROOT = Path(__file__).resolve().parent.parent
TOL = {"rtol": 1e-5, "atol": 1e-6}


def _env():
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(ROOT)}


# --------------------------------------------------------------------------------------------
# Import cost: neither `augnet --help` nor `import augnet.ray` imports Ray or a framework
# --------------------------------------------------------------------------------------------


def test_help_and_imports_do_not_import_ray_or_a_framework():
    code = (
        "import sys, contextlib, io\n"
        "import augnet, augnet.ray, augnet._html, augnet._cli\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "    augnet._cli.main(['--help'])\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "    augnet._cli.main(['jacobian', '--help'])\n"
        "augnet.ray.JacobianBatch, augnet.ray.map_jacobians\n"
        "heavy = ('ray', 'tensorflow', 'keras', 'jax', 'torch', 'matplotlib', 'pyarrow')\n"
        "print([m for m in heavy if m in sys.modules])\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=_env(), check=True
    )
    assert out.stdout.strip() == "[]", out.stderr


def test_without_ray_the_error_says_how_to_install_it():
    code = (
        "import sys; sys.modules['ray'] = None\n"
        "import augnet.ray\n"
        "try:\n"
        "    augnet.ray.map_jacobians(None, 'model.keras')\n"
        "except ImportError as e:\n"
        "    print(e)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=_env(), check=True
    )
    assert "augnet.ray needs Ray" in out.stdout and 'pip install "augnet[ray]"' in out.stdout


# --------------------------------------------------------------------------------------------
# JacobianBatch called directly
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    """A small CNN (8x8 RGB -> 4 outputs), saved as .keras."""
    import keras

    keras.utils.set_random_seed(1)
    inputs = keras.Input((8, 8, 3))
    h = keras.layers.Conv2D(4, 3, activation="tanh")(inputs)
    h = keras.layers.MaxPooling2D()(h)
    h = keras.layers.Flatten()(h)
    outputs = keras.layers.Dense(4)(h)
    path = tmp_path_factory.mktemp("model") / "cnn.keras"
    keras.Model(inputs, outputs).save(path)
    return path


@pytest.fixture(scope="module")
def reference(model_file):
    import augnet

    return augnet.load_model(model_file)


def images(n=6, seed=0, size=8):
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


@pytest.mark.parametrize(
    "selection", [{}, {"outputs": [3, 1]}, {"top_k": 2}], ids=["all", "outputs", "top_k"]
)
def test_direct_call_equals_return_jacobian(model_file, reference, selection):
    x = images().astype(np.float32) / 255
    f = JacobianBatch(model_file, column="x", strategy="loop", **selection)
    out = f({"x": x, "id": np.arange(6)})
    assert set(out) == {"x", "id", "jacobian", "outputs", "output_values", "predictions"}
    np.testing.assert_array_equal(out["id"], np.arange(6))
    ref = reference.return_jacobian(x, strategy="loop", **selection)
    preds = np.asarray(reference(x)).reshape(6, -1)
    if "top_k" in selection:
        jac, idx = np.asarray(ref.jacobian), np.asarray(ref.indices)
        np.testing.assert_allclose(out["output_values"], np.asarray(ref.values), **TOL)
    elif "outputs" in selection:
        jac, idx = np.asarray(ref), np.tile([3, 1], (6, 1))
    else:  # all outputs, flattened: (b, 4, ...)
        jac, idx = np.asarray(ref).reshape(6, 4, 8, 8, 3), np.tile(np.arange(4), (6, 1))
    assert out["jacobian"].dtype == np.float32 and out["outputs"].dtype == np.int64
    np.testing.assert_allclose(out["jacobian"], jac, **TOL)
    np.testing.assert_array_equal(out["outputs"], idx)
    np.testing.assert_allclose(out["predictions"], preds, **TOL)
    np.testing.assert_allclose(out["output_values"], np.take_along_axis(preds, idx, 1), **TOL)


def test_rows_are_independent_of_their_batch(model_file):
    """The Jacobian of a row does not depend on the other rows of its batch."""
    x = images(8).astype(np.float32) / 255
    f = JacobianBatch(model_file, column="x", top_k=2, strategy="loop", keep_columns=False)
    whole = f({"x": x})
    parts = [f({"x": x[i : i + 3]}) for i in range(0, 8, 3)]
    for name in ("jacobian", "outputs", "predictions"):
        np.testing.assert_allclose(
            whole[name], np.concatenate([p[name] for p in parts]), rtol=1e-6, atol=1e-7
        )


def test_preprocess_and_pixels(model_file, reference):
    from augnet._imageio import preprocess_pixels

    pixels = images()
    for name in ("unit", "minus1_1", "imagenet_torch"):
        f = JacobianBatch(model_file, preprocess=name, outputs=[0], strategy="loop")
        out = f({"image": pixels})
        x = preprocess_pixels(pixels, name)
        np.testing.assert_allclose(
            out["jacobian"], np.asarray(reference.return_jacobian(x, outputs=[0])), **TOL
        )
        np.testing.assert_array_equal(out["image"], pixels)  # the input column is kept as is
    f = JacobianBatch(model_file, preprocess=lambda x: x / 255.0, outputs=[0], strategy="loop")
    x = pixels.astype(np.float32) / 255
    np.testing.assert_allclose(
        f({"image": pixels})["jacobian"],
        np.asarray(reference.return_jacobian(x, outputs=[0])),
        **TOL,
    )


def test_grayscale_rows_get_their_channel_axis(tmp_path):
    import keras

    import augnet

    inputs = keras.Input((6, 6, 1))
    outputs = keras.layers.Dense(2)(keras.layers.Flatten()(inputs))
    path = tmp_path / "gray.keras"
    keras.Model(inputs, outputs).save(path)
    x = np.random.default_rng(2).uniform(size=(3, 6, 6)).astype(np.float32)
    out = JacobianBatch(path)({"image": x})  # as read_images(mode="L") gives them
    ref = augnet.load_model(path).return_jacobian(x[..., None])
    np.testing.assert_allclose(out["jacobian"], np.asarray(ref), **TOL)


def test_render_equals_render_saliency(model_file):
    import augnet

    x = images(2).astype(np.float32) / 255
    out = JacobianBatch(model_file, column="x", top_k=2, render="abs")({"x": x})
    assert out["saliency"].shape == (2, 2, 8, 8, 3) and out["saliency"].dtype == np.uint8
    for i in range(2):
        for j in range(2):
            np.testing.assert_array_equal(
                out["saliency"][i, j], augnet.render_saliency(out["jacobian"][i, j], mode="abs")
            )


def test_model_from_a_factory(model_file, reference):
    import augnet

    x = images(2).astype(np.float32) / 255
    out = JacobianBatch(lambda: augnet.load_model(model_file), column="x", outputs=[2])({"x": x})
    np.testing.assert_allclose(
        out["jacobian"], np.asarray(reference.return_jacobian(x, outputs=[2])), **TOL
    )


def test_keep_columns(model_file):
    x = images(2).astype(np.float32) / 255
    batch = {"x": x, "path": np.array(["a.png", "b.png"]), "label": np.array([1, 2])}
    out = JacobianBatch(model_file, column="x", outputs=[0], keep_columns=["path"])(batch)
    assert set(out) == {"path", *RESULT_COLUMNS} - {"saliency"}
    out = JacobianBatch(model_file, column="x", outputs=[0], keep_columns=False)(batch)
    assert "x" not in out and "path" not in out


@pytest.mark.parametrize(
    ("kwargs", "batch", "error", "match"),
    [
        ({}, {"img": np.zeros((1, 8, 8, 3))}, KeyError, r"no column 'image'.*\['img'\]"),
        ({}, {"image": np.zeros((1, 8, 9, 3))}, ValueError, r"\(8, 9, 3\).*\(8, 8, 3\)"),
        ({}, {"image": np.zeros((2, 8, 8))}, ValueError, r"rows of shape \(8, 8\)"),
        (
            {},
            {"image": np.array([np.zeros((8, 8, 3)), np.zeros((9, 9, 3))], dtype=object)},
            ValueError,
            "different shapes.*read_images",
        ),
        (
            {"column": "x"},
            {"x": np.zeros((1, 8, 8, 3)), "jacobian": np.zeros(1)},
            ValueError,
            "'jacobian' has the name of a result column",
        ),
    ],
)
def test_bad_batches_say_what_and_how(model_file, kwargs, batch, error, match):
    f = JacobianBatch(model_file, outputs=[0], **kwargs)
    with pytest.raises(error, match=match):
        f(batch)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"outputs": [0], "top_k": 2}, ValueError, "not both"),
        ({"render": "pretty"}, ValueError, "render"),
        ({"preprocess": "imagenet"}, ValueError, "preprocess.*unit"),
        ({"preprocess": 3}, TypeError, "preprocess"),
        ({"column": 0}, TypeError, "column"),
        ({"threads": 0}, ValueError, "threads"),
    ],
)
def test_bad_arguments(model_file, kwargs, error, match):
    with pytest.raises(error, match=match):
        JacobianBatch(model_file, **kwargs)


def test_bad_models(tmp_path):
    import keras

    with pytest.raises(FileNotFoundError, match="No model"):
        JacobianBatch(tmp_path / "missing.keras")
    with pytest.raises(TypeError, match="model"):
        JacobianBatch(42)
    a, b = keras.Input((3,)), keras.Input((3,))
    two = keras.Model([a, b], keras.layers.Dense(1)(keras.layers.Concatenate()([a, b])))
    with pytest.raises(ValueError, match="one input and one output.*2 inputs"):
        JacobianBatch(two)


# --------------------------------------------------------------------------------------------
# In Ray Data pipelines (a local cluster shared by these tests)
# --------------------------------------------------------------------------------------------


def _by_input(rows, key):
    return {bytes(np.ascontiguousarray(r[key]).data): r for r in rows}


@pytest.mark.usefixtures("ray_local")
def test_from_numpy_pipeline_equals_return_jacobian(model_file, reference):
    import ray

    import augnet.ray

    x = np.random.default_rng(3).uniform(size=(20, 8, 8, 3)).astype(np.float32)
    # one column, "data"; four blocks for the two actors (repartition() would need a CPU that
    # the two actors hold on this two-CPU cluster, and wait for it forever)
    ds = ray.data.from_numpy(np.array_split(x, 4))
    ds = augnet.ray.map_jacobians(
        ds, str(model_file), column="data", top_k=2, strategy="loop", concurrency=2, batch_size=6
    )
    rows = ds.take_all()
    assert len(rows) == 20
    ref = reference.return_jacobian(x, top_k=2, strategy="loop")
    got = _by_input(rows, "data")
    for i in range(20):  # Ray Data does not keep the order: match rows by their input
        row = got[bytes(x[i].data)]
        np.testing.assert_allclose(row["jacobian"], np.asarray(ref.jacobian)[i], **TOL)
        np.testing.assert_array_equal(row["outputs"], np.asarray(ref.indices)[i])
        np.testing.assert_allclose(row["output_values"], np.asarray(ref.values)[i], **TOL)


@pytest.mark.usefixtures("ray_local")
def test_read_images_pipeline_equals_return_jacobian(model_file, reference, tmp_path):
    import ray
    from PIL import Image

    folder = tmp_path / "photos"
    folder.mkdir()
    pixels = images(7, seed=4)
    for i, p in enumerate(pixels):
        Image.fromarray(p).save(folder / f"photo_{i}.png")
    ds = ray.data.read_images(str(folder), include_paths=True, mode="RGB")
    ds = ds.map_batches(
        JacobianBatch,
        fn_constructor_kwargs={
            "model": str(model_file),
            "outputs": [1, 3],
            "preprocess": "unit",
            "strategy": "loop",
            "keep_columns": ["path"],
        },
        concurrency=1,
        batch_size=4,
    )
    rows = ds.take_all()
    assert sorted(Path(r["path"]).name for r in rows) == [f"photo_{i}.png" for i in range(7)]
    x = pixels.astype(np.float32) / 255
    ref = np.asarray(reference.return_jacobian(x, outputs=[1, 3], strategy="loop"))
    preds = np.asarray(reference(x))
    for r in rows:
        i = int(Path(r["path"]).stem.split("_")[1])
        np.testing.assert_allclose(r["jacobian"], ref[i], **TOL)
        np.testing.assert_allclose(r["predictions"], preds[i], **TOL)


@pytest.mark.usefixtures("ray_local")
def test_actor_killed_mid_batch_is_restarted_and_nothing_is_lost(model_file, reference, tmp_path):
    import ray

    class DiesOnce(JacobianBatch):
        """Kills its own actor process (SIGKILL, as the OOM killer would) in the middle of its
        second batch, once per run: the marker file says it happened. (Defined here so that
        Ray pickles it by value: workers cannot import the test module.)"""

        def __init__(self, *, marker: str, **kwargs):
            super().__init__(**kwargs)
            self.marker = Path(marker)
            self.calls = 0

        def __call__(self, batch):
            self.calls += 1
            out = super().__call__(batch)
            if self.calls == 2 and not self.marker.exists():
                self.marker.write_text(json.dumps({"pid": os.getpid()}))
                os.kill(os.getpid(), signal.SIGKILL)
            return out

    x = np.random.default_rng(5).uniform(size=(24, 8, 8, 3)).astype(np.float32)
    marker = tmp_path / "killed.json"
    ds = ray.data.from_numpy(np.array_split(x, 6)).map_batches(
        DiesOnce,
        fn_constructor_kwargs={
            "marker": str(marker),
            "model": str(model_file),
            "column": "data",
            "top_k": 1,
            "strategy": "loop",
        },
        concurrency=1,
        batch_size=4,
        max_restarts=2,
        max_task_retries=2,
    )
    rows = ds.take_all()
    assert marker.exists()  # an actor did die mid-run
    assert len(rows) == 24  # nothing lost, nothing duplicated
    got = _by_input(rows, "data")
    assert len(got) == 24
    ref = reference.return_jacobian(x, top_k=1, strategy="loop")
    for i in range(24):
        np.testing.assert_allclose(got[bytes(x[i].data)]["jacobian"], ref.jacobian[i], **TOL)


# --------------------------------------------------------------------------------------------
# On a cluster of separate node processes
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.usefixtures("ray_cluster")
def test_pipeline_on_two_worker_nodes(model_file, reference):
    import ray

    x = np.random.default_rng(6).uniform(size=(16, 8, 8, 3)).astype(np.float32)

    class WhereAmI(JacobianBatch):
        def __call__(self, batch):
            out = super().__call__(batch)
            out["node"] = np.array([ray.get_runtime_context().get_node_id()] * len(batch["data"]))
            return out

    ds = ray.data.from_numpy(np.array_split(x, 4)).map_batches(
        WhereAmI,
        fn_constructor_kwargs={"model": str(model_file), "column": "data", "strategy": "loop"},
        concurrency=2,
        batch_size=2,
        num_cpus=1,
    )
    rows = ds.take_all()
    workers = {n["NodeID"] for n in ray.nodes() if n["Alive"] and "node_0" in n["Resources"]}
    workers |= {n["NodeID"] for n in ray.nodes() if n["Alive"] and "node_1" in n["Resources"]}
    assert len(workers) == 2
    # computed on the worker nodes (the head has no CPU); whether the second actor got a batch
    # before the first finished them all depends on timing
    assert {r["node"] for r in rows} <= workers
    ref = np.asarray(reference.return_jacobian(x, strategy="loop")).reshape(16, 4, 8, 8, 3)
    got = _by_input(rows, "data")
    for i in range(16):
        np.testing.assert_allclose(got[bytes(x[i].data)]["jacobian"], ref[i], **TOL)
