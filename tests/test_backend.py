"""The backend-dispatched products keep their meaning in every dtype and shape."""

import numpy as np
import pytest
from keras import ops

from gemma_keras import backend
from gemma_keras.backend import einsum, linear


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


@pytest.mark.skipif(backend.name() != "jax", reason="the integer rounding is JAX's route")
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
    rounded = backend.round_to_bfloat16(ops.convert_to_tensor(values))
    expected = ops.cast(ops.convert_to_tensor(values), "bfloat16")
    np.testing.assert_array_equal(
        ops.convert_to_numpy(ops.cast(rounded, "float32")),
        ops.convert_to_numpy(ops.cast(expected, "float32")),
    )
    nan = backend.round_to_bfloat16(ops.convert_to_tensor(np.array([np.nan], np.float32)))
    assert np.isnan(ops.convert_to_numpy(ops.cast(nan, "float32"))).all()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_take_rows_is_an_embedding_lookup(dtype):
    table = np.random.default_rng(4).normal(size=(50, 8)).astype(np.float32)
    ids = np.array([[3, 0, 49], [7, 7, 1]])
    rows = backend.take_rows(ops.cast(table, dtype), ops.convert_to_tensor(ids, "int32"))
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
