"""The backend-dispatched products keep their meaning in every dtype and shape."""

import numpy as np
import pytest
from keras import ops

from gemma_keras import backends
from gemma_keras.backends import dispatch, einsum, linear


def bfloat16_pair(rng, shape_a, shape_b):
    """Two bfloat16 tensors and their exact values as float64."""
    a = ops.cast(rng.normal(size=shape_a), "bfloat16")
    b = ops.cast(rng.normal(size=shape_b), "bfloat16")
    exact = [ops.convert_to_numpy(ops.cast(t, "float32")).astype(np.float64) for t in (a, b)]
    return a, b, exact


def assert_bfloat16_result(result, expected):
    assert ops.dtype(result) == "bfloat16"
    result = ops.convert_to_numpy(ops.cast(result, "float32"))
    # One rounding of the result to bfloat16 is 2^-9 relative; 1% of the largest
    # entry allows the accumulation order of any kernel but not a wrong product.
    np.testing.assert_allclose(result, expected, rtol=0, atol=0.01 * np.abs(expected).max())


# 1 row takes torch's bf16 matrix-vector kernel, and TensorFlow's doubled row
# from 4096 inputs on; 40 rows and more (a prefill) torch's float32 route on
# CPUs without AVX512; 2 and 8 rows are batched decoding.
@pytest.mark.parametrize(
    "batch,length,width",
    [(1, 1, 64), (2, 1, 64), (8, 1, 64), (1, 40, 64), (4, 40, 64), (1, 1, 4096)],
)
def test_bfloat16_linear_is_the_product_of_its_inputs(batch, length, width):
    x, kernel, (x_exact, kernel_exact) = bfloat16_pair(
        np.random.default_rng(0), (batch, length, width), (48, width)
    )
    assert_bfloat16_result(linear(x, kernel), np.einsum("bri,oi->bro", x_exact, kernel_exact))


def test_bfloat16_einsum_is_the_product_of_its_inputs():
    equation = "bskgh,btkh->bkgst"
    query, keys, (query_exact, keys_exact) = bfloat16_pair(
        np.random.default_rng(1), (2, 40, 1, 4, 16), (2, 40, 1, 16)
    )
    assert_bfloat16_result(
        einsum(equation, query, keys), np.einsum(equation, query_exact, keys_exact)
    )


def test_bfloat16_matrix_vector_rounds_as_the_dot_does():
    """One bfloat16 row takes JAX's multiply-and-sum route: it differs from
    the dot only in the order of its float32 sums, so by at most one
    bfloat16 step (2^-8 relative) where a sum lands near a rounding edge."""
    x, kernel, _ = bfloat16_pair(np.random.default_rng(2), (1, 1, 640), (1000, 640))
    result = ops.convert_to_numpy(ops.cast(linear(x, kernel), "float32"))
    dot = ops.convert_to_numpy(ops.cast(ops.einsum("bri,oi->bro", x, kernel), "float32"))
    np.testing.assert_allclose(result, dot, rtol=2**-8, atol=0)
    assert np.mean(result == dot) > 0.9


@pytest.mark.skipif(backends.name() == "jax", reason="XLA drops axes of size 1 itself")
@pytest.mark.parametrize(
    "equation, a_shape, b_shape",
    [
        ("bskgh,btkh->bkgst", (1, 1, 1, 4, 8), (1, 6, 1, 8)),  # decoding, one KV head
        ("bkgst,btkh->bskgh", (1, 1, 4, 1, 6), (1, 6, 1, 8)),
        ("bskgh,btkh->bkgst", (2, 1, 2, 3, 8), (2, 6, 2, 8)),  # a batch, two KV heads
        ("bkgst,btkh->bskgh", (1, 2, 1, 3, 6), (1, 6, 2, 8)),  # one query per KV head
        ("bskgh,btkh->bkgst", (1, 5, 1, 4, 8), (1, 6, 1, 8)),  # a prefill
        ("ij,kj->ki", (3, 8), (5, 8)),  # the transposed product
        ("ij,ij->i", (3, 8), (3, 8)),  # no matrix product
    ],
)
def test_einsum_without_unit_axes(equation, a_shape, b_shape):
    """The form of TensorFlow's steps without XLA and of torch's traced steps."""
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=a_shape).astype(np.float32), rng.normal(size=b_shape).astype(np.float32)
    squeezed = backends.implementation._einsum_without_unit_axes
    if backends.name() == "tensorflow":
        import tensorflow as tf

        graph = tf.function(lambda a, b: squeezed(equation, a, b)).get_concrete_function(
            tf.TensorSpec(a_shape), tf.TensorSpec(b_shape)
        )
        result = graph(a, b)
        operations = {node.type for node in graph.graph.get_operations()}
        matrix_product = "MatMul" in operations
    else:
        import torch

        with backends.implementation.quiet_torch_jit():  # as the step's trace is
            traced = torch.jit.trace(
                lambda a, b: squeezed(equation, a, b), (ops.array(a), ops.array(b))
            )
        result = traced(ops.array(a), ops.array(b))
        matrix_product = any(node.kind() == "aten::matmul" for node in traced.graph.nodes())
    np.testing.assert_allclose(
        ops.convert_to_numpy(result), np.einsum(equation, a, b), rtol=1e-5, atol=1e-5
    )
    if equation.startswith("bskgh") and a_shape[1] == a_shape[2] == 1:
        assert matrix_product


def traced_without_xla(function, shapes, monkeypatch):
    """`function` of float32 tensors of `shapes`, traced as TensorFlow traces a
    step without XLA: (the types of its operations, the concrete function)."""
    if backends.name() != "tensorflow":
        pytest.skip("TensorFlow's step without XLA")
    import tensorflow as tf

    monkeypatch.setattr(
        backends.implementation._tracing_without_xla, "native_products", [], raising=False
    )
    specs = [tf.TensorSpec(shape) for shape in shapes]
    concrete = tf.function(function).get_concrete_function(*specs)
    return {operation.type for operation in concrete.graph.get_operations()}, concrete


@pytest.mark.parametrize("without_xla", [False, True])
def test_write_slots_is_a_slice_update(without_xla, monkeypatch):
    """The cache's write; TensorFlow's step without XLA takes a scatter."""
    cache = np.arange(2 * 6 * 3, dtype=np.float32).reshape(2, 6, 3)
    new = -np.arange(2 * 2 * 3, dtype=np.float32).reshape(2, 2, 3)
    expected = cache.copy()
    expected[:, 3:5] = new
    if without_xla:
        operations, write = traced_without_xla(
            lambda cache, new: backends.write_slots(cache, 3, new),
            [cache.shape, new.shape],
            monkeypatch,
        )
        assert "TensorScatterUpdate" in operations
        written = write(cache, new)
    else:
        written = backends.write_slots(ops.array(cache), 3, ops.array(new))
    np.testing.assert_array_equal(ops.convert_to_numpy(written), expected)


@pytest.mark.parametrize("without_xla", [False, True])
def test_softmax_is_keras_softmax(without_xla, monkeypatch):
    """Attention's softmax, masked logits included; TensorFlow's step without
    XLA writes it out as exp and sums (no oneDNN `Softmax` operation)."""
    rng = np.random.default_rng(3)
    logits = rng.standard_normal((2, 1, 4, 3, 9)).astype(np.float32) * 30
    logits[..., :4] = -3.4e38  # attention's masked logit
    expected = ops.convert_to_numpy(ops.softmax(ops.array(logits), axis=-1))
    if without_xla:
        operations, softmax = traced_without_xla(backends.softmax, [logits.shape], monkeypatch)
        assert not {"Softmax", "_MklSoftmax"} & operations
        probabilities = softmax(logits)
    else:
        probabilities = backends.softmax(ops.array(logits))
    np.testing.assert_allclose(ops.convert_to_numpy(probabilities), expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("without_xla", [False, True])
def test_swap_halves_is_a_roll_by_half(without_xla, monkeypatch):
    """RoPE's rotate-half; TensorFlow's step without XLA takes two slices and
    a concatenation (no `Roll` operation)."""
    x = np.random.default_rng(4).standard_normal((2, 1, 3, 8)).astype(np.float32)
    expected = np.concatenate([x[..., 4:], x[..., :4]], axis=-1)
    if without_xla:
        operations, swap = traced_without_xla(backends.swap_halves, [x.shape], monkeypatch)
        assert "Roll" not in operations
        swapped = swap(x)
    else:
        swapped = backends.swap_halves(ops.array(x))
    np.testing.assert_array_equal(ops.convert_to_numpy(swapped), expected)


@pytest.mark.skipif(backends.name() != "jax", reason="the integer rounding is JAX's route")
def test_round_to_bfloat16_equals_a_conversion():
    rng = np.random.default_rng(3)
    values = np.concatenate(
        [
            rng.normal(size=10000) * 10.0 ** rng.integers(-40, 38, size=10000),
            # exact ties between two bfloat16 values, to both even neighbours
            np.array([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 2**-130 * 3]),
            np.array([0.0, -0.0, np.inf, -np.inf, 3.4e38, -3.4e38, 1e-45]),
        ]
    ).astype(np.float32)
    rounded = backends.implementation.round_to_bfloat16(ops.convert_to_tensor(values))
    expected = ops.cast(ops.convert_to_tensor(values), "bfloat16")
    np.testing.assert_array_equal(
        ops.convert_to_numpy(ops.cast(rounded, "float32")),
        ops.convert_to_numpy(ops.cast(expected, "float32")),
    )
    nan = backends.implementation.round_to_bfloat16(
        ops.convert_to_tensor(np.array([np.nan], np.float32))
    )
    assert np.isnan(ops.convert_to_numpy(ops.cast(nan, "float32"))).all()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_take_rows_is_an_embedding_lookup(dtype):
    table = np.random.default_rng(4).normal(size=(50, 8)).astype(np.float32)
    ids = np.array([[3, 0, 49], [7, 7, 1]])
    rows = backends.take_rows(ops.cast(table, dtype), ops.convert_to_tensor(ids, "int32"))
    assert ops.dtype(rows) == dtype
    expected = ops.convert_to_numpy(ops.cast(ops.cast(table, dtype), "float32"))[ids]
    np.testing.assert_array_equal(ops.convert_to_numpy(ops.cast(rows, "float32")), expected)


def test_linear_traced_with_an_unknown_batch_size():
    """A graph traced for any batch size (Keras' `predict`, a SavedModel) has
    no static row count to choose a product by."""
    import keras

    x, kernel, (x_exact, kernel_exact) = bfloat16_pair(
        np.random.default_rng(5), (3, 1, 64), (48, 64)
    )
    inputs = keras.Input(shape=(1, 64), dtype="bfloat16")
    model = keras.Model(
        inputs, keras.layers.Lambda(lambda t: linear(t, kernel), dtype="bfloat16")(inputs)
    )
    assert_bfloat16_result(
        model.predict(x, verbose=0), np.einsum("bri,oi->bro", x_exact, kernel_exact)
    )


# The dispatcher: one pure function of the backend, the platform and the CPU's
# features, so that a GPU's and a TPU's choices are checked on this CPU.
DTYPE_PAIRS = {
    "float32": ("float32", "float32"),
    "bfloat16": ("bfloat16", "bfloat16"),
    "mixed_bfloat16": ("bfloat16", "float32"),
}
OWN_PRODUCT = {"jax": dispatch.DOT, "tensorflow": dispatch.MATMUL, "torch": dispatch.LINEAR}


def features_that_record(asked):
    """Every CPU feature present, each question appended to `asked`."""
    names = ["native_kernel", "avx512_bf16", "avx512"]
    probes = {name: (lambda name=name: asked.append(name) or True) for name in names}
    return dispatch.CpuFeatures(**probes)


@pytest.mark.parametrize("platform", ["gpu", "tpu"])
@pytest.mark.parametrize("backend_name", dispatch.BACKENDS)
def test_no_cpu_only_product_on_a_gpu_or_tpu(backend_name, platform):
    """Whatever the dtypes, rows and widths, a GPU or TPU gets the backend's
    own product, einsum and compiled step, and no CPU feature is even asked
    about (answering may build the native kernel)."""
    asked = []
    features = features_that_record(asked)
    for rows in [*range(1, 513), None]:
        for records_gradient, without_xla in [(False, False), (True, False), (False, True)]:
            for generating in (False, True):
                quantized = dispatch.choose_quantized_product(
                    backend_name,
                    platform,
                    rows,
                    features,
                    records_gradient=records_gradient,
                    without_xla=without_xla,
                    generating=generating,
                )
                assert quantized == dispatch.DEQUANTIZED
        if rows is not None:
            step = dispatch.choose_step(backend_name, platform, BF16, rows, features, True)
            assert step not in dispatch.CPU_ONLY
    for x_dtype, kernel_dtype in DTYPE_PAIRS.values():
        for rows in [*range(1, 513), None]:
            for width in (40, 64, 2048, 4096):
                for records_gradient, without_xla in [(False, False), (True, False), (False, True)]:
                    product = dispatch.choose_product(
                        backend_name,
                        platform,
                        x_dtype,
                        kernel_dtype,
                        rows,
                        width,
                        features,
                        records_gradient=records_gradient,
                        without_xla=without_xla,
                    )
                    assert product not in dispatch.CPU_ONLY
                    assert product == OWN_PRODUCT[backend_name]
            if rows is not None:
                step = dispatch.choose_step(backend_name, platform, x_dtype, rows, features)
                assert step not in dispatch.CPU_ONLY
        for without_xla in (False, True):
            einsum_choice = dispatch.choose_einsum(
                backend_name, platform, x_dtype, kernel_dtype, features, without_xla=without_xla
            )
            assert einsum_choice == dispatch.EINSUM
    assert asked == []


NATIVE = frozenset({"native_kernel"})  # this machine: AVX2, no AVX512
NATIVE_AVX512 = frozenset({"native_kernel", "avx512"})
NATIVE_BFLOAT16_DOT = frozenset({"native_kernel", "avx512", "avx512_bf16"})
NO_KERNEL = frozenset()
BF16, F32 = "bfloat16", "float32"
NATIVE_KERNEL, ACCUMULATED = dispatch.NATIVE_KERNEL, dispatch.DOT_FLOAT32_ACCUMULATED
WITHOUT_XLA, GRADIENT = {"without_xla": True}, {"records_gradient": True}


# (backend, x dtype, kernel dtype, rows, width, CPU features, options, product):
# the CPU products as measured fastest (docs/performance.md).
@pytest.mark.parametrize(
    "backend_name,x_dtype,kernel_dtype,rows,width,features,options,product",
    [
        ("jax", BF16, BF16, 1, 2048, NATIVE, {}, NATIVE_KERNEL),
        ("jax", BF16, F32, 128, 2048, NATIVE, {}, NATIVE_KERNEL),
        ("jax", BF16, BF16, 129, 2048, NATIVE, {}, ACCUMULATED),
        ("jax", BF16, BF16, 8, 2048, NATIVE_BFLOAT16_DOT, {}, NATIVE_KERNEL),
        ("jax", BF16, BF16, 9, 2048, NATIVE_BFLOAT16_DOT, {}, ACCUMULATED),
        ("jax", BF16, BF16, 1, 40, NATIVE, {}, dispatch.MULTIPLY_AND_SUM),
        ("jax", BF16, BF16, 1, 2048, NO_KERNEL, {}, dispatch.MULTIPLY_AND_SUM),
        ("jax", BF16, BF16, None, 2048, NATIVE, {}, ACCUMULATED),
        ("jax", F32, F32, 1, 2048, NATIVE, {}, dispatch.DOT),
        ("tensorflow", BF16, BF16, 1, 2048, NATIVE, {}, dispatch.MATMUL),
        (
            "tensorflow",
            BF16,
            BF16,
            1,
            4096,
            NATIVE,
            {},
            dispatch.DOUBLED_ROW_DOT_FLOAT32_ACCUMULATED,
        ),
        ("tensorflow", BF16, BF16, 32, 2048, NATIVE, {}, ACCUMULATED),
        ("tensorflow", BF16, BF16, 33, 2048, NATIVE, {}, dispatch.MATMUL),
        ("tensorflow", BF16, BF16, None, 2048, NATIVE, {}, dispatch.MATMUL),
        ("tensorflow", BF16, F32, 128, 2048, NATIVE, WITHOUT_XLA, NATIVE_KERNEL),
        ("tensorflow", BF16, BF16, 2, 40, NATIVE, WITHOUT_XLA, ACCUMULATED),
        ("tensorflow", F32, F32, 1, 2048, NATIVE, WITHOUT_XLA, dispatch.MATMUL),
        ("torch", F32, F32, 16, 2048, NATIVE, {}, NATIVE_KERNEL),
        ("torch", F32, F32, 17, 2048, NATIVE, {}, dispatch.ONEDNN_INNER_PRODUCT),
        ("torch", F32, F32, 1, 2048, NATIVE, GRADIENT, dispatch.LINEAR),
        ("torch", BF16, BF16, 128, 2048, NATIVE, {}, NATIVE_KERNEL),
        ("torch", BF16, BF16, 129, 2048, NATIVE, {}, dispatch.ONEDNN_INNER_PRODUCT_IN_FLOAT32),
        ("torch", BF16, F32, 40, 2048, NATIVE, GRADIENT, dispatch.LINEAR_IN_FLOAT32),
        ("torch", BF16, BF16, 31, 2048, NO_KERNEL, {}, dispatch.LINEAR),
        ("torch", BF16, BF16, 512, 2048, NATIVE_AVX512, {}, dispatch.LINEAR),
        ("torch", BF16, BF16, 8, 2048, NATIVE_BFLOAT16_DOT, {}, NATIVE_KERNEL),
        ("torch", BF16, BF16, 9, 2048, NATIVE_BFLOAT16_DOT, {}, dispatch.LINEAR),
    ],
)
def test_cpu_products(backend_name, x_dtype, kernel_dtype, rows, width, features, options, product):
    chosen = dispatch.choose_product(
        backend_name, "cpu", x_dtype, kernel_dtype, rows, width, features, **options
    )
    assert chosen == product


def test_cpu_einsums_and_steps():
    assert dispatch.choose_einsum("torch", "cpu", BF16, BF16, NATIVE) == dispatch.EINSUM_IN_FLOAT32
    assert dispatch.choose_einsum("torch", "cpu", BF16, BF16, NATIVE_AVX512) == dispatch.EINSUM
    tensorflow_without_xla = dispatch.choose_einsum(
        "tensorflow", "cpu", BF16, BF16, NATIVE, without_xla=True
    )
    assert tensorflow_without_xla == dispatch.EINSUM_IN_FLOAT32
    assert dispatch.choose_einsum("jax", "cpu", BF16, BF16, NATIVE) == dispatch.EINSUM
    assert dispatch.choose_step("tensorflow", "cpu", BF16, 128, NATIVE) == dispatch.STEP_WITHOUT_XLA
    assert dispatch.choose_step("tensorflow", "cpu", BF16, 129, NATIVE) == dispatch.STEP_XLA
    assert dispatch.choose_step("tensorflow", "cpu", BF16, 8, NO_KERNEL) == dispatch.STEP_XLA
    assert dispatch.choose_step("tensorflow", "cpu", F32, 1, NATIVE) == dispatch.STEP_XLA
    assert dispatch.choose_step("torch", "cpu", BF16, 1, NATIVE) == dispatch.STEP_TRACE
    assert dispatch.choose_step("jax", "cpu", BF16, 1, NATIVE) == dispatch.STEP_JIT


def test_cpu_quantized_products():
    """The native int8/int4 kernel takes decoding-sized products: up to 16
    rows where XLA dequantizes inside its step, and in a generation step up
    to 64 (a short prompt, where dequantized copies cost more than they
    save); up to 128 on torch (which dequantizes eagerly); never while torch
    records a gradient or inside TensorFlow's XLA."""
    kernel = frozenset({"native_quantized_kernel"})
    native, dequantized = dispatch.NATIVE_QUANTIZED_KERNEL, dispatch.DEQUANTIZED
    choose = dispatch.choose_quantized_product
    most, torch_most = dispatch.NATIVE_MAX_QUANTIZED_ROWS, dispatch.TORCH_NATIVE_MAX_QUANTIZED_ROWS
    generation_most = dispatch.NATIVE_MAX_QUANTIZED_GENERATION_ROWS
    assert most < generation_most
    assert choose("jax", "cpu", most, kernel) == native
    assert choose("jax", "cpu", most + 1, kernel) == dequantized
    assert choose("jax", "cpu", generation_most, kernel, generating=True) == native
    assert choose("jax", "cpu", generation_most + 1, kernel, generating=True) == dequantized
    assert choose("jax", "cpu", None, kernel) == dequantized
    assert choose("jax", "cpu", 1, NO_KERNEL) == dequantized
    for generating in (False, True):
        assert choose("torch", "cpu", torch_most, kernel, generating=generating) == native
        assert choose("torch", "cpu", torch_most + 1, kernel, generating=generating) == dequantized
    assert choose("torch", "cpu", 1, kernel, records_gradient=True) == dequantized
    assert choose("tensorflow", "cpu", most, kernel, without_xla=True) == native
    assert choose("tensorflow", "cpu", most + 1, kernel, without_xla=True) == dequantized
    got = choose("tensorflow", "cpu", generation_most, kernel, without_xla=True, generating=True)
    assert got == native
    assert choose("tensorflow", "cpu", 1, kernel) == dequantized
    step = dispatch.choose_step("tensorflow", "cpu", BF16, generation_most, kernel, quantized=True)
    assert step == dispatch.STEP_WITHOUT_XLA
    step = dispatch.choose_step(
        "tensorflow", "cpu", BF16, generation_most + 1, kernel, quantized=True
    )
    assert step == dispatch.STEP_XLA


def test_cpu_quantized_prefill_multiplies_in_bfloat16_only_while_generating():
    """More rows than the native kernel takes, in a generation step on a CPU
    with AVX512-BF16: the dequantized weight in bfloat16 (TensorFlow's step
    then runs without XLA, whose bfloat16 products are no faster). `score`,
    `fit` and calls (not generating), torch's autograd and a CPU without
    AVX512-BF16 keep the model's dtype."""
    features = frozenset({"native_quantized_kernel", "avx512_bf16"})
    bfloat16, dequantized = dispatch.DEQUANTIZED_BFLOAT16, dispatch.DEQUANTIZED
    native = dispatch.NATIVE_QUANTIZED_KERNEL
    choose = dispatch.choose_quantized_product
    most_rows = dispatch.NATIVE_MAX_QUANTIZED_GENERATION_ROWS
    for backend_name, most in [
        ("jax", most_rows),
        ("torch", dispatch.TORCH_NATIVE_MAX_QUANTIZED_ROWS),
        ("tensorflow", most_rows),
    ]:
        without_xla = backend_name == "tensorflow"
        for rows in (most + 1, 512, None):
            assert (
                choose(backend_name, "cpu", rows, features, without_xla=without_xla) == dequantized
            )
            got = choose(
                backend_name, "cpu", rows, features, without_xla=without_xla, generating=True
            )
            assert got == bfloat16
            without_bf16 = frozenset({"native_quantized_kernel"})
            got = choose(
                backend_name, "cpu", rows, without_bf16, without_xla=without_xla, generating=True
            )
            assert got == dequantized
        got = choose(backend_name, "cpu", most, features, without_xla=without_xla, generating=True)
        assert got == native
    assert (
        choose("torch", "cpu", 512, features, records_gradient=True, generating=True) == dequantized
    )
    assert choose("tensorflow", "cpu", 512, features, generating=True) == dequantized
    step = dispatch.choose_step("tensorflow", "cpu", F32, 512, features, quantized=True)
    assert step == dispatch.STEP_WITHOUT_XLA
    step = dispatch.choose_step(
        "tensorflow", "cpu", F32, 512, frozenset({"native_quantized_kernel"}), quantized=True
    )
    assert step == dispatch.STEP_XLA


def test_an_unknown_backend_is_named():
    with pytest.raises(ValueError, match="backend is 'numpy'; gemma_keras runs on"):
        dispatch.choose_product("numpy", "cpu", F32, F32, 1, 64, NATIVE)


def test_tensors_here_are_on_the_cpu():
    """The platform the running backend reads off its tensors: this machine's CPU."""
    x = ops.ones((1, 4))
    assert backends.implementation.platform_of(x) == "cpu"


@pytest.mark.parametrize("policy", list(DTYPE_PAIRS))
def test_tensors_on_a_gpu_never_ask_the_cpu(policy, monkeypatch, tokenizer_proto):
    """With the running backend's tensors reported on a GPU, no product,
    einsum or compiled step asks a CPU feature (which would build the
    native kernel), and the backend's own products give the same results."""
    from test_generation import PROMPTS, argmax_loop, make_model

    def never(name):
        def probe():
            raise AssertionError(f"CPU feature {name!r} asked for tensors on a GPU")

        return probe

    monkeypatch.setattr(backends.implementation, "platform_of", lambda *tensors: "gpu")
    never_asked = {name: never(name) for name in ("native_kernel", "avx512_bf16", "avx512")}
    monkeypatch.setattr(
        backends.implementation, "cpu_features", dispatch.CpuFeatures(**never_asked)
    )
    x_dtype, kernel_dtype = DTYPE_PAIRS[policy]
    rng = np.random.default_rng(6)
    for rows in (1, 8, 40):
        x, kernel = rng.normal(size=(rows, 1, 64)), rng.normal(size=(48, 64))
        x_values, kernel_values = (
            ops.convert_to_numpy(ops.cast(ops.cast(t, x_dtype), "float32")) for t in (x, kernel)
        )
        exact = np.einsum("rsi,oi->rso", x_values, kernel_values)
        result = linear(ops.cast(x, x_dtype), ops.cast(kernel, kernel_dtype))
        assert ops.dtype(result) == x_dtype
        result = ops.convert_to_numpy(ops.cast(result, "float32"))
        np.testing.assert_allclose(result, exact, rtol=0, atol=0.01 * np.abs(exact).max())
    query, keys, _ = bfloat16_pair(rng, (2, 5, 1, 4, 16), (2, 5, 1, 16))
    einsum("bskgh,btkh->bkgst", query, keys)

    model = make_model("gemma1_mqa", tokenizer_proto, dtype=policy)
    prompts = [model.tokenizer.encode(p) for p in PROMPTS]
    forward = model
    if backends.name() == "tensorflow":
        import tensorflow as tf

        forward = tf.function(model, jit_compile=True)  # XLA's sums, as the steps' are
    assert model.generate(prompts, max_new_tokens=4) == argmax_loop(model, prompts, 4, forward)
