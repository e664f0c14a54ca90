"""Every Keras backend, from the one README test command.

``KERAS_BACKEND`` must be set before Keras is imported, so one pytest process runs one backend. This
module runs the backend-independent numeric suite (:data:`NUMERIC_SUITE`, without the tests marked
``tensorflow_only``) once per other backend, each in a ``python -m pytest`` subprocess with
``KERAS_BACKEND`` set, and fails with the tail of its output. A backend is skipped, with the reason,
while its seam module (``augnet/_backend/<name>.py``) does not exist or its framework is not
installed. The subprocesses start when the session's tests are collected (tests/conftest.py), one
after another in a background thread, and these tests run last and collect their results: they run
beside the rest of the session (the README run on 2 cores: 23 minutes with the subprocesses run in
turn, the main process waiting). To run the suite on one backend yourself::

    KERAS_BACKEND=jax python -m pytest -q -m "not tensorflow_only" tests/test_backend_seam.py ...

(the file list is :data:`NUMERIC_SUITE`; ``JAX_ENABLE_X64=1`` for JAX, as the suite has float64
models). It also checks that a backend without a seam module is a clear error, and that nothing
outside ``augnet/_backend/`` imports a framework for autodiff.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import backend

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"

# The numeric suite, written to run on every backend (keras.ops, NumPy, the backend's own
# reference loops). Add a file here once it runs on every backend.
NUMERIC_SUITE = [
    "test_backend_seam.py",
    "test_jacobian_closed_form.py",
    "test_jacobian_fd.py",
    "test_jacobian_zoo.py",
    "test_jacobian_options.py",
    "test_engine_speed.py",
    "test_inference_semantics.py",
    "test_wrapping.py",
    "test_errors.py",
    "test_derivatives.py",
    "test_vjp_jvp.py",
    "test_layer_jacobians.py",
    "test_analysis.py",
    "test_backward.py",
    # issue 9's engine items
    "test_gradient_paths.py",
    "test_result_size.py",
    "test_logits.py",
    "test_engine_reuse.py",
    "test_padding.py",
    "test_mixed_precision.py",
    "test_jax.py",  # (skipped on the other backends)
    # the attribution methods and their metrics
    "test_attribution_methods.py",
    "test_attribution_metrics.py",
    "test_attribution_outputs.py",
]
# Tests of one backend's particulars, run in that backend's subprocess too.
BACKEND_SUITE = {"torch": ["test_torch_backend.py"]}
FRAMEWORK = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}
SUBRUN = "AUGNET_TEST_BACKEND_SUBRUN"  # set in the subprocesses: no runs within runs
TIMEOUT_S = 1200  # per backend (beside the rest of the session); the README run must stay < 20 min


def _backend_env(name: str) -> dict:
    env = {**os.environ, "KERAS_BACKEND": name, SUBRUN: "1"}
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if name == "jax":
        env.setdefault("JAX_ENABLE_X64", "1")  # float64 models and references need it
    if name == "torch":
        # torch's OpenMP threads spin while they wait: on a shared 2-core machine another busy
        # process makes small ops 100x slower (benchmarks/README.md).
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return env


def _tail(text: str, lines: int = 60) -> str:
    return "\n".join(text.splitlines()[-lines:])


def _skip_reason(name: str) -> str | None:
    """Why the numeric suite does not run on ``name`` here, or ``None``."""
    if os.environ.get(SUBRUN):
        return "inside a per-backend run"
    if name == backend():
        return f"this run is on {name}: the numeric suite runs in this process"
    if not (ROOT / "augnet" / "_backend" / f"{name}.py").exists():
        return f"augnet/_backend/{name}.py does not exist yet: augnet has no {name} backend"
    if importlib.util.find_spec(FRAMEWORK[name]) is None:
        return f"{FRAMEWORK[name]} is not installed (pip install -e '.[{name}]')"
    return None


def _command(name: str) -> list[str]:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    if name != "tensorflow":
        cmd += ["-m", "not tensorflow_only"]
    return cmd + [f"tests/{f}" for f in NUMERIC_SUITE + BACKEND_SUITE.get(name, [])]


_RUNS: dict[str, Future] = {}
_CHILDREN: set = set()  # the running subprocesses, killed if the session ends first
_LOCK = threading.Lock()
_POOL: list = []  # the one background thread (created on first use)
_STOPPED = threading.Event()


def _run(name: str) -> tuple[int | None, str, float]:
    """The numeric suite on ``name`` in a subprocess: (exit code or None on timeout, its output,
    seconds)."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out:
        with _LOCK:
            if _STOPPED.is_set():
                return None, "the session ended first", 0.0
            proc = subprocess.Popen(
                _command(name),
                cwd=ROOT,
                env=_backend_env(name),
                stdout=out,
                stderr=subprocess.STDOUT,
                text=True,
            )
            _CHILDREN.add(proc)
        try:
            code = proc.wait(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            code = None
        finally:
            with _LOCK:
                _CHILDREN.discard(proc)
        out.seek(0)
        return code, out.read(), time.perf_counter() - t0


def start_in_background(names) -> None:
    """Starts the numeric suite of each backend of ``names`` that runs here, one after another in
    one background thread (called by tests/conftest.py once the session's tests are collected)."""
    todo = [n for n in dict.fromkeys(names) if n not in _RUNS and _skip_reason(n) is None]
    if not todo:
        return
    if not _POOL:
        _POOL.append(ThreadPoolExecutor(max_workers=1, thread_name_prefix="backend-suite"))
    for name in todo:
        _RUNS[name] = _POOL[0].submit(_run, name)


def stop_background() -> None:
    """Kills what still runs when the session ends (``-x``, Ctrl-C): nothing outlives it."""
    _STOPPED.set()
    with _LOCK:
        for proc in _CHILDREN:
            proc.kill()
    if _POOL:
        _POOL[0].shutdown(wait=False, cancel_futures=True)


def test_numeric_suite_files_exist():
    extra = [f for files in BACKEND_SUITE.values() for f in files]
    missing = [f for f in NUMERIC_SUITE + extra if not (TESTS / f).exists()]
    assert not missing, f"NUMERIC_SUITE lists files that do not exist: {missing}"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tensorflow", "jax", "torch"])
def test_numeric_suite_on_backend(name):
    reason = _skip_reason(name)
    if reason:
        pytest.skip(reason)
    start_in_background([name])  # (already started when the session collected this test)
    code, output, seconds = _RUNS[name].result()
    cmd = _command(name)
    if code is None:
        pytest.fail(
            f"The numeric suite on KERAS_BACKEND={name} took more than {TIMEOUT_S} s:\n"
            f"{_tail(output)}"
        )
    if code != 0:
        pytest.fail(
            f"The numeric suite failed on KERAS_BACKEND={name} (exit {code}, "
            f"{seconds:.0f} s). Rerun it with:\n  KERAS_BACKEND={name} {' '.join(cmd[1:])}\n\n"
            f"{_tail(output)}"
        )
    print(f"KERAS_BACKEND={name}: {_tail(output, 1)} ({seconds:.0f} s)")


_CROSS_SCRIPT = """
import sys
from pathlib import Path

import keras
import numpy as np

import augnet

root = Path(sys.argv[1])
x = np.load(root / "x.npy")
for suffix in ("keras", "h5"):
    model = augnet.load_model(root / f"model.{suffix}")
    np.save(root / f"J_{suffix}.npy", model.return_jacobian(x))
# A model trained on this backend, for the parent to load on its own.
model = augnet.load_model(root / "model.keras")
model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
model.fit(x, np.load(root / "y.npy"), epochs=2, batch_size=4, verbose=0)
model.save(root / "trained.keras")
np.save(root / "J_trained.npy", model.return_jacobian(x))
print(keras.backend.backend())
"""


def _cross_model():
    import keras

    keras.utils.set_random_seed(60)
    L = keras.layers
    i = keras.Input((6, 6, 2))
    h = L.Conv2D(3, 3, activation="tanh")(i)
    h = L.BatchNormalization()(h)
    h = L.MaxPooling2D(2)(h)
    h = L.Dense(4, activation="sigmoid")(L.Flatten()(h))
    return keras.Model(i, L.Dense(3)(L.Dropout(0.3)(h)), name="cross")


def _save_cross_files(root: Path, seed: int):
    """:func:`_cross_model` saved as ``model.keras`` and ``model.h5`` in ``root``, with the inputs
    ``x.npy`` (8, 6, 6, 2) and training targets ``y.npy`` the scripts read; ``(model, x)``."""
    import numpy as np

    model = _cross_model()
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, size=(8, 6, 6, 2)).astype("float32")
    np.save(root / "x.npy", x)
    np.save(root / "y.npy", rng.normal(size=(8, 3)).astype("float32"))
    model.save(root / "model.keras")
    model.save(root / "model.h5")
    return model, x


def _run_script_on(name: str, script: str, root: Path) -> None:
    """``script`` in a fresh interpreter with Keras on backend ``name``, given ``root``; it must
    succeed and print the backend it ran on last."""
    proc = subprocess.run(
        [sys.executable, "-c", script, str(root)],
        cwd=ROOT,
        env=_backend_env(name),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, _tail(proc.stdout + proc.stderr)
    assert proc.stdout.strip().splitlines()[-1] == name


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tensorflow", "jax", "torch"])
def test_a_saved_model_gives_the_same_jacobian_on_another_backend(name, tmp_path):
    """One .keras (and .h5) file, two backends, the same Jacobians to float32 tolerance; and a model
    trained and saved on the other backend loads here with the Jacobian it had there."""
    import numpy as np

    import augnet

    if os.environ.get(SUBRUN):
        pytest.skip("inside a per-backend run")
    if name == backend():
        pytest.skip(f"this run is on {name}")
    if not (ROOT / "augnet" / "_backend" / f"{name}.py").exists():
        pytest.skip(f"augnet has no {name} backend yet")
    if importlib.util.find_spec(FRAMEWORK[name]) is None:
        pytest.skip(f"{FRAMEWORK[name]} is not installed")
    model, x = _save_cross_files(tmp_path, seed=61)
    here = augnet.jacobian(model, x)
    _run_script_on(name, _CROSS_SCRIPT, tmp_path)
    for suffix in ("keras", "h5"):
        there = np.load(tmp_path / f"J_{suffix}.npy")
        np.testing.assert_allclose(there, here, rtol=1e-5, atol=1e-6, err_msg=suffix)
    trained = augnet.load_model(tmp_path / "trained.keras")
    J = trained.return_jacobian(x)
    assert np.abs(J - here).max() > 1e-4  # it was trained there
    np.testing.assert_allclose(J, np.load(tmp_path / "J_trained.npy"), rtol=1e-5, atol=1e-6)


_LOAD_SCRIPT = """
import sys
from pathlib import Path

import keras
import numpy as np

import augnet

root = Path(sys.argv[1])
x = np.load(root / "x.npy")
np.save(root / "J_loaded.npy", augnet.load_model(root / "trained.keras").return_jacobian(x))
print(keras.backend.backend())
"""


@pytest.mark.slow
@pytest.mark.parametrize("source,target", [("jax", "torch"), ("torch", "jax")])
def test_a_model_trained_on_one_other_backend_loads_on_the_third(source, target, tmp_path):
    """The pair the TensorFlow run above leaves out: a model trained and saved with Keras on
    ``source`` loads with Keras on ``target`` and gives the Jacobian it had there."""
    import numpy as np

    if os.environ.get(SUBRUN):
        pytest.skip("inside a per-backend run")
    for name in (source, target):
        if importlib.util.find_spec(FRAMEWORK[name]) is None:
            pytest.skip(f"{FRAMEWORK[name]} is not installed")
    _save_cross_files(tmp_path, seed=62)
    _run_script_on(source, _CROSS_SCRIPT, tmp_path)
    _run_script_on(target, _LOAD_SCRIPT, tmp_path)
    there = np.load(tmp_path / "J_trained.npy")
    assert np.abs(there - np.load(tmp_path / "J_keras.npy")).max() > 1e-4  # trained there
    np.testing.assert_allclose(np.load(tmp_path / "J_loaded.npy"), there, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["numpy", "jax", "torch"])
def test_a_backend_without_a_seam_module_is_a_clear_error(name):
    if (ROOT / "augnet" / "_backend" / f"{name}.py").exists():
        pytest.skip(f"augnet has a {name} backend")
    if name != "numpy" and importlib.util.find_spec(FRAMEWORK[name]) is None:
        pytest.skip(f"{name} is not installed")
    code = (
        "import augnet\n"
        "assert callable(augnet.render_saliency)  # rendering needs no framework\n"
        "try:\n"
        "    augnet.jacobian\n"
        "except ImportError as exc:\n"
        "    print(type(exc).__name__, exc)\n"
        "else:\n"
        "    raise SystemExit('no error')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=_backend_env(name),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, _tail(proc.stdout + proc.stderr)
    message = proc.stdout.strip().splitlines()[-1]
    assert message.startswith("UnsupportedBackendError ")
    assert f"Keras backend {name!r}" in message
    assert "Supported backends: tensorflow" in message and "KERAS_BACKEND=" in message


# Files outside the seam that may import a framework, and why (not for autodiff).
ALLOWED_FRAMEWORK_IMPORTS = {
    "augnet/_model.py": "a TensorFlow SavedModel directory is TensorFlow's by nature",
    "augnet/_cli.py": "imports TensorFlow quietly before Keras, to silence its start-up logs",
}


def test_nothing_outside_the_seam_imports_a_framework():
    pattern = re.compile(r"^\s*(import|from)\s+(tensorflow|jax|torch)\b", re.MULTILINE)
    offenders = []
    for path in sorted((ROOT / "augnet").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith("augnet/_backend/") or rel in ALLOWED_FRAMEWORK_IMPORTS:
            continue
        if pattern.search(path.read_text(encoding="utf-8")):
            offenders.append(rel)
    assert not offenders, f"framework imports outside augnet/_backend/: {offenders}"
