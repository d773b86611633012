"""GemmaBackbone / GemmaCausalLM: serialisation, dtype policies and bad input."""

import keras
import numpy as np
import pytest

from conftest import VARIANTS, randomize, tiny_config, token_batch
from gemma_keras import GemmaBackbone, GemmaCausalLM, GemmaConfig, TokenIdError
from gemma_keras.checkpoints.weight_mapping import assign_weights, get_weights, model_shapes


def inputs_for(config, length=12):
    token_ids = token_batch(config.vocabulary_size, length=length)
    return {"token_ids": token_ids, "padding_mask": np.ones_like(token_ids)}


def logits_of(model, inputs):
    return keras.ops.convert_to_numpy(model(inputs)).astype("float32")


def test_top_level_imports():
    import gemma_keras

    assert gemma_keras.GemmaCausalLM is GemmaCausalLM
    assert gemma_keras.GemmaBackbone is GemmaBackbone


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "mixed_bfloat16"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_get_config_round_trip(variant, dtype):
    config = tiny_config(variant)
    model = GemmaCausalLM.from_gemma_config(config, dtype=dtype)
    # Keras' functional models drop a `dtype` argument; the policy must survive.
    for holder in (model, model.backbone):
        assert holder.dtype_policy.name == dtype
    compute_dtype = model.backbone.token_embedding.compute_dtype
    assert keras.ops.dtype(model.backbone.init_cache(1, 4)[0][0]) == compute_dtype
    assign_weights(model, randomize(model_shapes(model)))
    clone = GemmaCausalLM.from_config(model.get_config())
    assert clone.get_config() == model.get_config()
    assert clone.backbone.token_embedding.dtype_policy.name == dtype
    assert clone.config == config
    assign_weights(clone, get_weights(model))
    inputs = inputs_for(config)
    np.testing.assert_array_equal(logits_of(clone, inputs), logits_of(model, inputs))

    backbone = GemmaBackbone.from_config(model.backbone.get_config())
    assert backbone.get_config() == model.backbone.get_config()


def test_keras_file_round_trip(tmp_path):
    config = tiny_config("gemma2")
    model = GemmaCausalLM.from_gemma_config(config)
    assign_weights(model, randomize(model_shapes(model)))
    path = tmp_path / "model.keras"
    model.save(path)
    restored = keras.saving.load_model(
        path, custom_objects={"GemmaCausalLM": GemmaCausalLM, "GemmaBackbone": GemmaBackbone}
    )
    inputs = inputs_for(config)
    np.testing.assert_array_equal(logits_of(restored, inputs), logits_of(model, inputs))


# Random tiny models with logits of magnitude ~1: measured max |bf16 - fp32| is
# 0.010-0.056 depending on backend and variant (Gemma 3 worst); 0.1 leaves room without hiding
# a real error (a wrong formula moves logits by ~1).
BFLOAT16_TOLERANCE = 0.1


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", ["bfloat16", "mixed_bfloat16"])
def test_bfloat16_close_to_float32(variant, dtype):
    config = tiny_config(variant)
    weights = randomize(model_shapes(GemmaCausalLM.from_gemma_config(config)))
    reference = GemmaCausalLM.from_gemma_config(config, dtype="float32")
    assign_weights(reference, weights)
    model = GemmaCausalLM.from_gemma_config(config, dtype=dtype)
    assign_weights(model, weights)
    expected_variable_dtype = "bfloat16" if dtype == "bfloat16" else "float32"
    assert model.backbone.token_embedding.embeddings.dtype == expected_variable_dtype
    inputs = inputs_for(config)
    logits = logits_of(model, inputs)
    assert np.isfinite(logits).all()
    error = np.abs(logits - logits_of(reference, inputs)).max()
    print(f"{variant} {dtype}: max |logit difference| vs float32 = {error:.3f}")
    assert error <= BFLOAT16_TOLERANCE


@pytest.mark.parametrize("variant", VARIANTS)
def test_mixed_bfloat16_computes_what_bfloat16_computes_on_the_cast_weights(variant):
    """mixed_bfloat16 keeps float32 weights and multiplies them in bfloat16
    without casting them first (see `backends.linear`): its logits are still
    bit for bit those of a bfloat16 model holding the cast weights."""
    config = tiny_config(variant)
    weights = randomize(model_shapes(GemmaCausalLM.from_gemma_config(config)))
    mixed = GemmaCausalLM.from_gemma_config(config, dtype="mixed_bfloat16")
    assign_weights(mixed, weights)
    cast = GemmaCausalLM.from_gemma_config(config, dtype="bfloat16")
    assign_weights(cast, weights)
    inputs = inputs_for(config)
    np.testing.assert_array_equal(logits_of(mixed, inputs), logits_of(cast, inputs))


def test_embedding_scale_is_rounded_to_compute_dtype():
    config = tiny_config("gemma1_mqa")
    model = GemmaCausalLM.from_gemma_config(config, dtype="bfloat16")
    embedding = model.backbone.token_embedding
    embedding.embeddings.assign(np.ones(embedding.embeddings.shape, "float32"))
    scaled = keras.ops.convert_to_numpy(
        keras.ops.cast(embedding(np.array([[5]], "int32")), "float32")
    )
    # sqrt(64) = 8 exactly; a width whose root bf16 rounds: sqrt(2048) = 45.2548 -> 45.25
    assert scaled[0, 0, 0] == 8.0
    wide = GemmaBackbone(
        GemmaConfig(
            vocabulary_size=10,
            num_layers=1,
            hidden_dim=2048,
            intermediate_dim=8,
            num_query_heads=1,
            num_key_value_heads=1,
            head_dim=8,
        ),
        dtype="bfloat16",
    )
    wide.token_embedding.embeddings.assign(np.ones((10, 2048), "float32"))
    scaled = keras.ops.convert_to_numpy(
        keras.ops.cast(wide.token_embedding(np.array([[1]], "int32")), "float32")
    )
    assert scaled[0, 0, 0] == 45.25


@pytest.mark.parametrize("bad_id", [-1, 1000, 123456])
def test_out_of_vocabulary_token_ids_raise_clearly(bad_id):
    config = tiny_config("gemma1_mqa")
    model = GemmaCausalLM.from_gemma_config(config)
    token_ids = token_batch(config.vocabulary_size)
    token_ids[1, 3] = bad_id
    with pytest.raises(
        TokenIdError, match=rf"token id {bad_id} is outside the vocabulary \[0, 1000\)"
    ):
        model({"token_ids": token_ids, "padding_mask": np.ones_like(token_ids)})
