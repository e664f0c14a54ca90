"""float64 in Keras off TensorFlow: lifting Keras 3.15's float64 -> float32 type promotion.

Keras 3.15's type promotion (``keras.src.backend.common.dtypes.result_type``) maps float64 to
float32 on every backend but TensorFlow (``BIT64_TO_BIT32_DTYPE``): on torch
``keras.ops.matmul`` (every ``Dense``), ``mean``, ``var``..., on JAX ``mean`` (global pooling),
``tanh``, ``sin``... of float64 tensors compute in float32. augnet computes a float64 model in
float64 on every backend: while the JAX and torch seams run one (tracing, eager calls, derivative
rules), that table entry is lifted by :func:`float64_compute` and restored afterwards. Keras reads
the table when an op runs (or, under ``jax.jit``, when it is traced), so a compiled function
traced under the lift keeps float64; float64 inputs are part of its cache key.
"""

from __future__ import annotations

import contextlib
import threading

_LIFT_LOCK = threading.RLock()
_lift = {"depth": 0, "saved": None}


@contextlib.contextmanager
def float64_compute(active: bool = True):
    """While active, Keras's type promotion keeps float64 as float64. Re-entrant; Keras's table
    is restored when the outermost block exits."""
    if not active:
        yield
        return
    from keras.src.backend.common import dtypes as keras_dtypes

    table = keras_dtypes.BIT64_TO_BIT32_DTYPE
    with _LIFT_LOCK:
        if _lift["depth"] == 0:
            _lift["saved"] = table.get("float64")
            table["float64"] = "float64"
        _lift["depth"] += 1
    try:
        yield
    finally:
        with _LIFT_LOCK:
            _lift["depth"] -= 1
            if _lift["depth"] == 0:
                table["float64"] = _lift["saved"]


def any_float64(values) -> bool:
    """Whether any leaf of ``values`` (arrays, tensors, tracers, nested) has dtype float64."""
    import keras

    return any(
        str(getattr(v, "dtype", "")) in ("float64", "torch.float64")
        for v in keras.tree.flatten(values)
    )
