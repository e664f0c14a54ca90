"""Create an AugNet, train it, save and reload it, and check its Jacobian -- the classic case.

The network learns ``f(x) = [sin(x1*x2), cos(x3*x4)]`` for ``x`` in ``[-1, 1]^4``. Its Jacobian
``d outputs / d inputs`` (shape ``(batch, 2, 4)``) is then

* checked against float64 central finite differences of the same trained network (the exact
  Jacobian of the network: they must agree to ~1e-6), and
* compared with the analytic Jacobian of the true function (what the network learned: close, not
  equal)::

    d sin(x1 x2) / d(x1, x2) = cos(x1 x2) * (x2, x1)
    d cos(x3 x4) / d(x3, x4) = -sin(x3 x4) * (x4, x3)

Run it::

    python examples/create_train_and_utilize.py            # 15-35 s on a 2-core CPU
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import keras
import numpy as np

import augnet

N_FEATURES = 4
N_OUTPUTS = 2


def true_function(x: np.ndarray) -> np.ndarray:
    """``[sin(x1*x2), cos(x3*x4)]`` for ``x`` of shape ``(batch, 4)`` -> ``(batch, 2)``."""
    return np.stack([np.sin(x[:, 0] * x[:, 1]), np.cos(x[:, 2] * x[:, 3])], axis=1)


def true_jacobian(x: np.ndarray) -> np.ndarray:
    """Analytic Jacobian of :func:`true_function`, shape ``(batch, 2, 4)``."""
    jac = np.zeros((x.shape[0], N_OUTPUTS, N_FEATURES), dtype=np.float64)
    c12 = np.cos(x[:, 0] * x[:, 1])
    s34 = np.sin(x[:, 2] * x[:, 3])
    jac[:, 0, 0] = c12 * x[:, 1]
    jac[:, 0, 1] = c12 * x[:, 0]
    jac[:, 1, 2] = -s34 * x[:, 3]
    jac[:, 1, 3] = -s34 * x[:, 2]
    return jac


def build_model(dtype: str = "float32", width: int = 64) -> augnet.AugNet:
    """A small tanh MLP, ``(batch, 4) -> (batch, 2)``, built the functional way as an AugNet."""
    inputs = keras.Input((N_FEATURES,), dtype=dtype, name="features")
    hidden = keras.layers.Dense(width, activation="tanh", dtype=dtype, name="hidden_1")(inputs)
    hidden = keras.layers.Dense(width, activation="tanh", dtype=dtype, name="hidden_2")(hidden)
    outputs = keras.layers.Dense(N_OUTPUTS, dtype=dtype, name="sin_cos")(hidden)
    return augnet.AugNet(inputs=inputs, outputs=outputs, name="classic")


def central_differences(model: keras.Model, x: np.ndarray, step: float = 1e-5) -> np.ndarray:
    """Central finite-difference Jacobian ``(batch, n_outputs, 4)`` of ``model`` at ``x``.

    The model is called directly (not ``predict``, which would route float64 through float32).
    """
    columns = []
    for i in range(x.shape[1]):
        shift = np.zeros_like(x)
        shift[:, i] = step
        upper = keras.ops.convert_to_numpy(model(x + shift, training=False))
        lower = keras.ops.convert_to_numpy(model(x - shift, training=False))
        columns.append((upper - lower) / (2 * step))
    return np.stack(columns, axis=-1)


def main(*, epochs: int = 100, n_train: int = 4096, seed: int = 0, verbose: bool = True) -> dict:
    """Train, save, reload and check; returns the measured errors.

    Returns:
        dict with ``mae`` (test error of the trained network), ``fd_max_abs_err`` (AugNet Jacobian
        in float64 vs central differences), ``f32_vs_f64_max_abs_err`` and ``learned_rel_err``
        (learned vs analytic Jacobian, RMS relative).
    """
    say = print if verbose else (lambda *a, **k: None)
    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    x_train = rng.uniform(-1.0, 1.0, (n_train, N_FEATURES)).astype(np.float32)
    y_train = true_function(x_train).astype(np.float32)
    x_test = rng.uniform(-1.0, 1.0, (512, N_FEATURES)).astype(np.float32)
    y_test = true_function(x_test)

    # 1. Build and train an AugNet like any Keras model.
    model = build_model()
    batch_size = 64
    steps = epochs * (n_train // batch_size)
    schedule = keras.optimizers.schedules.CosineDecay(2e-2, decay_steps=steps)
    model.compile(optimizer=keras.optimizers.Adam(schedule), loss="mse", steps_per_execution=32)
    start = time.perf_counter()
    model.fit(x_train, y_train, batch_size=batch_size, epochs=epochs, verbose=0)
    mae = float(np.abs(model.predict(x_test, verbose=0) - y_test).mean())
    say(
        f"trained {type(model).__name__} ({model.count_params()} parameters) for {epochs} epochs "
        f"in {time.perf_counter() - start:.1f} s; test MAE {mae:.4f}"
    )

    # 2. Save it and load it back: it comes back as an AugNet.
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "classic.keras"
        model.save(path)
        loaded = keras.models.load_model(path)
    if not isinstance(loaded, augnet.AugNet):
        raise AssertionError(f"expected an AugNet back from load_model, got {type(loaded)}")
    np.testing.assert_array_equal(
        loaded.predict(x_test, verbose=0), model.predict(x_test, verbose=0)
    )
    say(f"saved to .keras and reloaded as {type(loaded).__name__}: identical predictions")

    # 3. The Jacobian of a few samples: (batch, 2, 4).
    x = x_test[:8]
    jac32 = np.asarray(loaded.return_jacobian(x))
    assert jac32.shape == (8, N_OUTPUTS, N_FEATURES), jac32.shape
    say(f"return_jacobian(x) for x.shape={x.shape}: shape {jac32.shape}, dtype {jac32.dtype}")

    # 4. Exactness: a float64 copy of the trained network against float64 central differences.
    model64 = build_model(dtype="float64")
    model64.set_weights([w.astype(np.float64) for w in loaded.get_weights()])
    x64 = x.astype(np.float64)
    jac64 = np.asarray(model64.return_jacobian(x64))
    assert jac64.dtype == np.float64, jac64.dtype
    fd = central_differences(model64, x64)
    np.testing.assert_allclose(jac64, fd, rtol=1e-6, atol=1e-8)
    fd_err = float(np.abs(jac64 - fd).max())
    say(f"float64 Jacobian vs central differences: max |diff| = {fd_err:.2e}  (asserted)")
    np.testing.assert_allclose(jac32, jac64, rtol=1e-4, atol=1e-5)
    f32_err = float(np.abs(jac32 - jac64).max())
    say(f"float32 Jacobian vs float64 Jacobian:     max |diff| = {f32_err:.2e}  (asserted)")

    # 5. What it learned: the network's Jacobian against the true function's, on 512 test points.
    learned = np.asarray(loaded.return_jacobian(x_test), dtype=np.float64)
    analytic = true_jacobian(x_test.astype(np.float64))
    rel_err = float(np.sqrt(((learned - analytic) ** 2).mean() / (analytic**2).mean()))
    say(
        f"learned vs analytic Jacobian on {len(x_test)} test points: RMS relative error "
        f"{rel_err:.3f}, mean |diff| {np.abs(learned - analytic).mean():.3f}"
    )
    if rel_err > 0.25:
        raise AssertionError(
            f"the network did not learn the function's slopes (error {rel_err:.3f})"
        )
    with np.printoptions(precision=3, suppress=True):
        say(f"sample 0, x = {x64[0]}\n  network Jacobian:\n{jac64[0]}\n  analytic:\n{analytic[0]}")

    return {
        "mae": mae,
        "fd_max_abs_err": fd_err,
        "f32_vs_f64_max_abs_err": f32_err,
        "learned_rel_err": rel_err,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    main(epochs=args.epochs, seed=args.seed)
