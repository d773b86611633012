"""Gemma's tied token embedding: embeds ids, and projects back to vocabulary logits."""

import math

import keras
import numpy as np
from keras import ops

from gemma_keras import backends as backend
from gemma_keras import quantization
from gemma_keras.backends import linear
from gemma_keras.layers.lora import LoraLayer
from gemma_keras.layers.precision import residual_dtype
from gemma_keras.layers.soft_cap import soft_cap


class TokenIdError(ValueError):
    """A token id is outside `[0, vocabulary_size)`."""


def check_token_ids(
    token_ids,
    vocabulary_size,
    what="token id",
    fix="check that the tokenizer matches the model.",
    allowed=None,
):
    """Raises `TokenIdError` naming the bad id (a `what`) when values are
    available now; `allowed` is one more value that may appear (a loss's
    `ignore_class`).

    Inside a traced graph there are no values to check; callers that feed
    graphs (generate, predict, fit) check their inputs before tracing.
    """
    if token_ids is None or not backend.is_concrete(token_ids):
        return
    values = np.asarray(ops.convert_to_numpy(token_ids))
    if allowed is not None:
        values = values[values != allowed]
    if values.size == 0:
        return
    low, high = values.min(), values.max()
    if low < 0 or high >= vocabulary_size:
        bad = low if low < 0 else high
        raise TokenIdError(
            f"{what} {int(bad)} is outside the vocabulary [0, {vocabulary_size}); {fix}"
        )


class TokenEmbedding(LoraLayer):
    """Embedding shared between the input and the output of the model.

    `call(token_ids)` returns `embeddings[token_ids] * sqrt(hidden_dim)`, the
    scale first cast to the compute dtype as Gemma was trained (bf16:
    sqrt(2048) -> 45.25), in float32 for a float16 model, whose residual
    stream it starts (see `gemma_keras.layers.precision`).
    `call(hidden, reverse=True)` returns float32 logits
    `hidden @ embeddings.T`, soft-capped by `logit_soft_cap` when set.

    LoRA as `keras.layers.Embedding.enable_lora` has it: `lora_embeddings_a`
    `[vocabulary_size, rank]` and `lora_embeddings_b` `[rank, hidden_dim]`
    add `a @ b * (lora_alpha / rank)` to the table, both ways round.
    `quantize("int8")`/`quantize("int4")` quantize the table by rows (one
    vocabulary entry's groups along the hidden axis), for both directions.

    Example:

    >>> import numpy as np
    >>> embedding = TokenEmbedding(vocabulary_size=10, hidden_dim=4)
    >>> hidden = embedding(np.array([[1, 2, 3]]))
    >>> tuple(embedding(hidden, reverse=True).shape)
    (1, 3, 10)
    """

    base_weight_name = "embeddings"
    lora_weight_names = ("lora_embeddings_a", "lora_embeddings_b")

    def __init__(self, vocabulary_size, hidden_dim, logit_soft_cap=None, **kwargs):
        super().__init__(**kwargs)
        self.vocabulary_size = vocabulary_size
        self.hidden_dim = hidden_dim
        self.logit_soft_cap = logit_soft_cap

    def build(self, input_shape=None):
        self.embeddings = self.add_weight(
            name="embeddings",
            shape=(self.vocabulary_size, self.hidden_dim),
            initializer=keras.initializers.RandomNormal(stddev=0.02),
            # Not autocast: the logits' `linear` multiplies a mixed_bfloat16
            # model's float32 table in bfloat16 itself, without a bfloat16 copy
            # per call, and a lookup casts only the rows it takes.
            autocast=False,
        )

    def compute_output_spec(self, inputs, reverse=False):
        if reverse:
            return keras.KerasTensor(tuple(inputs.shape[:-1]) + (self.vocabulary_size,), "float32")
        output_dtype = residual_dtype(self.compute_dtype)
        return keras.KerasTensor(tuple(inputs.shape) + (self.hidden_dim,), output_dtype)

    @property
    def weight_shape(self):
        return (self.vocabulary_size, self.hidden_dim)

    def call(self, inputs, reverse=False):
        if reverse:
            if self.quantization_mode is None:
                logits = linear(inputs, self.embeddings)
            else:
                arrays = self.quantized_arrays()
                logits = backend.quantized_linear(inputs, self.quantization_mode, *arrays)
            logits = ops.cast(logits, "float32")
            if self.lora_enabled:
                low_rank = ops.matmul(ops.cast(inputs, "float32"), ops.transpose(self.lora_b))
                logits = logits + ops.matmul(low_rank, ops.transpose(self.lora_a)) * self.lora_scale
            return soft_cap(logits, self.logit_soft_cap)
        check_token_ids(inputs, self.vocabulary_size)
        token_ids = ops.cast(inputs, "int32")
        if self.quantization_mode is None:
            rows = backend.take_rows(self.embeddings, token_ids)
        else:
            rows = self._dequantized_rows(token_ids)
        if self.lora_enabled:
            low_rank = ops.matmul(backend.take_rows(self.lora_a, token_ids), self.lora_b)
            rows = ops.cast(rows, "float32") + low_rank * self.lora_scale
        embedded = ops.cast(rows, self.compute_dtype)
        scale = ops.cast(math.sqrt(self.hidden_dim), self.compute_dtype)
        # A float16 model multiplies in float32: the product starts its float32 residual stream.
        stream = residual_dtype(self.compute_dtype)
        return ops.cast(embedded, stream) * ops.cast(scale, stream)

    @property
    def lora_a(self):
        return self.lora_embeddings_a

    @property
    def lora_b(self):
        return self.lora_embeddings_b

    def lora_shapes(self, rank):
        return (self.vocabulary_size, rank), (rank, self.hidden_dim)

    def lora_delta(self):
        return ops.matmul(self.lora_a, self.lora_b) * self.lora_scale

    def _dequantized_rows(self, token_ids):
        """The rows of a quantized table that `token_ids` pick, as float32."""
        flat = ops.reshape(token_ids, (-1,))
        arrays = self.quantized_arrays()
        kernel, scale, offset = (None if a is None else backend.take_rows(a, flat) for a in arrays)
        rows = quantization.dequantize(self.quantization_mode, kernel, scale, offset)
        return ops.reshape(rows, (*ops.shape(token_ids), self.hidden_dim))

    def get_config(self):
        return {
            **super().get_config(),
            "vocabulary_size": self.vocabulary_size,
            "hidden_dim": self.hidden_dim,
            "logit_soft_cap": self.logit_soft_cap,
        }
