"""Image files and ``.npy`` arrays -> model inputs, one batch at a time.

How an image file becomes one model input of shape ``(height, width, channels)``:

1. **Read** with pillow. A file that pillow cannot open or decode raises :class:`InputReadError`
   naming the file.
2. **Channels** from the model: ``channels=1`` -> grayscale (``L``), ``3`` -> RGB, ``4`` -> RGBA.
   A model input of rank 2, ``(height, width)``, is read as grayscale without a channel axis.
   Anything else cannot be made from an image (:class:`InputFitError`; pass a ``.npy`` array).
   16-bit grayscale images are scaled to the 8-bit range first.
3. **Crop** (optional, ``crop="center"``): the largest centred box with the model's aspect ratio,
   so that resizing does not stretch the picture.
4. **Resize** to the model's ``(height, width)`` with ``resize="bilinear"`` (the default; also
   ``"nearest"``, ``"bicubic"``, ``"lanczos"``, ``"box"``). ``resize="none"`` refuses images of any
   other size. A model whose input size is not fixed (``None``) needs an explicit ``size``.
5. **Scale** the 0-255 pixel values with a named preprocessing (see :data:`PREPROCESSING`):

   ``unit`` (default)   ``x / 255``                       -> ``[0, 1]``
   ``minus1_1``         ``x / 127.5 - 1``                 -> ``[-1, 1]`` (Inception, MobileNet)
   ``imagenet_caffe``   RGB -> BGR, minus the ImageNet BGR means ``(103.939, 116.779, 123.68)``
                        (VGG16/19, ResNet50 in ``keras.applications``)
   ``imagenet_torch``   ``(x / 255 - mean) / std`` with the ImageNet RGB mean and std
   ``none``             ``x`` unchanged, ``[0, 255]``

``.npy`` files hold ready-made inputs: an array of shape ``(batch, *input_shape)`` (or exactly
``input_shape`` for one sample). Their values are used as they are, cast to float32; no resizing and
no preprocessing. They are read through a memory map, one batch of rows at a time.

Paths given on the command line are expanded by :func:`expand_inputs`: a file, a folder (its files
with a supported extension, sorted, not recursive) or a glob pattern (sorted, ``**`` recursive).
Only paths are expanded; pixels are read later, batch by batch, by :func:`load_batch`, so memory is
bounded by the batch size, never by the data set.

This module uses NumPy and pillow only.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

IMAGE_EXTENSIONS = (
    ".bmp",
    ".gif",
    ".jpeg",
    ".jpg",
    ".pbm",
    ".pgm",
    ".png",
    ".ppm",
    ".tif",
    ".tiff",
    ".webp",
)
ARRAY_EXTENSIONS = (".npy",)
SUPPORTED_EXTENSIONS = IMAGE_EXTENSIONS + ARRAY_EXTENSIONS

PREPROCESSING = ("unit", "minus1_1", "imagenet_caffe", "imagenet_torch", "none")
RESIZE_FILTERS = ("bilinear", "nearest", "bicubic", "lanczos", "box", "none")
CROPS = ("none", "center")

_CAFFE_BGR_MEAN = np.array([103.939, 116.779, 123.68], dtype=np.float32)
_TORCH_RGB_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
_TORCH_RGB_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
_PIL_MODES = {1: "L", 3: "RGB", 4: "RGBA"}


class InputReadError(ValueError):
    """An input path that does not exist, cannot be read, or is not a decodable image/array."""


class InputFitError(ValueError):
    """An input that cannot be made to fit the model's input (channels, size, shape)."""


def _fmt_shape(shape: Sequence[int | None]) -> str:
    return str(tuple(shape))


# --------------------------------------------------------------------------------------------
# Expanding command-line paths into a list of inputs
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class InputItem:
    """One model input: an image file, or one row of a ``.npy`` array.

    Small on purpose (one per input of a data set is kept in memory): the folder ``root`` is one
    object shared by all inputs, and the path is made from it when asked for.

    Attributes:
        root: the run's input root (:func:`common_root`), an absolute path (links not resolved).
        rel: the file's path relative to ``root``, with ``/``.
        row: the row of a ``.npy`` array, ``None`` for an image file.
        name: a short name, unique within the run, used for the per-input output folder.
    """

    root: Path
    rel: str
    row: int | None = None
    name: str = field(default="", compare=False)

    @classmethod
    def at(cls, path: str | os.PathLike[str], row: int | None = None, name: str = "") -> InputItem:
        """The input at ``path`` (made absolute; its folder is the root)."""
        p = Path(os.path.abspath(path))
        return cls(p.parent, p.name, row, name)

    @property
    def path(self) -> Path:
        """The file, as an absolute path (symbolic links not resolved)."""
        return self.root / self.rel

    @property
    def key(self) -> str:
        """Identity of the input within a run: its path relative to the input root, plus
        ``[row]`` for a row of an array. Moving the inputs' folder (or the output folder)
        keeps the keys."""
        return self.rel if self.row is None else f"{self.rel}[{self.row}]"

    @property
    def is_array(self) -> bool:
        return self.row is not None


def _has_magic(spec: str) -> bool:
    return any(ch in spec for ch in "*?[")


def _supported(path: Path) -> bool:
    return path.suffix.lower() in SUPPORTED_EXTENSIONS


def _files_in(folder: Path) -> list[Path]:
    try:
        entries = sorted(folder.iterdir())
    except OSError as exc:
        raise InputReadError(
            f"cannot read input folder '{folder}': {exc.strerror or exc}"
        ) from None
    return [p for p in entries if p.is_file() and _supported(p)]


def _npy_shape(path: Path) -> tuple[int, ...]:
    """Shape of a ``.npy`` file, read from its header only."""
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise InputReadError(f"cannot read array '{path}': {exc}") from None
    if not isinstance(arr, np.ndarray) or arr.ndim == 0:
        raise InputReadError(
            f"cannot read array '{path}': expected an array with a batch axis, "
            f"received shape {_fmt_shape(getattr(arr, 'shape', ()))}"
        )
    return tuple(arr.shape)


def expand_inputs(
    specs: Iterable[str | os.PathLike[str]],
    *,
    array_input_shape: Sequence[int | None] | None = None,
    reserved: Iterable[str] = (),
) -> list[InputItem]:
    """Expand files, folders and glob patterns into a sorted list of inputs.

    Args:
        specs: image files, ``.npy`` files, folders (their supported files, sorted, not recursive)
            or glob patterns (``*``, ``?``, ``[...]``; ``**`` is recursive), in the order given.
        array_input_shape: the model's input shape without the batch axis; a ``.npy`` file of
            exactly this shape counts as one sample, anything else as ``(batch, *input_shape)``.
        reserved: names no input may take (e.g. the output folder's own files and folders).

    Returns:
        ``InputItem`` list, duplicates (the same file reached twice) removed, each with a unique
        ``name``. Only paths are read here (and ``.npy`` headers), never pixels.

    Raises:
        InputReadError: a path that does not exist, a folder or pattern with no supported file,
            a file with an unsupported extension, an unreadable ``.npy`` header.

    Example:
        >>> items = expand_inputs(["photos/"])  # doctest: +SKIP
        >>> [item.name for item in items]  # doctest: +SKIP
        ['cat', 'dog']
    """
    files: list[Path] = []
    for spec in specs:
        text = os.fspath(spec)
        path = Path(text).expanduser()
        if path.is_dir():
            found = _files_in(path)
            if not found:
                raise InputReadError(
                    f"input folder '{text}' holds no supported file "
                    f"(expected one of {', '.join(SUPPORTED_EXTENSIONS)})"
                )
            files.extend(found)
        elif path.exists():
            if not path.is_file():
                raise InputReadError(f"input '{text}' is not a regular file or folder")
            if not _supported(path):
                raise InputReadError(
                    f"input '{text}' has an unsupported extension "
                    f"(expected one of {', '.join(SUPPORTED_EXTENSIONS)})"
                )
            files.append(path)
        elif _has_magic(text):
            matches = sorted(Path(m) for m in glob.glob(os.path.expanduser(text), recursive=True))
            found = [m for m in matches if m.is_file() and _supported(m)]
            if not found:
                raise InputReadError(f"no supported input file matches the pattern '{text}'")
            files.extend(found)
        else:
            raise InputReadError(f"input '{text}' does not exist")

    unique: list[Path] = []
    seen: set[Path] = set()
    for f in files:
        resolved = Path(os.path.abspath(f))  # absolute; symlinks kept (no syscall per file)
        if resolved not in seen:
            seen.add(resolved)
            unique.append(resolved)
    root = common_root(unique)
    del seen
    items: list[InputItem] = []
    for resolved in unique:
        rel = os.path.relpath(resolved, root).replace(os.sep, "/")
        if resolved.suffix.lower() in ARRAY_EXTENSIONS:
            shape = _npy_shape(resolved)
            if array_input_shape is not None and _shape_matches(shape, array_input_shape):
                items.append(InputItem(root, rel, 0))  # one sample, no batch axis
            else:
                items.extend(InputItem(root, rel, i) for i in range(shape[0]))
        else:
            items.append(InputItem(root, rel))
    del unique, files
    return assign_names(items, reserved=reserved)


def common_root(files: Sequence[Path]) -> Path:
    """The input root of a run: the deepest folder holding every input file (``/`` at worst).

    Input keys (``summary.jsonl``'s ``"input"``, the records) are paths relative to it, so that a
    run's results do not depend on where its inputs or its output folder lie.
    """
    if not files:
        return Path(os.getcwd())
    return Path(os.path.commonpath([os.path.dirname(f) for f in files]))


def input_root(items: Sequence[InputItem]) -> Path:
    """The root the items' keys are relative to (see :func:`common_root`)."""
    return items[0].root if items else Path(os.getcwd())


def _shape_matches(shape: Sequence[int], expected: Sequence[int | None]) -> bool:
    return len(shape) == len(expected) and all(
        e is None or s == e for s, e in zip(shape, expected, strict=True)
    )


def assign_names(items: Sequence[InputItem], *, reserved: Iterable[str] = ()) -> list[InputItem]:
    """Give every input a unique, filesystem-safe name (deterministic for a given list).

    An image is named after its file stem (``cat.jpg`` -> ``cat``); a row of an array after the
    file stem and the zero-padded row (``batch.npy`` row 7 of 120 -> ``batch_007``). Stems shared
    by several files get the extension appended (``cat_jpg``, ``cat_png``), and then a counter;
    so does a name in ``reserved`` (compared case-insensitively).
    """
    rows_per_file: dict[Path, int] = {}
    for it in items:
        if it.row is not None:
            rows_per_file[it.path] = max(rows_per_file.get(it.path, 0), it.row + 1)

    def base(it: InputItem, with_ext: bool) -> str:
        stem = _safe(it.path.stem)
        if with_ext:
            stem = f"{stem}_{_safe(it.path.suffix.lstrip('.'))}"
        if it.row is not None:
            width = len(str(max(rows_per_file[it.path] - 1, 0)))
            stem = f"{stem}_{it.row:0{width}d}"
        return stem

    stems: dict[str, int] = {}
    for it in items:
        stems[base(it, False)] = stems.get(base(it, False), 0) + 1
    used: set[str] = {r.lower() for r in reserved}
    named = []
    for it in items:
        name = base(it, False)
        if stems[name] > 1:
            name = base(it, True)
        candidate, k = name, 2
        while candidate.lower() in used:
            candidate = f"{name}_{k}"
            k += 1
        used.add(candidate.lower())
        named.append(InputItem(it.root, it.rel, it.row, candidate))
    return named


def _safe(text: str) -> str:
    out = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in text).strip(".")
    return out or "input"


# --------------------------------------------------------------------------------------------
# Turning one image into one model input
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageSpec:
    """How image files become model inputs. See the module docstring for each step.

    Attributes:
        height, width: the model's input size.
        channels: 1 (grayscale), 3 (RGB) or 4 (RGBA); ``None`` for a rank-2 ``(height, width)``
            input (grayscale without a channel axis).
        preprocess: one of :data:`PREPROCESSING`.
        resize: one of :data:`RESIZE_FILTERS`.
        crop: ``"none"`` or ``"center"``.
    """

    height: int
    width: int
    channels: int | None
    preprocess: str = "unit"
    resize: str = "bilinear"
    crop: str = "none"

    @property
    def input_shape(self) -> tuple[int, ...]:
        if self.channels is None:
            return (self.height, self.width)
        return (self.height, self.width, self.channels)

    @classmethod
    def from_input_shape(
        cls,
        input_shape: Sequence[int | None],
        *,
        size: tuple[int, int] | None = None,
        preprocess: str = "unit",
        resize: str = "bilinear",
        crop: str = "none",
    ) -> ImageSpec:
        """Build the spec from a model input shape ``(height, width[, channels])`` (no batch axis).

        Args:
            input_shape: e.g. ``(224, 224, 3)``; ``None`` height/width need ``size``.
            size: ``(height, width)`` to use where the model's size is ``None`` (or to check it).

        Raises:
            InputFitError: the input is not image-shaped, has an unsupported channel count, or its
                size is unknown and no ``size`` was given.
            ValueError: an unknown ``preprocess``, ``resize`` or ``crop`` name.
        """
        for arg, value, allowed in (
            ("preprocess", preprocess, PREPROCESSING),
            ("resize", resize, RESIZE_FILTERS),
            ("crop", crop, CROPS),
        ):
            if value not in allowed:
                raise ValueError(
                    f"Received an invalid value for `{arg}`, expected one of "
                    f"{', '.join(allowed)}. Received: {arg}={value!r}"
                )
        shape = tuple(input_shape)
        if len(shape) not in (2, 3):
            raise InputFitError(
                f"the model input has shape {_fmt_shape(('batch',) + shape)}, which is not an image "
                "(expected (batch, height, width, channels)); pass the inputs as a .npy array of "
                "that shape instead"
            )
        channels = shape[2] if len(shape) == 3 else None
        if len(shape) == 3 and channels not in _PIL_MODES:
            raise InputFitError(
                f"the model input has {channels} channels (shape {_fmt_shape(shape)}); an image "
                "can be read with 1 (grayscale), 3 (RGB) or 4 (RGBA) channels; pass the inputs as "
                "a .npy array instead"
            )
        height, width = shape[0], shape[1]
        if size is not None:
            for dim, want, got in (("height", height, size[0]), ("width", width, size[1])):
                if want is not None and want != got:
                    raise InputFitError(
                        f"the requested size {tuple(size)} does not match the model's input "
                        f"{dim} {want} (input shape {_fmt_shape(shape)})"
                    )
            height, width = size
        if height is None or width is None:
            raise InputFitError(
                f"the model's input size is not fixed (input shape {_fmt_shape(shape)}); "
                "pass --size HEIGHT,WIDTH"
            )
        if preprocess in ("imagenet_caffe", "imagenet_torch") and channels != 3:
            raise InputFitError(
                f"preprocessing '{preprocess}' needs a 3-channel RGB input, but the model input "
                f"has shape {_fmt_shape(shape)}; choose --preprocess unit, minus1_1 or none"
            )
        return cls(int(height), int(width), channels, preprocess, resize, crop)


def _open_image(path: Path, data: bytes | None = None):
    import io

    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(data) if data is not None else path)
        img.load()
    except FileNotFoundError:
        raise InputReadError(f"image '{path}' does not exist") from None
    except UnidentifiedImageError:
        raise InputReadError(
            f"cannot read image '{path}': not an image file pillow can decode (corrupt or "
            "unsupported format)"
        ) from None
    except Image.DecompressionBombError as exc:
        raise InputReadError(f"cannot read image '{path}': {exc}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise InputReadError(f"cannot read image '{path}': {reason}") from None
    return img


def _to_mode(img, channels: int | None):
    """Convert to L/RGB/RGBA, scaling 16- and 32-bit integer images into the 8-bit range."""
    from PIL import Image

    if img.mode.startswith("I;16") or img.mode == "I":
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        img = Image.fromarray(np.clip(np.rint(arr * (255.0 / top)), 0, 255).astype(np.uint8))
    elif img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        top = 1.0 if arr.max(initial=0) <= 1.0 else 255.0
        img = Image.fromarray(np.clip(np.rint(arr * (255.0 / top)), 0, 255).astype(np.uint8))
    mode = _PIL_MODES[channels if channels is not None else 1]
    if img.mode == "P" and mode != "L":
        img = img.convert("RGBA")
    return img.convert(mode) if img.mode != mode else img


def _center_crop(img, height: int, width: int):
    w, h = img.size
    target = width / height
    if w / h > target:  # too wide
        new_w = max(1, round(h * target))
        left = (w - new_w) // 2
        return img.crop((left, 0, left + new_w, h))
    new_h = max(1, round(w / target))
    top = (h - new_h) // 2
    return img.crop((0, top, w, top + new_h))


def preprocess_pixels(pixels: np.ndarray, preprocess: str) -> np.ndarray:
    """Scale 0-255 pixels ``(height, width[, channels])`` with a named preprocessing -> float32."""
    x = np.asarray(pixels, dtype=np.float32)
    if preprocess == "unit":
        return x / np.float32(255.0)
    if preprocess == "minus1_1":
        return x / np.float32(127.5) - np.float32(1.0)
    if preprocess == "imagenet_caffe":
        return x[..., ::-1] - _CAFFE_BGR_MEAN
    if preprocess == "imagenet_torch":
        return (x / np.float32(255.0) - _TORCH_RGB_MEAN) / _TORCH_RGB_STD
    if preprocess == "none":
        return x
    raise ValueError(
        f"Received an invalid value for `preprocess`, expected one of {', '.join(PREPROCESSING)}. "
        f"Received: preprocess={preprocess!r}"
    )


def load_image(
    path: str | os.PathLike[str], spec: ImageSpec, data: bytes | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Read one image file as one model input.

    Args:
        path: an image file.
        spec: how to convert it (:class:`ImageSpec`).
        data: the file's content, already read (e.g. shipped to a worker that cannot see
            ``path``); ``path`` then only names it in messages.

    Returns:
        ``(x, display)``: ``x`` float32 of shape ``spec.input_shape``, preprocessed; ``display``
        uint8 of shape ``(height, width)`` (grayscale) or ``(height, width, 3)``, the same pixels
        before preprocessing, for overlays and contact sheets.

    Raises:
        InputReadError: the file does not exist, cannot be read or cannot be decoded.
        InputFitError: ``spec.resize == "none"`` and the image has another size.

    Example:
        >>> spec = ImageSpec.from_input_shape((32, 32, 1))
        >>> x, display = load_image("digit.png", spec)  # doctest: +SKIP
        >>> x.shape, x.dtype, display.shape
        ((32, 32, 1), dtype('float32'), (32, 32))
    """
    from PIL import Image

    path = Path(path)
    with _open_image(path, data) as opened:
        img = _to_mode(opened, spec.channels)
        if spec.crop == "center":
            img = _center_crop(img, spec.height, spec.width)
        if img.size != (spec.width, spec.height):
            if spec.resize == "none":
                raise InputFitError(
                    f"image '{path}' is {img.size[1]}x{img.size[0]} (height x width) but the model "
                    f"takes {spec.height}x{spec.width}; allow resizing (drop --resize none)"
                )
            resample = getattr(Image.Resampling, spec.resize.upper())
            img = img.resize((spec.width, spec.height), resample)
        pixels = np.asarray(img, dtype=np.uint8)
    if pixels.ndim == 2 and spec.channels is not None:
        x = preprocess_pixels(pixels[..., None], spec.preprocess)
    else:
        x = preprocess_pixels(pixels, spec.preprocess)
    if pixels.ndim == 3 and pixels.shape[-1] == 4:
        display = pixels[..., :3]
    else:
        display = pixels
    return x, np.ascontiguousarray(display)


def load_array_rows(
    path: str | os.PathLike[str], rows: Sequence[int], input_shape: Sequence[int | None]
) -> np.ndarray:
    """Read some rows of a ``.npy`` array of inputs (memory-mapped; only those rows are read).

    Args:
        path: a ``.npy`` file of shape ``(batch, *input_shape)``, or exactly ``input_shape``.
        rows: the rows to read.
        input_shape: the model's input shape without the batch axis (``None`` matches any size).

    Returns:
        float32 array of shape ``(len(rows), *input_shape)``.

    Raises:
        InputReadError: the file cannot be read or holds a non-numeric array.
        InputFitError: the array's shape does not match the model input.
    """
    path = Path(path)
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise InputReadError(f"array '{path}' does not exist") from None
    except (OSError, ValueError, EOFError) as exc:
        raise InputReadError(f"cannot read array '{path}': {exc}") from None
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise InputReadError(
            f"cannot read array '{path}': expected a numeric array, received dtype {arr.dtype}"
        )
    expected = tuple(input_shape)
    if _shape_matches(arr.shape, expected):
        arr = arr[None]
    if not _shape_matches(arr.shape[1:], expected):
        raise InputFitError(
            f"array '{path}' has shape {_fmt_shape(arr.shape)} but the model takes inputs of shape "
            f"{_fmt_shape(('batch',) + expected)}"
        )
    try:
        return np.asarray(arr[list(rows)], dtype=np.float32)
    except (OSError, ValueError) as exc:
        raise InputReadError(f"cannot read array '{path}': {exc}") from None


def _payload_row(it: InputItem, data, input_shape) -> np.ndarray:
    row = np.asarray(data)
    if not (np.issubdtype(row.dtype, np.number) or row.dtype == bool):
        raise InputReadError(f"cannot read array '{it.path}': expected a numeric array")
    if not _shape_matches(row.shape, tuple(input_shape)):
        raise InputFitError(
            f"array '{it.path}' row {it.row} has shape {_fmt_shape(row.shape)} but the model "
            f"takes inputs of shape {_fmt_shape(('batch',) + tuple(input_shape))}"
        )
    return np.asarray(row, dtype=np.float32)


def fingerprints(
    items: Sequence[InputItem],
    input_shape: Sequence[int | None] | None = None,
    payload: Sequence[bytes | np.ndarray] | None = None,
) -> list[str]:
    """Content fingerprints of inputs (``"b2:<hex>"``, BLAKE2b-128): of the file's bytes for an
    image, of the row's bytes (with its dtype and shape) for a row of a ``.npy`` array.

    An input changed in place is recognised whatever its size and modification time say.

    Raises:
        InputReadError: a file that cannot be read.
    """
    from augnet._safeio import hash_bytes, hash_file

    if payload is not None:  # the same digests, of content read elsewhere
        digests = []
        for data in payload:
            if isinstance(data, bytes | bytearray | memoryview):
                digests.append(hash_bytes(bytes(data)))
            else:
                row = np.ascontiguousarray(data)
                digests.append(hash_bytes(f"{row.dtype.str}{row.shape}".encode(), row.tobytes()))
        return digests
    arrays: dict[Path, np.ndarray] = {}
    out = []
    for it in items:
        try:
            if it.row is None:
                out.append(hash_file(it.path))
                continue
            arr = arrays.get(it.path)
            if arr is None:
                arr = np.load(it.path, mmap_mode="r", allow_pickle=False)
                if input_shape is not None and _shape_matches(arr.shape, tuple(input_shape)):
                    arr = arr[None]
                arrays[it.path] = arr
            row = np.ascontiguousarray(arr[it.row])
            meta = f"{row.dtype.str}{row.shape}".encode()
            out.append(hash_bytes(meta, row.tobytes()))
        except (OSError, ValueError, IndexError) as exc:
            reason = getattr(exc, "strerror", None) or str(exc)
            raise InputReadError(f"cannot read input '{it.path}': {reason}") from None
    return out


def array_display(x: np.ndarray) -> np.ndarray | None:
    """A picture of an array input, if it looks like an image: min-max scaled uint8, else ``None``.

    ``x`` of shape ``(height, width)`` or ``(height, width, channels)`` (other than 1 or 3
    channels: their mean).
    """
    if x.ndim == 3 and x.shape[-1] not in (1, 3):
        x = np.mean(x, axis=-1)  # no natural picture of 2, 4, 5... channels: their mean
    if x.ndim == 3 and x.shape[-1] == 1:
        x = x[..., 0]
    if not (x.ndim == 2 or (x.ndim == 3 and x.shape[-1] == 3)):
        return None
    x = np.asarray(x, dtype=np.float64)
    lo, hi = float(np.min(x)), float(np.max(x))
    if not np.isfinite(lo) or not np.isfinite(hi):
        return None
    if hi <= lo:
        return np.zeros(x.shape, dtype=np.uint8)
    return np.rint((x - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def read_payload(
    items: Sequence[InputItem], input_shape: Sequence[int | None] | None = None
) -> tuple[bytes | np.ndarray, ...]:
    """The content of each input as read from disk: an image file's bytes, or an array row
    (its stored dtype and shape), one per item. For a worker that cannot see the files: ship
    this with the batch and pass it to :func:`load_batch` and :func:`fingerprints`.

    Raises:
        InputReadError: a file that cannot be read.
    """
    arrays: dict[Path, np.ndarray] = {}
    out: list[bytes | np.ndarray] = []
    for it in items:
        try:
            if it.row is None:
                out.append(it.path.read_bytes())
                continue
            arr = arrays.get(it.path)
            if arr is None:
                arr = np.load(it.path, mmap_mode="r", allow_pickle=False)
                if input_shape is not None and _shape_matches(arr.shape, tuple(input_shape)):
                    arr = arr[None]
                arrays[it.path] = arr
            out.append(np.array(arr[it.row]))
        except (OSError, ValueError, IndexError) as exc:
            reason = getattr(exc, "strerror", None) or str(exc)
            raise InputReadError(f"cannot read input '{it.path}': {reason}") from None
    return tuple(out)


def load_batch(
    items: Sequence[InputItem],
    input_shape: Sequence[int | None],
    spec: ImageSpec | None,
    payload: Sequence[bytes | np.ndarray] | None = None,
) -> tuple[np.ndarray, list[np.ndarray | None]]:
    """Read a batch of inputs (images and/or array rows) into one array.

    Args:
        items: the batch, from :func:`expand_inputs`.
        input_shape: the model's input shape without the batch axis.
        spec: how to read image files; ``None`` if the model input is not image-shaped (then only
            ``.npy`` inputs are accepted).
        payload: the inputs' content already read (:func:`read_payload`), one per item; the files
            are then not opened.

    Returns:
        ``(x, displays)``: float32 ``(len(items), *input_shape)`` and one display picture (or
        ``None``) per input.

    Raises:
        InputReadError, InputFitError: naming the offending file.
    """
    arrays: list[np.ndarray] = []
    displays: list[np.ndarray | None] = []
    rows: dict[tuple[Path, int], np.ndarray] = {}
    if payload is None:
        by_file: dict[Path, list[int]] = {}
        for it in items:
            if it.row is not None:
                by_file.setdefault(it.path, []).append(it.row)
        for path, wanted in by_file.items():
            block = load_array_rows(path, wanted, input_shape)
            for r, x in zip(wanted, block, strict=True):
                rows[(path, r)] = x
    else:
        if len(payload) != len(items):
            raise ValueError(f"payload has {len(payload)} entries for {len(items)} inputs")
        for it, data in zip(items, payload, strict=True):
            if it.row is not None:
                rows[(it.path, it.row)] = _payload_row(it, data, input_shape)
    for i, it in enumerate(items):
        if it.row is not None:
            x = rows[(it.path, it.row)]
            display = array_display(x)
        else:
            if spec is None:
                raise InputFitError(
                    f"cannot use image '{it.path}': the model input shape "
                    f"{_fmt_shape(('batch',) + tuple(input_shape))} is not an image; pass a .npy array"
                )
            x, display = load_image(it.path, spec, None if payload is None else payload[i])
        arrays.append(x)
        displays.append(display)
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise InputFitError(
            f"inputs of different shapes {sorted(shapes)} in one batch; the model takes "
            f"{_fmt_shape(('batch',) + tuple(input_shape))}"
        )
    return np.stack(arrays).astype(np.float32, copy=False), displays
