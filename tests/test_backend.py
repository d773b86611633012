"""The backend-dispatched products keep their meaning in every dtype and shape."""

import numpy as np
import pytest
from keras import ops

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


# 1 row takes torch's bf16 matrix-vector kernel; 40 rows and more (a prefill) its
# float32 route on CPUs without AVX512; 2 and 8 rows are batched decoding.
@pytest.mark.parametrize("batch,length", [(1, 1), (2, 1), (8, 1), (1, 40), (4, 40)])
def test_bfloat16_linear_is_the_product_of_its_inputs(batch, length):
    x, kernel, (x_exact, kernel_exact) = bfloat16_pair(
        np.random.default_rng(0), (batch, length, 64), (48, 64)
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
