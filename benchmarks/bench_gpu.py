"""augnet on a GPU: Jacobians with Keras on JAX and on torch, against pure JAX and pure torch.

Issue 12's GPU targets: augnet on JAX within 1.10x of pure JAX on the headline CNN (256x256x1 ->
13) at batch 1 and 8 and on MobileNetV2's top-5 classes (224x224x3, batch 8). The same cases on
torch. One prepared run, sized for a device lease (~5 min on an H200 machine):

1. a child process builds each case's Keras network (benchmarks/models.py, seeded), saves its
   weights, its layer graph for the pure ports (benchmarks/ports.py) and the selected outputs,
   and computes sample 0's Jacobian in float64 on the CPU (the JAX port with x64): the reference
   every contender is checked against;
2. a child with ``KERAS_BACKEND=jax``: ``augnet.jacobian`` of the Keras model (``strategy="auto"``),
   pure JAX ``jit(vmap(jacrev))`` and pure JAX "one forward + m VJPs" (jit) of the port, all on
   JAX's default device (the GPU when it sees one), the input a device array;
3. a child with ``KERAS_BACKEND=torch``: ``augnet.jacobian``, ``torch.func.vmap(jacrev)`` and
   "one forward + m ``autograd.grad``" of the port, on CUDA when torch sees it.

Every contender returns the Jacobian as a NumPy array (augnet's contract), so the device-to-host
copy is in every row; pure JAX's time with the result left on the device is reported beside it.
Times are medians of calls alternated in rounds in one process (``_measure.paired_times``);
``1st call`` includes tracing and compiling.

    python benchmarks/bench_gpu.py                   # writes benchmarks/RESULTS_gpu.md
    python benchmarks/bench_gpu.py --cases cnn_b1 --rounds 3 --results /tmp/r.md   # a CPU try-out

benchmarks/README.md says how to run it on the GPU machine (Keras travels there as wheels).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks import _measure as M  # noqa: E402
from benchmarks.models import CASES, build_model, export_spec, make_input, save_weights  # noqa: E402

GPU_CASES = ["cnn_b1", "cnn_b8", "mobilenet_top5"]
TARGET = 1.10  # augnet ÷ the fastest pure approach of its backend
LABELS = {
    "augnet": "augnet.jacobian (auto)",
    "jax_vmap_jacrev": "pure JAX jit(vmap(jacrev))",
    "jax_loop": "pure JAX 1 fwd + m vjp, jit",
    "jax_vmap_jacrev_dev": "pure JAX jit(vmap(jacrev)), result left on the device",
    "jax_loop_dev": "pure JAX 1 fwd + m vjp, result left on the device",
    "torch_vmap_jacrev": "pure torch func.vmap(func.jacrev)",
    "torch_loop": "pure torch 1 fwd + m autograd.grad",
}


def _no_tensorflow():
    # keras.utils.set_random_seed imports TensorFlow when it is installed, to seed it too: keep
    # it out of the JAX and torch children (the GPU machine has none anyway).
    sys.modules.setdefault("tensorflow", None)


def prepare(work: Path, cases: list[str]) -> dict:
    """Child 1 (KERAS_BACKEND=jax, JAX_ENABLE_X64=1): the networks, their weights and ports,
    the selections and the float64 references, written under ``work``."""
    _no_tensorflow()
    import jax
    import keras

    from benchmarks import ports

    meta = {}
    for name in cases:
        case = CASES[name]
        model = build_model(case)
        save_weights(model, work / f"{name}.weights.npz")
        spec, weights = export_spec(model)
        (work / f"{name}.spec.json").write_text(json.dumps(spec))
        np.savez(work / f"{name}.spec_weights.npz", **weights)
        x = make_input(case)
        y = np.asarray(keras.ops.convert_to_numpy(model(x[:1], training=False))).reshape(-1)
        sel = np.argsort(-y)[:5].astype(np.int64) if case.select == "top5" else None
        if sel is not None:
            np.save(work / f"{name}.sel.npy", sel)
        m = y.size if sel is None else len(sel)
        with jax.default_device(jax.devices("cpu")[0]):
            ref = ports.port_jacobian64("jax", spec, weights, x[:1], sel, np.arange(m))
        np.save(work / f"{name}.ref64.npy", ref)
        meta[name] = {"m": int(m)}
    return meta


def _load(work: Path, name: str):
    case = CASES[name]
    spec = json.loads((work / f"{name}.spec.json").read_text())
    with np.load(work / f"{name}.spec_weights.npz") as z:
        weights = {k: z[k] for k in z.files}
    sel_path = work / f"{name}.sel.npy"
    sel = np.load(sel_path) if sel_path.exists() else None
    ref = np.load(work / f"{name}.ref64.npy")
    model = build_model(case, work / f"{name}.weights.npz")
    return case, spec, weights, sel, ref, model


def _measure_case(calls: dict, host: list[str], ref: np.ndarray, b: int, m: int, rounds: int):
    """First-call times, checks against the float64 reference (sample 0) and against the first
    pure approach (every sample), and paired timings of ``calls`` (``augnet`` first)."""
    out = {"first_s": {}, "check": {}}
    values = {}
    for key, fn in calls.items():
        t0 = time.perf_counter()
        v = fn()
        out["first_s"][key] = time.perf_counter() - t0
        if key in host:
            values[key] = np.asarray(v).reshape(b, m, -1)
    pures = [k for k in host if k != "augnet"]
    for key, v in values.items():
        check = M.compare(v[0], ref)
        check["vs_pure"] = M.compare(v, values[pures[0]])["max_abs_err"]
        out["check"][key] = check
    paired = M.paired_times(calls, rounds)
    out["median_s"] = paired["median_s"]
    out["ratio"] = paired["ratio"]
    fastest = min(pures, key=lambda k: paired["median_s"][k])
    out["fastest_pure"] = fastest
    out["ratio_vs_fastest"] = paired["ratio"][fastest]
    out["rounds"] = paired["rounds"]
    return out


def child_jax(work: Path, cases: list[str], meta: dict, rounds: int) -> dict:
    _no_tensorflow()
    import jax
    import jax.numpy as jnp

    import augnet
    from benchmarks import ports

    res = {"devices": [f"{d.platform}:{d.device_kind}" for d in jax.devices()], "cases": {}}
    for name in cases:
        case, spec, weights, sel, ref, model = _load(work, name)
        b, m = case.batch, meta[name]["m"]
        x = jnp.asarray(make_input(case))  # on JAX's default device
        net = ports.jax_network(spec, {k: jnp.asarray(v) for k, v in weights.items()})
        rev, lp = (ports.pure_jax(k, net, sel, m) for k in ("jax_vmap_jacrev", "jax_loop"))
        kw = {} if sel is None else {"outputs": [int(i) for i in sel]}
        calls = {
            "augnet": lambda model=model, x=x, kw=kw: augnet.jacobian(model, x, **kw),
            "jax_vmap_jacrev": lambda f=rev, x=x: np.asarray(f(x)),
            "jax_loop": lambda f=lp, x=x: np.asarray(f(x)),
            "jax_vmap_jacrev_dev": lambda f=rev, x=x: f(x).block_until_ready(),
            "jax_loop_dev": lambda f=lp, x=x: f(x).block_until_ready(),
        }
        host = ["augnet", "jax_vmap_jacrev", "jax_loop"]
        res["cases"][name] = _measure_case(calls, host, ref, b, m, rounds)
        print(f"  jax {name}: done", file=sys.stderr, flush=True)
    return res


def child_torch(work: Path, cases: list[str], meta: dict, rounds: int) -> dict:
    _no_tensorflow()
    import torch

    import augnet
    from benchmarks import ports

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    res = {"devices": [torch.cuda.get_device_name(0) if dev == "cuda" else "cpu"], "cases": {}}
    for name in cases:
        case, spec, weights, sel, ref, model = _load(work, name)
        b, m = case.batch, meta[name]["m"]
        x = torch.from_numpy(make_input(case)).to(dev)
        net = ports.torch_network(spec, weights, device=dev)
        rev, lp = (
            ports.pure_torch(k, net, sel, m, device=dev)
            for k in ("torch_vmap_jacrev", "torch_loop")
        )
        kw = {} if sel is None else {"outputs": [int(i) for i in sel]}
        calls = {
            "augnet": lambda model=model, x=x, kw=kw: augnet.jacobian(model, x, **kw),
            "torch_vmap_jacrev": lambda f=rev, x=x: f(x).detach().cpu().numpy(),
            "torch_loop": lambda f=lp, x=x: f(x).detach().cpu().numpy(),
        }
        host = list(calls)
        res["cases"][name] = _measure_case(calls, host, ref, b, m, rounds)
        print(f"  torch {name}: done", file=sys.stderr, flush=True)
    return res


def _versions() -> dict:
    from importlib import metadata

    out = {}
    for dist in ("keras", "jax", "jaxlib", "torch", "numpy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "-"
    return out


def run_child(role: str, work: Path, cases: list[str], rounds: int, timeout: float) -> dict:
    backend = "torch" if role == "torch" else "jax"
    env = {**os.environ, "KERAS_BACKEND": backend, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if role == "prepare":
        env["JAX_ENABLE_X64"] = "1"
    cmd = [sys.executable, __file__, "--child", role, "--work", str(work), "--rounds", str(rounds)]
    cmd += ["--cases", *cases]
    t0 = time.perf_counter()
    try:
        out = subprocess.run(
            cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if out.returncode != 0:
        return {
            "error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "failed",
            "stderr": out.stderr[-4000:],
        }
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res["seconds"] = time.perf_counter() - t0
    return res


def _ms(s: float) -> str:
    return f"{s * 1e3:.3g} ms" if s < 1 else f"{s:.3g} s"


def report(meta: dict, results: dict, cases: list[str], seconds: float, command: str) -> str:
    info = M.machine_info(_versions())
    lines = [
        "# augnet on a GPU: results",
        "",
        f"Generated by `{command}` on {info['date']} ({seconds / 60:.1f} min).",
        "",
        "| machine | |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v} |" for k, v in info.items() if k != "date"]
    for backend in ("jax", "torch"):
        r = results.get(backend, {})
        lines.append(f"| {backend} devices | {', '.join(r.get('devices', ['-']))} |")
    lines += [
        "",
        "Median per call over rounds alternated in one process; every row returns the Jacobian "
        "as NumPy (device-to-host copy included) except the 'left on the device' rows. `err`: max "
        "|J − J64| over sample 0 against the float64 reference (the JAX port on the CPU), "
        "relative to max |J64|; `off`: entries off by more than 1e-3 of that (ReLU kinks, and "
        "TF32 where the GPU uses it for float32 matrix products and convolutions); `Δ pure`: max "
        "|J − J_pure| over every sample, against the first pure approach in the table.",
        "",
    ]
    verdicts = []
    for backend in ("jax", "torch"):
        r = results.get(backend, {})
        lines += [f"## augnet with Keras on {backend}", ""]
        if "error" in r:
            lines += [f"Not measured: {r['error']}", ""]
            verdicts.append(f"- {backend}: not measured ({r['error']})")
            continue
        for name in cases:
            c = r["cases"][name]
            case = CASES[name]
            lines += [
                f"### {name}: {case.notes}, batch {case.batch}, m={meta[name]['m']} outputs",
                "",
                "| approach | median | ÷ augnet | 1st call | err (rel) | off | Δ pure |",
                "|---|---:|---:|---:|---:|---:|---:|",
            ]
            for key, t in c["median_s"].items():
                chk = c["check"].get(key)
                ratio = 1.0 if key == "augnet" else 1.0 / c["ratio"][key]
                cells = [
                    LABELS[key],
                    _ms(t),
                    f"{ratio:.2f}×",
                    "—" if key.endswith("_dev") else _ms(c["first_s"][key]),  # compiled above
                    f"{chk['max_abs_err']:.1e} ({chk['rel_err']:.0e})" if chk else "—",
                    f"{chk['frac_off']:.2%}" if chk else "—",
                    f"{chk['vs_pure']:.1e}" if chk else "—",
                ]
                lines.append("| " + " | ".join(cells) + " |")
            ratio = c["ratio_vs_fastest"]
            ok = "met" if ratio <= TARGET else "NOT met"
            lines += [
                "",
                f"augnet ÷ the fastest pure approach ({LABELS[c['fastest_pure']]}): "
                f"**{ratio:.2f}×** (target ≤ {TARGET:.2f}×: {ok}; {c['rounds']} rounds)",
                "",
            ]
            verdicts.append(f"- {backend} {name}: {ratio:.2f}× ({ok})")
    lines += ["## Targets (issue 12), judged from this run", "", *verdicts, ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--cases", nargs="+", default=GPU_CASES, choices=sorted(CASES))
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per child process")
    p.add_argument("--results", default=str(HERE / "RESULTS_gpu.md"))
    p.add_argument("--child", choices=("prepare", "jax", "torch"), help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        work = Path(args.work)
        if args.child == "prepare":
            res = prepare(work, args.cases)
        else:
            meta = json.loads((work / "meta.json").read_text())
            child = child_jax if args.child == "jax" else child_torch
            res = child(work, args.cases, meta, args.rounds)
        print(json.dumps(res))
        return
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="augnet-bench-gpu-") as tmp:
        work = Path(tmp)
        meta = run_child("prepare", work, args.cases, args.rounds, args.timeout)
        if "error" in meta:
            raise SystemExit(
                f"preparing the cases failed: {meta['error']}\n{meta.get('stderr', '')}"
            )
        meta.pop("seconds", None)
        (work / "meta.json").write_text(json.dumps(meta))
        results = {}
        for backend in ("jax", "torch"):
            print(f"{backend} ...", file=sys.stderr, flush=True)
            results[backend] = run_child(backend, work, args.cases, args.rounds, args.timeout)
            if "stderr" in results[backend]:
                print(results[backend]["stderr"], file=sys.stderr)
    argv = " ".join(sys.argv[1:])
    command = "python benchmarks/bench_gpu.py" + (f" {argv}" if argv else "")
    text = report(meta, results, args.cases, time.perf_counter() - t0, command)
    Path(args.results).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
