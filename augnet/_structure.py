"""One array, or a list/tuple/dict of arrays: flatten it, check it, and rebuild the same structure.

Pure NumPy; knows nothing of TensorFlow beyond duck typing (`.shape`, `.dtype`, `.numpy()`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from augnet._errors import format_shape

SINGLE, LIST, TUPLE, DICT = "single", "list", "tuple", "dict"


@dataclass(frozen=True)
class Structure:
    """How a caller's inputs (or a model's outputs) were nested: one array, a list/tuple, or a dict.

    Attributes:
        kind: one of ``"single"``, ``"list"``, ``"tuple"``, ``"dict"``.
        keys: the dict keys in order (``kind == "dict"``), else ``0..n-1``.
    """

    kind: str
    keys: tuple = field(default_factory=tuple)

    def __len__(self) -> int:
        return 1 if self.kind == SINGLE else len(self.keys)

    def names(self) -> list[str]:
        """A readable name per leaf: ``x``, ``x[0]``, ``x['image']``."""
        if self.kind == SINGLE:
            return ["x"]
        return [f"x[{k!r}]" for k in self.keys]


def is_array_like(value: Any) -> bool:
    return hasattr(value, "shape") and hasattr(value, "dtype")


def flatten(value: Any, argument: str = "x") -> tuple[list, Structure]:
    """Flattens one array or a list/tuple/dict of arrays (one level) into a list.

    Args:
        value: an array-like (NumPy array, tensor), or a list/tuple/dict of them.
        argument: the argument's name, for error messages.

    Returns:
        ``(leaves, structure)``; ``unflatten(leaves, structure)`` rebuilds ``value``.
    """
    if isinstance(value, Mapping):
        if not value:
            raise ValueError(f"`{argument}` is an empty dict; expected one array per model input.")
        keys = tuple(value.keys())
        return [value[k] for k in keys], Structure(DICT, keys)
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError(
                f"`{argument}` is an empty {type(value).__name__}; expected one array per model input."
            )
        if all(isinstance(v, (int, float, bool)) for v in value):
            # A plain list of numbers is one array, not a list of inputs.
            return [np.asarray(value)], Structure(SINGLE)
        kind = LIST if isinstance(value, list) else TUPLE
        return list(value), Structure(kind, tuple(range(len(value))))
    if isinstance(value, (str, bytes)):
        raise TypeError(
            f"`{argument}` must be a numeric array (or a list/dict of arrays); received a "
            f"{type(value).__name__}: {value!r}. Load the image or data into a NumPy array first."
        )
    return [value], Structure(SINGLE)


def unflatten(leaves: Sequence, structure: Structure) -> Any:
    """Inverse of :func:`flatten`."""
    if structure.kind == SINGLE:
        return leaves[0]
    if structure.kind == DICT:
        return dict(zip(structure.keys, leaves))
    if structure.kind == TUPLE:
        return tuple(leaves)
    return list(leaves)


def check_numeric(leaf: Any, name: str) -> np.dtype:
    """Checks that one input leaf is a numeric array; returns its NumPy dtype."""
    if not is_array_like(leaf):
        try:
            leaf = np.asarray(leaf)
        except Exception as exc:  # pragma: no cover - exotic objects
            raise TypeError(
                f"`{name}` must be a numeric array; received an object of type {type(leaf).__name__}."
            ) from exc
    dtype = leaf.dtype
    np_dtype = getattr(dtype, "as_numpy_dtype", dtype)
    try:
        np_dtype = np.dtype(np_dtype)
    except TypeError as exc:
        # A framework's dtype object NumPy does not take (torch.float32): by its name.
        base = str(dtype).rsplit(".", 1)[-1]
        try:
            np_dtype = np.dtype("float32" if base == "bfloat16" else base)
        except TypeError:
            raise TypeError(f"`{name}` has dtype {dtype}, which is not numeric.") from exc
    if np_dtype.kind in "OUSV" or np_dtype == np.bool_:
        raise TypeError(
            f"`{name}` must be a numeric (float or integer) array; received dtype {np_dtype}"
            f" with shape {format_shape(leaf.shape)}. Convert it first, e.g. "
            f"np.asarray({name.split('[')[0]}, dtype='float32')."
        )
    return np_dtype


def check_against_spec(
    leaf: Any, name: str, expected_shape: Sequence, input_name: str | None
) -> None:
    """Checks one input's shape against the model input's shape ``(None, *input_shape)``.

    Raises:
        ValueError: with the received and expected shapes as tuples and how to fix the mismatch.
    """
    shape = tuple(leaf.shape)
    expected = tuple(expected_shape)
    which = f" (model input {input_name!r})" if input_name else ""
    if len(shape) == len(expected) - 1 and _dims_match(shape, expected[1:]):
        raise ValueError(
            f"`{name}`{which} has shape {format_shape(shape)}, but the model expects "
            f"{format_shape(expected)}: the batch axis is missing. Add a batch axis with "
            f"{name}[None] (or np.expand_dims({name}, 0))."
        )
    if len(shape) != len(expected) or not _dims_match(shape[1:], expected[1:]):
        raise ValueError(
            f"`{name}`{which} has shape {format_shape(shape)}, but the model expects "
            f"{format_shape(expected)} (batch axis first). Resize or reshape the input to "
            f"(batch, {', '.join('?' if d is None else str(d) for d in expected[1:])})."
        )
    if shape[0] == 0:
        raise ValueError(f"`{name}` has an empty batch: shape {format_shape(shape)}.")


def _dims_match(shape: Sequence, expected: Sequence) -> bool:
    if len(shape) != len(expected):
        return False
    return all(e is None or int(s) == int(e) for s, e in zip(shape, expected))
