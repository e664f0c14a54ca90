"""The distributed data-set run: ``augnet jacobian ... --ray [ADDRESS]`` and
:func:`augnet.ray.run_jacobians`, the batches of a run spread over a Ray cluster.

The second scheduler of the runner (``augnet/_runner.py``; the first is
:func:`augnet._runner.run_plan`). Both use the runner's parts, so they cannot drift apart:

* the **driver** (this process) plans the run (:func:`augnet._runner.plan_run`: inputs, settings,
  the output folder opened, locked and checked, positional batches, ``--resume``), resolves the
  strategy once (:func:`augnet._runner.resolve_strategy`), and is the **only writer**: every
  result is committed through the runner's shared frame (:func:`augnet._runner.scheduling`,
  :meth:`augnet._runner.Scheduling.commit`: the store, the report page, the progress bar, the
  signals), **in batch order**, so that batch records, ``summary.jsonl`` and the page grow as in
  the one-process run;
* each **worker** is a Ray actor (:class:`BatchWorker`) that loads the model once, from bytes the
  driver put in Ray's object store, and computes batches with
  :func:`augnet._runner.compute_batch`, writing nothing. Workers need neither the driver's file
  system nor the output folder: a batch carries its inputs' content
  (:func:`augnet._runner.with_payload`), and a result comes back as plain data (arrays, PNG
  bytes, summary lines).

**What crosses the wire per batch**: to a worker, the batch (its position, the inputs' relative
paths and names, each input file's bytes or ``.npy`` row) and the run's small
:class:`augnet._runner.BatchConfig`; back, a :class:`augnet._store.BatchResult` (PNG bytes of the
maps, contact sheets and thumbnails, the summary lines, the raw Jacobians with ``--format npy``).
The model's bytes cross once per worker (and once more per restart).

**Faults.** Workers are actors with ``max_restarts`` (a dead process is restarted and reloads the
model) and no automatic task retries: when a call fails because its worker died (killed, out of
memory, its machine lost), the driver sends the batch again, to a live worker, up to
:data:`MAX_ATTEMPTS` times. The result of a batch is committed once, when it first arrives and its
turn has come; the commit is idempotent by batch id anyway. A driver killed mid-run takes its
actors with it; ``--resume`` (with or without ``--ray``) computes exactly the batches without a
valid record. An exception inside ``compute_batch`` (an unreadable image) is the input's fault,
not the worker's: it stops the run as in one process. A worker that cannot load the model stops
the run with one line naming the worker and the cause.

Nothing here imports Ray (or a framework) at module level: ``augnet --help`` stays instant.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import heapq
import io
import logging
import math
import os
import shutil
import signal
import socket
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from augnet import _runner

logger = logging.getLogger(__name__)

LOCAL = "local"  # --ray without an address: a local cluster for this run
IN_FLIGHT_PER_WORKER = 2  # calls queued on a worker, so that it never waits for the driver
WINDOW_PER_WORKER = 4  # results held for their turn to be committed, per worker
MAX_ATTEMPTS = 3  # a batch whose worker died this many times stops the run
MAX_RESTARTS = 5  # per worker: restarts after its process died (then it is gone)
CONNECT_TIMEOUT_S = 5.0
WAIT_S = 0.2  # the driver's loop: how long one ray.wait blocks (signals are seen in between)
TIMING_KEPT = 4096  # per-batch timings kept for the figures (bounded, whatever the run's size)
_INSTALL = 'pip install "augnet[ray]"'


class ClusterError(ValueError):
    """A problem with the cluster or its workers, reported as one line (exit code 2)."""


# --------------------------------------------------------------------------------------------
# What the run is asked for
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cluster:
    """Where and how wide the run goes.

    Attributes:
        address: a running cluster's address (``host:port``, ``auto``, ``ray://host:port``), or
            ``None`` for a local cluster started for the run (on 127.0.0.1, stopped at its end);
            when this process is already connected to Ray (``ray.init`` was called), that
            connection is used.
        workers: the number of workers (actors), each loading the model once; ``None``: as many
            as the cluster's CPUs (and GPUs) allow (local: this machine's cores).
        worker_cpus, worker_gpus: Ray resources per worker; the worker's framework uses
            ``floor(worker_cpus)`` threads (at least one).
    """

    address: str | None = None
    workers: int | None = None
    worker_cpus: float = 1.0
    worker_gpus: float = 0.0

    def __post_init__(self):
        w = self.workers
        if w is not None and (isinstance(w, bool) or not isinstance(w, int) or w < 1):
            raise ValueError(f"workers must be a positive integer or None, received {w!r}")
        for name in ("worker_cpus", "worker_gpus"):
            v = getattr(self, name)
            bad = isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v)
            if bad or v < 0 or (name == "worker_cpus" and v <= 0):
                need = "a positive number" if name == "worker_cpus" else "a number >= 0"
                raise ValueError(f"{name} must be {need}, received {v!r}")

    @property
    def threads(self) -> int:
        return max(1, math.floor(self.worker_cpus))


def parse_address(text: str) -> str:
    """The ``--ray`` argument: ``local`` (a local cluster), ``auto``, ``host:port`` or
    ``ray://host:port``.

    Raises:
        ValueError: anything else (e.g. a model path given after ``--ray``).
    """
    t = text.strip()
    if t in (LOCAL, "auto"):
        return t
    rest = t[len("ray://") :] if t.startswith("ray://") else t
    host, sep, port = rest.rpartition(":")
    if sep and host and port.isdigit() and 0 < int(port) < 65536 and "/" not in host:
        return t
    raise ValueError(
        f"expected a Ray cluster's address as HOST:PORT (e.g. 10.0.0.5:6379), auto or "
        f"ray://HOST:PORT, received {text!r}; write --ray after the inputs, or --ray=ADDRESS"
    )


def require_ray() -> None:
    """Check that Ray can be imported, before any work.

    Raises:
        ClusterError: Ray is missing (or broken), saying how to install it.
    """
    import importlib.util

    try:
        found = importlib.util.find_spec("ray") is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise ClusterError(f"--ray needs Ray, which is not installed; install it with: {_INSTALL}")


def check_reachable(address: str | None) -> None:
    """Refuse at once an address where nothing listens (``ray.init`` would retry for a long
    time).

    Raises:
        ClusterError: naming the address and the reason.
    """
    if address in (None, LOCAL, "auto"):
        return
    rest = address[len("ray://") :] if address.startswith("ray://") else address
    host, _, port = rest.rpartition(":")
    host = host.strip("[]")
    try:
        with socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise ClusterError(
            f"cannot reach the Ray cluster at {address}: {reason.lower()}; check the address "
            "(the head node's GCS address, as 'ray start --head' prints it), or use --ray "
            "alone for a local cluster"
        ) from None


def check_cluster(cluster: Cluster) -> None:
    """Everything about ``cluster`` that can be checked before planning the run: Ray installed,
    the address reachable."""
    require_ray()
    check_reachable(cluster.address)


# --------------------------------------------------------------------------------------------
# The worker (a Ray actor; the class is plain Python, made remote by the driver)
# --------------------------------------------------------------------------------------------


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def versions() -> dict[str, str]:
    """The versions that decide a result's bits: Python, augnet, Keras and its backend's
    framework, NumPy, pillow, matplotlib (imported already where this runs)."""
    import keras
    import matplotlib
    import numpy
    import PIL

    import augnet

    backend = keras.backend.backend()
    framework = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}.get(backend)
    found = {
        "python": ".".join(map(str, sys.version_info[:3])),
        "augnet": augnet.__version__,
        "keras": keras.__version__,
        "backend": backend,
        "numpy": numpy.__version__,
        "pillow": PIL.__version__,
        "matplotlib": matplotlib.__version__,
    }
    if framework is not None:
        module = sys.modules.get(framework) or __import__(framework)
        found[framework] = getattr(module, "__version__", "?")
    return found


def _load_error(exc: BaseException, name: str) -> str:
    """One line for a model that did not load: Keras's own reason when it buries it in a long
    message (``Exception encountered: ...``), the worker's temporary path replaced by the
    model's name."""
    import re

    text = str(exc)
    found = re.search(r"Exception encountered: (.*?)(?:\s*Full object config:|$)", text, re.S)
    if found:
        text = found.group(1)
    text = re.sub(r"[^\s'\"]*augnet-worker-[^/\s]*/", "", text)
    text = _one_line(text) or type(exc).__name__
    return text if len(text) <= 400 else text[:397] + "..."


def _where() -> str:
    """``host (node 1a2b3c4d, pid 123)`` of this process, as far as Ray knows it."""
    node = ""
    with contextlib.suppress(Exception):
        import ray

        if ray.is_initialized():  # (asking for the context elsewhere would start a local Ray)
            node = ray.get_runtime_context().get_node_id()[:8]
    host = socket.gethostname()
    return f"{host}, node {node}, pid {os.getpid()}" if node else f"{host}, pid {os.getpid()}"


def _unpack_model(folder: Path, name: str, blob: bytes, is_dir: bool) -> Path:
    path = folder / name
    if not is_dir:
        path.write_bytes(blob)
        return path
    path.mkdir()
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:") as tar:
        for member in tar.getmembers():  # regular files and folders inside, nothing else
            target = Path(os.path.normpath(path / member.name))
            if not (member.isfile() or member.isdir()) or path not in (target, *target.parents):
                raise ClusterError(f"the model archive holds an unexpected entry {member.name!r}")
        tar.extractall(path, filter="data")
    return path


def pack_model(path: str | os.PathLike[str], fingerprint: str | None) -> tuple[str, bytes, bool]:
    """A model file's bytes (or a SavedModel folder as an uncompressed tar), to ship to workers:
    ``(name, bytes, is_dir)``.

    Raises:
        ClusterError: the model file changed since the run was planned (its content no longer
            has the fingerprint recorded in run.json).
    """
    from augnet import _safeio

    p = Path(path)
    if p.is_dir():
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w:") as tar:
            for folder, dirs, files in os.walk(p):
                dirs.sort()
                for n in sorted(files):
                    f = Path(folder) / n
                    if f.is_file() and not f.is_symlink():
                        tar.add(f, arcname=f.relative_to(p).as_posix(), recursive=False)
        return p.name, buffer.getvalue(), True
    data = p.read_bytes()
    if fingerprint is not None and _safeio.hash_bytes(data) != fingerprint:
        raise ClusterError(
            f"the model file '{p}' changed while the run was being planned; run again"
        )
    return p.name, data, False


class BatchWorker:
    """A worker of the distributed run: loads the model once, then computes batches.

    Made a Ray actor by the driver (``ray.remote(BatchWorker)``); plain Python otherwise, so it
    can be tried in one process. The driver calls :meth:`load` first (and again after Ray
    restarted the worker's process): the model travels as a call's argument, not a constructor
    argument, so that a restart never depends on it. :meth:`load` never raises: a model that
    cannot be loaded is reported with where the worker runs, so that the driver can name it.

    Args:
        index: the worker's number in the run (for messages).
        unsafe: allow code in the model (Lambda layers, SavedModel graphs).
        threads: the framework's CPU threads.
        env: environment variables to set before the framework is imported (the Keras backend,
            log levels).
    """

    def __init__(self, index: int, unsafe: bool, threads: int, env: dict[str, str]):
        self.index, self.unsafe, self.threads = index, unsafe, int(threads)
        os.environ.update(env)
        self.model = None
        self.error: str | None = None
        self.load_seconds = 0.0

    def load(self, name: str, blob: bytes, is_dir: bool) -> dict[str, Any]:
        """Load the model (once; a second call only reports), as :func:`pack_model` packed it.

        Returns:
            ``{"ok", "error", "where", "versions", "load_seconds"}``.
        """
        if self.model is None and self.error is None:
            start = time.perf_counter()
            try:
                from augnet import _backend

                _backend.set_threads(self.threads)
                folder = Path(tempfile.mkdtemp(prefix="augnet-worker-"))
                try:  # the model is read into memory; its temporary copy goes at once
                    path = _unpack_model(folder, name, blob, is_dir)
                    self.model = _runner.load_model(path, unsafe=self.unsafe)
                finally:
                    shutil.rmtree(folder, ignore_errors=True)
            except Exception as exc:
                self.error = _load_error(exc, name)
            self.load_seconds = time.perf_counter() - start
        found = {}
        with contextlib.suppress(Exception):
            found = versions()
        return {
            "ok": self.error is None,
            "error": self.error,
            "where": _where(),
            "versions": found,
            "load_seconds": self.load_seconds,
        }

    def compute(self, batch, config) -> tuple[Any, float, float, float]:
        """``(BatchResult, started, ended, cpu)`` of one batch: the wall clock when it started
        and ended, and the CPU seconds this process spent on it (for the figures)."""
        if self.model is None:
            raise RuntimeError(f"worker {self.index} has no model: load() first")
        started, cpu = time.time(), time.process_time()
        result = _runner.compute_batch(self.model, batch, config)
        return result, started, time.time(), time.process_time() - cpu


# --------------------------------------------------------------------------------------------
# Connecting to (or starting) the cluster
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def connect(cluster: Cluster, n_workers: int, *, debug: bool = False) -> Iterator[str]:
    """Connected to Ray for the run; yields a description of the cluster for messages.

    * this process already connected (``ray.init`` called by the caller): that connection,
      left as it was at the end;
    * ``address=None``: a local cluster on 127.0.0.1 with ``n_workers x worker_cpus`` CPUs, its
      files in a private temporary folder (its own authentication token, no usage statistics),
      stopped and removed at the end;
    * an address: connect to it (with the authentication token Ray finds there), disconnect at
      the end.

    Raises:
        ClusterError: Ray cannot be imported, or the connection fails.
    """
    require_ray()
    already = "ray" in sys.modules and sys.modules["ray"].is_initialized()
    if already:
        yield "the connected Ray cluster"
        return
    previous = signal.getsignal(signal.SIGTERM)  # ray.init installs its own handler
    private = None
    env: dict[str, str] = {"RAY_USAGE_STATS_ENABLED": "0"}  # no network: nothing reported
    if cluster.address is None:
        private = tempfile.mkdtemp(prefix="augnet-ray-")
        env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # one node, everything on 127.0.0.1
        if os.environ.get("RAY_AUTH_MODE") is None:  # a token of its own, not in ~/.ray
            token = Path(private) / "auth_token"
            token.write_text(os.urandom(32).hex())
            token.chmod(0o600)
            env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))
    try:
        with _environ(env):
            try:
                import ray
            except ImportError as exc:
                raise ClusterError(
                    f"--ray needs Ray, which cannot be imported ({exc}); install it with: "
                    f"{_INSTALL}"
                ) from None
            if cluster.address is None:
                with contextlib.suppress(ImportError):  # Ray imported before: what it read then
                    import ray._private.ray_constants as ray_constants

                    ray_constants.ENABLE_RAY_CLUSTER = False
                kwargs: dict[str, Any] = {
                    "address": "local",
                    "num_cpus": max(1, math.ceil(n_workers * cluster.worker_cpus)),
                    "include_dashboard": False,
                    "_temp_dir": private,
                }
                where = f"a local Ray cluster ({kwargs['num_cpus']} CPUs)"
            else:
                kwargs = {"address": cluster.address}
                where = f"the Ray cluster at {cluster.address}"
            try:
                ray.init(
                    log_to_driver=debug,
                    logging_level=logging.INFO if debug else logging.ERROR,
                    **kwargs,
                )
            except Exception as exc:
                raise ClusterError(
                    f"cannot connect to {where}: {_one_line(exc) or type(exc).__name__}"
                ) from None
            try:
                yield where
            finally:
                ray.shutdown()
    finally:
        with contextlib.suppress(ValueError, TypeError):  # not the main thread: never set
            signal.signal(signal.SIGTERM, previous)
        if private is not None:
            shutil.rmtree(private, ignore_errors=True)


def _fit(cluster: Cluster, wanted: int, where: str) -> int:
    """How many of ``wanted`` workers the cluster's resources hold (at least one, or an
    error)."""
    import ray

    res = ray.cluster_resources()
    cpus, gpus = float(res.get("CPU", 0)), float(res.get("GPU", 0))
    fits = math.floor(cpus / cluster.worker_cpus + 1e-9)
    if cluster.worker_gpus > 0:
        fits = min(fits, math.floor(gpus / cluster.worker_gpus + 1e-9))
    if fits < 1:
        raise ClusterError(
            f"{where} has {cpus:g} CPU(s) and {gpus:g} GPU(s): not enough for one worker of "
            f"--worker-cpus {cluster.worker_cpus:g} --worker-gpus {cluster.worker_gpus:g}"
        )
    if wanted > fits:
        logger.warning(
            "%s has room for %d worker(s) of %g CPU(s)%s at once; the other %d start when "
            "resources free up",
            where,
            fits,
            cluster.worker_cpus,
            f" and {cluster.worker_gpus:g} GPU(s)" if cluster.worker_gpus else "",
            wanted - fits,
        )
    return fits


# --------------------------------------------------------------------------------------------
# The driver's scheduler
# --------------------------------------------------------------------------------------------


@dataclass
class RayRunStats(_runner.RunStats):
    """:class:`augnet._runner.RunStats` of a distributed run, plus what the cluster did.

    Attributes:
        cluster: where it ran (for messages).
        workers: per worker ``{"index", "where", "load_seconds", "ready_after"}`` (seconds from
            the start of the run until it could take batches).
        failures: one line per batch lost with its worker (and sent again).
        redone: batches sent again after their worker died.
        timing: the last :data:`TIMING_KEPT` batches' figures, seconds each: ``read`` (the
            driver reading the inputs), ``compute`` (on the worker; ``cpu``: the CPU seconds of
            the worker's process meanwhile), ``dispatch`` (from when the
            worker could start it until it did), ``fetch`` (from its end on the worker until the
            driver held the result), ``commit`` (writing it and the page).
    """

    cluster: str = ""
    workers: list[dict[str, Any]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    redone: int = 0
    timing: dict[str, collections.deque] = field(
        default_factory=lambda: {
            k: collections.deque(maxlen=TIMING_KEPT)
            for k in ("read", "compute", "cpu", "dispatch", "fetch", "commit")
        }
    )


@dataclass
class _Worker:
    index: int
    handle: Any
    state: str = "starting"  # starting -> ready; ready -> probing (it died) -> ready | dead
    probe: Any = None  # the pending load() call: it answers when the worker is ready
    busy: int = 0  # calls in flight
    last_end: float = 0.0  # wall clock of its last finished batch
    cause: str = ""
    restarts: int = 0  # times it died while loading the model


@dataclass
class _Flight:
    position: int
    batch: Any
    worker: _Worker
    attempt: int
    submitted: float


_LOST = (
    "RayActorError",  # ActorDiedError, ActorUnavailableError: the worker died or is unreachable
    "ObjectLostError",  # ObjectReconstructionFailedError: its node went before the fetch
    "OwnerDiedError",
    "WorkerCrashedError",
    "NodeDiedError",
    "OutOfMemoryError",
    "LocalRayletDiedError",
)


def _is_lost(exc: BaseException) -> bool:
    """Whether a failed call means the worker (or its node) was lost, not that its batch is
    bad."""
    names = {c.__name__ for c in type(exc).__mro__}
    return "RayTaskError" not in names and bool(names & set(_LOST))


def _cause(exc: BaseException) -> str:
    text = _one_line(str(exc).splitlines()[0] if str(exc) else "")
    name = type(exc).__name__
    return f"{name}: {text[:200]}" if text else name


class _Driver:
    """The loop of the distributed run (see the module docstring)."""

    def __init__(self, plan, run, stats: RayRunStats, handles, model_args, started: float):
        import ray

        self.ray = ray
        self.plan, self.run, self.stats = plan, run, stats
        self.todo = plan.todo
        self.model_args = model_args  # (name, ObjectRef of the bytes, is_dir)
        self.workers = [_Worker(i + 1, h) for i, h in enumerate(handles)]
        for w in self.workers:
            w.probe = w.handle.load.remote(*model_args)
        self.started = started
        self.redo: list[tuple[int, int, Any]] = []  # heap of (position, attempt, batch)
        self.flights: dict[Any, _Flight] = {}
        self.results: dict[int, Any] = {}
        self.next_read = 0
        self.next_commit = 0
        self.window = WINDOW_PER_WORKER * len(self.workers)
        self.driver_versions = versions()
        self.waiting_since = time.monotonic()
        self.warned_waiting = False

    # -- the loop ------------------------------------------------------------------------------

    def run_all(self) -> None:
        while self.next_commit < len(self.todo):
            self.run.stop.check()
            self._submit()
            pending = list(self.flights) + [w.probe for w in self.workers if w.probe is not None]
            if not pending:
                raise ClusterError(self._all_gone())
            done, _ = self.ray.wait(pending, num_returns=1, timeout=WAIT_S)
            for ref in done:
                self._handle(ref)
            self._commit_in_order()
            self._warn_if_nobody_is_ready()

    def _submit(self) -> None:
        ready = [w for w in self.workers if w.state == "ready"]
        for w in sorted(ready, key=lambda w: w.busy):
            while w.busy < IN_FLIGHT_PER_WORKER:
                if self.redo:
                    position, attempt, batch = heapq.heappop(self.redo)
                elif (
                    self.next_read < len(self.todo)
                    and self.next_read - self.next_commit < self.window
                ):
                    position, attempt = self.next_read, 0
                    t = time.perf_counter()
                    batch = _runner.with_payload(self.todo[position], self.plan.config)
                    self.stats.timing["read"].append(time.perf_counter() - t)
                    self.next_read += 1
                else:
                    return
                ref = w.handle.compute.remote(batch, self.plan.config)
                self.flights[ref] = _Flight(position, batch, w, attempt, time.time())
                w.busy += 1

    def _handle(self, ref) -> None:
        flight = self.flights.pop(ref, None)
        if flight is None:
            self._handle_probe(ref)
            return
        w = flight.worker
        w.busy -= 1
        try:
            result, started, ended, cpu = self.ray.get(ref)
        except Exception as exc:
            if not _is_lost(exc):
                cause = getattr(exc, "cause", None)
                if isinstance(cause, Exception):  # the batch's own error (an unreadable input)
                    raise cause from None
                raise
            self._lost(flight, exc)
            return
        received = time.time()
        timing = self.stats.timing
        timing["compute"].append(ended - started)
        timing["cpu"].append(cpu)
        timing["dispatch"].append(max(0.0, started - max(flight.submitted, w.last_end)))
        timing["fetch"].append(max(0.0, received - ended))
        w.last_end = ended
        self.results.setdefault(flight.position, result)

    def _lost(self, flight: _Flight, exc: BaseException) -> None:
        w = flight.worker
        batch_id = self.todo[flight.position].batch_id
        cause = _cause(exc)
        attempt = flight.attempt + 1
        self.stats.failures.append(
            f"worker {w.index} ({w.cause or 'lost'}) failed batch {batch_id}: {cause}"
        )
        if attempt >= MAX_ATTEMPTS:
            raise ClusterError(
                f"batch {batch_id} was lost with its worker {attempt} times (last: worker "
                f"{w.index}, {cause}); the workers may run out of memory: try a smaller "
                "--batch-size or more memory per worker"
            )
        if w.state == "ready":
            logger.warning(
                "worker %d died (%s); its batches are sent to another worker", w.index, cause
            )
            w.state = "probing"
            w.probe = w.handle.load.remote(*self.model_args)  # once Ray restarted it, if it can
        heapq.heappush(self.redo, (flight.position, attempt, flight.batch))
        self.stats.redone += 1

    def _handle_probe(self, ref) -> None:
        w = next(w for w in self.workers if w.probe == ref)
        w.probe = None
        try:
            info = self.ray.get(ref)
        except Exception as exc:
            w.cause = _cause(exc)
            w.restarts += 1
            restarting = "ActorUnavailableError" in {c.__name__ for c in type(exc).__mro__}
            if restarting and w.restarts <= MAX_RESTARTS:  # died while loading: Ray restarts it
                w.probe = w.handle.load.remote(*self.model_args)
                return
            w.state = "dead"
            if not any(x.state != "dead" for x in self.workers):
                raise ClusterError(self._all_gone()) from None
            logger.warning("worker %d is gone (%s); the run goes on without it", w.index, w.cause)
            return
        if not info["ok"]:
            raise ClusterError(
                f"worker {w.index} ({info['where']}) cannot load the model: {info['error']}"
            )
        self._check_versions(w, info)
        first = w.state == "starting"
        w.state, w.cause = "ready", info["where"]
        if first:
            self.stats.workers.append(
                {
                    "index": w.index,
                    "where": info["where"],
                    "load_seconds": round(info["load_seconds"], 3),
                    "ready_after": round(time.monotonic() - self.started, 3),
                }
            )

    def _check_versions(self, w: _Worker, info: dict[str, Any]) -> None:
        theirs = info.get("versions") or {}
        diffs = [
            f"{k} {theirs.get(k)} (driver {v})"
            for k, v in self.driver_versions.items()
            if theirs.get(k) != v
        ]
        if diffs:
            raise ClusterError(
                f"worker {w.index} ({info['where']}) runs {', '.join(diffs)}; other versions can "
                "change the results' last bits: install the same versions on every node"
            )

    def _commit_in_order(self) -> None:
        while self.next_commit in self.results:
            result = self.results.pop(self.next_commit)
            t = time.perf_counter()
            self.run.commit(result)
            self.stats.timing["commit"].append(time.perf_counter() - t)
            self.next_commit += 1

    def _all_gone(self) -> str:
        causes = "; ".join(f"worker {w.index}: {w.cause}" for w in self.workers if w.cause)
        return (
            f"every worker of the run died ({causes or 'no cause known'}); finished batches are "
            "kept: run again with --resume"
        )

    def _warn_if_nobody_is_ready(self) -> None:
        if self.warned_waiting or any(w.state == "ready" for w in self.workers):
            self.waiting_since = time.monotonic()
            return
        if time.monotonic() - self.waiting_since > 120:
            logger.warning("no worker has started after 2 minutes; waiting for the cluster")
            self.warned_waiting = True

    def close(self) -> None:
        """Stop the workers (their calls in flight are dropped; nothing of theirs is
        committed)."""
        for w in self.workers:
            with contextlib.suppress(Exception):
                self.ray.kill(w.handle, no_restart=True)
        self.flights.clear()
        self.results.clear()
        self.redo.clear()


def _worker_env() -> dict[str, str]:
    import keras

    env = {"KERAS_BACKEND": keras.backend.backend()}
    env["TF_CPP_MIN_LOG_LEVEL"] = os.environ.get("TF_CPP_MIN_LOG_LEVEL", "3")
    return env


def run_plan(
    plan: _runner.Plan,
    model,
    *,
    cluster: Cluster,
    quiet: bool = False,
    stream=None,
    debug: bool = False,
    on_commit: Callable | None = None,
    report: bool = True,
) -> RayRunStats:
    """The distributed scheduler: compute the batches of ``plan`` on a Ray cluster's workers and
    commit them here, in batch order (the counterpart of :func:`augnet._runner.run_plan`).

    ``model`` is the driver's copy (already loaded by :func:`augnet._runner.plan_run`): used
    only to resolve ``strategy="auto"`` once, here, before any batch is sent out.

    Returns:
        :class:`RayRunStats` (``plan.stats``). A signal stops the run as in one process
        (``stats.interrupted``); every committed batch is kept.

    Raises:
        ClusterError: no connection, not enough resources, a worker that cannot load the model,
            a batch lost too often, every worker gone.
    """
    stats = RayRunStats(**dataclasses.asdict(plan.stats))
    plan.stats = stats
    if not plan.todo:  # a finished run resumed: no cluster needed
        with _runner.scheduling(plan, quiet=True, stream=stream, report=report):
            pass
        return stats
    started = time.monotonic()
    wanted = cluster.workers
    connected = "ray" in sys.modules and sys.modules["ray"].is_initialized()
    if wanted is None and cluster.address is None and not connected:
        wanted = max(1, (os.cpu_count() or 1) // cluster.threads)  # a local cluster: the cores
    if wanted is not None:
        wanted = min(wanted, len(plan.todo))
    try:
        blob = pack_model(plan.options.model, plan.settings.get("model"))
        with connect(cluster, wanted or 1, debug=debug) as where:
            stats.cluster = where
            n = min(wanted or _fit(cluster, 0, where), len(plan.todo))
            _fit(cluster, n, where)
            with _runner.scheduling(
                plan, quiet=quiet, stream=stream, on_commit=on_commit, report=report
            ) as run:
                _run_on_cluster(plan, model, run, cluster, blob, n, stats, started)
    except BaseException:
        if plan.store.root is not None:  # failed before the run's frame took over
            plan.close()
        raise
    return stats


def _run_on_cluster(plan, model, run, cluster, blob, n, stats, started) -> None:
    import ray

    if plan.config.strategy is None:  # resolved once, here, and recorded before any batch
        _runner.set_strategy(plan, _runner.resolve_strategy(model, plan.todo[0], plan.config))
    name, data, is_dir = blob
    blob_ref = ray.put(data)
    remote = ray.remote(BatchWorker).options(
        num_cpus=cluster.worker_cpus,
        num_gpus=cluster.worker_gpus,
        max_restarts=MAX_RESTARTS,
        max_task_retries=0,
        scheduling_strategy="SPREAD",
    )
    env = _worker_env()
    handles = [remote.remote(i + 1, plan.options.unsafe, cluster.threads, env) for i in range(n)]
    driver = _Driver(plan, run, stats, handles, (name, blob_ref, is_dir), started)
    try:
        driver.run_all()
    finally:
        driver.close()


def run(
    options: _runner.RunOptions,
    cluster: Cluster,
    *,
    quiet: bool = True,
    stream=None,
    load: Callable | None = None,
) -> RayRunStats:
    """Plan and run a data-set run on a Ray cluster (what :func:`augnet.ray.run_jacobians`
    does): the cluster is checked first, then the run planned on this process (the driver),
    then its batches computed by the workers."""
    check_cluster(cluster)
    plan, model = _runner.plan_run(
        options, load=load or (lambda o: _runner.load_model(o.model, unsafe=o.unsafe))
    )
    return run_plan(plan, model, cluster=cluster, quiet=quiet, stream=stream)


def timing_summary(stats: RayRunStats) -> dict[str, float]:
    """Medians (seconds) of the per-batch figures, for reports and benchmarks."""
    import statistics

    return {k: round(statistics.median(v), 6) for k, v in stats.timing.items() if len(v) > 0}
