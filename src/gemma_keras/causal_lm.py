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

    @classmethod
    def from_gemma_config(cls, config, dtype=None):
        return cls(GemmaBackbone(config, dtype=dtype))

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
