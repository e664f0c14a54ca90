"""SmoothGrad and its variants: statistics of the gradient over noisy copies of the input.

For ``n`` noisy copies ``x + ε_j``, ``ε_j ~ N(0, σ²)`` (σ a fraction of each sample's value range,
as PAIR saliency's ``stdev_spread``):

- ``smoothgrad`` (Smilkov et al. 2017): ``(1/n) Σ_j ∂y_k/∂x (x + ε_j)``;
- ``squaregrad`` (Hooker et al. 2019): ``(1/n) Σ_j (∂y_k/∂x (x + ε_j))²``;
- ``vargrad`` (Adebayo et al. 2018): ``(1/n) Σ_j (∂y_k/∂x (x + ε_j) − smoothgrad)²``.

The noise is drawn once per copy and shared by every selected output; the copies of all samples
are stacked into the batch axis and go through the engine in rounds that fit ``max_memory``, their
Jacobian rows folded into running sums (SquareGrad and VarGrad: a running mean and sum of squared
deviations, exact zero spread where the gradient does not change). Cost: ``n`` Jacobians of the
batch, i.e. ``n × batch`` forward passes and ``n × batch × k`` backward passes, in as few engine
passes as the budget allows.
"""

from __future__ import annotations

import numbers

import numpy as np

from augnet._attribution import _base
from augnet._errors import format_shape, invalid_value

DEFAULT_SAMPLES = 50
DEFAULT_NOISE_LEVEL = 0.15


def _noisy_gradients(
    method: str,
    model,
    x,
    *,
    n_samples,
    noise_level,
    sigma,
    noise,
    seed,
    outputs,
    top_k,
    batch_size,
    max_memory,
    engine,
    moments: bool,
):
    problem = _base.prepare(
        model,
        x,
        outputs=outputs,
        top_k=top_k,
        batch_size=batch_size,
        max_memory=max_memory,
        engine=_base.engine_options(engine, method),
    )
    leaves = problem.leaves
    if noise is not None:
        given = _explicit_noise(noise, problem, n_samples)
        n = given[0].shape[0]

        def make_points(owners, copies):
            return [a[owners] + e[copies, owners] for a, e in zip(leaves, given)]

    else:
        n = (
            DEFAULT_SAMPLES
            if n_samples is None
            else _base.check_positive_int(n_samples, "n_samples")
        )
        sigmas = _sigmas(problem, noise_level, sigma)
        streams = _base.make_rng(seed).spawn(problem.batch)  # one stream per sample
        sizes = [int(np.prod(s)) for s in problem.in_shapes]
        draw_dtype = np.float64 if problem.dtype == np.float64 else np.float32

        def make_points(owners, copies):
            # Sample i's copies are drawn in order from its own stream, one standard normal
            # vector per copy (all inputs' elements together): the same numbers however the
            # points are split into rounds, and samples can be drawn in parallel.
            eps = np.empty((len(owners), sum(sizes)), dtype=draw_dtype)
            starts = np.flatnonzero(np.r_[True, owners[1:] != owners[:-1]])
            ends = np.r_[starts[1:], len(owners)]

            def draw(a, b):
                streams[owners[a]].standard_normal(out=eps[a:b], dtype=draw_dtype)

            _base.parallel(draw, list(zip(starts, ends)), elements=eps.size)
            points, start = [], 0
            for a, s, size in zip(leaves, sigmas, sizes):
                e = eps[:, start : start + size].reshape(len(owners), *a.shape[1:])
                e *= s[owners].reshape(-1, *([1] * (a.ndim - 1))).astype(draw_dtype)
                e += a[owners]
                points.append(e.astype(problem.dtype, copy=False))
                start += size
            return points

    if moments:
        sums = _base.stream_sums(problem, make_points, n, moments=True)
        if method == "vargrad":
            flat = [m2 / n for m2 in sums.m2]
        else:  # squaregrad: E[g²] = Var + mean²
            flat = [m2 / n + np.square(mean) for m2, mean in zip(sums.m2, sums.mean)]
    else:
        sums = _base.stream_sums(problem, make_points, n, weights=np.full(n, 1.0 / n))
        flat = sums.total
    return problem.result(flat, method)


def _sigmas(problem, noise_level, sigma) -> list[np.ndarray]:
    """Per input, the noise's standard deviation per sample, ``(batch,)``."""
    if sigma is not None:
        values = _base.per_input(sigma, problem, "sigma")
        out = []
        for v in values:
            s = _base.check_nonnegative_float(v, "sigma")
            out.append(np.full(problem.batch, s))
        return out
    levels = _base.per_input(noise_level, problem, "noise_level")
    out = []
    for a, level in zip(problem.leaves, levels):
        level = _base.check_nonnegative_float(level, "noise_level")
        flat = a.reshape(a.shape[0], -1).astype(np.float64)
        out.append(level * (flat.max(axis=1) - flat.min(axis=1)))
    return out


def _explicit_noise(noise, problem, n_samples) -> list[np.ndarray]:
    """``noise``: per input ``(n, batch, *input_shape)`` (or ``(n, *input_shape)``, shared by
    every sample)."""
    values = _base.per_input(noise, problem, "noise")
    out = []
    for v, a in zip(values, problem.leaves):
        arr = np.asarray(v, dtype=problem.dtype)
        if arr.ndim == a.ndim and arr.shape[1:] == a.shape[1:]:  # (n, *input_shape): shared
            arr = np.broadcast_to(arr[:, None], (arr.shape[0], *a.shape))
        if arr.ndim != a.ndim + 1 or arr.shape[1:] != a.shape or arr.shape[0] < 1:
            raise ValueError(
                f"`noise` has shape {format_shape(np.shape(v))}; expected (n_samples, batch, "
                f"*input_shape) = (n, {', '.join(str(d) for d in a.shape)}), or (n, "
                f"{', '.join(str(d) for d in a.shape[1:])}) for the same noise on every sample."
            )
        out.append(arr)
    n = {a.shape[0] for a in out}
    if len(n) > 1:
        raise ValueError(f"`noise` holds {sorted(n)} copies for different inputs; give the same n.")
    if n_samples is not None and (
        not isinstance(n_samples, numbers.Integral) or int(n_samples) != out[0].shape[0]
    ):
        raise ValueError(
            invalid_value(
                "n_samples",
                n_samples,
                f"None or {out[0].shape[0]} (the number of noise arrays passed in `noise`)",
            )
        )
    return out


_DOC_ARGS = """
    Args:
        model: a ``keras.Model`` or a callable the engine can differentiate.
        x: ``(batch, *input_shape)``, or a list/dict of arrays for several inputs.
        n_samples: noisy copies per sample (default 50).
        noise_level: the noise's standard deviation as a fraction of each sample's value range
            ``max(x_i) − min(x_i)`` (default 0.15, PAIR saliency's ``stdev_spread``); per input
            as a list/dict.
        sigma: the standard deviation in input units instead (overrides ``noise_level``).
        noise: explicit noise instead of drawing it: ``(n_samples, batch, *input_shape)`` (or
            ``(n_samples, *input_shape)`` for all samples), per input as a list/dict; the copies
            are ``x + noise[j]``.
        seed: an int, a ``numpy.random.Generator`` or ``None``. Each sample gets its own
            stream (``Generator.spawn``), from which its copies are drawn in order, one standard
            normal vector each: the noise does not depend on ``max_memory`` or ``batch_size``.
        outputs, top_k: as :func:`augnet.gradient`; ``top_k`` is chosen on the clean input, and
            every noisy copy of sample ``i`` differentiates sample ``i``'s selected outputs.
        batch_size: points (noisy copies) per engine pass; max_memory: per pass, as
            ``augnet.jacobian`` (the copies themselves are made in rounds of at most a quarter
            of it; the result is on top).
        **engine: ``strategy``, ``chunk_size``, ``jit_compile``, ``derivatives``.

    Returns:
        ``(batch, k, *input_shape)`` per input and output as :func:`augnet.gradient` (an
        :class:`Attribution` with ``top_k`` or per-sample ``outputs``).
"""


def smoothgrad(
    model,
    x,
    *,
    n_samples: int | None = None,
    noise_level=DEFAULT_NOISE_LEVEL,
    sigma=None,
    noise=None,
    seed=None,
    outputs=None,
    top_k: int | None = None,
    batch_size: int | None = None,
    max_memory=None,
    **engine,
):
    return _noisy_gradients(
        "smoothgrad",
        model,
        x,
        n_samples=n_samples,
        noise_level=noise_level,
        sigma=sigma,
        noise=noise,
        seed=seed,
        outputs=outputs,
        top_k=top_k,
        batch_size=batch_size,
        max_memory=max_memory,
        engine=engine,
        moments=False,
    )


def squaregrad(
    model,
    x,
    *,
    n_samples: int | None = None,
    noise_level=DEFAULT_NOISE_LEVEL,
    sigma=None,
    noise=None,
    seed=None,
    outputs=None,
    top_k: int | None = None,
    batch_size: int | None = None,
    max_memory=None,
    **engine,
):
    return _noisy_gradients(
        "squaregrad",
        model,
        x,
        n_samples=n_samples,
        noise_level=noise_level,
        sigma=sigma,
        noise=noise,
        seed=seed,
        outputs=outputs,
        top_k=top_k,
        batch_size=batch_size,
        max_memory=max_memory,
        engine=engine,
        moments=True,
    )


def vargrad(
    model,
    x,
    *,
    n_samples: int | None = None,
    noise_level=DEFAULT_NOISE_LEVEL,
    sigma=None,
    noise=None,
    seed=None,
    outputs=None,
    top_k: int | None = None,
    batch_size: int | None = None,
    max_memory=None,
    **engine,
):
    return _noisy_gradients(
        "vargrad",
        model,
        x,
        n_samples=n_samples,
        noise_level=noise_level,
        sigma=sigma,
        noise=noise,
        seed=seed,
        outputs=outputs,
        top_k=top_k,
        batch_size=batch_size,
        max_memory=max_memory,
        engine=engine,
        moments=True,
    )


smoothgrad.__doc__ = (
    """SmoothGrad: the mean gradient over noisy copies of the input,
    ``(1/n) Σ_j ∂y_k/∂x (x + ε_j)``, ``ε_j ~ N(0, σ²)``.
"""
    + _DOC_ARGS
    + """
    Example:
        >>> sg = augnet.smoothgrad(model, x, top_k=1, n_samples=50, seed=0)   # doctest: +SKIP
        >>> sg.attributions.shape, sg.indices.shape                           # doctest: +SKIP
        ((8, 1, 96, 96, 3), (8, 1))
"""
)
squaregrad.__doc__ = (
    """SquareGrad: the mean squared gradient over noisy copies, ``(1/n) Σ_j (∂y_k/∂x (x +
    ε_j))²`` (non-negative).
"""
    + _DOC_ARGS
)
vargrad.__doc__ = (
    """VarGrad: the variance of the gradient over noisy copies, ``(1/n) Σ_j (g_j − ḡ)²`` with
    ``g_j = ∂y_k/∂x (x + ε_j)`` and ``ḡ`` their mean (the population variance; exactly zero
    where the gradient does not change, as for a linear model).
"""
    + _DOC_ARGS
)
