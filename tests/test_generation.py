"""generate / stream / chat on tiny random models with a real SentencePiece tokenizer."""

import dataclasses

import keras
import numpy as np
import pytest

from conftest import randomize, tiny_config
from gemma_keras import GemmaCausalLM, GemmaTokenizer, GenerationError, generation, samplers
from gemma_keras.backends import dispatch
from gemma_keras.checkpoints.weight_mapping import assign_weights, model_shapes
from gemma_keras.layers.token_embedding import TokenIdError
from gemma_keras.samplers import ARGMAX, LOGITS, Sampler, SamplerError

PROMPTS = ["The capital of", "def add(a, b):\n    return", "Numbers like 12345 and"]


def make_model(variant, tokenizer_proto, seed=0, dtype="float32"):
    tokenizer = GemmaTokenizer(tokenizer_proto)
    config = dataclasses.replace(tiny_config(variant), vocabulary_size=tokenizer.vocabulary_size)
    model = GemmaCausalLM.from_gemma_config(config, dtype=dtype)
    # Larger weights than usual make the random model's choices decisive.
    weights = {k: v * 3 for k, v in randomize(model_shapes(model), seed).items()}
    assign_weights(model, weights)
    model.tokenizer = tokenizer
    return model


@pytest.fixture(scope="module", params=["gemma1_mqa", "gemma2", "gemma3"])
def model(request, tokenizer_proto):
    return make_model(request.param, tokenizer_proto)


def argmax_loop(model, prompts, steps, forward=None):
    """The reference: the uncached forward pass (`forward`, by default the
    model), argmax at each row's last position, repeated. Rows are right-padded
    to one fixed width (causal attention makes the padding invisible), so every
    call has the same shape."""
    forward = forward or model
    sequences = [list(p) for p in prompts]
    done = [False] * len(prompts)
    width = max(map(len, prompts)) + steps
    for _ in range(steps):
        token_ids = np.zeros((len(prompts), width), "int32")
        for row, sequence in enumerate(sequences):
            token_ids[row, : len(sequence)] = sequence
        inputs = {"token_ids": token_ids, "padding_mask": (token_ids != 0).astype("int32")}
        logits = keras.ops.convert_to_numpy(forward(inputs))
        for row, sequence in enumerate(sequences):
            token = int(logits[row, len(sequence) - 1].argmax())
            done[row] = done[row] or token == model.tokenizer.eos_id
            if not done[row]:
                sequence.append(token)
    return sequences


def test_greedy_equals_uncached_argmax_for_a_ragged_batch(model):
    prompts = [model.tokenizer.encode(p) for p in PROMPTS]
    outputs = model.generate(prompts, max_new_tokens=12)
    assert outputs == argmax_loop(model, prompts, 12)
    # A single prompt gives the same as its row in the batch.
    assert model.generate(prompts[1], max_new_tokens=12) == outputs[1]


def test_finished_rows_leave_the_batch(model):
    """With `max_length`, shorter prompts get longer budgets, so rows finish at
    different steps; the batch shrinks to the unfinished rows, and every row's
    tokens stay those it gets in a batch that never shrinks."""
    prompts = [model.tokenizer.encode(p) for p in PROMPTS]
    assert len(set(map(len, prompts))) == len(prompts)
    max_length = max(map(len, prompts)) + 6
    budgets = [max_length - len(p) for p in prompts]
    step = generation.compiled_step(model)
    batch_sizes = []

    def recording_step(caches, token_ids, *inputs):
        batch_sizes.append(token_ids.shape[0])
        return step(caches, token_ids, *inputs)

    saved = model._compiled_step
    model._compiled_step = (saved[0], recording_step)
    try:
        greedy = model.generate(prompts, max_length=max_length)
        sampled = model.generate(prompts, max_length=max_length, sampler="top_k", seed=5)
    finally:
        model._compiled_step = saved
    assert greedy == [argmax_loop(model, [p], n)[0] for p, n in zip(prompts, budgets, strict=True)]
    # A batch is cut only when that at least halves it: 3 rows go straight to 1.
    assert batch_sizes[0] == 3 and batch_sizes[-1] == 1 and set(batch_sizes) == {1, 3}
    unshrunk = model.generate(prompts, max_new_tokens=max(budgets), sampler="top_k", seed=5)
    for row, prompt in enumerate(prompts):
        assert sampled[row] == unshrunk[row][: len(prompt) + budgets[row]]


def test_text_in_text_out(model):
    text = model.generate(PROMPTS[0], max_new_tokens=8)
    ids = model.generate(PROMPTS[0], max_new_tokens=8, return_ids=True)
    assert text == PROMPTS[0] + model.tokenizer.decode(
        ids[len(model.tokenizer.encode(PROMPTS[0])) :]
    )
    continuation = model.generate(PROMPTS[0], max_new_tokens=8, strip_prompt=True)
    assert text == PROMPTS[0] + continuation
    assert model.generate(PROMPTS, max_new_tokens=8)[0] == text


def test_max_length_counts_the_prompt(model):
    prompt = model.tokenizer.encode(PROMPTS[0])
    output = model.generate(prompt, max_length=len(prompt) + 5)
    assert len(output) <= len(prompt) + 5
    assert output == model.generate(prompt, max_new_tokens=5)


def test_seeded_sampling_is_reproducible(model):
    kwargs = dict(max_new_tokens=10, sampler="top_k", seed=7)
    first = model.generate(PROMPTS, **kwargs)
    assert model.generate(PROMPTS, **kwargs) == first
    others = {
        tuple(model.generate(PROMPTS[0], max_new_tokens=10, sampler="random", seed=s))
        for s in range(4)
    }
    assert len(others) > 1


def test_compile_sets_the_default_sampler(tokenizer_proto):
    model = make_model("gemma1_mqa", tokenizer_proto)
    model.compile(sampler="top_p")
    sampled = model.generate(PROMPTS[0], max_new_tokens=6, seed=1)
    assert sampled == model.generate(PROMPTS[0], max_new_tokens=6, seed=1, sampler="top_p")
    # A compile that Keras refuses changes nothing.
    with pytest.raises(TypeError, match="'k'"):
        model.compile(sampler="top_k", k=3)
    assert model.sampler.top_p is not None and model.sampler.top_k is None


def test_stream_concatenates_to_generate(model):
    pieces = list(model.stream(PROMPTS[2], max_new_tokens=15))
    assert "".join(pieces) == model.generate(PROMPTS[2], max_new_tokens=15, strip_prompt=True)


def test_stop_strings_end_the_continuation(model):
    full = model.generate(PROMPTS[0], max_new_tokens=15, strip_prompt=True)
    if len(full) < 4:
        pytest.skip("continuation too short to pick a stop string")
    stop = full[2:4]
    cut = model.generate(PROMPTS[0], max_new_tokens=15, strip_prompt=True, stop=[stop, "@@@"])
    assert cut == full[: full.find(stop)]
    assert "".join(model.stream(PROMPTS[0], max_new_tokens=15, stop=stop)) == cut


def test_instruction_tuned_models_stop_at_end_of_turn(tokenizer_proto):
    model = make_model("gemma1_mqa", tokenizer_proto)
    prompt = model.tokenizer.encode(PROMPTS[0])
    first = model.generate(prompt, max_new_tokens=1)[-1]
    end_of_turn = model.tokenizer.end_of_turn_id
    assert first != end_of_turn and end_of_turn not in prompt and first not in prompt
    # Swap the two tokens' embedding rows: <end_of_turn> becomes the greedy choice.
    embedding = model.backbone.token_embedding.embeddings
    rows = keras.ops.convert_to_numpy(embedding).copy()
    rows[[first, end_of_turn]] = rows[[end_of_turn, first]]
    embedding.assign(rows)
    assert model.generate(prompt, max_new_tokens=3)[len(prompt)] == end_of_turn  # base model
    model.instruction_tuned = True
    assert model.generate(prompt, max_new_tokens=3) == prompt


@pytest.mark.parametrize("opening", ["Hello there!", "Hi"])  # first turns padded differently
def test_chat_with_cache_equals_running_from_scratch(model, opening):
    chat = model.start_chat()
    chat.send("Something to forget.", max_new_tokens=3)
    chat.reset()  # a reset conversation starts afresh
    first = chat.send(opening, max_new_tokens=6)
    second = chat.send("And now?", max_new_tokens=6)
    assert chat.messages[1]["content"] == first and chat.messages[3]["content"] == second
    # The cached conversation equals generating from the whole transcript at once.
    history = chat.token_ids[: len(chat.token_ids) - len(chat.reply_ids)]
    scratch = model.generate(history, max_new_tokens=6, strip_prompt=True)
    assert scratch == chat.reply_ids and model.tokenizer.decode(scratch) == second
    # The second turn was appended with the chat template's markup.
    assert model.tokenizer.decode(history) == (
        f"<start_of_turn>user\n{opening}<end_of_turn>\n<start_of_turn>model\n"
        f"{first}<end_of_turn>\n<start_of_turn>user\nAnd now?<end_of_turn>\n"
        "<start_of_turn>model\n"
    )


def test_max_length_takes_numpy_integers(tokenizer_proto):
    model = make_model("gemma1_mqa", tokenizer_proto)
    assert len(model.generate([2, 5, 6], max_length=np.int64(7))) == 7


def test_bad_chat_requests(tokenizer_proto):
    model = make_model("gemma1_mqa", tokenizer_proto)
    chat = model.start_chat()
    for text in ["", "  ", 5]:
        with pytest.raises(GenerationError, match="non-empty string"):
            chat.send(text)
    for budget in [0, -1]:
        with pytest.raises(GenerationError, match="max_new_tokens must be at least 1"):
            chat.send("Hi", max_new_tokens=budget)
    with pytest.raises(GenerationError, match="max_new_tokens must be an integer"):
        chat.send("Hi", max_new_tokens="10")
    assert chat.messages == [] and chat.token_ids == []  # nothing was half-sent
    for system in (5, "", ["Be brief."]):
        with pytest.raises(GenerationError, match="system must be a non-empty string or None"):
            model.start_chat(system=system)
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    with pytest.raises(GenerationError, match="the last message is the model's"):
        model.chat(turns)
    context = model.config.max_sequence_length
    with pytest.raises(GenerationError, match=f"exceeds the model's context of {context}"):
        model.start_chat(max_length=context + 1)
    with pytest.raises(GenerationError, match="max_length must be at least 1"):
        model.start_chat(max_length=0)
    with pytest.raises(GenerationError, match="with max_new_tokens=4 it exceeds .*max_length=8"):
        model.start_chat(max_length=8).send("Hello there, how are you?", max_new_tokens=4)
    # Later turns keep to max_length too, though the cache holds more slots.
    chat = model.start_chat(max_length=40)
    chat.send("Hi", max_new_tokens=2)
    with pytest.raises(GenerationError, match=r"not fit the (\d+) free .*max_length=40") as error:
        chat.send("Hello there, how are you?", max_new_tokens=40 - len(chat.token_ids))
    assert int(error.value.args[0].split("fit the ")[1].split()[0]) <= 40 - len(chat.token_ids)


def test_text_beyond_the_models_vocabulary_is_refused(tokenizer_proto):
    """A tokenizer with more pieces than the model's vocabulary, given by mistake."""
    tokenizer = GemmaTokenizer(tokenizer_proto)
    text = "The quick brown fox jumps over the lazy dog."
    highest = max(tokenizer.encode(text))
    config = dataclasses.replace(tiny_config("gemma1_mqa"), vocabulary_size=highest)
    model = GemmaCausalLM.from_gemma_config(config)
    model.tokenizer = tokenizer
    message = rf"token id {highest} is outside the vocabulary \[0, {highest}\)"
    with pytest.raises(TokenIdError, match=message):
        model.generate(text, max_new_tokens=2)
    with pytest.raises(TokenIdError, match=message):
        model.start_chat().send(text, max_new_tokens=2)


def test_beam_search(model):
    greedy = model.generate(PROMPTS[0], max_new_tokens=6, return_ids=True)
    assert (
        model.generate(
            PROMPTS[0],
            max_new_tokens=6,
            return_ids=True,
            sampler="beam",
        )
        is not None
    )
    from gemma_keras.samplers import BeamSampler

    one_beam = model.generate(
        PROMPTS[0], max_new_tokens=6, return_ids=True, sampler=BeamSampler(num_beams=1)
    )
    assert one_beam == greedy


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        (dict(inputs=""), GenerationError, "empty"),
        (dict(inputs=[]), GenerationError, "expects a string"),
        (dict(inputs=["ok", [2, 5]]), GenerationError, "not a mix"),
        (dict(inputs="ok", max_new_tokens=0), GenerationError, "at least 1"),
        (dict(inputs="ok", max_new_tokens=-3), GenerationError, "at least 1"),
        (dict(inputs="ok", max_new_tokens=2.5), GenerationError, "integer"),
        (dict(inputs="ok", sampler="nucleus"), SamplerError, "Unknown sampler 'nucleus'"),
        (dict(inputs="ok", max_new_tokens=5, max_length=9), GenerationError, "not both"),
        (dict(inputs=[2, 99999]), Exception, "outside the vocabulary"),
        (dict(inputs=[[2, 5.5]]), GenerationError, "Prompt 0 has 5.5 at position 1; token ids"),
        (dict(inputs=[[2, 5], [2, True]]), GenerationError, "Prompt 1 has True at position 1"),
        (dict(inputs=[2.0, 5.0]), GenerationError, r"token ids \(integers\).*got float items"),
        (dict(inputs="ok", stop=5), GenerationError, "stop must be a string"),
        (dict(inputs="ok", stop=["a", ""]), GenerationError, "non-empty strings"),
        (dict(inputs="ok", sampler="top_k", seed="x"), SamplerError, "seed must be"),
        (dict(inputs="ok", sampler="top_k", seed=-1), SamplerError, "seed must be"),
        (dict(inputs="ok", sampler="beam", seed="x"), SamplerError, "seed must be"),
        (dict(inputs="ok", max_new_tokens=10**9), GenerationError, "Ask for at most 81[0-9]{2} "),
        (dict(inputs="ok", max_length=5.0), GenerationError, "max_length must be an integer"),
    ],
)
def test_bad_requests(tokenizer_proto, kwargs, error, message):
    model = make_model("gemma1_mqa", tokenizer_proto)
    with pytest.raises(error, match=message):
        model.generate(**kwargs)


def test_prompt_longer_than_the_context_is_refused(tokenizer_proto):
    model = make_model("gemma1_mqa", tokenizer_proto)
    model.backbone.config.max_sequence_length = 32
    prompt = [2] + [5] * 40
    with pytest.raises(GenerationError, match=r"The prompt is 41 tokens.*context of 32"):
        model.generate(prompt, max_new_tokens=4)
    with pytest.raises(GenerationError, match="context of 32"):
        model.generate([2, 5, 6], max_new_tokens=40)


def test_mixed_bfloat16_generates_what_bfloat16_generates(tokenizer_proto):
    """A mixed_bfloat16 model's decode steps multiply its float32 weights in
    bfloat16 as they read them: the tokens of a bfloat16 model holding the
    cast weights."""
    mixed = make_model("gemma1_mqa", tokenizer_proto, dtype="mixed_bfloat16")
    cast = make_model("gemma1_mqa", tokenizer_proto, dtype="bfloat16")
    assert mixed.backbone.token_embedding.embeddings.dtype == "float32"
    prompts = ["the cat", "a mat the cat sat on"]
    expected = cast.generate(prompts, max_new_tokens=8, return_ids=True)
    assert mixed.generate(prompts, max_new_tokens=8, return_ids=True) == expected


# --------------------------------------------------------------------------- reduced decode steps


def sample_full_logits(monkeypatch):
    """Makes every sampling step copy the full logits, as before steps reduced them."""
    monkeypatch.setattr(
        Sampler, "reduction", lambda self, size: ARGMAX if self.is_greedy else LOGITS
    )


@pytest.fixture(scope="module")
def gemma3_model(tokenizer_proto):
    return make_model("gemma3", tokenizer_proto)


@pytest.mark.parametrize(
    "sampler",
    [Sampler(top_k=5), Sampler(top_p=0.9), Sampler(temperature=0.7, top_k=5, top_p=0.8)],
    ids=str,
)
def test_reduced_steps_sample_what_the_full_logits_sample(gemma3_model, sampler, monkeypatch):
    """Seeded top-k and top-p generation from the steps' candidates (16 for
    top-p, so that some rows fall back to the full logits) gives the tokens
    that sampling the full logits gives."""
    model = gemma3_model
    monkeypatch.setattr(samplers, "CANDIDATES", 16)
    assert sampler.reduction(model.config.vocabulary_size).kind == "top"
    prompts = [model.tokenizer.encode(p) for p in PROMPTS]
    reduced = [model.generate(prompts, max_new_tokens=8, sampler=sampler, seed=s) for s in (0, 1)]
    sample_full_logits(monkeypatch)
    full = [model.generate(prompts, max_new_tokens=8, sampler=sampler, seed=s) for s in (0, 1)]
    assert reduced == full and reduced[0] != reduced[1]


def reduce_as_on_an_accelerator(monkeypatch):
    """Makes steps reduce their logits as on a GPU or TPU, where reading them
    is a device-to-host transfer (see `dispatch.choose_reduction`)."""
    assert dispatch.choose_reduction("gpu", "argmax") == "argmax"
    assert dispatch.choose_reduction("tpu", "top") == "top"
    monkeypatch.setattr(dispatch, "choose_reduction", lambda platform, kind: kind)


def test_decode_steps_copy_only_what_the_sampler_needs(tokenizer_proto, monkeypatch):
    model = make_model("gemma1_mqa", tokenizer_proto)
    monkeypatch.setattr(samplers, "CANDIDATES", 16)
    prompts = [model.tokenizer.encode(p) for p in PROMPTS]
    batch, vocabulary = len(prompts), model.config.vocabulary_size
    all_logits = batch * vocabulary * 4  # float32
    # On a CPU the host reads a greedy step's logits in place (numpy's argmax was faster).
    assert generation.prefill(model, prompts, 4, Sampler(0))[0].host_bytes == all_logits
    reduce_as_on_an_accelerator(monkeypatch)
    expected_bytes = {
        Sampler(temperature=0): batch * 4,  # one int32 id a row
        Sampler(top_k=5): batch * 6 * (4 + 4),  # k + 1 float32 logits and int32 ids
        Sampler(top_p=0.9): batch * (16 * (4 + 4) + 4),  # and the remainder's log-sum-exp
        Sampler(temperature=0.5): all_logits,
    }
    for sampler, expected in expected_bytes.items():
        result, state = generation.prefill(model, prompts, 4, sampler)
        assert result.host_bytes == expected, sampler
        tokens = result.next_tokens(sampler, np.full(batch, 0.5))
        step = generation.extend(model, state, tokens[:, None])
        assert step.host_bytes == expected, sampler
        # The logits stay on the device until asked for, a row at a time if need be.
        np.testing.assert_array_equal(step.logits([1]), step.logits()[[1]])
        if expected != all_logits:
            assert step.host_bytes == expected + vocabulary * 4 + all_logits


def test_greedy_steps_reduced_on_an_accelerator_equal_uncached_argmax(model, monkeypatch):
    reduce_as_on_an_accelerator(monkeypatch)
    prompts = [model.tokenizer.encode(p) for p in PROMPTS]
    assert model.generate(prompts, max_new_tokens=6) == argmax_loop(model, prompts, 6)


def test_ids_beyond_the_tokenizer_are_never_chosen(tokenizer_proto):
    """Gemma 3 4B+ has image tokens beyond its text vocabulary; the steps mask
    them out before choosing, whatever their logits."""
    tokenizer = GemmaTokenizer(tokenizer_proto)
    config = dataclasses.replace(
        tiny_config("gemma1_mqa"), vocabulary_size=tokenizer.vocabulary_size + 64
    )
    model = GemmaCausalLM.from_gemma_config(config, dtype="float32")
    weights = {k: v * 3 for k, v in randomize(model_shapes(model)).items()}
    weights["token_embedding/embeddings"][tokenizer.vocabulary_size :] *= 100
    assign_weights(model, weights)
    model.tokenizer = tokenizer
    prompt = tokenizer.encode(PROMPTS[0])
    inputs = {"token_ids": np.array([prompt]), "padding_mask": np.ones((1, len(prompt)), "int32")}
    unmasked = keras.ops.convert_to_numpy(model(inputs))[0, -1]
    assert unmasked.argmax() >= tokenizer.vocabulary_size  # what the mask is there for
    for sampler in ["greedy", "top_k", Sampler(top_p=0.9)]:
        generated = model.generate(prompt, max_new_tokens=6, sampler=sampler, seed=3)
        assert max(generated[len(prompt) :]) < tokenizer.vocabulary_size, sampler


def test_steps_argmax_takes_the_lowest_id_among_ties_and_masks_undecodable_ids():
    """As numpy's argmax, on every backend (TensorFlow's own may pick any)."""
    logits = np.array([[1.0, 7.0, 7.0, 3.0, 9.0], [7.0, 2.0, 7.0, 7.0, 0.0]], "float32")
    (ids,) = generation._reduce(keras.ops.convert_to_tensor(logits), ARGMAX, decodable=4)
    assert keras.ops.convert_to_numpy(ids).tolist() == [1, 0]  # id 4 is not decodable
