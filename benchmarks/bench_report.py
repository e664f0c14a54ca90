"""The report page with many inputs: time to write it, to rewrite it after a batch, to open it.

Run by hand (needs Chromium, chromedriver and selenium for the browser part)::

    python benchmarks/bench_report.py --inputs 100000

It writes a synthetic ``summary.jsonl`` (a top-5 classifier run, 1000 outputs, lines as
``augnet jacobian`` writes them, ~1.6 KB each) into a temporary folder, then measures:

* ``write_index_html`` from scratch (the whole file is read, streaming);
* ``write_index_html`` after appending one batch of 32 lines (what the runner does per batch),
  median over several batches;
* in headless Chromium: from navigation start to the first page drawn (all rows decoded), and
  the time to sort by Jacobian norm, to filter by name and to turn a page (measured in the page).

No image exists behind the synthetic rows, so the browser logs failed image loads; they do not
change the timings (images are requested after the page is drawn, and only for the visible page).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from report_data import summary_lines  # noqa: E402

from augnet._html import write_index_html  # noqa: E402

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1400,1000",
)


def browser_times(page: Path, repeats: int) -> dict[str, float]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="augnet-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    try:
        ready, decode = [], []
        for _ in range(repeats):
            driver.get(page.as_uri())
            driver.execute_async_script(
                "const done = arguments[0];"
                "(function wait() { document.body && document.body.dataset.ready ? done() :"
                " setTimeout(wait, 10); })();"
            )
            r = driver.execute_script(
                "return [augnetReport.readyMs, augnetReport.decodeMs, augnetReport.rows]"
            )
            ready.append(r[0])
            decode.append(r[1])
            rows = r[2]

        def timed(js: str) -> float:
            """Run ``js`` (which triggers a render) and return the render's duration (ms)."""
            driver.execute_script(js)
            time.sleep(0.4)  # the search box is debounced by 120 ms
            return driver.execute_script("return augnetReport.lastRenderMs")

        sort = timed(
            "const s = document.getElementById('sort'); s.value = 'norm';"
            "s.dispatchEvent(new Event('change'))"
        )
        filt = timed(
            "const q = document.getElementById('q'); q.value = 'cat_0';"
            "q.dispatchEvent(new Event('input'))"
        )
        page_turn = timed("document.getElementById('next').click()")
        return {
            "rows": rows,
            "ready_ms_median": statistics.median(ready),
            "ready_ms_all": ready,
            "decode_ms_median": statistics.median(decode),
            "sort_by_norm_ms": sort,
            "search_ms": filt,
            "page_turn_ms": page_turn,
        }
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", type=int, default=100_000)
    parser.add_argument("--batches", type=int, default=10, help="appended batches to time")
    parser.add_argument("--repeats", type=int, default=3, help="page loads to time")
    parser.add_argument("--no-browser", action="store_true")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="augnet-report-bench-") as tmp:
        out = Path(tmp) / "run"
        out.mkdir()
        lines = summary_lines(args.inputs + 32 * args.batches)
        with open(out / "summary.jsonl", "w", encoding="utf-8") as f:
            for _ in range(args.inputs):
                f.write(next(lines))
        size = (out / "summary.jsonl").stat().st_size

        start = time.perf_counter()
        write_index_html(out, total=args.inputs + 32 * args.batches)
        full = time.perf_counter() - start

        per_batch = []
        for _ in range(args.batches):
            with open(out / "summary.jsonl", "a", encoding="utf-8") as f:
                for _ in range(32):
                    f.write(next(lines))
            start = time.perf_counter()
            write_index_html(out, total=args.inputs + 32 * args.batches)
            per_batch.append(time.perf_counter() - start)
        data = sum(p.stat().st_size for p in (out / "index_files").iterdir())
        result = {
            "inputs": args.inputs,
            "summary_jsonl_mb": round(size / 1e6, 1),
            "index_html_kb": round((out / "index.html").stat().st_size / 1e3, 1),
            "index_files_mb": round(data / 1e6, 1),
            "write_full_s": round(full, 3),
            "write_after_batch_s_median": round(statistics.median(per_batch), 4),
            "write_after_batch_s_max": round(max(per_batch), 4),
        }
        if not args.no_browser:
            result.update(browser_times(out / "index.html", args.repeats))
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
