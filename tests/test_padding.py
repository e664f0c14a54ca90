"""The engine's batch padding for backends that compile once per shape (augnet/_engine/padding.py).

The rule is tested on every backend with a stand-in for a compiled function that records the batch
sizes it is called with (the real thing, jax.jit, is tested in test_jax.py): a batch size compiled
before runs as it is; a larger one compiles; a smaller one runs padded to the smallest compiled
size above it, with its rows sliced off the result, until padding it has cost as much time as
compiling took (then it compiles).
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import to_numpy

from augnet import _backend as B
from augnet._engine import padding


class Recording:
    """``(state, xs, cols, sel) -> [2 * xs[0] + sum(cols), sel]``, batch-first outputs; records
    the batch sizes it ran."""

    def __init__(self):
        self.batches = []

    def __call__(self, state, xs, cols, sel):
        self.batches.append(int(xs[0].shape[0]))
        return [xs[0] * 2.0 + B.cast(B.concat([cols], 0)[0], "float32"), sel]

    def trace_count(self) -> int:
        return len(set(self.batches))


def _args(b: int):
    x = np.arange(b * 3, dtype="float32").reshape(b, 3)
    sel = np.arange(b * 2, dtype="int32").reshape(b, 2)
    return x, sel


def _call(f, b):
    x, sel = _args(b)
    cols = B.convert(np.array([5, 6, 7], "int32"), "int32")  # not batched
    out = f((), [B.convert(x, "float32")], cols, B.convert(sel, "int32"))
    y, s = (to_numpy(t) for t in out)
    np.testing.assert_array_equal(y, 2 * x + 5)  # only the real rows, exactly
    np.testing.assert_array_equal(s, sel)
    return y


def test_padding_reuses_compiled_sizes_and_compiles_larger_ones():
    fn = Recording()
    f = padding.Padded(fn, padding.BATCHED["forward"])
    _call(f, 6)
    assert fn.batches == [6]
    _call(f, 2)  # padded to 6 (the last sample repeated)
    _call(f, 5)
    assert fn.batches == [6, 6, 6]
    _call(f, 8)  # nothing compiled above 8: compiles for 8
    _call(f, 7)  # the smallest compiled size above 7 is 8
    assert fn.batches == [6, 6, 6, 8, 8]
    assert f.trace_count() == 2
    assert padding.direct(f, 6) is fn and padding.direct(f, 7) is None


def test_padding_stops_once_it_has_cost_what_compiling_would():
    """Ski rental: the time lost to padded rows of a batch size is counted against what compiling
    the padded-to size took; once it is reached, that batch size compiles for itself."""
    fn = Recording()
    f = padding.Padded(fn, padding.BATCHED["forward"])
    _call(f, 6)
    f.sizes[6] = 1e9  # compiling "took" forever: padding is always cheaper
    for _ in range(3):
        _call(f, 2)
    assert fn.batches == [6, 6, 6, 6] and f.waste[2] > 0
    f.sizes[6] = 0.0  # compiling "took" nothing: the padding already cost more
    _call(f, 2)
    assert fn.batches[-1] == 2 and 2 in f.sizes and 2 not in f.waste
    _call(f, 2)
    assert fn.batches[-1] == 2  # compiled: no padding any more


def test_wrap_only_where_shapes_specialise_and_never_in_training():
    fn = Recording()
    wrapped = padding.wrap(fn, "loop", training=False)
    assert (wrapped is fn) == (not B.SHAPE_SPECIALIZED)
    assert padding.wrap(fn, "loop", training=True) is fn  # batch statistics: never padded


@pytest.mark.parametrize("kind", sorted(padding.BATCHED))
def test_every_block_kind_says_which_arguments_are_batched(kind):
    assert padding.BATCHED[kind][0] is True  # the inputs always are
