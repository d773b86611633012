"""Gemma 1, 2 and 3 (text) equal transformers' models with identical weights.

The weights travel through `gemma_keras.checkpoints.huggingface`, the same
mapping the safetensors reader and writer use.
"""

import keras
import numpy as np
import pytest

from conftest import tiny_config, token_batch
from gemma_keras import GemmaCausalLM
from gemma_keras.checkpoints import huggingface as hf_format
from gemma_keras.checkpoints.weight_mapping import assign_weights, model_shapes, to_model_weights

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# Measured max |logit difference| in float32, worst variant (Gemma 3): 1.9e-6 (jax),
# 1.9e-6 (tensorflow), 1.6e-6 (torch).
TOLERANCE = 1e-4


def random_transformers_model(config, seed=0):
    fields = hf_format.huggingface_config(config)
    model_type = fields.pop("model_type")
    architecture = fields.pop("architectures")[0]
    hf_config = transformers.AutoConfig.for_model(model_type, **fields)
    hf_config._attn_implementation = "eager"
    model = getattr(transformers, architecture)(hf_config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            std = 0.3 if "norm" in name else 0.05
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
    return model


@pytest.mark.parametrize(
    "variant,model_type",
    [
        ("gemma1_mqa", "gemma"),
        ("gemma1_mha", "gemma"),
        ("gemma2", "gemma2"),
        ("gemma3", "gemma3_text"),
    ],
)
def test_logits_equal_transformers(variant, model_type):
    config = tiny_config(variant)
    reference = random_transformers_model(config)
    assert reference.config.model_type == model_type
    assert hf_format.config_from_huggingface(reference.config.to_dict()) == config

    state = {name: tensor.detach().numpy() for name, tensor in reference.state_dict().items()}
    ours = GemmaCausalLM.from_gemma_config(config, dtype="float32")
    mapping = hf_format.weight_mapping(config)
    assign_weights(ours, to_model_weights(state, mapping, model_shapes(ours), "state_dict"))

    # 12 tokens: longer than the sliding window (5) of the Gemma 2/3 variants.
    token_ids = token_batch(config.vocabulary_size, length=12)
    with torch.no_grad():
        expected = reference(input_ids=torch.from_numpy(token_ids).long()).logits.numpy()
    actual = keras.ops.convert_to_numpy(
        ours({"token_ids": token_ids, "padding_mask": np.ones_like(token_ids)})
    )
    error = np.abs(actual - expected).max()
    print(f"{variant}: max |logit difference| vs transformers = {error:.2e}")
    assert error <= TOLERANCE
