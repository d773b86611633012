"""Gemma's gated feed-forward network."""

import keras
from keras import ops

from gemma_keras.layers.projection import Projection


class FeedForward(keras.layers.Layer):
    """`down(gelu_tanh(gate(x)) * up(x))`.

    `intermediate_dim` is the width of each of `gate` and `up` (16384 for
    Gemma 2B). Each is a `Projection` (kernel `[out, in]`).

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
        gate = ops.gelu(self.gate(x), approximate=True)
        return self.down(gate * self.up(x))

    def get_config(self):
        return {
            **super().get_config(),
            "hidden_dim": self.hidden_dim,
            "intermediate_dim": self.intermediate_dim,
        }
