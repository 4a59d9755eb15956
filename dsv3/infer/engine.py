"""The inference engine: prefill, then decode over the absorbed latent cache, for many sequences at once.

Each sequence owns one row of a shared latent cache. A step admits waiting sequences (one batched
prefill, prompts right-padded), then advances every running sequence by one decode step in a single
batch, whatever their lengths: token i of row b is written at its own position and attends to its own
row's slots 0..position, so rows of different lengths share a batch with no padding at all. Finished
sequences free their row at once, and the next step can hand it to a waiting one (continuous batching).

Prefill runs the "naive" attention (per-head K/V, the fast SDPA kernel over long prompts); decoding runs
the "absorb" one, which attends over the cached latent and never re-expands it (DESIGN section 3).

With `speculative=True`, MTP module 1 drafts one token per step and the main model checks it in the same
forward that produces the next token (see `speculative.py`): up to two tokens per step for the price of
one main forward plus one MTP block.

State of a running sequence between steps (n = its length - 1):
    tokens[-1] (position n) is sampled but not yet in the cache; main-model slots 0..n-1 are written;
    with speculation, MTP slots 0..n-1 are written too and `draft` is MTP's guess for position n + 1.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch

from dsv3.infer.decode import DecodeForward
from dsv3.infer.sampling import SamplingParams, sample
from dsv3.infer.speculative import Draft, draft_token, verify
from dsv3.infer.text import Decoder, TextStream
from dsv3.model import DeepSeekV3
from dsv3.model.cache import new_cache

_ids = itertools.count()


@dataclass(eq=False)
class Sequence:
    """One prompt being continued. `take()` hands over the tokens and text produced since the last call."""

    prompt: list[int]
    params: SamplingParams
    stream: TextStream | None = None
    id: int = field(default_factory=lambda: next(_ids))
    tokens: list[int] = field(default_factory=list)  # generated so far, stop token included
    finish_reason: str | None = None  # "stop", "length" or "cancelled" once done
    row: int | None = None
    generator: torch.Generator | None = None
    draft: Draft | None = None
    n_drafted: int = 0
    n_accepted: int = 0
    cancelled: bool = False
    _new_tokens: list[int] = field(default_factory=list)
    _new_text: str = ""

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.tokens)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def text(self) -> str:
        return self.stream.text if self.stream is not None else ""

    def take(self) -> tuple[list[int], str]:
        out = self._new_tokens, self._new_text
        self._new_tokens, self._new_text = [], ""
        return out



@dataclass
class Stats:
    """Counters since the engine was made; times in seconds."""

    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_time: float = 0.0
    decode_time: float = 0.0
    decode_steps: int = 0
    drafted: int = 0
    accepted: int = 0

    @property
    def acceptance(self) -> float | None:
        return self.accepted / self.drafted if self.drafted else None


class Engine:
    """Continues many sequences at once over one latent cache of `max_batch` rows of `max_len` tokens.

    `tokenizer` (anything with `decode`) turns tokens into streamed text and enables stop strings; without
    one, sequences produce tokens only. `decode` chooses the forward of decode steps: "fast" (`DecodeForward`)
    or "reference" (`model.run` with the absorbed attention); both compute the same function.
    """

    def __init__(
        self,
        model: DeepSeekV3,
        tokenizer: Decoder | None = None,
        *,
        max_batch: int = 8,
        max_len: int | None = None,
        cache_dtype: str = "bf16",
        speculative: bool = False,
        decode: str = "fast",
    ):
        cfg = model.config
        if decode not in ("fast", "reference"):
            raise ValueError(f"decode={decode!r} is not 'fast' or 'reference'")
        if speculative and not len(model.mtp):
            raise ValueError("speculative decoding needs a model with an MTP module (num_nextn_predict_layers >= 1)")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_len = min(max_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        self.speculative = speculative
        self.fast = DecodeForward(model) if decode == "fast" else None
        self.device = next(model.parameters()).device
        # speculation writes the draft one slot past the last token, and MTP module 1 needs its own layer
        n_layers = cfg.num_hidden_layers + (1 if speculative else 0)
        self.cache = new_cache(cfg, max_batch, self.max_len + 1, cache_dtype, self.device, n_layers)
        self.free_rows = list(range(max_batch))
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.stats = Stats()

    @property
    def max_batch(self) -> int:
        return self.cache.batch_size

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, prompt: Iterable[int], params: SamplingParams) -> Sequence:
        """Queue a prompt; it is prefilled at the next step with a free row."""
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise ValueError("the prompt is empty; give at least one token")
        if len(prompt) >= self.max_len:
            raise ValueError(f"the prompt has {len(prompt)} tokens but the context holds {self.max_len}")
        vocab = self.model.config.vocab_size
        if not all(0 <= t < vocab for t in prompt):
            raise ValueError(f"the prompt has token ids outside the vocabulary [0, {vocab})")
        stream = TextStream(self.tokenizer, params.stop) if self.tokenizer is not None else None
        seq = Sequence(prompt, params, stream=stream, generator=params.generator())
        self.waiting.append(seq)
        return seq

    def cancel(self, seq: Sequence) -> None:
        """Stop a sequence; its row is freed at the start of the next step. Safe to call from another thread."""
        seq.cancelled = True

    def abort_all(self) -> None:
        """Drop every sequence, running or waiting, and free every row (after a step failed half-way)."""
        for s in [*self.waiting, *self.running]:
            if not s.done:
                s.finish_reason = "cancelled"
            s.row = None
        self.waiting.clear()
        self.running = []
        self.free_rows = list(range(self.max_batch))

    # ----- the loop ----------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[Sequence]:
        """Admit what fits, advance every running sequence once; return the sequences that changed."""
        changed = self._drop_cancelled()
        admitted = self._admit()
        active = [s for s in self.running if not s.done]
        if active:
            t0 = time.perf_counter()
            (self._speculative_step if self.speculative else self._decode_step)(active)
            self.stats.decode_time += time.perf_counter() - t0
            self.stats.decode_steps += 1
        changed += [s for s in admitted if s not in active] + active
        for s in changed:
            if s.done and s.row is not None:
                self.free_rows.append(s.row)
                s.row = None
        self.running = [s for s in self.running if not s.done]
        return changed

    def generate(self, prompts: Iterable[Iterable[int]], params: SamplingParams) -> list[Sequence]:
        """Run prompts to completion together; returns their sequences in order."""
        seqs = [self.add(p, params) for p in prompts]
        while not all(s.done for s in seqs):
            self.step()
        return seqs

    def stream(self, prompt: Iterable[int], params: SamplingParams) -> Iterator[str]:
        """Continue one prompt, yielding its text as it is made."""
        seq = self.add(prompt, params)
        try:
            while not seq.done:
                self.step()
                _, text = seq.take()
                if text:
                    yield text
        finally:
            if not seq.done:
                self.cancel(seq)
                self.step()

    # ----- phases ------------------------------------------------------------------------------------
    def _drop_cancelled(self) -> list[Sequence]:
        dropped = [s for s in itertools.chain(self.waiting, self.running) if s.cancelled and not s.done]
        for s in dropped:
            s.finish_reason = "cancelled"
        self.waiting = deque(s for s in self.waiting if not s.done)
        return dropped

    def _admit(self) -> list[Sequence]:
        """Prefill as many waiting sequences as there are free rows, in one right-padded batch.

        Padding tokens sit past a row's prompt; they write cache slots that the row's own next tokens
        overwrite before anything attends to them, so they change nothing."""
        batch = []
        while self.waiting and self.free_rows:
            seq = self.waiting.popleft()
            seq.row = self.free_rows.pop(0)
            batch.append(seq)
        if not batch:
            return []
        t0 = time.perf_counter()
        lengths = torch.tensor([len(s.prompt) for s in batch])
        T = int(lengths.max())
        ids = torch.zeros(len(batch), T, dtype=torch.long)
        for i, s in enumerate(batch):
            ids[i, : len(s.prompt)] = torch.tensor(s.prompt)
        ids = ids.to(self.device)
        positions = torch.arange(T, device=self.device).expand(len(batch), T)  # [B, T]
        cache = self.cache.rows([s.row for s in batch])
        last = (lengths - 1).to(self.device)  # [B], each prompt's last position
        self.model.set_impl(attn="naive")
        out = self.model.run(ids, positions, cache)
        rows = torch.arange(len(batch), device=self.device)
        logits = out.logits[rows, last]  # [B, V]
        for s, row_logits in zip(batch, logits):
            self._append(s, sample(row_logits, s.params, s.generator))
        if self.speculative:
            # MTP slot p reads (h_p, t_{p+1}): the prompt shifted by one, then the token just sampled
            next_ids = torch.zeros_like(ids)
            for i, s in enumerate(batch):
                next_ids[i, : len(s.prompt)] = torch.tensor(s.prompt[1:] + s.tokens[:1])
            mtp = self.model.mtp[0]
            h, _ = mtp(out.hidden, self.model.embed(next_ids), self.model.rope(positions), positions, cache)
            self._draft(batch, mtp, h, pick=last)
        self.stats.prompt_tokens += int(lengths.sum())
        self.stats.prefill_time += time.perf_counter() - t0
        self.running += batch
        return batch

    def _decode_step(self, active: list[Sequence]) -> None:
        ids = torch.tensor([[s.tokens[-1]] for s in active], device=self.device)  # [B, 1]
        positions = torch.tensor([[s.length - 1] for s in active], device=self.device)  # [B, 1]
        logits = self._forward(ids, positions, self.cache.rows([s.row for s in active]))[0][:, -1]  # [B, V]
        if all(s.params.greedy for s in active):
            for s, t in zip(active, logits.argmax(dim=-1).tolist()):
                self._append(s, t)
        else:
            for s, row_logits in zip(active, logits):
                self._append(s, sample(row_logits, s.params, s.generator))

    def _speculative_step(self, active: list[Sequence]) -> None:
        """Feed [last token, draft] at [n, n+1]: position n's logits judge the draft, position n+1's give the
        token after it when the draft is accepted. Then MTP drafts again from wherever each row ended."""
        ids = torch.tensor([[s.tokens[-1], s.draft.token] for s in active], device=self.device)  # [B, 2]
        positions = torch.tensor([[s.length - 1, s.length] for s in active], device=self.device)  # [B, 2]
        cache = self.cache.rows([s.row for s in active])
        logits, hidden = self._forward(ids, positions, cache)  # [B, 2, V], [B, 2, d]
        next_ids = torch.zeros_like(ids)
        accepted = []
        for i, s in enumerate(active):
            new = verify(logits[i], s.draft, s.params, s.generator)
            s.n_drafted += 1
            s.n_accepted += len(new) - 1
            accepted.append(len(new) - 1)
            for t in new:
                self._append(s, t)
            next_ids[i] = torch.tensor([new[0], new[-1]])  # the second slot is only read when accepted
        self.stats.drafted += len(active)
        self.stats.accepted += sum(accepted)
        mtp = self.model.mtp[0]
        if self.fast is not None:
            h = self.fast.mtp(mtp, hidden, next_ids, positions, cache)
        else:
            h, _ = mtp(hidden, self.model.embed(next_ids), self.model.rope(positions), positions, cache)
        self._draft(active, mtp, h, pick=torch.tensor(accepted, device=self.device))

    def _forward(self, ids, positions, cache) -> tuple[torch.Tensor, torch.Tensor]:
        """A decode-step forward: (logits [B, T, V], hidden [B, T, d])."""
        if self.fast is not None:
            return self.fast.run(ids, positions, cache)
        self.model.set_impl(attn="absorb")
        out = self.model.run(ids, positions, cache)
        return out.logits, out.hidden

    def _draft(self, seqs, mtp, h, pick: torch.Tensor) -> None:
        """Draft each running sequence's next-but-one token from MTP's output h [B, T, d] (which wrote its cache
        slots), read at column `pick`: the row's last real position."""
        rows = torch.arange(len(seqs), device=self.device)
        logits = self.model.head(mtp.norm(h[rows, pick]))  # [B, V]
        for s, row_logits in zip(seqs, logits):
            if not s.done:
                s.draft = draft_token(row_logits, s.params, s.generator)

    # ----- bookkeeping -------------------------------------------------------------------------------
    def _append(self, s: Sequence, token: int) -> None:
        if s.done:
            return
        s.tokens.append(token)
        s._new_tokens.append(token)
        self.stats.generated_tokens += 1
        if token in s.params.stop_token_ids:
            return self._finish(s, "stop")
        if s.stream is not None:
            s._new_text += s.stream.push(token)
            if s.stream.stopped:
                return self._finish(s, "stop")
        if len(s.tokens) >= s.params.max_new_tokens or s.length >= self.max_len:
            self._finish(s, "length")

    def _finish(self, s: Sequence, reason: str) -> None:
        s.finish_reason = reason
        if s.stream is not None:
            s._new_text += s.stream.finish()

