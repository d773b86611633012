"""Text generation: a prefill over the prompts, then one token at a time with a KV cache.

The loop is plain Python around one compiled step per shape bucket (see
`backends.compile_step`):

    prefill:  step(caches, prompts [batch, prompt_slots], ...) -> last logits
    decode:   step(caches, token [batch, 1], ...)              -> next logits

The logits stay where the step ran: a second small compiled function
(`compiled_reduction`) reduces them to what the sampler needs (see
`samplers.Reduction`), and only that is copied to the host: one token id
per row for greedy decoding, a few candidates per row for top-k and top-p,
the `[batch, vocabulary]` logits only where the sampler needs them all
(temperature alone, beam search) or a top-p row goes past its candidates.

Prompts of a batch are left-padded to a common length so that every row
writes its next token into the same cache slot; padding is masked out of
attention and RoPE positions count real tokens only.

Shapes that compile: the prompt slots are rounded up to a power of two (at
least 16) and the cache length to a power of two (at least 64) holding the
prompt slots plus `max_new_tokens`, capped at the model's
`max_sequence_length`. A new prompt length or `max_new_tokens` therefore
compiles again only when it crosses into a new bucket; a new batch size
compiles too, including the power-of-two sizes a batch shrinks to as its
rows finish.
"""

import dataclasses
import functools

import numpy as np

from gemma_keras import backends
from gemma_keras.backends import dispatch
from gemma_keras.layers.token_embedding import check_token_ids
from gemma_keras.samplers import (
    LOGITS,
    BeamSampler,
    Candidates,
    Reduction,
    Sampler,
    get_sampler,
    is_integer,
    random_generator,
)


class GenerationError(ValueError):
    """A generation request is invalid or does not fit the model."""


def _bucket(length, minimum):
    return max(minimum, 1 << max(0, int(length) - 1).bit_length())


def _step(model, caches, token_ids, key_mask, positions, cache_index):
    """Runs `token_ids` through the model; logits of the last position only (the
    vocabulary projection of every prompt position would cost more than the
    whole prefill)."""
    hidden, caches = model.backbone.call_with_cache(
        token_ids, key_mask, positions, caches, cache_index
    )
    logits = model.backbone.token_embedding(hidden[:, -1:, :], reverse=True)
    return logits[:, 0, :], caches


def compiled_step(model):
    """The model's compiled `step(caches, token_ids, key_mask, positions,
    cache_index=None)`, built once per model and again when its variables
    change (LoRA enabled, merged or loaded) or LoRA is switched on. Without
    `cache_index` the caches are empty (a prefill), and the prompt attends
    to itself only, not to every slot of a cache sized for what follows."""
    key = tuple(id(variable) for variable in model.variables)
    compiled = getattr(model, "_compiled_step", None)
    if compiled is None or compiled[0] != key:
        first = backends.compile_step(
            model, lambda caches, *inputs: _step(model, caches, *inputs, None)
        )
        later = backends.compile_step(model, lambda *args: _step(model, *args))

        def step(caches, token_ids, key_mask, positions, cache_index=None):
            if cache_index is None:
                return first(caches, token_ids, key_mask, positions)
            return later(caches, token_ids, key_mask, positions, cache_index)

        model._compiled_step = compiled = (key, step)
    return compiled[1]


def _reduce(logits, reduction, decodable):
    """What the host needs of a step's `logits` [batch, vocabulary] for
    `reduction` (see `samplers.Reduction`): a tuple of tensors, computed where
    the logits are. Ids from `decodable` on (Gemma 3 4B+ has 64 image tokens
    beyond its text vocabulary) are never chosen."""
    from keras import ops

    logits = ops.cast(logits, "float32")
    width = logits.shape[-1]
    ids = ops.arange(width, dtype="int32")
    if decodable < width:
        logits = ops.where(ids < decodable, logits, -np.inf)
    if reduction.kind == "argmax":
        # The lowest id among the largest logits, as numpy's argmax: TensorFlow's
        # may return any of them, and XLA's runs slower on a CPU than this.
        largest = ops.max(logits, axis=-1, keepdims=True)
        return (ops.min(ops.where(logits == largest, ids, width - 1), axis=-1),)
    if reduction.kind == "logits":
        return (logits,)
    values, top_ids = ops.top_k(logits, reduction.count, sorted=False)
    outputs = (values, ops.cast(top_ids, "int32"))
    if reduction.temperature is not None:
        least = ops.min(values, axis=-1, keepdims=True)
        remainder = ops.where(logits <= least, logits / reduction.temperature, -np.inf)
        outputs += (ops.logsumexp(remainder, axis=-1),)
    return outputs


@functools.cache
def compiled_reduction(reduction, decodable):
    """`_reduce` for `reduction` and `decodable`, compiled on its own (see
    `backends.compile_function`): the model's step stays one per shape
    whichever sampler reads its logits, and the logits stay on the device."""
    return backends.compile_function(
        functools.partial(_reduce, reduction=reduction, decodable=decodable)
    )


def decodable_ids(model):
    """How many ids a step may choose: the model's vocabulary, or its
    tokenizer's where that is smaller."""
    if model.tokenizer is None:
        return model.config.vocabulary_size
    return min(model.config.vocabulary_size, model.tokenizer.vocabulary_size)


class StepResult:
    """A step's logits, left where the step ran, and what a sampler needs of
    them (see `samplers.Reduction`) copied to the host. The full logits are
    copied only if asked for (a sampler that needs every token, beam search),
    a row's when the candidates cannot decide it (a top-p row past them).
    `host_bytes` counts what has been copied to the host so far."""

    def __init__(self, logits, reduction, decodable):
        self.host_bytes = 0
        self._device_logits, self._decodable = logits, decodable
        self._logits = self._token_ids = self._candidates = None
        # What runs where the logits are (see `dispatch.choose_reduction`).
        if dispatch.choose_reduction(backends.platform(logits), reduction.kind) == "logits":
            reduction = LOGITS
        self.reduction = reduction
        outputs = compiled_reduction(reduction, decodable)(logits)
        if reduction.kind == "argmax":
            self._token_ids = self._fetch(outputs[0])
        elif reduction.kind == "logits":
            self._logits = self._fetch(outputs[0])
        else:
            values, ids = self._fetch(outputs[0]), self._fetch(outputs[1])
            remainder = self._fetch(outputs[2]) if len(outputs) > 2 else None
            self._candidates = Candidates(values, ids, logits.shape[-1], remainder)

    def _fetch(self, tensor):
        from keras import ops

        array = np.asarray(ops.convert_to_numpy(tensor))
        self.host_bytes += array.nbytes
        return array

    def logits(self, rows=None):
        """The float32 logits [batch, vocabulary], or those of `rows` only,
        undecodable ids at -inf."""
        if self._logits is not None:
            return self._logits if rows is None else self._logits[rows]
        logits = self._device_logits
        if rows is not None:  # only these rows come to the host
            from keras import ops

            logits = ops.take(logits, np.asarray(rows, np.int32), axis=0)
        (logits,) = compiled_reduction(LOGITS, self._decodable)(logits)
        if rows is not None:
            return self._fetch(logits)
        self._logits = self._fetch(logits)
        return self._logits

    def token_ids(self):
        """Each row's most likely token (the lowest id among ties)."""
        if self._token_ids is None:
            self._token_ids = np.argmax(self.logits(), axis=-1)
        return self._token_ids

    def candidates(self):
        """`samplers.Candidates` for sampling: the step's, or every token."""
        if self._candidates is None:
            self._candidates = Candidates.from_logits(self.logits())
        return self._candidates

    def next_tokens(self, sampler, uniforms):
        """`sampler`'s tokens [batch] with one uniform number per row (none for greedy)."""
        if sampler.is_greedy:
            return self.token_ids()
        return sampler.sample(self.candidates(), uniforms, self.logits)


@dataclasses.dataclass
class DecodeState:
    """A batch being decoded: its KV caches and which cache slots hold real tokens."""

    caches: list
    key_mask: np.ndarray  # [batch, cache_length] int32
    lengths: np.ndarray  # [batch] real tokens per row so far (the next RoPE position)
    next_slot: int  # cache slot the next token goes to (the same for every row)
    # The model's compiled step, looked up once per prefill: checking the
    # model's variables walks every layer, too slow for each decode step.
    step: object = None
    # What the steps' results copy to the host, for ids below `decodable`.
    reduction: Reduction = LOGITS
    decodable: int = None

    def reduce_for(self, model, sampler):
        """Makes the next steps' results hold what `sampler` needs (see
        `samplers.Reduction`); with `sampler=None`, the full logits."""
        self.reduction = LOGITS
        if sampler is not None:
            self.reduction = sampler.reduction(model.config.vocabulary_size)

    @property
    def cache_length(self):
        return self.key_mask.shape[1]

    def select(self, rows):
        """Keeps `rows` of the batch, in that order (a row may repeat)."""
        from keras import ops

        rows = np.asarray(rows, np.int32)
        self.caches = [
            (ops.take(key, rows, axis=0), ops.take(value, rows, axis=0))
            for key, value in self.caches
        ]
        self.key_mask = self.key_mask[rows]
        self.lengths = self.lengths[rows]


def plan_lengths(model, prompt_lengths, max_new_tokens):
    """`(prompt_slots, cache_length)` for a batch; raises if it does not fit."""
    limit = model.config.max_sequence_length
    longest = max(prompt_lengths)
    if longest + max_new_tokens > limit:
        if max_new_tokens < limit:
            fix = (
                f"Shorten the prompt to at most {limit - max_new_tokens} tokens or ask for "
                "fewer new tokens"
            )
        else:  # no prompt is short enough
            fix = f"Ask for at most {limit - longest} new tokens"
        raise GenerationError(
            f"The prompt is {longest} tokens; with max_new_tokens={max_new_tokens} that is "
            f"{longest + max_new_tokens} tokens, more than the model's context of {limit}. "
            f"{fix} (nothing is truncated silently)."
        )
    cache_length = min(_bucket(_bucket(longest, 16) + max_new_tokens, 64), limit)
    prompt_slots = min(_bucket(longest, 16), cache_length - max_new_tokens)
    return prompt_slots, cache_length


def prefill(model, prompts, max_new_tokens, sampler=None):
    """Runs the prompts (lists of ids) through the model: `(StepResult, state)`.

    The result (and those of `extend` on the state) holds what `sampler`
    needs; without one, the full logits."""
    prompt_slots, cache_length = plan_lengths(model, [len(p) for p in prompts], max_new_tokens)
    batch = len(prompts)
    token_ids = np.zeros((batch, prompt_slots), np.int32)
    key_mask = np.zeros((batch, cache_length), np.int32)
    positions = np.zeros((batch, prompt_slots), np.int32)
    for row, prompt in enumerate(prompts):
        start = prompt_slots - len(prompt)
        token_ids[row, start:] = prompt
        key_mask[row, start:prompt_slots] = 1
        positions[row, start:] = np.arange(len(prompt))
    state = DecodeState(
        model.init_cache(batch, cache_length),
        key_mask,
        np.array([len(p) for p in prompts], np.int32),
        prompt_slots,
        compiled_step(model),
        decodable=decodable_ids(model),
    )
    state.reduce_for(model, sampler)
    logits, state.caches = state.step(state.caches, token_ids, key_mask, positions)
    return StepResult(logits, state.reduction, state.decodable), state


def extend(model, state, token_ids):
    """Appends `token_ids` [batch, n] to every row: the `StepResult` of the last one.

    n > 1 (a chat follow-up) is fed in power-of-two chunks, so any length
    compiles at most log2(n) step shapes.
    """
    token_ids = np.asarray(token_ids, np.int32)
    if state.next_slot + token_ids.shape[1] > state.cache_length:
        raise GenerationError(
            f"The cache holds {state.cache_length} tokens and is full "
            f"({state.next_slot} used, {token_ids.shape[1]} more asked)."
        )
    while token_ids.shape[1]:
        chunk = 1 << (token_ids.shape[1].bit_length() - 1)
        result = _extend_chunk(state, token_ids[:, :chunk])
        token_ids = token_ids[:, chunk:]
    return result


def _extend_chunk(state, token_ids):
    count = token_ids.shape[1]
    state.key_mask[:, state.next_slot : state.next_slot + count] = 1
    positions = state.lengths[:, None] + np.arange(count, dtype=np.int32)[None, :]
    logits, state.caches = state.step(
        state.caches, token_ids, state.key_mask, positions, np.int32(state.next_slot)
    )
    state.next_slot += count
    state.lengths += count
    return StepResult(logits, state.reduction, state.decodable)


def normalize_inputs(model, inputs):
    """`(list of id lists, was_single, were_strings)` from a string, strings, or ids."""
    if isinstance(inputs, str):
        return normalize_inputs(model, [inputs])[0], True, True
    if isinstance(inputs, np.ndarray):
        inputs = inputs.tolist()
    if not isinstance(inputs, (list, tuple)) or len(inputs) == 0:
        raise GenerationError(
            "generate expects a string, a list of strings, or token ids (a list of ints or "
            f"a list of lists); got {type(inputs).__name__} {inputs!r:.80}."
        )
    if all(is_integer(item) for item in inputs):
        return normalize_inputs(model, [list(inputs)])[0], True, False
    kinds = {
        str
        if isinstance(item, str)
        else list
        if isinstance(item, (list, tuple, np.ndarray))
        else type(item)
        for item in inputs
    }
    if kinds == {str}:
        if model.tokenizer is None:
            raise GenerationError("This model has no tokenizer; pass token ids instead of text.")
        for index, text in enumerate(inputs):
            if not text:
                raise GenerationError(f"Prompt {index} is empty; give at least one character.")
        prompts = [model.tokenizer.encode(text) for text in inputs]
        # A tokenizer with more pieces than the model's vocabulary was given by mistake.
        check_token_ids(np.concatenate(prompts), model.config.vocabulary_size)
        return prompts, False, True
    if kinds == {list}:
        for index, prompt in enumerate(inputs):
            if len(prompt) == 0:
                raise GenerationError(f"Prompt {index} has no token ids.")
            for position, item in enumerate(prompt):
                if not is_integer(item):
                    raise GenerationError(
                        f"Prompt {index} has {item!r} at position {position}; token ids are "
                        "integers (encode text with model.tokenizer, or pass the text itself)."
                    )
        prompts = [[int(i) for i in item] for item in inputs]
        check_token_ids(
            np.concatenate([np.asarray(p) for p in prompts]), model.config.vocabulary_size
        )
        return prompts, False, False
    got = sorted(k.__name__ for k in kinds)
    raise GenerationError(
        "generate takes strings, token ids (integers) or lists of token ids, "
        + (f"not a mix (got {got})." if len(got) > 1 else f"got {got[0]} items.")
    )


def stop_token_ids(model, prompts):
    """`<eos>` always; `<end_of_turn>` for instruction-tuned models or chat prompts."""
    stops = {1}
    tokenizer = model.tokenizer
    if tokenizer is not None:
        stops = {tokenizer.eos_id}
        turn_end, turn_start = tokenizer.end_of_turn_id, tokenizer.start_of_turn_id
        is_chat = getattr(model, "instruction_tuned", False) or any(
            turn_start in prompt for prompt in prompts
        )
        if turn_end is not None and is_chat:
            stops.add(turn_end)
    return stops


def check_token_count(value, name):
    """`value` as a positive int, or a `GenerationError` naming `name`."""
    if not is_integer(value):
        raise GenerationError(f"{name} must be an integer, got {value!r}.")
    if value <= 0:
        raise GenerationError(f"{name} must be at least 1, got {value}.")
    return int(value)


def new_token_budgets(prompts, max_new_tokens, max_length):
    """Per-row number of new tokens: `max_new_tokens`, or `max_length` minus the prompt."""
    if max_new_tokens is not None and max_length is not None:
        raise GenerationError("Give max_new_tokens or max_length (total length), not both.")
    if max_length is None:
        max_new_tokens = 64 if max_new_tokens is None else max_new_tokens
        return [check_token_count(max_new_tokens, "max_new_tokens")] * len(prompts)
    max_length = check_token_count(max_length, "max_length")
    for index, prompt in enumerate(prompts):
        if len(prompt) >= max_length:
            raise GenerationError(
                f"Prompt {index} is {len(prompt)} tokens, which leaves nothing to generate "
                f"within max_length={max_length} (max_length counts the prompt)."
            )
    return [max_length - len(prompt) for prompt in prompts]


class _StopStrings:
    """Finds user stop strings in each row's decoded continuation."""

    def __init__(self, stop, tokenizer):
        if stop is None:
            stop = []
        elif isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, (list, tuple, set, frozenset)) or any(
            not isinstance(s, str) or not s for s in stop
        ):
            raise GenerationError(
                f"stop must be a string or a list of non-empty strings: {stop!r}."
            )
        if stop and tokenizer is None:
            raise GenerationError("Stop strings need a tokenizer; this model has none.")
        self.strings = list(stop)
        self.tokenizer = tokenizer

    def cut(self, token_ids):
        """`(text cut before the earliest stop string, found)`; without stop
        strings, the whole decoded text."""
        text = self.tokenizer.decode(token_ids)
        positions = [text.find(s) for s in self.strings]
        found = [p for p in positions if p >= 0]
        return (text[: min(found)], True) if found else (text, False)


def decode_loop(model, result, state, budgets, sampler, stops, stop_strings, rng):
    """Samples from `result` (the `StepResult` of a prefill or an extend),
    feeds the tokens back, and repeats. Yields after each step each row's new
    token ids so far (stop tokens excluded) and which rows are finished.

    A finished row is fed padding while the rest of its batch runs on; once
    the unfinished rows fit a power-of-two batch of at most half the size,
    the batch is cut down to it (`_drop_finished_rows`), so finished rows
    stop costing work.
    """
    batch = len(budgets)
    generated = [[] for _ in range(batch)]
    finished = np.zeros(batch, bool)
    rows = np.arange(batch)  # the request row of each row of `state` and `result`
    pad = model.tokenizer.pad_id if model.tokenizer is not None else 0
    state.reduce_for(model, sampler)
    while True:
        # One uniform number per request row (as `Sampler.__call__` draws), so
        # that a row draws the same numbers however early the others finish.
        uniforms = None if sampler.is_greedy else rng.random(batch)[rows]
        tokens = np.full(batch, pad, np.int64)
        tokens[rows] = result.next_tokens(sampler, uniforms)
        for row in range(batch):
            if finished[row]:
                continue
            token = int(tokens[row])
            if token in stops:
                finished[row] = True
                continue
            generated[row].append(token)
            if len(generated[row]) >= budgets[row]:
                finished[row] = True
            elif stop_strings.strings and stop_strings.cut(generated[row])[1]:
                finished[row] = True
        yield generated, finished
        if finished.all():
            return
        rows = _drop_finished_rows(state, rows, finished)
        tokens = np.where(finished[rows], pad, tokens[rows]).astype(np.int32)
        result = extend(model, state, tokens[:, None])


def _drop_finished_rows(state, rows, finished):
    """Cuts `state` down to the smallest power-of-two batch that holds its
    unfinished rows (topped up with finished ones), when that at least halves
    it: the returned `rows` say which request row each row of it is. Each cut
    saves at least half of the work for the compile of one more decode step,
    and a batch of n compiles at most log2(n) of them."""
    unfinished = int((~finished[rows]).sum())
    size = _bucket(unfinished, 1)
    if size > len(rows) // 2:
        return rows
    # Every unfinished row, topped up with finished ones, in request order.
    keep = np.sort(np.argsort(finished[rows])[:size])
    state.select(keep)
    return rows[keep]


def sample_loop(model, prompts, budgets, sampler, stops, stop_strings, seed):
    """`decode_loop` over freshly prefilled prompts."""
    rng = random_generator(seed)
    result, state = prefill(model, prompts, max(budgets), sampler)
    yield from decode_loop(model, result, state, budgets, sampler, stops, stop_strings, rng)


def beam_search(model, prompts, budgets, beam, stops):
    """Beam search: per prompt, the continuation with the highest total log-probability."""
    width = beam.num_beams
    expanded = [prompt for prompt in prompts for _ in range(width)]
    result, state = prefill(model, expanded, max(budgets))
    logits = result.logits()
    batch, vocabulary = len(prompts), logits.shape[-1]
    scores = np.tile(np.array([0.0] + [-np.inf] * (width - 1)), (batch, 1))
    beams = [[[] for _ in range(width)] for _ in range(batch)]
    done = np.zeros((batch, width), bool)
    pad = model.tokenizer.pad_id if model.tokenizer is not None else 0
    for _ in range(max(budgets)):
        log_probs = (
            logits
            - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
            - logits.max(-1, keepdims=True)
        )
        log_probs = log_probs.reshape(batch, width, vocabulary)
        # A finished beam continues only with padding, at no cost.
        log_probs = np.where(done[:, :, None], -np.inf, log_probs)
        log_probs[:, :, pad] = np.where(done, 0.0, log_probs[:, :, pad])
        candidates = (scores[:, :, None] + log_probs).reshape(batch, -1)
        best = np.argsort(-candidates, axis=-1, kind="stable")[:, :width]
        parents, tokens = best // vocabulary, best % vocabulary
        scores = np.take_along_axis(candidates, best, axis=-1)
        new_beams, new_done = [], np.zeros_like(done)
        for row in range(batch):
            row_beams = []
            for slot in range(width):
                parent, token = parents[row, slot], int(tokens[row, slot])
                sequence = list(beams[row][parent])
                finished = bool(done[row, parent])
                if not finished:
                    if token in stops:
                        finished = True
                    else:
                        sequence.append(token)
                        finished = len(sequence) >= budgets[row]
                row_beams.append(sequence)
                new_done[row, slot] = finished
            new_beams.append(row_beams)
        beams, done = new_beams, new_done
        if done.all():
            break
        order = (np.arange(batch)[:, None] * width + parents).reshape(-1)
        state.select(order)
        feed = np.where(done.reshape(-1), pad, tokens.reshape(-1)).astype(np.int32)
        logits = extend(model, state, feed[:, None]).logits()
    best_beam = np.argmax(scores, axis=-1)
    return [beams[row][best_beam[row]] for row in range(batch)]


def generate(
    model,
    inputs,
    max_new_tokens=None,
    max_length=None,
    sampler=None,
    stop=None,
    seed=None,
    strip_prompt=False,
    return_ids=False,
):
    """See `GemmaCausalLM.generate`."""
    prompts, single, were_strings = normalize_inputs(model, inputs)
    texts = [inputs] if single else list(inputs)
    budgets = new_token_budgets(prompts, max_new_tokens, max_length)
    sampler = get_sampler(sampler if sampler is not None else getattr(model, "sampler", "greedy"))
    stop_strings = _StopStrings(stop, model.tokenizer)
    stops = stop_token_ids(model, prompts)
    if isinstance(sampler, BeamSampler):
        if stop_strings.strings:
            raise GenerationError("Stop strings are not supported with beam search.")
        random_generator(seed)  # checks `seed`, which beam search (deterministic) leaves unused
        generated = beam_search(model, prompts, budgets, sampler, stops)
    else:
        for step in sample_loop(model, prompts, budgets, sampler, stops, stop_strings, seed):
            generated = step[0]
    results = []
    for index, new_ids in enumerate(generated):
        if were_strings and not return_ids:
            text = stop_strings.cut(new_ids)[0]
            results.append(text if strip_prompt else texts[index] + text)
        else:
            results.append(new_ids if strip_prompt else prompts[index] + new_ids)
    return results[0] if single else results


def stream(model, prompt, max_new_tokens=None, max_length=None, sampler=None, stop=None, seed=None):
    """Yields the continuation of one text prompt in pieces as tokens are produced.

    A piece is emitted only once it is final: bytes of a multi-byte character
    split across tokens are held back until the character is complete, and
    text that may be the start of a stop string until it is not.
    """
    if not isinstance(prompt, str):
        raise GenerationError("stream takes one text prompt.")
    prompts, _, _ = normalize_inputs(model, prompt)
    budgets = new_token_budgets(prompts, max_new_tokens, max_length)
    sampler = get_sampler(sampler if sampler is not None else getattr(model, "sampler", "greedy"))
    if isinstance(sampler, BeamSampler):
        raise GenerationError("Streaming works with sampling samplers, not beam search.")
    stop_strings = _StopStrings(stop, model.tokenizer)
    stops = stop_token_ids(model, prompts)
    emitted = ""
    for generated, finished in sample_loop(
        model, prompts, budgets, sampler, stops, stop_strings, seed
    ):
        text = stop_strings.cut(generated[0])[0]
        if not finished[0]:
            text = _stable_prefix(text, stop_strings.strings)
        if len(text) > len(emitted) and text.startswith(emitted):
            yield text[len(emitted) :]
            emitted = text


def _stable_prefix(text, stop_strings):
    """The part of `text` that later tokens cannot change."""
    # An incomplete UTF-8 sequence decodes to U+FFFD at the end; wait for the rest.
    end = len(text)
    while end > 0 and text[end - 1] == "\ufffd":
        end -= 1
    text = text[:end]
    for stop in stop_strings:
        for size in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:size]):
                text = text[: len(text) - size]
                break
    return text


__all__ = ["GenerationError", "Sampler", "generate", "stream"]
