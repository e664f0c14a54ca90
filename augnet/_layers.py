"""Two small example layers for custom derivative rules: ``PlusConstant`` and ``Clip``.

Both are built of ordinary TensorFlow ops (so autodiff already knows their derivatives, which
makes them good references for the rules in ``examples/custom_derivatives.py``); both save and
load as ``.keras`` files.
"""

from __future__ import annotations

import keras


@keras.saving.register_keras_serializable(package="augnet")
class PlusConstant(keras.layers.Layer):
    """``y = x + constant``; its derivative is 1 everywhere. Input and output ``(batch, ...)``."""

    def __init__(self, constant: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        self.constant = float(constant)

    def call(self, inputs):
        return inputs + keras.ops.cast(self.constant, inputs.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "constant": self.constant}


@keras.saving.register_keras_serializable(package="augnet")
class Clip(keras.layers.Layer):
    """``y = min(max(x, vmin), vmax)``; its derivative is 1 inside ``[vmin, vmax]``, 0 outside.

    Input and output ``(batch, ...)``.
    """

    def __init__(self, vmin: float = 0.0, vmax: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        if not vmin < vmax:
            raise ValueError(
                f"Received an invalid value for `vmin`/`vmax`, expected vmin < vmax. "
                f"Received: vmin={vmin!r}, vmax={vmax!r}."
            )
        self.vmin, self.vmax = float(vmin), float(vmax)

    def call(self, inputs):
        return keras.ops.clip(inputs, self.vmin, self.vmax)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "vmin": self.vmin, "vmax": self.vmax}
