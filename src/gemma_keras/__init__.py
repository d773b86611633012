"""Gemma language models on Keras 3: one code base for JAX, TensorFlow and PyTorch."""

import importlib.util
import os
import sys


def _choose_default_backend():
    """Keras falls back to TensorFlow when nothing names a backend; a user who
    installed only `gemma-keras[jax]` or `[torch]` would then fail to import.
    Pick an installed backend (JAX first, as the Gemma docs recommend) only
    when neither `KERAS_BACKEND` nor `~/.keras/keras.json` chose one and Keras
    is not imported yet."""
    if "keras" in sys.modules or os.environ.get("KERAS_BACKEND"):
        return
    keras_home = os.environ.get("KERAS_HOME", os.path.join(os.path.expanduser("~"), ".keras"))
    if os.path.exists(os.path.join(keras_home, "keras.json")):
        return
    for backend in ("jax", "torch", "tensorflow"):
        if importlib.util.find_spec(backend) is not None:
            os.environ["KERAS_BACKEND"] = backend
            return


_choose_default_backend()

from gemma_keras.backbone import GemmaBackbone  # noqa: E402
from gemma_keras.causal_lm import GemmaCausalLM  # noqa: E402
from gemma_keras.chat_template import apply_chat_template  # noqa: E402
from gemma_keras.config import ConfigError, GemmaConfig  # noqa: E402
from gemma_keras.generation import GenerationError  # noqa: E402
from gemma_keras.layers.token_embedding import TokenIdError  # noqa: E402
from gemma_keras.registry import PresetNotFoundError, get_preset, list_presets  # noqa: E402
from gemma_keras.resolve import DownloadError, resolve_preset  # noqa: E402
from gemma_keras.samplers import BeamSampler, Sampler  # noqa: E402
from gemma_keras.tokenizer import GemmaTokenizer  # noqa: E402

__all__ = [
    "BeamSampler",
    "ConfigError",
    "DownloadError",
    "GemmaBackbone",
    "GemmaCausalLM",
    "GemmaConfig",
    "GemmaTokenizer",
    "GenerationError",
    "PresetNotFoundError",
    "Sampler",
    "TokenIdError",
    "apply_chat_template",
    "get_preset",
    "list_presets",
    "resolve_preset",
]
__version__ = "0.1.0"
