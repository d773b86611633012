"""The native bfloat16 kernel (`gemma_keras.native`, `bf16_linear.cc`): the
matrix-vector products of bfloat16 decoding on JAX's CPU backend."""

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from keras import ops

from gemma_keras import backend, native
from test_backend import assert_bfloat16_result, bfloat16_pair

pytestmark = [
    pytest.mark.skipif(backend.name() != "jax", reason="the kernel is an XLA FFI call (JAX)"),
    pytest.mark.skipif(
        not (shutil.which("c++") or shutil.which("g++")), reason="no C++ compiler to build it"
    ),
]


def jitted_linear():
    import jax

    return jax.jit(lambda x, kernel: backend.linear(x, kernel))


def lowered_text(x, kernel):
    return jitted_linear().lower(x, kernel).as_text()


def test_the_kernel_builds_here():
    assert backend._jax_native_linear() is not None


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
        (5, 7, 16),
    ],
)
def test_kernel_is_the_product_of_its_inputs(rows, n_out, n_in):
    x, kernel, (x_exact, kernel_exact) = bfloat16_pair(
        np.random.default_rng(rows + n_out), (rows, 1, n_in), (n_out, n_in)
    )
    assert "gemma_bf16_linear" in lowered_text(x, kernel)
    assert_bfloat16_result(
        jitted_linear()(x, kernel), np.einsum("rsi,oi->rso", x_exact, kernel_exact)
    )


def test_kernel_rounds_as_the_dot_does():
    """Float32 sums in another order: each result within one bfloat16 step
    (2^-8 relative) of XLA's, and most of them equal."""
    x, kernel, _ = bfloat16_pair(np.random.default_rng(5), (1, 1, 2048), (4096, 2048))
    result = ops.convert_to_numpy(ops.cast(jitted_linear()(x, kernel), "float32"))
    dot = ops.convert_to_numpy(ops.cast(ops.einsum("bri,oi->bro", x, kernel), "float32"))
    np.testing.assert_allclose(result, dot, rtol=2**-8, atol=0)
    assert np.mean(result == dot) > 0.9


def test_infinities_and_nans_propagate():
    x = np.ones((1, 1, 32), "float32")
    kernel = np.ones((3, 32), "float32")
    x[0, 0, 5] = np.inf
    kernel[1, 5] = -1.0
    kernel[2, 7] = np.nan
    result = jitted_linear()(ops.cast(x, "bfloat16"), ops.cast(kernel, "bfloat16"))
    result = ops.convert_to_numpy(ops.cast(result, "float32"))[0, 0]
    assert result[0] == np.inf and result[1] == -np.inf and np.isnan(result[2])


@pytest.mark.parametrize(
    "shape,reason",
    [((9, 1, 64), "more than 8 rows"), ((1, 1, 40), "a width 16 does not divide")],
)
def test_other_products_take_xla(shape, reason):
    x, kernel, _ = bfloat16_pair(np.random.default_rng(6), shape, (24, shape[-1]))
    assert "gemma_bf16_linear" not in lowered_text(x, kernel), reason


def test_turned_off_by_the_environment(monkeypatch):
    x, kernel, _ = bfloat16_pair(np.random.default_rng(7), (1, 1, 64), (24, 64))
    monkeypatch.setenv(native.DISABLE_ENV, "0")
    assert "gemma_bf16_linear" not in lowered_text(x, kernel)


def test_gradients_are_the_plain_products():
    import jax

    x, kernel, _ = bfloat16_pair(np.random.default_rng(8), (2, 1, 64), (24, 64))

    def loss(linear):
        return lambda x, kernel: ops.sum(ops.cast(linear(x, kernel), "float32") ** 2)

    ours = jax.grad(loss(backend.linear), argnums=(0, 1))(x, kernel)
    plain = jax.grad(loss(lambda x, k: ops.einsum("bri,oi->bro", x, k)), argnums=(0, 1))(x, kernel)
    for a, b in zip(ours, plain, strict=True):
        a, b = (ops.convert_to_numpy(ops.cast(t, "float32")) for t in (a, b))
        np.testing.assert_allclose(a, b, rtol=0, atol=0.02 * np.abs(b).max())


def test_greedy_bfloat16_generation_equals_the_uncached_argmax(tokenizer_proto):
    """Decoding multiplies through the kernel, the uncached forward pass (rows
    of 20 tokens) through XLA: the same tokens."""
    from test_generation import PROMPTS, argmax_loop, make_model

    model = make_model("gemma2", tokenizer_proto, dtype="bfloat16")
    prompts = [model.tokenizer.encode(p) for p in PROMPTS]
    assert model.generate(prompts, max_new_tokens=8) == argmax_loop(model, prompts, 8)


def test_a_failed_build_warns_and_leaves_nothing(tmp_path, monkeypatch, caplog):
    import jax

    monkeypatch.setenv("GEMMA_KERAS_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", shutil.which("false"))
    native.load.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="gemma_keras.native"):
            assert native.load(jax.ffi.include_dir()) is None
    finally:
        native.load.cache_clear()
    assert "bf16_linear.cc failed" in caplog.text
    assert list((tmp_path / "kernels").iterdir()) == []


def test_the_build_is_cached(tmp_path, monkeypatch):
    import jax

    monkeypatch.setenv("GEMMA_KERAS_CACHE", str(tmp_path))
    compiler = shutil.which("c++") or shutil.which("g++")
    include_dir = Path(jax.ffi.include_dir())
    built = native._build(compiler, include_dir)
    stamp = built.stat().st_mtime_ns
    assert native._build(compiler, include_dir) == built and built.stat().st_mtime_ns == stamp
    assert [p.name for p in (tmp_path / "kernels").iterdir()] == [built.name]


def test_independent_products_in_one_graph():
    """XLA may run independent products at the same time, each asking its
    thread pool for help; none may wait on help that never comes."""
    import jax

    rng = np.random.default_rng(9)
    x, _, (x_exact, _) = bfloat16_pair(rng, (1, 1, 1024), (1, 1024))
    kernels = [bfloat16_pair(rng, (1, 1024), (1100, 1024)) for _ in range(4)]

    products = jax.jit(lambda x, *ks: [backend.linear(x, k) for k in ks])
    results = products(x, *[kernel for _, kernel, _ in kernels])
    for result, (_, _, (_, kernel_exact)) in zip(results, kernels, strict=True):
        assert_bfloat16_result(result, np.einsum("bri,oi->bro", x_exact, kernel_exact))
