"""What a distributed data-set run costs on Ray: measured facts for docs/ray.md.

Run by hand (Ray installed: ``pip install -e ".[ray]"``)::

    python benchmarks/bench_ray.py            # ~3 minutes on 2 cores
    python benchmarks/bench_ray.py --json out.json

On the loopback address only (tests/ray_fixtures.py), it measures:

1. starting Ray: ``ray.init(num_cpus=2)`` in the process, and a head node plus two worker nodes
   as separate processes (``ray start --block``), until all nodes are up;
2. the per-call cost of an actor method that returns one batch's results to the driver: nothing,
   the raw top-5 Jacobians of 32 MobileNetV2 inputs (32 x 5 x 96 x 96 x 3 float32, 17.7 MB), and
   the PNG bytes of their pictures (32 x 6 files); on one node (shared memory) and from a worker
   node to the driver's node (the object managers copy it over TCP);
3. fault tolerance: an actor killed (SIGKILL) in the middle of a call, with ``max_restarts=1,
   max_task_retries=1`` (the call is redone on the restarted actor) and with
   ``max_task_retries=0`` (the driver gets ``RayActorError``): time to the result;
4. a worker node killed after a call returned a large result that the driver had not fetched
   yet: what ``ray.get`` does (the object lived in that node's object store);
5. shipping the model without a shared file system: its bytes through the object store, each
   actor writes them to its own temporary file and loads it.

Timings on a shared 2-core machine are noisy: compare figures of one run, rerun on a quiet one.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

import ray_fixtures  # noqa: E402  (sets Ray's environment before Ray is imported)


def _payloads(seed: int = 0) -> dict[str, object]:
    from PIL import Image

    rng = np.random.default_rng(seed)
    jac = rng.standard_normal((32, 5, 96, 96, 3)).astype(np.float32)
    pngs = []
    for i in range(32 * 6):  # 5 maps + 1 contact sheet per input, sizes as augnet writes them
        side = 512 if i % 6 == 5 else 256
        pixels = (rng.random((side // 8, side // 8, 3)) * 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).resize((side, side), Image.NEAREST).save(buffer, format="PNG")
        pngs.append(buffer.getvalue())
    return {"nothing": None, "jacobians_17.7MB": jac, "png_bytes": pngs}


def _size(value) -> int:
    if value is None:
        return 0
    if isinstance(value, np.ndarray):
        return value.nbytes
    return sum(len(b) for b in value)


def call_overhead(ray, where: dict, repeats: int) -> dict[str, dict[str, float]]:
    """Seconds per ``ray.get(actor.batch.remote(i))`` returning each payload."""

    @ray.remote(num_cpus=1)
    class Worker:
        def __init__(self):
            self.payloads = _payloads()

        def batch(self, name):
            return self.payloads[name]

        def ping(self):
            return os.getpid()

    actor = Worker.options(**where).remote()
    ray.get(actor.ping.remote())
    out = {}
    for name in ("nothing", "jacobians_17.7MB", "png_bytes"):
        ray.get(actor.batch.remote(name))  # warm-up
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            value = ray.get(actor.batch.remote(name))
            times.append(time.perf_counter() - t)
            del value
        size = _size(_payloads()[name])
        med = statistics.median(times)
        out[name] = {
            "bytes": size,
            "median_ms": round(1e3 * med, 2),
            "min_ms": round(1e3 * min(times), 2),
            "MB_per_s": round(size / med / 1e6, 1) if size else None,
        }
    ray.kill(actor)
    return out


def kill_mid_call(ray, retries: int) -> dict[str, object]:
    """Kill the actor's process while a call runs; report how the driver sees it."""

    @ray.remote(num_cpus=1, max_restarts=1, max_task_retries=retries)
    class Slow:
        def __init__(self):
            self.started = time.time()

        def pid(self):
            return os.getpid()

        def work(self, seconds):
            time.sleep(seconds)
            return {"pid": os.getpid(), "actor_started": self.started}

    actor = Slow.remote()
    pid = ray.get(actor.pid.remote())
    t = time.perf_counter()
    ref = actor.work.remote(2.0)
    time.sleep(0.5)
    os.kill(pid, signal.SIGKILL)  # the worker process dies mid-call (OOM killer, lost machine)
    try:
        result = ray.get(ref, timeout=120)
        outcome = {
            "result": "returned",
            "redone_on_new_process": result["pid"] != pid,
            "seconds_to_result": round(time.perf_counter() - t, 2),
            "restart_and_retry_overhead_s": round(time.perf_counter() - t - 2.0 - 0.5, 2),
        }
    except Exception as exc:  # RayActorError without retries
        outcome = {
            "result": type(exc).__name__,
            "seconds_to_error": round(time.perf_counter() - t, 2),
        }
    ray.kill(actor)
    return {"max_task_retries": retries, **outcome}


def node_lost_before_fetch(ray, cluster) -> dict[str, object]:
    """A result stays in the worker node's object store until the driver fetches it."""

    @ray.remote(num_cpus=1, max_restarts=0, max_task_retries=0)
    class Producer:
        def make(self):
            return np.ones((32, 5, 96, 96, 3), np.float32)

    actor = Producer.options(resources={"node_1": 0.01}).remote()
    ref = actor.make.remote()
    ray.wait([ref], fetch_local=False)  # computed, not fetched
    cluster.kill_node(1)
    t = time.perf_counter()
    try:
        ray.get(ref, timeout=120)
        outcome = "fetched (a copy existed elsewhere)"
    except Exception as exc:
        outcome = f"{type(exc).__name__}: lost with the node"
    return {"outcome": outcome, "seconds": round(time.perf_counter() - t, 2)}


def model_through_object_store(ray) -> dict[str, float]:
    """The model's bytes put once by the driver, written and loaded by the actor."""
    import keras

    keras.utils.set_random_seed(0)
    model = keras.applications.MobileNetV2(
        input_shape=(96, 96, 3), alpha=0.35, weights=None, classes=1000
    )
    path = Path(tempfile.mkdtemp(prefix="augnet-bench-")) / "mobilenet.keras"
    model.save(path)
    data = path.read_bytes()
    t = time.perf_counter()
    ref = ray.put(data)
    put_s = time.perf_counter() - t

    @ray.remote(num_cpus=1)
    class Loader:
        def __init__(self, blob):
            import augnet

            t0 = time.perf_counter()
            folder = Path(tempfile.mkdtemp(prefix="augnet-model-"))
            local = folder / "model.keras"
            local.write_bytes(blob)
            self.model = augnet.load_model(local)  # safe_mode: no code from the file runs
            self.load_s = time.perf_counter() - t0

        def seconds(self):
            return self.load_s

    t = time.perf_counter()
    actor = Loader.remote(ref)
    load_s = ray.get(actor.seconds.remote())
    ready_s = time.perf_counter() - t
    ray.kill(actor)
    return {
        "model_mb": round(len(data) / 1e6, 2),
        "put_ms": round(1e3 * put_s, 1),
        "actor_write_and_load_s": round(load_s, 2),
        "actor_ready_s (process + import + load)": round(ready_s, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    import ray

    figures: dict[str, object] = {}
    t = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    figures["start_local_ray_init_s"] = round(time.perf_counter() - t, 2)
    figures["one_node"] = call_overhead(ray, {}, args.repeats)
    figures["kill_actor_mid_call"] = [kill_mid_call(ray, 1), kill_mid_call(ray, 0)]
    figures["model_through_object_store"] = model_through_object_store(ray)
    t = time.perf_counter()
    ray.shutdown()
    figures["shutdown_local_s"] = round(time.perf_counter() - t, 2)
    print(json.dumps(figures, indent=2), flush=True)

    cluster = ray_fixtures.start_cluster((1, 1))
    try:
        figures["start_head_and_2_worker_nodes_s"] = round(cluster.start_seconds, 2)
        figures["worker_node_to_driver"] = call_overhead(
            ray, {"resources": {"node_0": 0.01}}, args.repeats
        )
        figures["node_killed_before_fetch"] = node_lost_before_fetch(ray, cluster)
    finally:
        t = time.perf_counter()
        cluster.shutdown()
        figures["shutdown_cluster_s"] = round(time.perf_counter() - t, 2)
    print(json.dumps(figures, indent=2))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
