"""Rotary position embedding (RoPE), rotate-half convention, in float32."""

from keras import ops

from gemma_keras import backends


def rotary_tables(positions, head_dim, wavelength=10_000.0, scaling_factor=1.0):
    """The `(cos, sin)` tables [batch, seq, 1, head_dim] that rotate by `positions` [batch, seq].

    Angles are computed in float32 from integer positions: bf16 positions
    would round 8191 to 8192. `scaling_factor` divides the positions (linear
    RoPE scaling, Gemma 3 global layers of 4B and larger). Every layer with
    the same wavelength shares the tables, so the model computes them once
    per call. The sine's first half is negated: see `apply_rotary_embedding`.
    """
    exponents = ops.arange(0, head_dim, 2, dtype="float32") / head_dim
    inverse_frequencies = 1.0 / ops.power(float(wavelength), exponents)
    scaled_positions = ops.cast(positions, "float32") / float(scaling_factor)
    angles = scaled_positions[..., None] * inverse_frequencies  # [batch, seq, half]
    cos = ops.cos(angles)
    sin = ops.sin(angles)
    cos = ops.concatenate([cos, cos], axis=-1)[:, :, None, :]  # broadcast over heads
    sin = ops.concatenate([-sin, sin], axis=-1)[:, :, None, :]
    return cos, sin


def apply_rotary_embedding(x, tables):
    """Rotates `x` [batch, seq, heads, head_dim] by the `rotary_tables` of its positions.

    Feature `i` of the first half of `head_dim` is paired with feature `i` of
    the second half (rotate-half, as Gemma was trained), not interleaved pairs:
    `[first * cos - second * sin, second * cos + first * sin]`, written as
    `x * cos + [second, first] * [-sin, sin]` (the same float32 operations).
    The halves swap by `backends.swap_halves`: a roll, whose gradient is a
    roll (TensorFlow's gradient of two slices and a concatenation was 2.5 ms
    against 1.1 for 256 tokens of the 270M's queries, docs/performance.md).
    """
    cos, sin = tables
    x_float = ops.cast(x, "float32")
    swapped = backends.swap_halves(x_float)
    return ops.cast(x_float * cos + swapped * sin, x.dtype)
