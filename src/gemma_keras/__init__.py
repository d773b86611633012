"""Gemma language models on Keras 3: one code base for JAX, TensorFlow and PyTorch.

>>> from gemma_keras import GemmaCausalLM  # doctest: +SKIP
>>> model = GemmaCausalLM.from_preset("gemma3_270m_q4_k_m")  # doctest: +SKIP
>>> model.generate("The capital of France is", max_new_tokens=8)  # doctest: +SKIP

Names are imported on first use, so that `import gemma_keras` (and the
`gemma-keras` command, which may still set `KERAS_BACKEND`) does not import
Keras before it is needed.
"""

import importlib
import importlib.util
import os
import sys

__version__ = "0.1.0"


def _choose_default_backend():
    """Keras falls back to TensorFlow when `KERAS_BACKEND` is unset (and writes
    that default into ~/.keras/keras.json on first import, so the file says
    nothing about the user's choice); a user who installed only
    `gemma-keras[jax]` or `[torch]` would then fail to import. Unless
    `KERAS_BACKEND` is set or Keras is already imported, pick an installed
    backend, JAX first as the Gemma docs recommend."""
    if "keras" in sys.modules or os.environ.get("KERAS_BACKEND"):
        return
    for backend in ("jax", "torch", "tensorflow"):
        if importlib.util.find_spec(backend) is not None:
            os.environ["KERAS_BACKEND"] = backend
            return


_choose_default_backend()

# Public name -> module that defines it.
_EXPORTS = {
    "BeamSampler": "gemma_keras.samplers",
    "ConfigError": "gemma_keras.config",
    "DistributionError": "gemma_keras.distribution",
    "DownloadError": "gemma_keras.resolve",
    "EvaluationError": "gemma_keras.evaluation",
    "GemmaBackbone": "gemma_keras.backbone",
    "GemmaCausalLM": "gemma_keras.causal_lm",
    "GemmaCausalLMPreprocessor": "gemma_keras.preprocessor",
    "GemmaConfig": "gemma_keras.config",
    "GemmaTokenizer": "gemma_keras.tokenizer",
    "GenerationError": "gemma_keras.generation",
    "LoraError": "gemma_keras.lora_weights",
    "PresetNotFoundError": "gemma_keras.registry",
    "QuantizationError": "gemma_keras.quantization",
    "Sampler": "gemma_keras.samplers",
    "ScoringError": "gemma_keras.scoring",
    "TokenIdError": "gemma_keras.layers.token_embedding",
    "apply_chat_template": "gemma_keras.chat_template",
    "get_preset": "gemma_keras.registry",
    "list_presets": "gemma_keras.registry",
    "resolve_preset": "gemma_keras.resolve",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'gemma_keras' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
