"""A result too large for the memory available is refused before any work, with its size and the
ways out; a result that fits is computed as before.

The large cases are shapes only: a model with a 1000 x 1000 input and 1000 outputs (global
average pooling, no weights) has a 4 GB Jacobian per sample, and nothing that size is ever
allocated (checked with tracemalloc) or compiled.
"""

from __future__ import annotations

import math
import re
import tracemalloc

import keras
import numpy as np
import pytest

import augnet
from augnet._engine import blocks, memory, prepare

L = keras.layers
PER_SAMPLE = 1000 * 1000 * 1000 * 4  # bytes of one sample's Jacobian below (float32)


@pytest.fixture(scope="module")
def wide():
    """(None, 1000, 1000) -> 1000 outputs: each output the mean of one column."""
    return keras.Sequential([keras.Input((1000, 1000)), L.GlobalAveragePooling1D()], name="wide")


@pytest.fixture
def no_work(monkeypatch):
    """Compiling anything fails the test: the refusal comes first."""

    def no_compile(*args, **kwargs):  # pragma: no cover - must not run
        raise AssertionError("compiled before the size check")

    monkeypatch.setattr(blocks, "compiled", no_compile)


def _refused(call, *fragments):
    tracemalloc.start()
    try:
        with pytest.raises(augnet.ResultTooLargeError) as info:
            call()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 200e6, f"{peak / 1e6:.0f} MB allocated before refusing"
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


def test_a_40_gib_jacobian_is_refused_before_any_work(wide, no_work, monkeypatch):
    monkeypatch.setattr(memory, "available_memory", lambda: 16 * 1024**3)
    x = np.zeros((10, 1000, 1000), "float32")  # 40 MB of input, 40 GB of Jacobian
    message = _refused(
        lambda: augnet.jacobian(wide, x),
        "augnet.jacobian: the result would take 40.0 GB ((10, 1000, 1000, 1000) float32)",
        "more than the memory available for it (17.2 GB free, less a margin of 1.7 GB)",
        "refused before any work",
        "`max_memory` bounds one pass's intermediates, not the result",
        "outputs=[...], or top_k=k",
        "augnet.iter_jacobian(...)",
        "augnet.jacobian_to_npy(model, x, 'J.npy')",
    )
    assert isinstance(augnet.ResultTooLargeError(message), MemoryError | ValueError)
    # max_memory does not make it fit, and AugNet.return_jacobian says the same.
    _refused(lambda: augnet.jacobian(wide, x, max_memory="1GB"), "40.0 GB")
    _refused(lambda: augnet.wrap(wide).return_jacobian(x), "40.0 GB")


def test_refused_against_the_memory_this_machine_has(wide, no_work):
    available = memory.available_memory()
    if available is None:  # pragma: no cover - not Linux
        pytest.skip("no way to read the available memory here")
    batch = max(10, math.ceil(1.25 * available / PER_SAMPLE))  # >= 40 GB, and more than there is
    x = np.zeros((batch, 1000, 1000), "float32")
    message = _refused(lambda: augnet.jacobian(wide, x), f"({batch}, 1000, 1000, 1000) float32")
    size = float(re.search(r"would take ([0-9.]+) GB", message).group(1))
    assert size == pytest.approx(batch * PER_SAMPLE / 1e9, rel=1e-3)


def test_top_k_and_outputs_results_are_sized_by_what_is_selected(wide, no_work, monkeypatch):
    monkeypatch.setattr(memory, "available_memory", lambda: 3 * 1024**3)
    x = np.zeros((10, 1000, 1000), "float32")
    _refused(lambda: augnet.jacobian(wide, x, top_k=100), "(10, 100, 1000, 1000) float32")
    _refused(lambda: augnet.jacobian(wide, x, outputs=list(range(100))), "4.0 GB")
    # 10 outputs: 400 MB, which fits in 3 GiB: planned (nothing computed here).
    run = prepare.setup(wide, x, list(range(10)), None, False, "loop", None, None, None, False)
    prepare.check_whole_result(run.target, run.selection, run.n_samples)


def test_streaming_is_not_refused(wide, monkeypatch):
    """iter_jacobian / jacobian_to_npy never hold the whole result: planned, not refused."""
    monkeypatch.setattr(memory, "available_memory", lambda: 1024**3)
    x = np.zeros((10, 1000, 1000), "float32")
    run = prepare.setup(wide, x, None, None, False, "loop", None, None, None, False)
    assert run.selection.size == 1000 and run.n_samples == 10


def test_layer_jacobians_are_sized_together_first(no_work):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((1000, 1000)), L.Dense(1000), L.Flatten()])
    _refused(
        lambda: augnet.layer_jacobians(model, np.zeros((2, 1000, 1000), "float32")),
        "augnet.layer_jacobians: the result would take",
        "(2 layers float32)",
        "one at a time",
    )


def test_vjp_and_jvp_results_are_sized(wide, monkeypatch):
    monkeypatch.setattr(memory, "available_memory", lambda: 300 * 1024**2)  # 44 MiB after margin
    monkeypatch.setattr(memory, "CHECK_ABOVE", 0)
    x = np.zeros((12, 1000, 1000), "float32")  # the vjp's result is x's size: 48 MB
    _refused(
        lambda: augnet.vjp(wide, x, np.ones((12, 1000), "float32")),
        "augnet.vjp: the result would take 48.0 MB",
    )
    small = np.zeros((1, 1000, 1000), "float32")  # jvp: (1, 1000) outputs, 4 kB: fits
    y_dot = augnet.jvp(wide, small, np.ones_like(small))
    np.testing.assert_allclose(y_dot, np.ones((1, 1000)), rtol=1e-5)  # the mean of ones


def test_a_result_that_fits_is_computed(monkeypatch):
    monkeypatch.setattr(memory, "CHECK_ABOVE", 0)  # every result checked, small ones fit
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), L.Dense(2)])
    x = np.ones((4, 3), "float32")
    J = augnet.jacobian(model, x, strategy="loop")
    np.testing.assert_allclose(J[0], keras.ops.convert_to_numpy(model.layers[0].kernel).T)


def test_the_arithmetic_of_the_check():
    gib = 1024**3
    memory.check_result_size(gib, "float32", "augnet.jacobian", None, available=8 * gib)  # 4 GiB
    with pytest.raises(augnet.ResultTooLargeError, match=r"8\.6 GB, .*7\.5 GB free"):
        memory.check_result_size(2 * gib, "float32", "augnet.jacobian", None, available=7 * gib)
    # The margin: 10% of what is free, at least 256 MiB.
    memory.check_result_size(gib, "float64", "augnet.jacobian", None, available=9 * gib)
    with pytest.raises(augnet.ResultTooLargeError):
        memory.check_result_size(gib, "float64", "augnet.jacobian", None, available=8.5 * gib)
    memory.check_result_size(10, "float32", "augnet.jacobian", None, available=0)  # tiny: skipped
    assert memory.available_memory() is None or memory.available_memory() > 0
