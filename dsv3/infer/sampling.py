"""Turning logits into tokens: greedy, temperature, top-k, top-p, with one seeded generator per sequence.

Each sequence draws from its own `torch.Generator`, so a seeded request gives the same tokens whether it
runs alone or batched with others. Temperature 0 means greedy (argmax).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dsv3.errors import InvalidValue


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

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise InvalidValue("max_new_tokens", self.max_new_tokens, "must be at least 1")
        if self.temperature < 0:
            raise InvalidValue("temperature", self.temperature, "must be >= 0 (0 is greedy)")
        if self.top_k < 0:
            raise InvalidValue("top_k", self.top_k, "must be >= 0 (0 keeps every token)")
        if not 0 < self.top_p <= 1:
            raise InvalidValue("top_p", self.top_p, "must be in (0, 1]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generator(self) -> torch.Generator:
        """This sequence's random stream: seeded when a seed was given, otherwise from fresh entropy."""
        g = torch.Generator()
        if self.seed is None:
            g.seed()
        else:
            g.manual_seed(self.seed)
        return g


def probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits [V] -> the distribution [V] (fp32) that sampling draws from: softmax(logits / T), restricted to
    the top_k most likely tokens and then to the smallest set whose mass reaches top_p, renormalised.
    Speculative decoding needs these probabilities themselves, not only a draw from them."""
    probs = (logits.float() / params.temperature).softmax(dim=-1)
    if params.top_k or params.top_p < 1:
        sorted_p, order = probs.sort(descending=True)
        keep = torch.ones_like(sorted_p, dtype=torch.bool)
        if params.top_k:
            keep[params.top_k :] = False
        if params.top_p < 1:
            # keep a token while the mass before it is still short of top_p (the most likely always stays)
            keep &= (sorted_p.cumsum(-1) - sorted_p) < params.top_p
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
