"""A few generated texts at the end of a run: what the model has learnt, in its own words.

Deliberately the simplest decoder (the whole sequence is run again for every new token): a handful of
short samples from a small model take a second or two this way, and it needs nothing but `model.run`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from dsv3.data import Tokenizer
from dsv3.model import DeepSeekV3

# Openings in the style of the built-in corpus: Python's documentation and standard library.
PROMPTS = ("The ", "def ", "import ", "class ", "If the ")


@torch.no_grad()
def generate(model: DeepSeekV3, tokenizer: Tokenizer, prompt: str, max_new_tokens: int, *,
             temperature: float = 0.8, top_k: int = 40, seed: int = 0,
             agree: Callable[[torch.Tensor], torch.Tensor] | None = None) -> str:
    """Continue `prompt` by sampling at most max_new_tokens tokens (stops at end-of-text); returns the text.
    `agree` maps each chosen token to the one to keep: processes that run a model together pass one that makes
    them all keep the same, so they stop together."""
    was_training = model.training
    model.eval()
    device = model.embed.weight.device
    generator = torch.Generator(device=device).manual_seed(seed)
    ids = torch.tensor([tokenizer.encode(prompt)], device=device)  # [1, T]
    limit = model.config.max_position_embeddings
    for _ in range(max_new_tokens):
        if ids.shape[1] >= limit:
            break
        logits = model(ids)[0, -1].float() / temperature  # [V]
        top = logits.topk(min(top_k, logits.numel()))
        choice = top.indices[torch.multinomial(top.values.softmax(-1), 1, generator=generator)]
        if agree is not None:
            choice = agree(choice)
        if choice.item() == tokenizer.eos_id:
            break
        ids = torch.cat([ids, choice.view(1, 1)], dim=1)
    model.train(was_training)
    return tokenizer.decode(ids[0].tolist())


def samples(model: DeepSeekV3, tokenizer: Tokenizer, n: int, max_new_tokens: int, seed: int = 0,
            agree: Callable[[torch.Tensor], torch.Tensor] | None = None) -> list[str]:
    """n samples from the built-in prompts, each with its own seed."""
    return [generate(model, tokenizer, PROMPTS[i % len(PROMPTS)], max_new_tokens, seed=seed + i, agree=agree)
            for i in range(n)]
