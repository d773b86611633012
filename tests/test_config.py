import json
import re

import pytest

from conftest import VARIANTS, tiny_config
from gemma_keras import ConfigError, GemmaConfig
from gemma_keras.config import ARCHITECTURES


def test_published_parameter_counts_without_allocating():
    assert GemmaConfig.named("gemma_2b").num_parameters() == 2_506_172_416
    assert GemmaConfig.named("gemma_7b").num_parameters() == 8_537_680_896
    assert GemmaConfig.named("gemma3_270m").num_parameters() == 268_098_176


@pytest.mark.parametrize("variant", VARIANTS)
def test_parameter_formula_matches_built_model(variant):
    from gemma_keras import GemmaCausalLM

    config = tiny_config(variant)
    model = GemmaCausalLM.from_gemma_config(config)
    assert model.count_params() == config.num_parameters()


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_named_architectures_round_trip_through_json(name):
    config = GemmaConfig.named(name)
    assert GemmaConfig.from_json(config.to_json()) == config
    json.loads(config.to_json())


def test_generations_are_values_of_one_config():
    gemma3 = GemmaConfig.named("gemma3_270m")
    assert gemma3.layer_types.count("global") == 3
    assert [i for i, t in enumerate(gemma3.layer_types) if t == "global"] == [5, 11, 17]
    gemma2 = GemmaConfig.named("gemma2_9b")
    assert gemma2.layer_types[:2] == ("local", "global")
    assert GemmaConfig.named("gemma2_27b").query_pre_attn_scalar == 144
    assert GemmaConfig.named("gemma_2b").query_pre_attn_scalar == 256


BAD_CONFIGS = [
    (dict(num_query_heads=4, num_key_value_heads=3), "num_key_value_heads"),
    (dict(num_layers=2, layer_types=("global", "sideways"), sliding_window=4), "layer_types[1]"),
    (dict(num_layers=2, layer_types=("global",)), "layer_types"),
    (dict(sliding_window=-4), "sliding_window"),
    (dict(num_layers=2, layer_types=("local", "global")), "sliding_window"),
    (dict(hidden_dim=0), "hidden_dim"),
    (dict(head_dim=7), "head_dim"),
    (dict(attention_logit_soft_cap=-1.0), "attention_logit_soft_cap"),
    (dict(query_pre_attn_scalar=0), "query_pre_attn_scalar"),
]


@pytest.mark.parametrize("changes,field", BAD_CONFIGS)
def test_inconsistent_config_names_the_field(changes, field):
    fields = dict(
        vocabulary_size=100,
        num_layers=2,
        hidden_dim=32,
        intermediate_dim=64,
        num_query_heads=4,
        num_key_value_heads=1,
        head_dim=8,
    )
    fields.update(changes)
    with pytest.raises(ConfigError, match=re.escape(f"GemmaConfig.{field}")):
        GemmaConfig(**fields)


def test_from_dict_rejects_unknown_and_missing_fields():
    data = tiny_config("gemma1_mqa").to_dict()
    with pytest.raises(ConfigError, match="unknown fields \\['num_experts'\\]"):
        GemmaConfig.from_dict({**data, "num_experts": 8})
    del data["head_dim"]
    with pytest.raises(ConfigError, match="missing required fields \\['head_dim'\\]"):
        GemmaConfig.from_dict(data)


def test_unknown_architecture_name():
    with pytest.raises(ConfigError, match="gemma_3b"):
        GemmaConfig.named("gemma_3b")
