"""Generation speed of gemma_keras against KerasHub, transformers and llama.cpp, in one run.

    gemma-keras bench --model embedded     # Gemma 3 270M GGUF: float32, int8, int4,
                                           # transformers and llama.cpp on the same file
    gemma-keras bench --model gemma_2b     # random-weight Gemma 1 2B: bfloat16, int8, int4
                                           # and KerasHub
    gemma-keras bench --model ./my_preset --quantize int8 --no-peer

(`python benchmarks/generate.py` in a source checkout takes the same options.)

Each engine and each of gemma_keras' rows (its float dtype, then each
`--quantize` mode) runs in its own subprocess on the backend of
`KERAS_BACKEND`, so peak RSS is per row and a 10 GB float32 2B model never
coexists with another. Decode speed is the extra time that `--new` tokens
cost over 1 token (so it excludes the prefill), prefill the time of one new
token after a `--prefill`-token prompt, both measured the same way for every
engine; llama.cpp runs at batch 1, greedy, with `--threads` threads.

Decoding reads every weight once per token, so speed is held to this
machine's memory bandwidth: the best rate at which a few kernels read a large
float32 matrix (`measure_bandwidth`), measured by the parent (before and after
the engines) and by each worker (around each repeat of its decode
measurement). The bytes an engine reads per step are those of its variables
as stored (an int8 weight 1 byte plus its scales, an int4 weight half a byte
plus scales and offsets; llama.cpp's tensor bytes in the GGUF). Results go
to `<results>/<model>-<backend>-<dtype>.json`.
"""

import argparse
import importlib
import importlib.util
import itertools
import json
import os
import resource
import signal
import subprocess
import sys
import time

import numpy as np

# Bytes per value of each variable dtype a model can hold.
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1, "uint8": 1}
QUANTIZATION_MODES = ("int8", "int4")
EMBEDDED_PRESET = "gemma3_270m_q4_k_m"
PEERS = {"gemma_2b": "keras_hub", "embedded": "transformers"}
# OpenBLAS' threads spin 2**28 cycles after a call before they sleep (0.1-0.2 s measured).
OPENBLAS_SPIN_SECONDS = 0.5
# ggml's instruction-set options and the /proc/cpuinfo flag each needs.
GGML_INSTRUCTION_SETS = {
    "AVX": "avx",
    "AVX2": "avx2",
    "FMA": "fma",
    "F16C": "f16c",
    "BMI2": "bmi2",
    "AVX_VNNI": "avx_vnni",
    "AVX512": "avx512f",
    "AVX512_VBMI": "avx512vbmi",
    "AVX512_VNNI": "avx512_vnni",
    "AVX512_BF16": "avx512_bf16",
}


def cpu_flags():
    """The instruction-set flags /proc/cpuinfo lists for this CPU (empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def llama_cpp_build_advice(flags=None):
    """How to build llama-cpp-python for this CPU: each instruction set named
    on where the CPU lists it and off elsewhere, AMX always off."""
    flags = cpu_flags() if flags is None else flags
    options = [
        f"-DGGML_{name}={'ON' if flag in flags else 'OFF'}"
        for name, flag in GGML_INSTRUCTION_SETS.items()
    ]
    options += ["-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"]
    return (
        "Build llama-cpp-python from source for this CPU, naming its instruction sets: "
        "-DGGML_NATIVE=ON compiles ggml's AMX kernels in whatever the GGML_AMX_* options say, "
        "and a process that uses AMX tiles without asking the kernel first dies with "
        "'illegal instruction', as does one built for a set this CPU lacks:\n"
        f'  CMAKE_ARGS="-DGGML_NATIVE=OFF {" ".join(options)} -DLLAMA_CURL=OFF" '
        "pip install --no-binary llama-cpp-python --no-cache-dir llama-cpp-python"
    )


LLAMA_CPP_ABSENT = "llama_cpp is not importable here, so the llama.cpp row is skipped. "


def timed(run):
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def measure_bandwidth(gigabytes=4.0, repeats=5):
    """GB/s reading a `gigabytes` float32 matrix once, by each kernel at hand: torch's sum,
    NumPy's (BLAS) matrix-vector product and XLA's (through JAX, where installed). The best
    of them is the decode speed limit of this machine. torch's `mv` is not one of them: it
    reads at about half the rate of the others on a 2-core Zen 4, which made every share
    measured without JAX look larger than it was."""
    import torch

    rows = max(1, int(gigabytes * 1e9 / 4 / 4096))
    matrix, vector = np.ones((rows, 4096), np.float32), np.ones(4096, np.float32)
    results = {"numpy": _best_rate(lambda: matrix @ vector, matrix.nbytes, repeats)}
    # Whatever ran on the cores while OpenBLAS' threads still spun (the next kernel here,
    # the decode timed next) ran at half speed or less.
    time.sleep(OPENBLAS_SPIN_SECONDS)
    results["torch"] = _best_rate(torch.from_numpy(matrix).sum, matrix.nbytes, repeats)
    del matrix
    try:
        import jax
        import jax.numpy as jnp
    except ImportError:
        return results
    matrix = jnp.ones((rows, 4096), jnp.float32)
    vector = jnp.ones((4096,), jnp.float32)
    product = jax.jit(lambda m, v: m @ v)
    results["xla"] = _best_rate(
        lambda: product(matrix, vector).block_until_ready(), rows * 4096 * 4, repeats
    )
    return results


def _best_rate(run, nbytes, repeats):
    run()
    return nbytes / min(timed(run) for _ in range(repeats)) / 1e9


def save_result(name, result, directory="benchmark_results"):
    """Writes `result` to `<directory>/<name>.json`."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"{name}.json")
    with open(path, "w") as file:
        json.dump(result, file, indent=2)
    print(f"  saved {path}")


def peak_rss_gb():
    """This process's peak resident memory. Linux's `ru_maxrss` keeps the parent's
    peak across `exec` (the parent's bandwidth probe would show in every worker);
    `VmHWM` belongs to the process's own memory map."""
    try:
        with open("/proc/self/status") as file:
            for line in file:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def float_dtype(args):
    """The dtype of the float row: `--dtype`, else bfloat16 for the 2B (the
    baseline its int8 and int4 rows are held to) and float32 for the others."""
    if args.dtype:
        return args.dtype
    return "bfloat16" if args.model == "gemma_2b" else "float32"


def gguf_path(model):
    """The GGUF file `--model` reads, or None: llama.cpp runs only on those. The
    embedded preset's is assembled (and its sha256 checked) by the PyPI package
    the registry names, since `resolve` prefers the preset converted from it."""
    from gemma_keras import registry, resolve

    if model == "gemma_2b":
        return None
    if model == "embedded":
        package = registry.get_preset(EMBEDDED_PRESET)["sources"]["pypi"]
        return str(importlib.import_module(package["module"]).assemble())
    path = str(resolve.resolve_preset(model))
    return path if path.endswith(".gguf") else None


# --------------------------------------------------------------------------- measurements


def read_bandwidth(gigabytes):
    """This machine's bandwidth now (GB/s): the best of `measure_bandwidth`'s kernels."""
    return max(measure_bandwidth(gigabytes=gigabytes, repeats=2).values())


def measure(generate_for, batch, new_tokens, bandwidth, repeats=3):
    """Times one engine the same way for every engine.

    `generate_for(new)` returns a function that generates `new` tokens per row.
    Decode speed is the extra time that `new_tokens` cost over 1 token, so it
    excludes the prefill; the time of 1 token is the time to first token. Each
    repeat times both back to back and gives its own decode time; the speeds
    reported are those of the fastest repeats. A repeat whose `new_tokens`
    took no longer than its 1 token measured the machine's other work, not
    decoding: it is dropped, and a run with no other repeat raises.

    Each repeat is bracketed by two `bandwidth()` readings (GB/s) and keeps
    its own decode speed beside their mean (`paired`): this machine's
    bandwidth moves by a third from minute to minute, so a decode speed is
    held to the bandwidth of the same seconds. The highest reading joins the
    run's best (`best_bandwidth_gb_per_s`).
    """
    many, one = generate_for(new_tokens), generate_for(1)
    first = timed(many)  # compiles
    one()  # a shorter budget may take a smaller cache bucket: compiled here too
    repeated, paired, readings = [], [], []
    for _ in range(repeats):
        before = bandwidth()
        seconds, first_token = timed(many), timed(one)
        after = bandwidth()
        repeated.append((seconds, first_token))
        readings += [before, after]
        if seconds > first_token:
            paired.append(
                {
                    "decode_steps_per_second": (new_tokens - 1) / (seconds - first_token),
                    "bandwidth_gb_per_s": (before + after) / 2,
                }
            )
    decode_seconds = [s - t for s, t in repeated if s > t]
    if not decode_seconds:
        timings = ", ".join(f"{s:.3f} s against {t:.3f} s" for s, t in repeated)
        raise RuntimeError(
            f"generating {new_tokens} tokens took no longer than 1 token in every repeat "
            f"({timings}): other work on this machine swamped the decode steps; run the "
            "benchmark again on an idle machine, or with more --new tokens."
        )
    seconds = min(s for s, _ in repeated)
    return {
        "first_call_seconds": first,
        "time_to_first_token_seconds": min(t for _, t in repeated),
        "end_to_end_tokens_per_second": batch * new_tokens / seconds,
        "decode_tokens_per_second": batch * (new_tokens - 1) / min(decode_seconds),
        "decode_steps_per_second": (new_tokens - 1) / min(decode_seconds),
        "paired": paired,
        "best_bandwidth_gb_per_s": max(readings),
    }


def measure_prefill(generate_one, length, repeats=3):
    """Prefill tokens/s of a `length`-token prompt: the fastest of `repeats` calls
    of `generate_one()` (one new token) after a first call that compiles."""
    generate_one()
    seconds = min(timed(generate_one) for _ in range(repeats))
    return {
        f"prefill_{length}_tokens_per_second": length / seconds,
        f"time_to_first_token_{length}_seconds": seconds,
    }


def random_prompts(rng, batch, length, vocabulary_size):
    """`<bos>` and random ids clear of the special tokens (and within a tiny vocabulary)."""
    high = min(20000, vocabulary_size)
    return [[2] + rng.integers(10, high, length - 1).tolist() for _ in range(batch)]


def measure_engine(args, result, generate_for, vocabulary_size, batches):
    """Decode at each of `batches` and prefill at batch 1, into `result`."""
    rng = np.random.default_rng(0)
    probe = lambda: read_bandwidth(args.probe_gb / 2)  # noqa: E731
    # The engine's own peak (loading, and generating at the largest batch),
    # taken before the bandwidth probes allocate their matrices.
    largest = random_prompts(rng, max(batches), args.prompt, vocabulary_size)
    generate_for(largest)(args.new)()
    result["peak_rss_gb"] = peak_rss_gb()
    for batch in batches:
        prompts = random_prompts(rng, batch, args.prompt, vocabulary_size)
        result[f"batch_{batch}"] = measure(
            generate_for(prompts), batch, args.new, probe, args.repeats
        )
    long_prompt = random_prompts(rng, 1, args.prefill, vocabulary_size)
    result.update(measure_prefill(generate_for(long_prompt)(1), args.prefill, args.repeats))
    return result


# --------------------------------------------------------------------------- workers


def load_ours(model, dtype, quantize=None):
    """gemma_keras' model for `--model`: a Gemma 1 2B with Keras' random
    initialisation, the embedded Gemma 3 270M GGUF, or a preset; with
    `quantize` ("int8" or "int4"), quantized.

    A quantized 2B is built in `dtype` (bfloat16 in `bench`) and quantized
    layer by layer, so no float32 copy of the whole model is ever made."""
    from gemma_keras import GemmaCausalLM, GemmaConfig

    if model == "gemma_2b":
        causal_lm = GemmaCausalLM.from_gemma_config(GemmaConfig.named("gemma_2b"), dtype=dtype)
        if quantize is not None:
            causal_lm.quantize(quantize)
        return causal_lm
    preset = EMBEDDED_PRESET if model == "embedded" else model
    return GemmaCausalLM.from_preset(preset, dtype=dtype, quantize=quantize)


def weight_bytes(model):
    """Bytes of a Keras model's variables as stored: what one decode step reads."""
    return sum(int(np.prod(v.shape)) * BYTES[v.dtype] for v in model.weights)


def worker_ours(args):
    start = time.perf_counter()
    model = load_ours(args.model, float_dtype(args), None if args.row == "float" else args.row)
    result = {
        "engine": "gemma_keras",
        "row": args.row,
        "load_seconds": time.perf_counter() - start,
        "load_peak_rss_gb": peak_rss_gb(),
        "weight_bytes": weight_bytes(model),
    }

    def generate_for(prompts):
        def new(count):
            def generate():
                outputs = model.generate(prompts, max_new_tokens=count)
                # A random prompt could end in <eos>; the timing would then be wrong.
                assert all(len(o) == len(p) + count for o, p in zip(outputs, prompts, strict=True))

            return generate

        return new

    return measure_engine(args, result, generate_for, model.config.vocabulary_size, args.batch)


def worker_keras_hub(args):
    import keras_hub

    from gemma_keras import GemmaConfig
    from gemma_keras.checkpoints.keras_hub import keras_hub_config

    config = GemmaConfig.named("gemma_2b")
    _, fields = keras_hub_config(config)
    backbone = keras_hub.models.GemmaBackbone(**fields, dtype=float_dtype(args))
    model = keras_hub.models.GemmaCausalLM(backbone=backbone, preprocessor=None)
    model.compile(sampler="greedy")
    result = {"engine": "keras_hub", "weight_bytes": weight_bytes(backbone)}

    def generate_for(prompts):
        def new(count):
            # KerasHub generates up to the padded length of its input.
            length = len(prompts[0])
            token_ids = np.zeros((len(prompts), length + count), "int32")
            token_ids[:, :length] = prompts
            padding_mask = (token_ids != 0).astype("int32")
            inputs = {"token_ids": token_ids, "padding_mask": padding_mask}
            return lambda: model.generate(inputs, stop_token_ids=None)

        return new

    return measure_engine(args, result, generate_for, config.vocabulary_size, args.batch)


def worker_transformers(args):
    import torch
    import transformers

    path = gguf_path(args.model)  # the very GGUF gemma_keras converts
    start = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path),
        gguf_file=os.path.basename(path),
        dtype=getattr(torch, float_dtype(args)),
    ).eval()
    result = {
        "engine": "transformers",
        "load_seconds": time.perf_counter() - start,
        "weight_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
    }

    def generate_for(prompts):
        ids = torch.tensor(prompts)

        def new(count):
            def generate():
                with torch.no_grad():
                    model.generate(ids, max_new_tokens=count, min_new_tokens=count, do_sample=False)

            return generate

        return new

    return measure_engine(args, result, generate_for, model.config.vocab_size, args.batch)


def worker_llama_cpp(args):
    """llama.cpp (through llama-cpp-python) on the same GGUF file: batch 1, greedy."""
    import llama_cpp

    path = gguf_path(args.model)
    start = time.perf_counter()
    llm = llama_cpp.Llama(
        model_path=path,
        n_ctx=max(args.prefill, args.prompt + args.new) + 16,
        n_batch=max(args.prefill, 512),  # the whole prompt in one batch, as ours
        n_threads=args.threads,
        n_threads_batch=args.threads,
        verbose=False,
    )
    result = {
        "engine": "llama_cpp",
        "gguf": path,
        "threads": args.threads,
        "load_seconds": time.perf_counter() - start,
        # Its tensors as stored (Q4_K, Q6_K, ... blocks with their scales).
        "weight_bytes": int(llama_cpp.llama_model_size(llm.model)),
    }

    def generate_for(prompts):
        (prompt,) = prompts

        def new(count):
            def generate():
                llm.reset()  # the prompt is evaluated anew, not found in the cache
                tokens = list(itertools.islice(llm.generate(prompt, temp=0.0), count))
                assert len(tokens) == count

            return generate

        return new

    return measure_engine(args, result, generate_for, llm.n_vocab(), [1])


WORKERS = {
    "ours": worker_ours,
    "keras_hub": worker_keras_hub,
    "transformers": worker_transformers,
    "llama_cpp": worker_llama_cpp,
}


# --------------------------------------------------------------------------- parent


def run_worker(name, args, row="float"):
    """One engine (for gemma_keras, one row) in a subprocess: its result dict."""
    import gemma_keras

    command = [sys.executable, "-m", "gemma_keras.benchmarking", "--worker", name, "--row", row]
    command += ["--model", args.model, "--prompt", str(args.prompt), "--new", str(args.new)]
    command += ["--prefill", str(args.prefill), "--repeats", str(args.repeats)]
    command += ["--probe-gb", str(args.probe_gb), "--threads", str(args.threads)]
    command += ["--batch", *map(str, args.batch)] + (["--dtype", args.dtype] if args.dtype else [])
    # The worker imports the very gemma_keras the parent runs (a checkout's src/ too).
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(gemma_keras.__file__)))
    path = os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))
    output = subprocess.run(
        command, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": path}
    )
    status = output.returncode
    if status != 0:
        died = (
            f"killed by {signal.Signals(-status).name}" if status < 0 else f"exit status {status}"
        )
        error = f"{died}: {output.stderr[-2000:]}"
        if name == "llama_cpp" and status == -signal.SIGILL:
            error += (
                "\nllama.cpp uses instructions this process may not. " + llama_cpp_build_advice()
            )
        return {"engine": name, "error": error}
    return json.loads(output.stdout.strip().splitlines()[-1])


def best_of(rounds):
    """One engine's rounds merged: each measurement from the round where it ran fastest."""
    finished = [result for result in rounds if "error" not in result]
    if not finished:
        return rounds[-1]
    best = dict(finished[0], rounds=len(finished))
    for result in finished[1:]:
        for key, value in result.items():
            if key.startswith("batch_") and (
                value["decode_tokens_per_second"] > best[key]["decode_tokens_per_second"]
            ):
                best[key] = value
            if key.startswith("prefill_") and value > best[key]:
                prefill = key.removeprefix("prefill_").removesuffix("_tokens_per_second")
                best[key] = value
                ttft = f"time_to_first_token_{prefill}_seconds"
                best[ttft] = result[ttft]
        best["peak_rss_gb"] = max(best["peak_rss_gb"], result["peak_rss_gb"])
    return best


def row_names(args):
    """`{engine key: (worker, row)}` of gemma_keras' rows: the float dtype, then each mode."""
    rows = {"ours": ("ours", "float")}
    rows.update({f"ours_{mode}": ("ours", mode) for mode in args.quantize})
    return rows


def label(key, engine, args):
    if key == "ours":
        return f"gemma_keras {float_dtype(args)}"
    if key.startswith("ours_"):
        return f"gemma_keras {key.removeprefix('ours_')}"
    return engine.get("engine", key)


def add_bandwidth_fractions(engine, bandwidth):
    """Each batch's share of the bandwidth limit: the bytes one decode step reads
    (every weight once, whatever the batch) over the run's best bandwidth, and the
    median over repeats of each against the bandwidth read around it."""
    gigabytes = engine["weight_bytes"] / 1e9
    for key, measured in engine.items():
        if not key.startswith("batch_"):
            continue
        measured["read_gb_per_s"] = measured["decode_steps_per_second"] * gigabytes
        measured["bandwidth_fraction"] = measured["read_gb_per_s"] / bandwidth
        fractions = [
            pair["decode_steps_per_second"] * gigabytes / pair["bandwidth_gb_per_s"]
            for pair in measured["paired"]
        ]
        measured["paired_bandwidth_fraction"] = float(np.median(fractions))


def add_ratios(ours, theirs, name, prefill):
    """Decode (per batch), end-to-end and prefill ratios of one of our rows to an engine."""
    ratios = {}
    for key, measured in ours.items():
        if key.startswith("batch_") and key in theirs:
            other = theirs[key]
            ratios[f"decode_{key}"] = (
                measured["decode_tokens_per_second"] / other["decode_tokens_per_second"]
            )
            ratios[f"end_to_end_{key}"] = (
                measured["end_to_end_tokens_per_second"] / other["end_to_end_tokens_per_second"]
            )
    speed = f"prefill_{prefill}_tokens_per_second"
    if speed in ours and speed in theirs:
        ratios[f"prefill_{prefill}"] = ours[speed] / theirs[speed]
    ours[f"ratios_to_{name}"] = ratios
    return ratios


def print_table(results, args):
    speed = f"prefill_{args.prefill}_tokens_per_second"
    print(
        f"  {'engine':26} {'weights GB':>10} {'batch':>5} {'decode tok/s':>12} "
        f"{'read GB/s':>9} {'paired':>6} {'of best':>7} {'end to end':>10} "
        f"{f'prefill {args.prefill}':>11} {'RSS GB':>6}"
    )
    for key, engine in results["engines"].items():
        name = label(key, engine, args)
        if "error" in engine or "skipped" in engine:
            continue
        for batch_key in sorted(
            (k for k in engine if k.startswith("batch_")), key=lambda k: int(k[6:])
        ):
            measured = engine[batch_key]
            prefill = f"{engine[speed]:.0f}" if speed in engine and batch_key == "batch_1" else ""
            print(
                f"  {name:26} {engine['weight_bytes'] / 1e9:10.3f} {batch_key[6:]:>5} "
                f"{measured['decode_tokens_per_second']:12.2f} {measured['read_gb_per_s']:9.1f} "
                f"{measured['paired_bandwidth_fraction']:6.0%} "
                f"{measured['bandwidth_fraction']:7.0%} "
                f"{measured['end_to_end_tokens_per_second']:10.2f} {prefill:>11} "
                f"{engine['peak_rss_gb']:6.2f}"
            )


def report(args):
    """Runs every engine of `args.model`, prints the table and the ratios, saves the JSON."""
    import keras

    dtype = float_dtype(args)
    bandwidths = measure_bandwidth(args.probe_gb)
    results = {
        "model": args.model,
        "backend": keras.config.backend(),
        "dtype": dtype,
        "quantize": list(args.quantize),
        "prompt_tokens": args.prompt,
        "new_tokens": args.new,
        "prefill_tokens": args.prefill,
        "bandwidth_by_kernel": bandwidths,
        "engines": {},
    }
    engines = row_names(args)
    skipped = {}
    if not args.no_peer:
        if args.model in PEERS:
            engines[PEERS[args.model]] = (PEERS[args.model], "float")
        if gguf_path(args.model) is not None:
            if importlib.util.find_spec("llama_cpp") is None:
                message = LLAMA_CPP_ABSENT + llama_cpp_build_advice()
                skipped["llama_cpp"] = {"engine": "llama_cpp", "skipped": message}
            else:
                engines["llama_cpp"] = ("llama_cpp", "float")
    # Engines take turns, so a slow minute of the machine (its bandwidth moves
    # by a third between minutes) falls on all of them rather than on one.
    rounds = {key: [] for key in engines}
    for _ in range(args.rounds):
        for key, (worker, row) in engines.items():
            rounds[key].append(run_worker(worker, args, row))
    results["engines"] = {key: best_of(rounds[key]) for key in engines} | skipped
    # Measured again after the engines ran: the highest reading of the run,
    # the engines' own included, is the run's limit.
    for kernel, rate in measure_bandwidth(args.probe_gb).items():
        bandwidths[kernel] = max(bandwidths[kernel], rate)
    readings = [
        measured["best_bandwidth_gb_per_s"]
        for engine in results["engines"].values()
        for key, measured in engine.items()
        if key.startswith("batch_")
    ]
    bandwidth = results["bandwidth_gb_per_s"] = max(*bandwidths.values(), *readings)
    finished = {k: e for k, e in results["engines"].items() if "weight_bytes" in e}
    for engine in finished.values():
        add_bandwidth_fractions(engine, bandwidth)

    print(
        f"{args.model} on {results['backend']}, bandwidth {bandwidth:.1f} GB/s (the run's best; "
        f"{', '.join(f'{k} {v:.1f}' for k, v in bandwidths.items())}); prompt {args.prompt} "
        f"+ {args.new} new tokens; 'paired': decode against the bandwidth read around each repeat "
        "(median), 'of best': against the run's best"
    )
    print_table(results, args)
    others = [key for key in finished if not key.startswith("ours")]
    for key in (k for k in finished if k.startswith("ours")):
        for other in others:
            ratios = add_ratios(finished[key], finished[other], other, args.prefill)
            print(
                f"  {label(key, finished[key], args)} / {other}: "
                + ", ".join(f"{name} {ratio:.2f}x" for name, ratio in ratios.items())
            )
    for key, engine in results["engines"].items():
        if "error" in engine:
            print(f"  {label(key, engine, args)} failed: {engine['error'][-1000:]}")
        if "skipped" in engine:
            print(f"  {engine['skipped']}")
    name = os.path.basename(os.path.normpath(args.model)).removesuffix(".gguf")
    save_result(f"{name}-{results['backend']}-{dtype}", results, args.results)
    return results


def quantization_modes(text):
    """`--quantize`'s value: comma-separated modes, or "none"."""
    if text.strip().lower() == "none":
        return []
    modes = [mode.strip() for mode in text.split(",") if mode.strip()]
    unknown = [mode for mode in modes if mode not in QUANTIZATION_MODES]
    if unknown or not modes:
        raise argparse.ArgumentTypeError(
            f"--quantize takes modes from {', '.join(QUANTIZATION_MODES)} separated by commas, "
            f"or none; got {text!r}"
        )
    return modes


def add_arguments(parser, default_model="all", default_results="benchmark_results"):
    """The benchmark's options, shared by `gemma-keras bench` and `benchmarks/generate.py`."""
    parser.add_argument(
        "--model",
        default=default_model,
        help="gemma_2b (random weights), embedded (the Gemma 3 270M GGUF), all (both), "
        f"or a preset name or path (default {default_model})",
    )
    parser.add_argument(
        "--dtype", help="the float row's dtype (default: bfloat16 for gemma_2b, else float32)"
    )
    parser.add_argument(
        "--quantize",
        type=quantization_modes,
        default=list(QUANTIZATION_MODES),
        help="gemma_keras' quantized rows beside the float one: int8,int4 (default), int8, "
        "int4 or none",
    )
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens (default 32)")
    parser.add_argument("--new", type=int, default=32, help="new tokens (default 32)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument(
        "--prefill", type=int, default=512, help="prompt tokens of the prefill timing"
    )
    parser.add_argument("--threads", type=int, default=2, help="llama.cpp's threads (default 2)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per measurement")
    parser.add_argument(
        "--probe-gb",
        type=float,
        default=4.0,
        help="size of the bandwidth probe's matrix in GB (workers use half; default 4)",
    )
    parser.add_argument("--no-peer", action="store_true", help="measure gemma_keras only")
    parser.add_argument(
        "--rounds", type=int, default=1, help="engines take turns this many times; best kept"
    )
    parser.add_argument(
        "--results",
        default=default_results,
        help=f"directory for the JSON results (default {default_results})",
    )


def run(args):
    """Runs the benchmark for `args` (from `add_arguments`); `--model all` runs both models."""
    for name in ("new", "prompt", "prefill"):
        value = getattr(args, name)
        if value < 2:
            raise ValueError(f"--{name} must be at least 2, got {value}.")
    models = ["gemma_2b", "embedded"] if args.model == "all" else [args.model]
    return [report(argparse.Namespace(**{**vars(args), "model": model})) for model in models]


def main(argv=None, default_model="all", default_results="benchmark_results"):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser, default_model, default_results)
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--row", default="float", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(WORKERS[args.worker](args)))
        return
    run(args)


if __name__ == "__main__":
    main()
