"""Multiple-choice evaluation by log-likelihood, as lm-eval-harness scores HellaSwag-style tasks.

    from gemma_keras.evaluation import evaluate_multiple_choice
    evaluate_multiple_choice(model, "hellaswag_val.jsonl", limit=200)
    # {'accuracy': ..., 'accuracy_norm': ..., 'n': 200}

Also `gemma-keras eval FILE.jsonl [--limit N]`.
"""

import json
import os
import sys

import numpy as np

from gemma_keras.scoring import sequence_log_likelihoods

_FORMATS = (
    '{"context": str, "choices": [str, ...], "label": int} '
    'or HellaSwag\'s {"ctx": str, "endings": [str, ...], "label": int}'
)


class EvaluationError(ValueError):
    """An evaluation file or example is malformed."""


def load_examples(path, limit=None):
    """The examples of a JSONL file as `{"context", "choices", "label"}` dicts.

    Each non-blank line is one JSON object in either format of
    `evaluate_multiple_choice`; blank lines are skipped. `limit` keeps the
    first `limit` examples (lines after them are not read). Errors name the
    file and line.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        what = "is a folder" if os.path.isdir(path) else "does not exist"
        raise EvaluationError(f"{path} {what}; expected a JSONL file of examples.")
    examples = []
    with open(path, encoding="utf-8") as file:
        for line_number, line in enumerate(file, start=1):
            if limit is not None and len(examples) >= limit:
                break
            if not line.strip():
                continue
            where = f"{path}:{line_number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise EvaluationError(f"{where}: not valid JSON ({error.msg}).") from None
            examples.append(_normalize(record, where))
    return examples


def _normalize(record, where):
    """`{"context", "choices", "label"}` from either format, or a one-line error."""
    if not isinstance(record, dict):
        raise EvaluationError(f"{where}: expected a JSON object: {_FORMATS}.")
    hellaswag = "ctx" in record or "endings" in record
    context_field, choices_field = ("ctx", "endings") if hellaswag else ("context", "choices")
    for field in (context_field, choices_field, "label"):
        if field not in record:
            raise EvaluationError(f"{where}: missing field {field!r}; expected {_FORMATS}.")
    context, choices, label = record[context_field], record[choices_field], record["label"]
    if not isinstance(context, str):
        raise EvaluationError(f"{where}: {context_field!r} must be a string.")
    if not isinstance(choices, list) or not choices:
        raise EvaluationError(f"{where}: {choices_field!r} must be a non-empty list of strings.")
    for index, choice in enumerate(choices):
        if not isinstance(choice, str) or not choice:
            raise EvaluationError(
                f"{where}: {choices_field}[{index}] must be a non-empty string, got {choice!r}."
            )
    # HellaSwag's files store the label as a string ("2").
    if isinstance(label, str) and label.strip().isdigit():
        label = int(label)
    if isinstance(label, bool) or not isinstance(label, int):
        raise EvaluationError(f"{where}: 'label' must be an integer index, got {label!r}.")
    if not 0 <= label < len(choices):
        raise EvaluationError(
            f"{where}: 'label' {label} is out of range for {len(choices)} choices "
            f"(0 ... {len(choices) - 1})."
        )
    return {"context": context, "choices": list(choices), "label": label}


def evaluate_multiple_choice(model, examples_or_path, batch_size=8, limit=None, progress=None):
    """Multiple-choice accuracy of `model` by the log-likelihood of each choice.

    Args:
        model: a `GemmaCausalLM` with its tokenizer.
        examples_or_path: a JSONL file, one example per line, either
            `{"context": str, "choices": [str, ...], "label": int}` or
            HellaSwag's `{"ctx": str, "endings": [str, ...], "label": int}`
            (the label may be a string of digits, as HellaSwag stores it;
            HellaSwag's `ctx` is used as it is, without lm-eval-harness'
            activity-label prefix and bracket clean-up); or a list of such dicts.
            Blank lines are skipped.
        batch_size: (context, choice) pairs per forward pass.
        limit: evaluate only the first `limit` examples.
        progress: a progress bar on stderr: None shows it when stderr is a
            terminal, True always, False never.

    Returns `{"accuracy": float, "accuracy_norm": float, "n": int}`.

    Each choice is scored as lm-eval-harness scores a continuation: the sum of
    the log-probabilities of its tokens given `<bos>` + context. The text
    scored is `context + choice`, with one space inserted between them when
    the context is not empty, does not end in whitespace and the choice does
    not start with whitespace (lm-eval-harness' " " target delimiter).
    Whitespace that ends the context moves to the start of the choice, and
    the choice's tokens are those of `context + choice` after the tokens of
    the context alone (both as lm-eval-harness does). `accuracy` counts the
    examples whose label has the highest log-likelihood; `accuracy_norm` the
    ones whose label has the highest log-likelihood per character of the
    choice as given (lm-eval-harness' `acc_norm`: `len(choice)`, the inserted
    space not counted). Ties go to the first choice.

    >>> evaluate_multiple_choice(model, [{"context": "The capital of France is",
    ...     "choices": ["Paris", "banana"], "label": 0}])  # doctest: +SKIP
    {'accuracy': 1.0, 'accuracy_norm': 1.0, 'n': 1}
    """
    examples = _examples(examples_or_path, limit)
    choice_scores = choice_log_likelihoods(model, examples, batch_size, progress=progress)
    correct = correct_norm = 0
    for example, scores in zip(examples, choice_scores, strict=True):
        scores = np.asarray(scores)
        lengths = np.array([len(choice) for choice in example["choices"]], "float64")
        correct += int(np.argmax(scores)) == example["label"]
        correct_norm += int(np.argmax(scores / lengths)) == example["label"]
    return {
        "accuracy": correct / len(examples),
        "accuracy_norm": correct_norm / len(examples),
        "n": len(examples),
    }


def choice_log_likelihoods(model, examples_or_path, batch_size=8, limit=None, progress=None):
    """The log-likelihood of every choice of every example, scored as
    `evaluate_multiple_choice` scores them (same arguments): one list of
    floats per example, one float per choice.

    >>> choice_log_likelihoods(model, [{"context": "The capital of France is",
    ...     "choices": ["Paris", "banana"], "label": 0}])  # doctest: +SKIP
    [[-2.1, -17.3]]
    """
    examples = _examples(examples_or_path, limit)
    if model.tokenizer is None:
        raise EvaluationError(
            "This model has no tokenizer; set `model.tokenizer = GemmaTokenizer(path)` first."
        )
    sequences, continuation_starts, owners = [], [], []
    for index, example in enumerate(examples):
        for choice in example["choices"]:
            sequence, start = _encode_pair(model.tokenizer, example["context"], choice)
            if start >= len(sequence):
                raise EvaluationError(
                    f"example {index}: choice {choice!r} adds no token of its own to the "
                    "context's tokens; end the context with a space or a newline."
                )
            if len(sequence) > model.config.max_sequence_length:
                raise EvaluationError(
                    f"example {index}: context and choice {choice!r} are {len(sequence)} "
                    f"tokens long; the model's context holds {model.config.max_sequence_length}."
                )
            sequences.append(sequence)
            continuation_starts.append(start)
            owners.append(index)

    bar = _ProgressBar(len(sequences), progress)
    log_likelihoods = sequence_log_likelihoods(model, sequences, batch_size, progress=bar.update)
    bar.close()

    # Entry t of a sequence's log-likelihoods scores its token t + 1.
    scores = [[] for _ in examples]
    for owner, start, token_scores in zip(
        owners, continuation_starts, log_likelihoods, strict=True
    ):
        scores[owner].append(float(np.sum(token_scores[start - 1 :])))
    return scores


def _examples(examples_or_path, limit):
    """Normalized examples from a JSONL path or a list of dicts, at most `limit`."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise EvaluationError(f"limit must be a positive integer, got {limit!r}.")
    if isinstance(examples_or_path, (str, os.PathLike)):
        examples = load_examples(examples_or_path, limit)
        source = os.fspath(examples_or_path)
    else:
        examples = [
            _normalize(record, f"example {index}")
            for index, record in enumerate(list(examples_or_path)[:limit])
        ]
        source = "the list of examples"
    if not examples:
        raise EvaluationError(f"{source} holds no examples.")
    return examples


def _encode_pair(tokenizer, context, choice):
    """`(token ids of <bos> + context + continuation, index of the first continuation token)`."""
    if context and not context[-1].isspace() and not choice[0].isspace():
        choice = " " + choice
    stripped = context.rstrip()
    continuation = context[len(stripped) :] + choice
    context_ids = tokenizer.encode(stripped)
    whole_ids = tokenizer.encode(stripped + continuation)
    return whole_ids, len(context_ids)


class _ProgressBar:
    """`scoring 12/40 [######..............]` redrawn on one stderr line."""

    WIDTH = 30

    def __init__(self, total, enabled=None):
        if enabled is None:
            enabled = sys.stderr.isatty()
        self.total = total
        self.enabled = enabled
        self.update(0)

    def update(self, done):
        if not self.enabled:
            return
        filled = self.WIDTH * done // max(self.total, 1)
        bar = "#" * filled + "." * (self.WIDTH - filled)
        sys.stderr.write(f"\rscoring {done}/{self.total} choices [{bar}]")
        sys.stderr.flush()

    def close(self):
        if self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()
