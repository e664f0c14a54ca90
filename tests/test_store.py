"""Result store (augnet._store), safe writes (augnet._safeio), progress bar (augnet._progress).

NumPy only, no TensorFlow. Crafted folders check the hardening of issue 9: records that point
outside the folder, planted symbolic links, files of the user, a second run, a killed commit.
"""

from __future__ import annotations

import errno
import io
import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest

from augnet import _npyfile, _safeio, _store
from augnet._progress import Progress
from augnet._safeio import FolderLockedError, UnsafePathError
from augnet._store import (
    BatchResult,
    ExistingResultsError,
    InputResult,
    OutputFolderError,
    RunStore,
    SettingsMismatchError,
    load_results,
)

SETTINGS = {"outputs": [0, 1], "batch_size": 2}


def _result(tmp_path, names, batch_id, seed=0, files=None):
    """A computed batch: one 'map.png' per input (its own bytes) and a (b, 2, 3, 3) Jacobian."""
    inputs = []
    for name in names:
        src = tmp_path / "inputs" / f"{name}.png"
        src.parent.mkdir(exist_ok=True)
        if not src.exists():
            src.write_bytes(name.encode())
        content = files if files is not None else {f"{name}/map.png": f"png of {name}".encode()}
        inputs.append(
            InputResult(
                key=f"{name}.png",
                name=name,
                fingerprint=_safeio.hash_file(src),
                outputs=[0, 1],
                files=dict(content),
                summary={"input": name},
            )
        )
    jac = np.random.default_rng(seed).normal(size=(len(names), 2, 3, 3)).astype(np.float32)
    return BatchResult(batch_id, inputs, jacobian=jac)


def _commit(store, tmp_path, names, seed=0, batch_id=None):
    batch_id = len(store.committed) if batch_id is None else batch_id
    result = _result(tmp_path, names, batch_id, seed)
    assert store.commit(result)
    return result.inputs, result.jacobian


def _open(path, settings=SETTINGS, **kwargs) -> RunStore:
    store = RunStore(path).open()
    try:
        store.prepare(settings, **kwargs)
    except BaseException:
        store.close()
        raise
    return store


def _temp_files(folder):
    return [p for p in folder.rglob("*") if p.name.startswith(".") and ".tmp" in p.name]


def _tree(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


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

    def full_disk(fd, data):
        os.write(fd, bytes(data[:1]))  # a partial temporary file...
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(_safeio, "_write", full_disk)
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


def test_temporary_names_are_unpredictable_and_exclusive(tmp_path):
    names = {_safeio.temp_name("J.npy") for _ in range(50)}
    assert len(names) == 50 and all(_safeio.is_temp_name(n) for n in names)
    # a link planted at the very temporary name is never written through
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / "out").mkdir()
    os.symlink(victim, tmp_path / "out" / ".x.png.tmp-0123456789abcdef")
    with _safeio.SafeDir.open(tmp_path / "out") as folder:
        with pytest.raises(FileExistsError):
            folder.write_atomic("x.png", b"data", tmp=".x.png.tmp-0123456789abcdef")
    assert victim.read_text() == "precious" and not (tmp_path / "out" / "x.png").exists()


# ----------------------------------------------------------------------------------------------
# RunStore
# ----------------------------------------------------------------------------------------------


def test_commit_and_read_back(tmp_path):
    store = RunStore(tmp_path / "out").open()
    assert store.prepare(SETTINGS) == []
    e1, j1 = _commit(store, tmp_path, ["a", "b"])
    # readable while the run goes on: one batch so far, and its summary lines already
    partial = load_results(tmp_path / "out")
    assert partial.keys == [e.key for e in e1]
    summary = tmp_path / "out" / "summary.jsonl"
    assert [json.loads(line)["input"] for line in summary.read_text().splitlines()] == ["a", "b"]
    e2, j2 = _commit(store, tmp_path, ["c"], seed=1)
    results = load_results(tmp_path / "out")
    assert len(results) == 3 and results.settings == SETTINGS
    np.testing.assert_array_equal(results.to_array(), np.concatenate([j1, j2]))
    np.testing.assert_array_equal(results.jacobian(e2[0].key), j2[0])
    assert sorted(p.name for p in (tmp_path / "out" / "batches").iterdir()) == [
        "000000.json",
        "000001.json",
    ]
    store.finish()
    store.close()
    lines = summary.read_text().splitlines()
    assert [json.loads(line)["input"] for line in lines] == ["a", "b", "c"]
    assert not (tmp_path / "out" / _safeio.LOCK_NAME).exists()  # the lock goes with the run


def test_commit_is_idempotent_by_batch_id(tmp_path):
    store = _open(tmp_path / "out")
    result = _result(tmp_path, ["a", "b"], 0)
    assert store.commit(result) is True
    before = {p: p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()}
    assert store.commit(result) is False  # a batch redone after its worker died
    after = {p: p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()}
    assert after == before
    assert len((tmp_path / "out" / "summary.jsonl").read_text().splitlines()) == 2
    store.close()


def test_batches_committed_out_of_order_read_in_order(tmp_path):
    store = _open(tmp_path / "out")
    _commit(store, tmp_path, ["c"], batch_id=1)
    _commit(store, tmp_path, ["a", "b"], batch_id=0)
    store.finish()
    store.close()
    assert load_results(tmp_path / "out").keys == ["a.png", "b.png", "c.png"]
    lines = (tmp_path / "out" / "summary.jsonl").read_text().splitlines()
    assert [json.loads(line)["input"] for line in lines] == ["a", "b", "c"]


def test_refuses_existing_results(tmp_path):
    store = _open(tmp_path / "out")
    _commit(store, tmp_path, ["a"])
    store.close()
    with pytest.raises(ExistingResultsError, match="--resume .* --overwrite"):
        _open(tmp_path / "out")


def test_refuses_foreign_files_in_planned_paths(tmp_path):
    (tmp_path / "out" / "cat").mkdir(parents=True)
    (tmp_path / "out" / "cat" / "mine.txt").write_text("precious")
    with pytest.raises(ExistingResultsError, match="cat"):
        _open(tmp_path / "out", planned_names=["cat"])
    _open(tmp_path / "out", planned_names=["dog"]).close()


@pytest.mark.parametrize("name", ["summary.jsonl", "jacobians/000000.npy", "batches/notes.txt"])
def test_refuses_files_of_the_user_at_fixed_names(tmp_path, name):
    target = tmp_path / "out" / name
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(b"the user's")
    with pytest.raises(ExistingResultsError, match="augnet did not write it; pass --overwrite"):
        _open(tmp_path / "out")
    assert target.read_bytes() == b"the user's"


def test_resume_returns_finished_and_checks_settings(tmp_path):
    store = _open(tmp_path / "out")
    entries, _ = _commit(store, tmp_path, ["a", "b"])
    store.close()
    again = RunStore(tmp_path / "out").open()
    done = again.prepare(SETTINGS, resume=True)
    assert done == [0]
    record = again.read_record(0)
    assert [e["key"] for e in record["inputs"]] == [e.key for e in entries]
    src = tmp_path / "inputs" / "a.png"
    assert record["inputs"][0]["fingerprint"] == _safeio.hash_file(src)
    stat_before = src.stat()
    src.write_bytes(b"A")  # changed in place, same size, mtime put back: a content fingerprint
    os.utime(src, ns=(stat_before.st_atime_ns, stat_before.st_mtime_ns))
    assert record["inputs"][0]["fingerprint"] != _safeio.hash_file(src)
    again.close()
    with pytest.raises(SettingsMismatchError, match=r"batch_size: 2 -> 4"):
        _open(tmp_path / "out", {**SETTINGS, "batch_size": 4}, resume=True)
    # batch numbering continues
    again = _open(tmp_path / "out", resume=True)
    _commit(again, tmp_path, ["c"])
    assert (tmp_path / "out" / "batches" / "000001.json").exists()
    again.close()


def test_overwrite_deletes_previous_files(tmp_path):
    store = _open(tmp_path / "out")
    _commit(store, tmp_path, ["a", "b"])
    store.close()
    (tmp_path / "out" / "notes.txt").write_text("not ours")
    fresh = RunStore(tmp_path / "out").open()
    assert fresh.prepare({"other": 1}, overwrite=True) == []
    fresh.close()
    left = sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*"))
    assert left == ["batches", "jacobians", "notes.txt"]


def test_overwrite_deletes_only_what_augnet_provably_wrote(tmp_path):
    store = _open(tmp_path / "out")
    _commit(store, tmp_path, ["a", "b"])
    store.close()
    (tmp_path / "out" / "a" / "map.png").write_bytes(b"edited by the user")  # not ours any more
    (tmp_path / "out" / "b" / "notes.txt").write_text("mine")
    _open(tmp_path / "out", {"other": 1}, overwrite=True).close()
    assert (tmp_path / "out" / "a" / "map.png").read_bytes() == b"edited by the user"
    assert (tmp_path / "out" / "b" / "notes.txt").read_text() == "mine"
    assert not (tmp_path / "out" / "b" / "map.png").exists()


def test_failed_batch_removes_its_files(tmp_path, monkeypatch):
    store = _open(tmp_path / "out")
    _commit(store, tmp_path, ["a"])
    real = _safeio.SafeDir.write_atomic
    written = []

    def interrupt_after_first_file(self, name, data, **kwargs):
        if written:
            raise KeyboardInterrupt
        real(self, name, data, **kwargs)
        if name.endswith(".png"):
            written.append(name)
            assert (tmp_path / "out" / "b" / "map.png").exists()

    monkeypatch.setattr(_safeio.SafeDir, "write_atomic", interrupt_after_first_file)
    with pytest.raises(KeyboardInterrupt):
        store.commit(_result(tmp_path, ["b"], 1))
    monkeypatch.undo()
    assert not (tmp_path / "out" / "b").exists()
    assert not list((tmp_path / "out" / "batches").glob("*.pending"))
    assert len(load_results(tmp_path / "out")) == 1
    store.close()


def test_disk_full_during_commit_keeps_earlier_batches(tmp_path, monkeypatch):
    store = _open(tmp_path / "out")
    _commit(store, tmp_path, ["a"])
    real = _safeio._write

    def full_at_npy(fd, data):
        if ".npy.tmp-" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data)

    monkeypatch.setattr(_safeio, "_write", full_at_npy)
    with pytest.raises(OSError, match="No space left") as info:
        _commit(store, tmp_path, ["b"])
    assert info.value.filename.endswith("jacobians/000001.npy")
    assert not (tmp_path / "out" / "b").exists()
    assert not _temp_files(tmp_path / "out")
    assert [e["name"] for e in load_results(tmp_path / "out").entries] == ["a"]
    store.close()


def test_unwritable_output_folder(tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    with pytest.raises(OutputFolderError, match="cannot write to output folder '.*file.txt/out'"):
        _open(blocker / "out")


def test_stale_temp_files_are_cleaned(tmp_path):
    (tmp_path / "out").mkdir()
    stale = tmp_path / "out" / ".run.json.tmp-0123456789abcdef"
    stale.write_text("half")
    _open(tmp_path / "out").close()
    assert not stale.exists()
    (tmp_path / "a").mkdir()
    for name in [".map.png.tmp-0123456789abcdef", ".map.png.x1y2.tmp", "map.png", ".hidden"]:
        (tmp_path / "a" / name).write_text("x")
    _store.remove_temp_files(tmp_path / "a")
    # only augnet's own temporary names go; anything else is the user's
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [
        ".hidden",
        ".map.png.x1y2.tmp",
        "map.png",
    ]


# ----------------------------------------------------------------------------------------------
# Crafted folders: records that point outside, planted links, a killed commit, a second run
# ----------------------------------------------------------------------------------------------


def _craft_record(out: Path, files: dict, inputs_files=None) -> None:
    run = json.loads((out / "run.json").read_text())
    record = json.loads((out / "batches" / "000000.json").read_text())
    record["files"] = files
    for entry in record["inputs"]:
        entry["files"] = inputs_files if inputs_files is not None else list(files)
    record["shard"] = None
    assert record["run_id"] == run["run_id"]
    (out / "batches" / "000000.json").write_text(json.dumps(record))


@pytest.mark.parametrize("where", ["../../victim.txt", "ABSOLUTE", "a/../../victim.txt", ".."])
@pytest.mark.parametrize("how", ["overwrite", "resume", "read"])
def test_records_pointing_outside_stop_with_one_line(tmp_path, where, how):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "deep" / "out"
    store = _open(out)
    _commit(store, tmp_path, ["a"])
    store.close()
    rel = str(victim) if where == "ABSOLUTE" else where
    _craft_record(out, {rel: _safeio.hash_file(victim)})
    with pytest.raises(UnsafePathError, match="leads outside") as info:
        if how == "read":
            load_results(out)
        else:
            store = RunStore(out).open()
            try:
                store.prepare(SETTINGS, resume=how == "resume", overwrite=how == "overwrite")
                for b in sorted(store.committed):
                    store.read_record(b)
            finally:
                store.close()
    assert "\n" not in str(info.value)
    assert victim.read_text() == "precious"


def test_overwrite_never_deletes_through_a_link(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "map.png").write_bytes(b"png of a")  # the same bytes augnet wrote for 'a'
    out = tmp_path / "out"
    store = _open(out)
    _commit(store, tmp_path, ["a"])
    store.close()
    (out / "a" / "map.png").unlink()
    (out / "a").rmdir()
    os.symlink(outside, out / "a")  # a planted link where the input's folder was
    _open(out, {"other": 1}, overwrite=True).close()
    assert (outside / "map.png").read_bytes() == b"png of a"


@pytest.mark.parametrize("planted", ["batches", "a", "jacobians"])
def test_writes_never_follow_a_planted_link(tmp_path, planted):
    outside = tmp_path / "outside"
    outside.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    os.symlink(outside, out / planted)
    with pytest.raises((UnsafePathError, ExistingResultsError)):
        _open(out, planned_names=["a"])  # refused first (something is in the way)...
    store = RunStore(out).open()
    try:  # ...and with --overwrite the run stops at the link, before or at the first write
        with pytest.raises(UnsafePathError, match="symbolic link"):
            store.prepare(SETTINGS, overwrite=True)
            store.commit(_result(tmp_path, ["a"], 0))
    finally:
        store.close()
    assert list(outside.iterdir()) == []


def test_killed_commit_is_cleaned_up_from_its_journal(tmp_path):
    out = tmp_path / "out"
    store = _open(out)
    _commit(store, tmp_path, ["a"])
    store.close()
    # what a process killed in the middle of committing batch 1 leaves: its journal, some files
    run_id = json.loads((out / "run.json").read_text())["run_id"]
    (out / "b").mkdir()
    (out / "b" / "map.png").write_bytes(b"png of b")
    (out / "c").mkdir()
    (out / "c" / "map.png").write_bytes(b"the user's, not what the journal says")
    tmp = ".map.png.tmp-0123456789abcdef"
    (out / "b" / tmp).write_bytes(b"half")
    journal = {
        "run_id": run_id,
        "batch": 1,
        "files": {
            "b/map.png": _safeio.hash_bytes(b"png of b"),
            "c/map.png": _safeio.hash_bytes(b"png of c"),
        },
        "temps": [f"b/{tmp}"],
    }
    (out / "batches" / "000001.pending").write_text(json.dumps(journal))
    store = _open(out, resume=True)
    assert store.committed == {0}
    store.close()
    assert not (out / "b").exists()  # provably augnet's: removed
    assert (out / "c" / "map.png").read_bytes().startswith(b"the user's")  # not provable: kept
    assert not (out / "batches" / "000001.pending").exists()


def test_a_second_run_on_the_same_folder_is_refused(tmp_path):
    first = _open(tmp_path / "out")
    with pytest.raises(
        FolderLockedError, match=rf"in use by another augnet run \(process {os.getpid()}"
    ):
        RunStore(tmp_path / "out").open()
    first.close()
    _open(tmp_path / "out").close()  # free again


def test_files_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        store = _open(tmp_path / "out")
        _commit(store, tmp_path, ["a"])
        store.close()
        _safeio.write_file(tmp_path / "api.png", b"x")
    finally:
        os.umask(old)
    for p in [
        tmp_path / "out" / "a" / "map.png",
        tmp_path / "out" / "jacobians" / "000000.npy",
        tmp_path / "out" / "run.json",
        tmp_path / "out" / "summary.jsonl",
        tmp_path / "api.png",
    ]:
        assert stat.S_IMODE(p.stat().st_mode) == 0o640, p
    assert stat.S_IMODE((tmp_path / "out" / "a").stat().st_mode) == 0o750


def test_model_path_must_be_a_file_or_a_folder(tmp_path):
    fifo = tmp_path / "model.keras"
    os.mkfifo(fifo)
    with pytest.raises(
        ValueError, match=r"model.keras' is a FIFO \(named pipe\), not a model file"
    ):
        _safeio.check_model_path(fifo)
    link = tmp_path / "zero.keras"
    os.symlink("/dev/zero", link)
    with pytest.raises(ValueError, match="is a character device"):
        _safeio.check_model_path(link)


# ----------------------------------------------------------------------------------------------
# jacobian_to_npy's file (augnet._store.write_npy_stream): checked before any work
# ----------------------------------------------------------------------------------------------


def _blocks(calls):
    def make():
        calls.append("computed")
        values = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
        return (2, 3, 4), np.float32, [(slice(0, 2), slice(0, 3), values)]

    return make


def test_npy_stream_writes_the_array(tmp_path):
    calls = []
    path = _store.write_npy_stream(tmp_path / "J.npy", _blocks(calls))
    np.testing.assert_array_equal(np.load(path), np.arange(24, dtype=np.float32).reshape(2, 3, 4))
    assert os.listdir(tmp_path) == ["J.npy"]


@pytest.mark.parametrize(
    "case, error, match",
    [
        ("folder", IsADirectoryError, r"Is a folder; jacobian_to_npy writes a file"),
        ("exists", FileExistsError, r"exists; pass overwrite=True"),
        ("no parent", FileNotFoundError, r"No such folder"),
        ("read-only", PermissionError, r"Permission denied"),
    ],
)
def test_npy_stream_checks_the_target_before_computing(tmp_path, case, error, match):
    target = tmp_path / "J.npy"
    if case == "folder":
        target.mkdir()
    elif case == "exists":
        target.write_bytes(b"keep")
    elif case == "no parent":
        target = tmp_path / "missing" / "J.npy"
    elif case == "read-only":
        if os.geteuid() == 0:
            pytest.skip("root may write anywhere")
        tmp_path.chmod(0o555)
    calls = []
    try:
        with pytest.raises(error, match=match) as info:
            _store.write_npy_stream(target, _blocks(calls))
    finally:
        tmp_path.chmod(0o755)
    assert calls == []  # refused before any work
    assert info.value.filename == str(target)


def test_npy_stream_never_touches_a_user_partial_file_or_link(tmp_path):
    (tmp_path / "J.npy.partial").write_bytes(b"the user's")
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    os.symlink(victim, tmp_path / ".J.npy.partial")
    _store.write_npy_stream(tmp_path / "J.npy", _blocks([]))
    assert (tmp_path / "J.npy.partial").read_bytes() == b"the user's"
    assert victim.read_bytes() == b"precious"
    # overwrite replaces a link at the target itself, never its target
    os.symlink(victim, tmp_path / "K.npy")
    _store.write_npy_stream(tmp_path / "K.npy", _blocks([]), overwrite=True)
    assert victim.read_bytes() == b"precious" and not (tmp_path / "K.npy").is_symlink()


def test_npy_stream_full_disk_is_found_before_computing_and_named(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(_npyfile, "disk_free", lambda path: 100)
    with pytest.raises(
        OSError, match=r"No space left on device: the file needs .* 100 bytes are free"
    ) as info:
        _store.write_npy_stream(tmp_path / "J.npy", _blocks(calls))
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(tmp_path / "J.npy")
    assert os.listdir(tmp_path) == []
    monkeypatch.undo()

    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(_npyfile, "_pwrite", full)
    with pytest.raises(OSError, match="No space left") as info:
        _store.write_npy_stream(tmp_path / "J.npy", _blocks(calls))
    assert info.value.filename == str(tmp_path / "J.npy")
    assert os.listdir(tmp_path) == []


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


def test_progress_moves_within_a_batch():
    now = [0.0]
    stream = _Tty()
    with Progress(4, stream=stream, clock=lambda: now[0], min_interval=0) as bar:
        lines = [bar.line()]
        for _ in range(4):  # the blocks and pictures of one batch of 4 inputs
            now[0] += 1.0
            bar.advance(0.75)
            lines.append(bar.line())
        bar.update(4)
    bars = [line.split("[")[1].split("]")[0].count("#") for line in lines]
    assert bars == sorted(bars) and bars[-1] > bars[0]  # the bar moves before the batch ends
    assert all(line.startswith("0/4") for line in lines)  # while no input is finished yet
    assert "ETA" in lines[-1]


def test_npy_stream_file_follows_the_umask(tmp_path):
    old = os.umask(0o077)
    try:
        path = _store.write_npy_stream(tmp_path / "J.npy", _blocks([]))
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    old = os.umask(0o022)
    try:
        path = _store.write_npy_stream(tmp_path / "J.npy", _blocks([]), overwrite=True)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
