"""``augnet --backend tensorflow|jax|torch``: chosen before Keras is imported, printed by ``info``;
a backend that cannot be had is one line and exit 2."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import assert_one_line_error, backend

from augnet import _cli

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "augnet" / "data" / "region_cnn.keras"
FRAMEWORK = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tensorflow", "jax", "torch"])
def test_backend_option_chooses_keras_backend_and_info_says_so(name, tmp_path):
    if os.environ.get("AUGNET_TEST_BACKEND_SUBRUN"):
        pytest.skip("inside a per-backend run")
    if importlib.util.find_spec(FRAMEWORK[name]) is None:
        pytest.skip(f"{FRAMEWORK[name]} is not installed")
    other = "jax" if name != "jax" else "torch"
    env = {**os.environ, "KERAS_BACKEND": other, "PYTHONPATH": str(ROOT)}  # the option wins
    # before and after the command's name
    for argv in (["--backend", name, "info", str(MODEL)], ["info", str(MODEL), "--backend", name]):
        proc = subprocess.run(
            [sys.executable, "-m", "augnet", *argv],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert f"backend: Keras on {name}; devices: " in proc.stdout, proc.stdout


def test_another_backend_than_the_one_keras_runs_on_isassert_one_line_error(capsys):
    import keras

    current = keras.backend.backend()
    other = next(b for b in _cli.BACKENDS if b != current)
    code = _cli.main(["--backend", other, "info", str(MODEL)])
    assert_one_line_error(
        code, capsys.readouterr().err, rf"--backend {other}: Keras already runs on '{current}'"
    )
    # the backend Keras runs on is accepted as it is
    assert _cli.main(["--backend", backend(), "info", str(MODEL)]) == 0
    assert f"backend: Keras on {backend()}" in capsys.readouterr().out


def test_a_backend_not_installed_names_the_extra(capsys, monkeypatch):
    name = backend()
    monkeypatch.delitem(
        sys.modules, "keras", raising=False
    )  # as in a fresh process (restored after the test)
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "jax" else real(n, *a)
    )
    monkeypatch.setenv("KERAS_BACKEND", name)
    code = _cli.main(["--backend", "jax", "info", str(MODEL)])
    assert_one_line_error(
        code, capsys.readouterr().err, r"--backend jax: jax is not installed .*\.\[jax\]"
    )
    assert os.environ["KERAS_BACKEND"] == name  # unchanged


def test_an_unknown_backend_isassert_one_line_error(capsys):
    code = _cli.main(["--backend", "numpy", "info", str(MODEL)])
    assert_one_line_error(code, capsys.readouterr().err, r"--backend: invalid choice: 'numpy'")


def test_help_names_the_option_and_imports_no_framework():
    code = (
        "import sys, augnet._cli\n"
        "try:\n    augnet._cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('keras', 'tensorflow', 'jax', 'torch') if m in sys.modules))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert "--backend" in proc.stdout and proc.stdout.strip().splitlines()[-1] == "[]"
