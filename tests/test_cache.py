"""The KV-cache path (prefill, then one token at a time) equals the uncached forward pass."""

import keras
import numpy as np
import pytest

from conftest import VARIANTS, randomize, tiny_config, token_batch
from gemma_keras import GemmaCausalLM
from gemma_keras.checkpoints.weight_mapping import assign_weights, model_shapes

# Measured max |logit difference| in float32: ~1e-6 on every backend and variant.
TOLERANCE = 1e-4


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(
    "steps, cache_length",
    [
        # 12 tokens > the sliding window (5) of the Gemma 2/3 variants
        ([1] * 12, 16),  # token by token from the start
        ([4] + [1] * 8, 16),  # prefill, then decode
        ([3, 1, 1, 6, 1], 16),  # a later chunk longer than the window (a chat follow-up)
        ([2, 1, 1], 4),  # a cache shorter than the window: its ring is the whole cache
        ([8, 1, 1, 1], 16),  # a prefill longer than the window
    ],
)
# The first call says the cache is empty (`cache_index=None`, as `generate`'s
# prefill does: the prompt attends to itself only) or gives its slot, 0.
@pytest.mark.parametrize("first_index", [None, 0])
def test_prefill_then_decode_equals_uncached(variant, steps, cache_length, first_index):
    config = tiny_config(variant)
    model = GemmaCausalLM.from_gemma_config(config, dtype="float32")
    assign_weights(model, randomize(model_shapes(model)))
    length = sum(steps)
    token_ids = token_batch(config.vocabulary_size, batch=2, length=length)
    expected = keras.ops.convert_to_numpy(
        model({"token_ids": token_ids, "padding_mask": np.ones_like(token_ids)})
    )

    caches = model.init_cache(batch_size=2, cache_length=cache_length)
    positions = np.broadcast_to(np.arange(length, dtype="int32"), (2, length))
    start = 0
    for step in steps:
        end = start + step
        key_mask = np.zeros((2, cache_length), "int32")
        key_mask[:, :end] = 1
        logits, caches = model.call_with_cache(
            token_ids[:, start:end],
            key_mask,
            positions[:, start:end],
            caches,
            first_index if start == 0 else start,
        )
        error = np.abs(keras.ops.convert_to_numpy(logits) - expected[:, start:end]).max()
        assert error <= TOLERANCE, (variant, start, error)
        start = end


def test_local_layers_cache_only_the_window():
    config = tiny_config("gemma3")
    model = GemmaCausalLM.from_gemma_config(config)
    caches = model.init_cache(batch_size=3, cache_length=64)
    for layer_type, (key_cache, value_cache) in zip(config.layer_types, caches, strict=True):
        slots = config.sliding_window if layer_type == "local" else 64
        assert tuple(key_cache.shape) == (3, slots, config.num_key_value_heads, config.head_dim)
        assert tuple(value_cache.shape) == tuple(key_cache.shape)
