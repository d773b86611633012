"""Checks shared by the native int8/int4 kernels' tests and the quantized
layers': the kernel's product against the dequantized weight in float64.

Tolerance: each output within 1e-5 of the sum of |x * w| that makes it (the
float32 sums' rounding is a few 1e-7 of it at these widths). On a CPU with
AVX512-VNNI the int4 loop multiplies x quantized to int8 in blocks of 32
(scale max|x| / 127): its outputs are held to the dequantized weight times
that x, at the same tolerance, and that x to within half a scale of x."""

import keras
import numpy as np

from gemma_keras import native, quantization

RELATIVE_TOLERANCE = 1e-5


def vnni_int4():
    return "vnni" in (native.quantized_instruction_set() or "")


def x_as_int8_blocks(x):
    """x as the VNNI int4 loop reads it: each block of 32 rounded to
    multiples of max|x| / 127 (in float32, as the loop computes them)."""
    blocks = x.reshape(x.shape[0], -1, 32)
    largest = np.abs(blocks).max(axis=-1, keepdims=True)
    inverse = np.where(largest > 0, np.float32(127) / np.where(largest > 0, largest, 1), 0)
    values = np.rint(blocks * inverse.astype(np.float32))
    assert np.abs(values).max() <= 127
    rounded = values * (largest.astype(np.float64) / 127)
    # half a step, and float32's rounding of x * 127 / max|x| (a few 1e-7 of 127)
    assert np.all(np.abs(rounded - blocks) <= largest / 254 * (1 + 1e-4))
    return rounded.reshape(x.shape)


def assert_matches_dequantized(out, x, quantized, int8_x=False):
    """`int8_x`: x as the VNNI int4 loop quantizes it multiplies the weight
    less its offsets, the float x the offsets. The sums the int4 loops form
    are of q * scale and of offset apart, so their size, against which the
    tolerance is set, is |x| times |q * scale| + |offset| (an outlying x
    makes the two cancel)."""
    weight = quantization.dequantize_numpy(quantized).astype(np.float64)
    expected = x.astype(np.float64) @ weight.T
    magnitude = np.abs(x.astype(np.float64)) @ np.abs(weight).T
    if quantized.mode == "int4":
        q = keras.ops.convert_to_numpy(quantization.unpack_int4(quantized.kernel))
        q = q.astype(np.float64)
        scales, offsets = (
            np.repeat(a, quantized.group_size, axis=1).astype(np.float64)
            for a in (quantized.scale, quantized.offset)
        )
        magnitude = np.abs(x.astype(np.float64)) @ (np.abs(q * scales) + np.abs(offsets)).T
        if int8_x:
            expected = x_as_int8_blocks(x) @ (q * scales).T + x.astype(np.float64) @ offsets.T
    assert out.shape == expected.shape and out.dtype == np.float32
    error = np.abs(out - expected)
    worst = np.unravel_index(np.argmax(error - RELATIVE_TOLERANCE * magnitude), error.shape)
    assert np.all(error <= RELATIVE_TOLERANCE * magnitude + 1e-30), (
        f"out{list(worst)} = {out[worst]}, expected {expected[worst]} "
        f"(|x * w| sums to {magnitude[worst]})"
    )
