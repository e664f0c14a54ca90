"""SmoothGrad and its variants: statistics of the gradient over noisy copies of the input.

For ``n`` noisy copies ``x + ε_j``, ``ε_j ~ N(0, σ²)`` (σ a fraction of each sample's value range,
as PAIR saliency's ``stdev_spread``):

- ``smoothgrad`` (Smilkov et al. 2017): ``(1/n) Σ_j ∂y_k/∂x (x + ε_j)``;
- ``squaregrad`` (Hooker et al. 2019): ``(1/n) Σ_j (∂y_k/∂x (x + ε_j))²``;
- ``vargrad`` (Adebayo et al. 2018): ``(1/n) Σ_j (∂y_k/∂x (x + ε_j) − smoothgrad)²``.

The noise: copy ``j`` of sample ``i`` is ``x_i + σ_i z_j``, with ``z_j`` a standard normal vector
drawn from copy ``j``'s own random stream (spawned from ``seed``). It is drawn once per copy and
shared by every selected output and every sample, so a sample's maps do not depend on the other
samples in its batch, on ``max_memory`` or on ``batch_size``.

SmoothGrad is the Jacobian of ``(1/n) Σ_j f(x + σ z_j)``: one engine call per group of copies
gives it for every selected output, the copies' gradients summed inside the backward pass
(``_summed.py``). SquareGrad and VarGrad need every copy's gradient: the copies of all samples are
stacked into the batch axis and go through the engine in rounds that fit ``max_memory``, their
Jacobian rows folded into a running mean and sum of squared deviations (exact zero spread where
the gradient does not change). Cost, either way: ``n × batch`` forward passes and
``n × batch × k`` backward passes, in as few engine passes as the budget allows.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from augnet._attribution import _base, _summed
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
        given, shared = _explicit_noise(noise, problem, n_samples)
        n = given[0].shape[0]
        sigmas = [np.ones(problem.batch) for _ in leaves]

        def bank_for(start, stop):  # noise shared by every sample: (copies, *input_shape)
            return [e[start:stop] for e in given]

        def make_points(owners, copies):
            if shared:
                return [a[owners] + e[copies] for a, e in zip(leaves, given)]
            return [a[owners] + e[copies, owners] for a, e in zip(leaves, given)]

    else:
        shared = True
        n = (
            DEFAULT_SAMPLES
            if n_samples is None
            else _base.check_positive_int(n_samples, "n_samples")
        )
        sigmas = _sigmas(problem, noise_level, sigma)
        bank_for = NoiseBank(problem, CopyStreams(seed, n), budget=problem.max_memory)

        def make_points(owners, copies):
            # Copy j of every sample is x_i + σ_i z_j, z_j from copy j's own stream.
            z = bank_for.vectors(copies)
            points = []
            for a, s, e in zip(leaves, sigmas, z):
                e *= s[owners].reshape(-1, *([1] * (a.ndim - 1))).astype(e.dtype)
                e += a[owners]
                points.append(e.astype(problem.dtype, copy=False))
            return points

    if moments:
        sums = _base.stream_sums(problem, make_points, n, moments=True)
        if method == "vargrad":
            flat = [m2 / n for m2 in sums.m2]
        else:  # squaregrad: E[g²] = Var + mean²
            flat = [m2 / n + np.square(mean) for m2, mean in zip(sums.m2, sums.mean)]
    elif shared and _summed.supported(problem):
        # The mean of the Jacobians over the copies is the Jacobian of the mean of the model's
        # outputs over them: one engine call per group of copies (augnet/_attribution/_summed.py).
        flat = _summed.noise_sums(problem, bank_for, sigmas, n)
    else:  # noise different for every sample, or a plain callable: the copies' Jacobians
        sums = _base.stream_sums(problem, make_points, n, weights=np.full(n, 1.0 / n))
        flat = sums.total
    return problem.result(flat, method)


class CopyStreams:
    """One random stream per noisy copy, spawned from ``seed`` (an int, a ``Generator`` -- which
    is advanced, as ``Generator.spawn(n)`` does -- or ``None``): copy ``j``'s standard normal
    vector is drawn from ``streams.generator(j)``, the ``j``-th child of the seed's
    ``SeedSequence`` (what ``rng.bit_generator.seed_seq.spawn(n)[j]`` gives), whoever asks for it
    and when. The children are made when asked for (``n`` may be large)."""

    SPAWN_CHUNK = 256

    def __init__(self, seed, n: int):
        rng = _base.make_rng(seed)
        sequence = getattr(rng.bit_generator, "seed_seq", None)
        if not isinstance(sequence, np.random.SeedSequence):  # a bit generator without one
            sequence = np.random.SeedSequence(rng.integers(2**63, size=4))
        self.entropy, self.spawn_key = sequence.entropy, tuple(sequence.spawn_key)
        self.pool_size = sequence.pool_size
        self.base = sequence.n_children_spawned
        for start in range(0, n, self.SPAWN_CHUNK):  # advance it past the n children
            sequence.spawn(min(self.SPAWN_CHUNK, n - start))
        self.n = n

    def __len__(self) -> int:
        return self.n

    def generator(self, j: int) -> np.random.Generator:
        child = np.random.SeedSequence(
            self.entropy, spawn_key=(*self.spawn_key, self.base + int(j)), pool_size=self.pool_size
        )
        return np.random.default_rng(child)


class NoiseBank:
    """The standard normal vectors ``z_j`` of the copies, one per copy and the same for every
    sample: ``bank(start, stop)`` gives copies ``start..stop-1`` per input ``(copies,
    *input_shape_i)``; :meth:`vectors` any list of copies (one row per entry). Copy ``j``'s vector
    is drawn from its own stream (all inputs' elements together, in order), so it is the same
    however the copies are grouped; the whole bank is kept when it takes at most ``budget / 8``
    bytes, else copies are drawn again when asked for again."""

    def __init__(self, problem, streams: CopyStreams, budget: int):
        self.shapes = problem.in_shapes
        self.sizes = [int(np.prod(s)) for s in self.shapes]
        self.dtype = np.float64 if problem.dtype == np.float64 else np.float32
        self.streams = streams
        total = len(streams) * sum(self.sizes) * np.dtype(self.dtype).itemsize
        self.keep = total <= budget // _base.POINTS_SHARE
        self.kept: np.ndarray | None = None

    def _draw(self, copies: np.ndarray) -> np.ndarray:
        out = np.empty((len(copies), sum(self.sizes)), dtype=self.dtype)

        def draw(r0, r1):
            for r in range(r0, r1):
                rng = self.streams.generator(copies[r])
                rng.standard_normal(out=out[r], dtype=self.dtype)

        step = max(1, math.ceil(len(copies) / 4))
        tasks = [(r0, min(len(copies), r0 + step)) for r0 in range(0, len(copies), step)]
        _base.parallel(draw, tasks, elements=out.size)
        return out

    def _rows(self, copies: np.ndarray) -> np.ndarray:
        if self.keep:
            if self.kept is None:
                self.kept = self._draw(np.arange(len(self.streams)))
            return self.kept[copies]
        unique, inverse = np.unique(copies, return_inverse=True)
        drawn = self._draw(unique)
        return drawn[inverse] if len(unique) < len(copies) else drawn

    def _split(self, rows: np.ndarray) -> list[np.ndarray]:
        out, start = [], 0
        for shape, size in zip(self.shapes, self.sizes):
            out.append(rows[:, start : start + size].reshape(len(rows), *shape))
            start += size
        return out

    def __call__(self, start: int, stop: int) -> list[np.ndarray]:
        return self._split(self._rows(np.arange(start, stop)))

    def vectors(self, copies: np.ndarray) -> list[np.ndarray]:
        """Per input, ``(len(copies), *input_shape_i)``, writable (a copy of the bank)."""
        rows = self._rows(np.asarray(copies))  # a new array (fancy indexing or drawn)
        return [np.ascontiguousarray(v) for v in self._split(rows)]


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


def _explicit_noise(noise, problem, n_samples) -> tuple[list[np.ndarray], bool]:
    """``noise``: per input ``(n, batch, *input_shape)``, or ``(n, *input_shape)`` shared by
    every sample. Returns the arrays and whether every input's noise is shared (then they keep
    the shape ``(n, *input_shape)``)."""
    values = _base.per_input(noise, problem, "noise")
    out, shared = [], []
    for v, a in zip(values, problem.leaves):
        arr = np.asarray(v, dtype=problem.dtype)
        one = arr.ndim == a.ndim and arr.shape[1:] == a.shape[1:] and arr.shape[0] >= 1
        if not one and (arr.ndim != a.ndim + 1 or arr.shape[1:] != a.shape or arr.shape[0] < 1):
            raise ValueError(
                f"`noise` has shape {format_shape(np.shape(v))}; expected (n_samples, batch, "
                f"*input_shape) = (n, {', '.join(str(d) for d in a.shape)}), or (n, "
                f"{', '.join(str(d) for d in a.shape[1:])}) for the same noise on every sample."
            )
        out.append(arr)
        shared.append(one)
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
    if all(shared):
        return out, True
    out = [
        np.broadcast_to(arr[:, None], (arr.shape[0], *a.shape)) if one else arr
        for arr, one, a in zip(out, shared, problem.leaves)
    ]
    return out, False


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
        seed: an int, a ``numpy.random.Generator`` (advanced, as ``Generator.spawn`` does) or
            ``None``. Copy ``j`` is ``x_i + σ_i z_j`` for every sample ``i``, ``z_j`` one standard
            normal vector (all inputs' elements together) drawn from
            ``numpy.random.default_rng(streams[j])``, ``streams = rng.bit_generator.seed_seq
            .spawn(n_samples)``: the noise does not depend on the batch, ``max_memory`` or
            ``batch_size``.
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
