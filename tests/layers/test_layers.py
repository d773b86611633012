"""Each layer against the formula it implements, written out in numpy."""

import keras
import numpy as np
import pytest

from gemma_keras.layers import (
    Attention,
    FeedForward,
    RMSNorm,
    apply_rotary_embedding,
    rotary_tables,
)

to_numpy = keras.ops.convert_to_numpy
rng = np.random.default_rng(0)


def test_rms_norm_uses_one_plus_scale_in_float32():
    x = rng.normal(size=(2, 3, 16)).astype("float32")
    scale = rng.normal(size=(16,)).astype("float32")
    norm = RMSNorm(epsilon=1e-6)
    norm.build(x.shape)
    norm.scale.assign(scale)
    expected = x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + 1e-6) * (1 + scale)
    np.testing.assert_allclose(to_numpy(norm(x)), expected, atol=1e-5)
    fresh = RMSNorm()
    assert np.all(to_numpy(fresh(x)) != 0) and np.allclose(
        to_numpy(fresh(x)), x / np.sqrt(np.mean(x**2, -1, keepdims=True) + 1e-6), atol=1e-5
    )
    assert RMSNorm.from_config(norm.get_config()).epsilon == 1e-6


def numpy_rope(x, positions, wavelength, scaling_factor):
    half = x.shape[-1] // 2
    inverse = 1.0 / wavelength ** (np.arange(0, x.shape[-1], 2) / x.shape[-1])
    angles = (positions[..., None] / scaling_factor) * inverse
    cos, sin = np.cos(angles)[:, :, None], np.sin(angles)[:, :, None]
    first, second = x[..., :half], x[..., half:]
    return np.concatenate([first * cos - second * sin, second * cos + first * sin], -1)


@pytest.mark.parametrize("wavelength,scaling_factor", [(10_000.0, 1.0), (1_000_000.0, 8.0)])
def test_rotary_embedding_rotate_half(wavelength, scaling_factor):
    x = rng.normal(size=(1, 4, 2, 8))
    positions = np.array([[0, 1, 8190, 8191]])
    expected = numpy_rope(x, positions, wavelength, scaling_factor)
    actual = to_numpy(
        apply_rotary_embedding(
            x.astype("float32"), rotary_tables(positions, 8, wavelength, scaling_factor)
        )
    )
    np.testing.assert_allclose(actual, expected, atol=2e-3)
    # Positions 8190 and 8191 stay distinct (bf16 positions would merge them).
    assert not np.allclose(actual[0, 2], actual[0, 3])


def test_rotary_embedding_keeps_bfloat16_positions_exact():
    x = np.ones((1, 2, 1, 8), "float32")
    rotated = to_numpy(
        keras.ops.cast(
            apply_rotary_embedding(
                keras.ops.cast(x, "bfloat16"), rotary_tables(np.array([[8190, 8191]]), 8)
            ),
            "float32",
        )
    )
    assert not np.array_equal(rotated[0, 0], rotated[0, 1])


def test_feed_forward_formula():
    x = rng.normal(size=(2, 3, 8)).astype("float32")
    ffn = FeedForward(hidden_dim=8, intermediate_dim=16)
    ffn.build(x.shape)
    gate, up, down = (to_numpy(p.kernel) for p in (ffn.gate, ffn.up, ffn.down))

    def gelu_tanh(v):
        return 0.5 * v * (1 + np.tanh(np.sqrt(2 / np.pi) * (v + 0.044715 * v**3)))

    expected = (gelu_tanh(x @ gate.T) * (x @ up.T)) @ down.T
    np.testing.assert_allclose(to_numpy(ffn(x)), expected, atol=1e-5)


def numpy_attention(x, weights, num_heads, num_kv_heads, head_dim, scalar, cap, window):
    batch, length, _ = x.shape
    positions = np.broadcast_to(np.arange(length), (batch, length))
    q = (x @ weights["query"].T).reshape(batch, length, num_heads, head_dim)
    k = (x @ weights["key"].T).reshape(batch, length, num_kv_heads, head_dim)
    v = (x @ weights["value"].T).reshape(batch, length, num_kv_heads, head_dim)
    q, k = numpy_rope(q, positions, 10_000.0, 1.0), numpy_rope(k, positions, 10_000.0, 1.0)
    # Plain MHA with K/V heads repeated, as a reference for the grouped einsum.
    group = num_heads // num_kv_heads
    k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
    logits = np.einsum("bshd,bthd->bhst", q * scalar**-0.5, k)
    if cap:
        logits = cap * np.tanh(logits / cap)
    i, j = np.arange(length)[:, None], np.arange(length)[None, :]
    allowed = (j <= i) & ((i - j < window) if window else True)
    logits = np.where(allowed, logits, -np.inf)
    probabilities = np.exp(logits - logits.max(-1, keepdims=True))
    probabilities /= probabilities.sum(-1, keepdims=True)
    out = np.einsum("bhst,bthd->bshd", probabilities, v).reshape(batch, length, -1)
    return out @ weights["output"].T


@pytest.mark.parametrize("num_kv_heads", [1, 2, 4])  # MQA, GQA, MHA
@pytest.mark.parametrize("cap,window,scalar", [(None, None, None), (50.0, 3, 12.0)])
def test_attention_against_repeated_kv_reference(num_kv_heads, cap, window, scalar):
    hidden, heads, head_dim = 16, 4, 8
    layer = Attention(
        hidden,
        heads,
        num_kv_heads,
        head_dim,
        query_pre_attn_scalar=scalar,
        attention_logit_soft_cap=cap,
        sliding_window=window,
    )
    x = rng.normal(size=(2, 7, hidden)).astype("float32")
    layer.build(x.shape)
    weights = {}
    for name in ("query", "key", "value", "output"):
        variable = getattr(layer, "output_projection" if name == "output" else name).kernel
        weights[name] = rng.normal(scale=0.3, size=variable.shape).astype("float32")
        variable.assign(weights[name])
    positions = np.broadcast_to(np.arange(7), (2, 7))
    actual = to_numpy(layer(x, plan=layer.plan(positions, np.ones((2, 7), "int32"))))
    expected = numpy_attention(
        x, weights, heads, num_kv_heads, head_dim, scalar or head_dim, cap, window
    )
    np.testing.assert_allclose(actual, expected, atol=1e-4)
    clone = Attention.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()
