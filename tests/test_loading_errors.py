"""Bad checkpoints fail with a message naming the file, the problem and the fix."""

import json
import os
import struct

import ml_dtypes
import numpy as np
import pytest

from conftest import randomize, tiny_config
from gemma_keras import GemmaCausalLM, GemmaTokenizer
from gemma_keras.checkpoints.weight_mapping import WeightsError, assign_weights, model_shapes


@pytest.fixture
def model(tokenizer_proto):
    model = GemmaCausalLM.from_gemma_config(tiny_config("gemma1_mqa"), dtype="float32")
    assign_weights(model, randomize(model_shapes(model)))
    model.tokenizer = GemmaTokenizer(tokenizer_proto)
    return model


@pytest.fixture
def keras_hub_preset(model, tmp_path):
    directory = tmp_path / "preset"
    model.save_to_preset(str(directory))
    return directory


@pytest.fixture
def hf_checkpoint(model, tmp_path):
    directory = tmp_path / "hf"
    model.export_to_huggingface(str(directory))
    return directory


def edit_json(path, change):
    """Rewrites the JSON file at `path` with `change(saved)` applied."""
    saved = json.loads(path.read_text())
    change(saved)
    path.write_text(json.dumps(saved))


def truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_missing_weights(keras_hub_preset):
    os.remove(keras_hub_preset / "model.weights.h5")
    with pytest.raises(WeightsError, match=r"model\.weights\.h5 is missing"):
        GemmaCausalLM.from_preset(str(keras_hub_preset))


def test_missing_tokenizer(keras_hub_preset, hf_checkpoint):
    os.remove(keras_hub_preset / "assets" / "tokenizer" / "vocabulary.spm")
    with pytest.raises(
        WeightsError, match=r"has no tokenizer \(assets/tokenizer/vocabulary\.spm\)"
    ):
        GemmaCausalLM.from_preset(str(keras_hub_preset))
    os.remove(hf_checkpoint / "tokenizer.model")
    with pytest.raises(WeightsError, match=r"has no tokenizer\.model"):
        GemmaCausalLM.from_preset(str(hf_checkpoint))


def test_truncated_h5(keras_hub_preset):
    truncate(keras_hub_preset / "model.weights.h5")
    with pytest.raises(WeightsError, match=r"model\.weights\.h5 .*(truncated|corrupted)"):
        GemmaCausalLM.from_preset(str(keras_hub_preset))


@pytest.mark.parametrize("keep", [0.5, 0.999, 0.0001])
def test_truncated_safetensors(hf_checkpoint, keep):
    truncate(hf_checkpoint / "model.safetensors", keep)
    with pytest.raises(WeightsError, match=r"model\.safetensors is not a valid safetensors file"):
        GemmaCausalLM.from_preset(str(hf_checkpoint))


def test_config_disagreeing_with_weights_names_tensor_and_shapes(keras_hub_preset):
    edit_json(keras_hub_preset / "config.json", lambda saved: saved["config"].update(hidden_dim=96))
    with pytest.raises(
        WeightsError, match=r"reversible_embedding/vars/0' has shape \(1000, 64\) .* \(1000, 96\)"
    ):
        GemmaCausalLM.from_preset(str(keras_hub_preset))


def test_transformers_config_disagreeing_with_weights(hf_checkpoint):
    edit_json(hf_checkpoint / "config.json", lambda saved: saved.update(intermediate_size=256))
    with pytest.raises(WeightsError, match=r"mlp\.gate_proj\.weight' has shape \(128, 64\)"):
        GemmaCausalLM.from_preset(str(hf_checkpoint))


def test_checkpoint_with_fewer_layers_than_config(hf_checkpoint):
    edit_json(hf_checkpoint / "config.json", lambda saved: saved.update(num_hidden_layers=3))
    with pytest.raises(WeightsError, match=r"lacks .* model\.layers\.2\."):
        GemmaCausalLM.from_preset(str(hf_checkpoint))


def test_checkpoint_with_more_layers_than_config(hf_checkpoint, keras_hub_preset):
    """Weights the config leaves unused mean the config is not theirs: refused, never
    loaded as a smaller model."""
    edit_json(hf_checkpoint / "config.json", lambda saved: saved.update(num_hidden_layers=1))
    with pytest.raises(WeightsError, match=r"holds 9 layer tensor\(s\) .* model\.layers\.1\."):
        GemmaCausalLM.from_preset(str(hf_checkpoint))
    edit_json(keras_hub_preset / "config.json", lambda saved: saved["config"].update(num_layers=1))
    with pytest.raises(WeightsError, match=r"config does not use: layers/\S*decoder_block_1/"):
        GemmaCausalLM.from_preset(str(keras_hub_preset))


def test_gemma3_weights_under_a_gemma1_config_are_refused(tokenizer_proto, tmp_path):
    model = GemmaCausalLM.from_gemma_config(tiny_config("gemma3"), dtype="float32")
    assign_weights(model, randomize(model_shapes(model)))
    model.tokenizer = GemmaTokenizer(tokenizer_proto)
    model.export_to_huggingface(str(tmp_path / "hf"))
    edit_json(tmp_path / "hf" / "config.json", lambda saved: saved.update(model_type="gemma"))
    with pytest.raises(WeightsError, match=r"model\.layers\.0\.\S*(norm)\.weight.* another Gemma"):
        GemmaCausalLM.from_preset(str(tmp_path / "hf"))


def test_directory_without_a_model(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(WeightsError, match=r"holds no model: expected a KerasHub preset"):
        GemmaCausalLM.from_preset(str(tmp_path))


def test_not_a_gemma_keras_hub_preset(keras_hub_preset):
    edit_json(
        keras_hub_preset / "config.json",
        lambda saved: saved.update(registered_name="keras_hub>LlamaBackbone"),
    )
    with pytest.raises(WeightsError, match=r"registered_name is 'keras_hub>LlamaBackbone'"):
        GemmaCausalLM.from_preset(str(keras_hub_preset))


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda saved: saved["config"].pop("hidden_dim"), r"config has no 'hidden_dim'"),
        (lambda saved: saved.update(config=None), r"'config' must be the backbone's settings"),
        (
            lambda saved: saved["config"].update(num_layers="two"),
            "config is not a valid Gemma backbone",
        ),
    ],
)
def test_incomplete_keras_hub_config(keras_hub_preset, edit, message):
    edit_json(keras_hub_preset / "config.json", edit)
    with pytest.raises(WeightsError, match=message) as error:
        GemmaCausalLM.from_preset(str(keras_hub_preset))
    assert "config.json" in str(error.value)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_damaged_weights_are_refused(model, tmp_path, bad, dtype):
    """Bytes damaged inside a weights file read as NaN or infinity; the load says so."""
    model.export_to_huggingface(str(tmp_path / "hf"), dtype=dtype)
    path = tmp_path / "hf" / "model.safetensors"
    # Overwrite one value's bytes in place, as damage on disk would.
    with open(path, "r+b") as file:
        (header_length,) = struct.unpack("<Q", file.read(8))
        header = json.loads(file.read(header_length))
        name = next(name for name in sorted(header) if "up_proj" in name)
        entry = header[name]
        assert entry["dtype"] == {"float32": "F32", "bfloat16": "BF16"}[dtype]
        item = np.dtype(ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32)
        index = 1 * entry["shape"][1] + 2  # element [1, 2]
        file.seek(8 + header_length + entry["data_offsets"][0] + index * item.itemsize)
        file.write(np.array([bad], dtype=item).tobytes())
    for quantize in (None, "int8"):
        with pytest.raises(
            WeightsError, match=r"holds NaN or infinite values; the file is damaged"
        ):
            GemmaCausalLM.from_preset(str(tmp_path / "hf"), quantize=quantize)


def test_writing_into_a_file_is_refused(model, tmp_path):
    path = tmp_path / "model.txt"
    path.write_text("keep me")
    for write in (model.save_to_preset, model.export_to_huggingface):
        with pytest.raises(ValueError, match="model.txt is a file; give a folder"):
            write(str(path))
    assert path.read_text() == "keep me"


def test_model_is_usable_after_a_failed_load(keras_hub_preset):
    truncate(keras_hub_preset / "model.weights.h5")
    with pytest.raises(WeightsError):
        GemmaCausalLM.from_preset(str(keras_hub_preset))
    # No half-initialised variables are left pending in Keras' global state.
    fresh = GemmaCausalLM.from_gemma_config(tiny_config("gemma1_mqa"))
    assert fresh.count_params() == tiny_config("gemma1_mqa").num_parameters()


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"preset": None}, "preset must be a preset name, a path or a URL"),
        ({"preset": b"gemma3_270m_q4_k_m"}, "preset must be a preset name"),
        ({"preset": ""}, "a non-empty string"),
        ({"preset": "gemma3_270m_q4_k_m", "dtype": "int8"}, "not a float type; .*quantize='int8'"),
        ({"preset": "gemma3_270m_q4_k_m", "load_weights": "no"}, "load_weights must be True"),
    ],
)
def test_bad_from_preset_arguments(arguments, message):
    with pytest.raises(ValueError, match=message):
        GemmaCausalLM.from_preset(**arguments)


def test_writing_under_a_file_is_refused(model, tmp_path):
    (tmp_path / "afile").write_text("keep me")
    with pytest.raises(ValueError, match="afile is a file; give a folder"):
        model.save_to_preset(str(tmp_path / "afile" / "sub"))
    assert (tmp_path / "afile").read_text() == "keep me"
