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
