"""int8 and int4 weights: the forms, the layers' `quantize` (Keras' protocol),
load-time quantization, quantized presets, QLoRA, and bad requests refused.

A quantized model must compute exactly what a float model holding its
dequantized weights computes (up to float32 summation order), so each model
test compares against such a float model rather than against fixed numbers.
"""

import json

import keras
import numpy as np
import pytest
from keras.quantizers import Int4QuantizationConfig

from conftest import BACKEND, randomize, tiny_config
from gemma_keras import GemmaCausalLM, GemmaTokenizer, native, quantization
from gemma_keras.checkpoints.weight_mapping import (
    WeightsError,
    assign_weights,
    get_weights,
    model_shapes,
)
from gemma_keras.quantization import QuantizationError
from quantized_helpers import assert_matches_dequantized, vnni
from training_helpers import batch_for

# float32 sums in another order, through a few layers of a tiny model.
LOGITS_TOLERANCE = 2e-5


def random_model(variant="gemma1_mqa", dtype="float32", seed=0):
    model = GemmaCausalLM.from_gemma_config(tiny_config(variant), dtype=dtype)
    assign_weights(model, randomize(model_shapes(model), seed=seed))
    return model


def logits(model, x):
    return keras.ops.convert_to_numpy(model(x)).astype("float32")


def inputs(vocabulary_size=1000, batch=2, length=9, seed=3):
    ids = np.random.default_rng(seed).integers(3, vocabulary_size, (batch, length)).astype("int32")
    return {"token_ids": ids, "padding_mask": np.ones_like(ids)}


def dequantized_twin(model):
    """A float model holding `model`'s weights as its quantized forms stand for them."""
    twin = GemmaCausalLM.from_gemma_config(model.config)
    assign_weights(twin, get_weights(model))
    return twin


# --- the forms ---------------------------------------------------------------


@pytest.mark.parametrize(
    "mode, group_size", [("int8", 64), ("int8", 16), ("int4", 32), ("int4", 128)]
)
def test_forms_round_trip_within_half_a_step(mode, group_size):
    rng = np.random.default_rng(0)
    weight = rng.normal(size=(48, 256)).astype("float32")
    weight[:, 7] *= 20  # an outlier column
    weight[3, 128:] = -0.25  # all-equal groups
    quantized = quantization.quantize(weight, mode, group_size)
    assert quantized.shape == weight.shape
    assert quantized.kernel.dtype == (np.int8 if mode == "int8" else np.uint8)
    assert quantized.scale.shape == (48, 256 // group_size)
    restored = quantization.dequantize_numpy(quantized)
    step = np.repeat(quantized.scale, group_size, axis=1)
    # Rounding to nearest is within half a step; the least-squares fit may
    # move a value at the clipped end by up to a step, never more.
    assert np.all(np.abs(restored - weight) <= step * 1.0 + 1e-6)
    np.testing.assert_allclose(restored[3, 128:], weight[3, 128:], rtol=1e-6)


def test_int4_packing_is_llama_cpp_q4_0_order():
    values = np.tile(np.arange(32) % 16, (2, 2)).astype(np.uint8)  # [2, 64]
    values[1] = values[1][::-1]
    packed = quantization.pack_int4(values)
    assert packed.shape == (2, 32)
    # byte k of a block: input k low, input 16 + k high
    assert packed[0, 1] == (1 | (1 << 4))
    np.testing.assert_array_equal(np.asarray(quantization.unpack_int4(packed)), values)


def test_the_fit_never_loses_to_plain_rounding():
    rng = np.random.default_rng(1)
    weight = rng.standard_t(3, size=(64, 256)).astype("float32")
    # (mode, group size, the most error the fit keeps of plain rounding's)
    for mode, group_size, kept in [("int8", 256, 0.995), ("int4", 32, 0.97)]:
        fitted = quantization.dequantize_numpy(quantization.quantize(weight, mode, group_size))
        saved, quantization.FIT_ROUNDS = quantization.FIT_ROUNDS, 0
        try:
            plain = quantization.dequantize_numpy(quantization.quantize(weight, mode, group_size))
        finally:
            quantization.FIT_ROUNDS = saved
        fitted_error = np.square(fitted - weight).reshape(64, -1, group_size).sum(-1)
        plain_error = np.square(plain - weight).reshape(64, -1, group_size).sum(-1)
        assert np.all(fitted_error <= plain_error + 1e-6)
        assert fitted_error.sum() < kept * plain_error.sum()


def test_group_sizes():
    assert quantization.group_size_for("int8", 640) == 640
    assert quantization.group_size_for("int4", 640) == 128
    assert quantization.group_size_for("int4", 96) == 96  # 128 does not divide: fallback
    assert quantization.group_size_for("int4", 640, Int4QuantizationConfig(block_size=32)) == 32
    assert quantization.group_size_for("int4", 640, Int4QuantizationConfig(block_size=None)) == 640
    with pytest.raises(QuantizationError, match="multiple of 32 that divides"):
        quantization.group_size_for("int4", 80)
    with pytest.raises(QuantizationError, match="group size 48 .* input width 640"):
        quantization.group_size_for("int4", 640, group_size=48)


# --- models ------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["gemma1_mqa", "gemma2", "gemma3"])
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_model_computes_its_dequantized_weights(variant, mode):
    model = random_model(variant)
    x = inputs()
    before = logits(model, x)
    model.quantize(mode)
    layers = model.backbone.lora_layers().values()
    assert {layer.quantization_mode for layer in layers} == {mode}
    after = logits(model, x)
    np.testing.assert_allclose(after, logits(dequantized_twin(model), x), atol=LOGITS_TOLERANCE)
    # and it is close to the float model it came from
    assert np.abs(after - before).max() < (0.05 if mode == "int8" else 0.6) * np.abs(before).max()
    generated = model.generate(x["token_ids"][:1, :4], max_length=8)
    assert len(generated[0]) == 8


@pytest.mark.parametrize("dtype", ["bfloat16", "mixed_bfloat16"])
def test_low_precision_policies(dtype):
    model = random_model("gemma3", dtype=dtype)
    model.quantize("int8")
    x = inputs()
    out = logits(model, x)
    assert np.isfinite(out).all()
    twin = GemmaCausalLM.from_gemma_config(model.config, dtype=dtype)
    assign_weights(twin, get_weights(model))
    # bfloat16 products: a few bfloat16 steps of the largest logit apart
    np.testing.assert_allclose(out, logits(twin, x), atol=0.03 * np.abs(out).max())


def test_filters_and_group_size():
    model = random_model("gemma1_mha")
    model.quantize("int4", filters="ffw", group_size=32)
    quantized = {p for p, layer in model.backbone.lora_layers().items() if layer.quantization_mode}
    assert quantized and all("/ffw/" in path for path in quantized)
    assert {model.backbone.lora_layers()[p].quantization_group_size for p in quantized} == {32}
    model.quantize("int8", filters=lambda layer: "attention" in layer.path)
    assert model.backbone.token_embedding.quantization_mode is None


def test_qlora_trains_the_adapters_only():
    model = random_model("gemma2")
    model.quantize("int8")
    model.backbone.enable_lora(2)
    frozen = {w.path: keras.ops.convert_to_numpy(w) for w in model.weights if "lora" not in w.path}
    model.compile(optimizer=keras.optimizers.Adam(1e-2))
    x, y, sample_weight = batch_for(model.config.vocabulary_size)
    history = model.fit(x, y, sample_weight=sample_weight, epochs=3, batch_size=2, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]
    assert {w.path.rsplit("/", 1)[1] for w in model.trainable_weights} == {
        "lora_kernel_a",
        "lora_kernel_b",
    }
    for w in model.weights:
        if "lora" not in w.path:
            np.testing.assert_array_equal(keras.ops.convert_to_numpy(w), frozen[w.path], w.path)
    # merging re-quantizes the merged weight and removes the adapters
    x_eval = inputs()
    with_adapter = logits(model, x_eval)
    model.backbone.merge_lora_weights()
    assert not model.backbone.lora_layers()["decoder_block_0/attention/query"].lora_enabled
    merged = logits(model, x_eval)
    assert np.abs(merged - with_adapter).max() < 0.05 * np.abs(with_adapter).max()


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_decoding_on_the_native_kernel_equals_the_dequantized_product(mode, monkeypatch):
    from gemma_keras import backends

    model = random_model("gemma2")
    model.quantize(mode, group_size=32)
    query = model.backbone.lora_layers()["decoder_block_1/attention/query"]
    x = keras.ops.convert_to_tensor(np.random.default_rng(4).normal(size=(1, 1, 64)), "float32")
    arrays = query.quantized_arrays()

    def product(x):
        return backends.quantized_linear(x, mode, *arrays)

    if BACKEND == "tensorflow":  # as TensorFlow's decode step traces it, without XLA
        import tensorflow as tf

        from gemma_keras.backends import tensorflow_backend

        product = tensorflow_backend.native_step(tf.function(product), [tf.TensorSpec(x.shape)])
        if product is None and native.load_tensorflow() is None:
            pytest.skip("the native kernel cannot be built for TensorFlow here")
        assert product is not None, "the product did not take the native kernel"
    fast = keras.ops.convert_to_numpy(product(x))
    kernel, scale, offset = (None if a is None else keras.ops.convert_to_numpy(a) for a in arrays)
    weight = quantization.QuantizedWeight(mode, kernel, scale, offset, 32)
    x = keras.ops.convert_to_numpy(x)[0]
    assert_matches_dequantized(fast[0], x, weight, int8_x=vnni())
    prompt = inputs(batch=2, length=5)["token_ids"]
    on_kernel = model.generate(prompt, max_length=12)
    monkeypatch.setenv("GEMMA_KERAS_NATIVE", "0")
    model_without = random_model("gemma2")
    model_without.quantize(mode, group_size=32)
    if not vnni():
        np.testing.assert_array_equal(on_kernel, model_without.generate(prompt, max_length=12))
        return
    # x quantized (int4: to int8, by about 1% of a random tiny model's
    # logits; int8: to 16 bits) may flip near ties: each greedy token must be
    # the plain model's best to within 3% of its logits' range at that step.
    on_kernel = np.asarray(on_kernel, "int32")
    plain = logits(model_without, {"token_ids": on_kernel, "padding_mask": np.ones_like(on_kernel)})
    for position in range(prompt.shape[1], on_kernel.shape[1]):
        step = plain[:, position - 1]
        chosen = np.take_along_axis(step, on_kernel[:, position, None], axis=1)[:, 0]
        spread = step.max(axis=1) - step.min(axis=1)
        gap = step.max(axis=1) - chosen
        assert np.all(gap <= 0.03 * spread), (position, gap, spread)


@pytest.mark.parametrize("lora", [False, True])
def test_generation_multiplies_each_layers_q_k_v_and_gate_up_in_one_call(lora, monkeypatch):
    """A layer's q, k and v, and its gate and up, take one `quantized_linears`
    call each in a generation step (the native kernel reads them as one
    product); with LoRA on q and v (the default), q, k and v go one by one,
    each adding its own adapter, while gate and up still go together."""
    from gemma_keras import backends

    model = random_model("gemma2")
    model.quantize("int4", group_size=32)
    if lora:
        model.backbone.enable_lora(2)
    weights_per_call = []
    each_call = backends.implementation.quantized_linears

    def recorded(x, mode, weights):
        weights_per_call.append(len(weights))
        return each_call(x, mode, weights)

    monkeypatch.setattr(backends.implementation, "quantized_linears", recorded)
    model.generate(inputs(batch=1, length=5)["token_ids"], max_length=8)
    layers = model.config.num_layers
    # Each traced step (prefill, decode): per layer one call for q, k, v, one for gate, up.
    together = weights_per_call.count(2)
    assert together >= 2 * layers and together % layers == 0
    assert weights_per_call.count(3) == (0 if lora else together)


@pytest.mark.parametrize(
    "mode, group_size", [("int8", 64), ("int8", 32), ("int4", 32), ("int4", 64)]
)
def test_dequantized_product_equals_the_dequantized_weights_product(mode, group_size):
    """int4 is multiplied as its two nibble planes against `x` split to match:
    the same sum as the weight in input order, in another order."""
    rng = np.random.default_rng(5)
    weight = quantization.quantize(rng.normal(size=(48, 128)).astype("float32"), mode, group_size)
    x = rng.normal(size=(2, 3, 128)).astype("float32")
    arrays = [keras.ops.convert_to_tensor(a) for a in weight.arrays().values()]
    if mode == "int8":
        arrays.append(None)

    def product(flat, w):
        return keras.ops.matmul(flat, keras.ops.transpose(w))

    got = quantization.dequantized_product(x, mode, *arrays, product, "float32")
    expected = x @ quantization.dequantize_numpy(weight).T
    np.testing.assert_allclose(keras.ops.convert_to_numpy(got), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_a_long_prefill_multiplies_in_bfloat16_on_a_cpu_that_has_it(mode):
    """A prefill longer than the native kernel takes (160 tokens: more than
    torch's 128) multiplies the dequantized weights in bfloat16 on a CPU with
    AVX512-BF16, as llama.cpp multiplies int8-rounded activations; elsewhere,
    and in `score` and calls, in the model's float32. Rounding to bfloat16
    must cost less than the quantization itself."""
    from gemma_keras import generation

    model = random_model("gemma3", seed=2)
    prompt = np.random.default_rng(6).integers(3, 1000, (1, 160)).astype("int32")
    x = {"token_ids": prompt, "padding_mask": np.ones_like(prompt)}
    unquantized = logits(model, x)[0, -1]
    model.quantize(mode, group_size=32)
    result, _ = generation.prefill(model, prompt.tolist(), max_new_tokens=1)
    prefilled = result.logits()[0]
    called = logits(model, x)[0, -1]
    np.testing.assert_allclose(called, logits(dequantized_twin(model), x)[0, -1], atol=2e-5)
    rounding = np.abs(prefilled - called).max()
    quantization_error = np.abs(called - unquantized).max()
    if native.has_bfloat16_dot():
        # Measured on the three backends: the rounding moves the logits by
        # 0.32-0.38 (int8) and 0.03-0.04 (int4) of what the quantization does.
        assert 1e-5 < rounding < quantization_error / 2, (rounding, quantization_error)
    else:
        assert rounding < 2e-5, rounding


# --- loading and presets -----------------------------------------------------


@pytest.fixture
def float_preset(tmp_path, tokenizer_proto):
    model = random_model("gemma3")
    model.tokenizer = GemmaTokenizer(tokenizer_proto)
    model.save_to_preset(tmp_path / "float")
    return model, tmp_path / "float"


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_load_time_quantization_and_quantized_presets(float_preset, tmp_path, mode):
    model, directory = float_preset
    x = inputs()
    loaded = GemmaCausalLM.from_preset(directory, quantize=mode)
    model.quantize(mode)
    np.testing.assert_array_equal(logits(loaded, x), logits(model, x))

    loaded.save_to_preset(tmp_path / mode)
    size = (tmp_path / mode / "model.weights.h5").stat().st_size
    assert size < 0.5 * (directory / "model.weights.h5").stat().st_size
    reloaded = GemmaCausalLM.from_preset(tmp_path / mode)
    assert reloaded.backbone.token_embedding.quantization_mode == mode
    np.testing.assert_array_equal(logits(reloaded, x), logits(model, x))

    # a transformers checkpoint of a quantized model holds its dequantized weights
    loaded.export_to_huggingface(tmp_path / f"hf-{mode}")
    from_hf = GemmaCausalLM.from_preset(tmp_path / f"hf-{mode}")
    np.testing.assert_allclose(logits(from_hf, x), logits(model, x), atol=LOGITS_TOLERANCE)


def test_quantized_preset_of_another_shape_is_refused(float_preset, tmp_path):
    model, _ = float_preset
    model.quantize("int8")
    model.save_to_preset(tmp_path / "q")
    config_path = tmp_path / "q" / "config.json"
    saved = json.loads(config_path.read_text())
    saved["config"]["intermediate_dim"] *= 2
    config_path.write_text(json.dumps(saved))
    with pytest.raises(WeightsError, match=r"gemma_keras_quantized/.*ffw/gate/kernel.* has shape"):
        GemmaCausalLM.from_preset(tmp_path / "q")


def test_bad_requests():
    model = random_model("gemma1_mqa")
    with pytest.raises(ValueError, match="int8"):
        model.quantize("int2")
    # Keras takes float8 and awq; gemma_keras names what it takes instead.
    with pytest.raises(QuantizationError, match=r"to one of \('int8', 'int4'\), or 'gptq' with"):
        model.quantize("float8")
    with pytest.raises(QuantizationError, match="group size 48 does not fit .*64 wide"):
        model.quantize("int4", group_size=48)
    for size in (32.0, True, "32"):
        with pytest.raises(QuantizationError, match=f"group size must be an integer, got {size!r}"):
            model.quantize("int8", group_size=size)
    assert model.backbone.token_embedding.quantization_mode is None  # nothing half done
    model.backbone.enable_lora(2)
    with pytest.raises(QuantizationError, match="merge_lora_weights"):
        model.quantize("int8")
    model.backbone.merge_lora_weights()
    model.quantize("int8", group_size=np.int64(32))  # NumPy integers are integers
    assert model.backbone.token_embedding.quantization_group_size == 32
    with pytest.raises(QuantizationError, match="already quantized"):
        model.quantize("int4")
    with pytest.raises(ValueError, match="mode"):
        GemmaCausalLM.from_gemma_config(tiny_config("gemma1_mqa")).quantize(mode=None)
    fresh = random_model("gemma1_mqa")
    for filters, message in (
        ("nomatch", "match no layer; paths look like"),
        ("[", "is not a regular expression"),
        (5, "filters must be a regular expression"),
    ):
        with pytest.raises(QuantizationError, match=message):
            fresh.quantize("int8", filters=filters)
    with pytest.raises(QuantizationError, match="Unknown quantization mode 'int3'"):
        GemmaCausalLM.from_preset("no_such_preset_is_looked_up", quantize="int3")
    with pytest.raises(ValueError, match="Weights are written as one of"):
        fresh.save_to_preset("unused", dtype="int8")
    with pytest.raises(ValueError, match="Weights are written as one of"):
        fresh.export_to_huggingface("unused", dtype="int4")
    with pytest.raises(ValueError, match="Weights are written as one of"):
        fresh.export_to_huggingface("unused", dtype="float16")


@pytest.mark.skipif(BACKEND != "jax", reason="one backend is enough for a file-format check")
def test_quantized_weights_are_stored_in_a_group_of_their_own(float_preset, tmp_path):
    import h5py

    model, _ = float_preset
    model.quantize("int4", group_size=32)
    model.save_to_preset(tmp_path / "q")
    with h5py.File(tmp_path / "q" / "model.weights.h5") as file:
        group = file["gemma_keras_quantized/decoder_block_0/attention/query/kernel"]
        assert group.attrs["mode"] == "int4" and group.attrs["group_size"] == 32
        assert group["kernel"].dtype == np.uint8 and set(group) == {"kernel", "scale", "offset"}


# --- GPTQ --------------------------------------------------------------------


def gptq_config(dataset, tokenizer=None, **overrides):
    settings = dict(weight_bits=4, num_samples=8, sequence_length=24, group_size=32)
    return keras.quantizers.GPTQConfig(dataset, tokenizer, **{**settings, **overrides})


def output_error(x, weight, quantized):
    """`||X W^T - X Q^T||` of a `QuantizedWeight` `Q` of `weight` `W`."""
    return np.linalg.norm(x @ weight.T - x @ quantization.dequantize_numpy(quantized).T)


def plain_gptq(weight, hessian, mode, group_size, damping=0.01):
    """GPTQ as the paper's Algorithm 1 states it, one column at a time in
    float64 (no lazy blocks, no row chunks): the reference for `gptq_quantize`."""
    weight = weight.astype(np.float64)
    hessian = hessian + damping * np.diag(hessian).mean() * np.eye(len(hessian))
    upper = np.linalg.cholesky(np.linalg.inv(hessian)).T
    low, high = (-127, 127) if mode == "int8" else (0, 15)
    restored = np.zeros_like(weight)
    for column in range(weight.shape[1]):
        if column % group_size == 0:  # fitted to the group's weights as updated so far
            group = weight[:, column : column + group_size].astype(np.float32)
            fitted = quantization.quantize(group, mode, group_size)
            scale = fitted.scale[:, 0].astype(np.float64)
            offset = 0.0 if fitted.offset is None else fitted.offset[:, 0].astype(np.float64)
        safe = np.where(scale > 0, scale, 1)
        level = np.clip(np.rint((weight[:, column] - offset) / safe), low, high)
        restored[:, column] = level * scale + offset
        error = (weight[:, column] - restored[:, column]) / upper[column, column]
        weight[:, column + 1 :] -= np.outer(error, upper[column, column + 1 :])
    return restored


@pytest.mark.parametrize("mode, group_size", [("int4", 32), ("int4", 128), ("int8", 96)])
def test_gptq_is_the_papers_algorithm(mode, group_size, monkeypatch):
    from gemma_keras import gptq

    rng = np.random.default_rng(5)
    x = rng.normal(size=(512, 384)) @ (np.eye(384) + rng.normal(size=(384, 384)) / 20)
    weight = rng.normal(size=(40, 384)).astype("float32")
    hessian = x.T @ x
    monkeypatch.setattr(gptq, "ROW_CHUNK_VALUES", 384 * 16)  # three chunks of rows
    quantized = gptq.gptq_quantize(weight, gptq.hessian_factor(hessian), mode, group_size)
    restored = quantization.dequantize_numpy(quantized)
    expected = plain_gptq(weight, hessian, mode, group_size)
    # float32 against float64: a few values round to the neighbouring level
    # (int8's steps are small), and the later columns compensate for them
    assert np.mean(np.abs(restored - expected) > 1e-4) < 0.02
    error = np.linalg.norm(x @ (restored - weight).T)
    np.testing.assert_allclose(error, np.linalg.norm(x @ (expected - weight).T), rtol=1e-3)
    assert error < 0.85 * output_error(x, weight, quantization.quantize(weight, mode, group_size))

    symmetric = gptq.gptq_quantize(weight, gptq.hessian_factor(hessian), "int4", 32, True)
    np.testing.assert_allclose(symmetric.offset, -8 * symmetric.scale)


@pytest.mark.parametrize(
    "weight_bits, group_size, activation_order", [(4, 32, True), (8, -1, False)]
)
def test_gptq_model_beats_rounding_to_nearest_on_its_calibration_inputs(
    tokenizer_proto, weight_bits, group_size, activation_order
):
    from conftest import CORPUS
    from gemma_keras import gptq

    model = random_model("gemma2")
    rounded = random_model("gemma2")  # the same weights
    config = gptq_config(
        CORPUS,
        GemmaTokenizer(tokenizer_proto),
        weight_bits=weight_bits,
        group_size=group_size,
        activation_order=activation_order,
    )
    (samples,) = gptq.calibration_batches(config)
    assert len(samples) > 1 and np.all(samples[:, 0] == 2)  # each behind <bos>
    # Block 0's query, key and value see the float embedding, normed: X apart
    # from GPTQ's own recording of it.
    block = model.backbone.decoder_blocks[0]
    normed = block.pre_attention_norm(model.backbone.token_embedding(samples))
    x = keras.ops.convert_to_numpy(normed).reshape(-1, model.config.hidden_dim)
    projections = {name: getattr(block.attention, name) for name in ("query", "key", "value")}
    weights = {name: keras.ops.convert_to_numpy(p.kernel) for name, p in projections.items()}

    model.quantize("gptq", config=config)
    mode = "int4" if weight_bits == 4 else "int8"
    layers = model.backbone.lora_layers().values()
    assert {layer.quantization_mode for layer in layers} == {mode}
    rounded.quantize(mode, group_size=None if group_size == -1 else group_size)
    rounded_block = rounded.backbone.decoder_blocks[0].attention
    for name, projection in projections.items():
        assert projection.quantization_group_size == (64 if group_size == -1 else group_size)
        gptq_error = output_error(x, weights[name], projection.quantized_weight())
        rounded_error = output_error(
            x, weights[name], getattr(rounded_block, name).quantized_weight()
        )
        assert gptq_error < 0.9 * rounded_error, name
    # the int4/int8 forms compute as everywhere else: as their dequantized weights
    batch = inputs()
    np.testing.assert_allclose(
        logits(model, batch), logits(dequantized_twin(model), batch), atol=LOGITS_TOLERANCE
    )


def test_gptq_bad_configs():
    model = random_model("gemma1_mqa")
    ids = [np.array([2, 5, 6, 7, 8, 9])]
    with pytest.raises(ValueError, match="GPTQConfig"):
        model.quantize("gptq")  # Keras' own check
    cases = [
        (gptq_config(None), {}, "GPTQConfig.dataset is None"),
        (gptq_config(ids, weight_bits=3), {}, "weight_bits=3 .* pass weight_bits=4"),
        (gptq_config(ids, group_size=48), {}, "group_size=48 does not fit .* width 64"),
        (gptq_config(["some text"]), {}, "tokenizer=model.tokenizer"),
        (gptq_config(ids), {"group_size": 32}, r"GPTQConfig\(group_size=...\)"),
    ]
    for config, arguments, message in cases:
        with pytest.raises(QuantizationError, match=message) as error:
            model.quantize("gptq", config=config, **arguments)
        assert "\n" not in str(error.value)
    assert all(layer.quantization_mode is None for layer in model.backbone.lora_layers().values())


@pytest.mark.parametrize("mode", [None, "int8", "int4"])
def test_tensorflow_lookup_gathers_from_the_table_value_not_the_variable(mode):
    """A gather on a TensorFlow variable (`ResourceGather`) puts it in
    copy-on-read mode: each later read of the table, the logits' product's
    too, then copies all of it (the 2B's int8 embedding: 35 ms a decode step)."""
    if keras.config.backend() != "tensorflow":
        pytest.skip("TensorFlow's variables only")
    import tensorflow as tf

    model = random_model("gemma3")
    if mode is not None:
        model.quantize(mode, group_size=32)
    model.backbone.enable_lora(2, target_layer_names=["token_embedding"])
    embedding = model.backbone.token_embedding
    lookup = tf.function(lambda ids: embedding(ids)).get_concrete_function(
        tf.TensorSpec((1, 3), tf.int32)
    )
    operations = {operation.type for operation in lookup.graph.get_operations()}
    assert "GatherV2" in operations
    assert not operations & {"ResourceGather", "ResourceGatherNd"}
