"""Integrated gradients, Grad-CAM and occlusion against other libraries, element by element.

The deterministic methods are compared with the peers that install with our stack: PAIR's
``saliency`` and ``tf-keras-vis`` (in the ``test`` extra, so these run in CI) and ``xplique``
(which pins an older TensorFlow: install it by hand with ``pip install --no-deps xplique``, see
docs/attribution.md). A test whose peer is missing is skipped; the same methods are also checked
against plain hand-written loops in test_attribution_methods.py, which always run.

Conventions differ between the libraries, and each comparison states the mapping:

- PAIR's ``IntegratedGradients`` uses the points ``linspace(0, 1, n)`` with weights ``1/n``:
  augnet's ``rule=(alphas, weights)``; xplique's uses the trapezoid rule on ``n`` points:
  ``rule="riemann_trapezoid", steps=n``.
- Grad-CAM before resizing (tf-keras-vis ``expand_cam=False, normalize_cam=False``, PAIR
  ``should_resize=False``): augnet's ``upsample=False``. xplique resizes bicubically: augnet's
  layer-sized maps resized by ``tf.image.resize(method="bicubic")`` are compared with it.
- Occlusion: PAIR and xplique sum the drops of the windows covering a pixel (``aggregate="sum"``);
  PAIR slides the window by one pixel (``stride=1``).
"""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture(scope="module")
def cnn():
    """A small float32 CNN: 12x12x3 -> 5 logits, with two convolutional layers."""
    import keras

    keras.utils.set_random_seed(21)
    L = keras.layers
    i = keras.Input((12, 12, 3))
    h = L.Conv2D(4, 3, padding="same", activation="relu", name="conv1")(i)
    h = L.MaxPooling2D(2)(h)
    h = L.Conv2D(6, 3, padding="same", activation="relu", name="conv2")(h)
    model = keras.Model(i, L.Dense(5)(L.GlobalAveragePooling2D()(h)))
    x = np.random.default_rng(3).uniform(0, 1, size=(2, 12, 12, 3)).astype("float32")
    return model, x


def _pair_callback(model, layer_name=None):
    """PAIR saliency's ``call_model_function`` for output ``call_model_args["k"]``."""
    import keras
    import saliency.core as saliency
    import tensorflow as tf

    both = (
        keras.Model(model.inputs[0], [model.get_layer(layer_name).output, model.outputs[0]])
        if layer_name
        else None
    )

    def call(x_batch, call_model_args=None, expected_keys=None):
        k = call_model_args["k"]
        x_t = tf.convert_to_tensor(np.asarray(x_batch, dtype="float32"))
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(x_t)
            if both is not None:
                conv, y = both(x_t, training=False)
            else:
                y = model(x_t, training=False)
            score = y[:, k]
        out = {}
        if saliency.INPUT_OUTPUT_GRADIENTS in expected_keys:
            out[saliency.INPUT_OUTPUT_GRADIENTS] = tape.gradient(score, x_t).numpy()
        if saliency.OUTPUT_LAYER_VALUES in expected_keys:
            out[saliency.OUTPUT_LAYER_VALUES] = score.numpy()
        if saliency.CONVOLUTION_LAYER_VALUES in expected_keys:
            out[saliency.CONVOLUTION_LAYER_VALUES] = conv.numpy()
            out[saliency.CONVOLUTION_OUTPUT_GRADIENTS] = tape.gradient(score, conv).numpy()
        return out

    return call


def test_integrated_gradients_against_pair_saliency(cnn):
    saliency = pytest.importorskip("saliency.core")
    import augnet

    model, x = cnn
    n = 7
    ours = augnet.integrated_gradients(
        model, x, baseline=0.1, rule=(np.linspace(0, 1, n), np.full(n, 1 / n))
    )
    call = _pair_callback(model)
    ig = saliency.IntegratedGradients()
    for i in range(len(x)):
        for k in range(5):
            theirs = ig.GetMask(
                x[i],
                call,
                {"k": k},
                x_baseline=np.full_like(x[i], 0.1),
                x_steps=n,
                batch_size=n,
            )
            np.testing.assert_allclose(ours.attributions[i, k], theirs, rtol=2e-4, atol=1e-6)


def test_gradcam_against_pair_saliency(cnn):
    saliency = pytest.importorskip("saliency.core")
    import augnet

    model, x = cnn
    ours = augnet.gradcam(model, x, layer="conv2", upsample=False)
    assert (ours.attributions > 0).mean() > 0.2  # most maps are not cut to zero by the ReLU
    call = _pair_callback(model, "conv2")
    cam = saliency.GradCam()
    for i in range(len(x)):
        for k in range(5):
            theirs = cam.GetMask(x[i], call, {"k": k}, should_resize=False, three_dims=False)
            scale = max(np.abs(theirs).max(), 1e-12)
            np.testing.assert_allclose(
                ours.attributions[i, k], theirs, rtol=1e-4, atol=1e-6 * scale
            )


def test_occlusion_against_pair_saliency(cnn):
    saliency = pytest.importorskip("saliency.core")
    import augnet

    model, x = cnn
    ours = augnet.occlusion(model, x, window=5, stride=1, baseline=0.3, aggregate="sum")
    call = _pair_callback(model)
    occ = saliency.Occlusion()
    for i in range(len(x)):
        for k in (0, 3):
            theirs = occ.GetMask(x[i], call, {"k": k}, size=5, value=0.3)
            np.testing.assert_allclose(ours[i, k], theirs, rtol=1e-4, atol=1e-5)


def test_gradcam_against_tf_keras_vis(cnn):
    pytest.importorskip("tf_keras_vis")
    from tf_keras_vis.gradcam import Gradcam
    from tf_keras_vis.utils.scores import CategoricalScore

    import augnet

    model, x = cnn
    ours = augnet.gradcam(model, x, layer="conv1", upsample=False)
    assert (ours.attributions > 0).mean() > 0.2
    gradcam = Gradcam(model, clone=True)
    for k in range(5):
        theirs = gradcam(
            CategoricalScore([k] * len(x)),
            x,
            penultimate_layer="conv1",
            expand_cam=False,
            normalize_cam=False,
        )
        np.testing.assert_allclose(ours.attributions[:, k], theirs, rtol=1e-4, atol=1e-6)


def _xplique():
    try:
        import xplique  # noqa: F401
        from xplique.attributions import GradCAM, IntegratedGradients, Occlusion
    except Exception as exc:  # not installed, or fails to import with this stack
        pytest.skip(f"xplique is not usable here ({type(exc).__name__}: {exc})")
    return IntegratedGradients, GradCAM, Occlusion


def test_integrated_gradients_against_xplique(cnn):
    IntegratedGradients, _, _ = _xplique()
    import augnet

    model, x = cnn
    ours = augnet.integrated_gradients(model, x, baseline=0.2, rule="riemann_trapezoid", steps=9)
    explainer = IntegratedGradients(model, steps=9, baseline_value=0.2, reducer=None, batch_size=64)
    for k in range(5):
        theirs = np.asarray(explainer.explain(x, np.eye(5, dtype="float32")[[k, k]]))
        np.testing.assert_allclose(ours.attributions[:, k], theirs, rtol=2e-4, atol=1e-6)


def test_gradcam_against_xplique(cnn):
    _, GradCAM, _ = _xplique()
    import tensorflow as tf

    import augnet

    model, x = cnn
    raw = augnet.gradcam(model, x, layer="conv2", upsample=False).attributions  # (2, 5, 6, 6)
    explainer = GradCAM(model, conv_layer="conv2")
    for k in range(5):
        theirs = np.asarray(explainer.explain(x, np.eye(5, dtype="float32")[[k, k]]))[..., 0]
        resized = tf.image.resize(raw[:, k, :, :, None], (12, 12), method="bicubic").numpy()
        scale = max(np.abs(theirs).max(), 1e-12)
        np.testing.assert_allclose(resized[..., 0], theirs, rtol=1e-4, atol=1e-5 * scale)


def test_occlusion_against_xplique(cnn):
    _, _, Occlusion = _xplique()
    import augnet

    model, x = cnn
    ours = augnet.occlusion(model, x, window=4, stride=2, baseline=0.5, aggregate="sum")
    explainer = Occlusion(model, patch_size=4, patch_stride=2, occlusion_value=0.5)
    for k in range(5):
        theirs = np.asarray(explainer.explain(x, np.eye(5, dtype="float32")[[k, k]]))
        np.testing.assert_allclose(ours[:, k, :, :, :1], theirs, rtol=1e-4, atol=1e-5)
