"""AugNet as a Keras model (build, compile, fit, save, load), wrapping without copying weights, and
augnet.load_model on .keras, legacy .h5 and SavedModel directories."""

import keras
import numpy as np
import pytest
from conftest import TOL, backend, reference_jacobian

import augnet

F32 = TOL["float32"]
L = keras.layers


def _image_model():
    """Conv + BatchNorm (non-trivial statistics) + pooling + Dense: what a saved model looks like."""
    keras.utils.set_random_seed(41)
    model = keras.Sequential(
        [
            keras.Input((6, 6, 1)),
            L.Conv2D(2, 3, activation="tanh"),
            L.BatchNormalization(),
            L.MaxPooling2D(2),
            L.Flatten(),
            L.Dense(3),
        ],
        name="image_model",
    )
    bn = model.layers[1]
    bn.moving_mean.assign([0.3, -0.2])
    bn.moving_variance.assign([1.7, 0.6])
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One model saved as .keras and .h5 (and, on TensorFlow, as a SavedModel directory when a
    test asks for it), with its in-memory Jacobian."""
    root = tmp_path_factory.mktemp("saved")
    model = _image_model()
    x = np.random.default_rng(42).uniform(-1, 1, size=(3, 6, 6, 1)).astype("float32")
    paths = {"keras": root / "model.keras", "h5": root / "model.h5"}
    model.save(paths["keras"])
    model.save(paths["h5"])
    return model, x, augnet.jacobian(model, x), paths


@pytest.fixture(scope="module")
def savedmodel(saved):
    """The same model exported as a TensorFlow SavedModel directory (TensorFlow only)."""
    model, _, _, paths = saved
    path = paths["keras"].parent / "savedmodel"
    if not path.exists():
        model.export(str(path), verbose=False)
    return path


# --------------------------------------------------------------------------------------------------
# AugNet as a Keras model
# --------------------------------------------------------------------------------------------------


def test_augnet_builds_compiles_fits_saves_and_loads(tmp_path):
    keras.utils.set_random_seed(43)
    inputs = keras.Input((4,))
    h = L.BatchNormalization()(L.Dense(8, activation="tanh")(inputs))
    model = augnet.AugNet(inputs=inputs, outputs=L.Dense(2)(h))
    model.compile(optimizer="adam", loss="mse")
    rng = np.random.default_rng(43)
    features = rng.uniform(-1, 1, size=(64, 4)).astype("float32")
    labels = np.stack([np.sin(features[:, 0] * features[:, 1]), np.cos(features[:, 2])], 1)
    kernel_before = model.layers[1].kernel.numpy().copy()
    history = model.fit(features, labels, epochs=3, batch_size=16, verbose=0)
    assert len(history.history["loss"]) == 3
    assert not np.array_equal(model.layers[1].kernel.numpy(), kernel_before)  # it trained

    x = features[:5]
    J = model.return_jacobian(x)
    np.testing.assert_allclose(J, reference_jacobian(model, x), **F32)

    path = tmp_path / "trained.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert type(loaded) is augnet.AugNet
    # strategy="auto" may time its candidates differently for the reloaded model (they agree to
    # float rounding); one fixed strategy gives identical bits.
    np.testing.assert_allclose(loaded.return_jacobian(x), J, **F32)
    np.testing.assert_array_equal(
        loaded.return_jacobian(x, strategy="loop"), model.return_jacobian(x, strategy="loop")
    )
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))


@pytest.mark.parametrize("how", ["wrap", "constructor"])
def test_wrapping_shares_variables(how):
    original = _image_model()
    if how == "wrap":
        wrapped = augnet.wrap(original)
    else:
        wrapped = augnet.AugNet(inputs=original.inputs, outputs=original.outputs)
    assert isinstance(wrapped, augnet.AugNet)
    assert len(wrapped.variables) == len(original.variables)
    assert all(a is b for a, b in zip(wrapped.variables, original.variables))

    x = np.random.default_rng(44).uniform(-1, 1, size=(4, 6, 6, 1)).astype("float32")
    J = wrapped.return_jacobian(x)
    # outputs=m.outputs is a list of one, but the model returns one tensor, and so one Jacobian.
    assert isinstance(J, np.ndarray) and J.shape == (4, 3, 6, 6, 1)
    np.testing.assert_array_equal(J, augnet.jacobian(original, x))

    kernel = original.layers[-1].kernel.numpy().copy()
    wrapped.compile(optimizer="sgd", loss="mse")
    wrapped.fit(x, np.ones((4, 3), "float32"), epochs=1, verbose=0)
    assert not np.array_equal(original.layers[-1].kernel.numpy(), kernel)  # trained the original
    np.testing.assert_array_equal(wrapped.return_jacobian(x), augnet.jacobian(original, x))


def test_wrap_keeps_dict_nesting_and_returns_an_augnet_as_is():
    keras.utils.set_random_seed(45)
    a, b = keras.Input((2,), name="a"), keras.Input((3,), name="b")
    model = keras.Model({"a": a, "b": b}, {"y": L.Dense(2)(L.Concatenate()([a, b]))})
    wrapped = augnet.wrap(model)
    assert augnet.wrap(wrapped) is wrapped
    x = {"a": np.ones((2, 2), "float32"), "b": np.ones((2, 3), "float32")}
    J = wrapped.return_jacobian(x)
    kernel = model.layers[-1].kernel.numpy()  # (5, 2), a first then b
    np.testing.assert_allclose(J["y"]["a"], np.broadcast_to(kernel[:2].T, (2, 2, 2)), **F32)
    np.testing.assert_allclose(J["y"]["b"], np.broadcast_to(kernel[2:].T, (2, 2, 3)), **F32)


def test_wrap_rejects_what_is_not_a_model():
    with pytest.raises(TypeError, match=r"must be a keras.Model.*augnet.jacobian\(fn, x\)"):
        augnet.wrap(lambda x: x)


# --------------------------------------------------------------------------------------------------
# augnet.load_model
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fmt, tol",
    [
        ("keras", {"rtol": 0, "atol": 0}),
        ("h5", {"rtol": 0, "atol": 0}),
        pytest.param("savedmodel", {"rtol": 1e-6, "atol": 1e-6}, marks=pytest.mark.tensorflow_only),
    ],
    ids=["keras", "h5", "savedmodel"],
)
def test_load_model_gives_identical_jacobians(saved, request, fmt, tol):
    model, x, J, paths = saved
    path = request.getfixturevalue("savedmodel") if fmt == "savedmodel" else paths[fmt]
    # issue 9: a SavedModel folder is code, loaded only with safe_mode=False
    loaded = augnet.load_model(path, safe_mode=fmt != "savedmodel")
    assert isinstance(loaded, augnet.AugNet)
    np.testing.assert_allclose(loaded.return_jacobian(x), J, **tol)
    np.testing.assert_allclose(J, reference_jacobian(model, x), **F32)


@pytest.mark.tensorflow_only
@pytest.mark.parametrize("strategy", ["pfor", "forward"])
def test_loaded_savedmodel_every_strategy(saved, savedmodel, strategy):
    """A SavedModel is reached through TFSMLayer: gradients (and forward mode) must flow through it."""
    _, x, J, _ = saved
    loaded = augnet.load_model(savedmodel, safe_mode=False)  # issue 9: code
    np.testing.assert_allclose(
        augnet.jacobian(loaded, x, strategy=strategy), J, rtol=1e-6, atol=1e-6
    )


def test_a_savedmodel_off_tensorflow_is_a_clear_error(tmp_path):
    """Keras reaches a SavedModel only through TensorFlow (TFSMLayer): on another backend, an
    error that names the backend and the ways out, before anything is loaded."""
    if backend() == "tensorflow":
        pytest.skip("TensorFlow loads SavedModel directories")
    folder = tmp_path / "savedmodel"
    folder.mkdir()
    (folder / "saved_model.pb").write_bytes(b"")
    with pytest.raises(
        ValueError,
        match=rf"is a TensorFlow SavedModel, which runs only when Keras runs on TensorFlow; "
        rf"Keras runs on '{backend()}' here\. Run augnet with KERAS_BACKEND=tensorflow.*\.keras "
        r"or \.h5 file instead",
    ):
        augnet.load_model(folder)


def test_load_model_accepts_str_paths(saved):
    _, x, J, paths = saved
    np.testing.assert_array_equal(augnet.load_model(str(paths["keras"])).return_jacobian(x), J)


@pytest.mark.parametrize(
    "make, error, match",
    [
        (
            lambda d: d / "missing.keras",
            FileNotFoundError,
            r"No model at .*missing\.keras.*does not exist",
        ),
        (
            lambda d: d,
            ValueError,
            r"is a directory but not a TensorFlow SavedModel \(no saved_model\.pb\)",
        ),
        (
            lambda d: _write(d / "weights.txt", "0 1 2"),
            ValueError,
            r"expected a \.keras file, a \.h5 file or a SavedModel directory; received a file with suffix '\.txt'",
        ),
        (
            lambda d: _write(d / "broken.keras", "not a zip"),
            ValueError,
            r"Cannot load .*broken\.keras.* as a Keras model",
        ),
        (
            lambda d: _write(d / "broken.h5", "not hdf5"),
            ValueError,
            r"Cannot load .*broken\.h5.* as a Keras model",
        ),
    ],
    ids=["missing", "plain-directory", "wrong-suffix", "corrupt-keras", "corrupt-h5"],
)
def test_load_model_bad_paths(tmp_path, make, error, match):
    with pytest.raises(error, match=match):
        augnet.load_model(make(tmp_path))


def _write(path, text):
    path.write_text(text)
    return path
