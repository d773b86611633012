"""Gemma's weights over a device mesh with `keras.distribution` (JAX).

`layout_map(device_mesh)` returns the `keras.distribution.LayoutMap` that
`GemmaBackbone.get_layout_map` gives: each projection's kernel (stored
`[out, in]`) is split over the model axis along the axis Megatron splits
(query/key/value, gate and up by output; attention output and down by input)
and over the data axis along the other (as KerasHub does, so that weights
are sharded fully, FSDP-style); the embedding by vocabulary (model) and
hidden (data); norms are replicated.

Key/value kernels are split by their flattened `heads * head_dim` output,
not by head: a model with fewer key/value heads than model-axis devices
(MQA: one head) splits within its heads, along `head_dim`, where KerasHub's
per-head kernels cannot be split at all (KerasHub #2795). LoRA adapters
follow the axes of the weight they adapt; quantized integers follow the
kernel, their per-group scales its rows.

>>> import keras
>>> from gemma_keras import GemmaBackbone
>>> mesh = keras.distribution.DeviceMesh((1, 1), ["batch", "model"],
...                                      keras.distribution.list_devices()[:1])
>>> GemmaBackbone.get_layout_map(mesh)["decoder_block_0/attention/key/kernel"].axes
('model', 'batch')
"""

import keras

# Keras shards models on JAX only; its TensorFlow and PyTorch backends have
# no `ModelParallel`/`DataParallel` for a model's variables and steps.
SUPPORTED_BACKENDS = ("jax",)


class DistributionError(ValueError):
    """A mesh, layout or backend that cannot distribute a Gemma model."""


def check_backend():
    """Raises a one-line `DistributionError` unless Keras can distribute on this backend."""
    backend = keras.config.backend()
    if backend not in SUPPORTED_BACKENDS:
        raise DistributionError(
            f"keras.distribution shards models on JAX only, not on {backend}: run with "
            "KERAS_BACKEND=jax for DataParallel/ModelParallel, or without a distribution on "
            "one device."
        )


def _rules(model, data):
    """`{path regex: axes}`: the kernels' `[out, in]` axes, their quantized
    scales and offsets (by row) and LoRA adapters (`a` `[in, rank]`, `b`
    `[rank, out]`)."""
    block = r"decoder_block_\d+"
    by_output = rf"{block}/(attention/(query|key|value)|ffw/(gate|up))"  # [model, data]
    by_input = rf"{block}/(attention/output|ffw/down)"  # [data, model]
    return {
        "token_embedding/embeddings": (model, data),
        "token_embedding/embeddings_(scale|offset)": (model, None),
        "token_embedding/lora_embeddings_a": (model, None),
        "token_embedding/lora_embeddings_b": (None, data),
        f"{by_output}/kernel": (model, data),
        f"{by_output}/kernel_(scale|offset)": (model, None),
        f"{by_output}/lora_kernel_a": (data, None),
        f"{by_output}/lora_kernel_b": (None, model),
        f"{by_input}/kernel": (data, model),
        f"{by_input}/kernel_(scale|offset)": (data, None),
        f"{by_input}/lora_kernel_a": (model, None),
        f"{by_input}/lora_kernel_b": (None, data),
    }


def layout_map(device_mesh, model_parallel_dim_name="model", data_parallel_dim_name="batch"):
    """A `keras.distribution.LayoutMap` for every Gemma generation on `device_mesh`.

    `data_parallel_dim_name=None` leaves the weights whole along the data
    axis (replicated over it) instead of sharded.
    """
    check_backend()
    if not isinstance(device_mesh, keras.distribution.DeviceMesh):
        raise DistributionError(
            f"device_mesh must be a keras.distribution.DeviceMesh, got "
            f"{type(device_mesh).__name__}."
        )
    names = tuple(device_mesh.axis_names)
    for argument, axis in (
        ("model_parallel_dim_name", model_parallel_dim_name),
        ("data_parallel_dim_name", data_parallel_dim_name),
    ):
        if axis is not None and axis not in names:
            raise DistributionError(
                f"{argument}={axis!r} is not an axis of the device mesh, whose axes are "
                f"{names}; pass {argument} naming one of them."
            )
    if model_parallel_dim_name == data_parallel_dim_name:
        raise DistributionError(
            f"The model and data axes are both {model_parallel_dim_name!r}; name two "
            "different axes of the mesh."
        )
    layouts = keras.distribution.LayoutMap(device_mesh)
    for pattern, axes in _rules(model_parallel_dim_name, data_parallel_dim_name).items():
        layouts[pattern] = axes
    return layouts


def weight_shapes(config):
    """`{path: shape}` of the projections and the embedding of a model of
    `config`, computed without building it (for checking full-size layouts)."""
    hidden, intermediate = config.hidden_dim, config.intermediate_dim
    shapes = {"token_embedding/embeddings": (config.vocabulary_size, hidden)}
    for index in range(config.num_layers):
        block = f"decoder_block_{index}"
        shapes[f"{block}/attention/query/kernel"] = (config.query_dim, hidden)
        shapes[f"{block}/attention/key/kernel"] = (config.key_value_dim, hidden)
        shapes[f"{block}/attention/value/kernel"] = (config.key_value_dim, hidden)
        shapes[f"{block}/attention/output/kernel"] = (hidden, config.query_dim)
        shapes[f"{block}/ffw/gate/kernel"] = (intermediate, hidden)
        shapes[f"{block}/ffw/up/kernel"] = (intermediate, hidden)
        shapes[f"{block}/ffw/down/kernel"] = (hidden, intermediate)
    return shapes


def check_layouts(shapes, distribution=None):
    """Raises a one-line `DistributionError` naming the weight, its size and
    the mesh axis when a split axis of `shapes` (`{path: shape}`) does not
    divide over the mesh of `distribution` (default: the current one)."""
    distribution = distribution or keras.distribution.distribution()
    layouts = getattr(distribution, "_layout_map", None)
    if layouts is None:  # no distribution, or DataParallel: every weight replicated
        return
    mesh = distribution.device_mesh
    sizes = dict(zip(mesh.axis_names, mesh.shape, strict=True))
    for path, shape in shapes.items():
        layout = layouts[path]
        if layout is None:
            continue
        for dimension, (size, axis) in enumerate(zip(shape, layout.axes, strict=True)):
            if axis is None:
                continue
            if axis not in sizes:
                raise DistributionError(
                    f"The layout of {path} names mesh axis {axis!r}, but the mesh's axes are "
                    f"{tuple(mesh.axis_names)}; make the layout map from this mesh."
                )
            if size % sizes[axis]:
                raise DistributionError(
                    f"{path} (shape {tuple(shape)}) cannot be split over the mesh's {axis!r} "
                    f"axis: its dimension {dimension} of size {size} does not divide into "
                    f"{sizes[axis]} parts; use a mesh whose {axis!r} axis divides {size}."
                )


def check_model(config):
    """Checks, before any weight is made, that a model of `config` can be
    laid out by the current distribution (nothing to check without one)."""
    if keras.distribution.distribution() is None:
        return
    check_backend()
    check_layouts(weight_shapes(config))


def check_batches(examples, batch_size):
    """Under a distribution, checks that `examples` rows in batches of
    `batch_size` (Keras' default 32) split evenly over the data axis, the last
    batch included, before Keras shards one and JAX refuses it."""
    distribution = keras.distribution.distribution()
    if distribution is None or examples == 0:
        return
    mesh = distribution.device_mesh
    devices = dict(zip(mesh.axis_names, mesh.shape, strict=True))[distribution.batch_dim_name]
    batch = min(batch_size or 32, examples)
    last = examples % batch
    if batch % devices or last % devices:
        held = f"batches of {batch}" + (f" and a last one of {last}" if last else "")
        raise DistributionError(
            f"{examples} examples make {held}, which do not split over the {devices} devices "
            f"of the {distribution.batch_dim_name!r} axis: give a batch_size that is a "
            f"multiple of {devices}, and a number of examples that such batches divide."
        )


def cache_layout(shape):
    """The `TensorLayout` of a `[batch, slots, kv_heads, head_dim]` KV cache
    under the current distribution, or None: the batch over the data axis and
    the key/value heads (else `head_dim`) over the model axis, where they divide."""
    distribution = keras.distribution.distribution()
    if distribution is None:
        return None
    mesh = distribution.device_mesh
    sizes = dict(zip(mesh.axis_names, mesh.shape, strict=True))
    data = distribution.batch_dim_name
    axes = [data if shape[0] % sizes[data] == 0 else None, None, None, None]
    model_axes = [name for name in mesh.axis_names if name != data and sizes[name] > 1]
    if len(model_axes) == 1:
        model = model_axes[0]
        for dimension in (2, 3):
            if shape[dimension] % sizes[model] == 0:
                axes[dimension] = model
                break
    return keras.distribution.TensorLayout(axes, mesh)


__all__ = [
    "DistributionError",
    "check_batches",
    "check_model",
    "layout_map",
    "weight_shapes",
    "check_layouts",
]
