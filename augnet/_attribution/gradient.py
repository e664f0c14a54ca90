"""The plain gradient (saliency) and gradient × input.

- ``gradient``: the Jacobian rows themselves, ``∂y_k/∂x`` (Simonyan et al. 2014's saliency map,
  signed). One engine call: one forward pass and one backward pass per selected output.
- ``gradient_x_input``: ``x ⊙ ∂y_k/∂x`` (Shrikumar et al. 2016), the first-order term of
  ``y_k(x) − y_k(0)``; the same cost.
"""

from __future__ import annotations

import numpy as np

from augnet._attribution import _base


def gradient(
    model,
    x,
    *,
    outputs=None,
    top_k: int | None = None,
    batch_size: int | None = None,
    max_memory=None,
    **engine,
):
    """The gradient of each selected output with respect to the input: ``∂y_k/∂x``.

    Args:
        model: a ``keras.Model`` or a callable the engine can differentiate.
        x: ``(batch, *input_shape)``, or a list/dict of arrays for several inputs.
        outputs: flat output indices ``[0, 3]``, a ``(batch, k)`` array (per sample), or a
            list/dict per output for several outputs (as ``augnet.jacobian``); default all.
        top_k: per sample, the ``k`` largest outputs (chosen on ``x``).
        batch_size, max_memory: per engine pass, as ``augnet.jacobian``.
        **engine: ``strategy``, ``chunk_size``, ``jit_compile``, ``derivatives``.

    Returns:
        ``(batch, k, *input_shape)`` (``(batch, *output_shape, *input_shape)`` for all outputs;
        nested ``[out][in]`` for several inputs or outputs), or an :class:`Attribution` with
        per-sample ``indices`` and ``values`` when ``top_k`` or per-sample ``outputs`` are used.

    Example:
        >>> g = augnet.gradient(model, x, outputs=[3])    # doctest: +SKIP
        >>> g.shape                                        # doctest: +SKIP
        (8, 1, 256, 256, 1)
    """
    problem = _base.prepare(
        model,
        x,
        outputs=outputs,
        top_k=top_k,
        batch_size=batch_size,
        max_memory=max_memory,
        engine=_base.engine_options(engine, "gradient"),
    )
    flat = _base.jacobian(problem, problem.leaves, problem.outputs_for(np.arange(problem.batch)))
    return problem.result(flat, "gradient")


def gradient_x_input(
    model,
    x,
    *,
    outputs=None,
    top_k: int | None = None,
    batch_size: int | None = None,
    max_memory=None,
    **engine,
):
    """Gradient × input: ``x ⊙ ∂y_k/∂x`` per selected output.

    Arguments and result as :func:`gradient`.
    """
    problem = _base.prepare(
        model,
        x,
        outputs=outputs,
        top_k=top_k,
        batch_size=batch_size,
        max_memory=max_memory,
        engine=_base.engine_options(engine, "gradient_x_input"),
    )
    flat = _base.jacobian(problem, problem.leaves, problem.outputs_for(np.arange(problem.batch)))
    for f, a in zip(flat, problem.leaves):
        f *= a[:, None]
    return problem.result(flat, "gradient_x_input")
