"""LoRA as Keras' own layers do it, for layers that own one large weight."""

import keras
from keras import ops


def check_lora_rank(rank):
    """Raises a one-line error unless `rank` is a positive integer."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ValueError(
            f"LoRA rank must be a positive integer, got {rank!r}; pass e.g. `enable_lora(4)`."
        )


class LoraLayer(keras.layers.Layer):
    """A layer whose weight `self.<base_weight_name>` takes a low-rank adapter.

    `enable_lora(rank, lora_alpha=None, a_initializer="he_uniform",
    b_initializer="zeros")` has the signature and behaviour of
    `keras.layers.Dense.enable_lora`: the base weight is frozen and two
    float32 weights `a` `[rows, rank]` and `b` `[rank, columns]` are added
    (float32, since bfloat16 adapters underflow under Adam: KerasHub #2629),
    scaled by `lora_alpha / rank`. Subclasses name them (`lora_weight_names`),
    give their shapes (`lora_shapes`) and say how `a @ b` adds to the base
    weight (`lora_delta`). `merge_lora()` folds the adapter into the base
    weight and removes it.
    """

    base_weight_name = None
    lora_weight_names = None

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.lora_enabled = False
        self.lora_rank = None
        self.lora_alpha = None

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
        if not self.built:
            raise ValueError(f"Build the layer {self.name!r} before enabling LoRA on it.")
        if self.lora_enabled:
            raise ValueError(
                f"LoRA is already enabled on {self.name!r} (rank {self.lora_rank}); it can be "
                "enabled once per layer (`merge_lora()` folds it in and allows a new one)."
            )
        shapes = self.lora_shapes(rank)
        initializers = (a_initializer, b_initializer)
        self._tracker.unlock()
        names = self.lora_weight_names
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
        self.lora_alpha = lora_alpha if lora_alpha is not None else rank

    @property
    def lora_scale(self):
        return self.lora_alpha / self.lora_rank

    def merged_weight(self):
        """The base weight with the adapter folded in, in the base weight's dtype."""
        base = self.base_weight
        if not self.lora_enabled:
            return base.value
        merged = ops.cast(base.value, "float32") + self.lora_delta()
        return ops.cast(merged, base.dtype)

    def merge_lora(self):
        """Folds the adapter into the base weight, removes it, and unfreezes the base weight."""
        if not self.lora_enabled:
            return
        self.base_weight.assign(self.merged_weight())
        for name in self.lora_weight_names:
            # What `Layer.__delattr__` does, without its `gc.collect()` per
            # variable (a second each in a test process full of models).
            self._untrack_variable(getattr(self, name))
            object.__delattr__(self, name)
        self.base_weight.trainable = True
        self.lora_enabled = False
        self.lora_rank = self.lora_alpha = None
