"""Turning logits into tokens: greedy, temperature, top-k, top-p, with one seeded generator per sequence.

Each sequence draws from its own `torch.Generator`, so a seeded request gives the same tokens whether it
runs alone or batched with others. Temperature 0 means greedy (argmax), and so does any temperature below
`MIN_TEMPERATURE`: dividing logits by a vanishing temperature would overflow to infinities, and the
distribution it stands for is the argmax anyway. Every value is checked when the parameters are made, so a
bad request fails on its own and never inside a batch that other requests share.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from dsv3.errors import InvalidValue
from dsv3.infer.logprobs import MAX_TOP_LOGPROBS

MIN_TEMPERATURE = 1e-4  # below this, sampling is greedy (exp(logit gap / T) leaves nothing but the argmax)
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes


@dataclass
class SamplingParams:
    """How one sequence is continued. temperature 0 is greedy; top_k 0 and top_p 1 switch those filters off."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()  # end the sequence on any of these (not part of the text)
    stop: tuple[str, ...] = field(default_factory=tuple)  # end the text before the first of these strings
    logprobs: int | None = None  # record each generated token's log-probability and this many alternatives
    prompt_logprobs: int | None = None  # likewise for every prompt token (scoring); max_new_tokens may then be 0

    def __post_init__(self) -> None:
        if self.prompt_logprobs is None:
            _integer("max_new_tokens", self.max_new_tokens, 1, None, "must be an integer of at least 1")
        else:  # scoring a prompt may generate nothing
            _integer("max_new_tokens", self.max_new_tokens, 0, None, "must be an integer of at least 0")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None:
                _integer(name, value, 0, MAX_TOP_LOGPROBS, f"must be an integer from 0 to {MAX_TOP_LOGPROBS}")
        _number("temperature", self.temperature, "must be a finite number >= 0 (0 is greedy)")
        if self.temperature < 0:
            raise InvalidValue("temperature", self.temperature, "must be a finite number >= 0 (0 is greedy)")
        _integer("top_k", self.top_k, 0, None, "must be an integer >= 0 (0 keeps every token)")
        _number("top_p", self.top_p, "must be a number in (0, 1]")
        if not 0 < self.top_p <= 1:
            raise InvalidValue("top_p", self.top_p, "must be a number in (0, 1]")
        if self.seed is not None:
            _integer("seed", self.seed, *SEED_RANGE, f"must be an integer in [{SEED_RANGE[0]}, {SEED_RANGE[1]}]")

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE

    def generator(self) -> torch.Generator:
        """This sequence's random stream: seeded when a seed was given, otherwise from fresh entropy."""
        g = torch.Generator()
        if self.seed is None:
            g.seed()
        else:
            g.manual_seed(self.seed)
        return g


def _number(name: str, value, why: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidValue(name, value, why)


def _integer(name: str, value, low: int, high: int | None, why: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        raise InvalidValue(name, value, why)


def probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits [V] -> the distribution [V] (fp32) that sampling draws from: softmax(logits / T), restricted to
    the top_k most likely tokens and then to the smallest set whose mass reaches top_p, renormalised.
    Speculative decoding needs these probabilities themselves, not only a draw from them."""
    logits = logits.float()
    probs = ((logits - logits.max()) / params.temperature).softmax(dim=-1)  # the largest is 0: no overflow
    if params.top_k or params.top_p < 1:
        sorted_p, order = probs.sort(descending=True)
        keep = torch.ones_like(sorted_p, dtype=torch.bool)
        if params.top_k:
            keep[params.top_k :] = False
        if params.top_p < 1:
            # keep a token while the mass before it is still short of top_p
            keep &= (sorted_p.cumsum(-1) - sorted_p) < params.top_p
        keep[0] = True  # the most likely always stays (a top_p below fp32's smallest number would keep none)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p * keep)
        probs = probs / probs.sum()
    return probs


def draw(probs: torch.Tensor, generator: torch.Generator) -> int:
    """One token from the distribution probs [V]."""
    return int(torch.multinomial(probs, 1, generator=generator))


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """One token from logits [V] under `params`."""
    if params.greedy:
        return int(logits.argmax())
    return draw(probabilities(logits, params), generator)
