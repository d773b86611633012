"""The native bfloat16 kernel (`gemma_keras.native`, `cpu_kernels.cc`): the
matrix-vector products of bfloat16 decoding on JAX's CPU backend (an XLA FFI
call), on torch's (the operator `gemma_keras::bf16_linear`) and on
TensorFlow's (the operation `GemmaBf16Linear`, in decode steps run without
XLA)."""

import logging
import shutil
import threading

import numpy as np
import pytest
from keras import ops

from gemma_keras import backends, native
from gemma_keras.backends import dispatch
from test_backend import assert_bfloat16_result, bfloat16_pair

pytestmark = [
    pytest.mark.skipif(
        not (shutil.which("c++") or shutil.which("g++")), reason="no C++ compiler to build it"
    ),
]


def include_dir():
    """What the backend builds the kernel with: XLA's FFI headers on JAX."""
    if backends.name() == "jax":
        import jax

        return jax.ffi.include_dir()
    return None


def compiled_linear():
    """`backends.linear` as decoding runs it: jitted on JAX, without autograd on
    torch, traced as `generate` traces a step on TensorFlow."""
    if backends.name() == "jax":
        import jax

        return jax.jit(lambda x, kernel: backends.linear(x, kernel))
    if backends.name() == "tensorflow":
        import tensorflow as tf

        def linear(x, kernel):
            traced = tensorflow_native_linear(x, kernel)
            if traced is None:
                return tf.function(backends.linear, jit_compile=True)(x, kernel)
            return traced(x, kernel)

        return linear
    import torch

    return torch.no_grad()(backends.linear)


def tensorflow_native_linear(x, kernel):
    """`backends.linear` traced without XLA on the kernel, or None where it cannot take it."""
    import tensorflow as tf

    specs = [tf.TensorSpec(x.shape, x.dtype), tf.TensorSpec(kernel.shape, kernel.dtype)]
    return backends.implementation.native_step(tf.function(backends.linear), specs)


def takes_the_kernel(x, kernel):
    if backends.name() == "jax":
        return "gemma_bf16_linear" in compiled_linear().lower(x, kernel).as_text()
    if backends.name() == "tensorflow":
        traced = tensorflow_native_linear(x, kernel)
        operations = [] if traced is None else traced.graph.get_operations()
        return any(operation.type == "GemmaBf16Linear" for operation in operations)
    import torch

    with torch.no_grad(), backends.implementation.quiet_torch_jit():
        graph = torch.jit.trace(backends.linear, (x, kernel), check_trace=False).graph
    return any(node.kind() == backends.implementation.NATIVE_OPERATOR for node in graph.nodes())


def test_the_kernel_builds_here():
    assert backends.implementation.native_linear() is not None


# The most rows the kernel takes on this CPU (`backends.native_max_rows`).
MOST = "most"


def rows_here(rows, float32=False):
    return backends.native_max_rows(float32) if rows == MOST else rows


# Rows 1, 2, 3, 5 and 8 cover every x-row block (4 at a time, then 3, 2 or 1).
# 1030 kernel rows with 1024 inputs are split between threads into shares
# whose quarters (one row of x) or halves (more rows) leave tails of rows;
# 48x32, 6x16 and 7x16 run on one thread, 6 rows as one row from each
# quarter and a tail of two, 7 as three from each half and a tail of one.
@pytest.mark.parametrize(
    "rows,n_out,n_in",
    [
        (1, 48, 32),
        (1, 6, 16),
        (1, 1030, 1024),
        (2, 1030, 1024),
        (3, 1030, 1024),
        (8, 1030, 1024),
        (MOST, 1030, 1024),
        (5, 7, 16),
    ],
)
def test_kernel_is_the_product_of_its_inputs(rows, n_out, n_in):
    rows = rows_here(rows)
    x, kernel, (x_exact, kernel_exact) = bfloat16_pair(
        np.random.default_rng(rows + n_out), (rows, 1, n_in), (n_out, n_in)
    )
    assert takes_the_kernel(x, kernel)
    assert_bfloat16_result(
        compiled_linear()(x, kernel), np.einsum("rsi,oi->rso", x_exact, kernel_exact)
    )


def test_kernel_rounds_as_the_dot_does():
    """Float32 sums in another order: each result within one bfloat16 step
    (2^-7 of its power of two) of the backend's own dot, most of them equal."""
    x, kernel, _ = bfloat16_pair(np.random.default_rng(5), (1, 1, 2048), (4096, 2048))
    result = ops.convert_to_numpy(ops.cast(compiled_linear()(x, kernel), "float32"))
    if backends.name() == "tensorflow":
        import tensorflow as tf

        # TensorFlow's own bfloat16 einsum rounds partial sums to bfloat16; XLA's dot does not.
        dot = tf.function(lambda x, k: tf.einsum("bri,oi->bro", x, k), jit_compile=True)(x, kernel)
    else:
        dot = ops.einsum("bri,oi->bro", x, kernel)
    dot = ops.convert_to_numpy(ops.cast(dot, "float32"))
    one_step = 2.0 ** (np.floor(np.log2(np.maximum(np.abs(dot), 2**-100))) - 7)
    assert np.all(np.abs(result - dot) <= one_step)
    assert np.mean(result == dot) > 0.9


@pytest.mark.parametrize("kernel_dtype", ["bfloat16", "float32"])
def test_infinities_and_nans_propagate(kernel_dtype):
    x = np.ones((1, 1, 32), "float32")
    kernel = np.ones((4, 32), "float32")
    x[0, 0, 5] = np.inf
    kernel[1, 5] = -1.0
    kernel[2, 7] = np.nan
    # A signalling NaN whose payload lies in the bits that rounding drops.
    kernel.view("uint32")[3, 9] = 0x7F800001
    kernel = ops.cast(kernel, kernel_dtype)
    result = compiled_linear()(ops.cast(x, "bfloat16"), kernel)
    result = ops.convert_to_numpy(ops.cast(result, "float32"))[0, 0]
    assert result[0] == np.inf and result[1] == -np.inf and np.isnan(result[2:]).all()


def float32_kernel(rng, n_out, n_in):
    """Random float32 values and every case of rounding them to bfloat16: exact
    ties (which go to the even neighbour, up or down), values either side of
    a tie, subnormals, and in row 0 the largest float, which rounds to infinity."""
    kernel = rng.normal(size=(n_out, n_in)).astype("float32")
    bits = kernel.view("uint32")
    for column, low_half in enumerate([0x8000, 0x7FFF, 0x8001]):
        bits[:, column] = (bits[:, column] & 0xFFFF0000) | low_half
    bits[:, 3] = rng.choice([0x00008000, 0x00018000, 0x80007FFF, 0x0001FFFF], size=n_out)
    bits[0, 4] = 0x7F7FFFFF
    return kernel


@pytest.mark.parametrize(
    "rows,n_out,n_in",
    [(1, 1030, 1024), (3, 1030, 1024), (8, 48, 32), (MOST, 64, 64)],
)
def test_a_float32_kernel_multiplies_as_its_bfloat16_cast(rows, n_out, n_in, monkeypatch):
    """mixed_bfloat16 keeps float32 weights; the kernel rounds each as it reads
    it, as the backend's cast rounds it, so the product has the very bits of
    the cast kernel's, on the kernel and off it (where `linear` casts)."""
    rows = rows_here(rows)
    rng = np.random.default_rng(rows)
    x = ops.cast(rng.normal(size=(rows, 1, n_in)), "bfloat16")
    kernel = ops.convert_to_tensor(float32_kernel(rng, n_out, n_in))
    cast = ops.cast(kernel, "bfloat16")
    for native_on in ["1", "0"]:
        monkeypatch.setenv(native.DISABLE_ENV, native_on)
        assert takes_the_kernel(x, kernel) == (native_on == "1")
        result = compiled_linear()(x, kernel)
        assert ops.dtype(result) == "bfloat16"
        result = ops.convert_to_numpy(ops.cast(result, "float32"))
        expected = ops.convert_to_numpy(ops.cast(compiled_linear()(x, cast), "float32"))
        assert np.isinf(expected[:, 0, 0]).all() and np.isfinite(expected[:, 0, 1:]).all()
        np.testing.assert_array_equal(result, expected)


# Decoding on torch: every x-row block, a tail of kernel rows after the
# threads' shares (1030 rows) and one thread (48 rows).
@pytest.mark.parametrize(
    "rows,n_out,n_in",
    [(1, 1030, 1024), (3, 48, 32), (8, 1030, 1024), (MOST, 48, 64)],
)
def test_float32_products_on_torch(rows, n_out, n_in, monkeypatch):
    """torch's float32 decoding takes the kernel, which multiplies float32 as
    it is: within float32 rounding of the exact product, as torch's own
    product is. XLA reads float32 at full speed: JAX and TensorFlow keep it."""
    rows = rows_here(rows, float32=True)
    rng = np.random.default_rng(rows)
    x, kernel = rng.normal(size=(rows, 1, n_in)), rng.normal(size=(n_out, n_in))
    x, kernel = (t.astype("float32") for t in (x, kernel))
    exact = np.einsum("rsi,oi->rso", x.astype("float64"), kernel.astype("float64"))
    # Each sum in float32: off by at most n_in roundings (2^-24 each) of its
    # terms' magnitudes; summed in blocks, by far less.
    bound = n_in * 2.0**-24 * np.einsum("rsi,oi->rso", np.abs(x), np.abs(kernel))
    x, kernel = ops.convert_to_tensor(x), ops.convert_to_tensor(kernel)
    for native_on in ["1", "0"]:
        monkeypatch.setenv(native.DISABLE_ENV, native_on)
        assert takes_the_kernel(x, kernel) == (backends.name() == "torch" and native_on == "1")
        result = compiled_linear()(x, kernel)
        assert ops.dtype(result) == "float32"
        assert np.all(np.abs(ops.convert_to_numpy(result) - exact) <= bound)


def test_more_float32_rows_take_torchs_product():
    x = ops.ones((backends.native_max_rows(float32=True) + 1, 1, 64))
    assert not takes_the_kernel(x, ops.ones((24, 64)))


@pytest.mark.parametrize(
    "shape,reason",
    [
        ((MOST, 1, 64), "more rows than a short prefill"),
        ((1, 1, 40), "a width 16 does not divide"),
    ],
)
def test_other_products_take_the_backends(shape, reason):
    if shape[0] == MOST:
        shape = (backends.native_max_rows() + 1, *shape[1:])
    x, kernel, (x_exact, kernel_exact) = bfloat16_pair(
        np.random.default_rng(6), shape, (24, shape[-1])
    )
    assert not takes_the_kernel(x, kernel), reason
    assert_bfloat16_result(
        compiled_linear()(x, kernel), np.einsum("rsi,oi->rso", x_exact, kernel_exact)
    )


def test_turned_off_by_the_environment(monkeypatch):
    x, kernel, _ = bfloat16_pair(np.random.default_rng(7), (1, 1, 64), (24, 64))
    monkeypatch.setenv(native.DISABLE_ENV, "0")
    assert not takes_the_kernel(x, kernel)


def test_gradients_are_the_plain_products():
    """On JAX the kernel's gradients are the plain products'; on torch a
    product that autograd records takes torch's own, which has them."""
    if backends.name() == "tensorflow":
        pytest.skip("TensorFlow takes the kernel only in generate's decode steps")
    if backends.name() == "torch":
        import torch

        x, kernel, _ = bfloat16_pair(np.random.default_rng(8), (2, 1, 64), (24, 64))
        kernel.requires_grad_()
        ops.sum(ops.cast(backends.linear(x, kernel), "float32") ** 2).backward()
        expected = torch.autograd.grad(
            ops.sum(ops.cast(torch.nn.functional.linear(x, kernel), "float32") ** 2), kernel
        )[0]
        torch.testing.assert_close(kernel.grad, expected)
        return
    import jax

    x, kernel, _ = bfloat16_pair(np.random.default_rng(8), (2, 1, 64), (24, 64))

    def loss(linear):
        return lambda x, kernel: ops.sum(ops.cast(linear(x, kernel), "float32") ** 2)

    ours = jax.grad(loss(backends.linear), argnums=(0, 1))(x, kernel)
    plain = jax.grad(loss(lambda x, k: ops.einsum("bri,oi->bro", x, k)), argnums=(0, 1))(x, kernel)
    for a, b in zip(ours, plain, strict=True):
        a, b = (ops.convert_to_numpy(ops.cast(t, "float32")) for t in (a, b))
        np.testing.assert_allclose(a, b, rtol=0, atol=0.02 * np.abs(b).max())


def test_greedy_bfloat16_generation_equals_the_uncached_argmax(tokenizer_proto):
    """Decoding multiplies through the kernel, the uncached forward pass (rows
    of 20 tokens) through the backend's compiled product: the same tokens."""
    from test_generation import PROMPTS, argmax_loop, make_model

    model = make_model("gemma2", tokenizer_proto, dtype="bfloat16")
    prompts = [model.tokenizer.encode(p) for p in PROMPTS]
    forward = model
    if backends.name() == "tensorflow":
        import tensorflow as tf

        # TensorFlow's eager bfloat16 products round partial sums to bfloat16;
        # XLA's, like generate's prefill and the kernel, sum in float32.
        forward = tf.function(model, jit_compile=True)
    assert model.generate(prompts, max_new_tokens=8) == argmax_loop(model, prompts, 8, forward)


def test_a_failed_build_warns_and_leaves_nothing(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("GEMMA_KERAS_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", shutil.which("false"))
    native.load.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="gemma_keras.native"):
            assert native.load(include_dir()) is None
    finally:
        native.load.cache_clear()
    assert "cpu_kernels.cc failed" in caplog.text
    assert list((tmp_path / "kernels").iterdir()) == []


def test_the_build_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("GEMMA_KERAS_CACHE", str(tmp_path))
    compiler = shutil.which("c++") or shutil.which("g++")
    built = native._build(compiler)
    stamp = built.stat().st_mtime_ns
    assert native._build(compiler) == built and built.stat().st_mtime_ns == stamp
    assert [p.name for p in (tmp_path / "kernels").iterdir()] == [built.name]


def test_independent_products_in_one_graph():
    """XLA may run independent products at the same time, each asking its
    thread pool for help; none may wait on help that never comes."""
    if backends.name() != "jax":
        pytest.skip("XLA's thread pool")
    import jax

    rng = np.random.default_rng(9)
    x, _, (x_exact, _) = bfloat16_pair(rng, (1, 1, 1024), (1, 1024))
    kernels = [bfloat16_pair(rng, (1, 1024), (1100, 1024)) for _ in range(4)]

    products = jax.jit(lambda x, *ks: [backends.linear(x, k) for k in ks])
    results = products(x, *[kernel for _, kernel, _ in kernels])
    for result, (_, _, (_, kernel_exact)) in zip(results, kernels, strict=True):
        assert_bfloat16_result(result, np.einsum("bri,oi->bro", x_exact, kernel_exact))


def test_products_from_several_threads():
    """Products called from several Python threads at once (the kernel's own
    threads serve one product at a time) each get their own result."""
    if backends.name() != "torch":
        pytest.skip("torch calls the kernel on threads of its own")
    rng = np.random.default_rng(10)
    x, _, (x_exact, _) = bfloat16_pair(rng, (1, 1, 1024), (1, 1024))
    kernels = [bfloat16_pair(rng, (1, 1024), (1100 + 8 * i, 1024)) for i in range(4)]
    results = [None] * len(kernels)

    def multiply(i):
        for _ in range(20):
            results[i] = compiled_linear()(x, kernels[i][1])

    threads = [threading.Thread(target=multiply, args=(i,)) for i in range(len(kernels))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for result, (_, _, (_, kernel_exact)) in zip(results, kernels, strict=True):
        assert_bfloat16_result(result, np.einsum("bri,oi->bro", x_exact, kernel_exact))


def native_rows_at_most(rows, monkeypatch):
    """The kernel takes up to `rows` rows, whatever this CPU's limit."""
    monkeypatch.setattr(dispatch, "native_max_rows", lambda cpu_features, float32=False: rows)


@pytest.mark.parametrize("mode", ["bf16", "int4"])
def test_torch_operators_give_the_same_bits_on_any_thread_count(mode):
    """The torch operators run on torch's intra-op threads, as many as it has:
    each output is one thread's sum, so one thread or two give the same bits."""
    if backends.name() != "torch":
        pytest.skip("torch's operators")
    import torch

    from gemma_keras import quantization

    if backends.implementation.native_linear() is None:
        pytest.skip("the native kernel cannot be built here")
    rng = np.random.default_rng(0)
    # Over 128 KB of kernel, so that the product is shared between threads.
    weight = rng.normal(size=(4096, 1024)).astype(np.float32)
    x = torch.from_numpy(rng.normal(size=(3, 1024)).astype(np.float32))
    if mode == "bf16":
        kernel = torch.from_numpy(weight)

        def product():
            return torch.ops.gemma_keras.bf16_linear(x, kernel, 2)
    else:
        quantized = quantization.quantize(weight, "int4", group_size=32)
        parts = (quantized.kernel, quantized.scale, quantized.offset)
        arrays = [torch.from_numpy(a) for a in parts]

        def product():
            return torch.ops.gemma_keras.int4_linear(x, arrays, 2)[0]

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        on_two = product()
        torch.set_num_threads(1)
        on_one = product()
    finally:
        torch.set_num_threads(before)
    assert torch.equal(on_one, on_two)
    if mode == "bf16":
        np.testing.assert_allclose(on_two.numpy(), x.numpy() @ weight.T, rtol=1e-4, atol=1e-3)


def test_tensorflow_steps_without_xla_on_the_kernel(tokenizer_proto, monkeypatch):
    """On TensorFlow a step of up to `native_max_rows()` tokens (each decode
    step, a short prefill) is traced without XLA, on the kernel; a longer
    prefill is compiled by XLA."""
    if backends.name() != "tensorflow":
        pytest.skip("TensorFlow's XLA takes no custom call")
    from test_generation import make_model

    model = make_model("gemma1_mqa", tokenizer_proto, dtype="bfloat16")
    traced = []
    original = backends.implementation.native_step

    def recording(function, specs):
        traced.append(original(function, specs))
        return traced[-1]

    monkeypatch.setattr(backends.implementation, "native_step", recording)
    native_rows_at_most(8, monkeypatch)
    prompt = "the cat sat on the mat " * 3
    assert len(model.tokenizer.encode(prompt)) > backends.native_max_rows()
    model.generate([prompt, "the cat"], max_new_tokens=3)
    # One step shape without XLA (batch 2, one token), traced once.
    assert len(traced) == 1
    operations = {operation.type for operation in traced[0].graph.get_operations()}
    assert "GemmaBf16Linear" in operations

    traced.clear()
    native_rows_at_most(64, monkeypatch)
    assert len(model.tokenizer.encode(prompt)) <= backends.native_max_rows()
    model.generate(prompt, max_new_tokens=3)
    # The prefill and the decode step (batch 1), both on the kernel.
    assert len(traced) == 2 and all(traced)


def test_the_torch_operator_names_what_it_takes():
    """The operator checks its inputs itself, so a wrong call fails with a
    message rather than reading past a tensor."""
    if backends.name() != "torch":
        pytest.skip("the torch operator")
    import torch

    operator = native.load_torch()
    kernel = torch.zeros(32, 24, dtype=torch.bfloat16)
    shapes = r"n_in a multiple of 16.*\[1, 24\] and BFloat16 \[32, 24\]"
    with pytest.raises(RuntimeError, match=shapes):
        operator(torch.zeros(1, 24, dtype=torch.bfloat16), kernel, 1)
    with pytest.raises(RuntimeError, match="or float32 x with a float32 kernel"):
        operator(torch.zeros(1, 32), torch.zeros(8, 32, dtype=torch.bfloat16), 1)
    with pytest.raises(RuntimeError, match="takes bfloat16 x"):
        operator(torch.zeros(1, 32, dtype=torch.float16), torch.zeros(8, 32), 1)


def test_the_tensorflow_operation_names_what_it_takes():
    """The operation checks its inputs itself, so a wrong call fails with a
    message rather than reading past a tensor; it keeps the leading axes of x."""
    if backends.name() != "tensorflow":
        pytest.skip("the TensorFlow operation")
    import tensorflow as tf

    operation = backends.implementation.native_linear()
    kernel = tf.zeros((32, 24), tf.bfloat16)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"n_in a multiple of 16.*\[32,24\]"):
        operation(tf.zeros((1, 24), tf.bfloat16), kernel)
    with pytest.raises((TypeError, tf.errors.InvalidArgumentError), match="float"):
        operation(tf.zeros((1, 32), tf.float32), tf.zeros((8, 32), tf.bfloat16))
    out = operation(tf.ones((2, 3, 32), tf.bfloat16), tf.ones((8, 32), tf.bfloat16))
    assert out.shape == (2, 3, 8) and out.dtype == tf.bfloat16
    np.testing.assert_array_equal(ops.convert_to_numpy(ops.cast(out, "float32")), 32.0)
