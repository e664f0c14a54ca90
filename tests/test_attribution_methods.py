"""Attribution methods: closed forms, hand-written references, selection and memory options.

The references never call augnet: closed forms on a linear model, the backend's own gradient per output
and per point, a NumPy class activation map, an explicit loop over occlusion windows.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import TOL, f64_activation, float64_keras, predict, tape_loop_jacobian, to_numpy

RULES = ("riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid", "gausslegendre")


# --------------------------------------------------------------------------------------------------
# Models and references
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def linear():
    """``f(x) = W x + b`` in float64: 5 inputs, 3 outputs."""
    import keras

    with float64_keras():
        model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(3)])
    rng = np.random.default_rng(0)
    W = rng.normal(size=(5, 3))
    model.layers[0].kernel.assign(W)
    model.layers[0].bias.assign(rng.normal(size=3))
    x = rng.normal(size=(4, 5))
    return model, x, W


@pytest.fixture(scope="module")
def smooth():
    """A small smooth network in float64 (tanh, or sigmoid where Keras computes tanh of float64
    in float32: conftest.f64_activation)."""
    import keras

    keras.utils.set_random_seed(5)
    act = f64_activation()
    with float64_keras():
        model = keras.Sequential(
            [
                keras.Input((6,)),
                keras.layers.Dense(8, activation=act),
                keras.layers.Dense(3, activation=act),
            ]
        )
    x = np.random.default_rng(2).normal(size=(3, 6))
    return model, x


@pytest.fixture(scope="module")
def convnet():
    """A small float32 CNN (ReLU), 8x8x2 -> 4."""
    import keras

    keras.utils.set_random_seed(9)
    L = keras.layers
    model = keras.Sequential(
        [
            keras.Input((8, 8, 2)),
            L.Conv2D(3, 3, padding="same", activation="tanh", name="conv"),
            L.MaxPooling2D(2),
            L.Flatten(),
            L.Dense(4),
        ]
    )
    x = np.random.default_rng(4).uniform(0, 1, size=(3, 8, 8, 2)).astype("float32")
    return model, x


def tape_gradients(model, points: np.ndarray) -> np.ndarray:
    """``(r, m, *input_shape)``: one GradientTape per output at each point (no augnet)."""
    return tape_loop_jacobian(model, points).reshape(len(points), -1, *points.shape[1:])


def reference_ig(model, x, x0, alphas, weights) -> np.ndarray:
    """IG by a plain loop over samples, path points and outputs: ``(B, m, *input_shape)``."""
    out = []
    for i in range(len(x)):
        total = 0.0
        for a, w in zip(alphas, weights):
            point = (x0[i] + a * (x[i] - x0[i]))[None].astype(x.dtype)
            total = total + w * tape_gradients(model, point)[0]
        out.append(total * (x[i] - x0[i])[None])
    return np.stack(out)


# --------------------------------------------------------------------------------------------------
# Closed forms on a linear model
# --------------------------------------------------------------------------------------------------


def test_gradient_is_the_weight_rows(linear):
    import augnet

    model, x, W = linear
    g = augnet.gradient(model, x)
    assert g.shape == (4, 3, 5) and g.dtype == np.float64
    np.testing.assert_allclose(g, np.broadcast_to(W.T, (4, 3, 5)), **TOL["float64"])
    g2 = augnet.gradient(model, x, outputs=[2, 0])
    np.testing.assert_allclose(g2, np.broadcast_to(W.T[[2, 0]], (4, 2, 5)), **TOL["float64"])


def test_gradient_x_input_is_x_times_w(linear):
    import augnet

    model, x, W = linear
    gx = augnet.gradient_x_input(model, x)
    np.testing.assert_allclose(gx, x[:, None, :] * W.T[None], **TOL["float64"])


@pytest.mark.parametrize("options", [{"noise_level": 0.05}, {"noise_level": 2.0}, {"sigma": 3.0}])
def test_smoothgrad_is_w_for_any_noise(linear, options):
    import augnet

    model, x, W = linear
    sg = augnet.smoothgrad(model, x, n_samples=7, seed=1, **options)
    np.testing.assert_allclose(sg, np.broadcast_to(W.T, sg.shape), **TOL["float64"])
    sq = augnet.squaregrad(model, x, n_samples=7, seed=1, **options)
    np.testing.assert_allclose(sq, np.broadcast_to(W.T**2, sq.shape), **TOL["float64"])
    var = augnet.vargrad(model, x, n_samples=7, seed=1, **options)
    np.testing.assert_array_equal(var, np.zeros_like(var))  # exactly: the gradient never changes


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("steps", [2, 3, 16])
def test_integrated_gradients_closed_form_every_rule(linear, rule, steps):
    import augnet

    model, x, W = linear
    ig = augnet.integrated_gradients(model, x, rule=rule, steps=steps)
    assert isinstance(ig, augnet.Attribution) and ig.method == "integrated_gradients"
    np.testing.assert_allclose(ig.attributions, x[:, None] * W.T[None], **TOL["float64"])
    np.testing.assert_allclose(ig.delta, np.zeros((4, 3)), atol=1e-12)
    np.testing.assert_array_equal(ig.indices, np.broadcast_to(np.arange(3), (4, 3)))


@pytest.mark.parametrize(
    "baseline",
    ["zeros", 0.5, "blur", "per_sample", "one_sample"],
)
def test_integrated_gradients_closed_form_every_baseline(linear, baseline):
    import augnet
    from augnet._attribution.integrated_gradients import blur

    model, x, W = linear
    rng = np.random.default_rng(3)
    if baseline == "per_sample":
        b = rng.normal(size=x.shape)
        x0 = b
    elif baseline == "one_sample":
        b = rng.normal(size=x.shape[1:])
        x0 = np.broadcast_to(b, x.shape)
    elif baseline == "blur":
        b, x0 = "blur", blur(x, 1.0)
    elif baseline == "zeros":
        b, x0 = baseline, np.zeros_like(x)
    else:
        b, x0 = baseline, np.full_like(x, baseline)
    opts = {"blur_sigma": 1.0} if baseline == "blur" else {}
    ig = augnet.integrated_gradients(model, x, baseline=b, steps=4, **opts)
    np.testing.assert_allclose(ig.attributions, (x - x0)[:, None] * W.T[None], **TOL["float64"])
    np.testing.assert_allclose(ig.delta, np.zeros((4, 3)), atol=1e-12)


def test_integrated_gradients_custom_rule_and_quadrature():
    from augnet._attribution.integrated_gradients import quadrature

    for rule in RULES:
        alphas, weights = quadrature(rule, 9)
        assert alphas.shape == weights.shape == (9,)
        assert abs(weights.sum() - 1.0) < 1e-14 and alphas.min() >= 0 and alphas.max() <= 1
        # Each rule integrates t ** p exactly as documented (Gauss-Legendre up to degree 17).
        exact_degree = {"gausslegendre": 17, "riemann_middle": 1, "riemann_trapezoid": 1}
        for p in range(exact_degree.get(rule, 0) + 1):
            assert abs(weights @ alphas**p - 1 / (p + 1)) < 1e-12
    np.testing.assert_allclose(quadrature("riemann_left", 4)[0], [0, 0.25, 0.5, 0.75])
    np.testing.assert_allclose(quadrature("riemann_right", 4)[0], [0.25, 0.5, 0.75, 1])
    np.testing.assert_allclose(quadrature("riemann_trapezoid", 3)[1], [0.25, 0.5, 0.25])
    a, w = quadrature(([0.0, 1.0], [0.5, 0.5]), 99)
    np.testing.assert_array_equal(a, [0, 1])


def test_blur_matches_scipy():
    ndimage = pytest.importorskip("scipy.ndimage")
    from augnet._attribution.integrated_gradients import blur

    x = np.random.default_rng(0).normal(size=(2, 13, 9, 2))
    ref = np.stack(
        [
            np.stack(
                [ndimage.gaussian_filter(x[b, :, :, c], 1.7, mode="reflect") for c in range(2)],
                axis=-1,
            )
            for b in range(2)
        ]
    )
    np.testing.assert_allclose(blur(x, 1.7), ref, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------------------------------
# Completeness
# --------------------------------------------------------------------------------------------------


def test_ig_gap_shrinks_with_steps_gauss_legendre_fastest(smooth):
    import augnet

    model, x = smooth
    gaps = {}
    for rule in RULES:
        gaps[rule] = [
            float(np.abs(augnet.integrated_gradients(model, x, rule=rule, steps=n).delta).max())
            for n in (4, 8, 16, 32)
        ]
    # Shrinks with every doubling until it reaches float64 roundoff, where the order of two
    # gaps is the order of rounding errors (Gauss-Legendre is there by 16 steps: 1e-16 to 4e-16,
    # in either order depending on the strategy and the order of the sums).
    floor = 1e-14
    for rule, g in gaps.items():
        assert all(a > b or max(a, b) < floor for a, b in zip(g, g[1:])), (rule, g)
    # Riemann left/right: O(1/n); middle/trapezoid: O(1/n²); Gauss-Legendre: far faster.
    assert gaps["riemann_left"][-1] > 0.2 * gaps["riemann_left"][-2]
    assert gaps["riemann_middle"][-1] < 0.35 * gaps["riemann_middle"][-2]
    gl, best_riemann = (
        gaps["gausslegendre"],
        min(g[-1] for r, g in gaps.items() if r != "gausslegendre"),
    )
    assert gl[1] < best_riemann  # Gauss-Legendre with 8 steps beats every Riemann rule with 32
    assert gl[-1] < 1e-10


def test_ig_delta_is_the_documented_gap_on_a_piecewise_linear_net():
    import keras

    import augnet

    keras.utils.set_random_seed(3)
    with float64_keras():
        model = keras.Sequential(
            [keras.Input((4,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(2)]
        )
    x = np.random.default_rng(8).normal(size=(3, 4))
    x0 = np.full_like(x, -0.5)
    for rule, steps in [("riemann_left", 5), ("gausslegendre", 5), ("riemann_trapezoid", 64)]:
        ig = augnet.integrated_gradients(model, x, baseline=-0.5, rule=rule, steps=steps)
        f = lambda a: predict(model, a)  # noqa: E731  (float64 computed in float64)
        gap = ig.attributions.reshape(3, 2, -1).sum(-1) - (f(x) - f(x0))
        np.testing.assert_allclose(ig.delta, gap, rtol=1e-10, atol=1e-12)
    # The ReLU kinks keep a gap that quadrature does not remove at few steps.
    coarse = augnet.integrated_gradients(model, x, baseline=-0.5, rule="gausslegendre", steps=3)
    assert np.abs(coarse.delta).max() > 1e-6


# --------------------------------------------------------------------------------------------------
# Against plain per-output loops (deterministic methods)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rule", ["riemann_trapezoid", "gausslegendre"])
def test_integrated_gradients_equal_a_per_output_loop(convnet, rule):
    import augnet
    from augnet._attribution.integrated_gradients import quadrature

    model, x = convnet
    # Not a constant image: at a constant baseline (the trapezoid rule's α = 0 point) the "same"
    # convolution's interior outputs are all equal, so every interior max-pooling window is an
    # exact tie, where the derivative does not exist and which tied element gets the gradient
    # is the implementation's choice (the backward passes of augnet's summed wrapper and of the
    # per-point loop choose differently on torch; both are valid subgradients). Measured on
    # torch: at α = 0 the two differ by 0.14 with a constant 0.2 baseline and by 2e-8 with this
    # one; at every α > 0 by 3e-8 with either.
    base = np.random.default_rng(7).uniform(0.1, 0.3, size=x.shape[1:]).astype(x.dtype)
    x0 = np.broadcast_to(base, x.shape)
    ig = augnet.integrated_gradients(model, x, baseline=base, steps=5, rule=rule)
    alphas, weights = quadrature(rule, 5)
    ref = reference_ig(model, x, x0, alphas, weights)
    np.testing.assert_allclose(ig.attributions, ref, rtol=1e-4, atol=1e-6)


def test_smoothgrad_with_explicit_noise_is_the_mean_of_return_jacobian(convnet):
    import augnet

    model, x = convnet
    net = augnet.AugNet(inputs=model.inputs, outputs=model.outputs)
    noise = np.random.default_rng(6).normal(scale=0.1, size=(5, *x.shape)).astype("float32")
    sg = augnet.smoothgrad(net, x, noise=noise)
    ref = np.mean([net.return_jacobian(x + e) for e in noise], axis=0)
    np.testing.assert_allclose(sg, ref, rtol=1e-5, atol=1e-7)
    # The same noise for every sample: (n, *input_shape).
    shared = augnet.smoothgrad(net, x, noise=noise[:, 0])
    ref = np.mean([net.return_jacobian(x + e[None]) for e in noise[:, 0]], axis=0)
    np.testing.assert_allclose(shared, ref, rtol=1e-5, atol=1e-7)
    var = augnet.vargrad(net, x, noise=noise)
    jac = np.stack([net.return_jacobian(x + e) for e in noise])
    np.testing.assert_allclose(var, jac.var(axis=0), rtol=1e-4, atol=1e-9)
    sq = augnet.squaregrad(net, x, noise=noise)
    np.testing.assert_allclose(sq, (jac**2).mean(axis=0), rtol=1e-4, atol=1e-9)


def test_noise_is_drawn_once_per_copy_and_shared_by_outputs(convnet):
    import augnet

    model, x = convnet
    sg = augnet.smoothgrad(model, x, n_samples=4, seed=3, noise_level=0.2)
    # The documented recipe: one stream per copy (spawned from the seed's generator), one
    # standard normal vector z_j from each, the same for every sample, times 0.2 x the sample's
    # range.
    streams = np.random.default_rng(3).bit_generator.seed_seq.spawn(4)
    z = np.stack([np.random.default_rng(s).standard_normal(x[0].size, np.float32) for s in streams])
    sigma = (0.2 * (x.reshape(3, -1).max(1) - x.reshape(3, -1).min(1))).astype(np.float32)
    noisy = x[:, None] + sigma[:, None, None, None, None] * z.reshape(1, 4, *x.shape[1:])
    jac = tape_gradients(model, noisy.reshape(12, *x.shape[1:]).astype("float32"))
    jac = jac.reshape(3, 4, 4, *x.shape[1:]).astype(np.float64)
    np.testing.assert_allclose(sg, jac.mean(1), rtol=1e-4, atol=1e-6)
    # SquareGrad and VarGrad draw the same noise.
    sq = augnet.squaregrad(model, x, n_samples=4, seed=3, noise_level=0.2)
    np.testing.assert_allclose(sq, (jac**2).mean(1), rtol=1e-4, atol=1e-9)
    var = augnet.vargrad(model, x, n_samples=4, seed=3, noise_level=0.2)
    np.testing.assert_allclose(var, jac.var(1), rtol=1e-4, atol=1e-9)
    # A Generator is drawn from as it is; the same seed gives the same maps.
    again = augnet.smoothgrad(model, x, n_samples=4, seed=np.random.default_rng(3), noise_level=0.2)
    np.testing.assert_array_equal(again, sg)
    # A sample's noise does not depend on the other samples in its batch.
    for i in range(len(x)):
        alone = augnet.smoothgrad(model, x[i : i + 1], n_samples=4, seed=3, noise_level=0.2)
        np.testing.assert_allclose(alone[0], sg[i], rtol=1e-5, atol=1e-8)
        alone = augnet.vargrad(model, x[i : i + 1], n_samples=4, seed=3, noise_level=0.2)
        np.testing.assert_allclose(alone[0], var[i], rtol=1e-4, atol=1e-9)


def test_summed_path_equals_the_copies_jacobians_summed(convnet):
    """SmoothGrad and IG differentiate Σ_j w_j f(p_j) once (augnet/_attribution/_summed.py);
    the per-copy Jacobians, summed afterwards, must give the same maps element by element."""
    import augnet
    from augnet._attribution import _base
    from augnet._attribution.integrated_gradients import quadrature

    model, x = convnet
    noise = np.random.default_rng(8).normal(scale=0.2, size=(5, *x.shape[1:])).astype("float32")
    for options in ({}, {"top_k": 2}, {"outputs": [3, 1]}):
        summed = augnet.smoothgrad(model, x, noise=noise, **options)  # shared: the summed path
        # the same noise given per sample: every copy's Jacobian, summed in NumPy
        per_copy = augnet.smoothgrad(model, x, noise=np.repeat(noise[:, None], 3, 1), **options)
        np.testing.assert_allclose(
            getattr(summed, "attributions", summed),
            getattr(per_copy, "attributions", per_copy),
            rtol=1e-5,
            atol=1e-8,
        )
    for rule, baseline in [
        ("riemann_trapezoid", 0.3),
        ("gausslegendre", "blur"),
        ("riemann_left", None),
    ]:
        ig = augnet.integrated_gradients(model, x, steps=6, rule=rule, baseline=baseline, top_k=2)
        problem = _base.prepare(model, x, top_k=2)
        alphas, weights = quadrature(rule, 6)
        from augnet._attribution.integrated_gradients import _baselines

        x0 = _baselines(problem, baseline, None)[0]
        d = x - x0

        def make_points(owners, copies, x0=x0, d=d, alphas=alphas):
            a = alphas.astype(np.float32)[copies].reshape(-1, 1, 1, 1)
            return [x0[owners] + a * d[owners]]

        sums = _base.stream_sums(problem, make_points, 6, weights=weights)
        np.testing.assert_allclose(
            ig.attributions, sums.total[0] * d[:, None], rtol=1e-5, atol=1e-7, err_msg=rule
        )


def test_all_outputs_at_once_equal_one_at_a_time(convnet):
    import augnet

    model, x = convnet
    options = {
        "gradient": {},
        "gradient_x_input": {},
        "smoothgrad": {"n_samples": 3, "seed": 0},
        "vargrad": {"n_samples": 3, "seed": 0},
        "integrated_gradients": {"steps": 4},
        "gradcam": {},
        "gradcam_plus_plus": {},
        "occlusion": {"window": 3, "stride": 2},
    }
    for method, opts in options.items():
        whole = augnet.attribute(model, x, method=method, **opts)
        whole = getattr(whole, "attributions", whole)
        for k in range(4):
            one = augnet.attribute(model, x, method=method, outputs=[k], **opts)
            one = getattr(one, "attributions", one)
            np.testing.assert_allclose(one[:, 0], whole[:, k], rtol=2e-5, atol=1e-7, err_msg=method)


def test_chunked_equals_unchunked_and_memory_is_bounded(convnet, monkeypatch):
    import augnet
    from augnet._attribution import _base, _summed

    model, x = convnet
    calls, passes = [], []
    original, original_summed = _base.iter_jacobian, _summed.summed_jacobian

    def spy(problem, points, outputs):
        calls.append(len(points[0]))
        return original(problem, points, outputs)

    def spy_summed(problem, g, extras, samples_per_pass):
        passes.append((g.n, samples_per_pass))  # copies per group, samples per engine pass
        return original_summed(problem, g, extras, samples_per_pass)

    monkeypatch.setattr(_summed, "summed_jacobian", spy_summed)
    for method, opts in [
        ("smoothgrad", {"n_samples": 6, "seed": 2}),
        ("integrated_gradients", {"steps": 6}),
    ]:
        passes.clear()
        whole = augnet.attribute(model, x, method=method, top_k=2, **opts)
        assert passes == [(6, 3)], passes  # every copy of every sample in one engine call
        for batch_size, groups in [(1, [(1, 1)] * 6), (4, [(3, 1)] * 2), (13, [(6, 2)])]:
            passes.clear()
            small = augnet.attribute(
                model, x, method=method, top_k=2, max_memory="8KB", batch_size=batch_size, **opts
            )
            # batch_size points per engine pass: the 6 copies in groups, samples per pass
            assert passes == groups, (method, batch_size, passes)
            np.testing.assert_allclose(small.attributions, whole.attributions, rtol=1e-5, atol=1e-7)
            np.testing.assert_array_equal(small.indices, whole.indices)
        # without batch_size, the budget decides: 8 KB holds fewer than 6 points of 512 bytes
        passes.clear()
        small = augnet.attribute(model, x, method=method, top_k=2, max_memory="8KB", **opts)
        assert all(n * s <= 6 for n, s in passes) and sum(n for n, _ in passes) >= 6, passes
        np.testing.assert_allclose(small.attributions, whole.attributions, rtol=1e-5, atol=1e-7)
    # SquareGrad: every copy's Jacobian, in rounds that fit the budget.
    whole = augnet.squaregrad(model, x, top_k=2, n_samples=6, seed=2)
    monkeypatch.setattr(_base, "iter_jacobian", spy)
    small = augnet.squaregrad(
        model, x, top_k=2, n_samples=6, seed=2, max_memory="8KB", batch_size=1
    )
    monkeypatch.setattr(_base, "iter_jacobian", original)
    np.testing.assert_allclose(small.attributions, whole.attributions, rtol=1e-5, atol=1e-7)
    # 18 points in rounds that fit the budget: 8 KB / 8 for 512-byte points = 2 per round.
    assert sum(calls) == 18 and max(calls) <= 2, calls
    for method, opts in [("gradcam", {}), ("occlusion", {"window": 4})]:
        whole = augnet.attribute(model, x, method=method, **opts)
        small = augnet.attribute(model, x, method=method, max_memory="8KB", batch_size=1, **opts)
        np.testing.assert_allclose(
            getattr(small, "attributions", small),
            getattr(whole, "attributions", whole),
            rtol=1e-5,
            atol=1e-7,
        )


def test_memory_does_not_grow_with_the_number_of_samples():
    import gc
    import tracemalloc

    import keras

    import augnet

    keras.utils.set_random_seed(2)
    model = keras.Sequential(
        [
            keras.Input((32, 32, 1)),
            keras.layers.Conv2D(2, 3),
            keras.layers.Flatten(),
            keras.layers.Dense(2),
        ]
    )
    x = np.random.default_rng(0).uniform(size=(3, 32, 32, 1)).astype("float32")  # 4 KB per point
    for method in ("smoothgrad", "vargrad"):
        for n in (64, 512):  # warm up (the compiled functions of each group size)
            augnet.attribute(model, x, method=method, n_samples=n, seed=0, max_memory="1MB")
        peaks = []
        for n in (64, 512):
            gc.collect()
            tracemalloc.start()
            augnet.attribute(model, x, method=method, n_samples=n, seed=0, max_memory="1MB")
            peaks.append(tracemalloc.get_traced_memory()[1])
            tracemalloc.stop()
        # 1536 noisy copies would be 6 MB at once, 5.3 MB more than 192 of them; in groups that
        # fit 1 MB they are not (what grows is the engine calls' garbage between collections).
        assert peaks[1] < peaks[0] + 512 * 1024, (method, peaks)
        assert peaks[1] < 2 * 1024 * 1024, (method, peaks)


def test_top_k_follows_each_samples_class_through_the_noise(convnet):
    import augnet

    model, x = convnet
    noise = np.random.default_rng(1).normal(scale=0.3, size=(4, *x.shape)).astype("float32")
    top = augnet.smoothgrad(model, x, top_k=2, noise=noise)
    preds = to_numpy(model(x, training=False))
    np.testing.assert_array_equal(top.indices, np.argsort(-preds, axis=1, kind="stable")[:, :2])
    np.testing.assert_allclose(top.values, np.take_along_axis(preds, top.indices, 1), rtol=1e-6)
    for i in range(len(x)):
        one = augnet.smoothgrad(
            model, x[i : i + 1], outputs=list(top.indices[i]), noise=noise[:, i : i + 1]
        )
        np.testing.assert_allclose(top.attributions[i], one[0], rtol=1e-5, atol=1e-7)
    per_sample = augnet.smoothgrad(model, x, outputs=top.indices, noise=noise)
    np.testing.assert_allclose(per_sample.attributions, top.attributions, rtol=1e-6, atol=1e-8)


# --------------------------------------------------------------------------------------------------
# Grad-CAM
# --------------------------------------------------------------------------------------------------


def test_gradcam_on_global_average_pooling_is_the_class_activation_map():
    import keras

    import augnet

    keras.utils.set_random_seed(2)
    L = keras.layers
    with float64_keras():
        model = keras.Sequential(
            [
                keras.Input((6, 6, 2)),
                L.Conv2D(4, 3, padding="same", activation="relu", name="conv"),
                L.GlobalAveragePooling2D(),
                L.Dense(3, name="fc"),
            ]
        )
    x = np.random.default_rng(0).normal(size=(2, 6, 6, 2))
    A = predict(keras.Model(model.inputs[0], model.get_layer("conv").output), x)
    W = model.get_layer("fc").kernel.numpy()  # (4, 3)
    # CAM (Zhou et al. 2016): Σ_c W[c, k] A_c; Grad-CAM's α_kc = W[c, k] / (6·6).
    cam = np.maximum(np.einsum("bhwc,ck->bkhw", A, W) / 36.0, 0.0)
    result = augnet.gradcam(model, x, upsample=False)
    assert result.layer == "conv" and result.attributions.shape == (2, 3, 6, 6)
    np.testing.assert_allclose(result.attributions, cam, **TOL["float64"])
    full = augnet.gradcam(model, x)  # same size: the map repeated over the 2 channels
    np.testing.assert_allclose(
        full.attributions, np.repeat(cam[..., None], 2, -1), **TOL["float64"]
    )


def test_gradcam_upsampling_matches_keras_image_resize(convnet):
    import keras

    import augnet

    model, x = convnet
    name = model.layers[1].name  # the max pooling: (4, 4, 3)
    small = augnet.gradcam(model, x, layer=name, upsample=False)
    big = augnet.gradcam(model, x, layer=name)
    assert small.attributions.shape == (3, 4, 4, 4)
    ref = keras.ops.image.resize(
        small.attributions.reshape(12, 4, 4, 1), (8, 8), interpolation="bilinear"
    )
    ref = np.repeat(to_numpy(ref).reshape(3, 4, 8, 8, 1), 2, axis=-1)
    np.testing.assert_allclose(big.attributions, ref, rtol=1e-5, atol=1e-7)
    near = augnet.gradcam(model, x, layer=name, interpolation="nearest")
    np.testing.assert_allclose(
        near.attributions[..., 0], np.repeat(np.repeat(small.attributions, 2, 2), 2, 3), rtol=1e-6
    )


@pytest.mark.parametrize("plus_plus", [False, True])
def test_gradcam_equals_numpy_formula_from_tape_gradients(plus_plus):
    import keras

    import augnet

    keras.utils.set_random_seed(4)
    L = keras.layers
    conv = L.Conv2D(5, 3, strides=2, padding="same", name="conv")
    bn, relu = L.BatchNormalization(name="bn"), L.ReLU(name="relu")
    skip = L.Conv2D(5, 1, strides=2, name="skip")  # a skip connection around the layer
    add, gap, dense = L.Add(), L.GlobalAveragePooling2D(), L.Dense(3)
    i = keras.Input((8, 8, 3))
    r = relu(bn(conv(i)))
    model = keras.Model(i, dense(gap(add([r, skip(i)]))))
    # The head A -> y with x held fixed (the same layers), differentiated by the backend's own
    # per-output loop: G = ∂y/∂A.
    a_in, x_in = keras.Input((4, 4, 5)), keras.Input((8, 8, 3))
    head = keras.Model([a_in, x_in], dense(gap(add([a_in, skip(x_in)]))))
    x = np.random.default_rng(5).normal(size=(2, 8, 8, 3)).astype("float32")
    A = to_numpy(keras.Model(i, r)(x, training=False))
    G = tape_loop_jacobian(head, [A, x])[0]  # (2, 3, 4, 4, 5): with respect to A
    A, G = A.astype(np.float64), np.asarray(G).astype(np.float64)
    if plus_plus:
        g2, g3 = G**2, G**3
        denom = 2 * g2 + A.sum(axis=(1, 2))[:, None, None, None, :] * g3
        a = np.where(denom != 0, g2 / np.where(denom != 0, denom, 1), 0)
        w = (a * np.maximum(G, 0)).sum(axis=(2, 3))
    else:
        w = G.mean(axis=(2, 3))
    cam = np.maximum(np.einsum("bkc,bhwc->bkhw", w, A), 0)
    method = augnet.gradcam_plus_plus if plus_plus else augnet.gradcam
    result = method(model, x, layer="relu", upsample=False)
    assert result.layer == "relu"
    assert augnet.gradcam(model, x).layer == "skip"  # by default the last convolution
    np.testing.assert_allclose(result.attributions, cam, rtol=1e-4, atol=1e-6 * np.abs(cam).max())


def test_gradcam_finds_a_layer_inside_a_nested_model():
    import keras

    import augnet

    keras.utils.set_random_seed(6)
    L = keras.layers
    conv, bn, relu = (
        L.Conv2D(4, 3, name="conv"),
        L.BatchNormalization(name="bn"),
        L.ReLU(name="act"),
    )
    gap, fc = L.GlobalAveragePooling2D(), L.Dense(3)
    backbone = keras.Sequential([keras.Input((7, 7, 1)), conv, bn, relu], name="backbone")
    nested = keras.Sequential([keras.Input((7, 7, 1)), backbone, gap, fc])
    i = keras.Input((7, 7, 1))
    c_out = conv(i)
    flat = keras.Model(i, fc(gap(relu(bn(c_out)))))  # the same layers, one level
    x = np.random.default_rng(2).normal(size=(2, 7, 7, 1)).astype("float32")
    a = augnet.gradcam(nested, x, top_k=2)
    b = augnet.gradcam(flat, x, top_k=2)
    assert a.layer == "backbone/act" and b.layer == "act"
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_allclose(a.attributions, b.attributions, rtol=1e-5, atol=1e-8)
    c = augnet.gradcam_plus_plus(nested, x, layer="backbone/conv", upsample=False, outputs=[1])
    a_in = keras.Input((5, 5, 4))
    head = keras.Model(a_in, fc(gap(relu(bn(a_in)))))  # the conv's activation -> y
    A = to_numpy(keras.Model(i, c_out)(x, training=False))
    G = np.asarray(tape_loop_jacobian(head, A))  # (2, 3, 5, 5, 4): ∂y/∂A
    A, G = A.astype(np.float64), G[:, 1:2].astype(np.float64)
    g2, g3 = G**2, G**3
    denom = 2 * g2 + A.sum(axis=(1, 2))[:, None, None, None, :] * g3
    w = (np.where(denom != 0, g2 / np.where(denom != 0, denom, 1), 0) * np.maximum(G, 0)).sum(
        (2, 3)
    )
    cam = np.maximum(np.einsum("bkc,bhwc->bkhw", w, A), 0)
    np.testing.assert_allclose(c.attributions, cam, rtol=1e-4, atol=1e-6 * np.abs(cam).max())


def test_gradcam_errors_name_the_layer_option(linear, convnet):
    import augnet

    model, x, _ = linear
    with pytest.raises(ValueError, match="no convolutional layer.*`layer=`"):
        augnet.gradcam(model, x)
    cnn, xc = convnet
    with pytest.raises(ValueError, match="no layer named 'nope'"):
        augnet.gradcam(cnn, xc, layer="nope")
    with pytest.raises(ValueError, match="feature map.*Pass `layer=`"):
        augnet.gradcam(cnn, xc, layer=cnn.layers[-1].name)
    with pytest.raises(ValueError, match="interpolation"):
        augnet.gradcam(cnn, xc, interpolation="cubic")


# --------------------------------------------------------------------------------------------------
# Occlusion
# --------------------------------------------------------------------------------------------------


def reference_occlusion(model, x, window, stride, baseline, aggregate):
    """A plain loop over samples and windows (edge windows added flush with the far side)."""
    H, W = x.shape[1:3]

    def starts(size, w, s):
        out = list(range(0, size - w + 1, s))
        return out if out[-1] == size - w else out + [size - w]

    clean = to_numpy(model(x, training=False))
    total = np.zeros((x.shape[0], clean.shape[1], H, W))
    count = np.zeros((H, W))
    for r in starts(H, window[0], stride[0]):
        for c in starts(W, window[1], stride[1]):
            occluded = x.copy()
            occluded[:, r : r + window[0], c : c + window[1]] = baseline[
                :, r : r + window[0], c : c + window[1]
            ]
            drop = clean - to_numpy(model(occluded, training=False))
            total[:, :, r : r + window[0], c : c + window[1]] += drop[:, :, None, None]
            count[r : r + window[0], c : c + window[1]] += 1
    out = (
        np.divide(total, count, out=np.zeros_like(total), where=count > 0)
        if aggregate == "mean"
        else total
    )
    assert (count == 0).any()  # stride 3 > window 2: two columns no window covers (they get 0)
    return np.repeat(out[..., None], x.shape[-1], axis=-1)


@pytest.mark.parametrize("aggregate", ["mean", "sum"])
def test_occlusion_equals_a_loop_over_windows(convnet, aggregate):
    import augnet

    model, x = convnet
    baseline = np.random.default_rng(0).uniform(size=x.shape[1:]).astype("float32")
    occ = augnet.occlusion(
        model, x, window=(3, 2), stride=(2, 3), baseline=baseline, aggregate=aggregate
    )
    ref = reference_occlusion(
        model, x, (3, 2), (2, 3), np.broadcast_to(baseline, x.shape), aggregate
    )
    np.testing.assert_allclose(occ, ref, rtol=1e-5, atol=1e-6)


def test_occlusion_errors(convnet):
    import augnet

    model, x = convnet
    with pytest.raises(ValueError, match="larger than the input"):
        augnet.occlusion(model, x, window=9)
    with pytest.raises(ValueError, match="window"):
        augnet.occlusion(model, x, window=(2, 2, 2))
    with pytest.raises(ValueError, match="aggregate"):
        augnet.occlusion(model, x, aggregate="max")


# --------------------------------------------------------------------------------------------------
# Several inputs and outputs, the entry point, errors
# --------------------------------------------------------------------------------------------------


def test_several_inputs_and_outputs_nest_like_return_jacobian():
    import keras

    import augnet

    keras.utils.set_random_seed(8)
    L = keras.layers
    a, b = keras.Input((3,), name="a"), keras.Input((2,), name="b")
    h = L.Dense(4, activation="tanh")(L.Concatenate()([a, b]))
    model = keras.Model({"a": a, "b": b}, [L.Dense(2)(h), L.Dense(3)(h)])
    rng = np.random.default_rng(0)
    x = {
        "a": rng.normal(size=(2, 3)).astype("float32"),
        "b": rng.normal(size=(2, 2)).astype("float32"),
    }
    ref = tape_loop_jacobian(model, x)
    g = augnet.gradient(model, x)
    for o in range(2):
        for k in ("a", "b"):
            np.testing.assert_allclose(g[o][k], ref[o][k], **TOL["float32"])
    gx = augnet.gradient_x_input(model, x, outputs=[[1], None])
    np.testing.assert_allclose(gx[0]["a"][:, 0], ref[0]["a"][:, 1] * x["a"], **TOL["float32"])
    np.testing.assert_allclose(gx[1]["b"], ref[1]["b"] * x["b"][:, None], **TOL["float32"])
    ig = augnet.integrated_gradients(model, x, steps=32)
    f = lambda v: np.concatenate(predict(model, v), axis=1)  # noqa: E731
    zeros = {k: np.zeros_like(v) for k, v in x.items()}
    sums = [
        sum(ig.attributions[o][k].reshape(2, ig.attributions[o][k].shape[1], -1).sum(-1) for k in x)
        for o in range(2)
    ]
    flat = np.concatenate(sums, axis=1)  # (2, 5): Σ over both inputs, per output element
    np.testing.assert_allclose(ig.delta, flat - (f(x) - f(zeros)), rtol=1e-4, atol=1e-6)
    assert np.abs(ig.delta).max() < 1e-4  # smooth: Gauss-Legendre with 32 steps
    occ = augnet.occlusion(model, x, window=1)
    for k, size in (("a", 3), ("b", 2)):
        for j in range(size):
            y = x.copy()
            y[k] = x[k].copy()
            y[k][:, j] = 0
            drop = f(x) - f(y)
            np.testing.assert_allclose(occ[1][k][:, :, j], drop[:, 2:], rtol=1e-5, atol=1e-6)


def test_attribute_dispatches_and_checks(convnet):
    import augnet

    model, x = convnet
    net = augnet.AugNet(inputs=model.inputs, outputs=model.outputs)
    np.testing.assert_allclose(
        augnet.attribute(model, x, method="saliency", outputs=[1]),
        augnet.gradient(model, x, outputs=[1]),
    )
    ig = net.attribute(x, "ig", steps=3, outputs=[0])
    assert isinstance(ig, augnet.Attribution) and ig.method == "integrated_gradients"
    assert net.attribute(x, "gradcam++").method == "gradcam_plus_plus"
    with pytest.raises(ValueError, match="Received an invalid value for `method`"):
        augnet.attribute(model, x, method="shap")
    with pytest.raises(TypeError, match="unexpected keyword argument.*'n_sample'"):
        augnet.attribute(model, x, method="smoothgrad", n_sample=3)
    with pytest.raises(ValueError, match="either `outputs` or `top_k`"):
        augnet.gradient(model, x, outputs=[0], top_k=1)
    with pytest.raises(ValueError, match="larger than the number of outputs"):
        augnet.smoothgrad(model, x, top_k=5)
    with pytest.raises(ValueError, match="index 4, which is out of range"):
        augnet.integrated_gradients(model, x, outputs=[4])
    with pytest.raises(ValueError, match="`rule`"):
        augnet.integrated_gradients(model, x, rule="simpson")
    with pytest.raises(ValueError, match="`steps`"):
        augnet.integrated_gradients(model, x, steps=0)
    with pytest.raises(ValueError, match="does not broadcast"):
        augnet.integrated_gradients(model, x, baseline=np.zeros((5, 8, 8, 2)))
    with pytest.raises(ValueError, match="`noise` has shape"):
        augnet.smoothgrad(model, x, noise=np.zeros((2, 3, 8, 8)))
    with pytest.raises(ValueError, match="`noise_level`"):
        augnet.smoothgrad(model, x, noise_level=-1)
    with pytest.raises(TypeError, match="`seed`"):
        augnet.smoothgrad(model, x, seed="abc")
    with pytest.raises(ValueError, match="the batch axis is missing"):
        augnet.gradient(model, x[0])


def test_methods_never_change_the_model():
    import keras

    import augnet

    keras.utils.set_random_seed(12)
    L = keras.layers
    model = keras.Sequential(
        [
            keras.Input((6, 6, 1)),
            L.Conv2D(2, 3, name="conv"),
            L.BatchNormalization(),
            L.ReLU(),
            L.Dropout(0.5),
            L.Flatten(),
            L.Dense(3),
        ]
    )
    bn = model.layers[1]
    bn.moving_mean.assign([0.3, -0.2])
    bn.moving_variance.assign([2.0, 0.5])
    x = np.random.default_rng(0).normal(size=(2, 6, 6, 1)).astype("float32")
    before = [w.copy() for w in model.get_weights()]
    first = augnet.smoothgrad(model, x, n_samples=3, seed=0)
    for method in augnet.ATTRIBUTION_METHODS:
        augnet.attribute(
            model, x, method=method, **({"window": 3} if method == "occlusion" else {})
        )
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)
    # Inference mode: Dropout off, so the same call gives the same maps.
    np.testing.assert_array_equal(augnet.smoothgrad(model, x, n_samples=3, seed=0), first)
