"""What the three backends' compiled steps share: the caches flattened to a
list of tensors, the model's variables read as inputs of the graph, and the
cache's write."""

import keras


def with_values(variables, values, step, *inputs):
    """Runs `step(*inputs)` with `variables` reading `values`: the weights become
    inputs of the compiled graph rather than constants baked into it."""
    with keras.StatelessScope(state_mapping=list(zip(variables, values, strict=True))):
        return step(*inputs)


def flatten(caches, inputs):
    """`(flat caches, input tensors, shape key)` for a compiled step's call.

    `caches` is a list of (key_cache, value_cache) pairs; flattening it by
    hand costs microseconds where `keras.tree` took ~2 ms per step."""
    flat_caches = [tensor for pair in caches for tensor in pair]
    inputs = [keras.ops.convert_to_tensor(x) for x in inputs]
    key = tuple((tuple(x.shape), x.dtype) for x in [*flat_caches, *inputs])
    return flat_caches, inputs, key


def pairs(flat):
    """The (key_cache, value_cache) pairs of a flat list of caches."""
    return list(zip(flat[0::2], flat[1::2], strict=True))


def write_slots(cache, first_slot, new):
    """`cache` with `new` written from slot `first_slot` (see `backends.write_slots`)."""
    return keras.ops.slice_update(cache, [0, first_slot] + [0] * (len(cache.shape) - 2), new)
