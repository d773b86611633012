"""The benchmark's bookkeeping (the timings themselves live in benchmarks/, not in tests)."""

import importlib.util
import json
import pathlib
import types

SCRIPT = pathlib.Path(__file__).parents[1] / "benchmarks" / "generate.py"
spec = importlib.util.spec_from_file_location("benchmark_generate", SCRIPT)
benchmark = importlib.util.module_from_spec(spec)
spec.loader.exec_module(benchmark)


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
    def run_worker(name, args):
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

    monkeypatch.setattr(benchmark, "measure_bandwidth", lambda: {"torch": 10.0, "xla": 20.0})
    monkeypatch.setattr(benchmark, "run_worker", run_worker)
    monkeypatch.setattr(benchmark, "RESULTS", str(tmp_path))
    args = types.SimpleNamespace(
        model="gemma_2b", dtype="float32", prompt=32, new=32, batch=[1, 8], no_peer=True, rounds=1
    )
    benchmark.report(args)
    (path,) = tmp_path.glob("gemma_2b-*-float32.json")
    results = json.loads(path.read_text())
    assert results["bandwidth_gb_per_s"] == 40.0  # an engine's window was the run's best
    batch_1 = results["engines"]["ours"]["batch_1"]
    assert abs(batch_1["paired_bandwidth_fraction"] - 0.8) < 1e-9  # the median of 0.8, 0.8, 0.6
    assert batch_1["bandwidth_fraction"] == 10.0 / 40.0
