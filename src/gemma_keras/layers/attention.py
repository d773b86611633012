"""Gemma attention: MHA, MQA and GQA with an optional KV cache."""

import dataclasses

import keras
from keras import ops

from gemma_keras.backends import einsum, softmax, write_slots
from gemma_keras.layers.precision import FLOAT16_MAX
from gemma_keras.layers.projection import Projection, project
from gemma_keras.layers.rms_norm import RMSNorm
from gemma_keras.layers.rotary_embedding import apply_rotary_embedding, rotary_tables
from gemma_keras.layers.soft_cap import soft_cap

# Masked logits are replaced (not added to), so the most negative float32 is
# safe: a fully masked row (a padding query) becomes uniform, never NaN.
_MASKED_LOGIT = -3.4e38


def attention_mask(key_mask, query_slots, key_slots, sliding_window=None):
    """Which keys each query may see: `[batch, queries, keys]` booleans.

    `key_mask` [batch, keys] marks real (non-padding) keys; `query_slots`
    [queries] and `key_slots` [keys] are the slots in the sequence (or cache)
    that queries and keys occupy. A query sees keys at its own slot or
    earlier, and with `sliding_window` only the `sliding_window` most recent
    of them (its own included).
    """
    distance = query_slots[:, None] - key_slots[None, :]
    allowed = distance >= 0
    if sliding_window is not None:
        allowed = ops.logical_and(allowed, distance < sliding_window)
    return ops.logical_and(ops.cast(key_mask, "bool")[:, None, :], allowed[None, :, :])


class Attention(keras.layers.Layer):
    """Multi-head attention with rotary embeddings, serving MHA, MQA and GQA.

    Keys and values keep their `num_key_value_heads` heads; queries are
    grouped `[kv_head, group]` so the K/V heads are never repeated in memory.

    Call with `x` [batch, seq, hidden] and `plan=`, the `AttentionPlan` that
    `layer.plan(positions, key_mask, cache, cache_index)` makes from the RoPE
    `positions` [batch, seq] and `key_mask` (1 for real tokens). Without a
    cache the keys are `x` itself and the result is the output
    [batch, seq, hidden].

    With `cache=(key_cache, value_cache)` the new tokens occupy sequence slots
    `cache_index ... cache_index + seq - 1`, `key_mask` [batch, total_slots]
    marks which sequence slots hold real tokens, and the result is
    `(output, updated_cache)`. `cache_index=None` says the cache is empty (a
    first prefill): the tokens go to slots `0 ... seq - 1` and attend only to
    each other, not to the cache's empty slots. A global layer's cache has one entry per
    sequence slot ([batch, total_slots, kv_heads, head_dim]); a local
    (sliding-window) layer's cache is a ring buffer of at most
    `sliding_window` entries, whatever the context length.

    In a float16 model, logits whose float16 product overflowed to +-inf
    are clipped to +-65504 (the softmax of an inf is NaN); such a logit
    outweighs the others entirely either way.

    Example:

    >>> import numpy as np
    >>> layer = Attention(hidden_dim=16, num_query_heads=4, num_key_value_heads=1,
    ...                   head_dim=8)
    >>> x = np.zeros((1, 5, 16), "float32")
    >>> plan = layer.plan(positions=np.arange(5)[None], key_mask=np.ones((1, 5)))
    >>> tuple(layer(x, plan=plan).shape)
    (1, 5, 16)
    """

    def __init__(
        self,
        hidden_dim,
        num_query_heads,
        num_key_value_heads,
        head_dim,
        query_pre_attn_scalar=None,
        attention_logit_soft_cap=None,
        sliding_window=None,
        rope_wavelength=10_000.0,
        rope_scaling_factor=1.0,
        use_qk_norm=False,
        layer_norm_epsilon=1e-6,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.hidden_dim = hidden_dim
        self.num_query_heads = num_query_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim
        self.query_pre_attn_scalar = query_pre_attn_scalar
        self.attention_logit_soft_cap = attention_logit_soft_cap
        self.sliding_window = sliding_window
        self.rope_wavelength = rope_wavelength
        self.rope_scaling_factor = rope_scaling_factor
        self.use_qk_norm = use_qk_norm
        self.layer_norm_epsilon = layer_norm_epsilon
        self.num_groups = num_query_heads // num_key_value_heads
        self.query_scale = (query_pre_attn_scalar or head_dim) ** -0.5
        query_dim = num_query_heads * head_dim
        key_value_dim = num_key_value_heads * head_dim

        def projection(input_dim, output_dim, name):
            return Projection(input_dim, output_dim, dtype=self.dtype_policy, name=name)

        self.query = projection(hidden_dim, query_dim, "query")
        self.key = projection(hidden_dim, key_value_dim, "key")
        self.value = projection(hidden_dim, key_value_dim, "value")
        self.output_projection = projection(query_dim, hidden_dim, "output")
        if use_qk_norm:
            self.query_norm = RMSNorm(
                layer_norm_epsilon, dtype=self.dtype_policy, name="query_norm"
            )
            self.key_norm = RMSNorm(layer_norm_epsilon, dtype=self.dtype_policy, name="key_norm")

    def build(self, *args, **kwargs):
        for projection in (self.query, self.key, self.value, self.output_projection):
            projection.build()
        if self.use_qk_norm:
            self.query_norm.build((None, None, None, self.head_dim))
            self.key_norm.build((None, None, None, self.head_dim))

    @property
    def plan_key(self):
        """Layers with equal keys can share one `plan` per call."""
        return (self.head_dim, self.rope_wavelength, self.rope_scaling_factor, self.sliding_window)

    def plan(self, positions, key_mask, cache=None, cache_index=None):
        """What a call computes besides the projections: an `AttentionPlan`.

        `positions` [batch, seq] are the new tokens' RoPE positions. Without a
        cache, `key_mask` [batch, seq] marks real tokens; with `cache`, the new
        tokens occupy sequence slots `cache_index ...` (None: the cache is
        empty, see the class docstring) and `key_mask` [batch, total_slots]
        marks which sequence slots hold real tokens. The
        plan depends on the layer only through `plan_key`, so the backbone
        makes one per kind of layer and step instead of one per layer.
        """
        length = ops.shape(positions)[1]
        rotary = rotary_tables(
            positions, self.head_dim, self.rope_wavelength, self.rope_scaling_factor
        )
        query_slots = ops.arange(length, dtype="int32")
        write_slot = ring_write = None
        new_keys_only = cache is None or cache_index is None
        if cache is None:
            key_slots, key_valid = query_slots, key_mask
        elif cache_index is None:
            key_slots, key_valid = query_slots, key_mask[:, :length]
            if self.sliding_window:
                ring_write = _ring_write(0, length, ops.shape(cache[0])[1])
            else:
                write_slot = 0
        else:
            cache_index = ops.cast(cache_index, "int32")
            query_slots = query_slots + cache_index
            slots = ops.shape(cache[0])[1]
            if not self.sliding_window:
                key_slots, key_valid = ops.arange(slots, dtype="int32"), key_mask
                write_slot = cache_index
            elif _static_size(length) == 1:  # decoding
                key_slots, key_valid, write_slot = _ring_layout_one_token(
                    key_mask, cache_index, slots
                )
            else:
                key_slots, key_valid, ring_write = _ring_layout(
                    key_mask, cache_index, length, slots
                )
        mask = attention_mask(key_valid, query_slots, key_slots, self.sliding_window)
        return AttentionPlan(
            rotary, mask[:, None, None, :, :], write_slot, ring_write, new_keys_only
        )

    def call(self, x, plan, cache=None):
        batch, length = ops.shape(x)[0], ops.shape(x)[1]
        query, key, value = (
            ops.reshape(projected, (batch, length, heads, self.head_dim))
            for projected, heads in zip(
                project(x, [self.query, self.key, self.value]),
                [self.num_query_heads, self.num_key_value_heads, self.num_key_value_heads],
                strict=True,
            )
        )
        if self.use_qk_norm:
            query = self.query_norm(query)
            key = self.key_norm(key)
        query = apply_rotary_embedding(query, plan.rotary)
        key = apply_rotary_embedding(key, plan.rotary)

        keys, values, new_cache = key, value, None
        if cache is not None:
            keys = key = ops.cast(key, cache[0].dtype)
            values = value = ops.cast(value, cache[1].dtype)
            new_cache = self._write(cache, key, value, plan)
        if not plan.new_keys_only and plan.ring_write is None:
            keys, values = new_cache  # the whole cache, the new keys written
        elif not plan.new_keys_only:  # the ring as it was, then the new keys (see `_ring_layout`)
            keys = ops.concatenate([cache[0], key], axis=1)
            values = ops.concatenate([cache[1], value], axis=1)

        query = query * ops.cast(self.query_scale, query.dtype)
        query = ops.reshape(
            query, (batch, length, self.num_key_value_heads, self.num_groups, self.head_dim)
        )
        logits = einsum("bskgh,btkh->bkgst", query, ops.cast(keys, query.dtype))
        logits = ops.cast(logits, "float32")
        if self.compute_dtype == "float16":
            logits = ops.clip(logits, -FLOAT16_MAX, FLOAT16_MAX)
        logits = soft_cap(logits, self.attention_logit_soft_cap)
        logits = ops.where(plan.mask, logits, _MASKED_LOGIT)
        probabilities = ops.cast(softmax(logits), self.compute_dtype)
        attended = einsum("bkgst,btkh->bskgh", probabilities, ops.cast(values, self.compute_dtype))
        attended = ops.reshape(attended, (batch, length, self.num_query_heads * self.head_dim))
        output = self.output_projection(attended)
        if cache is None:
            return output
        return output, new_cache

    def _write(self, cache, key, value, plan):
        """The cache with the new keys and values written: from slot
        `plan.write_slot` (a global layer, or a local layer's ring taking one
        new token, whose write overwrites only a key just outside the
        window), or into the ring slots `plan.ring_write` names."""
        key_cache, value_cache = cache
        if plan.ring_write is None:
            key_cache = write_slots(key_cache, plan.write_slot, key)
            value_cache = write_slots(value_cache, plan.write_slot, value)
        else:
            source, from_new = plan.ring_write
            key_cache = ops.where(from_new, ops.take(key, source, axis=1), key_cache)
            value_cache = ops.where(from_new, ops.take(value, source, axis=1), value_cache)
        return key_cache, value_cache

    def get_config(self):
        return {
            **super().get_config(),
            "hidden_dim": self.hidden_dim,
            "num_query_heads": self.num_query_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "query_pre_attn_scalar": self.query_pre_attn_scalar,
            "attention_logit_soft_cap": self.attention_logit_soft_cap,
            "sliding_window": self.sliding_window,
            "rope_wavelength": self.rope_wavelength,
            "rope_scaling_factor": self.rope_scaling_factor,
            "use_qk_norm": self.use_qk_norm,
            "layer_norm_epsilon": self.layer_norm_epsilon,
        }


@dataclasses.dataclass(frozen=True)
class AttentionPlan:
    """The per-call inputs of `Attention.call` that do not depend on the layer's weights.

    A dataclass, not a tuple: Keras casts the float tensors found in a layer's
    arguments to its compute dtype, and the RoPE tables must stay float32.
    """

    rotary: tuple  # (cos, sin) from `rotary_tables`
    mask: object  # [batch, 1, 1, queries, keys] booleans, keys as the layer lays them out
    write_slot: object = None  # the cache slot the new keys are written from (see `_write`)
    ring_write: tuple | None = None  # (source, from_new) of `_ring_write`: several new tokens
    new_keys_only: bool = False  # attend to the new keys only: no cache, or an empty one


def _ring_layout_one_token(key_mask, cache_index, capacity):
    """`_ring_layout` for one new token, written into the ring before the
    query attends over it (no copy of the ring plus the key): returns the
    ring's sequence slots after the write [capacity], whether each holds a
    real token [batch, capacity], and the token's ring slot. The key it
    overwrites is `capacity` slots back, outside the window (a ring shorter
    than the window is never filled past its length)."""
    key_slots = _slots_held(cache_index, capacity)
    return key_slots, _holds_real_token(key_mask, key_slots), ops.mod(cache_index, capacity)


def _static_size(size):
    """`size` as an int where the graph's shapes are fixed (torch's trace records
    sizes as tensors), else None (a graph traced for any length)."""
    try:
        return int(size)
    except TypeError:
        return None


def _slots_held(last_written, capacity):
    """The latest sequence slot <= `last_written` that each ring slot holds (< 0: empty)."""
    ring = ops.arange(capacity, dtype="int32")
    return last_written - ops.mod(last_written - ring, capacity)


def _holds_real_token(key_mask, slots):
    """[batch, len(slots)]: whether each sequence slot is filled and real."""
    real = ops.cast(ops.take(key_mask, ops.maximum(slots, 0), axis=1), "bool")
    return ops.logical_and(slots >= 0, real)


def _ring_layout(key_mask, cache_index, length, capacity):
    """Where keys live in a local layer's ring buffer of `capacity` slots (the window, or less).

    Sequence slot `s` lives in ring slot `s % capacity`. The queries attend over
    the ring as it was followed by the `length` new keys; returns those keys'
    sequence slots [capacity + length], whether each holds a real token
    [batch, capacity + length], and the write `(source, from_new)`: after the
    call ring slot `r` holds new key `source[r]` where `from_new[r]`, else what
    it held.
    """
    old_slots = _slots_held(cache_index - 1, capacity)
    new_slots = cache_index + ops.arange(length, dtype="int32")
    new_valid = ops.cast(ops.take(key_mask, new_slots, axis=1), "bool")
    key_slots = ops.concatenate([old_slots, new_slots], axis=0)
    key_valid = ops.concatenate([_holds_real_token(key_mask, old_slots), new_valid], axis=1)
    return key_slots, key_valid, _ring_write(cache_index, length, capacity)


def _ring_write(cache_index, length, capacity):
    """`(source, from_new)`: after `length` new keys from sequence slot
    `cache_index`, ring slot `r` holds new key `source[r]` where `from_new[r]`,
    else what it held."""
    kept_slots = _slots_held(cache_index + length - 1, capacity)
    from_new = (kept_slots >= cache_index)[None, :, None, None]
    source = ops.clip(kept_slots - cache_index, 0, length - 1)
    return source, from_new
