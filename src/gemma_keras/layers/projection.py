"""A dense projection without bias that owns its kernel: Gemma's q/k/v/o and FFN weights."""

import keras
from keras import ops

from gemma_keras.backends import add_kernel, linear, quantized_linear, quantized_linears, steps
from gemma_keras.layers.lora import LoraLayer


class Projection(LoraLayer):
    """`x @ kernel.T`, the kernel stored `[output_dim, input_dim]` as torch,
    Hugging Face and GGUF store it; `gemma_keras.backends.linear` multiplies it
    with each backend's fastest product, a decode step's included.

    With LoRA (`enable_lora`, as `keras.layers.Dense` has it: `lora_kernel_a`
    `[input_dim, rank]`, `lora_kernel_b` `[rank, output_dim]`) the output is
    `x @ kernel.T + (x @ a) @ b * (lora_alpha / rank)`: the base product keeps
    its fast path and the low-rank one is computed in float32.

    `quantize("int8")` or `quantize("int4")` (Keras' protocol) replaces the
    kernel by its quantized form (see `LoraLayer` and `gemma_keras.quantization`).

    Example:

    >>> import numpy as np
    >>> layer = Projection(input_dim=8, output_dim=4)
    >>> tuple(layer(np.ones((2, 3, 8), "float32")).shape)
    (2, 3, 4)
    >>> layer.enable_lora(2)
    >>> [w.name for w in layer.trainable_weights]
    ['lora_kernel_a', 'lora_kernel_b']
    """

    base_weight_name = "kernel"
    lora_weight_names = ("lora_kernel_a", "lora_kernel_b")

    def __init__(self, input_dim, output_dim, **kwargs):
        super().__init__(**kwargs)
        self.input_dim = input_dim
        self.output_dim = output_dim

    def build(self, input_shape=None):
        self.kernel = add_kernel(self, "kernel", (self.output_dim, self.input_dim))
        self.built = True

    def compute_output_spec(self, x):
        return keras.KerasTensor(tuple(x.shape[:-1]) + (self.output_dim,), self.compute_dtype)

    @property
    def weight_shape(self):
        return (self.output_dim, self.input_dim)

    def call(self, x):
        if self.quantization_mode is None:
            y = linear(x, self.kernel)
        else:
            y = quantized_linear(x, self.quantization_mode, *self.quantized_arrays())
        if self.lora_enabled:
            low_rank = ops.matmul(ops.cast(x, "float32"), self.lora_kernel_a)
            low_rank = ops.matmul(low_rank, self.lora_kernel_b) * self.lora_scale
            y = y + ops.cast(low_rank, y.dtype)
        return y

    def lora_shapes(self, rank):
        return (self.input_dim, rank), (rank, self.output_dim)

    def lora_delta(self):
        delta = ops.matmul(self.lora_kernel_a, self.lora_kernel_b)  # [in, out]
        return ops.transpose(delta) * self.lora_scale

    def get_config(self):
        return {**super().get_config(), "input_dim": self.input_dim, "output_dim": self.output_dim}


def project(x, projections):
    """`[projection(x) for projection in projections]`. In a generation step,
    where all are quantized alike (one mode, one group size: a GGUF file may
    mix them) and none has LoRA, one `quantized_linears` call multiplies them
    all (the native kernel then reads a layer's q, k and v, or its gate and
    up, as one product)."""
    modes = {projection.quantization_mode for projection in projections}
    together = (
        steps.generating()
        and len(projections) > 1
        and len(modes) == 1
        and None not in modes
        and not any(projection.lora_enabled for projection in projections)
        and not isinstance(x, keras.KerasTensor)
    )
    if not together:
        return [projection(x) for projection in projections]
    arrays = [projection.quantized_arrays() for projection in projections]
    if len({int(scale.shape[-1]) for _, scale, _ in arrays}) != 1:  # groups per row
        return [projection(x) for projection in projections]
    x = ops.cast(x, projections[0].compute_dtype)
    return quantized_linears(x, modes.pop(), arrays)
