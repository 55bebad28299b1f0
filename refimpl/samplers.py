"""Next-token samplers with keras-hub's semantics (``keras_hub.samplers``): greedy, random, top-k, top-p.

Every sampler first turns the step's logits into probabilities the way keras-hub's ``Sampler.compute_probabilities``
does: cast to float32, divide by ``temperature``, softmax. Then:

    greedy   argmax of the probabilities (ties go to the lowest id)
    random   draw from all tokens in proportion to their probability
    top_k    keep the k most probable tokens (default k=5), draw in proportion among them
    top_p    sort by probability (optionally keep only the k best first), keep the shortest head whose cumulative
             probability exceeds p (the first token always stays), draw in proportion among them (default p=0.1)

Draws use a NumPy ``Generator`` seeded from ``seed`` (None: fresh entropy), as the Gumbel-max trick over the log
probabilities, which is how ``jax.random.categorical`` draws too. The random streams differ from keras' (different
generators), so only the distribution is shared; greedy is exact.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

SAMPLER_NAMES = ("greedy", "random", "top_k", "top_p")


def softmax_float32(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """f32[B, V] probabilities: ``softmax(float32(logits) / temperature)``, max-shifted like jax.nn.softmax."""
    x = np.asarray(logits, dtype=np.float32) / np.float32(temperature)
    shifted = np.exp(x - x.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


@dataclass
class Sampler:
    """Base sampler: ``sampler(logits f[B, V]) -> int32[B]``."""

    temperature: float = 1.0

    def __post_init__(self) -> None:
        if not (isinstance(self.temperature, (int, float)) and self.temperature > 0):
            raise ValueError(f"temperature={self.temperature!r}: expected a positive number")

    def compute_probabilities(self, logits: np.ndarray) -> np.ndarray:
        return softmax_float32(logits, self.temperature)

    def get_next_token(self, probabilities: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        return self.get_next_token(self.compute_probabilities(logits)).astype(np.int32)


@dataclass
class GreedySampler(Sampler):
    def get_next_token(self, probabilities: np.ndarray) -> np.ndarray:
        return np.argmax(probabilities, axis=-1)


@dataclass
class _RandomBase(Sampler):
    seed: int | None = None
    _rng: np.random.Generator = field(init=False, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        self._rng = np.random.default_rng(self.seed)

    def _draw(self, probabilities: np.ndarray) -> np.ndarray:
        """int[B]: one index per row, drawn in proportion to (unnormalised) ``probabilities`` f[B, C]."""
        with np.errstate(divide="ignore"):
            log_p = np.log(probabilities.astype(np.float64))  # zero probability -> -inf, never drawn
        gumbel = self._rng.gumbel(size=probabilities.shape)
        return np.argmax(log_p + gumbel, axis=-1)


@dataclass
class RandomSampler(_RandomBase):
    def get_next_token(self, probabilities: np.ndarray) -> np.ndarray:
        return self._draw(probabilities)


@dataclass
class TopKSampler(_RandomBase):
    k: int = 5

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"k={self.k!r}: expected a positive integer")

    def get_next_token(self, probabilities: np.ndarray) -> np.ndarray:
        k = min(self.k, probabilities.shape[-1])
        top = _top_indices(probabilities, k)  # int[B, k], most probable first
        choice = self._draw(np.take_along_axis(probabilities, top, axis=-1))
        return np.take_along_axis(top, choice[:, None], axis=-1)[:, 0]


@dataclass
class TopPSampler(_RandomBase):
    p: float = 0.1
    k: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (isinstance(self.p, (int, float)) and 0 < self.p <= 1):
            raise ValueError(f"p={self.p!r}: expected a number in (0, 1]")
        if self.k is not None and (not isinstance(self.k, int) or self.k < 1):
            raise ValueError(f"k={self.k!r}: expected None or a positive integer")

    def get_next_token(self, probabilities: np.ndarray) -> np.ndarray:
        cutoff = probabilities.shape[-1] if self.k is None else min(self.k, probabilities.shape[-1])
        order = _top_indices(probabilities, cutoff)  # int[B, C], most probable first
        sorted_p = np.take_along_axis(probabilities, order, axis=-1)
        keep = np.cumsum(sorted_p, axis=-1, dtype=np.float32) <= np.float32(self.p)
        # keras keeps token i if the cumulative probability *before* it is <= p: shift right, always keep the first.
        keep = np.concatenate([np.ones_like(keep[:, :1]), keep[:, :-1]], axis=-1)
        choice = self._draw(np.where(keep, sorted_p, 0))
        return np.take_along_axis(order, choice[:, None], axis=-1)[:, 0]


def _top_indices(probabilities: np.ndarray, k: int) -> np.ndarray:
    """int[B, k]: indices of the k largest values per row, largest first, ties to the lower index."""
    return np.argsort(-probabilities, axis=-1, kind="stable")[:, :k]


def get_sampler(identifier: str | Sampler, **kwargs) -> Sampler:
    """A sampler from a name ("greedy", "random", "top_k", "top_p", with keyword arguments) or an instance."""
    if isinstance(identifier, Sampler):
        if kwargs:
            raise ValueError(f"sampler: keyword arguments {sorted(kwargs)} given with a Sampler instance")
        return identifier
    classes = {"greedy": GreedySampler, "random": RandomSampler, "top_k": TopKSampler, "top_p": TopPSampler}
    if identifier not in classes:
        raise ValueError(f"sampler={identifier!r} is unknown; expected one of {SAMPLER_NAMES} or a Sampler "
                         "instance (keras-hub's beam, contrastive and speculative samplers are not reproduced)")
    try:
        return classes[identifier](**kwargs)
    except TypeError as error:
        raise ValueError(f"sampler {identifier!r}: {error}") from None
