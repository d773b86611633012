"""JAX's products and compiled step (see `gemma_keras.backends`).

On a CPU, bfloat16 products of up to `native_max_rows()` rows take the
native kernel as an XLA FFI call, the others XLA's own products in the
forms measured fastest (see "Products per backend (measured)" in
docs/performance.md). On a GPU or TPU every product is XLA's dot.
"""

import contextlib
import functools
import math

import jax
import jax.numpy as jnp
import keras
from jax import lax

from gemma_keras import native, quantization
from gemma_keras.backends import dispatch, steps
from gemma_keras.backends.steps import with_values


def platform_of(x):
    """ "cpu", "gpu" or "tpu": where a concrete array lives, or, while jit
    traces, where JAX compiles by default."""
    if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
        return next(iter(x.devices())).platform
    return jax.default_backend()


def linear(x, kernel):
    """`x @ kernel.T` (see `gemma_keras.backends.linear`)."""
    kernel = keras.ops.convert_to_tensor(kernel)
    platform = platform_of(x)
    # Symbolic sizes (a graph traced for any batch size) leave the row count unknown.
    shape = tuple(size if isinstance(size, int) else None for size in x.shape)
    rows = None if None in shape[:-1] else math.prod(shape[:-1])
    product = dispatch.choose_product(
        "jax",
        platform,
        keras.backend.standardize_dtype(x.dtype),
        keras.backend.standardize_dtype(kernel.dtype),
        rows,
        shape[-1],
        cpu_features if platform == "cpu" else frozenset(),
    )
    if product == dispatch.NATIVE_KERNEL:
        return native_linear()(x, kernel)
    if kernel.dtype != x.dtype and x.dtype == jnp.bfloat16:
        # Float32 weights of a mixed policy's model, cast as Keras' autocast
        # does. XLA would fold a plain bfloat16 cast back to float32 into the
        # product, skipping the rounding; its integer form is kept.
        kernel = round_to_bfloat16(kernel)
    elif kernel.dtype != x.dtype:
        kernel = keras.ops.cast(kernel, x.dtype)
    if product == dispatch.MULTIPLY_AND_SUM:
        # Projections of the same `x` (key and value, gate and up) would share
        # one broadcast of it, written out at the kernel's full size; tying
        # `x` to its kernel gives each product its own, fused into its sum.
        x, kernel = lax.optimization_barrier((x, kernel))
        product = jnp.sum(kernel.astype(jnp.float32) * x.astype(jnp.float32)[..., None, :], axis=-1)
        return round_to_bfloat16(product)
    if product == dispatch.DOT_FLOAT32_ACCUMULATED:
        product = jnp.einsum("...i,oi->...o", x, kernel, preferred_element_type=jnp.float32)
        return round_to_bfloat16(product)
    return keras.ops.einsum("...i,oi->...o", x, kernel)


def quantized_linears(x, mode, weights):
    """`x @ w.T` for each quantized weight (see `gemma_keras.backends.quantized_linears`)."""
    platform = platform_of(x)
    shape = tuple(size if isinstance(size, int) else None for size in x.shape)
    rows = None if None in shape[:-1] else math.prod(shape[:-1])
    product = dispatch.choose_quantized_product(
        "jax",
        platform,
        rows,
        cpu_features if platform == "cpu" else frozenset(),
        generating=steps.generating(),
    )
    if product == dispatch.NATIVE_QUANTIZED_KERNEL:
        arrays = tuple(tuple(a for a in w if a is not None) for w in weights)
        return native_quantized_linears(x, mode, arrays)
    if product == dispatch.DEQUANTIZED_BFLOAT16:
        return [
            quantization.dequantized_product(x, mode, *w, _bfloat16_product, jnp.bfloat16)
            for w in weights
        ]
    return [quantization.dequantized_product(x, mode, *w, linear, x.dtype) for w in weights]


def _bfloat16_product(flat, weight):
    """`flat @ weight.T` of `flat` rounded to bfloat16 and a bfloat16 weight,
    summed and returned in float32."""
    product = jnp.einsum(
        "ri,oi->ro", flat.astype(jnp.bfloat16), weight, preferred_element_type=jnp.float32
    )
    return product.astype(flat.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def native_quantized_linears(x, mode, weights):
    """The native int8/int4 products of `x` with each of `weights`
    (`(kernel, scale)` or `(kernel, scale, offset)`) as one XLA FFI call, in
    float32, returned in `x`'s dtype. Differentiable in `x` (QLoRA): its
    gradient multiplies by the dequantized weights."""
    flat = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    results = [jax.ShapeDtypeStruct((flat.shape[0], w[0].shape[0]), jnp.float32) for w in weights]
    arrays = [array for w in weights for array in w]
    outs = jax.ffi.ffi_call(native.QUANTIZED_FFI_TARGETS[mode], results)(flat, *arrays)
    return [
        out.astype(x.dtype).reshape(*x.shape[:-1], w[0].shape[0])
        for out, w in zip(outs, weights, strict=True)
    ]


def _native_quantized_forward(x, mode, weights):
    return native_quantized_linears(x, mode, weights), (x, weights)


def _native_quantized_backward(mode, saved, grads):
    x, weights = saved
    grad_x = sum(
        jnp.einsum("...o,oi->...i", grad.astype(jnp.float32), quantization.dequantize(mode, *w))
        for grad, w in zip(grads, weights, strict=True)
    )
    return grad_x.astype(x.dtype), None


native_quantized_linears.defvjp(_native_quantized_forward, _native_quantized_backward)


def _native_kernel_available():
    return native.enabled() and native_linear() is not None


# Asked only for products on a CPU (see `dispatch.choose_product`).
cpu_features = dispatch.CpuFeatures(
    native_kernel=_native_kernel_available,
    native_quantized_kernel=lambda: hasattr(jax, "ffi") and native.register_jax_quantized(),
    avx512_bf16=native.has_bfloat16_dot,
)


@functools.cache
def native_linear():
    """The native kernel as an XLA FFI call on JAX's CPU backend, or None.

    Differentiable: its gradients are the plain product's, so a bfloat16
    model still trains on JAX with the kernel in its forward pass."""
    # `jax.ffi` arrived in JAX 0.4.38; older versions keep XLA's product.
    if not hasattr(jax, "ffi"):
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


@jax.custom_jvp
def round_to_bfloat16(x):
    """float32 -> bfloat16, rounding to nearest even, written with integer ops.

    A plain `convert` gets fused into YNNPACK's multiply-and-sum on a CPU,
    which then ran 12x slower; YNNPACK takes no integer ops, so its product
    ends in float32 and the rounding runs after it. The result equals a
    `convert`'s, NaN staying NaN, and so does its gradient."""
    bits = lax.bitcast_convert_type(x, jnp.uint32)
    rounding = jnp.uint32(0x7FFF) + ((bits >> 16) & jnp.uint32(1))
    high_half = (bits + rounding) & jnp.uint32(0xFFFF0000)
    rounded = lax.bitcast_convert_type(high_half, jnp.float32)
    return jnp.where(jnp.isnan(x), x, rounded).astype(jnp.bfloat16)


# Bit casts have no derivative; the rounding's is the plain cast's.
round_to_bfloat16.defjvps(lambda tangent, rounded, x: tangent.astype(jnp.bfloat16))


# The cache's write: Keras' `slice_update` (XLA writes the donated cache in place).
write_slots = steps.write_slots
softmax = steps.softmax
swap_halves = steps.swap_halves


@contextlib.contextmanager
def keeping_variables(model):
    """See `backends.keeping_variables`. The values are held only as references;
    a step that ran donated them (and Keras then gives its outputs back)."""
    variables = [*model.variables, *getattr(model.optimizer, "variables", [])]
    values = [(variable, variable.value) for variable in variables]
    try:
        yield
    except BaseException:
        for variable, value in values:
            # `_value` is what the trainer empties (`value` would read the initializer).
            if variable._value is None and value is not None and not value.is_deleted():
                variable.assign(value)
        raise


def take_rows(table, ids):
    """`table[ids]` along the first axis. A bfloat16 table is read through a
    uint16 view: when the lookup reads the same bfloat16 array as the tied
    logits' product, XLA writes a float32 copy of the whole table per step."""
    table = keras.ops.convert_to_tensor(table)
    if table.dtype == jnp.bfloat16:
        return _take_bfloat16_rows(table, ids)
    return keras.ops.take(table, ids, axis=0)


@jax.custom_jvp
def _take_bfloat16_rows(table, ids):
    rows = jnp.take(lax.bitcast_convert_type(table, jnp.uint16), ids, axis=0)
    return lax.bitcast_convert_type(rows, jnp.bfloat16)


# The bit casts have no derivative; the lookup's is a plain `take`'s (the
# upstream gradient added into the rows it read), another array than the
# table the logits read, so it costs no copy of the table.
@_take_bfloat16_rows.defjvp
def _take_bfloat16_rows_jvp(primals, tangents):
    table, ids = primals
    return _take_bfloat16_rows(table, ids), jnp.take(tangents[0], ids, axis=0)


def einsum(equation, a, b):
    """XLA's einsums are exact and fast in bfloat16: `keras.ops.einsum`."""
    return keras.ops.einsum(equation, a, b)


@jax.custom_vjp
def cross_entropy_rows(labels, logits):
    """Cross-entropy of logits [rows, classes] against integer labels [rows],
    per row (see `gemma_keras.backends.cross_entropy_rows`): `logsumexp -
    logit`, its gradient `softmax - one_hot` from the logits alone. Keras'
    own (a log-softmax against a one-hot) took 287 ms against 223, forward and
    backward, for 256 tokens of the 270M's logits."""
    return _cross_entropy_rows_forward(labels, logits)[0]


def _cross_entropy_rows_forward(labels, logits):
    labels = labels.astype(jnp.int32)
    log_normalizer = jax.nn.logsumexp(logits, axis=-1)
    losses = log_normalizer - jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]
    return losses, (labels, logits, log_normalizer)


def _cross_entropy_rows_backward(saved, grad_losses):
    labels, logits, log_normalizer = saved
    grad = jnp.exp(logits - log_normalizer[:, None])
    grad = grad.at[jnp.arange(logits.shape[0]), labels].add(-1.0)
    return None, grad * grad_losses[:, None]


cross_entropy_rows.defvjp(_cross_entropy_rows_forward, _cross_entropy_rows_backward)


def is_concrete(x):
    return not isinstance(x, jax.core.Tracer)


def compile_function(function):
    return jax.jit(function)


def compile_step(model, step):
    """`jax.jit` over the variables' values (passed as arguments, not baked
    in as constants), the caches donated so XLA updates them in place."""
    variables = model.variables

    def pure_step(values, caches, *inputs):
        with steps.tracing_generation_step():
            return with_values(variables, values, step, caches, *inputs)

    jitted = jax.jit(pure_step, donate_argnums=(1,))
    return lambda caches, *inputs: jitted([v.value for v in variables], caches, *inputs)
