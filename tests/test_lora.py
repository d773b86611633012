"""LoRA: checked against its own definition, saved and loaded by stable layer paths,
merged exactly, KerasHub adapters merged exactly, and bad requests refused."""

import dataclasses

import h5py
import keras
import numpy as np
import pytest

from conftest import BACKEND, randomize, tiny_config
from gemma_keras import GemmaCausalLM, GemmaTokenizer, LoraError
from gemma_keras.checkpoints.weight_mapping import assign_weights, model_shapes
from training_helpers import batch_for, loss_and_gradients

ALL_PROJECTIONS = ["query", "key", "value", "output", "gate", "up", "down"]


def random_model(variant="gemma1_mqa", dtype="float32", seed=0):
    model = GemmaCausalLM.from_gemma_config(tiny_config(variant), dtype=dtype)
    assign_weights(model, randomize(model_shapes(model), seed=seed))
    return model


def randomize_adapters(model, seed=1, std=0.05):
    """Adapters start as a no-op (b = 0); give them values so that they count."""
    rng = np.random.default_rng(seed)
    for layer in model.backbone.lora_layers().values():
        if layer.lora_enabled:
            for weight in layer.lora_weights:
                weight.assign(rng.normal(0, std, weight.shape).astype("float32"))


def logits(model, x):
    return keras.ops.convert_to_numpy(model(x)).astype("float32")


def test_default_targets_are_query_and_value_and_only_adapters_train():
    model = random_model()
    model.backbone.enable_lora(4)
    names = sorted({w.path.split("/")[-2] for w in model.trainable_weights})
    assert names == ["query", "value"]
    assert all("lora_kernel" in w.path for w in model.trainable_weights)
    assert len(model.trainable_weights) == 2 * 2 * model.config.num_layers
    assert all(w.dtype == "float32" for w in model.trainable_weights)


@pytest.mark.parametrize("variant", ["gemma1_mqa", "gemma2", "gemma3"])
def test_lora_equals_its_definition(variant):
    """The loss and gradients of a LoRA model equal those of a plain model whose
    kernels are `W + (alpha / rank) * (A @ B).T`: dL/dA = s * G.T @ B.T and
    dL/dB = s * A.T @ G.T, where G is the plain model's kernel gradient."""
    model = random_model(variant)
    model.backbone.enable_lora(3, ALL_PROJECTIONS + ["token_embedding"], lora_alpha=6)
    randomize_adapters(model)
    plain = random_model(variant)
    lora_layers = model.backbone.lora_layers()
    plain_layers = plain.backbone.lora_layers()
    for path, layer in lora_layers.items():
        plain_layers[path].base_weight.assign(layer.merged_weight())
    x, y, sample_weight = batch_for(model.config.vocabulary_size)

    adapters = [w for layer in lora_layers.values() for w in layer.lora_weights]
    loss, gradients = loss_and_gradients(model, x, y, sample_weight, adapters)
    kernels = [layer.base_weight for layer in plain_layers.values()]
    plain_loss, plain_gradients = loss_and_gradients(plain, x, y, sample_weight, kernels)
    assert abs(loss - plain_loss) <= 1e-5 * abs(plain_loss)

    by_weight = dict(zip([id(w) for w in adapters], gradients, strict=True))
    for (path, layer), g in zip(lora_layers.items(), plain_gradients, strict=True):
        a, b = (keras.ops.convert_to_numpy(w) for w in layer.lora_weights)
        s = layer.lora_scale
        if path == "token_embedding":  # table [vocab, hidden] += s * a @ b
            expected_a, expected_b = s * g @ b.T, s * a.T @ g
        else:  # kernel [out, in] += s * (a @ b).T
            expected_a, expected_b = s * g.T @ b.T, s * a.T @ g.T
        for weight, expected in zip(layer.lora_weights, (expected_a, expected_b), strict=True):
            actual = by_weight[id(weight)]
            scale = np.abs(expected).max() + 1e-12
            assert np.abs(actual - expected).max() <= 1e-4 * scale, (path, weight.name)


def test_fit_trains_the_adapters_only(tmp_path):
    model = random_model("gemma2")
    model.backbone.enable_lora(2, ["query", "value", "down"])
    before = {w.path: keras.ops.convert_to_numpy(w) for w in model.weights}
    model.compile(optimizer=keras.optimizers.Adam(1e-2))
    x, y, sample_weight = batch_for(model.config.vocabulary_size)
    history = model.fit(x, y, sample_weight=sample_weight, epochs=3, batch_size=2, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]
    for w in model.weights:
        after = keras.ops.convert_to_numpy(w)
        if "lora_kernel" in w.path:
            continue
        np.testing.assert_array_equal(after, before[w.path], err_msg=w.path)
    changed = [w for w in model.trainable_weights if "lora_kernel_b" in w.path]
    assert all(np.abs(keras.ops.convert_to_numpy(w)).max() > 0 for w in changed)


@pytest.mark.parametrize("dtype", ["bfloat16", "mixed_bfloat16"])
def test_low_precision_models_keep_float32_adapters_that_train(dtype):
    model = random_model("gemma1_mha", dtype=dtype)
    model.backbone.enable_lora(2)
    assert {w.dtype for w in model.trainable_weights} == {"float32"}
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    x, y, sample_weight = batch_for(model.config.vocabulary_size)
    history = model.fit(x, y, sample_weight=sample_weight, epochs=2, batch_size=2, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    b = [w for w in model.trainable_weights if "lora_kernel_b" in w.path]
    # Adam's first steps move every weight by about the learning rate: in
    # bfloat16 (8 bits of mantissa) such steps vanish against larger values.
    assert all(np.abs(keras.ops.convert_to_numpy(w)).max() > 1e-4 for w in b)


def test_save_load_and_merge(tmp_path):
    model = random_model("gemma3")
    model.backbone.enable_lora(4, ALL_PROJECTIONS)
    randomize_adapters(model)
    x, _, _ = batch_for(model.config.vocabulary_size)
    expected = logits(model, x)

    path = tmp_path / "adapter.lora.h5"
    model.backbone.save_lora_weights(path)
    with h5py.File(path) as file:
        datasets = []
        file.visititems(lambda name, item: datasets.append(name) if "shape" in dir(item) else None)
        assert int(file.attrs["rank"]) == 4
    assert all(name.endswith(("lora_kernel_a", "lora_kernel_b")) for name in datasets)
    assert "decoder_block_6/ffw/down/lora_kernel_a" in datasets
    assert len(datasets) == 2 * len(ALL_PROJECTIONS) * model.config.num_layers

    fresh = random_model("gemma3")  # the same base weights, no LoRA yet
    fresh.backbone.load_lora_weights(path)
    np.testing.assert_allclose(logits(fresh, x), expected, atol=1e-5, rtol=0)
    assert len(fresh.trainable_weights) == len(model.trainable_weights)

    fresh.backbone.merge_lora_weights()
    assert not any("lora" in w.path for w in fresh.weights)
    np.testing.assert_allclose(logits(fresh, x), expected, atol=1e-4, rtol=0)
    assert len(fresh.trainable_weights) == len(fresh.weights)
    fresh.backbone.enable_lora(2)  # a new adapter after merging


def test_generation_uses_the_adapter():
    model = random_model("gemma1_mqa")
    ids = [2, 10, 11, 12]
    before = model.generate(ids, max_new_tokens=6)
    model.backbone.enable_lora(2, ALL_PROJECTIONS)
    randomize_adapters(model, seed=5, std=1.0)
    with_adapter = model.generate(ids, max_new_tokens=6)
    # Greedy generation equals the argmax of the uncached forward pass.
    tokens = list(ids)
    for _ in range(6):
        x = {"token_ids": np.array([tokens]), "padding_mask": np.ones((1, len(tokens)), "int32")}
        tokens.append(int(logits(model, x)[0, -1].argmax()))
    assert with_adapter == tokens
    assert with_adapter != before


def test_checkpoints_of_a_lora_model_hold_merged_weights(tokenizer_proto, tmp_path):
    model = random_model("gemma1_mqa")
    model.tokenizer = GemmaTokenizer(tokenizer_proto)
    model.backbone.enable_lora(2, ALL_PROJECTIONS)
    randomize_adapters(model)
    x, _, _ = batch_for(model.config.vocabulary_size)
    expected = logits(model, x)
    model.save_to_preset(str(tmp_path / "preset"))
    model.export_to_huggingface(str(tmp_path / "hf"))
    for path in ("preset", "hf"):
        loaded = GemmaCausalLM.from_preset(str(tmp_path / path))
        np.testing.assert_allclose(logits(loaded, x), expected, atol=1e-4, rtol=0)
    keras_hub = pytest.importorskip("keras_hub")
    reference = keras_hub.models.GemmaCausalLM.from_preset(str(tmp_path / "preset"))
    np.testing.assert_allclose(logits(reference, x), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("variant", ["gemma1_mqa", "gemma1_mha", "gemma3"])
def test_keras_hub_adapter_merges_exactly(variant, tokenizer_proto, tmp_path):
    keras_hub = pytest.importorskip("keras_hub")
    ours = random_model(variant)
    ours.tokenizer = GemmaTokenizer(tokenizer_proto)
    ours.save_to_preset(str(tmp_path / "preset"))
    backbone_class = keras_hub.models.Gemma3Backbone if variant == "gemma3" else None
    backbone_class = backbone_class or keras_hub.models.GemmaBackbone
    reference = backbone_class.from_preset(str(tmp_path / "preset"))
    reference.enable_lora(2, target_layer_names=["query", "value", "attention_output"])
    rng = np.random.default_rng(7)
    for layer in reference._flatten_layers():
        if getattr(layer, "lora_enabled", False):
            for weight in (layer.lora_kernel_a, layer.lora_kernel_b):
                weight.assign(rng.normal(0, 0.05, weight.shape).astype("float32"))
    reference.save_lora_weights(str(tmp_path / "theirs.lora.h5"))
    x, _, _ = batch_for(ours.config.vocabulary_size)
    hidden = keras.ops.convert_to_numpy(reference(x))

    ours.backbone.load_lora_weights(tmp_path / "theirs.lora.h5")
    assert not ours.backbone.lora_layers()["decoder_block_0/attention/query"].lora_enabled
    np.testing.assert_allclose(keras.ops.convert_to_numpy(ours.backbone(x)), hidden, atol=1e-4)


def test_bad_requests(tmp_path):
    model = random_model()
    for rank in (0, -1, 2.5, "4", True):
        with pytest.raises(ValueError, match="positive integer"):
            model.backbone.enable_lora(rank)
    with pytest.raises(LoraError, match="matches no layer.*query, key, value"):
        model.backbone.enable_lora(2, ["attention_qkv"])
    with pytest.raises(LoraError, match="enable_lora"):
        model.backbone.save_lora_weights(tmp_path / "none.lora.h5")
    model.backbone.enable_lora(2)
    with pytest.raises(LoraError, match="already enabled"):
        model.backbone.enable_lora(2)
    with pytest.raises(LoraError, match=r"\.lora\.h5"):
        model.backbone.save_lora_weights(tmp_path / "adapter.h5")
    model.backbone.save_lora_weights(tmp_path / "small.lora.h5")

    wider = GemmaCausalLM.from_gemma_config(tiny_config("gemma1_mha"))  # 4 KV heads, not 1
    wider.backbone.enable_lora(2)
    wider.backbone.save_lora_weights(tmp_path / "wide.lora.h5")
    with pytest.raises(LoraError, match=r"value/lora_kernel_b has shape \(2, 128\).*\(2, 32\)"):
        random_model().backbone.load_lora_weights(tmp_path / "wide.lora.h5")
    deeper = GemmaCausalLM.from_gemma_config(tiny_config("gemma3"))
    with pytest.raises(LoraError, match="decoder_block_0/attention/value/lora_kernel_b"):
        deeper.backbone.load_lora_weights(tmp_path / "small.lora.h5")
    with pytest.raises(LoraError, match="does not exist"):
        model.backbone.load_lora_weights(tmp_path / "missing.lora.h5")


def test_bad_lora_arguments_and_adapter_files(tmp_path):
    for alpha in ("x", 0, -1.0, float("nan"), True):
        with pytest.raises(ValueError, match="lora_alpha must be a positive number"):
            random_model().backbone.enable_lora(2, lora_alpha=alpha)
    with pytest.raises(LoraError, match="No LoRA targets given"):
        random_model().backbone.enable_lora(2, [])
    model = random_model()
    model.backbone.enable_lora(np.int64(2), lora_alpha=np.float32(4.0))
    query = model.backbone.lora_layers()["decoder_block_0/attention/query"]
    assert (query.lora_rank, query.lora_alpha, type(query.lora_rank)) == (2, 4.0, int)
    model.backbone.save_lora_weights(tmp_path / "two.lora.h5")
    with pytest.raises(LoraError, match="the folder .*missing does not exist"):
        model.backbone.save_lora_weights(tmp_path / "missing" / "two.lora.h5")
    with pytest.raises(LoraError, match="is a folder, not a file"):
        model.backbone.load_lora_weights(tmp_path)

    # An adapter of a 2-layer model loads into no other depth, and a failed load
    # leaves LoRA off.
    config = tiny_config("gemma1_mqa")
    for layers, message in (
        (1, r"decoder_block_1/attention/query', which this model lacks \(it has 1 layers\)"),
        (3, "saved from a model with num_layers=2; this model has num_layers=3"),
    ):
        other = GemmaCausalLM.from_gemma_config(
            dataclasses.replace(
                config, num_layers=layers, layer_types=(config.layer_types * 2)[:layers]
            )
        )
        with pytest.raises(LoraError, match=message):
            other.backbone.load_lora_weights(tmp_path / "two.lora.h5")
        assert not any(layer.lora_enabled for layer in other.backbone.lora_layers().values())

    # Incomplete files name what is missing.
    with h5py.File(tmp_path / "two.lora.h5", "r") as source:
        for name, edit in (
            ("no_rank", lambda f: f.attrs.__delitem__("rank")),
            ("no_tensor", lambda f: f.__delitem__("decoder_block_1/attention/value/lora_kernel_b")),
            ("empty", lambda f: [f.__delitem__(key) for key in list(f)]),
        ):
            with h5py.File(tmp_path / f"{name}.lora.h5", "w") as copy:
                for key in source:
                    source.copy(key, copy)
                copy.attrs.update(source.attrs)
                edit(copy)
    for name, message in (
        ("no_rank", "lacks the 'rank' attribute"),
        ("no_tensor", "lacks decoder_block_1/attention/value/lora_kernel_b"),
        ("empty", "holds no tensors"),
    ):
        with pytest.raises(LoraError, match=message):
            random_model().backbone.load_lora_weights(tmp_path / f"{name}.lora.h5")


@pytest.mark.slow
def test_lora_on_the_embedded_270m(tmp_path):
    """The acceptance run: LoRA lowers the real model's loss on a small set, only
    the adapters change, and the saved adapter and the merge reproduce it."""
    model = GemmaCausalLM.from_preset("gemma3_270m_q4_k_m")
    model.preprocessor.sequence_length = 32
    data = [
        "Question: What color is the sky?\nAnswer: The sky is blue.",
        "Question: What color is grass?\nAnswer: Grass is green.",
        "Question: What color is snow?\nAnswer: Snow is white.",
        "Question: What color is coal?\nAnswer: Coal is black.",
    ]
    model.backbone.enable_lora(4)
    query = model.backbone.lora_layers()["decoder_block_5/attention/query"]
    base_before = keras.ops.convert_to_numpy(query.kernel).copy()
    model.compile(optimizer=keras.optimizers.Adam(2e-3))
    first = model.evaluate(data, batch_size=2, verbose=0, return_dict=True)["loss"]
    model.fit(data, epochs=3, batch_size=2, verbose=0)
    last = model.evaluate(data, batch_size=2, verbose=0, return_dict=True)["loss"]
    print(f"{BACKEND}: 270M LoRA loss {first:.3f} -> {last:.3f}")
    assert last < first - 0.2
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(query.kernel), base_before)

    x, _, _ = model.preprocessor(data[:2])
    expected = logits(model, x)
    model.backbone.save_lora_weights(tmp_path / "colors.lora.h5")
    model.backbone.merge_lora_weights()
    # Float32 rounding differs between `x @ (W + dW).T` and `x @ W.T + x @ dW.T`
    # and grows through 18 layers: measured 2.0e-4 on logits of up to ~25 (JAX).
    scale = np.abs(expected).max()
    np.testing.assert_allclose(logits(model, x), expected, atol=1e-4 * scale, rtol=0)
    fresh = GemmaCausalLM.from_preset("gemma3_270m_q4_k_m")
    fresh.backbone.load_lora_weights(tmp_path / "colors.lora.h5")
    np.testing.assert_allclose(logits(fresh, x), expected, atol=1e-5, rtol=0)
