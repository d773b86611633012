"""What every checkpoint reader returns, whatever the file format."""

import dataclasses
from collections.abc import Mapping

from gemma_keras.config import GemmaConfig


@dataclasses.dataclass
class Checkpoint:
    """A model found on disk, described in gemma_keras terms but not read yet.

    `tensors` maps the file's own tensor names to lazy tensors (a `.shape`,
    and the data read by `np.asarray` only when asked for), `mapping` is the
    format's `{our_name: (their_name, Layout)}` for this config, and
    `tokenizer_proto` a serialized SentencePiece model. `source` names the file
    or directory in error messages. `weights(shapes)` checks every name and
    shape against the model being built and returns a lazy `{our_name: array}`,
    so loading holds one tensor at a time besides the model.
    """

    config: GemmaConfig
    tensors: Mapping
    mapping: dict
    tokenizer_proto: bytes | None
    source: str

    def weights(self, expected_shapes):
        from gemma_keras.checkpoints.weight_mapping import to_model_weights

        return to_model_weights(self.tensors, self.mapping, expected_shapes, self.source)


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
