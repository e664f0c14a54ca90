"""Message templates shared by every argument check in augnet.

Every error answers three questions: what was received, what was expected, and how to fix it.
Shapes are printed as tuples, e.g. ``(256, 256, 1)``.
"""

from __future__ import annotations

from collections.abc import Iterable


def format_shape(shape: Iterable) -> str:
    """Formats a shape as a tuple string: ``(None, 256, 256, 1)``; ``(4,)`` for one axis."""
    dims = tuple(None if d is None else int(d) for d in shape)
    return str(dims)


def invalid_value(argument: str, received: object, expected: str, fix: str | None = None) -> str:
    """The standard message for an argument with a bad value."""
    message = f"Received an invalid value for `{argument}`, expected {expected}. Received: {argument}={received!r}."
    if fix:
        message += f" {fix}"
    return message


def shape_mismatch(
    argument: str, received: Iterable, expected: Iterable, fix: str | None = None
) -> str:
    """The standard message for an array whose shape does not fit."""
    message = (
        f"`{argument}` has shape {format_shape(received)}, but the model expects "
        f"{format_shape(expected)} (batch axis first)."
    )
    if fix:
        message += f" {fix}"
    return message
