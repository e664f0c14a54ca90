"""Result files of a data-set run: one run per folder, provable ownership, atomic batches, resume.

Layout of an output folder written by ``augnet jacobian ... --out OUT``::

    OUT/
      run.json                 the run's id, command, settings and the choices made on its first
                               batch (``resolved``, e.g. the strategy), reused on resume
      batches/000003.json      the commit record of batch 3 (below); the index of the store
      jacobians/000003.npy     raw Jacobians of batch 3, float32 (b, k, *input_shape) (--format npy)
      summary.jsonl            one JSON line per finished input; grows batch by batch
      <name>/output_03.png ... per-input pictures
      .augnet.lock             present while a run writes the folder (see augnet._safeio)

**Batches are positional.** Batch ``b`` holds inputs ``b*batch_size ... (b+1)*batch_size - 1`` of
the run's sorted input list, whichever process computes it and in whichever order: its record and
shard are named by ``b``, so two batches never write the same file and a batch computed twice
(a worker that died and was replaced) is committed once. A resumed run recomputes exactly the
batches whose record is missing or no longer matches its inputs (content fingerprints), so its
results are byte-identical to an uninterrupted run's.

**Commit protocol** (:meth:`RunStore.commit`, the only writer): ``run.json`` (first batch only),
then a journal ``batches/000003.pending`` naming every file the batch will write with its content
hash and temporary name, then the files (each atomically: exclusive temporary name, then rename),
the shard, and the record ``batches/000003.json`` last (flushed to disk): a batch without a record
never happened. Then the journal goes and the batch's lines are appended to ``summary.jsonl``.
A process killed at any point leaves either a committed batch or a journal, from which the next
``--resume`` or ``--overwrite`` removes exactly the files that batch wrote.

**Ownership.** augnet deletes or replaces a file only when it can prove it wrote it: the file is
listed in a record or journal carrying this folder's run id (from ``run.json``), its path is a
plain relative path inside the folder reached without a symbolic link, and its content still has
the hash recorded when augnet wrote it. Anything else in the folder is the user's: a run refuses
to start where it would replace such a file, unless ``--overwrite`` is given (which replaces files
at the paths the new run writes, and still deletes only provable files of the old run). A record
that lists a path outside the folder stops the run with one line.

**Durability.** Records, journals and shards are flushed with ``fsync``; pictures are not (speed),
so a power cut can lose pictures of the last batches, which ``--resume`` then recomputes (their
files are checked for presence).

NumPy and the standard library only.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import stat
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from augnet import _safeio
from augnet._safeio import SafeDir, UnsafePathError

RUN_FILE = "run.json"
BATCH_DIR = "batches"
SHARD_DIR = "jacobians"
SUMMARY_FILE = "summary.jsonl"
REPORT_FILE = "index.html"  # written beside the results by the report (augnet._html)
REPORT_DIR = "index_files"  # the report's data
LOCK_FILE = _safeio.LOCK_NAME
# no input may take these names for its folder
RESERVED_NAMES = (RUN_FILE, BATCH_DIR, SHARD_DIR, SUMMARY_FILE, REPORT_FILE, REPORT_DIR)
STORE_FORMAT = 2
_PENDING = ".pending"


class ExistingResultsError(ValueError):
    """The output folder holds results or files of the user that this run would replace."""


class SettingsMismatchError(ValueError):
    """``--resume`` with settings that differ from those of the run being resumed."""


class OutputFolderError(OSError):
    """The output folder cannot be created or written."""


# --------------------------------------------------------------------------------------------
# What one computed batch hands to the store
# --------------------------------------------------------------------------------------------


@dataclass
class InputResult:
    """Everything the store writes for one input of a batch.

    Attributes:
        key: the input's identity: its path relative to the run's input root, plus ``[row]`` for a
            row of a ``.npy`` array.
        name: its folder's name in the output folder.
        fingerprint: content hash of the input (``"b2:..."``) as it was read.
        outputs: ``(k,)`` the selected flat output indices.
        files: ``{path relative to the output folder: content}`` (PNG bytes), in order.
        summary: its line of ``summary.jsonl``.
    """

    key: str
    name: str
    fingerprint: str
    outputs: list[int]
    files: dict[str, bytes] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)


@dataclass
class BatchResult:
    """One computed batch: what :meth:`RunStore.commit` writes. Plain data (picklable).

    Attributes:
        batch_id: the batch's position in the run (see the module docstring).
        inputs: one :class:`InputResult` per input, in order.
        jacobian: ``(b, k, *input_shape)`` float32 raw Jacobians, or ``None`` (no ``npy``).
        strategy: the engine strategy it was computed with.
        seconds: time spent computing it.
    """

    batch_id: int
    inputs: list[InputResult]
    jacobian: np.ndarray | None = None
    strategy: str | None = None
    seconds: float = 0.0


# --------------------------------------------------------------------------------------------
# Small helpers kept for the public API and scripts
# --------------------------------------------------------------------------------------------


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, separators=(",", ":"), allow_nan=True) + "\n").encode("utf-8")


def npy_bytes(array: np.ndarray) -> bytes:
    """``array`` as the bytes of a ``.npy`` file."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


from augnet._safeio import (  # noqa: E402, F401  (generic safe writes, kept importable here)
    atomic_path,
    atomic_write_bytes,
    atomic_write_json,
    remove_temp_files,
)


def atomic_save_npy(path: str | os.PathLike[str], array: np.ndarray, *, fsync: bool = True) -> Path:
    """Save ``array`` as ``.npy`` atomically."""
    return atomic_write_bytes(path, npy_bytes(array), fsync=fsync)


# --------------------------------------------------------------------------------------------
# The run store
# --------------------------------------------------------------------------------------------


def _batch_name(batch_id: int) -> str:
    return f"{batch_id:06d}"


def _split(rel: str) -> tuple[str | None, str]:
    parent, _, name = rel.rpartition("/")
    return (parent or None), name


class RunStore:
    """The files of one run in one output folder; see the module docstring.

    Use: :meth:`open` (creates the folder, takes its lock), :meth:`prepare` (checks what is there
    against this run), :meth:`commit` per computed batch, :meth:`finish`, :meth:`close`.

    Example:
        >>> store = RunStore("results")  # doctest: +SKIP
        >>> store.open()
        >>> done = store.prepare(settings, resume=True)        # {batch_id: record}
        >>> store.commit(batch_result)
        >>> store.finish(); store.close()
    """

    def __init__(self, out_dir: str | os.PathLike[str]):
        self.out_dir = Path(out_dir)
        self.run_file = self.out_dir / RUN_FILE
        self.batch_dir = self.out_dir / BATCH_DIR
        self.shard_dir = self.out_dir / SHARD_DIR
        self.summary_file = self.out_dir / SUMMARY_FILE
        self.root: SafeDir | None = None
        self.lock: _safeio.FolderLock | None = None
        self.created_out_dir = False
        self.run_id: str | None = None
        self.resolved: dict[str, Any] = {}
        self._settings: dict[str, Any] | None = None
        self._run_header: dict[str, Any] = {}
        self.committed: set[int] = set()  # batch ids with a valid record of this run
        self.committed_now = 0  # batches committed by this process
        self._summary_ok = True  # summary.jsonl == the committed batches' lines, in input order
        self._wrote_run_file = False  # this process created run.json

    # -- opening and closing ---------------------------------------------------------------------

    def open(self, *, command_line: str = "") -> RunStore:
        """Create the output folder if needed, check that it can be written, take its lock.

        Raises:
            OutputFolderError: the folder cannot be created or written.
            augnet._safeio.FolderLockedError: another augnet run is writing it.
        """
        try:
            existed = self.out_dir.is_dir()
            self.root = SafeDir.open(self.out_dir, create=True)
            self.root.display = str(self.out_dir)
            self.created_out_dir = not existed
            probe = _safeio.temp_name("probe")
            fd, probe = self.root.create_temp("probe", probe)
            os.close(fd)
            self.root.discard(probe)
        except OSError as exc:
            if self.root is not None:
                self.root.close()
                self.root = None
            raise OutputFolderError(
                f"cannot write to output folder '{self.out_dir}': {exc.strerror or exc}"
            ) from None
        try:
            self.lock = _safeio.FolderLock(self.root, {"command": command_line}).acquire()
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Release the lock. A run that committed nothing removes what it wrote (``run.json``,
        empty ``batches/``), and the output folder if it created it and left it empty."""
        if self.root is not None and self._wrote_run_file and not self.committed:
            root = self.root
            with contextlib.suppress(OSError):
                root.unlink(RUN_FILE)
            for name in (BATCH_DIR, SHARD_DIR):
                root.rmdir_if_empty(name)
        if self.lock is not None:
            self.lock.release()
            self.lock = None
        if self.root is not None:
            self.root.close()
            self.root = None
        if self.created_out_dir:
            with contextlib.suppress(OSError):
                self.out_dir.rmdir()  # only when empty

    def __enter__(self) -> RunStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _root(self) -> SafeDir:
        if self.root is None:
            raise RuntimeError("RunStore.open() must be called first")
        return self.root

    def _sub(self, rel: str, create: bool = False) -> SafeDir:
        return self._root().sub(rel, create=create)

    @contextlib.contextmanager
    def _dir_of(
        self, rel: str, create: bool = False, created: list[str] | None = None
    ) -> Iterator[tuple[SafeDir, str]]:
        parent, name = _split(rel)
        if parent is None:
            yield self._root(), name
            return
        with self._root().sub(parent, create=create, created=created) as d:
            yield d, name

    # -- reading what is there -------------------------------------------------------------------

    def read_run(self) -> dict[str, Any] | None:
        """``run.json`` as a dict, ``None`` if absent.

        Raises:
            ExistingResultsError: unreadable, not written by augnet, or of another store format.
        """
        root = self._root()
        st = root.lstat(RUN_FILE)
        if st is None:
            return None
        where = f"'{self.run_file}'"
        try:
            run = json.loads(root.read_bytes(RUN_FILE))
        except (OSError, ValueError) as exc:
            raise ExistingResultsError(
                f"cannot read {where} ({exc}); it was not written by augnet or is damaged: move "
                "it away, or choose another output folder"
            ) from None
        if not isinstance(run, dict) or not isinstance(run.get("run_id"), str):
            fmt = run.get("augnet_store") if isinstance(run, dict) else None
            if fmt == 1:
                raise ExistingResultsError(
                    f"'{self.out_dir}' holds results of an earlier augnet (store format 1) whose "
                    "files cannot be proven to be augnet's; delete that folder yourself, or choose "
                    "another output folder"
                )
            raise ExistingResultsError(
                f"{where} was not written by augnet (no run id); move it away, or choose another "
                "output folder"
            )
        return run

    def _batch_ids(self, suffix: str = ".json") -> list[int]:
        try:
            d = self._sub(BATCH_DIR)
        except FileNotFoundError:
            return []
        with d:
            ids = []
            for name in d.listdir():
                stem = name[: -len(suffix)] if name.endswith(suffix) else ""
                if stem.isdigit() and len(stem) >= 6:
                    ids.append(int(stem))
            return sorted(ids)

    def read_record(self, batch_id: int, suffix: str = ".json") -> dict[str, Any]:
        """The record (or journal) of one batch, its paths checked.

        Raises:
            UnsafePathError: a path that leads outside the folder.
            ExistingResultsError: unreadable, or of another run.
        """
        name = _batch_name(batch_id) + suffix
        where = f"'{self.batch_dir / name}'"
        with self._sub(BATCH_DIR) as d:
            try:
                record = json.loads(d.read_bytes(name))
            except (OSError, ValueError) as exc:
                if isinstance(exc, UnsafePathError):
                    raise
                raise ExistingResultsError(
                    f"cannot read {where} ({exc}); move it away, or choose another output folder"
                ) from None
        if not isinstance(record, dict) or record.get("run_id") != self.run_id:
            raise ExistingResultsError(
                f"{where} does not belong to the run in '{self.run_file}' (another run id); "
                "augnet did not write it for this run: move it away, or choose another output "
                "folder"
            )
        files = record.get("files")
        if not isinstance(files, dict):
            raise ExistingResultsError(f"{where} is not an augnet batch record")
        for rel in files:
            _safeio.check_relative_path(rel, where=where, folder=self.out_dir)
        for rel in record.get("temps", []):
            parent, tmp = _split(str(rel))
            if parent is not None:
                _safeio.check_relative_path(parent, where=where, folder=self.out_dir)
            if not _safeio.is_temp_name(tmp):
                raise UnsafePathError(
                    f"{where} lists the temporary file {rel!r}, which augnet did not name; remove "
                    "that record, or choose another output folder"
                )
        if record.get("shard") is not None:
            if record["shard"] not in files:
                raise ExistingResultsError(f"{where} is not an augnet batch record")
        for entry in record.get("inputs", []):
            for rel in entry.get("files", []):
                if rel not in files:
                    raise ExistingResultsError(f"{where} is not an augnet batch record")
        return record

    def _proven(self, rel: str, digest: str) -> bool:
        """Whether the file ``rel`` exists with exactly the content augnet wrote (``digest``)."""
        try:
            with self._dir_of(rel) as (d, name):
                return d.hash(name) == digest
        except (FileNotFoundError, NotADirectoryError, UnsafePathError):
            return False

    def _delete_proven(self, files: Mapping[str, str], temps: Iterable[str] = ()) -> None:
        """Delete the files of ``files`` whose content is still what augnet wrote, and augnet's
        temporary files named in ``temps``; then their folders when empty."""
        folders = set()
        for rel, digest in files.items():
            if not self._proven(rel, digest):
                continue
            with self._dir_of(rel) as (d, name):
                with contextlib.suppress(FileNotFoundError):
                    d.unlink(name)
            if "/" in rel and _split(rel)[0] not in (SHARD_DIR, BATCH_DIR):
                folders.add(_split(rel)[0])
        for rel in temps:
            try:
                with self._dir_of(rel) as (d, name):
                    st = d.lstat(name)
                    if st is not None and stat.S_ISREG(st.st_mode):
                        d.unlink(name)
            except (FileNotFoundError, NotADirectoryError, UnsafePathError):
                pass
        for folder in sorted(folders, key=lambda p: -p.count("/")):
            parent, name = _split(folder)
            try:
                if parent is None:
                    self._root().rmdir_if_empty(name)
                else:
                    with self._sub(parent) as d:
                        d.rmdir_if_empty(name)
            except (FileNotFoundError, UnsafePathError):
                pass

    def exists(self, rel: str) -> bool:
        """Whether anything (a file, folder or link) is at ``rel`` in the folder."""
        try:
            with self._dir_of(rel) as (d, name):
                return d.lstat(name) is not None
        except (FileNotFoundError, NotADirectoryError):
            return False
        except UnsafePathError:
            return True

    def holds_files(self, name: str) -> bool:
        """Whether ``name`` in the folder is anything but absent or an empty folder."""
        return self._nonempty(name)

    def _nonempty(self, name: str) -> bool:
        st = self._root().lstat(name)
        if st is None:
            return False
        if not stat.S_ISDIR(st.st_mode):
            return True
        try:
            with self._sub(name) as d:
                return bool(d.listdir())
        except UnsafePathError:
            return True

    # -- before the run --------------------------------------------------------------------------

    def has_results(self) -> bool:
        """Whether the folder holds a run of augnet (``run.json`` or batch records)."""
        root = self._root()
        return (
            root.lstat(RUN_FILE) is not None
            or bool(self._batch_ids())
            or bool(self._batch_ids(_PENDING))
        )

    def prepare(
        self,
        settings: Mapping[str, Any],
        *,
        command: str = "jacobian",
        info: Mapping[str, Any] | None = None,
        resume: bool = False,
        overwrite: bool = False,
        planned_names: Iterable[str] = (),
    ) -> list[int]:
        """Check the folder against this run; returns the batch ids already committed (resume).

        Nothing is written or deleted unless the checks pass.

        Args:
            settings: JSON-able settings of this run; ``resume`` requires the same.
            command: who runs (``"jacobian"``, ``"demo"``), kept in ``run.json``.
            info: more JSON-able fields for ``run.json`` (informational, not compared: e.g. the
                model's file name, the input root relative to the output folder).
            resume: continue the run in this folder.
            overwrite: replace the run in this folder (and files of the user in the way).
            planned_names: the per-input folders this run will write; one that exists and is not
                empty means files of the user are in the way (refused without ``overwrite``).

        Raises:
            ExistingResultsError: results or files in the way and neither flag allows it.
            SettingsMismatchError: ``resume`` with different settings.
            UnsafePathError: a record lists a path outside the folder.
        """
        settings = json.loads(json.dumps(dict(settings)))  # tuples -> lists
        run = self.read_run()
        records = self._batch_ids()
        pendings = self._batch_ids(_PENDING)
        previous = run is not None or bool(records) or bool(pendings)
        if previous and not (resume or overwrite):
            raise ExistingResultsError(
                f"'{self.out_dir}' already holds results; pass --resume to continue that run or "
                "--overwrite to replace it"
            )
        if run is None and (records or pendings):
            raise ExistingResultsError(
                f"'{self.batch_dir}' holds batch records but '{self.run_file}' is missing, so "
                "augnet cannot prove they are its own: move them away, or choose another output "
                "folder"
            )
        if run is None and not overwrite:
            for name in planned_names:
                if self._nonempty(name):
                    raise ExistingResultsError(
                        f"'{self.out_dir / name}' already exists; pass --overwrite to replace it "
                        "or choose another --out"
                    )
            report = (REPORT_FILE, REPORT_DIR) if not _report_is_augnets(self.out_dir) else ()
            for name in (SUMMARY_FILE, SHARD_DIR, BATCH_DIR, *report):
                if self._nonempty(name):
                    raise ExistingResultsError(
                        f"'{self.out_dir / name}' already exists and augnet did not write it; "
                        "pass --overwrite to replace it, or choose another output folder"
                    )
        if run is not None and resume and not overwrite:
            old = run.get("settings")
            if old != settings:
                diffs = [
                    f"{k}: {old.get(k)!r} -> {settings.get(k)!r}"
                    for k in sorted(set(old or {}) | set(settings))
                    if (old or {}).get(k) != settings.get(k)
                ]
                raise SettingsMismatchError(
                    f"cannot resume the run in '{self.out_dir}' with different settings "
                    f"({'; '.join(diffs)}); use the same options, or --overwrite"
                )
            self.run_id = run["run_id"]
            self.resolved = dict(run.get("resolved") or {})
            self._run_header = run
            journals = [self.read_record(b, _PENDING) for b in pendings]  # checked first
            for journal in journals:
                self._recover(journal, committed=journal["batch"] in records)
            self.committed = set(records)  # each record is checked when it is read
        else:
            if run is not None:
                self._replace_previous(run, records, pendings)
            root = self._root()
            st = root.lstat(SUMMARY_FILE)
            if st is not None and not stat.S_ISDIR(st.st_mode):
                root.unlink(SUMMARY_FILE)  # --overwrite (a file of the user was refused above)
            self.run_id = _run_id(command, settings)
            self._run_header = {
                "augnet_store": STORE_FORMAT,
                "run_id": self.run_id,
                "command": command,
                **dict(info or {}),
                "settings": settings,
                "resolved": {},
            }
        for folder in (None, BATCH_DIR, SHARD_DIR):
            self._remove_temps(folder)
        self._settings = settings
        self._summary_ok = not self.committed  # resume: the runner rewrites it from the records
        return sorted(self.committed)

    def _replace_previous(self, run, records: list[int], pendings: list[int]) -> None:
        """``--overwrite``: delete the files the previous run can be proven to have written."""
        self.run_id = run["run_id"]
        docs = [(b, self.read_record(b)) for b in records]  # all checked before any deletion
        docs += [(b, self.read_record(b, _PENDING)) for b in pendings]
        for _, doc in docs:
            self._delete_proven(doc["files"], doc.get("temps", ()))
        with self._sub(BATCH_DIR) as d:
            for b in records:
                d.unlink(_batch_name(b) + ".json")
            for b in pendings:
                d.unlink(_batch_name(b) + _PENDING)
        root = self._root()
        for name in (RUN_FILE, SUMMARY_FILE):
            st = root.lstat(name)
            if st is not None and stat.S_ISREG(st.st_mode):
                root.unlink(name)

    def _recover(self, journal: dict[str, Any], *, committed: bool) -> None:
        """Clean up after a process killed while committing a batch (from its journal)."""
        if not committed:
            self._delete_proven(journal["files"], journal.get("temps", ()))
        else:
            self._delete_proven({}, journal.get("temps", ()))
        with self._sub(BATCH_DIR) as d:
            d.unlink(_batch_name(journal["batch"]) + _PENDING)

    def _remove_temps(self, folder: str | None) -> None:
        try:
            d = self._root() if folder is None else self._sub(folder)
        except (FileNotFoundError, UnsafePathError):
            return
        try:
            for name in d.listdir():
                st = d.lstat(name)
                if _safeio.is_temp_name(name) and st is not None and stat.S_ISREG(st.st_mode):
                    d.unlink(name)
        finally:
            if folder is not None:
                d.close()

    def record_is_complete(self, record: Mapping[str, Any]) -> bool:
        """Whether every file a record lists is still there (a regular file)."""
        for rel in record["files"]:
            try:
                with self._dir_of(rel) as (d, name):
                    st = d.lstat(name)
            except (FileNotFoundError, NotADirectoryError, UnsafePathError):
                return False
            if st is None or not stat.S_ISREG(st.st_mode):
                return False
        return True

    def discard(self, batch_id: int) -> None:
        """Delete a committed batch: its provable files, then its record."""
        if batch_id not in self.committed:
            return
        record = self.read_record(batch_id)
        self._delete_proven(record["files"])
        with self._sub(BATCH_DIR) as d:
            d.unlink(_batch_name(batch_id) + ".json")
        self.committed.discard(batch_id)
        self._summary_ok = False

    def check_free(self, rels: Iterable[str]) -> None:
        """Refuse (before any work) if a path this run writes holds something augnet cannot
        prove it wrote: a file of the user, or a link.

        Raises:
            ExistingResultsError: naming the first such path.
        """
        for rel in rels:
            if self.exists(rel):
                raise ExistingResultsError(
                    f"'{self.out_dir / rel}' already exists and is not in this run's records; "
                    "augnet does not replace files it cannot prove it wrote: move it away, or "
                    "pass --overwrite"
                )

    def set_resolved(self, key: str, value: Any) -> None:
        """Record a choice made during the run (e.g. the strategy), kept for ``--resume``."""
        self.resolved[key] = json.loads(json.dumps(value))
        if self._root().lstat(RUN_FILE) is not None:
            self._write_run_file()

    def _write_run_file(self) -> None:
        header = dict(self._run_header, resolved=self.resolved)
        self._run_header = header
        self._root().write_atomic(RUN_FILE, _json_bytes(header), fsync=True)

    # -- during the run --------------------------------------------------------------------------

    def commit(self, result: BatchResult) -> bool:
        """Write one computed batch: its pictures, its shard, then its record (the commit point),
        then its ``summary.jsonl`` lines. Idempotent by batch id.

        Returns:
            ``True`` if written; ``False`` if this batch was already committed (a batch computed
            twice, e.g. by a worker that died and by its replacement): nothing is written then.

        Raises:
            OSError: a full disk, naming the file; the batch's files are removed again.
        """
        if self._settings is None:
            raise RuntimeError("RunStore.prepare() must be called before committing a batch")
        b = int(result.batch_id)
        if b in self.committed:
            return False
        files: dict[str, bytes] = {}
        for inp in result.inputs:
            for rel, data in inp.files.items():
                _safeio.check_relative_path(rel, where="a computed batch", folder=self.out_dir)
                files[rel] = data
        shard_rel = None
        if result.jacobian is not None:
            if len(result.jacobian) != len(result.inputs):
                raise ValueError(
                    f"jacobian has {len(result.jacobian)} rows for {len(result.inputs)} inputs"
                )
            shard_rel = f"{SHARD_DIR}/{_batch_name(b)}.npy"
            files[shard_rel] = npy_bytes(np.asarray(result.jacobian, dtype=np.float32))
        digests = {rel: _safeio.hash_bytes(data) for rel, data in files.items()}
        temps = {rel: _safeio.temp_name(_split(rel)[1]) for rel in files}
        root = self._root()
        if root.lstat(RUN_FILE) is None:
            self._write_run_file()
            self._wrote_run_file = True
        with self._sub(BATCH_DIR, create=True) as batches:
            journal = {
                "run_id": self.run_id,
                "batch": b,
                "files": digests,
                "temps": [
                    (f"{_split(rel)[0]}/{t}" if "/" in rel else t) for rel, t in temps.items()
                ],
            }
            # not flushed: a killed process leaves its page cache written; only a power cut could
            # lose the journal (then its files, unprovable, are refused, never deleted)
            batches.write_atomic(_batch_name(b) + _PENDING, _json_bytes(journal))
            written: list[str] = []
            created: list[str] = []
            try:
                for rel, data in files.items():
                    with self._dir_of(rel, create=True, created=created) as (d, name):
                        d.write_atomic(name, data, tmp=temps[rel], fsync=rel == shard_rel)
                    written.append(rel)
                record = {
                    "augnet_store": STORE_FORMAT,
                    "run_id": self.run_id,
                    "batch": b,
                    "inputs": [
                        {
                            "key": inp.key,
                            "name": inp.name,
                            "fingerprint": inp.fingerprint,
                            "outputs": [int(o) for o in inp.outputs],
                            "files": list(inp.files),
                            "summary": inp.summary,
                        }
                        for inp in result.inputs
                    ],
                    "shard": shard_rel,
                    "files": digests,
                }
                batches.write_atomic(_batch_name(b) + ".json", _json_bytes(record), fsync=True)
            except BaseException:
                self._delete_proven({rel: digests[rel] for rel in written})
                for folder in sorted(created, key=lambda p: -p.count("/")):
                    parent, name = _split(folder)
                    with contextlib.suppress(OSError):
                        if parent is None:
                            root.rmdir_if_empty(name)
                        else:
                            with self._sub(parent) as d:
                                d.rmdir_if_empty(name)
                with contextlib.suppress(OSError):
                    batches.unlink(_batch_name(b) + _PENDING)
                raise
            with contextlib.suppress(OSError):
                batches.unlink(_batch_name(b) + _PENDING)
        self.committed.add(b)
        self.committed_now += 1
        lines = b"".join(
            json.dumps(inp.summary, sort_keys=False).encode("utf-8") + b"\n"
            for inp in result.inputs
        )
        # summary.jsonl stays in input order while batches are committed in order
        self._summary_ok = self._summary_ok and b > max(self.committed - {b}, default=-1)
        root.append(SUMMARY_FILE, lines)
        return True

    def rewrite_summary(self) -> Path:
        """Rewrite ``summary.jsonl`` from the records, in input order (streamed, one record at a
        time), atomically; remove it when no batch is committed."""
        root = self._root()
        if not self.committed:
            st = root.lstat(SUMMARY_FILE)
            if st is not None and stat.S_ISREG(st.st_mode):
                root.unlink(SUMMARY_FILE)
            self._summary_ok = True
            return self.summary_file
        fd, tmp = root.create_temp(SUMMARY_FILE)
        try:
            try:
                for b in sorted(self.committed):
                    record = self.read_record(b)
                    data = b"".join(
                        json.dumps(e["summary"], sort_keys=False).encode("utf-8") + b"\n"
                        for e in record["inputs"]
                    )
                    _safeio._write(fd, data)
            finally:
                os.close(fd)
            root.publish(tmp, SUMMARY_FILE)
        except BaseException as exc:
            root.discard(tmp)
            if isinstance(exc, OSError):
                raise _safeio.named(exc, self.summary_file) from None
            raise
        self._summary_ok = True
        return self.summary_file

    def finish(self) -> None:
        """End of the run: ``summary.jsonl`` lists every committed input once, in input order
        (rewritten from the records only when batches were committed out of order)."""
        if not self._summary_ok:
            self.rewrite_summary()


def _report_is_augnets(out_dir: Path) -> bool:
    """Whether ``index.html``/``index_files`` are absent or augnet's own report page (e.g. left
    by a run killed before its first batch finished): the run rewrites it, a page of the user is
    refused."""
    from augnet._html import owns_report

    return owns_report(out_dir)


def _run_id(command: str, settings: Mapping[str, Any]) -> str:
    """The run's id: a digest of its command and the settings that shape its results (the
    model's content included; not the strategy asked for, as ``auto`` resolves to a concrete one
    kept in ``run.json``).

    Deterministic, so that the same run (the demo on a fresh clone) writes the same bytes; every
    record and journal carries it, and a record without it is not this run's.
    """
    shaping = {k: v for k, v in settings.items() if k != "strategy"}
    text = json.dumps({"command": command, "settings": shaping}, sort_keys=True)
    return _safeio.hash_bytes(text.encode("utf-8"))[3:19]


# jacobian_to_npy's file (checked before any work, streamed into place) lives in augnet._npyfile;
# the engine calls it as augnet._store.write_npy_stream.
from augnet._npyfile import disk_free, write_npy_stream  # noqa: E402, F401

# Reading a run folder lives in augnet._results (kept importable from here).
from augnet._results import StoredResults, load_results, read_run_header  # noqa: E402, F401
