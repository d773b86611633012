"""LoRA and weight quantization as Keras' own layers do them, for layers that
own one large `[rows, columns]` weight (projections and the embedding)."""

import math
import numbers

import keras
import numpy as np
from keras import ops

from gemma_keras import distribution, quantization
from gemma_keras.quantization import QuantizationError


def check_lora_rank(rank):
    """Raises a one-line error unless `rank` is a positive integer."""
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank <= 0:
        raise ValueError(
            f"LoRA rank must be a positive integer, got {rank!r}; pass e.g. `enable_lora(4)`."
        )


def check_lora_alpha(lora_alpha):
    """Raises a one-line error unless `lora_alpha` is None or a positive finite number."""
    if lora_alpha is None:
        return
    if (
        isinstance(lora_alpha, bool)
        or not isinstance(lora_alpha, numbers.Real)
        or not math.isfinite(lora_alpha)
        or lora_alpha <= 0
    ):
        raise ValueError(
            f"lora_alpha must be a positive number (the update is scaled by lora_alpha / rank), "
            f"got {lora_alpha!r}; leave it None for lora_alpha = rank."
        )


class LoraLayer(quantization.QuantizesFloat16, keras.layers.Layer):
    """A layer whose weight `self.<base_weight_name>` takes a low-rank adapter
    and can be quantized.

    `enable_lora(rank, lora_alpha=None, a_initializer="he_uniform",
    b_initializer="zeros")` has the signature and behaviour of
    `keras.layers.Dense.enable_lora`: the base weight is frozen and two
    float32 weights `a` `[rows, rank]` and `b` `[rank, columns]` are added
    (float32, since bfloat16 adapters underflow under Adam: KerasHub #2629),
    scaled by `lora_alpha / rank`. Subclasses name them (`lora_weight_names`),
    give their shapes (`lora_shapes`) and say how `a @ b` adds to the base
    weight (`lora_delta`). `merge_lora()` folds the adapter into the base
    weight and removes it.

    `quantize(mode, type_check=True, config=None)`, as Keras layers have it,
    replaces the weight by the int8 or int4 form of `gemma_keras.quantization`
    (`<name>` holding the integers, `<name>_scale`, and for int4
    `<name>_offset`); a Keras `Int4QuantizationConfig(block_size=...)` sets
    the group size. LoRA on a quantized layer trains as on a float one (QLoRA).
    """

    base_weight_name = None
    lora_weight_names = None

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.lora_enabled = False
        self.lora_rank = None
        self.lora_alpha = None
        self._quantization_mode = None
        self.quantization_group_size = None

    @property
    def quantization_mode(self):
        """ "int8", "int4" or None: Keras layers' property, here set by `quantize`
        (Keras derives it from a quantized dtype policy, which these layers keep
        unchanged: their compute dtype stays the model's)."""
        return self._quantization_mode

    def quantized_call(self, *args, **kwargs):
        # Keras routes a quantized layer's calls here; `call` handles both forms.
        return self.call(*args, **kwargs)

    @property
    def weight_shape(self):
        """`(rows, columns)` of the weight as floats; quantization groups run along columns."""
        raise NotImplementedError

    @property
    def base_weight(self):
        return getattr(self, self.base_weight_name)

    @property
    def lora_weights(self):
        """`(a, b)` while LoRA is enabled."""
        return tuple(getattr(self, name) for name in self.lora_weight_names)

    def lora_shapes(self, rank):
        raise NotImplementedError

    def lora_delta(self):
        """What the adapter adds to the base weight: float32, the base weight's shape."""
        raise NotImplementedError

    def enable_lora(self, rank, lora_alpha=None, a_initializer="he_uniform", b_initializer="zeros"):
        check_lora_rank(rank)
        check_lora_alpha(lora_alpha)
        rank = int(rank)
        lora_alpha = rank if lora_alpha is None else float(lora_alpha)
        if not self.built:
            raise ValueError(f"Build the layer {self.name!r} before enabling LoRA on it.")
        if self.lora_enabled:
            raise ValueError(
                f"LoRA is already enabled on {self.name!r} (rank {self.lora_rank}); it can be "
                "enabled once per layer (`merge_lora()` folds it in and allows a new one)."
            )
        shapes = self.lora_shapes(rank)
        names = self.lora_weight_names
        distribution.check_layouts(
            {f"{self.path}/{name}": shape for name, shape in zip(names, shapes, strict=True)}
        )
        initializers = (a_initializer, b_initializer)
        self._tracker.unlock()
        for name, shape, initializer in zip(names, shapes, initializers, strict=True):
            weight = self.add_weight(
                name=name,
                shape=shape,
                initializer=keras.initializers.get(initializer),
                dtype="float32",
            )
            setattr(self, name, weight)
        self._tracker.lock()
        self.base_weight.trainable = False
        self.lora_enabled = True
        self.lora_rank = rank
        self.lora_alpha = lora_alpha

    @property
    def lora_scale(self):
        return self.lora_alpha / self.lora_rank

    def quantized_arrays(self):
        """`(integers, scale, offset)` of a quantized weight (offset None for int8)."""
        name = self.base_weight_name
        offset = getattr(self, f"{name}_offset", None)
        scale = getattr(self, f"{name}_scale")
        return self.base_weight.value, scale.value, None if offset is None else offset.value

    def float_weight(self, dtype="float32"):
        """The base weight as floats in `dtype` (dequantized where quantized)."""
        if self.quantization_mode is None:
            return ops.cast(self.base_weight.value, dtype)
        return quantization.dequantize(self.quantization_mode, *self.quantized_arrays(), dtype)

    def merged_weight(self):
        """The base weight with the adapter folded in: in the base weight's
        dtype, or float32 where it is quantized."""
        base = self.base_weight
        if self.quantization_mode is not None:
            merged = self.float_weight()
            return merged + self.lora_delta() if self.lora_enabled else merged
        if not self.lora_enabled:
            return base.value
        merged = ops.cast(base.value, "float32") + self.lora_delta()
        return ops.cast(merged, base.dtype)

    def merge_lora(self):
        """Folds the adapter into the base weight, removes it, and unfreezes the
        base weight (a quantized one is quantized again, merged)."""
        if not self.lora_enabled:
            return
        if self.quantization_mode is not None:
            self.assign_quantized(self.quantized_weight())
        else:
            self.base_weight.assign(self.merged_weight())
        for name in self.lora_weight_names:
            # What `Layer.__delattr__` does, without its `gc.collect()` per
            # variable (a second each in a test process full of models).
            self._untrack_variable(getattr(self, name))
            object.__delattr__(self, name)
        self.base_weight.trainable = self.quantization_mode is None
        self.lora_enabled = False
        self.lora_rank = self.lora_alpha = None

    def quantize(self, mode=None, type_check=True, config=None, group_size=None):
        """Quantizes the weight to `mode` ("int8" or "int4") in place, in groups of
        `group_size` inputs (default: see `quantization.group_size_for`)."""
        quantization.check_mode(mode)
        if not self.built:
            raise QuantizationError(f"Build the layer {self.name!r} before quantizing it.")
        if self.quantization_mode is not None:
            raise QuantizationError(
                f"{self.name!r} is already quantized ({self.quantization_mode}); a model is "
                "quantized once: load it again to quantize it another way."
            )
        if self.lora_enabled:
            raise QuantizationError(
                f"{self.name!r} has a LoRA adapter: merge it first (`merge_lora_weights()`), "
                "or quantize before `enable_lora` (QLoRA)."
            )
        columns = self.weight_shape[1]
        where = f"{self.path} ({columns} wide)"
        group_size = quantization.group_size_for(mode, columns, config, where, group_size)
        weight = np.asarray(ops.convert_to_numpy(self.float_weight()))
        quantized = quantization.quantize(weight, mode, group_size)
        self.build_quantized(mode, group_size)
        self.assign_quantized(quantized)

    def build_quantized(self, mode, group_size):
        """Replaces the float weight by uninitialised int8/int4 variables (in a
        `keras.StatelessScope(initialize_variables=False)` they wait for
        values, as when a quantized preset loads)."""
        shapes = self.quantized_variable_shapes(mode, group_size)
        distribution.check_layouts(
            {f"{self.path}/{key}": shape for key, (shape, _) in shapes.items()}
        )
        self._untrack_variable(self.base_weight)
        object.__delattr__(self, self.base_weight_name)
        self._tracker.unlock()
        for weight_name, (shape, dtype) in shapes.items():
            weight = self.add_weight(
                name=weight_name,
                shape=shape,
                dtype=dtype,
                initializer="zeros",
                trainable=False,
                autocast=False,
            )
            setattr(self, weight_name, weight)
        self._tracker.lock()
        self._quantization_mode = mode
        self.quantization_group_size = group_size

    def quantized_variable_shapes(self, mode, group_size):
        """`{variable name: (shape, dtype)}` of the weight's `mode` form."""
        rows, columns = self.weight_shape
        where = f"{self.path} ({columns} wide)"
        group_size = quantization.check_group_size(mode, group_size, columns, where)
        name = self.base_weight_name
        integers = ((rows, columns), "int8") if mode == "int8" else ((rows, columns // 2), "uint8")
        shapes = {name: integers, f"{name}_scale": ((rows, columns // group_size), "float32")}
        if mode == "int4":
            shapes[f"{name}_offset"] = shapes[f"{name}_scale"]
        return shapes

    def assign_quantized(self, quantized):
        """Sets the quantized variables from a `QuantizedWeight` of this layer's form."""
        if (quantized.mode, quantized.group_size) != (
            self.quantization_mode,
            self.quantization_group_size,
        ) or tuple(quantized.shape) != tuple(self.weight_shape):
            raise QuantizationError(
                f"{self.path}: a {quantized.mode} weight {quantized.shape} in groups of "
                f"{quantized.group_size} does not fit this layer's {self.quantization_mode} "
                f"form {self.weight_shape} in groups of {self.quantization_group_size}."
            )
        for suffix, array in quantized.arrays().items():
            getattr(self, self.base_weight_name + suffix).assign(array)

    def quantized_weight(self):
        """The layer's `QuantizedWeight` (NumPy); with LoRA, the merged weight quantized again."""
        mode = self.quantization_mode
        if self.lora_enabled:
            merged = np.asarray(ops.convert_to_numpy(self.merged_weight()))
            return quantization.quantize(merged, mode, self.quantization_group_size)
        kernel, scale, offset = (
            None if a is None else ops.convert_to_numpy(a) for a in self.quantized_arrays()
        )
        return quantization.QuantizedWeight(
            mode, kernel, scale, offset, self.quantization_group_size
        )
