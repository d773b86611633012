"""Gemma 1, 2 and 3 (text) equal transformers' models with identical weights,
through real checkpoint directories in both directions: transformers'
`save_pretrained` loaded by `GemmaCausalLM.from_preset`, and
`export_to_huggingface` loaded by `AutoModelForCausalLM.from_pretrained`.
"""

import keras
import numpy as np
import pytest

from conftest import randomize, tiny_config, token_batch
from gemma_keras import GemmaCausalLM, GemmaTokenizer
from gemma_keras.checkpoints import huggingface as hf_format
from gemma_keras.checkpoints.weight_mapping import assign_weights, model_shapes

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


VARIANTS = [
    ("gemma1_mqa", "gemma"),
    ("gemma1_mha", "gemma"),
    ("gemma2", "gemma2"),
    ("gemma3", "gemma3_text"),
]


def transformers_logits(model, token_ids):
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(token_ids).long()).logits.numpy()


def our_logits(model, token_ids):
    inputs = {"token_ids": token_ids, "padding_mask": np.ones_like(token_ids)}
    return keras.ops.convert_to_numpy(model(inputs))


@pytest.mark.parametrize("variant,model_type", VARIANTS)
def test_transformers_checkpoint_loads_in_gemma_keras(
    variant, model_type, tokenizer_proto, tmp_path
):
    config = tiny_config(variant)
    reference = random_transformers_model(config)
    assert reference.config.model_type == model_type
    reference.save_pretrained(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(tokenizer_proto)

    ours = GemmaCausalLM.from_preset(str(tmp_path), dtype="float32")
    assert ours.config == config
    # 12 tokens: longer than the sliding window (5) of the Gemma 2/3 variants.
    token_ids = token_batch(config.vocabulary_size, length=12)
    error = np.abs(our_logits(ours, token_ids) - transformers_logits(reference, token_ids)).max()
    print(f"{variant}: transformers -> gemma_keras, max |logit difference| = {error:.2e}")
    assert error <= TOLERANCE


@pytest.mark.parametrize("variant,model_type", VARIANTS)
def test_gemma_keras_export_loads_in_transformers(variant, model_type, tokenizer_proto, tmp_path):
    config = tiny_config(variant)
    ours = GemmaCausalLM.from_gemma_config(config, dtype="float32")
    assign_weights(ours, randomize(model_shapes(ours)))
    ours.tokenizer = GemmaTokenizer(tokenizer_proto)
    ours.export_to_huggingface(str(tmp_path))

    reference = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    assert reference.config.model_type == model_type
    token_ids = token_batch(config.vocabulary_size, length=12)
    error = np.abs(our_logits(ours, token_ids) - transformers_logits(reference, token_ids)).max()
    print(f"{variant}: gemma_keras -> transformers, max |logit difference| = {error:.2e}")
    assert error <= TOLERANCE
