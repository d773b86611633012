"""GemmaBackbone: token ids in, final hidden states out."""

import re

import keras
from keras import ops

from gemma_keras import distribution, gptq, lora_weights, quantization
from gemma_keras.config import GemmaConfig
from gemma_keras.layers.decoder_block import DecoderBlock
from gemma_keras.layers.rms_norm import RMSNorm
from gemma_keras.layers.token_embedding import TokenEmbedding


class GemmaBackbone(quantization.QuantizesFloat16, keras.Model):
    """The Gemma decoder stack as a functional `keras.Model`.

    Inputs `{"token_ids": int [batch, seq], "padding_mask": [batch, seq]}`
    (1 for real tokens), output the final-normalised hidden states
    `[batch, seq, hidden_dim]`, as KerasHub's `GemmaBackbone`.

    Example:

    >>> import numpy as np
    >>> from gemma_keras import GemmaBackbone, GemmaConfig
    >>> config = GemmaConfig(vocabulary_size=100, num_layers=2, hidden_dim=32,
    ...                      intermediate_dim=64, num_query_heads=4,
    ...                      num_key_value_heads=1, head_dim=8)
    >>> backbone = GemmaBackbone(config)
    >>> hidden = backbone({"token_ids": np.array([[2, 5, 7]]),
    ...                    "padding_mask": np.ones((1, 3), "int32")})
    >>> tuple(hidden.shape)
    (1, 3, 32)
    """

    def __init__(self, config, dtype=None, **kwargs):
        if isinstance(config, dict):
            config = GemmaConfig.from_dict(config)
        # Under a keras.distribution, a split that does not divide fails here
        # with the weight's name, not deep inside JAX as the weight is made.
        distribution.check_model(config)
        policy = (
            keras.dtype_policies.get(dtype) if dtype is not None else keras.config.dtype_policy()
        )
        token_embedding = TokenEmbedding(
            config.vocabulary_size,
            config.hidden_dim,
            logit_soft_cap=config.final_logit_soft_cap,
            dtype=policy,
            name="token_embedding",
        )
        decoder_blocks = [
            DecoderBlock(config, index, dtype=policy, name=f"decoder_block_{index}")
            for index in range(config.num_layers)
        ]
        final_norm = RMSNorm(config.layer_norm_epsilon, dtype=policy, name="final_norm")

        token_ids = keras.Input(shape=(None,), dtype="int32", name="token_ids")
        padding_mask = keras.Input(shape=(None,), dtype="int32", name="padding_mask")
        x = token_embedding(token_ids)
        for block in decoder_blocks:
            x = block(x, padding_mask)
        hidden = final_norm(x)
        super().__init__(
            inputs={"token_ids": token_ids, "padding_mask": padding_mask},
            outputs=hidden,
            **kwargs,
        )
        # Functional models drop a `dtype` argument; the layers above hold it.
        self.dtype_policy = policy
        self.config = config
        self.token_embedding = token_embedding
        self.decoder_blocks = decoder_blocks
        self.final_norm = final_norm

    def call_with_cache(self, token_ids, key_mask, positions, caches, cache_index):
        """Runs `token_ids` [batch, seq] written at cache slots `cache_index ...`
        (None: the caches are empty, and the tokens attend to each other only).

        `caches` holds one `(key_cache, value_cache)` per layer (see
        `init_cache`), `key_mask` [batch, cache_length] marks the slots that hold
        real tokens (those being written included), `positions` [batch, seq]
        are the RoPE positions. Returns `(hidden, updated_caches)`.
        """
        x = self.token_embedding(token_ids)
        plans = {}  # one per kind of layer (see `Attention.plan`)
        updated_caches = []
        for block, cache in zip(self.decoder_blocks, caches, strict=True):
            attention = block.attention
            if attention.plan_key not in plans:
                plans[attention.plan_key] = attention.plan(positions, key_mask, cache, cache_index)
            x, cache = block(x, plan=plans[attention.plan_key], cache=cache)
            updated_caches.append(cache)
        return self.final_norm(x), updated_caches

    def init_cache(self, batch_size, cache_length):
        """One zeroed `(key_cache, value_cache)` per layer for `cache_length` sequence slots.

        Each is [batch, slots, kv_heads, head_dim] in the compute dtype, where
        slots is `cache_length` for global layers and at most `sliding_window`
        for local ones (a ring buffer: local layers never look further back).
        """
        config = self.config
        dtype = self.dtype_policy.compute_dtype
        caches = []
        for layer_type in config.layer_types:
            slots = cache_length
            if layer_type == "local":
                slots = min(cache_length, config.sliding_window)
            shape = (batch_size, slots, config.num_key_value_heads, config.head_dim)
            caches.append((_zeros(shape, dtype), _zeros(shape, dtype)))
        return caches

    @staticmethod
    def get_layout_map(
        device_mesh, model_parallel_dim_name="model", data_parallel_dim_name="batch"
    ):
        """A `keras.distribution.LayoutMap` that shards every Gemma (1, 2, 3;
        MHA, GQA and MQA) over `device_mesh`, as KerasHub's
        `GemmaBackbone.get_layout_map`; see `gemma_keras.distribution`.

        >>> import keras  # doctest: +SKIP
        >>> mesh = keras.distribution.DeviceMesh((2, 4), ["batch", "model"],
        ...                                      keras.distribution.list_devices())
        >>> layout_map = GemmaBackbone.get_layout_map(mesh)
        >>> keras.distribution.set_distribution(keras.distribution.ModelParallel(
        ...     layout_map=layout_map, batch_dim_name="batch"))
        >>> model = GemmaCausalLM.from_preset("gemma_2b_en")  # each shard on its device
        """
        return distribution.layout_map(device_mesh, model_parallel_dim_name, data_parallel_dim_name)

    def lora_layers(self):
        """`{path: layer}` of every layer that takes a LoRA adapter, keyed by a
        stable path such as `decoder_block_3/attention/query` or
        `token_embedding` (adapter files use these keys, never layer indices)."""
        layers = {}
        for block in self.decoder_blocks:
            attention, ffw = block.attention, block.ffw
            for projection in (attention.query, attention.key, attention.value):
                layers[f"{block.name}/attention/{projection.name}"] = projection
            layers[f"{block.name}/attention/output"] = attention.output_projection
            for projection in (ffw.gate, ffw.up, ffw.down):
                layers[f"{block.name}/ffw/{projection.name}"] = projection
        layers["token_embedding"] = self.token_embedding
        return layers

    def default_lora_layer_names(self):
        """KerasHub's default LoRA targets: the query and value projections."""
        return ["query", "value"]

    def enable_lora(self, rank, target_layer_names=None, lora_alpha=None):
        """Freezes every weight and adds LoRA adapters to the projections named in
        `target_layer_names` (default: query and value, as KerasHub), in every
        decoder block. Names: `query`, `key`, `value`, `output`, `gate`, `up`,
        `down`, `token_embedding` (KerasHub's and Hugging Face's names for the
        same projections, e.g. `query_dense` or `q_proj`, are accepted too).
        Only the adapters train; see `Projection` for the parameterisation.

        >>> model.backbone.enable_lora(4)  # doctest: +SKIP
        >>> model.backbone.enable_lora(8, ["query", "key", "value", "output",
        ...                                "gate", "up", "down"])  # doctest: +SKIP
        """
        lora_weights.enable_lora(self, rank, target_layer_names, lora_alpha)

    def save_lora_weights(self, filepath):
        """Writes the adapters only to `filepath` (a `.lora.h5` name), keyed by
        stable layer paths, with the rank, alpha and model shape they need."""
        lora_weights.save_lora_weights(self, filepath)

    def load_lora_weights(self, filepath):
        """Loads adapters saved by `save_lora_weights` (enabling LoRA with the
        file's rank and targets first if needed). A KerasHub `.lora.h5` file
        (per-head adapters, keyed by layer index) is merged into the base
        weights instead, exactly: see `gemma_keras.lora_weights`."""
        lora_weights.load_lora_weights(self, filepath)

    def merge_lora_weights(self):
        """Folds every adapter into its base weight and removes it: the model is
        a plain one again, as fast as before LoRA, and all its weights train."""
        lora_weights.merge_lora_weights(self)

    def quantize(self, mode=None, config=None, filters=None, group_size=None, **kwargs):
        """Quantizes the weights of every projection and the embedding in place,
        as `keras.Model.quantize` does it: "int8" (per output channel) or
        "int4" (groups of 128 inputs, or `config.block_size` of a Keras
        `Int4QuantizationConfig`); `filters`, a regex (or list of them) on layer
        paths or a callable on layers, picks which. Every layer is checked
        before any changes. See `gemma_keras.quantization` for the forms.
        "gptq" with a `keras.quantizers.GPTQConfig` calibrates the int4
        (`weight_bits=4`) or int8 (8) forms on data: see `gemma_keras.gptq`.

        >>> model.backbone.quantize("int8")  # doctest: +SKIP
        """
        kwargs.pop("type_check", None)
        if kwargs:
            raise TypeError(f"quantize() got unexpected arguments {sorted(kwargs)}.")
        if mode == "gptq" and group_size is not None:
            raise quantization.QuantizationError(
                "quantize('gptq') takes its group size from `GPTQConfig(group_size=...)`."
            )
        if mode != "gptq":
            quantization.check_mode(mode, also=", or 'gptq' with a keras.quantizers.GPTQConfig")
        layers = self.lora_layers()
        chosen = {path: layer for path, layer in layers.items() if _selected(layer, filters)}
        if not chosen:
            raise quantization.QuantizationError(
                f"filters={filters!r} match no layer; paths look like "
                f"{next(iter(layers.values())).path!r}."
            )
        done = sorted(path for path, layer in chosen.items() if layer.quantization_mode)
        if done:
            raise quantization.QuantizationError(
                f"{done[0]} is already quantized ({chosen[done[0]].quantization_mode}); "
                "each weight is quantized once: load the model again to quantize it another way."
            )
        adapted = sorted(path for path, layer in chosen.items() if layer.lora_enabled)
        if adapted:
            raise quantization.QuantizationError(
                f"{adapted[0]} has a LoRA adapter: call `merge_lora_weights()` first, or "
                "quantize before `enable_lora` (QLoRA)."
            )
        if mode == "gptq":
            gptq.quantize_backbone(self, chosen, config)
            return
        for path, layer in chosen.items():
            columns = layer.weight_shape[1]
            where = f"{path} ({columns} wide)"
            size = quantization.group_size_for(mode, columns, config, where, group_size)
            shapes = layer.quantized_variable_shapes(mode, size)
            distribution.check_layouts({f"{path}/{key}": s for key, (s, _) in shapes.items()})
        for layer in chosen.values():
            layer.quantize(mode, config=config, group_size=group_size)

    def get_config(self):
        return {
            "name": self.name,
            "trainable": self.trainable,
            "config": self.config.to_dict(),
            "dtype": keras.dtype_policies.serialize(self.dtype_policy),
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)


def _zeros(shape, dtype):
    """Zeros, laid out over the current distribution's mesh when there is one."""
    layout = distribution.cache_layout(shape)
    if layout is None:
        return ops.zeros(shape, dtype)
    return keras.distribution.distribute_tensor(ops.zeros(shape, dtype), layout)


def _selected(layer, filters):
    """Whether `filters` (Keras' `quantize(filters=...)`) picks `layer`."""
    if filters is None:
        return True
    if callable(filters):
        return bool(filters(layer))
    patterns = [filters] if isinstance(filters, str) else filters
    if not isinstance(patterns, (list, tuple)) or not all(isinstance(p, str) for p in patterns):
        raise quantization.QuantizationError(
            f"filters must be a regular expression, a list of them or a callable on "
            f"layers; got {filters!r}."
        )
    try:
        return any(re.search(pattern, layer.path) for pattern in patterns)
    except re.error as error:
        raise quantization.QuantizationError(
            f"filters={filters!r} is not a regular expression: {error}."
        ) from None
