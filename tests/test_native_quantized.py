"""The native int8 and int4 kernels (`gemma_keras.native`, `cpu_kernels.cc`) on
this backend's binding (JAX: the XLA FFI targets; TensorFlow: the operations
`GemmaInt8Linear` and `GemmaInt4Linear`; torch: `gemma_keras::int8_linear` and
`int4_linear`) and on ctypes with the loops below the CPU's best, against
`quantization.dequantize` and a float64 NumPy product.

The tolerances: see quantized_helpers.py."""

import shutil

import keras
import numpy as np
import pytest

from gemma_keras import native, quantization
from quantized_helpers import assert_matches_dequantized, vnni

pytestmark = pytest.mark.skipif(
    not (shutil.which("c++") or shutil.which("g++")), reason="no C++ compiler to build the kernel"
)

BACKEND = keras.config.backend()
ROWS = (1, 3, 8, 40)
# (mode, group size or None for the full width, input width): every group
# size on every width it divides. 2048 wide kernels have 2100 rows, over 128 KB
# in both modes, so that their products run on two threads.
CASES = [
    (mode, group, width)
    for mode, groups in (("int8", (16, None)), ("int4", (32, 128, None)))
    for group in groups
    for width in (64, 640, 2048)
    if group is None or width % group == 0
]


def weight_with_edge_groups(rng, n_out, width, group):
    """A float weight whose first row has an all-zero group and an all-equal
    negative one (scale 0; int4's offset negative), the rest random."""
    weight = rng.standard_normal((n_out, width)).astype(np.float32)
    weight[0, :group] = 0.0
    if width > group:
        weight[0, group : 2 * group] = -0.7
    return weight


def kernel_product(mode, quantized, x):
    """x @ w.T on this backend's binding of the kernel, as NumPy, or a skip."""
    return kernel_products(mode, [quantized], x)[0]


def kernel_products(mode, weights, x):
    """x @ w.T for each of `weights` in one call of this backend's binding of
    the kernel, as NumPy arrays, or a skip."""
    kernels = [w.kernel for w in weights]
    scales = [w.scale for w in weights]
    lists = [kernels, scales] + ([[w.offset for w in weights]] if mode == "int4" else [])
    if BACKEND == "jax":
        import jax
        import jax.numpy as jnp

        if not native.register_jax_quantized():
            pytest.skip("the native kernel cannot be built or run here (see the warning)")
        results = [jax.ShapeDtypeStruct((x.shape[0], k.shape[0]), jnp.float32) for k in kernels]
        call = jax.ffi.ffi_call(native.QUANTIZED_FFI_TARGETS[mode], results)
        arrays = [array for w in zip(*lists, strict=True) for array in w]
        return [np.asarray(out) for out in jax.jit(call)(x, *arrays)]
    if BACKEND == "tensorflow":
        library = native.load_tensorflow()
        if library is None:
            pytest.skip("the native kernel cannot be built for TensorFlow here (see the warning)")
        operation = library.gemma_int8_linear if mode == "int8" else library.gemma_int4_linear
        return [out.numpy() for out in operation(x, *lists)]
    import torch

    if native.load_torch() is None:
        pytest.skip("the native kernel cannot be built for torch here (see the warning)")
    operator = getattr(torch.ops.gemma_keras, f"{mode}_linear")
    tensors = [torch.from_numpy(array) for w in zip(*lists, strict=True) for array in w]
    return [out.numpy() for out in operator(torch.from_numpy(x), tensors, 2)]


@pytest.mark.parametrize(("mode", "group", "width"), CASES)
def test_kernel_matches_the_dequantized_product(mode, group, width):
    rng = np.random.default_rng(width + (group or 0))
    group = group or width
    n_out = 2100 if width == 2048 else 45
    weight = weight_with_edge_groups(rng, n_out, width, group)
    quantized = quantization.quantize(weight, mode, group)
    if mode == "int4":
        assert width == group or quantized.scale[0, 1] == 0
        assert np.any(quantized.offset < 0)
    for rows in ROWS:
        x = rng.standard_normal((rows, width)).astype(np.float32)
        out = kernel_product(mode, quantized, x)
        assert_matches_dequantized(out, x, quantized, int8_x=vnni())


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("rows", [1, 3])
def test_one_call_over_several_kernels_gives_each_kernels_product(mode, rows):
    """A layer's q, k and v (or gate and up) in one call: each output is
    exactly its kernel's product alone, whichever thread's share its rows fell in."""
    rng = np.random.default_rng(rows)
    weights = [
        quantization.quantize(rng.standard_normal((n_out, 512)), mode, 64)
        for n_out in (1000, 72, 72, 8)
    ]
    x = rng.standard_normal((rows, 512)).astype(np.float32)
    together = kernel_products(mode, weights, x)
    for out, quantized in zip(together, weights, strict=True):
        assert out.shape == (rows, quantized.kernel.shape[0])
        np.testing.assert_array_equal(out, kernel_product(mode, quantized, x))


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_one_call_rejects_kernels_of_different_groups(mode):
    """Kernels of one call share x's quantized groups: other groups are a clear error."""
    rng = np.random.default_rng(0)
    weights = [quantization.quantize(rng.standard_normal((16, 256)), mode, g) for g in (64, 128)]
    with pytest.raises(Exception, match="one for all kernels"):
        kernel_products(mode, weights, np.ones((1, 256), np.float32))


@pytest.mark.skipif(BACKEND == "torch", reason="torch's products step aside for a gradient")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gradient_of_one_call_over_several_kernels(dtype):
    """QLoRA's gradient in x through one call over two kernels: the sum of
    each output's upstream times its dequantized weight, in x's dtype."""
    rng = np.random.default_rng(5)
    weights = [quantization.quantize(rng.standard_normal((n, 128)), "int4", 32) for n in (40, 24)]
    x = rng.standard_normal((3, 128)).astype(np.float32)
    upstream = [rng.standard_normal((3, n)).astype(np.float32) for n in (40, 24)]
    expected = sum(
        u @ quantization.dequantize("int4", *w.arrays().values())
        for u, w in zip(upstream, weights, strict=True)
    )
    arrays = [[w.kernel, w.scale, w.offset] for w in weights]
    if BACKEND == "tensorflow":
        import tensorflow as tf

        from gemma_keras.backends import tensorflow_backend

        library = tensorflow_backend.native_linear_library()
        if library is None:
            pytest.skip("the native kernel cannot be built for TensorFlow here")
        x_in = tf.cast(x, dtype)
        with tf.GradientTape() as tape:
            tape.watch(x_in)
            outs = library.gemma_int4_linear(x_in, *(list(a) for a in zip(*arrays, strict=True)))
            loss = sum(
                tf.reduce_sum(tf.cast(o, tf.float32) * u)
                for o, u in zip(outs, upstream, strict=True)
            )
        grad = tape.gradient(loss, x_in)
    else:
        import jax
        import jax.numpy as jnp

        from gemma_keras.backends import jax_backend

        if not native.register_jax_quantized():
            pytest.skip("the native kernel cannot be built or run here")

        def loss(x_in):
            outs = jax_backend.native_quantized_linears(x_in, "int4", tuple(map(tuple, arrays)))
            return sum(
                jnp.sum(o.astype(jnp.float32) * u) for o, u in zip(outs, upstream, strict=True)
            )

        grad = jax.grad(loss)(jnp.asarray(x, dtype))
    assert keras.backend.standardize_dtype(grad.dtype) == dtype
    tolerance = 1e-5 if dtype == "float32" else 1e-2
    np.testing.assert_allclose(
        np.asarray(grad, np.float32), expected, rtol=tolerance, atol=tolerance * 10
    )


@pytest.mark.skipif(BACKEND == "jax", reason="XLA's handlers take float32 x [rows, n_in]")
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_operator_takes_bfloat16_x_of_any_rank(mode):
    """A decode step without XLA (torch's traced graph, TensorFlow's step)
    hands the operator the model's bfloat16 [batch, tokens, width] x and takes
    its output as it comes: the same product as float32 x, rounded once to
    bfloat16, in x's shape."""
    rng = np.random.default_rng(3)
    quantized = quantization.quantize(rng.standard_normal((300, 256)), mode, 128)
    x = rng.standard_normal((2, 3, 256)).astype(np.float32)
    x = keras.ops.convert_to_numpy(keras.ops.cast(keras.ops.cast(x, "bfloat16"), "float32"))
    expected = kernel_product(mode, quantized, x.reshape(6, 256))
    arrays = [quantized.kernel, quantized.scale] + ([quantized.offset] if mode == "int4" else [])
    if BACKEND == "tensorflow":
        import tensorflow as tf

        operation = getattr(native.load_tensorflow(), f"gemma_{mode}_linear")
        (out,) = operation(tf.cast(x, tf.bfloat16), *([a] for a in arrays))
    else:
        import torch

        operator = getattr(torch.ops.gemma_keras, f"{mode}_linear")
        (out,) = operator(torch.from_numpy(x).bfloat16(), [torch.from_numpy(a) for a in arrays], 2)
    assert keras.backend.standardize_dtype(out.dtype) == "bfloat16"
    assert tuple(out.shape) == (2, 3, 300)
    # Exactly float32's output rounded to bfloat16: the same kernel on the same values.
    rounded = keras.ops.cast(keras.ops.cast(expected.reshape(2, 3, 300), "bfloat16"), "float32")
    out = keras.ops.cast(keras.ops.convert_to_tensor(out), "float32")
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(out), keras.ops.convert_to_numpy(rounded)
    )


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("loop", ["avx2", "avx512"])
def test_lower_loops_match_the_dequantized_product(mode, loop):
    """The AVX2 loop and AVX512's float one, which a CPU with AVX512 (and
    VNNI) does not take by itself."""
    if native.load() is None:
        pytest.skip("the native kernel cannot be built or run here (see the warning)")
    if loop == "avx512" and "avx512" not in native.quantized_instruction_set():
        pytest.skip("this CPU has no AVX512")
    rng = np.random.default_rng(7)
    for group, width, n_out in ((32, 640, 45), (96, 288, 45), (None, 2048, 2100)):
        group = group or width
        weight = weight_with_edge_groups(rng, n_out, width, group)
        quantized = quantization.quantize(weight, mode, group)
        for rows in ROWS:
            x = rng.standard_normal((rows, width)).astype(np.float32)
            out = native.quantized_linear(
                x, mode, quantized.kernel, quantized.scale, quantized.offset, loop=loop
            )
            assert_matches_dequantized(out, x, quantized)


@pytest.mark.parametrize("loop", [None, "avx512-vnni"])
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_vnni_loops_on_x_with_zero_and_outlying_blocks(mode, loop):
    """x blocks of zeros, of one large value, and widths that leave the last
    64-byte chunk part full (int4's 160: one chunk and one block; int8's 208:
    three chunks and a quarter); groups of a multiple of the chunk (one scale
    per chunk), of the whole row, and of less; rows wider than `kNarrowX`
    (four streams), int8's also than 128 chunks summed in int32; int4 with
    GFNI where the CPU has it (None) and without."""
    if native.load() is None or not vnni():
        pytest.skip("this CPU has no AVX512-VNNI (or the kernel cannot be built)")
    rng = np.random.default_rng(11)
    shapes = {
        "int4": ((160, 32), (224, 32), (384, 96), (640, 128), (768, 256), (256, 256), (8224, 32)),
        "int8": (
            (208, 16),
            (208, 208),
            (224, 32),
            (384, 96),
            (640, 128),
            (768, 256),
            (8208, 8208),
            (8320, 128),
        ),
    }
    for width, group in shapes[mode]:
        quantized = quantization.quantize(rng.standard_normal((37, width)), mode, group)
        arrays = (quantized.kernel, quantized.scale, quantized.offset)
        for rows in (1, 3):
            x = rng.standard_normal((rows, width)).astype(np.float32)
            x[0, :64] = 0
            x[-1, 40] = 1e4
            x[-1, -16:] = -1e-30
            out = native.quantized_linear(x, mode, *arrays, loop=loop)
            assert_matches_dequantized(out, x, quantized, int8_x=True)


def test_kernel_rejects_shapes_that_do_not_fit():
    """An int4 scale whose groups are not multiples of 32 inputs: a clear error."""
    rng = np.random.default_rng(0)
    quantized = quantization.quantize(rng.standard_normal((8, 96)), "int4", 32)
    scale = np.ones((8, 6), np.float32)  # groups of 16
    x = np.ones((1, 96), np.float32)
    bad = quantization.QuantizedWeight("int4", quantized.kernel, scale, scale, 16)
    with pytest.raises(Exception, match="group a multiple of 32"):
        kernel_product("int4", bad, x)
    if native.load() is not None:
        with pytest.raises(ValueError, match="does not fit"):
            native.quantized_linear(x, "int4", quantized.kernel, scale, scale)


def test_disabled_kernel_is_not_offered(monkeypatch):
    monkeypatch.setenv(native.DISABLE_ENV, "0")
    quantized = quantization.quantize(np.ones((8, 64)), "int8")
    x = np.ones((1, 64), np.float32)
    assert native.quantized_linear(x, "int8", quantized.kernel, quantized.scale) is None
    if BACKEND == "jax":
        assert not native.register_jax_quantized()
