"""Training data for `GemmaCausalLM.fit`: text in, `(x, labels, sample_weight)` out.

`GemmaCausalLMPreprocessor` turns strings, prompt/response pairs, chat
conversations or token ids into KerasHub's training triple, in NumPy (no
TensorFlow on any backend):

    x = {"token_ids": [B, L], "padding_mask": [B, L]}   the model's input
    labels        = the next token of each position       [B, L]
    sample_weight = 1 where that next token is learned    [B, L]

Each example is packed into `L + 1` tokens and shifted by one, so the model
sees `L = sequence_length` tokens and learns to predict each following one.
`training_data` applies it to whatever `fit` was given: in-memory data once,
generators, `keras.utils.PyDataset`s and `tf.data` datasets batch by batch.
"""

import collections.abc
import warnings

import keras
import numpy as np

from gemma_keras.chat_template import _ROLES, apply_chat_template
from gemma_keras.samplers import is_integer


class PreprocessingError(ValueError):
    """Training data that cannot be turned into token ids and labels."""


class GemmaCausalLMPreprocessor:
    """KerasHub's `GemmaCausalLMPreprocessor`: training examples -> `(x, labels, sample_weight)`.

    Args:
        tokenizer: a `GemmaTokenizer`.
        sequence_length: tokens the model sees per example (settable later:
            `preprocessor.sequence_length = 256`).
        add_start_token: begin every example with `<bos>` (Gemma needs it).
        add_end_token: end text examples with `<eos>` so the model learns to stop.

    `x` may be:
      - a string or a list (tuple, NumPy array) of strings:
        `<bos>` text `<eos>`, every token learned;
      - `{"prompts": [...], "responses": [...]}` (or two strings):
        `<bos>` prompt response `<eos>`, only the response and `<eos>` learned;
      - a chat conversation `[{"role", "content"}, ...]` or a list of them,
        written with `apply_chat_template`: only the model's turns are learned,
        each with the `<end_of_turn>` that closes it (where instruction-tuned
        Gemma stops, so no `<eos>` is added);
      - token ids, a 2-D integer array or a list of id lists: `<bos>` and
        `<eos>` are added where missing (as for the text the ids came from),
        trailing `<pad>` ids are padding.

    Labels come from `x` itself, so `y` and `sample_weight` must be None
    (KerasHub overwrites them silently). An example longer than
    `sequence_length + 1` tokens keeps its start and is cut, with one warning
    per call; unlike KerasHub no `<eos>` is put back after the cut, since the
    text does not end there.

    >>> preprocessor = GemmaCausalLMPreprocessor(tokenizer, sequence_length=8)  # doctest: +SKIP
    >>> x, labels, sample_weight = preprocessor(["Paris is in France."])  # doctest: +SKIP
    >>> x["token_ids"].shape, labels.shape, sample_weight.dtype  # doctest: +SKIP
    ((1, 8), (1, 8), dtype('float32'))
    """

    def __init__(self, tokenizer, sequence_length=1024, add_start_token=True, add_end_token=True):
        self.tokenizer = tokenizer
        self.sequence_length = sequence_length
        self.add_start_token = add_start_token
        self.add_end_token = add_end_token

    @property
    def sequence_length(self):
        """Tokens per example in the model's input (labels have as many)."""
        return self._sequence_length

    @sequence_length.setter
    def sequence_length(self, value):
        self._sequence_length = _checked_sequence_length(value)

    def __call__(self, x, y=None, sample_weight=None, sequence_length=None):
        """`x` -> `({"token_ids", "padding_mask"}, labels, sample_weight)`, int32
        `[B, L]` except the float32 sample weights; `sequence_length` overrides
        the preprocessor's for this call."""
        if y is not None or sample_weight is not None:
            raise PreprocessingError(
                "The preprocessor makes the labels and sample weights from x (each "
                "position's next token); pass x alone, or pass preprocessed "
                "{'token_ids', 'padding_mask'} inputs with your own y."
            )
        if sequence_length is None:
            sequence_length = self.sequence_length
        return self._pack(self._examples(x), _checked_sequence_length(sequence_length))

    def get_config(self):
        return {
            "sequence_length": self.sequence_length,
            "add_start_token": self.add_start_token,
            "add_end_token": self.add_end_token,
        }

    # Each example is (token ids, whether each token is learned as a label).

    def _examples(self, x):
        if isinstance(x, (str, bytes)):
            return [self._text_example(_text(x, "x"))]
        if isinstance(x, dict):
            return self._prompt_response_examples(x)
        if isinstance(x, np.ndarray):
            if x.dtype.kind in "iu" and x.size:
                return self._token_id_examples(x)
            if x.dtype.kind not in "iuUSO":
                raise PreprocessingError(
                    f"x is a NumPy array of {x.dtype}; give strings or integer token ids."
                )
            x = x.tolist()
            if isinstance(x, (str, bytes)):  # a 0-d array
                return [self._text_example(_text(x, "x"))]
        if not isinstance(x, (list, tuple)):
            raise PreprocessingError(
                f"x is a {type(x).__name__}; give a string, a list of strings, "
                "{'prompts': [...], 'responses': [...]}, chat conversations or token ids."
            )
        if not len(x):
            raise PreprocessingError(
                "x is empty: fit on an empty list has nothing to learn from; "
                "give at least one example."
            )
        first = x[0]
        if isinstance(first, dict):
            return [self._chat_example(x, "x")]
        if isinstance(first, (list, tuple)) and first and isinstance(first[0], dict):
            return [
                self._chat_example(_conversation(conversation, f"x[{index}]"), f"x[{index}]")
                for index, conversation in enumerate(x)
            ]
        if is_integer(first) or isinstance(first, (list, tuple, np.ndarray)):
            return self._token_id_examples(x)
        return [self._text_example(_text(text, f"x[{i}]")) for i, text in enumerate(x)]

    def _text_example(self, text):
        ids = self.tokenizer.encode(text, add_bos=self.add_start_token)
        if self.add_end_token:
            ids.append(self.tokenizer.eos_id)
        return ids, [True] * len(ids)

    def _prompt_response_examples(self, x):
        if "token_ids" in x:
            raise PreprocessingError(
                "x is already preprocessed ({'token_ids', ...}); give it to fit with "
                "its labels as y instead of to the preprocessor."
            )
        if set(x) != {"prompts", "responses"}:
            raise PreprocessingError(
                f"A dict x needs exactly the keys 'prompts' and 'responses', got {sorted(x)}."
            )
        prompts, responses = x["prompts"], x["responses"]
        if isinstance(prompts, (str, bytes)) and isinstance(responses, (str, bytes)):
            prompts, responses = [prompts], [responses]
        prompts = _text_list(prompts, "x['prompts']")
        responses = _text_list(responses, "x['responses']")
        if len(prompts) != len(responses):
            raise PreprocessingError(
                f"x['prompts'] has {len(prompts)} entries but x['responses'] has "
                f"{len(responses)}; give one response per prompt."
            )
        if not prompts:
            raise PreprocessingError(
                "x['prompts'] is empty: fit on an empty list has nothing to learn "
                "from; give at least one prompt and response."
            )
        examples = []
        for prompt, response in zip(prompts, responses, strict=True):
            prompt_ids = self.tokenizer.encode(prompt, add_bos=self.add_start_token)
            # Tokenized apart, as at inference: the prompt is encoded alone and the
            # response follows it token by token.
            response_ids = self.tokenizer.encode(response, add_bos=False)
            if self.add_end_token:
                response_ids.append(self.tokenizer.eos_id)
            learned = [False] * len(prompt_ids) + [True] * len(response_ids)
            examples.append((prompt_ids + response_ids, learned))
        return examples

    def _chat_example(self, messages, where):
        """The conversation's template text, cut into pieces outside and inside the
        loss and tokenized piece by piece, so that the learned tokens are exactly
        each model turn's content and its closing `<end_of_turn>`."""
        try:
            text = apply_chat_template(messages, add_generation_prompt=False)
        except ValueError as error:
            raise PreprocessingError(f"{where}: {error}") from None
        pieces = []  # (text, learned)
        start = 0
        for index, message in enumerate(messages):
            if _ROLES.get(message["role"]) != "model":
                continue
            # The template of the turns before, up to the open model turn, and of the
            # turns up to this one are prefixes of the full text: the turn between
            # them is the reply, its <end_of_turn> (the last one: a reply may quote
            # the token) and a newline.
            reply_start = len(apply_chat_template(messages[:index], add_generation_prompt=True))
            turn_end = len(apply_chat_template(messages[: index + 1], add_generation_prompt=False))
            reply_end = text.rindex("<end_of_turn>", reply_start, turn_end) + len("<end_of_turn>")
            pieces += [(text[start:reply_start], False), (text[reply_start:reply_end], True)]
            start = reply_end
        if not pieces:
            raise PreprocessingError(
                f"{where} has no model turn to learn from; end it with a "
                "{'role': 'model', 'content': ...} message."
            )
        pieces.append((text[start:], False))
        ids, learned = [], []
        for piece, piece_learned in pieces:
            piece_ids = self.tokenizer.encode(piece, add_bos=False)
            ids += piece_ids
            learned += [piece_learned] * len(piece_ids)
        if not self.add_start_token:  # the template always writes <bos>
            ids, learned = ids[1:], learned[1:]
        return ids, learned

    def _token_id_examples(self, x):
        rows = [x] if is_integer(x[0]) else x
        examples = []
        for index, row in enumerate(rows):
            where = "x" if rows is not x else f"x[{index}]"
            ids = np.asarray(row)
            if ids.ndim != 1 or (ids.size and ids.dtype.kind not in "iu"):
                raise PreprocessingError(
                    f"{where} must be a sequence of integer token ids, got {row!r:.60}."
                )
            if ids.size and (ids.min() < 0 or ids.max() >= self.tokenizer.vocabulary_size):
                raise PreprocessingError(
                    f"{where} has token ids outside [0, {self.tokenizer.vocabulary_size}) "
                    "(the tokenizer's vocabulary)."
                )
            ids = ids.tolist()
            while ids and ids[-1] == self.tokenizer.pad_id:
                ids.pop()
            if self.add_start_token and (not ids or ids[0] != self.tokenizer.bos_id):
                ids.insert(0, self.tokenizer.bos_id)
            if self.add_end_token and (not ids or ids[-1] != self.tokenizer.eos_id):
                ids.append(self.tokenizer.eos_id)
            examples.append((ids, [True] * len(ids)))
        return examples

    def _pack(self, examples, sequence_length):
        """Right-pads (or cuts) each example to `sequence_length + 1` tokens and
        shifts: the input drops the last token, the labels the first."""
        packed_length = sequence_length + 1
        token_ids = np.full((len(examples), packed_length), self.tokenizer.pad_id, "int32")
        padding_mask = np.zeros((len(examples), packed_length), "int32")
        learned = np.zeros((len(examples), packed_length), "float32")
        cut_by = []
        for row, (ids, row_learned) in enumerate(examples):
            if len(ids) > packed_length:
                cut_by.append(len(ids) - packed_length)
                ids, row_learned = ids[:packed_length], row_learned[:packed_length]
            token_ids[row, : len(ids)] = ids
            padding_mask[row, : len(ids)] = 1
            learned[row, : len(ids)] = row_learned
        if cut_by:
            warnings.warn(
                f"{len(cut_by)} of {len(examples)} examples were longer than "
                f"sequence_length + 1 = {packed_length} tokens and were cut to their start "
                f"(by up to {max(cut_by)} tokens); set `preprocessor.sequence_length = "
                f"{sequence_length + max(cut_by)}` to keep them whole.",
                stacklevel=3,
            )
        x = {"token_ids": token_ids[:, :-1].copy(), "padding_mask": padding_mask[:, :-1].copy()}
        return x, token_ids[:, 1:].copy(), learned[:, 1:].copy()


def training_data(preprocessor, x, y=None, sample_weight=None, batch_size=None):
    """`fit`'s data made into what `keras.Model.fit` / `evaluate` take:
    returns `(x, y, sample_weight, batch_size)` to pass on unchanged.

    - Preprocessed `{"token_ids", "padding_mask"}` inputs (with `y`) pass through.
    - Strings, prompt/response dicts, conversations and token ids are
      preprocessed at once into NumPy arrays.
    - A generator or iterator, a `keras.utils.PyDataset` or a `tf.data.Dataset`
      yielding such raw batches (or preprocessed `(x, y, sample_weight)`
      tuples) is preprocessed batch by batch as Keras draws it; its batches
      set their size, so `batch_size` must be None.

    TensorFlow is only used when the data is a `tf.data.Dataset`.

    >>> x, y, sample_weight, batch_size = training_data(  # doctest: +SKIP
    ...     model.preprocessor, ["some text", "more text"], batch_size=1)
    >>> keras.Model.fit(  # doctest: +SKIP
    ...     model, x, y, sample_weight=sample_weight, batch_size=batch_size)
    """
    if _is_preprocessed(x):
        if y is None:
            raise PreprocessingError(
                "Preprocessed {'token_ids', 'padding_mask'} inputs need their labels as y "
                "(the next token of each position); or give the raw text or token ids."
            )
        return x, y, sample_weight, batch_size
    streamed = _streamed_kind(x)
    if streamed is None:
        if preprocessor is None:
            raise PreprocessingError(
                "This model has no preprocessor to turn x into token ids; set "
                "`model.preprocessor = GemmaCausalLMPreprocessor(model.tokenizer)`."
            )
        x, y, sample_weight = preprocessor(x, y, sample_weight)
        return x, y, sample_weight, batch_size
    if y is not None or sample_weight is not None or batch_size is not None:
        raise PreprocessingError(
            f"x is {streamed}: its batches carry the labels and set their size; "
            "leave y, sample_weight and batch_size as None."
        )
    if preprocessor is None:  # batches must already be preprocessed; Keras checks them
        return x, None, None, None
    # Changing `preprocessor.sequence_length` during fit must not change the shapes.
    sequence_length = preprocessor.sequence_length

    def preprocess_batch(batch):
        return _preprocessed_batch(preprocessor, batch, sequence_length)

    if streamed == "a tf.data.Dataset":
        return _preprocessed_tf_dataset(x, preprocess_batch, sequence_length), None, None, None
    if streamed == "a PyDataset":
        return _PreprocessedPyDataset(x, preprocess_batch), None, None, None
    return (preprocess_batch(batch) for batch in x), None, None, None


class _PreprocessedPyDataset(keras.utils.PyDataset):
    """A `PyDataset`'s batches, preprocessed as Keras draws them."""

    def __init__(self, batches, preprocess_batch):
        super().__init__(
            workers=batches.workers,
            use_multiprocessing=batches.use_multiprocessing,
            max_queue_size=batches.max_queue_size,
        )
        self.batches = batches
        self.preprocess_batch = preprocess_batch

    @property
    def num_batches(self):
        return self.batches.num_batches

    def __getitem__(self, index):
        return self.preprocess_batch(self.batches[index])

    def on_epoch_begin(self):
        self.batches.on_epoch_begin()

    def on_epoch_end(self):
        self.batches.on_epoch_end()


def _preprocessed_tf_dataset(dataset, preprocess_batch, sequence_length):
    """A `tf.data.Dataset` of raw batches as one of preprocessed batches
    (re-iterable, so every epoch reads the dataset again)."""
    import tensorflow as tf  # the data is a tf.data.Dataset: TensorFlow is loaded already

    element = dataset.element_spec
    if isinstance(element, tuple) and _is_preprocessed(element[0]):
        return dataset
    # The first batch is preprocessed here, where its error reaches the caller as it
    # is (inside the generator TensorFlow wraps it in a graph error).
    first = next(dataset.take(1).as_numpy_iterator(), None)
    if first is None:
        raise PreprocessingError("The tf.data.Dataset holds no batches; give at least one.")
    preprocess_batch(first)

    def batches():
        for batch in dataset.as_numpy_iterator():  # strings come out as bytes
            yield preprocess_batch(batch)

    ids = tf.TensorSpec([None, sequence_length], tf.int32)
    signature = (
        {"token_ids": ids, "padding_mask": ids},
        ids,
        tf.TensorSpec([None, sequence_length], tf.float32),
    )
    preprocessed = tf.data.Dataset.from_generator(batches, output_signature=signature)
    # One batch out per batch in: keep the length known, for Keras' progress and epochs.
    if dataset.cardinality() != tf.data.UNKNOWN_CARDINALITY:
        preprocessed = preprocessed.apply(
            tf.data.experimental.assert_cardinality(dataset.cardinality())
        )
    return preprocessed


def _preprocessed_batch(preprocessor, batch, sequence_length):
    """One drawn batch: preprocessed `(x, y[, sample_weight])` tuples pass through;
    Keras' `(x,)`, `(x, None)` ... tuples and bare raw batches (a tuple of
    strings included) are preprocessed."""
    if isinstance(batch, tuple) and 1 <= len(batch) <= 3 and not isinstance(batch[0], (str, bytes)):
        if _is_preprocessed(batch[0]):
            return batch
        return preprocessor(*batch, sequence_length=sequence_length)
    return preprocessor(batch, sequence_length=sequence_length)


def _streamed_kind(x):
    """What kind of batch-by-batch data `x` is, or None for in-memory data."""
    if type(x).__module__.startswith("tensorflow") and hasattr(x, "as_numpy_iterator"):
        return "a tf.data.Dataset"
    if isinstance(x, keras.utils.PyDataset):
        return "a PyDataset"
    if isinstance(x, collections.abc.Iterator):
        return "a generator"
    return None


def _is_preprocessed(x):
    return isinstance(x, dict) and "token_ids" in x


def _checked_sequence_length(value):
    if not is_integer(value) or value < 2:
        raise PreprocessingError(
            f"sequence_length must be an integer of at least 2 (the model sees that many "
            f"tokens and learns each next one), got {value!r}; set e.g. "
            "`preprocessor.sequence_length = 256`."
        )
    return int(value)


def _text(value, where):
    if isinstance(value, bytes):  # tf.data and NumPy byte strings
        return value.decode("utf-8")
    if not isinstance(value, str):
        raise PreprocessingError(
            f"{where} is a {type(value).__name__}, expected a string; mixed or nested "
            "lists of texts are not examples."
        )
    return value


def _text_list(values, where):
    if isinstance(values, np.ndarray):
        values = values.tolist()
    if not isinstance(values, (list, tuple)):
        raise PreprocessingError(
            f"{where} is a {type(values).__name__}; give a list of strings (or one string "
            "in both prompts and responses)."
        )
    return [_text(value, f"{where}[{index}]") for index, value in enumerate(values)]


def _conversation(value, where):
    if not isinstance(value, (list, tuple)):
        raise PreprocessingError(
            f"{where} is a {type(value).__name__}, expected a conversation "
            "(a list of {'role', 'content'} dicts) like x[0]."
        )
    return value
