"""Checks shared by the native int8/int4 kernels' tests and the quantized
layers': the kernel's product against the dequantized weight in float64.

Tolerance: each output within 1e-5 of the sum of |x * w| that makes it (the
float32 sums' rounding is a few 1e-7 of it at these widths). On a CPU with
AVX512-VNNI the loops multiply x quantized to integers (int4: int8 in blocks
of 32 inputs, scale max|x| / 127; int8: 16 bits per row, scale max|x| /
32767): their outputs are held to the dequantized weight times that x, at
the same tolerance, and that x to within half a scale of x."""

import keras
import numpy as np

from gemma_keras import native, quantization

RELATIVE_TOLERANCE = 1e-5
# The VNNI loops' x: (inputs per scale, or None for the row; largest integer).
X_QUANTIZATION = {"int4": (32, 127), "int8": (None, 32767)}


def vnni():
    """Whether the kernels' own loops quantize x (AVX512-VNNI)."""
    return "vnni" in (native.quantized_instruction_set() or "")


def x_as_the_vnni_loops_read_it(x, mode):
    """x as the VNNI loops of `mode` read it: each block (or row) rounded to
    multiples of max|x| / largest (in float32, as the loops compute them)."""
    block, top = X_QUANTIZATION[mode]
    blocks = x.reshape(x.shape[0], -1, block or x.shape[1])
    largest = np.abs(blocks).max(axis=-1, keepdims=True)
    inverse = np.where(largest > 0, np.float32(top) / np.where(largest > 0, largest, 1), 0)
    values = np.rint(blocks * inverse.astype(np.float32))
    assert np.abs(values).max() <= top
    rounded = values * (largest.astype(np.float64) / top)
    # half a step, and float32's rounding of x * top / max|x| (a few 1e-7 of top steps)
    assert np.all(np.abs(rounded - blocks) <= largest / top * (0.5 + top * 2.4e-7))
    return rounded.reshape(x.shape)


def assert_matches_dequantized(out, x, quantized, int8_x=False):
    """`int8_x`: x as the VNNI loops quantize it multiplies the weight (int4:
    less its offsets, which the float x multiplies). The sums the int4 loops form
    are of q * scale and of offset apart, so their size, against which the
    tolerance is set, is |x| times |q * scale| + |offset| (an outlying x
    makes the two cancel)."""
    weight = quantization.dequantize_numpy(quantized).astype(np.float64)
    expected = x.astype(np.float64) @ weight.T
    magnitude = np.abs(x.astype(np.float64)) @ np.abs(weight).T
    if int8_x and quantized.mode == "int8":
        expected = x_as_the_vnni_loops_read_it(x, "int8") @ weight.T
    if quantized.mode == "int4":
        q = keras.ops.convert_to_numpy(quantization.unpack_int4(quantized.kernel))
        q = q.astype(np.float64)
        scales, offsets = (
            np.repeat(a, quantized.group_size, axis=1).astype(np.float64)
            for a in (quantized.scale, quantized.offset)
        )
        magnitude = np.abs(x.astype(np.float64)) @ (np.abs(q * scales) + np.abs(offsets)).T
        if int8_x:
            expected = (
                x_as_the_vnni_loops_read_it(x, "int4") @ (q * scales).T
                + x.astype(np.float64) @ offsets.T
            )
    assert out.shape == expected.shape and out.dtype == np.float32
    error = np.abs(out - expected)
    worst = np.unravel_index(np.argmax(error - RELATIVE_TOLERANCE * magnitude), error.shape)
    assert np.all(error <= RELATIVE_TOLERANCE * magnitude + 1e-30), (
        f"out{list(worst)} = {out[worst]}, expected {expected[worst]} "
        f"(|x * w| sums to {magnitude[worst]})"
    )
