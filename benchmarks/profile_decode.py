"""Where a decode step's time goes, operation by operation, on the current backend.

    KERAS_BACKEND=torch python benchmarks/profile_decode.py --model gemma_2b
    KERAS_BACKEND=jax python benchmarks/profile_decode.py --model embedded --dtype bfloat16
    KERAS_BACKEND=jax python benchmarks/profile_decode.py --model gemma_2b --quantize int4

Prefills a 32-token prompt, then runs `--steps` decode steps (one token each,
batch 1, exactly the step `generate` runs) under the backend's profiler:
`torch.profiler` on PyTorch, `jax.profiler` on JAX (TensorFlow's profiler
writes a format this script does not read). It prints the operations that
took the most time, the share of the step spent in the weight products, the
rate at which those read the weights (weight bytes / their time per step),
and this machine's matrix-vector bandwidth measured in the same process,
then writes `benchmarks/results/profile-<model>-<backend>-<dtype or mode>.json`.
"""

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from generate import load_ours, measure_bandwidth, save_result, timed, weight_bytes  # noqa: E402

# Operations that multiply by a weight matrix: torch's oneDNN and BLAS calls
# (attention's products are `aten::bmm`), XLA's dots (named `dot.N`, or fused
# into `..._dot_fusion.N`) and its YNNPACK fusions (`ynn_fusion`: the bfloat16
# multiply-and-sums of `gemma_keras.backends.linear`, and dots YNNPACK takes);
# attention's two small products per layer count here too. In bfloat16 the
# products are `gemma_keras.native`'s kernel: `ffi_call` on JAX, the
# `gemma_keras::bf16_linear` operator on torch, and the quantized products
# its `int8_linear` and `int4_linear`.
TORCH_WEIGHT_PRODUCTS = {
    "mkldnn::_linear_pointwise",
    "aten::mm",
    "aten::addmm",
    "aten::mv",
    "gemma_keras::bf16_linear",
    "gemma_keras::int8_linear",
    "gemma_keras::int4_linear",
}
XLA_WEIGHT_PRODUCT = re.compile(r"(^|_)dot(_|\.|$)|^ynn_fusion|^ffi_call$")


def decode_steps(model, steps):
    """A function that runs `steps` decode steps after a fresh prefill."""
    from gemma_keras.generation import extend, prefill

    prompt = [2] + list(range(1000, 1031))
    token = np.array([[1000]], np.int32)

    def run():
        _, state = prefill(model, [prompt], steps + 1)
        for _ in range(steps):
            extend(model, state, token)

    return run


def torch_profile(run):
    """`{operation: microseconds}` of self time (nested calls counted once)."""
    import torch

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        run()
    return {event.key: event.self_cpu_time_total for event in profile.key_averages()}


def jax_profile(run):
    """`{HLO operation: microseconds}`, numbered instances of one kind merged.

    XLA runs a large operation as parts on several threads, so the time is
    the union of each kind's intervals (wall time), not their sum."""
    import jax

    with tempfile.TemporaryDirectory() as directory:
        jax.profiler.start_trace(directory)
        run()
        jax.profiler.stop_trace()
        (path,) = glob.glob(f"{directory}/**/*.trace.json.gz", recursive=True)
        with gzip.open(path) as file:
            events = json.load(file)["traceEvents"]
    intervals = collections.defaultdict(list)
    for event in events:
        # Python frames are recorded too (`$file:line name`); thunk bookkeeping is not work.
        name = event.get("name", "")
        if event.get("ph") == "X" and not name.startswith(("$", "ThunkExecutor")):
            start = event["ts"]
            intervals[re.sub(r"\.\d+$", "", name)].append((start, start + event["dur"]))
    return {name: union_length(spans) for name, spans in intervals.items()}


def union_length(spans):
    total, reached = 0.0, -float("inf")
    for start, end in sorted(spans):
        total += max(0.0, end - max(start, reached))
        reached = max(reached, end)
    return total


def is_weight_product(backend, operation):
    if backend == "torch":
        return operation in TORCH_WEIGHT_PRODUCTS
    return bool(XLA_WEIGHT_PRODUCT.search(operation))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["gemma_2b", "embedded"], default="embedded")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--quantize", choices=["int8", "int4"], help="quantize the model first")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args(argv)

    import keras

    backend = keras.config.backend()
    profilers = {"torch": torch_profile, "jax": jax_profile}
    if backend not in profilers:
        parser.error(f"profiles are read on torch and jax, not {backend}")
    model = load_ours(args.model, args.dtype, args.quantize)
    total_bytes = weight_bytes(model)
    run, prefill_only = decode_steps(model, args.steps), decode_steps(model, 0)
    run()  # compiles (or traces) the prefill and the decode step
    prefill_only()  # a shorter budget may take a smaller cache bucket: compiled here too
    step_seconds = (timed(run) - timed(prefill_only)) / args.steps
    # The prefill is profiled alone and subtracted, leaving the decode steps.
    decode = collections.Counter(profilers[backend](run))
    decode.subtract(profilers[backend](prefill_only))
    per_step = {op: us / args.steps / 1e6 for op, us in decode.items() if us > 0}
    products = sum(s for op, s in per_step.items() if is_weight_product(backend, op))
    product_rate = total_bytes / products / 1e9 if products else None
    bandwidths = measure_bandwidth()

    weights = args.quantize or args.dtype
    print(
        f"{args.model} on {backend} ({weights}): {step_seconds * 1e3:.1f} ms per decode step "
        f"({1 / step_seconds:.2f} tok/s), {total_bytes / 1e9:.2f} GB of weights"
    )
    print(f"  top operations (ms per step, share of the step; profiled {args.steps} steps):")
    for op, seconds in sorted(per_step.items(), key=lambda item: -item[1])[: args.top]:
        marker = "*" if is_weight_product(backend, op) else " "
        print(f"   {marker} {seconds * 1e3:8.2f} ms  {seconds / step_seconds:6.1%}  {op[:90]}")
    print(
        f"  * weight products: {products * 1e3:.1f} ms per step "
        f"({products / step_seconds:.0%} of the step)"
        + (f", reading {product_rate:.1f} GB/s" if product_rate else ": none recognised")
    )
    print(
        "  matrix-vector bandwidth of this machine now: "
        + ", ".join(f"{kernel} {rate:.1f} GB/s" for kernel, rate in bandwidths.items())
    )
    result = {
        "model": args.model,
        "backend": backend,
        "dtype": args.dtype,
        "quantize": args.quantize,
        "steps": args.steps,
        "weight_bytes": total_bytes,
        "step_seconds": step_seconds,
        "weight_product_seconds_per_step": products,
        "weight_product_gb_per_s": product_rate,
        "bandwidth_by_kernel": bandwidths,
        "operations_seconds_per_step": dict(sorted(per_step.items(), key=lambda item: -item[1])),
    }
    save_result(f"profile-{args.model}-{backend}-{weights}", result)


if __name__ == "__main__":
    main()
