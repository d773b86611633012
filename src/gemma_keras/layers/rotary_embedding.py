"""Rotary position embedding (RoPE), rotate-half convention, in float32."""

from keras import ops


def apply_rotary_embedding(x, positions, wavelength=10_000.0, scaling_factor=1.0):
    """Rotates `x` [batch, seq, heads, head_dim] by its integer `positions` [batch, seq].

    Feature `i` of the first half of `head_dim` is paired with feature `i` of
    the second half (rotate-half, as Gemma was trained), not interleaved pairs.
    Angles are computed in float32 from integer positions: bf16 positions
    would round 8191 to 8192. `scaling_factor` divides the positions (linear
    RoPE scaling, Gemma 3 global layers of 4B and larger).
    """
    head_dim = x.shape[-1]
    half = head_dim // 2
    exponents = ops.arange(0, head_dim, 2, dtype="float32") / head_dim
    inverse_frequencies = 1.0 / ops.power(float(wavelength), exponents)
    scaled_positions = ops.cast(positions, "float32") / float(scaling_factor)
    angles = scaled_positions[..., None] * inverse_frequencies  # [batch, seq, half]
    cos = ops.cos(angles)[:, :, None, :]  # broadcast over heads
    sin = ops.sin(angles)[:, :, None, :]
    x_float = ops.cast(x, "float32")
    first, second = x_float[..., :half], x_float[..., half:]
    rotated = ops.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
    return ops.cast(rotated, x.dtype)
