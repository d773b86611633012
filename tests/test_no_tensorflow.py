"""On JAX and torch, loading a model never imports TensorFlow."""

import os
import subprocess
import sys
import textwrap

import keras
import pytest

from conftest import randomize, tiny_config
from gemma_keras import GemmaCausalLM, GemmaTokenizer
from gemma_keras.checkpoints.weight_mapping import assign_weights, model_shapes

pytestmark = pytest.mark.skipif(
    keras.config.backend() == "tensorflow", reason="TensorFlow is the backend here"
)


def test_loading_does_not_import_tensorflow(tokenizer_proto, tmp_path):
    model = GemmaCausalLM.from_gemma_config(tiny_config("gemma3"))
    assign_weights(model, randomize(model_shapes(model)))
    model.tokenizer = GemmaTokenizer(tokenizer_proto)
    model.save_to_preset(str(tmp_path / "keras_hub"))
    model.export_to_huggingface(str(tmp_path / "hf"))
    code = textwrap.dedent(
        f"""
        import sys
        import numpy as np
        from gemma_keras import GemmaCausalLM
        for path in {[str(tmp_path / "keras_hub"), str(tmp_path / "hf")]!r}:
            model = GemmaCausalLM.from_preset(path)
            ids = np.array([model.tokenizer.encode("The capital of France is")])
            model({{"token_ids": ids, "padding_mask": np.ones_like(ids)}})
        assert "tensorflow" not in sys.modules, "tensorflow was imported"
        """
    )
    env = {**os.environ, "KERAS_BACKEND": keras.config.backend()}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
