"""Loading time and peak memory of the embedded preset (`gemma3_270m_q4_k_m`).

    python benchmarks/load.py

Runs `GemmaCausalLM.from_preset("gemma3_270m_q4_k_m")` in fresh subprocesses
against an empty cache directory: the first load assembles the GGUF from its
PyPI package, parses it and converts it into a cached float32 preset; the
repeated loads read that preset. Prints and saves (benchmarks/results/load-<backend>.json)
the seconds and peak RSS of each, against the goals: repeated load under 10 s,
peak RSS below 2x the model's float32 size.
"""

import json
import os
import resource
import subprocess
import sys
import tempfile
import time

from generate import save_result


def load_once():
    start = time.perf_counter()
    from gemma_keras import GemmaCausalLM

    model = GemmaCausalLM.from_preset("gemma3_270m_q4_k_m")
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
        "float32_gb": model.count_params() * 4 / 1e9,
    }


def main():
    import keras

    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        print(json.dumps(load_once()))
        return
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "GEMMA_KERAS_CACHE": cache}
        runs = []
        for _ in range(3):
            output = subprocess.run(
                [sys.executable, __file__, "--worker"],
                env=env,
                capture_output=True,
                text=True,
                check=True,
            )
            runs.append(json.loads(output.stdout.strip().splitlines()[-1]))
    first, repeated = runs[0], runs[1:]
    float32_gb = first["float32_gb"]
    print(f"embedded preset on {keras.config.backend()}: float32 size {float32_gb:.2f} GB")
    print(
        f"  first load (assemble + parse GGUF + convert): {first['seconds']:.1f} s, "
        f"peak RSS {first['peak_rss_gb']:.2f} GB ({first['peak_rss_gb'] / float32_gb:.2f}x)"
    )
    for run in repeated:
        print(
            f"  repeated load: {run['seconds']:.1f} s (goal < 10 s), peak RSS "
            f"{run['peak_rss_gb']:.2f} GB ({run['peak_rss_gb'] / float32_gb:.2f}x, goal < 2x)"
        )
    save_result(
        f"load-{keras.config.backend()}",
        {"backend": keras.config.backend(), "first": first, "repeated": repeated},
    )


if __name__ == "__main__":
    main()
