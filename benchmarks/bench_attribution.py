#!/usr/bin/env python
"""Attribution methods: augnet side by side with the peers, a plain TensorFlow loop and the
engine's own cost for the same Jacobian rows, in one run.

    python benchmarks/bench_attribution.py                 # every job (~15-25 min on 2 shared cores)
    python benchmarks/bench_attribution.py --quick         # fewer repeats, PAIR extrapolated more
    python benchmarks/bench_attribution.py --jobs mobilenet_ig region_smoothgrad

Jobs (8 images each):

- ``mobilenet_smoothgrad`` / ``mobilenet_ig``: SmoothGrad (50 samples, σ = 0.15 × each image's
  range) and integrated gradients (50 steps, trapezoid rule, zero baseline) of the top-1 class of
  MobileNetV2 (alpha 0.35, 96×96×3, ``weights=None`` with BatchNorm statistics calibrated as in
  ``benchmarks/models.py``);
- ``region_smoothgrad`` / ``region_ig``: the same for all 13 outputs of the shipped model
  (``augnet/data/region_cnn.keras``, 256×256×1);
- ``mobilenet_gradcam`` / ``region_gradcam``: Grad-CAM of the top-1 class / all 13 outputs.

Contenders: ``augnet`` (the method), ``engine`` (``augnet.iter_jacobian`` producing the same
Jacobian rows -- the noisy copies or path points stacked, per-sample outputs -- and nothing else;
for Grad-CAM ``augnet.jacobian`` of the same rows with respect to the input, and ``engine_wrt``,
the public ``jacobian(..., wrt=layer)``), ``tf_loop`` (a ``tf.function`` computing the batch's
gradients for every selected output, called once per noise sample or path step from Python), and
the peers that install: ``xplique``, ``tf_keras_vis``, ``pair`` (PAIR ``saliency``; one image and
one output per call, so it is timed on a subset and scaled, which the table says).

Every contender runs in a fresh interpreter of its own (its peak RSS is its own), one warm-up call
(``1st call``: tracing included), then ``--repeats`` timed calls within ``--budget`` seconds; the
median is reported. Every result is checked against augnet's: exactly (to float32 rounding) where
the contender can be given the same noise or the same rule, else with zero noise against
augnet's gradient plus the relative L2 distance of the timed (differently drawn) SmoothGrad.
Results: ``benchmarks/RESULTS_attribution.md`` (``--quick``: ``benchmarks/_out/``), raw numbers in
``benchmarks/_out/attribution.json``. Timings on a shared machine are noisy: ratios within one run
are what hold.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from benchmarks import _measure as M  # noqa: E402

OUT = HERE / "_out"
BATCH = 8
SAMPLES = 50
STEPS = 50
NOISE = 0.15
MOBILENET_LAYER = "out_relu"
REGION_LAYER = "conv_8x8_blocks"

JOBS = {
    "mobilenet_smoothgrad": ("mobilenet", "smoothgrad"),
    "mobilenet_ig": ("mobilenet", "ig"),
    "mobilenet_gradcam": ("mobilenet", "gradcam"),
    "region_smoothgrad": ("region", "smoothgrad"),
    "region_ig": ("region", "ig"),
    "region_gradcam": ("region", "gradcam"),
}
CONTENDERS = {
    "smoothgrad": ["augnet", "engine", "tf_loop", "xplique", "tf_keras_vis", "pair"],
    "ig": ["augnet", "engine", "tf_loop", "xplique", "pair"],
    "gradcam": ["augnet", "engine", "engine_wrt", "tf_loop", "xplique", "tf_keras_vis", "pair"],
}
PEERS = ("xplique", "tf_keras_vis", "pair")
LABELS = {
    "augnet": "augnet",
    "engine": "engine, same Jacobian rows",
    "engine_wrt": "engine jacobian(wrt=layer)",
    "tf_loop": "TF loop over samples/steps",
    "xplique": "xplique",
    "tf_keras_vis": "tf-keras-vis",
    "pair": "PAIR saliency",
}


# ============================================================================================
# Models and inputs (children)


def build(kind: str):
    """The job's model and its 8 inputs ``(8, *input_shape)`` float32, the same in every child."""
    import keras

    if kind == "mobilenet":
        path = OUT / "attr_mobilenet.weights.h5"
        keras.utils.set_random_seed(3)
        model = keras.applications.MobileNetV2(alpha=0.35, input_shape=(96, 96, 3), weights=None)
        if path.exists():
            model.load_weights(path)
        else:
            from benchmarks.models import calibrate_batchnorm

            calib = np.random.default_rng(99).uniform(-1, 1, (16, 96, 96, 3)).astype("float32")
            calibrate_batchnorm(model, calib)
            OUT.mkdir(exist_ok=True)
            model.save_weights(path)
        x = np.random.default_rng(1003).uniform(-1, 1, (BATCH, 96, 96, 3)).astype("float32")
        return model, x
    import augnet
    from augnet._demo import demo_model_path, load_sample_image

    model = augnet.load_model(demo_model_path())
    rng = np.random.default_rng(1004)
    x = np.concatenate(
        [load_sample_image(), rng.uniform(0, 1, (BATCH - 1, 256, 256, 1)).astype("float32")]
    )
    return model, x


def rows_of(kind: str, model, x) -> np.ndarray:
    """``(8, k)`` the explained outputs: top-1 (MobileNetV2) or all 13 (the shipped model)."""
    preds = np.asarray(model.predict_on_batch(x))
    if kind == "mobilenet":
        return np.argsort(-preds, axis=1, kind="stable")[:, :1]
    return np.broadcast_to(np.arange(preds.shape[1]), (len(x), preds.shape[1])).copy()


def augnet_noise(x: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """The noise augnet.smoothgrad(seed=seed) draws: ``(n, B, *shape)``: copy ``j`` of every
    sample is ``σ_i z_j``, ``z_j`` from the ``j``-th stream spawned from the seed."""
    streams = np.random.default_rng(seed).bit_generator.seed_seq.spawn(n)  # one per copy
    z = np.stack([np.random.default_rng(s).standard_normal(x[0].size, np.float32) for s in streams])
    flat = x.reshape(len(x), -1).astype(np.float64)
    sigma = (NOISE * (flat.max(1) - flat.min(1))).astype(np.float32)  # scaled in float32,
    eps = z.reshape(1, n, *x.shape[1:]) * sigma.reshape(-1, 1, *([1] * (x.ndim - 1)))
    return np.moveaxis(eps, 1, 0)  # as augnet does: the same points to the last bit


def trapezoid(n: int):
    alphas = np.linspace(0, 1, n)
    weights = np.full(n, 1.0 / (n - 1))
    weights[[0, -1]] /= 2
    return alphas, weights


# ============================================================================================
# Contenders (children): each returns (run, full, check); run() -> the timed result,
# check(result) -> dict of check figures; `full` is False when run() covers a subset (PAIR).


def _augnet(job, model, x, rows):
    import augnet

    kind, method = JOBS[job]
    outputs = rows if kind == "mobilenet" else None
    if method == "smoothgrad":

        def run():
            r = augnet.smoothgrad(
                model, x, n_samples=SAMPLES, noise_level=NOISE, seed=0, outputs=outputs
            )
            return np.asarray(getattr(r, "attributions", r))

    elif method == "ig":

        def run():
            r = augnet.integrated_gradients(
                model, x, steps=STEPS, rule="riemann_trapezoid", outputs=outputs
            )
            return np.asarray(r.attributions)

    else:
        layer = MOBILENET_LAYER if kind == "mobilenet" else REGION_LAYER

        def run():
            return np.asarray(augnet.gradcam(model, x, layer=layer, outputs=outputs).attributions)

    def check(result):
        np.save(OUT / f"attr_{job}_augnet.npy", result)
        return {"note": "the reference"}

    return run, True, check


def _reference(job):
    return np.load(OUT / f"attr_{job}_augnet.npy")


def _engine(job, model, x, rows, wrt=False):
    import augnet

    kind, method = JOBS[job]
    b, k = rows.shape
    if method == "gradcam":
        layer = MOBILENET_LAYER if kind == "mobilenet" else REGION_LAYER

        def run():
            if wrt:
                return np.asarray(augnet.jacobian(model, x, outputs=rows, wrt=layer))
            return np.asarray(augnet.jacobian(model, x, outputs=rows))

        def check(result):
            from augnet._attribution.gradcam import cam_from

            if not wrt:
                return {"note": "∂y/∂x rows (checked in the tests)"}
            A = np.asarray(augnet.intermediate_model(model, layer).predict_on_batch(x))
            raw = cam_from(A, result)
            ref = augnet.gradcam(model, x, layer=layer, outputs=rows, upsample=False).attributions
            return {**M.compare(raw, ref), "note": "CAM from its rows vs augnet's"}

        return run, True, check
    n = SAMPLES if method == "smoothgrad" else STEPS
    if method == "smoothgrad":
        noise = augnet_noise(x, n)
        points = (x[None] + noise).swapaxes(0, 1).reshape(b * n, *x.shape[1:])
        weights = np.full(n, 1.0 / n)
    else:
        alphas, weights = trapezoid(n)
        # As augnet makes them: float32 alphas times the float32 input (a point one rounding
        # step off would land on the other side of a ReLU6 kink of MobileNetV2).
        alpha32 = alphas.astype(np.float32).reshape(1, n, *([1] * (x.ndim - 1)))
        points = 0 + alpha32 * x[:, None]
        points = points.reshape(b * n, *x.shape[1:])
    point_rows = np.repeat(rows, n, axis=0)
    outputs = point_rows if kind == "mobilenet" else None

    def run():
        count = 0
        for chunk in augnet.iter_jacobian(model, points, outputs=outputs):
            count += chunk.values.shape[0] * chunk.values.shape[1]
        return count

    def check(result):
        total = np.zeros((b, k, *x.shape[1:]))
        for chunk in augnet.iter_jacobian(model, points, outputs=outputs):
            for r, p in enumerate(range(chunk.samples.start, chunk.samples.stop)):
                total[p // n, chunk.columns] += weights[p % n] * chunk.values[r]
        if method == "ig":
            total = total * x[:, None]
        return {
            **M.compare(total, _reference(job)),
            "note": f"{result} rows; their {'mean' if method == 'smoothgrad' else 'IG sum'} vs augnet",
        }

    return run, True, check


def _tf_loop(job, model, x, rows):
    import tensorflow as tf

    kind, method = JOBS[job]
    b, k = rows.shape
    xt = tf.constant(x)
    idx = tf.constant(rows, dtype=tf.int32)
    if method == "gradcam":
        import keras

        layer = MOBILENET_LAYER if kind == "mobilenet" else REGION_LAYER
        both = keras.Model(model.inputs[0], [model.get_layer(layer).output, model.outputs[0]])

        @tf.function
        def cams(x):
            with tf.GradientTape(persistent=True) as tape:
                A, y = both(x, training=False)
                sel = tf.gather(y, idx, batch_dims=1)
                outs = [sel[:, j] for j in range(k)]
            maps = []
            for yj in outs:
                g = tape.gradient(yj, A)
                w = tf.reduce_mean(g, axis=(1, 2), keepdims=True)
                cam = tf.nn.relu(tf.reduce_sum(w * A, axis=-1, keepdims=True))
                maps.append(tf.image.resize(cam, x.shape[1:3], method="bilinear"))
            return tf.stack(maps, axis=1)

        def run():
            c = cams(xt).numpy()
            return np.repeat(c, x.shape[-1], axis=-1)

        def check(result):
            return M.compare(result, _reference(job))

        return run, True, check

    @tf.function
    def grads(x):
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(x)
            sel = tf.gather(model(x, training=False), idx, batch_dims=1)
            outs = [sel[:, j] for j in range(k)]
        return tf.stack([tape.gradient(yj, x) for yj in outs], axis=1)

    if method == "smoothgrad":
        noise = augnet_noise(x, SAMPLES)

        def run():
            total = np.zeros((b, k, *x.shape[1:]), np.float32)
            for e in noise:
                total += grads(tf.constant(x + e)).numpy()
            return total / SAMPLES

    else:
        alphas, weights = trapezoid(STEPS)

        def run():
            total = np.zeros((b, k, *x.shape[1:]), np.float32)
            for a, w in zip(alphas, weights):
                point = np.float32(a) * x  # in float32, as augnet (kinks: see _engine)
                total += np.float32(w) * grads(tf.constant(point)).numpy()
            return total * x[:, None]

    def check(result):
        return {**M.compare(result, _reference(job)), "note": "the same noise / points"}

    return run, True, check


def _peer(job, model, x, rows, peer):
    import tensorflow as tf

    import augnet

    kind, method = JOBS[job]
    b, k = rows.shape
    layer = MOBILENET_LAYER if kind == "mobilenet" else REGION_LAYER
    targets = [np.eye(model.output_shape[-1], dtype="float32")[rows[:, j]] for j in range(k)]
    full = True
    if peer == "xplique":
        from xplique.attributions import GradCAM, IntegratedGradients, SmoothGrad

        if method == "smoothgrad":
            # xplique's noise is one absolute σ: the batch's mean of augnet's per-image σ.
            sigma = float(np.mean(NOISE * (x.reshape(b, -1).max(1) - x.reshape(b, -1).min(1))))
            explainer = SmoothGrad(
                model, nb_samples=SAMPLES, noise=sigma, reducer=None, batch_size=SAMPLES * b
            )
            exact = SmoothGrad(model, nb_samples=2, noise=0.0, reducer=None)
        elif method == "ig":
            explainer = IntegratedGradients(model, steps=STEPS, reducer=None, batch_size=STEPS * b)
        else:
            explainer = GradCAM(model, conv_layer=layer)

        def call(e=None):
            e = e or explainer
            return np.stack([np.asarray(e.explain(x, t)) for t in targets], axis=1)

    elif peer == "tf_keras_vis":
        from tf_keras_vis.gradcam import Gradcam
        from tf_keras_vis.saliency import Saliency
        from tf_keras_vis.utils.scores import CategoricalScore

        if method == "ig":
            return None
        if method == "smoothgrad":
            sal = Saliency(model, clone=True)

            def call(noise=NOISE, samples=SAMPLES):
                return np.stack(
                    [
                        sal(
                            CategoricalScore(list(rows[:, j])),
                            x,
                            smooth_samples=samples,
                            smooth_noise=noise,
                            keepdims=True,
                            gradient_modifier=None,
                            normalize_map=False,
                        )
                        for j in range(k)
                    ],
                    axis=1,
                )

        else:
            cam = Gradcam(model, clone=True)

            def call(expand=True):
                return np.stack(
                    [
                        cam(
                            CategoricalScore(list(rows[:, j])),
                            x,
                            penultimate_layer=layer,
                            seek_penultimate_conv_layer=False,
                            expand_cam=expand,
                            normalize_cam=False,
                        )
                        for j in range(k)
                    ],
                    axis=1,
                )

    else:  # PAIR saliency: one image, one output per call
        import keras
        import saliency.core as saliency

        both = keras.Model(model.inputs[0], [model.get_layer(layer).output, model.outputs[0]])

        @tf.function
        def grads(xb, j):
            with tf.GradientTape(persistent=True) as tape:
                tape.watch(xb)
                conv, y = both(xb, training=False)
                score = y[:, j]
            return tape.gradient(score, xb), conv, tape.gradient(score, conv), score

        def callback(xb, call_model_args=None, expected_keys=None):
            g, conv, gc, score = grads(tf.constant(np.asarray(xb, "float32")), call_model_args["j"])
            return {
                saliency.INPUT_OUTPUT_GRADIENTS: g.numpy(),
                saliency.CONVOLUTION_LAYER_VALUES: conv.numpy(),
                saliency.CONVOLUTION_OUTPUT_GRADIENTS: gc.numpy(),
                saliency.OUTPUT_LAYER_VALUES: score.numpy(),
            }

        pairs = [(i, j) for i in range(b) for j in range(k)]
        subset = pairs if kind == "mobilenet" and method != "smoothgrad" else pairs[:1]
        full = len(subset) == len(pairs)
        if method == "smoothgrad":
            m = saliency.GradientSaliency()

            def one(i, j, noise=NOISE):
                return m.GetSmoothedMask(
                    x[i],
                    callback,
                    {"j": int(rows[i, j])},
                    stdev_spread=noise,
                    nsamples=SAMPLES,
                    magnitude=False,
                )

        elif method == "ig":
            m = saliency.IntegratedGradients()

            def one(i, j, noise=None):
                return m.GetMask(
                    x[i],
                    callback,
                    {"j": int(rows[i, j])},
                    x_baseline=np.zeros_like(x[i]),
                    x_steps=STEPS,
                    batch_size=STEPS,
                )

        else:
            m = saliency.GradCam()

            def one(i, j, noise=None):
                return m.GetMask(
                    x[i], callback, {"j": int(rows[i, j])}, should_resize=False, three_dims=False
                )

        def call():
            return [one(i, j) for i, j in subset]

    def check(result):
        ref = _reference(job)
        if peer == "pair":
            i, j = subset[0]
            if method == "smoothgrad":
                zero = one(i, j, noise=0.0)
                g = augnet.gradient(model, x[i : i + 1], outputs=[int(rows[i, j])])[0, 0]
                return {
                    **M.compare(zero, g),
                    "note": f"σ=0 vs augnet.gradient; timed on {len(subset)} of {len(pairs)} (image, output) pairs, scaled",
                }
            if method == "ig":
                ours = augnet.integrated_gradients(
                    model,
                    x,
                    steps=STEPS,
                    rule=(np.linspace(0, 1, STEPS), np.full(STEPS, 1 / STEPS)),
                    outputs=rows,
                ).attributions
                got = np.stack([result[p] for p in range(len(subset))])
                want = np.stack([ours[a, c] for a, c in subset])
                note = "augnet with PAIR's rule (linspace, 1/n)"
                if not full:
                    note += f"; timed on {len(subset)} of {len(pairs)} pairs, scaled"
                return {**M.compare(got, want), "note": note}
            raw = augnet.gradcam(model, x, layer=layer, outputs=rows, upsample=False).attributions
            got = np.stack(result)
            want = np.stack([raw[a, c] for a, c in subset])
            return {**M.compare(got, want), "note": "before resizing"}
        if method == "smoothgrad":
            if peer == "xplique":
                zero = call(exact)
            else:
                zero = call(noise=0.0, samples=1)
            g = augnet.gradient(model, x, outputs=rows if kind == "mobilenet" else None)
            g = np.asarray(getattr(g, "attributions", g))
            c = M.compare(zero, g)
            rel_l2 = float(np.linalg.norm(result - ref) / np.linalg.norm(ref))
            return {
                **c,
                "note": f"σ=0 vs augnet.gradient; timed run vs augnet (other noise): rel L2 {rel_l2:.2f}",
            }
        if method == "ig":
            return {**M.compare(result, ref), "note": "the same rule"}
        raw = augnet.gradcam(model, x, layer=layer, outputs=rows, upsample=False).attributions
        if peer == "tf_keras_vis":
            return {
                **M.compare(call(expand=False), raw),
                "note": "before resizing (it resizes with scipy zoom)",
            }
        resized = tf.image.resize(
            raw.reshape(b * k, *raw.shape[2:], 1), x.shape[1:3], method="bicubic"
        )
        return {
            **M.compare(result[..., 0], resized.numpy().reshape(b, k, *x.shape[1:3], 1)[..., 0]),
            "note": "augnet's maps resized bicubic, as it does",
        }

    scale = (len(pairs) / len(subset)) if peer == "pair" else 1.0
    return call, full, check, scale


def child(task: dict) -> dict:
    job, contender = task["job"], task["contender"]
    kind, method = JOBS[job]
    import tensorflow as tf

    tf.constant(1.0).numpy()
    model, x = build(kind)
    rows = rows_of(kind, model, x)
    baseline = M.current_rss_mb()
    scale = 1.0
    if contender == "augnet":
        run, full, check = _augnet(job, model, x, rows)
    elif contender in ("engine", "engine_wrt"):
        run, full, check = _engine(job, model, x, rows, wrt=contender == "engine_wrt")
    elif contender == "tf_loop":
        run, full, check = _tf_loop(job, model, x, rows)
    else:
        made = _peer(job, model, x, rows, contender)
        if made is None:
            return {"status": "skipped", "note": f"{contender} has no {method}"}
        run, full, check, scale = made
    if contender == "augnet":
        timing = M.time_calls(run, task["repeats"], task["budget"])
        paired = None
    else:  # side by side with augnet in this process, alternating, so load drift hits both
        ours, _, _ = _augnet(job, model, x, rows)
        timing, paired = time_paired(run, ours, task["repeats"], task["budget"])
    peak = M.peak_rss_mb()
    checked = check(timing["result"])
    return {
        "status": "ok",
        "first_s": timing["first_s"],
        "median_s": timing["median_s"] * scale,
        "augnet_paired_s": paired,
        "times": len(timing["times_s"]),
        "scaled": scale != 1.0,
        "peak_mb": peak,
        "delta_mb": peak - baseline,
        **{k: v for k, v in checked.items() if k != "note"},
        "note": checked.get("note", ""),
    }


def time_paired(run, ours, repeats: int, budget: float):
    """Times ``run`` and augnet's ``ours`` in turns after one warm-up call each: ``repeats``
    pairs, fewer when they would pass ``budget`` seconds (at least one). Returns (``run``'s
    timing as ``M.time_calls`` does, augnet's median)."""
    t0 = time.perf_counter()
    result = run()
    first = time.perf_counter() - t0
    ours()
    mine, theirs = [], []
    while len(mine) < max(1, repeats):
        t0 = time.perf_counter()
        result = run()
        mine.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        ours()
        theirs.append(time.perf_counter() - t0)
        if sum(mine) + sum(theirs) > budget:
            break
    timing = {"first_s": first, "times_s": mine, "median_s": float(np.median(mine))}
    timing["result"] = result
    return timing, float(np.median(theirs))


# ============================================================================================
# Parent


def peer_available(name: str) -> str | None:
    module = {"xplique": "xplique", "tf_keras_vis": "tf_keras_vis", "pair": "saliency"}[name]
    code = f"import {module}"
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=300
    )
    return None if proc.returncode == 0 else proc.stderr.strip().splitlines()[-1][:200]


def _env():
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(ROOT)}


def run_child(task: dict, timeout: float) -> dict:
    (OUT / "children").mkdir(parents=True, exist_ok=True)
    name = f"{task['job']}__{task['contender']}"
    task_path = OUT / "children" / f"attr_task__{name}.json"
    result_path = OUT / "children" / f"attr_result__{name}.json"
    result_path.unlink(missing_ok=True)
    task_path.write_text(json.dumps({**task, "result_path": str(result_path)}))
    log = OUT / "logs" / f"attr__{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(log, "w") as fh:
        try:
            subprocess.run(
                [sys.executable, str(Path(__file__).resolve()), "--child", str(task_path)],
                stdout=fh,
                stderr=subprocess.STDOUT,
                env=_env(),
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return {"status": "killed", "note": f"still running after {timeout:.0f} s"}
    if not result_path.exists():
        tail = log.read_text(errors="replace")[-300:]
        return {"status": "error", "note": f"no result: ...{tail}"}
    result = json.loads(result_path.read_text())
    result["wall_s"] = time.time() - t0
    return result


def child_entry(path: str) -> int:
    task = json.loads(Path(path).read_text())
    try:
        result = child(task)
    except BaseException as exc:  # noqa: BLE001 - reported
        result = {
            "status": "error",
            "note": f"{type(exc).__name__}: {str(exc)[:300]}",
            "traceback": traceback.format_exc(),
        }
    Path(task["result_path"]).write_text(json.dumps(result, default=float))
    return 0


def fmt_time(s):
    if s is None or s != s:
        return "—"
    return f"{s * 1e3:.0f} ms" if s < 1 else f"{s:.2f} s"


def _ratio(r: dict, ours: float | None) -> float:
    """Contender time / augnet's: against augnet timed alongside it in its own process when it
    was (robust to the machine's load drifting between children), else augnet's own child."""
    base = r.get("augnet_paired_s") or ours
    return r["median_s"] / base if base else float("nan")


def table(job: str, results: dict) -> list[str]:
    ours = results.get("augnet", {}).get("median_s")
    lines = [
        f"### {job}",
        "",
        "| contender | median | × augnet | augnet alongside | 1st call | peak RSS | Δ RSS "
        "| max abs err (rel) | note |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for contender, r in results.items():
        if r.get("status") != "ok":
            lines.append(
                f"| {LABELS[contender]} | — | — | — | — | — | — | — "
                f"| {r.get('status')}: {r.get('note', '')} |"
            )
            continue
        err = "—" if "max_abs_err" not in r else f"{r['max_abs_err']:.1e} ({r['rel_err']:.0e})"
        if r.get("frac_off"):  # entries off by > 1e-3 relative: kinks (see benchmarks/README.md)
            err += f", {r['frac_off'] * 100:.2g}% off"
        scaled = " (scaled)" if r.get("scaled") else ""
        lines.append(
            f"| {LABELS[contender]} | {fmt_time(r['median_s'])}{scaled} | "
            f"{_ratio(r, ours):.2f}× | {fmt_time(r.get('augnet_paired_s'))} | "
            f"{fmt_time(r['first_s'])} | {r['peak_mb']:.0f} MB | {r['delta_mb']:.0f} MB | "
            f"{err} | {r.get('note', '')} |"
        )
    return lines


def targets(all_results: dict) -> list[str]:
    out = []
    for job, results in all_results.items():
        ours = results.get("augnet", {}).get("median_s")
        if not ours:
            continue
        ok = {c: r for c, r in results.items() if r.get("status") == "ok"}
        peers = {p: _ratio(r, ours) for p, r in ok.items() if p in PEERS}
        parts = []
        if peers:
            best = min(peers, key=peers.get)
            met = "met" if peers[best] >= 2 else "NOT met"
            parts.append(
                f"fastest peer {LABELS[best]} {peers[best]:.1f}× augnet's time ({met}: ≥ 2×)"
            )
        else:
            parts.append("no peer ran")
        if "engine" in ok:
            over = 1 / _ratio(ok["engine"], ours)
            met = "met" if over <= 1.2 else "NOT met"
            parts.append(f"augnet / engine {over:.2f}× ({met}: ≤ 1.2×)")
        out.append(f"- {job}: " + "; ".join(parts))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", nargs="+", choices=list(JOBS), default=list(JOBS))
    parser.add_argument("--contenders", nargs="+", default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget", type=float, default=60.0)
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--quick", action="store_true", help="1 timed call each, results in _out/")
    parser.add_argument(
        "--results", help="where the markdown goes (default RESULTS_attribution.md)"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child_entry(args.child)
    if args.quick:
        args.repeats, args.budget = 1, 10.0
    OUT.mkdir(exist_ok=True)
    missing = {p: peer_available(p) for p in PEERS}
    for p, why in missing.items():
        if why:
            print(f"{LABELS[p]}: not available ({why}); its rows are skipped", flush=True)
    all_results = {}
    t_start = time.time()
    for job in args.jobs:
        method = JOBS[job][1]
        all_results[job] = {}
        for contender in CONTENDERS[method]:
            if args.contenders and contender not in args.contenders and contender != "augnet":
                continue
            if contender in PEERS and missing[contender]:
                all_results[job][contender] = {"status": "skipped", "note": "not installed"}
                continue
            r = run_child(
                {
                    "job": job,
                    "contender": contender,
                    "repeats": args.repeats,
                    "budget": args.budget,
                },
                args.timeout,
            )
            all_results[job][contender] = r
            print(
                f"{job:22s} {contender:14s} {r.get('status'):8s} {fmt_time(r.get('median_s'))} {r.get('note', '')[:90]}",
                flush=True,
            )
    minutes = (time.time() - t_start) / 60
    info = M.machine_info({})
    lines = [
        "# Attribution benchmark",
        "",
        f"Run {info['date']} on {info['cpu']} ({info['cores']} cores, {info['ram']}), "
        f"`python benchmarks/bench_attribution.py {' '.join(argv or sys.argv[1:])}`, {minutes:.1f} min. "
        "Times are medians of the timed calls; ratios within this run are what hold (the machine is shared).",
        "",
        "## Targets (issue 10), judged from this run",
        "",
        *targets(all_results),
        "",
    ]
    for job, results in all_results.items():
        lines += table(job, results) + [""]
    text = "\n".join(lines)
    path = OUT / "RESULTS_attribution.quick.md" if args.quick else HERE / "RESULTS_attribution.md"
    if args.results:
        path = Path(args.results)
    path.write_text(text)
    (OUT / "attribution.json").write_text(json.dumps(all_results, indent=1, default=float))
    print(text)
    print(f"\nwritten to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
