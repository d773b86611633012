"""keras.distribution: Gemma's layouts, and sharded forward passes, generation and
LoRA steps equal to one device's (JAX, on 8 virtual CPU devices).

Run directly with `XLA_FLAGS=--xla_force_host_platform_device_count=8`; in a
plain JAX test session `test_on_eight_virtual_devices` runs this file again in
a process that has them. The other backends check the errors.
"""

import dataclasses
import os
import re
import subprocess
import sys

import keras
import numpy as np
import pytest

from conftest import tiny_config
from gemma_keras import (
    DistributionError,
    GemmaBackbone,
    GemmaCausalLM,
    GemmaConfig,
    GemmaTokenizer,
    registry,
)
from gemma_keras.checkpoints.weight_mapping import model_shapes, model_variables
from gemma_keras.config import alternating_local_global, every_nth_global
from gemma_keras.distribution import check_layouts, weight_shapes

JAX = keras.config.backend() == "jax"
MESHES = [(1, 8), (2, 4), (8, 1)]  # (batch, model)


def _device_count():
    if not JAX:
        return 0
    import jax

    return jax.device_count()


on_mesh = pytest.mark.skipif(
    _device_count() < 8, reason="needs 8 JAX devices: run by test_on_eight_virtual_devices"
)


@pytest.mark.skipif(not JAX or _device_count() >= 8, reason="this process has the devices")
def test_on_eight_virtual_devices():
    flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    env = {**os.environ, "XLA_FLAGS": flags.strip(), "KERAS_BACKEND": "jax"}
    command = [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider"]
    result = subprocess.run(
        command, env=env, capture_output=True, text=True, cwd=os.path.dirname(__file__)
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    passed = int(re.search(r"(\d+) passed", output).group(1))
    assert passed >= 40, output[-3000:]  # the mesh tests ran, not skipped


def _config(variant, num_key_value_heads):
    """A tiny Gemma 1/2/3 config with 4 query heads and the given K/V heads, 2 layers."""
    config = tiny_config(variant)
    # The layer patterns KerasHub's presets fix: Gemma 2 alternates, Gemma 3 is
    # local for 5 layers in 6.
    layer_types = {"gemma2": alternating_local_global(2), "gemma3": every_nth_global(2)}
    layer_types = layer_types.get(variant, config.layer_types[:2])
    return dataclasses.replace(
        config,
        num_layers=2,
        num_key_value_heads=num_key_value_heads,
        layer_types=layer_types,
        # A scale KerasHub's preset format can store (the tiny Gemma 2 has 24).
        query_pre_attn_scalar=config.head_dim,
    )


CONFIGS = {
    f"{name}_{kind}": (variant, heads)
    for name, variant in (("gemma1", "gemma1_mha"), ("gemma2", "gemma2"), ("gemma3", "gemma3"))
    for kind, heads in (("mqa", 1), ("gqa", 2), ("mha", 4))
}


@pytest.fixture(scope="module")
def presets(tmp_path_factory, tokenizer_proto):
    """`{name: (preset directory, single-device logits, single-device generations)}`, lazily."""
    cache = {}

    def get(name):
        if name not in cache:
            model = GemmaCausalLM.from_gemma_config(_config(*CONFIGS[name]))
            model.tokenizer = GemmaTokenizer(tokenizer_proto)
            directory = str(tmp_path_factory.mktemp(name))
            model.save_to_preset(directory)
            model = GemmaCausalLM.from_preset(directory)
            cache[name] = (directory, _logits(model), _generations(model))
        return cache[name]

    return get


def _inputs():
    token_ids = np.random.default_rng(0).integers(4, 400, (8, 10)).astype("int32")
    padding_mask = np.ones_like(token_ids)
    padding_mask[1, 7:] = 0
    return {"token_ids": token_ids, "padding_mask": padding_mask}


def _logits(model):
    return np.asarray(keras.ops.convert_to_numpy(model(_inputs())))


def _generations(model):
    prompts = [[2, 17, 33, 90, 41], [2, 8, 12]]  # different lengths: left padding
    return model.generate(prompts, max_new_tokens=5)


def _model_parallel(mesh_shape):
    mesh = keras.distribution.DeviceMesh(
        mesh_shape, ["batch", "model"], keras.distribution.list_devices()
    )
    layout_map = GemmaBackbone.get_layout_map(mesh)
    return keras.distribution.ModelParallel(layout_map=layout_map, batch_dim_name="batch")


def _check_shardings(model, distribution):
    """Every variable's array is sharded as the layout map says (else replicated)."""
    for path, variable in model_variables(model).items():
        layout = distribution._layout_map[path]
        axes = tuple(layout.axes) if layout is not None else (None,) * len(variable.shape)
        spec = tuple(variable.value.sharding.spec)
        spec += (None,) * (len(axes) - len(spec))
        assert spec == axes, path
        assert variable.value.sharding.mesh.shape == dict(
            zip(distribution.device_mesh.axis_names, distribution.device_mesh.shape, strict=True)
        )


@on_mesh
@pytest.mark.parametrize("mesh_shape", MESHES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_sharded_model_equals_one_device(presets, name, mesh_shape):
    directory, logits, generations = presets(name)
    distribution = _model_parallel(mesh_shape)
    with distribution.scope():
        model = GemmaCausalLM.from_preset(directory)
        _check_shardings(model, distribution)
        # float32 sums in another order across devices: 1e-5 of logits of size ~1.
        np.testing.assert_allclose(_logits(model), logits, rtol=1e-5, atol=1e-5)
        assert _generations(model) == generations


@on_mesh
@pytest.mark.parametrize("name", ["gemma1_mqa", "gemma3_gqa"])
def test_data_parallel_model_equals_one_device(presets, name):
    directory, logits, generations = presets(name)
    with keras.distribution.DataParallel(devices=keras.distribution.list_devices()).scope():
        model = GemmaCausalLM.from_preset(directory)
        np.testing.assert_allclose(_logits(model), logits, rtol=1e-5, atol=1e-5)
        assert _generations(model) == generations


@on_mesh
def test_weights_load_as_shards(presets):
    """from_preset under a distribution gives each device its shard only."""
    directory, _, _ = presets("gemma1_mqa")
    with _model_parallel((2, 4)).scope():
        model = GemmaCausalLM.from_preset(directory)
    kernel = model.backbone.decoder_blocks[0].ffw.gate.kernel.value  # [128, 64]
    shards = {tuple(shard.data.shape) for shard in kernel.addressable_shards}
    assert shards == {(32, 32)}
    assert len({shard.device for shard in kernel.addressable_shards}) == 8


@on_mesh
def test_caches_are_sharded(presets):
    directory, _, _ = presets("gemma2_gqa")
    with _model_parallel((2, 4)).scope():
        model = GemmaCausalLM.from_preset(directory)
        key_cache, _ = model.backbone.init_cache(batch_size=4, cache_length=16)[1]
    # [batch 4, slots 16, kv heads 2, head_dim 32]: 2 heads do not divide over 4
    # model devices, so head_dim does.
    assert tuple(key_cache.sharding.spec) == ("batch", None, None, "model")


def _lora_steps(model, batch):
    """Two LoRA training steps with fixed adapters: the losses and the weights after."""
    model.backbone.enable_lora(4, ["query", "value", "gate", "down"])
    generator = np.random.default_rng(1)
    for _, layer in sorted(model.backbone.lora_layers().items()):
        for weight in layer.lora_weights if layer.lora_enabled else ():
            weight.assign(generator.normal(0, 0.05, weight.shape).astype("float32"))
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    x, y = batch
    losses = [model.train_on_batch(x, y, return_dict=True)["loss"] for _ in range(2)]
    adapters = {
        f"{path}/{weight.name}": keras.ops.convert_to_numpy(weight)
        for path, layer in model.backbone.lora_layers().items()
        if layer.lora_enabled
        for weight in layer.lora_weights
    }
    return losses, adapters


@on_mesh
@pytest.mark.parametrize("kind", ["data_parallel", "model_parallel_2x4", "model_parallel_1x8"])
def test_lora_step_equals_one_device(presets, kind):
    directory, _, _ = presets("gemma1_mqa")
    inputs = _inputs()
    batch = (
        {name: array[:, :-1] for name, array in inputs.items()},
        inputs["token_ids"][:, 1:],
    )
    losses, adapters = _lora_steps(GemmaCausalLM.from_preset(directory), batch)
    if kind == "data_parallel":
        distribution = keras.distribution.DataParallel(devices=keras.distribution.list_devices())
    else:
        distribution = _model_parallel((2, 4) if kind.endswith("2x4") else (1, 8))
    with distribution.scope():
        sharded_losses, sharded_adapters = _lora_steps(GemmaCausalLM.from_preset(directory), batch)
    np.testing.assert_allclose(sharded_losses, losses, rtol=1e-6)
    for name, value in adapters.items():
        np.testing.assert_allclose(sharded_adapters[name], value, atol=1e-6, err_msg=name)


@on_mesh
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_sharded_generation(presets, mode):
    directory, _, _ = presets("gemma3_mqa")
    model = GemmaCausalLM.from_preset(directory)
    model.quantize(mode)
    expected = _generations(model)
    distribution = _model_parallel((2, 4))
    with distribution.scope():
        sharded = GemmaCausalLM.from_preset(directory)
        sharded.quantize(mode)
        _check_shardings(sharded, distribution)
        assert _generations(sharded) == expected


def _full_size_forms(config):
    """The weights a full-size model can hold, one `{path: shape}` per form:
    float with LoRA adapters (rank 16), int8 per channel, int4 in groups of 32."""
    floats, int8, int4 = dict(weight_shapes(config)), {}, {}
    for path, (rows, columns) in weight_shapes(config).items():
        layer, name = path.rsplit("/", 1)
        if name == "embeddings":
            floats[f"{layer}/lora_embeddings_a"] = (rows, 16)
            floats[f"{layer}/lora_embeddings_b"] = (16, columns)
        else:
            floats[f"{layer}/lora_kernel_a"] = (columns, 16)
            floats[f"{layer}/lora_kernel_b"] = (16, rows)
        int8[path], int8[f"{path}_scale"] = (rows, columns), (rows, 1)
        int4[path], int4[f"{path}_scale"] = (rows, columns // 2), (rows, columns // 32)
        int4[f"{path}_offset"] = int4[f"{path}_scale"]
    return floats, int8, int4


@on_mesh
@pytest.mark.parametrize("mesh_shape", MESHES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_full_size_layouts_divide(mesh_shape):
    """Every preset's architecture (Gemma 1 2B/7B, Gemma 2 2B/9B/27B, Gemma 3
    270M-27B), checked on shapes alone: nothing is allocated."""
    distribution = _model_parallel(mesh_shape)
    configs = {registry.preset_config(preset).to_json() for preset in registry.list_presets()}
    assert len(configs) >= 10
    for config in map(GemmaConfig.from_json, configs):
        for shapes in _full_size_forms(config):
            check_layouts(shapes, distribution)
    # MQA's single key/value head (Gemma 1 2B, Gemma 3 270M/1B) is split along
    # head_dim over the model axis, not replicated.
    assert distribution._layout_map["decoder_block_0/attention/key/kernel"].axes[0] == "model"


@pytest.mark.parametrize("name", ["gemma1_mqa", "gemma2_gqa", "gemma3_mha"])
def test_weight_shapes_are_the_models(name):
    model = GemmaBackbone(_config(*CONFIGS[name]))
    assert weight_shapes(model.config).items() <= model_shapes(model).items()
    assert len(weight_shapes(model.config)) == 1 + 7 * model.config.num_layers


def _mesh(shape, names):
    devices = keras.distribution.list_devices()[: int(np.prod(shape))]
    return keras.distribution.DeviceMesh(shape, names, devices)


@on_mesh
def test_a_mesh_that_does_not_divide_is_refused_by_name():
    mesh = _mesh((1, 3), ["batch", "model"])
    distribution = keras.distribution.ModelParallel(
        layout_map=GemmaBackbone.get_layout_map(mesh), batch_dim_name="batch"
    )
    with distribution.scope():
        with pytest.raises(DistributionError, match=r"token_embedding/embeddings .*1000.* 3 "):
            GemmaBackbone(_config("gemma1_mha", 1))


@on_mesh
def test_lora_rank_that_does_not_divide_is_refused_before_any_change(presets):
    directory, _, _ = presets("gemma1_mqa")
    mesh = _mesh((1, 8), ["batch", "model"])
    layout_map = GemmaBackbone.get_layout_map(mesh)
    # A model axis that splits adapters' rank is the user's own layout: refused by name.
    layout_map["decoder_block_0/attention/query/lora_kernel_a"] = (None, "model")
    with keras.distribution.ModelParallel(layout_map=layout_map).scope():
        model = GemmaCausalLM.from_preset(directory)
        with pytest.raises(DistributionError, match=r"query/lora_kernel_a .*size 4 .*8"):
            model.backbone.enable_lora(4)


@on_mesh
def test_axis_names_missing_from_the_mesh():
    mesh = _mesh((2, 4), ["data", "model"])
    with pytest.raises(DistributionError, match=r"data_parallel_dim_name='batch'.*'data'"):
        GemmaBackbone.get_layout_map(mesh)
    with pytest.raises(DistributionError, match=r"model_parallel_dim_name='tensor'"):
        GemmaBackbone.get_layout_map(mesh, "tensor", "data")
    layout_map = GemmaBackbone.get_layout_map(mesh, "model", "data")
    assert layout_map["token_embedding/embeddings"].axes == ("model", "data")


@pytest.mark.skipif(JAX, reason="JAX distributes")
def test_other_backends_say_what_is_supported():
    with pytest.raises(DistributionError, match=r"JAX only, not on (tensorflow|torch)"):
        GemmaBackbone.get_layout_map(None)
    with keras.distribution.DataParallel(devices=["cpu:0"]).scope():
        with pytest.raises(DistributionError, match=r"KERAS_BACKEND=jax"):
            GemmaBackbone(_config("gemma1_mha", 1))


@on_mesh
def test_batches_that_do_not_split_over_the_devices_are_refused(presets):
    directory, _, _ = presets("gemma1_mqa")
    inputs = _inputs()
    x = {name: array[:, :-1] for name, array in inputs.items()}
    y = inputs["token_ids"][:, 1:]
    with keras.distribution.DataParallel(devices=keras.distribution.list_devices()).scope():
        model = GemmaCausalLM.from_preset(directory)
        model.compile(optimizer=keras.optimizers.SGD(1e-2))
        examples = len(y)
        with pytest.raises(DistributionError, match="batches of 1, which do not split over the 8"):
            model.fit(x, y, batch_size=1, verbose=0)
        with pytest.raises(DistributionError, match="multiple of 8"):
            model.predict(x, batch_size=examples - 1, verbose=0)
