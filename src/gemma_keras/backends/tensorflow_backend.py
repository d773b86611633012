"""TensorFlow's products and compiled step (see `gemma_keras.backends`).

Steps compile with XLA, whose bfloat16 products take the forms measured
fastest on a CPU. TensorFlow's XLA takes no custom call, so on a CPU a
bfloat16 step of up to `native_max_rows()` rows (decoding, a short prefill)
runs without XLA instead, its products on the native kernel as the
operation `GemmaBf16Linear`; so does a quantized model's decode step (the
int8/int4 operations) and, on a CPU with AVX512-BF16, its prefill (oneDNN's
bfloat16 products). On a GPU or TPU every product is `tf.matmul` and every
step XLA's. Measurements: "Products per backend (measured)" in
docs/performance.md.
"""

import functools
import math
import threading

import keras
import tensorflow as tf
from tensorflow.compiler.tf2xla.python import xla
from tensorflow.python.eager import context as eager_context

from gemma_keras import native, quantization
from gemma_keras.backends import dispatch, steps
from gemma_keras.backends.steps import flatten, pairs

NATIVE_OPERATION = "GemmaBf16Linear"

# While `native_step` traces: `native_products`, one entry per bfloat16
# product, whether it took the native operation.
_tracing_without_xla = threading.local()


def _native_products():
    """The list `native_step` collects while it traces a step without XLA, else None."""
    return getattr(_tracing_without_xla, "native_products", None)


def platform_of(tensor):
    """ "cpu", "gpu" or "tpu": the device `tensor` is placed on, else (a graph
    tensor not placed yet) where TensorFlow places operations by default."""
    device_type = tf.DeviceSpec.from_string(getattr(tensor, "device", "") or "").device_type
    return device_type.lower() if device_type else _default_platform()


@functools.cache
def _default_platform():
    for platform in ("TPU", "GPU"):
        if tf.config.list_logical_devices(platform):
            return platform.lower()
    return "cpu"


def linear(x, kernel):
    """`x @ kernel.T` (see `gemma_keras.backends.linear`)."""
    kernel = keras.ops.convert_to_tensor(kernel)
    platform = platform_of(kernel)
    native_products = _native_products()
    x_dtype = keras.backend.standardize_dtype(x.dtype)
    rows = None if None in x.shape[:-1] else math.prod(x.shape[:-1])
    product = dispatch.choose_product(
        "tensorflow",
        platform,
        x_dtype,
        keras.backend.standardize_dtype(kernel.dtype),
        rows,
        x.shape[-1],
        cpu_features if platform == "cpu" else frozenset(),
        without_xla=native_products is not None,
    )
    if native_products is not None and x_dtype == "bfloat16":
        native_products.append(product == dispatch.NATIVE_KERNEL)
    if product == dispatch.NATIVE_KERNEL:
        return native_linear()(x, kernel)
    # Float32 weights of a mixed policy's model, cast as Keras' autocast does.
    kernel = tf.cast(kernel, x.dtype)
    flat = tf.reshape(x, (-1, tf.shape(x)[-1]))
    if product == dispatch.DOUBLED_ROW_DOT_FLOAT32_ACCUMULATED:
        # Two copies of the row, so that XLA takes its bfloat16 dot.
        twice = _float32_accumulated_dot(tf.concat([flat, flat], 0), kernel)
        out = tf.cast(twice[:1], tf.bfloat16)
    elif product == dispatch.DOT_FLOAT32_ACCUMULATED:
        out = tf.cast(_float32_accumulated_dot(flat, kernel), tf.bfloat16)
    else:
        out = tf.matmul(flat, kernel, transpose_b=True)
    return tf.reshape(out, tf.concat([tf.shape(x)[:-1], tf.shape(kernel)[:1]], 0))


def quantized_linears(x, mode, weights):
    """`x @ w.T` for each quantized weight (see `gemma_keras.backends.quantized_linears`)."""
    kernels, scales, offsets = (
        [None if a is None else keras.ops.convert_to_tensor(a) for a in arrays]
        for arrays in zip(*weights, strict=True)
    )
    platform = platform_of(kernels[0])
    native_products = _native_products()
    rows = None if None in x.shape[:-1] else math.prod(x.shape[:-1])
    product = dispatch.choose_quantized_product(
        "tensorflow",
        platform,
        rows,
        cpu_features if platform == "cpu" else frozenset(),
        without_xla=native_products is not None,
        generating=steps.generating(),
    )
    if native_products is not None:
        native_products.append(product in WITHOUT_XLA_QUANTIZED)
    if product == dispatch.DEQUANTIZED_BFLOAT16:
        return [
            quantization.dequantized_product(x, mode, *w, _bfloat16_product, tf.bfloat16)
            for w in zip(kernels, scales, offsets, strict=True)
        ]
    if product != dispatch.NATIVE_QUANTIZED_KERNEL:
        return [
            quantization.dequantized_product(x, mode, *w, linear, x.dtype)
            for w in zip(kernels, scales, offsets, strict=True)
        ]
    library = native_linear_library()
    # The operations take float32 or bfloat16 x (float16 goes through float32).
    taken = x if x.dtype in (tf.float32, tf.bfloat16) else tf.cast(x, tf.float32)
    if mode == "int8":
        outs = library.gemma_int8_linear(taken, kernels, scales)
    else:
        outs = library.gemma_int4_linear(taken, kernels, scales, offsets)
    return outs if taken is x else [tf.cast(out, x.dtype) for out in outs]


# The quantized products that make a step without XLA worth it (see `native_step`).
WITHOUT_XLA_QUANTIZED = (dispatch.NATIVE_QUANTIZED_KERNEL, dispatch.DEQUANTIZED_BFLOAT16)


def _bfloat16_product(flat, weight):
    """`flat @ weight.T` of `flat` rounded to bfloat16 and a bfloat16 weight
    (oneDNN sums in float32), returned in `flat`'s dtype."""
    product = tf.matmul(tf.cast(flat, tf.bfloat16), weight, transpose_b=True)
    return tf.cast(product, flat.dtype)


def _quantized_gradient(mode):
    """The int8/int4 operations' gradient in `x` (QLoRA): the sum of each
    output's upstream times its dequantized weight; the integers and scales
    are constants."""

    def gradient(operation, *upstream):
        count = len(operation.outputs)
        arrays = list(operation.inputs)[1:]  # the kernels, the scales (and the offsets)
        weights = [arrays[i::count] for i in range(count)]
        grad_x = tf.add_n(
            [
                tf.matmul(tf.cast(grad, tf.float32), quantization.dequantize(mode, *w))
                for grad, w in zip(upstream, weights, strict=True)
            ]
        )
        return [tf.cast(grad_x, operation.inputs[0].dtype), *([None] * len(arrays))]

    return gradient


def _native_kernel_available():
    return native.enabled() and native_linear() is not None


# Asked only for products on a CPU (see `dispatch.choose_product`).
cpu_features = dispatch.CpuFeatures(
    native_kernel=_native_kernel_available,
    native_quantized_kernel=_native_kernel_available,
    avx512_bf16=native.has_bfloat16_dot,
)


@functools.cache
def native_linear_library():
    """The native operations' module (`GemmaBf16Linear`, `GemmaInt8Linear`,
    `GemmaInt4Linear`) with their gradients registered, or None where it
    cannot be built here. They run only in graphs without XLA."""
    library = native.load_tensorflow()
    if library is None:
        return None
    tf.RegisterGradient(NATIVE_OPERATION)(_native_linear_gradient)
    tf.RegisterGradient("GemmaInt8Linear")(_quantized_gradient("int8"))
    tf.RegisterGradient("GemmaInt4Linear")(_quantized_gradient("int4"))
    return library


def native_linear():
    """The native kernel as the TensorFlow operation `GemmaBf16Linear`, or
    None where it cannot be built here. It takes bfloat16 `x` of any rank
    and returns bfloat16."""
    library = native_linear_library()
    return None if library is None else library.gemma_bf16_linear


def _native_linear_gradient(operation, upstream):
    """`GemmaBf16Linear`'s gradients: the plain product's, with the kernel
    rounded to bfloat16 as the operation reads it. In float32: the operation
    runs in graphs without XLA, whose own bfloat16 products round partial
    sums to bfloat16 (see `einsum`)."""
    x, kernel = operation.inputs
    rounded_kernel = tf.cast(tf.cast(kernel, tf.bfloat16), tf.float32)
    flat_x = tf.reshape(tf.cast(x, tf.float32), [-1, tf.shape(x)[-1]])
    flat_upstream = tf.reshape(tf.cast(upstream, tf.float32), [-1, tf.shape(upstream)[-1]])
    grad_x = tf.reshape(tf.matmul(flat_upstream, rounded_kernel), tf.shape(x))
    grad_kernel = tf.matmul(flat_upstream, flat_x, transpose_a=True)
    return tf.cast(grad_x, x.dtype), tf.cast(grad_kernel, kernel.dtype)


def _float32_accumulated_dot(flat, kernel):
    """`flat @ kernel.T` of bfloat16 matrices on XLA, summed and returned in
    float32.

    XLA's `dot_general` has no gradient in TensorFlow; this one's are two
    more such products. `linear` rounds the product to bfloat16, so the
    upstream gradient (the rounding's) holds bfloat16 values, which the
    gradient's products take as they are."""

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
    """Matrices `a` and `b` multiplied over their axes `contracting` on XLA,
    summed in float32."""
    dimensions = xla.DotDimensionNumbers(
        lhs_contracting_dimensions=[contracting[0]], rhs_contracting_dimensions=[contracting[1]]
    )
    return xla.dot_general(a, b, dimensions, preferred_element_type="float32")


def einsum(equation, a, b):
    """`keras.ops.einsum`; in float32, rounded to bfloat16 once, in a step
    traced without XLA, whose own bfloat16 einsum rounds partial sums to
    bfloat16 (XLA's does not)."""
    platform = platform_of(b)
    without_xla = _native_products() is not None
    choice = dispatch.choose_einsum(
        "tensorflow",
        platform,
        keras.backend.standardize_dtype(a.dtype),
        keras.backend.standardize_dtype(b.dtype),
        frozenset(),
        without_xla=without_xla,
    )
    product = _einsum_without_unit_axes if without_xla else keras.ops.einsum
    if choice == dispatch.EINSUM_IN_FLOAT32:
        a, b = keras.ops.cast(a, "float32"), keras.ops.cast(b, "float32")
        return keras.ops.cast(product(equation, a, b), "bfloat16")
    return product(equation, a, b)


def _einsum_without_unit_axes(equation, a, b):
    """Outside XLA, `tf.einsum` is an `Einsum` operation or transposes around a
    batch product, 40-75 us each; a matrix product takes 15 us."""
    return steps.einsum_without_unit_axes(equation, a, b, tf.einsum, _matmul)


def _matmul(a, b, transpose_a, transpose_b):
    return tf.matmul(a, b, transpose_a=transpose_a, transpose_b=transpose_b)


def take_rows(table, ids):
    """`table[ids]` along the first axis, gathered from the variable's value:
    a gather on the variable itself (`ResourceGather`) puts it in
    copy-on-read mode, after which every read of it, the logits' product's
    too, copies the whole table (the 2B's int8 embedding: 35 ms a read)."""
    # Keras' `convert_to_tensor` hands a `tf.Variable` back as it is; TensorFlow's reads it.
    return tf.gather(tf.convert_to_tensor(keras.ops.convert_to_tensor(table)), ids, axis=0)


def write_slots(cache, first_slot, new):
    """`keras.ops.slice_update` along the slots; in a step without XLA, a
    scatter of the new rows (`slice_update`'s `XlaDynamicUpdateSlice` is
    then compiled and run by XLA on demand at every call, about 0.1 ms)."""
    if _native_products() is None:
        return steps.write_slots(cache, first_slot, new)
    batches, slots = tf.range(tf.shape(new)[0]), first_slot + tf.range(tf.shape(new)[1])
    indices = tf.stack(tf.meshgrid(batches, slots, indexing="ij"), axis=-1)
    return tf.tensor_scatter_nd_update(cache, indices, new)


keeping_variables = steps.keeping_variables


def softmax(logits):
    """`keras.ops.softmax`; in a step without XLA, written out as exp and sums:
    there oneDNN's softmax operation costs more than the four operations (the
    270M's int4 decode step: 16.0-16.2 against 17.8-18.4 ms)."""
    if _native_products() is None:
        return steps.softmax(logits)
    exponents = tf.exp(logits - tf.reduce_max(logits, axis=-1, keepdims=True))
    return exponents / tf.reduce_sum(exponents, axis=-1, keepdims=True)


def swap_halves(x):
    """A roll (its gradient is a roll, faster to train than that of slices);
    in a step without XLA, two slices and a concatenation: there TensorFlow's
    `Roll` took 20-40 us on a decode step's queries against about 5."""
    if _native_products() is None:
        return steps.swap_halves(x)
    half = x.shape[-1] // 2
    return tf.concat([x[..., half:], x[..., :half]], axis=-1)


def cross_entropy_rows(labels, logits):
    """Keras' loss, TensorFlow's fused `SparseSoftmaxCrossEntropyWithLogits`
    (see `gemma_keras.backends.cross_entropy_rows`)."""
    return keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)


def is_concrete(x):
    return tf.executing_eagerly() and not isinstance(x, keras.KerasTensor)


def compile_function(function):
    return tf.function(function, jit_compile=True)


def compile_step(model, step):
    """`tf.function(jit_compile=True)`, called through one concrete function
    per input shape with the caches as flat tensors (matching the nested
    caches against `tf.function`'s trace cache cost ~2 ms per decode step).
    A bfloat16 step of up to `native_max_rows()` rows on a CPU runs without
    XLA, on the native operation, where all its products take it (see
    `native_step`)."""

    def flat_step(flat_caches, *inputs):
        with steps.tracing_generation_step():
            logits, new_caches = step(pairs(flat_caches), *inputs)
        return logits, [tensor for pair in new_caches for tensor in pair]

    compiled = tf.function(flat_step, jit_compile=True)
    without_xla = tf.function(flat_step)
    compute_dtype = model.dtype_policy.compute_dtype
    platform = platform_of(model.variables[0].value)
    quantized = any(v.dtype in ("int8", "uint8") for v in model.variables)
    concrete = {}

    def call(caches, *inputs):
        flat_caches, inputs, key = flatten(caches, inputs)
        if key not in concrete:
            specs = [[tf.TensorSpec(x.shape, x.dtype) for x in flat_caches]]
            specs += [tf.TensorSpec(x.shape, x.dtype) for x in inputs]
            rows = math.prod(inputs[0].shape)  # the token ids
            how = dispatch.choose_step(
                "tensorflow",
                platform,
                compute_dtype,
                rows,
                cpu_features if platform == "cpu" else frozenset(),
                quantized=quantized,
            )
            if how == dispatch.STEP_WITHOUT_XLA:
                concrete[key] = native_step(without_xla, specs)
            if concrete.get(key) is None:
                concrete[key] = compiled.get_concrete_function(*specs)
        logits, flat_caches = concrete[key](flat_caches, *inputs)
        return logits, pairs(flat_caches)

    return call


def native_step(function, specs):
    """`function` traced for `specs` without XLA, its bfloat16 products on the
    native operation, or None where any of them cannot take it (the step is
    then faster compiled by XLA).

    It runs on TensorFlow's single-threaded executor: its operations follow
    one another anyway, and the default executor hands each to its
    inter-op threads, whose spinning also kept the products' helper thread
    from a core (the 2B's int4 decode step 73 against 82 ms,
    docs/performance.md)."""
    _tracing_without_xla.native_products = native_products = []
    try:
        traced = function.get_concrete_function(*specs)
    finally:
        del _tracing_without_xla.native_products
    if not (native_products and all(native_products)):
        return None
    return SingleThreaded(traced)


class SingleThreaded:
    """A concrete function (`graph` is its graph) that runs its operations one
    after another on the calling thread: TensorFlow's single-threaded executor."""

    def __init__(self, traced):
        self.traced = traced
        self.graph = traced.graph

    def __call__(self, *args):
        with eager_context.function_executor_type("SINGLE_THREADED_EXECUTOR"):
            return self.traced(*args)
