"""Batch padding for backends whose compiled functions specialise on shapes (``jax.jit``).

A ``tf.function`` traced with a ``None`` batch axis runs any batch size; ``jax.jit`` compiles
again for every new shape (from ~0.1 s for a small MLP to ~20 s for MobileNetV2 on a 2-core CPU).
Where the backend says so (``B.SHAPE_SPECIALIZED``), :func:`wrap` puts every inference-mode block
behind :class:`Padded`:

- a pass whose batch size was compiled before runs as it is (one dictionary lookup);
- a larger batch size than any compiled compiles for itself;
- a smaller one runs padded to the smallest compiled size above it (its last sample repeated;
  samples are independent in inference mode, so the real rows are exactly the unpadded ones),
  and its rows are sliced off the result. Its padded rows' time is counted, and once the time
  lost to padding that batch size reaches what compiling took for the size it was padded to, the
  next pass of that size compiles for itself (the "ski rental" rule: never more than twice the
  cost of the better choice in hindsight).

So the last, smaller pass of a run and a one-off call with fewer samples reuse what is compiled,
while a batch size used over and over gets its own compiled function. Training-mode blocks are
never padded: BatchNorm's batch statistics and Dropout's masks depend on the whole batch.
"""

from __future__ import annotations

import time

from augnet import _backend as B

# Per block kind: for each argument after the state, whether it has the batch axis first.
BATCHED = {
    "loop": (True, True),  # xs, sel (b, c)
    "pfor": (True, True),
    "forward": (True, False, True),  # xs, cols (c,), sel (b, m)
    "predict": (True,),  # xs
    "vjp": (True, True),  # xs, u (b, M)
    "jvp": (True, True),  # xs, tangents
}


def _pad(t, size: int):
    b = int(t.shape[0])
    return B.concat([t, B.repeat_samples(t[b - 1 :], size - b)], axis=0)


class Padded:
    """A compiled block that reuses compiled batch sizes by padding (see the module docstring).

    ``sizes`` maps each compiled batch size to the seconds its first call took (tracing, compiling
    and one run); ``waste`` the seconds spent on padded rows per batch size so far.
    """

    def __init__(self, fn, batched: tuple):
        self.fn = fn
        self.batched = batched
        self.sizes: dict[int, float] = {}
        self.waste: dict[int, float] = {}

    def trace_count(self) -> int:
        return self.fn.trace_count()

    def __call__(self, state, *args):
        xs = args[0]
        b = int((xs[0] if isinstance(xs, list | tuple) else xs).shape[0])
        if b in self.sizes:
            return self.fn(state, *args)
        above = [s for s in self.sizes if s > b]
        if not above or self.waste.get(b, 0.0) >= self.sizes[min(above)]:
            # Nothing compiled to pad to, or padding b has cost what compiling would: compile.
            t0 = time.perf_counter()
            out = B.wait(self.fn(state, *args))
            self.sizes[b] = time.perf_counter() - t0
            self.waste.pop(b, None)
            return out
        size = min(above)
        padded = [
            B.nest_pack(a, [_pad(t, size) for t in B.nest_flatten(a)]) if batched else a
            for a, batched in zip(args, self.batched)
        ]
        t0 = time.perf_counter()
        out = B.wait(self.fn(state, *padded))
        self.waste[b] = self.waste.get(b, 0.0) + (time.perf_counter() - t0) * (size - b) / size
        return B.nest_pack(out, [t[:b] for t in B.nest_flatten(out)])


def direct(fn, b: int):
    """The compiled function behind ``fn`` once it has compiled for batch size ``b`` (calls of
    that size need no padding: skip the wrapper), else ``None``."""
    if isinstance(fn, Padded):
        return fn.fn if b in fn.sizes else None
    return fn


def wrap(fn, kind: str, training: bool):
    """``fn`` behind :class:`Padded` where the backend specialises on shapes (inference only)."""
    if not B.SHAPE_SPECIALIZED or training or kind not in BATCHED:
        return fn
    return Padded(fn, BATCHED[kind])
