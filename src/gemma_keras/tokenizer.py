"""GemmaTokenizer: Gemma's SentencePiece vocabulary, no TensorFlow required."""

import numbers
import os
import re

import numpy as np
import sentencepiece

# Control pieces that may appear as text (e.g. "<bos>" at the start of a chat
# transcript) and are then encoded as the token, as transformers does.
_CONTROL_PIECES = ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>")


class TokenizerError(ValueError):
    """The tokenizer file is missing, corrupt or not a Gemma vocabulary."""


class GemmaTokenizer:
    """Text <-> token ids with a Gemma SentencePiece model.

    Args:
        proto: a serialized SentencePiece model (bytes) or the path of a
            `.spm` / `tokenizer.model` file.

    `encode` prepends `<bos>` by default (Gemma's quality collapses without
    it) unless the text already starts with it. Special ids are looked up
    by piece: `<start_of_turn>` is 106 in Gemma 1/2 and 105 in Gemma 3.

    Example:

    >>> tokenizer = GemmaTokenizer("vocabulary.spm")  # doctest: +SKIP
    >>> ids = tokenizer.encode("The capital of France is")  # doctest: +SKIP
    >>> tokenizer.decode(ids)  # doctest: +SKIP
    'The capital of France is'
    """

    def __init__(self, proto):
        source = "serialized SentencePiece model"
        if isinstance(proto, (str, os.PathLike)):
            source = os.fspath(proto)
            if not os.path.isfile(source):
                raise TokenizerError(f"Tokenizer file {source} does not exist.")
            with open(source, "rb") as file:
                proto = file.read()
        if not isinstance(proto, (bytes, bytearray, memoryview)):
            raise TokenizerError(
                "GemmaTokenizer takes a SentencePiece model file's path or its bytes, "
                f"not a {type(proto).__name__}."
            )
        self.proto = bytes(proto)
        self._model = sentencepiece.SentencePieceProcessor()
        try:
            self._model.LoadFromSerializedProto(self.proto)
        except Exception as error:  # sentencepiece raises RuntimeError/OSError variants
            raise TokenizerError(
                f"{source} is not a valid SentencePiece model ({error}); "
                "the file may be truncated or of another format."
            ) from None
        self.vocabulary_size = self._model.GetPieceSize()
        for piece in ("<pad>", "<eos>", "<bos>", "<unk>"):
            if self.token_to_id(piece) is None:
                raise TokenizerError(
                    f"{source} has no {piece} piece; it is not a Gemma vocabulary."
                )
        self.pad_id = self.token_to_id("<pad>")
        self.eos_id = self.token_to_id("<eos>")
        self.bos_id = self.token_to_id("<bos>")
        self.unk_id = self.token_to_id("<unk>")
        self.start_of_turn_id = self.token_to_id("<start_of_turn>")
        self.end_of_turn_id = self.token_to_id("<end_of_turn>")
        present = [p for p in _CONTROL_PIECES if self.token_to_id(p) is not None]
        self._control_pattern = re.compile("(" + "|".join(map(re.escape, present)) + ")")

    def token_to_id(self, piece):
        """The id of `piece`, or None when the vocabulary lacks it."""
        if not isinstance(piece, str):
            raise TypeError(f"token_to_id expects a piece (a string), got {piece!r}.")
        index = self._model.PieceToId(piece)
        if index == self._model.unk_id() and piece != self._model.IdToPiece(index):
            return None
        return index

    def id_to_token(self, index):
        if not 0 <= index < self.vocabulary_size:
            raise IndexError(f"token id {index} is outside [0, {self.vocabulary_size}).")
        return self._model.IdToPiece(index)

    def encode(self, text, add_bos=True):
        """`text` -> list of ids; control pieces written in the text become their ids."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a string, got {type(text).__name__}.")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as error:
            raise TokenizerError(
                f"encode takes valid Unicode text; {text[error.start : error.end]!r} at "
                f"position {error.start} is a lone surrogate ({error.reason})."
            ) from None
        ids = []
        for part in self._control_pattern.split(text):
            if not part:
                continue
            if part in _CONTROL_PIECES:
                ids.append(self.token_to_id(part))
            else:
                ids.extend(self._model.EncodeAsIds(part))
        if add_bos and (not ids or ids[0] != self.bos_id):
            ids.insert(0, self.bos_id)
        return ids

    def encode_batch(self, texts, add_bos=True):
        return [self.encode(text, add_bos=add_bos) for text in texts]

    def decode(self, ids):
        """Ids -> text. Control tokens (`<bos>`, `<eos>`, `<pad>`) are dropped."""
        ids = list(np.asarray(ids).reshape(-1)) if hasattr(ids, "shape") else list(ids)
        for index in ids:
            if isinstance(index, bool) or not isinstance(index, numbers.Integral):
                raise TypeError(f"decode takes integer token ids, got {index!r}.")
        ids = [int(i) for i in ids]
        for index in ids:
            if not 0 <= index < self.vocabulary_size:
                raise IndexError(f"token id {index} is outside [0, {self.vocabulary_size}).")
        return self._model.DecodeIds(ids)

    def decode_batch(self, batch):
        return [self.decode(ids) for ids in batch]

    def save(self, path):
        with open(path, "wb") as file:
            file.write(self.proto)
