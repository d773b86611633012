"""GemmaCausalLM: the backbone plus the tied output projection to vocabulary logits."""

import keras

from gemma_keras.backbone import GemmaBackbone


class GemmaCausalLM(keras.Model):
    """Gemma as a language model: inputs as `GemmaBackbone`, output float32
    logits `[batch, seq, vocabulary_size]` (final soft-cap applied when the
    config has one).

    Example:

    >>> import numpy as np
    >>> from gemma_keras import GemmaCausalLM, GemmaConfig
    >>> config = GemmaConfig(vocabulary_size=100, num_layers=2, hidden_dim=32,
    ...                      intermediate_dim=64, num_query_heads=4,
    ...                      num_key_value_heads=1, head_dim=8)
    >>> model = GemmaCausalLM.from_gemma_config(config)
    >>> logits = model({"token_ids": np.array([[2, 5, 7]]),
    ...                 "padding_mask": np.ones((1, 3), "int32")})
    >>> tuple(logits.shape)
    (1, 3, 100)
    """

    def __init__(self, backbone, **kwargs):
        inputs = backbone.input
        hidden = backbone(inputs)
        logits = backbone.token_embedding(hidden, reverse=True)
        super().__init__(inputs=inputs, outputs=logits, dtype=backbone.dtype_policy, **kwargs)
        self.backbone = backbone
        # A `GemmaTokenizer`, set by `from_preset` (None for a model built from a config).
        self.tokenizer = None

    @classmethod
    def from_gemma_config(cls, config, dtype=None):
        return cls(GemmaBackbone(config, dtype=dtype))

    @classmethod
    def from_preset(cls, preset, dtype=None, load_weights=True):
        """Loads a model and its tokenizer from a preset name, a local path or a URL.

        `preset` is a registry name (`gemma_keras.list_presets()`), a KerasHub
        preset directory, a transformers checkpoint directory, a `.gguf` file,
        `kaggle://owner/model/keras/variation/version` or `hf://org/repo`.
        `dtype` defaults to Keras' global policy (float32 unless changed);
        weights are read straight into it. With `load_weights=False` the
        weights are randomly initialised.

        >>> model = GemmaCausalLM.from_preset("gemma3_270m_q4_k_m")  # doctest: +SKIP
        >>> model.tokenizer.encode("The capital of France is")  # doctest: +SKIP
        [2, 818, 5279, 529, 7001, 563]
        """
        from gemma_keras.loading import from_preset

        return from_preset(preset, dtype=dtype, load_weights=load_weights)

    def save_to_preset(self, directory, dtype=None):
        """Writes a KerasHub preset directory (`keras_hub.models.GemmaCausalLM.from_preset`
        loads it too). `dtype` of the stored weights defaults to the model's variable dtype."""
        from gemma_keras.checkpoints import keras_hub
        from gemma_keras.checkpoints.weight_mapping import get_weights

        keras_hub.write_preset(
            directory,
            self.config,
            get_weights(self),
            self._tokenizer_proto(),
            dtype or self.backbone.dtype_policy.variable_dtype,
        )

    def export_to_huggingface(self, directory, dtype=None):
        """Writes a transformers checkpoint directory (config.json, model.safetensors,
        tokenizer.model) that `AutoModelForCausalLM.from_pretrained` loads."""
        from gemma_keras.checkpoints import huggingface
        from gemma_keras.checkpoints.weight_mapping import get_weights

        huggingface.write_checkpoint(
            directory,
            self.config,
            get_weights(self),
            self._tokenizer_proto(),
            dtype or self.backbone.dtype_policy.variable_dtype,
        )

    def _tokenizer_proto(self):
        if self.tokenizer is None:
            raise ValueError(
                "This model has no tokenizer to save; set `model.tokenizer = "
                "GemmaTokenizer(path)` first."
            )
        return self.tokenizer.proto

    @property
    def config(self):
        return self.backbone.config

    def call_with_cache(self, token_ids, key_mask, positions, caches, cache_index):
        """Cached forward pass (see `GemmaBackbone.call_with_cache`): `(logits, caches)`."""
        hidden, caches = self.backbone.call_with_cache(
            token_ids, key_mask, positions, caches, cache_index
        )
        return self.backbone.token_embedding(hidden, reverse=True), caches

    def init_cache(self, batch_size, cache_length):
        return self.backbone.init_cache(batch_size, cache_length)

    def get_config(self):
        return {
            "name": self.name,
            "trainable": self.trainable,
            "backbone": keras.saving.serialize_keras_object(self.backbone),
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["backbone"] = keras.saving.deserialize_keras_object(
            config["backbone"], custom_objects={"GemmaBackbone": GemmaBackbone}
        )
        return cls(**config)
