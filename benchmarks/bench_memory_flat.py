"""Memory of a data-set run against the number of inputs (issue 9): it must stay flat.

Runs ``augnet jacobian`` (the one-process scheduler of ``augnet._runner``) over folders of
2,500 ... 40,000 tiny inputs (8x8 grayscale PGM images, a Dense 64 -> 4 model), each run in a
fresh interpreter, and records:

* the peak resident memory of the whole run (``ru_maxrss`` of the child, as ``/usr/bin/time``);
* the resident memory after every committed batch (anonymous pages, ``RssAnon``: the heap, not the
  file-backed pages of libraries), and from it the growth per input over the second half of the
  run (a least-squares slope, bytes per input).

With ``--compare REF`` the code of git ref ``REF`` (e.g. ``main``, before issue 9) runs on the
same inputs too, for its peak: the figures side by side, in one run.

Usage (from the repository root; a few minutes on a shared 2-core machine)::

    python benchmarks/bench_memory_flat.py                         # 2,500 / 10,000 / 20,000 / 40,000
    python benchmarks/bench_memory_flat.py --compare main          # ... and the code of main
    python benchmarks/bench_memory_flat.py --counts 2500 20000 --format npy

It writes ``benchmarks/RESULTS_memory.md`` (and ``benchmarks/RESULTS_memory.png``, resident memory
against inputs done); raw numbers and inputs go to ``benchmarks/_out/memory/`` (gitignored).
No timed assertion anywhere: the verdict is printed with the numbers.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "_out" / "memory"
RESULTS = ROOT / "benchmarks" / "RESULTS_memory.md"
FIGURE = ROOT / "benchmarks" / "RESULTS_memory.png"
SIDE = 8
DEFAULT_COUNTS = (2500, 10000, 20000, 40000)
FLAT_BYTES_PER_INPUT = 1024  # the verdict: growth below 1 KiB per input counts as flat

_CHILD = r"""
import json, os, sys, time
sys.path.insert(0, sys.argv[1])
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
from augnet import _runner

def status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return -1

samples = []
real = _runner.commit_batch
def commit(store, result):
    written = real(store, result)
    samples.append((len(store.committed) * int(sys.argv[5]), status("RssAnon"), status("VmRSS")))
    return written
_runner.commit_batch = commit
options = _runner.RunOptions(
    model=sys.argv[2], inputs=(sys.argv[3],), out=sys.argv[4], batch_size=int(sys.argv[5]),
    formats=tuple(sys.argv[6].split(",")), contact_sheet=False, strategy="loop",
    outputs=tuple(int(k) for k in sys.argv[7].split(",")) if sys.argv[7] else None,
)
start = time.monotonic()
plan, stats = _runner.run(options, quiet=True)
json.dump({"seconds": time.monotonic() - start, "computed": stats.computed,
           "samples": samples, "vmhwm": status("VmHWM")}, open(sys.argv[8], "w"))
"""

_REF_CHILD = r"""
import os, sys
sys.path.insert(0, sys.argv[1])
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
from augnet._cli import main
sys.exit(main(sys.argv[2:]))
"""


def _inputs(n: int) -> Path:
    """A folder of ``n`` tiny images (hard links into one pool of the largest count)."""
    import numpy as np

    pool = OUT / "pool"
    pool.mkdir(parents=True, exist_ok=True)
    have = len(list(pool.iterdir()))
    rng = np.random.default_rng(have)
    for i in range(have, n):
        pixels = rng.integers(0, 256, SIDE * SIDE, dtype=np.uint8).tobytes()
        (pool / f"{i:06d}.pgm").write_bytes(b"P5\n%d %d\n255\n" % (SIDE, SIDE) + pixels)
    folder = OUT / f"inputs_{n}"
    if not folder.is_dir() or len(list(folder.iterdir())) != n:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        for i in range(n):
            os.link(pool / f"{i:06d}.pgm", folder / f"{i:06d}.pgm")
    return folder


def _model() -> Path:
    path = OUT / "dense_8x8.keras"
    if not path.exists():
        code = (
            "import keras; keras.utils.set_random_seed(0); i = keras.Input((8, 8, 1)); "
            "keras.Model(i, keras.layers.Dense(4)(keras.layers.Flatten()(i)))"
            f".save({str(path)!r})"
        )
        subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    return path


def _run_child(argv: list[str]) -> tuple[int, float]:
    """Run a child, return (its peak RSS in bytes from wait4, wall seconds)."""
    start = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode()
    proc.stderr.close()
    if proc.returncode != 0:
        raise RuntimeError(f"child failed ({proc.returncode}): {err[-2000:]}")
    return usage.ru_maxrss * 1024, time.monotonic() - start


def _slope(samples: list[tuple[int, int, int]]) -> float:
    """Least-squares growth of RssAnon in bytes per input, over the second half of the run."""
    half = samples[len(samples) // 2 :]
    if len(half) < 3:
        return float("nan")
    xs = [s[0] for s in half]
    ys = [s[1] for s in half]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den if den else 0.0


def _figure(rows: list[dict]) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4), dpi=110, layout="constrained")
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    for row in rows:
        xs = [s[0] for s in row["samples"]]
        ys = [s[1] / 2**20 for s in row["samples"]]
        ax.plot(xs, ys, label=f"{row['n']:,} inputs")
    ax.set_xlabel("inputs committed")
    ax.set_ylabel("anonymous resident memory (MiB)")
    ax.set_title("augnet jacobian: memory while the run goes (one line per run)")
    ax.set_ylim(bottom=0)
    ax.legend(loc="lower right")
    figure.savefig(FIGURE)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", type=int, nargs="+", default=list(DEFAULT_COUNTS))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--format", default="png,npy", help="png,npy (default) or npy")
    parser.add_argument(
        "--outputs", default="0", help="outputs drawn per input (default 0: one PNG per input)"
    )
    parser.add_argument("--compare", metavar="REF", help="also run the code of this git ref")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    model = _model()
    ref_path = None
    if args.compare:
        ref_path = OUT / f"ref_{args.compare.replace('/', '_')}"
        shutil.rmtree(ref_path, ignore_errors=True)
        ref_path.mkdir()
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", args.compare, "augnet"],
            check=True,
            capture_output=True,
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(ref_path)], input=archive, check=True)
    rows = []
    for n in sorted(args.counts):
        folder = _inputs(n)
        out = OUT / f"run_{n}"
        shutil.rmtree(out, ignore_errors=True)
        result = OUT / f"run_{n}.json"
        peak, wall = _run_child(
            [
                sys.executable,
                "-c",
                _CHILD,
                str(ROOT),
                str(model),
                str(folder),
                str(out),
                str(args.batch_size),
                args.format,
                args.outputs,
                str(result),
            ]
        )
        data = json.loads(result.read_text())
        row = {
            "n": n,
            "peak": peak,
            "wall": wall,
            "samples": data["samples"],
            "slope": _slope(data["samples"]),
            "computed": data["computed"],
        }
        if ref_path is not None:
            ref_out = OUT / f"ref_run_{n}"
            shutil.rmtree(ref_out, ignore_errors=True)
            ref_argv = [sys.executable, "-c", _REF_CHILD, str(ref_path), "jacobian", str(model)]
            ref_argv += [str(folder), "--out", str(ref_out), "--format", args.format, "-q"]
            ref_argv += ["--no-contact-sheet", "--batch-size", str(args.batch_size)]
            ref_argv += ["--strategy", "loop"] + (
                ["--outputs", args.outputs] if args.outputs else []
            )
            row["ref_peak"], row["ref_wall"] = _run_child(ref_argv)
            shutil.rmtree(ref_out, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
        rows.append(row)
        ref = f", {args.compare}: peak {row['ref_peak'] / 2**20:.0f} MiB" if ref_path else ""
        print(
            f"{n:>7,} inputs: peak {peak / 2**20:.0f} MiB, growth {row['slope']:.0f} B/input "
            f"over the second half, {wall:.0f} s{ref}",
            flush=True,
        )
    _write(rows, args)
    return 0


def _write(rows: list[dict], args) -> None:
    first, last = rows[0], rows[-1]
    growth = (last["peak"] - first["peak"]) / max(1, last["n"] - first["n"])
    slopes = [r["slope"] for r in rows if r["slope"] == r["slope"]]
    worst = max(slopes) if slopes else float("nan")
    flat = growth < FLAT_BYTES_PER_INPUT and worst < FLAT_BYTES_PER_INPUT
    lines = [
        "# Memory of a data-set run against the number of inputs",
        "",
        f"Run {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC on {platform.node()} "
        f"({os.cpu_count()} cores, Python {platform.python_version()}), by "
        f"`python benchmarks/bench_memory_flat.py {' '.join(sys.argv[1:])}`.",
        "",
        f"Each run: `augnet jacobian` over N tiny inputs ({SIDE}x{SIDE} grayscale PGM images, a "
        f"Dense {SIDE * SIDE} -> 4 model), batches of {args.batch_size}, `--format {args.format}`"
        + (f", `--outputs {args.outputs}`" if args.outputs else "")
        + ", no contact sheets, one fresh process per run. *Peak* is the process's maximum "
        "resident memory (`ru_maxrss`, as `/usr/bin/time` reports it); *growth* is the "
        "least-squares slope of the anonymous resident memory (`RssAnon`, read after every "
        "committed batch) over the second half of the run.",
        "",
        "| inputs | peak RSS | growth over the 2nd half | wall time |"
        + (f" {args.compare}: peak RSS | {args.compare}: wall |" if args.compare else ""),
        "|---:|---:|---:|---:|" + ("---:|---:|" if args.compare else ""),
    ]
    for r in rows:
        line = (
            f"| {r['n']:,} | {r['peak'] / 2**20:.0f} MiB | {r['slope']:.0f} bytes/input "
            f"| {r['wall']:.0f} s |"
        )
        if args.compare:
            line += f" {r['ref_peak'] / 2**20:.0f} MiB | {r['ref_wall']:.0f} s |"
        lines.append(line)
    lines += [
        "",
        f"**Peak from {first['n']:,} to {last['n']:,} inputs: "
        f"{(last['peak'] - first['peak']) / 2**20:+.1f} MiB, {growth:.0f} bytes per added input; "
        f"largest in-run growth {worst:.0f} bytes/input.** "
        + (
            "Flat: memory is bounded by the batch, not by the data set (what remains per input "
            "is the list of inputs itself: a relative path and a name, about 0.3 KB)."
            if flat
            else "NOT flat: memory grows with the number of inputs."
        ),
    ]
    if args.compare:
        ref_growth = (last["ref_peak"] - first["ref_peak"]) / max(1, last["n"] - first["n"])
        lines.append(
            f"The code of `{args.compare}` on the same inputs: {ref_growth:.0f} bytes of peak "
            "per added input."
        )
    lines += [
        "",
        "![resident memory against inputs committed](RESULTS_memory.png)",
        "",
        "Shared 2-core machine: the wall times are noisy; the memory figures are not.",
        "",
    ]
    args.results.write_text("\n".join(lines))
    (OUT / "results.json").write_text(json.dumps(rows))
    _figure(rows)
    print(f"wrote {args.results} and {FIGURE}")


if __name__ == "__main__":
    sys.exit(main())
