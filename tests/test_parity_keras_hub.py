"""gemma_keras equals KerasHub's Gemma with identical weights, through real preset files.

KerasHub writes a preset with its own `save_to_preset` and gemma_keras loads
it; gemma_keras writes one with `save_to_preset` and KerasHub loads it. Logits
are compared on the same inputs, a right-padded row included.
"""

import keras
import numpy as np
import pytest

from conftest import randomize, tiny_config, token_batch
from gemma_keras import GemmaCausalLM, GemmaConfig, GemmaTokenizer
from gemma_keras.checkpoints import keras_hub as keras_hub_format
from gemma_keras.checkpoints.weight_mapping import assign_weights, model_shapes
from gemma_keras.config import alternating_local_global

keras_hub = pytest.importorskip("keras_hub")

# Measured max |logit difference| in float32: 4.8e-7 (jax), 7.2e-7 (tensorflow, torch).
TOLERANCE = 1e-4

# Gemma 2 as KerasHub can express it (queries scaled by head_dim, fixed layer pattern).
KERAS_HUB_GEMMA2 = GemmaConfig(
    vocabulary_size=1000,
    num_layers=4,
    hidden_dim=64,
    intermediate_dim=128,
    num_query_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    attention_logit_soft_cap=50.0,
    final_logit_soft_cap=30.0,
    sliding_window=5,
    layer_types=alternating_local_global(4),
    use_post_attention_norm=True,
    use_post_ffw_norm=True,
)
CONFIGS = {
    "gemma1_mqa": tiny_config("gemma1_mqa"),
    "gemma1_mha": tiny_config("gemma1_mha"),
    "gemma2": KERAS_HUB_GEMMA2,
}


def inputs_for(config):
    token_ids = token_batch(config.vocabulary_size)
    padding_mask = np.ones_like(token_ids)
    padding_mask[1, 8:] = 0  # a right-padded row, as KerasHub's preprocessor pads
    return {"token_ids": token_ids, "padding_mask": padding_mask}


def logits(model, inputs):
    values = keras.ops.convert_to_numpy(model(inputs)).astype("float32")
    return values[inputs["padding_mask"].astype(bool)]


def random_keras_hub_model(config, tokenizer_proto, seed=0):
    registered_name, fields = keras_hub_format.keras_hub_config(config)
    backbone = keras_hub.models.GemmaBackbone(**fields, dtype="float32")
    rng = np.random.default_rng(seed)
    for variable in backbone.weights:
        std = 0.3 if "norm" in variable.path else 0.05
        variable.assign(rng.normal(0, std, variable.shape).astype("float32"))
    tokenizer = keras_hub.models.GemmaTokenizer(proto=tokenizer_proto)
    preprocessor = keras_hub.models.GemmaCausalLMPreprocessor(tokenizer, sequence_length=16)
    return keras_hub.models.GemmaCausalLM(backbone=backbone, preprocessor=preprocessor)


@pytest.mark.parametrize("variant", sorted(CONFIGS))
def test_keras_hub_preset_loads_in_gemma_keras(variant, tokenizer_proto, tmp_path):
    config = CONFIGS[variant]
    reference = random_keras_hub_model(config, tokenizer_proto)
    reference.save_to_preset(str(tmp_path))

    ours = GemmaCausalLM.from_preset(str(tmp_path))
    assert ours.config == config
    assert ours.tokenizer.proto == tokenizer_proto
    inputs = inputs_for(config)
    error = np.abs(logits(ours, inputs) - logits(reference, inputs)).max()
    print(f"{variant}: KerasHub preset -> gemma_keras, max |logit difference| = {error:.2e}")
    assert error <= TOLERANCE


@pytest.mark.parametrize("variant", sorted(CONFIGS))
def test_gemma_keras_preset_loads_in_keras_hub(variant, tokenizer_proto, tmp_path):
    config = CONFIGS[variant]
    ours = GemmaCausalLM.from_gemma_config(config, dtype="float32")
    assign_weights(ours, randomize(model_shapes(ours)))
    ours.tokenizer = GemmaTokenizer(tokenizer_proto)
    ours.save_to_preset(str(tmp_path))

    reference = keras_hub.models.GemmaCausalLM.from_preset(str(tmp_path), dtype="float32")
    inputs = inputs_for(config)
    error = np.abs(logits(ours, inputs) - logits(reference, inputs)).max()
    print(f"{variant}: gemma_keras preset -> KerasHub, max |logit difference| = {error:.2e}")
    assert error <= TOLERANCE
    prompt = "The capital of France is"
    assert np.asarray(reference.preprocessor.tokenizer(prompt)).tolist() == ours.tokenizer.encode(
        prompt, add_bos=False
    )


def test_sharded_keras_hub_weights(tokenizer_proto, tmp_path):
    config = CONFIGS["gemma1_mqa"]
    reference = random_keras_hub_model(config, tokenizer_proto)
    reference.save_to_preset(str(tmp_path))
    (tmp_path / "model.weights.h5").unlink()
    reference.backbone.save_weights(str(tmp_path / "model.weights.json"), max_shard_size=0.0003)
    assert len(list(tmp_path.glob("model_*.weights.h5"))) > 1

    ours = GemmaCausalLM.from_preset(str(tmp_path))
    inputs = inputs_for(config)
    assert np.abs(logits(ours, inputs) - logits(reference, inputs)).max() <= TOLERANCE


def test_bfloat16_preset_round_trip(tokenizer_proto, tmp_path):
    config = tiny_config("gemma3")
    ours = GemmaCausalLM.from_gemma_config(config, dtype="bfloat16")
    assign_weights(ours, randomize(model_shapes(ours)))
    ours.tokenizer = GemmaTokenizer(tokenizer_proto)
    ours.save_to_preset(str(tmp_path))
    loaded = GemmaCausalLM.from_preset(str(tmp_path), dtype="bfloat16")
    assert loaded.config == config
    inputs = inputs_for(config)
    np.testing.assert_array_equal(logits(loaded, inputs), logits(ours, inputs))
