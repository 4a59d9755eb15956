"""Log-likelihoods of continuations: the one measurement behind perplexity and multiple-choice scores.

A request is (context ids, continuation ids). Its score is the sum of log p(continuation token | everything
before it) and whether greedy decoding would have produced the continuation (every token the argmax).
Requests run in batches, longest first so that a batch's lengths are alike, right-padded: a causal model's
positions never see the padding after them, so a request's numbers do not depend on its batch mates beyond
float rounding. The forward runs the naive attention with logits only at one column; the head then runs over
each request's continuation positions alone, a chunk at a time, so no [B, T, V] logits are ever held.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from dsv3.infer.logprobs import SCORE_CHUNK
from dsv3.model import DeepSeekV3

Request = tuple[Sequence[int], Sequence[int]]  # (context ids, continuation ids)


@torch.inference_mode()
def loglikelihoods(model: DeepSeekV3, requests: Sequence[Request], batch_size: int = 8,
                   progress: Callable[[int], None] | None = None) -> list[tuple[float, bool]]:
    """(sum of the continuation's log-probabilities, greedy) per request, in order. `progress(n)` is called
    as n more requests are done."""
    device = next(model.parameters()).device
    order = sorted(range(len(requests)), key=lambda i: -len(requests[i][0]) - len(requests[i][1]))
    out: list[tuple[float, bool] | None] = [None] * len(requests)
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        seqs = [[*requests[i][0], *requests[i][1]][:-1] for i in batch]  # the last token is predicted, never read
        T = max(len(s) for s in seqs)
        ids = torch.zeros(len(seqs), T, dtype=torch.long)
        for row, s in enumerate(seqs):
            ids[row, : len(s)] = torch.tensor(s)
        hidden = model.run(ids.to(device), attn="naive", logits_at=torch.zeros(len(seqs), 1, dtype=torch.long,
                                                                               device=device)).hidden
        for row, i in enumerate(batch):
            context, continuation = requests[i]
            first = len(context) - 1  # the position that predicts the continuation's first token
            out[i] = _score(model, hidden[row, first : first + len(continuation)], continuation)
        if progress is not None:
            progress(len(batch))
    return out


def _score(model: DeepSeekV3, hidden: torch.Tensor, targets: Sequence[int]) -> tuple[float, bool]:
    """hidden [N, d] at the positions predicting targets [N] -> (sum of log-probabilities, all argmax)."""
    targets = torch.tensor(targets, device=hidden.device)
    total, greedy = 0.0, True
    for s in range(0, len(targets), SCORE_CHUNK):
        logp = model.logits(hidden[s : s + SCORE_CHUNK]).float().log_softmax(dim=-1)  # [n, V]
        chunk = targets[s : s + SCORE_CHUNK]
        total += float(logp.gather(-1, chunk[:, None]).double().sum())  # in float64, as a scorer adds floats
        greedy = greedy and bool((logp.argmax(dim=-1) == chunk).all())
    return total, greedy
