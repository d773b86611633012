"""GemmaCausalLM: the backbone plus the tied output projection to vocabulary logits."""

import os

import keras
import numpy as np
from keras.src.backend.common.stateless_scope import in_stateless_scope

from gemma_keras import backends, distribution, quantization
from gemma_keras.backbone import GemmaBackbone
from gemma_keras.layers.token_embedding import check_token_ids


class GemmaCausalLM(quantization.QuantizesFloat16, keras.Model):
    """Gemma as a language model: inputs as `GemmaBackbone`, output float32
    logits `[batch, seq, vocabulary_size]` (final soft-cap applied when the
    config has one).

    Example:

    >>> import numpy as np
    >>> from gemma_keras import GemmaCausalLM, GemmaConfig
    >>> config = GemmaConfig(vocabulary_size=100, num_layers=2, hidden_dim=32,
    ...                      intermediate_dim=64, num_query_heads=4,
    ...                      num_key_value_heads=1, head_dim=8)
    >>> model = GemmaCausalLM.from_gemma_config(config)
    >>> logits = model({"token_ids": np.array([[2, 5, 7]]),
    ...                 "padding_mask": np.ones((1, 3), "int32")})
    >>> tuple(logits.shape)
    (1, 3, 100)
    """

    def __init__(self, backbone, **kwargs):
        inputs = backbone.input
        hidden = backbone(inputs)
        logits = backbone.token_embedding(hidden, reverse=True)
        super().__init__(inputs=inputs, outputs=logits, **kwargs)
        # Functional models drop a `dtype` argument.
        self.dtype_policy = backbone.dtype_policy
        self.backbone = backbone
        # A `GemmaTokenizer`, set by `from_preset` (None for a model built from a config).
        self.tokenizer = None
        # Instruction-tuned models also stop generating at `<end_of_turn>`.
        self.instruction_tuned = False
        # A `GemmaCausalLMPreprocessor`, set by `from_preset`: `fit` and
        # `evaluate` take text through it.
        self.preprocessor = None
        self._compiled_step = None  # see `generation.compiled_step`
        self._compiled_losses = None  # see `scoring`
        # KerasHub's defaults, so that `fit` works without `compile`; a model
        # built without variables (see `loading.build_model`) compiles later.
        if not in_stateless_scope():
            self.compile()

    @classmethod
    def from_gemma_config(cls, config, dtype=None):
        return cls(GemmaBackbone(config, dtype=dtype))

    @classmethod
    def from_preset(cls, preset, dtype=None, load_weights=True, quantize=None):
        """Loads a model and its tokenizer from a preset name, a local path or a URL.

        `preset` is a registry name (`gemma_keras.list_presets()`), a KerasHub
        preset directory, a transformers checkpoint directory, a `.gguf` file,
        `kaggle://owner/model/keras/variation/version` or `hf://org/repo`.
        `dtype` defaults to Keras' global policy (float32 unless changed);
        weights are read straight into it. With `load_weights=False` the
        weights are randomly initialised. `quantize` ("int8" or "int4")
        quantizes each weight as it loads (see `quantize`), so the float model
        never sits in memory whole.

        >>> model = GemmaCausalLM.from_preset("gemma3_270m_q4_k_m")  # doctest: +SKIP
        >>> model.tokenizer.encode("The capital of France is")  # doctest: +SKIP
        [2, 818, 5279, 529, 7001, 563]
        """
        from gemma_keras.loading import from_preset

        return from_preset(preset, dtype=dtype, load_weights=load_weights, quantize=quantize)

    def save_to_preset(self, directory, dtype=None):
        """Writes a KerasHub preset directory (`keras_hub.models.GemmaCausalLM.from_preset`
        loads it too). `dtype` of the stored weights defaults to the model's variable dtype.
        A quantized model's weights are stored quantized (loaded back by gemma_keras only)."""
        from gemma_keras.checkpoints import keras_hub
        from gemma_keras.checkpoints.weight_mapping import get_weights, quantized_layers

        dtype = _stored_dtype(dtype, self)
        _check_folder(directory)
        layers = quantized_layers(self)
        quantized = {name: layer.quantized_weight() for name, layer in layers.items()}
        keras_hub.write_preset(
            directory,
            self.config,
            get_weights(self, skip=quantized),
            self._tokenizer_proto(),
            dtype,
            quantized,
        )

    def export_to_huggingface(self, directory, dtype=None):
        """Writes a transformers checkpoint directory (config.json, model.safetensors,
        tokenizer.model) that `AutoModelForCausalLM.from_pretrained` loads."""
        from gemma_keras.checkpoints import huggingface
        from gemma_keras.checkpoints.weight_mapping import get_weights

        dtype = _stored_dtype(dtype, self)
        _check_folder(directory)
        huggingface.write_checkpoint(
            directory,
            self.config,
            get_weights(self),
            self._tokenizer_proto(),
            dtype,
        )

    def _tokenizer_proto(self):
        if self.tokenizer is None:
            raise ValueError(
                "This model has no tokenizer to save; set `model.tokenizer = "
                "GemmaTokenizer(path)` first."
            )
        return self.tokenizer.proto

    @property
    def config(self):
        return self.backbone.config

    def call_with_cache(self, token_ids, key_mask, positions, caches, cache_index):
        """Cached forward pass (see `GemmaBackbone.call_with_cache`): `(logits, caches)`."""
        hidden, caches = self.backbone.call_with_cache(
            token_ids, key_mask, positions, caches, cache_index
        )
        return self.backbone.token_embedding(hidden, reverse=True), caches

    def compile(
        self,
        optimizer="auto",
        loss="auto",
        *,
        weighted_metrics="auto",
        sampler="greedy",
        **kwargs,
    ):
        """As KerasHub's `CausalLM.compile`: `keras.Model.compile` whose "auto"
        defaults are `Adam(2e-5)`, `SparseCategoricalCrossentropy(from_logits=True)`
        and a weighted `SparseCategoricalAccuracy` (the preprocessor's sample
        weights leave padding and prompts out), plus the default `sampler` of
        `generate` ("greedy", "top_k", "top_p", "random", "beam" or a `Sampler`;
        greedy unless changed, where KerasHub's is top-k).

        >>> model.compile(optimizer=keras.optimizers.AdamW(5e-5))  # doctest: +SKIP
        """
        from gemma_keras.samplers import get_sampler

        if optimizer == "auto":
            optimizer = keras.optimizers.Adam(2e-5)
        if loss == "auto":
            loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        loss = token_rows_loss(loss)
        if weighted_metrics == "auto":
            weighted_metrics = [keras.metrics.SparseCategoricalAccuracy()]
        sampler = get_sampler(sampler)
        super().compile(optimizer=optimizer, loss=loss, weighted_metrics=weighted_metrics, **kwargs)
        self.sampler = sampler  # only once Keras took the rest

    def quantize(self, mode=None, config=None, filters=None, **kwargs):
        """Quantizes the weights, "int8" or "int4", or "gptq" with a
        `keras.quantizers.GPTQConfig` (calibrated int4/int8: see `gemma_keras.gptq`):
        see `GemmaBackbone.quantize`. The QLoRA recipe is `quantize("int8")`,
        `backbone.enable_lora(4)`, `fit`.

        >>> model.quantize("int4")  # doctest: +SKIP
        >>> config = keras.quantizers.GPTQConfig(
        ...     texts, model.tokenizer, weight_bits=4, group_size=32)  # doctest: +SKIP
        >>> model.quantize("gptq", config=config)  # doctest: +SKIP
        """
        self.backbone.quantize(mode, config=config, filters=filters, **kwargs)
        # As `keras.Model.quantize`: the compiled functions held the old variables.
        self.train_function = self.test_function = self.predict_function = None
        if keras.config.backend() == "torch":
            for layer in self._flatten_layers():
                layer._track_variables()

    def fit(self, x=None, y=None, batch_size=None, sample_weight=None, **kwargs):
        """`keras.Model.fit`, taking text too: strings, `{"prompts", "responses"}`,
        chat conversations, NumPy arrays, generators, `keras.utils.PyDataset`s
        (and `tf.data` on TensorFlow) go through `self.preprocessor` (see
        `GemmaCausalLMPreprocessor`); `{"token_ids", "padding_mask"}` with labels
        pass as they are.

        >>> model.backbone.enable_lora(4)  # doctest: +SKIP
        >>> model.fit(["2 + 2 = 4", "3 + 5 = 8"], epochs=1, batch_size=1)  # doctest: +SKIP
        """
        x, y, sample_weight, batch_size = self._training_data(x, y, sample_weight, batch_size)
        self._check_arrays(x, y, sample_weight, batch_size)
        if not isinstance(x, (dict, list, tuple)) and not hasattr(x, "shape"):
            kwargs.setdefault("shuffle", False)  # a stream: Keras would warn that it cannot
        validation = kwargs.get("validation_data")
        if validation is not None and self.preprocessor is not None:
            validation_batch_size = kwargs.get("validation_batch_size") or batch_size
            kwargs["validation_data"] = self._validation_data(validation, validation_batch_size)
        with backends.keeping_variables(self):
            return super().fit(x, y, batch_size=batch_size, sample_weight=sample_weight, **kwargs)

    def evaluate(self, x=None, y=None, batch_size=None, sample_weight=None, **kwargs):
        """`keras.Model.evaluate`, taking the same data as `fit`."""
        x, y, sample_weight, batch_size = self._training_data(x, y, sample_weight, batch_size)
        self._check_arrays(x, y, sample_weight, batch_size)
        with backends.keeping_variables(self):
            return super().evaluate(
                x, y, batch_size=batch_size, sample_weight=sample_weight, **kwargs
            )

    def predict(self, x, *args, **kwargs):
        """`keras.Model.predict`: logits [batch, length, vocabulary] of
        `{"token_ids", "padding_mask"}`."""
        self._check_arrays(x, batch_size=kwargs.get("batch_size", args[0] if args else None))
        with backends.keeping_variables(self):
            return super().predict(x, *args, **kwargs)

    def _training_data(self, x, y, sample_weight, batch_size):
        from gemma_keras.preprocessor import training_data

        return training_data(self.preprocessor, x, y, sample_weight, batch_size)

    def _check_arrays(self, x, y=None, sample_weight=None, batch_size=None):
        """Inputs held in memory, checked before Keras compiles its step, where
        a bad one gives NaN losses (JAX), a silently wrong result or an error
        from deep in the backend. A stream's batches arrive later and are not
        checked."""
        if not isinstance(x, dict) or not any(hasattr(v, "shape") for v in x.values()):
            return
        keys = {"token_ids", "padding_mask"}
        if set(x) != keys:
            missing, unknown = sorted(keys - set(x)), sorted(set(x) - keys)
            raise ValueError(
                "x must hold exactly 'token_ids' and 'padding_mask' (1 for tokens, 0 for "
                "padding); "
                + (f"missing {missing}" if missing else f"unknown keys {unknown}")
                + "; `model.preprocessor(texts)` makes them from text."
            )
        token_ids = x["token_ids"]
        if not hasattr(token_ids, "shape"):
            return
        shape = tuple(token_ids.shape)
        if len(shape) != 2 or not _is_integer(token_ids):
            raise ValueError(
                "x['token_ids'] must be integer token ids [batch, length]; got "
                f"{keras.backend.standardize_dtype(token_ids.dtype)} of shape {shape}."
            )
        if shape[0] == 0:
            raise ValueError("x['token_ids'] holds 0 examples; give at least one.")
        distribution.check_batches(shape[0], batch_size)
        per_token = {"x['padding_mask']": x.get("padding_mask"), "sample_weight": sample_weight}
        if hasattr(y, "shape") and len(y.shape) == 2:  # not one-hot labels
            per_token["y"] = y
        elif hasattr(y, "shape") and isinstance(
            self.loss, keras.losses.SparseCategoricalCrossentropy
        ):
            raise ValueError(
                f"y has shape {tuple(y.shape)}, but the loss takes token ids: give y as "
                f"ids {shape}, or compile with loss=keras.losses.CategoricalCrossentropy("
                "from_logits=True) for one-hot labels."
            )
        for name, value in per_token.items():
            if hasattr(value, "shape") and tuple(value.shape) != shape:
                raise ValueError(
                    f"{name} has shape {tuple(value.shape)} and x['token_ids'] {shape}: "
                    "give one value per token."
                )
        _check_padding_mask(x["padding_mask"])
        vocabulary_size = self.config.vocabulary_size
        check_token_ids(token_ids, vocabulary_size, what="x['token_ids']: token id")
        if "y" not in per_token:
            return
        if not _is_integer(y):
            raise ValueError(
                f"The labels (y) must be integer token ids; got "
                f"{keras.backend.standardize_dtype(y.dtype)}."
            )
        check_token_ids(
            y,
            vocabulary_size,
            what="The labels (y): label",
            fix="labels are the ids of each position's next token. To leave a position "
            "out of the loss give it a sample_weight of 0, or compile with "
            "loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True, "
            "ignore_class=-100) to skip labels of -100.",
            allowed=getattr(self.loss, "ignore_class", None),
        )

    def _validation_data(self, validation, batch_size):
        if isinstance(validation, tuple) and len(validation) in (2, 3):
            x, y, sample_weight = (*validation, None)[:3]
        else:
            x, y, sample_weight = validation, None, None
        from gemma_keras.preprocessor import PreprocessingError

        try:
            x, y, sample_weight, _ = self._training_data(x, y, sample_weight, None)
        except PreprocessingError as error:
            raise PreprocessingError(f"validation_data: {error}") from None
        self._check_arrays(x, y, sample_weight, batch_size)
        return x if y is None else (x, y, sample_weight)

    def generate(
        self,
        inputs,
        max_new_tokens=None,
        max_length=None,
        sampler=None,
        stop=None,
        seed=None,
        strip_prompt=False,
        return_ids=False,
    ):
        """Continues one prompt or a batch of prompts.

        Args:
            inputs: a string, a list of strings (any lengths), token ids (a list
                of ints) or a list of token-id lists.
            max_new_tokens: new tokens per prompt (default 64).
            max_length: alternatively the total length, prompt included
                (KerasHub's meaning).
            sampler: a name ("greedy", "top_k", "top_p", "random", "beam") or a
                sampler object; defaults to the one given to `compile`
                (greedy unless changed).
            stop: a string or strings that end the continuation (not included).
            seed: makes sampling reproducible, the same on every backend.
            strip_prompt: return only the continuation.
            return_ids: return token ids even for text prompts.

        Returns the prompt followed by its continuation (text for text
        prompts, ids for ids), one per prompt, or one for a single prompt.
        Generation stops at `<eos>`, at `<end_of_turn>` for instruction-tuned
        models and chat prompts, at a stop string, or after the budget.

        >>> model.generate("The capital of France is", max_new_tokens=8)  # doctest: +SKIP
        'The capital of France is the capital of the country of France.'
        """
        from gemma_keras.generation import generate

        return generate(
            self,
            inputs,
            max_new_tokens=max_new_tokens,
            max_length=max_length,
            sampler=sampler,
            stop=stop,
            seed=seed,
            strip_prompt=strip_prompt,
            return_ids=return_ids,
        )

    def stream(
        self, prompt, max_new_tokens=None, max_length=None, sampler=None, stop=None, seed=None
    ):
        """Yields the continuation of `prompt` in text pieces as tokens are produced;
        the pieces joined equal `generate(..., strip_prompt=True)`."""
        from gemma_keras.generation import stream

        return stream(
            self,
            prompt,
            max_new_tokens=max_new_tokens,
            max_length=max_length,
            sampler=sampler,
            stop=stop,
            seed=seed,
        )

    def chat(self, messages, max_new_tokens=256, sampler=None, seed=None):
        """The model's reply to `[{"role", "content"}, ...]`, chat template applied."""
        from gemma_keras.chat_template import apply_chat_template
        from gemma_keras.generation import GenerationError

        prompt = apply_chat_template(messages, add_generation_prompt=True)
        if messages[-1]["role"] in ("model", "assistant"):
            raise GenerationError(
                "chat replies to a user turn, but the last message is the model's; end "
                "`messages` with {'role': 'user', 'content': ...}."
            )
        return self.generate(
            prompt, max_new_tokens=max_new_tokens, sampler=sampler, seed=seed, strip_prompt=True
        )

    def start_chat(self, system=None, max_length=None, sampler=None, seed=None):
        """A `Conversation` that keeps its KV cache between turns."""
        from gemma_keras.conversation import Conversation

        return Conversation(self, system=system, max_length=max_length, sampler=sampler, seed=seed)

    def score(
        self,
        token_ids,
        padding_mask=None,
        scoring_mode="logits",
        layer_intercept_fn=None,
        target_ids=None,
    ):
        """KerasHub's `CausalLM.score`: the logits `[batch, seq, vocabulary]`
        (`scoring_mode="logits"`) or the per-token cross-entropy against
        `target_ids` (`scoring_mode="loss"`) of `token_ids`; see
        `gemma_keras.scoring.score`."""
        from gemma_keras.scoring import score

        return score(
            self,
            token_ids,
            padding_mask=padding_mask,
            scoring_mode=scoring_mode,
            layer_intercept_fn=layer_intercept_fn,
            target_ids=target_ids,
        )

    def perplexity(self, texts, batch_size=8):
        """The perplexity of `texts` (a string or a list of strings) under the
        model; see `gemma_keras.scoring.perplexity`."""
        from gemma_keras.scoring import perplexity

        return perplexity(self, texts, batch_size=batch_size)

    def init_cache(self, batch_size, cache_length):
        return self.backbone.init_cache(batch_size, cache_length)

    def get_config(self):
        return {
            "name": self.name,
            "trainable": self.trainable,
            "backbone": keras.saving.serialize_keras_object(self.backbone),
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["backbone"] = keras.saving.deserialize_keras_object(
            config["backbone"], custom_objects={"GemmaBackbone": GemmaBackbone}
        )
        return cls(**config)


STORED_DTYPES = ("float32", "bfloat16")


def _stored_dtype(dtype, model):
    """The float dtype weights are written in: `dtype`, or the model's variables'
    (float32 for a float16 model)."""
    if dtype is None:
        dtype = model.backbone.dtype_policy.variable_dtype
        dtype = dtype if dtype in STORED_DTYPES else "float32"
    if dtype not in STORED_DTYPES:
        raise ValueError(
            f"Weights are written as one of {STORED_DTYPES}, not {dtype!r}; to store a "
            "quantized model, call `quantize` first and save it with `save_to_preset`."
        )
    return dtype


def _check_folder(directory):
    """A folder to write into: it, or its nearest existing parent, must not be a file."""
    path = os.path.abspath(os.fspath(directory))
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        raise ValueError(f"{path} is a file; give a folder to write the model into.")


def _check_padding_mask(mask):
    """A padding mask is 0 or 1 (integers or booleans), with a token in every row."""
    if not hasattr(mask, "shape") or not backends.is_concrete(mask):
        return
    values = np.asarray(keras.ops.convert_to_numpy(mask))
    if values.dtype != bool and not np.issubdtype(values.dtype, np.integer):
        raise ValueError(
            f"x['padding_mask'] must be integers or booleans, 1 for tokens and 0 for "
            f"padding; got {values.dtype}."
        )
    outside = values[(values != 0) & (values != 1)]
    if outside.size:
        raise ValueError(
            f"x['padding_mask'] holds {outside.flat[0]}; give 1 for tokens and 0 for padding."
        )
    empty = np.flatnonzero(~values.astype(bool).any(axis=-1))
    if empty.size:
        raise ValueError(
            f"x['padding_mask'] row {empty[0]} is all padding; every example needs a token."
        )


def _is_integer(array):
    return "int" in keras.backend.standardize_dtype(array.dtype)


def token_rows_loss(loss):
    """`loss`, or where it is Keras' `SparseCategoricalCrossentropy` over the last
    axis without `ignore_class`, a copy that computes it on the logits as rows
    [tokens, vocabulary] (`cross_entropy_over_rows`): the same values, where
    Keras' PyTorch backend first moves the vocabulary axis of [batch, length,
    vocabulary] logits to the middle, and PyTorch's log-softmax over that strided
    axis took 1.15 s against 0.24 s for 256 tokens of the 270M (forward and
    backward), a third of a LoRA step."""
    keyword_arguments = getattr(loss, "_fn_kwargs", {})  # where Keras keeps `axis`
    if (
        type(loss) is not keras.losses.SparseCategoricalCrossentropy
        or loss.ignore_class is not None
        or keyword_arguments.get("axis") != -1
    ):
        return loss
    rows = keras.losses.SparseCategoricalCrossentropy.from_config(loss.get_config())
    rows.fn = cross_entropy_over_rows
    return rows


def cross_entropy_over_rows(y_true, y_pred, from_logits=False, ignore_class=None, axis=-1):
    """`keras.losses.sparse_categorical_crossentropy` over the last axis of
    `y_pred`, computed on its rows [-1, classes]; shaped as `y_pred[..., 0]`."""
    ops = keras.ops
    labels = ops.reshape(y_true, (-1,))
    logits = ops.reshape(y_pred, (-1, ops.shape(y_pred)[-1]))
    if from_logits and ignore_class is None:
        values = backends.cross_entropy_rows(labels, logits)
    else:
        values = keras.losses.sparse_categorical_crossentropy(
            labels, logits, from_logits=from_logits, ignore_class=ignore_class, axis=-1
        )
    return ops.reshape(values, ops.shape(y_pred)[:-1])
