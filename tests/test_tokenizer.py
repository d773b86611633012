"""GemmaTokenizer on real SentencePiece models trained with Gemma's settings."""

import numpy as np
import pytest

from conftest import CORPUS
from gemma_keras import GemmaTokenizer
from gemma_keras.tokenizer import TokenizerError


@pytest.fixture(scope="module")
def tokenizer(tokenizer_proto):
    return GemmaTokenizer(tokenizer_proto)


def test_special_ids_are_looked_up_by_piece(tokenizer):
    assert (tokenizer.pad_id, tokenizer.eos_id, tokenizer.bos_id, tokenizer.unk_id) == (0, 1, 2, 3)
    assert tokenizer.id_to_token(tokenizer.start_of_turn_id) == "<start_of_turn>"
    assert tokenizer.id_to_token(tokenizer.end_of_turn_id) == "<end_of_turn>"
    assert tokenizer.token_to_id("<no such piece>") is None


@pytest.mark.parametrize("text", sorted(set(CORPUS)) + ["", "  leading", "a\n\n\tb  ", "🙂x"])
def test_round_trip_keeps_text_exactly(tokenizer, text):
    ids = tokenizer.encode(text)
    assert ids[0] == tokenizer.bos_id
    assert tokenizer.decode(ids) == text


def test_bos_added_once(tokenizer):
    assert tokenizer.encode("hi", add_bos=False)[0] != tokenizer.bos_id
    assert tokenizer.encode("<bos>hi") == tokenizer.encode("hi")
    assert tokenizer.encode("hi<eos>")[-1] == tokenizer.eos_id


def test_chat_markup_is_single_tokens(tokenizer):
    ids = tokenizer.encode("<start_of_turn>user\nHi<end_of_turn>", add_bos=False)
    assert ids[0] == tokenizer.start_of_turn_id and ids[-1] == tokenizer.end_of_turn_id


def test_batch(tokenizer):
    batch = tokenizer.encode_batch(["a b", "The capital"])
    assert tokenizer.decode_batch(batch) == ["a b", "The capital"]


def test_file_path_and_save(tokenizer, tmp_path):
    path = tmp_path / "vocabulary.spm"
    tokenizer.save(path)
    assert GemmaTokenizer(path).encode("Gemma 123") == tokenizer.encode("Gemma 123")


def test_bad_files(tmp_path):
    with pytest.raises(TokenizerError, match="does not exist"):
        GemmaTokenizer(tmp_path / "missing.spm")
    corrupt = tmp_path / "corrupt.spm"
    corrupt.write_bytes(b"not a sentencepiece model")
    with pytest.raises(TokenizerError, match=r"corrupt\.spm is not a valid SentencePiece model"):
        GemmaTokenizer(corrupt)


def test_out_of_range_ids(tokenizer):
    with pytest.raises(IndexError, match="outside"):
        tokenizer.decode([5, tokenizer.vocabulary_size])


def test_bad_arguments(tokenizer):
    with pytest.raises(TokenizerError, match="path or its bytes, not a NoneType"):
        GemmaTokenizer(None)
    with pytest.raises(TypeError, match="integer token ids, got 2.7"):
        tokenizer.decode([2.7])
    assert tokenizer.decode(np.array([[5, 6]])) == tokenizer.decode([5, 6])
    with pytest.raises(TypeError, match="a piece"):
        tokenizer.token_to_id(5)
    with pytest.raises(TokenizerError, match="lone surrogate"):
        tokenizer.encode("a\ud800b")
