"""One Gemma decoder block: attention and a gated FFN, each wrapped in RMSNorms."""

import keras
from keras import ops

from gemma_keras.config import GemmaConfig
from gemma_keras.layers.attention import Attention
from gemma_keras.layers.feed_forward import FeedForward
from gemma_keras.layers.precision import residual_dtype
from gemma_keras.layers.rms_norm import RMSNorm


class DecoderBlock(keras.layers.Layer):
    """Layer `layer_index` of the model described by `config`.

    ```
    x = x + post_attention_norm(attention(pre_attention_norm(x)))
    x = x + post_ffw_norm(ffw(pre_ffw_norm(x)))
    ```
    The post norms exist only when the config asks for them (Gemma 2 and 3).
    `x`, the residual stream, is float32 in a float16 model (its sums pass
    float16's range) and in the compute dtype otherwise: see
    `gemma_keras.layers.precision`.
    Whether the layer is local (sliding window, local RoPE base) or global
    comes from `config.layer_types[layer_index]`.

    `call(x, key_mask=None, plan=None, cache=None)`: `plan` is the
    `attention.plan(...)` that the backbone shares between the layers of one
    kind (see `Attention`); without it the block plans an uncached pass over
    `key_mask` [batch, seq] at positions `0 ... seq - 1`.
    """

    def __init__(self, config, layer_index, **kwargs):
        super().__init__(**kwargs)
        if isinstance(config, dict):
            config = GemmaConfig.from_dict(config)
        self.config = config
        self.layer_index = layer_index
        is_local = config.layer_types[layer_index] == "local"
        epsilon = config.layer_norm_epsilon
        self.residual_dtype = residual_dtype(self.compute_dtype)
        if self.residual_dtype != self.compute_dtype:
            # Keras would cast the float32 stream (and the caches) to float16 on the way in.
            self.autocast = False

        def norm(name, output_dtype=None):
            return RMSNorm(epsilon, output_dtype, dtype=self.dtype_policy, name=name)

        self.pre_attention_norm = norm("pre_attention_norm")
        self.attention = Attention(
            hidden_dim=config.hidden_dim,
            num_query_heads=config.num_query_heads,
            num_key_value_heads=config.num_key_value_heads,
            head_dim=config.head_dim,
            query_pre_attn_scalar=config.query_pre_attn_scalar,
            attention_logit_soft_cap=config.attention_logit_soft_cap,
            sliding_window=config.sliding_window if is_local else None,
            rope_wavelength=(
                config.local_rope_wavelength if is_local else config.global_rope_wavelength
            ),
            rope_scaling_factor=1.0 if is_local else config.global_rope_scaling_factor,
            use_qk_norm=config.use_qk_norm,
            layer_norm_epsilon=epsilon,
            dtype=self.dtype_policy,
            name="attention",
        )
        self.post_attention_norm = (
            norm("post_attention_norm", self.residual_dtype)
            if config.use_post_attention_norm
            else None
        )
        self.pre_ffw_norm = norm("pre_ffw_norm")
        self.ffw = FeedForward(
            config.hidden_dim, config.intermediate_dim, dtype=self.dtype_policy, name="ffw"
        )
        self.post_ffw_norm = (
            norm("post_ffw_norm", self.residual_dtype) if config.use_post_ffw_norm else None
        )

    def build(self, input_shape, *args, **kwargs):
        hidden_shape = (None, None, self.config.hidden_dim)
        for layer in (
            self.pre_attention_norm,
            self.post_attention_norm,
            self.pre_ffw_norm,
            self.post_ffw_norm,
            self.ffw,
            self.attention,
        ):
            if layer is not None:
                layer.build(hidden_shape)

    def call(self, x, key_mask=None, plan=None, cache=None):
        x = ops.cast(x, self.residual_dtype)
        if plan is None:
            batch, length = ops.shape(x)[0], ops.shape(x)[1]
            positions = ops.broadcast_to(
                ops.arange(length, dtype="int32")[None, :], (batch, length)
            )
            plan = self.attention.plan(positions, key_mask)
        attended = self.attention(self.pre_attention_norm(x), plan=plan, cache=cache)
        if cache is not None:
            attended, cache = attended
        if self.post_attention_norm is not None:
            attended = self.post_attention_norm(attended)
        x = x + ops.cast(attended, x.dtype)
        transformed = self.ffw(self.pre_ffw_norm(x))
        if self.post_ffw_norm is not None:
            transformed = self.post_ffw_norm(transformed)
        x = x + ops.cast(transformed, x.dtype)
        if cache is None:
            return x
        return x, cache

    def compute_output_spec(self, x, *args, cache=None, **kwargs):
        output = keras.KerasTensor(x.shape, self.residual_dtype)
        if cache is None:
            return output
        return output, cache

    def get_config(self):
        return {
            **super().get_config(),
            "config": self.config.to_dict(),
            "layer_index": self.layer_index,
        }
