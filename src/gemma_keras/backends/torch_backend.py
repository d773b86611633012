"""torch's products and compiled step (see `gemma_keras.backends`).

On a CPU, products of up to `native_max_rows()` rows take the native kernel
as the operator `gemma_keras::bf16_linear` (bfloat16, and float32 up to
`native_max_rows(float32=True)`), other float32 products oneDNN's inner
product, and on a CPU without AVX512 bfloat16 prefills a float32 copy. On
a GPU every product is `F.linear`. Measurements: "Products per backend
(measured)" in docs/performance.md.
"""

import contextlib
import functools
import math
import warnings

import keras
import torch

from gemma_keras import native, quantization
from gemma_keras.backends import dispatch, steps
from gemma_keras.backends.steps import flatten, pairs, with_values

NATIVE_OPERATOR = "gemma_keras::bf16_linear"


def platform_of(*tensors):
    """ "cpu" where all `tensors` are on the CPU, else the platform of the
    first that is not ("gpu" for CUDA and ROCm, "tpu" for XLA devices)."""
    for tensor in tensors:
        device = tensor.device.type
        if device != "cpu":
            return {"cuda": "gpu", "xla": "tpu"}.get(device, device)
    return "cpu"


def linear(x, kernel):
    """`x @ kernel.T` (see `gemma_keras.backends.linear`)."""
    kernel = keras.ops.convert_to_tensor(kernel)
    platform = platform_of(x, kernel)
    records_gradient = _records_gradient(x, kernel)
    product = dispatch.choose_product(
        "torch",
        platform,
        keras.backend.standardize_dtype(x.dtype),
        keras.backend.standardize_dtype(kernel.dtype),
        # While `torch.jit.trace` records, sizes are tensors; each graph has one shape.
        math.prod(int(size) for size in x.shape[:-1]),
        int(x.shape[-1]),
        cpu_features if platform == "cpu" else frozenset(),
        records_gradient=records_gradient,
    )
    if product == dispatch.NATIVE_KERNEL:
        return native_linear()(x, kernel, torch.get_num_threads())
    # Float32 weights of a mixed policy's model, cast as Keras' autocast does.
    kernel = kernel.to(x.dtype)
    if product == dispatch.ONEDNN_INNER_PRODUCT:
        return _onednn_linear()(x, kernel)
    if product == dispatch.ONEDNN_INNER_PRODUCT_IN_FLOAT32:
        return _onednn_linear()(x.float(), kernel.float()).to(x.dtype)
    if product == dispatch.LINEAR_IN_FLOAT32:
        return torch.nn.functional.linear(x.float(), kernel.float()).to(x.dtype)
    return torch.nn.functional.linear(x, kernel)


def quantized_linears(x, mode, weights):
    """`x @ w.T` for each quantized weight (see `gemma_keras.backends.quantized_linears`)."""
    platform = platform_of(x, weights[0][0])
    product = dispatch.choose_quantized_product(
        "torch",
        platform,
        math.prod(int(size) for size in x.shape[:-1]),
        cpu_features if platform == "cpu" else frozenset(),
        records_gradient=_records_gradient(x),
        generating=steps.generating(),
    )
    if product == dispatch.NATIVE_QUANTIZED_KERNEL:
        arrays = [array for w in weights for array in w if array is not None]
        operator = (
            torch.ops.gemma_keras.int8_linear
            if mode == "int8"
            else torch.ops.gemma_keras.int4_linear
        )
        if x.dtype in (torch.float32, torch.bfloat16):
            return operator(x, arrays, torch.get_num_threads())
        # The operators take float32 and bfloat16 x; a float16 model's goes as float32.
        return [y.to(x.dtype) for y in operator(x.float(), arrays, torch.get_num_threads())]
    if product == dispatch.DEQUANTIZED_BFLOAT16:
        return [
            quantization.dequantized_product(x, mode, *w, _bfloat16_product, "bfloat16")
            for w in weights
        ]
    return [quantization.dequantized_product(x, mode, *w, linear, x.dtype) for w in weights]


def _bfloat16_product(flat, weight):
    """`flat @ weight.T` of `flat` rounded to bfloat16 and a bfloat16 weight
    (oneDNN sums in float32), returned in `flat`'s dtype."""
    return torch.nn.functional.linear(flat.to(torch.bfloat16), weight).to(flat.dtype)


def _records_gradient(*tensors):
    """Whether autograd records an operation on `tensors` (a training step),
    which products without a gradient of their own leave to torch's."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _native_kernel_available():
    return native.enabled() and native_linear() is not None


def _has_avx512():
    # AVX512-BF16 or AMX is what makes torch's bfloat16 matrix products fast.
    return torch.backends.cpu.get_cpu_capability().startswith("AVX512")


# Asked only for products on a CPU (see `dispatch.choose_product`).
cpu_features = dispatch.CpuFeatures(
    native_kernel=_native_kernel_available,
    native_quantized_kernel=_native_kernel_available,
    avx512_bf16=native.has_bfloat16_dot,
    avx512=_has_avx512,
)


@functools.cache
def native_linear():
    """The native kernel as the torch operator `gemma_keras::bf16_linear(x,
    kernel, threads)`, or None where it cannot be built here. An operator,
    not a plain call, so that `torch.jit.trace` records it in a step's
    graph; it runs on up to `threads` of torch's intra-op threads."""
    return native.load_torch()


@functools.cache
def _onednn_linear():
    def onednn_linear(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, kernel, None, "none", [], "")

    # Scripted so that `torch.jit.trace` records the call; tracing the op
    # directly fails on its empty `scalars` list.
    with quiet_torch_jit():
        return torch.jit.script(onednn_linear)


@contextlib.contextmanager
def quiet_torch_jit():
    """torch 2.13 marks `torch.jit` deprecated for `torch.compile` and
    `torch.export`, which decode slower here (docs/performance.md), so the
    notice would only tell users to do worse."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        yield


def einsum(equation, a, b):
    """`keras.ops.einsum`; in float32 where torch's bfloat16 one is slow
    (a CPU without AVX512: its bf16 `bmm` took 19 of the 20 s of a 512-token
    270M prefill)."""
    platform = platform_of(a, b)
    choice = dispatch.choose_einsum(
        "torch",
        platform,
        keras.backend.standardize_dtype(a.dtype),
        keras.backend.standardize_dtype(b.dtype),
        cpu_features if platform == "cpu" else frozenset(),
    )
    # A decode step's einsums without their axes of size 1: what is left is often one
    # matrix product, where torch's einsum takes a batched one (about 4x slower here).
    product = keras.ops.einsum if _records_gradient(a, b) else _einsum_without_unit_axes
    if choice == dispatch.EINSUM_IN_FLOAT32:
        return product(equation, a.float(), b.float()).to(a.dtype)
    return product(equation, a, b)


def _einsum_without_unit_axes(equation, a, b):
    return steps.einsum_without_unit_axes(equation, a, b, torch.einsum, _matmul)


def _matmul(a, b, transpose_a, transpose_b):
    return torch.matmul(a.mT if transpose_a else a, b.mT if transpose_b else b)


def write_slots(cache, first_slot, new):
    """`cache` with `new` written from slot `first_slot`, as one `index_copy`:
    Keras' `slice_update` with a tensor start builds an index for every
    element (`meshgrid`, `stack`, `index_put_`: 15 of the ~20 operations per
    write that a traced decode step replays)."""
    slots = (
        torch.arange(new.shape[1], device=cache.device)
        + torch.as_tensor(first_slot, device=cache.device).long()
    )
    return cache.index_copy(1, slots, new.to(cache.dtype))


keeping_variables = steps.keeping_variables
softmax = steps.softmax
swap_halves = steps.swap_halves


def take_rows(table, ids):
    return keras.ops.take(keras.ops.convert_to_tensor(table), ids, axis=0)


def cross_entropy_rows(labels, logits):
    """Cross-entropy of logits [rows, classes] against integer labels [rows],
    per row (see `gemma_keras.backends.cross_entropy_rows`)."""
    return _RowsCrossEntropy.apply(logits, labels.to(torch.long))


class _RowsCrossEntropy(torch.autograd.Function):
    """`log(sum(exp(logits))) - logits[label]` per row, keeping only the logits
    (which the step holds anyway) for the gradient `softmax - one_hot`, written
    into one new tensor. `F.cross_entropy` keeps its log-softmax and its
    backward makes two more tensors of the logits' size: at batch 4 x 256
    tokens of the 270M (1 GB of logits) its LoRA step peaked above KerasHub's."""

    ROWS_AT_ONCE = 64  # bounds the forward's temporaries (64 rows x 262144 x 4 B = 64 MB)

    @staticmethod
    def forward(ctx, logits, labels):
        chunks = logits.split(_RowsCrossEntropy.ROWS_AT_ONCE)
        log_normalizer = torch.cat([torch.logsumexp(chunk, dim=-1) for chunk in chunks])
        ctx.save_for_backward(logits, labels, log_normalizer)
        return log_normalizer - logits.gather(1, labels[:, None])[:, 0]

    @staticmethod
    def backward(ctx, grad_losses):
        logits, labels, log_normalizer = ctx.saved_tensors
        grad = torch.sub(logits, log_normalizer[:, None]).exp_()  # softmax
        grad.scatter_add_(1, labels[:, None], -torch.ones_like(log_normalizer)[:, None])
        return grad.mul_(grad_losses[:, None]), None


def is_concrete(x):
    tracing = torch.compiler.is_compiling() or torch.jit.is_tracing()
    return not tracing and not isinstance(x, keras.KerasTensor)


def compile_function(function):
    return function


def compile_step(model, step):
    """One `torch.jit.trace` graph per input shape, the variables' values as inputs.

    Eager Keras spends about as long in Python per decode step as the 270M
    spends reading its weights; a traced graph replays the same torch ops
    without it. Tracing records one path through Python, which is sound
    here because every data-dependent choice in the step is a tensor op (the
    cache slot is a tensor input) and shapes are fixed per graph.
    `torch.compile` and `torch.export` decode slower (docs/performance.md).
    """
    variables = model.variables
    graphs = {}

    def traced_step(caches, *inputs):
        flat_caches, inputs, key = flatten(caches, inputs)
        # Under `no_grad` the trace needs no detached copies of the weights.
        values = [variable.value for variable in variables]
        with torch.no_grad():
            if key not in graphs:

                def pure_step(values, flat_caches, *inputs):
                    with steps.tracing_generation_step():
                        logits, new_caches = with_values(
                            variables, values, step, pairs(flat_caches), *inputs
                        )
                    return logits, [tensor for pair in new_caches for tensor in pair]

                with quiet_torch_jit():
                    graph = torch.jit.trace(
                        pure_step, (values, flat_caches, *inputs), check_trace=False
                    )
                simplify(graph.graph)
                graphs[key] = graph
            # With optimisation, the second call of every graph spends ~1-2 s
            # profiling and the steps after it are no faster.
            with torch.jit.optimized_execution(False):
                logits, flat_caches = graphs[key](values, flat_caches, *inputs)
        return logits, pairs(flat_caches)

    return traced_step


def simplify(graph):
    """Folds what a traced step recorded but does not depend on its inputs,
    with TorchScript's own passes (private, `torch._C`): Keras' per-op dtype
    conversions become constants or disappear (the 270M's decode graph: 37,716
    nodes to 3,645). They pay for themselves only together: 10% off the
    270M's int4 decode step (docs/performance.md)."""
    torch._C._jit_pass_constant_propagation(graph)
    _drop_same_type_casts(graph)
    torch._C._jit_pass_peephole(graph)
    torch._C._jit_pass_cse(graph)
    torch._C._jit_pass_dce(graph)


# The arguments under which `aten::to` returns its input itself when the
# dtype and device already match.
_NO_COPY = [("copy", (False,)), ("memory_format", (None,)), ("layout", (None, 0))]


def _drop_same_type_casts(graph):
    """Removes `aten::to` casts where the trace saw the tensor already in the
    target dtype and device: Keras converts every op's input, and each such
    cast returns its input but still costs a dispatch. Shapes and dtypes are
    fixed per traced graph, so the recorded types hold on every replay."""
    for node in list(graph.nodes()):
        if node.kind() != "aten::to":
            continue
        arguments = torch._C.parse_schema(node.schema()).arguments
        named = {a.name: v for a, v in zip(arguments, node.inputs(), strict=False)}
        constant = all(
            named[name].node().kind() == "prim::Constant" and named[name].toIValue() in allowed
            for name, allowed in _NO_COPY
            if name in named
        )
        source, target = node.inputsAt(0).type(), node.output().type()
        if (
            constant
            and isinstance(source, torch._C.TensorType)
            and source.scalarType() is not None
            and source.scalarType() == target.scalarType()
            and source.device() == target.device()
        ):
            node.output().replaceAllUsesWith(node.inputsAt(0))
            node.destroy()
