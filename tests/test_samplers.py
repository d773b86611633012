import numpy as np
import pytest

from gemma_keras import samplers
from gemma_keras.samplers import BeamSampler, Candidates, Sampler, SamplerError, get_sampler

rng = np.random.default_rng(0)
LOGITS = np.array([[4.0, 3.0, 2.0, 1.0, 0.0, -1.0], [0.0, 0.0, 5.0, 5.0, -3.0, 1.0]], "float32")


def draw(sampler, logits=LOGITS, n=2000, seed=0):
    generator = np.random.default_rng(seed)
    return np.stack([sampler(logits, generator) for _ in range(n)])


def test_greedy():
    assert get_sampler("greedy")(LOGITS, rng).tolist() == [0, 2]


def test_top_k_never_leaves_the_top_k():
    samples = draw(Sampler(top_k=2))
    assert set(samples[:, 0]) == {0, 1}
    assert set(samples[:, 1]) == {2, 3}


def test_top_p_never_leaves_the_nucleus():
    # Row 0 probabilities: 0.64, 0.23, 0.09, ... -> p=0.8 keeps tokens 0 and 1.
    samples = draw(Sampler(top_p=0.8))
    assert set(samples[:, 0]) == {0, 1}
    # The most likely token is always allowed, even with a tiny p.
    assert set(draw(Sampler(top_p=1e-6))[:, 0]) == {0}


def test_combined_top_k_top_p_and_temperature():
    sampler = Sampler(temperature=0.5, top_k=3, top_p=0.99)
    samples = draw(sampler)
    assert set(samples[:, 0]) <= {0, 1, 2}
    assert np.all(sampler.allowed(LOGITS)[np.arange(2), samples].all())


def test_temperature_sharpens():
    hot, cold = draw(Sampler(temperature=2.0)), draw(Sampler(temperature=0.2))
    assert (cold[:, 0] == 0).mean() > (hot[:, 0] == 0).mean()


def test_seeded_reproducibility():
    assert np.array_equal(draw(Sampler(top_k=4), seed=3), draw(Sampler(top_k=4), seed=3))


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda: Sampler(top_p=0.0), r"top_p must be in \(0, 1\]"),
        (lambda: Sampler(top_p=1.5), r"top_p must be in \(0, 1\]"),
        (lambda: Sampler(temperature=-0.1), "temperature must be a finite number >= 0"),
        (lambda: Sampler(temperature=float("nan")), "temperature must be a finite number"),
        (lambda: Sampler(temperature=float("inf")), "temperature must be a finite number"),
        (lambda: Sampler(top_p=float("nan")), r"top_p must be in \(0, 1\]"),
        (lambda: Sampler(top_k=0), "top_k must be a positive integer"),
        (lambda: Sampler(top_k=2.0), "top_k must be a positive integer"),
        (lambda: Sampler(top_k=True), "top_k must be a positive integer"),
        (lambda: Sampler(temperature="0.7"), "temperature must be a finite number"),
        (lambda: Sampler(top_p=np.float32(np.nan)), r"top_p must be in \(0, 1\]"),
        (lambda: BeamSampler(num_beams=np.int64(0)), "num_beams must be a positive integer"),
        (lambda: get_sampler("nucleus"), "Unknown sampler 'nucleus'"),
        (lambda: get_sampler("top_k", q=3), r"takes no option\(s\) \['q'\]"),
    ],
)
def test_bad_sampler_settings(make, message):
    with pytest.raises(SamplerError, match=message):
        make()


def test_numpy_scalars_are_accepted():
    """Settings often come out of numpy (a grid of temperatures, an argmax)."""
    sampler = Sampler(temperature=np.float32(0.5), top_k=np.int64(3), top_p=np.float64(0.9))
    assert sampler == Sampler(temperature=0.5, top_k=3, top_p=0.9)
    assert type(sampler.top_k) is int and type(sampler.temperature) is float
    assert BeamSampler(num_beams=np.int32(2)) == BeamSampler(num_beams=2)
    assert get_sampler("top_k", k=np.int64(2)).top_k == 2


def test_keras_hub_sampler_objects_map_to_ours():
    """KerasHub tutorials pass `keras_hub.samplers.*` objects to `compile`."""
    keras_hub = pytest.importorskip("keras_hub")
    samplers = keras_hub.samplers
    assert get_sampler(samplers.GreedySampler()) == Sampler(temperature=0)
    assert get_sampler(samplers.TopKSampler(k=7, seed=2)) == Sampler(top_k=7)
    assert get_sampler(samplers.TopPSampler(p=0.5, k=9, temperature=0.7)) == Sampler(
        temperature=0.7, top_p=0.5, top_k=9
    )
    assert get_sampler(samplers.RandomSampler(temperature=0.3)) == Sampler(temperature=0.3)
    assert get_sampler(samplers.BeamSampler(num_beams=3)) == BeamSampler(num_beams=3)
    with pytest.raises(SamplerError, match="ContrastiveSampler has no gemma_keras equivalent"):
        get_sampler(samplers.ContrastiveSampler())


# --------------------------------------------------------------------------- reduced decode steps

SAMPLING = [
    Sampler(top_k=5),
    Sampler(temperature=0.7, top_k=40),
    Sampler(top_p=0.9),
    Sampler(temperature=1.5, top_p=0.5),
    Sampler(temperature=0.8, top_k=30, top_p=0.8),
    Sampler(temperature=1.2),  # every token: the step returns the logits
]


def decode_logits(seed, batch=4, vocabulary=6000):
    """Rows of the kinds decode steps see: peaked, flat (a nucleus beyond the
    candidates), and rounded to eighths as bfloat16 logits are (ties)."""
    generator = np.random.default_rng(seed)
    scales = np.array([4.0, 0.3, 3.0, 2.0])[:batch, None]
    logits = generator.normal(size=(batch, vocabulary)) * scales
    logits[2] = np.round(logits[2] * 8) / 8
    if seed % 2:
        logits[3, :50] = logits[3].max()  # ties at the top, beyond any top-k here
    return logits.astype("float32")


def plain_reference(sampler, logits, uniforms):
    """`Sampler` written over the whole vocabulary, independently: the allowed
    tokens' probabilities in id order, zero elsewhere, and the first token
    whose cumulative probability reaches the uniform number."""
    tokens = []
    for row, uniform in zip(logits.astype(np.float64), uniforms, strict=True):
        allowed = np.ones(len(row), bool)
        if sampler.top_k is not None and sampler.top_k < len(row):
            allowed &= row >= np.sort(row)[-sampler.top_k]
        weights = np.where(allowed, np.exp((row - row.max()) / sampler.temperature), 0.0)
        if sampler.top_p is not None and sampler.top_p < 1:
            ranked = sorted(np.flatnonzero(allowed), key=lambda token: (-row[token], token))
            probabilities = weights[ranked] / weights[ranked].sum()
            before = np.cumsum(probabilities) - probabilities
            allowed[:] = False
            allowed[np.array(ranked)[before < sampler.top_p]] = True
            weights = np.where(allowed, weights, 0.0)
        cumulative = np.cumsum(weights)
        tokens.append(int(np.searchsorted(cumulative, uniform * cumulative[-1], side="left")))
    return np.array(tokens)


@pytest.mark.parametrize("sampler", SAMPLING, ids=str)
def test_sampling_equals_a_plain_whole_vocabulary_reference(sampler):
    for seed in range(10):
        logits = decode_logits(seed)
        uniforms = np.random.default_rng(seed).random(len(logits))
        expected = plain_reference(sampler, logits, uniforms)
        np.testing.assert_array_equal(sampler(logits, np.random.default_rng(seed)), expected)


def device_candidates(logits, reduction, remainder_error=0.0, seed=0):
    """`Candidates` as a step returns them (largest logits, remainder summed in
    float32), the remainder off by up to `remainder_error` as a device's sum
    may be."""
    count = reduction.count
    ids = np.argsort(-logits, axis=-1, kind="stable")[:, :count]
    values = np.take_along_axis(logits, ids, axis=-1)
    remainder = None
    if reduction.temperature is not None:
        below = logits <= values.min(axis=-1, keepdims=True)
        scaled = np.where(below, logits / np.float32(reduction.temperature), -np.inf)
        largest = scaled.max(axis=-1, keepdims=True)
        remainder = np.log(np.exp(scaled - largest).sum(-1)) + largest[:, 0]
        off = np.random.default_rng(seed).uniform(-1, 1, len(logits)) * remainder_error
        remainder = (remainder + np.log1p(off)).astype(np.float32)
    # The device's order of equal logits is its own.
    shuffle = np.random.default_rng(seed).permuted(
        np.arange(count)[None].repeat(len(ids), 0), axis=1
    )
    return Candidates(
        np.take_along_axis(values, shuffle, -1),
        np.take_along_axis(ids, shuffle, -1),
        logits.shape[-1],
        remainder,
    )


def decided_alone(sampler, candidates, logits, row, uniform):
    """Whether the candidates decide `row` without asking for the full logits."""

    def pick(x):
        return None if x is None else x[row : row + 1]

    asked = []

    def full_logits(rows):
        asked.extend(rows)
        return logits[row : row + 1][rows]

    one_row = Candidates(
        pick(candidates.values),
        pick(candidates.ids),
        candidates.vocabulary_size,
        pick(candidates.log_remainder),
    )
    sampler.sample(one_row, np.array([uniform]), full_logits)
    return not asked


@pytest.mark.parametrize("sampler", SAMPLING[:5], ids=str)
def test_candidates_sample_what_the_full_logits_sample(sampler, monkeypatch):
    """Many seeds, batch 4, ties, flat rows whose nucleus goes past the
    candidates, and a remainder off by half the error the tolerance allows:
    every token equals sampling the full logits, and rows the candidates
    cannot decide take the full logits (both kinds of row occur)."""
    monkeypatch.setattr(samplers, "CANDIDATES", 64)
    vocabulary = decode_logits(0).shape[-1]
    reduction = sampler.reduction(vocabulary)
    assert reduction.kind == "top" and reduction.count <= 64
    decided = []
    for seed in range(40):
        logits = decode_logits(seed)
        candidates = device_candidates(logits, reduction, samplers.REMAINDER_ERROR / 2, seed)
        uniforms = np.random.default_rng(seed).random(len(logits))
        tokens = sampler.sample(candidates, uniforms, lambda rows, logits=logits: logits[rows])
        np.testing.assert_array_equal(tokens, sampler(logits, np.random.default_rng(seed)))
        decided += [
            decided_alone(sampler, candidates, logits, row, uniforms[row])
            for row in range(len(logits))
        ]
    assert any(decided) and not all(decided)


def test_top_p_close_to_a_tokens_mass_takes_the_full_logits():
    """top_p just above a token's preceding mass, the device's remainder
    understated by half the error allowed: the candidates alone would leave
    the token out of the nucleus; the full logits keep it."""
    logits = np.linspace(3.0, -3.0, 200).astype("float32")[None]  # falls with the id
    count, token = 20, 5
    exact = logits[0].astype(np.float64)
    exponentials = np.exp(exact - exact[0])
    mass_before = (np.cumsum(exponentials) - exponentials) / exponentials.sum()
    remainder = exponentials[count - 1 :].sum()  # the least candidate's logit and below
    understated = samplers.REMAINDER_ERROR / 2
    # Every preceding mass reads larger by about `understated` times the remainder's share.
    top_p = mass_before[token] * (1 + understated * remainder / exponentials.sum() / 2)
    log_remainder = np.log(remainder * (1 - understated)) + exact[0]
    candidates = Candidates(
        logits[:, :count], np.arange(count)[None], 200, np.array([log_remainder])
    )
    sampler = Sampler(top_p=float(top_p))
    assert sampler.allowed(logits)[0].nonzero()[0].tolist() == list(range(token + 1))
    last = np.array([0.99999])  # the highest id kept: `token`
    every_token = Candidates.from_logits(logits)
    assert sampler.sample(every_token, last).tolist() == [token]  # what __call__ does
    assert sampler.sample(candidates, last, lambda rows: logits[rows]).tolist() == [token]
    assert not decided_alone(sampler, candidates, logits, 0, last[0])


def test_top_k_ties_beyond_the_candidates_take_the_full_logits():
    """Ties with the k-th largest logit are all allowed; where they go on past
    the k + 1 candidates, only the full logits know them."""
    sampler = Sampler(top_k=2)
    logits = np.array([[5.0, 1.0, 3.0, 3.0, 3.0, 0.0]], "float32")
    reduction = sampler.reduction(6)
    assert reduction == samplers.Reduction("top", 3)
    candidates = device_candidates(logits, reduction)
    assert not decided_alone(sampler, candidates, logits, 0, 0.99)
    seen = {
        int(sampler.sample(candidates, np.array([u]), lambda rows: logits[rows])[0])
        for u in (0.2, 0.99)
    }
    assert seen <= {0, 2, 3, 4} and 4 in seen
    assert sampler.allowed(logits).tolist() == [[True, False, True, True, True, False]]


def test_reductions_per_sampler():
    assert Sampler(temperature=0, top_k=5).reduction(1000) == samplers.ARGMAX
    assert Sampler(top_k=5).reduction(1000) == samplers.Reduction("top", 6)
    assert Sampler(top_k=5, top_p=0.5).reduction(1000) == samplers.Reduction("top", 6)
    assert Sampler(top_k=5000).reduction(262144) == samplers.LOGITS  # more than CANDIDATES
    assert Sampler(top_k=5000, top_p=0.9).reduction(262144) == samplers.LOGITS
    # A top_k of the whole vocabulary or more restricts nothing: top-p alone.
    assert Sampler(top_k=300000, top_p=0.9).reduction(262144) == samplers.Reduction(
        "top", samplers.CANDIDATES, 1.0
    )
    assert Sampler(temperature=0.5, top_p=0.9).reduction(262144) == samplers.Reduction(
        "top", samplers.CANDIDATES, 0.5
    )
    assert Sampler(top_p=0.9).reduction(100) == samplers.LOGITS  # fewer tokens than candidates
    assert Sampler(temperature=0.7).reduction(262144) == samplers.LOGITS
