"""The one place that knows which Keras backend is running.

Everything else in gemma_keras uses `keras.ops` only.
"""

import contextlib
import functools
import math
import threading
import warnings

import keras

from gemma_keras import native


def name():
    return keras.config.backend()


def linear(x, kernel):
    """`x @ kernel.T`: the one dense projection of every Gemma layer.

    Kernels are stored `[out, in]`, as torch, Hugging Face and GGUF store
    them. Decoding one token is a matrix-vector product per weight, bound by
    memory bandwidth, and each backend gets the form measured fastest on a
    2-core CPU with Gemma 2B shapes:
    - JAX: a `dot_general` contracting both last axes, which reads `[out, in]`
      kernels at the bandwidth of one large matrix-vector product (25-35 GB/s
      run to run); `[in, out]` kernels ran about 20% slower.
    - TensorFlow: a 2-D `matmul` with `transpose_b` (`tf.einsum` on this
      pattern ran the 2B at a sixth of the speed). In bfloat16, 2 to 32 rows
      (batched decoding) ask XLA for float32 accumulation, which takes a
      bfloat16 dot instead of a float32 copy of the kernel (16384x2048, 8
      rows: 18 against 89 ms); 512 rows ran as fast with the `matmul`. One
      row is fast with the `matmul` up to 3072 inputs (16384x2048: 11 GB/s)
      and takes the float32 copy from 4096 on (2048x16384, the 2B's down
      projection: 0.86 GB/s, 76 ms); there the row is doubled and takes the
      bfloat16 dot (9.5 GB/s). A bfloat16 step of up to `native_max_rows`
      rows (decoding, short prefills) runs without XLA, its products on
      `native`'s kernel (see `_tensorflow_step`).
    - torch in float32, up to `native_max_rows` rows (decoding):
      `native`'s kernel, which multiplies float32 as it is. On a CPU with
      AVX512-BF16, 16384x2048 kernels, medians of 5: 3.8 against 4.3-5.8 ms
      for oneDNN's inner product with 1 row, 6.8 against 6.8-12.1 with 8.
      On one without AVX512, one row of eight 16384x2048 kernels,
      alternating, medians of 16: 26.7-29.2 against 22.5-26.2 GB/s for
      oneDNN's inner product (it won 42 of 48 rounds); 2 to 16 rows: 7.0,
      7.1, 9.8, 14.4 ms per kernel for 2, 4, 8, 16 rows against oneDNN's
      9.8, 10.8, 13.5, 17.2; 32 rows: 31.1 against 26.1.
    - torch on CPU in float32 otherwise: oneDNN's inner product, about twice
      as fast as `F.linear` (24 against 12 GB/s on the 270M's embedding);
      `F.linear` elsewhere, and where autograd records the product (a
      training step), since oneDNN's has no gradient.
    - torch on a CPU without AVX512 in bfloat16: `F.linear` is fast for one
      row but runs each row as its own matrix-vector product (16384x2048
      kernel: 4.8 ms for 1 row, 1.8 s for 512), so 32 rows or more (a
      prefill) are computed in float32 (0.36 s for 512 rows).
    - JAX in bfloat16: XLA's CPU backend has no bfloat16 dot of its own on a
      CPU without AVX512-BF16; a
      plain bfloat16 dot writes a float32 copy of the kernel on every call
      into freshly mapped memory (a 128 MB copy: 80 ms, mostly page faults).
      Up to `native_max_rows` rows (decoding, short prefills) take
      `gemma_keras.native`'s kernel, an XLA FFI call that widens bfloat16 as
      it reads (2B decode step: 328 against 676 ms). Without it, and for
      more rows: with float32 accumulation requested, 2 rows or more go to
      YNNPACK's bfloat16 dot (16384x2048, 8 rows: 20 against 101 ms; 512
      rows: 430 against 412 ms, so prefills lose nothing); one row would
      still take the copy (86 ms), so it is a multiply-and-sum over the last
      axis, which YNNPACK reads in place (5.5-8 ms).
    - torch in bfloat16, up to `native_max_rows` rows (decoding, short
      prefills): `native`'s kernel, as the operator
      `gemma_keras::bf16_linear` on threads of its own, while torch runs the
      rest of the step on one thread (see `_trace_torch_step`). With
      AVX512-BF16, one row of a 16384x2048 kernel: 1.9 against 3.8 ms for
      torch's product. Without AVX512, the 2B's
      weight products at batch 1: 357 against 473 ms (13.6 against 10.2
      GB/s) for `F.linear`; with torch's two threads beside the kernel,
      490 ms. Whole decode steps: the 2B at batch 1, 364-472 against
      542-621 ms; the 270M at batch 8, 246-287 against 393-430 ms
      (`F.linear` runs each row on its own); the 270M at batch 1, 78-100 ms
      either way.
    - A float32 kernel with bfloat16 `x`: a mixed_bfloat16 model, whose
      kernels are not autocast (see `add_kernel`). Casting them on every
      call wrote a bfloat16 copy of every weight per token (the 270M on JAX:
      2.83 against 49.94 tokens/s in bfloat16). Where the bfloat16 kernel
      would take `native`'s kernel, the float32 kernel does, rounding each
      weight to bfloat16 as it reads it; elsewhere it is cast first. Either
      way the result has the bits of the cast kernel's.
    """
    kernel = keras.ops.convert_to_tensor(kernel)
    native_linear = _native_linear_for(x, kernel)
    if native_linear is not None:
        return native_linear(x, kernel)
    if kernel.dtype != x.dtype:
        # Float32 weights of a mixed policy's model, cast as Keras' autocast
        # does. XLA on JAX would fold a plain bfloat16 cast back to float32
        # into the product, skipping the rounding; its integer form is kept.
        if name() == "jax" and x.dtype == "bfloat16":
            kernel = round_to_bfloat16(kernel)
        else:
            kernel = keras.ops.cast(kernel, x.dtype)
    if name() == "torch":
        import torch

        if x.device.type == "cpu" and x.dtype == kernel.dtype == torch.float32:
            return _torch_float32_linear(x, kernel)
        # While `torch.jit.trace` records, sizes are tensors; each graph has one shape.
        rows = math.prod(int(size) for size in x.shape[:-1])
        if _slow_bfloat16_matmul(x, kernel) and rows >= 32:
            return _torch_float32_linear(x.float(), kernel.float()).to(x.dtype)
        return torch.nn.functional.linear(x, kernel)
    if name() == "tensorflow":
        import tensorflow as tf

        flat = tf.reshape(x, (-1, tf.shape(x)[-1]))
        rows = None if None in x.shape[:-1] else math.prod(x.shape[:-1])
        if x.dtype == tf.bfloat16 and rows == 1 and x.shape[-1] > 3072:
            # Two copies of the row, so that XLA takes its bfloat16 dot.
            twice = _tensorflow_float32_accumulated_dot(tf.concat([flat, flat], 0), kernel)
            out = tf.cast(twice[:1], tf.bfloat16)
        elif x.dtype == tf.bfloat16 and rows is not None and 1 < rows <= 32:
            out = tf.cast(_tensorflow_float32_accumulated_dot(flat, kernel), tf.bfloat16)
        else:
            out = tf.matmul(flat, kernel, transpose_b=True)
        return tf.reshape(out, tf.concat([tf.shape(x)[:-1], tf.shape(kernel)[:1]], 0))
    if x.dtype == "bfloat16":
        return _xla_bfloat16_linear(x, kernel)
    return keras.ops.einsum("...i,oi->...o", x, kernel)


def add_kernel(layer, name, shape):
    """A weight of `layer` that `linear` multiplies by: `[out, in]`, and not
    autocast, since `linear` multiplies a mixed_bfloat16 model's float32
    kernels in bfloat16 itself, without a bfloat16 copy per call."""
    return layer.add_weight(name=name, shape=shape, initializer="glorot_uniform", autocast=False)


def _native_linear_for(x, kernel):
    """`native`'s kernel as this backend calls it, where it takes `x @ kernel.T`
    (see `linear`), else None: bfloat16 `x` of up to `native_max_rows()` rows
    and a bfloat16 kernel, or a float32 one (mixed_bfloat16), which it rounds
    to bfloat16 as it reads, as Keras' cast would; on torch also float32 `x`
    of up to `native_max_rows(float32=True)` rows and a float32 kernel."""
    dtypes = keras.backend.standardize_dtype(x.dtype), keras.backend.standardize_dtype(kernel.dtype)
    if dtypes not in (("bfloat16", "bfloat16"), ("bfloat16", "float32"), ("float32", "float32")):
        return None
    backend = name()
    if backend == "torch":
        on_cpu = x.device.type == kernel.device.type == "cpu"
        # The kernel has no gradient: a product autograd records takes torch's.
        if not on_cpu or _torch_records_gradient(x, kernel):
            return None
        shape = tuple(int(size) for size in x.shape)  # tensors while a trace records
        return _torch_native_linear() if _native_fits(shape, dtypes[0]) else None
    if dtypes == ("float32", "float32"):  # XLA reads float32 at the machine's bandwidth
        return None
    if backend == "tensorflow":
        native_products = getattr(_tensorflow_tracing, "native_products", None)
        if native_products is None:
            return None
        native_products.append(_native_fits(tuple(x.shape), dtypes[0]))
        return _tensorflow_native_linear() if native_products[-1] else None
    return _jax_native_linear() if _native_fits(x.shape, dtypes[0]) else None


# The most rows (tokens in a step) whose bfloat16 products take `native`'s
# kernel on a CPU without AVX512-BF16: it reads the kernel once for all of
# them and ran faster than each backend's own product up to 128 rows. A
# 16384x2048 kernel on such a CPU (AVX2), best of 3:
#   rows        8     32    128    256    512
#   native    5.8     22     90    170    335 ms  (torch; JAX and TF alike)
#   torch      62     73    111    170    302 ms  (float32 copy, oneDNN)
#   JAX XLA    11     26     86    168    341 ms
#   TF XLA     14     30    117    166    272 ms
# So decode steps and prefills of up to 128 tokens take it; longer prefills,
# compute-bound, take the backend's product.
NATIVE_MAX_ROWS = 128
# The same for float32 products on torch, where oneDNN's are faster from 32
# rows on (see `linear`).
NATIVE_MAX_FLOAT32_ROWS = 16
# Both on a CPU with AVX512-BF16, where the backends' own bfloat16 products
# multiply bfloat16 in hardware and the kernel (AVX2, widening to float32)
# wins only for few rows. A 16384x2048 kernel on such a CPU (AMD EPYC, Zen 4),
# medians of 5, ms:
#   rows                 1     2     4     8    32    128
#   native, bfloat16   1.9   2.0   2.7   4.3    15     63  (JAX; torch alike)
#   JAX XLA            3.8   3.9   4.1   4.7   9.4     28
#   torch oneDNN       3.8     -     -   4.2   7.1     21
#   native, float32    3.8   4.1   5.2   6.8    20      -  (torch)
#   torch oneDNN       4.3     -     -   6.8    13     42
NATIVE_MAX_ROWS_WITH_BFLOAT16_DOT = 8


def native_max_rows(float32=False):
    """The most rows (tokens in a step) whose products take `native`'s kernel
    on this CPU: bfloat16 ones, or with `float32` torch's float32 ones."""
    if native.has_bfloat16_dot():
        return NATIVE_MAX_ROWS_WITH_BFLOAT16_DOT
    return NATIVE_MAX_FLOAT32_ROWS if float32 else NATIVE_MAX_ROWS


def _native_fits(shape, x_dtype):
    """Whether `native`'s kernel takes a product with `x` of `shape` and
    `x_dtype`: up to `native_max_rows` rows, with a width its 16-wide blocks
    divide. A graph traced for any batch size has no row count (None, or one
    of JAX's symbolic sizes), and takes the backend's product."""
    if not all(isinstance(size, int) for size in shape) or shape[-1] % 16:
        return False
    max_rows = native_max_rows(float32=x_dtype == "float32")
    return math.prod(shape[:-1]) <= max_rows and native.enabled()


@functools.cache
def _jax_native_linear():
    """`native`'s kernel as an XLA FFI call on JAX's CPU backend, or None.

    Differentiable: its gradients are the plain product's, so a bfloat16
    model still trains on JAX with the kernel in its forward pass."""
    import jax
    import jax.numpy as jnp

    # `jax.ffi` arrived in JAX 0.4.38; older versions keep XLA's product.
    if jax.default_backend() != "cpu" or not hasattr(jax, "ffi"):
        return None
    library = native.load(jax.ffi.include_dir())
    if library is None:
        return None
    jax.ffi.register_ffi_target(
        "gemma_bf16_linear", jax.ffi.pycapsule(library.gemma_bf16_linear_ffi), platform="cpu"
    )

    @jax.custom_vjp
    def native_linear(x, kernel):
        flat = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
        result = jax.ShapeDtypeStruct((flat.shape[0], kernel.shape[0]), jnp.float32)
        out = jax.ffi.ffi_call("gemma_bf16_linear", result)(flat, kernel)
        return out.astype(jnp.bfloat16).reshape(*x.shape[:-1], kernel.shape[0])

    def forward(x, kernel):
        return native_linear(x, kernel), (x, kernel)

    def backward(saved, grad):
        x, kernel = saved
        f32 = jnp.float32
        # A float32 kernel (mixed_bfloat16) multiplies as the bfloat16 cast of it.
        rounded = kernel.astype(jnp.bfloat16)
        grad_x = jnp.einsum("...o,oi->...i", grad, rounded, preferred_element_type=f32)
        grad_kernel = jnp.einsum("...o,...i->oi", grad, x, preferred_element_type=f32)
        return grad_x.astype(x.dtype), grad_kernel.astype(kernel.dtype)

    native_linear.defvjp(forward, backward)
    return native_linear


TORCH_NATIVE_OPERATOR = "gemma_keras::bf16_linear"


@functools.cache
def _torch_native_linear():
    """`native`'s kernel as the torch operator `gemma_keras::bf16_linear`, or None.

    An operator, not a plain call, so that `torch.jit.trace` records it in
    a step's graph. It runs on the kernel's own threads, as many as torch
    had when the call was recorded (`torch.get_num_threads()`)."""
    import torch

    operator = native.load_torch() if native.enabled() else None
    if operator is None:
        return None
    return lambda x, kernel: operator(x, kernel, torch.get_num_threads())


@functools.cache
def _tensorflow_native_linear():
    """`native`'s kernel as the TensorFlow operation `GemmaBf16Linear`, or None.
    TensorFlow's XLA takes no custom calls, so a graph with it runs without XLA.
    It takes bfloat16 `x` of any rank and returns bfloat16."""
    import tensorflow as tf

    library = native.load_tensorflow() if native.enabled() else None
    if library is None:
        return None
    tf.RegisterGradient("GemmaBf16Linear")(_tensorflow_native_linear_gradient)
    return library.gemma_bf16_linear


def _tensorflow_native_linear_gradient(operation, upstream):
    """`GemmaBf16Linear`'s gradients: the plain product's, with the kernel
    rounded to bfloat16 as the operation reads it. In float32: the operation
    runs in graphs without XLA, whose own bfloat16 products round partial
    sums to bfloat16 (see `einsum`)."""
    import tensorflow as tf

    x, kernel = operation.inputs
    rounded_kernel = tf.cast(tf.cast(kernel, tf.bfloat16), tf.float32)
    flat_x = tf.reshape(tf.cast(x, tf.float32), [-1, tf.shape(x)[-1]])
    flat_upstream = tf.reshape(tf.cast(upstream, tf.float32), [-1, tf.shape(upstream)[-1]])
    grad_x = tf.reshape(tf.matmul(flat_upstream, rounded_kernel), tf.shape(x))
    grad_kernel = tf.matmul(flat_upstream, flat_x, transpose_a=True)
    return tf.cast(grad_x, x.dtype), tf.cast(grad_kernel, kernel.dtype)


# While `_tensorflow_native_step` traces: `native_products`, one entry per
# bfloat16 product, whether it took the native kernel.
_tensorflow_tracing = threading.local()


def _xla_bfloat16_linear(x, kernel):
    """`x @ kernel.T` in bfloat16 on JAX, accumulated in float32 and rounded
    to bfloat16 once, as a plain dot would be (see `linear`)."""
    import jax.numpy as jnp
    from jax import lax

    if math.prod(x.shape[:-1]) == 1:
        # Projections of the same `x` (key and value, gate and up) would share
        # one broadcast of it, which XLA then writes out at the kernel's full
        # size (2B gate and up: 73 instead of 11 ms). Tying `x` to its kernel
        # gives each product its own broadcast, fused into its sum.
        x, kernel = lax.optimization_barrier((x, kernel))
        product = jnp.sum(kernel.astype(jnp.float32) * x.astype(jnp.float32)[..., None, :], axis=-1)
    else:
        product = jnp.einsum("...i,oi->...o", x, kernel, preferred_element_type=jnp.float32)
    return round_to_bfloat16(product)


def _tensorflow_float32_accumulated_dot(flat, kernel):
    """`flat @ kernel.T` of bfloat16 matrices on XLA, summed and returned in
    float32 (see `linear`).

    XLA's `dot_general` has no gradient in TensorFlow; this one's are two
    more such products. `linear` rounds the product to bfloat16, so the
    upstream gradient (the rounding's) holds bfloat16 values, which the
    gradient's products take as they are."""
    import tensorflow as tf

    @tf.custom_gradient
    def dot(flat, kernel):
        def gradient(upstream):
            upstream = tf.cast(upstream, flat.dtype)
            grad_flat = _xla_float32_accumulated_dot(upstream, kernel, contracting=(1, 0))
            grad_kernel = _xla_float32_accumulated_dot(upstream, flat, contracting=(0, 0))
            return tf.cast(grad_flat, flat.dtype), tf.cast(grad_kernel, kernel.dtype)

        return _xla_float32_accumulated_dot(flat, kernel, contracting=(1, 1)), gradient

    # Read a variable here, outside: a variable read inside would make
    # `custom_gradient` ask its gradient for the variable's own gradient too.
    return dot(tf.convert_to_tensor(flat), tf.convert_to_tensor(kernel))


def _xla_float32_accumulated_dot(a, b, contracting):
    """Matrices `a` and `b` multiplied over their axes `contracting` on
    TensorFlow's XLA, summed in float32."""
    from tensorflow.compiler.tf2xla.python import xla

    dimensions = xla.DotDimensionNumbers(
        lhs_contracting_dimensions=[contracting[0]], rhs_contracting_dimensions=[contracting[1]]
    )
    return xla.dot_general(a, b, dimensions, preferred_element_type="float32")


def round_to_bfloat16(x):
    """float32 -> bfloat16 on JAX, rounding to nearest even, written with integer ops.

    A plain `convert` here gets fused into YNNPACK's multiply-and-sum, which
    then ran 12x slower (the 270M's 262144x640 logits: 358 against 30 ms);
    YNNPACK takes no integer ops, so its product ends in float32 and the
    rounding runs after it. The result equals a `convert`'s, NaN staying NaN,
    and so does its gradient.
    """
    return _jax_round_to_bfloat16()(x)


@functools.cache
def _jax_round_to_bfloat16():
    import jax
    import jax.numpy as jnp
    from jax import lax

    @jax.custom_jvp
    def round_to_bfloat16(x):
        bits = lax.bitcast_convert_type(x, jnp.uint32)
        rounding = jnp.uint32(0x7FFF) + ((bits >> 16) & jnp.uint32(1))
        high_half = (bits + rounding) & jnp.uint32(0xFFFF0000)
        rounded = lax.bitcast_convert_type(high_half, jnp.float32)
        return jnp.where(jnp.isnan(x), x, rounded).astype(jnp.bfloat16)

    # Bit casts have no derivative; the rounding's is the plain cast's.
    round_to_bfloat16.defjvps(lambda tangent, rounded, x: tangent.astype(jnp.bfloat16))
    return round_to_bfloat16


def take_rows(table, ids):
    """`table[ids]` along the first axis: the embedding lookup.

    On JAX, a bfloat16 table is read through a uint16 view. The tied
    embedding also feeds the logits' multiply-and-sum (see `linear`); when
    the lookup reads the same bfloat16 array, XLA writes a float32 copy of
    the whole table on every step for the sum to read instead (the 270M: 6 s
    a step instead of 70 ms).
    """
    table = keras.ops.convert_to_tensor(table)
    if name() == "jax" and table.dtype == "bfloat16":
        return _jax_take_bfloat16_rows()(table, ids)
    return keras.ops.take(table, ids, axis=0)


@functools.cache
def _jax_take_bfloat16_rows():
    import jax
    import jax.numpy as jnp
    from jax import lax

    @jax.custom_jvp
    def take_bfloat16_rows(table, ids):
        rows = jnp.take(lax.bitcast_convert_type(table, jnp.uint16), ids, axis=0)
        return lax.bitcast_convert_type(rows, jnp.bfloat16)

    # The bit casts have no derivative; the lookup's is a plain `take`'s (the
    # upstream gradient added into the rows it read). The gradient is another
    # array than the table the logits read, so it costs no copy of the table.
    @take_bfloat16_rows.defjvp
    def take_bfloat16_rows_jvp(primals, tangents):
        table, ids = primals
        return take_bfloat16_rows(table, ids), jnp.take(tangents[0], ids, axis=0)

    return take_bfloat16_rows


def einsum(equation, a, b):
    """`keras.ops.einsum`, computed in float32 and rounded to bfloat16 once
    where a bfloat16 einsum would be slow or inexact:
    - torch on a CPU without AVX512: torch's bf16 `bmm` there took 19 of the
      20 s of a 512-token 270M prefill (float32: under 1 s);
    - TensorFlow without XLA (a decode step on `native`'s kernel): its own
      bfloat16 einsum rounds partial sums to bfloat16, XLA's does not."""
    if name() == "torch" and _slow_bfloat16_matmul(a, b):
        return keras.ops.einsum(equation, a.float(), b.float()).to(a.dtype)
    tracing_without_xla = getattr(_tensorflow_tracing, "native_products", None) is not None
    if name() == "tensorflow" and tracing_without_xla and a.dtype == "bfloat16":
        a, b = keras.ops.cast(a, "float32"), keras.ops.cast(b, "float32")
        return keras.ops.cast(keras.ops.einsum(equation, a, b), "bfloat16")
    return keras.ops.einsum(equation, a, b)


def _slow_bfloat16_matmul(*tensors):
    """torch tensors all in bfloat16 on a CPU without AVX512 (AVX512-BF16 or
    AMX is what makes torch's bf16 matrix products fast)."""
    import torch

    on_cpu = all(t.device.type == "cpu" and t.dtype == torch.bfloat16 for t in tensors)
    return on_cpu and not torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def _torch_float32_linear(x, kernel):
    """`x @ kernel.T` of float32 tensors on torch's CPU: oneDNN's inner product
    (see `linear`), or `F.linear` where autograd records the product, since
    oneDNN's has no gradient."""
    import torch

    if _torch_records_gradient(x, kernel):
        return torch.nn.functional.linear(x, kernel)
    return _onednn_linear()(x, kernel)


def _torch_records_gradient(*tensors):
    """Whether torch's autograd records an operation on `tensors` (a training
    step), which products without a gradient of their own must leave to torch's."""
    import torch

    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


@functools.cache
def _onednn_linear():
    import torch

    def onednn_linear(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, kernel, None, "none", [], "")

    # Scripted so that `torch.jit.trace` (see `_trace_torch_step`) records the
    # call; tracing the op directly fails on its empty `scalars` list.
    with _quiet_torch_jit():
        return torch.jit.script(onednn_linear)


@contextlib.contextmanager
def _quiet_torch_jit():
    """torch 2.13 marks `torch.jit` deprecated in favour of `torch.compile` and
    `torch.export`; both were measured here and are slower for this job (see
    `_trace_torch_step`), so the notice would only tell users to do worse."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        yield


def is_concrete(x):
    """True when `x` holds values now (eager), False while a graph is being traced."""
    backend = name()
    if backend == "jax":
        import jax

        return not isinstance(x, jax.core.Tracer)
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.executing_eagerly() and not isinstance(x, keras.KerasTensor)
    if backend == "torch":
        import torch

        tracing = torch.compiler.is_compiling() or torch.jit.is_tracing()
        return not tracing and not isinstance(x, keras.KerasTensor)
    return not isinstance(x, keras.KerasTensor)


def compile_step(model, step):
    """Compiles `step(caches, token_ids, key_mask, positions, cache_index)` for this backend.

    JAX: `jax.jit` over the variables' values (passed as arguments, not baked
    in as constants), the caches donated so XLA updates them in place.
    TensorFlow: `tf.function(jit_compile=True)`, or without XLA for a bfloat16
    decode step on `native`'s kernel (see `_tensorflow_step`).
    PyTorch: `torch.jit.trace` the same way as JAX (see `_trace_torch_step`).
    Each backend compiles once per input shape; the caller buckets shapes.
    """
    backend = name()
    if backend == "jax":
        import jax

        variables = model.variables

        def pure_step(values, caches, *inputs):
            return _with_values(variables, values, step, caches, *inputs)

        jitted = jax.jit(pure_step, donate_argnums=(1,))
        return lambda caches, *inputs: jitted([v.value for v in variables], caches, *inputs)
    if backend == "tensorflow":
        return _tensorflow_step(model, step)
    if backend == "torch":
        return _trace_torch_step(model, step)
    return step


def _with_values(variables, values, step, *inputs):
    """Runs `step(*inputs)` with `variables` reading `values`: the weights become
    inputs of the compiled graph rather than constants baked into it."""
    with keras.StatelessScope(state_mapping=list(zip(variables, values, strict=True))):
        return step(*inputs)


def _tensorflow_step(model, step):
    """TensorFlow: `tf.function(jit_compile=True)`, called through one concrete
    function per input shape with the caches as flat tensors.

    Matching the nested `(caches, *inputs)` against `tf.function`'s trace cache
    took ~7 ms per call (18 layers, 40 tensors); a concrete function skips
    that lookup (measured ~2 ms less per decode step).

    A bfloat16 step of up to `native_max_rows()` rows (decoding, a short
    prefill) whose products all take `native`'s kernel runs without XLA
    instead (see `_tensorflow_native_step`).
    """
    import tensorflow as tf

    def flat_step(flat_caches, *inputs):
        logits, new_caches = step(_pairs(flat_caches), *inputs)
        return logits, [tensor for pair in new_caches for tensor in pair]

    compiled = tf.function(flat_step, jit_compile=True)
    without_xla = tf.function(flat_step)
    bfloat16 = model.dtype_policy.compute_dtype == "bfloat16"
    concrete = {}

    def call(caches, *inputs):
        flat_caches, inputs, key = _flatten(caches, inputs)
        if key not in concrete:
            specs = [[tf.TensorSpec(x.shape, x.dtype) for x in flat_caches]]
            specs += [tf.TensorSpec(x.shape, x.dtype) for x in inputs]
            token_ids = inputs[0]
            if bfloat16 and math.prod(token_ids.shape) <= native_max_rows():
                concrete[key] = _tensorflow_native_step(without_xla, specs)
            if concrete.get(key) is None:
                concrete[key] = compiled.get_concrete_function(*specs)
        logits, flat_caches = concrete[key](flat_caches, *inputs)
        return logits, _pairs(flat_caches)

    return call


def _tensorflow_native_step(function, specs):
    """`function` traced for `specs` without XLA, its bfloat16 products on
    `native`'s kernel, or None where any of them cannot take it (the step is
    then faster compiled by XLA).

    TensorFlow's XLA takes no custom call, and its own bfloat16 products are
    slower: 2B decode steps, alternating in one process, took 326-340 ms
    without XLA against 445-485 ms compiled by it. The 270M's steps are
    mostly not its products and come out level (batch 1: 60-79 against
    52-76 ms; batch 8: 158-205 against 168-209 ms).
    """
    if _tensorflow_native_linear() is None:
        return None
    _tensorflow_tracing.native_products = native_products = []
    try:
        traced = function.get_concrete_function(*specs)
    finally:
        del _tensorflow_tracing.native_products
    return traced if native_products and all(native_products) else None


def _trace_torch_step(model, step):
    """torch: one `torch.jit.trace` graph per input shape, the variables' values as inputs.

    Eager Keras spends about as long in Python per decode step as the 270M
    spends reading its weights; a traced graph replays the same torch ops
    without it (270M decode step: 87-92 ms traced, 165-245 ms eager).
    `torch.compile` breaks the graph at every Keras layer call, took 107 s to
    compile and decoded no faster; `torch.export` took 20 s per shape and
    142-214 ms per step. Tracing records one path through Python, which is
    sound here because every data-dependent choice in the step is a tensor
    op (the cache slot is a tensor input) and shapes are fixed per graph.
    """
    import torch

    variables = model.variables
    graphs = {}

    def traced_step(caches, *inputs):
        flat_caches, inputs, key = _flatten(caches, inputs)
        # Under `no_grad` the trace needs no detached copies of the weights.
        values = [variable.value for variable in variables]
        with torch.no_grad():
            if key not in graphs:

                def pure_step(values, flat_caches, *inputs):
                    logits, new_caches = _with_values(
                        variables, values, step, _pairs(flat_caches), *inputs
                    )
                    return logits, [tensor for pair in new_caches for tensor in pair]

                with _quiet_torch_jit():
                    graph = torch.jit.trace(
                        pure_step, (values, flat_caches, *inputs), check_trace=False
                    )
                _simplify(graph.graph)
                graphs[key] = graph, _only_native_products(graph.graph)
            graph, only_native_products = graphs[key]
            threads = _torch_on_one_thread() if only_native_products else contextlib.nullcontext()
            # Without optimisation TorchScript runs the traced ops as recorded;
            # with it, the second call of every graph spends ~1-2 s profiling
            # and the steps after it are no faster (measured on the 270M).
            with torch.jit.optimized_execution(False), threads:
                logits, flat_caches = graph(values, flat_caches, *inputs)
        return logits, _pairs(flat_caches)

    return traced_step


def _only_native_products(graph):
    """Whether every weight product in a traced graph is the native kernel's
    (a decode step, a short prefill), so that torch may run the rest on one
    thread. A longer prefill also has one: its last position's logits."""
    kinds = {node.kind() for node in graph.nodes()}
    # `_onednn_linear` is a scripted function: the trace records a call to it.
    torch_products = {"aten::linear", "prim::CallFunction"}
    return TORCH_NATIVE_OPERATOR in kinds and not kinds & torch_products


@contextlib.contextmanager
def _torch_on_one_thread():
    """torch on one thread inside the block, for a graph whose products are
    all the native kernel's.

    The kernel brings threads of its own, and torch's idle OpenMP workers
    keep spinning on the cores it needs after each of torch's own operations
    (the 2B's weight products: 490 ms with torch's two threads beside the
    kernel, 357 with one). What torch runs between the products of up to
    `native_max_rows()` rows is small enough for one thread."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _flatten(caches, inputs):
    """`(flat caches, input tensors, shape key)` for a compiled step's call.

    `caches` is a list of (key_cache, value_cache) pairs; flattening it by
    hand costs microseconds where `keras.tree` took ~2 ms per step."""
    flat_caches = [tensor for pair in caches for tensor in pair]
    inputs = [keras.ops.convert_to_tensor(x) for x in inputs]
    key = tuple((tuple(x.shape), x.dtype) for x in [*flat_caches, *inputs])
    return flat_caches, inputs, key


def _pairs(flat):
    return list(zip(flat[0::2], flat[1::2], strict=True))


def _simplify(graph):
    """Folds what the trace recorded but does not depend on the inputs.

    Keras' per-op dtype conversions become constants or disappear: the 270M's
    decode graph (RoPE tables and masks already made once per step, see
    `Attention.plan`) shrinks from 18,147 nodes to 1,930.
    """
    import torch

    torch._C._jit_pass_constant_propagation(graph)
    _drop_same_dtype_casts(graph)
    torch._C._jit_pass_peephole(graph)
    torch._C._jit_pass_cse(graph)
    torch._C._jit_pass_dce(graph)


def _drop_same_dtype_casts(graph):
    """Removes `aten::to` casts where the trace saw the tensor already in the
    target dtype, layout and device.

    Keras converts every op's inputs; on a tensor that needs no change the
    cast returns the tensor itself, but each one still costs a dispatch
    (about 1,700 per 270M decode step). Shapes and dtypes are fixed per
    traced graph, so the recorded types hold on every replay.
    """
    import torch

    for node in list(graph.nodes()):
        if node.kind() != "aten::to":
            continue
        arguments = torch._C.parse_schema(node.schema()).arguments
        named = {a.name: v for a, v in zip(arguments, node.inputs(), strict=False)}
        if not all(
            named[name].node().kind() == "prim::Constant" and named[name].toIValue() in allowed
            for name, allowed in [
                ("copy", (False,)),
                ("memory_format", (None,)),
                ("layout", (None, 0)),
            ]
            if name in named
        ):
            continue
        source, target = node.inputsAt(0).type(), node.output().type()
        if (
            isinstance(source, torch._C.TensorType)
            and source.scalarType() is not None
            and source.scalarType() == target.scalarType()
            and source.device() == target.device()
        ):
            node.output().replaceAllUsesWith(node.inputsAt(0))
            node.destroy()
