"""Hugging Face transformers' Gemma layout: `config.json` fields and state-dict names."""

import json
import os

import ml_dtypes
import numpy as np

from gemma_keras.checkpoints.checkpoint import Checkpoint
from gemma_keras.checkpoints.safetensors_io import read_safetensors, write_safetensors
from gemma_keras.checkpoints.weight_mapping import SAME, WeightsError
from gemma_keras.config import ConfigError, GemmaConfig

_LAYER_TYPES = {"full_attention": "global", "sliding_attention": "local"}


def _rope(hf_config, layer_type):
    """(base wavelength, linear scaling factor) for one HF layer type."""
    parameters = hf_config.get("rope_parameters")
    if isinstance(parameters, dict) and layer_type in parameters:
        parameters = parameters[layer_type]  # transformers 5: per layer type
    if parameters is None:  # transformers 4 style
        if layer_type == "sliding_attention" and "rope_local_base_freq" in hf_config:
            parameters = {"rope_theta": hf_config["rope_local_base_freq"]}
        else:
            parameters = {
                "rope_theta": hf_config.get("rope_theta", 10_000.0),
                **(hf_config.get("rope_scaling") or {}),
            }
    rope_type = parameters.get("rope_type", parameters.get("type", "default"))
    if rope_type not in ("default", "linear"):
        raise ConfigError(
            f"config.json: rope type {rope_type!r} is not supported; only default and linear."
        )
    factor = parameters.get("factor", 1.0) if rope_type == "linear" else 1.0
    return float(parameters.get("rope_theta", hf_config.get("rope_theta", 10_000.0))), float(factor)


def config_from_huggingface(hf_config):
    """A `GemmaConfig` from a transformers Gemma, Gemma 2 or Gemma 3 (text) `config.json`."""
    c = hf_config
    model_type = c.get("model_type", "gemma")
    if model_type not in ("gemma", "gemma2", "gemma3_text"):
        raise ConfigError(
            f"config.json: model_type {model_type!r} is not a Gemma text model "
            "(expected gemma, gemma2 or gemma3_text)."
        )
    num_layers = c["num_hidden_layers"]
    head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    fields = dict(
        vocabulary_size=c["vocab_size"],
        num_layers=num_layers,
        hidden_dim=c["hidden_size"],
        intermediate_dim=c["intermediate_size"],
        num_query_heads=c["num_attention_heads"],
        num_key_value_heads=c.get("num_key_value_heads", c["num_attention_heads"]),
        head_dim=head_dim,
        layer_norm_epsilon=c.get("rms_norm_eps", 1e-6),
        max_sequence_length=c.get("max_position_embeddings", 8192),
    )
    if model_type == "gemma":
        theta, factor = _rope(c, "full_attention")
        fields.update(global_rope_wavelength=theta, global_rope_scaling_factor=factor)
        return GemmaConfig(**fields)
    hf_layer_types = c.get("layer_types")
    if hf_layer_types is None:
        raise ConfigError(f"config.json of a {model_type} model has no layer_types.")
    global_theta, global_factor = _rope(c, "full_attention")
    local_theta, local_factor = _rope(c, "sliding_attention")
    if local_factor != 1.0:
        raise ConfigError("config.json: RoPE scaling on sliding-window layers is not supported.")
    fields.update(
        query_pre_attn_scalar=c.get("query_pre_attn_scalar", head_dim),
        attention_logit_soft_cap=c.get("attn_logit_softcapping"),
        final_logit_soft_cap=c.get("final_logit_softcapping"),
        sliding_window=c.get("sliding_window"),
        layer_types=tuple(_LAYER_TYPES[t] for t in hf_layer_types),
        global_rope_wavelength=global_theta,
        local_rope_wavelength=local_theta,
        global_rope_scaling_factor=global_factor,
        use_qk_norm=model_type == "gemma3_text",
        use_post_attention_norm=True,
        use_post_ffw_norm=True,
    )
    return GemmaConfig(**fields)


def weight_mapping(config, prefix="model."):
    """`{our_name: (state_dict_name, Layout)}` for transformers' Gemma models.

    `prefix` is what precedes `embed_tokens`/`layers`/`norm`: `model.` for
    `*ForCausalLM`, `model.language_model.` in multimodal Gemma 3 checkpoints.

    transformers' Gemma 1 calls the pre-FFW norm `post_attention_layernorm`;
    Gemma 2 and 3 use that name for the real post-attention norm.
    """
    has_post_norms = config.use_post_attention_norm
    mapping = {
        "token_embedding/embeddings": (f"{prefix}embed_tokens.weight", SAME),
        "final_norm/scale": (f"{prefix}norm.weight", SAME),
    }
    for index in range(config.num_layers):
        theirs = f"{prefix}layers.{index}"
        block = {
            "pre_attention_norm/scale": ("input_layernorm.weight", SAME),
            "attention/query/kernel": ("self_attn.q_proj.weight", SAME),
            "attention/key/kernel": ("self_attn.k_proj.weight", SAME),
            "attention/value/kernel": ("self_attn.v_proj.weight", SAME),
            "attention/output/kernel": ("self_attn.o_proj.weight", SAME),
            "ffw/gate/kernel": ("mlp.gate_proj.weight", SAME),
            "ffw/up/kernel": ("mlp.up_proj.weight", SAME),
            "ffw/down/kernel": ("mlp.down_proj.weight", SAME),
        }
        if has_post_norms:
            block["post_attention_norm/scale"] = ("post_attention_layernorm.weight", SAME)
            block["pre_ffw_norm/scale"] = ("pre_feedforward_layernorm.weight", SAME)
        else:
            block["pre_ffw_norm/scale"] = ("post_attention_layernorm.weight", SAME)
        if config.use_post_ffw_norm:
            block["post_ffw_norm/scale"] = ("post_feedforward_layernorm.weight", SAME)
        if config.use_qk_norm:
            block["attention/query_norm/scale"] = ("self_attn.q_norm.weight", SAME)
            block["attention/key_norm/scale"] = ("self_attn.k_norm.weight", SAME)
        for our_name, (their_name, layout) in block.items():
            mapping[f"decoder_block_{index}/{our_name}"] = (f"{theirs}.{their_name}", layout)
    return mapping


def huggingface_config(config):
    """The transformers `config.json` fields describing `config` (inverse of
    `config_from_huggingface`); raises `ConfigError` for what transformers'
    Gemma classes cannot express."""
    fields = dict(
        vocab_size=config.vocabulary_size,
        hidden_size=config.hidden_dim,
        intermediate_size=config.intermediate_dim,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_query_heads,
        num_key_value_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        rms_norm_eps=config.layer_norm_epsilon,
        max_position_embeddings=config.max_sequence_length,
        hidden_activation="gelu_pytorch_tanh",
        tie_word_embeddings=True,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    global_rope = {"rope_type": "default", "rope_theta": config.global_rope_wavelength}
    if config.global_rope_scaling_factor != 1.0:
        global_rope = {
            **global_rope,
            "rope_type": "linear",
            "factor": config.global_rope_scaling_factor,
        }
    has_gemma2_features = (
        config.use_post_attention_norm
        or config.use_post_ffw_norm
        or "local" in config.layer_types
        or config.attention_logit_soft_cap is not None
        or config.final_logit_soft_cap is not None
        or config.query_pre_attn_scalar != config.head_dim
    )
    if not config.use_qk_norm and not has_gemma2_features:
        return dict(
            model_type="gemma",
            architectures=["GemmaForCausalLM"],
            rope_parameters=global_rope,
            **fields,
        )
    if not (config.use_post_attention_norm and config.use_post_ffw_norm):
        raise ConfigError(
            "transformers' Gemma 2 and Gemma 3 classes always have post-attention and "
            "post-FFW norms; this config (use_post_attention_norm="
            f"{config.use_post_attention_norm}, use_post_ffw_norm={config.use_post_ffw_norm}) "
            "has no transformers equivalent."
        )
    fields.update(
        query_pre_attn_scalar=config.query_pre_attn_scalar,
        attn_logit_softcapping=config.attention_logit_soft_cap,
        final_logit_softcapping=config.final_logit_soft_cap,
        sliding_window=config.sliding_window,
        layer_types=[
            "sliding_attention" if t == "local" else "full_attention" for t in config.layer_types
        ],
    )
    if config.use_qk_norm:
        local_rope = {"rope_type": "default", "rope_theta": config.local_rope_wavelength}
        return dict(
            model_type="gemma3_text",
            architectures=["Gemma3ForCausalLM"],
            rope_parameters={"full_attention": global_rope, "sliding_attention": local_rope},
            **fields,
        )
    if (
        config.local_rope_wavelength != config.global_rope_wavelength
        or global_rope["rope_type"] != "default"
    ):
        raise ConfigError(
            "transformers' Gemma 2 uses one RoPE base and no scaling; this config sets "
            f"local_rope_wavelength={config.local_rope_wavelength}, global_rope_wavelength="
            f"{config.global_rope_wavelength}, global_rope_scaling_factor="
            f"{config.global_rope_scaling_factor}."
        )
    return dict(
        model_type="gemma2",
        architectures=["Gemma2ForCausalLM"],
        rope_parameters=global_rope,
        **fields,
    )


# ---------------------------------------------------------------------------
# Checkpoint directories: config.json, *.safetensors, tokenizer.model
# ---------------------------------------------------------------------------

TOKENIZER_FILE = "tokenizer.model"


def is_checkpoint_directory(path):
    return (
        os.path.isdir(path)
        and os.path.isfile(os.path.join(path, "config.json"))
        and any(name.endswith(".safetensors") for name in os.listdir(path))
    )


def _text_config(hf_config, path):
    """Multimodal Gemma 3 checkpoints nest the language model's config."""
    if hf_config.get("model_type") == "gemma3":
        if "text_config" not in hf_config:
            raise ConfigError(f"{path}: a gemma3 config without text_config.")
        return {"model_type": "gemma3_text", **hf_config["text_config"]}
    return hf_config


def read_checkpoint(directory):
    """Reads a transformers Gemma/Gemma 2/Gemma 3 directory into a `Checkpoint`.

    Tensors are memory-mapped; the mapping uses the name prefix the files
    actually have (`model.` or a multimodal checkpoint's language-model prefix).
    """
    directory = os.fspath(directory)
    config_path = os.path.join(directory, "config.json")
    with open(config_path) as file:
        try:
            hf_config = json.load(file)
        except json.JSONDecodeError as error:
            raise ConfigError(f"{config_path} is not valid JSON ({error}).") from None
    try:
        config = config_from_huggingface(_text_config(hf_config, config_path))
    except KeyError as error:
        raise ConfigError(f"{config_path} lacks the field {error}.") from None
    files = sorted(n for n in os.listdir(directory) if n.endswith(".safetensors"))
    if not files:
        raise WeightsError(f"{directory} has no *.safetensors weights (only safetensors are read).")
    tensors = {}
    for name in files:
        tensors.update(read_safetensors(os.path.join(directory, name)))
    embedding = [n for n in tensors if n.endswith("embed_tokens.weight")]
    if len(embedding) != 1:
        raise WeightsError(
            f"{directory}: no single '*embed_tokens.weight' tensor among the weights."
        )
    prefix = embedding[0][: -len("embed_tokens.weight")]
    tokenizer_path = os.path.join(directory, TOKENIZER_FILE)
    if not os.path.isfile(tokenizer_path):
        raise WeightsError(f"{directory} has no {TOKENIZER_FILE} (the SentencePiece tokenizer).")
    with open(tokenizer_path, "rb") as file:
        proto = file.read()
    return Checkpoint(config, tensors, weight_mapping(config, prefix), proto, directory)


def write_checkpoint(directory, config, weights, tokenizer_proto, dtype="float32"):
    """Writes a directory that `transformers.AutoModelForCausalLM.from_pretrained` loads."""
    os.makedirs(directory, exist_ok=True)
    fields = huggingface_config(config)
    store_dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype("float32")
    arrays = {
        theirs: np.asarray(layout.theirs(np.asarray(weights[ours]))).astype(store_dtype)
        for ours, (theirs, layout) in weight_mapping(config).items()
    }
    write_safetensors(os.path.join(directory, "model.safetensors"), arrays)
    with open(os.path.join(directory, "config.json"), "w") as file:
        json.dump({**fields, "dtype": dtype}, file, indent=2)
    with open(os.path.join(directory, TOKENIZER_FILE), "wb") as file:
        file.write(tokenizer_proto)
