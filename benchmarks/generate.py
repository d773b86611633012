"""Generation speed of gemma_keras against KerasHub, transformers and llama.cpp, in one run.

    python benchmarks/generate.py                     # both models, every peer
    python benchmarks/generate.py --model gemma_2b    # random-weight Gemma 1 2B vs KerasHub
    python benchmarks/generate.py --model embedded    # Gemma 3 270M GGUF vs transformers, llama.cpp
    python benchmarks/generate.py --model embedded --quantize int4 --no-peer

The same benchmark as `gemma-keras bench` (the code lives in
`gemma_keras.benchmarking`, so an installed wheel has it too); here the
results go to `benchmarks/results/`.
"""

import os
import sys

# A source checkout runs without installing: its src/ comes first.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"))

from gemma_keras import benchmarking  # noqa: E402

# The other scripts here share these helpers (`from generate import ...`).
from gemma_keras.benchmarking import load_ours, measure_bandwidth, timed, weight_bytes  # noqa: E402, F401

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def save_result(name, result):
    """Writes `result` to `benchmarks/results/<name>.json`."""
    benchmarking.save_result(name, result, RESULTS)


if __name__ == "__main__":
    benchmarking.main(default_results=RESULTS)
