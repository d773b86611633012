"""What every checkpoint reader returns, whatever the file format."""

import dataclasses
from collections.abc import Mapping

from gemma_keras.config import GemmaConfig


@dataclasses.dataclass
class Checkpoint:
    """A model read from disk, in gemma_keras terms.

    `weights` maps gemma_keras variable names (`decoder_block_0/attention/query`,
    see `weight_mapping.model_variables`) to numpy arrays in gemma_keras'
    layout. Readers may return a lazy mapping that reads or dequantizes a
    tensor only when it is looked up, so that loading holds one tensor at a
    time besides the model. `tokenizer_proto` is a serialized SentencePiece
    model (or None when the checkpoint has no tokenizer). `source` names the
    file or directory for error messages.
    """

    config: GemmaConfig
    weights: Mapping
    tokenizer_proto: bytes | None
    source: str


class LazyWeights(Mapping):
    """`{name: array}` whose arrays are produced by `loaders[name]()` on each lookup."""

    def __init__(self, loaders):
        self._loaders = dict(loaders)

    def __getitem__(self, name):
        return self._loaders[name]()

    def __iter__(self):
        return iter(self._loaders)

    def __len__(self):
        return len(self._loaders)
