"""KerasHub's decode step alone, where its `generate()` is too slow to time.

    KERAS_BACKEND=torch python benchmarks/keras_hub_step.py --dtype bfloat16
    KERAS_BACKEND=tensorflow python benchmarks/keras_hub_step.py --dtype bfloat16

In bfloat16 on TensorFlow and PyTorch, one KerasHub `generate` call on the
random-weight Gemma 1 2B takes minutes here (on PyTorch, 529 s for a 32-token
prompt and 1 new token: its prefill runs bfloat16 projections row by row), so
`generate.py`'s eight calls per engine do not finish in 30-45 minutes. This
script times what decoding repeats per token instead: KerasHub's
`call_with_cache` for one token at batch 1 against a 64-slot cache, compiled
as KerasHub's `generate` compiles it (`tf.function(jit_compile=True)` on
TensorFlow; eager under `torch.no_grad` on PyTorch). Decode tokens/s is one
over the median step time. It prints that, the fraction of this machine's
bandwidth limit, and gemma_keras' decode speed from `generate.py`'s saved
result when there is one, and writes
`benchmarks/results/keras_hub_step-<backend>-<dtype>.json`.
"""

import argparse
import json
import os
import time

import keras
import numpy as np
from generate import RESULTS, measure_bandwidth, save_result, weight_bytes


def build(dtype):
    import keras_hub

    from gemma_keras import GemmaConfig
    from gemma_keras.checkpoints.keras_hub import keras_hub_config

    _, fields = keras_hub_config(GemmaConfig.named("gemma_2b"))
    backbone = keras_hub.models.GemmaBackbone(**fields, dtype=dtype)
    return keras_hub.models.GemmaCausalLM(backbone=backbone, preprocessor=None)


def compiled_step(model):
    """`step(token_ids, cache, index) -> (logits, cache)` as KerasHub's generate runs it."""
    backend = keras.config.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        @tf.function(jit_compile=True)
        def step(token_ids, cache, index):
            logits, _, cache = model.call_with_cache(token_ids, cache, index)
            return logits, cache

        return step
    if backend == "torch":
        import torch

        def step(token_ids, cache, index):
            with torch.no_grad():
                logits, _, cache = model.call_with_cache(token_ids, cache, index)
            return logits, cache

        return step
    raise SystemExit("On JAX, KerasHub's generate() is fast enough: use benchmarks/generate.py.")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args(argv)
    backend = keras.config.backend()
    model = build(args.dtype)
    step = compiled_step(model)
    backbone = model.backbone
    cache = keras.ops.zeros(
        (1, backbone.num_layers, 2, 64, backbone.num_key_value_heads, backbone.head_dim),
        dtype=model.compute_dtype,
    )
    token_ids = keras.ops.convert_to_tensor(np.array([[1000]], "int32"))

    def index(value):  # a tensor: a Python int would retrace `tf.function` at every step
        return keras.ops.convert_to_tensor(np.int32(value))

    start = time.perf_counter()
    logits, cache = step(token_ids, cache, index(32))
    keras.ops.convert_to_numpy(logits)
    first = time.perf_counter() - start
    bandwidth_before = measure_bandwidth(gigabytes=2.0)
    times = []
    for position in range(33, 33 + args.steps):
        start = time.perf_counter()
        logits, cache = step(token_ids, cache, index(position))
        keras.ops.convert_to_numpy(logits)
        times.append(time.perf_counter() - start)
    bandwidth_after = measure_bandwidth(gigabytes=2.0)
    bandwidth = max(*bandwidth_before.values(), *bandwidth_after.values())
    step_seconds = float(np.median(times))
    result = {
        "engine": "keras_hub",
        "backend": backend,
        "dtype": args.dtype,
        "weight_bytes": weight_bytes(backbone),
        "first_step_seconds": first,
        "step_seconds": times,
        "decode_tokens_per_second": 1 / step_seconds,
        "bandwidth_gb_per_s": bandwidth,
        "bandwidth_fraction": weight_bytes(backbone) / step_seconds / 1e9 / bandwidth,
    }
    print(
        f"KerasHub {backend} {args.dtype} 2B decode step: median {step_seconds:.2f} s "
        f"({result['decode_tokens_per_second']:.3f} tok/s, "
        f"{result['bandwidth_fraction']:.0%} of {bandwidth:.1f} GB/s); first step {first:.1f} s"
    )
    ours_path = os.path.join(RESULTS, f"gemma_2b-{backend}-{args.dtype}.json")
    if os.path.exists(ours_path):
        with open(ours_path) as file:
            ours = json.load(file)["engines"]["ours"]["batch_1"]["decode_tokens_per_second"]
        result["gemma_keras_decode_tokens_per_second"] = ours
        result["ratio"] = ours / result["decode_tokens_per_second"]
        print(f"  gemma_keras (from {ours_path}): {ours:.2f} tok/s -> {result['ratio']:.1f}x")
    save_result(f"keras_hub_step-{backend}-{args.dtype}", result)


if __name__ == "__main__":
    main()
