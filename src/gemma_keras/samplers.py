"""Choosing the next token from logits: greedy, temperature, top-k, top-p, and beam search.

Sampling runs on the host in numpy on the float32 logits of the last
position ([batch, vocabulary], ~1 MB for Gemma 3): the same seed then gives
the same tokens on JAX, TensorFlow and PyTorch.

>>> import numpy as np
>>> sampler = get_sampler("top_k", k=2, temperature=0.7)
>>> logits = np.array([[0.0, 5.0, 4.0, -1.0]], "float32")
>>> int(sampler(logits, np.random.default_rng(0))[0]) in (1, 2)
True
"""

import dataclasses
import math

import numpy as np


class SamplerError(ValueError):
    """A sampler name or parameter is invalid."""


def is_integer(value):
    """A Python or numpy integer; bools are not counts or token ids."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def is_real(value):
    """A Python or numpy integer or float (not a bool)."""
    return is_integer(value) or isinstance(value, (float, np.floating))


@dataclasses.dataclass(frozen=True)
class Sampler:
    """Samples from `softmax(logits / temperature)` restricted to the `top_k`
    most likely tokens and/or the smallest set whose probability reaches
    `top_p`. `temperature=0` is greedy (argmax)."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self):
        if not is_real(self.temperature) or not 0 <= self.temperature < math.inf:
            raise SamplerError(
                f"temperature must be a finite number >= 0, got {self.temperature!r}."
            )
        if self.top_k is not None and (not is_integer(self.top_k) or self.top_k < 1):
            raise SamplerError(f"top_k must be a positive integer, got {self.top_k!r}.")
        if self.top_p is not None and not (is_real(self.top_p) and 0 < self.top_p <= 1):
            raise SamplerError(f"top_p must be in (0, 1], got {self.top_p!r}.")
        # numpy scalars are stored as Python numbers, so equal samplers compare equal.
        object.__setattr__(self, "temperature", float(self.temperature))
        if self.top_k is not None:
            object.__setattr__(self, "top_k", int(self.top_k))
        if self.top_p is not None:
            object.__setattr__(self, "top_p", float(self.top_p))

    @property
    def is_greedy(self):
        return self.temperature == 0

    def allowed(self, logits):
        """Boolean [batch, vocabulary]: the tokens this sampler may emit."""
        logits = np.asarray(logits, dtype=np.float32)
        allowed = np.ones(logits.shape, dtype=bool)
        if self.top_k is not None and self.top_k < logits.shape[-1]:
            kth = np.partition(logits, -self.top_k, axis=-1)[:, -self.top_k][:, None]
            allowed &= logits >= kth
        if self.top_p is not None and self.top_p < 1:
            probabilities = _softmax(np.where(allowed, logits, -np.inf) / self.temperature)
            order = np.argsort(-probabilities, axis=-1, kind="stable")
            sorted_probabilities = np.take_along_axis(probabilities, order, axis=-1)
            # Keep a token while the mass *before* it is below top_p: the most
            # likely token is always kept.
            mass_before = np.cumsum(sorted_probabilities, axis=-1) - sorted_probabilities
            keep_sorted = mass_before < self.top_p
            keep = np.zeros_like(allowed)
            np.put_along_axis(keep, order, keep_sorted, axis=-1)
            allowed &= keep
        return allowed

    def __call__(self, logits, rng):
        """Next token ids [batch] for `logits` [batch, vocabulary]."""
        logits = np.asarray(logits, dtype=np.float32)
        if self.is_greedy:
            return np.argmax(logits, axis=-1)
        allowed = self.allowed(logits)
        probabilities = _softmax(np.where(allowed, logits / self.temperature, -np.inf))
        # Inverse-CDF sampling: one uniform number per row, reproducible.
        uniform = rng.random((logits.shape[0], 1))
        cumulative = np.cumsum(probabilities, axis=-1)
        chosen = (cumulative < uniform * cumulative[:, -1:]).sum(axis=-1)
        chosen = np.minimum(chosen, logits.shape[-1] - 1)
        # Guard against rounding landing on a disallowed token at the edge.
        return np.where(
            allowed[np.arange(len(chosen)), chosen],
            chosen,
            np.argmax(np.where(allowed, logits, -np.inf), axis=-1),
        )


@dataclasses.dataclass(frozen=True)
class BeamSampler:
    """Beam search: keeps the `num_beams` most likely continuations per prompt."""

    num_beams: int = 4

    def __post_init__(self):
        if not is_integer(self.num_beams) or self.num_beams < 1:
            raise SamplerError(f"num_beams must be a positive integer, got {self.num_beams!r}.")
        object.__setattr__(self, "num_beams", int(self.num_beams))


def _softmax(x):
    x = x - np.max(x, axis=-1, keepdims=True)
    exponentials = np.exp(x)
    return exponentials / exponentials.sum(axis=-1, keepdims=True)


SAMPLERS = ("greedy", "random", "top_k", "top_p", "beam")


def get_sampler(sampler="greedy", **options):
    """A sampler from a name (as KerasHub's `compile(sampler=...)` takes) or an
    object: ours, or a KerasHub sampler such as `keras_hub.samplers.TopKSampler(k=5)`.

    Names: `greedy`; `random` (`temperature`); `top_k` (`k`, default 5,
    `temperature`); `top_p` (`p`, default 0.1, `k`, `temperature`); `beam`
    (`num_beams`, default 4).
    """
    from_keras_hub = type(sampler).__module__.startswith(("keras_hub.", "keras_nlp."))
    if isinstance(sampler, (Sampler, BeamSampler)) or from_keras_hub:
        if options:
            raise SamplerError("Options go with a sampler name, not with a sampler object.")
        if not from_keras_hub:
            return sampler
        sampler, options = _keras_hub_equivalent(sampler)
    if not isinstance(sampler, str) or sampler not in SAMPLERS:
        raise SamplerError(f"Unknown sampler {sampler!r}; choose one of {SAMPLERS}.")
    temperature = options.pop("temperature", 1.0)
    if sampler == "greedy":
        result = Sampler(temperature=0)
    elif sampler == "random":
        result = Sampler(temperature=temperature)
    elif sampler == "top_k":
        result = Sampler(temperature=temperature, top_k=options.pop("k", 5))
    elif sampler == "top_p":
        result = Sampler(
            temperature=temperature, top_p=options.pop("p", 0.1), top_k=options.pop("k", None)
        )
    else:
        result = BeamSampler(num_beams=options.pop("num_beams", 4))
    if options:
        raise SamplerError(f"Sampler {sampler!r} takes no option(s) {sorted(options)}.")
    return result


# KerasHub sampler classes: our name and the options (same-named attributes) that carry over.
_KERAS_HUB_SAMPLERS = {
    "GreedySampler": ("greedy", ()),
    "RandomSampler": ("random", ("temperature",)),
    "TopKSampler": ("top_k", ("k", "temperature")),
    "TopPSampler": ("top_p", ("p", "k", "temperature")),
    "BeamSampler": ("beam", ("num_beams",)),
}


def _keras_hub_equivalent(sampler):
    """`(name, options)` of our sampler for a KerasHub one, as KerasHub tutorials
    pass to `compile`. Its `seed` is not carried over (KerasHub's advances
    between calls); pass `seed=` to `generate` for reproducible sampling."""
    class_name = type(sampler).__name__
    if class_name not in _KERAS_HUB_SAMPLERS:
        raise SamplerError(
            f"KerasHub's {class_name} has no gemma_keras equivalent; use one of "
            f"{sorted(_KERAS_HUB_SAMPLERS)} or a name from {SAMPLERS}."
        )
    name, attributes = _KERAS_HUB_SAMPLERS[class_name]
    options = {option: getattr(sampler, option, None) for option in attributes}
    return name, {option: value for option, value in options.items() if value is not None}
