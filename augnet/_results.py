"""Reading a run folder: its finished inputs and raw Jacobians, also while a run still writes it.

``load_results(OUT)`` reads the commit records of the folder's run (``OUT/run.json`` names it) and
checks every path in them (inside the folder, no symbolic link on the way) before anything is
opened; see augnet/_store.py for the layout. NumPy and the standard library only.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from augnet import _safeio
from augnet._safeio import SafeDir, UnsafePathError

RUN_FILE = "run.json"


class StoredResults:
    """The finished inputs of a run folder, read from its commit records.

    Attributes:
        out_dir: the folder.
        settings: the run's settings (``run.json``), or ``None`` if not written yet.
        entries: one dict per finished input, in input order; each has ``key``, ``name``,
            ``fingerprint``, ``outputs``, ``files``, ``summary``, and ``shard``/``shard_row`` when
            raw Jacobians were stored.

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

    def path(self, rel: str) -> Path:
        """The file ``rel`` of a record, checked: inside the folder, reached without a link."""
        _safeio.check_relative_path(rel, where=f"a record in '{self.out_dir}'", folder=self.out_dir)
        path = self.out_dir
        for part in rel.split("/"):
            path = path / part
            if path.is_symlink():
                raise UnsafePathError(
                    f"'{path}' is a symbolic link; augnet did not write it and does not follow it"
                )
        return path

    def _shard(self, rel: str) -> np.ndarray:
        return np.load(self.path(rel), mmap_mode="r", allow_pickle=False)

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

    Only committed batches of the folder's run are seen (each record is written after its files);
    a record that lists a path outside the folder raises ``UnsafePathError``.
    """
    from augnet._store import RunStore

    out_dir = Path(out_dir)
    store = RunStore(out_dir)
    store.root = SafeDir.open(out_dir)
    store.root.display = str(out_dir)
    try:
        run = store.read_run()
        if run is None:
            return StoredResults(out_dir, None, [])
        store.run_id = run["run_id"]
        entries = []
        for b in store._batch_ids():
            record = store.read_record(b)
            for i, entry in enumerate(record["inputs"]):
                entries.append(dict(entry, shard=record.get("shard"), shard_row=i))
        return StoredResults(out_dir, run.get("settings"), entries)
    finally:
        store.root.close()


def read_run_header(out_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """``OUT/run.json`` as a dict (read without the lock and without following a link), or
    ``None`` when it is absent or unreadable."""
    try:
        with SafeDir.open(out_dir) as folder:
            data = folder.read_bytes(RUN_FILE)
        obj = json.loads(data)
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None
