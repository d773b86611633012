"""Weight-only int8 and int4 forms of a `[out, in]` weight, in NumPy and in `keras.ops`.

A quantized weight `w` is held as integers `q` with one float32 scale per
group of `group_size` consecutive inputs of each output row:

- int8: `q` int8 `[out, in]` in [-127, 127], `w = q * scale` (symmetric).
  `quantize("int8")` uses one group per row (per output channel).
- int4: `q` in [0, 15], `w = q * scale + offset` (asymmetric: a group keeps
  its minimum and maximum). Two values share a byte, `[out, in // 2]` uint8,
  packed per block of 32 inputs as llama.cpp's Q4_0 packs them: byte `k` of
  a block holds input `k` in its low nibble and input `16 + k` in its high
  nibble. `quantize("int4")` uses groups of 128 (Keras' int4 block size).

GGUF blocks map onto these forms exactly where they can: Q8_0 (int8, groups
of 32), Q6_K (int8, groups of 16), Q4_0 and Q4_K (int4, groups of 32).
"""

import dataclasses

import numpy as np
from keras import ops

MODES = ("int8", "int4")
INT4_BLOCK = 32  # inputs per packing block; int4 groups are multiples of it
DEFAULT_INT4_GROUP_SIZE = 128


class QuantizationError(ValueError):
    """A weight or model that cannot be quantized as asked."""


@dataclasses.dataclass
class QuantizedWeight:
    """The arrays of one quantized `[out, in]` weight (see the module docstring)."""

    mode: str
    kernel: np.ndarray  # int8 [out, in], or uint8 [out, in // 2] for int4
    scale: np.ndarray  # float32 [out, in // group_size]
    offset: np.ndarray | None  # float32 [out, in // group_size], int4 only
    group_size: int

    @property
    def shape(self):
        rows, columns = self.kernel.shape
        return (rows, columns * 2) if self.mode == "int4" else (rows, columns)

    def arrays(self):
        """`{suffix: array}` as a layer names its variables: `""`, `"_scale"`, `"_offset"`."""
        arrays = {"": self.kernel, "_scale": self.scale}
        if self.offset is not None:
            arrays["_offset"] = self.offset
        return arrays


def check_mode(mode):
    if mode not in MODES:
        raise QuantizationError(
            f"Unknown quantization mode {mode!r}; gemma_keras quantizes weights to one of {MODES}."
        )


def default_group_size(mode, input_dim):
    return input_dim if mode == "int8" else DEFAULT_INT4_GROUP_SIZE


def check_group_size(mode, group_size, input_dim, where="the weight"):
    """Raises a one-line error unless `group_size` splits `input_dim` as `mode` needs."""
    multiple = INT4_BLOCK if mode == "int4" else 1
    valid = (
        isinstance(group_size, int)
        and group_size > 0
        and input_dim % group_size == 0
        and group_size % multiple == 0
    )
    if not valid:
        need = f"a multiple of {INT4_BLOCK} that divides" if mode == "int4" else "a divisor of"
        raise QuantizationError(
            f"{mode} group size {group_size!r} does not fit {where}: it must be {need} "
            f"its input width {input_dim}; pass `Int4QuantizationConfig(block_size=...)` "
            "with such a size."
        )


def quantize(weight, mode, group_size=None):
    """`QuantizedWeight` of a float `[out, in]` NumPy weight, rounding to nearest."""
    check_mode(mode)
    weight = np.asarray(weight, np.float32)
    rows, columns = weight.shape
    group_size = group_size or default_group_size(mode, columns)
    check_group_size(mode, group_size, columns)
    groups = weight.reshape(rows, columns // group_size, group_size)
    if mode == "int8":
        scale = np.abs(groups).max(axis=-1) / 127
        safe = np.where(scale == 0, 1, scale)[..., None]
        q = np.clip(np.rint(groups / safe), -127, 127).astype(np.int8)
        return QuantizedWeight(mode, q.reshape(rows, columns), scale, None, group_size)
    low, high = groups.min(axis=-1), groups.max(axis=-1)
    scale = (high - low) / 15
    safe = np.where(scale == 0, 1, scale)[..., None]
    q = np.clip(np.rint((groups - low[..., None]) / safe), 0, 15).astype(np.uint8)
    return QuantizedWeight(mode, pack_int4(q.reshape(rows, columns)), scale, low, group_size)


def pack_int4(q):
    """`[out, in]` values in [0, 15] -> `[out, in // 2]` uint8 (see the module docstring)."""
    rows, columns = q.shape
    blocks = np.asarray(q, np.uint8).reshape(rows, columns // INT4_BLOCK, 2, INT4_BLOCK // 2)
    packed = blocks[:, :, 0, :] | (blocks[:, :, 1, :] << 4)
    return packed.reshape(rows, columns // 2)


def unpack_int4(packed):
    """The inverse of `pack_int4`, for NumPy arrays or backend tensors: `[out, in]` int32."""
    packed = ops.cast(packed, "int32") if not isinstance(packed, np.ndarray) else packed
    rows, half = packed.shape
    blocks = ops.reshape(packed, (rows, half * 2 // INT4_BLOCK, 1, INT4_BLOCK // 2))
    low, high = blocks % 16, blocks // 16
    return ops.reshape(ops.concatenate([low, high], axis=2), (rows, half * 2))


def dequantize_numpy(quantized):
    """The float32 `[out, in]` weight that a `QuantizedWeight` stands for."""
    return np.asarray(
        dequantize(quantized.mode, quantized.kernel, quantized.scale, quantized.offset)
    )


def dequantize(mode, kernel, scale, offset=None, dtype="float32"):
    """The `[out, in]` weight of quantized arrays (NumPy or backend tensors), in `dtype`.

    Each value is computed in float32 (`q * scale + offset`) and cast once."""
    values = unpack_int4(kernel) if mode == "int4" else kernel
    rows, columns = values.shape
    groups = scale.shape[-1]
    values = ops.reshape(ops.cast(values, "float32"), (rows, groups, columns // groups))
    weight = values * ops.cast(scale, "float32")[..., None]
    if offset is not None:
        weight = weight + ops.cast(offset, "float32")[..., None]
    return ops.cast(ops.reshape(weight, (rows, columns)), dtype)
