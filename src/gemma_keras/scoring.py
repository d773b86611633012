"""Scoring token ids under a model: KerasHub's `CausalLM.score`, log-likelihoods, perplexity.

    logits = score(model, token_ids)                                    # [batch, seq, vocabulary]
    losses = score(model, token_ids, scoring_mode="loss", target_ids=targets)   # [batch, seq]
    perplexity(model, ["The capital of France is Paris."])             # exp(mean token NLL)

`sequence_log_likelihoods` is what perplexity and the multiple-choice
evaluator (`gemma_keras.evaluation`) share: the log-probability of every token
of token-id sequences of any lengths, batched and compiled. Sequences are
padded on the right to a power-of-two length, so that one graph compiles per
(rows, length) bucket rather than per length.
"""

import math
import numbers

import keras
import numpy as np
from keras import ops

from gemma_keras import backends
from gemma_keras.layers.token_embedding import check_token_ids

SCORING_MODES = ("logits", "loss")


class ScoringError(ValueError):
    """A scoring request is invalid: bad shapes, mode, or text that does not fit."""


def score(
    model,
    token_ids,
    padding_mask=None,
    scoring_mode="logits",
    layer_intercept_fn=None,
    target_ids=None,
):
    """Scores `token_ids` [batch, seq] as KerasHub's `CausalLM.score`.

    Args:
        model: a `GemmaCausalLM` (any Gemma generation).
        token_ids: int [batch, seq].
        padding_mask: [batch, seq], 1 for real tokens; all ones by default.
            Put padding on the right: positions count from the first slot.
        scoring_mode: "logits" returns the float32 logits [batch, seq,
            vocabulary]; "loss" returns the per-token cross-entropy [batch, seq]
            of `target_ids` under those logits, unreduced and not masked by
            `padding_mask` (KerasHub's `SparseCategoricalCrossentropy(
            from_logits=True, reduction="none")`).
        layer_intercept_fn: optional `fn(x, i)` called with the scaled token
            embeddings (`i = -1`) and with the output of each decoder block
            (`i = 0 ... num_layers - 1`); its return value replaces `x` and
            flows on (`fn` may record activations, or steer them). KerasHub
            calls it on the embeddings before the `sqrt(hidden_dim)` scale and
            then drops that first return value; here it is used.
        target_ids: int [batch, seq], required for "loss": usually `token_ids`
            shifted left by one, so that position t scores token t + 1.

    Example:

    >>> import numpy as np
    >>> from gemma_keras import GemmaCausalLM, GemmaConfig
    >>> config = GemmaConfig(vocabulary_size=100, num_layers=2, hidden_dim=32,
    ...                      intermediate_dim=64, num_query_heads=4,
    ...                      num_key_value_heads=1, head_dim=8)
    >>> model = GemmaCausalLM.from_gemma_config(config)
    >>> ids = np.array([[2, 5, 7, 9]])
    >>> tuple(model.score(ids).shape)
    (1, 4, 100)
    >>> losses = model.score(ids[:, :-1], scoring_mode="loss", target_ids=ids[:, 1:])
    >>> tuple(losses.shape)
    (1, 3)
    """
    if scoring_mode not in SCORING_MODES:
        raise ScoringError(f"scoring_mode must be 'logits' or 'loss', got {scoring_mode!r}.")
    if scoring_mode == "loss" and target_ids is None:
        raise ScoringError(
            "scoring_mode='loss' needs target_ids [batch, seq]: the token each position "
            "should predict (usually token_ids shifted left by one)."
        )
    token_ids = _token_ids("token_ids", token_ids, model.config.vocabulary_size)
    shape = tuple(ops.shape(token_ids))
    if len(shape) != 2:
        raise ScoringError(f"token_ids must be [batch, seq], got shape {shape}.")
    if shape[1] > model.config.max_sequence_length:
        raise ScoringError(
            f"token_ids hold {shape[1]} positions; the model's context holds "
            f"{model.config.max_sequence_length}. Shorten or split them."
        )
    if target_ids is not None:
        target_ids = _token_ids("target_ids", target_ids, model.config.vocabulary_size)
        target_ids = _same_shape("target_ids", target_ids, shape)
    if padding_mask is None:
        padding_mask = ops.ones(shape, "int32")
    padding_mask = _same_shape("padding_mask", padding_mask, shape)

    if layer_intercept_fn is None:
        logits = model({"token_ids": token_ids, "padding_mask": padding_mask})
    else:
        # Layer by layer, as the functional model runs them, so that the
        # intercept sees (and may replace) every intermediate activation.
        backbone = model.backbone
        x = layer_intercept_fn(backbone.token_embedding(token_ids), -1)
        for index, block in enumerate(backbone.decoder_blocks):
            x = layer_intercept_fn(block(x, padding_mask), index)
        logits = backbone.token_embedding(backbone.final_norm(x), reverse=True)
    if scoring_mode == "logits":
        return logits
    return _cross_entropy(logits, target_ids)


def _token_ids(name, ids, vocabulary_size):
    """`ids` as an int32 tensor, refused unless they are integers inside the vocabulary
    (a float id would be truncated, a negative one taken from the end)."""
    if not hasattr(ids, "dtype"):
        try:
            ids = np.asarray(ids)
        except ValueError:
            raise ScoringError(
                f"{name} must be a rectangular [batch, seq] array; pad rows of different "
                "lengths and mark the padding in padding_mask."
            ) from None
    dtype = keras.backend.standardize_dtype(ids.dtype)
    if "int" not in dtype:
        raise ScoringError(f"{name} must be integer token ids; got {dtype}.")
    check_token_ids(ids, vocabulary_size, what=f"{name}: token id")
    return ops.convert_to_tensor(ids, "int32")


def _same_shape(name, tensor, shape):
    tensor = ops.cast(ops.convert_to_tensor(tensor), "int32")
    if tuple(ops.shape(tensor)) != shape:
        raise ScoringError(
            f"{name} has shape {tuple(ops.shape(tensor))}; it must match token_ids {shape}."
        )
    return tensor


def _cross_entropy(logits, target_ids):
    """`-log softmax(logits)[target]` per position: the same values as Keras'
    sparse cross-entropy from logits, without its one-hot copy of the logits
    (8 x 64 positions of Gemma 3's 262,144-word vocabulary: 0.5 GB)."""
    log_normalizer = ops.logsumexp(logits, axis=-1)
    target_logits = ops.take_along_axis(logits, target_ids[..., None], axis=-1)[..., 0]
    return log_normalizer - target_logits


def sequence_log_likelihoods(model, sequences, batch_size=8, progress=None):
    """The log-probability of each token of each sequence given the ones before it.

    `sequences` is a list of token-id lists (each normally starting with
    `<bos>`). Returns one float64 NumPy array per sequence, of its length
    minus one: entry t is `log p(sequence[t + 1] | sequence[: t + 1])`.
    Sequences are sorted by length and batched `batch_size` at a time,
    right-padded to a power-of-two length (at most the model's context), so
    that few shapes run; a last, smaller batch is padded to a power-of-two
    number of rows. `progress(done)` is called with the number of sequences
    scored so far after each batch.
    """
    _check_batch_size(batch_size)
    context = model.config.max_sequence_length
    for index, sequence in enumerate(sequences):
        if len(sequence) == 0:
            raise ScoringError(f"sequence {index} is empty; it needs at least <bos>.")
        if len(sequence) > context:
            raise ScoringError(
                f"sequence {index} has {len(sequence)} tokens; the model's context holds "
                f"{context}. Shorten or split it."
            )
    results = [None] * len(sequences)
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]), reverse=True)
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        # Inputs are tokens 0 .. n-2 and targets tokens 1 .. n-1 of each sequence.
        longest = max(len(sequences[i]) for i in batch) - 1
        length = min(_power_of_two(max(longest, 1), minimum=16), context)
        rows = min(_power_of_two(len(batch), minimum=1), batch_size)
        token_ids = np.zeros((rows, length), "int32")
        target_ids = np.zeros((rows, length), "int32")
        padding_mask = np.zeros((rows, length), "int32")
        for row, index in enumerate(batch):
            sequence = np.asarray(sequences[index], "int32")
            token_ids[row, : len(sequence) - 1] = sequence[:-1]
            target_ids[row, : len(sequence) - 1] = sequence[1:]
            padding_mask[row, : len(sequence) - 1] = 1
        log_likelihoods = -_batch_losses(model, token_ids, padding_mask, target_ids)
        for row, index in enumerate(batch):
            results[index] = log_likelihoods[row, : len(sequences[index]) - 1]
        if progress is not None:
            progress(min(start + batch_size, len(order)))
    return results


def _check_batch_size(batch_size):
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral):
        raise ScoringError(f"batch_size must be an integer, got {batch_size!r}.")
    if batch_size < 1:
        raise ScoringError(f"batch_size must be at least 1, got {batch_size}.")


def _power_of_two(n, minimum):
    return max(minimum, 1 << (int(n) - 1).bit_length())


def _batch_losses(model, token_ids, padding_mask, target_ids):
    """`score(..., scoring_mode="loss")` of one padded batch as float64 NumPy, compiled."""
    check_token_ids(token_ids, model.config.vocabulary_size)
    check_token_ids(target_ids, model.config.vocabulary_size)
    # `compile_step` compiles `step(caches, *inputs)` and hands the caches
    # back; the batch rides in the caches' place (JAX donates those buffers,
    # and the step returns them untouched, so nothing is copied).
    batch = [(ops.convert_to_tensor(token_ids), ops.convert_to_tensor(padding_mask))]
    losses, _ = _compiled_losses(model)(batch, target_ids)
    return ops.convert_to_numpy(losses).astype("float64")


class _CompiledLosses:
    def __init__(self, variables, function):
        self.variable_ids = [id(variable) for variable in variables]
        self.function = function


def _compiled_losses(model):
    """The per-token loss of a batch, compiled once per model and input shape
    (JAX and TensorFlow through XLA, PyTorch traced without gradients; see
    `backends.compile_step`). It is compiled again when the model's variables
    change (LoRA enabled, quantized), since they are inputs of the graph."""
    compiled = getattr(model, "_compiled_losses", None)
    if compiled is None or compiled.variable_ids != [id(v) for v in model.variables]:

        def step(batch, target_ids):
            ((token_ids, padding_mask),) = batch
            losses = score(
                model, token_ids, padding_mask, scoring_mode="loss", target_ids=target_ids
            )
            return losses, batch

        compiled = _CompiledLosses(model.variables, backends.compile_step(model, step))
        model._compiled_losses = compiled
    return compiled.function


def perplexity(model, texts, batch_size=8):
    """`exp` of the mean negative log-likelihood per predicted token of `texts`.

    Each text (a string, or a list of strings) is encoded with `<bos>` and no
    `<eos>`; tokens 1 ... n - 1 are predicted, each from all the tokens before
    it, and the mean runs over every predicted token of every text (longer
    texts weigh more, as in lm-eval-harness' token perplexity). A text longer
    than the model's context is an error, not truncated. `batch_size` texts
    run at a time; each pass holds float32 logits of batch x length x
    vocabulary (Gemma 3: 8 texts of 512 tokens take 4.3 GB), so lower it for
    long texts.

    >>> model.perplexity(["The capital of France is Paris."])  # doctest: +SKIP
    """
    _check_batch_size(batch_size)
    if not hasattr(texts, "__iter__"):
        raise ScoringError(
            f"perplexity takes a text or a list of texts, not {type(texts).__name__}."
        )
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    if not texts:
        raise ScoringError("perplexity needs at least one text; got an empty list.")
    if model.tokenizer is None:
        raise ScoringError(
            "This model has no tokenizer; set `model.tokenizer = GemmaTokenizer(path)` first."
        )
    sequences = []
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise ScoringError(f"text {index} is a {type(text).__name__}, not a string.")
        sequence = model.tokenizer.encode(text)
        if len(sequence) < 2:
            raise ScoringError(f"text {index} is empty: it has no token to predict.")
        if len(sequence) > model.config.max_sequence_length:
            raise ScoringError(
                f"text {index} is {len(sequence)} tokens long (with <bos>); the model's "
                f"context holds {model.config.max_sequence_length}. Split it."
            )
        sequences.append(sequence)
    log_likelihoods = np.concatenate(sequence_log_likelihoods(model, sequences, batch_size))
    return math.exp(-float(np.mean(log_likelihoods)))
