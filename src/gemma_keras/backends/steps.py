"""What the three backends' compiled steps share: the caches flattened to a
list of tensors, the model's variables read as inputs of the graph, whether
a generation step is being traced, the cache's write, the softmax, and
einsums without their axes of size 1."""

import contextlib
import threading

import keras

_tracing = threading.local()


@contextlib.contextmanager
def tracing_generation_step():
    """Marks the products traced inside as a generation step's (see `generating`)."""
    outer = generating()
    _tracing.generation_step = True
    try:
        yield
    finally:
        _tracing.generation_step = outer


def generating():
    """Whether a generation step (prefill or decode) is being traced: its
    quantized products may round `x` to bfloat16 for speed
    (`dispatch.choose_quantized_product`), where `score` and `fit` keep the
    model's dtype."""
    return getattr(_tracing, "generation_step", False)


def keeping_variables(model):
    """See `backends.keeping_variables`: PyTorch's and TensorFlow's trainers
    leave the variables in place."""
    return contextlib.nullcontext()


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


def softmax(logits):
    """`keras.ops.softmax` over the last axis (see `backends.softmax`)."""
    return keras.ops.softmax(logits, axis=-1)


def swap_halves(x):
    """`x` with the halves of its last axis swapped, by a roll (see
    `backends.swap_halves`)."""
    return keras.ops.roll(x, x.shape[-1] // 2, axis=-1)


def einsum_without_unit_axes(equation, a, b, einsum, matmul):
    """`einsum(equation, a, b)` with the axes of size 1 left out of the
    equation (decoding: one token, often one key-value head), and as one
    `matmul(a, b, transpose_a, transpose_b)` where what is left is a product
    of two matrices over one shared axis. For steps run operation by
    operation (TensorFlow's without XLA, torch's traced graphs), whose
    einsums transpose around a batched product."""
    inputs, output = equation.split("->")
    specs = inputs.split(",")
    # While `torch.jit.trace` records, sizes are tensors; each graph has one shape.
    shape = [None if size is None else int(size) for size in [*a.shape, *b.shape]]
    sizes = dict(zip(specs[0] + specs[1], shape, strict=True))
    if "." in equation or None in sizes.values():
        return einsum(equation, a, b)

    def kept(spec):
        return "".join(letter for letter in spec if sizes[letter] != 1)

    a_spec, b_spec, out_spec = kept(specs[0]), kept(specs[1]), kept(output)
    a = keras.ops.reshape(a, [sizes[letter] for letter in a_spec])
    b = keras.ops.reshape(b, [sizes[letter] for letter in b_spec])
    product = _as_matmul(a_spec, b_spec, out_spec, a, b, matmul)
    if product is None:
        product = einsum(f"{a_spec},{b_spec}->{out_spec}", a, b)
    return keras.ops.reshape(product, [sizes[letter] for letter in output])


def _as_matmul(a_spec, b_spec, out_spec, a, b, matmul):
    """`a_spec,b_spec->out_spec` as one `matmul` where it is a product of two
    matrices over one shared axis (either way round), else None."""
    shared = set(a_spec) & set(b_spec)
    if len(a_spec) != 2 or len(b_spec) != 2 or len(shared) != 1 or shared & set(out_spec):
        return None
    (summed,) = shared
    if out_spec[::-1] == a_spec.replace(summed, "") + b_spec.replace(summed, ""):
        a, b, a_spec, b_spec = b, a, b_spec, a_spec  # (a b)^T = b^T a^T
    if out_spec != a_spec.replace(summed, "") + b_spec.replace(summed, ""):
        return None
    return matmul(a, b, a_spec[0] == summed, b_spec[1] == summed)
