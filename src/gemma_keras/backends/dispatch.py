"""Which product computes a call: one pure function of the backend, the
platform the tensors live on and the CPU's features.

Nothing here imports a framework or probes the machine, so every choice,
a GPU's and a TPU's included, can be checked on any CPU:

>>> choose_product("jax", "gpu", "bfloat16", "bfloat16", rows=1, width=2048,
...                cpu_features=frozenset())
'dot'
>>> choose_product("jax", "cpu", "bfloat16", "bfloat16", rows=1, width=2048,
...                cpu_features=frozenset({"native_kernel"}))
'native_kernel'

The row limits and the products they choose between were measured on two
CPUs (see "Products per backend (measured)" in docs/performance.md).
"""

# Products that only run on a CPU. A GPU or TPU gets none of them.
NATIVE_KERNEL = "native_kernel"  # gemma_keras.native's kernel (FFI call, torch operator, TF op)
ONEDNN_INNER_PRODUCT = "onednn_inner_product"  # torch.ops.mkldnn._linear_pointwise
ONEDNN_INNER_PRODUCT_IN_FLOAT32 = "onednn_inner_product_in_float32"
LINEAR_IN_FLOAT32 = "linear_in_float32"  # torch's F.linear on float32 copies
MULTIPLY_AND_SUM = "multiply_and_sum"  # JAX: one bfloat16 row, read in place by YNNPACK
DOT_FLOAT32_ACCUMULATED = "dot_float32_accumulated"  # XLA CPU's bfloat16 dot, summed in float32
DOUBLED_ROW_DOT_FLOAT32_ACCUMULATED = "doubled_row_dot_float32_accumulated"  # TensorFlow
EINSUM_IN_FLOAT32 = "einsum_in_float32"
STEP_WITHOUT_XLA = "without_xla"  # TensorFlow's decode step on the native kernel
NATIVE_QUANTIZED_KERNEL = "native_quantized_kernel"  # int8/int4 products of gemma_keras.native
DEQUANTIZED_BFLOAT16 = "dequantized_bfloat16"  # dequantized to bfloat16, x rounded to it

CPU_ONLY = frozenset(
    {
        NATIVE_KERNEL,
        ONEDNN_INNER_PRODUCT,
        ONEDNN_INNER_PRODUCT_IN_FLOAT32,
        LINEAR_IN_FLOAT32,
        MULTIPLY_AND_SUM,
        DOT_FLOAT32_ACCUMULATED,
        DOUBLED_ROW_DOT_FLOAT32_ACCUMULATED,
        EINSUM_IN_FLOAT32,
        STEP_WITHOUT_XLA,
        NATIVE_QUANTIZED_KERNEL,
        DEQUANTIZED_BFLOAT16,
    }
)
# The backends' own products, what a GPU or TPU runs.
DOT = "dot"  # JAX: keras.ops.einsum
LINEAR = "linear"  # torch: F.linear
MATMUL = "matmul"  # TensorFlow: tf.matmul(x, kernel, transpose_b=True)
EINSUM = "einsum"
STEP_JIT = "jit"  # JAX
STEP_TRACE = "trace"  # torch
STEP_XLA = "xla"  # TensorFlow
DEQUANTIZED = "dequantized"  # a quantized weight dequantized to x's dtype, then `linear`

# Most rows (tokens in a step) whose products take the native kernel. On a
# CPU without AVX512-BF16 it ran faster than the backends' own bfloat16
# products up to 128 rows, and than torch's float32 ones up to 16; with
# AVX512-BF16 the backends multiply bfloat16 in hardware and it wins up to 8.
NATIVE_MAX_ROWS = 128
NATIVE_MAX_FLOAT32_ROWS = 16
NATIVE_MAX_ROWS_WITH_BFLOAT16_DOT = 8
# torch on a CPU without AVX512 runs a bfloat16 F.linear row by row: from
# this many rows (a prefill) a float32 copy is faster.
TORCH_FLOAT32_COPY_MIN_ROWS = 32
# TensorFlow: one bfloat16 row wider than this takes XLA's float32 copy of
# the kernel unless it is doubled; up to this many rows take XLA's
# float32-accumulated bfloat16 dot.
TENSORFLOW_WIDEST_SINGLE_ROW = 3072
TENSORFLOW_MAX_ACCUMULATED_ROWS = 32

# Most rows whose int8/int4 products take the native kernel: it reads the
# integers as they are (decoding); more rows are compute-bound, where the
# dequantized weight's product is faster despite the copy. A generation step
# takes it up to 64 rows (a short prompt): there it won, and the copies (5 GB
# of bfloat16 for a 2B) also slowed the next few decode steps (JAX on a Zen 4:
# 2B int8 prefill of 32 tokens 0.79 against 1.65 s, int4 0.49 against 1.83 s;
# docs/performance.md). Other calls keep 16, so that `score` and `fit` of
# longer inputs keep the dequantized weight's float products (the kernel
# quantizes x on a CPU with AVX512-VNNI). torch
# dequantizes eagerly, a new copy of each weight per product, so there the
# kernel wins up to about 128 rows.
NATIVE_MAX_QUANTIZED_ROWS = 16
NATIVE_MAX_QUANTIZED_GENERATION_ROWS = 64
TORCH_NATIVE_MAX_QUANTIZED_ROWS = 128

BACKENDS = ("jax", "tensorflow", "torch")


def native_max_rows(cpu_features, float32=False):
    """The most rows whose products take the native kernel on a CPU with
    `cpu_features`: bfloat16 products, or with `float32` torch's float32 ones."""
    if "avx512_bf16" in cpu_features:
        return NATIVE_MAX_ROWS_WITH_BFLOAT16_DOT
    return NATIVE_MAX_FLOAT32_ROWS if float32 else NATIVE_MAX_ROWS


def choose_product(
    backend,
    platform,
    x_dtype,
    kernel_dtype,
    rows,
    width,
    cpu_features,
    *,
    records_gradient=False,
    without_xla=False,
):
    """The product that computes `x @ kernel.T` for `linear`.

    Args:
        backend: "jax", "tensorflow" or "torch".
        platform: where the tensors live: "cpu", "gpu", "tpu" (anything but
            "cpu" gets the backend's own product).
        x_dtype, kernel_dtype: "float32" or "bfloat16" (a float32 kernel with
            bfloat16 `x` is a mixed_bfloat16 model's), or "float16", which
            always gets the backend's own product (float32-accumulated on
            every backend's CPU; the native kernel reads no float16).
        rows: tokens in the call (the product of `x`'s leading axes), or None
            where a graph is traced for any batch size.
        width: `x`'s last axis (the kernel's inputs), or None where unknown.
        cpu_features: answers `name in cpu_features` for "native_kernel" (the
            kernel is on and loads for this backend), "avx512_bf16" and, on
            torch, "avx512". Asked only on a CPU, and only as far as the
            choice needs, since answering may build the kernel.
        records_gradient: torch's autograd records the product (a training
            step); the native kernel and oneDNN's product have no gradient.
        without_xla: TensorFlow is tracing its step without XLA, where the
            native operation can run.
    Returns:
        One of the product names above.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend is {backend!r}; gemma_keras runs on {', '.join(BACKENDS)}.")
    own_product = {"jax": DOT, "tensorflow": MATMUL, "torch": LINEAR}[backend]
    if platform != "cpu":
        return own_product
    if _takes_native_kernel(
        backend, x_dtype, kernel_dtype, rows, width, cpu_features, records_gradient, without_xla
    ):
        return NATIVE_KERNEL
    bfloat16 = x_dtype == "bfloat16"
    if backend == "jax":
        if not bfloat16:
            return DOT
        return MULTIPLY_AND_SUM if rows == 1 else DOT_FLOAT32_ACCUMULATED
    if backend == "tensorflow":
        if bfloat16 and rows == 1 and width is not None and width > TENSORFLOW_WIDEST_SINGLE_ROW:
            return DOUBLED_ROW_DOT_FLOAT32_ACCUMULATED
        if bfloat16 and rows is not None and 1 < rows <= TENSORFLOW_MAX_ACCUMULATED_ROWS:
            return DOT_FLOAT32_ACCUMULATED
        return MATMUL
    if x_dtype == "float32":
        return LINEAR if records_gradient else ONEDNN_INNER_PRODUCT
    slow_bfloat16 = bfloat16 and "avx512" not in cpu_features
    if slow_bfloat16 and rows is not None and rows >= TORCH_FLOAT32_COPY_MIN_ROWS:
        return LINEAR_IN_FLOAT32 if records_gradient else ONEDNN_INNER_PRODUCT_IN_FLOAT32
    return LINEAR


def _takes_native_kernel(
    backend, x_dtype, kernel_dtype, rows, width, cpu_features, records_gradient, without_xla
):
    """Whether the native kernel takes a product on a CPU: bfloat16 `x` with a
    bfloat16 or float32 kernel (which it rounds to bfloat16 as it reads), on
    torch also float32 with float32 (XLA reads float32 at full speed already),
    up to `native_max_rows` rows, a width its 16-wide blocks divide."""
    dtypes = (x_dtype, kernel_dtype)
    if dtypes not in (("bfloat16", "bfloat16"), ("bfloat16", "float32"), ("float32", "float32")):
        return False
    if dtypes == ("float32", "float32") and backend != "torch":
        return False
    if backend == "torch" and records_gradient:
        return False
    if backend == "tensorflow" and not without_xla:  # TensorFlow's XLA takes no custom call
        return False
    if rows is None or width is None or width % 16:
        return False
    float32 = x_dtype == "float32"
    return rows <= native_max_rows(cpu_features, float32) and "native_kernel" in cpu_features


def native_max_quantized_rows(backend, generating):
    """Most rows of an int8/int4 product that take the native kernel."""
    if backend == "torch":
        return TORCH_NATIVE_MAX_QUANTIZED_ROWS
    return NATIVE_MAX_QUANTIZED_GENERATION_ROWS if generating else NATIVE_MAX_QUANTIZED_ROWS


def choose_quantized_product(
    backend,
    platform,
    rows,
    cpu_features,
    *,
    records_gradient=False,
    without_xla=False,
    generating=False,
):
    """The product for `quantized_linear`.

    On a CPU, outside TensorFlow's XLA and torch's autograd:
    `NATIVE_QUANTIZED_KERNEL` for up to `native_max_quantized_rows` rows where
    the kernel loads ("native_quantized_kernel" in `cpu_features`); for more rows in a
    generation step (`generating`: a prefill) on a CPU with "avx512_bf16",
    `DEQUANTIZED_BFLOAT16`: JAX's XLA and oneDNN multiply bfloat16 there
    1.5-2.2x as fast as float32 (TensorFlow's XLA does not, so its prefill
    runs without XLA: `choose_step`). Else `DEQUANTIZED`: the weight in
    `x`'s dtype, so `score`, `fit` and calls keep the model's precision."""
    if platform != "cpu" or (backend == "torch" and records_gradient):
        return DEQUANTIZED
    if backend == "tensorflow" and not without_xla:
        return DEQUANTIZED
    most = native_max_quantized_rows(backend, generating)
    if rows is not None and rows <= most and "native_quantized_kernel" in cpu_features:
        return NATIVE_QUANTIZED_KERNEL
    if generating and (rows is None or rows > most) and "avx512_bf16" in cpu_features:
        return DEQUANTIZED_BFLOAT16
    return DEQUANTIZED


def choose_einsum(backend, platform, a_dtype, b_dtype, cpu_features, *, without_xla=False):
    """`EINSUM`, or `EINSUM_IN_FLOAT32` (computed in float32, rounded to
    bfloat16 once) where a bfloat16 einsum is slow or inexact: torch's on a
    CPU without AVX512, TensorFlow's without XLA (it rounds partial sums)."""
    if platform != "cpu":
        return EINSUM
    if backend == "torch" and a_dtype == b_dtype == "bfloat16" and "avx512" not in cpu_features:
        return EINSUM_IN_FLOAT32
    if backend == "tensorflow" and without_xla and a_dtype == "bfloat16":
        return EINSUM_IN_FLOAT32
    return EINSUM


def choose_step(backend, platform, compute_dtype, rows, cpu_features, quantized=False):
    """How a step is compiled: `STEP_JIT` (JAX), `STEP_TRACE` (torch), and on
    TensorFlow `STEP_XLA`, or on a CPU `STEP_WITHOUT_XLA` for a bfloat16 step
    of up to `native_max_rows` rows, a `quantized` model's step of up to
    `native_max_quantized_rows` (the native operations) or, with
    AVX512-BF16, a longer one (oneDNN's bfloat16 products); kept only where
    all its products take them (`tensorflow_backend.native_step`)."""
    if backend == "jax":
        return STEP_JIT
    if backend == "torch":
        return STEP_TRACE
    if quantized and platform == "cpu":
        # Decoding on the native kernel, or a prefill multiplying in bfloat16
        # (oneDNN's product; TensorFlow's XLA multiplies bfloat16 no faster than float32).
        if rows <= native_max_quantized_rows(backend, generating=True):
            return STEP_WITHOUT_XLA if "native_quantized_kernel" in cpu_features else STEP_XLA
        return STEP_WITHOUT_XLA if "avx512_bf16" in cpu_features else STEP_XLA
    if quantized:
        return STEP_XLA
    if (
        platform == "cpu"
        and compute_dtype == "bfloat16"
        and rows <= native_max_rows(cpu_features)
        and "native_kernel" in cpu_features
    ):
        return STEP_WITHOUT_XLA
    return STEP_XLA


def choose_reduction(platform, kind):
    """What a step's logits are reduced to where they are before the host
    reads them, for a sampler that needs `kind` ("argmax", "top" or "logits",
    see `gemma_keras.samplers.Reduction`).

    Off a CPU, `kind` itself: reading the logits would be a device-to-host
    transfer per step. On a CPU the host reads them in place, and numpy's
    argmax of them ran faster than the backends' reductions for the 270M's
    262k logits (torch: 1.1 against 4.3 ms a step at batch 8; the same on
    JAX), so greedy steps read the logits; top-k and top-p take their
    candidates where the logits are, which saves the host a sort.
    """
    if platform == "cpu" and kind == "argmax":
        return "logits"
    return kind


class CpuFeatures:
    """`name in features` answered by `probes[name]()` on each question, so
    that a feature that costs a build (the native kernel) is probed only
    when a choice asks for it, and an environment change is seen at once."""

    def __init__(self, **probes):
        self._probes = probes

    def __contains__(self, name):
        probe = self._probes.get(name)
        return probe is not None and bool(probe())

    def __repr__(self):
        return f"CpuFeatures({', '.join(self._probes)})"
