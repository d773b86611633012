"""Choosing the next token from logits: greedy, temperature, top-k, top-p, and beam search.

Random numbers come from a seeded numpy generator on the host, so the same
seed gives the same tokens on JAX, TensorFlow and PyTorch. The logits stay
where the model ran: a decode step hands the host only what its sampler
needs (`Sampler.reduction`), not the `[batch, vocabulary]` logits (1 MB a
row for Gemma 3):

- greedy: the argmax of each row;
- top-k: the k + 1 largest logits of each row and their ids (`Candidates`);
- top-p without top-k: the `CANDIDATES` largest, plus the log-sum-exp of
  the logits at or below the least of them, which with the candidates gives
  each one its probability;
- plain temperature sampling and beam search: the logits.

Candidates choose exactly the token the full logits choose: tokens outside
the top-k or the nucleus have probability zero, and the draw walks the
allowed tokens in id order either way. Where the candidates cannot decide a
row (the nucleus goes past them, ties of the k-th logit go on beyond them),
that row is sampled from the full logits.

>>> import numpy as np
>>> sampler = get_sampler("top_k", k=2, temperature=0.7)
>>> logits = np.array([[0.0, 5.0, 4.0, -1.0]], "float32")
>>> int(sampler(logits, np.random.default_rng(0))[0]) in (1, 2)
True
>>> sampler.reduction(vocabulary_size=4)
Reduction(kind='top', count=3, temperature=None)
"""

import dataclasses
import math

import numpy as np

# Candidates per row a decode step returns for top-p sampling without top-k,
# and the most it returns for top-k (k + 1); a larger k takes the logits. On
# the embedded 270M (real text, temperature 1) 1.6% of top_p=0.9 rows and
# 3.4% of top_p=0.95 rows fall back to their logits with 1024, 0.5% with 4096,
# whose top-k costs a CPU 2.5x more (docs/performance.md, "Decode steps
# without the logits").
CANDIDATES = 1024
# The relative error allowed for the device's float32 sum of the logits'
# exponentials below the candidates (`Candidates.log_remainder`): measured up
# to 4.8e-5 on TensorFlow's XLA on a CPU (its float32 sum runs along the row),
# 1.8e-6 on JAX and torch. A token whose preceding mass lies closer to top_p
# than this error could move it has its row sampled from its full logits.
REMAINDER_ERROR = 2e-4
# Largest logits a row that falls back to its full logits looks at first.
HOST_CANDIDATES = 4096


@dataclasses.dataclass(frozen=True)
class Reduction:
    """What a step returns for the sampler in place of the full logits.

    kind: "argmax" (each row's token id), "top" (the `count` largest logits
        of each row and their ids, and with `temperature` the log-sum-exp of
        logits / temperature over the logits at or below the least of them),
        or "logits".
    """

    kind: str
    count: int | None = None
    temperature: float | None = None


ARGMAX = Reduction("argmax")
LOGITS = Reduction("logits")


@dataclasses.dataclass
class Candidates:
    """Each row's largest logits: enough to sample as from the full logits.

    `values` [batch, count] float32 logits in any order, `ids` [batch, count]
    their token ids, `vocabulary_size` the logits' width, and `log_remainder`
    [batch] the log-sum-exp of logits / temperature over the tokens whose
    logit is at most the least candidate's: what top-p needs beside the
    candidates for their probabilities, when they are not every token.
    """

    values: np.ndarray
    ids: np.ndarray
    vocabulary_size: int
    log_remainder: np.ndarray | None = None

    @classmethod
    def from_logits(cls, logits):
        """Every token of `logits` [batch, vocabulary] a candidate."""
        logits = np.asarray(logits, dtype=np.float32)
        ids = np.broadcast_to(np.arange(logits.shape[-1]), logits.shape)
        return cls(logits, ids, logits.shape[-1])


class SamplerError(ValueError):
    """A sampler name or parameter is invalid."""


def is_integer(value):
    """A Python or numpy integer; bools are not counts or token ids."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def is_real(value):
    """A Python or numpy integer or float (not a bool)."""
    return is_integer(value) or isinstance(value, (float, np.floating))


def random_generator(seed):
    """The numpy generator behind every sampled token: the same draws for a
    seed on every backend. `seed=None` draws fresh entropy."""
    if seed is not None and (not is_integer(seed) or seed < 0):
        raise SamplerError(f"seed must be a non-negative integer or None, got {seed!r}.")
    return np.random.default_rng(seed)


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

    def reduction(self, vocabulary_size):
        """What a decode step returns for this sampler (see `Reduction`) when its
        logits are `vocabulary_size` wide."""
        if self.is_greedy:
            return ARGMAX
        if self.top_k is not None and self.top_k < vocabulary_size:
            # One more than k shows whether the k-th logit's ties go on past them.
            if self.top_k + 1 <= CANDIDATES:
                return Reduction("top", self.top_k + 1)
            return LOGITS
        if self.top_p is not None and self.top_p < 1 and CANDIDATES < vocabulary_size:
            return Reduction("top", CANDIDATES, self.temperature)
        return LOGITS

    def allowed(self, logits):
        """Boolean [batch, vocabulary]: the tokens this sampler may emit."""
        candidates = Candidates.from_logits(logits)
        allowed = np.zeros(candidates.values.shape, dtype=bool)
        for row in range(len(allowed)):
            _, ids = self._allowed(candidates.values[row], candidates.ids[row], allowed.shape[-1])
            allowed[row, ids] = True
        return allowed

    def __call__(self, logits, rng):
        """Next token ids [batch] for `logits` [batch, vocabulary]."""
        logits = np.asarray(logits, dtype=np.float32)
        if self.is_greedy:
            return np.argmax(logits, axis=-1)
        return self.sample(Candidates.from_logits(logits), rng.random(len(logits)))

    def sample(self, candidates, uniforms, full_logits=None):
        """Next token ids [batch] from `candidates`, with one uniform number in
        [0, 1) per row (`rng.random(batch)`).

        Rows the candidates cannot decide exactly are sampled from their full
        logits: `full_logits(rows)` returns them, [len(rows), vocabulary]; it
        is called at most once."""
        tokens = np.zeros(len(uniforms), dtype=np.int64)
        undecided = []
        for row, uniform in enumerate(uniforms):
            remainder = candidates.log_remainder
            allowed = self._allowed(
                candidates.values[row],
                candidates.ids[row],
                candidates.vocabulary_size,
                None if remainder is None else remainder[row],
                REMAINDER_ERROR,
            )
            if allowed is None:
                undecided.append(row)
            else:
                tokens[row] = self._draw(*allowed, uniform)
        if undecided:
            logits = np.asarray(full_logits(undecided), dtype=np.float32)
            for row, row_logits in zip(undecided, logits, strict=True):
                tokens[row] = self._draw(*self._allowed_in_logits(row_logits), uniforms[row])
        return tokens

    def _allowed_in_logits(self, row):
        """`_allowed` over one row of the full logits. Top-p looks at the row's
        `HOST_CANDIDATES` largest logits first, with the rest summed in float64
        here: sorting all 262k logits of a Gemma 3 row takes ~30 ms on a CPU,
        picking the largest ~2 ms."""
        top_k_applies = self.top_k is not None and self.top_k < len(row)
        top_p_applies = self.top_p is not None and self.top_p < 1
        if top_p_applies and not top_k_applies and HOST_CANDIDATES < len(row):
            top = np.argpartition(row, -HOST_CANDIDATES)[-HOST_CANDIDATES:]
            rest = row[row <= row[top].min()].astype(np.float64) / self.temperature
            log_remainder = rest.max() + np.log(np.exp(rest - rest.max()).sum())
            allowed = self._allowed(row[top], top, len(row), log_remainder)
            if allowed is not None:
                return allowed
        return self._allowed(row, np.arange(len(row)), len(row))

    def _allowed(self, values, ids, vocabulary_size, log_remainder=None, remainder_error=0.0):
        """`(values, ids)` of the tokens this sampler may emit among one row's
        candidates, or None where the candidates cannot tell (the full logits
        can). Tokens rank by logit, ties by lower id.

        `vocabulary_size`: the logits' width; where the candidates are fewer,
        top-p needs `log_remainder` (see `Candidates`), summed with up to
        `remainder_error` of relative error.
        """
        every_token = len(values) == vocabulary_size  # or every allowed one
        if self.top_k is not None and self.top_k < vocabulary_size:
            if len(values) <= self.top_k:
                return None
            kth = np.partition(values, -self.top_k)[-self.top_k]
            # Every token tied with the k-th largest logit is allowed; where the
            # least candidate ties with it, more may lie beyond the candidates.
            if not every_token and values.min() >= kth:
                return None
            keep = values >= kth
            values, ids = values[keep], ids[keep]
            every_token = True  # top-p renormalizes over these
        if self.top_p is not None and self.top_p < 1:
            order = np.lexsort((ids, -values))
            values, ids = values[order], ids[order]
            scaled = values.astype(np.float64) / self.temperature
            exponentials = np.exp(scaled - scaled[0])
            if every_token:
                total, tolerance = exponentials.sum(), 0.0
            else:
                # Tokens above the least candidate are all candidates; the
                # remainder sums the others, with up to `remainder_error` of error.
                above = exponentials[values > values[-1]].sum()
                remainder = np.exp(log_remainder - scaled[0])
                total = above + remainder
                tolerance = remainder_error * remainder / total + 1e-12  # and float64's
            probabilities = exponentials / total
            # Keep a token while the mass *before* it is below top_p: the most
            # likely token is always kept.
            mass_before = np.cumsum(probabilities) - probabilities
            keep = mass_before < self.top_p
            if not every_token:
                # The nucleus may go on past the candidates, or the remainder's
                # error may move a token to the other side of top_p.
                reaches_the_last = keep[values == values[-1]].any()
                near_the_edge = np.any(np.abs(mass_before - self.top_p) <= tolerance)
                if reaches_the_last or near_the_edge or not np.isfinite(total):
                    return None
            values, ids = values[keep], ids[keep]
        return values, ids

    def _draw(self, values, ids, uniform):
        """Inverse-CDF sampling over the allowed tokens in id order: the same
        token for the same uniform number whichever other tokens (of
        probability zero) are listed."""
        order = np.argsort(ids, kind="stable")
        scaled = values[order].astype(np.float64) / self.temperature
        cumulative = np.cumsum(np.exp(scaled - scaled.max()))
        chosen = int((cumulative < uniform * cumulative[-1]).sum())
        return ids[order][min(chosen, len(ids) - 1)]


@dataclasses.dataclass(frozen=True)
class BeamSampler:
    """Beam search: keeps the `num_beams` most likely continuations per prompt."""

    num_beams: int = 4

    def __post_init__(self):
        if not is_integer(self.num_beams) or self.num_beams < 1:
            raise SamplerError(f"num_beams must be a positive integer, got {self.num_beams!r}.")
        object.__setattr__(self, "num_beams", int(self.num_beams))


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
