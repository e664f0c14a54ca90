"""The distributed data-set run (augnet/_ray_run.py): ``augnet jacobian ... --ray [ADDRESS]`` and
``augnet.ray.run_jacobians``, against the one-process run, file by file and byte for byte.

On a cluster of separate node processes (tests/ray_fixtures.py: a head without CPUs and two
one-CPU worker nodes, on 127.0.0.1), shared with tests/test_ray.py's last test: a data-set run of
104 images with 2 workers, the same with a worker process SIGKILLed mid-run, and a driver process
SIGKILLed mid-run then resumed (with and without Ray). One test starts a local cluster through the
command line (``--ray`` alone). The errors are one line each, most of them before Ray starts.

Tiny model (16x16x1 -> 3 outputs) and small batches keep this fast: the time goes into Ray's
workers importing TensorFlow (several seconds each), so the runs are few.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_one_line_error as one_line
from PIL import Image
from ray_fixtures import ENV, _ray_session, free_port, ray_available, ray_cluster  # noqa: F401

from augnet import _cli, _ray_run, _store

ROOT = Path(__file__).resolve().parent.parent
N_IMAGES = 104
BATCH = 8
ARGS = ["--format", "png,npy", "--no-contact-sheet", "--batch-size", str(BATCH), "--quiet"]
ARGS += ["--strategy", "loop"]  # strategies agree to the last bits only: name one to compare


def _env():
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(ROOT)}


def files(out: Path) -> dict[str, bytes]:
    """Every file of a run folder (run.json, the report page and its data included)."""
    return {
        p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()
    }


def assert_same_run(out: Path, reference: Path) -> None:
    """Byte-identical folders, and say where they differ if not."""
    got, want = files(out), files(reference)
    assert sorted(got) == sorted(want)
    differ = [k for k in want if got[k] != want[k]]
    assert not differ, differ[:10]


def main(capsys, *argv) -> tuple[int, str]:
    code = _cli.main([str(a) for a in argv])
    return code, capsys.readouterr().err


# A worker computes with one framework thread (--worker-cpus 1). TensorFlow's CPU kernels may add
# in another order with another number of threads (seen on one machine of this kind: 2 of 13
# batches differing by ~1e-8), so the one-process runs compared with the workers' files run in a
# child process with one thread too, as docs/ray.md tells users to.
ONE_THREAD = {"TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1"}


def one_process(*argv) -> tuple[int, str]:
    """``augnet ARGV`` in a child process with one TensorFlow thread."""
    done = subprocess.run(
        [sys.executable, "-m", "augnet", *(str(a) for a in argv)],
        env={**_env(), **ONE_THREAD},
        capture_output=True,
        text=True,
        timeout=300,
    )
    return done.returncode, done.stderr


# --------------------------------------------------------------------------------------------
# Fixtures: a tiny model, 104 images, the one-process run to compare with
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    import keras

    keras.utils.set_random_seed(0)
    inp = keras.Input((16, 16, 1))
    h = keras.layers.Conv2D(2, 3, padding="same", activation="tanh")(inp)
    out = keras.layers.Dense(3)(keras.layers.Flatten()(h))
    root = tmp_path_factory.mktemp("data")
    model = root / "tiny.keras"
    keras.Model(inp, out).save(model)
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(7)
    for i in range(N_IMAGES):
        shape = (20, 24, 3) if i % 10 == 0 else (16, 16)  # some RGB and resized
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(images / f"im{i}.png")
    return model, images


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """The one-process run. Compared folders are all ``<tmp>/<x>/run``: the same depth below
    the temporary root (run.json keeps the input folder relative to the output folder) and the
    same name (the report page's title)."""
    model, images = data
    out = tmp_path_factory.mktemp("reference") / "a" / "run"
    code, err = one_process("jacobian", model, images, "--out", out, *ARGS)
    assert code == 0, err
    return out


def _records(out: Path) -> int:
    return len(list((out / "batches").glob("*.json"))) if (out / "batches").is_dir() else 0


# --------------------------------------------------------------------------------------------
# Errors, one line each (no cluster needed)
# --------------------------------------------------------------------------------------------


def test_without_ray_the_error_says_how_to_install_it(data, tmp_path):
    model, images = data
    code = (
        "import sys; sys.modules['ray'] = None\n"
        "from augnet._cli import main\n"
        f"rc = main(['jacobian', {str(model)!r}, {str(images)!r}, '--out', "
        f"{str(tmp_path / 'out')!r}, '--ray'])\n"
        "print(rc, [m for m in ('tensorflow', 'keras') if m in sys.modules])\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=120
    )
    assert done.stdout.split() == ["2", "[]"], done.stderr  # and before loading TensorFlow
    one_line(
        2, done.stderr, r"--ray needs Ray, which is not installed.*pip install \"augnet\[ray\]\""
    )
    assert not (tmp_path / "out").exists()


def test_an_unreachable_cluster_is_named_at_once(capsys, data, tmp_path):
    model, images = data
    address = f"127.0.0.1:{free_port()}"
    start = time.monotonic()
    code, err = main(capsys, "jacobian", model, images, "--out", tmp_path / "o", "--ray", address)
    one_line(code, err, rf"cannot reach the Ray cluster at {address}: connection refused")
    assert time.monotonic() - start < 10 and not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("extra", "pattern"),
    [
        (
            ["--ray", "--workers", "0"],
            r"argument --workers: expected a positive integer, received '0'",
        ),
        (["--ray", "--workers", "two"], r"argument --workers: expected a positive integer"),
        (["--ray", "--worker-cpus", "0"], r"argument --worker-cpus: expected a positive number"),
        (["--ray", "--worker-gpus", "-1"], r"argument --worker-gpus: expected a number >= 0"),
        (
            ["--ray", "model.keras"],
            r"argument --ray: expected a Ray cluster's address as HOST:PORT",
        ),
        (["--workers", "2"], r"--workers needs --ray"),
        (["--worker-gpus", "1"], r"--worker-gpus needs --ray"),
    ],
)
def test_bad_cluster_options(capsys, data, tmp_path, extra, pattern):
    model, images = data
    code, err = main(capsys, "jacobian", model, images, "--out", tmp_path / "o", *extra)
    one_line(code, err, pattern)
    assert not (tmp_path / "o").exists()


def test_parse_address():
    assert _ray_run.parse_address("10.0.0.5:6379") == "10.0.0.5:6379"
    assert _ray_run.parse_address("auto") == "auto"
    assert _ray_run.parse_address("ray://head:10001") == "ray://head:10001"
    for bad in ("model.keras", "10.0.0.5", "host:port", ":6379", "h:0", "a/b:1"):
        with pytest.raises(ValueError, match="HOST:PORT"):
            _ray_run.parse_address(bad)


def test_cluster_options_are_checked():
    assert _ray_run.Cluster(workers=2, worker_cpus=2.5).threads == 2
    assert _ray_run.Cluster(worker_cpus=0.5).threads == 1
    for bad in ({"workers": 0}, {"workers": 1.5}, {"worker_cpus": 0}, {"worker_gpus": -1}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            _ray_run.Cluster(**bad)


def test_which_failures_mean_a_lost_worker():
    def error(*names):
        return type(
            names[0], tuple(type(n, (Exception,), {}) for n in names[1:]) or (Exception,), {}
        )()

    for lost in ("ActorDiedError", "ActorUnavailableError", "ObjectLostError", "NodeDiedError"):
        assert _ray_run._is_lost(error(lost, "RayActorError")), lost
    assert _ray_run._is_lost(error("ObjectReconstructionFailedError", "ObjectLostError"))
    assert not _ray_run._is_lost(error("RayTaskError(ValueError)", "RayTaskError", "ValueError"))
    assert not _ray_run._is_lost(ValueError("a bad image"))


def test_a_worker_is_plain_python_and_computes_what_the_runner_computes(data, tmp_path):
    """BatchWorker without Ray: the model from packed bytes (the worker's copy removed at once),
    the same result as compute_batch, a model that cannot load reported, not raised."""
    import pickle

    from augnet import _runner, _safeio

    model, images = data
    options = _runner.RunOptions(
        model=str(model),
        inputs=(str(images),),
        out=str(tmp_path / "o"),
        batch_size=4,
        strategy="loop",
        formats=("png", "npy"),
    )
    plan, driver_model = _runner.plan_run(options, load=lambda o: _runner.load_model(o.model))
    plan.close()
    packed = _ray_run.pack_model(model, _safeio.hash_file(model))
    worker = _ray_run.BatchWorker(1, False, 1, {})
    info = worker.load(*packed)
    assert info["ok"] and info["error"] is None and f"pid {os.getpid()}" in info["where"]
    assert info["versions"] == _ray_run.versions()
    batch = _runner.with_payload(plan.todo[1], plan.config)
    result, started, ended, cpu = worker.compute(pickle.loads(pickle.dumps(batch)), plan.config)
    expected = _runner.compute_batch(driver_model, plan.todo[1], plan.config)
    assert ended >= started and cpu > 0
    assert [i.files for i in result.inputs] == [i.files for i in expected.inputs]
    assert [i.summary for i in result.inputs] == [i.summary for i in expected.inputs]
    np.testing.assert_array_equal(result.jacobian, expected.jacobian)
    broken = _ray_run.BatchWorker(2, False, 1, {}).load("broken.keras", b"not a zip", False)
    assert not broken["ok"] and "broken.keras" in broken["error"]
    assert "augnet-worker-" not in broken["error"]  # the worker's temporary path is not shown
    with pytest.raises(_ray_run.ClusterError, match="changed while the run was being planned"):
        _ray_run.pack_model(model, "b2:" + "0" * 32)


def test_a_savedmodel_folder_travels_as_a_tar(tmp_path):
    import io
    import tarfile

    from augnet import _safeio

    folder = tmp_path / "exported"
    (folder / "variables").mkdir(parents=True)
    (folder / "saved_model.pb").write_bytes(b"graph")
    (folder / "variables" / "variables.index").write_bytes(b"index")
    name, blob, is_dir = _ray_run.pack_model(folder, None)
    assert (name, is_dir) == ("exported", True)
    there = tmp_path / "worker"
    there.mkdir()
    unpacked = _ray_run._unpack_model(there, name, blob, is_dir)
    assert _safeio.hash_tree(unpacked) == _safeio.hash_tree(folder)
    evil = io.BytesIO()
    with tarfile.open(fileobj=evil, mode="w:") as tar:
        info = tarfile.TarInfo("../escaped")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    (tmp_path / "w2").mkdir()
    with pytest.raises(_ray_run.ClusterError, match="unexpected entry"):
        _ray_run._unpack_model(tmp_path / "w2", "m", evil.getvalue(), True)
    assert not (tmp_path / "escaped").exists()


# --------------------------------------------------------------------------------------------
# On a cluster of separate node processes
# --------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("ray_cluster")
def test_two_workers_write_what_one_process_writes(data, reference, tmp_path):
    """>= 100 images in 13 batches on 2 workers (one per worker node): every raw Jacobian, every
    summary line, record, picture, thumbnail, run.json and the report page, byte for byte."""
    import ray

    import augnet.ray

    model, images = data
    out = tmp_path / "a" / "run"
    stats = augnet.ray.run_jacobians(
        model,
        images,
        out,
        workers=2,
        formats="png,npy",
        contact_sheet=False,
        batch_size=BATCH,
        strategy="loop",
    )
    assert stats.computed == N_IMAGES and stats.skipped == 0 and stats.interrupted is None
    assert_same_run(out, reference)
    # computed on the two worker nodes (the head has no CPU), committed in batch order
    workers = {n["NodeID"][:8] for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU")}
    assert {w["where"].split("node ")[1].split(",")[0] for w in stats.workers} == workers
    assert len(stats.timing["compute"]) == len(stats.timing["commit"]) == 13
    assert not stats.failures and stats.redone == 0
    summary = [json.loads(line) for line in (out / "summary.jsonl").read_text().splitlines()]
    assert sorted(s["input"] for s in summary) == sorted(f"im{i}.png" for i in range(N_IMAGES))
    results = _store.load_results(out)
    assert len(results) == N_IMAGES and results.jacobian(0).shape == (3, 16, 16, 1)
    # two batches never wrote the same file: each result file is in exactly one batch record
    owner: dict[str, int] = {}
    for record in sorted((out / "batches").glob("*.json")):
        for rel in json.loads(record.read_text())["files"]:
            assert rel not in owner, (rel, owner.get(rel), record.name)
            owner[rel] = int(record.stem)
    written = {k for k in files(out) if "/" in k and not k.startswith(("batches/", "index_files/"))}
    assert set(owner) == written and len(set(owner.values())) == 13


def _busy_workers() -> list[int]:
    """Processes of this test session's cluster running a batch (``ray::BatchWorker.compute``)."""
    token = f"RAY_AUTH_TOKEN_PATH={ENV['RAY_AUTH_TOKEN_PATH']}".encode()
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            title = (proc / "cmdline").read_bytes()
            if b"ray::BatchWorker.compute" in title and token in (proc / "environ").read_bytes():
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


@pytest.mark.usefixtures("ray_cluster")
def test_a_worker_killed_mid_batch_changes_nothing(data, reference, tmp_path):
    """SIGKILL (as the OOM killer does) a worker's process while it computes a batch: its
    batches are redone by the other worker; nothing lost, nothing duplicated, the same bytes."""
    import augnet.ray

    model, images = data
    out = tmp_path / "a" / "run"
    killed: list[int] = []
    done = threading.Event()

    def kill_one():
        while not done.is_set():
            if _records(out) >= 2:
                pids = _busy_workers()
                if pids:
                    os.kill(pids[0], signal.SIGKILL)
                    killed.append(pids[0])
                    return
            time.sleep(0.005)

    killer = threading.Thread(target=kill_one, daemon=True)
    killer.start()
    try:
        stats = augnet.ray.run_jacobians(
            model,
            images,
            out,
            workers=2,
            formats="png,npy",
            contact_sheet=False,
            batch_size=BATCH,
            strategy="loop",
        )
    finally:
        done.set()
        killer.join()
    assert killed, "no worker was busy after two batches: the run ended first"
    assert stats.redone >= 1 and stats.failures, stats.failures
    assert stats.computed == N_IMAGES
    assert_same_run(out, reference)
    lines = (out / "summary.jsonl").read_text().splitlines()
    assert len(lines) == len(set(lines)) == N_IMAGES  # nothing duplicated


def test_driver_killed_mid_run_then_resume_with_and_without_ray(
    ray_cluster,  # noqa: F811
    capsys,
    data,
    reference,
    tmp_path,  # noqa: F811
):
    """The driver (the installed command, on the cluster) SIGKILLed mid-run: no clean-up at all.
    --resume on the cluster, and (on a copy) --resume in one process: identical results."""
    model, images = data
    out = tmp_path / "a" / "run"
    argv = ["jacobian", str(model), str(images), "--out", str(out), *ARGS]
    proc = subprocess.Popen(
        [sys.executable, "-m", "augnet", *argv, "--ray", ray_cluster.address, "--workers", "2"],
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 180
        while _records(out) < 3:
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline
            time.sleep(0.005)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
    assert 3 <= _records(out) < 13  # killed part-way, its finished batches kept
    copy = tmp_path / "b" / "run"
    shutil.copytree(out, copy)

    code, err = main(capsys, *argv, "--resume", "--ray", ray_cluster.address, "--workers", "2")
    assert code == 0, err
    assert_same_run(out, reference)
    code, err = one_process(*[a if a != str(out) else str(copy) for a in argv], "--resume")
    assert code == 0, err
    assert_same_run(copy, reference)
    lines = (out / "summary.jsonl").read_text().splitlines()
    assert len(lines) == len(set(lines)) == N_IMAGES


def test_a_worker_that_cannot_load_the_model_stops_the_run(
    ray_cluster,  # noqa: F811
    capsys,
    data,
    tmp_path,  # noqa: F811
):
    """A custom layer registered in this process only: the driver loads the model, the
    workers cannot. One line names the worker and the cause; nothing is written."""
    import keras

    @keras.saving.register_keras_serializable(package="augnet_test_only")
    class Doubler(keras.layers.Layer):
        def call(self, x):
            return 2.0 * x

    inp = keras.Input((16, 16, 1))
    out_ = keras.layers.Dense(2)(keras.layers.Flatten()(Doubler()(inp)))
    path = tmp_path / "custom.keras"
    keras.Model(inp, out_).save(path)
    _, images = data
    out = tmp_path / "out"
    code, err = main(
        capsys,
        "jacobian",
        path,
        images,
        "--out",
        out,
        "--ray",
        ray_cluster.address,
        "--workers",
        "1",
    )
    one_line(
        code, err, r"worker 1 \(.*node [0-9a-f]{8}, pid \d+\) cannot load the model: .*Doubler"
    )
    assert not out.exists()


@pytest.mark.usefixtures("ray_cluster")
def test_resources_the_cluster_lacks_are_refused(capsys, data, tmp_path):
    model, images = data
    code, err = main(
        capsys,
        "jacobian",
        model,
        images,
        "--out",
        tmp_path / "o",
        "--ray",
        "auto",
        "--worker-gpus",
        "1",
    )
    one_line(
        code,
        err,
        r"has 2 CPU\(s\) and 0 GPU\(s\): not enough for one worker of --worker-cpus 1 --worker-gpus 1",
    )
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------------------------
# --ray alone: a local cluster started by the command (its own process)
# --------------------------------------------------------------------------------------------


def test_command_with_a_local_cluster(data, tmp_path):
    """``augnet jacobian ... --ray --workers 2`` starts a cluster on 127.0.0.1 for the run and
    stops it: the same files as one process, contact sheets and thumbnails included."""
    reason = ray_available()
    if reason:
        pytest.skip(reason)
    model, images = data
    few = tmp_path / "few"
    few.mkdir()
    for i in range(6):
        shutil.copy(images / f"im{i}.png", few / f"im{i}.png")
    args = ["jacobian", str(model), str(few), "--format", "png,npy", "--batch-size", "2", "-q"]
    args += ["--strategy", "loop"]
    out, ref = tmp_path / "a" / "run", tmp_path / "b" / "run"
    done = subprocess.run(
        [sys.executable, "-m", "augnet", *args, "--out", str(out), "--ray", "--workers", "2"],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=300,
    )
    assert done.returncode == 0 and done.stderr == "", done.stderr
    code, err = one_process(*args, "--out", ref)
    assert code == 0, err
    assert_same_run(out, ref)
    assert (out / "im0" / "contact_sheet.png").is_file() and (
        out / "im0" / "thumbnail.png"
    ).is_file()
