"""Moving named weights between gemma_keras and another layout.

A format module (KerasHub, Hugging Face, GGUF) describes, for a config, which
of its tensors becomes which gemma_keras variable and how the array is laid
out differently (`Layout`). `to_model_weights` and `from_model_weights` apply
that description in either direction; `assign_weights` puts the result into
a model, checking every name and shape.
"""

import dataclasses
import functools
import re

import numpy as np

from gemma_keras.checkpoints.checkpoint import LazyWeights


class WeightsError(ValueError):
    """Weights are missing, extra, or shaped differently from the config."""


@dataclasses.dataclass(frozen=True)
class Layout:
    """How a tensor stored elsewhere relates to the gemma_keras variable.

    `ours` and `theirs` are functions from one array to the other, and
    `their_shape` gives the shape the other format stores for one of our
    shapes (to name both shapes when a checkpoint disagrees with its config).
    """

    ours: object
    theirs: object
    their_shape: object


SAME = Layout(lambda a: a, lambda a: a, lambda shape: tuple(shape))
TRANSPOSED = Layout(np.transpose, np.transpose, lambda shape: tuple(reversed(shape)))


def heads_first(num_heads):
    """Ours `[heads * head_dim, hidden]` <-> theirs `[heads, hidden, head_dim]` (KerasHub q/k/v)."""

    def ours(array):
        return np.transpose(array, (0, 2, 1)).reshape(-1, array.shape[1])

    def theirs(array):
        width, hidden = array.shape
        return np.transpose(array.reshape(num_heads, width // num_heads, hidden), (0, 2, 1))

    def their_shape(shape):
        return (num_heads, shape[1], shape[0] // num_heads)

    return Layout(ours, theirs, their_shape)


def split_heads(num_heads):
    """Ours `[hidden, heads * head_dim]` <-> theirs `[heads, head_dim, hidden]` (KerasHub)."""

    def ours(array):
        return np.transpose(array.reshape(-1, array.shape[-1]))

    def theirs(array):
        return np.transpose(array).reshape(num_heads, -1, array.shape[0])

    def their_shape(shape):
        return (num_heads, shape[1] // num_heads, shape[0])

    return Layout(ours, theirs, their_shape)


def to_model_weights(their_tensors, mapping, expected_shapes, source):
    """Converts `{their_name: tensor}` into a lazy `{our_name: array}`.

    `their_tensors` values need a `.shape` and are read with `np.asarray`
    only when the result is looked up (an h5py dataset, a safetensors slice, a
    GGUF tensor), so names and shapes are all checked before any tensor is
    read. `mapping` is `{our_name: (their_name, Layout)}`; `expected_shapes` is
    `{our_name: shape}` from the model being loaded. Raises `WeightsError`
    naming the tensor, the file (`source`) and both shapes on any mismatch.
    """
    missing = sorted(theirs for theirs, _ in mapping.values() if theirs not in their_tensors)
    if missing:
        raise WeightsError(
            f"{source} lacks {len(missing)} tensor(s) the config needs: {_some(missing)}. "
            "The checkpoint does not match its config (wrong number of layers or "
            "a different Gemma generation?)."
        )
    unused = _unused_layer_tensors(their_tensors, {theirs for theirs, _ in mapping.values()})
    if unused:
        raise WeightsError(
            f"{source} holds {len(unused)} layer tensor(s) its config does not use: "
            f"{_some(unused)}. The config does not match the weights (fewer layers than "
            "stored, or another Gemma generation?): use the config that came with them."
        )
    loaders = {}
    for ours, (theirs, layout) in mapping.items():
        tensor = their_tensors[theirs]
        wanted = layout.their_shape(expected_shapes[ours])
        if tuple(tensor.shape) != tuple(wanted):
            raise WeightsError(
                f"{source}: tensor {theirs!r} has shape {tuple(tensor.shape)} but the config "
                f"needs {tuple(wanted)} for it; the config's sizes disagree with the weights."
            )
        loaders[ours] = functools.partial(_convert, tensor, layout)
    return LazyWeights(loaders)


def _some(names):
    return ", ".join(names[:5]) + (" ..." if len(names) > 5 else "")


# Buffers some checkpoints keep inside a layer that hold no weight (old transformers' RoPE).
_NOT_WEIGHTS = ("rotary_emb.inv_freq",)


def _unused_layer_tensors(their_tensors, used):
    """Names of `their_tensors` outside `used` that belong to the model's layers:
    a layer the config lacks (the name of a used one with another index) or a
    tensor inside a used layer (`model.layers.3.` holds a q_norm the config
    has none of). Tensors of other parts (a vision tower, a tied `lm_head`)
    are left alone."""
    templates = {_template(name) for name in used}
    layers = {match.group(0) for name in used if (match := re.match(r"\D*\d+\W", name))}
    return sorted(
        name
        for name in their_tensors
        if name not in used
        and not name.endswith(_NOT_WEIGHTS)
        and (_template(name) in templates or any(name.startswith(layer) for layer in layers))
    )


def _template(name):
    """`name` with its numbers as `#`; Keras' `block`, `block_1`, ... alike."""
    return re.sub(r"\d+", "#", re.sub(r"_\d+(?=/)", "", name))


def _convert(tensor, layout):
    # Contiguous, so that every backend gets the same dense layout (torch would
    # otherwise keep a transposed view, and pick other kernels for it).
    return np.ascontiguousarray(layout.ours(np.asarray(tensor)))


def from_model_weights(our_arrays, mapping):
    """The inverse of `to_model_weights`: `{their_name: array}`."""
    return {theirs: layout.theirs(our_arrays[ours]) for ours, (theirs, layout) in mapping.items()}


def model_variables(model):
    """`{name: variable}` of a `GemmaBackbone` or `GemmaCausalLM`, names like
    `decoder_block_0/attention/query/kernel` (the same in both); LoRA
    adapters are not among them (see `get_weights`). A quantized layer's
    variables are its integer kernel and its scales (and offsets)."""
    backbone = getattr(model, "backbone", model)
    adapters = {
        id(weight)
        for layer in backbone.lora_layers().values()
        if layer.lora_enabled
        for weight in layer.lora_weights
    }
    return {v.path: v for v in backbone.weights if id(v) not in adapters}


def quantized_layers(model):
    """`{kernel name: layer}` of the model's quantized layers, e.g.
    `decoder_block_0/attention/query/kernel`."""
    backbone = getattr(model, "backbone", model)
    return {
        layer.base_weight.path: layer
        for layer in backbone.lora_layers().values()
        if layer.quantization_mode is not None
    }


def model_shapes(model):
    """`{name: shape}` of every float weight a checkpoint holds for the model: a
    quantized layer's kernel by its float shape, its scales left out."""
    shapes = {name: tuple(variable.shape) for name, variable in model_variables(model).items()}
    for name, layer in quantized_layers(model).items():
        for suffix in ("_scale", "_offset"):
            shapes.pop(name + suffix, None)
        shapes[name] = tuple(layer.weight_shape)
    return shapes


def get_weights(model, skip=()):
    """`{name: numpy array}` of every weight of the model as floats (what a
    checkpoint of the model holds): LoRA adapters folded into the weights
    they adapt, quantized weights dequantized to float32. Names in `skip`
    are left out."""
    from keras import ops

    backbone = getattr(model, "backbone", model)
    special = {
        layer.base_weight.path: layer
        for layer in backbone.lora_layers().values()
        if layer.lora_enabled or layer.quantization_mode is not None
    }
    variables = model_variables(model)
    weights = {}
    for name in model_shapes(model):
        if name in skip:
            continue
        layer = special.get(name)
        if layer is None:
            weights[name] = np.asarray(variables[name].numpy())
        else:
            weights[name] = np.asarray(ops.convert_to_numpy(layer.merged_weight()))
    return weights


def assign_weights(model, arrays, source="weights"):
    """Sets every model variable from `arrays` `{name: array}`, cast to the variable's dtype."""
    variables = model_variables(model)
    missing = sorted(set(variables) - set(arrays))
    unexpected = sorted(set(arrays) - set(variables))
    if missing or unexpected:
        raise WeightsError(
            f"{source} does not match the model: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}."
        )
    for name, variable in variables.items():
        array = arrays[name]
        if tuple(array.shape) != tuple(variable.shape):
            raise WeightsError(
                f"{source}: {name} has shape {tuple(array.shape)} but the model expects "
                f"{tuple(variable.shape)}."
            )
        variable.assign(np.asarray(array).astype(variable.dtype, copy=False))
