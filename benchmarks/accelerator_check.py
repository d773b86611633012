"""Accelerator check: logits parity, decode speed against KerasHub, and what a
decode step copies to the host, on whatever accelerator this backend finds.

    python benchmarks/accelerator_check.py                   # KERAS_BACKEND, the embedded 270M
    python benchmarks/accelerator_check.py --backend torch --dtype bfloat16
    python benchmarks/accelerator_check.py --smoke --tokenizer vocabulary.spm   # tiny, random

One backend per run (`--backend`, else KERAS_BACKEND, else jax); the
accelerator is the backend's own: JAX's `jax.devices()` GPU or TPU, torch's
CUDA device, TensorFlow's GPU. With none, everything runs on the CPU and the
report says "no accelerator: CPU only". Three processes run in turn:
gemma_keras (its logits, speed and host traffic), the float32 reference on
the CPU, and KerasHub (`--no-peer` leaves it out). They check:

1. Logits parity: the model's logits on the accelerator (in `--dtype`)
   against float32 on the CPU (a process with the accelerators hidden), over
   two rows of real text (random ids with `--smoke`): the largest absolute
   difference, as a share of the largest logit, and top-1 agreement, held to
   `TOLERANCES`.
2. Decode speed: greedy tokens/s at each `--batch` (32-token prompts, 32 new
   tokens; decode is the time the new tokens cost over 1 token, as in
   `gemma-keras bench`) for gemma_keras and for KerasHub's Gemma3CausalLM,
   which loads the preset gemma_keras' `save_to_preset` wrote (the same
   weights), on the same device.
3. Host traffic: the bytes each decode step copies to the host for greedy,
   top-k and top-p sampling (`StepResult.host_bytes`), beside the full
   logits' bytes, and whether the tokens equal those of sampling the full
   logits. On a GPU or TPU greedy copies 4 bytes a row; on a CPU the host
   reads a greedy step's logits in place (`dispatch.choose_reduction`).
   Beside it, the error of the device's float32 top-p remainder against
   float64, which must stay under `samplers.REMAINDER_ERROR`.

It prints a table and writes `benchmarks/results/accelerator_check-<model>-
<backend>-<platform>.json` (or `--output`).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
# A source checkout runs without installing: its src/ comes first.
SOURCE = os.path.join(os.path.dirname(HERE), "src")
sys.path.insert(0, SOURCE)
sys.path.insert(0, HERE)

from train_step import SMOKE_SIZES, cpu_name, write_results  # noqa: E402

EMBEDDED = "gemma3_270m_q4_k_m"
RESULTS = os.path.join(HERE, "results")
# Parity of the accelerator's logits with float32 on the CPU: the largest
# absolute difference as a share of the largest absolute logit, and the least
# top-1 agreement. float32 allows TF32 matrix units (a 10-bit mantissa), which
# JAX and TensorFlow use for float32 products on recent NVIDIA GPUs by default;
# bfloat16 rounds every activation to an 8-bit mantissa.
TOLERANCES = {
    "float32": {"max_difference_share": 0.02, "top1_agreement": 0.99},
    "bfloat16": {"max_difference_share": 0.1, "top1_agreement": 0.9},
    "float16": {"max_difference_share": 0.1, "top1_agreement": 0.9},
}
PARITY_TEXTS = [
    "The capital of France is Paris, a city on the Seine known for its museums, its cafes "
    "and the tower that Gustave Eiffel built for the world's fair of 1889.",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + "
    "fibonacci(n - 2)\n\nprint([fibonacci(i) for i in range(10)])",
]
SAMPLERS = {"greedy": {"temperature": 0}, "top_k": {"top_k": 50}, "top_p": {"top_p": 0.9}}
# Prompts of the host traffic check: how wide a top-p nucleus is depends on
# the text (a random prompt's next tokens are all about as likely).
TRAFFIC_TEXTS = [
    "The capital of France is",
    "Once upon a time, in a small village,",
    "def fibonacci(n):",
    "The best way to learn a new language is",
    "In 1492, Columbus",
    "My favourite recipe for soup",
    "Quantum computers differ from classical ones because",
    "The weather today is",
]


# --------------------------------------------------------------------------- devices


def accelerator():
    """`(platform, description)` of the running backend's accelerator, or
    `("cpu", ...)` where it has none."""
    import keras

    backend = keras.config.backend()
    if backend == "jax":
        import jax

        device = jax.devices()[0]
        if device.platform in ("gpu", "tpu"):
            return device.platform, f"{device.device_kind} x{len(jax.devices())}"
    elif backend == "torch":
        import torch

        if torch.cuda.is_available():
            return "gpu", f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
    else:
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        if gpus:
            details = tf.config.experimental.get_device_details(gpus[0])
            return "gpu", f"{details.get('device_name', 'GPU')} x{len(gpus)}"
    return "cpu", cpu_name()


# --------------------------------------------------------------------------- workers


def load_gemma_keras(args, dtype):
    """The embedded 270M, or with --smoke the preset `write_smoke_preset` wrote."""
    from gemma_keras import GemmaCausalLM

    return GemmaCausalLM.from_preset(args.preset if args.smoke else EMBEDDED, dtype=dtype)


def parity_inputs(args, tokenizer, vocabulary_size):
    """Two rows of token ids (real text; random ids with --smoke), one length."""
    if args.smoke:
        rng = np.random.default_rng(0)
        token_ids = rng.integers(10, vocabulary_size, size=(2, 16)).astype("int32")
        token_ids[:, 0] = 2  # <bos>
    else:
        rows = [tokenizer.encode(text) for text in PARITY_TEXTS]
        length = min(map(len, rows))
        token_ids = np.array([row[:length] for row in rows], "int32")
    return {"token_ids": token_ids, "padding_mask": np.ones_like(token_ids)}


def save_logits(model, args, name):
    """Writes the parity inputs' logits to `<workdir>/<name>.npy`; returns them
    as they are, on the device."""
    import keras

    inputs = parity_inputs(args, model.tokenizer, model.config.vocabulary_size)
    logits = model(inputs)
    host = keras.ops.convert_to_numpy(keras.ops.cast(logits, "float32"))
    np.save(os.path.join(args.workdir, f"{name}.npy"), host)
    return logits


def remainder_error(logits, temperatures=(1.0, 0.7)):
    """The largest relative error of the device's float32 top-p remainder (the
    sum of exp(logit / temperature) at or below the least candidate), against
    float64 on the host, over the parity logits: what
    `samplers.REMAINDER_ERROR` must exceed for top-p to stay exact."""
    import keras

    from gemma_keras.generation import compiled_reduction
    from gemma_keras.samplers import CANDIDATES, REMAINDER_ERROR, Reduction

    width = logits.shape[-1]
    rows = keras.ops.reshape(logits, (-1, width))
    host = keras.ops.convert_to_numpy(keras.ops.cast(rows, "float32")).astype(np.float64)
    largest = 0.0
    for temperature in temperatures:
        reduction = Reduction("top", min(CANDIDATES, width // 4), temperature)
        values, _, remainder = compiled_reduction(reduction, width)(rows)
        least = keras.ops.convert_to_numpy(values).min(axis=-1, keepdims=True)
        scaled = np.where(host <= least, host / temperature, -np.inf)
        shift = scaled.max(axis=-1, keepdims=True)
        exact = np.log(np.exp(scaled - shift).sum(axis=-1)) + shift[:, 0]
        measured = keras.ops.convert_to_numpy(remainder).astype(np.float64)
        largest = max(largest, float(np.abs(np.expm1(measured - exact)).max()))
    return {"max_relative_error": largest, "allowed": REMAINDER_ERROR}


def write_smoke_preset(args):
    """--smoke: a tiny random Gemma 3 written as a preset, which the workers
    load. Its `<eos>` row is zero, so that no timing stops early."""
    import dataclasses

    import keras

    from gemma_keras import GemmaCausalLM, GemmaConfig, GemmaTokenizer
    from gemma_keras.config import every_nth_global

    tokenizer = GemmaTokenizer(args.tokenizer)
    config = dataclasses.replace(
        GemmaConfig.named("gemma3_270m"),
        vocabulary_size=tokenizer.vocabulary_size,
        layer_types=every_nth_global(SMOKE_SIZES["num_layers"]),
        **SMOKE_SIZES,
    )
    model = GemmaCausalLM.from_gemma_config(config, dtype="float32")
    embeddings = model.backbone.token_embedding.embeddings
    rows = np.array(keras.ops.convert_to_numpy(embeddings))
    rows[tokenizer.eos_id] = 0  # its logit 0, below the largest of the others
    embeddings.assign(rows)
    model.tokenizer = tokenizer
    model.save_to_preset(args.preset)


def worker_reference(args):
    """float32 logits on the CPU (the parent hides the accelerators)."""
    where = accelerator()[0]
    if where != "cpu":
        raise RuntimeError(f"The CPU reference found a {where}; hiding it failed.")
    save_logits(load_gemma_keras(args, "float32"), args, "reference")
    return {"platform": where}


def random_prompts(batch, length, vocabulary_size, seed=0):
    rng = np.random.default_rng(seed)
    high = min(20000, vocabulary_size)
    return [[2] + rng.integers(10, high, length - 1).tolist() for _ in range(batch)]


def decode_speed(generate_for, batches, args, vocabulary_size):
    """Greedy decode at each batch, measured as `gemma-keras bench` measures."""
    from gemma_keras.benchmarking import measure

    speeds, first_rows = {}, None
    for batch in batches:
        prompts = random_prompts(batch, args.prompt, vocabulary_size)
        measured = measure(generate_for(prompts), batch, args.new, lambda: 0.0, args.repeats)
        for key in ("paired", "best_bandwidth_gb_per_s"):  # no bandwidth probe here
            measured.pop(key)
        speeds[f"batch_{batch}"] = measured
        if first_rows is None:
            first_rows = generate_for(prompts)(args.new, return_ids=True)[0][args.prompt :]
    return speeds, first_rows


def worker_gemma_keras(args):
    """Logits on the accelerator, decode speed, and each sampler's host traffic."""
    import keras

    if args.smoke:
        write_smoke_preset(args)
    model = load_gemma_keras(args, args.dtype)
    if not args.smoke and args.peer:
        model.save_to_preset(args.preset)  # for KerasHub: the same weights
    logits = save_logits(model, args, "accelerator")
    top_p_remainder = remainder_error(logits)

    def generate_for(prompts):
        def new(count, return_ids=False):
            def generate():
                outputs = model.generate(prompts, max_new_tokens=count)
                assert all(len(o) == len(p) + count for o, p in zip(outputs, prompts, strict=True))
                return outputs

            return generate() if return_ids else generate

        return new

    vocabulary_size = model.config.vocabulary_size
    speeds, first_row = decode_speed(generate_for, args.batch, args, vocabulary_size)
    batch = max(args.batch)
    texts = [TRAFFIC_TEXTS[row % len(TRAFFIC_TEXTS)] for row in range(batch)]
    if args.smoke:  # a random model: random prompts do as well
        prompts = random_prompts(batch, args.prompt, vocabulary_size, seed=1)
    else:
        prompts = [model.tokenizer.encode(text) for text in texts]
    traffic = {name: host_traffic(model, name, prompts, args.steps) for name in SAMPLERS}
    where, description = accelerator()
    return {
        "platform": where,
        "device": description,
        "backend": keras.config.backend(),
        "dtype": args.dtype,
        "decode": speeds,
        "first_row_tokens": first_row,
        "host_traffic": traffic,
        "top_p_remainder": top_p_remainder,
    }


def host_traffic(model, name, prompts, steps):
    """The bytes each decode step copies to the host for sampler `name`, what
    they should be, and whether its tokens equal those of sampling the full
    logits."""
    from gemma_keras.backends import dispatch
    from gemma_keras.generation import extend, prefill
    from gemma_keras.samplers import Sampler

    sampler = Sampler(**SAMPLERS[name])
    batch, vocabulary_size = len(prompts), model.config.vocabulary_size
    full_bytes = batch * vocabulary_size * 4  # float32
    reduction = sampler.reduction(vocabulary_size)
    expected = {
        "argmax": batch * 4,  # an int32 id a row
        "logits": full_bytes,
        # float32 logits and int32 ids, and top-p's float32 remainder
        "top": batch * (reduction.count or 0) * 8 + batch * 4 * (reduction.temperature is not None),
    }[dispatch.choose_reduction(accelerator()[0], reduction.kind)]

    def run(reduced):
        result, state = prefill(model, prompts, steps + 1, sampler if reduced else None)
        rng = np.random.default_rng(0)
        tokens, copied, kinds = [], [], set()
        for _ in range(steps):
            uniforms = None if sampler.is_greedy else rng.random(len(prompts))
            step_tokens = result.next_tokens(sampler, uniforms)
            tokens.append(np.asarray(step_tokens).tolist())
            copied.append(result.host_bytes)
            kinds.add(result.reduction.kind)
            result = extend(model, state, np.asarray(step_tokens, np.int32)[:, None])
        return tokens, copied, kinds

    tokens, copied, kinds = run(reduced=True)
    full_tokens, _, _ = run(reduced=False)
    same_tokens = tokens == full_tokens
    row_bytes = full_bytes // batch
    return {
        "batch": batch,
        "steps": steps,
        "reduced_on_device_to": sorted(kinds),
        "expected_bytes_per_step": expected,
        "median_bytes_per_step": float(np.median(copied)),
        "mean_bytes_per_step": float(np.mean(copied)),
        "full_logits_bytes_per_step": full_bytes,
        # A top-p row past its candidates, or top-k ties past k + 1, copies
        # its logits too, now and then.
        "rows_that_copied_their_logits": int(sum((c - expected) // row_bytes for c in copied)),
        "same_tokens_as_the_full_logits": same_tokens,
        "passed": same_tokens and float(np.median(copied)) == expected,
    }


def worker_keras_hub(args):
    """KerasHub's Gemma3CausalLM from the preset gemma_keras wrote: greedy decode speed."""

    import keras
    import keras_hub

    loaded = keras_hub.models.Gemma3CausalLM.from_preset(args.preset, dtype=args.dtype)
    model = keras_hub.models.Gemma3CausalLM(backbone=loaded.backbone, preprocessor=None)
    model.compile(sampler="greedy")
    # Its compiled generate function, which `generate` runs: `generate` itself
    # fails without a preprocessor, on the `"images": None` its Gemma 3 returns.
    generate_function = model.make_generate_function()

    def generate_for(prompts):
        def new(count, return_ids=False):
            # KerasHub generates up to the padded length of its input.
            length = len(prompts[0])
            token_ids = np.zeros((len(prompts), length + count), "int32")
            token_ids[:, :length] = prompts
            padding_mask = (token_ids != 0).astype("int32")
            inputs = {"token_ids": token_ids, "padding_mask": padding_mask}

            def generate():
                outputs = generate_function(inputs, stop_token_ids=None)
                return keras.ops.convert_to_numpy(outputs["token_ids"])  # waits for it

            return generate().tolist() if return_ids else generate

        return new

    vocabulary_size = loaded.backbone.vocabulary_size
    speeds, first_row = decode_speed(generate_for, args.batch, args, vocabulary_size)
    return {"decode": speeds, "first_row_tokens": first_row}


WORKERS = {
    "reference": worker_reference,
    "gemma_keras": worker_gemma_keras,
    "keras_hub": worker_keras_hub,
}


# --------------------------------------------------------------------------- parent


def run_worker(name, args, hide_accelerators=False):
    """Worker `name` in a fresh Python on `args.backend`: its JSON result, or
    `{"error": ...}` with the end of its stderr."""
    command = [sys.executable, os.path.abspath(__file__), "--worker", name]
    command += ["--preset", args.preset, "--workdir", args.workdir, "--dtype", args.dtype]
    command += ["--prompt", str(args.prompt), "--new", str(args.new), "--steps", str(args.steps)]
    command += ["--repeats", str(args.repeats), "--batch", *map(str, args.batch)]
    command += ["--smoke"] if args.smoke else []
    command += ["--tokenizer", args.tokenizer] if args.tokenizer else []
    command += [] if args.peer else ["--no-peer"]
    path = os.pathsep.join(filter(None, [SOURCE, os.environ.get("PYTHONPATH")]))
    environment = dict(os.environ, KERAS_BACKEND=args.backend, PYTHONPATH=path)
    if hide_accelerators:
        environment.update(JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="-1")
    start = time.perf_counter()
    output = subprocess.run(command, capture_output=True, text=True, env=environment)
    if output.returncode != 0:
        return {"error": output.stderr[-3000:]}
    result = json.loads(output.stdout.strip().splitlines()[-1])
    return {**result, "worker_seconds": time.perf_counter() - start}


def parity(workdir, dtype):
    """The accelerator's logits against the CPU's float32 ones."""
    ours = np.load(os.path.join(workdir, "accelerator.npy")).astype(np.float64)
    reference = np.load(os.path.join(workdir, "reference.npy")).astype(np.float64)
    difference = np.abs(ours - reference)
    largest = float(np.abs(reference).max())
    agreement = float((ours.argmax(-1) == reference.argmax(-1)).mean())
    tolerance = TOLERANCES[dtype]
    share = float(difference.max()) / largest
    return {
        "positions": int(np.prod(reference.shape[:-1])),
        "max_abs_difference": float(difference.max()),
        "mean_abs_difference": float(difference.mean()),
        "max_abs_logit": largest,
        "max_difference_share": share,
        "top1_agreement": agreement,
        "tolerance": tolerance,
        "passed": share <= tolerance["max_difference_share"]
        and agreement >= tolerance["top1_agreement"],
    }


def report(results):
    ours = results["gemma_keras"]
    remainder = ours["top_p_remainder"]
    where = ours["platform"]
    heading = (
        f"accelerator: {ours['device']} ({results['backend']} {where})"
        if where != "cpu"
        else f"no accelerator: CPU only ({ours['device']}, {results['backend']})"
    )
    print(heading)
    check = results["parity"]
    print(
        f"logits parity, {results['dtype']} on {where} against float32 on the CPU, "
        f"{check['positions']} positions: max |difference| {check['max_abs_difference']:.3g} "
        f"({check['max_difference_share']:.2%} of the largest logit "
        f"{check['max_abs_logit']:.3g}), top-1 agreement {check['top1_agreement']:.1%}: "
        f"{'pass' if check['passed'] else 'FAIL'} (tolerance "
        f"{check['tolerance']['max_difference_share']:.0%} and "
        f"{check['tolerance']['top1_agreement']:.0%})"
    )
    print(f"greedy decode, prompt {results['prompt_tokens']} + {results['new_tokens']} new tokens:")
    print(f"  {'engine':12} {'batch':>5} {'decode tok/s':>12} {'end to end tok/s':>16}")
    engines = {"gemma_keras": ours, "KerasHub": results.get("keras_hub", {})}
    for batch in results["batch_sizes"]:
        for label, engine in engines.items():
            measured = engine.get("decode", {}).get(f"batch_{batch}")
            if measured:
                print(
                    f"  {label:12} {batch:>5} {measured['decode_tokens_per_second']:12.1f} "
                    f"{measured['end_to_end_tokens_per_second']:16.1f}"
                )
        ratio = results.get("ratios_to_keras_hub", {}).get(f"decode_batch_{batch}")
        if ratio:
            print(f"  {'ratio':12} {batch:>5} {ratio:11.2f}x")
    if "error" in results.get("keras_hub", {}):
        print(f"  KerasHub failed: {results['keras_hub']['error'].strip()[-500:]}")
    print(f"host traffic per decode step (batch {max(results['batch_sizes'])}):")
    print(
        f"  {'sampler':8} {'reduced to':>10} {'median bytes':>12} {'full logits':>11} "
        f"{'rows that copied logits':>23} {'same tokens':>11} {'check':>5}"
    )
    for name, traffic in ours["host_traffic"].items():
        copied, rows = traffic["rows_that_copied_their_logits"], traffic["steps"] * traffic["batch"]
        rows = f"{copied} of {rows}"
        print(
            f"  {name:8} {','.join(traffic['reduced_on_device_to']):>10} "
            f"{traffic['median_bytes_per_step']:12.0f} {traffic['full_logits_bytes_per_step']:11d} "
            f"{rows:>23} {str(traffic['same_tokens_as_the_full_logits']):>11} "
            f"{'pass' if traffic['passed'] else 'FAIL':>5}"
        )
    print(
        f"top-p remainder on {where}: relative error up to {remainder['max_relative_error']:.2g} "
        f"against float64 (samplers.REMAINDER_ERROR {remainder['allowed']:.0e}): "
        f"{'pass' if remainder['passed'] else 'FAIL: raise REMAINDER_ERROR'} (under half of it)"
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["jax", "tensorflow", "torch"])
    parser.add_argument("--dtype", default="float32", choices=sorted(TOLERANCES))
    parser.add_argument("--batch", type=int, nargs="+", help="decode batch sizes (default 1 8)")
    parser.add_argument("--prompt", type=int, help="prompt tokens (default 32)")
    parser.add_argument("--new", type=int, help="new tokens (default 32)")
    parser.add_argument("--steps", type=int, help="decode steps of the traffic check (default 16)")
    parser.add_argument("--repeats", type=int, help="timed repeats (default 3)")
    parser.add_argument("--no-peer", dest="peer", action="store_false", help="skip KerasHub")
    parser.add_argument(
        "--smoke", action="store_true", help="a tiny random Gemma 3 instead of the 270M"
    )
    parser.add_argument("--tokenizer", help="with --smoke: a SentencePiece file (required)")
    parser.add_argument("--output", help="the JSON results file (default under benchmarks/results)")
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--preset", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    defaults = dict(batch=[1, 8], prompt=32, new=32, steps=16, repeats=3)
    if args.smoke:  # runs in seconds; 16 new tokens in 3 repeats outlast a busy machine's jitter
        defaults.update(batch=[2], prompt=8, new=16, steps=4, repeats=3)
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.smoke != bool(args.tokenizer):
        parser.error("--smoke needs --tokenizer (a SentencePiece file), and only it takes one")
    if args.worker:
        print(json.dumps(WORKERS[args.worker](args)))
        return
    args.backend = args.backend or os.environ.get("KERAS_BACKEND", "jax")
    model = "smoke" if args.smoke else "gemma3_270m"
    with tempfile.TemporaryDirectory(prefix="accelerator_check_") as directory:
        args.workdir, args.preset = directory, os.path.join(directory, "preset")
        ours = run_worker("gemma_keras", args)
        if "error" in ours:
            raise SystemExit(f"gemma_keras failed:\n{ours['error']}")
        reference = run_worker("reference", args, hide_accelerators=True)
        if "error" in reference:
            raise SystemExit(f"The CPU reference failed:\n{reference['error']}")
        results = {
            "model": model,
            "backend": args.backend,
            "dtype": args.dtype,
            "cpu": cpu_name(),
            "prompt_tokens": args.prompt,
            "new_tokens": args.new,
            "batch_sizes": args.batch,
            "gemma_keras": ours,
            "parity": parity(directory, args.dtype),
        }
        if args.peer:
            results["keras_hub"] = run_worker("keras_hub", args)
    remainder = ours["top_p_remainder"]
    remainder["passed"] = remainder["max_relative_error"] <= remainder["allowed"] / 2
    theirs = results.get("keras_hub", {})
    if "decode" in theirs:
        results["ratios_to_keras_hub"] = {
            f"decode_{key}": measured["decode_tokens_per_second"]
            / theirs["decode"][key]["decode_tokens_per_second"]
            for key, measured in ours["decode"].items()
        }
        results["same_greedy_tokens_as_keras_hub"] = (
            ours["first_row_tokens"] == theirs["first_row_tokens"]
        )
    report(results)
    name = f"accelerator_check-{model}-{args.backend}-{ours['platform']}.json"
    write_results(results, args.output or os.path.join(RESULTS, name))


if __name__ == "__main__":
    main()
