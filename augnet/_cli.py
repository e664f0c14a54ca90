"""The ``augnet`` command line: saliency for one image or a whole data set.

::

    augnet demo                                   # the bundled model on sample_input/
    augnet info MODEL                             # inputs, outputs, parameters, differentiability
    augnet jacobian MODEL INPUT... --out DIR      # images, folders, globs or .npy arrays

``augnet --help`` answers without importing TensorFlow, Keras or matplotlib: they are imported
inside the command functions. User errors (a missing model, a corrupt image, an output index out
of range, a folder that cannot be written, a full disk, ...) print one line,
``augnet: error: ...``, on stderr and exit with code 2; ``--debug`` shows the traceback instead.
Argument errors are one line too, with a pointer to ``--help``. Ctrl-C exits with code 130 and
``kill`` (SIGTERM) with 143, both keeping every finished batch (continue with ``--resume``).

This module only parses arguments and reports; the data-set run is ``augnet/_runner.py``, the
output folder's layout, ownership and resume ``augnet/_store.py``, how images become model
inputs ``augnet/_imageio.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import math
import os
import signal
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

PROG = "augnet"
DEFAULT_OUT = "jacobian_results"
DEFAULT_BATCH_SIZE = 32
ALL_OUTPUTS_UP_TO = 16  # models with more outputs default to --top-k DEFAULT_TOP_K (as _runner)
DEFAULT_TOP_K = 5
FORMATS = ("png", "npy")
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_SIGTERM = 143

logger = logging.getLogger(__name__)


class UsageError(Exception):
    """A user error: reported as one line on stderr, exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors as ONE line (and a pointer to ``--help``), exit code 2."""

    def error(self, message: str):
        command = self.prog if self.prog.startswith(PROG) else PROG
        self.exit(EXIT_USAGE, f"{PROG}: error: {_one_line(message)}; see '{command} --help'\n")


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
    common = _Parser(add_help=False)
    common.add_argument(
        "--debug",
        action="store_true",
        help="show tracebacks and TensorFlow's log messages instead of one-line errors",
    )
    common.add_argument(
        "--backend",
        choices=BACKENDS,
        default=argparse.SUPPRESS,  # (absent: KERAS_BACKEND, else Keras's own setting)
        help="the Keras backend to run on (default: $KERAS_BACKEND, else ~/.keras/keras.json's, "
        "else tensorflow)",
    )
    return common


BACKENDS = ("tensorflow", "jax", "torch")
_EXTRAS = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}


def select_backend(name: str) -> None:
    """``--backend NAME``: sets ``KERAS_BACKEND`` before Keras is imported (it reads it once).

    Raises:
        UsageError: the backend's framework is not installed, or Keras already runs on another
            backend in this process (``main`` called from a program that imported it).
    """
    import importlib.util

    keras_module = sys.modules.get("keras")
    if keras_module is not None:
        current = keras_module.backend.backend()
        if current != name:
            raise UsageError(
                f"--backend {name}: Keras already runs on {current!r} in this process (it "
                "chooses its backend once, when first imported); run augnet in a new process, "
                f"or set KERAS_BACKEND={name} before importing Keras"
            )
        return
    if importlib.util.find_spec(_EXTRAS[name]) is None:
        extra = "" if name == "tensorflow" else f' (python -m pip install -e ".[{name}]")'
        raise UsageError(f"--backend {name}: {_EXTRAS[name]} is not installed{extra}")
    os.environ["KERAS_BACKEND"] = name


def _job_parser() -> argparse.ArgumentParser:
    """Options shared by `jacobian` and `demo`: what to write and how."""
    p = _Parser(add_help=False)
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
        help="blend each map over the input image (per-output PNGs and contact sheet)",
    )
    g.add_argument(
        "--per-map-scale",
        dest="scale",
        action="store_const",
        const="per-map",
        default="shared",
        help="scale each map by its own --percentile of |J| (default: all maps of an input on "
        "one scale, the contact sheet's, so that colours compare between outputs); each PNG's "
        "colour bar gives its scale in real units either way",
    )
    g.add_argument(
        "--no-colorbar",
        dest="colorbar",
        action="store_false",
        help="per-output PNGs without the colour bar under the map (the bare map)",
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
    p = _Parser(add_help=False)
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


def _logits_parser() -> argparse.ArgumentParser:
    """``--logits`` (``jacobian`` and ``info --sample``): what is differentiated."""
    p = _Parser(add_help=False)
    g = p.add_argument_group("what is differentiated")
    g.add_argument(
        "--logits",
        action="store_true",
        help="the Jacobian of the scores before the model's final softmax or sigmoid (its "
        "logits) instead of the probabilities, whose derivative vanishes where the model is sure; "
        "the model file is not changed",
    )
    return p


def _model_parser() -> argparse.ArgumentParser:
    p = _Parser(add_help=False)
    p.add_argument(
        "--unsafe",
        action="store_true",
        help="allow code in the model: Lambda layers (Keras safe_mode=False) and SavedModel "
        "folders, whose TensorFlow graph can do anything; only for models you trust",
    )
    return p


def _ray_address(text: str) -> str:
    from augnet._ray_run import parse_address  # standard library only at import

    try:
        return parse_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a positive number, received {text!r}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a number >= 0, received {text!r}")
    return value


def _ray_parser() -> argparse.ArgumentParser:
    """Options of `jacobian` for the distributed run on a Ray cluster (augnet/_ray_run.py)."""
    p = _Parser(add_help=False)
    g = p.add_argument_group(
        "on a Ray cluster",
        "Spread the batches over Ray workers, each loading the model once; this process plans, "
        'and writes the same files as the one-process run (pip install "augnet[ray]"). '
        "Workers need augnet installed, not the inputs' or the output folder's file system.",
    )
    g.add_argument(
        "--ray",
        nargs="?",
        const="local",
        default=None,
        type=_ray_address,
        metavar="ADDRESS",
        help="run on the Ray cluster at ADDRESS (HOST:PORT of its head, or auto); --ray alone "
        "starts a local cluster on 127.0.0.1 for the run. Write it after the inputs",
    )
    g.add_argument(
        "--workers",
        type=_positive_int,
        default=None,
        metavar="N",
        help="number of workers (default: as many as the cluster's CPUs allow; locally, one per "
        "core)",
    )
    g.add_argument(
        "--worker-cpus",
        type=_positive_float,
        default=None,
        metavar="CPUS",
        help="CPUs per worker, Ray's num_cpus; also its framework threads (default 1)",
    )
    g.add_argument(
        "--worker-gpus",
        type=_non_negative_float,
        default=None,
        metavar="GPUS",
        help="GPUs per worker, Ray's num_gpus (default 0)",
    )
    return p


def build_parser() -> argparse.ArgumentParser:
    """The ``augnet`` argument parser (standard library only)."""
    common = _common_parser()
    parser = _Parser(
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
        parents=[common, _model_parser(), _logits_parser()],
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

    from augnet import _cli_attribution  # attribution methods: --method, compare, evaluate

    jac = sub.add_parser(
        "jacobian",
        parents=[common, _model_parser(), _input_parser(), _job_parser(), _logits_parser()]
        + [_ray_parser(), _cli_attribution.method_parser()],
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
    parser.commands = {"demo": demo, "info": info, "jacobian": jac}
    parser.commands.update(
        _cli_attribution.add_commands(
            sub,
            common=common,
            model=_model_parser(),
            inputs=_input_parser(),
            quiet=_cli_attribution.running_parser(),
        )
    )
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

            if keras.backend.backend() == "tensorflow":  # (on JAX it is not needed: ~5 s, 500 MB)
                import tensorflow as tf

                tf.config.list_physical_devices()
        if not debug:
            # TensorFlow's Python deprecation notices are for developers, not for command users.
            logging.getLogger("tensorflow").setLevel(logging.ERROR)
    import augnet

    return augnet


def load_model(path: str, *, unsafe: bool = False, debug: bool = False):
    """Load a model for the command line, turning every failure into a :class:`UsageError`.

    The path is checked before TensorFlow is imported: it must exist and be a regular file or a
    folder (a FIFO would hang the reader, a link to a device would be read without end).
    """
    from augnet import _safeio

    p = Path(path)
    if not p.exists():
        raise UsageError(f"model file '{path}' does not exist")
    try:
        _safeio.check_model_path(p)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
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
        if ("safe_mode" in text or "unsafe" in text.lower()) and "--unsafe" not in text:
            hint = " (pass --unsafe only if you trust this file)"
        if len(text) > 400:
            text = text[:397] + "..."
        if not text.lower().startswith("cannot load"):
            text = f"cannot load model '{path}': {text}"
        raise UsageError(f"{text}{hint}") from None


# --------------------------------------------------------------------------------------------
# augnet info (the work is in augnet._info)
# --------------------------------------------------------------------------------------------


def cmd_info(args: argparse.Namespace) -> int:
    """``augnet info``: the model's description, then (``--sample``) its sensitivity there."""
    from augnet import _info

    logits = bool(getattr(args, "logits", False))
    if logits and not getattr(args, "sample", None):
        raise UsageError("--logits applies to the sensitivity at an input: pass --sample INPUT")
    model = load_model(args.model, unsafe=args.unsafe, debug=args.debug)
    print("\n".join(_info.describe(model, args.model)), flush=True)
    if getattr(args, "sample", None):
        print("\n".join(_info.sensitivity_lines(model, args.sample, logits=logits)))
    return 0


# --------------------------------------------------------------------------------------------
# augnet jacobian (the run itself lives in augnet._runner)
# --------------------------------------------------------------------------------------------


def run_options(args: argparse.Namespace, *, command: str = "jacobian"):
    """The parsed arguments of ``jacobian``/``demo`` as :class:`augnet._runner.RunOptions`."""
    from augnet import _runner

    return _runner.RunOptions(
        model=args.model,
        inputs=tuple(str(i) for i in args.inputs),
        out=str(args.out),
        outputs=tuple(args.outputs) if args.outputs is not None else None,
        top_k=args.top_k,
        formats=tuple(args.format),
        contact_sheet=bool(args.contact_sheet),
        mode=args.mode,
        cmap=args.cmap,
        percentile=args.percentile,
        reduce=args.reduce,
        overlay=bool(args.overlay),
        alpha=args.alpha,
        scale=args.scale,
        colorbar=bool(args.colorbar),
        preprocess=args.preprocess,
        resize=args.resize,
        crop=args.crop,
        size=tuple(args.size) if args.size else None,
        batch_size=args.batch_size,
        max_memory=args.max_memory,
        strategy=args.strategy,
        resume=bool(args.resume),
        overwrite=bool(args.overwrite),
        unsafe=bool(getattr(args, "unsafe", False)),
        command=command,
        command_line=" ".join([PROG, *(sys.argv[1:] if sys.argv else [])])[:300],
        logits=bool(getattr(args, "logits", False)),
    )


def _run(args: argparse.Namespace, options, schedule=None) -> int:
    """Plan and run, and report the outcome (one line for an error or an interruption).

    ``schedule(plan, model, quiet=...) -> RunStats``: the scheduler (default: this process,
    ``augnet._runner.run_plan``; ``--ray``: ``augnet._ray_run.run_plan``)."""
    from augnet import _runner

    def load(opts):
        return load_model(opts.model, unsafe=opts.unsafe, debug=args.debug)

    plan, model = _runner.plan_run(options, load=load)
    if args.debug:
        logger.debug("plan: %d inputs, %d batches to do", len(plan.items), len(plan.todo))
    try:
        stats = (schedule or _runner.run_plan)(plan, model, quiet=args.quiet)
    except BaseException as exc:
        finished = plan.stats.computed + plan.stats.skipped
        if (
            isinstance(exc, UsageError | ValueError | TypeError | OSError)
            and finished
            and not (isinstance(exc, OSError) and exc.errno == errno.ENOSPC)
            and not args.debug
        ):
            raise UsageError(
                f"{describe_error(exc)} (finished inputs are kept in '{plan.out}'; "
                "fix the problem and run again with --resume)"
            ) from None
        raise
    if stats.interrupted is not None:
        print(f"{PROG}: {_interrupted_text(plan, stats)}", file=sys.stderr)
        return EXIT_SIGTERM if stats.interrupted == signal.SIGTERM else EXIT_INTERRUPTED
    if not args.quiet:
        what = []
        if "png" in options.formats:
            what.append(f"pictures in {plan.out}/<input>/")
        if "npy" in options.formats:
            what.append(f"raw Jacobians in {plan.store.shard_dir}/")
        skipped = f", {stats.skipped} already done" if stats.skipped else ""
        print(
            f"{PROG}: {stats.computed} input(s) computed{skipped} in {stats.seconds:.1f} s; "
            f"{'; '.join(what)}; summary {plan.store.summary_file}"
        )
    return 0


def _interrupted_text(plan, stats) -> str:
    name = "terminated" if stats.interrupted == signal.SIGTERM else "interrupted"
    if stats.computed == 0 and stats.skipped == 0:
        if stats.folder_removed or not plan.store.committed:
            return f"{name} before the first batch finished; nothing was written"
    if stats.computed == 0:
        return (
            f"{name}; no input finished in this run; the {stats.skipped} finished before are "
            f"kept in '{plan.out}'; continue with --resume"
        )
    return (
        f"{name}; {stats.computed} input(s) finished in this run are kept in '{plan.out}'; "
        "continue with --resume"
    )


def cmd_jacobian(args: argparse.Namespace) -> int:
    if getattr(args, "ray", None) is not None:
        return _run_on_ray(args)
    for name in ("workers", "worker_cpus", "worker_gpus"):
        if getattr(args, name, None) is not None:
            raise UsageError(f"--{name.replace('_', '-')} needs --ray (a run on a Ray cluster)")
    from augnet import _cli_attribution

    return _run(args, _cli_attribution.with_method(args, run_options(args)))


def _run_on_ray(args: argparse.Namespace) -> int:
    """``augnet jacobian ... --ray [ADDRESS]``: the cluster is checked before anything else
    (Ray installed, the address reachable), then the run is planned here and its batches
    computed by the cluster's workers (augnet/_ray_run.py)."""
    import functools

    from augnet import _ray_run

    cluster = _ray_run.Cluster(
        address=None if args.ray == _ray_run.LOCAL else args.ray,
        workers=args.workers,
        worker_cpus=args.worker_cpus if args.worker_cpus is not None else 1.0,
        worker_gpus=args.worker_gpus if args.worker_gpus is not None else 0.0,
    )
    _ray_run.check_cluster(cluster)
    from augnet import _cli_attribution

    schedule = functools.partial(_ray_run.run_plan, cluster=cluster, debug=args.debug)
    return _run(args, _cli_attribution.with_method(args, run_options(args)), schedule=schedule)


# --------------------------------------------------------------------------------------------
# augnet demo
# --------------------------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    """The main job on the bundled model and sample image (see docs/cli.md)."""
    from augnet import _demo, _store

    model_path = _demo.demo_model_path()
    if not model_path.exists():
        raise UsageError(f"the demo model is missing at '{model_path}' (a broken install?)")
    try:
        sample = _demo.sample_image_path()
    except FileNotFoundError as exc:
        raise UsageError(_one_line(str(exc))) from None
    args.model = str(model_path)
    args.inputs = [str(sample.parent)]
    args.unsafe = False
    # As augnet._demo.load_image does: grayscale, centre-cropped to a square, Lanczos, [0, 1].
    args.crop, args.resize, args.preprocess = "center", "lanczos", "unit"
    args.outputs, args.top_k, args.size = None, None, None
    if not (args.resume or args.overwrite):
        header = _store.read_run_header(args.out)
        if header is not None and header.get("command") == "demo":
            # The demo regenerates its own results (the committed jacobian_results/ included):
            # run.json says an earlier `augnet demo` wrote them, and the store deletes only the
            # files that run provably wrote. Anything else in --out is refused as usual.
            args.overwrite = True
    return _run(args, run_options(args, command="demo"))


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
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:  # reported by the command's parser, which points to its own --help
            command = parser.commands.get(getattr(args, "command", None), parser)
            command.error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as exc:  # --help, --version, or an argument error (one line, printed)
        return int(exc.code or 0)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return EXIT_USAGE
    if args.debug:
        logging.basicConfig(level=logging.DEBUG, format=f"{PROG}: %(name)s: %(message)s")
    handler = None if args.debug else _warnings_once()
    try:
        if getattr(args, "backend", None):
            select_backend(args.backend)
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
    finally:
        if handler is not None:
            logging.getLogger("augnet").removeHandler(handler)


class _Once(logging.Filter):
    """Lets each distinct message through once (a warning per batch becomes one per run)."""

    def __init__(self):
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if text in self.seen:
            return False
        self.seen.add(text)
        return True


def _warnings_once() -> logging.Handler:
    """The library's warnings on stderr as ``augnet: warning: ...``, each once per command."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter(f"{PROG}: warning: %(message)s"))
    handler.addFilter(_Once())
    log = logging.getLogger("augnet")
    log.addHandler(handler)
    return handler
