"""Result files for a run over a data set: atomic writes, a batch log, ``.npy`` shards, resume.

Layout of an output folder written by ``augnet jacobian ... --out OUT``::

    OUT/
      run.json                 the run's settings (model, outputs, preprocessing, ...) and the
                               choices made on its first batch (``resolved``), reused on resume
      batches/000000.json      one commit record per finished batch (see below)
      jacobians/000000.npy     raw Jacobians of that batch, float32 (b, k, *input_shape)
                               (only with --format npy)
      summary.jsonl            one JSON line per input, rewritten at the end of the run
      <name>/output_3.png ...  per-input pictures (written by the command line)

**Why ``.npy`` shards and not one HDF5 file.** A process killed while HDF5 is writing can leave the
whole file unreadable, losing every batch already finished; SWMR avoids that only with care from
every reader. Here every file is written under a temporary hidden name (``.NAME.tmp-PID-XXXX``)
and renamed into place with :func:`os.replace`, which is atomic: a file either does not exist or
is complete. The batch's shard and pictures are written first and its commit record
``batches/NNNNNN.json`` last; a batch without its record never happened (its files are removed
when the batch fails, and rewritten on resume). Together the records are the index of the
store: :func:`load_results` reads them, and can do so while a run is still adding batches. The
shards are plain ``.npy`` files that ``np.load(..., mmap_mode="r")`` opens without reading them.

**Resume.** Each record lists its inputs with a fingerprint (absolute path, row of a ``.npy``
input, file size and modification time in nanoseconds). ``--resume`` skips inputs whose latest
record matches their current fingerprint and computes the rest, in the same order and the same
batches as an uninterrupted run would, so the raw results are byte-identical. It refuses when the
settings in ``run.json`` differ from the new ones (other outputs, preprocessing, batch size, ...).

**Overwriting.** A folder that already holds results (``run.json``, a batch record, or a
per-input folder the run would write) is refused unless ``--overwrite`` or ``--resume`` is given.
``--overwrite`` first deletes the files the previous run's records list.

**Durability.** Files survive the process being killed at any moment (Ctrl-C, ``kill -9``, a full
disk). Commit records and shards are flushed to disk with ``fsync``; pictures are not (speed), so
a power cut can lose pictures of the last batches.

This module uses NumPy and the standard library only.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import secrets
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

RUN_FILE = "run.json"
BATCH_DIR = "batches"
SHARD_DIR = "jacobians"
SUMMARY_FILE = "summary.jsonl"
RESERVED_NAMES = (RUN_FILE, BATCH_DIR, SHARD_DIR, SUMMARY_FILE)  # no input may be named so
STORE_FORMAT = 1
_TMP_MARK = ".tmp-"


class ExistingResultsError(ValueError):
    """The output folder already holds results and neither overwrite nor resume was asked for."""


class SettingsMismatchError(ValueError):
    """``--resume`` with settings that differ from those of the run being resumed."""


class OutputFolderError(OSError):
    """The output folder cannot be created or written."""


# --------------------------------------------------------------------------------------------
# Atomic writes
# --------------------------------------------------------------------------------------------


def temp_path_for(path: str | os.PathLike[str]) -> Path:
    """A hidden temporary name beside ``path`` that keeps its suffix (``.x.tmp-PID-HEX.png``)."""
    path = Path(path)
    return path.with_name(
        f".{path.stem}{_TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}{path.suffix}"
    )


def _with_filename(exc: OSError, path: Path) -> OSError:
    if exc.filename is None:
        new = OSError(exc.errno, exc.strerror or str(exc), str(path))
        new.__cause__ = exc
        return new
    return exc


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path to write; on success rename it to ``path``, on failure delete it.

    Example:
        >>> with atomic_path("out/sheet.png") as tmp:  # doctest: +SKIP
        ...     figure.savefig(tmp)
    """
    path = Path(path)
    tmp = temp_path_for(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, OSError):
            raise _with_filename(exc, path) from exc.__cause__
        raise


def write_bytes(path: Path, data: bytes, *, fsync: bool = False) -> None:
    """Write ``data`` to ``path`` (plain, not atomic; :func:`atomic_write_bytes` wraps it)."""
    with open(path, "wb") as f:
        f.write(data)
        if fsync:
            f.flush()
            os.fsync(f.fileno())


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *, fsync: bool = False) -> Path:
    """Write ``data`` to ``path`` atomically (temporary name, then :func:`os.replace`)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        write_bytes(tmp, data, fsync=fsync)
    return path


def atomic_write_json(path: str | os.PathLike[str], obj: Any, *, fsync: bool = True) -> Path:
    """Write ``obj`` as compact JSON (keys in insertion order, so deterministic), atomically."""
    text = json.dumps(obj, separators=(",", ":"), allow_nan=True) + "\n"
    return atomic_write_bytes(path, text.encode("utf-8"), fsync=fsync)


def atomic_save_npy(path: str | os.PathLike[str], array: np.ndarray, *, fsync: bool = True) -> Path:
    """Save ``array`` as ``.npy`` atomically."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return atomic_write_bytes(path, buffer.getvalue(), fsync=fsync)


def atomic_save_png(path: str | os.PathLike[str], pixels: np.ndarray) -> Path:
    """Save a uint8 ``(height, width)`` or ``(height, width, 3|4)`` image as PNG atomically."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, format="PNG")
    return atomic_write_bytes(path, buffer.getvalue())


# --------------------------------------------------------------------------------------------
# The run store
# --------------------------------------------------------------------------------------------


def fingerprint(path: str | os.PathLike[str], row: int | None = None) -> dict[str, Any]:
    """Identity of an input file for resume: absolute path, row, size and mtime (nanoseconds).

    The path is made absolute without resolving symbolic links (as :func:`expand_inputs` does).
    """
    st = os.stat(path)
    return {
        "path": os.path.abspath(path),
        "row": row,
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
    }


def _fp_key(fp: Mapping[str, Any]) -> str:
    return fp["path"] if fp.get("row") is None else f"{fp['path']}[{fp['row']}]"


def _fp_same(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    return all(a.get(k) == b.get(k) for k in ("path", "row", "size", "mtime_ns"))


def _read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _batch_files(batch_dir: Path) -> list[Path]:
    if not batch_dir.is_dir():
        return []
    return sorted(
        p
        for p in batch_dir.iterdir()
        if p.suffix == ".json" and p.stem.isdigit() and not p.name.startswith(".")
    )


def _is_temp(p: Path) -> bool:
    """A temporary file of an atomic write (ours: ``.x.tmp-PID-HEX.png``; pictures written by
    ``augnet._render``/``_report``: ``.x.png.RANDOM.tmp``)."""
    return p.name.startswith(".") and (_TMP_MARK in p.name or p.name.endswith(".tmp"))


def remove_temp_files(folder: str | os.PathLike[str]) -> None:
    """Delete temporary files left in ``folder`` by a process killed while writing."""
    folder = Path(folder)
    if folder.is_dir():
        for p in folder.iterdir():
            if _is_temp(p):
                with contextlib.suppress(OSError):
                    p.unlink()


class RunStore:
    """The files of one run in one output folder. See the module docstring for the layout.

    Example:
        >>> store = RunStore("results")  # doctest: +SKIP
        >>> done = store.prepare(settings, resume=True, overwrite=False)
        >>> with store.batch() as batch:
        ...     batch.save_png(store.out_dir / "cat" / "output_0.png", pixels)
        ...     batch.commit(entries, jacobian=values)
    """

    def __init__(self, out_dir: str | os.PathLike[str]):
        self.out_dir = Path(out_dir)
        self.run_file = self.out_dir / RUN_FILE
        self.batch_dir = self.out_dir / BATCH_DIR
        self.shard_dir = self.out_dir / SHARD_DIR
        self.summary_file = self.out_dir / SUMMARY_FILE
        self._settings: dict[str, Any] | None = None
        self.resolved: dict[str, Any] = {}  # choices made during the run, kept for --resume
        self._next_batch = 0
        self._latest: dict[str, dict[str, Any]] = {}
        self._created_out_dir = False

    # -- before the run ------------------------------------------------------------------------

    def check_writable(self) -> None:
        """Create the output folder if needed and check that a file can be written in it.

        Raises:
            OutputFolderError: naming the folder and the reason.
        """
        try:
            if not self.out_dir.is_dir():
                self.out_dir.mkdir(parents=True, exist_ok=True)
                self._created_out_dir = True
            probe = temp_path_for(self.out_dir / "probe")
            write_bytes(probe, b"")
            probe.unlink()
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise OutputFolderError(
                f"cannot write to output folder '{self.out_dir}': {reason}"
            ) from None

    def has_results(self) -> bool:
        return self.run_file.exists() or bool(_batch_files(self.batch_dir))

    def prepare(
        self,
        settings: Mapping[str, Any],
        *,
        resume: bool = False,
        overwrite: bool = False,
        planned_paths: Iterable[Path] = (),
    ) -> dict[str, dict[str, Any]]:
        """Check the folder and return the inputs already finished (empty unless resuming).

        Nothing is written or deleted unless this returns (and ``overwrite`` deletes the previous
        run's files only then).

        Args:
            settings: JSON-able settings of this run; ``--resume`` requires the same.
            resume: continue a previous run in this folder.
            overwrite: replace a previous run's results.
            planned_paths: per-input paths the run will write; any that exists means the folder
                holds results (from a run without records) and is refused without ``overwrite``.

        Returns:
            ``{input_key: entry}`` of the latest finished entry per input (see :meth:`is_done`).

        Raises:
            OutputFolderError: the folder cannot be written.
            ExistingResultsError: results exist and neither ``resume`` nor ``overwrite`` is set.
            SettingsMismatchError: ``resume`` with different settings.
        """
        settings = json.loads(json.dumps(dict(settings)))  # normalise tuples -> lists
        self.check_writable()
        previous = self.has_results()
        if previous and not (resume or overwrite):
            raise ExistingResultsError(
                f"'{self.out_dir}' already holds results; pass --resume to continue that run or "
                "--overwrite to replace it"
            )
        if not previous and not overwrite:
            for p in planned_paths:
                if p.exists() and (not p.is_dir() or any(p.iterdir())):
                    raise ExistingResultsError(
                        f"'{p}' already exists; pass --overwrite to replace it or choose another --out"
                    )
        if previous and resume and not overwrite:
            old = self._read_settings()
            if old is not None and old != settings:
                diffs = [
                    f"{k}: {old.get(k)!r} -> {settings.get(k)!r}"
                    for k in sorted(set(old) | set(settings))
                    if old.get(k) != settings.get(k)
                ]
                raise SettingsMismatchError(
                    f"cannot resume the run in '{self.out_dir}' with different settings "
                    f"({'; '.join(diffs)}); use the same options, or --overwrite"
                )
            self.resolved = self._read_run().get("resolved", {})
            self._load_records()
        elif previous and overwrite:
            self._delete_previous()
        self._cleanup_temp_files()
        self._settings = settings
        return dict(self._latest)

    def _read_run(self) -> dict[str, Any]:
        if not self.run_file.exists():
            return {}
        try:
            return _read_json(self.run_file)
        except (OSError, ValueError) as exc:
            raise ExistingResultsError(
                f"cannot read '{self.run_file}' ({exc}); use --overwrite to start again"
            ) from None

    def _read_settings(self) -> dict[str, Any] | None:
        return self._read_run().get("settings")

    def _load_records(self) -> None:
        for f in _batch_files(self.batch_dir):
            record = _read_json(f)
            self._next_batch = max(self._next_batch, int(f.stem) + 1)
            for entry in record["inputs"]:
                self._latest[entry["key"]] = entry

    def _delete_previous(self) -> None:
        files = _batch_files(self.batch_dir)
        for f in files:
            try:
                record = _read_json(f)
            except (OSError, ValueError):
                continue
            for entry in record.get("inputs", []):
                for rel in entry.get("files", []):
                    target = self.out_dir / rel
                    with contextlib.suppress(OSError):
                        target.unlink()
                    with contextlib.suppress(OSError):
                        target.parent.rmdir()  # only if now empty
            if record.get("shard"):
                with contextlib.suppress(OSError):
                    (self.out_dir / record["shard"]).unlink()
        for f in files:
            f.unlink()
        for p in (self.run_file, self.summary_file):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()

    def _cleanup_temp_files(self) -> None:
        for d in (self.out_dir, self.batch_dir, self.shard_dir):
            remove_temp_files(d)

    def is_done(self, key: str, fp: Mapping[str, Any]) -> bool:
        """Whether input ``key`` has a finished entry with the same fingerprint."""
        entry = self._latest.get(key)
        return entry is not None and _fp_same(entry, fp)

    # -- during the run ------------------------------------------------------------------------

    @contextlib.contextmanager
    def batch(self) -> Iterator[_Batch]:
        """A batch of files that become part of the results only when :meth:`_Batch.commit` runs.

        If the block raises (including ``KeyboardInterrupt``) before the commit, every file the
        batch wrote is deleted, and folders it created are removed when empty.
        """
        b = _Batch(self)
        try:
            yield b
        except BaseException:
            b._abort()
            raise

    def _commit(self, entries: Sequence[Mapping[str, Any]], jacobian: np.ndarray | None, b: _Batch):
        if self._settings is None:
            raise RuntimeError("RunStore.prepare() must be called before committing a batch")
        number = self._next_batch
        shard = None
        if jacobian is not None:
            if len(jacobian) != len(entries):
                raise ValueError(
                    f"jacobian has {len(jacobian)} rows for {len(entries)} inputs in the batch"
                )
            self.shard_dir.mkdir(exist_ok=True)
            shard_path = self.shard_dir / f"{number:06d}.npy"
            b.files.append(shard_path)
            atomic_save_npy(shard_path, np.asarray(jacobian, dtype=np.float32))
            shard = f"{SHARD_DIR}/{shard_path.name}"
        if not self.run_file.exists():
            atomic_write_json(
                self.run_file,
                {
                    "augnet_store": STORE_FORMAT,
                    "settings": self._settings,
                    "resolved": json.loads(json.dumps(self.resolved)),
                },
            )
        self.batch_dir.mkdir(exist_ok=True)
        record = {
            "batch": number,
            "shard": shard,
            "inputs": [dict(e) for e in entries],
        }
        record = json.loads(json.dumps(record))
        atomic_write_json(self.batch_dir / f"{number:06d}.json", record)  # the commit point
        self._next_batch = number + 1
        for entry in record["inputs"]:
            self._latest[entry["key"]] = entry
        return record

    def write_summary(self, keys: Iterable[str]) -> Path:
        """Rewrite ``summary.jsonl`` (atomically): the summary of each finished input, in order."""
        lines = []
        for key in keys:
            entry = self._latest.get(key)
            if entry is not None and "summary" in entry:
                lines.append(json.dumps(entry["summary"], sort_keys=False))
        text = "".join(line + "\n" for line in lines)
        return atomic_write_bytes(self.summary_file, text.encode("utf-8"))

    def remove_if_empty(self) -> None:
        """Remove the output folder if this store created it and it is still empty."""
        if self._created_out_dir:
            with contextlib.suppress(OSError):
                self.out_dir.rmdir()


class _Batch:
    """Files written for one batch; see :meth:`RunStore.batch`."""

    def __init__(self, store: RunStore):
        self.store = store
        self.files: list[Path] = []
        self.dirs: list[Path] = []
        self.committed = False

    def adopt(self, path: str | os.PathLike[str]) -> Path:
        """Count a file written by other code (atomically) as part of the batch: its folder is
        created now, and the file is deleted if the batch fails."""
        path = Path(path)
        self.files.append(path)
        self.makedirs(path.parent)
        return path

    def makedirs(self, folder: Path) -> Path:
        """Create ``folder`` (and parents) if missing; remembered for clean-up on failure."""
        folder = Path(folder)
        missing = []
        p = folder
        while not p.exists():
            missing.append(p)
            if p.parent == p:
                break
            p = p.parent
        folder.mkdir(parents=True, exist_ok=True)
        self.dirs.extend(missing)
        return folder

    def path(self, path: str | os.PathLike[str]) -> contextlib.AbstractContextManager[Path]:
        """Like :func:`atomic_path`, and the file is deleted if the batch fails."""
        self.adopt(path)
        return atomic_path(path)

    def save_png(self, path: str | os.PathLike[str], pixels: np.ndarray) -> Path:
        self.adopt(path)
        return atomic_save_png(path, pixels)

    def commit(
        self, entries: Sequence[Mapping[str, Any]], jacobian: np.ndarray | None = None
    ) -> dict[str, Any]:
        """Write the shard (if any), then the commit record. Returns the record.

        Args:
            entries: one dict per input, each with at least ``key`` and the fingerprint fields
                (:func:`fingerprint`); ``files`` (paths relative to the output folder),
                ``outputs`` and ``summary`` are stored too.
            jacobian: the batch's raw Jacobian ``(b, k, *input_shape)``, or ``None``.
        """
        record = self.store._commit(entries, jacobian, self)
        self.committed = True
        return record

    def _abort(self) -> None:
        if self.committed:
            return
        for f in reversed(self.files):
            with contextlib.suppress(OSError):
                f.unlink()
        for d in reversed(sorted(set(self.dirs), key=lambda p: len(p.parts))):
            with contextlib.suppress(OSError):
                d.rmdir()


# --------------------------------------------------------------------------------------------
# Reading a store (also while a run is still writing it)
# --------------------------------------------------------------------------------------------


class StoredResults:
    """The finished inputs of a run folder, read from its commit records.

    Attributes:
        out_dir: the folder.
        settings: the run's settings (``run.json``), or ``None`` if not written yet.
        entries: one dict per finished input (the latest entry per input key), in commit order;
            each has ``key``, ``name``, ``path``, ``row``, ``outputs``, ``files``, ``summary``,
            and ``shard``/``shard_row`` when raw Jacobians were stored.

    Example:
        >>> results = load_results("jacobian_results")  # doctest: +SKIP
        >>> results.jacobian(0).shape  # (k, *input_shape) of the first input
        (3, 16, 16, 1)
        >>> results.to_array().shape  # (n_inputs, k, *input_shape)
        (120, 3, 16, 16, 1)
    """

    def __init__(self, out_dir: Path, settings: dict[str, Any] | None, entries: list[dict]):
        self.out_dir = out_dir
        self.settings = settings
        self.entries = entries
        self._index = {e["key"]: i for i, e in enumerate(entries)}

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def keys(self) -> list[str]:
        return [e["key"] for e in self.entries]

    def _shard(self, rel: str) -> np.ndarray:
        return np.load(self.out_dir / rel, mmap_mode="r", allow_pickle=False)

    def jacobian(self, which: int | str) -> np.ndarray:
        """Raw Jacobian ``(k, *input_shape)`` of one input, by position or key (memory-mapped)."""
        entry = self.entries[self._index[which] if isinstance(which, str) else which]
        if entry.get("shard") is None:
            raise ValueError(
                f"no raw Jacobian was stored for '{entry['key']}'; run with --format npy"
            )
        return self._shard(entry["shard"])[entry["shard_row"]]

    def to_array(self) -> np.ndarray:
        """All raw Jacobians, ``(n_inputs, k, *input_shape)`` float32 (loads them into memory)."""
        if not self.entries:
            return np.zeros((0,), dtype=np.float32)
        return np.stack([np.asarray(self.jacobian(i)) for i in range(len(self))])


def load_results(out_dir: str | os.PathLike[str]) -> StoredResults:
    """Read the finished part of a run folder (safe while the run is still writing it).

    Only committed batches are seen: each record is written after its shard, both atomically.
    """
    out_dir = Path(out_dir)
    run_file = out_dir / RUN_FILE
    settings = _read_json(run_file).get("settings") if run_file.exists() else None
    latest: dict[str, dict[str, Any]] = {}
    for f in _batch_files(out_dir / BATCH_DIR):
        record = _read_json(f)
        for i, entry in enumerate(record["inputs"]):
            entry = dict(entry, shard=record.get("shard"), shard_row=i)
            latest.pop(entry["key"], None)  # a recomputed input moves to its latest position
            latest[entry["key"]] = entry
    return StoredResults(out_dir, settings, list(latest.values()))
