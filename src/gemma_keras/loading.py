"""From files on disk to a ready model: pick the reader, build the model from the weights."""

import json
import math
import os
import shutil
import tempfile

import keras
import ml_dtypes
import numpy as np

from gemma_keras import quantization, registry, resolve
from gemma_keras.causal_lm import GemmaCausalLM
from gemma_keras.checkpoints import huggingface, keras_hub
from gemma_keras.checkpoints.weight_mapping import WeightsError, model_shapes, model_variables
from gemma_keras.preprocessor import GemmaCausalLMPreprocessor
from gemma_keras.resolve import resolve_preset
from gemma_keras.tokenizer import GemmaTokenizer


def read_checkpoint(path):
    """A `Checkpoint` from a KerasHub preset directory, a transformers directory or a GGUF file."""
    path = os.fspath(path)
    if os.path.isfile(path):
        if path.lower().endswith(".gguf") or _starts_with_gguf_magic(path):
            from gemma_keras.checkpoints.gguf import read_gguf

            return read_gguf(path)
        raise WeightsError(
            f"{path} is a file but not a .gguf; give a GGUF file or a preset directory."
        )
    if not os.path.isdir(path):
        raise WeightsError(f"{path} does not exist.")
    config_path = os.path.join(path, "config.json")
    if os.path.isfile(config_path):
        with open(config_path) as file:
            try:
                saved = json.load(file)
            except json.JSONDecodeError as error:
                raise WeightsError(f"{config_path} is not valid JSON ({error}).") from None
        if "registered_name" in saved:
            return keras_hub.read_preset(path)
        if "model_type" in saved:
            return huggingface.read_checkpoint(path)
        raise WeightsError(
            f"{config_path} is neither a KerasHub config (registered_name) nor a "
            "transformers config (model_type)."
        )
    gguf_files = sorted(name for name in os.listdir(path) if name.lower().endswith(".gguf"))
    if len(gguf_files) == 1:
        return read_checkpoint(os.path.join(path, gguf_files[0]))
    raise WeightsError(
        f"{path} holds no model: expected a KerasHub preset (config.json, model.weights.h5, "
        "assets/tokenizer/vocabulary.spm), a transformers checkpoint (config.json, "
        "*.safetensors, tokenizer.model) or one .gguf file; found "
        f"{sorted(os.listdir(path))[:10]}."
    )


def _numpy_dtype(dtype):
    return np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)


def build_model(config, dtype=None, checkpoint=None, quantize=None):
    """A `GemmaCausalLM` for `config`; with `checkpoint`, its variables are
    created straight from the checkpoint's tensors, cast to the variable dtype.

    The model is built in a stateless scope so that no random initial values
    are ever allocated; each variable is then initialised from its tensor,
    one at a time, so loading holds the model plus one tensor. With
    `quantize` ("int8" or "int4") each projection and the embedding is
    quantized as it loads, so memory stays near the quantized model's size;
    a quantized preset loads in its stored forms unless `quantize` asks for
    another. A tensor the checkpoint holds in an exact block form of the
    mode (GGUF Q8_0, Q6_K, Q5_0, Q4_0, Q4_K) is taken as it is.
    """
    if quantize is not None:
        quantization.check_mode(quantize)
    if checkpoint is None:
        model = GemmaCausalLM.from_gemma_config(config, dtype=dtype)
        if quantize is not None:
            model.quantize(quantize)
        return model
    with keras.StatelessScope(initialize_variables=False):
        model = GemmaCausalLM.from_gemma_config(config, dtype=dtype)
    model.compile()
    deferred = list(model_variables(model).values())
    try:
        weights = checkpoint.weights(model_shapes(model))
        layers = {layer.base_weight.path: layer for layer in model.backbone.lora_layers().values()}
        for name, variable in model_variables(model).items():
            layer = layers.get(name)
            mode = quantize or _stored_mode(checkpoint, name)
            if layer is not None and mode is not None:
                _load_quantized(layer, checkpoint, weights, name, mode)
                continue

            value = np.asarray(weights[name]).astype(_numpy_dtype(variable.dtype), copy=False)
            _check_finite(value, checkpoint, name)
            _initialize(variable, value)
    finally:
        # Keras keeps a list of variables awaiting initialisation; ours are done
        # (or, after an error, abandoned) and must not be initialised later.
        from keras.src.backend.common import global_state

        ours = {id(variable) for variable in deferred}
        pending = global_state.get_global_attribute("uninitialized_variables") or []
        global_state.set_global_attribute(
            "uninitialized_variables", [v for v in pending if id(v) not in ours]
        )
    return model


# Each float type's exponent bits, all set in NaN and infinity only.
_EXPONENT_BITS = {
    np.dtype(ml_dtypes.bfloat16): (np.uint16, 0x7F80),
    np.dtype(np.float16): (np.uint16, 0x7C00),
    np.dtype(np.float32): (np.uint32, 0x7F800000),
    np.dtype(np.float64): (np.uint64, 0x7FF0000000000000),
}


def _check_finite(value, checkpoint, name):
    """A damaged file's bytes read as weights give NaN or infinite values, which
    would load without a word and generate nonsense. Checked on the exponent
    bits, a few million values at a time (the 2B's weights: about 1.5 s), never
    copying the whole tensor (a view of a transposed file tensor stays a view)."""
    if value.dtype not in _EXPONENT_BITS:
        return
    unsigned, exponent = _EXPONENT_BITS[value.dtype]
    bits = np.atleast_1d(value).view(unsigned)
    rows = max(1, (1 << 22) // max(1, math.prod(bits.shape[1:])))
    if any(
        (np.bitwise_and(bits[start : start + rows], exponent) == exponent).any()
        for start in range(0, len(bits), rows)
    ):
        raise WeightsError(
            f"{checkpoint.source}: {name} holds NaN or infinite values; the file is damaged. "
            "Download or convert it again."
        )


def _initialize(variable, value):
    """Gives a variable made in a stateless scope its first value, a host array."""
    if keras.distribution.distribution() is not None:
        # The host array goes to `jax.device_put` with the variable's layout:
        # each device receives its own shard, never a copy of the whole tensor.
        variable._initializer = None
        variable._initialize(value)
    else:
        variable._initializer = lambda shape, dtype: value
        variable._deferred_initialize()


def _stored_mode(checkpoint, name):
    """The mode a quantized preset stores weight `name` in, else None."""
    their_name, _ = checkpoint.mapping.get(name, (None, None))
    return getattr(checkpoint.tensors.get(their_name), "mode", None)


def _load_quantized(layer, checkpoint, weights, name, mode):
    """Gives `layer` its weight `name` in `mode`: the checkpoint's own exact form
    where it has one, else its float tensor quantized here."""
    quantized = checkpoint.quantized_weight(name, mode)
    if quantized is None:
        columns = layer.weight_shape[1]
        group_size = quantization.group_size_for(
            mode,
            columns,
            where=f"{name} ({columns} wide)",
            group_size=_file_groups(checkpoint, name, mode, columns),
        )
        value = np.asarray(weights[name])
        _check_finite(value, checkpoint, name)
        quantized = quantization.quantize(value, mode, group_size)
    layer.build_quantized(quantized.mode, quantized.group_size)
    layer.assign_quantized(quantized)


def _file_groups(checkpoint, name, mode, columns):
    """int8's groups for a tensor the file holds in blocks of fewer bits with
    no exact int8 form (a GGUF's Q4_K): the file's own groups, not one per
    row, so that rounding to int8 adds little to the file's error. None
    (the mode's default) otherwise; int4 keeps its default size."""
    their_name, _ = checkpoint.mapping.get(name, (None, None))
    values = getattr(checkpoint.tensors.get(their_name), "values_per_scale", None)
    return values if mode == "int8" and values and columns % values == 0 else None


def load_model(path, dtype=None, load_weights=True, quantize=None):
    """`GemmaCausalLM` with its `tokenizer` from a local checkpoint path."""
    checkpoint = read_checkpoint(path)
    model = build_model(checkpoint.config, dtype, checkpoint if load_weights else None, quantize)
    if checkpoint.tokenizer_proto is not None:
        model.tokenizer = GemmaTokenizer(checkpoint.tokenizer_proto)
        model.preprocessor = GemmaCausalLMPreprocessor(model.tokenizer)
    return model


def _starts_with_gguf_magic(path):
    with open(path, "rb") as file:
        return file.read(4) == b"GGUF"


def from_preset(preset, dtype=None, load_weights=True, quantize=None):
    """See `GemmaCausalLM.from_preset`: resolve (offline first), read, build."""
    # The arguments are checked before any download.
    if not isinstance(preset, (str, os.PathLike)) or not os.fspath(preset):
        raise ValueError(
            f"preset must be a preset name, a path or a URL (a non-empty string); got {preset!r}."
        )
    if not isinstance(load_weights, bool):
        raise ValueError(f"load_weights must be True or False, got {load_weights!r}.")
    if isinstance(dtype, str) and dtype.startswith(("int", "uint", "float8")):
        raise ValueError(
            f"dtype={dtype!r} is not a float type; give dtype='bfloat16' (or 'float32', "
            f"'float16') and quantize='{dtype if dtype in quantization.MODES else 'int8'}'."
        )
    if quantize is not None:
        quantization.check_mode(quantize)
    entry = _registry_entry(preset)
    path = resolve_preset(preset)
    if entry is not None and str(path).endswith(".gguf") and quantize is None:
        path = _convert_once(entry["name"], path)
    model = load_model(path, dtype=dtype, load_weights=load_weights, quantize=quantize)
    if entry is not None:
        model.instruction_tuned = entry["instruction_tuned"]
    else:
        model.instruction_tuned = _looks_instruction_tuned(str(preset))
    return model


def converted_dir():
    """Where GGUF presets converted to float32 KerasHub presets are kept."""
    return os.path.join(resolve.cache_dir(), "converted")


def _registry_entry(preset):
    preset = os.fspath(preset)
    if os.path.exists(preset) or "://" in preset:
        return None
    try:
        return registry.get_preset(preset)
    except registry.PresetNotFoundError:
        return None  # resolve_preset explains what was tried


def _looks_instruction_tuned(preset):
    name = os.path.basename(preset.rstrip("/")).lower()
    return "instruct" in name or name.endswith("-it") or "-it-" in name or "_it" in name


def _convert_once(name, gguf_path):
    """A GGUF preset is converted into a float32 KerasHub preset directory in the
    cache the first time, and read from there later: parsing the GGUF's
    262k-entry vocabulary and dequantizing takes ~20 s, reading the converted
    preset a few seconds. It lives apart from the presets put in the cache by
    hand, so a quantized load still reads the GGUF's own blocks."""
    target = os.path.join(converted_dir(), name)
    if keras_hub.is_preset_directory(target):
        return target
    checkpoint = read_checkpoint(gguf_path)
    model = build_model(checkpoint.config, "float32", checkpoint)
    model.tokenizer = GemmaTokenizer(checkpoint.tokenizer_proto)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    partial = tempfile.mkdtemp(prefix=f".{name}.", dir=os.path.dirname(target))
    try:
        model.save_to_preset(partial, dtype="float32")
        os.replace(partial, target)  # atomic: a later run sees all of it or nothing
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return target
