"""The ``augnet`` command line: saliency for one image or a whole data set.

::

    augnet demo                                   # the bundled model on sample_input/
    augnet info MODEL                             # inputs, outputs, parameters, differentiability
    augnet jacobian MODEL INPUT... --out DIR      # images, folders, globs or .npy arrays

``augnet --help`` answers without importing TensorFlow, Keras or matplotlib: they are imported
inside the command functions. User errors (a missing model, a corrupt image, an output index out
of range, a folder that cannot be written, a full disk, ...) print one line,
``augnet: error: ...``, on stderr and exit with code 2; ``--debug`` shows the traceback instead.
Ctrl-C exits with code 130 and keeps every finished batch (continue with ``--resume``).

The output folder's layout, the resume design and the atomic writes are described in
``augnet/_store.py``; how images become model inputs in ``augnet/_imageio.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import math
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

PROG = "augnet"
DEFAULT_OUT = "jacobian_results"
DEFAULT_BATCH_SIZE = 32
ALL_OUTPUTS_UP_TO = 16  # models with more outputs default to --top-k DEFAULT_TOP_K
DEFAULT_TOP_K = 5
TOP_INPUTS = 5  # most sensitive input elements listed per output in summary.jsonl
FORMATS = ("png", "npy")
CONTACT_SHEET = "contact_sheet.png"
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

logger = logging.getLogger(__name__)

# Layer classes whose output does not depend differentiably on their input.
NON_DIFFERENTIABLE_LAYERS = {
    "Embedding": "integer lookup",
    "StringLookup": "string lookup",
    "IntegerLookup": "integer lookup",
    "Discretization": "bucketises values (piecewise constant)",
    "Hashing": "hashes values",
    "HashedCrossing": "hashes values",
    "CategoryEncoding": "one-hot/multi-hot encoding of integers",
    "TextVectorization": "string processing",
}


class UsageError(Exception):
    """A user error: reported as one line on stderr, exit code 2."""


# --------------------------------------------------------------------------------------------
# Argument parsing (standard library only, so that --help is instant)
# --------------------------------------------------------------------------------------------


def _version() -> str:
    try:
        from augnet import __version__
    except Exception:  # pragma: no cover - a broken install still gets --help
        return "unknown"
    return __version__


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a positive integer, received {text!r}"
        ) from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, received {text!r}")
    return value


def _percentile(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (0.0 < value <= 100.0):
        raise argparse.ArgumentTypeError(f"expected a number in (0, 100], received {text!r}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (0.0 <= value <= 1.0):
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], received {text!r}")
    return value


def parse_outputs(text: str) -> list[int]:
    """``"0,3,7"`` or ``"0-4,9"`` -> ``[0, 3, 7]`` / ``[0, 1, 2, 3, 4, 9]`` (order kept, no repeats).

    Raises:
        argparse.ArgumentTypeError: anything that is not a comma-separated list of non-negative
            integers or ranges ``a-b`` with ``a <= b``.
    """
    result: list[int] = []
    for part in text.split(","):
        part = part.strip()
        try:
            if "-" in part[1:]:
                lo_text, hi_text = part.split("-", 1)
                lo, hi = int(lo_text), int(hi_text)
                if lo < 0 or hi < lo:
                    raise ValueError
                values = range(lo, hi + 1)
            else:
                values = [int(part)]
                if values[0] < 0:
                    raise ValueError
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected output indices like 0,3,7 or 0-4 (non-negative integers), received {text!r}"
            ) from None
        result.extend(v for v in values if v not in result)
    return result


def parse_formats(text: str) -> tuple[str, ...]:
    """``"png,npy"`` -> ``("png", "npy")``."""
    parts = [p.strip().lower() for p in text.split(",") if p.strip()]
    bad = [p for p in parts if p not in FORMATS]
    if bad or not parts:
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated list of {', '.join(FORMATS)}, received {text!r}"
        )
    return tuple(f for f in FORMATS if f in parts)


def parse_size(text: str) -> tuple[int, int]:
    """``"224,224"`` or ``"224x224"`` -> ``(224, 224)`` (height, width)."""
    parts = text.lower().replace("x", ",").split(",")
    try:
        h, w = (int(p) for p in parts)
        if h < 1 or w < 1:
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected HEIGHT,WIDTH (positive integers), received {text!r}"
        ) from None
    return h, w


def parse_memory(text: str) -> int:
    """``"2GB"``, ``"512MiB"``, ``"1e9"`` -> bytes."""
    units = {
        "": 1,
        "b": 1,
        "kb": 10**3,
        "mb": 10**6,
        "gb": 10**9,
        "tb": 10**12,
        "kib": 2**10,
        "mib": 2**20,
        "gib": 2**30,
        "tib": 2**40,
        "k": 2**10,
        "m": 2**20,
        "g": 2**30,
    }
    s = text.strip().lower().replace(" ", "")
    i = len(s)
    while i > 0 and s[i - 1].isalpha():
        i -= 1
    number, unit = s[:i], s[i:]
    try:
        value = float(number) * units[unit]
    except (ValueError, KeyError):
        value = float("nan")
    if not (value >= 1 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(
            f"expected a memory size such as 2GB, 512MiB or 1e9 (bytes), received {text!r}"
        )
    return int(value)


def _common_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--debug",
        action="store_true",
        help="show tracebacks and TensorFlow's log messages instead of one-line errors",
    )
    return common


def _job_parser() -> argparse.ArgumentParser:
    """Options shared by `jacobian` and `demo`: what to write and how."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("what to write")
    g.add_argument(
        "--out",
        metavar="DIR",
        default=DEFAULT_OUT,
        help=f"output folder (default: {DEFAULT_OUT}/)",
    )
    g.add_argument(
        "--format",
        metavar="LIST",
        type=parse_formats,
        default=("png",),
        help="comma-separated: png (one saliency map per output and a contact sheet per input), "
        "npy (raw float32 Jacobians in OUT/jacobians/, indexed by OUT/batches/); default: png",
    )
    g.add_argument(
        "--no-contact-sheet",
        dest="contact_sheet",
        action="store_false",
        help="with png, skip the contact sheets (faster on large data sets)",
    )
    ex = g.add_mutually_exclusive_group()
    ex.add_argument(
        "--overwrite",
        action="store_true",
        help="replace results already in the output folder",
    )
    ex.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run in the output folder, skipping finished inputs",
    )
    g = p.add_argument_group("pictures")
    ex = g.add_mutually_exclusive_group()
    ex.add_argument(
        "--signed",
        dest="mode",
        action="store_const",
        const="signed",
        help="signed maps: diverging colormap, zero at its centre (default)",
    )
    ex.add_argument(
        "--abs",
        dest="mode",
        action="store_const",
        const="abs",
        help="magnitude maps |dy/dx| on a sequential colormap",
    )
    p.set_defaults(mode="signed")
    g.add_argument(
        "--cmap",
        metavar="NAME",
        default=None,
        help="matplotlib colormap (default: RdBu_r for --signed, inferno for --abs)",
    )
    g.add_argument(
        "--percentile",
        type=_percentile,
        default=99.0,
        metavar="P",
        help="the percentile of |J| at the colormap's end; larger values are clipped (default 99)",
    )
    g.add_argument(
        "--reduce",
        choices=("maxabs", "l2", "sum", "mean"),
        default="maxabs",
        help="how the channels of an RGB Jacobian are combined into one map (default maxabs)",
    )
    g.add_argument(
        "--overlay",
        action="store_true",
        help="blend each map over the input image",
    )
    g.add_argument(
        "--alpha",
        type=_fraction,
        default=0.8,
        help="with --overlay, the colour's weight where saliency is largest (default 0.8)",
    )
    g = p.add_argument_group("running")
    g.add_argument(
        "--batch-size",
        type=_positive_int,
        default=DEFAULT_BATCH_SIZE,
        metavar="N",
        help=f"inputs read and computed together; bounds memory (default {DEFAULT_BATCH_SIZE})",
    )
    g.add_argument(
        "--max-memory",
        type=parse_memory,
        default=None,
        metavar="SIZE",
        help="memory budget for one Jacobian pass, e.g. 2GB (default: the engine's, 2 GiB)",
    )
    g.add_argument(
        "--strategy",
        choices=("auto", "loop", "pfor", "forward", "loop_xla"),
        default="auto",
        help="the engine's Jacobian strategy (default auto: chosen on the first batch, then kept "
        "for the whole run and its --resume, so that results do not depend on where it stopped)",
    )
    g.add_argument(
        "--quiet", "-q", action="store_true", help="no progress bar and no closing summary"
    )
    return p


def _input_parser() -> argparse.ArgumentParser:
    """Options of `jacobian`: which outputs and how images become inputs."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("which outputs")
    ex = g.add_mutually_exclusive_group()
    ex.add_argument(
        "--outputs",
        type=parse_outputs,
        default=None,
        metavar="LIST",
        help="flat output indices, e.g. 0,3,7 or 0-4 (default: all outputs if the model has at "
        f"most {ALL_OUTPUTS_UP_TO}, else --top-k {DEFAULT_TOP_K})",
    )
    ex.add_argument(
        "--top-k",
        type=_positive_int,
        default=None,
        metavar="K",
        help="per input, the K largest outputs (classifiers)",
    )
    g = p.add_argument_group(
        "how images become inputs",
        "An image is read as grayscale (model with 1 channel), RGB (3) or RGBA (4), optionally "
        "centre-cropped to the model's aspect ratio, resized to the model's height x width, and "
        "its 0-255 pixels scaled with --preprocess. .npy arrays (batch, *input_shape) are used as "
        "they are.",
    )
    g.add_argument(
        "--preprocess",
        choices=("unit", "minus1_1", "imagenet_caffe", "imagenet_torch", "none"),
        default="unit",
        help="unit: x/255 in [0, 1] (default); minus1_1: x/127.5-1; imagenet_caffe: BGR minus "
        "the ImageNet means (VGG, ResNet50); imagenet_torch: (x/255-mean)/std; none: 0-255",
    )
    g.add_argument(
        "--resize",
        choices=("bilinear", "nearest", "bicubic", "lanczos", "box", "none"),
        default="bilinear",
        help="resampling filter to the model's size (default bilinear); none: refuse other sizes",
    )
    g.add_argument(
        "--center-crop",
        dest="crop",
        action="store_const",
        const="center",
        default="none",
        help="crop the largest centred box with the model's aspect ratio before resizing",
    )
    g.add_argument(
        "--size",
        type=parse_size,
        default=None,
        metavar="H,W",
        help="input height,width for a model whose input size is not fixed",
    )
    return p


def _model_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument(
        "--unsafe",
        action="store_true",
        help="load with Keras safe_mode=False (allows code in Lambda layers); "
        "only for files you trust",
    )
    return p


def build_parser() -> argparse.ArgumentParser:
    """The ``augnet`` argument parser (standard library only)."""
    common = _common_parser()
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Exact per-sample Jacobians of trained Keras models, and saliency images.",
        epilog="Run 'augnet COMMAND --help' for the options of a command.",
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = sub.add_parser(
        "demo",
        parents=[common, _job_parser()],
        help="saliency of the bundled model on sample_input/ (writes jacobian_results/)",
        description="Run the main job on the bundled demo model (256x256 grayscale -> 13 region "
        "brightnesses) and the images in sample_input/: one map per output, a contact sheet and "
        "summary.jsonl in --out (default jacobian_results/).",
    )
    demo.set_defaults(func=cmd_demo)

    info = sub.add_parser(
        "info",
        parents=[common, _model_parser()],
        help="inputs, outputs, shapes, parameters and differentiability of a model",
        description="Describe a saved model (.keras, .h5 or SavedModel folder): inputs, outputs, "
        "shapes, dtypes, layer and parameter counts, and whether every layer is differentiable "
        "with respect to the input (checked by a gradient on a test input, and by layer type).",
    )
    info.add_argument("model", metavar="MODEL", help="a .keras/.h5 file or SavedModel folder")
    info.add_argument(
        "--sample",
        metavar="INPUT",
        help="also print the sensitivity summary at this input (an image, or a .npy of inputs; "
        "the first sample is used): Jacobian norms per output, spectral norm, local Lipschitz "
        "estimate. Images are prepared as by 'augnet jacobian' with its defaults",
    )
    info.set_defaults(func=cmd_info)

    jac = sub.add_parser(
        "jacobian",
        parents=[common, _model_parser(), _input_parser(), _job_parser()],
        help="saliency maps, contact sheets and raw Jacobians for images or arrays",
        description="Compute the exact Jacobian d outputs / d input of MODEL for every INPUT "
        "and write, per input, one saliency PNG per selected output and a contact sheet "
        "(OUT/NAME/), optionally the raw Jacobians (--format npy), and OUT/summary.jsonl. "
        "Inputs stream through in batches; an interrupted run continues with --resume.",
    )
    jac.add_argument("model", metavar="MODEL", help="a .keras/.h5 file or SavedModel folder")
    jac.add_argument(
        "inputs",
        metavar="INPUT",
        nargs="+",
        help="image file, folder (its images, sorted), glob pattern, or .npy array of inputs",
    )
    jac.set_defaults(func=cmd_jacobian)
    return parser


# --------------------------------------------------------------------------------------------
# Error reporting
# --------------------------------------------------------------------------------------------


_ANSI = None


def _one_line(text: str) -> str:
    """Collapse whitespace and drop terminal colour codes (Keras puts some in its messages)."""
    global _ANSI
    if _ANSI is None:
        import re

        _ANSI = re.compile(r"\x1b\[[0-9;]*m")
    return " ".join(_ANSI.sub("", str(text)).split())


def describe_error(exc: BaseException) -> str:
    """The one-line message for a user error."""
    if isinstance(exc, OSError) and not _is_our_message(exc):
        where = f" '{exc.filename}'" if exc.filename else ""
        if exc.errno == errno.ENOSPC:
            return (
                f"no space left on device while writing{where}; finished results are kept: "
                "free some space and run again with --resume"
            )
        reason = exc.strerror or str(exc)
        if exc.errno == errno.EDQUOT:
            reason = "disk quota exceeded"
        return _one_line(f"{reason}{':' + where if where else ''}")
    return _one_line(str(exc)) or type(exc).__name__


def _is_our_message(exc: OSError) -> bool:
    return exc.errno is None and exc.strerror is None and bool(exc.args)


def _report(message: str) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr)


# --------------------------------------------------------------------------------------------
# Lazy heavy imports
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _silenced_stderr_fd(enabled: bool) -> Iterator[None]:
    """Send file descriptor 2 to /dev/null (TensorFlow's C++ start-up chatter), then restore it."""
    if not enabled:
        yield
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
        null = os.open(os.devnull, os.O_WRONLY)
    except OSError:
        yield
        return
    os.dup2(null, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def _import_tensorflow(debug: bool = False):
    """Import TensorFlow and Keras quietly (unless ``debug``); returns the ``augnet`` package."""
    if "tensorflow" not in sys.modules:
        if not debug:
            os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        with _silenced_stderr_fd(not debug):
            import keras

            if keras.backend.backend() == "tensorflow":  # (Keras on JAX or torch needs no TF)
                import tensorflow as tf

                tf.config.list_physical_devices()
        if not debug:
            # TensorFlow's Python deprecation notices are for developers, not for command users.
            logging.getLogger("tensorflow").setLevel(logging.ERROR)
    import augnet

    return augnet


def load_model(path: str, *, unsafe: bool = False, debug: bool = False):
    """Load a model for the command line, turning every failure into a :class:`UsageError`."""
    p = Path(path)
    if not p.exists():
        raise UsageError(f"model file '{path}' does not exist")
    if p.is_file() and not os.access(p, os.R_OK):
        raise UsageError(f"cannot read model file '{path}': permission denied")
    augnet = _import_tensorflow(debug)
    try:
        return augnet.load_model(p, safe_mode=not unsafe)
    except FileNotFoundError:
        raise UsageError(f"model file '{path}' does not exist") from None
    except Exception as exc:  # anything Keras raises on a bad file is the file's fault
        if debug:
            raise
        text = _one_line(str(exc))
        hint = ""
        if "safe_mode" in text or "unsafe" in text.lower():
            hint = " (pass --unsafe only if you trust this file)"
        if len(text) > 300:
            text = text[:297] + "..."
        if not text.lower().startswith("cannot load"):
            text = f"cannot load model '{path}': {text}"
        raise UsageError(f"{text}{hint}") from None


# --------------------------------------------------------------------------------------------
# augnet info
# --------------------------------------------------------------------------------------------


def _all_layers(model) -> list:
    out = []
    for layer in getattr(model, "layers", []):
        out.append(layer)
        if hasattr(layer, "layers") and layer is not model:
            out.extend(_all_layers(layer))
    return out


def _is_float_dtype(dtype) -> bool:
    return str(dtype).startswith(("float", "bfloat", "<dtype: 'float"))


def differentiability_report(model) -> dict[str, Any]:
    """Which layers block the gradient from the model's inputs to its outputs.

    Three checks:

    1. input dtypes: integer/bool/string inputs have no derivative;
    2. layer types that are not differentiable (:data:`NON_DIFFERENTIABLE_LAYERS`);
    3. a gradient on a test input (batch of 1, fixed random normal values): for every layer of
       a functional model, is its output connected to the inputs by a differentiable path? A
       layer whose output is disconnected while one of its inputs is connected has an op
       without a gradient (``argmax``, ``round``, ``cast`` to int, ``stop_gradient``, ...).

    Returns:
        ``{"differentiable": True | False | None, "problems": [str, ...], "notes": [str, ...]}``;
        ``None`` when no problem was found but the gradient check could not run (see ``notes``).
    """
    import numpy as np

    from augnet import _backend

    problems: list[str] = []
    notes: list[str] = []
    inputs = list(model.inputs)
    for t in inputs:
        if not _is_float_dtype(t.dtype):
            problems.append(
                f"input '{t.name}' has dtype {t.dtype}: integer/string inputs have no derivative"
            )
    for layer in _all_layers(model):
        why = NON_DIFFERENTIABLE_LAYERS.get(type(layer).__name__)
        if why:
            problems.append(f"layer '{layer.name}' ({type(layer).__name__}): {why}")

    float_inputs = [t for t in inputs if _is_float_dtype(t.dtype)]
    if float_inputs and len(float_inputs) == len(inputs):
        try:
            probe_tensors, owners = [], []
            for layer in model.layers:
                for node in getattr(layer, "_inbound_nodes", []):
                    for t in node.output_tensors:
                        probe_tensors.append(t)
                        owners.append((layer, node))
            import keras

            probe = keras.Model(inputs=model.inputs, outputs=probe_tensors)
            rng = np.random.default_rng(0)
            xs = [
                _backend.convert(
                    rng.standard_normal((1, *[d or 8 for d in t.shape[1:]])), str(t.dtype)
                )
                for t in inputs
            ]

            def run(xs):
                values = probe(xs if len(xs) > 1 else xs[0], training=False)
                return list(values) if isinstance(values, list | tuple) else [values]

            _, flags = _backend.connected_outputs(run, xs)  # per probe tensor: a gradient path?
            connected: dict[int, bool] = {id(t): True for t in inputs}
            for t, flag in zip(probe_tensors, flags, strict=True):
                if id(t) not in connected:
                    connected[id(t)] = flag
            reported = set()
            for (layer, node), t in zip(owners, probe_tensors, strict=True):
                if connected.get(id(t), True) or layer.name in reported:
                    continue
                if any(connected.get(id(i), False) for i in node.input_tensors):
                    reported.add(layer.name)
                    if not any(f"'{layer.name}'" in p for p in problems):
                        problems.append(
                            f"layer '{layer.name}' ({type(layer).__name__}): no gradient flows "
                            "through it (an op without a gradient, e.g. argmax, round, cast to "
                            "int or stop_gradient)"
                        )
            for t in model.outputs:
                if not connected.get(id(t), True) and not reported:
                    problems.append(
                        f"output '{t.name}' does not depend differentiably on the input"
                    )
        except Exception as exc:  # the probe is best effort; say so
            notes.append(f"gradient check skipped: {_one_line(str(exc))[:200]}")
    verdict = False if problems else (None if notes else True)
    return {"differentiable": verdict, "problems": problems, "notes": notes}


def _shape_text(shape) -> str:
    return str(tuple(None if d is None else int(d) for d in shape))


def cmd_info(args: argparse.Namespace) -> int:
    model = load_model(args.model, unsafe=args.unsafe, debug=args.debug)
    import numpy as np

    lines = [f"model: {args.model}  ({type(model).__name__} '{model.name}')"]
    lines.append("inputs:")
    for t in model.inputs:
        lines.append(f"  {t.name:<24} shape {_shape_text(t.shape):<22} dtype {t.dtype}")
    lines.append("outputs:")
    for t in model.outputs:
        history = getattr(t, "_keras_history", None)
        name = getattr(getattr(history, "operation", None), "name", None) or t.name
        n = math.prod(d for d in t.shape[1:] if d is not None) if t.shape[1:] else 1
        lines.append(
            f"  {name:<24} shape {_shape_text(t.shape):<22} dtype {t.dtype}  ({n} values per sample)"
        )
    top = list(model.layers)
    every = _all_layers(model)
    lines.append(
        f"layers: {len(top)}"
        + (f" ({len(every)} including nested)" if len(every) != len(top) else "")
    )
    trainable = int(sum(np.prod(w.shape) for w in model.trainable_weights))
    total = int(model.count_params())
    lines.append(
        f"parameters: {total:,} ({trainable:,} trainable, {total - trainable:,} non-trainable)"
    )
    report = differentiability_report(model)
    if report["differentiable"]:
        lines.append("differentiable with respect to the input: yes (every layer)")
    elif report["differentiable"] is None:
        lines.append(
            "differentiable with respect to the input: unknown (no layer of a type known to "
            "block gradients, but the gradient check could not run)"
        )
    else:
        lines.append("differentiable with respect to the input: NO")
        lines.extend(f"  - {p}" for p in report["problems"])
    lines.extend(f"note: {n}" for n in report["notes"])
    from augnet import _backend

    lines.append(f"backend: Keras on {_backend.name}; devices: {', '.join(_backend.devices())}")
    if getattr(args, "sample", None):
        lines.extend(_sensitivity_lines(model, args.sample))
    print("\n".join(lines))
    return 0


def _sensitivity_lines(model, sample: str) -> list[str]:
    """The sensitivity summary of ``augnet info --sample``: Jacobian norms at one input."""
    import numpy as np

    from augnet import _analysis, _imageio

    in_shape, _, out_shape = _single_io(model)
    items = _imageio.expand_inputs([sample], array_input_shape=in_shape)
    try:
        spec = _imageio.ImageSpec.from_input_shape(in_shape)
    except _imageio.InputFitError:
        spec = None
    x, _ = _imageio.load_batch(items[:1], in_shape, spec)
    J = model.return_jacobian(x)
    n_out = len(out_shape)
    norms = _analysis.jacobian_norms(J, output_ndim=n_out)
    radius = 0.01 * float(np.max(np.abs(x)) or 1.0)
    lipschitz = _analysis.local_lipschitz(model, x, radius=radius, n_samples=4)
    lines = [
        f"sensitivity at {items[0].path}{'' if items[0].row is None else f' (row {items[0].row})'}:",
        f"  Jacobian {tuple(J.shape[1:])}: Frobenius norm {norms.frobenius[0]:.4g}, "
        f"spectral norm {norms.spectral[0]:.4g}",
        f"  local Lipschitz estimate (lower bound, 4 points within radius {radius:.3g}): "
        f"{float(np.max(lipschitz)):.4g}",
        "  per output: index, L1 and L2 norm of its gradient",
    ]
    l1, l2 = norms.l1[0].reshape(-1), norms.l2[0].reshape(-1)
    for k in range(min(len(l1), 20)):
        lines.append(f"    {k:>4}  L1 {l1[k]:.4g}  L2 {l2[k]:.4g}")
    if len(l1) > 20:
        lines.append(f"    ... {len(l1) - 20} more outputs")
    return lines


# --------------------------------------------------------------------------------------------
# augnet jacobian
# --------------------------------------------------------------------------------------------


def _single_io(model) -> tuple[tuple, str, tuple]:
    inputs, outputs = list(model.inputs), list(model.outputs)
    if len(inputs) != 1 or len(outputs) != 1:
        raise UsageError(
            f"the model has {len(inputs)} inputs and {len(outputs)} outputs; the command line "
            "handles models with one input and one output (use augnet.jacobian in Python)"
        )
    in_shape = tuple(None if d is None else int(d) for d in inputs[0].shape[1:])
    out_shape = tuple(None if d is None else int(d) for d in outputs[0].shape[1:])
    if not _is_float_dtype(inputs[0].dtype):
        raise UsageError(
            f"the model's input has dtype {inputs[0].dtype}; integer inputs have no derivative "
            "(see 'augnet info')"
        )
    if any(d is None for d in out_shape):
        raise UsageError(
            f"the model's output shape {_shape_text(('batch',) + out_shape)} is not fixed; the "
            "command line needs a known number of outputs"
        )
    return in_shape, str(inputs[0].dtype), out_shape


def _selection(args, n_outputs: int) -> tuple[list[int] | None, int | None]:
    outputs, top_k = args.outputs, args.top_k
    if outputs is None and top_k is None:
        if n_outputs <= ALL_OUTPUTS_UP_TO:
            outputs = list(range(n_outputs))
        else:
            top_k = DEFAULT_TOP_K
    if outputs is not None:
        bad = [i for i in outputs if i >= n_outputs]
        if bad:
            raise UsageError(
                f"output index {bad[0]} is out of range: the model has {n_outputs} outputs "
                f"(valid indices 0..{n_outputs - 1})"
            )
    if top_k is not None and top_k > n_outputs:
        raise UsageError(f"--top-k {top_k} is larger than the model's {n_outputs} outputs")
    return outputs, top_k


def summarize(
    key: str, name: str, outputs, predictions, jacobian, files: Sequence[str]
) -> dict[str, Any]:
    """One line of summary.jsonl for one input.

    Args:
        key: the input (its path, plus ``[row]`` for a row of a ``.npy`` array).
        name: its output folder's name.
        outputs: ``(k,)`` the selected output indices.
        predictions: ``(k,)`` the model's values for those outputs.
        jacobian: ``(k, *input_shape)``.
        files: the files written for it, relative to the output folder.

    Returns:
        ``{"input", "name", "outputs", "predictions", "jacobian_l2", "jacobian_max_abs",
        "top_inputs", "files"}``: per output, the Jacobian's L2 (Frobenius) norm and largest
        ``|J|``, and the ``TOP_INPUTS`` input elements with the largest ``|J|`` as
        ``{"index": [row, col, channel], "value": signed J}``, largest first.
    """
    import numpy as np

    j = np.asarray(jacobian, dtype=np.float64)
    flat = j.reshape(len(j), -1)
    mag = np.abs(flat)
    n = min(TOP_INPUTS, flat.shape[1])
    # largest |J| first, ties by position: deterministic
    top = np.argsort(-mag, axis=1, kind="stable")[:, :n] if n else np.zeros((len(j), 0), int)
    shape = j.shape[1:]
    return {
        "input": key,
        "name": name,
        "outputs": [int(o) for o in outputs],
        "predictions": [float(p) for p in predictions],
        "jacobian_l2": np.sqrt(np.sum(flat * flat, axis=1)).tolist(),
        "jacobian_max_abs": (mag.max(axis=1) if n else np.zeros(len(j))).tolist(),
        "top_inputs": [
            [
                {"index": [int(v) for v in np.unravel_index(i, shape)], "value": float(row[i])}
                for i in order
            ]
            for row, order in zip(flat, top, strict=True)
        ],
        "files": list(files),
    }


def _upscale(rgb, side: int):
    import numpy as np

    factor = max(1, math.ceil(side / max(rgb.shape[:2])))
    if factor > 1:
        rgb = np.repeat(np.repeat(rgb, factor, axis=0), factor, axis=1)
    return rgb


def resolve_strategy(model, x, *, outputs, top_k, max_memory) -> str:
    """The strategy ``strategy="auto"`` picks for batch ``x`` (by rule, or by timing the candidates).

    The engine's choice can depend on timings, and strategies differ in the last bits of the
    result; the command line therefore resolves it once, on the first batch, and passes it
    explicitly to every batch of the run and of its ``--resume``.
    """
    from augnet import _engine

    return _engine.resolve_strategy(
        model, x, outputs=outputs, top_k=top_k, strategy="auto", max_memory=max_memory
    )


class Job:
    """A ``jacobian`` run: the settings, the model, the inputs; :meth:`run` does the work.

    Split out of :func:`cmd_jacobian` so that tests (and ``demo``) can drive it in-process.
    """

    def __init__(self, args: argparse.Namespace, *, model=None):
        self.args = args
        self.model = model
        self.strategy = None if args.strategy == "auto" else args.strategy

    # -- setup -----------------------------------------------------------------------------

    def prepare(self) -> None:
        from augnet import _imageio, _store

        a = self.args
        self.out = Path(a.out)
        self.formats = tuple(a.format)
        store = _store.RunStore(self.out)
        # Cheap checks first, before TensorFlow is imported.
        if store.out_dir.is_dir() and store.has_results() and not (a.resume or a.overwrite):
            raise UsageError(
                f"'{self.out}' already holds results; pass --resume to continue that run or "
                "--overwrite to replace it"
            )
        # every input exists, checked before loading the model (and TensorFlow)
        items = _imageio.expand_inputs(a.inputs, reserved=_store.RESERVED_NAMES)
        if self.model is None:
            self.model = load_model(a.model, unsafe=getattr(a, "unsafe", False), debug=a.debug)
        in_shape, in_dtype, out_shape = _single_io(self.model)
        self.in_shape, self.in_dtype = in_shape, in_dtype
        self.n_outputs = math.prod(out_shape) if out_shape else 1
        self.outputs, self.top_k = _selection(a, self.n_outputs)
        self.k = len(self.outputs) if self.outputs is not None else self.top_k
        self.digits = max(2, len(str(self.n_outputs - 1)))

        if any(it.is_array for it in items):  # a .npy of exactly input_shape is one sample
            items = _imageio.expand_inputs(
                a.inputs, array_input_shape=in_shape, reserved=_store.RESERVED_NAMES
            )
        self.items = items
        try:
            self.spec = _imageio.ImageSpec.from_input_shape(
                in_shape, size=a.size, preprocess=a.preprocess, resize=a.resize, crop=a.crop
            )
        except _imageio.InputFitError:
            if any(not it.is_array for it in self.items):
                raise
            self.spec = None
        if self.spec is not None:
            self.in_shape = tuple(
                s if s is not None else d
                for s, d in zip(in_shape, self.spec.input_shape, strict=True)
            )
        if "png" in self.formats:
            if len(self.in_shape) not in (2, 3):
                raise UsageError(
                    f"saliency pictures need an image-shaped input (height, width[, channels]), "
                    f"but the model takes {_shape_text(('batch',) + self.in_shape)}; use --format npy"
                )
            if a.contact_sheet and self.k > 100:
                raise UsageError(
                    f"a contact sheet shows at most 100 outputs, {self.k} are selected; select "
                    "fewer with --outputs/--top-k, or pass --no-contact-sheet"
                )
        self.store = store
        self.settings = self._settings()
        self.done = store.prepare(
            self.settings,
            resume=a.resume,
            overwrite=a.overwrite,
            planned_paths=[self.out / it.name for it in self.items]
            if "png" in self.formats
            else (),
        )

    def _settings(self) -> dict[str, Any]:
        a = self.args
        model_path = Path(a.model) if a.model else None
        model = None
        if model_path is not None and model_path.exists():
            st = model_path.stat()
            model = {
                "path": str(model_path.resolve()),
                "size": st.st_size,
                "mtime_ns": st.st_mtime_ns,
            }
        return {
            "model": model,
            "outputs": self.outputs,
            "top_k": self.top_k,
            "input_shape": list(self.in_shape),
            "preprocess": a.preprocess,
            "resize": a.resize,
            "crop": a.crop,
            "size": list(a.size) if a.size else None,
            "format": list(self.formats),
            "contact_sheet": bool(a.contact_sheet),
            "mode": a.mode,
            "cmap": a.cmap,
            "percentile": a.percentile,
            "reduce": a.reduce,
            "overlay": bool(a.overlay),
            "alpha": a.alpha,
            "batch_size": a.batch_size,
            "max_memory": a.max_memory,
            "strategy": a.strategy,
        }

    # -- work ------------------------------------------------------------------------------

    def compute(self, x):
        """Predictions ``(b, n_outputs)``, selected output indices ``(b, k)`` and the Jacobian
        ``(b, k, *input_shape)`` (float32) of one batch."""
        import numpy as np

        import augnet

        a = self.args
        if self.strategy is None:
            self.strategy = self.store.resolved.get("strategy") or resolve_strategy(
                self.model, x, outputs=self.outputs, top_k=self.top_k, max_memory=a.max_memory
            )
            self.store.resolved["strategy"] = self.strategy
        from augnet import _backend

        preds = _backend.to_numpy(self.model(x, training=False)).reshape(len(x), -1)
        result = augnet.jacobian(
            self.model,
            x,
            outputs=self.outputs,
            top_k=self.top_k,
            max_memory=a.max_memory,
            strategy=self.strategy,
        )
        if self.top_k is not None:
            jac, idx = result.jacobian, np.asarray(result.indices)
        else:
            jac = result
            idx = np.broadcast_to(np.asarray(self.outputs, dtype=np.int64), (len(x), self.k))
        jac = np.asarray(jac, dtype=np.float32).reshape(len(x), self.k, *x.shape[1:])
        return preds, idx, jac

    def _write_pictures(self, batch, item, display, jac, idx, preds) -> list[str]:
        import augnet._render as render
        from augnet import _store

        a = self.args
        folder = self.out / item.name
        _store.remove_temp_files(folder)  # left by a process killed while writing here
        files: list[str] = []
        for j, k in enumerate(idx):
            rgb = render.render_saliency(
                jac[j],
                mode=a.mode,
                cmap=a.cmap,
                percentile=a.percentile,
                reduce=a.reduce,
                image=display if a.overlay else None,
                alpha=a.alpha,
            )
            path = folder / f"output_{int(k):0{self.digits}d}.png"
            batch.save_png(path, _upscale(rgb, render.AUTO_UPSCALE_MIN_SIDE))
            files.append(path.relative_to(self.out).as_posix())
        if a.contact_sheet:
            from augnet import _report

            path = batch.adopt(folder / CONTACT_SHEET)  # written atomically by _report
            _report.contact_sheet(
                path,
                image=display,
                jacobian=jac,
                output_indices=[int(k) for k in idx],
                predictions=[float(p) for p in preds],
                mode=a.mode,
                cmap=a.cmap,
                percentile=a.percentile,
                reduce=a.reduce,
                title=item.name,
                overwrite=True,
            )
            files.append(path.relative_to(self.out).as_posix())
        return files

    def batches(self, todo) -> Iterator[tuple[list, Any, list]]:
        """Read the inputs lazily, ``batch_size`` at a time."""
        from augnet import _imageio

        size = self.args.batch_size
        for start in range(0, len(todo), size):
            chunk = todo[start : start + size]
            x, displays = _imageio.load_batch(chunk, self.in_shape, self.spec)
            yield chunk, x, displays

    def run(self) -> dict[str, Any]:
        from augnet import _store
        from augnet._progress import Progress

        a = self.args
        todo, fps = [], {}
        for it in self.items:
            fp = _store.fingerprint(it.path, it.row)
            if self.store.is_done(it.key, fp):
                continue
            fps[it.key] = fp
            todo.append(it)
        skipped = len(self.items) - len(todo)
        self.finished = 0
        started = time.monotonic()
        with Progress(len(todo), enabled=not a.quiet, skipped=skipped) as bar:
            for chunk, x, displays in self.batches(todo):
                preds, idx, jac = self.compute(x)
                with self.store.batch() as batch:
                    entries = []
                    for i, it in enumerate(chunk):
                        sel_preds = preds[i][idx[i]]
                        files = []
                        if "png" in self.formats:
                            files = self._write_pictures(
                                batch, it, displays[i], jac[i], idx[i], sel_preds
                            )
                        entries.append(
                            {
                                **fps[it.key],
                                "key": it.key,
                                "name": it.name,
                                "outputs": [int(v) for v in idx[i]],
                                "files": files,
                                "summary": summarize(
                                    it.key, it.name, idx[i], sel_preds, jac[i], files
                                ),
                            }
                        )
                    batch.commit(entries, jacobian=jac if "npy" in self.formats else None)
                self.finished += len(chunk)
                bar.update(len(chunk))
        self.store.write_summary([it.key for it in self.items])
        return {
            "inputs": len(self.items),
            "computed": len(todo),
            "skipped": skipped,
            "seconds": time.monotonic() - started,
        }


def _namespace_defaults(**overrides) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(["jacobian", "MODEL", "INPUT"])
    for k, v in overrides.items():
        setattr(args, k, v)
    return args


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """``kill PID`` (SIGTERM) stops a run like Ctrl-C: the current batch is cleaned up."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run_job(args: argparse.Namespace, *, model=None) -> int:
    job = Job(args, model=model)
    job.prepare()
    try:
        with _sigterm_as_interrupt():
            stats = job.run()
    except BaseException as exc:
        if job.store.has_results():
            with contextlib.suppress(Exception):
                job.store.write_summary([it.key for it in job.items])
        else:
            job.store.remove_if_empty()
        if isinstance(exc, KeyboardInterrupt):
            print(
                f"{PROG}: interrupted; {job.finished} input(s) finished in this run are kept in "
                f"'{job.out}'; continue with --resume",
                file=sys.stderr,
            )
            return EXIT_INTERRUPTED
        if (
            isinstance(exc, UsageError | ValueError | TypeError | OSError)
            and job.store.has_results()
            and not (isinstance(exc, OSError) and exc.errno == errno.ENOSPC)
            and not args.debug
        ):
            raise UsageError(
                f"{describe_error(exc)} (finished inputs are kept in '{job.out}'; "
                "fix the problem and run again with --resume)"
            ) from None
        raise
    if not args.quiet:
        what = []
        if "png" in job.formats:
            what.append(f"pictures in {job.out}/<input>/")
        if "npy" in job.formats:
            what.append(f"raw Jacobians in {job.store.shard_dir}/")
        skipped = f", {stats['skipped']} already done" if stats["skipped"] else ""
        print(
            f"{PROG}: {stats['computed']} input(s) computed{skipped} in {stats['seconds']:.1f} s; "
            f"{'; '.join(what)}; summary {job.store.summary_file}"
        )
    return 0


def cmd_jacobian(args: argparse.Namespace) -> int:
    return _run_job(args)


# --------------------------------------------------------------------------------------------
# augnet demo
# --------------------------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    from augnet import _demo

    model_path = _demo.demo_model_path()
    if not model_path.exists():
        raise UsageError(f"the demo model is missing at '{model_path}' (a broken install?)")
    try:
        sample = _demo.sample_image_path()
    except FileNotFoundError as exc:
        raise UsageError(_one_line(str(exc))) from None
    job_args = _namespace_defaults(**vars(args))
    job_args.model = str(model_path)
    job_args.inputs = [str(sample.parent)]
    job_args.unsafe = False
    # As augnet._demo.load_image does: grayscale, centre-cropped to a square, Lanczos, [0, 1].
    job_args.crop, job_args.resize, job_args.preprocess = "center", "lanczos", "unit"
    job_args.outputs, job_args.top_k, job_args.size = None, None, None
    if not (job_args.resume or job_args.overwrite) and _is_demo_run(Path(job_args.out), model_path):
        # The demo regenerates its own results (the committed jacobian_results/ included); the
        # store then deletes only the files that earlier demo run listed. Anything else in --out
        # is still refused without --overwrite.
        job_args.overwrite = True
    return _run_job(job_args)


def _is_demo_run(out: Path, model_path: Path) -> bool:
    """True if ``out`` holds the results of an earlier ``augnet demo`` run (by its run.json)."""
    import json

    from augnet import _store

    try:
        settings = json.loads((out / _store.RUN_FILE).read_text(encoding="utf-8"))["settings"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    model = settings.get("model")
    path = model.get("path", "") if isinstance(model, dict) else str(model or "")
    return Path(path).name == model_path.name


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``augnet`` command; returns the exit code (0, 2 for user errors, 130 on Ctrl-C).

    Example:
        >>> main(["info", "model.keras"])  # doctest: +SKIP
        0
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return EXIT_USAGE
    if args.debug:
        logging.basicConfig(level=logging.DEBUG, format=f"{PROG}: %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (UsageError, ValueError, TypeError, OSError) as exc:
        if args.debug:
            raise
        _report(describe_error(exc))
        return EXIT_USAGE
