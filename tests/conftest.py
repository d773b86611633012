import os

import keras
import numpy as np
import pytest

from gemma_keras import GemmaConfig
from gemma_keras.config import alternating_local_global, every_nth_global

BACKEND = keras.config.backend()


def pytest_report_header(config):
    return f"keras backend: {BACKEND} (KERAS_BACKEND={os.environ.get('KERAS_BACKEND')})"


def tiny_config(variant):
    """Tiny configs exercising each generation's features."""
    common = dict(vocabulary_size=1000, hidden_dim=64, intermediate_dim=128)
    if variant == "gemma1_mqa":
        return GemmaConfig(
            num_layers=2, num_query_heads=4, num_key_value_heads=1, head_dim=32, **common
        )
    if variant == "gemma1_mha":
        return GemmaConfig(
            num_layers=2, num_query_heads=4, num_key_value_heads=4, head_dim=32, **common
        )
    if variant == "gemma2":
        return GemmaConfig(
            num_layers=4,
            num_query_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            query_pre_attn_scalar=24,
            attention_logit_soft_cap=50.0,
            final_logit_soft_cap=30.0,
            sliding_window=5,
            layer_types=alternating_local_global(4),
            use_post_attention_norm=True,
            use_post_ffw_norm=True,
            **common,
        )
    if variant == "gemma3":
        return GemmaConfig(
            num_layers=7,
            num_query_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            query_pre_attn_scalar=32,
            sliding_window=5,
            layer_types=every_nth_global(7),
            global_rope_wavelength=1_000_000.0,
            local_rope_wavelength=10_000.0,
            global_rope_scaling_factor=8.0,
            max_sequence_length=131_072,  # what KerasHub implies for RoPE-scaled Gemma 3
            use_qk_norm=True,
            use_post_attention_norm=True,
            use_post_ffw_norm=True,
            **common,
        )
    raise ValueError(variant)


VARIANTS = ["gemma1_mqa", "gemma1_mha", "gemma2", "gemma3"]


def randomize(named_shapes, seed=0):
    """Random weights of a realistic scale for `{name: shape}`; norm scales too,
    so that a wrong norm mapping cannot hide behind zero-initialised scales."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for name, shape in sorted(named_shapes.items()):
        std = 0.3 if name.endswith("scale") else 0.05
        arrays[name] = rng.normal(0.0, std, size=shape).astype("float32")
    return arrays


def token_batch(vocabulary_size, batch=2, length=12, seed=1):
    rng = np.random.default_rng(seed)
    token_ids = rng.integers(3, vocabulary_size, size=(batch, length)).astype("int32")
    token_ids[:, 0] = 2  # <bos>
    return token_ids


@pytest.fixture(autouse=True)
def _seed():
    keras.utils.set_random_seed(0)


CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "Gemma is a family of lightweight open models built from Gemini research.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
    "Numbers like 12345 and 3.14159 are split into digits.",
    "Whitespace   runs\tand\ttabs\n\nand newlines are kept as they are.",
    "日本語のテキストと中文文本 and emoji 🙂🚀 fall back to bytes when unknown.",
    "<start_of_turn>user\nHello there!<end_of_turn>\n<start_of_turn>model\nHi!<end_of_turn>",
] * 20


def train_tiny_sentencepiece(vocab_size=400):
    """A real SentencePiece model with Gemma's settings, trained in a second."""
    import io

    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        split_digits=True,
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        allow_whitespace_only_pieces=True,
        user_defined_symbols=["<mask>", "<start_of_turn>", "<end_of_turn>"],
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        pad_piece="<pad>",
        eos_piece="<eos>",
        bos_piece="<bos>",
        unk_piece="<unk>",
        hard_vocab_limit=False,
        minloglevel=2,
    )
    return model.getvalue()


@pytest.fixture(scope="session")
def tokenizer_proto():
    return train_tiny_sentencepiece()
