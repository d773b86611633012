"""benchmarks/accelerator_check.py: its parity arithmetic, and a whole smoke run
on a tiny random Gemma 3 (on this machine's CPU, or its accelerator)."""

import importlib.util
import json
import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest

SCRIPT = pathlib.Path(__file__).parents[1] / "benchmarks" / "accelerator_check.py"
spec = importlib.util.spec_from_file_location("benchmark_accelerator_check", SCRIPT)
check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check)


def test_parity_measures_the_largest_difference_against_the_largest_logit(tmp_path):
    reference = np.zeros((2, 3, 5), "float32")
    reference[..., 1] = 10.0  # the top-1 everywhere; the largest logit
    ours = reference.copy()
    ours[0, 0, 4] = 10.5  # one position's top-1 moves
    ours[1, 2, 3] = -0.1
    np.save(tmp_path / "reference.npy", reference)
    np.save(tmp_path / "accelerator.npy", ours)
    result = check.parity(str(tmp_path), "bfloat16")
    assert result["positions"] == 6
    assert result["max_abs_difference"] == pytest.approx(10.5)
    assert result["max_difference_share"] == pytest.approx(1.05)
    assert result["top1_agreement"] == pytest.approx(5 / 6)
    assert not result["passed"]
    np.save(tmp_path / "accelerator.npy", reference + 0.05)
    assert check.parity(str(tmp_path), "float32")["passed"]  # 0.5% of the largest logit


def test_smoke_run_checks_parity_speed_and_host_traffic(tokenizer_proto, tmp_path):
    has_keras_hub = importlib.util.find_spec("keras_hub") is not None
    vocabulary = tmp_path / "vocabulary.spm"
    vocabulary.write_bytes(tokenizer_proto)
    output = tmp_path / "accelerator_check.json"
    backend = keras.config.backend()
    command = [sys.executable, str(SCRIPT), "--smoke", "--tokenizer", str(vocabulary)]
    command += ["--backend", backend, "--output", str(output)]
    command += [] if has_keras_hub else ["--no-peer"]
    run = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]

    results = json.loads(output.read_text())
    ours = results["gemma_keras"]
    assert results["backend"] == ours["backend"] == backend
    on_cpu = ours["platform"] == "cpu"
    assert ("no accelerator: CPU only" in run.stdout) == on_cpu
    parity = results["parity"]
    assert parity["passed"] and parity["positions"] == 32
    if on_cpu:  # the same float32 model on the same CPU, in two processes
        assert parity["max_abs_difference"] == 0
    assert ours["decode"]["batch_2"]["decode_tokens_per_second"] > 0
    batch = 2
    for name, traffic in ours["host_traffic"].items():
        assert traffic["passed"] and traffic["same_tokens_as_the_full_logits"], name
        assert traffic["batch"] == batch
    top_k = ours["host_traffic"]["top_k"]
    assert top_k["median_bytes_per_step"] == batch * 51 * 8  # 50 + 1 logits and ids
    assert top_k["median_bytes_per_step"] < top_k["full_logits_bytes_per_step"]
    remainder = ours["top_p_remainder"]  # the device's float32 sum, against float64
    assert remainder["passed"] and remainder["max_relative_error"] < remainder["allowed"] / 2
    greedy = ours["host_traffic"]["greedy"]
    expected = greedy["full_logits_bytes_per_step"] if on_cpu else batch * 4
    assert greedy["median_bytes_per_step"] == expected
    if has_keras_hub:
        assert results["keras_hub"]["decode"]["batch_2"]["decode_tokens_per_second"] > 0
        assert results["ratios_to_keras_hub"]["decode_batch_2"] > 0
        # The same float32 weights, greedy, on a CPU: the same tokens.
        assert results["same_greedy_tokens_as_keras_hub"] or not on_cpu
