"""Weight-only int8 and int4 forms of a `[out, in]` weight, in NumPy and in `keras.ops`.

A quantized weight `w` is held as integers `q` with one float32 scale per
group of `group_size` consecutive inputs of each output row:

- int8: `q` int8 `[out, in]` in [-127, 127], `w = q * scale` (symmetric).
  `quantize("int8")` uses one group per row (per output channel).
- int4: `q` in [0, 15], `w = q * scale + offset` (asymmetric: a group keeps
  its minimum and maximum). Two values share a byte, `[out, in // 2]` uint8,
  packed per block of 32 inputs as llama.cpp's Q4_0 packs them: byte `k` of
  a block holds input `k` in its low nibble and input `16 + k` in its high
  nibble. `quantize("int4")` uses groups of 128 (Keras' int4 block size;
  on a width 128 does not divide, the largest multiple of 32 that does).

GGUF blocks map onto these forms exactly where they can: Q8_0 (int8, groups
of 32), Q6_K (int8, groups of 16), Q4_0 and Q4_K (int4, groups of 32).
"""

import dataclasses
import numbers

import numpy as np
from keras import ops

MODES = ("int8", "int4")
INT4_BLOCK = 32  # inputs per packing block; int4 groups are multiples of it
DEFAULT_INT4_GROUP_SIZE = 128


class QuantizationError(ValueError):
    """A weight or model that cannot be quantized as asked."""


class QuantizesFloat16:
    """Keras' `quantize` refuses int8 for a float16 compute dtype. gemma_keras
    quantizes float16 models in place as `from_preset(..., quantize="int8")`
    loads them: a float16 model's residual stream is float32, and the native
    kernel takes its x as float32."""

    def _check_quantize_args(self, mode, compute_dtype):
        super()._check_quantize_args(
            mode, "float32" if compute_dtype == "float16" else compute_dtype
        )


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


def check_mode(mode, also=""):
    """Refuses modes other than `MODES`; `also` names what else the caller takes."""
    if mode not in MODES:
        raise QuantizationError(
            f"Unknown quantization mode {mode!r}; gemma_keras quantizes weights to one of "
            f"{MODES}{also}."
        )


def group_size_for(mode, input_dim, config=None, where="the weight", group_size=None):
    """The group size of `mode` for a weight `input_dim` wide: `config.block_size`
    where a Keras `QuantizationConfig` gives one (None or -1: one group per
    row), else one group per row for int8 and 128 for int4 (Keras' default
    `block_size`), or for int4 the largest multiple of 32 below 128 that
    divides the width where 128 does not."""
    block_size = getattr(config, "block_size", 0) if config is not None else 0
    if group_size is not None:
        pass
    elif block_size in (None, -1):
        group_size = input_dim
    elif block_size and block_size != DEFAULT_INT4_GROUP_SIZE:
        group_size = block_size
    elif mode == "int8":
        group_size = input_dim
    else:
        fitting = [g for g in range(DEFAULT_INT4_GROUP_SIZE, 0, -INT4_BLOCK) if input_dim % g == 0]
        group_size = fitting[0] if fitting else DEFAULT_INT4_GROUP_SIZE
    return check_group_size(mode, group_size, input_dim, where)


def check_group_size(mode, group_size, input_dim, where="the weight"):
    """`group_size` as an int, or a one-line error unless it splits `input_dim`
    as `mode` needs."""
    if isinstance(group_size, bool) or not isinstance(group_size, numbers.Integral):
        raise QuantizationError(
            f"{mode} group size must be an integer, got {group_size!r} for {where}."
        )
    group_size = int(group_size)
    multiple = INT4_BLOCK if mode == "int4" else 1
    valid = group_size > 0 and input_dim % group_size == 0 and group_size % multiple == 0
    if not valid:
        need = f"a multiple of {INT4_BLOCK} that divides" if mode == "int4" else "a divisor of"
        raise QuantizationError(
            f"{mode} group size {group_size!r} does not fit {where}: it must be {need} "
            f"its input width {input_dim}; pass `Int4QuantizationConfig(block_size=...)` "
            "with such a size."
        )
    return group_size


def quantize(weight, mode, group_size=None):
    """`QuantizedWeight` of a float `[out, in]` NumPy weight (or anything NumPy
    slices by rows, read a block of rows at a time).

    Each group starts from its range (int8: its largest magnitude; int4: its
    minimum and maximum) and then alternates rounding with a least-squares
    fit of its scale (and offset) to the rounded values, keeping whichever
    fit has the least squared error (`FIT_ROUNDS`; llama.cpp's K-quants fit
    theirs alike)."""
    check_mode(mode)
    rows, columns = weight.shape
    group_size = check_group_size(mode, group_size or group_size_for(mode, columns), columns)
    # Blocks of about 4M values, so that the fit's temporaries stay small.
    block_rows = max(1, (1 << 22) // columns)
    parts = []
    for start in range(0, rows, block_rows):
        block = np.asarray(weight[start : start + block_rows], np.float32)
        parts.append(_quantize_rows(block.reshape(len(block), -1, group_size), mode))
    q, scale, offset = (
        None if parts[0][i] is None else np.concatenate([p[i] for p in parts]) for i in range(3)
    )
    q = q.reshape(rows, columns)
    kernel = pack_int4(q) if mode == "int4" else q
    return QuantizedWeight(mode, kernel, scale, offset, group_size)


FIT_ROUNDS = 4


def _quantize_rows(groups, mode):
    """`(q, scale, offset)` of float32 `[rows, groups, group_size]` (see `quantize`)."""
    if mode == "int8":
        scale, offset, low, high = np.abs(groups).max(axis=-1) / 127, None, -127, 127
    else:
        minimum = groups.min(axis=-1)
        scale, offset, low, high = (groups.max(axis=-1) - minimum) / 15, minimum, 0, 15
    best = None
    for _ in range(FIT_ROUNDS + 1):
        safe = np.where(scale > 0, scale, 1)[..., None]
        shifted = groups if offset is None else groups - offset[..., None]
        q = np.clip(np.rint(shifted / safe), low, high)
        error = np.square(q * scale[..., None] - shifted).sum(axis=-1)
        if best is None:
            best = [q, scale, offset, error]
        else:
            better = error < best[3]
            best[0] = np.where(better[..., None], q, best[0])
            best[1] = np.where(better, scale, best[1])
            if offset is not None:
                best[2] = np.where(better, offset, best[2])
            best[3] = np.minimum(error, best[3])
        scale, offset = _least_squares(groups, q, scale, offset)
    q, scale, offset, _ = best
    q = q.astype(np.int8 if mode == "int8" else np.uint8)
    return q, scale.astype(np.float32), None if offset is None else offset.astype(np.float32)


def _least_squares(groups, q, scale, offset):
    """The scale (and offset, where there is one) that best fit `groups` as
    `q * scale + offset` for fixed `q`; groups where no fit exists keep theirs."""
    count = groups.shape[-1]
    qq, qw = np.square(q).sum(axis=-1), (q * groups).sum(axis=-1)
    if offset is None:
        fitted = qw / np.where(qq > 0, qq, 1)
        return np.where((qq > 0) & (fitted > 0), fitted, scale), None
    q_sum, w_sum = q.sum(axis=-1), groups.sum(axis=-1)
    determinant = count * qq - q_sum * q_sum
    usable = determinant > 0
    safe = np.where(usable, determinant, 1)
    fitted_scale = (count * qw - q_sum * w_sum) / safe
    fitted_offset = (w_sum - fitted_scale * q_sum) / count
    usable &= fitted_scale > 0
    return np.where(usable, fitted_scale, scale), np.where(usable, fitted_offset, offset)


def pack_int4(q):
    """`[out, in]` values in [0, 15] -> `[out, in // 2]` uint8 (see the module docstring)."""
    rows, columns = q.shape
    blocks = np.asarray(q, np.uint8).reshape(rows, columns // INT4_BLOCK, 2, INT4_BLOCK // 2)
    packed = blocks[:, :, 0, :] | (blocks[:, :, 1, :] << 4)
    return packed.reshape(rows, columns // 2)


def unpack_int4(packed):
    """The inverse of `pack_int4`, for NumPy arrays or backend tensors: `[out, in]`
    uint8. Bitwise on the bytes as stored: integer `%` and `//` on a wider copy
    took most of a PyTorch prefill (a 2B's 32-token prompt: 15 s)."""
    columns = packed.shape[-1] * 2  # rows may be unknown while a graph traces
    blocks = ops.reshape(packed, (-1, columns // INT4_BLOCK, 1, INT4_BLOCK // 2))
    low, high = ops.bitwise_and(blocks, 15), ops.right_shift(blocks, 4)
    return ops.reshape(ops.concatenate([low, high], axis=2), (-1, columns))


def dequantized_product(x, mode, kernel, scale, offset, product, dtype):
    """`x @ w.T` for a quantized weight: `w` dequantized to `dtype` and
    multiplied by `product(flat_x, weight)` (`flat_x` [rows, in]).

    An int4 weight is dequantized as its two nibble planes, `[out, in // 2]`
    each, and `x`'s inputs are split to match, two products summed: putting
    the nibbles back in input order took XLA 2-5x as long as the planes
    (docs/performance.md, "Prefill in bfloat16")."""
    columns = x.shape[-1]
    flat = ops.reshape(x, (-1, columns))
    if mode == "int8":
        out = product(flat, dequantize(mode, kernel, scale, offset, dtype))
    else:
        low, high = _int4_planes(kernel, scale, offset, dtype)
        blocks = ops.reshape(flat, (-1, columns // INT4_BLOCK, 2, INT4_BLOCK // 2))
        low_x = ops.reshape(blocks[:, :, 0, :], (-1, columns // 2))
        high_x = ops.reshape(blocks[:, :, 1, :], (-1, columns // 2))
        out = product(low_x, low) + product(high_x, high)
    return ops.reshape(out, (*ops.shape(x)[:-1], ops.shape(kernel)[0]))


def _int4_planes(kernel, scale, offset, dtype):
    """The weight's inputs held in low nibbles and those in high nibbles, each
    `[out, in // 2]` in `dtype`, in the order bytes hold them."""
    nibbles = (ops.bitwise_and(kernel, 15), ops.right_shift(kernel, 4))
    return [_scaled(values, scale, offset, dtype) for values in nibbles]


def dequantize_numpy(quantized):
    """The float32 `[out, in]` weight that a `QuantizedWeight` stands for."""
    return np.asarray(
        dequantize(quantized.mode, quantized.kernel, quantized.scale, quantized.offset)
    )


def dequantize(mode, kernel, scale, offset=None, dtype="float32"):
    """The `[out, in]` weight of quantized arrays (NumPy or backend tensors), in `dtype`.

    Each value is computed in float32 (`q * scale + offset`) and cast once."""
    return _scaled(unpack_int4(kernel) if mode == "int4" else kernel, scale, offset, dtype)


def _scaled(values, scale, offset, dtype):
    """`values * scale + offset`, one scale (and offset) per group of
    consecutive columns, in float32, cast once to `dtype`."""
    columns, groups = values.shape[-1], scale.shape[-1]
    values = ops.reshape(ops.cast(values, "float32"), (-1, groups, columns // groups))
    weight = values * ops.cast(scale, "float32")[..., None]
    if offset is not None:
        weight = weight + ops.cast(offset, "float32")[..., None]
    return ops.cast(ops.reshape(weight, (-1, columns)), dtype)
