"""Safe file writing: atomic, exclusive, inside one folder, never through a symbolic link.

Every file augnet writes goes through this module (results folders, saliency PNGs, contact sheets,
``jacobian_to_npy``), so that these promises hold everywhere:

* **Atomic.** A file is written under a temporary name and renamed into place: it is either absent
  or complete, also when the process is killed.
* **Exclusive, unpredictable temporary names** (``.NAME.tmp-<16 random hex digits>``), created with
  ``O_CREAT | O_EXCL | O_NOFOLLOW``: a file or a symbolic link planted at a guessable name is never
  written to or through.
* **No symbolic links followed inside a folder.** A :class:`SafeDir` is a folder opened once (a
  file descriptor); names and subfolders inside it are opened relative to it with ``O_NOFOLLOW``,
  so a symbolic link planted inside an output folder (``out/batches -> /elsewhere``) stops the
  write with :class:`UnsafePathError` instead of sending it outside. The folder the user names
  itself (``--out``, ``out_dir``) may be a link: the user chose it.
* **Modes follow the umask**, like any ordinary file (``0o666 & ~umask``; folders ``0o777``).
* **Paths read back from records** are checked by :func:`check_relative_path`: relative, no
  ``..``, no absolute path, no empty or hidden component.
* **One run per folder.** :class:`FolderLock` holds an advisory lock (``flock``) on a hidden
  ``.augnet.lock`` file; the kernel drops it when the process dies, even on ``kill -9``.

Content fingerprints (:func:`hash_bytes`, :func:`hash_file`) are BLAKE2b-128 digests, written as
``"b2:<32 hex digits>"``: about 1 GB/s on one core.

Standard library only.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import secrets
import socket
import stat
import time
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

try:  # POSIX
    import fcntl
except ImportError:  # pragma: no cover - Windows: the lock degrades to an exclusive-create file
    fcntl = None

LOCK_NAME = ".augnet.lock"
_TMP_RE = re.compile(r"^\..+\.tmp-[0-9a-f]{16}$")
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
_HASH_CHUNK = 1 << 20


class UnsafePathError(OSError):
    """A path augnet refuses to use: a symbolic link it did not make, or a record's path that
    leads outside its folder."""


class FolderLockedError(OSError):
    """Another augnet run holds the output folder's lock."""


# ------------------------------------------------------------------------------------------------
# Content fingerprints
# ------------------------------------------------------------------------------------------------


def hash_bytes(*parts: bytes) -> str:
    """``"b2:<hex>"``: BLAKE2b-128 of the concatenated ``parts``."""
    h = hashlib.blake2b(digest_size=16)
    for p in parts:
        h.update(p)
    return "b2:" + h.hexdigest()


def hash_file(path: str | os.PathLike[str]) -> str:
    """``"b2:<hex>"`` of a file's content (read in 1 MiB pieces)."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return "b2:" + h.hexdigest()


def hash_fd(fd: int) -> str:
    """``"b2:<hex>"`` of an open file's content, read from its start."""
    h = hashlib.blake2b(digest_size=16)
    offset = 0
    while chunk := os.pread(fd, _HASH_CHUNK, offset):
        h.update(chunk)
        offset += len(chunk)
    return "b2:" + h.hexdigest()


def hash_tree(path: str | os.PathLike[str]) -> str:
    """``"b2:<hex>"`` of a folder: every regular file's relative path and content, sorted."""
    root = Path(path)
    h = hashlib.blake2b(digest_size=16)
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            p = Path(folder) / name
            if not p.is_file():
                continue
            h.update(p.relative_to(root).as_posix().encode() + b"\0")
            h.update(hash_file(p).encode() + b"\0")
    return "b2:" + h.hexdigest()


def format_bytes(n: float) -> str:
    """``1536`` -> ``"1.5 KiB"``."""
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"  # pragma: no cover


# ------------------------------------------------------------------------------------------------
# Paths read back from records
# ------------------------------------------------------------------------------------------------


def check_relative_path(rel: object, *, where: str, folder: str | os.PathLike[str]) -> str:
    """A path read from a record, checked: a plain relative POSIX path inside ``folder``.

    Args:
        rel: the path as read (e.g. ``"cat/output_03.png"``).
        where: the record it came from, for the message.
        folder: the folder it must stay inside, for the message.

    Returns:
        ``rel`` unchanged.

    Raises:
        UnsafePathError: not a string, absolute, empty, with a ``..``, ``.`` or hidden component,
            or with a backslash or NUL.
    """
    ok = isinstance(rel, str) and rel and "\\" not in rel and "\0" not in rel
    if ok:
        p = PurePosixPath(rel)
        ok = not p.is_absolute() and all(
            part not in ("", ".", "..") and not part.startswith(".") for part in rel.split("/")
        )
    if not ok:
        raise UnsafePathError(
            f"{where} lists the path {rel!r}, which leads outside '{folder}' (or is not a plain "
            f"relative path); augnet did not write that record: remove it, or choose another "
            "output folder"
        )
    return rel


def is_temp_name(name: str) -> bool:
    """Whether ``name`` is one of augnet's temporary names (``.NAME.tmp-<16 hex>``)."""
    return bool(_TMP_RE.match(name))


def temp_name(name: str) -> str:
    """An unpredictable temporary name beside ``name``: ``.NAME.tmp-<16 random hex digits>``."""
    return f".{name}.tmp-{secrets.token_hex(8)}"


# ------------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------------


def write_all(fd: int, data: bytes | memoryview) -> None:
    """Write all of ``data`` to ``fd`` (``os.write`` may write less than asked)."""
    view = memoryview(data).cast("B")
    while view:
        n = os.write(fd, view)
        view = view[n:]


def named(exc: OSError, path: str | os.PathLike[str]) -> OSError:
    """``exc`` with ``path`` as its file name (a full disk names the file it was writing)."""
    if isinstance(exc, UnsafePathError | FolderLockedError) or exc.errno is None:
        return exc
    new = OSError(exc.errno, exc.strerror or os.strerror(exc.errno), os.fspath(path))
    new.__cause__ = exc
    return new


def _link_error(display: str) -> UnsafePathError:
    return UnsafePathError(
        f"'{display}' is a symbolic link (or not a folder); augnet never writes through a link it "
        "did not make: remove it, or choose another output folder"
    )


class SafeDir:
    """A folder opened once; every name inside it is used relative to it, never through a link.

    Example:
        >>> with SafeDir.open("results", create=True) as root:   # doctest: +SKIP
        ...     with root.sub("cat", create=True) as cat:
        ...         cat.write_atomic("output_03.png", png_bytes)
    """

    def __init__(self, fd: int, display: str):
        self.fd = fd
        self.display = display  # the folder's path, for messages

    # -- opening ---------------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, create: bool = False) -> SafeDir:
        """Open the folder ``path`` (the user's choice: a link is followed here), creating it and
        its parents when ``create``."""
        path = os.fspath(path)
        if create and not os.path.isdir(path):
            if os.path.lexists(path):
                raise NotADirectoryError(errno.ENOTDIR, "Not a folder (a file is in the way)", path)
            os.makedirs(path, exist_ok=True)
        fd = os.open(path, os.O_RDONLY | _DIRECTORY | _CLOEXEC)
        return cls(fd, path)

    def sub(self, rel: str, *, create: bool = False, created: list[str] | None = None) -> SafeDir:
        """The subfolder ``rel`` (``"a/b"``), each component opened without following a link;
        with ``create`` missing folders are made (and their paths, relative to this folder,
        appended to ``created``)."""
        fd = os.dup(self.fd)
        done: list[str] = []
        display = self.display
        try:
            for part in rel.split("/"):
                display = f"{display}/{part}"
                done.append(part)
                try:
                    new = os.open(part, os.O_RDONLY | _DIRECTORY | _NOFOLLOW | _CLOEXEC, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise
                    try:
                        os.mkdir(part, 0o777, dir_fd=fd)
                        if created is not None:
                            created.append("/".join(done))
                    except FileExistsError:
                        pass
                    new = os.open(part, os.O_RDONLY | _DIRECTORY | _NOFOLLOW | _CLOEXEC, dir_fd=fd)
                except OSError as exc:
                    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                        raise _link_error(display) from None
                    raise named(exc, display) from None
                os.close(fd)
                fd = new
        except BaseException:
            os.close(fd)
            raise
        return SafeDir(fd, display)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> SafeDir:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def path(self, name: str) -> str:
        return f"{self.display}/{name}"

    # -- looking ---------------------------------------------------------------------------------

    def lstat(self, name: str) -> os.stat_result | None:
        """``lstat`` of ``name`` in this folder, or ``None`` if absent."""
        try:
            return os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def listdir(self) -> list[str]:
        return sorted(os.listdir(self.fd))

    def read_bytes(self, name: str) -> bytes:
        """The content of the regular file ``name`` (a link is refused)."""
        fd = self._open_read(name)
        try:
            chunks = []
            while chunk := os.read(fd, _HASH_CHUNK):
                chunks.append(chunk)
            return b"".join(chunks)
        finally:
            os.close(fd)

    def hash(self, name: str) -> str | None:
        """The content hash of the regular file ``name``; ``None`` if it is absent or not a
        regular file (a link, a folder)."""
        st = self.lstat(name)
        if st is None or not stat.S_ISREG(st.st_mode):
            return None
        fd = self._open_read(name)
        try:
            return hash_fd(fd)
        finally:
            os.close(fd)

    def _open_read(self, name: str) -> int:
        try:
            return os.open(name, os.O_RDONLY | _NOFOLLOW | _CLOEXEC, dir_fd=self.fd)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise _link_error(self.path(name)) from None
            raise named(exc, self.path(name)) from None

    # -- writing ---------------------------------------------------------------------------------

    def create_temp(self, name: str, tmp: str | None = None) -> tuple[int, str]:
        """Create a new temporary file for ``name`` exclusively; returns ``(fd, temp_name)``."""
        tmp = tmp or temp_name(name)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC
        try:
            return os.open(tmp, flags, 0o666, dir_fd=self.fd), tmp
        except OSError as exc:
            raise named(exc, self.path(name)) from None

    def publish(self, tmp: str, name: str, *, replace: bool = True) -> None:
        """Rename the temporary file ``tmp`` to ``name`` (atomic). With ``replace=False`` an
        existing ``name`` (file or link) is never replaced: ``FileExistsError``."""
        try:
            if replace:
                os.replace(tmp, name, src_dir_fd=self.fd, dst_dir_fd=self.fd)
                return
            try:
                os.link(tmp, name, src_dir_fd=self.fd, dst_dir_fd=self.fd, follow_symlinks=False)
            except FileExistsError:
                raise
            except OSError:  # a file system without hard links: check, then rename
                if self.lstat(name) is not None:
                    raise FileExistsError(errno.EEXIST, "File exists", self.path(name)) from None
                os.rename(tmp, name, src_dir_fd=self.fd, dst_dir_fd=self.fd)
                return
            os.unlink(tmp, dir_fd=self.fd)
        except FileExistsError:
            raise FileExistsError(errno.EEXIST, "File exists", self.path(name)) from None
        except OSError as exc:
            raise named(exc, self.path(name)) from None

    def discard(self, tmp: str) -> None:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=self.fd)

    def write_atomic(
        self,
        name: str,
        data: bytes | memoryview,
        *,
        fsync: bool = False,
        replace: bool = True,
        tmp: str | None = None,
    ) -> None:
        """Write ``data`` to ``name`` atomically (exclusive temporary file, then a rename).

        Args:
            name: a plain name in this folder.
            data: the content.
            fsync: flush it to disk before the rename (commit records, shards).
            replace: replace an existing ``name``; ``False`` raises ``FileExistsError`` instead.
            tmp: the temporary name to use (default: a fresh unpredictable one).
        """
        fd, tmp = self.create_temp(name, tmp)
        try:
            try:
                _write(fd, data)
                if fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            self.publish(tmp, name, replace=replace)
        except BaseException as exc:
            self.discard(tmp)
            if isinstance(exc, OSError):
                raise named(exc, self.path(name)) from None
            raise

    def append(self, name: str, data: bytes) -> None:
        """Append ``data`` to the regular file ``name`` (created if absent; a link is refused)."""
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | _NOFOLLOW | _CLOEXEC
        try:
            fd = os.open(name, flags, 0o666, dir_fd=self.fd)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise _link_error(self.path(name)) from None
            raise named(exc, self.path(name)) from None
        try:
            _write(fd, data)
        except OSError as exc:
            raise named(exc, self.path(name)) from None
        finally:
            os.close(fd)

    def unlink(self, name: str) -> None:
        os.unlink(name, dir_fd=self.fd)

    def rmdir_if_empty(self, name: str) -> bool:
        try:
            os.rmdir(name, dir_fd=self.fd)
        except OSError:
            return False
        return True


def _write(fd: int, data) -> None:
    """The one place file content is written (tests replace it to simulate a full disk)."""
    write_all(fd, data)


def write_file(
    path: str | os.PathLike[str], data: bytes | memoryview, *, overwrite: bool = True
) -> Path:
    """Write ``data`` to ``path`` atomically, for the public API (images, contact sheets).

    The parent folder is the caller's choice (created if missing); the file itself is never
    written through a link, and an existing file is replaced only when ``overwrite``.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is false.
    """
    path = Path(path)
    with SafeDir.open(path.parent if str(path.parent) else ".", create=True) as folder:
        folder.display = os.fspath(path.parent)
        folder.write_atomic(path.name, data, replace=overwrite)
    return path


# ------------------------------------------------------------------------------------------------
# Path-based helpers (scripts, the public API)
# ------------------------------------------------------------------------------------------------


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *, fsync: bool = False) -> Path:
    """Write ``data`` to ``path`` atomically (exclusive temporary name, then a rename)."""
    path = Path(path)
    with SafeDir.open(path.parent) as folder:
        folder.display = str(path.parent)
        folder.write_atomic(path.name, data, fsync=fsync)
    return path


def atomic_write_json(path: str | os.PathLike[str], obj: Any, *, fsync: bool = True) -> Path:
    """Write ``obj`` as compact JSON (keys in insertion order, so deterministic), atomically."""
    return atomic_write_bytes(
        path,
        (json.dumps(obj, separators=(",", ":"), allow_nan=True) + "\n").encode("utf-8"),
        fsync=fsync,
    )


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a new, exclusively created temporary path to write; on success it is renamed to
    ``path``, on failure deleted.

    Example:
        >>> with atomic_path("out/sheet.png") as tmp:  # doctest: +SKIP
        ...     figure.savefig(tmp)
    """
    path = Path(path)
    with SafeDir.open(path.parent) as folder:
        folder.display = str(path.parent)
        fd, tmp = folder.create_temp(path.name)
        os.close(fd)
        try:
            yield path.parent / tmp
            folder.publish(tmp, path.name)
        except BaseException:
            folder.discard(tmp)
            raise


def remove_temp_files(folder: str | os.PathLike[str]) -> None:
    """Delete augnet's temporary files (``.NAME.tmp-<16 hex>``) left in ``folder`` by a process
    killed while writing; links and anything else are left alone."""
    try:
        d = SafeDir.open(folder)
    except OSError:
        return
    with d:
        for name in d.listdir():
            st = d.lstat(name)
            if is_temp_name(name) and st is not None and stat.S_ISREG(st.st_mode):
                with contextlib.suppress(OSError):
                    d.unlink(name)


# ------------------------------------------------------------------------------------------------
# Model paths
# ------------------------------------------------------------------------------------------------


def file_kind(mode: int) -> str:
    """A name for a file type: ``"a FIFO (named pipe)"``, ``"a character device"``, ..."""
    for test, name in (
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISREG, "a regular file"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def check_model_path(path: str | os.PathLike[str]) -> os.stat_result:
    """Check that a model path is a regular file or a folder before anything opens it.

    A FIFO would hang the reader forever and a link to ``/dev/zero`` would be read until memory
    runs out; both are refused here.

    Raises:
        FileNotFoundError: nothing at ``path``.
        ValueError: ``path`` (after following links) is a FIFO, a device or a socket.
    """
    st = os.stat(path)  # follows links: what a reader would open
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        raise ValueError(
            f"the model path '{os.fspath(path)}' is {file_kind(st.st_mode)}, not a model file: "
            "expected a .keras or .h5 file or a SavedModel folder"
        )
    return st


# ------------------------------------------------------------------------------------------------
# One run per folder
# ------------------------------------------------------------------------------------------------


class FolderLock:
    """An exclusive advisory lock on a folder, held while a run writes it.

    The lock is ``flock`` on ``FOLDER/.augnet.lock``, which also holds who took it (process id,
    host, start time, command line) for the message another run gets. The kernel releases it when
    the process ends in any way (``kill -9`` included); :meth:`release` also removes the file.

    Raises:
        FolderLockedError: from :meth:`acquire`, naming the run that holds the lock.
    """

    def __init__(self, folder: SafeDir, info: dict[str, Any] | None = None):
        self.folder = folder
        self.info = dict(info or {})
        self.fd = -1

    def acquire(self) -> FolderLock:
        flags = os.O_RDWR | os.O_CREAT | _NOFOLLOW | _CLOEXEC
        for _ in range(20):
            try:
                fd = os.open(LOCK_NAME, flags, 0o666, dir_fd=self.folder.fd)
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    raise _link_error(self.folder.path(LOCK_NAME)) from None
                raise named(exc, self.folder.path(LOCK_NAME)) from None
            try:
                if fcntl is not None:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_lock_info(fd)
                os.close(fd)
                raise FolderLockedError(_locked_message(self.folder.display, holder)) from None
            # The file may have been removed (and recreated) by the previous holder between our
            # open and our lock: then we hold a lock on a dead file; try again.
            st = self.folder.lstat(LOCK_NAME)
            if st is not None and st.st_ino == os.fstat(fd).st_ino:
                self.fd = fd
                info = {
                    "pid": os.getpid(),
                    "host": socket.gethostname(),
                    "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                    **self.info,
                }
                os.ftruncate(fd, 0)
                os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
                return self
            os.close(fd)
        raise FolderLockedError(f"cannot lock the output folder '{self.folder.display}'")

    def release(self) -> None:
        if self.fd < 0:
            return
        with contextlib.suppress(OSError):
            self.folder.unlink(LOCK_NAME)  # while still holding it: nobody locks a dead file
        os.close(self.fd)
        self.fd = -1

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def lock_holder(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """Who holds the lock of the folder ``path`` (its info), or ``None`` when nobody does.

    Only looks: the lock is tested and released at once (a stale lock file left by a killed
    run is not held: ``None``).
    """
    if fcntl is None:  # pragma: no cover
        return None
    try:
        fd = os.open(os.path.join(os.fspath(path), LOCK_NAME), os.O_RDONLY | _NOFOLLOW | _CLOEXEC)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_lock_info(fd) or {"pid": None}
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def check_not_locked(path: str | os.PathLike[str]) -> None:
    """Raise :class:`FolderLockedError` naming the run that holds the folder's lock, if any."""
    holder = lock_holder(path)
    if holder is not None:
        raise FolderLockedError(_locked_message(os.fspath(path), holder))


def _read_lock_info(fd: int) -> dict[str, Any]:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode("utf-8", "replace"))
    except (OSError, ValueError):
        return {}


def _locked_message(folder: str, holder: dict[str, Any]) -> str:
    who = []
    if holder.get("pid"):
        who.append(f"process {holder['pid']}")
    if holder.get("host"):
        who.append(f"on {holder['host']}")
    if holder.get("since"):
        who.append(f"since {holder['since']}")
    text = " ".join(who) or "another process"
    if holder.get("command"):
        text += f": {holder['command']}"
    return (
        f"'{folder}' is in use by another augnet run ({text}); wait for it to finish, "
        "or choose another output folder"
    )


@contextlib.contextmanager
def opened(path: str | os.PathLike[str], *, create: bool = False) -> Iterator[SafeDir]:
    """``with opened(path) as folder:`` -- :meth:`SafeDir.open` as a context manager."""
    folder = SafeDir.open(path, create=create)
    try:
        yield folder
    finally:
        folder.close()
