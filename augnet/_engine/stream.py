"""Streaming: the Jacobian block by block (``iter_jacobian``) and into a ``.npy`` file
(``jacobian_to_npy``), in memory bounded by one pass."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from augnet import _backend as B
from augnet._engine import checks, prepare
from augnet._engine import run as R
from augnet._engine.logits import maybe_logits
from augnet._engine.results import JacobianChunk
from augnet._structure import unflatten


def iter_jacobian(
    fn,
    x,
    *,
    outputs=None,
    top_k: int | None = None,
    training: bool = False,
    strategy: str = "auto",
    batch_size: int | None = None,
    chunk_size: int | None = None,
    max_memory=None,
    jit_compile: bool = False,
    derivatives=None,
    logits: bool = False,
) -> Iterator[JacobianChunk]:
    """Streams the per-sample Jacobian block by block, in bounded memory.

    Same arguments as :func:`jacobian`. Each block covers ``batch_size`` samples and ``chunk_size``
    outputs (all selected outputs at once in forward mode), so that one pass fits ``max_memory``.

    Yields:
        :class:`JacobianChunk` ``(samples, outputs, values)`` with ``values`` of shape
        ``(b, c, *input_shape)`` (a list/dict per input for several inputs) and ``outputs`` the flat
        indices of its rows (``(c,)``, or ``(b, c)`` per sample with ``top_k``). Once every block
        is out, a sample whose whole Jacobian was exactly zero gets a
        ``augnet.ZeroJacobianWarning``.

    Example:
        >>> for chunk in augnet.iter_jacobian(model, x, max_memory="2GB"):  # doctest: +SKIP
        ...     out[chunk.samples, chunk_start:chunk_end] = chunk.values
    """
    if B.is_symbolic(x):
        raise RuntimeError(
            "iter_jacobian runs eagerly; inside tf.function call augnet.jacobian instead."
        )
    options = (outputs, top_k, training, strategy, batch_size, chunk_size, max_memory, jit_compile)
    run, fn = _setup(fn, x, options, derivatives, logits)
    nonzero = np.zeros(run.n_samples, dtype=bool)
    for samples, columns, outs, values in _blocks(fn, run):
        values = [R.stacked(v) for v in values]
        nonzero[samples] |= checks.nonzero_samples(values, samples.stop - samples.start)
        yield JacobianChunk(
            samples, np.asarray(outs), unflatten(values, run.target.in_structure), columns
        )
    zero = np.flatnonzero(~nonzero)
    if zero.size:
        checks.warn_all_zero(zero, "augnet.iter_jacobian")


def _setup(fn, x, options: tuple, derivatives, logits):
    """The planned run of a streaming call (no result allocated: no size check), and the
    callable it differentiates (the logits view with ``logits=True``)."""
    fn = maybe_logits(fn, logits)
    return prepare.setup(fn, x, *options, derivatives), fn


def _blocks(fn, run):
    """``R.iter_blocks(run)``, with a model's state restored afterwards (training mode)."""
    restore = R.restore_state(fn, run.training)
    try:
        yield from R.iter_blocks(run)
    finally:
        restore()


def iter_jacobian_columns(
    fn,
    x,
    *,
    outputs=None,
    top_k: int | None = None,
    training: bool = False,
    strategy: str = "auto",
    batch_size: int | None = None,
    chunk_size: int | None = None,
    max_memory=None,
    jit_compile: bool = False,
    derivatives=None,
    logits: bool = False,
) -> Iterator[JacobianChunk]:
    """:func:`iter_jacobian` for augnet's own consumers (the attribution methods' running sums),
    without copying each block into a stacked array: ``values`` is nested like
    :func:`iter_jacobian`'s (per input), but each input's entry is a list of ``c`` arrays
    ``(b, *input_shape)``, one per column (output) of the block.

    The arrays may be **read-only views of the engine's buffers, valid only until the next
    block is asked for**: fold them into your own arrays at once, never keep them. No
    all-zero warning (the consumer decides what a zero means for it).
    """
    if B.is_symbolic(x):
        raise RuntimeError("iter_jacobian_columns runs eagerly.")
    options = (outputs, top_k, training, strategy, batch_size, chunk_size, max_memory, jit_compile)
    run, fn = _setup(fn, x, options, derivatives, logits)
    for samples, columns, outs, values in _blocks(fn, run):
        per_input = []
        for v in values:
            if isinstance(v, list):  # the loop: one tensor per column, viewed without a copy
                per_input.append([B.numpy_view(t) for t in v])
            else:  # one (b, c, ...) array: its columns are views
                per_input.append([v[:, j] for j in range(v.shape[1])])
        yield JacobianChunk(
            samples, np.asarray(outs), unflatten(per_input, run.target.in_structure), columns
        )


def jacobian_to_npy(fn, x, path, *, overwrite: bool = False, **kwargs) -> Path:
    """Streams the Jacobian of a single-input model into a ``.npy`` file, pass by pass.

    The file holds ``(batch, m, *input_shape)`` (``m`` the selected outputs, all of them flattened
    by default) and is written under a temporary name, then renamed: a file at ``path`` is always
    complete. Peak memory is one pass's (``max_memory``), not the whole Jacobian.

    Args:
        fn, x: as in :func:`jacobian` (one input).
        path: the ``.npy`` file to write.
        overwrite: replace an existing file (otherwise ``FileExistsError``).
        **kwargs: ``outputs``, ``training``, ``strategy``, ``batch_size``, ``chunk_size``,
            ``max_memory``, ``jit_compile``, ``derivatives``, ``logits`` as in :func:`jacobian`
            (not ``top_k``).

    Returns:
        The path written, which ``np.load(path, mmap_mode="r")`` opens without reading it all.
    """
    from augnet import _store

    if "top_k" in kwargs:
        raise ValueError("jacobian_to_npy does not take `top_k`; select outputs with `outputs=`.")
    allowed = {
        "outputs",
        "training",
        "strategy",
        "batch_size",
        "chunk_size",
        "max_memory",
        "jit_compile",
        "derivatives",
        "logits",
    }
    unknown = set(kwargs) - allowed
    if unknown:
        raise TypeError(
            f"jacobian_to_npy() got unexpected keyword arguments {sorted(unknown)}; expected some of {sorted(allowed)}."
        )

    def blocks():  # called by the store once the target is checked: (shape, dtype, blocks)
        options = (
            kwargs.get("outputs"),
            None,
            kwargs.get("training", False),
            kwargs.get("strategy", "auto"),
            kwargs.get("batch_size"),
            kwargs.get("chunk_size"),
            kwargs.get("max_memory"),
            kwargs.get("jit_compile", False),
        )
        run, model = _setup(fn, x, options, kwargs.get("derivatives"), kwargs.get("logits", False))
        if len(run.target.in_shapes) != 1:
            raise ValueError(
                f"jacobian_to_npy writes one array, but the model has {len(run.target.in_shapes)} inputs; "
                "use iter_jacobian and write each input's blocks yourself."
            )
        shape = (run.n_samples, run.selection.size, *run.target.in_shapes[0])

        def stream():
            nonzero = np.zeros(run.n_samples, dtype=bool)
            for samples, columns, _, values in _blocks(model, run):
                value = R.stacked(values[0])
                nonzero[samples] |= checks.nonzero_samples([value], samples.stop - samples.start)
                yield samples, columns, value
            zero = np.flatnonzero(~nonzero)
            if zero.size:
                checks.warn_all_zero(zero, "augnet.jacobian_to_npy", stacklevel=4)

        return shape, np.dtype(B.dtype_name(run.target.dtype)), stream()

    # Checks the target before any work, writes through an exclusive temporary file (see
    # augnet._store.write_npy_stream); positioned writes, not a memory map, so resident memory
    # stays one pass's.
    return _store.write_npy_stream(os.fspath(path), blocks, overwrite=overwrite)
