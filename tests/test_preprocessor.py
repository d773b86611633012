"""GemmaCausalLMPreprocessor and `training_data` on a real tiny SentencePiece model.

References are built by hand from `GemmaTokenizer.encode`: the packed example
`[<bos>, text..., <eos>, <pad>...]` of `sequence_length + 1` tokens, whose first
`sequence_length` are the input and last `sequence_length` the labels.
"""

import dataclasses
import math
import os
import subprocess
import sys
import textwrap
import types
import warnings

import keras
import numpy as np
import pytest

from conftest import CORPUS, tiny_config
from gemma_keras import GemmaCausalLM, GemmaTokenizer, apply_chat_template
from gemma_keras.layers.token_embedding import TokenIdError
from gemma_keras.preprocessor import (
    GemmaCausalLMPreprocessor,
    PreprocessingError,
    training_data,
)

TEXTS = ["Hello there!", "The capital of France is Paris.", "Numbers like 12345."]


@pytest.fixture(scope="module")
def tokenizer(tokenizer_proto):
    return GemmaTokenizer(tokenizer_proto)


def packed(rows, length, pad_id=0):
    """Token id lists right-padded to `length`, and which positions are real."""
    ids = np.full((len(rows), length), pad_id, "int32")
    real = np.zeros((len(rows), length), bool)
    for index, row in enumerate(rows):
        ids[index, : len(row)] = row
        real[index, : len(row)] = True
    return ids, real


def assert_triple(result, expected_rows, expected_learned, sequence_length):
    """`result` is the shifted packing of `expected_rows`; labels are learned where
    `expected_learned` (per token of the rows) says so."""
    x, labels, sample_weight = result
    ids, real = packed(expected_rows, sequence_length + 1)
    learned, _ = packed(expected_learned, sequence_length + 1)
    assert x["token_ids"].dtype == labels.dtype == x["padding_mask"].dtype == np.int32
    assert sample_weight.dtype == np.float32
    np.testing.assert_array_equal(x["token_ids"], ids[:, :-1])
    np.testing.assert_array_equal(x["padding_mask"], real[:, :-1].astype("int32"))
    np.testing.assert_array_equal(labels, ids[:, 1:])
    np.testing.assert_array_equal(sample_weight, (learned.astype(bool) & real)[:, 1:])


def test_strings_become_bos_text_eos_shifted_by_one(tokenizer):
    preprocessor = GemmaCausalLMPreprocessor(tokenizer, sequence_length=24)
    rows = [[2] + tokenizer.encode(text, add_bos=False) + [1] for text in TEXTS]
    result = preprocessor(TEXTS)
    assert result[0]["token_ids"].shape == (3, 24)
    assert_triple(result, rows, [[1] * len(row) for row in rows], 24)
    # The labels are the input shifted by one wherever the next token is real.
    x, labels, sample_weight = result
    next_real = sample_weight[:, :-1] > 0
    np.testing.assert_array_equal(labels[:, :-1][next_real], x["token_ids"][:, 1:][next_real])


@pytest.mark.parametrize(
    "form",
    [
        tuple,
        np.array,
        lambda texts: np.array(texts, dtype=object),
        lambda texts: np.array([text.encode() for text in texts]),
    ],
    ids=["tuple", "str_array", "object_array", "bytes_array"],
)
def test_string_containers_agree_with_a_list(tokenizer, form):
    preprocessor = GemmaCausalLMPreprocessor(tokenizer, sequence_length=24)
    expected = preprocessor(TEXTS)
    for got, want in zip(
        keras.tree.flatten(preprocessor(form(TEXTS))), keras.tree.flatten(expected), strict=True
    ):
        np.testing.assert_array_equal(got, want)


def test_a_single_string_is_a_batch_of_one(tokenizer):
    preprocessor = GemmaCausalLMPreprocessor(tokenizer, sequence_length=16)
    single, batch = preprocessor(TEXTS[0]), preprocessor(TEXTS[:1])
    for got, want in zip(keras.tree.flatten(single), keras.tree.flatten(batch), strict=True):
        np.testing.assert_array_equal(got, want)


def test_start_and_end_tokens_can_be_left_out(tokenizer):
    preprocessor = GemmaCausalLMPreprocessor(
        tokenizer, sequence_length=24, add_start_token=False, add_end_token=False
    )
    rows = [tokenizer.encode(text, add_bos=False) for text in TEXTS]
    assert_triple(preprocessor(TEXTS), rows, [[1] * len(row) for row in rows], 24)


def test_prompts_are_left_out_of_the_loss(tokenizer):
    preprocessor = GemmaCausalLMPreprocessor(tokenizer, sequence_length=32)
    prompts = ["The capital of France is", "def add(a, b):"]
    responses = [" Paris.", "\n    return a + b"]
    rows, learned = [], []
    for prompt, response in zip(prompts, responses, strict=True):
        prompt_ids = tokenizer.encode(prompt)
        response_ids = tokenizer.encode(response, add_bos=False) + [1]
        rows.append(prompt_ids + response_ids)
        learned.append([0] * len(prompt_ids) + [1] * len(response_ids))
    result = preprocessor({"prompts": prompts, "responses": responses})
    assert_triple(result, rows, learned, 32)
    # The first response token is learned; the weighted labels spell the response.
    _, labels, sample_weight = result
    for row, response in enumerate(responses):
        weighted = labels[row][sample_weight[row] > 0].tolist()
        assert weighted[-1] == tokenizer.eos_id
        assert tokenizer.decode(weighted[:-1]) == response
    single = preprocessor({"prompts": prompts[0], "responses": responses[0]})
    np.testing.assert_array_equal(single[2], result[2][:1])


CONVERSATIONS = [
    [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Hello there!"},
        {"role": "model", "content": "Hi! The capital of France is Paris."},
        {"role": "user", "content": " Numbers like 12345? "},
        {"role": "assistant", "content": "  split into digits.\n"},
    ],
    [
        {"role": "user", "content": "Quote the token."},
        {"role": "model", "content": "It is <end_of_turn> and then more"},
        {"role": "user", "content": "Thanks"},
    ],
    *[
        [{"role": "user", "content": text}, {"role": "model", "content": reply}]
        for text, reply in zip(sorted(set(CORPUS)), sorted(set(CORPUS))[1:] + ["🙂"], strict=True)
    ],
]


@pytest.mark.parametrize("conversation", CONVERSATIONS)
def test_chat_learns_exactly_the_model_turns(tokenizer, conversation):
    preprocessor = GemmaCausalLMPreprocessor(tokenizer, sequence_length=160)
    x, labels, sample_weight = preprocessor(conversation)
    # Tokenized piece by piece, the conversation still encodes as its whole text.
    length = int(x["padding_mask"].sum())
    assert length < 160 and x["padding_mask"][0, length:].sum() == 0  # it fits, padded
    ids = x["token_ids"][0, :length].tolist()
    assert ids == tokenizer.encode(apply_chat_template(conversation, add_generation_prompt=False))
    # The learned labels are the model contents, each closed by <end_of_turn>.
    replies = [m["content"].strip() for m in conversation if m["role"] in ("model", "assistant")]
    expected = [
        tokenizer.encode(reply, add_bos=False) + [tokenizer.end_of_turn_id] for reply in replies
    ]
    assert labels[0][sample_weight[0] > 0].tolist() == sum(expected, [])
    assert set(np.unique(sample_weight)) <= {0.0, 1.0}


def test_a_batch_of_conversations_equals_each_alone(tokenizer):
    preprocessor = GemmaCausalLMPreprocessor(tokenizer, sequence_length=160)
    batch = preprocessor(CONVERSATIONS[:3])
    for row, conversation in enumerate(CONVERSATIONS[:3]):
        alone = preprocessor(conversation)
        for got, want in zip(keras.tree.flatten(batch), keras.tree.flatten(alone), strict=True):
            np.testing.assert_array_equal(got[row], want[0])


def test_chat_without_start_token(tokenizer):
    preprocessor = GemmaCausalLMPreprocessor(tokenizer, sequence_length=64, add_start_token=False)
    with_bos = GemmaCausalLMPreprocessor(tokenizer, sequence_length=65)(CONVERSATIONS[1])
    x, labels, sample_weight = preprocessor(CONVERSATIONS[1])
    np.testing.assert_array_equal(x["token_ids"], with_bos[0]["token_ids"][:, 1:])
    np.testing.assert_array_equal(sample_weight, with_bos[2][:, 1:])


def test_token_ids_train_like_their_text(tokenizer):
    preprocessor = GemmaCausalLMPreprocessor(tokenizer, sequence_length=24)
    expected = keras.tree.flatten(preprocessor(TEXTS))
    encoded = tokenizer.encode_batch(TEXTS)  # <bos> but no <eos>
    right_padded, _ = packed(encoded, 20)
    without_bos = [ids[1:] + [tokenizer.eos_id] for ids in encoded]
    for form in (encoded, right_padded, without_bos):
        for got, want in zip(keras.tree.flatten(preprocessor(form)), expected, strict=True):
            np.testing.assert_array_equal(got, want)
    single = preprocessor(encoded[0])  # one flat list of ids is one example
    np.testing.assert_array_equal(single[0]["token_ids"], expected[1][:1])


def test_long_examples_are_cut_with_one_warning(tokenizer):
    preprocessor = GemmaCausalLMPreprocessor(tokenizer, sequence_length=8)
    full = [[2] + tokenizer.encode(text, add_bos=False) + [1] for text in TEXTS]
    cut_by = [len(row) - 9 for row in full if len(row) > 9]
    assert len(cut_by) == 2
    with pytest.warns(UserWarning) as caught:
        result = preprocessor(TEXTS + ["Hi"])
    assert len(caught) == 1
    message = str(caught[0].message)
    assert message.startswith("2 of 4 examples were longer than sequence_length + 1 = 9 tokens")
    assert f"by up to {max(cut_by)} tokens" in message
    assert f"`preprocessor.sequence_length = {8 + max(cut_by)}`" in message
    rows = [row[:9] for row in full] + [[2] + tokenizer.encode("Hi", add_bos=False) + [1]]
    assert_triple(result, rows, [[1] * len(row) for row in rows], 8)
    # An example of exactly sequence_length + 1 tokens fits.
    preprocessor.sequence_length = 8 + max(cut_by)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        preprocessor(TEXTS)


@pytest.mark.parametrize("value", [1, 0, -3, 2.5, "256", True, None])
def test_sequence_length_must_be_an_integer_of_at_least_2(tokenizer, value):
    with pytest.raises(ValueError, match=r"sequence_length must be an integer of at least 2.*got"):
        GemmaCausalLMPreprocessor(tokenizer, sequence_length=value)
    preprocessor = GemmaCausalLMPreprocessor(tokenizer, sequence_length=16)
    with pytest.raises(ValueError, match="preprocessor.sequence_length = 256"):
        preprocessor.sequence_length = value
    assert preprocessor.sequence_length == 16


def test_sequence_length_is_settable(tokenizer):
    preprocessor = GemmaCausalLMPreprocessor(tokenizer, sequence_length=16)
    preprocessor.sequence_length = np.int64(2)
    with pytest.warns(UserWarning, match="1 of 1 examples"):
        x, labels, _ = preprocessor(TEXTS[:1])
    assert x["token_ids"].shape == labels.shape == (1, 2)
    assert preprocessor.get_config() == {
        "sequence_length": 2,
        "add_start_token": True,
        "add_end_token": True,
    }


@pytest.mark.parametrize(
    "x,message",
    [
        ([], r"x is empty: fit on an empty list"),
        (np.array([], dtype=str), r"x is empty: fit on an empty list"),
        ({"prompts": [], "responses": []}, r"x\['prompts'\] is empty"),
        (
            {"prompts": ["a", "b", "c"], "responses": ["d"]},
            r"x\['prompts'\] has 3 entries but x\['responses'\] has 1",
        ),
        ({"prompts": ["a", 5], "responses": ["b", "c"]}, r"x\['prompts'\]\[1\] is a int"),
        ({"prompts": "a", "responses": ["b"]}, r"x\['prompts'\] is a str"),
        ({"prompt": ["a"], "response": ["b"]}, r"keys 'prompts' and 'responses', got \['prom"),
        ({"token_ids": np.ones((1, 3))}, "already preprocessed"),
        (["fine", None], r"x\[1\] is a NoneType, expected a string"),
        (["fine", ["nested"]], r"x\[1\] is a list, expected a string"),
        (3.5, "x is a float"),
        (np.ones((2, 3), "float32"), "NumPy array of float32"),
        ([[2, 5], [2, 999999]], r"x\[1\] has token ids outside \[0, 400\)"),
        ([[2, 5], [[2]]], r"x\[1\] must be a sequence of integer token ids"),
        ([{"role": "user", "content": "Hi"}], "x has no model turn to learn from"),
        (
            [[{"role": "user", "content": "a"}, {"role": "model", "content": "b"}], "oops"],
            r"x\[1\] is a str, expected a conversation",
        ),
        (
            [
                [{"role": "user", "content": "a"}, {"role": "model", "content": "b"}],
                [{"role": "model", "content": "b"}],
            ],
            r"x\[1\]: messages\[0\] has role 'model'",
        ),
    ],
)
def test_bad_input_names_the_problem(tokenizer, x, message):
    preprocessor = GemmaCausalLMPreprocessor(tokenizer, sequence_length=16)
    with pytest.raises(PreprocessingError, match=message) as error:
        preprocessor(x)
    assert "\n" not in str(error.value)


def test_labels_cannot_be_given_with_raw_input(tokenizer):
    preprocessor = GemmaCausalLMPreprocessor(tokenizer, sequence_length=16)
    with pytest.raises(PreprocessingError, match="pass x alone"):
        preprocessor(TEXTS, y=np.zeros((3, 16)))
    with pytest.raises(PreprocessingError, match="pass x alone"):
        training_data(preprocessor, TEXTS, sample_weight=np.ones(3))


# training_data: what keras.Model.fit receives.


def assert_same_batches(got, want):
    for got_array, want_array in zip(
        keras.tree.flatten(got), keras.tree.flatten(want), strict=True
    ):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(got_array), want_array)


def test_in_memory_data_is_preprocessed_once(tokenizer):
    preprocessor = GemmaCausalLMPreprocessor(tokenizer, sequence_length=16)
    x, y, sample_weight, batch_size = training_data(preprocessor, TEXTS, batch_size=2)
    assert batch_size == 2
    assert_same_batches((x, y, sample_weight), preprocessor(TEXTS))


def test_preprocessed_data_passes_through(tokenizer):
    preprocessor = GemmaCausalLMPreprocessor(tokenizer, sequence_length=16)
    x, y, sample_weight = preprocessor(TEXTS)
    result = training_data(preprocessor, x, y, sample_weight, 4)
    assert all(got is want for got, want in zip(result, (x, y, sample_weight, 4), strict=True))
    with pytest.raises(PreprocessingError, match="need their labels as y"):
        training_data(preprocessor, x)


def test_without_a_preprocessor_raw_data_is_refused(tokenizer):
    with pytest.raises(PreprocessingError, match=r"model.preprocessor = GemmaCausalLMPrep"):
        training_data(None, TEXTS)


def raw_batches():
    """A list of strings, a prompt/response dict, Keras' `(x,)` and a tuple of strings."""
    return [TEXTS[:2], {"prompts": ["a", "b"], "responses": ["c", "d"]}, (TEXTS[2:],), ("a", "b")]


def test_generators_and_iterators_are_preprocessed_batch_by_batch(tokenizer):
    preprocessor = GemmaCausalLMPreprocessor(tokenizer, sequence_length=16)
    expected = [
        preprocessor(batch) for batch in (TEXTS[:2], raw_batches()[1], TEXTS[2:], ["a", "b"])
    ]
    for data in ((batch for batch in raw_batches()), iter(raw_batches())):
        x, y, sample_weight, batch_size = training_data(preprocessor, data)
        assert isinstance(x, types.GeneratorType)  # Keras' generator adapter takes it
        assert (y, sample_weight, batch_size) == (None, None, None)
        batches = list(x)
        assert len(batches) == len(expected)
        for got, want in zip(batches, expected, strict=True):
            assert_same_batches(got, want)
    # Preprocessed batches pass through unchanged.
    (x, _, _, _) = training_data(preprocessor, iter(expected))
    assert all(got is want for got, want in zip(x, expected, strict=True))
    with pytest.raises(PreprocessingError, match="leave y, sample_weight and batch_size as None"):
        training_data(preprocessor, iter(raw_batches()), batch_size=2)


class RawPyDataset(keras.utils.PyDataset):
    def __init__(self, batches):
        super().__init__()
        self.batches = batches
        self.epochs_ended = 0

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, index):
        return self.batches[index]

    def on_epoch_end(self):
        self.epochs_ended += 1


def test_py_datasets_are_preprocessed_batch_by_batch(tokenizer):
    preprocessor = GemmaCausalLMPreprocessor(tokenizer, sequence_length=16)
    raw = RawPyDataset(raw_batches())
    dataset, y, sample_weight, batch_size = training_data(preprocessor, raw)
    assert isinstance(dataset, keras.utils.PyDataset)
    assert (y, sample_weight, batch_size) == (None, None, None)
    assert dataset.num_batches == 4
    assert_same_batches(dataset[1], preprocessor({"prompts": ["a", "b"], "responses": ["c", "d"]}))
    assert_same_batches(dataset[2], preprocessor(TEXTS[2:]))
    dataset.on_epoch_end()
    assert raw.epochs_ended == 1


@pytest.mark.skipif(keras.config.backend() != "tensorflow", reason="tf.data on TensorFlow")
def test_tf_data_datasets_are_preprocessed_batch_by_batch(tokenizer):
    import tensorflow as tf

    preprocessor = GemmaCausalLMPreprocessor(tokenizer, sequence_length=16)
    raw = tf.data.Dataset.from_tensor_slices(TEXTS).batch(2)
    dataset, *rest = training_data(preprocessor, raw)
    assert rest == [None, None, None]
    assert int(dataset.cardinality()) == 2
    for _ in range(2):  # every epoch reads the dataset again
        batches = list(dataset.as_numpy_iterator())
        assert len(batches) == 2
        assert_same_batches(batches[0], preprocessor(TEXTS[:2]))
        assert_same_batches(batches[1], preprocessor(TEXTS[2:]))
    pairs = tf.data.Dataset.from_tensor_slices({"prompts": ["a", "b"], "responses": ["c", "d"]})
    (batch,) = training_data(preprocessor, pairs.batch(2))[0].as_numpy_iterator()
    assert_same_batches(batch, preprocessor({"prompts": ["a", "b"], "responses": ["c", "d"]}))
    preprocessed = tf.data.Dataset.from_tensor_slices(preprocessor(TEXTS)).batch(2)
    assert training_data(preprocessor, preprocessed)[0] is preprocessed
    history = keras.Model.fit(tiny_model(tokenizer), dataset, epochs=2, shuffle=False, verbose=0)
    assert len(history.history["loss"]) == 2
    assert all(math.isfinite(loss) for loss in history.history["loss"])
    # A bad first batch raises the preprocessor's own error, not a TensorFlow graph error.
    wrong_keys = tf.data.Dataset.from_tensor_slices({"prompt": ["a"], "response": ["b"]})
    with pytest.raises(PreprocessingError, match="exactly the keys 'prompts' and 'responses'"):
        training_data(preprocessor, wrong_keys.batch(1))
    with pytest.raises(PreprocessingError, match="holds no batches"):
        training_data(preprocessor, raw.take(0))


@pytest.mark.skipif(keras.config.backend() == "tensorflow", reason="TensorFlow is the backend")
def test_preprocessing_does_not_import_tensorflow(tokenizer_proto, tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(tokenizer_proto)
    code = textwrap.dedent(
        f"""
        import sys
        import keras
        from gemma_keras import GemmaTokenizer
        from gemma_keras.preprocessor import GemmaCausalLMPreprocessor, training_data

        class Batches(keras.utils.PyDataset):
            def __len__(self):
                return 1

            def __getitem__(self, index):
                return ["Hello there!"]

        tokenizer = GemmaTokenizer({str(tmp_path / "tokenizer.model")!r})
        preprocessor = GemmaCausalLMPreprocessor(tokenizer, sequence_length=8)
        training_data(preprocessor, ["Hello there!", "Hi"], batch_size=1)
        list(training_data(preprocessor, iter([["Hello"]]))[0])
        training_data(preprocessor, Batches())[0][0]
        preprocessor([[{{"role": "user", "content": "a"}}, {{"role": "model", "content": "b"}}]])
        assert "tensorflow" not in sys.modules, "tensorflow was imported"
        """
    )
    env = {**os.environ, "KERAS_BACKEND": keras.config.backend()}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


# Keras trains on what training_data returns.


def tiny_model(tokenizer):
    config = dataclasses.replace(
        tiny_config("gemma1_mqa"), vocabulary_size=tokenizer.vocabulary_size
    )
    model = GemmaCausalLM.from_gemma_config(config)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        weighted_metrics=[keras.metrics.SparseCategoricalAccuracy()],
    )
    return model


def test_keras_fits_on_preprocessed_strings_and_generators(tokenizer):
    preprocessor = GemmaCausalLMPreprocessor(tokenizer, sequence_length=16)
    model = tiny_model(tokenizer)
    x, y, sample_weight, batch_size = training_data(preprocessor, TEXTS, batch_size=2)
    history = keras.Model.fit(
        model, x, y, sample_weight=sample_weight, batch_size=batch_size, epochs=4, verbose=0
    )
    losses = history.history["loss"]
    assert all(math.isfinite(loss) for loss in losses)
    assert losses[-1] < losses[0], losses

    # Keras weighs each label by its own sample weight: its loss (summed weighted
    # cross-entropy over all B x L labels, Keras' default reduction) and weighted
    # accuracy equal NumPy's from the logits.
    logits = keras.ops.convert_to_numpy(model(x)).astype("float64")
    log_probs = logits - logits.max(-1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
    cross_entropy = -np.take_along_axis(log_probs, y[..., None], axis=-1)[..., 0]
    correct = logits.argmax(-1) == y
    evaluated = keras.Model.evaluate(
        model, x, y, sample_weight=sample_weight, batch_size=len(y), verbose=0, return_dict=True
    )
    np.testing.assert_allclose(
        evaluated["loss"], (cross_entropy * sample_weight).sum() / y.size, rtol=1e-5
    )
    np.testing.assert_allclose(
        evaluated["sparse_categorical_accuracy"],
        (correct * sample_weight).sum() / sample_weight.sum(),
        rtol=1e-6,
    )

    batches = (TEXTS[start : start + 2] for start in (0, 2))
    x, y, sample_weight, batch_size = training_data(preprocessor, batches)
    history = keras.Model.fit(model, x, epochs=1, shuffle=False, verbose=0)
    assert math.isfinite(history.history["loss"][-1])
    dataset = training_data(preprocessor, RawPyDataset([TEXTS[:2], TEXTS[2:]]))[0]
    history = keras.Model.fit(model, dataset, epochs=2, verbose=0)
    assert all(math.isfinite(loss) for loss in history.history["loss"])


def test_ids_and_labels_outside_the_vocabulary_are_refused_before_training(tokenizer):
    # Inside a compiled step they would give NaN losses (JAX) or an error from
    # deep in the backend; in memory they are checked first, by fit and evaluate.
    preprocessor = GemmaCausalLMPreprocessor(tokenizer, sequence_length=16)
    model = tiny_model(tokenizer)
    model.preprocessor = preprocessor
    x, y, sample_weight = preprocessor(TEXTS)
    size = tokenizer.vocabulary_size
    for bad in (size, -100):
        labels = y.copy()
        labels[1, 3] = bad
        for method in (model.fit, model.evaluate):
            with pytest.raises(
                TokenIdError, match=rf"labels \(y\): label {bad} is outside .*sample_weight of 0"
            ):
                method(x, labels, sample_weight=sample_weight, verbose=0)
    ids = dict(x, token_ids=x["token_ids"].copy())
    ids["token_ids"][0, 2] = size + 5
    for call in (
        lambda: model.fit(ids, y, sample_weight=sample_weight, verbose=0),
        lambda: model.predict(ids, verbose=0),
    ):
        with pytest.raises(TokenIdError, match=rf"x\['token_ids'\]: token id {size + 5} is out"):
            call()

    # With the loss's ignore_class, its labels are left out of the loss, as Keras does.
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=-100),
    )
    labels = np.where(sample_weight > 0, y, -100)
    history = model.fit(x, labels, batch_size=3, epochs=1, verbose=0)
    assert math.isfinite(history.history["loss"][-1])
    labels[0, 0] = size
    with pytest.raises(TokenIdError, match=f"label {size} is outside"):
        model.fit(x, labels, verbose=0)


def test_preprocessed_arrays_of_the_wrong_shape_or_kind_are_refused(tokenizer):
    model = tiny_model(tokenizer)
    model.preprocessor = GemmaCausalLMPreprocessor(tokenizer, sequence_length=16)
    x, y, sample_weight = model.preprocessor(TEXTS)
    cases = [
        ((x, y[:, :5], sample_weight), r"y has shape \(3, 5\) and x\['token_ids'\] \(3, 16\)"),
        ((x, y, sample_weight[:, :3]), r"sample_weight has shape \(3, 3\)"),
        ((x, y, sample_weight[:, 0]), r"sample_weight has shape \(3,\)"),
        ((dict(x, padding_mask=x["padding_mask"][:, :4]), y, None), r"x\['padding_mask'\] has"),
        ((dict(x, token_ids=x["token_ids"] + 0.5), y, None), "must be integer token ids"),
        ((x, y.astype("float32"), None), r"labels \(y\) must be integer"),
        (({k: v[:0] for k, v in x.items()}, y[:0], None), "holds 0 examples"),
        (({"token_ids": x["token_ids"]}, y, None), r"missing \['padding_mask'\]"),
        ((dict(x, labels=y), y, None), r"unknown keys \['labels'\]"),
        ((dict(x, padding_mask=x["padding_mask"] * 0.5), y, None), "integers or booleans"),
        ((dict(x, padding_mask=x["padding_mask"] * 2), y, None), "holds 2; give 1 for"),
        ((dict(x, padding_mask=x["padding_mask"] * 0), y, None), "row 0 is all padding"),
    ]
    before = [keras.ops.convert_to_numpy(v).copy() for v in model.weights]
    for (inputs, labels, weights), message in cases:
        for method in (model.fit, model.evaluate):
            with pytest.raises(ValueError, match=message):
                method(inputs, labels, sample_weight=weights, verbose=0)
    with pytest.raises(PreprocessingError, match="x is empty"):
        model.fit(np.zeros((0, 8), "int32"), verbose=0)
    # Nothing was trained or lost (an empty fit used to leave Keras' JAX trainer
    # without its variables).
    for weight, value in zip(model.weights, before, strict=True):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(weight), value)
    # A step that fails inside Keras leaves the weights in place (Keras' JAX
    # trainer takes them out of the variables for the call).
    one_hot = np.eye(model.config.vocabulary_size, dtype="float32")[y]
    with pytest.raises(ValueError, match=r"y has shape \(3, 16, 400\), but the loss takes"):
        model.fit(x, one_hot, verbose=0)
    model.compile(loss="mse")  # fails inside the step: logits and labels differ in shape
    with pytest.raises(Exception):  # noqa: B017 (each backend words its own)
        model.fit(x, y, verbose=0)
    for weight, value in zip(model.weights, before, strict=True):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(weight), value)
    assert model.predict(x, verbose=0).shape[:2] == x["token_ids"].shape
    with pytest.raises(PreprocessingError, match="validation_data: x is a int"):
        model.fit(TEXTS, validation_data=5, verbose=0)
    with pytest.raises(ValueError, match=r"y has shape \(3, 5\)"):
        model.fit(TEXTS, validation_data=(x, y[:, :5], sample_weight), verbose=0)
    model.preprocessor = None
    with pytest.raises(PreprocessingError, match="no preprocessor"):
        model.fit(TEXTS, verbose=0)
