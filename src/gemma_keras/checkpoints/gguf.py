"""llama.cpp's GGUF files of Gemma, Gemma 2 and Gemma 3 (text) models.

A GGUF file holds everything in one place: the architecture as metadata
(`gemma3.embedding_length`, ...), the tokenizer as metadata
(`tokenizer.ggml.tokens`, ...) and the weights, often quantized. `read_gguf`
turns one into a `Checkpoint`:

- the config comes from the metadata plus what llama.cpp assumes for each
  architecture without storing it (layer pattern, local RoPE base, query
  scale of the 27B models);
- the weights stay in the file until a tensor is looked up, and are then
  dequantized to float32 (`gguf.quants.dequantize`);
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
    converted with `np.asarray`.

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

    def __array__(self, dtype=None, copy=None):
        values = gguf.quants.dequantize(self._data, self.quantization).reshape(self.shape)
        array = np.asarray(values, dtype=dtype or np.float32)
        return array.copy() if copy else array

    def __repr__(self):
        return f"GGUFTensor({self.name!r}, {self.quantization.name}, shape={self.shape})"


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
