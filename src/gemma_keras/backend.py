"""The one place that knows which Keras backend is running.

Everything else in gemma_keras uses `keras.ops` only.
"""

import keras


def name():
    return keras.config.backend()


def is_concrete(x):
    """True when `x` holds values now (eager), False while a graph is being traced."""
    backend = name()
    if backend == "jax":
        import jax

        return not isinstance(x, jax.core.Tracer)
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.executing_eagerly() and not isinstance(x, keras.KerasTensor)
    if backend == "torch":
        import torch

        return not torch.compiler.is_compiling() and not isinstance(x, keras.KerasTensor)
    return not isinstance(x, keras.KerasTensor)


def compile_step(model, step):
    """Compiles `step(caches, token_ids, key_mask, positions, cache_index)` for this backend.

    JAX: `jax.jit` over the variables' values (passed as arguments, not baked
    in as constants), the caches donated so XLA updates them in place.
    TensorFlow: `tf.function(jit_compile=True)`. PyTorch: eager under
    `torch.no_grad()` (measured faster than `torch.compile` for decode on
    CPU, see benchmarks/). Each backend compiles once per input shape; the
    caller buckets shapes.
    """
    backend = name()
    if backend == "jax":
        import jax

        variables = model.variables

        def pure_step(values, caches, *inputs):
            with keras.StatelessScope(state_mapping=list(zip(variables, values, strict=True))):
                return step(caches, *inputs)

        jitted = jax.jit(pure_step, donate_argnums=(1,))
        return lambda caches, *inputs: jitted([v.value for v in variables], caches, *inputs)
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.function(step, jit_compile=True)
    if backend == "torch":
        import torch

        def no_grad_step(*inputs):
            with torch.no_grad():
                return step(*inputs)

        return no_grad_step
    return step
