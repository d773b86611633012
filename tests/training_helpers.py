"""Loss and gradients of a model with each backend's own autodiff, for the training tests."""

import keras
import numpy as np

BACKEND = keras.config.backend()
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def loss_and_gradients(model, x, y, sample_weight, variables):
    """`(loss, [gradient per variable])` as NumPy float32, of KerasHub's causal LM
    loss (weighted mean cross-entropy over the labels)."""
    if BACKEND == "jax":
        import jax

        def loss_of(values):
            with keras.StatelessScope(state_mapping=list(zip(variables, values, strict=True))):
                return LOSS(y, model(x), sample_weight=sample_weight)

        loss, gradients = jax.value_and_grad(loss_of)([v.value for v in variables])
    elif BACKEND == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            loss = LOSS(y, model(x), sample_weight=sample_weight)
        gradients = tape.gradient(loss, [v.value for v in variables])
    else:
        import torch

        loss = LOSS(y, model(x), sample_weight=sample_weight)
        gradients = torch.autograd.grad(loss, [v.value for v in variables])
    as_numpy = keras.ops.convert_to_numpy
    return float(as_numpy(loss)), [as_numpy(g).astype("float32") for g in gradients]


def batch_for(vocabulary_size, batch=2, length=10, seed=3):
    """`(x, labels, sample_weight)` as the preprocessor makes them, one row padded."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, vocabulary_size, size=(batch, length + 1)).astype("int32")
    tokens[:, 0] = 2
    mask = np.ones_like(tokens)
    mask[1, length - 3 :] = 0
    tokens[mask == 0] = 0
    x = {"token_ids": tokens[:, :-1], "padding_mask": mask[:, :-1]}
    return x, tokens[:, 1:], mask[:, 1:].astype("float32")
