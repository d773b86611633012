"""llama.cpp's GGUF files of Gemma, Gemma 2 and Gemma 3 (text) models.

A GGUF file holds everything in one place: the architecture as metadata
(`gemma3.embedding_length`, ...), the tokenizer as metadata
(`tokenizer.ggml.tokens`, ...) and the weights, often quantized. `read_gguf`
turns one into a `Checkpoint`:

- the config comes from the metadata plus what llama.cpp assumes for each
  architecture without storing it (layer pattern, local RoPE base, query
  scale of the 27B models);
- the weights stay in the file until a tensor is looked up, and are then
  dequantized to float32 (`gguf.quants.dequantize`), or, for load-time
  quantization, decoded straight into gemma_keras' int8/int4 forms where the
  block type maps onto them exactly (`GGUFTensor.quantized`);
- the tokenizer is rebuilt as a SentencePiece model that encodes like the
  original Gemma one, after undoing what llama.cpp's converter changed.

Example:

>>> from gemma_keras.checkpoints.gguf import read_gguf
>>> checkpoint = read_gguf("gemma-3-270m-q4_k_m.gguf")  # doctest: +SKIP
>>> checkpoint.config.num_layers  # doctest: +SKIP
18
"""

import os

import numpy as np
from sentencepiece import sentencepiece_model_pb2

from gemma_keras import quantization
from gemma_keras.checkpoints.checkpoint import Checkpoint
from gemma_keras.checkpoints.weight_mapping import SAME, Layout
from gemma_keras.config import (
    ConfigError,
    GemmaConfig,
    alternating_local_global,
    every_nth_global,
)

try:
    import gguf
except ImportError:  # an optional dependency: only GGUF files need it
    gguf = None

SUPPORTED_ARCHITECTURES = ("gemma", "gemma2", "gemma3")

# llama.cpp recognises the 27B models by their layer count and scales their
# queries by hidden_dim / num_query_heads instead of head_dim (as Google's
# gemma_pytorch does); the files do not store the scale.
_LAYERS_OF_27B = {"gemma2": 46, "gemma3": 62}

# Gemma 3's sliding-window layers use this RoPE base; llama.cpp hard-codes it.
_GEMMA3_LOCAL_ROPE_WAVELENGTH = 10_000.0


class GGUFError(ValueError):
    """A GGUF file is missing, damaged, or holds something this reader cannot load."""


def read_gguf(path):
    """Reads a Gemma, Gemma 2 or Gemma 3 (text) GGUF file into a `Checkpoint`.

    The file is parsed once (a 262k-token vocabulary takes GGUFReader ~15 s);
    tensors stay memory-mapped and are dequantized to float32 one at a time
    when the returned checkpoint's weights are looked up.

    Raises `GGUFError` for a missing, truncated or foreign file, an
    unsupported architecture or a tensor type that cannot be dequantized.
    """
    path = os.fspath(path)
    if gguf is None:
        raise GGUFError(f"Reading {path} needs the gguf package: pip install gguf")
    if not os.path.isfile(path):
        raise GGUFError(f"GGUF file {path} does not exist; check the path.")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as error:  # GGUFReader fails deep inside numpy on bad input
        raise GGUFError(
            f"{path} is not a readable GGUF file ({type(error).__name__}: {error}). "
            "It may be truncated (an interrupted download), corrupted, or of another "
            "format; download it again, or upgrade the gguf package if the file is newer."
        ) from None
    metadata = {name: field.contents() for name, field in reader.fields.items()}
    tensors = {tensor.name: GGUFTensor(tensor, path) for tensor in reader.tensors}
    config = config_from_gguf(metadata, tensors, path)
    tokenizer_proto = sentencepiece_from_gguf(metadata, path)
    num_tokens = len(metadata["tokenizer.ggml.tokens"])
    if num_tokens > config.vocabulary_size:
        raise GGUFError(
            f"{path}: the tokenizer has {num_tokens} tokens but token_embd.weight only "
            f"{config.vocabulary_size} rows; the file is inconsistent."
        )
    return Checkpoint(
        config=config,
        tensors=tensors,
        mapping=weight_mapping(config),
        tokenizer_proto=tokenizer_proto,
        source=path,
    )


# ---------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------


def _exact_float(value):
    """GGUF stores floats as float32; give back the decimal that was written
    (1e-06, not 9.99999997e-07), so configs compare equal to published ones."""
    return float(str(np.float32(value)))


def config_from_gguf(metadata, tensors, source="GGUF file"):
    """A `GemmaConfig` from a GGUF file's metadata (`{key: value}`) and its
    tensors (`{name: tensor with .shape}`; the vocabulary size is the number
    of rows of `token_embd.weight`, which llama.cpp trims to the tokenizer)."""
    architecture = metadata.get("general.architecture")
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise GGUFError(
            f"{source} holds a {architecture!r} model; only Gemma text models are "
            f"supported (architectures {', '.join(SUPPORTED_ARCHITECTURES)})."
        )

    def required(key):
        name = f"{architecture}.{key}"
        if name not in metadata:
            raise GGUFError(f"{source} lacks the metadata {name!r}; the file is incomplete.")
        return metadata[name]

    def optional(key, default=None):
        return metadata.get(f"{architecture}.{key}", default)

    if "token_embd.weight" not in tensors:
        raise GGUFError(f"{source} has no 'token_embd.weight' tensor; the file is incomplete.")
    vocabulary_size = tensors["token_embd.weight"].shape[0]
    hidden_dim = required("embedding_length")
    num_layers = required("block_count")
    num_query_heads = required("attention.head_count")
    head_dim = optional("attention.key_length", hidden_dim // num_query_heads)
    if num_layers == _LAYERS_OF_27B.get(architecture):
        query_pre_attn_scalar = hidden_dim // num_query_heads
    else:
        query_pre_attn_scalar = head_dim
    fields = dict(
        vocabulary_size=vocabulary_size,
        num_layers=num_layers,
        hidden_dim=hidden_dim,
        intermediate_dim=required("feed_forward_length"),
        num_query_heads=num_query_heads,
        num_key_value_heads=optional("attention.head_count_kv", num_query_heads),
        head_dim=head_dim,
        layer_norm_epsilon=_exact_float(required("attention.layer_norm_rms_epsilon")),
        query_pre_attn_scalar=query_pre_attn_scalar,
    )
    if optional("context_length"):
        fields["max_sequence_length"] = optional("context_length")
    rope_wavelength = _exact_float(optional("rope.freq_base", 10_000.0))
    rope_scaling_factor = _rope_scaling_factor(metadata, architecture, source)

    if architecture == "gemma":
        fields.update(
            global_rope_wavelength=rope_wavelength,
            global_rope_scaling_factor=rope_scaling_factor,
        )
    elif architecture == "gemma2":
        if rope_scaling_factor != 1.0:
            raise GGUFError(
                f"{source}: RoPE scaling (factor {rope_scaling_factor}) on a Gemma 2 model would "
                "apply to its sliding-window layers too, which gemma_keras does not support."
            )
        # llama.cpp's defaults for Gemma 2 when a key is absent.
        fields.update(
            attention_logit_soft_cap=_exact_float(optional("attn_logit_softcapping", 50.0)),
            final_logit_soft_cap=_exact_float(optional("final_logit_softcapping", 30.0)),
            sliding_window=optional("attention.sliding_window", 4096),
            layer_types=alternating_local_global(num_layers),
            global_rope_wavelength=rope_wavelength,
            local_rope_wavelength=rope_wavelength,
            use_post_attention_norm=True,
            use_post_ffw_norm=True,
        )
    else:  # gemma3
        final_soft_cap = optional("final_logit_softcapping")
        sliding_window = optional("attention.sliding_window")
        if sliding_window:  # every 6th layer global, as llama.cpp hard-codes
            local = dict(
                sliding_window=sliding_window,
                layer_types=every_nth_global(num_layers, 6),
                local_rope_wavelength=_GEMMA3_LOCAL_ROPE_WAVELENGTH,
            )
        else:  # llama.cpp: no window stored means no sliding-window layers
            local = dict(local_rope_wavelength=_GEMMA3_LOCAL_ROPE_WAVELENGTH)
        fields.update(
            final_logit_soft_cap=_exact_float(final_soft_cap) if final_soft_cap else None,
            global_rope_wavelength=rope_wavelength,
            global_rope_scaling_factor=rope_scaling_factor,
            use_qk_norm=True,
            use_post_attention_norm=True,
            use_post_ffw_norm=True,
            **local,
        )
    try:
        return GemmaConfig(**fields)
    except ConfigError as error:
        raise GGUFError(f"{source}: the metadata describes an invalid model ({error})") from None


def _rope_scaling_factor(metadata, architecture, source):
    """Linear RoPE scaling factor (1.0 = none); other scaling types are refused."""
    scaling_type = metadata.get(f"{architecture}.rope.scaling.type", "linear")
    factor = metadata.get(
        f"{architecture}.rope.scaling.factor",
        metadata.get(f"{architecture}.rope.scale_linear", 0.0),  # the older key
    )
    if scaling_type == "none" or not factor or factor == 1.0:
        return 1.0
    if scaling_type != "linear":
        raise GGUFError(
            f"{source}: RoPE scaling type {scaling_type!r} is not supported (only linear)."
        )
    return _exact_float(factor)


# ---------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------

# llama.cpp's converter stores Gemma's RMSNorm scales as `1 + scale` (what
# ggml multiplies by); gemma_keras keeps `scale`, like the original weights.
NORM_PLUS_ONE = Layout(
    ours=lambda array: array - 1.0,
    theirs=lambda array: array + 1.0,
    their_shape=lambda shape: tuple(shape),
)


def weight_mapping(config):
    """`{our_name: (gguf_tensor_name, Layout)}` for a Gemma config.

    GGUF linear weights, read in numpy order, are `[out, in]` like
    transformers' and ours (so SAME); Q and K are not permuted for Gemma;
    `token_embd.weight` is the tied input/output embedding.
    """
    mapping = {
        "token_embedding/embeddings": ("token_embd.weight", SAME),
        "final_norm/scale": ("output_norm.weight", NORM_PLUS_ONE),
    }
    for index in range(config.num_layers):
        block = {
            "pre_attention_norm/scale": ("attn_norm.weight", NORM_PLUS_ONE),
            "attention/query/kernel": ("attn_q.weight", SAME),
            "attention/key/kernel": ("attn_k.weight", SAME),
            "attention/value/kernel": ("attn_v.weight", SAME),
            "attention/output/kernel": ("attn_output.weight", SAME),
            "pre_ffw_norm/scale": ("ffn_norm.weight", NORM_PLUS_ONE),
            "ffw/gate/kernel": ("ffn_gate.weight", SAME),
            "ffw/up/kernel": ("ffn_up.weight", SAME),
            "ffw/down/kernel": ("ffn_down.weight", SAME),
        }
        if config.use_post_attention_norm:
            block["post_attention_norm/scale"] = ("post_attention_norm.weight", NORM_PLUS_ONE)
        if config.use_post_ffw_norm:
            block["post_ffw_norm/scale"] = ("post_ffw_norm.weight", NORM_PLUS_ONE)
        if config.use_qk_norm:
            block["attention/query_norm/scale"] = ("attn_q_norm.weight", NORM_PLUS_ONE)
            block["attention/key_norm/scale"] = ("attn_k_norm.weight", NORM_PLUS_ONE)
        for our_name, (their_name, layout) in block.items():
            mapping[f"decoder_block_{index}/{our_name}"] = (f"blk.{index}.{their_name}", layout)
    return mapping


class GGUFTensor:
    """One tensor of a GGUF file, read and dequantized to float32 only when
    converted with `np.asarray`, or decoded into a `QuantizedWeight` by
    `quantized(mode)`.

    `shape` is in numpy order (GGUFReader reports ggml's reversed order).
    Creating one checks that the tensor's type can be dequantized, so an
    unsupported file fails when opened, not halfway through loading.
    """

    def __init__(self, reader_tensor, source):
        self.name = reader_tensor.name
        self.quantization = reader_tensor.tensor_type
        self.shape = tuple(int(size) for size in reversed(reader_tensor.shape.tolist()))
        self._data = reader_tensor.data
        if not _can_dequantize(self.quantization):
            raise GGUFError(
                f"{source}: tensor {self.name!r} is stored as {self.quantization.name}, which "
                "the installed gguf package cannot dequantize. Convert the model with another "
                "quantization (e.g. Q8_0, Q4_K_M or F16), or upgrade gguf."
            )

    @property
    def values_per_scale(self):
        """How many values share one scale in the file's blocks (Q4_K: 32,
        Q6_K: 16); None for a float tensor."""
        return VALUES_PER_SCALE.get(self.quantization.name)

    def __array__(self, dtype=None, copy=None):
        values = gguf.quants.dequantize(self._data, self.quantization).reshape(self.shape)
        array = np.asarray(values, dtype=dtype or np.float32)
        return array.copy() if copy else array

    def quantized(self, mode):
        """The tensor as a `quantization.QuantizedWeight` in `mode` ("int8" or
        "int4"), `[out, in]` like `shape`, decoded from the stored blocks without
        a float32 copy; None where the block type does not map onto `mode`
        exactly (see `EXACT_FORMS`) or the tensor is not a matrix.

        `quantization.dequantize_numpy` of the result equals
        `gguf.quants.dequantize` of the tensor bit for bit: every product of a
        scale and a value is the one gguf (and llama.cpp) computes, or exact.

        >>> weight = checkpoint.tensors["blk.0.ffn_down.weight"]  # doctest: +SKIP
        >>> weight.quantized("int8").group_size  # Q6_K: 16 values per scale  # doctest: +SKIP
        16
        """
        quantization.check_mode(mode)
        decode = EXACT_FORMS.get((self.quantization.name, mode))
        if decode is None or len(self.shape) != 2:
            return None
        rows, columns = self.shape
        block_size, bytes_per_block = gguf.GGML_QUANT_SIZES[self.quantization]
        blocks = self._data.reshape(rows, columns // block_size, bytes_per_block)
        kernel, scale, offset, group_size = _decode_by_rows(decode, blocks)
        return quantization.QuantizedWeight(mode, kernel, scale, offset, group_size)

    def __repr__(self):
        return f"GGUFTensor({self.name!r}, {self.quantization.name}, shape={self.shape})"


# ---------------------------------------------------------------------------
# GGUF blocks decoded into quantization.py's int8 and int4 forms
# ---------------------------------------------------------------------------
#
# Each decoder takes the raw blocks of some rows, uint8 `[rows, blocks,
# bytes_per_block]`, and returns `(kernel, scale, offset, group_size)` for
# those rows. The byte layouts are llama.cpp's (ggml-common.h; the loops of
# ggml-quants.c's `dequantize_row_*`), which gguf-py's `quants.py` mirrors.

# Rows are decoded a slice at a time, so that the uint8 temporaries of a
# large tensor (a 262k-row embedding) stay small next to the result.
_BLOCK_BYTES_PER_SLICE = 1 << 22


def _decode_by_rows(decode, blocks):
    rows = blocks.shape[0]
    rows_per_slice = max(1, _BLOCK_BYTES_PER_SLICE // (blocks.shape[1] * blocks.shape[2]))
    outputs = None
    for start in range(0, rows, rows_per_slice):
        *arrays, group_size = decode(np.asarray(blocks[start : start + rows_per_slice]))
        if outputs is None:
            outputs = [
                None if array is None else np.empty((rows, *array.shape[1:]), array.dtype)
                for array in arrays
            ]
        for output, array in zip(outputs, arrays, strict=True):
            if output is not None:
                output[start : start + len(array)] = array
    return (*outputs, group_size)


def _float16_at(blocks, byte):
    """The float16 stored at `byte` of every block, as float32 `[rows, blocks]`."""
    halves = np.ascontiguousarray(blocks[..., byte : byte + 2]).view(np.float16)
    return halves[..., 0].astype(np.float32)


def _nibbles(packed):
    """uint8 `[..., n]` -> `[..., 2, n]`: the low nibbles, then the high ones."""
    return np.stack([packed & 0x0F, packed >> 4], axis=-2)


def _decode_q8_0(blocks):
    # d (float16), then 32 int8 values: w = d * q.
    rows = blocks.shape[0]
    q = np.ascontiguousarray(blocks[..., 2:34]).view(np.int8)
    return q.reshape(rows, -1), _float16_at(blocks, 0), None, 32


def _decode_q5_0(blocks):
    # d, 32 high bits (bit j belongs to value j), 16 bytes of low nibbles
    # (byte k: value k low, value 16 + k high); w = d * (q - 16).
    rows = blocks.shape[0]
    high_bits = np.unpackbits(blocks[..., 2:6], axis=-1, bitorder="little")
    low = _nibbles(blocks[..., 6:22]).reshape(high_bits.shape)
    q = ((low | (high_bits << 4)).astype(np.int8) - 16).reshape(rows, -1)
    return q, _float16_at(blocks, 0), None, 32


def _decode_q4_0(blocks):
    # d, 16 bytes packed exactly as quantization.py packs int4; w = d * (q - 8),
    # held as q * d + (-8 * d): both products are exact (11-bit d times a
    # 4-bit integer), so the sum rounds to the same float32 as gguf's.
    rows = blocks.shape[0]
    scale = _float16_at(blocks, 0)
    kernel = np.ascontiguousarray(blocks[..., 2:18]).reshape(rows, -1)
    return kernel, scale, -8 * scale, 32


def _q4_k_scales_and_mins(packed):
    """The eight 6-bit scales and mins of Q4_K super-blocks, uint8 `[..., 12]`
    -> two `[..., 8]` (llama.cpp's `get_scale_min_k4`): sub-blocks 0-3 in the
    low 6 bits of bytes 0-3 (scales) and 4-7 (mins); sub-blocks 4-7 in the
    nibbles of bytes 8-11 plus the top 2 bits of bytes 0-3 and 4-7."""
    first, second, last = packed[..., 0:4], packed[..., 4:8], packed[..., 8:12]
    scales = np.concatenate([first & 63, (last & 0x0F) | ((first >> 6) << 4)], axis=-1)
    mins = np.concatenate([second & 63, (last >> 4) | ((second >> 6) << 4)], axis=-1)
    return scales, mins


def _decode_q4_k(blocks):
    # Super-blocks of 256: d, dmin, 12 bytes of 6-bit scales and mins, 128 bytes
    # of nibbles. Byte l of chunk c (32 bytes) holds value 64c + l in its low
    # nibble and 64c + 32 + l in its high one; sub-block j (32 values) is
    # w = (d * scale_j) * q - dmin * min_j. The values are repacked into
    # quantization.py's order.
    rows, count = blocks.shape[:2]
    sub_scales, sub_mins = _q4_k_scales_and_mins(blocks[..., 4:16])
    scale = _float16_at(blocks, 0)[..., None] * sub_scales.astype(np.float32)
    offset = -(_float16_at(blocks, 2)[..., None] * sub_mins.astype(np.float32))
    values = _nibbles(blocks[..., 16:144].reshape(rows, count, 4, 32))
    kernel = quantization.pack_int4(values.reshape(rows, -1))
    return kernel, scale.reshape(rows, -1), offset.reshape(rows, -1), 32


def _decode_q6_k(blocks):
    # Super-blocks of 256: 128 bytes of low nibbles, 64 bytes of 2-bit highs,
    # 16 int8 sub-scales, d. In each half h (128 values), quarter p's value l
    # (value 128h + 32p + l) has its low 4 bits in byte 64h + 32 * (p % 2) + l
    # (the low nibble for p < 2, the high one after) and its high 2 bits at
    # bit 2p of byte 128 + 32h + l; w = (d * sub_scale) * (q - 32), 16 values
    # per sub-scale.
    rows, count = blocks.shape[:2]
    low = _nibbles(blocks[..., 0:128].reshape(rows, count, 2, 64))  # [.., h, nibble, byte]
    shifts = np.array([0, 2, 4, 6], np.uint8)[:, None]
    high = (blocks[..., 128:192].reshape(rows, count, 2, 1, 32) >> shifts) & 3
    q = (low.reshape(high.shape) | (high << 4)).astype(np.int8) - 32
    sub_scales = np.ascontiguousarray(blocks[..., 192:208]).view(np.int8).astype(np.float32)
    scale = _float16_at(blocks, 208)[..., None] * sub_scales
    return q.reshape(rows, -1), scale.reshape(rows, -1), None, 16


# `{(GGML type name, mode): decoder}`: the pairs whose blocks are the form as
# they are. Other pairs (Q5_0 as int4, Q4_K as int8, K-quants of other widths)
# return None, and the loader quantizes the float tensor itself.
EXACT_FORMS = {
    ("Q8_0", "int8"): _decode_q8_0,
    ("Q5_0", "int8"): _decode_q5_0,
    ("Q6_K", "int8"): _decode_q6_k,
    ("Q4_0", "int4"): _decode_q4_0,
    ("Q4_K", "int4"): _decode_q4_k,
}


# Values per scale of the block types: the K-quants' sub-blocks, the others' blocks.
VALUES_PER_SCALE = {
    **dict.fromkeys(("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K"), 32),
    **dict.fromkeys(("Q2_K", "Q3_K", "Q6_K"), 16),
}


_DEQUANTIZABLE = {}


def _can_dequantize(quantization):
    """Whether `gguf.quants.dequantize` implements this type, found by trying
    one all-zero block (the package raises NotImplementedError otherwise)."""
    if quantization not in _DEQUANTIZABLE:
        _, bytes_per_block = gguf.GGML_QUANT_SIZES[quantization]
        try:
            gguf.quants.dequantize(np.zeros((1, bytes_per_block), np.uint8), quantization)
            _DEQUANTIZABLE[quantization] = True
        except NotImplementedError:
            _DEQUANTIZABLE[quantization] = False
    return _DEQUANTIZABLE[quantization]


# ---------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------

_PIECE_TYPES = {
    gguf_type: getattr(sentencepiece_model_pb2.ModelProto.SentencePiece, name)
    for gguf_type, name in (
        (1, "NORMAL"),
        (2, "UNKNOWN"),
        (3, "CONTROL"),
        (4, "USER_DEFINED"),
        (5, "UNUSED"),
        (6, "BYTE"),
    )
}
_WHITESPACE_MARK = "\u2581"  # SentencePiece's visible space, "▁"


def sentencepiece_from_gguf(metadata, source="GGUF file"):
    """A serialized SentencePiece model rebuilt from a Gemma GGUF's tokenizer metadata.

    It encodes like Gemma's original `tokenizer.model` (and like transformers'
    tokenizer of the same GGUF) once three things llama.cpp's converter
    changed are undone:

    - pieces made of `▁` (Gemma's user-defined whitespace runs) were stored
      with plain spaces; every space goes back to `▁`, since a SentencePiece
      piece never holds a plain space;
    - `<unk>` was marked CONTROL; SentencePiece needs it UNKNOWN;
    - pieces marked CONTROL other than `<bos>`, `<eos>`, `<pad>` (such as
      `<start_of_turn>`) become USER_DEFINED, so they match when written in
      text, as in Gemma's tokenizer and chat template.

    The normalizer and trainer settings are Gemma's: BPE, byte fallback,
    digits split, no dummy prefix, whitespace kept as is.
    """
    if metadata.get("tokenizer.ggml.model") != "llama":
        raise GGUFError(
            f"{source} has no SentencePiece tokenizer (tokenizer.ggml.model is "
            f"{metadata.get('tokenizer.ggml.model')!r}, Gemma files have 'llama')."
        )
    try:
        pieces = metadata["tokenizer.ggml.tokens"]
        scores = metadata["tokenizer.ggml.scores"]
        types = metadata["tokenizer.ggml.token_type"]
        bos_id = metadata["tokenizer.ggml.bos_token_id"]
        eos_id = metadata["tokenizer.ggml.eos_token_id"]
        unk_id = metadata["tokenizer.ggml.unknown_token_id"]
    except KeyError as error:
        raise GGUFError(f"{source} lacks the tokenizer metadata {error}.") from None
    pad_id = metadata.get("tokenizer.ggml.padding_token_id", -1)
    kept_control_ids = {bos_id, eos_id, pad_id}

    proto = sentencepiece_model_pb2.ModelProto()
    piece_type = sentencepiece_model_pb2.ModelProto.SentencePiece
    for index, (piece, score, gguf_type) in enumerate(zip(pieces, scores, types, strict=True)):
        kind = _PIECE_TYPES[gguf_type]
        if index == unk_id:
            kind = piece_type.UNKNOWN
        elif kind == piece_type.CONTROL and index not in kept_control_ids:
            kind = piece_type.USER_DEFINED
        proto.pieces.add(piece=piece.replace(" ", _WHITESPACE_MARK), score=score, type=kind)

    trainer = proto.trainer_spec
    trainer.model_type = sentencepiece_model_pb2.TrainerSpec.BPE
    trainer.vocab_size = len(pieces)
    trainer.byte_fallback = True
    trainer.split_digits = True
    trainer.allow_whitespace_only_pieces = True
    trainer.unk_id, trainer.bos_id, trainer.eos_id, trainer.pad_id = unk_id, bos_id, eos_id, pad_id
    trainer.unk_piece = pieces[unk_id]
    trainer.bos_piece = pieces[bos_id]
    trainer.eos_piece = pieces[eos_id]
    if pad_id >= 0:
        trainer.pad_piece = pieces[pad_id]
    normalizer = proto.normalizer_spec
    normalizer.name = "identity"
    normalizer.add_dummy_prefix = False
    normalizer.remove_extra_whitespaces = False
    normalizer.escape_whitespaces = True
    return proto.SerializeToString()
