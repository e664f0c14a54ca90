"""The report page of a data-set run: ``OUT/index.html``, written from ``OUT/summary.jsonl``.

:func:`write_index_html` writes a page that lists every input of the run with a thumbnail, its
predictions, its most sensitive outputs (largest ‖J‖, with their saliency maps) and its contact sheet
(in a viewer), sortable by prediction, Jacobian norm, largest ``|J|``, name or run order, searchable by
file name, paginated. It opens from the file system (``file://``) with no server and no network:
all code and styles are inline and hand-written, the rows come from plain ``<script>`` files beside
the page (browsers do not let a ``file://`` page fetch JSON), and only the visible page's images
are requested (``<img loading=lazy>``). With 100,000 inputs the page is ready in about a second.

Files (all written by this module; nothing else in ``OUT`` is touched)::

    OUT/index.html                  the page (~40 KB): code, styles, the run's facts, chunk list
    OUT/index_files/rows-000000.js  the rows of inputs 0-999 of summary.jsonl, compact
    OUT/index_files/rows-000001.js  ... 1000 rows per file
    OUT/index_files/state.json      where the last call stopped reading summary.jsonl

**Cheap to rewrite.** The runner calls :func:`write_index_html` after every committed batch. While
``summary.jsonl`` only grows (appended to, same inode), a call reads only the lines of the last,
unfinished chunk and the new lines, rewrites that chunk and ``index.html``, and leaves the full
chunks alone: a few tens of milliseconds whatever the size of the run. When ``summary.jsonl`` was
replaced (a new inode, e.g. rewritten by rename), shrank or its already-read bytes changed, the page
is rebuilt from the whole file, streaming, one chunk in memory at a time. The same input listed
twice (recomputed) is shown once, at its latest line.

**Safe.** Every value reaches the page as data, never as HTML: the data files are JSON with
``<``, ``>`` and ``&`` escaped, and the page's script puts values into the document with
``textContent`` and DOM properties only. A Content-Security-Policy allows only the page's own inline
script and style (by hash) and scripts from its own folder. Links are percent-encoded URLs.
Files are written atomically (a hidden temporary name in the same folder, then ``os.replace``)
through a descriptor of ``OUT``, opened with ``O_NOFOLLOW``: no symbolic link is followed, and an
``index.html`` or ``index_files`` that this module did not write (no ``augnet-report`` marker)
is refused with :class:`ReportError` rather than replaced. One writer at a time (the runner holds
the run's lock).

**Moving the folder.** Links to files inside ``OUT`` are relative to the page, so the page keeps
working when the run's folder is moved or copied. Absolute paths outside ``OUT`` (the original
input images, used as thumbnails when the run wrote none) become ``file://`` URLs.

Fields of ``summary.jsonl`` this module reads (one JSON object per line; a line that is not valid
JSON, not an object, or has no string ``input`` is skipped and counted on the page; a line without
its final newline is still being written and is read on the next call):

=====================  =========  ================================================================
field                  required   use
=====================  =========  ================================================================
``input``              yes        the input's key: its path (absolute, or relative to ``OUT``),
                                  ``path[row]`` for a row of a ``.npy``; shown, searched, and used
                                  as the thumbnail when it is a browser image (.png .jpg .jpeg
                                  .gif .webp .bmp) and no thumbnail file was written
``name``               no         shown and searched (default: ``input``); sorted by
``outputs``            no         ``(k,)`` output indices; the "Show output k" filter
``predictions``        no         ``(k,)`` the model's values of those outputs; sorted by
``jacobian_l2``        no         ``(k,)`` ‖J‖ per output: most sensitive outputs, sorting by norm
                                  (all outputs: the Frobenius norm over them)
``jacobian_max_abs``   no         ``(k,)`` largest ``|J|`` per output; sorted by
``files``              no         paths (relative to ``OUT``, or absolute) of the files written
                                  for the input, recognised by their names: ``output_<k>.<ext>``
                                  the map of output ``k``; ``contact_sheet.<ext>`` the contact
                                  sheet; ``thumbnail.<ext>`` / ``input.<ext>`` a thumbnail
=====================  =========  ================================================================

Other fields (``top_inputs``, ...) are ignored; numbers may be ``NaN``/``Infinity`` (shown so) and
are rounded to 6 significant digits on the page (``summary.jsonl`` keeps them exact). From
``run.json`` (optional, read defensively) the header shows ``settings.model.path`` (its file name),
``settings.top_k``/``settings.outputs``, ``settings.input_shape``, ``settings.mode`` and
``resolved.strategy``.

This module uses the standard library only.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import hashlib
import html
import json
import math
import os
import posixpath
import re
import secrets
import stat
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

INDEX_FILE = "index.html"
ASSET_DIR = "index_files"
RESERVED_NAMES = (INDEX_FILE, ASSET_DIR)  # no input may be named so (for the store's list)
SUMMARY_FILE = "summary.jsonl"
RUN_FILE = "run.json"
STATE_FILE = "state.json"
CHUNK_ROWS = 1000
FORMAT = 1

_MARKER = b'<meta name="generator" content="augnet-report">'
_STATE_MARK = "augnet_report"
_TMP_MARK = ".tmp-"  # the store's temporary-name pattern: .STEM.tmp-PID-HEX.SUFFIX
_HEAD_BYTES = 4096
_CHUNK_RE = re.compile(r"rows-\d{6}\.js")
_PAGE_TEMP_RE = re.compile(r"\.index\.tmp-\d+-[0-9a-f]{8}\.html")
_MAP_RE = re.compile(r"output_0*(\d+)\.(?:png|jpe?g|webp|gif|svg)", re.IGNORECASE)
_SHEET_RE = re.compile(r"contact_sheet\.(?:png|jpe?g|webp|gif|svg)", re.IGNORECASE)
_THUMB_RE = re.compile(r"(?:thumbnail|thumb|input)\.(?:png|jpe?g|webp|gif|bmp)", re.IGNORECASE)
_BROWSER_IMAGES = (".png", ".jpg", ".jpeg", ".gif", ".webp", ".bmp")
_ROW_SUFFIX = re.compile(r"\[\d+\]$")
_ASSETS = Path(__file__).parent / "_html_assets"
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


class ReportError(ValueError):
    """The page cannot be written without touching something augnet did not write (a link, a
    file of the same name), or the output folder is missing."""


# --------------------------------------------------------------------------------------------
# Pure parts: a summary line -> a page row; rows -> a data file; the page
# --------------------------------------------------------------------------------------------


def _num(v: Any) -> float | str | None:
    """A number for the page: 6 significant digits; non-finite as a string JS's Number() reads."""
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    v = float(v)
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "Infinity" if v > 0 else "-Infinity"
    return float(f"{v:.6g}")


def _floats(v: Any) -> list[float]:
    """A list of numbers as floats (anything else, e.g. ``null``, as NaN)."""
    if not isinstance(v, list):
        return []
    return [
        float(x) if isinstance(x, int | float) and not isinstance(x, bool) else math.nan for x in v
    ]


def _ints(v: Any) -> list[int | None]:
    if not isinstance(v, list):
        return []
    return [x if isinstance(x, int) and not isinstance(x, bool) else None for x in v]


def _quote(path: str) -> str:
    return quote(os.fsencode(path), safe="/")


def href(path: str, out_dir: str | os.PathLike[str]) -> str | None:
    """The URL of ``path`` as seen from ``OUT/index.html``.

    A relative ``path`` is relative to ``out_dir`` (the store's convention) and stays relative; an
    absolute path inside ``out_dir`` becomes relative too (so the folder can move); an absolute
    path outside it becomes a ``file://`` URL. Every character but ``/`` and unreserved ones is
    percent-encoded, so a name can never become a scheme (``javascript:``), a query or a fragment.

    Example:
        >>> href("cat #1/output_03.png", "/runs/a")
        'cat%20%231/output_03.png'
        >>> href("/runs/a/cat/contact_sheet.png", "/runs/a")
        'cat/contact_sheet.png'
        >>> href("/data/cat.jpg", "/runs/a")
        'file:///data/cat.jpg'
    """
    if not isinstance(path, str) or not path:
        return None
    out = os.fspath(out_dir)
    if os.path.isabs(path):
        for base in dict.fromkeys((os.path.abspath(out), os.path.realpath(out))):
            rel = os.path.relpath(path, base)
            if rel != ".." and not rel.startswith("../"):
                return _quote(rel)
        return "file://" + _quote(os.path.normpath(path))
    rel = posixpath.normpath(path)
    return None if rel == "." else _quote(rel)


def index_row(
    entry: Mapping[str, Any], out_dir: str | os.PathLike[str], input_root: str | None = None
) -> list | None:
    """One line of ``summary.jsonl`` as a row of the page, or ``None`` if it has no ``input``.

    ``input_root`` (``run.json``'s ``"input_root"``, relative to ``out_dir`` or absolute) is where
    a relative ``input`` lives: the store keeps inputs relative to it, so that a run's folder and
    its inputs can move together.

    Returns:
        ``[name, input, outputs, predictions, jacobian_l2, jacobian_max_abs, dir, maps, sheet,
        thumb, top_prediction, norm, max_abs]``: ``dir`` the URL of the input's folder (``""`` if
        none), ``maps[j]`` the URL of the map of ``outputs[j]`` (or ``None``), ``sheet`` and
        ``thumb`` URLs or ``None``; the last three are the sort keys over all outputs (largest
        prediction, Frobenius norm of the Jacobian, largest ``|J|``). Numbers are rounded to 6
        significant digits; NaN and infinities are the strings ``"NaN"``, ``"Infinity"``,
        ``"-Infinity"``; a value that is not a number is ``"NaN"``.
    """
    if not isinstance(entry, Mapping) or not isinstance(entry.get("input"), str):
        return None
    key = entry["input"]
    name = entry.get("name") if isinstance(entry.get("name"), str) else key
    outputs = _ints(entry.get("outputs"))
    files = (
        [f for f in entry.get("files", []) if isinstance(f, str)]
        if isinstance(entry.get("files"), list)
        else []
    )
    maps: dict[int, str] = {}
    sheet = thumb = None
    folders: dict[str, int] = {}
    for f in files:
        url = href(f, out_dir)
        if url is None:
            continue
        folder, _, base = url.rpartition("/")
        folders[folder] = folders.get(folder, 0) + 1
        m = _MAP_RE.fullmatch(base)
        if m:
            maps.setdefault(int(m.group(1)), url)
        elif sheet is None and _SHEET_RE.fullmatch(base):
            sheet = url
        elif thumb is None and _THUMB_RE.fullmatch(base):
            thumb = url
    if thumb is None and not _ROW_SUFFIX.search(key):
        if os.path.splitext(key)[1].lower() in _BROWSER_IMAGES:
            where = key
            if isinstance(input_root, str) and input_root and not os.path.isabs(key):
                where = posixpath.join(input_root, key)
            thumb = href(where, out_dir)
    folder = max(folders, key=folders.get) if folders else ""
    if folder.startswith("file://"):
        folder = ""  # not inside the run's folder: no folder link
    preds = _floats(entry.get("predictions"))
    l2 = _floats(entry.get("jacobian_l2"))
    mx = _floats(entry.get("jacobian_max_abs"))
    return [
        name,
        key,
        outputs,
        [_num(v) for v in preds],
        [_num(v) for v in l2],
        [_num(v) for v in mx],
        folder,
        [maps.get(k) if k is not None else None for k in outputs],
        sheet,
        thumb,
        _num(max((v for v in preds if not math.isnan(v)), default=math.nan)),
        _num(math.sqrt(math.fsum(v * v for v in l2)) if l2 else math.nan),
        _num(max((v for v in mx if not math.isnan(v)), default=math.nan)),
    ]


def _js_json(obj: Any) -> str:
    """JSON that is also safe inside HTML ``<script>`` and JS source (no ``<``, ``>``, ``&``)."""
    text = json.dumps(obj, ensure_ascii=True, separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def encode_chunk(number: int, rows: Sequence[list]) -> bytes:
    """The data file of one chunk: ``augnetReport.add(number, {s: strings, r: rows});``.

    The URL of a map or contact sheet inside its row's folder becomes an index into the chunk's
    string table ``s`` (``output_03.png`` is stored once per chunk, not once per input).
    """
    strings: dict[str, int] = {}

    def pack(url: str | None, folder: str) -> str | int | None:
        if url is None or not folder or not url.startswith(folder + "/"):
            return url
        base = url[len(folder) + 1 :]
        if "/" in base:
            return url
        return strings.setdefault(base, len(strings))

    packed = []
    for r in rows:
        folder = r[6]
        packed.append([*r[:7], [pack(u, folder) for u in r[7]], pack(r[8], folder), *r[9:]])
    body = _js_json({"s": list(strings), "r": packed})
    # a JSON string for JSON.parse: V8 parses JSON text faster than an object literal
    literal = "'" + body.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return f"augnetReport.add({int(number)},{literal});\n".encode("ascii")


def _asset(name: str) -> str:
    return (_ASSETS / name).read_text(encoding="utf-8")


def _csp_hash(text: str) -> str:
    return (
        "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode() + "'"
    )


def render_page(config: Mapping[str, Any], chunk_srcs: Sequence[str]) -> str:
    """The text of ``index.html``.

    Args:
        config: ``{"title": str, "facts": [[label, value], ...], "total": int | None,
            "chunks": [[rows], ...], "skipped": int}`` (JSON-able; escaped here).
        chunk_srcs: the relative URLs of the chunk files, in order.
    """
    template = _asset("report.html")
    css = _asset("report.css")
    js = _asset("report.js")
    if "</style" in css.lower() or any(m in js.lower() for m in ("</script", "<script", "<!--")):
        # would end the inline block, or switch the HTML parser's script-data state
        raise RuntimeError("the report's assets must not contain </style>, <script or <!--")
    csp = "; ".join(
        (
            "default-src 'none'",
            f"script-src {_csp_hash(js)} 'self'",
            f"style-src {_csp_hash(css)}",
            "img-src 'self' file: data: blob:",
            "base-uri 'none'",
            "form-action 'none'",
        )
    )
    tags = "\n".join(
        f'<script defer src="{html.escape(src, quote=True)}"></script>' for src in chunk_srcs
    )
    title = html.escape(str(config.get("title", "")), quote=True)
    out = template
    for mark, value in (
        ("@@CSP@@", html.escape(csp, quote=False).replace('"', "&quot;")),
        ("@@TITLE@@", title),
        ("@@CONFIG@@", _js_json(dict(config))),
        ("@@CHUNKS@@", tags),
        ("@@CSS@@", css),  # last: the assets are inserted verbatim
        ("@@JS@@", js),
    ):
        out = out.replace(mark, value)
    return out


def _ranges(values: Sequence[int]) -> str:
    parts, i = [], 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[j + 1] == values[j] + 1:
            j += 1
        parts.append(str(values[i]) if i == j else f"{values[i]}–{values[j]}")
        i = j + 1
    text = ", ".join(parts)
    return text if len(text) <= 60 else f"{len(values)} selected"


def run_facts(run: Any) -> list[list[str]]:
    """``[[label, value], ...]`` for the page's header, from ``run.json`` (any field may be missing)."""
    facts: list[list[str]] = []
    if not isinstance(run, Mapping):
        return facts
    s = run.get("settings") if isinstance(run.get("settings"), Mapping) else {}
    model = s.get("model")
    if isinstance(run.get("model_file"), str) and run["model_file"]:
        facts.append(["model", os.path.basename(run["model_file"]) or run["model_file"]])
    elif isinstance(model, Mapping) and isinstance(model.get("path"), str):
        facts.append(["model", os.path.basename(model["path"]) or model["path"]])
    top_k, outputs = s.get("top_k"), s.get("outputs")
    if isinstance(top_k, int) and not isinstance(top_k, bool):
        facts.append(["outputs", f"top {top_k} per input"])
    elif isinstance(outputs, list) and outputs and all(isinstance(o, int) for o in outputs):
        facts.append(["outputs", _ranges(outputs)])
    shape = s.get("input_shape")
    if isinstance(shape, list) and shape and all(isinstance(d, int) for d in shape):
        facts.append(["input", "×".join(str(d) for d in shape)])
    method = s.get("method")
    if isinstance(method, str) and method:
        facts.append(["method", method.replace("_", " ")])
    if s.get("logits") is True:
        facts.append(["of", "the scores before the final activation (--logits)"])
    mode = s.get("mode")
    if mode == "signed":
        facts.append(["maps", "signed: red raises the output, blue lowers it"])
    elif mode == "abs":
        facts.append(["maps", "magnitude" if method else "|∂output/∂input|"])
    resolved = run.get("resolved") if isinstance(run.get("resolved"), Mapping) else {}
    if isinstance(resolved.get("strategy"), str):
        facts.append(["strategy", resolved["strategy"]])
    return facts


# --------------------------------------------------------------------------------------------
# Files: through a descriptor of OUT, never following a link
# --------------------------------------------------------------------------------------------


def _lstat(name: str, dir_fd: int) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _open_read(name: str, dir_fd: int, where: str):
    """Open a regular file for reading without following a link; ``None`` if it is missing."""
    try:
        fd = os.open(name, os.O_RDONLY | _O_NOFOLLOW | _O_CLOEXEC, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ReportError(
                f"'{where}' is a symbolic link; augnet does not follow links it did not make"
            ) from None
        raise
    f = os.fdopen(fd, "rb")
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        f.close()
        raise ReportError(f"'{where}' is not a regular file")
    return f


def _write_atomic(name: str, data: bytes, dir_fd: int, where: str) -> None:
    """Write ``name`` in ``dir_fd`` atomically: a hidden temporary file, then ``os.replace``."""
    st = _lstat(name, dir_fd)
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise ReportError(f"'{where}' exists and is not a regular file augnet wrote; move it away")
    stem, suffix = os.path.splitext(name)
    tmp = f".{stem}{_TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}{suffix}"
    fd = os.open(
        tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW | _O_CLOEXEC, 0o644, dir_fd=dir_fd
    )
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise


# The temporaries _write_atomic makes in index_files/: of a data chunk (rows-NNNNNN.js) or of the
# state file, ``.STEM.tmp-PID-HEX.SUFFIX``.
_TEMP_RE = re.compile(r"\.(?:rows-\d{6}\.tmp-\d+-[0-9a-f]{8}\.js|state\.tmp-\d+-[0-9a-f]{8}\.json)")


def _is_our_temp(name: str) -> bool:
    """Whether ``name`` is a temporary of a data chunk or of the state file (left behind by a
    process killed while it wrote one)."""
    return _TEMP_RE.fullmatch(name) is not None


def _check_page_is_ours(dir_fd: int, out: str) -> None:
    where = os.path.join(out, INDEX_FILE)
    st = _lstat(INDEX_FILE, dir_fd)
    if st is None:
        return
    if stat.S_ISLNK(st.st_mode):
        raise ReportError(
            f"'{where}' is a symbolic link; augnet does not follow links it did not make"
        )
    f = _open_read(INDEX_FILE, dir_fd, where)
    if f is None:
        return
    with f:
        head = f.read(2048)
    if _MARKER not in head:
        raise ReportError(
            f"'{where}' exists and was not written by augnet; move it away so that the run's "
            "report page can be written there"
        )


def _open_asset_dir(dir_fd: int, out: str) -> int:
    """Open (create if missing) ``OUT/index_files``; refuse a link or a folder that is not ours."""
    where = os.path.join(out, ASSET_DIR)
    st = _lstat(ASSET_DIR, dir_fd)
    if st is None:
        os.mkdir(ASSET_DIR, 0o755, dir_fd=dir_fd)
    elif stat.S_ISLNK(st.st_mode):
        raise ReportError(
            f"'{where}' is a symbolic link; augnet does not follow links it did not make"
        )
    elif not stat.S_ISDIR(st.st_mode):
        raise ReportError(f"'{where}' exists and is not a folder augnet wrote; move it away")
    afd = os.open(ASSET_DIR, os.O_RDONLY | _O_DIRECTORY | _O_NOFOLLOW | _O_CLOEXEC, dir_fd=dir_fd)
    try:
        if st is not None:
            names = os.listdir(afd)
            if names and _read_state(afd, out) is None:
                raise ReportError(
                    f"'{where}' exists and was not written by augnet; move it away so that the "
                    "run's report page can be written there"
                )
    except BaseException:
        os.close(afd)
        raise
    return afd


def _read_state(afd: int, out: str) -> dict[str, Any] | None:
    f = _open_read(STATE_FILE, afd, os.path.join(out, ASSET_DIR, STATE_FILE))
    if f is None:
        return None
    with f:
        try:
            state = json.loads(f.read())
        except ValueError:
            return None
    if not isinstance(state, dict) or state.get(_STATE_MARK) != FORMAT:
        return None
    return state


def _read_run(dir_fd: int, out: str) -> Any:
    try:
        f = _open_read(RUN_FILE, dir_fd, os.path.join(out, RUN_FILE))
    except (OSError, ReportError):
        return None
    if f is None:
        return None
    with f:
        try:
            return json.loads(f.read())
        except ValueError:
            return None


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _parse(line: bytes, out: str, input_root: str | None = None) -> list | None:
    try:
        entry = json.loads(line)
    except ValueError:
        return None
    return index_row(entry, out, input_root) if isinstance(entry, dict) else None


class _Chunks:
    """Writes chunk files, skipping those whose content is unchanged."""

    def __init__(self, afd: int, out: str, old: Sequence[Mapping[str, Any]]):
        self.afd, self.out = afd, out
        self.old = {c.get("file"): c.get("hash") for c in old if isinstance(c, Mapping)}
        self.chunks: list[dict[str, Any]] = []
        self.written = 0

    def add(self, rows: list[list]) -> None:
        number = len(self.chunks)
        name = f"rows-{number:06d}.js"
        data = encode_chunk(number, rows)
        digest = _sha(data)[:16]
        st = _lstat(name, self.afd)
        if self.old.get(name) != digest or st is None or st.st_size != len(data):
            _write_atomic(name, data, self.afd, os.path.join(self.out, ASSET_DIR, name))
            self.written += 1
        self.chunks.append({"file": name, "hash": digest, "rows": len(rows)})


def _sync_chunks(
    dir_fd: int,
    afd: int,
    out: str,
    state: Mapping | None,
    rebuild: bool,
    input_root: str | None = None,
) -> dict:
    """Bring the chunk files up to date with summary.jsonl; return the new state."""
    f = _open_read(SUMMARY_FILE, dir_fd, os.path.join(out, SUMMARY_FILE))
    old_chunks = state.get("chunks", []) if state else []
    writer = _Chunks(afd, out, old_chunks)
    if f is None:
        return {_STATE_MARK: FORMAT, "summary": None, "chunks": [], "skipped": 0}
    with f:
        st = os.fstat(f.fileno())
        prev = state.get("summary") if state and not rebuild else None
        start = skipped = 0
        if isinstance(prev, Mapping):
            try:
                ok = (
                    prev["dev"] == st.st_dev
                    and prev["ino"] == st.st_ino
                    and st.st_size >= prev["consumed"]
                    and _sha(os.pread(f.fileno(), prev["head_len"], 0)) == prev["head"]
                    and prev["full_chunks"] <= len(old_chunks)
                )
                if ok:
                    f.seek(prev["chunk_start"])
                    ok = _sha(f.read(prev["consumed"] - prev["chunk_start"])) == prev["region"]
            except (KeyError, TypeError, OSError):
                ok = False
            if ok:  # append-only growth: keep the full chunks, reread the open one
                writer.chunks = [dict(c) for c in old_chunks[: prev["full_chunks"]]]
                start, skipped = prev["chunk_start"], prev["skipped_before"]
        f.seek(start)
        offset = chunk_start = start
        skipped_before = skipped
        rows: list[list] = []
        for line in f:
            if not line.endswith(b"\n"):
                break  # still being written
            offset += len(line)
            if not line.strip():
                continue
            row = _parse(line, out, input_root)
            if row is None:
                skipped += 1
                continue
            rows.append(row)
            if len(rows) == CHUNK_ROWS:
                writer.add(rows)
                rows = []
                chunk_start, skipped_before = offset, skipped
        full = len(writer.chunks)
        if rows:
            writer.add(rows)
        head_len = min(_HEAD_BYTES, offset)
        f.seek(chunk_start)
        region = f.read(offset - chunk_start)
        head = os.pread(f.fileno(), head_len, 0)
    return {
        _STATE_MARK: FORMAT,
        "summary": {
            "dev": st.st_dev,
            "ino": st.st_ino,
            "consumed": offset,
            "head_len": head_len,
            "head": _sha(head),
            "chunk_start": chunk_start,
            "full_chunks": full,
            "skipped_before": skipped_before,
            "region": _sha(region),
        },
        "chunks": writer.chunks,
        "skipped": skipped,
        "written": writer.written,
    }


def _remove_stale(afd: int, keep: Iterable[str]) -> None:
    keep = set(keep)
    for name in os.listdir(afd):
        stale = (_CHUNK_RE.fullmatch(name) and name not in keep) or _is_our_temp(name)
        if stale:
            with contextlib.suppress(OSError):
                os.unlink(name, dir_fd=afd)


def write_index_html(
    out_dir: str | os.PathLike[str],
    *,
    total: int | None = None,
    title: str | None = None,
    rebuild: bool = False,
    final: bool = False,
) -> Path:
    """Write (or bring up to date) ``OUT/index.html`` from ``OUT/summary.jsonl``.

    Call it after every committed batch: while ``summary.jsonl`` only grows, a call costs the
    lines of the last 1000-row chunk plus the new ones (see the module docstring). Without
    ``summary.jsonl`` the page says that no input has finished yet.

    Args:
        out_dir: the run's output folder (must exist).
        total: the number of inputs of the whole run, if known: the page shows "n of total
            finished" and a progress bar.
        title: the page's title (default: the folder's name).
        rebuild: reread the whole ``summary.jsonl`` even if it only grew.
        final: the run is over: ``state.json`` then keeps no identity of ``summary.jsonl``
            (device, inode), so that the folder's bytes depend on its content only (a committed
            run folder, e.g. the demo's, stays byte-identical when it is regenerated); the next
            call rereads ``summary.jsonl`` once.

    Returns:
        The path of ``index.html``.

    Raises:
        ReportError: ``out_dir`` is missing, or ``index.html``/``index_files`` exist but were not
            written by augnet, or a file it would read or replace is a symbolic link.
        OSError: the folder cannot be written.

    Example:
        >>> write_index_html("results", total=50_000)  # doctest: +SKIP
        PosixPath('results/index.html')
    """
    out = os.fspath(out_dir)
    if total is not None and (isinstance(total, bool) or not isinstance(total, int) or total < 0):
        raise TypeError(f"`total` must be a non-negative int or None. Received: total={total!r}")
    try:
        dir_fd = os.open(out, os.O_RDONLY | _O_DIRECTORY | _O_CLOEXEC)
    except FileNotFoundError:
        raise ReportError(f"output folder '{out}' does not exist") from None
    except NotADirectoryError:
        raise ReportError(f"'{out}' is not a folder") from None
    try:
        _check_page_is_ours(dir_fd, out)
        afd = _open_asset_dir(dir_fd, out)
        try:
            state = _read_state(afd, out)
            if state is None:  # a new folder: mark it ours before anything else goes in
                _write_atomic(
                    STATE_FILE,
                    (json.dumps({_STATE_MARK: FORMAT, "chunks": []}) + "\n").encode(),
                    afd,
                    os.path.join(out, ASSET_DIR, STATE_FILE),
                )
            run = _read_run(dir_fd, out)
            root = run.get("input_root") if isinstance(run, Mapping) else None
            new = _sync_chunks(
                dir_fd, afd, out, state, rebuild, root if isinstance(root, str) else None
            )
            new.pop("written", None)
            if final:
                new["summary"] = None
            _write_atomic(
                STATE_FILE,
                (json.dumps(new, separators=(",", ":")) + "\n").encode(),
                afd,
                os.path.join(out, ASSET_DIR, STATE_FILE),
            )
            config = {
                "format": FORMAT,
                "title": title if title is not None else os.path.basename(os.path.abspath(out)),
                "facts": run_facts(run),
                "total": total,
                "chunks": [[c["rows"]] for c in new["chunks"]],
                "skipped": new["skipped"],
            }
            srcs = [f"{ASSET_DIR}/{c['file']}?v={c['hash'][:10]}" for c in new["chunks"]]
            page = render_page(config, srcs).encode("utf-8")
            _write_atomic(INDEX_FILE, page, dir_fd, os.path.join(out, INDEX_FILE))
            _remove_stale(afd, (c["file"] for c in new["chunks"]))
        finally:
            os.close(afd)
        for name in os.listdir(dir_fd):
            if _PAGE_TEMP_RE.fullmatch(name):
                with contextlib.suppress(OSError):
                    os.unlink(name, dir_fd=dir_fd)
    finally:
        os.close(dir_fd)
    return Path(out) / INDEX_FILE


def owns_report(out_dir: str | os.PathLike[str]) -> bool:
    """Whether ``OUT/index.html`` and ``OUT/index_files`` are absent or augnet's report (written
    by :func:`write_index_html`): ``False`` if either is a link or something augnet did not write.
    """
    out = os.fspath(out_dir)
    try:
        dir_fd = os.open(out, os.O_RDONLY | _O_DIRECTORY | _O_CLOEXEC)
    except OSError:
        return True  # no folder: nothing in the way
    try:
        _check_page_is_ours(dir_fd, out)
        st = _lstat(ASSET_DIR, dir_fd)
        if st is None:
            return True
        if not stat.S_ISDIR(st.st_mode):
            return False
        afd = os.open(
            ASSET_DIR, os.O_RDONLY | _O_DIRECTORY | _O_NOFOLLOW | _O_CLOEXEC, dir_fd=dir_fd
        )
        try:
            return not os.listdir(afd) or _read_state(afd, out) is not None
        finally:
            os.close(afd)
    except (ReportError, OSError):
        return False
    finally:
        os.close(dir_fd)


def remove_index_html(out_dir: str | os.PathLike[str]) -> None:
    """Remove the report page written by :func:`write_index_html` (``index.html`` and the files
    of ``index_files/``, then the folder if empty), e.g. when the run that wrote it finished no
    input. Only what this module wrote goes; a page or folder that is not augnet's is left alone.
    """
    out = os.fspath(out_dir)
    if not owns_report(out):
        return
    try:
        dir_fd = os.open(out, os.O_RDONLY | _O_DIRECTORY | _O_CLOEXEC)
    except OSError:
        return
    try:
        st = _lstat(ASSET_DIR, dir_fd)
        if st is not None and stat.S_ISDIR(st.st_mode):
            afd = os.open(
                ASSET_DIR, os.O_RDONLY | _O_DIRECTORY | _O_NOFOLLOW | _O_CLOEXEC, dir_fd=dir_fd
            )
            try:
                for name in os.listdir(afd):
                    ours = name == STATE_FILE or _CHUNK_RE.fullmatch(name) or _is_our_temp(name)
                    entry = _lstat(name, afd)
                    if ours and entry is not None and stat.S_ISREG(entry.st_mode):
                        os.unlink(name, dir_fd=afd)
            finally:
                os.close(afd)
            with contextlib.suppress(OSError):
                os.rmdir(ASSET_DIR, dir_fd=dir_fd)
        entry = _lstat(INDEX_FILE, dir_fd)
        if entry is not None and stat.S_ISREG(entry.st_mode):
            os.unlink(INDEX_FILE, dir_fd=dir_fd)
    finally:
        os.close(dir_fd)
