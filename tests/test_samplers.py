import numpy as np
import pytest

from gemma_keras.samplers import BeamSampler, Sampler, SamplerError, get_sampler

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
