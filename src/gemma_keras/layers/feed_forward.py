"""Gemma's gated feed-forward network."""

import keras
from keras import ops

from gemma_keras.backend import add_kernel, linear


class FeedForward(keras.layers.Layer):
    """`down(gelu_tanh(gate(x)) * up(x))`.

    `intermediate_dim` is the width of each of `gate` and `up` (16384 for
    Gemma 2B). Kernels are stored `[out, in]` (see `gemma_keras.backend.linear`).

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

    def build(self, input_shape):
        self.gate = add_kernel(self, "gate", (self.intermediate_dim, self.hidden_dim))
        self.up = add_kernel(self, "up", (self.intermediate_dim, self.hidden_dim))
        self.down = add_kernel(self, "down", (self.hidden_dim, self.intermediate_dim))

    def call(self, x):
        gate = ops.gelu(linear(x, self.gate), approximate=True)
        return linear(gate * linear(x, self.up), self.down)

    def get_config(self):
        return {
            **super().get_config(),
            "hidden_dim": self.hidden_dim,
            "intermediate_dim": self.intermediate_dim,
        }
