"""Gemma language models on Keras 3: one code base for JAX, TensorFlow and PyTorch."""

from gemma_keras.backbone import GemmaBackbone
from gemma_keras.causal_lm import GemmaCausalLM
from gemma_keras.config import ConfigError, GemmaConfig
from gemma_keras.layers.token_embedding import TokenIdError

__all__ = ["ConfigError", "GemmaBackbone", "GemmaCausalLM", "GemmaConfig", "TokenIdError"]
__version__ = "0.1.0"
