"""The data-set runner (augnet._runner): plan / compute / commit / schedule, and the promises of
issue 9 that a run keeps (ownership, relative paths, resume by content, bounded work, pictures).

Tiny models (16x16x1 -> 3 outputs) keep this fast; everything runs in this process.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from augnet import _cli, _colorbar, _compute, _render, _runner, _safeio, _store

keras = pytest.importorskip("keras")


def run(capsys, *argv):
    code = _cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line(code, err, pattern, exit_code=2):
    import re

    lines = err.strip().splitlines()
    assert code == exit_code and len(lines) == 1, err
    assert re.search(pattern, lines[0]), lines[0]
    assert "Traceback" not in err


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    keras.utils.set_random_seed(0)
    inp = keras.Input((16, 16, 1))
    h = keras.layers.Conv2D(2, 3, padding="same", activation="tanh")(inp)
    out = keras.layers.Dense(3)(keras.layers.Flatten()(h))
    path = tmp_path_factory.mktemp("models") / "tiny.keras"
    keras.Model(inp, out).save(path)
    return path


def _make_images(folder: Path, n=7, seed=1):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(folder / f"img{i}.png")
    return folder


@pytest.fixture
def images(tmp_path):
    return _make_images(tmp_path / "images")


def _args(model, inputs, out, *extra, batch_size=2):
    return [
        "jacobian",
        model,
        inputs,
        "--out",
        out,
        "--format",
        "png,npy",
        "--no-contact-sheet",
        "--batch-size",
        batch_size,
        "--quiet",
        "--strategy",
        "loop",
        *extra,
    ]


def _files(out: Path) -> dict[str, bytes]:
    return {
        p.relative_to(out).as_posix(): p.read_bytes()
        for p in sorted(out.rglob("*"))
        if p.is_file() and p.name != "run.json"
    }


def _options(model, inputs, out, **kw):
    base = dict(
        model=str(model),
        inputs=(str(inputs),),
        out=str(out),
        formats=("png", "npy"),
        contact_sheet=False,
        batch_size=2,
        strategy="loop",
    )
    base.update(kw)
    return _runner.RunOptions(**base)


# ----------------------------------------------------------------------------------------------
# One runner, two schedulers: the parts a distributed scheduler uses
# ----------------------------------------------------------------------------------------------


def test_batches_computed_anywhere_in_any_order_give_the_same_files(tiny_model, images, tmp_path):
    """What a Ray scheduler does: plan on the driver, compute batches elsewhere (pickled there and
    back), in any order, some twice, and commit them on the driver inside the runner's shared
    frame (`scheduling`): the folder, its report page included, is byte-identical to the
    one-process run's."""
    model = _runner.load_model(tiny_model)
    serial = tmp_path / "a" / "out"  # same folder name: the page's title is the folder's name
    plan, _ = _runner.plan_run(_options(tiny_model, images, serial), model=model)
    _runner.run_plan(plan, model, quiet=True)

    out = tmp_path / "b" / "out"
    plan, _ = _runner.plan_run(_options(tiny_model, images, out), model=model)
    assert [b.batch_id for b in plan.todo] == [0, 1, 2, 3]
    assert [len(b.items) for b in plan.todo] == [2, 2, 2, 1]
    config = pickle.loads(pickle.dumps(plan.config))
    before = sorted(out.rglob("*"))
    results = []
    for batch in reversed(plan.todo):
        shipped = pickle.loads(pickle.dumps(batch))
        result = _runner.compute_batch(model, shipped, config)
        results.append(pickle.loads(pickle.dumps(result)))
    assert sorted(out.rglob("*")) == before  # computing touches no file of the folder
    with _runner.scheduling(plan, quiet=True) as run:
        assert (out / "index.html").exists()  # the page, before the first batch
        for result in results:
            assert run.commit(result) is True
        assert run.commit(results[1]) is False  # redone: written once
    assert _files(out) == _files(serial)
    assert {"index.html", "index_files/rows-000000.js"} <= set(_files(out))
    assert not (out / _safeio.LOCK_NAME).exists()


def test_a_worker_without_the_files_computes_the_same_batch(tiny_model, images, tmp_path):
    """Inputs shipped with the batch (image bytes, .npy rows) give the same result, fingerprints
    included, as reading the files where the batch is computed."""
    rows = np.random.default_rng(5).normal(size=(3, 16, 16, 1)).astype(np.float64)
    np.save(images / "rows.npy", rows)
    model = _runner.load_model(tiny_model)
    plan, _ = _runner.plan_run(
        _options(tiny_model, images, tmp_path / "out", batch_size=10, contact_sheet=True),
        model=model,
    )
    plan.close()
    (batch,) = plan.todo
    assert sorted(it.key for it in batch.items)[:2] == ["img0.png", "img1.png"]
    assert "rows.npy[2]" in [it.key for it in batch.items]
    from_files = _runner.compute_batch(model, batch, plan.config)
    shipped = pickle.loads(pickle.dumps(_runner.with_payload(batch, plan.config)))
    shutil.move(images, tmp_path / "elsewhere")  # the worker cannot see them
    remote = _runner.compute_batch(model, shipped, plan.config)
    assert [i.fingerprint for i in remote.inputs] == [i.fingerprint for i in from_files.inputs]
    assert [i.summary for i in remote.inputs] == [i.summary for i in from_files.inputs]
    assert [i.files for i in remote.inputs] == [i.files for i in from_files.inputs]
    np.testing.assert_array_equal(remote.jacobian, from_files.jacobian)


def test_on_commit_runs_after_each_batch(tiny_model, images, tmp_path):
    model = _runner.load_model(tiny_model)
    plan, _ = _runner.plan_run(_options(tiny_model, images, tmp_path / "out"), model=model)
    seen = []

    def after(plan, result):
        lines = (plan.out / "summary.jsonl").read_text().splitlines()
        seen.append((result.batch_id, len(lines)))  # the summary already has the batch

    _runner.run_plan(plan, model, quiet=True, on_commit=after)
    assert seen == [(0, 2), (1, 4), (2, 6), (3, 7)]


def _page(out: Path) -> dict:
    """The report page's configuration (what the page's script reads)."""
    import re

    text = (out / "index.html").read_text(encoding="utf-8")
    found = re.search(r'<script type="application/json" id="augnet-config">(.*?)</script>', text)
    return json.loads(found.group(1))


def test_every_run_keeps_its_report_page_up_to_date(tiny_model, images, tmp_path, monkeypatch):
    """index.html before the first batch (a running job can be watched from the start), after
    every committed batch (in step with summary.jsonl) and at the end; each input's own
    thumbnail is its picture on the page, so the page does not depend on the inputs' folder."""
    from augnet import _html

    model = _runner.load_model(tiny_model)
    out = tmp_path / "out"
    plan, _ = _runner.plan_run(_options(tiny_model, images, out), model=model)
    seen = []
    real = _runner.compute_batch

    def spy(model, batch, config, **kwargs):
        if batch.batch_id == 0:
            config_ = _page(out)
            seen.append(("before", config_["chunks"], config_["total"]))
        return real(model, batch, config, **kwargs)

    def after(plan, result):
        lines = (plan.out / "summary.jsonl").read_text().splitlines()
        seen.append((result.batch_id, _page(out)["chunks"], len(lines)))

    monkeypatch.setattr(_runner, "compute_batch", spy)
    _runner.run_plan(plan, model, quiet=True, on_commit=after)
    assert seen == [("before", [], 7), (0, [[2]], 2), (1, [[4]], 4), (2, [[6]], 6), (3, [[7]], 7)]
    assert _page(out)["total"] == 7
    root = json.loads((out / "run.json").read_text())["input_root"]
    for line in (out / "summary.jsonl").read_text().splitlines():
        entry = json.loads(line)
        thumb = _html.index_row(entry, out, root)[9]
        assert thumb == f"{entry['name']}/thumbnail.png" and (out / thumb).is_file()
    state = json.loads((out / "index_files" / "state.json").read_text())
    assert state["summary"] is None  # the finished run's page: no file identity kept


def test_a_page_augnet_did_not_write_is_refused_before_any_work(
    capsys, monkeypatch, tiny_model, images, tmp_path
):
    out = tmp_path / "out"
    assert run(capsys, *_args(tiny_model, images, out))[0] == 0
    (out / "index.html").write_text("<html>the user's own page</html>")
    monkeypatch.setattr(_runner, "compute_batch", lambda *a, **k: pytest.fail("computed"))
    code, _, err = run(capsys, *_args(tiny_model, images, out), "--resume")
    one_line(code, err, r"index.html' exists and was not written by augnet; move it away")
    assert (out / "index.html").read_text() == "<html>the user's own page</html>"
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "index.html").write_text("mine")
    code, _, err = run(capsys, *_args(tiny_model, images, fresh))
    one_line(code, err, r"index.html' already exists and augnet did not write it")
    assert (fresh / "index.html").read_text() == "mine"


def test_the_page_of_a_run_killed_before_its_first_batch_is_not_in_the_way(
    capsys, tiny_model, images, tmp_path
):
    """kill -9 before the first batch leaves augnet's page (and a stale lock): the next run,
    without --resume or --overwrite, starts anyway and writes its own page."""
    from augnet import _html

    out = tmp_path / "out"
    out.mkdir()
    _html.write_index_html(out, total=7)
    (out / _safeio.LOCK_NAME).write_text('{"pid": 999999}')
    assert run(capsys, *_args(tiny_model, images, out))[0] == 0
    assert _page(out)["chunks"] == [[7]]


def test_auto_strategy_is_resolved_once_and_kept(tiny_model, images, tmp_path, monkeypatch):
    model = _runner.load_model(tiny_model)
    plan, _ = _runner.plan_run(
        _options(tiny_model, images, tmp_path / "out", strategy="auto"), model=model
    )
    assert plan.config.strategy is None
    first = _runner.compute_batch(model, plan.todo[0], plan.config)
    assert first.strategy in ("loop", "pfor", "forward", "loop_xla")
    _runner.set_strategy(plan, first.strategy)
    monkeypatch.setattr(
        _compute, "resolve_strategy_for_x", lambda *a, **k: pytest.fail("resolved again")
    )
    second = _runner.compute_batch(model, plan.todo[1], plan.config)
    assert second.strategy == first.strategy
    _runner.commit_batch(plan.store, first)
    plan.close()
    run_json = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run_json["resolved"]["strategy"] == first.strategy


# ----------------------------------------------------------------------------------------------
# Pictures: shared scale with a colour bar in real units, per-map option, overlay on the sheet
# ----------------------------------------------------------------------------------------------


def test_per_output_pngs_share_the_contact_sheets_scale(capsys, tiny_model, images, tmp_path):
    from augnet import _report

    sheets = []
    real = _report.build_contact_sheet

    def spy(**kwargs):
        sheets.append(kwargs)
        return real(**kwargs)

    mp = pytest.MonkeyPatch()
    mp.setattr(_report, "build_contact_sheet", spy)
    try:
        out = tmp_path / "out"
        argv = ["jacobian", tiny_model, images / "img1.png", "--out", out, "--format", "png,npy"]
        code, _, err = run(capsys, *argv, "--overlay", "--quiet")
    finally:
        mp.undo()
    assert code == 0, err
    J = _store.load_results(out).jacobian(0)  # (3, 16, 16, 1)
    reduced = np.stack([_render.reduce_channels(m) for m in J])
    pooled = _render.percentile_scale(reduced)
    assert (
        sheets[0]["shared_scale"] is True and sheets[0]["overlay"] is True
    )  # --overlay: sheet too
    display = sheets[0]["image"]
    for k in range(3):
        with Image.open(out / "img1" / f"output_{k:02d}.png") as png:
            assert png.text["augnet:scaling"] == "shared"
            assert float(png.text["augnet:scale"]) == pytest.approx(pooled, rel=1e-12)
            pixels = np.asarray(png)
        expected = _render.render_saliency(reduced[k], scale=pooled, image=display)
        expected = np.repeat(np.repeat(expected, 16, 0), 16, 1)
        np.testing.assert_array_equal(pixels[:256], expected)
        np.testing.assert_array_equal(pixels[256:], _colorbar.colorbar_strip(256, scale=pooled))

    code, _, err = run(
        capsys, *argv[:-2], "--out", tmp_path / "own", "--per-map-scale", "--no-colorbar", "-q"
    )
    assert code == 0, err
    for k in range(3):
        with Image.open(tmp_path / "own" / "img1" / f"output_{k:02d}.png") as png:
            assert png.size == (256, 256) and png.text["augnet:scaling"] == "per-map"
            assert float(png.text["augnet:scale"]) == pytest.approx(
                _render.percentile_scale(reduced[k]), rel=1e-6
            )


# ----------------------------------------------------------------------------------------------
# Paths relative to --out / the input root; resume by content; index and folder in step
# ----------------------------------------------------------------------------------------------


def test_results_hold_no_absolute_path_and_can_be_moved(capsys, tiny_model, tmp_path):
    images = _make_images(tmp_path / "a" / "images")
    out = tmp_path / "a" / "out"
    assert run(capsys, *_args(tiny_model, images, out))[0] == 0
    for p in out.rglob("*"):
        if p.is_file() and p.suffix in (".json", ".jsonl"):
            assert str(tmp_path) not in p.read_text(), p
    summary = [json.loads(line) for line in (out / "summary.jsonl").read_text().splitlines()]
    assert [s["input"] for s in summary] == [f"img{i}.png" for i in range(7)]
    assert json.loads((out / "run.json").read_text())["input_root"] == "../images"
    # move the whole tree: --resume finds everything done, recomputes nothing
    shutil.move(tmp_path / "a", tmp_path / "b")
    before = _files(tmp_path / "b" / "out")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_runner, "compute_batch", lambda *a, **k: pytest.fail("recomputed"))
        code, _, err = run(
            capsys,
            *_args(tiny_model, tmp_path / "b" / "images", tmp_path / "b" / "out"),
            "--resume",
        )
    assert code == 0, err
    assert _files(tmp_path / "b" / "out") == before


def test_resume_follows_content_and_keeps_index_and_folder_in_step(
    capsys, monkeypatch, tiny_model, images, tmp_path
):
    out = tmp_path / "out"
    assert run(capsys, *_args(tiny_model, images, out))[0] == 0
    computed = []
    real = _runner.compute_batch

    def spy(model, batch, config, **kwargs):
        computed.append([it.name for it in batch.items])
        return real(model, batch, config, **kwargs)

    monkeypatch.setattr(_runner, "compute_batch", spy)
    # changed in place, same size, modification time put back: still recomputed
    target = images / "img3.png"
    st = target.stat()
    pixels = np.asarray(Image.open(target)).copy()
    pixels[0, 0] ^= 0xFF
    Image.fromarray(pixels).save(target)
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert run(capsys, *_args(tiny_model, images, out), "--resume")[0] == 0
    assert computed == [["img2", "img3"]]  # its batch only
    fresh = tmp_path / "fresh" / "out"  # the page's title is the folder's name
    assert run(capsys, *_args(tiny_model, images, fresh))[0] == 0
    assert _files(out) == _files(fresh)  # as if run from scratch

    # a deleted and a renamed input: gone from the summary, the records and the folder
    (images / "img5.png").unlink()
    (images / "img0.png").rename(images / "img9.png")
    computed.clear()
    assert run(capsys, *_args(tiny_model, images, out), "--resume")[0] == 0
    results = _store.load_results(out)
    names = [f"img{i}" for i in (1, 2, 3, 4, 6, 9)]
    assert [e["name"] for e in results.entries] == names
    summary = [
        json.loads(line)["name"] for line in (out / "summary.jsonl").read_text().splitlines()
    ]
    assert summary == names
    assert not (out / "img0").exists() and not (out / "img5").exists()
    fresh2 = tmp_path / "fresh2" / "out"
    assert run(capsys, *_args(tiny_model, images, fresh2))[0] == 0
    assert _files(out) == _files(fresh2)


def test_files_of_the_user_are_never_replaced_without_overwrite(
    capsys, tiny_model, images, tmp_path
):
    for name in ("summary.jsonl", "jacobians/000000.npy"):
        out = tmp_path / name.replace("/", "_")
        (out / name).parent.mkdir(parents=True)
        (out / name).write_bytes(b"the user's")
        code, _, err = run(capsys, *_args(tiny_model, images, out))
        first = name.split("/")[0]
        one_line(
            code, err, rf"{first}' already exists and augnet did not write it; pass --overwrite"
        )
        assert (out / name).read_bytes() == b"the user's"
        assert run(capsys, *_args(tiny_model, images, out), "--overwrite")[0] == 0
        assert (out / name).read_bytes() != b"the user's"  # asked for: replaced


def test_demo_never_takes_a_users_results_for_its_own(capsys, tmp_path):
    from augnet import _demo

    if not _demo.demo_model_path().exists():
        pytest.skip("the demo model is not built yet")
    # the user's own run, with a model file that has the demo model's name
    mine = tmp_path / "mine"
    mine.mkdir()
    shutil.copy(_demo.demo_model_path(), mine / "region_cnn.keras")
    shutil.copy(_demo.sample_image_path(), mine / "photo.jpg")
    out = tmp_path / "results"
    argv = ["jacobian", mine / "region_cnn.keras", mine / "photo.jpg", "--out", out, "-q"]
    assert run(capsys, *argv)[0] == 0
    before = _files(out)
    code, _, err = run(capsys, "demo", "--out", out, "--quiet")
    one_line(code, err, r"already holds results; pass --resume .* --overwrite")
    assert _files(out) == before


def test_stale_lock_file_of_a_killed_run_does_not_block(capsys, tiny_model, images, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / _safeio.LOCK_NAME).write_text('{"pid": 999999}')  # left by kill -9: nobody holds it
    assert run(capsys, *_args(tiny_model, images, out))[0] == 0
    assert not (out / _safeio.LOCK_NAME).exists()


def test_a_running_run_is_named_to_a_second_one(capsys, tiny_model, images, tmp_path):
    out = tmp_path / "out"
    holder = _store.RunStore(out).open(command_line="augnet jacobian first")
    try:
        code, _, err = run(capsys, *_args(tiny_model, images, out), "--overwrite")
    finally:
        holder.close()
    one_line(
        code,
        err,
        rf"out' is in use by another augnet run \(process {os.getpid()} on .*: augnet jacobian "
        "first\\); wait for it to finish",
    )


# ----------------------------------------------------------------------------------------------
# Bounded before any work
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def free_size_model(tmp_path_factory):
    inp = keras.Input((None, None, 1))
    h = keras.layers.Conv2D(2, 3, padding="same")(inp)
    out = keras.layers.Dense(13)(keras.layers.GlobalAveragePooling2D()(h))
    path = tmp_path_factory.mktemp("free") / "free.keras"
    keras.Model(inp, out).save(path)
    return path


def test_huge_inputs_are_refused_before_any_work(
    capsys, monkeypatch, free_size_model, images, tmp_path
):
    monkeypatch.setattr(_runner, "compute_batch", lambda *a, **k: pytest.fail("computed"))
    out = tmp_path / "out"
    code, _, err = run(
        capsys, "jacobian", free_size_model, images, "--out", out, "--size", "8000,8000"
    )
    one_line(
        code,
        err,
        r"one batch needs about [0-9.]+ GiB of memory \(--batch-size 32 x 13 output\(s\) x input "
        r"\(8000, 8000, 1\) in float32.*more than the memory budget of 2\.0 GiB; one input alone "
        r"needs .* use a smaller --size.*--max-memory",
    )
    assert not out.exists()
    code, _, err = run(
        capsys, "jacobian", free_size_model, images, "--out", out, "--size", "2048,2048"
    )
    one_line(code, err, r"lower --batch-size to [0-9]+ or less")


def test_check_memory_arithmetic():
    n = 100 * 100 * 3
    _runner.check_memory(
        batch_size=2,
        k=5,
        input_shape=(100, 100, 3),
        pictures=False,
        upscale_to=256,
        max_memory=2 * 6 * n * 4,
    )
    with pytest.raises(_runner.RunError, match=r"lower --batch-size to 2 or less"):
        _runner.check_memory(
            batch_size=3,
            k=5,
            input_shape=(100, 100, 3),
            pictures=False,
            upscale_to=256,
            max_memory=2 * 6 * n * 4,
        )


# ----------------------------------------------------------------------------------------------
# Progress and signals
# ----------------------------------------------------------------------------------------------


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_progress_moves_during_a_long_batch(tiny_model, tmp_path, monkeypatch):
    images = _make_images(tmp_path / "images", n=6)
    model = _runner.load_model(tiny_model)
    plan, _ = _runner.plan_run(
        _options(tiny_model, images, tmp_path / "out", batch_size=6), model=model
    )
    from augnet import _progress

    real_init = _progress.Progress.__init__

    def eager(self, *args, **kwargs):
        kwargs["min_interval"] = 0.0
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(_progress.Progress, "__init__", eager)
    stream = _Tty()
    stats = _runner.run_plan(plan, model, stream=stream)
    assert stats.computed == 6
    lines = [line for line in stream.getvalue().split("\r") if line.strip()]
    moving = {line.split("]")[0] for line in lines if line.lstrip().startswith("0/6")}
    assert len(moving) >= 3  # the bar moved several times before the batch of 6 finished
    assert lines[-1].strip().startswith("6/6")


def test_interrupt_before_the_first_batch_says_nothing_was_written(
    capsys, monkeypatch, tiny_model, images, tmp_path
):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(_runner, "compute_batch", interrupted)
    out = tmp_path / "out"
    code, _, err = run(capsys, *_args(tiny_model, images, out))
    one_line(code, err, r"interrupted before the first batch finished; nothing was written", 130)
    assert not out.exists()


def test_a_swallowed_sigterm_still_stops_the_run(capsys, monkeypatch, tiny_model, images, tmp_path):
    """A signal that lands in a finalizer raises there and Python only prints "Exception
    ignored"; the run must stop anyway, at its next check."""
    real = _compute._jacobian
    calls = []

    def jacobian_with_lost_signal(*args, **kwargs):
        calls.append(1)
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            deadline = time.monotonic() + 10  # the handler runs here and raises (at once, or
            while time.monotonic() < deadline:  # a little later when another thread got it)...
                pass
        except KeyboardInterrupt:
            pass  # ...and it is swallowed, as in a weakref callback
        return real(*args, **kwargs)

    monkeypatch.setattr(_compute, "_jacobian", jacobian_with_lost_signal)
    out = tmp_path / "out"
    before = signal.getsignal(signal.SIGTERM)  # SIG_DFL, or e.g. Ray's once ray.init ran here
    code, _, err = run(capsys, *_args(tiny_model, images, out))
    one_line(code, err, r"terminated before the first batch finished; nothing was written", 143)
    assert calls == [1] and not out.exists()
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is put back
