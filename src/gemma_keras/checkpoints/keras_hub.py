"""KerasHub's Gemma layout: `GemmaBackbone` / `Gemma3Backbone` configs and weight names."""

from gemma_keras.checkpoints.weight_mapping import SAME, heads_first, split_heads
from gemma_keras.config import GemmaConfig, alternating_local_global, every_nth_global

GEMMA_CLASS = "keras_hub>GemmaBackbone"
GEMMA3_CLASS = "keras_hub>Gemma3Backbone"


def config_from_keras_hub(backbone_config, registered_name=GEMMA_CLASS):
    """A `GemmaConfig` from the `config` of a KerasHub backbone's `config.json`."""
    c = backbone_config
    is_gemma3 = registered_name == GEMMA3_CLASS
    num_layers = c["num_layers"]
    num_query_heads = c["num_query_heads"]
    # KerasHub's Gemma 1/2 store the gate and up widths together (2x); Gemma 3 does not.
    intermediate_dim = c["intermediate_dim"] if is_gemma3 else c["intermediate_dim"] // 2
    if c.get("query_head_dim_normalize", True):
        query_pre_attn_scalar = c["head_dim"]
    else:
        query_pre_attn_scalar = c["hidden_dim"] / num_query_heads
    sliding = c.get("use_sliding_window_attention", False)
    if not sliding:
        layer_types = None
    elif is_gemma3:
        layer_types = every_nth_global(num_layers)
    else:
        layer_types = alternating_local_global(num_layers)
    fields = dict(
        vocabulary_size=c["vocabulary_size"],
        num_layers=num_layers,
        hidden_dim=c["hidden_dim"],
        intermediate_dim=intermediate_dim,
        num_query_heads=num_query_heads,
        num_key_value_heads=c["num_key_value_heads"],
        head_dim=c["head_dim"],
        layer_norm_epsilon=c.get("layer_norm_epsilon", 1e-6),
        query_pre_attn_scalar=query_pre_attn_scalar,
        attention_logit_soft_cap=c.get("attention_logit_soft_cap"),
        final_logit_soft_cap=c.get("final_logit_soft_cap"),
        sliding_window=c.get("sliding_window_size") if sliding else None,
        layer_types=layer_types,
        use_qk_norm=c.get("use_query_key_norm", False),
        use_post_attention_norm=c.get("use_post_attention_norm", False),
        use_post_ffw_norm=c.get("use_post_ffw_norm", False),
    )
    if is_gemma3:
        fields.update(
            global_rope_wavelength=c.get("global_rope_wavelength", 1_000_000.0),
            local_rope_wavelength=c.get("local_rope_wavelength", 10_000.0),
            global_rope_scaling_factor=c.get("global_rope_scaling_factor", 1.0),
        )
    return GemmaConfig(**fields)


def weight_mapping(config):
    """`{our_name: (keras_hub_name, Layout)}` for KerasHub's Gemma backbones."""
    mapping = {
        "token_embedding/embeddings": ("token_embedding/embeddings", SAME),
        "final_norm/scale": ("final_normalization/scale", SAME),
    }
    for index in range(config.num_layers):
        ours, theirs = f"decoder_block_{index}", f"decoder_block_{index}"
        block = {
            "pre_attention_norm/scale": ("pre_attention_norm/scale", SAME),
            "attention/query": ("attention/query/kernel", heads_first(config.num_query_heads)),
            "attention/key": ("attention/key/kernel", heads_first(config.num_key_value_heads)),
            "attention/value": ("attention/value/kernel", heads_first(config.num_key_value_heads)),
            "attention/output": (
                "attention/attention_output/kernel",
                split_heads(config.num_query_heads),
            ),
            "pre_ffw_norm/scale": ("pre_ffw_norm/scale", SAME),
            "ffw/gate": ("ffw_gating/kernel", SAME),
            "ffw/up": ("ffw_gating_2/kernel", SAME),
            "ffw/down": ("ffw_linear/kernel", SAME),
        }
        if config.use_qk_norm:
            block["attention/query_norm/scale"] = ("attention/query_norm/scale", SAME)
            block["attention/key_norm/scale"] = ("attention/key_norm/scale", SAME)
        if config.use_post_attention_norm:
            block["post_attention_norm/scale"] = ("post_attention_norm/scale", SAME)
        if config.use_post_ffw_norm:
            block["post_ffw_norm/scale"] = ("post_ffw_norm/scale", SAME)
        for our_name, (their_name, layout) in block.items():
            mapping[f"{ours}/{our_name}"] = (f"{theirs}/{their_name}", layout)
    return mapping


def keras_hub_config(config):
    """`(registered_name, backbone config)` for KerasHub, inverse of `config_from_keras_hub`."""
    from gemma_keras.config import ConfigError

    if config.query_pre_attn_scalar == config.head_dim:
        query_head_dim_normalize = True
    elif config.query_pre_attn_scalar == config.hidden_dim / config.num_query_heads:
        query_head_dim_normalize = False
    else:
        raise ConfigError(
            "KerasHub scales queries by head_dim or hidden_dim / num_query_heads only; "
            f"query_pre_attn_scalar={config.query_pre_attn_scalar} fits neither."
        )
    fields = dict(
        vocabulary_size=config.vocabulary_size,
        num_layers=config.num_layers,
        num_query_heads=config.num_query_heads,
        num_key_value_heads=config.num_key_value_heads,
        hidden_dim=config.hidden_dim,
        head_dim=config.head_dim,
        layer_norm_epsilon=config.layer_norm_epsilon,
        dropout=0,
        query_head_dim_normalize=query_head_dim_normalize,
        use_post_ffw_norm=config.use_post_ffw_norm,
        use_post_attention_norm=config.use_post_attention_norm,
        final_logit_soft_cap=config.final_logit_soft_cap,
        attention_logit_soft_cap=config.attention_logit_soft_cap,
        use_sliding_window_attention="local" in config.layer_types,
        sliding_window_size=config.sliding_window or 4096,
    )
    if config.use_qk_norm:
        expected = every_nth_global(config.num_layers)
        registered_name = GEMMA3_CLASS
        fields.update(
            intermediate_dim=config.intermediate_dim,
            use_query_key_norm=True,
            global_rope_scaling_factor=config.global_rope_scaling_factor,
            local_rope_scaling_factor=1.0,
            image_size=None,
            vision_encoder=None,
        )
    else:
        expected = alternating_local_global(config.num_layers)
        registered_name = GEMMA_CLASS
        fields.update(intermediate_dim=2 * config.intermediate_dim)
    if "local" in config.layer_types and config.layer_types != expected:
        raise ConfigError(
            f"KerasHub's {registered_name} fixes the local/global layer pattern; "
            f"layer_types={list(config.layer_types)} differs from it."
        )
    return registered_name, fields
