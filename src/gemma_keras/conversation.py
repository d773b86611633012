"""A multi-turn chat that keeps its KV cache, so a follow-up processes only the new turn."""

import numpy as np

from gemma_keras.chat_template import apply_chat_template
from gemma_keras.generation import (
    GenerationError,
    _StopStrings,
    check_token_count,
    decode_loop,
    extend,
    prefill,
    stop_token_ids,
)
from gemma_keras.layers.token_embedding import check_token_ids
from gemma_keras.samplers import BeamSampler, get_sampler, random_generator


class Conversation:
    """Chat with the model turn by turn.

    The first turn is prefilled from the chat template; each later turn
    appends only `<end_of_turn>\\n<start_of_turn>user\\n{text}<end_of_turn>\\n
    <start_of_turn>model\\n` to the cache (the model's `<end_of_turn>` that
    ended its reply is sampled but never fed, so it opens the next turn's
    text). The result equals running the whole conversation from scratch.

    >>> chat = model.start_chat()  # doctest: +SKIP
    >>> chat.send("Name a French city.")  # doctest: +SKIP
    'Paris'
    >>> chat.send("And another?")  # doctest: +SKIP
    """

    def __init__(self, model, system=None, max_length=None, sampler=None, seed=None):
        if model.tokenizer is None or model.tokenizer.start_of_turn_id is None:
            raise GenerationError("Chat needs a tokenizer with <start_of_turn>/<end_of_turn>.")
        if system is not None and (not isinstance(system, str) or not system.strip()):
            raise GenerationError(f"system must be a non-empty string or None, got {system!r}.")
        self.model = model
        self.system = system
        context = model.config.max_sequence_length
        self.max_length = check_token_count(
            min(context, 4096) if max_length is None else max_length, "max_length"
        )
        if self.max_length > context:
            raise GenerationError(
                f"max_length={self.max_length} exceeds the model's context of {context} tokens."
            )
        self.sampler = get_sampler(sampler if sampler is not None else model.sampler)
        if isinstance(self.sampler, BeamSampler):
            raise GenerationError("Chat samples token by token; beam search is not supported.")
        self.seed = seed
        self.reset()

    def reset(self):
        """Forgets the conversation (the cache is rebuilt at the next turn)."""
        self.messages = []
        self.token_ids = []  # every token in the cache, in order
        self.reply_ids = []  # the token ids of the last reply
        self._state = None
        self._rng = random_generator(self.seed)

    def send(self, text, max_new_tokens=256):
        """Adds a user turn and returns the model's reply."""
        if not isinstance(text, str) or not text.strip():
            raise GenerationError("A chat message must be a non-empty string.")
        max_new_tokens = check_token_count(max_new_tokens, "max_new_tokens")
        tokenizer = self.model.tokenizer
        if self._state is None:
            messages = [{"role": "system", "content": self.system}] if self.system else []
            messages.append({"role": "user", "content": text})
            turn = tokenizer.encode(apply_chat_template(messages))
            budget = self.max_length - len(turn)
            if budget < max_new_tokens:
                raise GenerationError(
                    f"The first turn is {len(turn)} tokens; with max_new_tokens={max_new_tokens} "
                    f"it exceeds this conversation's max_length={self.max_length}."
                )
            check_token_ids(np.asarray(turn), self.model.config.vocabulary_size)
            logits, self._state = prefill(self.model, [turn], budget)
        else:
            turn = tokenizer.encode(
                apply_chat_template([{"role": "user", "content": text}])[len("<bos>") :],
                add_bos=False,
            )
            turn = [tokenizer.end_of_turn_id] + tokenizer.encode("\n", add_bos=False) + turn
            # The cache may hold more slots than max_length (its length is bucketed).
            free = min(self._state.cache_length, self.max_length) - self._state.next_slot
            if len(turn) + max_new_tokens > free:
                raise GenerationError(
                    f"This turn ({len(turn)} tokens) plus max_new_tokens={max_new_tokens} does "
                    f"not fit the {free} free tokens of the conversation "
                    f"(max_length={self.max_length}); call reset() or start a chat with a "
                    "larger max_length."
                )
            check_token_ids(np.asarray(turn), self.model.config.vocabulary_size)
            logits = extend(self.model, self._state, np.array([turn]))
        self.token_ids += turn
        stops = stop_token_ids(self.model, [turn])
        reply = []
        for generated, _ in decode_loop(
            self.model,
            logits,
            self._state,
            [max_new_tokens],
            self.sampler,
            stops,
            _StopStrings(None, tokenizer),
            self._rng,
        ):
            reply = generated[0]
        # A reply that ended on a stop token has had every token fed back; one
        # that used its whole budget ended before its last token was fed.
        if len(reply) == max_new_tokens:
            extend(self.model, self._state, np.array([reply[-1:]]))
        self.token_ids += reply
        self.reply_ids = reply
        reply_text = tokenizer.decode(reply)
        self.messages += [
            {"role": "user", "content": text},
            {"role": "model", "content": reply_text},
        ]
        return reply_text
