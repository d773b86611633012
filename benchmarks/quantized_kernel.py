"""How fast the native int8 and int4 kernels read their weights, on JAX's binding.

    python benchmarks/quantized_kernel.py [--rounds 15]

Times `x @ w.T` for 1 and 8 rows of x on three kernels (16384x2048 and
2048x16384, a 2B's projections; 262144x640, the 270M's logits) as:

- float32: XLA's own product of a float32 weight (`jnp.dot`);
- bfloat16: the native bfloat16 kernel (`gemma_bf16_linear`);
- int8: per output channel (`quantize("int8")`), and in groups of 32 (GGUF Q8_0);
- int4: in groups of 32 (GGUF Q4_0, Q4_K) and 128 (`quantize("int4")`).

XLA's CPU threads (one per core) run every product. Each round times every
product once, alternating, and the median of the
rounds is kept. GB/s counts the bytes a product reads from its weight (kernel,
scales, offsets); G weights/s the weights it multiplies. Prints the CPU and
saves benchmarks/results/quantized_kernel.json.
"""

import argparse
import datetime
import os
import time

os.environ.setdefault("KERAS_BACKEND", "jax")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from generate import save_result  # noqa: E402
from train_step import cpu_name  # noqa: E402

from gemma_keras import native, quantization  # noqa: E402

SHAPES = ((16384, 2048), (2048, 16384), (262144, 640))
QUANTIZED = (("int8", None), ("int8", 32), ("int4", 32), ("int4", 128))
BF16_TARGET = "gemma_bf16_linear"


def products(weight, rows):
    """`{name: (call, weight arrays, bytes they hold)}`: `call(x, *arrays)`
    multiplies `rows` x rows."""
    n_out, n_in = weight.shape
    result = jax.ShapeDtypeStruct((rows, n_out), jnp.float32)
    float32 = jnp.asarray(weight)
    table = {
        "float32": (jax.jit(lambda x, w: jnp.dot(x, w.T)), [float32]),
        "bfloat16": (
            jax.jit(jax.ffi.ffi_call(BF16_TARGET, result)),
            [float32.astype(jnp.bfloat16)],
        ),
    }
    for mode, group in QUANTIZED:
        quantized = quantization.quantize(weight, mode, group or n_in)
        arrays = [jnp.asarray(array) for array in quantized.arrays().values()]
        call = jax.jit(jax.ffi.ffi_call(native.QUANTIZED_FFI_TARGETS[mode], result))
        table[f"{mode} group {group or 'row'}"] = (call, arrays)
    return {
        name: (call, arrays, sum(a.nbytes for a in arrays))
        for name, (call, arrays) in table.items()
    }


def measure(shape, rows, rounds, rng):
    weight = rng.standard_normal(shape, dtype=np.float32)
    x = jnp.asarray(rng.standard_normal((rows, shape[1]), dtype=np.float32))
    table = products(weight, rows)
    del weight
    for call, arrays, _ in table.values():
        call(x, *arrays).block_until_ready()  # compile
    seconds = {name: [] for name in table}
    for _ in range(rounds):
        for name, (call, arrays, _) in table.items():
            start = time.perf_counter()
            call(x, *arrays).block_until_ready()
            seconds[name].append(time.perf_counter() - start)
    results = []
    for name, (_, _, nbytes) in table.items():
        median = float(np.median(seconds[name]))
        results.append(
            {
                "shape": list(shape),
                "rows": rows,
                "product": name,
                "ms": median * 1e3,
                "gb_per_s": nbytes / median / 1e9,
                "g_weights_per_s": shape[0] * shape[1] / median / 1e9,
            }
        )
        print(
            f"  {shape[0]:>6}x{shape[1]:<5} rows {rows}  {name:<15} {median * 1e3:8.2f} ms "
            f"{results[-1]['gb_per_s']:6.1f} GB/s {results[-1]['g_weights_per_s']:6.1f} G weights/s"
        )
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    arguments = parser.parse_args()
    library = native.load(jax.ffi.include_dir())
    if library is None or not native.register_jax_quantized():
        raise SystemExit("the native kernel cannot be built or run here (see the warning above)")
    jax.ffi.register_ffi_target(
        BF16_TARGET, jax.ffi.pycapsule(library.gemma_bf16_linear_ffi), platform="cpu"
    )
    cpu = cpu_name()
    print(f"{cpu}; int8/int4 kernels: {native.quantized_instruction_set()}; JAX {jax.__version__}")
    rng = np.random.default_rng(0)
    results = []
    for shape in SHAPES:
        for rows in (1, 8):
            results += measure(shape, rows, arguments.rounds, rng)
    save_result(
        "quantized_kernel",
        {
            "cpu": cpu,
            "instruction_set": native.quantized_instruction_set(),
            "date": datetime.date.today().isoformat(),
            "backend": "jax",
            "rounds": arguments.rounds,
            "results": results,
        },
    )


if __name__ == "__main__":
    main()
