#!/usr/bin/env python
"""VJPs, JVPs and backward models: augnet against a plain compiled tape, side by side in one run.

    python benchmarks/bench_products.py [--batch 160] [--repeats 7] [--root PATH ...]

The network is ``keras.applications.MobileNetV2(alpha=0.35, input_shape=(96, 96, 3),
weights=None)`` (1000 outputs), the batch 160 random images, the cotangent and tangent random. Rows:

- ``tape_vjp``: a plain ``tf.function`` (batch axis ``None``) with one ``GradientTape.gradient``
  and ``output_gradients=u``: the floor for a VJP;
- ``augnet.vjp``: ``augnet.vjp(model, x, u)``;
- ``backward_model.predict_on_batch``: ``augnet.backward_model(model).predict_on_batch([x, u])``;
- ``fwd_acc_jvp``: a plain ``tf.function`` with one ``tf.autodiff.ForwardAccumulator``;
- ``augnet.jvp``: ``augnet.jvp(model, x, v)``.

Every row returns NumPy (the conversion is timed) and is checked against its plain counterpart
(float32, relative to the largest entry). ``--root`` runs the augnet rows once per given source
tree (each in a child process of its own, alternated ``--rounds`` times), e.g. the tree before a
change and the tree after it, so that both are measured in one sitting; without it, this checkout.
Timings on a shared machine are noisy: compare ratios within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def _child(root: str, batch: int, repeats: int) -> dict:
    sys.path.insert(0, root)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras
    import numpy as np
    import tensorflow as tf

    import augnet

    assert Path(augnet.__file__).resolve().is_relative_to(Path(root).resolve()), augnet.__file__
    keras.utils.set_random_seed(0)
    model = keras.applications.MobileNetV2(alpha=0.35, input_shape=(96, 96, 3), weights=None)
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, size=(batch, 96, 96, 3)).astype("float32")
    u = rng.normal(size=(batch, 1000)).astype("float32")
    v = rng.normal(size=x.shape).astype("float32")
    spec_x = tf.TensorSpec((None, 96, 96, 3), tf.float32)

    @tf.function(input_signature=[spec_x, tf.TensorSpec((None, 1000), tf.float32)])
    def tape_vjp(xt, ut):
        with tf.GradientTape() as tape:
            tape.watch(xt)
            y = model(xt, training=False)
        return tape.gradient(y, xt, output_gradients=ut)

    @tf.function(input_signature=[spec_x, spec_x])
    def acc_jvp(xt, vt):
        with tf.autodiff.ForwardAccumulator(xt, vt) as acc:
            y = model(xt, training=False)
        return acc.jvp(y)

    bm = augnet.backward_model(model)
    rows = {
        "tape_vjp": lambda: tape_vjp(tf.constant(x), tf.constant(u)).numpy(),
        "augnet.vjp": lambda: augnet.vjp(model, x, u),
        "backward_model.predict_on_batch": lambda: bm.predict_on_batch([x, u]),
        "fwd_acc_jvp": lambda: acc_jvp(tf.constant(x), tf.constant(v)).numpy(),
        "augnet.jvp": lambda: augnet.jvp(model, x, v),
    }
    reference = {"vjp": rows["tape_vjp"](), "jvp": rows["fwd_acc_jvp"]()}
    first, results = {}, {}
    for name, call in rows.items():
        t0 = time.perf_counter()
        out = np.asarray(call())
        first[name] = time.perf_counter() - t0
        ref = reference["jvp" if "jvp" in name else "vjp"]
        results[name] = {"error": float(np.abs(out - ref).max() / np.abs(ref).max())}
    times = {name: [] for name in rows}
    for _ in range(repeats):  # in turns, so that drift in the machine's speed hits every row alike
        for name, call in rows.items():
            t0 = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - t0)
    for name in rows:
        results[name].update(median=statistics.median(times[name]), first=first[name])
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=160)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--rounds", type=int, default=1, help="children per root, alternated")
    parser.add_argument("--root", nargs="+", default=[str(ROOT)], help="augnet source trees")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(_child(args.child, args.batch, args.repeats)))
        return 0
    collected: dict[str, list[dict]] = {root: [] for root in args.root}
    for _ in range(args.rounds):
        for root in args.root:
            cmd = [sys.executable, __file__, "--child", root, "--batch", str(args.batch)]
            cmd += ["--repeats", str(args.repeats)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=False)
            line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
            if out.returncode or not line:
                print(out.stdout[-3000:], out.stderr[-3000:], file=sys.stderr)
                return 1
            collected[root].append(json.loads(line[0][7:]))
    print(f"MobileNetV2(alpha=0.35, 96x96x3), batch {args.batch}, median of {args.repeats} calls")
    for root, runs in collected.items():
        print(f"\n{root}")
        print(f"  {'row':<34}{'median s':>10}{'x tape':>8}{'1st call s':>12}{'rel err':>10}")
        for name in runs[0]:
            med = statistics.median(r[name]["median"] for r in runs)
            base = "fwd_acc_jvp" if "jvp" in name else "tape_vjp"
            unit = statistics.median(r[base]["median"] for r in runs)
            first = statistics.median(r[name]["first"] for r in runs)
            err = max(r[name]["error"] for r in runs)
            print(f"  {name:<34}{med:>10.3f}{med / unit:>8.2f}{first:>12.2f}{err:>10.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
