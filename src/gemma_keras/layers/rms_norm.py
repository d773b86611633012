"""RMSNorm in Gemma's `(1 + scale)` form, computed in float32."""

import keras
from keras import ops


class RMSNorm(keras.layers.Layer):
    """`x * rsqrt(mean(x^2) + epsilon) * (1 + scale)` over the last axis.

    The whole computation runs in float32 and the result is cast back to the
    compute dtype: bf16 accumulation of the mean of squares visibly changes
    Gemma's outputs. `scale` starts at zero, so a fresh layer is a plain
    RMS normalisation.

    Example:

    >>> import numpy as np
    >>> norm = RMSNorm(epsilon=1e-6)
    >>> y = norm(np.ones((1, 3, 8), "float32"))
    >>> tuple(y.shape)
    (1, 3, 8)
    """

    def __init__(self, epsilon=1e-6, **kwargs):
        super().__init__(**kwargs)
        self.epsilon = epsilon

    def build(self, input_shape):
        self.scale = self.add_weight(name="scale", shape=(input_shape[-1],), initializer="zeros")

    def call(self, x):
        x_float = ops.cast(x, "float32")
        mean_square = ops.mean(ops.square(x_float), axis=-1, keepdims=True)
        normed = x_float * ops.rsqrt(mean_square + self.epsilon)
        normed = normed * (1.0 + ops.cast(self.scale, "float32"))
        return ops.cast(normed, self.compute_dtype)

    def get_config(self):
        return {**super().get_config(), "epsilon": self.epsilon}
