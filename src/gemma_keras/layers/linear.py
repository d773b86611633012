"""The one dense projection every Gemma layer uses."""

from gemma_keras import backend


def linear(x, kernel):
    """`x @ kernel.T`: kernels are stored `[out, in]`, as torch, Hugging Face and GGUF store them.

    Decoding one token is a matrix-vector product per weight, bound by memory
    bandwidth. Measured on a 2-core CPU with Gemma 2B shapes, XLA's dot reads
    `[out, in]` kernels contracted on their last axis at the bandwidth of one
    large matrix-vector product (25-35 GB/s, run to run) and `[in, out]` ones
    about 20% slower; torch's `F.linear` expects this layout.
    """
    return backend.linear(x, kernel)
