"""Checks on the values a caller hands the engine, and the warning for an all-zero Jacobian.

- :func:`check_x_kind`: ``x`` (or a tangent/cotangent) is an array or a list/tuple/dict of arrays,
  not a data set, a generator, a ragged or sparse tensor, ``None`` or a Python number; each gets
  an error saying what to pass instead.
- :func:`check_real`: complex inputs, tangents and cotangents are refused (the model is real:
  converting would silently drop the imaginary part).
- :func:`check_finite`: a non-finite input (``inf``/``nan``) is refused with the sample's index.
  The Jacobian there is undefined, and the strategies disagree on it (reverse mode gave finite
  numbers, forward mode NaN, for one ``+inf`` pixel): one behaviour for all strategies.
  Two reductions over the input (``min``/``max``: NaN and infinities propagate into them), about
  a tenth of a millisecond per megabyte, and nothing is allocated.
- :func:`all_zero_samples` / :func:`warn_all_zero`: a sample whose whole Jacobian is exactly zero
  gets a :class:`ZeroJacobianWarning` pointing to ``logits=True`` and to the input's range (a
  saturated softmax gives exactly 0.0 in float32).

Pure NumPy on the arrays (``B.numpy_view`` for tensors): no framework.
"""

from __future__ import annotations

import types
import warnings

import numpy as np

from augnet import _backend as B
from augnet._errors import format_shape


class ZeroJacobianWarning(UserWarning):
    """A sample's whole Jacobian is exactly zero (see ``augnet.jacobian``'s ``logits``)."""


# --------------------------------------------------------------------------------------------------
# What x is
# --------------------------------------------------------------------------------------------------


def _type_name(value) -> str:
    t = type(value)
    module = t.__module__.split(".")[0]
    return t.__name__ if module == "builtins" else f"{module}.{t.__name__}"


def _stream_kind(value) -> str | None:
    """A description of ``value`` if it is a stream of batches (a data set, a generator, an
    iterator, a data loader), else ``None``."""
    t = type(value)
    module, name = t.__module__, t.__name__
    if module.startswith("tensorflow") and "Dataset" in name:
        return "a tf.data.Dataset"
    if isinstance(value, types.GeneratorType):
        return "a generator"
    if module.startswith("torch") and "DataLoader" in name:
        return "a torch DataLoader"
    if any(c.__name__ == "PyDataset" for c in t.__mro__):
        return "a keras.utils.PyDataset"
    if hasattr(value, "__next__"):
        return f"an iterator ({_type_name(value)})"
    if hasattr(value, "__iter__") and not hasattr(value, "__len__"):
        return f"an iterable ({_type_name(value)})"
    if isinstance(value, set | frozenset):
        return f"a {t.__name__}"
    return None


def check_x_kind(value, argument: str = "x", expected: str = "(batch, *input_shape)") -> None:
    """Refuses what cannot be one batch of arrays, saying what to pass instead.

    Raises:
        TypeError: ``None``, a Python number or bool, a data set / generator / iterator, a ragged
            or sparse tensor, an array of Python objects.
    """
    if value is None:
        raise TypeError(
            f"`{argument}` is None; expected a NumPy array or tensor of shape {expected}, batch "
            "axis first (or a list/dict of them for several inputs)."
        )
    if isinstance(value, bool | int | float | complex) and not isinstance(value, np.generic):
        raise TypeError(
            f"`{argument}` is a Python {type(value).__name__} ({value!r}), not an array; expected "
            f"a NumPy array or tensor of shape {expected}, batch axis first. Wrap the values in "
            f"an array with a batch axis, e.g. np.array([[{value!r}]]) for one sample holding "
            "one value."
        )
    t = type(value)
    if "Ragged" in t.__name__:
        raise TypeError(
            f"`{argument}` is a ragged tensor ({_type_name(value)}): its samples have different "
            f"shapes, but a batch must be rectangular, {expected}. Pad it (x.to_tensor()) or "
            "resize the samples to one shape, or compute them one at a time."
        )
    if "Sparse" in t.__name__ or "sparse" in t.__module__ or hasattr(value, "toarray"):
        raise TypeError(
            f"`{argument}` is a sparse array ({_type_name(value)}); augnet differentiates dense "
            f"arrays of shape {expected}. Convert it first: tf.sparse.to_dense(x), x.toarray() "
            "or x.to_dense()."
        )
    if isinstance(value, list | tuple | dict | str | bytes) or hasattr(value, "shape"):
        if isinstance(value, np.ndarray) and value.dtype == object:
            shapes = sorted({np.shape(v) for v in value.ravel()[:64]}, key=str)
            hint = (
                f" of different shapes {', '.join(format_shape(s) for s in shapes[:4])}"
                if len(shapes) > 1
                else ""
            )
            raise TypeError(
                f"`{argument}` is a NumPy array of Python objects (shape "
                f"{format_shape(value.shape)}), e.g. samples{hint}; expected a numeric array of "
                f"shape {expected}. Stack samples of one shape with np.stack(list_of_samples)."
            )
        return
    if hasattr(value, "__array__") or hasattr(value, "__array_interface__"):
        return  # converts to an array (a PIL image, ...)
    kind = _stream_kind(value)
    if kind is None:
        raise TypeError(
            f"`{argument}` is an object of type {_type_name(value)}, not an array; expected a "
            f"NumPy array or tensor of shape {expected}, batch axis first (or a list/dict of "
            "them for several inputs)."
        )
    if kind is not None:
        raise TypeError(
            f"`{argument}` is {kind}, a stream of batches, not one batch of arrays: augnet "
            "computes the Jacobian of one batch at a time. Iterate and call it per batch, e.g. "
            "`for xb in data: J = augnet.jacobian(model, xb)` (for (x, y) pairs: `for xb, _ in "
            "data`), with augnet.iter_jacobian per batch to bound memory; for a folder of images "
            "or .npy files run the command line, `augnet jacobian MODEL INPUTS --out DIR`, which "
            "streams a whole data set in bounded memory and can resume."
        )


def as_batch_leaf(value, argument: str):
    """A leaf given as a (nested) Python list/tuple of numbers, as a NumPy array; a ragged one is
    a clear error. Anything else is returned as it is."""
    if not isinstance(value, list | tuple):
        return value
    try:
        arr = np.asarray(value)
    except ValueError:
        arr = None
    if arr is None or arr.dtype == object:
        lengths = [len(v) if isinstance(v, list | tuple | np.ndarray) else 1 for v in value]
        raise ValueError(
            f"`{argument}` is a ragged nested list: its {len(value)} rows have lengths "
            f"{lengths[:8]}{' ...' if len(lengths) > 8 else ''}, but a batch must be rectangular, "
            "(batch, *input_shape). Pad or resize the samples to one shape and pass "
            f"np.asarray({argument.split('[')[0]}, dtype='float32')."
        )
    return arr


def is_plain_nested(value) -> bool:
    """A list/tuple of (nested) Python lists/tuples of numbers: one array written as lists."""
    if not isinstance(value, list | tuple) or not value:
        return False
    stack = list(value)
    while stack:
        v = stack.pop()
        if isinstance(v, list | tuple):
            stack.extend(v)
        elif not isinstance(v, int | float | np.number) or isinstance(v, bool):
            return False
    return all(isinstance(v, list | tuple) for v in value)


def samples_list_error(leaves: list, n_model: int, spec_shape) -> ValueError | None:
    """The error for a list of per-sample arrays given to a one-input model (``[x0, x1, ...]``,
    each without the batch axis), or ``None`` if ``leaves`` is not that."""
    if n_model != 1 or len(leaves) < 2 or spec_shape is None:
        return None
    sample = tuple(spec_shape)[1:]
    shapes = [tuple(np.shape(v)) if hasattr(v, "shape") else None for v in leaves]
    if any(s is None or len(s) != len(sample) for s in shapes):
        return None
    if not all(all(e is None or int(d) == int(e) for d, e in zip(s, sample)) for s in shapes):
        distinct = sorted(set(shapes), key=str)
        if len(distinct) > 1:
            return ValueError(
                f"`x` is a list of {len(leaves)} arrays of different shapes "
                f"{', '.join(format_shape(s) for s in distinct[:4])}, but the model has one input of "
                f"shape {format_shape(spec_shape)}: a batch is one array, (batch, "
                f"{', '.join('?' if d is None else str(d) for d in sample)}). Resize the samples "
                "to one shape and stack them with np.stack(x)."
            )
        return None
    return ValueError(
        f"`x` is a list of {len(leaves)} arrays of shape {format_shape(shapes[0])}, one sample "
        f"each, but the model has one input {format_shape(spec_shape)}: a batch is one array "
        f"with the batch axis first. Stack them: np.stack(x) has shape "
        f"{format_shape((len(leaves), *shapes[0]))}."
    )


# --------------------------------------------------------------------------------------------------
# Values: real and finite
# --------------------------------------------------------------------------------------------------


def check_real(dtype: np.dtype, argument: str) -> None:
    """Refuses complex values (``dtype`` a NumPy dtype)."""
    if np.dtype(dtype).kind == "c":
        raise TypeError(
            f"`{argument}` is complex ({np.dtype(dtype).name}); augnet differentiates real "
            "models, and converting would silently drop the imaginary part. Pass the real part "
            f"(np.real({argument.split('[')[0]})), or the real and imaginary parts as two real "
            "inputs of a model built for them."
        )


def check_finite(tensors: list, names: list[str], what: str = "input") -> None:
    """Refuses an input holding ``inf`` or ``nan``, naming the first sample and element.

    ``tensors`` are the converted inputs (the model's dtype: a float64 value too large for
    float32 is caught as the ``inf`` it became). Costs two reductions per input.
    """
    for t, name in zip(tensors, names):
        v = B.numpy_view(t)
        if v.size == 0 or v.dtype.kind != "f":
            continue
        if v.size <= _SMALL:
            if np.isfinite(v).all():
                continue
        elif np.isfinite(v.min()) and np.isfinite(v.max()):  # NaN and inf propagate into these
            continue
        bad = ~np.isfinite(v.reshape(len(v), -1))
        rows = np.flatnonzero(bad.any(axis=1))
        sample = int(rows[0])
        element = np.unravel_index(int(np.argmax(bad[sample])), v.shape[1:])
        value = v[(sample, *element)]
        more = f" (and {len(rows) - 1} more sample(s))" if len(rows) > 1 else ""
        raise ValueError(
            f"`{name}` holds a non-finite value ({value}) at sample {sample}, element "
            f"{tuple(int(i) for i in element)}{more}, in {v.dtype.name}. "
            + (
                "A Jacobian at a non-finite input is undefined (the strategies would not even "
                "agree on it), so it is refused."
                if what == "input"
                else f"A product with a non-finite {what} is not a number, so it is refused."
            )
            + " Replace the value (np.nan_to_num) or leave that sample out."
        )


# --------------------------------------------------------------------------------------------------
# The all-zero warning
# --------------------------------------------------------------------------------------------------

_HEAD = 4096  # elements per sample looked at first: a non-zero there settles it
# A result this small is checked whole by one count_nonzero (~1 µs for 512 elements, but ~0.5 ns
# per element: 130 µs for a (8, 4096, 8) Jacobian, 3.7 ms for (8, 13, 256, 256), where the
# per-sample head look below takes ~5 µs).
COUNT_MAX = 1 << 12
_SMALL = 1 << 16  # inputs this small are checked with isfinite (faster than min and max)


def small_without_zero(a: np.ndarray) -> bool:
    """Whether ``a`` has at most ``COUNT_MAX`` elements and none of them is zero (one pass, no
    temporary: ~1 µs); ``False`` says nothing about a larger array."""
    return a.size <= COUNT_MAX and np.count_nonzero(a) == a.size


def nonzero_samples(values: list, n: int) -> np.ndarray:
    """``(n,)`` bool: which of the ``n`` samples have a non-zero entry in any of ``values``
    (arrays ``(n, ...)``, or lists of per-column arrays ``(n, ...)``). Looks at each sample's
    first elements first, and at the rest only for samples still all zero there: a few
    microseconds for a typical result, whatever its size."""
    parts = [
        np.asarray(p).reshape(n, -1) for v in values for p in (v if isinstance(v, list) else [v])
    ]
    if parts and all(small_without_zero(p) for p in parts):
        return np.ones(n, dtype=bool)
    found = None
    for flat in parts:
        head = flat[:, :_HEAD].any(axis=1)
        found = head if found is None else found | head
        if found.all():
            return found
    if found is None:
        return np.zeros(n, dtype=bool)
    for flat in parts:
        rest = np.flatnonzero(~found)
        if rest.size == 0:
            break
        if flat.shape[1] > _HEAD:
            found[rest] |= flat[rest, _HEAD:].any(axis=1)
    return found


def warn_zero_samples(values: list, n: int, what: str = "augnet.jacobian") -> None:
    """:func:`warn_all_zero` for the samples of ``values`` (as :func:`nonzero_samples` takes
    them) whose whole Jacobian is exactly zero; the warning points at the caller's caller."""
    nonzero = nonzero_samples(values, n)
    if not nonzero.all():
        warn_all_zero(np.flatnonzero(~nonzero), what, stacklevel=4)


def warn_all_zero(zero: np.ndarray, what: str = "augnet.jacobian", stacklevel: int = 3) -> None:
    """A :class:`ZeroJacobianWarning` for the samples ``zero`` (indices) whose whole Jacobian is
    exactly zero."""
    if len(zero) == 0:
        return
    shown = ", ".join(str(int(i)) for i in zero[:8]) + (" ..." if len(zero) > 8 else "")
    warnings.warn(
        ZeroJacobianWarning(
            f"{what}: the whole Jacobian of sample(s) {shown} is exactly zero. If the model "
            "ends in a softmax or sigmoid, it may be saturated there (probabilities of exactly 0 "
            "and 1 have a derivative of exactly 0.0 in float32): use logits=True for the "
            "Jacobian of the scores before the activation, and check the input's range (e.g. "
            "0-255 pixels fed to a model trained on [0, 1] inputs)."
        ),
        stacklevel=stacklevel,
    )
