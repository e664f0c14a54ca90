"""Streaming: the Jacobian block by block (``iter_jacobian``) and into a ``.npy`` file
(``jacobian_to_npy``), in memory bounded by one pass."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from augnet import _backend as B
from augnet._engine import prepare
from augnet._engine import run as R
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
) -> Iterator[JacobianChunk]:
    """Streams the per-sample Jacobian block by block, in bounded memory.

    Same arguments as :func:`jacobian`. Each block covers ``batch_size`` samples and ``chunk_size``
    outputs (all selected outputs at once in forward mode), so that one pass fits ``max_memory``.

    Yields:
        :class:`JacobianChunk` ``(samples, outputs, values)`` with ``values`` of shape
        ``(b, c, *input_shape)`` (a list/dict per input for several inputs) and ``outputs`` the flat
        indices of its rows (``(c,)``, or ``(b, c)`` per sample with ``top_k``).

    Example:
        >>> for chunk in augnet.iter_jacobian(model, x, max_memory="2GB"):  # doctest: +SKIP
        ...     out[chunk.samples, chunk_start:chunk_end] = chunk.values
    """
    if B.is_symbolic(x):
        raise RuntimeError(
            "iter_jacobian runs eagerly; inside tf.function call augnet.jacobian instead."
        )
    run = prepare.setup(
        fn,
        x,
        outputs,
        top_k,
        training,
        strategy,
        batch_size,
        chunk_size,
        max_memory,
        jit_compile,
        derivatives,
    )
    restore = R.restore_state(fn, run.training)
    try:
        for samples, columns, outs, values in R.iter_blocks(run):
            values = [R.stacked(v) for v in values]
            yield JacobianChunk(
                samples, np.asarray(outs), unflatten(values, run.target.in_structure), columns
            )
    finally:
        restore()


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
            ``max_memory``, ``jit_compile`` as in :func:`jacobian` (not ``top_k``).

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
    }
    unknown = set(kwargs) - allowed
    if unknown:
        raise TypeError(
            f"jacobian_to_npy() got unexpected keyword arguments {sorted(unknown)}; expected some of {sorted(allowed)}."
        )

    def blocks():  # called by the store once the target is checked: (shape, dtype, blocks)
        run = prepare.setup(
            fn,
            x,
            kwargs.get("outputs"),
            None,
            kwargs.get("training", False),
            kwargs.get("strategy", "auto"),
            kwargs.get("batch_size"),
            kwargs.get("chunk_size"),
            kwargs.get("max_memory"),
            kwargs.get("jit_compile", False),
            kwargs.get("derivatives"),
        )
        if len(run.target.in_shapes) != 1:
            raise ValueError(
                f"jacobian_to_npy writes one array, but the model has {len(run.target.in_shapes)} inputs; "
                "use iter_jacobian and write each input's blocks yourself."
            )
        shape = (run.n_samples, run.selection.size, *run.target.in_shapes[0])

        def stream():
            restore = R.restore_state(fn, run.training)
            try:
                for samples, columns, _, values in R.iter_blocks(run):
                    yield samples, columns, R.stacked(values[0])
            finally:
                restore()

        return shape, np.dtype(B.dtype_name(run.target.dtype)), stream()

    # Checks the target before any work, writes through an exclusive temporary file (see
    # augnet._store.write_npy_stream); positioned writes, not a memory map, so resident memory
    # stays one pass's.
    return _store.write_npy_stream(os.fspath(path), blocks, overwrite=overwrite)
