"""One configuration for every Gemma text model.

Gemma 1/1.1, Gemma 2 and Gemma 3 differ only in the values of these fields, so
there is one set of layers and one backbone, not a module tree per generation.

Example:

>>> from gemma_keras import GemmaConfig
>>> config = GemmaConfig.named("gemma_2b")
>>> config.num_parameters()
2506172416
>>> tiny = GemmaConfig(vocabulary_size=1000, num_layers=2, hidden_dim=64,
...                    intermediate_dim=128, num_query_heads=4,
...                    num_key_value_heads=1, head_dim=16)
>>> GemmaConfig.from_dict(tiny.to_dict()) == tiny
True
"""

import dataclasses
import json

LAYER_TYPES = ("global", "local")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


@dataclasses.dataclass
class GemmaConfig:
    """Every architectural fact of a Gemma text model.

    Args:
        vocabulary_size: number of token ids.
        num_layers: number of decoder blocks.
        hidden_dim: width of the residual stream.
        intermediate_dim: width of each of the two FFN projections (gate and
            up), i.e. the real per-gate width (16384 for Gemma 2B; KerasHub
            stores twice this).
        num_query_heads: attention heads for queries.
        num_key_value_heads: heads for keys and values (1 = MQA, equal to
            `num_query_heads` = MHA, anything dividing it = GQA).
        head_dim: width of one attention head.
        layer_norm_epsilon: RMSNorm epsilon.
        query_pre_attn_scalar: queries are scaled by
            `query_pre_attn_scalar ** -0.5`. `None` means `head_dim`.
        attention_logit_soft_cap: `cap * tanh(logits / cap)` on attention
            logits (Gemma 2: 50.0). `None` disables it.
        final_logit_soft_cap: the same on the output logits (Gemma 2: 30.0).
        sliding_window: number of most recent positions (the current one
            included) a local layer attends to. Required when any layer is
            local.
        layer_types: per layer, `"global"` (full causal attention) or
            `"local"` (sliding window). `None` means all global.
        global_rope_wavelength: RoPE base of global layers.
        local_rope_wavelength: RoPE base of local layers.
        global_rope_scaling_factor: linear position scaling on global layers
            (Gemma 3 4B and larger: 8.0).
        use_qk_norm: RMSNorm over head_dim on queries and keys before RoPE.
        use_post_attention_norm: RMSNorm on the attention output before the
            residual add (Gemma 2 and 3).
        use_post_ffw_norm: RMSNorm on the FFN output before the residual add.
        max_sequence_length: the longest context (prompt plus generated
            tokens) the model was trained for; `generate` refuses longer.
    """

    vocabulary_size: int
    num_layers: int
    hidden_dim: int
    intermediate_dim: int
    num_query_heads: int
    num_key_value_heads: int
    head_dim: int
    layer_norm_epsilon: float = 1e-6
    query_pre_attn_scalar: float | None = None
    attention_logit_soft_cap: float | None = None
    final_logit_soft_cap: float | None = None
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None
    global_rope_wavelength: float = 10_000.0
    local_rope_wavelength: float = 10_000.0
    global_rope_scaling_factor: float = 1.0
    use_qk_norm: bool = False
    use_post_attention_norm: bool = False
    use_post_ffw_norm: bool = False
    max_sequence_length: int = 8192

    def __post_init__(self):
        if self.layer_types is None:
            self.layer_types = ("global",) * int(self.num_layers)
        self.layer_types = tuple(self.layer_types)
        if self.query_pre_attn_scalar is None:
            self.query_pre_attn_scalar = self.head_dim
        self._validate()

    def _validate(self):
        for name in (
            "vocabulary_size",
            "num_layers",
            "hidden_dim",
            "intermediate_dim",
            "num_query_heads",
            "num_key_value_heads",
            "head_dim",
            "max_sequence_length",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"GemmaConfig.{name} must be a positive integer, got {value!r}.")
        if self.num_query_heads % self.num_key_value_heads:
            raise ConfigError(
                "GemmaConfig.num_key_value_heads must divide num_query_heads, got "
                f"num_query_heads={self.num_query_heads} and "
                f"num_key_value_heads={self.num_key_value_heads}."
            )
        if self.head_dim % 2:
            raise ConfigError(
                f"GemmaConfig.head_dim must be even for rotary embeddings, got {self.head_dim}."
            )
        if len(self.layer_types) != self.num_layers:
            raise ConfigError(
                f"GemmaConfig.layer_types has {len(self.layer_types)} entries but "
                f"num_layers is {self.num_layers}; give one entry per layer."
            )
        for index, layer_type in enumerate(self.layer_types):
            if layer_type not in LAYER_TYPES:
                raise ConfigError(
                    f"GemmaConfig.layer_types[{index}] is {layer_type!r}; "
                    f"each entry must be one of {LAYER_TYPES}."
                )
        if self.sliding_window is not None:
            if (
                isinstance(self.sliding_window, bool)
                or not isinstance(self.sliding_window, int)
                or self.sliding_window <= 0
            ):
                raise ConfigError(
                    "GemmaConfig.sliding_window must be a positive integer or None, "
                    f"got {self.sliding_window!r}."
                )
        elif "local" in self.layer_types:
            raise ConfigError(
                "GemmaConfig.sliding_window is None but layer_types has local layers; "
                "set sliding_window or make every layer global."
            )
        for name in (
            "layer_norm_epsilon",
            "query_pre_attn_scalar",
            "global_rope_wavelength",
            "local_rope_wavelength",
            "global_rope_scaling_factor",
        ):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not value > 0:
                raise ConfigError(f"GemmaConfig.{name} must be a positive number, got {value!r}.")
        for name in ("attention_logit_soft_cap", "final_logit_soft_cap"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (int, float)) or not value > 0):
                raise ConfigError(
                    f"GemmaConfig.{name} must be a positive number or None, got {value!r}."
                )

    @property
    def query_dim(self):
        return self.num_query_heads * self.head_dim

    @property
    def key_value_dim(self):
        return self.num_key_value_heads * self.head_dim

    def num_parameters(self):
        """Number of weights, computed from the sizes alone (nothing is allocated)."""
        attention = self.hidden_dim * (2 * self.query_dim + 2 * self.key_value_dim)
        feedforward = 3 * self.hidden_dim * self.intermediate_dim
        norms_per_layer = 2 + self.use_post_attention_norm + self.use_post_ffw_norm
        norms = norms_per_layer * self.hidden_dim + 2 * self.use_qk_norm * self.head_dim
        per_layer = attention + feedforward + norms
        embedding = self.vocabulary_size * self.hidden_dim
        return embedding + self.num_layers * per_layer + self.hidden_dim

    def to_dict(self):
        data = dataclasses.asdict(self)
        data["layer_types"] = list(self.layer_types)
        return data

    @classmethod
    def from_dict(cls, data):
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(
                f"GemmaConfig got unknown fields {unknown}; known fields are {sorted(known)}."
            )
        missing = sorted(
            field.name
            for field in dataclasses.fields(cls)
            if field.default is dataclasses.MISSING and field.name not in data
        )
        if missing:
            raise ConfigError(f"GemmaConfig is missing required fields {missing}.")
        return cls(**data)

    def to_json(self):
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text):
        return cls.from_dict(json.loads(text))

    @classmethod
    def named(cls, name):
        """The config of a published Gemma size, e.g. `"gemma_2b"` or `"gemma3_270m"`."""
        if name not in ARCHITECTURES:
            raise ConfigError(
                f"Unknown Gemma architecture {name!r}; known: {sorted(ARCHITECTURES)}."
            )
        return cls(**ARCHITECTURES[name])


def alternating_local_global(num_layers):
    """Gemma 2: even layers (0, 2, ...) are local, odd layers global."""
    return tuple("local" if index % 2 == 0 else "global" for index in range(num_layers))


def every_nth_global(num_layers, n=6):
    """Gemma 3: every n-th layer (n-1, 2n-1, ...) is global, the rest local."""
    return tuple("global" if (index + 1) % n == 0 else "local" for index in range(num_layers))


def _gemma1(**sizes):
    return dict(vocabulary_size=256_000, head_dim=256, **sizes)


def _gemma2(num_layers, **sizes):
    return dict(
        vocabulary_size=256_000,
        num_layers=num_layers,
        attention_logit_soft_cap=50.0,
        final_logit_soft_cap=30.0,
        sliding_window=4096,
        layer_types=alternating_local_global(num_layers),
        use_post_attention_norm=True,
        use_post_ffw_norm=True,
        **sizes,
    )


def _gemma3(num_layers, sliding_window, vocabulary_size=262_144, **sizes):
    large = sizes.get("global_rope_scaling_factor", 1.0) > 1.0
    return dict(
        max_sequence_length=131_072 if large else 32_768,
        vocabulary_size=vocabulary_size,
        num_layers=num_layers,
        sliding_window=sliding_window,
        layer_types=every_nth_global(num_layers),
        global_rope_wavelength=1_000_000.0,
        local_rope_wavelength=10_000.0,
        use_qk_norm=True,
        use_post_attention_norm=True,
        use_post_ffw_norm=True,
        **sizes,
    )


# Published sizes. Gemma 1.1 and CodeGemma share the Gemma 1 architectures.
ARCHITECTURES = {
    "gemma_2b": _gemma1(
        num_layers=18,
        hidden_dim=2048,
        intermediate_dim=16384,
        num_query_heads=8,
        num_key_value_heads=1,
    ),
    "gemma_7b": _gemma1(
        num_layers=28,
        hidden_dim=3072,
        intermediate_dim=24576,
        num_query_heads=16,
        num_key_value_heads=16,
    ),
    "gemma2_2b": _gemma2(
        26,
        hidden_dim=2304,
        intermediate_dim=9216,
        num_query_heads=8,
        num_key_value_heads=4,
        head_dim=256,
        query_pre_attn_scalar=256,
    ),
    "gemma2_9b": _gemma2(
        42,
        hidden_dim=3584,
        intermediate_dim=14336,
        num_query_heads=16,
        num_key_value_heads=8,
        head_dim=256,
        query_pre_attn_scalar=256,
    ),
    "gemma2_27b": _gemma2(
        46,
        hidden_dim=4608,
        intermediate_dim=36864,
        num_query_heads=32,
        num_key_value_heads=16,
        head_dim=128,
        query_pre_attn_scalar=144,
    ),
    "gemma3_270m": _gemma3(
        18,
        512,
        hidden_dim=640,
        intermediate_dim=2048,
        num_query_heads=4,
        num_key_value_heads=1,
        head_dim=256,
        query_pre_attn_scalar=256,
    ),
    "gemma3_1b": _gemma3(
        26,
        512,
        hidden_dim=1152,
        intermediate_dim=6912,
        num_query_heads=4,
        num_key_value_heads=1,
        head_dim=256,
        query_pre_attn_scalar=256,
    ),
    "gemma3_4b": _gemma3(
        34,
        1024,
        vocabulary_size=262_208,
        hidden_dim=2560,
        intermediate_dim=10240,
        num_query_heads=8,
        num_key_value_heads=4,
        head_dim=256,
        query_pre_attn_scalar=256,
        global_rope_scaling_factor=8.0,
    ),
    "gemma3_12b": _gemma3(
        48,
        1024,
        vocabulary_size=262_208,
        hidden_dim=3840,
        intermediate_dim=15360,
        num_query_heads=16,
        num_key_value_heads=8,
        head_dim=256,
        query_pre_attn_scalar=256,
        global_rope_scaling_factor=8.0,
    ),
    "gemma3_27b": _gemma3(
        62,
        1024,
        vocabulary_size=262_208,
        hidden_dim=5376,
        intermediate_dim=21504,
        num_query_heads=32,
        num_key_value_heads=16,
        head_dim=128,
        query_pre_attn_scalar=168,
        global_rope_scaling_factor=8.0,
    ),
}
