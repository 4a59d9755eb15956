"""Log-probabilities of tokens under the model: what scorers (lm-evaluation-harness) and `logprobs` ask for.

They are the model's own: log_softmax of the raw logits in fp32, before temperature, top-k or top-p, so a
token's log-probability does not depend on how the request samples. With `top` n, each position also
gets the n most likely tokens, best first.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MAX_TOP_LOGPROBS = 20  # alternatives per position a request may ask for (OpenAI's and vLLM's limit)
SCORE_CHUNK = 512  # positions whose vocabulary-wide logits exist at once when a prompt is scored


@dataclass
class TokenLogprob:
    token: int
    logprob: float
    top: list[tuple[int, float]]  # the most likely tokens at this position and their log-probabilities, best first


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, top: int) -> list[TokenLogprob]:
    """logits [T, V] at T positions, tokens [T] the token that came at each -> one TokenLogprob each."""
    logp = logits.float().log_softmax(dim=-1)  # [T, V]
    chosen = logp.gather(-1, tokens[:, None])[:, 0].tolist()  # [T]
    if top:
        best_lp, best_ids = logp.topk(top, dim=-1)  # [T, top]
        best = [list(zip(i, lp)) for i, lp in zip(best_ids.tolist(), best_lp.tolist())]
    else:
        best = [[] for _ in chosen]
    return [TokenLogprob(t, lp, b) for t, lp, b in zip(tokens.tolist(), chosen, best)]


def prompt_logprobs(head, hidden: torch.Tensor, prompt: list[int], top: int) -> list[TokenLogprob | None]:
    """Every prompt token's log-probability given the tokens before it, from the prefill's hidden states
    hidden [L, d] (`head` maps them to logits). The first token has no context: None. The head runs over
    SCORE_CHUNK positions at a time, so a long prompt never holds [L, V] logits at once."""
    targets = torch.tensor(prompt[1:], device=hidden.device)  # position p predicts token p + 1
    out: list[TokenLogprob | None] = [None]
    for start in range(0, len(prompt) - 1, SCORE_CHUNK):
        stop = min(start + SCORE_CHUNK, len(prompt) - 1)
        out += token_logprobs(head(hidden[start:stop]), targets[start:stop], top)
    return out
