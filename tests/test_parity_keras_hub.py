"""gemma_keras equals KerasHub's Gemma with identical weights, through real preset files.

KerasHub writes a preset with its own `save_to_preset` and gemma_keras loads
it; gemma_keras writes one with `save_to_preset` and KerasHub loads it as a
task (`GemmaCausalLM`, `Gemma3CausalLM`) with its preprocessor. Logits are
compared on the same inputs, a right-padded row included.
"""

import dataclasses
import json

import keras
import numpy as np
import pytest
from sentencepiece import sentencepiece_model_pb2

from conftest import randomize, tiny_config, token_batch
from gemma_keras import GemmaCausalLM, GemmaConfig, GemmaTokenizer
from gemma_keras.checkpoints import keras_hub as keras_hub_format
from gemma_keras.checkpoints.weight_mapping import assign_weights, model_shapes
from gemma_keras.config import alternating_local_global

keras_hub = pytest.importorskip("keras_hub")

# Measured max |logit difference| in float32: 4.8e-7 (jax), 7.2e-7 (tensorflow, torch).
TOLERANCE = 1e-4

# Gemma 2 as KerasHub can express it (queries scaled by head_dim, fixed layer pattern).
KERAS_HUB_GEMMA2 = GemmaConfig(
    vocabulary_size=1000,
    num_layers=4,
    hidden_dim=64,
    intermediate_dim=128,
    num_query_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    attention_logit_soft_cap=50.0,
    final_logit_soft_cap=30.0,
    sliding_window=5,
    layer_types=alternating_local_global(4),
    use_post_attention_norm=True,
    use_post_ffw_norm=True,
)
CONFIGS = {
    "gemma1_mqa": tiny_config("gemma1_mqa"),
    "gemma1_mha": tiny_config("gemma1_mha"),
    "gemma2": KERAS_HUB_GEMMA2,
    "gemma3": tiny_config("gemma3"),
}
# KerasHub's classes for each backbone: backbone, tokenizer, preprocessor, task.
KERAS_HUB_CLASSES = {
    keras_hub_format.GEMMA_CLASS: (
        keras_hub.models.GemmaBackbone,
        keras_hub.models.GemmaTokenizer,
        keras_hub.models.GemmaCausalLMPreprocessor,
        keras_hub.models.GemmaCausalLM,
    ),
    keras_hub_format.GEMMA3_CLASS: (
        keras_hub.models.Gemma3Backbone,
        keras_hub.models.Gemma3Tokenizer,
        keras_hub.models.Gemma3CausalLMPreprocessor,
        keras_hub.models.Gemma3CausalLM,
    ),
}


def keras_hub_classes(config):
    registered_name, _ = keras_hub_format.keras_hub_config(config)
    return KERAS_HUB_CLASSES[registered_name]


def inputs_for(config):
    token_ids = token_batch(config.vocabulary_size)
    padding_mask = np.ones_like(token_ids)
    padding_mask[1, 8:] = 0  # a right-padded row, as KerasHub's preprocessor pads
    return {"token_ids": token_ids, "padding_mask": padding_mask}


def logits(model, inputs):
    values = keras.ops.convert_to_numpy(model(inputs)).astype("float32")
    return values[inputs["padding_mask"].astype(bool)]


def random_keras_hub_model(config, tokenizer_proto, seed=0, sequence_length=16):
    """KerasHub's own causal LM for `config` (text only), random weights."""
    _, fields = keras_hub_format.keras_hub_config(config)
    backbone_class, tokenizer_class, preprocessor_class, task_class = keras_hub_classes(config)
    backbone = backbone_class(**fields, dtype="float32")
    rng = np.random.default_rng(seed)
    for variable in backbone.weights:
        std = 0.3 if "norm" in variable.path else 0.05
        variable.assign(rng.normal(0, std, variable.shape).astype("float32"))
    if tokenizer_class is keras_hub.models.Gemma3Tokenizer:
        # The tiny vocabulary has no <img>/<start_of_image>/<end_of_image>.
        tokenizer = tokenizer_class(proto=tokenizer_proto, has_vision_tokens=False)
    else:
        tokenizer = tokenizer_class(proto=tokenizer_proto)
    preprocessor = preprocessor_class(tokenizer, sequence_length=sequence_length)
    return task_class(backbone=backbone, preprocessor=preprocessor)


def random_model(config, tokenizer_proto):
    """gemma_keras' model for `config` with random weights and the tiny tokenizer."""
    model = GemmaCausalLM.from_gemma_config(config, dtype="float32")
    assign_weights(model, randomize(model_shapes(model)))
    model.tokenizer = GemmaTokenizer(tokenizer_proto)
    return model


@pytest.mark.parametrize("variant", sorted(CONFIGS))
def test_keras_hub_preset_loads_in_gemma_keras(variant, tokenizer_proto, tmp_path):
    config = CONFIGS[variant]
    reference = random_keras_hub_model(config, tokenizer_proto)
    reference.save_to_preset(str(tmp_path))

    ours = GemmaCausalLM.from_preset(str(tmp_path))
    assert ours.config == config
    assert ours.tokenizer.proto == tokenizer_proto
    inputs = inputs_for(config)
    error = np.abs(logits(ours, inputs) - logits(reference, inputs)).max()
    print(f"{variant}: KerasHub preset -> gemma_keras, max |logit difference| = {error:.2e}")
    assert error <= TOLERANCE


@pytest.mark.parametrize("variant", sorted(CONFIGS))
def test_gemma_keras_preset_loads_in_keras_hub(variant, tokenizer_proto, tmp_path):
    config = CONFIGS[variant]
    ours = random_model(config, tokenizer_proto)
    ours.save_to_preset(str(tmp_path))

    # KerasHub's task class loads the task, its preprocessor included.
    _, _, preprocessor_class, task_class = keras_hub_classes(config)
    reference = task_class.from_preset(str(tmp_path), dtype="float32")
    assert type(reference.preprocessor) is preprocessor_class
    inputs = inputs_for(config)
    error = np.abs(logits(ours, inputs) - logits(reference, inputs)).max()
    print(f"{variant}: gemma_keras preset -> KerasHub, max |logit difference| = {error:.2e}")
    assert error <= TOLERANCE
    prompt = "The capital of France is"
    assert np.asarray(reference.preprocessor.tokenizer(prompt)).tolist() == ours.tokenizer.encode(
        prompt, add_bos=False
    )


def test_sharded_keras_hub_weights(tokenizer_proto, tmp_path):
    config = CONFIGS["gemma1_mqa"]
    reference = random_keras_hub_model(config, tokenizer_proto)
    reference.save_to_preset(str(tmp_path))
    (tmp_path / "model.weights.h5").unlink()
    reference.backbone.save_weights(str(tmp_path / "model.weights.json"), max_shard_size=0.0003)
    assert len(list(tmp_path.glob("model_*.weights.h5"))) > 1

    ours = GemmaCausalLM.from_preset(str(tmp_path))
    inputs = inputs_for(config)
    assert np.abs(logits(ours, inputs) - logits(reference, inputs)).max() <= TOLERANCE


def test_bfloat16_preset_round_trip(tokenizer_proto, tmp_path):
    config = tiny_config("gemma3")
    ours = GemmaCausalLM.from_gemma_config(config, dtype="bfloat16")
    assign_weights(ours, randomize(model_shapes(ours)))
    ours.tokenizer = GemmaTokenizer(tokenizer_proto)
    ours.save_to_preset(str(tmp_path))
    loaded = GemmaCausalLM.from_preset(str(tmp_path), dtype="bfloat16")
    assert loaded.config == config
    inputs = inputs_for(config)
    np.testing.assert_array_equal(logits(loaded, inputs), logits(ours, inputs))


def test_gemma3_preset_generates_in_keras_hub_as_in_gemma_keras(tokenizer_proto, tmp_path):
    # The model's vocabulary is the tokenizer's, so that generated ids decode.
    vocabulary_size = GemmaTokenizer(tokenizer_proto).vocabulary_size
    config = dataclasses.replace(tiny_config("gemma3"), vocabulary_size=vocabulary_size)
    ours = random_model(config, tokenizer_proto)
    ours.save_to_preset(str(tmp_path))

    reference = keras_hub.models.Gemma3CausalLM.from_preset(str(tmp_path), dtype="float32")
    assert reference.preprocessor.image_converter is None  # text only
    assert reference.preprocessor.sequence_length == keras_hub_format.KERAS_HUB_SEQUENCE_LENGTH
    reference.preprocessor.sequence_length = 16
    prompt = "The capital of France is"
    packed = reference.preprocessor.generate_preprocess(prompt)
    token_ids = np.asarray(packed["token_ids"])[np.asarray(packed["padding_mask"])]
    assert token_ids.tolist() == ours.tokenizer.encode(prompt)  # <bos> first
    # Greedy, to the same total length (KerasHub's `max_length` counts the prompt).
    assert reference.generate(prompt, max_length=20) == ours.generate(prompt, max_length=20)

    # Training data: labels are the next tokens, only the response's weighted.
    x, labels, weights = reference.preprocessor({"prompts": ["Paris"], "responses": ["Rome"]})
    expected = ours.tokenizer.encode("Paris") + ours.tokenizer.encode("Rome", add_bos=False)
    expected.append(ours.tokenizer.eos_id)
    length = len(expected)
    assert np.asarray(x["token_ids"])[0, :length].tolist() == expected
    assert np.asarray(labels)[0, : length - 1].tolist() == expected[1:]
    prompt_length = len(ours.tokenizer.encode("Paris"))
    assert np.asarray(weights)[0].nonzero()[0].tolist() == list(
        range(prompt_length - 1, length - 1)
    )


@pytest.mark.parametrize("variant", ["gemma1_mqa", "gemma2", "gemma3"])
def test_preset_json_files_are_those_keras_hub_writes(variant, tokenizer_proto, tmp_path):
    config = CONFIGS[variant]
    # Keras numbers layer names after the first ("gemma_tokenizer_4"); KerasHub
    # saves those names, so start from fresh ones.
    keras.backend.clear_session()
    theirs = tmp_path / "keras_hub"
    random_keras_hub_model(
        config, tokenizer_proto, sequence_length=keras_hub_format.KERAS_HUB_SEQUENCE_LENGTH
    ).save_to_preset(str(theirs))
    ours = tmp_path / "gemma_keras"
    random_model(config, tokenizer_proto).save_to_preset(str(ours))

    def read(directory, name):
        return json.loads((directory / name).read_text())

    for name in ("tokenizer.json", "preprocessor.json"):
        assert read(ours, name) == read(theirs, name), name
    # KerasHub 0.32's backbones add fields with defaults (`use_bidirectional_attention`
    # ...); we leave them out so that older KerasHub versions load the files too.
    our_task, their_task = read(ours, "task.json"), read(theirs, "task.json")
    our_backbone = our_task["config"].pop("backbone")
    their_backbone = their_task["config"].pop("backbone")
    assert our_task == their_task
    assert our_backbone == read(ours, "config.json")
    their_fields = their_backbone["config"]
    assert our_backbone["config"] == {key: their_fields[key] for key in our_backbone["config"]}
    assert {key: value for key, value in our_backbone.items() if key != "config"} == {
        key: value for key, value in their_backbone.items() if key != "config"
    }


def with_vision_pieces(tokenizer_proto):
    """The tiny vocabulary plus Gemma 3's image pieces, as user-defined pieces."""
    model = sentencepiece_model_pb2.ModelProto()
    model.ParseFromString(tokenizer_proto)
    user_defined = sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED
    for piece in ("<img>", "<start_of_image>", "<end_of_image>"):
        model.pieces.add(piece=piece, score=0.0, type=user_defined)
    return model.SerializeToString()


def test_gemma3_vocabulary_with_image_pieces_keeps_them_in_keras_hub(tokenizer_proto, tmp_path):
    # Real Gemma 3 vocabularies have the image pieces; KerasHub's tokenizer
    # then looks them up (`has_vision_tokens`), as its own converter decides.
    proto = with_vision_pieces(tokenizer_proto)
    vocabulary = GemmaTokenizer(proto)
    config = dataclasses.replace(tiny_config("gemma3"), vocabulary_size=vocabulary.vocabulary_size)
    ours = random_model(config, proto)
    ours.save_to_preset(str(tmp_path))

    reference = keras_hub.models.Gemma3CausalLM.from_preset(str(tmp_path), dtype="float32")
    tokenizer = reference.preprocessor.tokenizer
    assert tokenizer.has_vision_tokens
    assert tokenizer.start_of_image_token_id == vocabulary.token_to_id("<start_of_image>")
    assert reference.preprocessor.image_converter is None
    inputs = inputs_for(config)
    assert np.abs(logits(ours, inputs) - logits(reference, inputs)).max() <= TOLERANCE
