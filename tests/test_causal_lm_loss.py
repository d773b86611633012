"""`GemmaCausalLM.compile` computes Keras' sparse cross-entropy on the logits as
rows [tokens, vocabulary]: the same values and gradients as Keras' own loss."""

import keras
import numpy as np
import pytest

from conftest import tiny_config
from gemma_keras import GemmaCausalLM
from gemma_keras.causal_lm import token_rows_loss
from test_gradients import value_and_gradients

# float32 logits over 4096 classes, the same operations on another layout. PyTorch's
# log-softmax over the strided axis that Keras' own loss gives it is the less exact
# of the two: against float64, gradients 3.1e-6 off where the rows' are 1.7e-7.
TOLERANCE = dict(rtol=1e-5, atol=5e-6)


def logits_and_labels(shape=(2, 7, 4096), seed=0):
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal(shape) * 4).astype("float32")
    logits[0, 0, 5] = 60.0  # one confident token, as a trained model has
    labels = rng.integers(0, shape[-1], shape[:-1]).astype("int32")
    weights = (rng.random(shape[:-1]) > 0.3).astype("float32")
    return logits, labels, weights


@pytest.mark.parametrize(
    "settings",
    [
        dict(from_logits=True),
        dict(from_logits=True, reduction="sum"),
        dict(from_logits=True, reduction=None),
        dict(from_logits=True, reduction="mean_with_sample_weight"),
    ],
    ids=lambda settings: str(settings.get("reduction", "default")),
)
@pytest.mark.parametrize("trailing_axis", [False, True], ids=["labels", "labels[..., None]"])
# 150 rows: more than PyTorch's loss takes at once (`_RowsCrossEntropy.ROWS_AT_ONCE`).
@pytest.mark.parametrize("shape", [(2, 7, 4096), (3, 50, 512)], ids=["14 rows", "150 rows"])
def test_rows_loss_equals_keras_loss_and_its_gradient(settings, trailing_axis, shape):
    logits, labels, weights = logits_and_labels(shape)
    if trailing_axis:
        labels = labels[..., None]
    theirs = keras.losses.SparseCategoricalCrossentropy(**settings)
    ours = token_rows_loss(theirs)
    assert ours is not theirs and ours.get_config() == theirs.get_config()

    def values_and_gradient(loss):
        value, (gradient,) = value_and_gradients(
            lambda x: loss(labels, x, sample_weight=weights),
            [keras.ops.convert_to_tensor(logits)],
            1.0,
        )
        return keras.ops.convert_to_numpy(value), keras.ops.convert_to_numpy(gradient)

    our_values, our_gradient = values_and_gradient(ours)
    their_values, their_gradient = values_and_gradient(theirs)
    np.testing.assert_allclose(our_values, their_values, **TOLERANCE)
    np.testing.assert_allclose(our_gradient, their_gradient, **TOLERANCE)
    assert np.abs(their_gradient).max() > 0


@pytest.mark.parametrize(
    "loss",
    [
        keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=0),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True, axis=1),
        keras.losses.CategoricalCrossentropy(from_logits=True),
        "sparse_categorical_crossentropy",
    ],
    ids=["ignore_class", "axis=1", "another loss", "a name"],
)
def test_other_losses_are_kept_as_given(loss):
    assert token_rows_loss(loss) is loss


def test_compile_takes_the_rows_loss():
    tiny_model = GemmaCausalLM.from_gemma_config(tiny_config("gemma1_mqa"))
    tiny_model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    assert tiny_model.loss.fn.__name__ == "cross_entropy_over_rows"
    tiny_model.compile()  # "auto"
    assert tiny_model.loss.fn.__name__ == "cross_entropy_over_rows"
    assert tiny_model.loss.get_config()["from_logits"] is True


def test_rows_loss_names_labels_that_do_not_fit_the_logits():
    logits, labels, _ = logits_and_labels((2, 7, 64))
    loss = token_rows_loss(keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    with pytest.raises(ValueError, match="labels hold 12 tokens and the logits 14"):
        loss(labels[:, :6], logits)
