"""The report page's writer (augnet._html), without a browser: rows, links, escaping, incremental
rewrites, atomic writes, and refusing what augnet did not write. The page in a real browser is
tested in test_html_browser.py."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path

import pytest
from report_data import make_run, summary_lines, write_summary

from augnet import _html
from augnet._html import ReportError, encode_chunk, href, index_row, write_index_html

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "jacobian_results"


def decode_chunk(path: Path) -> dict:
    """The data of a chunk file, decoded as the page's script does (JSON.parse of the literal)."""
    text = path.read_text(encoding="ascii")
    m = re.fullmatch(r"augnetReport\.add\((\d+),'(.*)'\);\n", text, re.DOTALL)
    assert m, text[:200]
    literal = m.group(2).replace("\\'", "'").replace("\\\\", "\\")
    return {"number": int(m.group(1)), **json.loads(literal)}


def page_rows(out: Path) -> list[list]:
    """Every row of the page, with string-table entries turned back into URLs."""
    config = page_config(out)
    rows = []
    for number in range(len(config["chunks"])):
        data = decode_chunk(out / "index_files" / f"rows-{number:06d}.js")
        assert data["number"] == number
        for r in data["r"]:
            folder = r[6]

            def url(f, folder=folder, s=data["s"]):
                return f"{folder}/{s[f]}" if isinstance(f, int) else f

            rows.append([*r[:7], [url(f) for f in r[7]], url(r[8]), *r[9:]])
    return rows


def page_config(out: Path) -> dict:
    text = (out / "index.html").read_text(encoding="utf-8")
    m = re.search(r'<script type="application/json" id="augnet-config">(.*?)</script>', text, re.S)
    return json.loads(m.group(1))


def snapshot(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


# --------------------------------------------------------------------------------------------
# Rows and links
# --------------------------------------------------------------------------------------------


def test_row_of_the_demo_run():
    line = json.loads((DEMO / "summary.jsonl").read_text().splitlines()[0])
    run = json.loads((DEMO / "run.json").read_text())
    row = index_row(line, DEMO, run["input_root"])
    name, key, outputs, preds, l2, mx, folder, maps, sheet, thumb, top, norm, maxabs = row
    assert (name, key, outputs) == (line["name"], line["input"], line["outputs"])
    assert preds == [float(f"{v:.6g}") for v in line["predictions"]]
    assert l2 == [float(f"{v:.6g}") for v in line["jacobian_l2"]]
    assert mx == [float(f"{v:.6g}") for v in line["jacobian_max_abs"]]
    assert folder == "sample_input"
    assert maps == [f"sample_input/output_{k:02d}.png" for k in outputs]
    assert sheet == "sample_input/contact_sheet.png"
    # the thumbnail the run wrote (inside the folder: the page does not need the input)
    assert thumb == "sample_input/thumbnail.png"
    assert (DEMO / thumb).is_file()
    # without one, the input image, outside the run's folder, found through input_root
    line = dict(line, files=[f for f in line["files"] if "thumbnail" not in f])
    assert index_row(line, DEMO, run["input_root"])[9] == f"{run['input_root']}/{line['input']}"
    assert (DEMO / run["input_root"] / line["input"]).is_file()
    assert top == float(f"{max(line['predictions']):.6g}")
    assert norm == pytest.approx(math.sqrt(sum(v * v for v in line["jacobian_l2"])), rel=1e-5)
    assert maxabs == float(f"{max(line['jacobian_max_abs']):.6g}")
    for f in [*maps, sheet]:
        assert (DEMO / f).is_file()


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("cat/output_03.png", "cat/output_03.png"),
        ("cat #1?/output_03.png", "cat%20%231%3F/output_03.png"),
        ("100%/a.png", "100%25/a.png"),
        ("javascript:alert(1)/x.png", "javascript%3Aalert%281%29/x.png"),
        ("é/ü.png", "%C3%A9/%C3%BC.png"),
        ("./a/../b/x.png", "b/x.png"),
        ("/runs/a/cat/x.png", "cat/x.png"),  # absolute inside the folder: relative
        ("/runs/ab/x.png", "file:///runs/ab/x.png"),  # a sibling with a common prefix: outside
        ("/data/<b>.png", "file:///data/%3Cb%3E.png"),
        ("../inputs/cat.png", "../inputs/cat.png"),  # relative to OUT, outside it
        ("", None),
        (None, None),
    ],
)
def test_href(path, expected):
    assert href(path, "/runs/a") == expected


def test_rows_defensive_about_fields():
    # only `input` is required; wrong types are ignored, never an exception
    assert index_row({"name": "x"}, "/o") is None
    assert index_row({"input": 3}, "/o") is None
    row = index_row(
        {
            "input": "rel/x.npy[7]",
            "outputs": [1, "a", True, 2],
            "predictions": [0.5, None, float("nan"), float("inf")],
            "jacobian_l2": "oops",
            "files": ["x/output_1.png", 7, "x/output_002.png", "x/notes.txt"],
        },
        "/o",
    )
    assert row[0] == "rel/x.npy[7]"  # name defaults to the input
    assert row[2] == [1, None, None, 2]
    assert row[3] == [0.5, "NaN", "NaN", "Infinity"]
    assert row[4] == [] and row[11] == "NaN"
    assert row[7] == ["x/output_1.png", None, None, "x/output_002.png"]
    assert row[9] is None  # a row of a .npy has no picture of its own
    assert row[10] == "Infinity"


def test_thumbnail_file_preferred_to_the_input():
    row = index_row(
        {"input": "/data/cat.jpg", "files": ["cat/output_0.png", "cat/thumbnail.png"]}, "/o"
    )
    assert row[9] == "cat/thumbnail.png"
    row = index_row({"input": "/data/cat.tif", "files": []}, "/o")
    assert row[9] is None  # browsers do not show TIFF


def test_chunk_string_table_round_trip(tmp_path):
    rows = [index_row(json.loads(line), tmp_path) for line in summary_lines(50, k=3)]
    (tmp_path / "c.js").write_bytes(encode_chunk(4, rows))
    data = decode_chunk(tmp_path / "c.js")
    assert data["number"] == 4
    assert len(data["s"]) < 3 * 50 + 1  # file names stored once per chunk
    for raw, row in zip(data["r"], rows, strict=True):
        folder = raw[6]
        assert [f"{folder}/{data['s'][f]}" for f in raw[7]] == row[7]
        assert f"{folder}/{data['s'][raw[8]]}" == row[8]
        assert raw[:7] == row[:7] and raw[9:] == row[9:]


# --------------------------------------------------------------------------------------------
# Writing the page
# --------------------------------------------------------------------------------------------


def test_the_committed_demo_page_is_what_the_demo_writes(tmp_path):
    """jacobian_results/ holds the demo's page (augnet demo writes it): rebuilt from the
    committed summary.jsonl, the page and its data are the same bytes."""
    out = tmp_path / "jacobian_results"
    shutil.copytree(DEMO, out)
    committed = snapshot(out)
    assert {"index.html", "index_files/rows-000000.js", "index_files/state.json"} <= set(committed)
    write_index_html(out, total=1, rebuild=True, final=True)
    assert snapshot(out) == committed


def test_demo_page(tmp_path):
    out = tmp_path / "run"
    shutil.copytree(DEMO, out, ignore=shutil.ignore_patterns("index.html", "index_files"))
    before = snapshot(out)
    page = write_index_html(out, total=1)
    assert page == out / "index.html"
    after = snapshot(out)
    # only the page and its folder were added; nothing of the run changed
    assert {k: v for k, v in after.items() if k in before} == before
    assert set(after) - set(before) == {
        "index.html",
        "index_files/rows-000000.js",
        "index_files/state.json",
    }
    config = page_config(out)
    assert config["total"] == 1 and config["chunks"] == [[1]] and config["skipped"] == 0
    assert config["title"] == "run"
    facts = dict(config["facts"])
    assert facts["model"] == "region_cnn.keras" and facts["outputs"] == "0–12"
    assert facts["strategy"] == "loop" and facts["input"] == "256×256×1"
    line = json.loads((out / "summary.jsonl").read_text())
    root = json.loads((out / "run.json").read_text())["input_root"]
    assert page_rows(out)[0] == index_row(line, out, root)
    text = page.read_text(encoding="utf-8")
    assert '<meta name="generator" content="augnet-report">' in text
    assert "http://" not in text and "https://" not in text  # nothing from the network
    assert 'src="index_files/rows-000000.js?v=' in text


def test_no_summary_yet(tmp_path):
    write_index_html(tmp_path, total=10)
    assert page_config(tmp_path)["chunks"] == []
    assert page_config(tmp_path)["total"] == 10


def test_same_summary_same_bytes(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        out.mkdir()
        with open(out / "summary.jsonl", "w") as f:
            f.writelines(summary_lines(30))
        write_index_html(out, title="t")
    assert snapshot(a)["index.html"] == snapshot(b)["index.html"]
    assert snapshot(a)["index_files/rows-000000.js"] == snapshot(b)["index_files/rows-000000.js"]


def test_chunks_and_incremental_rewrite_equal_a_fresh_build(tmp_path, monkeypatch):
    monkeypatch.setattr(_html, "CHUNK_ROWS", 10)
    lines = list(summary_lines(47, k=2))
    grow, fresh = tmp_path / "grow", tmp_path / "fresh"
    grow.mkdir()
    summary = grow / "summary.jsonl"
    written = []
    real = _html._write_atomic
    monkeypatch.setattr(
        _html, "_write_atomic", lambda name, *a, **k: (written.append(name), real(name, *a, **k))
    )
    done = 0
    for step in (3, 9, 1, 12, 0, 5, 17):  # batches appended as a run commits them
        with open(summary, "a") as f:
            f.writelines(lines[done : done + step])
        done += step
        written.clear()
        write_index_html(grow, total=47, title="t")
        # only the open chunk(s) touched by the new lines are rewritten, plus state and page
        chunks = [n for n in written if n.startswith("rows-")]
        assert len(chunks) <= 1 + step // 10 + 1, (step, chunks)
        assert written[-1] == "index.html"
    assert done == 47
    fresh.mkdir()
    shutil.copy(summary, fresh / "summary.jsonl")
    write_index_html(fresh, total=47, title="t")
    got, want = snapshot(grow), snapshot(fresh)
    got.pop("index_files/state.json")
    want.pop("index_files/state.json")
    assert got == want
    assert [c[0] for c in page_config(grow)["chunks"]] == [10, 10, 10, 10, 7]
    assert [r[1] for r in page_rows(grow)] == [json.loads(x)["input"] for x in lines]


def test_partial_last_line_is_read_when_complete(tmp_path):
    lines = list(summary_lines(3))
    summary = tmp_path / "summary.jsonl"
    summary.write_text(lines[0] + lines[1] + lines[2][:40])  # the writer is mid-line
    write_index_html(tmp_path)
    assert len(page_rows(tmp_path)) == 2
    assert page_config(tmp_path)["skipped"] == 0
    with open(summary, "a") as f:
        f.write(lines[2][40:])
    write_index_html(tmp_path)
    assert [r[1] for r in page_rows(tmp_path)] == [json.loads(x)["input"] for x in lines]


def test_replaced_or_rewritten_summary_is_reread(tmp_path, monkeypatch):
    monkeypatch.setattr(_html, "CHUNK_ROWS", 4)
    lines = list(summary_lines(20))
    summary = tmp_path / "summary.jsonl"
    summary.write_text("".join(lines[:10]))
    write_index_html(tmp_path)
    # replaced by rename (a new inode), as the store's final rewrite does: other content
    tmp = tmp_path / ".summary.tmp"
    tmp.write_text("".join(lines[10:]))
    os.replace(tmp, summary)
    write_index_html(tmp_path)
    assert [r[1] for r in page_rows(tmp_path)] == [json.loads(x)["input"] for x in lines[10:]]
    # rewritten in place, shorter
    summary.write_text("".join(lines[:3]))
    write_index_html(tmp_path)
    assert len(page_rows(tmp_path)) == 3
    assert sorted(p.name for p in (tmp_path / "index_files").iterdir()) == [
        "rows-000000.js",
        "state.json",
    ]  # the chunks of the longer file are gone
    # rewritten in place, same length, an already-read line changed
    edited = lines[0].replace('"name": "cat_00000"', '"name": "CAT_00000"')
    summary.write_text(edited + "".join(lines[1:3]))
    write_index_html(tmp_path)
    assert page_rows(tmp_path)[0][0] == "CAT_00000"
    # deleted (--overwrite): an empty page
    summary.unlink()
    write_index_html(tmp_path)
    assert page_config(tmp_path)["chunks"] == []


def test_bad_lines_are_skipped_and_counted(tmp_path):
    good = list(summary_lines(2))
    (tmp_path / "summary.jsonl").write_text(
        good[0] + "{not json\n" + "[1, 2]\n" + '{"name": "no input"}\n' + "\n" + good[1]
    )
    write_index_html(tmp_path)
    assert len(page_rows(tmp_path)) == 2
    assert page_config(tmp_path)["skipped"] == 3


def test_rebuild_rereads_everything(tmp_path):
    (tmp_path / "summary.jsonl").write_text("".join(summary_lines(5)))
    write_index_html(tmp_path)
    chunk = tmp_path / "index_files" / "rows-000000.js"
    chunk.write_text("garbage")
    write_index_html(tmp_path, rebuild=True)
    assert len(page_rows(tmp_path)) == 5


def test_deleted_chunk_is_rewritten(tmp_path):
    (tmp_path / "summary.jsonl").write_text("".join(summary_lines(5)))
    write_index_html(tmp_path)
    (tmp_path / "index_files" / "rows-000000.js").unlink()
    write_index_html(tmp_path)
    assert len(page_rows(tmp_path)) == 5


# --------------------------------------------------------------------------------------------
# Safety
# --------------------------------------------------------------------------------------------

NASTY = [
    "<script>alert(1)</script>",
    '"><img src=x onerror=alert(1)>',
    "</script><script>window.__xss=1</script>",
    'it\'s & "quoted" \\ back\u2028slash\u2029',
    "javascript:alert(1)",
]


def test_names_are_data_not_markup(tmp_path):
    entries = []
    for i, name in enumerate(NASTY):
        entries.append(
            {
                "input": f"/data/{name}.png",
                "name": name,
                "outputs": [0],
                "predictions": [0.1 * i],
                "files": [f"{name}/output_00.png"],
            }
        )
    write_summary(tmp_path, entries)
    (tmp_path / "run.json").write_text(
        json.dumps({"settings": {"model": {"path": "/m/<script>alert(2)</script>.keras"}}})
    )
    write_index_html(tmp_path, title="<b>run</b> </script>")
    text = (tmp_path / "index.html").read_text(encoding="utf-8")
    assert "<script>alert" not in text and "<img src=x" not in text
    assert "<b>run</b>" not in text and "&lt;b&gt;run&lt;/b&gt;" in text
    # the only </script> in the page close the page's own script elements
    assert text.count("</script>") == text.count("<script")
    chunk = (tmp_path / "index_files" / "rows-000000.js").read_bytes()
    assert re.fullmatch(rb"[\x20-\x7e\n]*", chunk)  # ASCII only, no raw U+2028
    assert b"<" not in chunk and b">" not in chunk and b"&" not in chunk
    rows = page_rows(tmp_path)
    assert [r[0] for r in rows] == NASTY
    assert [r[1] for r in rows] == [f"/data/{n}.png" for n in NASTY]
    for r in rows:  # links are percent-encoded relative URLs, never a scheme
        assert r[7][0].endswith("/output_00.png") and ":" not in r[7][0]
        assert r[9].startswith("file:///data/") and "<" not in r[9] and '"' not in r[9]
    assert page_config(tmp_path)["title"] == "<b>run</b> </script>"


def test_refuses_an_index_html_it_did_not_write(tmp_path):
    (tmp_path / "index.html").write_text("<html>my own page</html>")
    with pytest.raises(ReportError, match="was not written by augnet"):
        write_index_html(tmp_path)
    assert (tmp_path / "index.html").read_text() == "<html>my own page</html>"
    assert not (tmp_path / "index_files").exists()


def test_refuses_a_foreign_index_files_folder(tmp_path):
    (tmp_path / "index_files").mkdir()
    (tmp_path / "index_files" / "photo.jpg").write_bytes(b"x")
    with pytest.raises(ReportError, match="was not written by augnet"):
        write_index_html(tmp_path)
    assert not (tmp_path / "index.html").exists()
    assert os.listdir(tmp_path / "index_files") == ["photo.jpg"]


@pytest.mark.parametrize("link", ["index.html", "index_files", "summary.jsonl"])
def test_never_follows_a_link(tmp_path, link):
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    target = elsewhere / "target"
    if link == "index_files":
        target.mkdir()
    else:
        target.write_text("".join(summary_lines(2)) if link == "summary.jsonl" else "keep me")
    (out / link).symlink_to(target)
    before = snapshot(elsewhere)
    with pytest.raises(ReportError, match="symbolic link"):
        write_index_html(out)
    assert snapshot(elsewhere) == before
    assert (out / link).is_symlink()


def test_refuses_a_link_inside_its_folder(tmp_path):
    (tmp_path / "summary.jsonl").write_text("".join(summary_lines(2)))
    write_index_html(tmp_path)
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    chunk = tmp_path / "index_files" / "rows-000000.js"
    chunk.unlink()
    chunk.symlink_to(victim)
    with pytest.raises(ReportError, match="not a regular file"):
        write_index_html(tmp_path)
    assert victim.read_text() == "keep me"


def test_missing_folder_and_bad_total(tmp_path):
    with pytest.raises(ReportError, match="does not exist"):
        write_index_html(tmp_path / "nope")
    assert not (tmp_path / "nope").exists()
    with pytest.raises(TypeError, match="total"):
        write_index_html(tmp_path, total=-1)


def test_atomic_and_leaves_no_temporary_files(tmp_path, monkeypatch):
    (tmp_path / "summary.jsonl").write_text("".join(summary_lines(3)))
    write_index_html(tmp_path)
    before = snapshot(tmp_path)
    # a writer killed mid-write leaves the old page whole, and its temporary file is cleaned up
    real_replace = os.replace

    def killed(src, dst, **kw):
        if dst == "index.html":
            raise KeyboardInterrupt
        return real_replace(src, dst, **kw)

    with open(tmp_path / "summary.jsonl", "a") as f:
        f.writelines(list(summary_lines(5))[3:])
    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        write_index_html(tmp_path)
    monkeypatch.setattr(os, "replace", real_replace)
    assert (tmp_path / "index.html").read_bytes() == before["index.html"]
    assert not [p for p in tmp_path.rglob(".*") if p.is_file()]
    stale = tmp_path / ".index.tmp-99999-0123abcd.html"  # as left by a process killed by SIGKILL
    stale.write_text("x")
    write_index_html(tmp_path)
    assert not stale.exists()
    assert len(page_rows(tmp_path)) == 5


def test_moved_folder_keeps_its_links(tmp_path):
    out = tmp_path / "run"
    make_run(out, 4, k=2)
    write_index_html(out)
    rows = page_rows(out)
    moved = tmp_path / "elsewhere" / "moved"
    moved.parent.mkdir()
    shutil.move(out, moved)
    for r in rows:  # every link into the run is relative and still resolves
        for url in [*r[7], r[8]]:
            assert not url.startswith(("/", "file:"))
            assert (moved / url).is_file()
        assert r[9].startswith("file:///")  # the input image, outside the run


def test_absolute_files_inside_the_folder_become_relative(tmp_path):
    out = tmp_path / "run"
    entries = make_run(out, 2, k=1)
    for e in entries:
        e["files"] = [str(out / f) for f in e["files"]]
    write_summary(out, entries)
    write_index_html(out)
    for r in page_rows(out):
        assert r[8] == f"{r[0]}/contact_sheet.png"


# --------------------------------------------------------------------------------------------
# For the runner: the final state, whose page is it, removing a page nobody finished
# --------------------------------------------------------------------------------------------


def test_final_state_keeps_no_file_identity_and_the_next_call_rereads(tmp_path, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    write_summary(out, [json.loads(line) for line in summary_lines(12)])
    write_index_html(out, total=12, final=True)
    state = json.loads((out / "index_files" / "state.json").read_text())
    assert state["summary"] is None and state["chunks"][0]["rows"] == 12
    first = snapshot(out)
    # the same content in a new file (a new inode): the same bytes, state included
    (out / "summary.jsonl").write_bytes((out / "summary.jsonl").read_bytes())
    write_index_html(out, total=12, final=True)
    assert snapshot(out) == first
    # the next (non-final) call reads the whole summary once, then follows it incrementally
    reads = []
    real = _html._parse
    monkeypatch.setattr(_html, "_parse", lambda *a: reads.append(1) or real(*a))
    write_index_html(out, total=12)
    assert len(reads) == 12
    assert json.loads((out / "index_files" / "state.json").read_text())["summary"] is not None


def test_owns_report_and_remove_index_html(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    assert _html.owns_report(out)  # nothing there
    write_index_html(out, total=3)
    (out / "index_files" / ".rows-000000.tmp-1-deadbeef.js").write_text("")  # a temporary of ours
    assert _html.owns_report(out)
    (out / "keep.txt").write_text("the user's")
    _html.remove_index_html(out)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    # a page of the user, or a folder of theirs, is not augnet's: nothing is removed
    (out / "index.html").write_text("mine")
    assert not _html.owns_report(out)
    _html.remove_index_html(out)
    assert (out / "index.html").read_text() == "mine"
    (out / "index.html").unlink()
    (out / "index_files").mkdir()
    (out / "index_files" / "notes.txt").write_text("mine")
    assert not _html.owns_report(out)
    _html.remove_index_html(out)
    assert (out / "index_files" / "notes.txt").read_text() == "mine"
    shutil.rmtree(out / "index_files")
    os.symlink(tmp_path, out / "index_files")
    assert not _html.owns_report(out)


def test_temporaries_of_a_killed_writer_are_removed_and_nothing_else(tmp_path):
    """A process killed while it wrote a data chunk or the state file leaves its temporary
    (``.rows-NNNNNN.tmp-PID-HEX.js``, ``.state.tmp-PID-HEX.json``): the next page update removes
    it; a name that only looks similar is not augnet's and stays."""
    out = tmp_path / "run"
    out.mkdir()
    write_index_html(out, total=3)
    files = out / "index_files"
    ours = [".rows-000000.tmp-4242-0123abcd.js", ".state.tmp-77-deadbeef.json"]
    theirs = [".rows-000000.tmp-notes.js", ".rows.tmp-1-deadbeef.js", "rows-000000.tmp-1-0a.js"]
    for name in ours + theirs:
        (files / name).write_text("x")
    before = sorted(p.name for p in files.iterdir() if p.name not in ours + theirs)
    write_index_html(out, total=3)
    after = sorted(p.name for p in files.iterdir())
    assert not set(ours) & set(after)
    assert set(theirs) <= set(after)
    assert sorted(n for n in after if n not in theirs) == before
