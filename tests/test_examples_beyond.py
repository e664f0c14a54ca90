"""The worked examples in examples/ run and pass their own assertions."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize(
    "name", ["jacobian_basics.py", "backward_model.py", "custom_derivatives.py"]
)
def test_example_runs(name, capsys):
    runpy.run_path(str(EXAMPLES / name), run_name="__main__")
    assert capsys.readouterr().out  # each prints its checked numbers
