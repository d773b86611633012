"""The benchmark's bookkeeping, and smoke runs of it on tiny models (the timings
themselves are `gemma-keras bench`'s, not the tests')."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import types

import keras
import pytest

from conftest import randomize, tiny_config
from gemma_keras import GemmaCausalLM, GemmaTokenizer
from gemma_keras import benchmarking as benchmark
from gemma_keras.checkpoints.weight_mapping import assign_weights, model_shapes

SCRIPT = pathlib.Path(__file__).parents[1] / "benchmarks" / "generate.py"
# Small enough that a smoke run takes seconds (a 20 MB bandwidth probe, short prompts), and
# 8 new tokens in 2 repeats, so that a busy machine's jitter does not swamp the decode steps.
SMOKE = ["--prompt", "4", "--new", "8", "--prefill", "16", "--repeats", "2", "--probe-gb", "0.02"]


def engine_round(batch_1, batch_8, prefill, rss):
    return {
        "engine": "ours",
        "weight_bytes": 100,
        "batch_1": {"decode_tokens_per_second": batch_1},
        "batch_8": {"decode_tokens_per_second": batch_8},
        "prefill_512_tokens_per_second": prefill,
        "time_to_first_token_512_seconds": 512 / prefill,
        "peak_rss_gb": rss,
    }


def test_best_of_takes_each_measurement_from_its_fastest_round():
    best = benchmark.best_of([engine_round(10, 50, 300, 4.0), engine_round(12, 40, 350, 4.5)])
    assert best["batch_1"]["decode_tokens_per_second"] == 12
    assert best["batch_8"]["decode_tokens_per_second"] == 50
    assert best["prefill_512_tokens_per_second"] == 350
    assert best["time_to_first_token_512_seconds"] == 512 / 350
    assert best["peak_rss_gb"] == 4.5
    assert best["rounds"] == 2


def test_best_of_skips_failed_rounds_and_reports_a_failure_when_all_failed():
    failed = {"engine": "ours", "error": "MemoryError"}
    best = benchmark.best_of([failed, engine_round(10, 50, 300, 4.0)])
    assert best["rounds"] == 1 and best["batch_1"]["decode_tokens_per_second"] == 10
    assert benchmark.best_of([failed, failed]) == failed


def test_measure_counts_decode_as_the_extra_time_over_one_token_beside_the_bandwidth_around_it(
    monkeypatch,
):
    clock = {"now": 0.0, "calls": 0}
    # Prefill + first token 0.5 s, then 0.2 s per token; the second of three
    # repeats runs 0.1 s per token.
    seconds_for = {1: 0.5, 9: 2.1}

    def generate_for(count):
        def generate():
            clock["calls"] += 1
            fast = count == 9 and clock["calls"] == 5  # compile, 1 token, repeat 1 (2 calls)
            clock["now"] += 1.3 if fast else seconds_for[count]

        return generate

    readings = iter([10.0, 12.0, 20.0, 30.0, 11.0, 9.0])
    monkeypatch.setattr(benchmark, "time", types.SimpleNamespace(perf_counter=lambda: clock["now"]))
    result = benchmark.measure(
        generate_for, batch=2, new_tokens=9, bandwidth=lambda: next(readings)
    )
    assert abs(result["decode_steps_per_second"] - 10.0) < 1e-9  # the fastest repeat
    assert abs(result["decode_tokens_per_second"] - 20.0) < 1e-9
    assert abs(result["time_to_first_token_seconds"] - 0.5) < 1e-9
    assert [round(p["decode_steps_per_second"], 9) for p in result["paired"]] == [5.0, 10.0, 5.0]
    assert [p["bandwidth_gb_per_s"] for p in result["paired"]] == [11.0, 25.0, 10.0]
    assert result["best_bandwidth_gb_per_s"] == 30.0


def fake_clock_generation(monkeypatch, seconds):
    """`generate_for(count)` whose calls take `seconds[call number]` on a
    fake clock (call 0 compiles the long run, call 1 the one-token run)."""
    clock = {"now": 0.0, "calls": 0}

    def generate_for(count):
        def generate():
            clock["now"] += seconds[clock["calls"]]
            clock["calls"] += 1

        return generate

    monkeypatch.setattr(benchmark, "time", types.SimpleNamespace(perf_counter=lambda: clock["now"]))
    return generate_for


def test_measure_drops_a_repeat_whose_one_token_took_longer_than_the_whole_run(monkeypatch):
    # Repeats (9 tokens, 1 token): (2.1, 0.5), (1.0, 1.2) swamped by other work, (2.5, 0.9).
    seconds = [3.0, 0.6, 2.1, 0.5, 1.0, 1.2, 2.5, 0.9]
    result = benchmark.measure(
        fake_clock_generation(monkeypatch, seconds), batch=1, new_tokens=9, bandwidth=lambda: 20.0
    )
    assert abs(result["decode_steps_per_second"] - 8 / 1.6) < 1e-9  # repeats 1 and 3 both 1.6 s
    assert len(result["paired"]) == 2
    assert all(p["decode_steps_per_second"] > 0 for p in result["paired"])


def test_measure_refuses_a_machine_too_busy_to_time_decoding(monkeypatch):
    seconds = [3.0, 0.6, 1.0, 1.2, 0.8, 0.8]
    generate_for = fake_clock_generation(monkeypatch, seconds)
    with pytest.raises(RuntimeError, match="no longer than 1 token in every repeat.*idle machine"):
        benchmark.measure(generate_for, batch=1, new_tokens=9, bandwidth=lambda: 20.0, repeats=2)


PROFILE = pathlib.Path(__file__).parents[1] / "benchmarks" / "profile_decode.py"
profile_spec = importlib.util.spec_from_file_location("benchmark_profile_decode", PROFILE)
profile = importlib.util.module_from_spec(profile_spec)
profile_spec.loader.exec_module(profile)


def test_profile_counts_an_operation_split_over_threads_once():
    # Two threads run halves of one operation at once, then one runs it alone.
    assert profile.union_length([(0, 10), (2, 9), (20, 25)]) == 15
    assert profile.union_length([(5, 8), (0, 6)]) == 8
    assert profile.union_length([]) == 0


def test_profile_recognises_weight_products_by_operation_name():
    assert profile.is_weight_product("torch", "mkldnn::_linear_pointwise")
    assert not profile.is_weight_product("torch", "aten::bmm")  # attention, not a weight
    assert profile.is_weight_product("jax", "dot")
    assert profile.is_weight_product("jax", "copy_dot_fusion")
    assert profile.is_weight_product("jax", "ynn_fusion")
    assert not profile.is_weight_product("jax", "wrapped_ynn_copy")
    assert not profile.is_weight_product("jax", "wrapped_convert")
    assert not profile.is_weight_product("jax", "dynamic-update-slice")


def test_report_holds_decode_to_the_same_seconds_and_to_the_runs_best_bandwidth(
    monkeypatch, tmp_path
):
    def run_worker(name, args, row):
        result = engine_round(2.0, 8.0, 100, 4.0)
        result["weight_bytes"] = 5e9  # 2 steps/s read 10 GB/s
        result["engine"] = name
        for key, best in (("batch_1", 12.5), ("batch_8", 40.0)):
            result[key].update(
                decode_steps_per_second=2.0,
                end_to_end_tokens_per_second=1.0,
                first_call_seconds=1.0,
                best_bandwidth_gb_per_s=best,
                # Repeats reading 10, 8 and 6 GB/s beside 12.5, 10 and 10 GB/s.
                paired=[
                    {"decode_steps_per_second": steps, "bandwidth_gb_per_s": around}
                    for steps, around in ((2.0, 12.5), (1.6, 10.0), (1.2, 10.0))
                ],
            )
        return result

    monkeypatch.setattr(benchmark, "measure_bandwidth", lambda _: {"torch": 10.0, "xla": 20.0})
    monkeypatch.setattr(benchmark, "run_worker", run_worker)
    args = types.SimpleNamespace(
        model="gemma_2b",
        dtype="float32",
        quantize=[],
        prompt=32,
        new=32,
        prefill=512,
        batch=[1, 8],
        probe_gb=4.0,
        no_peer=True,
        rounds=1,
        results=str(tmp_path),
    )
    benchmark.report(args)
    (path,) = tmp_path.glob("gemma_2b-*-float32.json")
    results = json.loads(path.read_text())
    assert results["bandwidth_gb_per_s"] == 40.0  # an engine's window was the run's best
    batch_1 = results["engines"]["ours"]["batch_1"]
    assert abs(batch_1["paired_bandwidth_fraction"] - 0.8) < 1e-9  # the median of 0.8, 0.8, 0.6
    assert batch_1["bandwidth_fraction"] == 10.0 / 40.0


def test_quantize_option_takes_modes_separated_by_commas_or_none():
    assert benchmark.quantization_modes("int8,int4") == ["int8", "int4"]
    assert benchmark.quantization_modes(" int4 ") == ["int4"]
    assert benchmark.quantization_modes("none") == []
    with pytest.raises(Exception, match="--quantize takes modes from int8, int4"):
        benchmark.quantization_modes("int8,fp8")


def test_ratios_of_a_row_to_another_engine_per_batch_and_for_prefill():
    ours = {
        "batch_1": {"decode_tokens_per_second": 60.0, "end_to_end_tokens_per_second": 30.0},
        "batch_8": {"decode_tokens_per_second": 200.0, "end_to_end_tokens_per_second": 100.0},
        "prefill_512_tokens_per_second": 900.0,
    }
    llama = {
        "batch_1": {"decode_tokens_per_second": 50.0, "end_to_end_tokens_per_second": 40.0},
        "prefill_512_tokens_per_second": 600.0,
    }
    ratios = benchmark.add_ratios(ours, llama, "llama_cpp", 512)
    assert ratios == {"decode_batch_1": 1.2, "end_to_end_batch_1": 0.75, "prefill_512": 1.5}
    assert ours["ratios_to_llama_cpp"] is ratios


def test_report_runs_each_row_and_skips_llama_cpp_with_how_to_build_it(
    monkeypatch, tmp_path, capsys
):
    # `import llama_cpp` fails as where it is not installed.
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    ran = []

    def run_worker(name, args, row):
        ran.append((name, row))
        result = engine_round(10.0, 40.0, 300, 1.0)
        result["engine"] = name
        for key in ("batch_1", "batch_8"):
            result[key].update(
                decode_steps_per_second=10.0,
                end_to_end_tokens_per_second=5.0,
                best_bandwidth_gb_per_s=20.0,
                paired=[{"decode_steps_per_second": 10.0, "bandwidth_gb_per_s": 20.0}],
            )
        return result

    monkeypatch.setattr(benchmark, "measure_bandwidth", lambda _: {"torch": 20.0})
    monkeypatch.setattr(benchmark, "run_worker", run_worker)
    args = benchmark.argparse.Namespace(
        model="embedded",
        dtype=None,
        quantize=["int8", "int4"],
        prompt=32,
        new=32,
        prefill=512,
        batch=[1, 8],
        probe_gb=4.0,
        no_peer=False,
        rounds=1,
        results=str(tmp_path),
    )
    benchmark.report(args)
    assert ran == [("ours", "float"), ("ours", "int8"), ("ours", "int4"), ("transformers", "float")]
    printed = capsys.readouterr().out
    assert "GGML_AMX_TILE=OFF" in printed and "llama_cpp is not importable" in printed
    (path,) = tmp_path.glob("embedded-*-float32.json")
    engines = json.loads(path.read_text())["engines"]
    assert "CMAKE_ARGS" in engines["llama_cpp"]["skipped"]
    assert set(engines) == {"ours", "ours_int8", "ours_int4", "transformers", "llama_cpp"}
    assert engines["ours_int4"]["ratios_to_transformers"]["decode_batch_1"] == 1.0


def test_llama_cpp_build_names_the_instruction_sets_this_cpu_lists():
    """A Zen 4 lists AVX-512 VNNI but not the VEX-encoded AVX-VNNI, and a
    llama.cpp built with `GGML_AVX_VNNI=ON` dies there with SIGILL."""
    zen4 = {"avx", "avx2", "fma", "f16c", "bmi2", "avx512f", "avx512_vnni", "avx512_bf16"}
    advice = benchmark.llama_cpp_build_advice(zen4)
    assert "-DGGML_AVX_VNNI=OFF" in advice and "-DGGML_AVX512_VNNI=ON" in advice
    assert "-DGGML_AVX512_VBMI=OFF" in advice and "-DGGML_AMX_INT8=OFF" in advice
    intel = benchmark.llama_cpp_build_advice(zen4 | {"avx_vnni", "amx_int8", "amx_tile"})
    assert "-DGGML_AVX_VNNI=ON" in intel and "-DGGML_AMX_INT8=OFF" in intel
    assert "-DGGML_AVX2=OFF" in benchmark.llama_cpp_build_advice(set())


@pytest.fixture(scope="module")
def tiny_preset(tmp_path_factory, tokenizer_proto):
    """A tiny Gemma 3 preset whose `<eos>` never wins: a smoke run generates every token."""
    tokenizer = GemmaTokenizer(tokenizer_proto)
    config = tiny_config("gemma3")
    config.vocabulary_size = tokenizer.vocabulary_size
    model = GemmaCausalLM.from_gemma_config(config, dtype="float32")
    weights = {k: 3 * v for k, v in randomize(model_shapes(model)).items()}
    # A zero row gives <eos> the logit 0, below the largest of the others' random logits.
    weights["token_embedding/embeddings"][tokenizer.eos_id] = 0
    assign_weights(model, weights)
    model.tokenizer = tokenizer
    directory = tmp_path_factory.mktemp("bench") / "preset"
    model.save_to_preset(str(directory))
    return directory


def stored_bytes(model):
    """The bytes of a model's variables as NumPy holds them (independent of `BYTES`)."""
    return sum(keras.ops.convert_to_numpy(v.value).nbytes for v in model.weights)


def test_bench_command_measures_the_float_int8_and_int4_rows(tiny_preset, tmp_path):
    env = {**os.environ, "KERAS_BACKEND": keras.config.backend(), "TF_CPP_MIN_LOG_LEVEL": "3"}
    command = [sys.executable, "-m", "gemma_keras", "bench", "--model", str(tiny_preset)]
    command += ["--quantize", "int8,int4", "--no-peer", "--batch", "1", "--results", str(tmp_path)]
    result = subprocess.run(
        command + SMOKE, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert "gemma_keras int4" in result.stdout
    (path,) = tmp_path.glob("preset-*-float32.json")
    saved = json.loads(path.read_text())
    assert saved["quantize"] == ["int8", "int4"]
    engines = saved["engines"]
    assert set(engines) == {"ours", "ours_int8", "ours_int4"}
    for key, mode in (("ours", None), ("ours_int8", "int8"), ("ours_int4", "int4")):
        engine = engines[key]
        assert "error" not in engine, engine.get("error")
        assert engine["batch_1"]["decode_tokens_per_second"] > 0
        assert engine["prefill_16_tokens_per_second"] > 0
        expected = stored_bytes(GemmaCausalLM.from_preset(str(tiny_preset), quantize=mode))
        assert engine["weight_bytes"] == expected
    assert engines["ours_int4"]["weight_bytes"] < engines["ours_int8"]["weight_bytes"]
    assert engines["ours_int8"]["weight_bytes"] < engines["ours"]["weight_bytes"]


def test_bench_rejects_an_unknown_quantization_mode_in_one_line():
    result = subprocess.run(
        [sys.executable, "-m", "gemma_keras", "bench", "--quantize", "int3"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "--quantize takes modes from int8, int4" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_script_is_the_packages_benchmark():
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "--quantize" in result.stdout and "benchmarks/results" in result.stdout


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama_cpp absent")
def test_llama_cpp_row_on_the_embedded_gguf():
    parser = benchmark.argparse.ArgumentParser()
    benchmark.add_arguments(parser)
    args = parser.parse_args(["--model", "embedded", "--batch", "1", *SMOKE])
    measured = benchmark.run_worker("llama_cpp", args)  # in its own process, as in a run
    assert "error" not in measured, measured["error"]
    assert measured["engine"] == "llama_cpp" and measured["threads"] == 2
    assert measured["batch_1"]["decode_tokens_per_second"] > 0
    assert measured["prefill_16_tokens_per_second"] > 0
    # Its Q4_K_M tensors: most of the 253 MB file (the rest is the vocabulary's metadata).
    assert 150e6 < measured["weight_bytes"] < os.path.getsize(measured["gguf"])
