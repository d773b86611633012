"""Gemma's gated feed-forward network."""

import keras
from keras import ops

from gemma_keras.layers.projection import Projection, project

# A float16 model's `gelu(gate) * up` is scaled per token so that its largest
# value is at most this before `down` (see `FeedForward`): `down`'s outputs
# are then at most this times the sum of a row's |weights|, which stays under
# 65504 for rows that sum to less than 255.
FLOAT16_DOWN_INPUT_LIMIT = 256.0


class FeedForward(keras.layers.Layer):
    """`down(gelu_tanh(gate(x)) * up(x))`.

    `intermediate_dim` is the width of each of `gate` and `up` (16384 for
    Gemma 2B). Each is a `Projection` (kernel `[out, in]`).

    A float16 model (see `gemma_keras.layers.precision`) multiplies
    `gelu(gate) * up` in float32, divides each token's row by the power of
    two that brings its largest value under `FLOAT16_DOWN_INPUT_LIMIT` (1
    where it is already, as on the embedded 270M), multiplies by `down` in
    float16 and undoes the scale in float32: it returns float32, which joins
    the float32 residual stream. Rows are independent, so the scale changes
    nothing but the range.

    Example:

    >>> import numpy as np
    >>> ffn = FeedForward(hidden_dim=8, intermediate_dim=32)
    >>> tuple(ffn(np.zeros((2, 3, 8), "float32")).shape)
    (2, 3, 8)
    """

    def __init__(self, hidden_dim, intermediate_dim, **kwargs):
        super().__init__(**kwargs)
        self.hidden_dim = hidden_dim
        self.intermediate_dim = intermediate_dim
        policy = self.dtype_policy
        self.gate = Projection(hidden_dim, intermediate_dim, dtype=policy, name="gate")
        self.up = Projection(hidden_dim, intermediate_dim, dtype=policy, name="up")
        self.down = Projection(intermediate_dim, hidden_dim, dtype=policy, name="down")

    def build(self, input_shape):
        for projection in (self.gate, self.up, self.down):
            projection.build()

    def call(self, x):
        gate, up = project(x, [self.gate, self.up])
        if self.compute_dtype != "float16":
            return self.down(ops.gelu(gate, approximate=True) * up)
        gate = ops.gelu(ops.cast(gate, "float32"), approximate=True)
        hidden = gate * ops.cast(up, "float32")
        peak = ops.max(ops.abs(hidden), axis=-1, keepdims=True)
        # A power of two: dividing by it and multiplying back are exact.
        exponent = ops.maximum(ops.ceil(ops.log2(peak / FLOAT16_DOWN_INPUT_LIMIT)), 0.0)
        scale = ops.stop_gradient(ops.power(2.0, exponent))
        down = self.down(ops.cast(hidden / scale, self.compute_dtype))
        return ops.cast(down, "float32") * scale

    def get_config(self):
        return {
            **super().get_config(),
            "hidden_dim": self.hidden_dim,
            "intermediate_dim": self.intermediate_dim,
        }
