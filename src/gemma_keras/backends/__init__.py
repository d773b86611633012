"""The one place that knows which Keras backend is running; everything else
in gemma_keras uses `keras.ops` and the functions here.

Each backend has a module of its own (`jax_backend`, `tensorflow_backend`,
`torch_backend`) with its products and its compiled step, chosen once from
`keras.config.backend()`. Which product computes a call is decided by one
pure function, `dispatch.choose_product`, from the backend, the platform
the tensors live on and the CPU's features: no CPU-only code runs for
tensors on a GPU or TPU.

>>> from keras import ops
>>> from gemma_keras import backends
>>> tuple(backends.linear(ops.ones((1, 1, 32)), ops.ones((4, 32))).shape)
(1, 1, 4)
"""

import importlib

import keras

from gemma_keras.backends import dispatch


def name():
    """The running Keras backend: "jax", "tensorflow" or "torch"."""
    return keras.config.backend()


if name() not in dispatch.BACKENDS:
    raise ImportError(
        f"gemma_keras runs on {', '.join(dispatch.BACKENDS)}, not Keras' {name()!r} backend; "
        "set KERAS_BACKEND to one of them before importing Keras."
    )

# The running backend's module: its products, its compiled step, its CPU features.
implementation = importlib.import_module(f"gemma_keras.backends.{name()}_backend")


def linear(x, kernel):
    """`x @ kernel.T`: the one dense projection of every Gemma layer.

    Kernels are stored `[out, in]`, as torch, Hugging Face and GGUF store
    them. A float32 kernel with bfloat16 `x` (a mixed_bfloat16 model) is
    multiplied as its bfloat16 cast, without a bfloat16 copy per call where
    the native kernel takes the product (see `add_kernel`).
    """
    return implementation.linear(x, kernel)


def quantized_linear(x, mode, kernel, scale, offset=None):
    """`x @ w.T` for a weight `w` held in a `gemma_keras.quantization` form
    ("int8": `kernel`, `scale`; "int4": also `offset`). On a CPU a decode
    step's products read the integers as they are (the native kernel) and a
    generation's prefill multiplies the weight dequantized to bfloat16 where
    the CPU has AVX512-BF16; elsewhere the weight is dequantized to `x`'s
    dtype and multiplied by `linear` (see `dispatch.choose_quantized_product`)."""
    return quantized_linears(x, mode, [(kernel, scale, offset)])[0]


def quantized_linears(x, mode, weights):
    """`[quantized_linear(x, mode, *w) for w in weights]`, each `w` a
    `(kernel, scale, offset)` of the same form and input width. The native
    kernel reads them as one product over all their rows (a layer's q, k and
    v), which saves each further call's threads joining late and ending unevenly."""
    return implementation.quantized_linears(x, mode, weights)


def add_kernel(layer, name, shape):
    """A weight of `layer` that `linear` multiplies by: `[out, in]`, and not
    autocast, since `linear` multiplies a mixed_bfloat16 model's float32
    kernels in bfloat16 itself, without a bfloat16 copy per call."""
    return layer.add_weight(name=name, shape=shape, initializer="glorot_uniform", autocast=False)


def take_rows(table, ids):
    """`table[ids]` along the first axis: the embedding lookup."""
    return implementation.take_rows(table, ids)


def write_slots(cache, first_slot, new):
    """`cache` `[batch, slots, ...]` with `new` `[batch, length, ...]` written
    at slots `first_slot ... first_slot + length - 1`: `keras.ops.slice_update`,
    in the form each backend's step runs fastest."""
    return implementation.write_slots(cache, first_slot, new)


def einsum(equation, a, b):
    """`keras.ops.einsum`, computed in float32 and rounded to bfloat16 once
    where a bfloat16 einsum would be slow or inexact (see `dispatch.choose_einsum`)."""
    return implementation.einsum(equation, a, b)


def softmax(logits):
    """`keras.ops.softmax` over the last axis (attention's probabilities), in
    the form each backend's step runs fastest."""
    return implementation.softmax(logits)


def swap_halves(x):
    """`x` with the two halves of its last axis swapped (RoPE's rotate-half):
    `keras.ops.roll(x, width // 2, axis=-1)`, in the form each backend's step
    runs fastest."""
    return implementation.swap_halves(x)


def cross_entropy_rows(labels, logits):
    """The cross-entropy of logits [rows, classes] against integer labels [rows],
    one value per row: `keras.losses.sparse_categorical_crossentropy(labels,
    logits, from_logits=True)`; on PyTorch and JAX as `logsumexp - logit`
    with its gradient taken from the logits alone (fewer tensors of the
    logits' size, and faster), on TensorFlow as Keras' own fused operation."""
    if None not in (labels.shape[0], logits.shape[0]) and labels.shape[0] != logits.shape[0]:
        raise ValueError(
            f"The labels hold {labels.shape[0]} tokens and the logits {logits.shape[0]}: "
            "give one label per position of the logits (labels [batch, length] for "
            "logits [batch, length, vocabulary])."
        )
    return implementation.cross_entropy_rows(labels, logits)


def keeping_variables(model):
    """A context for `model.fit`, `evaluate` and `predict`: where the call fails,
    the model keeps its weights. Keras' JAX trainer takes the variables' values
    out of them for the length of a call and gives them back only after a step
    has run, so an error in the first step would leave every variable empty."""
    return implementation.keeping_variables(model)


def is_concrete(x):
    """True when `x` holds values now (eager), False while a graph is being traced."""
    return implementation.is_concrete(x)


def compile_step(model, step):
    """Compiles `step(caches, token_ids, key_mask, positions, cache_index)`:
    `jax.jit`, `tf.function` (with XLA, or without it for a bfloat16 decode
    step on the native kernel on a CPU) or a `torch.jit.trace` graph, the
    variables' values passed as inputs. Each backend compiles once per input
    shape; the caller buckets shapes."""
    return implementation.compile_step(model, step)


def platform(x):
    """ "cpu", "gpu" or "tpu": where the tensor `x` lives."""
    return implementation.platform_of(x)


def compile_function(function):
    """Compiles `function` of tensors (no variables), such as the reduction of
    a step's logits for the sampler: `jax.jit`, `tf.function` with XLA, and
    on torch the function as it is (a few kernels, launched eagerly). Its
    tensors stay on the device they are on."""
    return implementation.compile_function(function)


def native_max_rows(float32=False):
    """The most rows (tokens in a step) whose products take the native kernel
    on this CPU: bfloat16 ones, or with `float32` torch's float32 ones."""
    return dispatch.native_max_rows(implementation.cpu_features, float32)
