"""What issue 9's engine checks cost, and the two engine speed items for attribution, side by side
in one process (run by hand; timings on a shared machine are noisy, ratios within a run hold).

```bash
python benchmarks/bench_engine_checks.py            # all sections (~2-4 min on a 2-core CPU)
python benchmarks/bench_engine_checks.py --only paths wrt
```

Sections:

- ``paths``: the gradient-path check (layers, operations between layers, outputs), first call
  (the check runs: one probe sample, eager) and repeated call (cached per model and input
  signature), on a small MLP, the bundled region CNN and MobileNetV2 (``weights=None``).
- ``calls``: a repeated ``augnet.jacobian`` call on a small model, with and without the per-call
  checks (non-finite inputs, the all-zero warning), and those checks alone on a large result.
- ``wrt``: ``augnet.jacobian(model, x, wrt=layer)`` on MobileNetV2, repeated: with the remainder
  of the model cached (now) and rebuilt on every call (before: every call traced anew).
- ``fold``: SmoothGrad / SquareGrad streaming their blocks into running sums, through the
  engine's column blocks (now) and through ``augnet.iter_jacobian``'s stacked blocks (before).
"""

from __future__ import annotations

import argparse
import contextlib
import time
import warnings

import numpy as np


def _best(fn, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _models():
    import keras

    import augnet
    from augnet import _demo

    keras.utils.set_random_seed(0)
    mlp = keras.Sequential(
        [keras.Input((16,)), keras.layers.Dense(32, activation="tanh"), keras.layers.Dense(4)]
    )
    cnn = augnet.load_model(_demo.demo_model_path())
    mobilenet = keras.applications.MobileNetV2(input_shape=(96, 96, 3), weights=None)
    rng = np.random.default_rng(0)
    return {
        "mlp": (mlp, rng.normal(size=(8, 16)).astype("float32")),
        "region_cnn": (cnn, rng.uniform(0, 1, size=(1, 256, 256, 1)).astype("float32")),
        "mobilenet_v2_96": (mobilenet, rng.uniform(-1, 1, size=(1, 96, 96, 3)).astype("float32")),
    }


def bench_paths(models) -> list[str]:
    from augnet import _backend as B
    from augnet._engine import rules, target

    lines = [
        "| model | first call (check runs) | of which: layers and ops | outputs | repeated call "
        "(cached) |",
        "|---|---|---|---|---|",
    ]
    for name, (model, x) in models.items():
        tensors = [B.convert(x, "float32")]
        call = target.make_call(model, False, None, True)

        def run(xs, call=call, model=model):
            return call(B.model_state(model), xs)

        rules._CHECKED.pop(model, None)
        t0 = time.perf_counter()
        rules.check_gradient_paths(model, run, tensors)
        first = time.perf_counter() - t0
        again = _best(lambda m=model, r=run, t=tensors: rules.check_gradient_paths(m, r, t))
        probe = [t[:1] for t in tensors]
        parts = _best(lambda m=model, r=run, p=probe: rules.find_blocking(m, r, p), 2)
        outputs = _best(lambda r=run, p=probe: rules.cut_outputs(r, p), 2)
        lines.append(
            f"| {name} | {first * 1e3:.1f} ms | {parts * 1e3:.1f} ms | {outputs * 1e3:.1f} ms | "
            f"{again * 1e6:.1f} µs |"
        )
    return lines


def bench_calls(models) -> list[str]:
    import augnet
    from augnet._engine import checks, prepare

    model, x = models["mlp"]
    augnet.jacobian(model, x, strategy="loop")
    with_checks = _best(lambda: augnet.jacobian(model, x, strategy="loop"), 2000)
    finite, warn = checks.check_finite, checks.nonzero_samples
    prepare.check_finite = lambda tensors, names: None
    checks.nonzero_samples = lambda values, n: np.ones(n, bool)
    try:
        without = _best(lambda: augnet.jacobian(model, x, strategy="loop"), 2000)
    finally:
        prepare.check_finite, checks.nonzero_samples = finite, warn
    big = np.random.default_rng(0).normal(size=(32, 13, 256, 256)).astype("float32")  # 109 MB
    t_finite = _best(lambda: checks.check_finite([big], ["x"]), 5)
    t_zero = _best(lambda: checks.nonzero_samples([big], 32), 5)
    big[3] = 0.0
    t_zero_hit = _best(lambda: checks.nonzero_samples([big], 32), 5)
    return [
        f"- repeated `augnet.jacobian` on the MLP (8 samples, 4x16): {with_checks * 1e6:.1f} µs "
        f"with the per-call checks, {without * 1e6:.1f} µs without ({(with_checks - without) * 1e6:.1f} µs)",
        f"- non-finite check on a 109 MB input: {t_finite * 1e3:.1f} ms; all-zero check on a "
        f"109 MB result: {t_zero * 1e3:.2f} ms (a non-zero early in every sample), "
        f"{t_zero_hit * 1e3:.1f} ms with one all-zero sample (read whole)",
    ]


def bench_wrt(models) -> list[str]:
    import augnet
    from augnet._engine import target, trace_count

    model, x = models["mobilenet_v2_96"]

    def call():
        return augnet.jacobian(model, x, wrt="out_relu", outputs=[0, 1], strategy="loop")

    t0 = time.perf_counter()
    call()
    first = time.perf_counter() - t0
    traces = trace_count(model)
    cached = _best(call, 3)
    assert trace_count(model) == traces, "a repeated wrt= call traced again"

    def uncached():
        cache = target.cache_for(model)
        for key in [k for k in cache if isinstance(k, tuple) and k[:1] == ("wrt",)]:
            del cache[key]
        call()

    before = _best(uncached, 2)
    return [
        "- `augnet.jacobian(mobilenet_v2_96, x[1], wrt='out_relu', outputs=[0, 1])`: first call "
        f"{first:.2f} s; repeated {cached:.3f} s (no retrace); rebuilt per call as before "
        f"{before:.2f} s ({before / cached:.1f}x)"
    ]


def _old_fold(problem, points, owners, copies, w_all, state) -> None:
    """The fold of augnet/_attribution/_base.py before: through augnet.iter_jacobian's stacked
    blocks, one tensordot per block."""
    import augnet
    from augnet._attribution import _base

    mean, m2, count, total = state
    moments = w_all is None
    chunks = augnet.iter_jacobian(
        problem.model,
        problem.wrap(points),
        outputs=problem.outputs_for(owners),
        batch_size=problem.batch_size,
        max_memory=problem.max_memory,
        **problem.engine,
    )
    for chunk in chunks:
        values = problem.leaves_of(chunk.values)
        own = owners[chunk.samples]
        cols = chunk.columns
        starts = np.flatnonzero(np.r_[True, own[1:] != own[:-1]])
        ends = np.r_[starts[1:], len(own)]
        for a, b in zip(starts, ends):
            u = own[a]
            for i, v in enumerate(values):
                block = v[a:b]
                if moments:
                    last = i == len(values) - 1
                    _base._merge_moments(mean[i], m2[i], count, u, cols, block, last=last)
                else:
                    w = w_all[copies[chunk.samples][a:b]].astype(block.dtype)
                    total[i][u, cols] += np.tensordot(w, block, axes=1)


def bench_fold(models) -> list[str]:
    import augnet
    from augnet._attribution import _base

    model, _ = models["region_cnn"]
    x = np.random.default_rng(1).uniform(0, 1, size=(2, 256, 256, 1)).astype("float32")
    lines = []
    new_fold = _base._fold

    @contextlib.contextmanager
    def old():
        _base._fold = _old_fold
        try:
            yield
        finally:
            _base._fold = new_fold

    for method in ("smoothgrad", "squaregrad"):
        fn = getattr(augnet, method)

        def call(fn=fn):
            return fn(model, x, n_samples=16, seed=0, strategy="loop")

        call()
        with old():
            call()
        now, before = [], []
        for _ in range(4):  # alternating, so that drift in the machine's speed hits both alike
            now.append(_best(call, 1))
            with old():
                before.append(_best(call, 1))
        a, b = np.asarray(call()), None
        with old():
            b = np.asarray(call())
        diff = float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-30))
        lines.append(
            f"- `{method}` (region CNN, 2 images x 16 noisy copies, 13 outputs): column blocks "
            f"{min(now):.3f} s, stacked blocks (before) {min(before):.3f} s "
            f"({min(before) / min(now):.2f}x); largest relative difference {diff:.1e}"
        )
    return lines


SECTIONS = {"paths": bench_paths, "calls": bench_calls, "wrt": bench_wrt, "fold": bench_fold}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=list(SECTIONS), default=list(SECTIONS))
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    models = _models()
    for name in args.only:
        print(f"## {name}")
        for line in SECTIONS[name](models):
            print(line)
        print(flush=True)


if __name__ == "__main__":
    main()
