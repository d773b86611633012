"""KerasHub's Gemma layout: `GemmaBackbone` / `Gemma3Backbone` configs and weight names."""

import datetime
import json
import os

import h5py
import keras
import ml_dtypes
import numpy as np

from gemma_keras import quantization
from gemma_keras.checkpoints.checkpoint import Checkpoint
from gemma_keras.checkpoints.weight_mapping import (
    SAME,
    TRANSPOSED,
    WeightsError,
    heads_first,
    split_heads,
)
from gemma_keras.config import GemmaConfig, alternating_local_global, every_nth_global
from gemma_keras.tokenizer import GemmaTokenizer

GEMMA_CLASS = "keras_hub>GemmaBackbone"
GEMMA3_CLASS = "keras_hub>Gemma3Backbone"


def config_from_keras_hub(backbone_config, registered_name=GEMMA_CLASS):
    """A `GemmaConfig` from the `config` of a KerasHub backbone's `config.json`."""
    c = backbone_config
    is_gemma3 = registered_name == GEMMA3_CLASS
    num_layers = c["num_layers"]
    num_query_heads = c["num_query_heads"]
    # KerasHub's Gemma 1/2 store the gate and up widths together (2x); Gemma 3 does not.
    intermediate_dim = c["intermediate_dim"] if is_gemma3 else c["intermediate_dim"] // 2
    if c.get("query_head_dim_normalize", True):
        query_pre_attn_scalar = c["head_dim"]
    else:
        query_pre_attn_scalar = c["hidden_dim"] / num_query_heads
    sliding = c.get("use_sliding_window_attention", False)
    if not sliding:
        layer_types = None
    elif is_gemma3:
        layer_types = every_nth_global(num_layers)
    else:
        layer_types = alternating_local_global(num_layers)
    fields = dict(
        vocabulary_size=c["vocabulary_size"],
        num_layers=num_layers,
        hidden_dim=c["hidden_dim"],
        intermediate_dim=intermediate_dim,
        num_query_heads=num_query_heads,
        num_key_value_heads=c["num_key_value_heads"],
        head_dim=c["head_dim"],
        layer_norm_epsilon=c.get("layer_norm_epsilon", 1e-6),
        query_pre_attn_scalar=query_pre_attn_scalar,
        attention_logit_soft_cap=c.get("attention_logit_soft_cap"),
        final_logit_soft_cap=c.get("final_logit_soft_cap"),
        sliding_window=c.get("sliding_window_size") if sliding else None,
        layer_types=layer_types,
        use_qk_norm=c.get("use_query_key_norm", False),
        use_post_attention_norm=c.get("use_post_attention_norm", False),
        use_post_ffw_norm=c.get("use_post_ffw_norm", False),
    )
    if is_gemma3:
        # KerasHub does not store the context length; Gemma 3 4B and larger
        # (the ones with RoPE scaling) take 128k tokens, the smaller ones 32k.
        scaled = c.get("global_rope_scaling_factor", 1.0) > 1.0
        fields.update(
            max_sequence_length=131_072 if scaled else 32_768,
            global_rope_wavelength=c.get("global_rope_wavelength", 1_000_000.0),
            local_rope_wavelength=c.get("local_rope_wavelength", 10_000.0),
            global_rope_scaling_factor=c.get("global_rope_scaling_factor", 1.0),
        )
    return GemmaConfig(**fields)


def _block_group(config, index):
    """The h5 group KerasHub's saving gives decoder block `index`."""
    name = "gemma3_decoder_block" if config.use_qk_norm else "gemma_decoder_block"
    return f"layers/{name}" + (f"_{index}" if index else "")


def weight_mapping(config):
    """`{our_name: (h5_dataset_path, Layout)}` for KerasHub's `model.weights.h5`.

    The paths are those Keras' saving gives KerasHub's Gemma backbones, so the
    same table reads KerasHub presets and writes files KerasHub loads.
    """
    mapping = {
        "token_embedding/embeddings": ("layers/reversible_embedding/vars/0", SAME),
        "final_norm/scale": ("layers/rms_normalization/vars/0", SAME),
    }
    for index in range(config.num_layers):
        query_heads = heads_first(config.num_query_heads)
        key_value_heads = heads_first(config.num_key_value_heads)
        block = {
            "pre_attention_norm/scale": ("pre_attention_norm", SAME),
            "attention/query/kernel": ("attention/query_dense", query_heads),
            "attention/key/kernel": ("attention/key_dense", key_value_heads),
            "attention/value/kernel": ("attention/value_dense", key_value_heads),
            "attention/output/kernel": (
                "attention/output_dense",
                split_heads(config.num_query_heads),
            ),
            "pre_ffw_norm/scale": ("pre_ffw_norm", SAME),
            "ffw/gate/kernel": ("gating_ffw", TRANSPOSED),
            "ffw/up/kernel": ("gating_ffw_2", TRANSPOSED),
            "ffw/down/kernel": ("ffw_linear", TRANSPOSED),
        }
        if config.use_qk_norm:
            block["attention/query_norm/scale"] = ("attention/query_norm", SAME)
            block["attention/key_norm/scale"] = ("attention/key_norm", SAME)
        if config.use_post_attention_norm:
            block["post_attention_norm/scale"] = ("post_attention_norm", SAME)
        if config.use_post_ffw_norm:
            block["post_ffw_norm/scale"] = ("post_ffw_norm", SAME)
        group = _block_group(config, index)
        for our_name, (their_layer, layout) in block.items():
            mapping[f"decoder_block_{index}/{our_name}"] = (f"{group}/{their_layer}/vars/0", layout)
    return mapping


def keras_hub_config(config):
    """`(registered_name, backbone config)` for KerasHub, inverse of `config_from_keras_hub`."""
    from gemma_keras.config import ConfigError

    if config.query_pre_attn_scalar == config.head_dim:
        query_head_dim_normalize = True
    elif config.query_pre_attn_scalar == config.hidden_dim / config.num_query_heads:
        query_head_dim_normalize = False
    else:
        raise ConfigError(
            "KerasHub scales queries by head_dim or hidden_dim / num_query_heads only; "
            f"query_pre_attn_scalar={config.query_pre_attn_scalar} fits neither."
        )
    fields = dict(
        vocabulary_size=config.vocabulary_size,
        num_layers=config.num_layers,
        num_query_heads=config.num_query_heads,
        num_key_value_heads=config.num_key_value_heads,
        hidden_dim=config.hidden_dim,
        head_dim=config.head_dim,
        layer_norm_epsilon=config.layer_norm_epsilon,
        dropout=0,
        query_head_dim_normalize=query_head_dim_normalize,
        use_post_ffw_norm=config.use_post_ffw_norm,
        use_post_attention_norm=config.use_post_attention_norm,
        final_logit_soft_cap=config.final_logit_soft_cap,
        attention_logit_soft_cap=config.attention_logit_soft_cap,
        use_sliding_window_attention="local" in config.layer_types,
        sliding_window_size=config.sliding_window or 4096,
    )
    if config.use_qk_norm:
        expected = every_nth_global(config.num_layers)
        registered_name = GEMMA3_CLASS
        fields.update(
            intermediate_dim=config.intermediate_dim,
            use_query_key_norm=True,
            global_rope_scaling_factor=config.global_rope_scaling_factor,
            local_rope_scaling_factor=1.0,
            image_size=None,
            vision_encoder=None,
        )
    else:
        expected = alternating_local_global(config.num_layers)
        registered_name = GEMMA_CLASS
        fields.update(intermediate_dim=2 * config.intermediate_dim)
    if "local" in config.layer_types and config.layer_types != expected:
        raise ConfigError(
            f"KerasHub's {registered_name} fixes the local/global layer pattern; "
            f"layer_types={list(config.layer_types)} differs from it."
        )
    return registered_name, fields


# ---------------------------------------------------------------------------
# Preset directories: config.json, model.weights.h5 (or sharded), assets/tokenizer/vocabulary.spm
# ---------------------------------------------------------------------------

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.weights.h5"
SHARDED_WEIGHTS_FILE = "model.weights.json"
VOCABULARY_FILE = os.path.join("assets", "tokenizer", "vocabulary.spm")
TOKENIZER_FILE = "tokenizer.json"
PREPROCESSOR_FILE = "preprocessor.json"
TASK_FILE = "task.json"
# KerasHub's classes per backbone, `{role: (module under keras_hub.src.models, class)}`.
# KerasHub names each layer after its module ("gemma3_causal_lm_preprocessor").
_KERAS_HUB_CLASSES = {
    GEMMA_CLASS: {
        "backbone": ("gemma.gemma_backbone", "GemmaBackbone"),
        "tokenizer": ("gemma.gemma_tokenizer", "GemmaTokenizer"),
        "preprocessor": ("gemma.gemma_causal_lm_preprocessor", "GemmaCausalLMPreprocessor"),
        "task": ("gemma.gemma_causal_lm", "GemmaCausalLM"),
    },
    GEMMA3_CLASS: {
        "backbone": ("gemma3.gemma3_backbone", "Gemma3Backbone"),
        "tokenizer": ("gemma3.gemma3_tokenizer", "Gemma3Tokenizer"),
        "preprocessor": ("gemma3.gemma3_causal_lm_preprocessor", "Gemma3CausalLMPreprocessor"),
        "task": ("gemma3.gemma3_causal_lm", "Gemma3CausalLM"),
    },
}
# The sequence length KerasHub's causal LM preprocessors pack to by default.
KERAS_HUB_SEQUENCE_LENGTH = 1024
# KerasHub's Gemma 3 tokenizer requires these pieces unless `has_vision_tokens` is false.
_VISION_PIECES = ("<img>", "<start_of_image>", "<end_of_image>")


def is_preset_directory(path):
    return (
        os.path.isdir(path)
        and os.path.isfile(os.path.join(path, CONFIG_FILE))
        and (
            os.path.isfile(os.path.join(path, WEIGHTS_FILE))
            or os.path.isfile(os.path.join(path, SHARDED_WEIGHTS_FILE))
        )
    )


class _H5Tensor:
    """An h5 dataset read only when converted to an array (Keras stores bf16 as raw 16-bit)."""

    def __init__(self, dataset):
        self.dataset = dataset
        self.shape = dataset.shape

    def __array__(self, dtype=None, copy=None):
        if self.dataset.attrs.get("dtype") == "bfloat16":
            array = np.asarray(self.dataset[()]).view(ml_dtypes.bfloat16)
        else:
            array = self.dataset[()]
        return np.asarray(array, dtype=dtype)


def _open_h5(path):
    try:
        return h5py.File(path, "r")
    except OSError as error:
        raise WeightsError(
            f"{path} is not a readable HDF5 weights file ({error}); it may be truncated or "
            "corrupted: download or copy it again."
        ) from None


def read_weight_files(directory):
    """`{h5_dataset_path: lazy tensor}` from `model.weights.h5` or sharded `model.weights.json`."""
    sharded = os.path.join(directory, SHARDED_WEIGHTS_FILE)
    if os.path.isfile(sharded):
        with open(sharded) as file:
            weight_map = json.load(file).get("weight_map", {})
        files = {}
        for group, filenames in weight_map.items():
            filename = filenames[0] if isinstance(filenames, list) else filenames
            files.setdefault(filename, []).append(group.strip("/"))
        paths = [os.path.join(directory, filename) for filename in sorted(files)]
    else:
        paths = [os.path.join(directory, WEIGHTS_FILE)]
    tensors = {}
    for path in paths:
        if not os.path.isfile(path):
            raise WeightsError(f"Weights file {path} is missing; the preset is incomplete.")
        h5_file = _open_h5(path)

        def collect(name, item):
            if isinstance(item, h5py.Dataset):
                tensors[name] = _H5Tensor(item)

        try:
            h5_file.visititems(collect)
        except (OSError, RuntimeError, KeyError) as error:
            raise WeightsError(
                f"{path} is corrupted ({error}); download or copy it again."
            ) from None
    return tensors


def _read_json(path):
    try:
        with open(path) as file:
            return json.load(file)
    except json.JSONDecodeError as error:
        raise WeightsError(f"{path} is not valid JSON ({error}).") from None


def read_preset(directory):
    """Reads a KerasHub Gemma/Gemma 3 preset directory into a `Checkpoint`."""
    directory = os.fspath(directory)
    config_path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isfile(config_path):
        raise WeightsError(f"{directory} has no {CONFIG_FILE}; it is not a KerasHub preset.")
    saved = _read_json(config_path)
    registered_name = saved.get("registered_name")
    if registered_name not in (GEMMA_CLASS, GEMMA3_CLASS):
        raise WeightsError(
            f"{config_path}: registered_name is {registered_name!r}; gemma_keras reads "
            f"{GEMMA_CLASS} and {GEMMA3_CLASS} presets."
        )
    backbone_config = saved.get("config")
    if not isinstance(backbone_config, dict):
        raise WeightsError(f"{config_path}: 'config' must be the backbone's settings (an object).")
    if backbone_config.get("vision_encoder"):
        raise WeightsError(f"{config_path}: Gemma 3 vision presets are not supported (text only).")
    try:
        config = config_from_keras_hub(backbone_config, registered_name)
    except KeyError as missing:
        raise WeightsError(
            f"{config_path}: config has no {missing}; the preset is incomplete (save it again)."
        ) from None
    except (TypeError, ValueError) as error:
        raise WeightsError(
            f"{config_path}: config is not a valid Gemma backbone ({error})."
        ) from None
    vocabulary = os.path.join(directory, VOCABULARY_FILE)
    if not os.path.isfile(vocabulary):
        raise WeightsError(
            f"{directory} has no tokenizer ({VOCABULARY_FILE}); copy the preset's assets/ too."
        )
    with open(vocabulary, "rb") as file:
        tokenizer_proto = file.read()
    tensors, mapping = read_weight_files(directory), weight_mapping(config)
    for name, tensor in _stored_quantized(tensors).items():
        tensors[tensor.group_name] = tensor
        mapping[name] = (tensor.group_name, SAME)
    return Checkpoint(config, tensors, mapping, tokenizer_proto, directory)


# Quantized weights in a preset that gemma_keras writes: one h5 group per
# weight, `gemma_keras_quantized/<our name>` holding `kernel`, `scale` (and
# `offset`), with the mode and group size as attributes, in our `[out, in]`
# layout. KerasHub's loaders do not read them.
QUANTIZED_GROUP = "gemma_keras_quantized"


class StoredQuantizedTensor:
    """A quantized weight stored in a preset: `.quantized(mode)` gives it as it
    is stored (when `mode` is the stored one), `np.asarray` dequantizes it."""

    def __init__(self, group_name, datasets):
        self.group_name = group_name
        attributes = datasets["kernel"].dataset.parent.attrs
        self.mode = str(attributes["mode"])
        self.group_size = int(attributes["group_size"])
        self.shape = tuple(int(size) for size in attributes["shape"])
        self._datasets = datasets

    def stored(self):
        arrays = {name: np.asarray(dataset) for name, dataset in self._datasets.items()}
        return quantization.QuantizedWeight(
            self.mode, arrays["kernel"], arrays["scale"], arrays.get("offset"), self.group_size
        )

    def quantized(self, mode):
        return self.stored() if mode == self.mode else None

    def __array__(self, dtype=None, copy=None):
        return np.asarray(quantization.dequantize_numpy(self.stored()), dtype=dtype)


def _stored_quantized(tensors):
    """`{our name: StoredQuantizedTensor}` of the quantized weights among `tensors`."""
    grouped = {}
    prefix = QUANTIZED_GROUP + "/"
    for path in [path for path in tensors if path.startswith(prefix)]:
        group_name, array_name = path.rsplit("/", 1)
        grouped.setdefault(group_name, {})[array_name] = tensors.pop(path)
    return {
        group_name[len(prefix) :]: StoredQuantizedTensor(group_name, datasets)
        for group_name, datasets in grouped.items()
    }


def _write_json(path, data):
    with open(path, "w") as file:
        json.dump(data, file, indent=4)


def _keras_hub_object(registered_name, role, config):
    """KerasHub's class for `role` ("backbone", "tokenizer", "preprocessor" or "task")
    of `registered_name`'s generation with `config`, as Keras serializes it."""
    module, class_name = _KERAS_HUB_CLASSES[registered_name][role]
    return {
        "module": f"keras_hub.src.models.{module}",
        "class_name": class_name,
        "config": {"name": module.split(".")[-1], **config},
        "registered_name": f"keras_hub>{class_name}",
    }


def _dtype_policy(name):
    return {
        "module": "keras",
        "class_name": "DTypePolicy",
        "config": {"name": name},
        "registered_name": None,
    }


def _preset_json_files(registered_name, backbone_fields, dtype, tokenizer_proto):
    """`{file name: JSON}` of the backbone, tokenizer, preprocessor and task configs, as
    KerasHub's `CausalLM.save_to_preset` writes them for a text-only model.

    With `preprocessor.json` KerasHub's `Gemma3CausalLM.from_preset` builds a
    text-only preprocessor instead of looking for `image_converter.json`.
    """
    backbone = _keras_hub_object(
        registered_name,
        "backbone",
        {"trainable": True, "dtype": _dtype_policy(dtype), **backbone_fields},
    )
    tokenizer_config = {
        "trainable": True,
        "dtype": _dtype_policy("int32"),
        "config_file": TOKENIZER_FILE,
        "proto": None,
        "sequence_length": None,
        "add_bos": False,
        "add_eos": False,
    }
    preprocessor_config = {
        "trainable": True,
        "dtype": _dtype_policy("float32"),
        "config_file": PREPROCESSOR_FILE,
        "sequence_length": KERAS_HUB_SEQUENCE_LENGTH,
        "add_start_token": True,
        "add_end_token": True,
    }
    if registered_name == GEMMA3_CLASS:
        # KerasHub's own rule when it converts a vocabulary: vision tokens only
        # when all of them are there (the tokenizer fails on a missing one).
        vocabulary = GemmaTokenizer(tokenizer_proto)
        tokenizer_config["has_vision_tokens"] = all(
            vocabulary.token_to_id(piece) is not None for piece in _VISION_PIECES
        )
        # KerasHub's defaults, written as it writes them; unused without images.
        preprocessor_config.update(num_vision_tokens_per_image=256, max_images_per_prompt=2)
    tokenizer = _keras_hub_object(registered_name, "tokenizer", tokenizer_config)
    preprocessor = _keras_hub_object(
        registered_name, "preprocessor", {"tokenizer": tokenizer, **preprocessor_config}
    )
    task = _keras_hub_object(
        registered_name, "task", {"backbone": backbone, "preprocessor": preprocessor}
    )
    return {
        CONFIG_FILE: backbone,
        TOKENIZER_FILE: tokenizer,
        PREPROCESSOR_FILE: preprocessor,
        TASK_FILE: task,
    }


def write_preset(directory, config, weights, tokenizer_proto, dtype="float32", quantized=None):
    """Writes a preset directory that KerasHub's `GemmaCausalLM.from_preset` (Gemma 1/2)
    or `Gemma3CausalLM.from_preset` loads, task and preprocessor included.

    `weights` is `{our_name: array}`; arrays are stored in `dtype` (float32 or
    bfloat16, which Keras stores as raw 16-bit with a dtype attribute).
    `quantized` (`{our_name: QuantizedWeight}`) are stored as they are instead
    (see `QUANTIZED_GROUP`); such a preset loads in gemma_keras only.
    """
    quantized = quantized or {}
    registered_name, fields = keras_hub_config(config)
    os.makedirs(os.path.join(directory, os.path.dirname(VOCABULARY_FILE)), exist_ok=True)
    json_files = _preset_json_files(registered_name, fields, dtype, tokenizer_proto)
    for name, contents in json_files.items():
        _write_json(os.path.join(directory, name), contents)
    with open(os.path.join(directory, VOCABULARY_FILE), "wb") as file:
        file.write(tokenizer_proto)
    store_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32
    temporary = os.path.join(directory, WEIGHTS_FILE + ".partial")
    with h5py.File(temporary, "w") as h5_file:
        for ours, (theirs, layout) in weight_mapping(config).items():
            if ours in quantized:
                _write_quantized(h5_file, ours, quantized[ours])
                continue
            array = np.asarray(layout.theirs(np.asarray(weights[ours]))).astype(store_dtype)
            dataset = h5_file.create_dataset(theirs, data=array)
            if dtype == "bfloat16":  # as Keras writes it: opaque 16-bit values, tagged
                dataset.attrs["dtype"] = "bfloat16"
    os.replace(temporary, os.path.join(directory, WEIGHTS_FILE))
    _write_json(
        os.path.join(directory, "metadata.json"),
        {
            "keras_version": keras.__version__,
            "gemma_keras_version": _package_version(),
            "parameter_count": config.num_parameters(),
            "date_saved": datetime.datetime.now().strftime("%Y-%m-%d@%H:%M:%S"),
            "tasks": ["CausalLM"],
        },
    )


def _write_quantized(h5_file, name, quantized):
    group = h5_file.create_group(f"{QUANTIZED_GROUP}/{name}")
    group.attrs.update(mode=quantized.mode, group_size=quantized.group_size, shape=quantized.shape)
    names = {"": "kernel", "_scale": "scale", "_offset": "offset"}
    for suffix, array in quantized.arrays().items():
        group.create_dataset(names[suffix], data=array)


def _package_version():
    from gemma_keras import __version__

    return __version__
