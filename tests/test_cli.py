"""The gemma-keras command, end to end in subprocesses."""

import json
import os
import re
import subprocess
import sys

import keras
import numpy as np
import pytest

from conftest import randomize, tiny_config
from gemma_keras import GemmaCausalLM, GemmaTokenizer
from gemma_keras.checkpoints.weight_mapping import assign_weights, model_shapes


def run_cli(*args, stdin=None):
    env = {**os.environ, "KERAS_BACKEND": keras.config.backend(), "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run(
        [sys.executable, "-m", "gemma_keras", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


@pytest.fixture(scope="module")
def preset(tmp_path_factory, tokenizer_proto):
    """A tiny Gemma 3 preset with a real tokenizer (vocabulary sized to match)."""
    tokenizer = GemmaTokenizer(tokenizer_proto)
    config = tiny_config("gemma3")
    config.vocabulary_size = tokenizer.vocabulary_size
    model = GemmaCausalLM.from_gemma_config(config, dtype="float32")
    assign_weights(model, {k: 3 * v for k, v in randomize(model_shapes(model)).items()})
    model.tokenizer = tokenizer
    directory = tmp_path_factory.mktemp("cli") / "preset"
    model.save_to_preset(str(directory))
    return directory


def test_generate_streams_the_same_text_as_the_api(preset):
    result = run_cli("generate", "The capital of", "--preset", str(preset), "--max-new-tokens", "8")
    assert result.returncode == 0, result.stderr
    expected = GemmaCausalLM.from_preset(str(preset)).generate("The capital of", max_new_tokens=8)
    assert result.stdout.rstrip("\n") == expected
    as_json = run_cli(
        "--json", "generate", "The capital of", "--preset", str(preset), "--max-new-tokens", "8"
    )
    assert json.loads(as_json.stdout) == [
        {"prompt": "The capital of", "completion": expected[len("The capital of") :]}
    ]


def test_chat_two_turns_through_stdin(preset):
    result = run_cli(
        "--json",
        "chat",
        "--preset",
        str(preset),
        "--max-new-tokens",
        "5",
        stdin="Hello there!\nAnd now?\n/exit\n",
    )
    assert result.returncode == 0, result.stderr
    turns = [json.loads(line) for line in result.stdout.splitlines()]
    assert [t["user"] for t in turns] == ["Hello there!", "And now?"]
    chat = GemmaCausalLM.from_preset(str(preset)).start_chat()
    assert [t["model"] for t in turns] == [
        chat.send("Hello there!", max_new_tokens=5),
        chat.send("And now?", max_new_tokens=5),
    ]


def test_presets_lists_the_registry():
    result = run_cli("--json", "presets")
    assert result.returncode == 0, result.stderr
    names = {row["name"] for row in json.loads(result.stdout)}
    assert {"gemma3_270m_q4_k_m", "gemma_1.1_instruct_2b_en", "gemma2_9b_en"} <= names


@pytest.mark.parametrize("target", ["huggingface", "keras_hub"])
def test_convert_round_trip_keeps_logits(preset, tmp_path, target):
    destination = tmp_path / target
    result = run_cli("convert", str(preset), str(destination), "--to", target)
    assert result.returncode == 0, result.stderr
    original, converted = (GemmaCausalLM.from_preset(str(p)) for p in (preset, destination))
    ids = np.array([original.tokenizer.encode("Numbers like 12345")])
    inputs = {"token_ids": ids, "padding_mask": np.ones_like(ids)}
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(converted(inputs)),
        keras.ops.convert_to_numpy(original(inputs)),
        atol=1e-5,
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--bogus"], "unrecognized"),
        (["generate"], "prompt"),
        (["generate", "x", "--sampler", "nucleus"], "nucleus"),
        ([], "give a command: generate, chat"),
        # Sampler options are checked before the model loads, each named as given.
        (["generate", "x", "--sampler", "top_k", "--top-k", "0"], "--top-k must be"),
        (["generate", "x", "--sampler", "top_p", "--top-p", "0"], r"--top-p must be in \(0, 1\]"),
        (["generate", "x", "--top-k", "0"], "need --sampler"),
        (["generate", "x", "--sampler", "random", "--temperature", "-1"], "--temperature must"),
        (["chat", "--sampler", "random", "--seed", "-3"], "--seed must be a non-negative"),
    ],
)
def test_usage_errors_exit_2_with_one_line(args, message):
    result = (
        run_cli(*args, "--preset", "no_such_preset") if args[:1] == ["chat"] else run_cli(*args)
    )
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) <= 2 and "Traceback" not in result.stderr
    assert re.search(message, result.stderr), result.stderr
    assert result.stdout == ""


def test_unknown_preset_exits_1_with_the_resolution_error():
    result = run_cli("generate", "hi", "--preset", "gemma_2b_enn")
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert "Unknown preset 'gemma_2b_enn'" in last and "gemma_2b_en" in last
    assert "Traceback" not in result.stderr


def test_info():
    # The global options go before the command or after it.
    for args in (["--json", "info"], ["info", "--json"]):
        result = run_cli(*args)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["backend"] == keras.config.backend()
    version = run_cli("--version")
    assert version.returncode == 0 and version.stdout.strip() == "gemma-keras 0.1.0"


EVAL_EXAMPLES = [
    {"context": "The capital of France is", "choices": ["Paris.", "Rome."], "label": 0},
    {"ctx": "def add(a, b):\n", "endings": ["    return a + b", "print(add(2, 3))"], "label": "1"},
    {"context": "Hello", "choices": ["there!", "Numbers"], "label": 1},
]


def test_eval_prints_the_accuracy_and_json_on_its_last_line(preset, tmp_path):
    from gemma_keras.evaluation import evaluate_multiple_choice

    path = tmp_path / "examples.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in EVAL_EXAMPLES), encoding="utf-8")
    as_json = run_cli("--json", "eval", str(path), "--preset", str(preset), "--batch-size", "2")
    assert as_json.returncode == 0, as_json.stderr
    reported = json.loads(as_json.stdout.strip().splitlines()[-1])
    model = GemmaCausalLM.from_preset(str(preset))
    assert reported == evaluate_multiple_choice(model, path)
    human = run_cli("eval", str(path), "--preset", str(preset), "--limit", "2")
    assert human.returncode == 0, human.stderr
    first_two = evaluate_multiple_choice(model, path, limit=2)
    assert human.stdout.strip() == (
        f"accuracy {first_two['accuracy']:.4f}  accuracy_norm {first_two['accuracy_norm']:.4f}  "
        f"n 2  ({path}, {preset})"
    )


def test_eval_errors(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(EVAL_EXAMPLES[0]) + '\n{"context": "a", "choices": []}\n')
    # The file is read before the model loads: the preset need not exist.
    result = run_cli("eval", str(path), "--preset", "no_such_preset")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"gemma-keras eval: EvaluationError: {path}:2: missing field 'label'; expected "
        '{"context": str, "choices": [str, ...], "label": int} or HellaSwag\'s '
        '{"ctx": str, "endings": [str, ...], "label": int}.'
    )
    for flag in ("--limit", "--batch-size"):
        usage = run_cli("eval", str(path), flag, "0")
        assert usage.returncode == 2
        assert usage.stderr.strip() == f"gemma-keras eval: {flag} must be at least 1"
