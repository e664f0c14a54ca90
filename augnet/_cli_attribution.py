"""Attribution methods on the command line.

::

    augnet jacobian MODEL INPUT... --method smoothgrad --samples 32    # maps of a method, data sets
    augnet compare MODEL IMAGE --methods gradient,smoothgrad,ig,gradcam --top-k 3 --out DIR
    augnet evaluate MODEL INPUT... --methods gradient,ig --top-k 1       # the metrics table

``augnet jacobian --method`` writes the method's maps exactly where and how the Jacobian goes (the
same store, pictures, ``summary.jsonl``, shards and ``--resume``); the method and its options are
settings of the run (``run.json``), so ``--resume`` refuses another method. ``compare`` draws one
image's maps of several methods side by side with their deletion/insertion AUC; ``evaluate``
prints deletion/insertion AUC, MuFidelity and the randomisation check for several methods.

Every method option is validated by argparse (one line, exit 2) and must belong to a method that
runs (``--steps`` without integrated gradients is an error, not ignored). The command line's
defaults are the library's, except ``--seed 0``: runs are reproducible.

Standard library only at import (``augnet --help`` stays instant). :mod:`augnet._cli` calls three
hooks: :func:`method_parser` (the ``jacobian`` options), :func:`add_commands` (``compare``,
``evaluate``) and :func:`with_method` (``RunOptions`` of a ``--method`` run).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

# The method names as augnet._attribution defines them (kept here so that --help does not import
# it; tests/test_cli_attribution.py checks that they agree).
METHODS = (
    "gradient",
    "gradient_x_input",
    "smoothgrad",
    "squaregrad",
    "vargrad",
    "integrated_gradients",
    "gradcam",
    "gradcam_plus_plus",
    "occlusion",
)
ALIASES = {
    "saliency": "gradient",
    "grad": "gradient",
    "input_x_gradient": "gradient_x_input",
    "gradient_input": "gradient_x_input",
    "ig": "integrated_gradients",
    "gradcam++": "gradcam_plus_plus",
    "gradcampp": "gradcam_plus_plus",
}
NONNEGATIVE = ("squaregrad", "vargrad", "gradcam", "gradcam_plus_plus")
NOISE = ("smoothgrad", "squaregrad", "vargrad")
PATH = ("integrated_gradients",)
CAM = ("gradcam", "gradcam_plus_plus")
OCCLUSION = ("occlusion",)
RULES = ("riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid", "gausslegendre")
RULE_ALIASES = {
    "left": "riemann_left",
    "right": "riemann_right",
    "middle": "riemann_middle",
    "trapezoid": "riemann_trapezoid",
    "gauss_legendre": "gausslegendre",
    "gauss-legendre": "gausslegendre",
}
AGGREGATES = ("mean", "sum")
METRICS = ("deletion", "insertion", "mufidelity", "randomization")
DEFAULT_COMPARE = ("gradient", "smoothgrad", "integrated_gradients", "gradcam", "occlusion")
DEFAULT_EVALUATE = ("gradient", "smoothgrad", "integrated_gradients")
DEFAULT_CURVE_STEPS = 20
DEFAULT_SUBSETS = 128
MAX_EVALUATE_INPUTS = 64
COMPARE_OUT = "comparison_results"
MAX_COMPARE_OUTPUTS = 16

# The command line's defaults, per method (the library's, with a fixed seed).
DEFAULTS: dict[str, dict] = {
    "gradient": {},
    "gradient_x_input": {},
    **{m: {"n_samples": 50, "noise_level": 0.15, "seed": 0} for m in NOISE},
    "integrated_gradients": {"steps": 50, "rule": "gausslegendre", "baseline": "zeros"},
    **{m: {"layer": None} for m in CAM},
    "occlusion": {"window": None, "stride": None, "baseline": 0.0, "aggregate": "mean"},
}


# --------------------------------------------------------------------------------------------
# Parsing option values (argparse types: one-line errors naming the option)
# --------------------------------------------------------------------------------------------


def parse_method(text: str) -> str:
    """A method name or alias -> its canonical name."""
    name = ALIASES.get(text.strip().lower(), text.strip().lower())
    if name not in METHODS:
        raise argparse.ArgumentTypeError(
            f"expected one of {', '.join(METHODS)} (or {', '.join(ALIASES)}), received {text!r}"
        )
    return name


def parse_methods(text: str) -> tuple[str, ...]:
    """``"gradient,ig,gradcam"`` -> canonical names, in order, without repeats."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise argparse.ArgumentTypeError(
            f"expected method names like gradient,ig, received {text!r}"
        )
    out: list[str] = []
    for part in parts:
        name = parse_method(part)
        if name not in out:
            out.append(name)
    return tuple(out)


def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, received {text!r}")
        return value

    return parse


def parse_nonnegative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, received {text!r}")
    return value


def parse_rule(text: str) -> str:
    name = RULE_ALIASES.get(text.strip().lower(), text.strip().lower())
    if name not in RULES:
        raise argparse.ArgumentTypeError(
            f"expected one of {', '.join(RULES)} (or {', '.join(RULE_ALIASES)}), received {text!r}"
        )
    return name


def parse_baseline(text: str) -> str | float:
    """``zeros``, ``blur`` or a number (a constant input)."""
    lowered = text.strip().lower()
    if lowered in ("zeros", "zero", "blur"):
        return "zeros" if lowered.startswith("zero") else "blur"
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(
            f"expected zeros, blur or a number (a constant input), received {text!r}"
        )
    return value


def parse_window(text: str) -> int | tuple[int, ...]:
    """``8`` (every spatial axis) or ``8,4`` / ``8x4`` (one per spatial axis)."""
    parts = text.lower().replace("x", ",").split(",")
    try:
        values = tuple(int(p) for p in parts)
        if not values or any(v < 1 for v in values):
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a positive integer or one per spatial axis like 8,4, received {text!r}"
        ) from None
    return values[0] if len(values) == 1 else values


def parse_metrics(text: str) -> tuple[str, ...]:
    parts = [p.strip().lower() for p in text.split(",") if p.strip()]
    bad = [p for p in parts if p not in METRICS]
    if bad or not parts:
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated list of {', '.join(METRICS)}, received {text!r}"
        )
    return tuple(m for m in METRICS if m in parts)


@dataclass(frozen=True)
class Option:
    """A method option of the command line: its flag, its keyword in the method's function,
    the methods that take it, its argparse type, and its help."""

    flag: str
    kwarg: str
    methods: tuple[str, ...]
    type: object
    metavar: str
    help: str

    @property
    def dest(self) -> str:
        return self.flag[2:].replace("-", "_")


OPTIONS = (
    Option(
        "--samples",
        "n_samples",
        NOISE,
        _int_at_least(1),
        "N",
        "smoothgrad, squaregrad, vargrad: noisy copies per input (default 50)",
    ),
    Option(
        "--noise-level",
        "noise_level",
        NOISE,
        parse_nonnegative,
        "F",
        "smoothgrad, squaregrad, vargrad: the noise's standard deviation as a fraction of each "
        "input's value range (default 0.15)",
    ),
    Option(
        "--seed",
        "seed",
        NOISE,
        _int_at_least(0),
        "N",
        "smoothgrad, squaregrad, vargrad: the noise's seed (default 0); the noise of an input "
        "depends on the seed only, not on its batch",
    ),
    Option(
        "--steps",
        "steps",
        PATH,
        _int_at_least(1),
        "N",
        "integrated_gradients: gradient evaluations along the path (default 50)",
    ),
    Option(
        "--rule",
        "rule",
        PATH,
        parse_rule,
        "NAME",
        f"integrated_gradients: the quadrature rule, {', '.join(RULES)} (default gausslegendre)",
    ),
    Option(
        "--baseline",
        "baseline",
        PATH + OCCLUSION,
        parse_baseline,
        "B",
        "integrated_gradients: the path's start, zeros (default), blur (the input blurred) or a "
        "number; occlusion: what a window is set to, a number (default 0) or blur",
    ),
    Option(
        "--layer",
        "layer",
        CAM,
        str,
        "NAME",
        "gradcam, gradcam++: the convolutional layer (a name, or outer/inner inside a nested "
        "model; default the last convolutional layer)",
    ),
    Option(
        "--window",
        "window",
        OCCLUSION,
        parse_window,
        "N",
        "occlusion: the window's size, N or one per spatial axis like 8,4 (default the side / 16)",
    ),
    Option(
        "--stride",
        "stride",
        OCCLUSION,
        parse_window,
        "N",
        "occlusion: the step between windows (default: the window)",
    ),
    Option(
        "--aggregate",
        "aggregate",
        OCCLUSION,
        lambda t: _choice(t, AGGREGATES),
        "HOW",
        "occlusion: mean (default) or sum of the drops of the windows covering an element",
    ),
)


def _choice(text: str, choices: Sequence[str]) -> str:
    if text not in choices:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(choices)}, received {text!r}")
    return text


def _add_options(group) -> None:
    for option in OPTIONS:
        group.add_argument(
            option.flag,
            dest=option.dest,
            type=option.type,
            default=None,
            metavar=option.metavar,
            help=option.help,
        )


# --------------------------------------------------------------------------------------------
# Parsers (hooks called by augnet._cli.build_parser)
# --------------------------------------------------------------------------------------------


def method_parser() -> argparse.ArgumentParser:
    """The ``jacobian`` command's attribution options, as a parent parser."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group(
        "attribution method",
        "Instead of the Jacobian's rows, write a method's maps (same folder layout, pictures, "
        "summary.jsonl and --resume). Each option belongs to the methods it names.",
    )
    g.add_argument(
        "--method",
        type=parse_method,
        default=None,
        metavar="NAME",
        help=f"one of {', '.join(METHODS)} (aliases: {', '.join(ALIASES)}); default: the "
        "Jacobian itself (= gradient)",
    )
    _add_options(g)
    return p


def _several_parser(default_methods: Sequence[str]) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("attribution methods")
    g.add_argument(
        "--methods",
        type=parse_methods,
        default=tuple(default_methods),
        metavar="LIST",
        help=f"comma-separated methods (default {','.join(default_methods)}); names: "
        f"{', '.join(METHODS)} (aliases: {', '.join(ALIASES)})",
    )
    _add_options(g)
    g.add_argument(
        "--curve-steps",
        type=_int_at_least(2),
        default=DEFAULT_CURVE_STEPS,
        metavar="N",
        help=f"steps of the deletion and insertion curves (default {DEFAULT_CURVE_STEPS})",
    )
    return p


def add_commands(sub, *, common, model, inputs, quiet) -> dict:
    """Adds ``compare`` and ``evaluate`` to the ``augnet`` subparsers; returns them by name.

    ``common``, ``model``, ``inputs``: augnet._cli's parent parsers (``--debug``; ``--unsafe``;
    the output selection and image options); ``quiet``: one with ``--max-memory`` and
    ``--quiet``."""
    compare = sub.add_parser(
        "compare",
        parents=[common, model, inputs, _several_parser(DEFAULT_COMPARE), quiet],
        help="one image, several attribution methods side by side, with their AUCs",
        description="Run several attribution methods on one image and write a comparison sheet "
        "(OUT/NAME_comparison.png): the input and one column per method, one row per selected "
        "output (at most 16), one colour bar per method, each method's deletion and insertion "
        "AUC under its column. The AUCs are printed too.",
    )
    compare.add_argument("model", metavar="MODEL", help="a .keras/.h5 file or SavedModel folder")
    compare.add_argument("input", metavar="INPUT", help="one image, or a .npy (its first row)")
    g = compare.add_argument_group("what to write")
    g.add_argument(
        "--out", metavar="DIR", default=COMPARE_OUT, help=f"output folder (default {COMPARE_OUT}/)"
    )
    g.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a comparison sheet augnet wrote there before",
    )
    g.add_argument(
        "--no-metrics",
        dest="metrics",
        action="store_false",
        help="skip the deletion/insertion curves (faster; no AUCs)",
    )
    compare.set_defaults(func=cmd_compare)

    evaluate = sub.add_parser(
        "evaluate",
        parents=[common, model, inputs, _several_parser(DEFAULT_EVALUATE), quiet],
        help="which map to trust: deletion/insertion AUC, MuFidelity, randomisation check",
        description="Run several attribution methods on the inputs and print, per method, the "
        "deletion and insertion AUC (lower / higher is better), MuFidelity (higher) and the "
        "rank correlation with the maps of the model with randomised weights (lower: the maps "
        "depend on what the model learned), means over inputs and outputs.",
    )
    evaluate.add_argument("model", metavar="MODEL", help="a .keras/.h5 file or SavedModel folder")
    evaluate.add_argument(
        "inputs",
        metavar="INPUT",
        nargs="+",
        help=f"images, folders, globs or .npy arrays (at most {MAX_EVALUATE_INPUTS} inputs)",
    )
    g = evaluate.add_argument_group("metrics")
    g.add_argument(
        "--metrics",
        type=parse_metrics,
        default=METRICS,
        metavar="LIST",
        help=f"comma-separated, default all: {', '.join(METRICS)}",
    )
    g.add_argument(
        "--subsets",
        type=_int_at_least(2),
        default=DEFAULT_SUBSETS,
        metavar="N",
        help=f"MuFidelity's random subsets per input and output (default {DEFAULT_SUBSETS})",
    )
    evaluate.set_defaults(func=cmd_evaluate)
    return {"compare": compare, "evaluate": evaluate}


def running_parser() -> argparse.ArgumentParser:
    """``--max-memory`` and ``--quiet`` for ``compare`` and ``evaluate``."""
    from augnet import _cli

    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("running")
    g.add_argument(
        "--max-memory",
        type=_cli.parse_memory,
        default=None,
        metavar="SIZE",
        help="memory budget for one engine pass or model evaluation, e.g. 2GB (default 2 GiB)",
    )
    g.add_argument("--quiet", "-q", action="store_true", help="print only the results")
    return p


# --------------------------------------------------------------------------------------------
# Options -> each method's keyword arguments
# --------------------------------------------------------------------------------------------


def _method_list(methods: Sequence[str]) -> str:
    return ", ".join(methods)


def method_options(args: argparse.Namespace, methods: Sequence[str], *, how: str) -> dict:
    """``{method: {keyword: value}}``: the command line's defaults, updated with the options
    given; an option that none of ``methods`` takes is an error naming it.

    ``how``: ``"--method"`` (one method of a run), ``"--methods"`` (a list) or ``"none"`` (no
    method chosen: every option is an error)."""
    from augnet._cli import UsageError

    given = {o: getattr(args, o.dest, None) for o in OPTIONS}
    given = {o: v for o, v in given.items() if v is not None}
    for option in given:
        if any(m in option.methods for m in methods):
            continue
        takes = _method_list(option.methods)
        if how == "none":
            raise UsageError(f"{option.flag} is an option of --method {takes}; pass --method")
        if how == "--method":
            raise UsageError(
                f"{option.flag} is an option of --method {takes}; this run's method is {methods[0]}"
            )
        raise UsageError(f"{option.flag} is an option of {takes}, which --methods does not list")
    out = {}
    for method in methods:
        opts = dict(DEFAULTS[method])
        for option, value in given.items():
            if method in option.methods:
                opts[option.kwarg] = value
        if method == "occlusion" and opts.get("baseline") == "zeros":
            opts["baseline"] = 0.0
        if method == "integrated_gradients":
            if opts["rule"] == "riemann_trapezoid" and opts["steps"] < 2:
                raise UsageError(
                    f"--steps {opts['steps']}: the riemann_trapezoid rule needs at least 2 steps"
                )
        out[method] = opts
    return out


def with_method(args: argparse.Namespace, options):
    """The ``RunOptions`` of ``augnet jacobian`` with the method of ``--method`` (none, or
    ``gradient``: the Jacobian itself, as without it). Non-negative methods are drawn as
    magnitudes (``--abs``'s sequential colour map)."""
    method = getattr(args, "method", None)
    if method is None or method == "gradient":
        method_options(args, [method] if method else [], how="--method" if method else "none")
        return options
    opts = method_options(args, [method], how="--method")[method]
    mode = "abs" if method in NONNEGATIVE else options.mode
    return dataclasses.replace(
        options, method=method, method_options=tuple(sorted(opts.items())), mode=mode
    )


# --------------------------------------------------------------------------------------------
# compare and evaluate
# --------------------------------------------------------------------------------------------


def _model_and_inputs(args, specs: Sequence[str]):
    """The model and the prepared inputs ``(x, displays, items, in_shape, n_outputs)``."""
    from augnet import _cli, _imageio, _runner

    items = _imageio.expand_inputs(specs)  # every input exists, before loading the model
    model = _cli.load_model(args.model, unsafe=args.unsafe, debug=args.debug)
    in_shape, _, out_shape = _runner.single_io(model)
    items = _imageio.expand_inputs(specs, array_input_shape=in_shape)
    spec = None
    try:
        spec = _imageio.ImageSpec.from_input_shape(
            in_shape,
            size=args.size,
            preprocess=args.preprocess,
            resize=args.resize,
            crop=args.crop,
        )
    except _imageio.InputFitError:
        if any(not it.is_array for it in items):
            raise
    if spec is not None:
        in_shape = tuple(s if s is not None else d for s, d in zip(in_shape, spec.input_shape))
    n_outputs = math.prod(out_shape) if out_shape else 1
    return model, items, spec, in_shape, n_outputs


def _selection(args, n_outputs: int, *, limit: int | None = None):
    from augnet import _runner

    outputs, top_k = _runner.select_outputs(args.outputs, args.top_k, n_outputs)
    if limit is not None and outputs is not None and len(outputs) > limit:
        from augnet._cli import UsageError

        raise UsageError(
            f"a comparison sheet shows at most {limit} outputs, {len(outputs)} are selected; "
            "select fewer with --outputs or --top-k"
        )
    return outputs, top_k


def _check_layers(model, methods: dict) -> None:
    """Grad-CAM's layer, found before any work (an error names --layer)."""
    from augnet._compute_attribution import prepare_options

    for method, opts in methods.items():
        methods[method] = prepare_options(model, method, opts)


def _status(args, text: str) -> None:
    if not args.quiet:
        print(f"augnet: {text}", file=sys.stderr, flush=True)


def cmd_compare(args: argparse.Namespace) -> int:
    """``augnet compare``: one input, several methods, a comparison sheet and the AUCs."""
    methods = method_options(args, args.methods, how="--methods")
    model, items, spec, in_shape, n_outputs = _model_and_inputs(args, [args.input])
    from augnet import _cli, _imageio

    if len(items) > 1:
        first = items[0]
        if first.row is None or any(it.path != first.path for it in items):
            raise _cli.UsageError(
                f"compare takes one input; {args.input!r} gives {len(items)} (pass one file)"
            )
    if len(in_shape) not in (2, 3):
        raise _cli.UsageError(
            f"a comparison sheet needs an image-shaped input (height, width[, channels]); the "
            f"model takes {tuple(in_shape)}"
        )
    outputs, top_k = _selection(args, n_outputs, limit=MAX_COMPARE_OUTPUTS)
    if top_k is not None and top_k > MAX_COMPARE_OUTPUTS:
        raise _cli.UsageError(
            f"--top-k {top_k}: a comparison sheet shows at most {MAX_COMPARE_OUTPUTS} outputs"
        )
    _check_layers(model, methods)
    item = items[0]
    x, displays = _imageio.load_batch([item], in_shape, spec)
    from augnet import _compare, _compute_attribution, _safeio

    name = f"{item.name}_comparison.png"
    if os.path.isdir(args.out):  # refused before any work
        with _safeio.opened(args.out) as out:
            _check_sheet_target(out, name, args.overwrite)
    _status(args, f"running {len(methods)} method(s) on {item.key} ...")
    start = time.monotonic()
    comparison = _compare.compare_methods(
        model,
        x,
        methods=_compute_attribution.library_options(methods, x),
        outputs=list(outputs) if outputs is not None else None,
        top_k=top_k,
        evaluate=args.metrics,
        steps=args.curve_steps,
        max_memory=args.max_memory,
    )
    display = displays[0] if displays[0] is not None else _compare._display_image(x[0])
    figure = _compare.comparison_figure(
        comparison, display, title=f"{item.key} · {os.path.basename(args.model)}"
    )
    png = _compare.figure_png(figure, metadata=SHEET_METADATA)
    with _safeio.opened(args.out, create=True) as out:
        _check_sheet_target(out, name, args.overwrite)
        out.write_atomic(name, png)
    seconds = time.monotonic() - start
    print("\n".join(compare_lines(comparison, f"{args.out}/{name}", item.key, seconds)))
    return 0


SHEET_METADATA = {"Software": "augnet", "Description": "augnet comparison sheet"}


def _check_sheet_target(out, name: str, overwrite: bool) -> None:
    """The sheet's file must be absent, or (``--overwrite``) a comparison sheet augnet wrote
    (its PNG text says so); anything else of the user's is never replaced."""
    import stat

    from augnet import _cli

    st = out.lstat(name)
    if st is None:
        return
    path = out.path(name)
    if not overwrite:
        raise _cli.UsageError(f"'{path}' already exists; pass --overwrite to replace it")
    if not stat.S_ISREG(st.st_mode) or not _is_our_sheet(out.read_bytes(name)):
        raise _cli.UsageError(
            f"'{path}' is not a comparison sheet augnet wrote; augnet does not replace it: move "
            "it away, or choose another --out"
        )


def _is_our_sheet(data: bytes) -> bool:
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            text = dict(getattr(img, "text", {}) or {})
    except Exception:
        return False
    return all(text.get(k) == v for k, v in SHEET_METADATA.items())


def compare_lines(comparison, path: str, key: str, seconds: float) -> list[str]:
    """What ``compare`` prints: the file, then per method its AUCs and notes."""
    outputs = ", ".join(str(int(i)) for i in comparison.indices)
    lines = [f"comparison of {key}, outputs {outputs}: {path} ({seconds:.1f} s)"]
    rows = []
    for method in comparison.maps:
        aucs = comparison.aucs.get(method)
        deletion = f"{float(aucs['deletion'].mean()):.4g}" if aucs else "—"
        insertion = f"{float(aucs['insertion'].mean()):.4g}" if aucs else "—"
        extra = comparison.extras.get(method, {})
        note = ""
        if "layer" in extra:
            note = f"layer {extra['layer']}"
        elif "delta" in extra:
            note = f"max |delta| {float(abs(extra['delta']).max()):.3g}"
        rows.append((method, deletion, insertion, note))
    header = ("method", "deletion AUC ↓", "insertion AUC ↑", "")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(3)]
    for r in [header, *rows]:
        lines.append(
            f"  {r[0].ljust(widths[0])}  {r[1].rjust(widths[1])}  {r[2].rjust(widths[2])}  "
            f"{r[3]}".rstrip()
        )
    if comparison.aucs:
        lines.append("  (means over the outputs; each output's own is under its panel)")
    return lines


def cmd_evaluate(args: argparse.Namespace) -> int:
    """``augnet evaluate``: the metrics table of several methods on the inputs."""
    methods = method_options(args, args.methods, how="--methods")
    model, items, spec, in_shape, n_outputs = _model_and_inputs(args, args.inputs)
    from augnet import _cli, _imageio

    if len(items) > MAX_EVALUATE_INPUTS:
        raise _cli.UsageError(
            f"evaluate takes at most {MAX_EVALUATE_INPUTS} inputs at once, {len(items)} given; "
            "pass fewer (the metrics are means over the inputs)"
        )
    outputs, top_k = _selection(args, n_outputs)
    _check_layers(model, methods)
    x, _ = _imageio.load_batch(items, in_shape, spec)
    import augnet
    from augnet import _compute_attribution

    what = f"outputs {_runs(outputs)}" if outputs is not None else f"top {top_k} output(s)"
    _status(args, f"evaluating {len(methods)} method(s) on {len(items)} input(s), {what} ...")
    table = augnet.evaluate_attributions(
        model,
        x,
        methods=_compute_attribution.library_options(methods, x),
        outputs=list(outputs) if outputs is not None else None,
        top_k=top_k,
        metrics=args.metrics,
        steps=args.curve_steps,
        n_subsets=args.subsets,
        max_memory=args.max_memory,
    )
    print(f"model: {args.model}; {len(items)} input(s); {what}")
    print(str(table))
    return 0


def _runs(indices: Sequence[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2, 5"``."""
    parts, i = [], 0
    indices = list(indices)
    while i < len(indices):
        j = i
        while j + 1 < len(indices) and indices[j + 1] == indices[j] + 1:
            j += 1
        parts.append(str(indices[i]) if i == j else f"{indices[i]}-{indices[j]}")
        i = j + 1
    return ", ".join(parts)
