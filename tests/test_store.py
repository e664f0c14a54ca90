"""Result store (augnet._store) and progress bar (augnet._progress). NumPy only, no TF."""

from __future__ import annotations

import errno
import io
import json

import numpy as np
import pytest

from augnet import _store
from augnet._progress import Progress
from augnet._store import (
    ExistingResultsError,
    OutputFolderError,
    RunStore,
    SettingsMismatchError,
    load_results,
)

SETTINGS = {"outputs": [0, 1], "batch_size": 2}


def _entries(tmp_path, names):
    out = []
    for name in names:
        src = tmp_path / "inputs" / f"{name}.png"
        src.parent.mkdir(exist_ok=True)
        if not src.exists():
            src.write_bytes(name.encode())
        fp = _store.fingerprint(src)
        out.append(
            {
                **fp,
                "key": fp["path"],
                "name": name,
                "files": [f"{name}/map.png"],
                "outputs": [0, 1],
                "summary": {"input": name},
            }
        )
    return out


def _commit(store, tmp_path, names, seed=0):
    entries = _entries(tmp_path, names)
    jac = np.random.default_rng(seed).normal(size=(len(names), 2, 3, 3)).astype(np.float32)
    with store.batch() as batch:
        for e in entries:
            batch.save_png(store.out_dir / e["files"][0], np.zeros((3, 3), np.uint8))
        batch.commit(entries, jacobian=jac)
    return entries, jac


def _temp_files(folder):
    return [p for p in folder.rglob("*") if p.name.startswith(".") and ".tmp" in p.name]


# ----------------------------------------------------------------------------------------------
# atomic writes
# ----------------------------------------------------------------------------------------------


def test_atomic_write_replaces_whole_file(tmp_path):
    target = tmp_path / "a.json"
    _store.atomic_write_json(target, {"b": 1, "a": [1.5]})
    assert target.read_text() == '{"b":1,"a":[1.5]}\n'
    _store.atomic_save_npy(tmp_path / "x.npy", np.arange(3))
    np.testing.assert_array_equal(np.load(tmp_path / "x.npy"), np.arange(3))
    assert not _temp_files(tmp_path)


def test_failed_write_leaves_old_file_and_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "a.bin"
    target.write_bytes(b"old")

    def full_disk(path, data, fsync=False):
        with open(path, "wb") as f:
            f.write(data[:1])  # a partial temporary file...
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(_store, "write_bytes", full_disk)
    with pytest.raises(OSError) as info:
        _store.atomic_write_bytes(target, b"new content")
    assert info.value.errno == errno.ENOSPC
    assert info.value.filename == str(target)  # the error names the file
    assert target.read_bytes() == b"old"  # ...never replaces the old one
    assert not _temp_files(tmp_path)


def test_interrupt_during_write_leaves_nothing(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with _store.atomic_path(tmp_path / "sheet.png") as tmp:
            tmp.write_bytes(b"half")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------
# RunStore
# ----------------------------------------------------------------------------------------------


def test_commit_and_read_back(tmp_path):
    store = RunStore(tmp_path / "out")
    assert store.prepare(SETTINGS) == {}
    e1, j1 = _commit(store, tmp_path, ["a", "b"])
    # readable while the run goes on: one batch so far
    partial = load_results(tmp_path / "out")
    assert partial.keys == [e["key"] for e in e1]
    e2, j2 = _commit(store, tmp_path, ["c"], seed=1)
    results = load_results(tmp_path / "out")
    assert len(results) == 3 and results.settings == SETTINGS
    np.testing.assert_array_equal(results.to_array(), np.concatenate([j1, j2]))
    np.testing.assert_array_equal(results.jacobian(e2[0]["key"]), j2[0])
    assert sorted(p.name for p in (tmp_path / "out" / "batches").iterdir()) == [
        "000000.json",
        "000001.json",
    ]
    store.write_summary([e["key"] for e in e2 + e1])
    lines = (tmp_path / "out" / "summary.jsonl").read_text().splitlines()
    assert [json.loads(line)["input"] for line in lines] == ["c", "a", "b"]


def test_refuses_existing_results(tmp_path):
    store = RunStore(tmp_path / "out")
    store.prepare(SETTINGS)
    _commit(store, tmp_path, ["a"])
    with pytest.raises(ExistingResultsError, match="--resume .* --overwrite"):
        RunStore(tmp_path / "out").prepare(SETTINGS)


def test_refuses_foreign_files_in_planned_paths(tmp_path):
    (tmp_path / "out" / "cat").mkdir(parents=True)
    (tmp_path / "out" / "cat" / "mine.txt").write_text("precious")
    with pytest.raises(ExistingResultsError, match="cat"):
        RunStore(tmp_path / "out").prepare(SETTINGS, planned_paths=[tmp_path / "out" / "cat"])
    RunStore(tmp_path / "out").prepare(SETTINGS, planned_paths=[tmp_path / "out" / "dog"])


def test_resume_returns_finished_and_checks_settings(tmp_path):
    store = RunStore(tmp_path / "out")
    store.prepare(SETTINGS)
    entries, _ = _commit(store, tmp_path, ["a", "b"])
    again = RunStore(tmp_path / "out")
    done = again.prepare(SETTINGS, resume=True)
    assert set(done) == {e["key"] for e in entries}
    src = tmp_path / "inputs" / "a.png"
    assert again.is_done(str(src), _store.fingerprint(src))
    src.write_bytes(b"changed content")  # a changed input is computed again
    assert not again.is_done(str(src), _store.fingerprint(src))
    with pytest.raises(SettingsMismatchError, match=r"batch_size: 2 -> 4"):
        RunStore(tmp_path / "out").prepare({**SETTINGS, "batch_size": 4}, resume=True)
    # batch numbering continues
    _commit(again, tmp_path, ["c"])
    assert (tmp_path / "out" / "batches" / "000001.json").exists()


def test_overwrite_deletes_previous_files(tmp_path):
    store = RunStore(tmp_path / "out")
    store.prepare(SETTINGS)
    _commit(store, tmp_path, ["a", "b"])
    (tmp_path / "out" / "notes.txt").write_text("not ours")
    fresh = RunStore(tmp_path / "out")
    assert fresh.prepare({"other": 1}, overwrite=True) == {}
    left = sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*"))
    assert left == ["batches", "jacobians", "notes.txt"]


def test_failed_batch_removes_its_files(tmp_path):
    store = RunStore(tmp_path / "out")
    store.prepare(SETTINGS)
    _commit(store, tmp_path, ["a"])
    with pytest.raises(KeyboardInterrupt):
        with store.batch() as batch:
            batch.save_png(tmp_path / "out" / "b" / "map.png", np.zeros((2, 2), np.uint8))
            assert (tmp_path / "out" / "b" / "map.png").exists()
            raise KeyboardInterrupt
    assert not (tmp_path / "out" / "b").exists()
    assert len(load_results(tmp_path / "out")) == 1


def test_disk_full_during_commit_keeps_earlier_batches(tmp_path, monkeypatch):
    store = RunStore(tmp_path / "out")
    store.prepare(SETTINGS)
    _commit(store, tmp_path, ["a"])
    real = _store.write_bytes

    def full_after_png(path, data, fsync=False):
        if path.suffix == ".npy":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, data, fsync=fsync)

    monkeypatch.setattr(_store, "write_bytes", full_after_png)
    with pytest.raises(OSError, match="No space left"):
        _commit(store, tmp_path, ["b"])
    assert not (tmp_path / "out" / "b").exists()
    assert not _temp_files(tmp_path / "out")
    assert [e["name"] for e in load_results(tmp_path / "out").entries] == ["a"]


def test_unwritable_output_folder(tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    with pytest.raises(OutputFolderError, match="cannot write to output folder '.*file.txt/out'"):
        RunStore(blocker / "out").prepare(SETTINGS)


def test_stale_temp_files_are_cleaned(tmp_path):
    (tmp_path / "out").mkdir()
    stale = tmp_path / "out" / ".run.tmp-123-abcd.json"
    stale.write_text("half")
    RunStore(tmp_path / "out").prepare(SETTINGS)
    assert not stale.exists()
    (tmp_path / "a").mkdir()
    for name in [".map.png.x1y2.tmp", ".map.tmp-1-ab.png", "map.png", ".hidden"]:
        (tmp_path / "a" / name).write_text("x")
    _store.remove_temp_files(tmp_path / "a")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [".hidden", "map.png"]


# ----------------------------------------------------------------------------------------------
# Progress
# ----------------------------------------------------------------------------------------------


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_progress_silent_without_terminal():
    stream = io.StringIO()
    with Progress(10, stream=stream) as bar:
        bar.update(10)
    assert stream.getvalue() == ""


def test_progress_draws_rate_and_eta():
    now = [0.0]
    stream = _Tty()
    with Progress(100, stream=stream, skipped=20, clock=lambda: now[0], min_interval=0) as bar:
        now[0] = 2.0
        bar.update(40)
        line = bar.line()
    assert line.startswith(" 60/120 images")
    assert "20.0/s" in line and "ETA 0:03" in line and "(20 done before)" in line
    assert stream.getvalue().startswith("\r") and stream.getvalue().endswith("\n")


def test_progress_quiet_on_terminal():
    stream = _Tty()
    with Progress(5, stream=stream, enabled=False) as bar:
        bar.update(5)
    assert stream.getvalue() == ""
