"""Full fine-tuning equals KerasHub's: the same weights in, the same loss and weights
out after two optimizer steps, through real preset files in both directions."""

import dataclasses

import keras
import numpy as np
import pytest

from conftest import tiny_config
from gemma_keras import GemmaCausalLM, GemmaCausalLMPreprocessor, GemmaTokenizer
from gemma_keras.checkpoints.weight_mapping import get_weights
from test_parity_keras_hub import KERAS_HUB_GEMMA2, random_keras_hub_model
from training_helpers import batch_for

keras_hub = pytest.importorskip("keras_hub")

CONFIGS = {
    "gemma1_mqa": tiny_config("gemma1_mqa"),
    "gemma1_mha": tiny_config("gemma1_mha"),
    "gemma2": KERAS_HUB_GEMMA2,
}
# float32; both run the same products, in another order.
TOLERANCE = 1e-5


def two_steps(model, x, y, sample_weight):
    # SGD: weights then differ by the learning rate times the gradients'
    # difference. Adam divides each gradient by its own size, so a weight whose
    # gradient is ~1e-8 (rounding noise) moves by about the learning rate in a
    # direction set by that noise: with AdamW(1e-2) Gemma 2's weights differed
    # by up to 3e-5 while the losses still agreed to 5e-7.
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate=0.5),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    batch = dict(x=x, y=y, sample_weight=sample_weight, return_dict=True)
    losses = [model.train_on_batch(**batch)["loss"] for _ in range(2)]
    return [float(loss) for loss in losses + [model.test_on_batch(**batch)["loss"]]]


@pytest.mark.parametrize("variant", sorted(CONFIGS))
def test_two_full_fine_tuning_steps_equal_keras_hub(variant, tokenizer_proto, tmp_path):
    config = CONFIGS[variant]
    reference = random_keras_hub_model(config, tokenizer_proto)
    reference.save_to_preset(str(tmp_path / "start"))
    ours = GemmaCausalLM.from_preset(str(tmp_path / "start"))
    reference.preprocessor = None  # both take the same token arrays
    x, y, sample_weight = batch_for(config.vocabulary_size, batch=2, length=12)

    their_losses = two_steps(reference, x, y, sample_weight)
    our_losses = two_steps(ours, x, y, sample_weight)
    print(f"{variant}: losses ours {our_losses}, KerasHub {their_losses}")
    np.testing.assert_allclose(our_losses, their_losses, rtol=TOLERANCE, atol=0)
    assert our_losses[-1] < our_losses[0]

    reference.preprocessor = keras_hub.models.GemmaCausalLMPreprocessor(
        keras_hub.models.GemmaTokenizer(proto=tokenizer_proto)
    )
    reference.save_to_preset(str(tmp_path / "trained"))
    theirs = get_weights(GemmaCausalLM.from_preset(str(tmp_path / "trained")))
    trained = get_weights(ours)
    assert sorted(theirs) == sorted(trained)
    worst = max(np.abs(trained[name] - theirs[name]).max() for name in trained)
    print(f"{variant}: max |weight difference| after two steps = {worst:.2e}")
    assert worst <= TOLERANCE


def test_fit_on_text_runs_without_a_compile_call(tokenizer_proto):
    """KerasHub's defaults: `fit` on strings straight after loading."""
    tokenizer = GemmaTokenizer(tokenizer_proto)
    config = dataclasses.replace(
        tiny_config("gemma1_mqa"), vocabulary_size=tokenizer.vocabulary_size
    )
    ours = GemmaCausalLM.from_gemma_config(config)
    ours.tokenizer = tokenizer
    ours.preprocessor = GemmaCausalLMPreprocessor(ours.tokenizer, sequence_length=16)
    history = ours.fit(["The capital of France is Paris."] * 4, batch_size=2, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    assert "sparse_categorical_accuracy" in history.history
