"""Routed max pooling for the reverse loop, where the backend offers it.

A Jacobian's reverse loop makes one backward pass per output from the same forward pass. A
backend may provide ``B.max_pool_2d_routed``: max pooling whose backward passes reuse the window
maxima found in the forward pass (TensorFlow: ``MaxPoolGradWithArgmax``; its ``MaxPoolGrad``
searches every window again in each backward pass). While a reverse-loop block is traced, the
plain ``keras.layers.MaxPooling2D`` layers of the model pool through it: the same numbers, less
time. A backend that sets ``B.max_pool_2d_routed = None`` declines, and nothing is patched.
"""

from __future__ import annotations

import contextlib

from augnet import _backend as B
from augnet import _derivatives as D
from augnet._engine import rules


def routable_pools(fn) -> list:
    """The Keras ``MaxPooling2D`` layers (channels_last, not overridden) inside ``fn``; none when
    the backend has no routed pooling."""
    if B.max_pool_2d_routed is None:
        return []
    try:
        import keras
    except ImportError:  # pragma: no cover
        return []
    if not isinstance(fn, keras.layers.Layer):
        return []
    cls = keras.layers.MaxPooling2D
    return [
        layer
        for layer in D.all_layers(fn)
        if isinstance(layer, cls)
        and type(layer).call is cls.call  # (MaxPooling2D and AveragePooling2D share it)
        and getattr(layer, "pool_mode", "max") == "max"
        and "call" not in layer.__dict__
        and getattr(layer, "data_format", None) == "channels_last"
    ]


@contextlib.contextmanager
def routed_pooling(fn):
    """While tracing a reverse-mode block: ``fn``'s max-pooling layers pool with
    ``B.max_pool_2d_routed``. Every layer's ``call`` is restored on exit."""

    def routed_call(layer):
        def call(inputs):
            return B.max_pool_2d_routed(inputs, layer.pool_size, layer.strides, layer.padding)

        return call

    layers = routable_pools(fn) if fn is not None else []
    with rules.patched({layer: routed_call(layer) for layer in layers}):
        yield
