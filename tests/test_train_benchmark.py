"""benchmarks/train_step.py: its training batch, and a whole run in its smoke mode."""

import importlib.util
import json
import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest

SCRIPT = pathlib.Path(__file__).parents[1] / "benchmarks" / "train_step.py"
spec = importlib.util.spec_from_file_location("benchmark_train_step", SCRIPT)
benchmark = importlib.util.module_from_spec(spec)
spec.loader.exec_module(benchmark)


def test_training_batch_labels_are_the_next_tokens_of_real_rows():
    x, labels, sample_weight = benchmark.training_batch(batch=3, length=16, vocabulary_size=50)
    token_ids = x["token_ids"]
    assert token_ids.shape == labels.shape == sample_weight.shape == (3, 16)
    assert (token_ids[:, 0] == 2).all()  # <bos>
    np.testing.assert_array_equal(token_ids[:, 1:], labels[:, :-1])
    assert (x["padding_mask"] == 1).all() and (sample_weight == 1).all()
    assert labels.min() >= 10 and labels.max() < 50  # no special tokens
    again, _, _ = benchmark.training_batch(batch=3, length=16, vocabulary_size=50)
    np.testing.assert_array_equal(again["token_ids"], token_ids)  # both engines get the same


def test_smoke_run_times_both_engines_on_the_same_weights(tokenizer_proto, tmp_path):
    pytest.importorskip("keras_hub")
    vocabulary = tmp_path / "vocabulary.spm"
    vocabulary.write_bytes(tokenizer_proto)
    output = tmp_path / "train_step.json"
    backend = keras.config.backend()
    command = [sys.executable, str(SCRIPT), "--smoke", "--tokenizer", str(vocabulary)]
    command += ["--batch", "2", "--backend", backend, "--output", str(output), "--paired"]
    run = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]

    results = json.loads(output.read_text())
    assert results["backend"] == backend and results["cpu"]
    ours = results["engines"]["gemma_keras"]["batch_2"]
    theirs = results["engines"]["keras_hub"]["batch_2"]
    for measured in (ours, theirs):
        assert "error" not in measured, measured["error"]
        tokens = 2 * results["sequence_length"]
        assert measured["tokens_per_second"] == pytest.approx(
            tokens / measured["median_step_seconds"]
        )
        assert 0 < measured["peak_rss_gb"] < 16
    # KerasHub loaded the preset gemma_keras wrote: the same weights and batch
    # give the same loss before the first update (measured difference < 1e-6).
    assert abs(ours["first_loss"] - theirs["first_loss"]) <= 1e-4
    assert ours["speed_ratio"] == pytest.approx(
        ours["tokens_per_second"] / theirs["tokens_per_second"]
    )
    paired = results["paired"]["batch_2"]
    assert ours["paired_speed_ratio"] == pytest.approx(
        paired["keras_hub"]["median_step_seconds"] / paired["gemma_keras"]["median_step_seconds"]
    )
    assert "gemma_keras" in run.stdout and "KerasHub" in run.stdout
