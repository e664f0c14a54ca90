"""Integrated gradients (Sundararajan et al. 2017) with a choice of baselines and quadrature rules.

``IG_k(x) = (x − x₀) ⊙ ∫₀¹ ∂y_k/∂x (x₀ + α (x − x₀)) dα ≈ (x − x₀) ⊙ Σ_j w_j ∂y_k/∂x (x₀ + α_j (x −
x₀))``

with nodes ``α_j`` and weights ``w_j`` of a quadrature rule on ``[0, 1]`` (captum's names):

==================== ========================================== =============================
rule                 nodes ``α_j``, ``j = 0..n−1``             weights ``w_j``
==================== ========================================== =============================
``riemann_left``     ``j/n``                                    ``1/n``
``riemann_right``    ``(j+1)/n``                                ``1/n``
``riemann_middle``   ``(j+½)/n``                                ``1/n``
``riemann_trapezoid`` ``j/(n−1)`` (both ends)                   ``1/(n−1)``, halved at the ends
``gausslegendre``    Gauss–Legendre nodes mapped to ``[0, 1]``  their weights / 2
``(alphas, weights)`` your own                                  your own
==================== ========================================== =============================

Completeness: ``Σ IG_k = y_k(x) − y_k(x₀)`` for the exact integral; the returned ``delta`` is the
gap ``Σ IG_k − (y_k(x) − y_k(x₀))`` per sample and output (captum's convergence delta): it shrinks
with the number of steps on smooth networks (fastest with Gauss–Legendre), and stays at the size
of the kinks crossed on piecewise-linear (ReLU) networks, where the integrand jumps.

The sum over the path is itself a Jacobian: with ``g(x, x₀) = Σ_j w_j f(x₀ + α_j (x − x₀))``,
``∂g/∂x + ∂g/∂x₀ = Σ_j w_j ∂f/∂x (x₀ + α_j (x − x₀))``, so one engine call on ``g`` per group of
path points gives it for every selected output, the points' gradients summed inside the backward
pass (``_summed.py``). Cost: ``steps × batch`` forward passes and ``steps × batch × k`` backward
passes plus two forward passes (``f(x)``, ``f(x₀)``), in as few engine passes as the memory
budget allows.
"""

from __future__ import annotations

import numpy as np

from augnet._attribution import _arrays, _base, _summed
from augnet._errors import invalid_value

RULES = ("riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid", "gausslegendre")
_ALIASES = {
    "left": "riemann_left",
    "right": "riemann_right",
    "middle": "riemann_middle",
    "trapezoid": "riemann_trapezoid",
    "gauss_legendre": "gausslegendre",
    "gauss-legendre": "gausslegendre",
}
BASELINES = ("zeros", "blur")
DEFAULT_STEPS = 50
DEFAULT_BLUR = 0.1  # sigma of the blurred baseline, as a fraction of the largest spatial side


def quadrature(rule, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Nodes ``α`` in ``[0, 1]`` and weights ``w`` (summing to 1) of an integration rule.

    Args:
        rule: one of ``RULES`` (or ``"left"``, ``"right"``, ``"middle"``, ``"trapezoid"``,
            ``"gauss_legendre"``), or a pair ``(alphas, weights)`` of 1-D arrays.
        steps: the number of nodes (gradient evaluations per sample).

    Returns:
        ``(alphas (steps,), weights (steps,))`` in float64.
    """
    if isinstance(rule, tuple | list) and len(rule) == 2 and not isinstance(rule[0], str):
        alphas = np.asarray(rule[0], dtype=np.float64)
        weights = np.asarray(rule[1], dtype=np.float64)
        if alphas.ndim != 1 or alphas.shape != weights.shape or alphas.size == 0:
            raise ValueError(
                invalid_value(
                    "rule", rule, "a rule name or two 1-D arrays (alphas, weights) of one length"
                )
            )
        return alphas, weights
    name = _ALIASES.get(rule, rule) if isinstance(rule, str) else rule
    _base.check_choice(name, "rule", RULES)
    n = _base.check_positive_int(steps, "steps", minimum=2 if name == "riemann_trapezoid" else 1)
    j = np.arange(n, dtype=np.float64)
    if name == "riemann_left":
        return j / n, np.full(n, 1.0 / n)
    if name == "riemann_right":
        return (j + 1) / n, np.full(n, 1.0 / n)
    if name == "riemann_middle":
        return (j + 0.5) / n, np.full(n, 1.0 / n)
    if name == "riemann_trapezoid":
        w = np.full(n, 1.0 / (n - 1))
        w[[0, -1]] /= 2
        return j / (n - 1), w
    nodes, weights = np.polynomial.legendre.leggauss(n)
    return (nodes + 1) / 2, weights / 2


def blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of each sample ``(batch, *input_shape)`` over its spatial axes (all but the
    channel axis), ``'reflect'`` borders; ``sigma`` in pixels."""
    axes = _arrays.spatial_axes(x.shape[1:])
    mats = {1 + ax: _arrays.gaussian_matrix(x.shape[1 + ax], sigma) for ax in axes}
    return _arrays.apply_along(np.asarray(x, dtype=np.float64), mats).astype(x.dtype)


def _baselines(problem, baseline, blur_sigma) -> list[np.ndarray]:
    out = []
    specs = _base.per_input(baseline, problem, "baseline")
    for i, (a, spec) in enumerate(zip(problem.leaves, specs)):
        if spec is None or (isinstance(spec, str) and spec == "zeros"):
            out.append(np.zeros_like(a))
        elif isinstance(spec, str):
            _base.check_choice(spec, "baseline", BASELINES)
            spatial = [a.shape[1 + ax] for ax in _arrays.spatial_axes(a.shape[1:])]
            sigma = (
                DEFAULT_BLUR * max(spatial)
                if blur_sigma is None
                else _base.check_nonnegative_float(blur_sigma, "blur_sigma")
            )
            out.append(blur(a, sigma))
        else:
            out.append(np.ascontiguousarray(_base.broadcast_array(spec, problem, i, "baseline")))
    return out


def integrated_gradients(
    model,
    x,
    *,
    baseline=None,
    steps: int = DEFAULT_STEPS,
    rule="gausslegendre",
    blur_sigma: float | None = None,
    outputs=None,
    top_k: int | None = None,
    batch_size: int | None = None,
    max_memory=None,
    **engine,
) -> _base.Attribution:
    """Integrated gradients of each selected output, with the completeness gap.

    Args:
        model: a ``keras.Model`` or a callable the engine can differentiate.
        x: ``(batch, *input_shape)``, or a list/dict of arrays for several inputs.
        baseline: ``None`` or ``"zeros"`` (default), a number (a constant image), ``"blur"``
            (the input blurred with a Gaussian of ``blur_sigma`` pixels over its spatial axes),
            or an array ``(*input_shape)`` / ``(batch, *input_shape)``; per input as a list/dict.
        steps: gradient evaluations per sample along the path (default 50).
        rule: ``"gausslegendre"`` (default), ``"riemann_left"``, ``"riemann_right"``,
            ``"riemann_middle"``, ``"riemann_trapezoid"``, or ``(alphas, weights)``.
        blur_sigma: for ``baseline="blur"``, in pixels (default a tenth of the largest spatial
            side).
        outputs, top_k: as :func:`augnet.gradient`; ``top_k`` is chosen on ``x`` and every path
            point of sample ``i`` differentiates sample ``i``'s selected outputs.
        batch_size: path points per engine pass; max_memory: per pass, as ``augnet.jacobian``.
        **engine: ``strategy``, ``chunk_size``, ``jit_compile``, ``derivatives``.

    Returns:
        :class:`Attribution` with ``attributions`` ``(batch, k, *input_shape)`` (nested as
        :func:`augnet.gradient`), ``indices``/``values`` ``(batch, k)``, and ``delta``
        ``(batch, k)``: ``Σ attributions − (y_k(x) − y_k(x₀))`` summed over every input element
        (of every input).

    Example:
        >>> ig = augnet.integrated_gradients(model, x, outputs=[3], steps=32)   # doctest: +SKIP
        >>> np.abs(ig.delta).max()      # small for a smooth network              # doctest: +SKIP
    """
    problem = _base.prepare(
        model,
        x,
        outputs=outputs,
        top_k=top_k,
        batch_size=batch_size,
        max_memory=max_memory,
        engine=_base.engine_options(engine, "integrated_gradients"),
    )
    alphas, weights = quadrature(rule, steps)
    x0 = _baselines(problem, baseline, blur_sigma)
    diff = [a - b for a, b in zip(problem.leaves, x0)]
    # Σ_j w_j J(x0 + α_j (x − x0)) is the Jacobian of Σ_j w_j f(x0 + α_j (x − x0)) with respect
    # to x plus that with respect to x0: one engine call per group of path points.
    if _summed.supported(problem):
        totals = _summed.path_sums(problem, x0, alphas, weights)
    else:  # a plain callable: the path points' Jacobians, summed
        diff_t = [d.astype(problem.dtype) for d in diff]
        alphas_t = alphas.astype(problem.dtype)

        def make_points(owners, copies):
            points = []
            for b, d in zip(x0, diff_t):
                alpha = alphas_t[copies].reshape(-1, *([1] * (d.ndim - 1)))
                points.append(b[owners] + alpha * d[owners])
            return points

        totals = _base.stream_sums(problem, make_points, len(alphas), weights=weights).total
    flat = [t * d[:, None] for t, d in zip(totals, diff)]
    at_baseline = problem.selected(
        _base.predict_flat(problem, x0), np.arange(problem.batch)
    ).astype(np.float64)
    gap = problem.values().astype(np.float64) - at_baseline
    total = sum(f.reshape(f.shape[0], f.shape[1], -1).sum(axis=2) for f in flat)
    delta = (total - gap).astype(problem.dtype)
    return problem.result(flat, "integrated_gradients", extra=True, delta=delta)
