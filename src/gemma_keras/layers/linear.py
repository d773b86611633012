"""The one dense projection every Gemma layer uses."""

from keras import ops


def linear(x, kernel):
    """`x @ kernel.T`: kernels are stored `[out, in]`, as torch, Hugging Face and GGUF store them.

    Decoding one token is a matrix-vector product per weight. XLA's CPU dot
    streams an `[out, in]` matrix at this machine's full memory bandwidth but
    an `[in, out]` one about 25% slower (measured with a stack of Gemma 2B
    layer shapes: 26 vs 20 GB/s, a 4 GB matrix-vector product 25 GB/s in the
    same run), and torch's linear kernels expect this layout.
    """
    return ops.matmul(x, ops.transpose(kernel))
