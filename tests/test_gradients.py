"""Every product a training step records has the plain product's gradient.

`backends.linear` picks a different product by backend, dtype and row count
(see its docstring), some of them fast paths with no gradient of their own:
oneDNN's inner product on torch, integer-op rounding and bit-cast lookups on
JAX, XLA's float32-accumulated dot and the native kernel's operation on
TensorFlow. Each case here differentiates one of them with the backend's own
autodiff (`jax.grad`, `tf.GradientTape`, torch autograd) and compares against
the gradient of `sum(linear(x, kernel) * upstream)` computed in NumPy from the
same values:

    d/dx      = upstream @ kernel      (the kernel rounded to bfloat16 where
    d/dkernel = upstream.T @ x          a mixed_bfloat16 product rounds it)

Tolerances: float32 products to 1e-5 of the largest entry (float32 sums in
another order); bfloat16 and mixed_bfloat16 to 2e-2 of it (a few bfloat16
steps of 2^-8: the gradient is rounded to bfloat16, and a backend may
accumulate it in bfloat16; measured here: at most 3e-3 on every backend).
A missing, transposed or zero gradient is off by the whole size of the
entries.
"""

import math

import keras
import numpy as np
import pytest
from keras import ops

from conftest import tiny_config
from gemma_keras import backends, native

BACKEND = backends.name()

# (x dtype, kernel dtype) of each dtype policy's products.
DTYPES = {
    "float32": ("float32", "float32"),
    "bfloat16": ("bfloat16", "bfloat16"),
    "mixed_bfloat16": ("bfloat16", "float32"),
}
# Largest gradient error, relative to the largest entry, by the dtype the
# product is computed in (see the module docstring).
TOLERANCE = {"float32": 1e-5, "bfloat16": 2e-2}

# Rows reach every product `linear` picks: 1 (matrix-vector products; JAX's
# multiply-and-sum), 4 and 8 (batched decoding: the native kernel, and
# TensorFlow's float32-accumulated dot), 40 (a prefill or a training batch:
# the backends' own products, oneDNN's on torch). One row of 4096 inputs is
# the row TensorFlow doubles to take XLA's bfloat16 dot.
SHAPES = [(1, 64, 48), (4, 64, 48), (8, 64, 48), (40, 64, 48), (1, 4096, 16)]


@pytest.fixture(params=["native", "no_native"])
def native_kernel(request, monkeypatch):
    """The native kernel on, or off as `GEMMA_KERAS_NATIVE=0` turns it off;
    `native.enabled()` reads the variable on every call."""
    monkeypatch.setenv(native.DISABLE_ENV, "1" if request.param == "native" else "0")
    return request.param == "native"


def to_numpy(tensor):
    return ops.convert_to_numpy(ops.cast(tensor, "float32")).astype(np.float64)


def bfloat16_exact(rng, shape):
    """Random float32 values that bfloat16 holds exactly, so that every dtype
    case multiplies the same numbers."""
    values = rng.normal(size=shape).astype(np.float32)
    return ops.convert_to_numpy(ops.cast(ops.cast(values, "bfloat16"), "float32"))


def value_and_gradients(function, inputs, upstream):
    """`(function(*inputs), [d sum(function(*inputs) * upstream) / d input])`
    by the backend's own autodiff, the product summed in float32."""

    def loss(*tensors):
        value = function(*tensors)
        return ops.sum(ops.multiply(ops.cast(value, "float32"), upstream)), value

    if BACKEND == "jax":
        import jax

        argnums = tuple(range(len(inputs)))
        gradients, value = jax.grad(loss, argnums=argnums, has_aux=True)(*inputs)
        return value, list(gradients)
    if BACKEND == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            tape.watch(inputs)
            total, value = loss(*inputs)
        return value, tape.gradient(total, inputs)
    import torch

    inputs = [tensor.detach().requires_grad_() for tensor in inputs]
    total, value = loss(*inputs)
    return value.detach(), list(torch.autograd.grad(total, inputs))


def forward_without_gradients(function, *inputs):
    if BACKEND == "torch":
        import torch

        with torch.no_grad():
            return function(*inputs)
    return function(*inputs)


def assert_gradient(gradient, expected, dtype, compute_dtype):
    assert gradient is not None, "no gradient"
    assert ops.dtype(gradient) == dtype
    tolerance = TOLERANCE[compute_dtype] * np.abs(expected).max()
    np.testing.assert_allclose(to_numpy(gradient), expected, rtol=0, atol=tolerance)


def takes_the_native_kernel_when_differentiated(x, kernel, upstream):
    """JAX: whether a compiled training step's forward pass calls the native
    kernel (the loss, not only its gradient, keeps the forward pass)."""
    import jax

    def loss(x, kernel):
        return ops.sum(ops.multiply(ops.cast(backends.linear(x, kernel), "float32"), upstream))

    lowered = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(x, kernel)
    return "gemma_bf16_linear" in lowered.as_text()


def linear_inputs(policy, rows, n_in, n_out):
    """`x` `[1, rows, n_in]` and `kernel` `[n_out, n_in]` in `policy`'s dtypes,
    their values and an upstream gradient `[1, rows, n_out]` in NumPy."""
    rng = np.random.default_rng(rows + n_in)
    x_values = bfloat16_exact(rng, (1, rows, n_in))
    kernel_values = bfloat16_exact(rng, (n_out, n_in))
    upstream = bfloat16_exact(rng, (1, rows, n_out))
    x_dtype, kernel_dtype = DTYPES[policy]
    x, kernel = ops.cast(x_values, x_dtype), ops.cast(kernel_values, kernel_dtype)
    return x, kernel, x_values, kernel_values, upstream


def assert_linear_gradients(gradients, x_values, kernel_values, upstream, policy):
    """`gradients` (d/dx, d/dkernel) are `upstream @ kernel` and `upstream.T @ x`."""
    x_dtype, kernel_dtype = DTYPES[policy]
    flat_x = x_values.reshape(-1, x_values.shape[-1]).astype(np.float64)
    flat_upstream = upstream.reshape(-1, upstream.shape[-1]).astype(np.float64)
    grad_x, grad_kernel = gradients
    expected_x = (flat_upstream @ kernel_values).reshape(x_values.shape)
    assert_gradient(grad_x, expected_x, x_dtype, x_dtype)
    assert_gradient(grad_kernel, flat_upstream.T @ flat_x, kernel_dtype, x_dtype)


@pytest.mark.parametrize("rows,n_in,n_out", SHAPES)
@pytest.mark.parametrize("policy", list(DTYPES))
def test_linear_gradients_are_the_plain_products(policy, rows, n_in, n_out, native_kernel):
    x, kernel, x_values, kernel_values, upstream = linear_inputs(policy, rows, n_in, n_out)

    value, gradients = value_and_gradients(backends.linear, [x, kernel], upstream)

    assert_linear_gradients(gradients, x_values, kernel_values, upstream, policy)
    # The forward pass that records the gradient is the one inference runs:
    # the same bits on JAX (the native kernel's custom gradient keeps it in the
    # forward pass) and TensorFlow (the same product, eager). On torch a
    # recorded product steps aside from the native kernel and oneDNN's inner
    # product, which have no autograd, to torch's `F.linear`: the same
    # product up to the order of its float32 sums.
    x_dtype = DTYPES[policy][0]
    plain = forward_without_gradients(backends.linear, x, kernel)
    assert ops.dtype(value) == x_dtype
    if BACKEND == "torch":
        assert_gradient(value, to_numpy(plain), x_dtype, x_dtype)
    else:
        np.testing.assert_array_equal(to_numpy(value), to_numpy(plain))

    if BACKEND == "jax":
        fits = x_dtype == "bfloat16" and n_in % 16 == 0 and rows <= backends.native_max_rows()
        builds = backends.implementation.native_linear() is not None
        expected_native = native_kernel and fits and builds
        assert takes_the_native_kernel_when_differentiated(x, kernel, upstream) == expected_native


@pytest.mark.skipif(BACKEND != "torch", reason="torch's route on CPUs without AVX512")
@pytest.mark.parametrize("policy", ["bfloat16", "mixed_bfloat16"])
def test_torch_float32_route_without_avx512_has_the_plain_gradient(policy, monkeypatch):
    """On a CPU without AVX512 torch multiplies bfloat16 products of 32 rows
    or more, and einsums, in float32 (see `linear`, `einsum`); on such a CPU,
    which this one poses as, they have the plain products' gradients."""
    import torch

    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    x, kernel, x_values, kernel_values, upstream = linear_inputs(policy, 40, 64, 48)

    _, gradients = value_and_gradients(backends.linear, [x, kernel], upstream)

    assert_linear_gradients(gradients, x_values, kernel_values, upstream, policy)
    assert_einsum_gradients("bskgh,btkh->bkgst", (2, 5, 1, 4, 16), (2, 7, 1, 16), "bfloat16")


@pytest.mark.skipif(BACKEND != "tensorflow", reason="only TensorFlow runs the native operation")
@pytest.mark.parametrize("policy", ["bfloat16", "mixed_bfloat16"])
def test_tensorflow_native_operation_has_the_plain_gradient(policy):
    """`GemmaBf16Linear` runs in steps traced without XLA (generate's decode
    steps); differentiated there, it has the plain product's gradient."""
    import tensorflow as tf

    if backends.implementation.native_linear() is None:
        pytest.skip("the native operation cannot be built here")
    x, kernel, x_values, kernel_values, upstream = linear_inputs(policy, 2, 64, 48)

    def gradients(x, kernel):
        with tf.GradientTape() as tape:
            tape.watch([x, kernel])
            total = tf.reduce_sum(tf.cast(backends.linear(x, kernel), tf.float32) * upstream)
        return tape.gradient(total, [x, kernel])

    specs = [tf.TensorSpec(x.shape, x.dtype), tf.TensorSpec(kernel.shape, kernel.dtype)]
    traced = backends.implementation.native_step(tf.function(gradients), specs)
    assert traced is not None, "the product did not take the native operation"
    assert "GemmaBf16Linear" in {op.type for op in traced.graph.get_operations()}
    assert_linear_gradients(traced(x, kernel), x_values, kernel_values, upstream, policy)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_take_rows_gradient_adds_up_the_rows(dtype):
    """The embedding lookup's gradient scatters each row's upstream gradient
    into its table row, adding where an id repeats."""
    rng = np.random.default_rng(12)
    table_values = bfloat16_exact(rng, (50, 16))
    ids = np.array([[3, 0, 49], [7, 7, 3]])
    upstream = bfloat16_exact(rng, (2, 3, 16))
    table = ops.cast(table_values, dtype)
    id_tensor = ops.convert_to_tensor(ids, "int32")

    value, (grad_table,) = value_and_gradients(
        lambda table: backends.take_rows(table, id_tensor), [table], upstream
    )

    expected = np.zeros(table_values.shape)
    np.add.at(expected, ids, upstream)
    assert_gradient(grad_table, expected, dtype, dtype)
    np.testing.assert_array_equal(to_numpy(value), table_values[ids])


def assert_einsum_gradients(equation, shape_a, shape_b, dtype):
    """`backends.einsum`'s gradients are the plain einsums of the upstream
    gradient with the other operand, and its recorded forward pass is the
    one inference runs."""
    rng = np.random.default_rng(13)
    a_values, b_values = bfloat16_exact(rng, shape_a), bfloat16_exact(rng, shape_b)
    upstream = bfloat16_exact(rng, np.einsum(equation, a_values, b_values).shape)
    a, b = ops.cast(a_values, dtype), ops.cast(b_values, dtype)

    value, (grad_a, grad_b) = value_and_gradients(
        lambda a, b: backends.einsum(equation, a, b), [a, b], upstream
    )

    inputs, output = equation.split("->")
    a_axes, b_axes = inputs.split(",")
    # d/da sums upstream * b over the axes a lacks; likewise for b.
    expected_a = np.einsum(f"{output},{b_axes}->{a_axes}", upstream, b_values)
    expected_b = np.einsum(f"{output},{a_axes}->{b_axes}", upstream, a_values)
    assert_gradient(grad_a, expected_a, dtype, dtype)
    assert_gradient(grad_b, expected_b, dtype, dtype)
    np.testing.assert_array_equal(
        to_numpy(value), to_numpy(forward_without_gradients(backends.einsum, equation, a, b))
    )


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize(
    "equation,shape_a,shape_b",
    [
        # attention logits and the attended values (see `layers/attention.py`)
        ("bskgh,btkh->bkgst", (2, 5, 1, 4, 16), (2, 7, 1, 16)),
        ("bkgst,btkh->bskgh", (2, 1, 4, 5, 7), (2, 7, 1, 16)),
    ],
)
def test_einsum_gradients_are_the_plain_products(dtype, equation, shape_a, shape_b):
    assert_einsum_gradients(equation, shape_a, shape_b, dtype)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_a_training_step_changes_the_weights(dtype):
    """`fit` on a tiny model: a finite loss, and every trainable weight moves.

    Keras' Adam computes its step size in the variable's dtype, where
    bfloat16 rounds beta_2 = 0.999 to 1 and the step to 0: bfloat16 weights
    take plain gradient descent here, with a step that moves bfloat16 values.
    """
    from gemma_keras import GemmaCausalLM

    keras.utils.set_random_seed(0)
    model = GemmaCausalLM.from_gemma_config(tiny_config("gemma1_mqa"), dtype=dtype)
    optimizer = keras.optimizers.SGD(learning_rate=1.0) if dtype == "bfloat16" else "adam"
    model.compile(
        optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    rng = np.random.default_rng(14)
    token_ids = rng.integers(3, 1000, size=(4, 9)).astype("int32")
    padding_mask = np.ones_like(token_ids)
    before = [to_numpy(weight) for weight in model.trainable_weights]

    history = model.fit(
        x={"token_ids": token_ids[:, :-1], "padding_mask": padding_mask[:, :-1]},
        y=token_ids[:, 1:],
        epochs=1,
        batch_size=2,
        verbose=0,
    )

    assert math.isfinite(history.history["loss"][-1])
    after = [to_numpy(weight) for weight in model.trainable_weights]
    unchanged = [
        weight.path
        for weight, old, new in zip(model.trainable_weights, before, after, strict=True)
        if np.array_equal(old, new)
    ]
    assert not unchanged, f"weights without a gradient: {unchanged}"
