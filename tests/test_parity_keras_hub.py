"""Gemma 1 (MQA and MHA) equals KerasHub's GemmaBackbone with identical weights.

The weights travel through `gemma_keras.checkpoints.keras_hub`, the same
mapping the KerasHub preset reader uses.
"""

import keras
import numpy as np
import pytest

from conftest import randomize, tiny_config, token_batch
from gemma_keras import GemmaCausalLM
from gemma_keras.checkpoints import keras_hub as keras_hub_format
from gemma_keras.checkpoints.weight_mapping import (
    assign_weights,
    from_model_weights,
    model_shapes,
    to_model_weights,
)

keras_hub = pytest.importorskip("keras_hub")

# Measured max |logit difference| in float32: 4.8e-7 (jax), 7.2e-7 (tensorflow, torch).
TOLERANCE = 1e-4


def keras_hub_causal_lm(config):
    registered_name, fields = keras_hub_format.keras_hub_config(config)
    assert registered_name == keras_hub_format.GEMMA_CLASS
    backbone = keras_hub.models.GemmaBackbone(**fields, dtype="float32")
    return keras_hub.models.GemmaCausalLM(backbone=backbone, preprocessor=None)


@pytest.mark.parametrize("variant", ["gemma1_mqa", "gemma1_mha"])
def test_logits_equal_keras_hub(variant):
    config = tiny_config(variant)
    ours = GemmaCausalLM.from_gemma_config(config, dtype="float32")
    mapping = keras_hub_format.weight_mapping(config)
    weights = randomize(model_shapes(ours))
    assign_weights(ours, weights)

    reference = keras_hub_causal_lm(config)
    their_weights = from_model_weights(weights, mapping)
    for variable in reference.backbone.weights:
        variable.assign(their_weights[variable.path])
    # And back again through the reader's direction.
    their_arrays = {v.path: np.asarray(v.numpy()) for v in reference.backbone.weights}
    loaded = GemmaCausalLM.from_gemma_config(config, dtype="float32")
    assign_weights(loaded, to_model_weights(their_arrays, mapping, model_shapes(loaded), "test"))

    token_ids = token_batch(config.vocabulary_size)
    padding_mask = np.ones_like(token_ids)
    padding_mask[1, 8:] = 0  # a right-padded row, as KerasHub's preprocessor pads
    inputs = {"token_ids": token_ids, "padding_mask": padding_mask}
    expected = np.asarray(keras.ops.convert_to_numpy(reference(inputs)))
    for model in (ours, loaded):
        actual = keras.ops.convert_to_numpy(model(inputs))
        error = np.abs(actual - expected)[padding_mask.astype(bool)].max()
        print(f"{variant}: max |logit difference| vs KerasHub = {error:.2e}")
        assert error <= TOLERANCE
