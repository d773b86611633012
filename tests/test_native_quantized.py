"""The native int8 and int4 kernels (`gemma_keras.native`, `cpu_kernels.cc`) on
this backend's binding (JAX: the XLA FFI targets; TensorFlow: the operations
`GemmaInt8Linear` and `GemmaInt4Linear`; torch: `gemma_keras::int8_linear` and
`int4_linear`) and on ctypes with the AVX2 loop, against
`quantization.dequantize` and a float64 NumPy product.

Tolerance: each output within 1e-5 of the sum of |x * w| that makes it (the
float32 sums' rounding is a few 1e-7 of it at these widths)."""

import shutil

import keras
import numpy as np
import pytest

from gemma_keras import native, quantization

pytestmark = pytest.mark.skipif(
    not (shutil.which("c++") or shutil.which("g++")), reason="no C++ compiler to build the kernel"
)

BACKEND = keras.config.backend()
RELATIVE_TOLERANCE = 1e-5
ROWS = (1, 3, 8, 40)
# (mode, group size or None for the full width, input width): every group
# size on every width it divides. 2048 wide kernels have 2100 rows, over 2 MB
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
    arrays = [quantized.kernel, quantized.scale]
    if mode == "int4":
        arrays.append(quantized.offset)
    if BACKEND == "jax":
        import jax
        import jax.numpy as jnp

        if not native.register_jax_quantized():
            pytest.skip("the native kernel cannot be built or run here (see the warning)")
        result = jax.ShapeDtypeStruct((x.shape[0], quantized.kernel.shape[0]), jnp.float32)
        call = jax.ffi.ffi_call(native.QUANTIZED_FFI_TARGETS[mode], result)
        return np.asarray(jax.jit(call)(x, *arrays))
    if BACKEND == "tensorflow":
        library = native.load_tensorflow()
        if library is None:
            pytest.skip("the native kernel cannot be built for TensorFlow here (see the warning)")
        operation = library.gemma_int8_linear if mode == "int8" else library.gemma_int4_linear
        return operation(x, *arrays).numpy()
    import torch

    if native.load_torch() is None:
        pytest.skip("the native kernel cannot be built for torch here (see the warning)")
    operator = getattr(torch.ops.gemma_keras, f"{mode}_linear")
    return operator(*(torch.from_numpy(a) for a in (x, *arrays)), 2).numpy()


def assert_matches_dequantized(out, x, quantized):
    weight = quantization.dequantize_numpy(quantized).astype(np.float64)
    expected = x.astype(np.float64) @ weight.T
    magnitude = np.abs(x.astype(np.float64)) @ np.abs(weight).T
    assert out.shape == expected.shape and out.dtype == np.float32
    error = np.abs(out - expected)
    worst = np.unravel_index(np.argmax(error - RELATIVE_TOLERANCE * magnitude), error.shape)
    assert np.all(error <= RELATIVE_TOLERANCE * magnitude + 1e-30), (
        f"out{list(worst)} = {out[worst]}, expected {expected[worst]} "
        f"(|x * w| sums to {magnitude[worst]})"
    )


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
        assert_matches_dequantized(kernel_product(mode, quantized, x), x, quantized)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_avx2_loop_matches_the_dequantized_product(mode):
    """The AVX2 loop, which a CPU with AVX512 does not take by itself."""
    if native.load() is None:
        pytest.skip("the native kernel cannot be built or run here (see the warning)")
    rng = np.random.default_rng(7)
    for group, width, n_out in ((32, 640, 45), (None, 2048, 2100)):
        group = group or width
        weight = weight_with_edge_groups(rng, n_out, width, group)
        quantized = quantization.quantize(weight, mode, group)
        for rows in ROWS:
            x = rng.standard_normal((rows, width)).astype(np.float32)
            out = native.quantized_linear(
                x, mode, quantized.kernel, quantized.scale, quantized.offset, avx2_only=True
            )
            assert_matches_dequantized(out, x, quantized)


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
