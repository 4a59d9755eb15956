"""MTP speculative decoding: MTP module 1 drafts the next k tokens (k = 1 or 2), the main model verifies them.

DeepSeek-V3 (section 5.4.3) reuses its MTP module this way and reports 85-90% acceptance and 1.8x tokens/s.
Drafting: MTP module 1 at position p reads (h_p, t_{p+1}) and predicts t_{p+2}. For a second draft the module
is applied again to its own output state h'_p and the embedding of the token it just drafted, at position p+1
(the chain of section 2.2 with module 1 standing in for module 2). The engine then feeds
[t_n, d_1, ..., d_k] at positions [n, ..., n+k] in one forward: the logits at n+j-1 decide draft d_j's fate,
the drafts are kept up to the first one rejected, and when all k are kept the logits at n+k give one more
token for free.

- Greedy: keep d_j iff it is the argmax at n+j-1 (and every earlier draft was kept). The output is then exactly
  plain greedy decoding's.
- Sampling (Leviathan et al. 2023, Chen et al. 2023), draft by draft: with p_j the target's distribution at
  n+j-1 and q_j the one d_j was drawn from, keep d_j with probability min(1, p_j(d_j) / q_j(d_j)); at the first
  rejection draw from max(0, p_j - q_j), renormalised, and stop. Every token is then distributed exactly as
  under plain sampling from p.
Both p and q are taken after the sequence's temperature, top-k and top-p.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dsv3.infer.sampling import SamplingParams, draw, probabilities, sample


@dataclass
class Draft:
    token: int
    probs: torch.Tensor | None = None  # q [V], the distribution it was drawn from (None when greedy)


def draft_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> Draft:
    """The MTP module's logits [V] -> a draft: its argmax when greedy, else a draw kept with its distribution."""
    if params.greedy:
        return Draft(int(logits.argmax()))
    q = probabilities(logits, params)
    return Draft(draw(q, generator), q)


def verify(logits: torch.Tensor, drafts: list[Draft], params: SamplingParams,
           generator: torch.Generator) -> list[int]:
    """The main model's logits [k + 1, V] at positions n..n+k and the k drafts for n+1..n+k -> the tokens to
    keep: the accepted drafts (a leading run of them), then the corrected token at the first rejection or, when
    all k are accepted, the bonus token from position n+k. Always 1 to k + 1 tokens."""
    if params.greedy:
        targets = logits.argmax(dim=-1).tolist()  # [k + 1]
        kept = 0
        while kept < len(drafts) and targets[kept] == drafts[kept].token:
            kept += 1
        return targets[: kept + 1]
    out = []
    for row, d in zip(logits, drafts):
        p = probabilities(row, params)
        if float(torch.rand((), generator=generator)) * float(d.probs[d.token]) < float(p[d.token]):  # u < p/q
            out.append(d.token)
            continue
        residual = (p - d.probs).clamp(min=0)
        if float(residual.sum()) <= 0:  # p == q up to rounding: the draft was as good as any token from p
            residual = p
        return [*out, draw(residual / residual.sum(), generator)]
    return [*out, sample(logits[len(drafts)], params, generator)]
