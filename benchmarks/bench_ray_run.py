"""Throughput of the distributed data-set run (``augnet jacobian ... --ray``) against one process.

Run by hand (Ray installed: ``pip install -e ".[ray]"``)::

    python benchmarks/bench_ray_run.py                 # 400 images, ~10 minutes on 2 busy cores
    python benchmarks/bench_ray_run.py --images 96     # a quick check that it works
    python benchmarks/bench_ray_run.py --no-contact-sheet --batch-size 32

One run, three contenders, each a fresh child process, on the same inputs and settings:
MobileNetV2 (alpha 0.35, 96x96x3, ``weights=None``, BatchNorm statistics calibrated so that the
maps are not 1e-17), top-5 maps (``--format png``: five maps, a contact sheet and a thumbnail per
input) of ``--images`` JPEG photographs (crops of the repository's sample photograph):

* ``one process``: ``augnet jacobian`` in one process whose TensorFlow uses one thread;
* ``Ray, 1 worker`` and ``Ray, 2 workers``: ``--ray --workers N --worker-cpus 1`` on a local
  cluster of N CPUs started by the child (workers of one thread each; the driver is the child).

Reported, per contender: the wall time, the start-up (TensorFlow, the model; for Ray the cluster
and the workers loading the model), the throughput of the whole run and the **steady throughput**
(inputs per second once every worker has finished its first batch: start-up and tracing are
paid once per worker, whatever the data set's size), the speed-up over one process, and whether
every file the run wrote is byte-identical to the one-process run's (every contender's numbers
checked). Per batch: the compute on a worker, the Ray overhead (``dispatch``: from when the worker
could start a batch until it did; ``fetch``: from the end of a batch on the worker until its
result was on the driver), and the driver's work (reading a batch's inputs, committing it and the
page), with the bytes sent each way. Writes ``benchmarks/RESULTS_ray.md`` (``--results`` to
change); raw figures in ``benchmarks/_out/ray_run.json``.

Timings on a shared 2-core machine are noisy: only the ratios within one run hold.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT = HERE / "_out"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


# --------------------------------------------------------------------------------------------
# Inputs: the model and the images (no network: built and drawn here)
# --------------------------------------------------------------------------------------------


def make_inputs(folder: Path, n_images: int) -> tuple[Path, Path]:
    """``(model.keras, images/)``: MobileNetV2 0.35 at 96x96, calibrated; ``n_images`` JPEGs."""
    import keras
    import numpy as np
    from PIL import Image

    from benchmarks.models import calibrate_batchnorm

    keras.utils.set_random_seed(0)
    model = keras.applications.MobileNetV2(
        input_shape=(96, 96, 3), alpha=0.35, weights=None, classes=1000
    )
    rng = np.random.default_rng(99)
    calibrate_batchnorm(model, rng.uniform(-1.0, 1.0, (8, 96, 96, 3)).astype(np.float32))
    path = folder / "mobilenet_v2_035_96.keras"
    model.save(path)
    images = folder / "images"
    images.mkdir()
    with Image.open(ROOT / "sample_input" / "sample_input.jpg") as photo:
        photo = photo.convert("RGB")
        w, h = photo.size
        for i in range(n_images):
            side = int(rng.uniform(0.3, 0.9) * min(w, h))
            x, y = int(rng.uniform(0, w - side)), int(rng.uniform(0, h - side))
            crop = photo.crop((x, y, x + side, y + side)).resize((128, 128), Image.BILINEAR)
            if i % 2:
                crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
            crop.save(images / f"photo_{i:04d}.jpg", quality=90)
    return path, images


# --------------------------------------------------------------------------------------------
# A contender, in a child process
# --------------------------------------------------------------------------------------------


def child(args) -> None:
    """Run one contender; print its figures as JSON on the last line."""
    t0 = time.monotonic()
    load0 = os.getloadavg()[0]
    from augnet import _backend, _runner  # TensorFlow, with one thread

    _backend.set_threads(1)
    options = _runner.RunOptions(
        model=args.model,
        inputs=(args.inputs,),
        out=args.out,
        top_k=5,
        preprocess="minus1_1",
        contact_sheet=not args.no_contact_sheet,
        batch_size=args.batch_size,
    )
    commits: list[tuple[float, int]] = []

    def on_commit(plan, result):
        commits.append((time.monotonic(), len(result.inputs)))

    plan, model = _runner.plan_run(options, load=lambda o: _runner.load_model(o.model))
    planned = time.monotonic()
    cpu0 = time.process_time()
    figures: dict = {"workers": args.workers}
    if args.workers == 0:
        stats = _runner.run_plan(plan, model, quiet=True, on_commit=on_commit)
        ready = [planned]
    else:
        from augnet import _ray_run

        cluster = _ray_run.Cluster(address=None, workers=args.workers, worker_cpus=1.0)
        stats = _ray_run.run_plan(plan, model, cluster=cluster, quiet=True, on_commit=on_commit)
        ready = [planned + w["ready_after"] for w in stats.workers]
        figures["cluster"] = stats.cluster
        figures["worker_load_s"] = [w["load_seconds"] for w in stats.workers]
        figures["timing"] = {k: list(v) for k, v in stats.timing.items()}
        figures["failures"] = stats.failures
    end = time.monotonic()
    if args.workers == 0:  # CPU seconds of this process per second of its run: its CPU share
        figures["cpu_share"] = (time.process_time() - cpu0) / stats.seconds
    else:  # of each worker's process while it computed its batches
        figures["cpu_share"] = sum(figures["timing"]["cpu"]) / sum(figures["timing"]["compute"])
    # steady: from the n-th commit after every worker was ready (each has done its first batch)
    all_ready = max(ready)
    after = [i for i, (t, _) in enumerate(commits) if t >= all_ready]
    k = after[min(len(after) - 1, max(1, args.workers))] if after else len(commits) - 1
    t_k = commits[k][0]
    steady_n = sum(n for _, n in commits[k + 1 :])
    figures.update(
        wall_s=end - t0,
        plan_s=planned - t0,
        run_s=stats.seconds,
        ready_s=all_ready - planned,
        inputs=stats.computed,
        batches=len(commits),
        throughput=stats.computed / (end - planned),
        steady_throughput=steady_n / (commits[-1][0] - t_k) if steady_n else float("nan"),
        steady_batches=len(commits) - k - 1,
        strategy=plan.config.strategy,
        load_before=load0,
        load_after=os.getloadavg()[0],
    )
    print(json.dumps(figures))


def run_child(args, workers: int, out: Path) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        "--model",
        str(args.model),
        "--inputs",
        str(args.inputs),
        "--out",
        str(out),
        "--workers",
        str(workers),
        "--batch-size",
        str(args.batch_size),
    ]
    if args.no_contact_sheet:
        cmd.append("--no-contact-sheet")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "RAY_USAGE_STATS_ENABLED": "0"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    if done.returncode != 0:
        raise RuntimeError(f"contender with {workers} worker(s) failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------
# Checking and reporting
# --------------------------------------------------------------------------------------------


def files(out: Path) -> dict[str, bytes]:
    return {
        p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()
    }


def compare(out: Path, reference: Path) -> str:
    """``identical`` or what differs (and by how much in summary.jsonl's numbers)."""
    a, b = files(out), files(reference)
    if sorted(a) != sorted(b):
        return f"different file lists ({len(a)} vs {len(b)})"
    differ = [k for k in b if a[k] != b[k]]
    if not differ:
        return "identical"
    worst = 0.0
    for la, lb in zip(
        (out / "summary.jsonl").read_text().splitlines(),
        (reference / "summary.jsonl").read_text().splitlines(),
        strict=True,
    ):
        ea, eb = json.loads(la), json.loads(lb)
        for x, y in zip(ea["jacobian_l2"], eb["jacobian_l2"], strict=True):
            worst = max(worst, abs(x - y) / max(abs(y), 1e-30))
    return f"{len(differ)} of {len(b)} files differ (largest relative difference of a norm {worst:.1e})"


def _ms(values) -> str:
    return f"{1e3 * statistics.median(values):.1f}" if values else "-"


def _startup(r: dict) -> float:
    """Seconds before a contender's first batch could start: planning, then (Ray) the cluster and
    every worker ready."""
    return r["plan_s"] + r["ready_s"]


def report(args, results: dict, sizes: dict, seconds: float, when: str) -> str:
    import keras
    import numpy as np
    import ray
    import tensorflow as tf

    one = results["one process"]
    lines = [
        "# The distributed run on Ray: throughput against one process",
        "",
        "Measured by `python benchmarks/bench_ray_run.py"
        + (f" --images {args.images}" if args.images != 400 else "")
        + (f" --batch-size {args.batch_size}" if args.batch_size != 16 else "")
        + (" --no-contact-sheet" if args.no_contact_sheet else "")
        + f"` in {seconds / 60:.1f} minutes, {when}: "
        f"{platform.platform()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"TensorFlow {tf.__version__}, Keras {keras.__version__}, Ray {ray.__version__}, "
        f"NumPy {np.__version__}.",
        "",
        f"MobileNetV2 (alpha 0.35, 96x96x3, weights=None, BatchNorm calibrated), top-5 maps of "
        f"{args.images} JPEG photographs (128x128, resized to 96x96, `--preprocess minus1_1`), "
        f"`--format png` (5 maps{'' if args.no_contact_sheet else ', a contact sheet'} and a "
        f"thumbnail per input), `--batch-size {args.batch_size}`, strategy "
        f"`{one['strategy']}` (auto). One thread per worker and for the one-process run.",
        "",
        "| contender | wall (s) | start-up (s) | throughput (img/s) | steady (img/s) | "
        "steady speed-up | CPU share | load avg (before, after) | files vs one process |",
        "|---|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for name, r in results.items():
        startup = _startup(r)
        speedup = r["steady_throughput"] / one["steady_throughput"]
        lines.append(
            f"| {name} | {r['wall_s']:.1f} | {startup:.1f} | {r['throughput']:.2f} | "
            f"{r['steady_throughput']:.2f} | {speedup:.2f}x | {r['cpu_share']:.2f} | "
            f"{r['load_before']:.1f}, {r['load_after']:.1f} | {r['check']} |"
        )
    lines += [
        "",
        "*start-up*: TensorFlow and the model on the driver (planning), then, with Ray, the local "
        "cluster and every worker importing TensorFlow and loading the model (in parallel). "
        "*steady*: inputs per second once every worker has committed its first batch "
        f"(over the last batches of the run: {', '.join(str(r['steady_batches']) for r in results.values())}). "
        "*CPU share*: CPU seconds per second of the one process, or of each worker's process "
        "while it computed a batch: 1.0 is a whole core; less means the core was taken by other "
        "work on the machine.",
        "",
        "Per batch (medians; Ray runs):",
        "",
        "| contender | compute on a worker (ms) | its CPU (ms) | dispatch (ms) | fetch (ms) | "
        "driver reads inputs (ms) | driver commits + page (ms) | batches redone |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        t = r.get("timing")
        if not t:
            continue
        lines.append(
            f"| {name} | {_ms(t['compute'])} | {_ms(t['cpu'])} | {_ms(t['dispatch'])} | "
            f"{_ms(t['fetch'])} | {_ms(t['read'])} | {_ms(t['commit'])} | {len(r['failures'])} |"
        )
    two = results.get("Ray, 2 workers")
    if two and two.get("timing"):
        t = two["timing"]
        overhead = statistics.median(t["dispatch"]) + statistics.median(t["fetch"])
        share = overhead / statistics.median(t["compute"])
        lines += [
            "",
            f"Ray's overhead per batch (dispatch + fetch, 2 workers): {1e3 * overhead:.1f} ms, "
            f"{100 * share:.1f} % of a batch's compute. Sent per batch: "
            f"{sizes['in_per_batch'] / 1e6:.2f} MB of input files to a worker, "
            f"{sizes['out_per_batch'] / 1e6:.2f} MB of PNGs back "
            f"({sizes['files_per_batch']:.0f} files); the model once per worker "
            f"({sizes['model'] / 1e6:.1f} MB).",
        ]
    if not two:
        return "\n".join(lines)
    target = two["steady_throughput"] / one["steady_throughput"]
    whole = two["throughput"] / one["throughput"]
    normalised = target * one["cpu_share"] / two["cpu_share"]

    # Fixed costs (start-up, the first batch's tracing) are paid once per run: the whole run's
    # ratio tends to the steady one as the data set grows. Wall time for n inputs, estimated from
    # this run: start-up + n / steady throughput (per contender).
    def wall(r, n):
        return r["wall_s"] - r["inputs"] / r["steady_throughput"] + n / r["steady_throughput"]

    n_run = one["inputs"]
    scale = ", ".join(
        f"{n:,} inputs {wall(one, n) / wall(two, n):.2f}x" for n in (n_run, 5_000, 50_000)
    )
    quiet = max(r["load_before"] for r in results.values()) < 1.5 and two["cpu_share"] > 0.9
    verdict = "met" if target >= 1.8 else "NOT met"
    lines += [
        "",
        f"Target (issue 11): >= 1.8x with 2 workers on this 2-core machine: **{verdict}**, "
        f"{target:.2f}x steady throughput; {whole:.2f}x over the whole {n_run}-input run, "
        f"start-up included (one process {_startup(one):.1f} s, Ray 2 workers "
        f"{_startup(two):.1f} s before the first batch could start, paid once per run). Whole-run speed-up estimated from these figures "
        f"(start-up + inputs / steady throughput): {scale}. Per CPU second the workers actually "
        f"got (CPU share {two['cpu_share']:.2f} each against {one['cpu_share']:.2f} for one "
        f"process): {normalised:.2f}x.",
        "",
        (
            "Measured on a quiet machine (load average below 1.5 before every contender, the "
            "workers getting over 90 % of a core each)."
            if quiet
            else "**Provisional**: measured on a machine shared with other work (see the load "
            "averages and CPU shares); rerun on a quiet one."
        ),
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--no-contact-sheet", action="store_true")
    parser.add_argument("--timeout", type=int, default=3600, help="per contender (s)")
    parser.add_argument("--results", type=Path, default=HERE / "RESULTS_ray.md")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="rewrite --results from the figures of the last run (benchmarks/_out/ray_run.json)",
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--inputs", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    if args.report_only:
        path = OUT / "ray_run.json"
        saved = json.loads(path.read_text())
        for option, value in saved.get("options", {}).items():  # the run's, not the defaults
            setattr(args, option, value)
        when = saved.get("when") or time.strftime(
            "%Y-%m-%d %H:%M", time.localtime(path.stat().st_mtime)
        )
        seconds = saved.get("seconds", float("nan"))
        text = report(args, saved["results"], saved["sizes"], seconds, when)
        args.results.write_text(text)
        print(text)
        return
    started = time.monotonic()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    with tempfile.TemporaryDirectory(prefix="augnet-bench-ray-") as tmp:
        tmp = Path(tmp)
        args.model, args.inputs = make_inputs(tmp, args.images)
        results = {}
        outs = {}
        for name, workers in (("one process", 0), ("Ray, 1 worker", 1), ("Ray, 2 workers", 2)):
            out = tmp / name.replace(" ", "_").replace(",", "") / "run"
            print(f"{name} ...", flush=True)
            results[name] = run_child(args, workers, out)
            outs[name] = out
            print(json.dumps({k: v for k, v in results[name].items() if k != "timing"}), flush=True)
        for name, out in outs.items():
            results[name]["check"] = compare(out, outs["one process"])
        ref = outs["one process"]
        batches = results["one process"]["batches"]
        pngs = [p for p in ref.rglob("*.png")]
        sizes = {
            "in_per_batch": sum(p.stat().st_size for p in Path(args.inputs).iterdir()) / batches,
            "out_per_batch": sum(p.stat().st_size for p in pngs) / batches,
            "files_per_batch": len(pngs) / batches,
            "model": Path(args.model).stat().st_size,
        }
        seconds, when = time.monotonic() - started, time.strftime("%Y-%m-%d %H:%M")
        text = report(args, results, sizes, seconds, when)
    OUT.mkdir(exist_ok=True)
    options = {k: getattr(args, k) for k in ("images", "batch_size", "no_contact_sheet")}
    (OUT / "ray_run.json").write_text(
        json.dumps(
            {
                "results": results,
                "sizes": sizes,
                "seconds": seconds,
                "when": when,
                "options": options,
            },
            indent=1,
        )
    )
    args.results.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
