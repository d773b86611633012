"""GPTQ (Frantar et al., 2022, arXiv:2210.17323): calibrated int4/int8 weights.

Rounding each weight to its nearest level (`quantization.quantize`) treats
every input alike. GPTQ quantizes a `[out, in]` weight `W` one input column
at a time and spreads each column's rounding error over the columns still
to come, so that the layer's outputs `X W^T` on calibration inputs `X` move
as little as possible. It needs only `H = X^T X`, the Hessian of that
squared output error, summed over the calibration tokens.

>>> import keras
>>> config = keras.quantizers.GPTQConfig(
...     dataset=["Some text like the text the model will see.", "More of it."],
...     tokenizer=model.tokenizer, weight_bits=4, group_size=32,
...     num_samples=16, sequence_length=512)  # doctest: +SKIP
>>> model.quantize("gptq", config=config)  # doctest: +SKIP
>>> model.backbone.token_embedding.quantization_mode  # doctest: +SKIP
'int4'

The result is stored in the forms of `gemma_keras.quantization`: weight_bits
4 gives "int4" (asymmetric groups; `symmetric=True` fixes each group's
offset at `-8 * scale`), 8 gives "int8" (symmetric whatever `symmetric`
says: the int8 form has no offset). `group_size` -1 is one group per row.
The native kernels, presets and QLoRA take the result as they take
`quantize("int4")`'s. `per_channel` and `quantization_layer_structure` are
not read (`group_size=-1` is per channel; the structure is Gemma's own).

How `quantize_backbone` calibrates (sequentially, as the paper does): the
calibration tokens run through the model one decoder block at a time. Each
block's projections record their inputs (`H` per projection), are quantized,
and the block runs again, quantized, to give the next block its inputs; the
blocks are thus calibrated on what the quantized blocks before them compute.
The tied embedding is quantized last, for its logits direction: `H` of the
final-normed hidden states that multiply it; its lookup direction reads the
same quantized table.
"""

import contextlib
import dataclasses

import numpy as np
from keras import ops

from gemma_keras import quantization
from gemma_keras.quantization import QuantizationError

BLOCK_COLUMNS = 128  # columns whose updates are applied lazily, as one product
ROW_CHUNK_VALUES = 1 << 22  # rows are independent: the embedding goes a chunk at a time
MODE_OF_BITS = {4: "int4", 8: "int8"}


def check_config(config, layers):
    """`(mode, {path: group_size})` for quantizing `layers` ({path: layer})
    as `config` asks, or a one-line `QuantizationError`."""
    # Keras has GPTQConfig from 3.12 on; older ones never reach here ("gptq" is not a mode there).
    from keras.quantizers import GPTQConfig

    if not isinstance(config, GPTQConfig):
        raise QuantizationError(
            f"quantize('gptq') takes `config=keras.quantizers.GPTQConfig(...)`, got "
            f"{type(config).__name__}."
        )
    if config.dataset is None:
        raise QuantizationError(
            "GPTQConfig.dataset is None: GPTQ calibrates on data; pass `dataset=` a list of "
            "texts (with `tokenizer=model.tokenizer`) or of token id arrays."
        )
    if config.weight_bits not in MODE_OF_BITS:
        raise QuantizationError(
            f"GPTQConfig.weight_bits={config.weight_bits} is not stored by gemma_keras: pass "
            "weight_bits=4 (its int4 form) or weight_bits=8 (its int8 form)."
        )
    mode = MODE_OF_BITS[config.weight_bits]
    multiple = quantization.INT4_BLOCK if mode == "int4" else 1
    group_sizes = {}
    for path, layer in layers.items():
        columns = layer.weight_shape[1]
        group_size = columns if config.group_size == -1 else config.group_size
        if columns % group_size or group_size % multiple:
            need = f"a multiple of {multiple} that divides" if mode == "int4" else "a divisor of"
            raise QuantizationError(
                f"GPTQConfig.group_size={config.group_size} does not fit {path}: {mode} needs "
                f"{need} its input width {columns} (or -1: one group per row)."
            )
        group_sizes[path] = group_size
    return mode, group_sizes


BATCH_TOKENS = 8192  # calibration tokens per forward call


def calibration_batches(config):
    """The token ids that calibrate, as int32 `[batch, length]` arrays: at most
    `config.num_samples` samples of at most `config.sequence_length` tokens,
    batched by length (about `BATCH_TOKENS` per batch).

    Texts are tokenized and joined into one stream, from which the samples are
    windows spread evenly over it, each behind `<bos>` (Gemma's activations
    without it are not the ones it runs with). Token id arrays are samples as
    they are (give them their `<bos>`), cut to `sequence_length`."""
    items = list(config.dataset)
    if not items:
        raise QuantizationError("GPTQConfig.dataset is empty: give it texts or token id arrays.")
    length = config.sequence_length
    if isinstance(items[0], str):
        samples = _text_windows(items, config.tokenizer, length, config.num_samples)
    else:
        samples = [np.asarray(item, np.int32).reshape(-1)[:length] for item in items]
        samples = [sample for sample in samples[: config.num_samples] if sample.size]
    batches = []
    for size in sorted({len(sample) for sample in samples}):
        same = np.stack([sample for sample in samples if len(sample) == size])
        step = max(1, BATCH_TOKENS // size)
        batches.extend(same[start : start + step] for start in range(0, len(same), step))
    return batches


def _text_windows(texts, tokenizer, length, count):
    if tokenizer is None:
        raise QuantizationError(
            "GPTQConfig.tokenizer is None but the dataset holds texts: pass "
            "`tokenizer=model.tokenizer`."
        )
    stream = np.concatenate(
        [np.asarray(tokenizer.encode(text, add_bos=False), np.int32) for text in texts]
    )
    window = min(length - 1, stream.size)
    count = max(1, min(count, stream.size // max(window, 1)))
    starts = np.linspace(0, stream.size - window, count).astype(int)
    bos = np.int32(tokenizer.bos_id)
    return [np.concatenate([[bos], stream[start : start + window]]) for start in starts]


def quantize_backbone(backbone, layers, config):
    """Quantizes `layers` ({path: layer}, a subset of `backbone.lora_layers()`,
    all float and without LoRA) of `backbone` with GPTQ, calibrated as the
    module docstring says."""
    mode, group_sizes = check_config(config, layers)
    batches = calibration_batches(config)

    def quantize_layers(paths, hessian):
        # Layers that share their input (query, key, value; gate, up) share
        # H and its factor: their rows are quantized as one weight.
        chosen = [layers[path] for path in paths]
        weight = np.concatenate([ops.convert_to_numpy(layer.float_weight()) for layer in chosen])
        factor = hessian_factor(hessian, config.hessian_damping, config.activation_order)
        group_size = group_sizes[paths[0]]
        quantized = gptq_quantize(weight, factor, mode, group_size, config.symmetric)
        first = 0
        for layer in chosen:
            rows = layer.weight_shape[0]
            layer.build_quantized(mode, group_size)
            layer.assign_quantized(_rows(quantized, first, first + rows))
            first += rows

    # Hidden states as NumPy between blocks: on torch, tensors would keep the
    # autograd graph of every block before them.
    hidden = [ops.convert_to_numpy(backbone.token_embedding(ids)) for ids in batches]
    for block in backbone.decoder_blocks:

        def run(x, block=block):  # every token is real: the padding mask is all ones
            return ops.convert_to_numpy(block(x, np.ones(x.shape[:2], "int32")))

        chosen = {path: layers[path] for path in layers if path.split("/")[0] == block.name}
        if chosen:
            for paths, hessian in input_hessians(chosen, run, hidden):
                quantize_layers(paths, hessian)
        hidden = [run(x) for x in hidden]
    if "token_embedding" in layers:
        final = (ops.convert_to_numpy(backbone.final_norm(x)) for x in hidden)
        quantize_layers(["token_embedding"], sum(_gram(x) for x in final))


def input_hessians(layers, run, inputs):
    """`[(paths, X^T X)]`: the inputs `X` that `layers` ({path: layer}) receive
    while `run(x)` runs for each `x` of `inputs`, one float64 `X^T X` per
    input that several layers share (`paths` in the order they were called)."""
    received = []  # (path, input) pairs of one run
    sharing = {}  # first path of an input -> the paths that receive the same input
    hessians = {}
    with _recording_inputs(layers, received):
        for x in inputs:
            run(x)
            seen = {}  # id of an input -> the first path that received it
            for path, layer_input in received:
                first = seen.setdefault(id(layer_input), path)
                if first == path:
                    hessians[path] = hessians.get(path, 0.0) + _gram(layer_input)
                sharing.setdefault(first, [])
                if path not in sharing[first]:
                    sharing[first].append(path)
            received.clear()
    return [(paths, hessians[first]) for first, paths in sharing.items()]


def _gram(x):
    """`X^T X` in float64 of activations `[..., width]` (each product in float32)."""
    x = np.asarray(ops.convert_to_numpy(x), np.float32).reshape(-1, x.shape[-1])
    return (x.T @ x).astype(np.float64)


@contextlib.contextmanager
def _recording_inputs(layers, received):
    """While active, each call of a layer of `layers` ({path: layer}) appends
    `(path, its input)` to `received`."""
    for path, layer in layers.items():

        def recording(x, *args, _call=layer.call, _path=path, **kwargs):
            received.append((_path, x))
            return _call(x, *args, **kwargs)

        object.__setattr__(layer, "call", recording)
    try:
        yield
    finally:
        for layer in layers.values():
            object.__delattr__(layer, "call")  # back to the class's `call`


def _rows(quantized, first, last):
    """The `QuantizedWeight` of rows `first:last` of `quantized`."""
    offset = None if quantized.offset is None else quantized.offset[first:last]
    return quantization.QuantizedWeight(
        quantized.mode,
        quantized.kernel[first:last],
        quantized.scale[first:last],
        offset,
        quantized.group_size,
    )


@dataclasses.dataclass
class HessianFactor:
    """What GPTQ needs of a layer's `H = X^T X` (see `hessian_factor`)."""

    order: np.ndarray  # the input columns in the order they are quantized
    upper: np.ndarray  # float32 [in, in]: upper Cholesky factor of the damped H^-1, in `order`
    activation_order: bool


def hessian_factor(hessian, damping=0.01, activation_order=False):
    """The `HessianFactor` of `hessian` `[in, in]`: `damping` adds that fraction
    of the mean diagonal to the diagonal (the inverse needs it where inputs
    are nearly collinear); `activation_order` quantizes the inputs of largest
    `diag(H)` first. Row `i` of the factor says how column `i`'s rounding
    error is spread over the columns after it (the paper's Algorithm 1)."""
    hessian = np.array(hessian, np.float64)
    columns = len(hessian)
    diagonal = np.diag(hessian).copy()
    # An input never seen in calibration: its column is rounded to nearest
    # and its error goes nowhere.
    diagonal[diagonal == 0] = 1
    hessian[np.diag_indices(columns)] = diagonal + damping * diagonal.mean()
    order = np.argsort(-diagonal, kind="stable") if activation_order else np.arange(columns)
    inverse = np.linalg.inv(hessian[order][:, order])
    upper = _cholesky(inverse).T
    return HessianFactor(order, np.ascontiguousarray(upper, np.float32), activation_order)


def _cholesky(matrix, panel=64):
    """The lower Cholesky factor of a symmetric positive definite `matrix`, a
    panel of columns at a time, each updated by one matrix product.
    (LAPACK's `potrf` through NumPy ran 15x slower than this on 2 threads.)"""
    factor = np.array(matrix, np.float64)
    size = len(factor)
    for start in range(0, size, panel):
        end = min(start + panel, size)
        factor[start:, start:end] -= factor[start:, :start] @ factor[start:end, :start].T
        columns = factor[start:, start:end]  # a view
        for j in range(end - start):
            if columns[j, j] <= 0:
                raise QuantizationError(
                    "The calibration Hessian is not positive definite: raise "
                    "GPTQConfig.hessian_damping or calibrate on more tokens."
                )
            columns[j:, j] /= np.sqrt(columns[j, j])
            columns[j + 1 :, j + 1 :] -= np.outer(
                columns[j + 1 :, j], columns[j + 1 :, j][: end - start - j - 1]
            )
    return np.tril(factor)


def gptq_quantize(weight, factor, mode, group_size, symmetric=False):
    """`QuantizedWeight` of a float `[out, in]` weight that keeps `x @ weight.T`
    closest over the inputs `x` of `factor` (a `HessianFactor`).

    Each group's scale and offset are fitted (as `quantization.quantize` fits
    them) when the group starts, to the weights as the errors before it left
    them. With activation order the groups, runs of consecutive inputs in the
    stored form, are not quantized one after another: each group's scale is
    then fitted before any update ("static groups").

    >>> rng = np.random.default_rng(0)
    >>> x, w = rng.normal(size=(256, 64)), rng.normal(size=(8, 64))
    >>> q = gptq_quantize(w, hessian_factor(x.T @ x), "int4", 32)
    >>> (q.mode, q.shape, q.group_size)
    ('int4', (8, 64), 32)
    """
    group_size = quantization.check_group_size(mode, group_size, weight.shape[1])
    rows, columns = weight.shape
    groups = columns // group_size
    # Transposed ([in, out]): a column is then a contiguous row.
    levels = np.empty((columns, rows), np.int8 if mode == "int8" else np.uint8)
    scale = np.empty((groups, rows), np.float32)
    offset = np.zeros((groups, rows), np.float32)
    chunk = max(1, ROW_CHUNK_VALUES // columns)
    for start in range(0, rows, chunk):
        part = slice(start, start + chunk)
        weight_t = np.asarray(weight[part], np.float32).T
        if factor.activation_order:
            parameters = _group_parameters(weight_t, mode, group_size, symmetric)
            scale[:, part], offset[:, part] = parameters
        out = (levels[:, part], scale[:, part], offset[:, part])
        _quantize_columns(weight_t[factor.order], factor, group_size, mode, symmetric, out)
    q = np.ascontiguousarray(levels.T)
    kernel = quantization.pack_int4(q) if mode == "int4" else q
    offset = None if mode == "int8" else np.ascontiguousarray(offset.T)
    return quantization.QuantizedWeight(
        mode, kernel, np.ascontiguousarray(scale.T), offset, group_size
    )


def _quantize_columns(weight_t, factor, group_size, mode, symmetric, out):
    """GPTQ over the rows of `weight_t` `[in, rows]` (inputs in `factor.order`),
    writing each input's levels, and where groups are fitted as they start,
    their scales and offsets, into `out` = `(levels, scale, offset)`, all
    transposed and in the inputs' own order."""
    levels, scale, offset = out
    low, high = (-127, 127) if mode == "int8" else (0, 15)
    order, upper = factor.order, factor.upper
    inverse_diagonal = 1 / np.diag(upper)
    inverse_scale = _safe_inverse(scale) if factor.activation_order else np.empty_like(scale)
    columns = len(weight_t)
    # A group starts where a block starts or lies within one, so that its
    # columns hold every update before it when it is fitted.
    block_columns = BLOCK_COLUMNS
    if BLOCK_COLUMNS % group_size and group_size % BLOCK_COLUMNS:
        block_columns = group_size
    for first in range(0, columns, block_columns):
        last = min(first + block_columns, columns)
        errors = np.empty((last - first, weight_t.shape[1]), np.float32)
        for column in range(first, last):
            group = order[column] // group_size
            if not factor.activation_order and column % group_size == 0:
                group_weights = weight_t[column : column + group_size]
                parameters = _group_parameters(group_weights, mode, group_size, symmetric)
                scale[group : group + 1], offset[group : group + 1] = parameters
                inverse_scale[group] = _safe_inverse(scale[group])
            values = weight_t[column]
            level = np.rint((values - offset[group]) * inverse_scale[group])
            np.clip(level, low, high, out=level)
            error = (values - (level * scale[group] + offset[group])) * inverse_diagonal[column]
            weight_t[column + 1 : last] -= np.outer(upper[column, column + 1 : last], error)
            errors[column - first] = error
            levels[order[column]] = level
        weight_t[last:] -= upper[first:last, last:].T @ errors


def _safe_inverse(scale):
    """`1 / scale`, and 0 where a group's scale is 0 (all its weights equal its offset)."""
    return np.divide(1, scale, out=np.zeros_like(scale), where=scale > 0)


def _group_parameters(weight_t, mode, group_size, symmetric):
    """`(scale, offset)` `[groups, rows]` of transposed weights `[in, rows]`:
    round-to-nearest's fitted ones (see `quantization.quantize`; int8's offset
    is zero), or for symmetric int4 a scale from the largest magnitude and the
    offset `-8 * scale`."""
    if mode == "int4" and symmetric:
        largest = np.abs(weight_t.reshape(-1, group_size, weight_t.shape[1])).max(axis=1)
        scale = largest * np.float32(2 / 15)
        return scale, -8 * scale
    quantized = quantization.quantize(weight_t.T, mode, group_size)
    if mode == "int8":
        return quantized.scale.T, 0
    scale, offset = quantized.scale.T, quantized.offset.T
    _use_exact_grids(weight_t.reshape(-1, group_size, weight_t.shape[1]), scale, offset)
    return scale, offset


def _use_exact_grids(groups, scale, offset):
    """Sets `scale` and `offset` `[groups, rows]` to a grid that holds each
    group of `groups` `[groups, group_size, rows]` exactly where one exists.

    Weights that were 4-bit before (a GGUF's Q4_K blocks of 32) lie on a grid
    of at most 16 levels that need not reach from their minimum to their
    maximum in 15 steps, so the fit can miss it; GPTQ would then spread the
    needless error. Such a grid's step divides the group's range:
    `range / steps` for some `steps` in 1..15, counted from the minimum."""
    ordered = np.sort(groups, axis=1)
    distinct = 1 + np.count_nonzero(np.diff(ordered, axis=1), axis=1)
    group_index, row_index = np.nonzero(distinct <= 16)
    if not len(group_index):
        return
    values = groups[group_index, :, row_index]  # [candidates, group_size]
    low = values.min(axis=1, keepdims=True)
    span = values.max(axis=1, keepdims=True) - low

    def squared_error(step, start):
        safe = np.where(step > 0, step, 1)
        levels = np.clip(np.rint((values - start) / safe), 0, 15)
        return np.square(levels * step + start - values).sum(axis=1)

    old_scale = scale[group_index, row_index][:, None]
    old_offset = offset[group_index, row_index][:, None]
    best_error, best_step = squared_error(old_scale, old_offset), None
    for steps in range(1, 16):
        error = squared_error(span / steps, low)
        better = error < best_error
        best_error = np.where(better, error, best_error)
        best_step = np.where(better, steps, 0 if best_step is None else best_step)
    found = best_step > 0
    scale[group_index[found], row_index[found]] = (span[:, 0] / np.maximum(best_step, 1))[found]
    offset[group_index[found], row_index[found]] = low[found, 0]
