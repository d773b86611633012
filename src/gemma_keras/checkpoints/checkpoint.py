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

    def quantized_weight(self, our_name, mode):
        """The `quantization.QuantizedWeight` in `mode` of one of our variables
        (e.g. `decoder_block_3/attention/query/kernel`), decoded from the file's
        own quantized form without a float32 copy, or None where the file
        offers no exact one (float tensors, other block types, a tensor laid
        out differently from ours): the loader then quantizes the float weight.

        >>> checkpoint.quantized_weight("token_embedding/embeddings", "int8")  # doctest: +SKIP
        QuantizedWeight(mode='int8', kernel=array(...), ..., group_size=32)
        """
        from gemma_keras.checkpoints.weight_mapping import SAME, WeightsError

        if our_name not in self.mapping:
            raise WeightsError(
                f"{self.source} has no weight {our_name!r}; names look like "
                "'decoder_block_0/attention/query/kernel' or 'token_embedding/embeddings'."
            )
        their_name, layout = self.mapping[our_name]
        tensor = self.tensors[their_name]
        if layout is not SAME or not hasattr(tensor, "quantized"):
            return None
        return tensor.quantized(mode)


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
