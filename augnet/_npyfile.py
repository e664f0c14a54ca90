"""The file of ``augnet.jacobian_to_npy``: checked before any work, streamed into place safely.

:func:`write_npy_stream` (reached as ``augnet._store.write_npy_stream``, which the engine calls)
refuses a bad target (a folder, a missing or read-only parent, an existing file without
``overwrite``) before the computation starts, writes under an unpredictable temporary name created
exclusively (never through a link, never a user's ``J.npy.partial``), reserves the file's full size
first (a disk too small fails at once, with the sizes), writes block by block with positioned
writes (resident memory stays one block's), and renames the file into place when complete.
NumPy and the standard library only.
"""

from __future__ import annotations

import errno
import io
import os
import shutil
import stat
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from augnet import _safeio
from augnet._safeio import SafeDir, format_bytes


def disk_free(path: str | os.PathLike[str]) -> int | None:
    """Free bytes on the file system holding ``path`` (``None`` if unknown)."""
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def _pwrite(fd: int, data: bytes, offset: int) -> None:
    """Positioned write of all of ``data`` (tests replace it to simulate a full disk)."""
    view = memoryview(data).cast("B")
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _reserve(fd: int, size: int) -> None:
    """Give the file its final size; with ``posix_fallocate`` the space is reserved now, so a disk
    too small fails here, before the computation, rather than at its end."""
    if hasattr(os, "posix_fallocate"):
        try:
            os.posix_fallocate(fd, 0, size)
            return
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise
    os.ftruncate(fd, size)


BlockSource = Callable[[], tuple[tuple[int, ...], np.dtype, Iterable[tuple[slice, slice, Any]]]]


def write_npy_stream(
    path: str | os.PathLike[str], make_blocks: BlockSource, *, overwrite: bool = False
) -> Path:
    """Stream an array, block by block, into the ``.npy`` file ``path``; the engine's
    ``augnet.jacobian_to_npy`` writes through this.

    The target is checked **before** ``make_blocks`` is called (before any computation): a
    folder, a missing or unwritable parent folder, or an existing file without ``overwrite`` is
    refused at once. The file is written under an unpredictable temporary name created
    exclusively in the target's folder (a file or link planted there is never touched), its full
    size is reserved before the first block (a disk too small fails before the computation, with
    the sizes), and it is renamed into place only when complete: a file at ``path`` is always
    whole. It follows the umask like any file.

    Args:
        path: the ``.npy`` file to write.
        make_blocks: ``() -> (shape, dtype, blocks)``; ``shape`` is ``(batch, m, *rest)`` and each
            block ``(samples, columns, values)`` fills ``array[samples, columns] = values`` with
            ``values`` of shape ``(b, c, *rest)``.
        overwrite: replace an existing file (never through a link: a link is replaced itself).

    Returns:
        ``path`` as a ``Path``.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is false.
        IsADirectoryError: ``path`` is a folder.
        FileNotFoundError / PermissionError: its folder is missing or not writable.
        OSError: a full disk (``ENOSPC``), naming ``path`` and the sizes.
    """
    path = Path(path)
    st = path.lstat() if path.exists() or path.is_symlink() else None
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(
            errno.EISDIR,
            f"Is a folder; jacobian_to_npy writes a file: pass a path such as '{path}/J.npy'",
            str(path),
        )
    if st is not None and not overwrite:
        raise FileExistsError(
            errno.EEXIST, "File exists; pass overwrite=True to replace it", str(path)
        )
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise FileNotFoundError(
            errno.ENOENT, f"No such folder '{parent}' to write the .npy file in", str(path)
        )
    try:
        folder = SafeDir.open(parent)
    except OSError as exc:
        raise _safeio.named(exc, path) from None
    folder.display = str(parent)
    try:
        fd, tmp = folder.create_temp(path.name)
    except OSError as exc:
        folder.close()
        raise _safeio.named(exc, path) from None
    try:
        try:
            shape, dtype, blocks = make_blocks()
            dtype = np.dtype(dtype)
            header = io.BytesIO()
            np.lib.format.write_array_header_1_0(
                header,
                {
                    "descr": np.lib.format.dtype_to_descr(dtype),
                    "fortran_order": False,
                    "shape": tuple(int(s) for s in shape),
                },
            )
            offset = len(header.getvalue())
            row_bytes = int(np.prod(shape[2:], dtype=np.int64)) * dtype.itemsize
            total = offset + int(shape[0]) * int(shape[1]) * row_bytes
            free = disk_free(parent)
            if free is not None and total > free:
                raise OSError(
                    errno.ENOSPC,
                    f"No space left on device: the file needs {format_bytes(total)}, "
                    f"{format_bytes(free)} are free",
                )
            try:
                _reserve(fd, total)
            except OSError as exc:
                if exc.errno == errno.ENOSPC:
                    raise OSError(
                        errno.ENOSPC,
                        f"No space left on device: the file needs {format_bytes(total)}",
                    ) from None
                raise
            _pwrite(fd, header.getvalue(), 0)
            for samples, columns, values in blocks:
                block = np.ascontiguousarray(values, dtype=dtype)
                for i, s in enumerate(range(samples.start, samples.stop)):
                    start = offset + (s * shape[1] + columns.start) * row_bytes
                    _pwrite(fd, block[i].tobytes(), start)
            os.fsync(fd)
        finally:
            os.close(fd)
        folder.publish(tmp, path.name, replace=overwrite)
    except BaseException as exc:
        folder.discard(tmp)
        if isinstance(exc, OSError):
            raise _safeio.named(exc, path) from None
        raise
    finally:
        folder.close()
    return path
