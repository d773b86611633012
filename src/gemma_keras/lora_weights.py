"""LoRA for a whole `GemmaBackbone`: enabling, saving, loading, merging adapters.

The parameterisation is Keras' `Dense.enable_lora` (and Hugging Face peft's)
on each projection as one matrix: `W [out, in] + (alpha / rank) * (A @ B).T`
with `A [in, rank]`, `B [rank, out]`. KerasHub puts Keras' `EinsumDense` LoRA
on its per-head `(heads, hidden, head_dim)` kernels instead, so its query/key/
value adapters are per head (an `A` per head, one `B` shared by the heads).
Ours is a rank-`rank` update of the whole projection, the form peft adapters
and the published LoRA recipes use, and the decode step keeps one fast
product per projection plus two thin ones. A KerasHub adapter has no exact
equivalent in that form, so `load_lora_weights` merges it into the base
weights instead, exactly (its update computed in float32 and added).

Adapter files (`.lora.h5`) hold the adapters only, keyed by stable layer paths
(`decoder_block_3/attention/query/lora_kernel_a`), never by layer index:
KerasHub's index keys load adapters onto the wrong layers (KerasHub #2701).
"""

import json
import os
import tempfile

import h5py
import numpy as np
from keras import ops

from gemma_keras.checkpoints.weight_mapping import TRANSPOSED, heads_first, split_heads
from gemma_keras.layers.lora import check_lora_alpha, check_lora_rank

FILE_FORMAT = "gemma_keras.lora"
FILE_SUFFIX = ".lora.h5"

# Each projection's name here, and the names KerasHub and Hugging Face give it.
ALIASES = {
    "query": "query",
    "key": "key",
    "value": "value",
    "output": "output",
    "gate": "gate",
    "up": "up",
    "down": "down",
    "token_embedding": "token_embedding",
    "query_dense": "query",
    "key_dense": "key",
    "value_dense": "value",
    "attention_output": "output",
    "output_dense": "output",
    "ffw_gating": "gate",
    "ffw_gating_2": "up",
    "ffw_linear": "down",
    "q_proj": "query",
    "k_proj": "key",
    "v_proj": "value",
    "o_proj": "output",
    "gate_proj": "gate",
    "up_proj": "up",
    "down_proj": "down",
    "embed_tokens": "token_embedding",
}


class LoraError(ValueError):
    """LoRA was asked for in a way that cannot work; the message names the fix."""


def lora_enabled_layers(backbone):
    return {path: layer for path, layer in backbone.lora_layers().items() if layer.lora_enabled}


def _target_paths(backbone, target_layer_names):
    if isinstance(target_layer_names, str):
        target_layer_names = [target_layer_names]
    paths = []
    for name in target_layer_names:
        kind = ALIASES.get(name)
        matches = [
            path for path in backbone.lora_layers() if kind and path.rsplit("/", 1)[-1] == kind
        ]
        if not matches:
            raise LoraError(
                f"LoRA target {name!r} matches no layer; the projections are "
                "query, key, value, output, gate, up, down and token_embedding."
            )
        paths += [path for path in matches if path not in paths]
    return paths


def enable_lora(backbone, rank, target_layer_names=None, lora_alpha=None):
    """See `GemmaBackbone.enable_lora`."""
    check_lora_rank(rank)
    check_lora_alpha(lora_alpha)
    if target_layer_names is not None and not len(target_layer_names):
        raise LoraError(
            "No LoRA targets given; name some of query, key, value, output, gate, up, down "
            "and token_embedding, or leave target_layer_names None for the defaults."
        )
    enabled = lora_enabled_layers(backbone)
    if enabled:
        rank_now = next(iter(enabled.values())).lora_rank
        raise LoraError(
            f"LoRA is already enabled (rank {rank_now}, {len(enabled)} layers); call "
            "`merge_lora_weights()` to fold it in before enabling a new adapter."
        )
    if target_layer_names is None:
        target_layer_names = backbone.default_lora_layer_names()
    paths = _target_paths(backbone, target_layer_names)
    layers = backbone.lora_layers()
    backbone.trainable = True
    for layer in backbone._flatten_layers(include_self=False):
        layer.trainable = False
    for path in paths:
        layers[path].trainable = True
        layers[path].enable_lora(rank, lora_alpha=lora_alpha)


def merge_lora_weights(backbone):
    """See `GemmaBackbone.merge_lora_weights`."""
    for layer in lora_enabled_layers(backbone).values():
        layer.merge_lora()
    for layer in backbone._flatten_layers(include_self=True):
        layer.trainable = True


def _shape_signature(backbone):
    config = backbone.config
    return {
        "vocabulary_size": config.vocabulary_size,
        "num_layers": config.num_layers,
        "hidden_dim": config.hidden_dim,
        "intermediate_dim": config.intermediate_dim,
        "num_query_heads": config.num_query_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
    }


def save_lora_weights(backbone, filepath):
    """See `GemmaBackbone.save_lora_weights`. Written to a temporary file and
    renamed, so an interrupted save never leaves half an adapter behind."""
    filepath = os.fspath(filepath)
    enabled = lora_enabled_layers(backbone)
    if not enabled:
        raise LoraError(
            "There is no LoRA adapter to save: call `backbone.enable_lora(rank)` first."
        )
    if not filepath.endswith(FILE_SUFFIX):
        raise LoraError(f"The adapter file name must end in {FILE_SUFFIX!r}, got {filepath!r}.")
    first = next(iter(enabled.values()))
    directory = os.path.dirname(os.path.abspath(filepath))
    if not os.path.isdir(directory):
        raise LoraError(f"Cannot save {filepath}: the folder {directory} does not exist.")
    handle, partial = tempfile.mkstemp(suffix=".partial", dir=directory)
    os.close(handle)
    try:
        with h5py.File(partial, "w") as file:
            file.attrs["format"] = FILE_FORMAT
            file.attrs["rank"] = first.lora_rank
            file.attrs["lora_alpha"] = first.lora_alpha
            file.attrs["model"] = json.dumps(_shape_signature(backbone))
            for path, layer in enabled.items():
                for name, weight in zip(layer.lora_weight_names, layer.lora_weights, strict=True):
                    file[f"{path}/{name}"] = ops.convert_to_numpy(weight).astype("float32")
        os.replace(partial, filepath)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def load_lora_weights(backbone, filepath):
    """See `GemmaBackbone.load_lora_weights`."""
    filepath = os.fspath(filepath)
    if not os.path.isfile(filepath):
        what = "is a folder, not a file" if os.path.isdir(filepath) else "does not exist"
        raise LoraError(f"Adapter file {filepath} {what}.")
    try:
        file = h5py.File(filepath, "r")
    except OSError as error:
        raise LoraError(f"{filepath} is not a readable HDF5 adapter file ({error}).") from None
    with file:
        if file.attrs.get("format") == FILE_FORMAT:
            _load_ours(backbone, file, filepath)
        elif "lora" in file and "vars" in file["lora"]:
            _merge_keras_hub(backbone, file, filepath)
        else:
            raise LoraError(
                f"{filepath} is neither a gemma_keras adapter nor a KerasHub `.lora.h5` file."
            )


def _load_ours(backbone, file, filepath):
    arrays = {}

    def collect(name, item):
        if isinstance(item, h5py.Dataset):
            arrays[name] = item

    file.visititems(collect)
    missing = [key for key in ("rank", "lora_alpha") if key not in file.attrs]
    if missing or not arrays:
        raise LoraError(
            f"{filepath} is an incomplete adapter file: "
            + (f"it lacks the {missing[0]!r} attribute." if missing else "it holds no tensors.")
            + " Save it again with `save_lora_weights`."
        )
    rank, alpha = int(file.attrs["rank"]), float(file.attrs["lora_alpha"])
    layers = backbone.lora_layers()
    saved = sorted({name.rsplit("/", 1)[0] for name in arrays})
    unknown = [path for path in saved if path not in layers]
    if unknown:
        raise LoraError(
            f"{filepath} has adapters for {unknown[0]!r}, which this model lacks "
            f"(it has {backbone.config.num_layers} layers): the adapter was saved from "
            "another architecture."
        )
    for path in saved:
        layer = layers[path]
        expected = layer.lora_shapes(rank) if not layer.lora_enabled else None
        expected = expected or tuple(tuple(w.shape) for w in layer.lora_weights)
        for name, shape in zip(layer.lora_weight_names, expected, strict=True):
            if f"{path}/{name}" not in arrays:
                raise LoraError(f"{filepath} lacks {path}/{name}; save the adapter again.")
            found = tuple(arrays[f"{path}/{name}"].shape)
            if found != tuple(shape):
                raise LoraError(
                    f"{filepath}: {path}/{name} has shape {found} but this model needs "
                    f"{tuple(shape)}: the adapter was saved from a model of another size."
                )
    saved_model = json.loads(file.attrs.get("model", "{}"))
    ours = _shape_signature(backbone)
    for key, value in saved_model.items():
        if key in ours and ours[key] != value:
            raise LoraError(
                f"{filepath} was saved from a model with {key}={value}; this model has "
                f"{key}={ours[key]}: load it into the model it was trained on."
            )
    enabled = lora_enabled_layers(backbone)
    targets = sorted({path.rsplit("/", 1)[-1] for path in saved})
    if not enabled and sorted(_target_paths(backbone, targets)) == saved:
        enable_lora(backbone, rank, targets, lora_alpha=alpha)
        enabled = lora_enabled_layers(backbone)
    if sorted(enabled) != saved or any(
        layer.lora_rank != rank or layer.lora_alpha != alpha for layer in enabled.values()
    ):
        raise LoraError(
            f"{filepath} holds rank {rank} adapters for {len(saved)} layers, but this model has "
            + (
                "LoRA enabled differently; load it into a model without LoRA enabled."
                if enabled
                else f"{len(_target_paths(backbone, targets))} layers of those kinds: the "
                "adapter covers only some of them, which `enable_lora` cannot reproduce."
            )
        )
    for path in saved:
        layer = layers[path]
        for name, weight in zip(layer.lora_weight_names, layer.lora_weights, strict=True):
            weight.assign(np.asarray(arrays[f"{path}/{name}"]))


# KerasHub's decoder block, its layers with weights in the order its adapter
# files index them (Keras' `_flatten_layers`, children last-created first).
def _keras_hub_block_layers(config):
    names = ["decoder_block", "ffw_linear", "ffw_gating_2", "ffw_gating"]
    names += ["post_ffw_norm"] if config.use_post_ffw_norm else []
    names += ["pre_ffw_norm", "attention", "attention_output"]
    names += ["key_norm", "query_norm"] if config.use_qk_norm else []
    names += ["value", "key", "query"]
    names += ["post_attention_norm"] if config.use_post_attention_norm else []
    return names + ["pre_attention_norm"]


def _keras_hub_layouts(config):
    """KerasHub's kernel layout of each projection, as `weight_mapping` Layouts."""
    return {
        "query": heads_first(config.num_query_heads),
        "key": heads_first(config.num_key_value_heads),
        "value": heads_first(config.num_key_value_heads),
        "attention_output": split_heads(config.num_query_heads),
        "ffw_gating": TRANSPOSED,
        "ffw_gating_2": TRANSPOSED,
        "ffw_linear": TRANSPOSED,
    }


def _merge_keras_hub(backbone, file, filepath):
    """Adds KerasHub's per-head updates `A @ B` (alpha = rank, so unscaled) to our kernels."""
    config = backbone.config
    block_layers = _keras_hub_block_layers(config)
    layouts = _keras_hub_layouts(config)
    layers = backbone.lora_layers()
    updates = {}
    for key in file["lora"]:
        if key == "vars":
            continue
        index = int(key) - 1  # layer 0 is the token embedding
        block, offset = divmod(index, len(block_layers))
        name = block_layers[offset] if 0 <= index and block < config.num_layers else None
        if name not in layouts:
            raise LoraError(
                f"{filepath}: KerasHub layer index {key} is not a projection of this model "
                f"({config.num_layers} layers); the adapter was saved from another architecture."
            )
        ours = ALIASES[name]
        layer = layers[f"decoder_block_{block}/{'ffw' if 'ffw' in name else 'attention'}/{ours}"]
        weights = file["lora"][key]["vars"]
        a, b = np.asarray(weights["lora_kernel_a"]), np.asarray(weights["lora_kernel_b"])
        their_update = np.matmul(a.astype("float64"), b.astype("float64"))
        expected = layouts[name].their_shape(tuple(layer.kernel.shape))
        if their_update.shape != tuple(expected):
            raise LoraError(
                f"{filepath}: the adapter of KerasHub layer {key} ({name} of block {block}) "
                f"updates a kernel of shape {their_update.shape} but this model's is "
                f"{tuple(expected)}: it was saved from a model of another size."
            )
        updates[layer] = layouts[name].ours(their_update)
    for layer, update in updates.items():
        merged = ops.convert_to_numpy(ops.cast(layer.kernel.value, "float32")) + update
        layer.kernel.assign(ops.cast(merged.astype("float32"), layer.kernel.dtype))
