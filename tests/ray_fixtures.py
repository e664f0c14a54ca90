"""Local Ray clusters for tests, on the loopback address only (see docs/ray.md).

Two kinds, both shared by the tests of a session:

* :func:`ray_local` -- ``ray.init(num_cpus=2)`` in the test process: one node, the quickest
  (about 6 s to start on the 2-core CI machine).
* :func:`ray_cluster` -- a head node and two worker nodes, each a separate ``ray start --block``
  process, as on real machines (about 11 s until all three nodes are up). Each worker node has a
  custom resource (``node_0``, ``node_1``) so a test can place work on one node, and
  :meth:`LocalCluster.kill_node` kills one node's processes, as a machine lost mid-run.

Use them from a test module: ``from ray_fixtures import _ray_session, ray_local  # noqa: F401``
(``_ray_session`` shuts everything down at the end of the session), then
``@pytest.mark.usefixtures("ray_local")`` on the tests (or a ``ray_local`` argument). The two cannot be used
in the same test (one Ray connection per process); a session that uses both switches between
them (the other is shut down first), so group the tests by kind.

**Loopback only.** Ray replaces ``127.0.0.1`` by the host's own address for clusters of several
nodes (``ray._private.services.resolve_ip_for_localhost``) and then listens on all interfaces.
Here the test process sets ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (Ray then keeps a single node
and drivers on 127.0.0.1), and the node processes are started through :data:`NODE_LAUNCHER`,
which keeps ``127.0.0.1`` as the node's address: every port listens on 127.0.0.1 only.

**Authentication.** Ray 2.60 authenticates with a token. A fresh token is written into a private
temporary folder and passed to every process (``RAY_AUTH_MODE=token``,
``RAY_AUTH_TOKEN_PATH``), so nothing is written to ``~/.ray``.

**Clean-up.** Every node runs in its own process group; it is stopped with SIGTERM, then SIGKILL
after a few seconds, by process group id. Never ``ray stop``, which would stop every Ray on the
machine, other users' included.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

# Node processes: `ray start ...` with 127.0.0.1 kept as the node's address.
NODE_LAUNCHER = (
    "import sys\n"
    "import ray._private.services as services\n"
    "services.resolve_ip_for_localhost = lambda host: host\n"
    "from ray.scripts.scripts import main\n"
    "sys.argv = ['ray', *sys.argv[1:]]\n"
    "main()\n"
)
STOP_GRACE_S = 5.0
START_TIMEOUT_S = 120.0

_PRIVATE = Path(tempfile.mkdtemp(prefix="augnet-ray-"))
atexit.register(shutil.rmtree, _PRIVATE, ignore_errors=True)


def _configure_environment() -> dict[str, str]:
    """Environment for this process and the node processes (set before Ray starts)."""
    token = _PRIVATE / "auth_token"
    if not token.exists():
        token.write_text(secrets.token_hex(32))
        token.chmod(0o600)
    env = {
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # the driver and single nodes: 127.0.0.1
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token),
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_DEDUP_LOGS": "0",
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }
    os.environ.update(env)
    if sys.modules.get("ray") is not None:  # imported before: set what Ray read at import
        with contextlib.suppress(ImportError):
            import ray._private.ray_constants as ray_constants

            ray_constants.ENABLE_RAY_CLUSTER = False
    return env


ENV = _configure_environment()
# node processes: Ray's multi-node mode (the launcher keeps 127.0.0.1 as their address)
NODE_ENV = {**ENV, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1"}


def ray_available() -> str | None:
    """``None`` if Ray with Ray Data can be imported, else the reason to skip."""
    try:
        import ray  # noqa: F401
        import ray.data  # noqa: F401
    except ImportError as exc:
        return f"Ray is not installed ({exc}); pip install -e '.[test]'"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop_group(proc: subprocess.Popen, grace: float = STOP_GRACE_S) -> None:
    """Stop a node: SIGTERM to its process group, SIGKILL after ``grace`` seconds."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        pass
    # `ray start --block` can exit before its children: kill what is left of the group
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(grace)


@dataclass
class LocalCluster:
    """A Ray cluster of separate node processes on 127.0.0.1 (see :func:`start_cluster`)."""

    address: str
    temp_dir: Path
    head: subprocess.Popen
    nodes: list[subprocess.Popen] = field(default_factory=list)
    start_seconds: float = 0.0

    def add_node(self, num_cpus: int = 1, resources: dict | None = None) -> subprocess.Popen:
        """Start a worker node (its own process group) that joins the cluster."""
        index = len(self.nodes)
        log = open(self.temp_dir / f"node_{index}.log", "a")  # noqa: SIM115 (kept by Popen)
        proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                NODE_LAUNCHER,
                "start",
                "--block",
                "--address",
                self.address,
                "--node-ip-address",
                "127.0.0.1",
                "--num-cpus",
                str(num_cpus),
                "--resources",
                json.dumps(resources if resources is not None else {f"node_{index}": 1}),
                "--disable-usage-stats",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, **NODE_ENV},
        )
        self.nodes.append(proc)
        return proc

    def kill_node(self, index: int) -> None:
        """SIGKILL a worker node's processes at once (a machine lost mid-run)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.nodes[index].pid, signal.SIGKILL)
        self.nodes[index].wait(30)

    def alive_nodes(self) -> int:
        import ray

        return sum(1 for n in ray.nodes() if n["Alive"])

    def shutdown(self, keep_logs: bool = False) -> None:
        """Disconnect, stop every node (by process group), delete the logs unless kept."""
        import ray

        if ray.is_initialized():
            ray.shutdown()
        for proc in reversed([self.head, *self.nodes]):
            _stop_group(proc)
        if not keep_logs:
            shutil.rmtree(self.temp_dir, ignore_errors=True)


def start_cluster(worker_cpus=(1, 1), *, head_cpus: int = 0) -> LocalCluster:
    """Start a head node and one worker node per entry of ``worker_cpus``; connect to it.

    The head has ``head_cpus`` CPUs (0: it schedules no work, like a head machine of a real
    cluster); worker node ``i`` has ``worker_cpus[i]`` CPUs and the resource ``node_i``.
    """
    import ray

    temp_dir = Path(tempfile.mkdtemp(prefix="augnet-rc-"))
    port = free_port()
    address = f"127.0.0.1:{port}"
    start = time.perf_counter()
    head = subprocess.Popen(
        [
            sys.executable,
            "-c",
            NODE_LAUNCHER,
            "start",
            "--head",
            "--block",
            "--node-ip-address",
            "127.0.0.1",
            "--port",
            str(port),
            "--num-cpus",
            str(head_cpus),
            "--include-dashboard",
            "false",
            "--temp-dir",
            str(temp_dir),
            "--disable-usage-stats",
        ],
        stdout=open(temp_dir / "head.log", "w"),  # noqa: SIM115 (kept by Popen)
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, **NODE_ENV},
    )
    cluster = LocalCluster(address=address, temp_dir=temp_dir, head=head)
    try:
        while True:
            try:
                ray.init(address=address, log_to_driver=False)
                break
            except (ConnectionError, RuntimeError):
                if head.poll() is not None or time.perf_counter() - start > START_TIMEOUT_S:
                    raise RuntimeError(
                        f"cannot connect to the cluster; logs in {temp_dir}"
                    ) from None
                time.sleep(0.5)
        # one node after the other: on a loaded 2-core machine, nodes starting together can
        # miss Ray's 30 s registration deadline; a node that fails to start is tried again once
        for index, cpus in enumerate(worker_cpus):
            for attempt in range(2):
                proc = cluster.add_node(num_cpus=cpus, resources={f"node_{index}": 1})
                while cluster.alive_nodes() < 2 + index and proc.poll() is None:
                    if time.perf_counter() - start > START_TIMEOUT_S:
                        raise RuntimeError(f"the cluster's nodes did not start; logs in {temp_dir}")
                    time.sleep(0.2)
                if proc.poll() is None:
                    break
                _stop_group(cluster.nodes.pop())
                if attempt == 1:
                    raise RuntimeError(f"worker node {index} did not start; logs in {temp_dir}")
    except BaseException:
        cluster.shutdown(keep_logs=True)
        raise
    cluster.start_seconds = time.perf_counter() - start
    return cluster


# --------------------------------------------------------------------------------------------
# Fixtures: each cluster is started once and kept for the following tests (starting Ray costs
# seconds); the session's end shuts down whatever is running.
# --------------------------------------------------------------------------------------------

_current: dict[str, object] = {}


def _switch_to(kind: str, start):
    """One Ray connection per process: shut down the other kind before starting this one."""
    import ray

    if kind in _current and ray.is_initialized():
        return _current[kind]
    _shutdown_all()
    _current[kind] = start()
    return _current[kind]


def _shutdown_all() -> None:
    import ray

    for kind, value in list(_current.items()):
        if isinstance(value, LocalCluster):
            value.shutdown()
        elif ray.is_initialized():
            ray.shutdown()
        del _current[kind]


@pytest.fixture(scope="session")
def _ray_session():
    """Shuts down whatever Ray the tests started, at the end of the session."""
    yield
    if _current:
        _shutdown_all()


@pytest.fixture
def ray_local(_ray_session):
    """``ray.init(num_cpus=2)``: a one-node cluster in the test process, on 127.0.0.1.

    Started once and kept for the following tests (until one asks for :func:`ray_cluster`).
    """
    reason = ray_available()
    if reason:
        pytest.skip(reason)
    import ray

    def start():
        t = time.perf_counter()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        return {"start_seconds": time.perf_counter() - t}

    return _switch_to("local", start)


@pytest.fixture
def ray_cluster(_ray_session):
    """A head node and two one-CPU worker nodes, separate processes, on 127.0.0.1.

    Started once and kept for the following tests (until one asks for :func:`ray_local`).
    """
    reason = ray_available()
    if reason:
        pytest.skip(reason)
    return _switch_to("cluster", start_cluster)
