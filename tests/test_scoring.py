"""`score` (KerasHub's `CausalLM.score`), sequence log-likelihoods and perplexity,
against NumPy computed from the model's own forward pass."""

import math

import keras
import numpy as np
import pytest

from conftest import randomize, tiny_config, token_batch
from gemma_keras import GemmaCausalLM, GemmaTokenizer
from gemma_keras.checkpoints.weight_mapping import assign_weights, model_shapes
from gemma_keras.layers.token_embedding import TokenIdError
from gemma_keras.scoring import ScoringError, score, sequence_log_likelihoods

GENERATIONS = ["gemma1_mqa", "gemma2", "gemma3"]


def tiny_model(variant, vocabulary_size=None):
    config = tiny_config(variant)
    if vocabulary_size is not None:
        config.vocabulary_size = vocabulary_size
    model = GemmaCausalLM.from_gemma_config(config, dtype="float32")
    # Larger than `randomize`'s scale, so that the logits are far from uniform.
    assign_weights(model, {k: 3 * v for k, v in randomize(model_shapes(model)).items()})
    return model


@pytest.fixture(scope="module", params=GENERATIONS)
def model(request):
    return tiny_model(request.param)


@pytest.fixture(scope="module")
def text_model(tokenizer_proto):
    tokenizer = GemmaTokenizer(tokenizer_proto)
    model = tiny_model("gemma3", vocabulary_size=tokenizer.vocabulary_size)
    model.tokenizer = tokenizer
    return model


def numpy(x):
    return keras.ops.convert_to_numpy(x)


def batch(model):
    """Two rows; the second has three padding slots on the right."""
    token_ids = token_batch(model.config.vocabulary_size, batch=2, length=10)
    padding_mask = np.ones_like(token_ids)
    padding_mask[1, -3:] = 0
    return token_ids, padding_mask


def log_softmax(logits):
    logits = logits.astype("float64")
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def test_logits_are_the_forward_pass(model):
    token_ids, padding_mask = batch(model)
    expected = numpy(model({"token_ids": token_ids, "padding_mask": padding_mask}))
    logits = numpy(model.score(token_ids, padding_mask))
    assert logits.shape == (2, 10, model.config.vocabulary_size) and logits.dtype == np.float32
    np.testing.assert_allclose(logits, expected, rtol=1e-6, atol=1e-6)
    # Without a padding mask every token is real.
    unpadded = numpy(model({"token_ids": token_ids, "padding_mask": np.ones_like(token_ids)}))
    np.testing.assert_allclose(numpy(score(model, token_ids)), unpadded, rtol=1e-6, atol=1e-6)


def test_loss_is_the_cross_entropy_of_the_logits(model):
    token_ids, padding_mask = batch(model)
    target_ids = np.roll(token_ids, -1, axis=1)
    logits = numpy(model({"token_ids": token_ids, "padding_mask": padding_mask}))
    rows, positions = np.indices(target_ids.shape)
    expected = -log_softmax(logits)[rows, positions, target_ids]
    losses = numpy(model.score(token_ids, padding_mask, scoring_mode="loss", target_ids=target_ids))
    # Unreduced and unmasked, as KerasHub: padding positions keep their loss.
    assert losses.shape == (2, 10)
    np.testing.assert_allclose(losses, expected, rtol=1e-5, atol=1e-5)
    keras_losses = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)(
        target_ids, logits
    )
    np.testing.assert_allclose(losses, numpy(keras_losses), rtol=1e-5, atol=1e-5)


def test_layer_intercept_sees_every_layer_and_identity_changes_nothing(model):
    token_ids, padding_mask = batch(model)
    seen = []

    def record(x, index):
        seen.append((index, tuple(x.shape)))
        return x

    logits = numpy(model.score(token_ids, padding_mask, layer_intercept_fn=record))
    num_layers = model.config.num_layers
    hidden_shape = (2, 10, model.config.hidden_dim)
    assert seen == [(index, hidden_shape) for index in range(-1, num_layers)]
    expected = numpy(model({"token_ids": token_ids, "padding_mask": padding_mask}))
    np.testing.assert_allclose(logits, expected, rtol=1e-6, atol=1e-6)


def test_layer_intercept_return_values_replace_the_activations(model):
    token_ids, padding_mask = batch(model)
    other_ids = np.flip(token_ids, axis=1).copy()
    embedding = model.backbone.token_embedding

    # Swapping the embeddings scores the other tokens.
    def swap_embeddings(x, index):
        return embedding(other_ids) if index == -1 else x

    swapped = numpy(model.score(token_ids, padding_mask, layer_intercept_fn=swap_embeddings))
    expected = numpy(model.score(other_ids, padding_mask))
    np.testing.assert_allclose(swapped, expected, rtol=1e-6, atol=1e-6)

    # Zeroing the last block's output leaves zeros through the final norm and
    # the (tied) projection.
    last = model.config.num_layers - 1

    def zero_last(x, index):
        return keras.ops.zeros_like(x) if index == last else x

    zeroed = numpy(model.score(token_ids, padding_mask, layer_intercept_fn=zero_last))
    np.testing.assert_array_equal(zeroed, np.zeros_like(zeroed))

    def nudge_first(x, index):
        return x + 1.0 if index == 0 else x

    nudged = numpy(model.score(token_ids, padding_mask, layer_intercept_fn=nudge_first))
    assert np.abs(nudged - numpy(model.score(token_ids, padding_mask))).max() > 1e-3


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(scoring_mode="probabilities"), "scoring_mode must be 'logits' or 'loss'"),
        (dict(scoring_mode="loss"), "needs target_ids"),
        (dict(padding_mask=np.ones((2, 9), "int32")), "padding_mask has shape (2, 9)"),
        (dict(scoring_mode="loss", target_ids=np.ones((1, 10), "int32")), "target_ids has shape"),
        (dict(target_ids=np.ones((1, 10), "int32")), "target_ids has shape"),
        (dict(scoring_mode="loss", target_ids=np.full((2, 10), 1.5)), "must be integer token ids"),
    ],
)
def test_bad_arguments_raise_one_line_errors(kwargs, message):
    model = tiny_model("gemma1_mqa")
    token_ids = token_batch(model.config.vocabulary_size, batch=2, length=10)
    with pytest.raises(
        ScoringError, match=message.replace("(", r"\(").replace(")", r"\)")
    ) as error:
        model.score(token_ids, **kwargs)
    assert "\n" not in str(error.value)


def test_token_ids_must_be_a_batch():
    model = tiny_model("gemma1_mqa")
    with pytest.raises(ScoringError, match=r"token_ids must be \[batch, seq\], got shape \(4,\)"):
        model.score(np.array([2, 5, 6, 7]))
    with pytest.raises(ScoringError, match="token_ids must be integer token ids; got float64"):
        model.score(np.array([[2.9, 5.0]]))
    for bad in (model.config.vocabulary_size, -3):
        with pytest.raises(TokenIdError, match=f"target_ids: token id {bad} is outside"):
            model.score(np.full((1, 4), 2), scoring_mode="loss", target_ids=np.full((1, 4), bad))
    with pytest.raises(ScoringError, match="rectangular"):
        model.score([[2, 5, 6], [2, 5]])
    context = model.config.max_sequence_length
    with pytest.raises(ScoringError, match=f"{context + 1} positions; the model's context holds"):
        model.score(np.full((1, context + 1), 2))


def hand_log_likelihoods(model, sequences):
    """log p(s[t + 1] | s[: t + 1]) for each sequence s, from one forward pass
    without padding: each sequence is extended to a common length with real
    tokens, which the causal model does not let change its earlier positions.
    The batch has at least 16 rows of 32 tokens: a shape that eager JAX,
    which compiles each operation for each new shape, compiles only once."""
    rows, length = max(16, len(sequences)), max(32, max(len(s) for s in sequences))
    token_ids = np.full((rows, length), 5, "int32")
    for row, sequence in enumerate(sequences):
        token_ids[row, : len(sequence)] = sequence
    inputs = {"token_ids": token_ids, "padding_mask": np.ones_like(token_ids)}
    log_probabilities = log_softmax(numpy(model(inputs)))
    return [log_probabilities[row, np.arange(len(s) - 1), s[1:]] for row, s in enumerate(sequences)]


def test_sequence_log_likelihoods_do_not_depend_on_batching_or_padding(model):
    rng = np.random.default_rng(3)
    sequences = [
        [2] + rng.integers(3, model.config.vocabulary_size, size=n).tolist() for n in (1, 9, 3, 14)
    ]
    expected = hand_log_likelihoods(model, sequences)
    for batch_size in (1, 2):
        results = sequence_log_likelihoods(model, sequences, batch_size=batch_size)
        for result, reference in zip(results, expected, strict=True):
            assert result.shape == reference.shape
            np.testing.assert_allclose(result, reference, rtol=1e-5, atol=1e-5)


TEXTS = ["The capital of France is Paris.", "print(add(2, 3))", "Hello there!"]


def test_perplexity_is_exp_of_the_mean_token_nll(text_model):
    sequences = [text_model.tokenizer.encode(text) for text in TEXTS]
    assert all(len(s) <= 17 for s in sequences)  # one length bucket: few shapes to trace
    log_likelihoods = hand_log_likelihoods(text_model, sequences)
    expected = math.exp(-np.concatenate(log_likelihoods).mean())
    assert text_model.perplexity(TEXTS, batch_size=2) == pytest.approx(expected, rel=1e-5)
    single = math.exp(-log_likelihoods[0].mean())
    assert text_model.perplexity(TEXTS[0]) == pytest.approx(single, rel=1e-5)


def test_perplexity_of_bad_input(text_model, monkeypatch):
    with pytest.raises(ScoringError, match="at least one text"):
        text_model.perplexity([])
    with pytest.raises(ScoringError, match="a text or a list of texts, not NoneType"):
        text_model.perplexity(None)
    for batch_size, message in (
        ("2", "must be an integer"),
        (2.5, "must be an integer"),
        (0, "must be at least 1"),
    ):
        with pytest.raises(ScoringError, match=f"batch_size {message}"):
            text_model.perplexity(["Paris."], batch_size=batch_size)
    with pytest.raises(ScoringError, match="text 1 is empty"):
        text_model.perplexity(["Paris.", ""])
    with pytest.raises(ScoringError, match="text 0 is a int"):
        text_model.perplexity([3])
    length = len(text_model.tokenizer.encode(TEXTS[0]))
    monkeypatch.setattr(text_model.config, "max_sequence_length", length - 1)
    with pytest.raises(ScoringError, match=f"text 1 is {length} tokens long .* holds {length - 1}"):
        text_model.perplexity(["Hello there!", TEXTS[0]])


def test_perplexity_needs_a_tokenizer():
    with pytest.raises(ScoringError, match="no tokenizer"):
        tiny_model("gemma1_mqa").perplexity("Paris.")
