"""One LoRA fine-tuning step of gemma_keras against KerasHub's, measured in one run.

    python benchmarks/train_step.py                          # Gemma 3 270M, batch 1 and 4
    python benchmarks/train_step.py --backend torch --batch 1 --steps 3
    python benchmarks/train_step.py --smoke --tokenizer vocabulary.spm   # tiny random model

The step is the Gemma LoRA guide's: rank 4 on the query and value projections,
`AdamW(5e-5, weight_decay=0.01)`, `SparseCategoricalCrossentropy(from_logits=True)`
with a weighted `SparseCategoricalAccuracy`, sequences of 256 tokens. Both
engines train on the same pre-tokenized batch (every token real, labels the
next tokens, all weights 1) with `train_on_batch`: a few warm-up steps (the
first compiles), then the median of `--steps` timed steps; tokens/s is
batch * sequence length / step time.

gemma_keras loads the embedded Gemma 3 270M (`GemmaCausalLM.from_preset(
"gemma3_270m_q4_k_m")`); KerasHub loads `keras_hub.models.Gemma3CausalLM.from_preset`
from a preset directory that gemma_keras' `save_to_preset` wrote, so both hold
the same weights, and their first losses must agree. Each engine and batch
size runs in its own subprocess on the backend of `--backend` (or
`KERAS_BACKEND`), so peak RSS is its own. The script prints the CPU, a table
(engine, batch, step ms, tokens/s, peak RSS, speed ratio gemma_keras/KerasHub)
and writes `benchmarks/results/train_step-<model>-<backend>.json`.
"""

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

EMBEDDED = "gemma3_270m_q4_k_m"
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
ENGINES = {"gemma_keras": "gemma_keras", "keras_hub": "KerasHub"}
# --smoke: the 270M's architecture this small (six layers, the last global).
SMOKE_SIZES = dict(
    num_layers=6,
    hidden_dim=64,
    intermediate_dim=128,
    num_query_heads=4,
    num_key_value_heads=1,
    head_dim=32,
    query_pre_attn_scalar=32,
    sliding_window=8,
)


def cpu_name():
    """The CPU's model name, as /proc/cpuinfo gives it."""
    try:
        with open("/proc/cpuinfo") as file:
            for line in file:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def peak_rss_gb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def training_batch(batch, length, vocabulary_size, seed=0):
    """`(x, labels, sample_weight)`: random real tokens after `<bos>`, the labels
    the next tokens, every position weighted (no padding)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(10, vocabulary_size, size=(batch, length + 1)).astype("int32")
    tokens[:, 0] = 2  # <bos>
    x = {
        "token_ids": tokens[:, :-1],
        "padding_mask": np.ones((batch, length), "int32"),
    }
    return x, tokens[:, 1:], np.ones((batch, length), "float32")


def compile_for_lora(model):
    """The optimizer, loss and metric of the Gemma LoRA guide."""
    import keras

    model.compile(
        optimizer=keras.optimizers.AdamW(learning_rate=5e-5, weight_decay=0.01),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        weighted_metrics=[keras.metrics.SparseCategoricalAccuracy()],
    )


def time_steps(model, batch, args):
    """Warm-up steps, then `args.steps` timed ones; `train_on_batch` returns
    Python floats, so each timed step has finished when its call returns."""
    x, labels, sample_weight = batch
    losses = []
    for _ in range(args.warmup):
        logs = model.train_on_batch(x, labels, sample_weight=sample_weight, return_dict=True)
        losses.append(float(logs["loss"]))
    seconds = []
    for _ in range(args.steps):
        start = time.perf_counter()
        model.train_on_batch(x, labels, sample_weight=sample_weight, return_dict=True)
        seconds.append(time.perf_counter() - start)
    step = float(np.median(seconds))
    tokens = x["token_ids"].size
    return {
        "first_loss": losses[0],  # before any update: the same weights give the same loss
        "step_seconds": seconds,
        "median_step_seconds": step,
        "tokens_per_second": tokens / step,
        "trainable_parameters": int(sum(np.prod(v.shape) for v in model.trainable_weights)),
    }


# --------------------------------------------------------------------------- workers


def worker_export(args):
    """Writes the model as a preset directory with gemma_keras' `save_to_preset`."""
    import dataclasses

    from gemma_keras import GemmaCausalLM, GemmaConfig, GemmaTokenizer
    from gemma_keras.config import every_nth_global

    if args.smoke:
        tokenizer = (
            GemmaTokenizer(args.tokenizer)
            if args.tokenizer
            else GemmaCausalLM.from_preset(EMBEDDED, load_weights=False).tokenizer
        )
        config = dataclasses.replace(
            GemmaConfig.named("gemma3_270m"),
            vocabulary_size=tokenizer.vocabulary_size,
            layer_types=every_nth_global(SMOKE_SIZES["num_layers"]),
            **SMOKE_SIZES,
        )
        # Keras' random initialisation; norm scales start at zero in both engines.
        model = GemmaCausalLM.from_gemma_config(config, dtype="float32")
        model.tokenizer = tokenizer
    else:
        model = GemmaCausalLM.from_preset(EMBEDDED)
    model.save_to_preset(args.preset)
    return {"vocabulary_size": model.config.vocabulary_size}


def load_gemma_keras(args):
    """gemma_keras' model with LoRA enabled and compiled, and its batch."""
    import gemma_keras

    # The smoke model lives only in the exported preset; the 270M is the embedded one.
    model = gemma_keras.GemmaCausalLM.from_preset(args.preset if args.smoke else EMBEDDED)
    model.backbone.enable_lora(4)
    compile_for_lora(model)
    return model, training_batch(args.batch[0], args.sequence_length, model.config.vocabulary_size)


def load_keras_hub(args):
    """KerasHub's model from the exported preset, with LoRA enabled and compiled."""
    import keras_hub

    loaded = keras_hub.models.Gemma3CausalLM.from_preset(args.preset, dtype="float32")
    loaded.preprocessor.sequence_length = args.sequence_length
    # The batch is token ids already, which KerasHub's `train_on_batch` would pass
    # through the (text) preprocessor: the same task without one trains on them.
    # (Setting `preprocessor = None` keeps the unbuilt layer tracked, and Keras
    # then traces the whole model again at every `train_on_batch`: +0.5 s a step.)
    model = keras_hub.models.Gemma3CausalLM(backbone=loaded.backbone, preprocessor=None)
    model.backbone.enable_lora(rank=4)
    compile_for_lora(model)
    vocabulary_size = model.backbone.vocabulary_size
    return model, training_batch(args.batch[0], args.sequence_length, vocabulary_size)


LOADERS = {"gemma_keras": load_gemma_keras, "keras_hub": load_keras_hub}


def worker_engine(name):
    def worker(args):
        start = time.perf_counter()
        model, batch = LOADERS[name](args)
        load_seconds = time.perf_counter() - start  # LoRA and compile included
        return {"load_seconds": load_seconds, **time_steps(model, batch, args)}

    return worker


def worker_paired(args):
    """Both engines in one process, their steps alternating: each ratio then
    compares steps taken in the same minutes (the machine's speed drifts by
    10-30% between minutes, more than the engines differ)."""
    engines = {name: LOADERS[name](args) for name in ENGINES}
    seconds = {name: [] for name in ENGINES}
    for _ in range(args.warmup):
        for model, (x, labels, weights) in engines.values():
            model.train_on_batch(x, labels, sample_weight=weights)
    for _ in range(args.steps):
        for name, (model, (x, labels, weights)) in engines.items():
            start = time.perf_counter()
            model.train_on_batch(x, labels, sample_weight=weights, return_dict=True)
            seconds[name].append(time.perf_counter() - start)
    return {
        name: {"step_seconds": s, "median_step_seconds": float(np.median(s))}
        for name, s in seconds.items()
    }


WORKERS = {
    "export": worker_export,
    "gemma_keras": worker_engine("gemma_keras"),
    "keras_hub": worker_engine("keras_hub"),
    "paired": worker_paired,
}


# --------------------------------------------------------------------------- parent


def run_worker(name, args, batch=None):
    """Runs worker `name` in a fresh Python on `args.backend`; its JSON result, or
    `{"error": ...}` with the end of its stderr."""
    command = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        name,
        "--preset",
        args.preset,
        "--sequence-length",
        str(args.sequence_length),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--batch",
        str(batch or args.batch[0]),
    ]
    if args.smoke:
        command.append("--smoke")
    if args.tokenizer:
        command += ["--tokenizer", args.tokenizer]
    environment = dict(os.environ, KERAS_BACKEND=args.backend)
    output = subprocess.run(command, capture_output=True, text=True, env=environment)
    if output.returncode != 0:
        return {"error": output.stderr[-3000:]}
    return json.loads(output.stdout.strip().splitlines()[-1])


def _faster(measured, best):
    if "error" in measured:
        return False
    return "error" in best or measured["median_step_seconds"] < best["median_step_seconds"]


def report(results):
    """Prints the table: one row per engine and batch size."""
    print(
        f"{'engine':<12} {'batch':>5} {'step ms':>9} {'tokens/s':>9} {'peak RSS GB':>11} "
        f"{'first loss':>10}  gemma_keras/KerasHub (paired)"
    )
    for batch in results["batch_sizes"]:
        for engine, label in ENGINES.items():
            measured = results["engines"][engine].get(f"batch_{batch}")
            if measured is None:
                continue
            if "error" in measured:
                print(f"{label:<12} {batch:>5}  failed: {measured['error'].strip()[-300:]}")
                continue
            ratio = measured.get("speed_ratio")
            paired = measured.get("paired_speed_ratio")
            print(
                f"{label:<12} {batch:>5} {measured['median_step_seconds'] * 1e3:>9.0f} "
                f"{measured['tokens_per_second']:>9.1f} {measured['peak_rss_gb']:>11.2f} "
                f"{measured['first_loss']:>10.4f}  "
                + (f"{ratio:.2f}x" if ratio else "")
                + (f" ({paired:.2f}x)" if paired else "")
            )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["jax", "tensorflow", "torch"])
    parser.add_argument("--batch", type=int, nargs="+", help="batch sizes (default 1 4)")
    parser.add_argument("--steps", type=int, help="timed steps per engine (default 5)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (default 2)")
    parser.add_argument("--sequence-length", type=int, help="tokens per row (default 256)")
    parser.add_argument(
        "--paired",
        action="store_true",
        help="also time both engines in one process, steps alternating (needs both in memory)",
    )
    parser.add_argument(
        "--rounds", type=int, default=1, help="turns per engine, the fastest kept (default 1)"
    )
    parser.add_argument(
        "--engines", nargs="+", choices=sorted(ENGINES), default=list(ENGINES), help="default both"
    )
    parser.add_argument(
        "--smoke", action="store_true", help="a tiny random Gemma 3 instead of the 270M"
    )
    parser.add_argument(
        "--tokenizer", help="with --smoke: a SentencePiece file (default: the 270M's vocabulary)"
    )
    parser.add_argument("--output", help="the JSON results file (default under benchmarks/results)")
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--preset", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    # --smoke's defaults run in seconds; the others are the LoRA guide's.
    defaults = dict(batch=[1, 2], steps=2, warmup=1, sequence_length=32) if args.smoke else {}
    defaults = {**dict(batch=[1, 4], steps=5, warmup=2, sequence_length=256), **defaults}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.tokenizer and not args.smoke:
        parser.error("--tokenizer goes with --smoke (the 270M has its own vocabulary)")
    if args.worker:
        result = WORKERS[args.worker](args)
        print(json.dumps({**result, "peak_rss_gb": peak_rss_gb()}))
        return
    args.backend = args.backend or os.environ.get("KERAS_BACKEND", "jax")
    model = "smoke" if args.smoke else "gemma3_270m"
    results = {
        "model": model,
        "backend": args.backend,
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "sequence_length": args.sequence_length,
        "lora_rank": 4,
        "optimizer": "AdamW(learning_rate=5e-5, weight_decay=0.01)",
        "warmup_steps": args.warmup,
        "timed_steps": args.steps,
        "batch_sizes": args.batch,
        "rounds": args.rounds,
        "engines": {engine: {} for engine in args.engines},
    }
    print(
        f"CPU: {results['cpu']} ({results['cpu_count']} cores); backend {args.backend}; "
        f"{'a tiny random Gemma 3' if args.smoke else 'Gemma 3 270M (embedded)'}, "
        f"LoRA rank 4, sequence {args.sequence_length}, median of {args.steps} steps"
    )
    with tempfile.TemporaryDirectory(prefix="train_step_") as directory:
        args.preset = os.path.join(directory, "preset")
        exported = run_worker("export", args)
        if "error" in exported:
            raise SystemExit(f"Writing the preset failed:\n{exported['error']}")
        # Engines take turns per batch size, so a slow minute falls on both; with
        # --rounds N they take N turns and each keeps its fastest round (this
        # machine's speed moves by a third from minute to minute).
        for batch in args.batch:
            for _ in range(args.rounds):
                for engine in args.engines:
                    measured = run_worker(engine, args, batch)
                    best = results["engines"][engine].get(f"batch_{batch}")
                    if best is None or _faster(measured, best):
                        results["engines"][engine][f"batch_{batch}"] = measured
            if args.paired and len(args.engines) == len(ENGINES):
                paired = run_worker("paired", args, batch)
                results.setdefault("paired", {})[f"batch_{batch}"] = paired
    for batch in args.batch:
        measured = {e: results["engines"][e].get(f"batch_{batch}", {}) for e in args.engines}
        ours, theirs = measured.get("gemma_keras", {}), measured.get("keras_hub", {})
        if "tokens_per_second" in ours and "tokens_per_second" in theirs:
            ours["speed_ratio"] = ours["tokens_per_second"] / theirs["tokens_per_second"]
        paired = results.get("paired", {}).get(f"batch_{batch}", {})
        if "error" not in paired and paired:
            steps = {name: paired[name]["median_step_seconds"] for name in ENGINES}
            ours["paired_speed_ratio"] = steps["keras_hub"] / steps["gemma_keras"]
    report(results)
    write_results(
        results, args.output or os.path.join(RESULTS, f"train_step-{model}-{args.backend}.json")
    )


def write_results(results, path):
    """Writes `results` as JSON to `path`, making its folder."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as file:
        json.dump(results, file, indent=2)
    print(f"  saved {path}")


if __name__ == "__main__":
    main()
