"""RMSNorm in Gemma's `(1 + scale)` form, computed in float32."""

import keras
from keras import ops

from gemma_keras.layers.precision import residual_dtype


class RMSNorm(keras.layers.Layer):
    """`x * rsqrt(mean(x^2) + epsilon) * (1 + scale)` over the last axis.

    The whole computation runs in float32 and the result is cast back to the
    compute dtype: bf16 accumulation of the mean of squares visibly changes
    Gemma's outputs. `scale` starts at zero, so a fresh layer is a plain
    RMS normalisation.

    `output_dtype` (default: the compute dtype) is the result's dtype: a
    float16 model's post-attention and post-FFW norms return float32, since
    their results join its float32 residual stream (see
    `gemma_keras.layers.precision`). A float16 model's norms also take
    float32 inputs as they are, instead of casting them to float16 first.

    Example:

    >>> import numpy as np
    >>> norm = RMSNorm(epsilon=1e-6)
    >>> y = norm(np.ones((1, 3, 8), "float32"))
    >>> tuple(y.shape)
    (1, 3, 8)
    """

    def __init__(self, epsilon=1e-6, output_dtype=None, **kwargs):
        super().__init__(**kwargs)
        self.epsilon = epsilon
        self.output_dtype = output_dtype

    @property
    def input_dtype(self):
        # Keras casts inputs to this: a float16 model's float32 residual stream
        # would overflow in that cast, so it arrives as it is.
        return residual_dtype(self.compute_dtype)

    def build(self, input_shape):
        self.scale = self.add_weight(name="scale", shape=(input_shape[-1],), initializer="zeros")

    def call(self, x):
        x_float = ops.cast(x, "float32")
        mean_square = ops.mean(ops.square(x_float), axis=-1, keepdims=True)
        normed = x_float * ops.rsqrt(mean_square + self.epsilon)
        normed = normed * (1.0 + ops.cast(self.scale, "float32"))
        return ops.cast(normed, self.output_dtype or self.compute_dtype)

    def get_config(self):
        return {**super().get_config(), "epsilon": self.epsilon, "output_dtype": self.output_dtype}
