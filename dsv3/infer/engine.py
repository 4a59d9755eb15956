"""The inference engine: prefill, then decode over the absorbed latent cache, for many sequences at once.

Each sequence owns one row of a shared latent cache. A step admits waiting sequences (one batched
prefill, prompts right-padded), then advances every running sequence by one decode step in a single
batch, whatever their lengths: token i of row b is written at its own position and attends to its own
row's slots 0..position, so rows of different lengths share a batch with no padding at all. Finished
sequences free their row at once, and the next step can hand it to a waiting one (continuous batching).

Prefill runs the "naive" attention (per-head K/V, the fast SDPA kernel over long prompts); decoding runs
the "absorb" one, which attends over the cached latent and never re-expands it (DESIGN section 3). The engine
only schedules: every forward is a call to the model's public `run` or `mtp_step`.

The cache holds `max_batch` rows and grows with the requests (see `ServingConfig`): never longer than the
longest prompt + max_new_tokens in flight, nor than the context bound.

With `speculative=True`, MTP module 1 drafts one token per step and the main model checks it in the same
forward that produces the next token (see `speculative.py`): up to two tokens per step for the price of
one main forward plus one MTP block.

State of a running sequence between steps (n = its length - 1):
    tokens[-1] (position n) is sampled but not yet in the cache; main-model slots 0..n-1 are written;
    with speculation, MTP slots 0..n-1 are written too and `draft` is MTP's guess for position n + 1.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import math
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch

from dsv3.infer.config import ServingConfig
from dsv3.infer.logprobs import TokenLogprob, prompt_logprobs, token_logprobs
from dsv3.infer.sampling import SamplingParams, sample
from dsv3.infer.speculative import Draft, draft_token, verify
from dsv3.infer.text import Decoder, TextStream
from dsv3.model import DeepSeekV3
from dsv3.model.cache import new_cache

_ids = itertools.count()
log = logging.getLogger("dsv3.infer")


@dataclass(eq=False)
class Sequence:
    """One prompt being continued. `take()` hands over the tokens and text produced since the last call."""

    prompt: list[int]
    params: SamplingParams
    stream: TextStream | None = None
    id: int = field(default_factory=lambda: next(_ids))
    tokens: list[int] = field(default_factory=list)  # generated so far, stop token included
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per generated token, with params.logprobs
    prompt_logprobs: list[TokenLogprob | None] | None = None  # one per prompt token, with params.prompt_logprobs
    finish_reason: str | None = None  # "stop", "length", "cancelled" or "error" once done
    error: str | None = None  # what went wrong for this sequence alone (finish_reason "error")
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
    """Continues many sequences at once over one latent cache of `max_batch` rows (see `ServingConfig`).

    `tokenizer` (anything with `decode`) turns tokens into streamed text and enables stop strings; without
    one, sequences produce tokens only. `Engine(model, tok, max_batch=8)` is `Engine(model, tok,
    ServingConfig(max_batch=8))`.
    """

    # The cache grows geometrically, at least CHUNK slots at a time, so a long generation copies it a
    # logarithmic number of times and a short one (whatever its requests can use, up to CHUNK more) not at all.
    GROWTH = 1.5
    CHUNK = 256

    def __init__(self, model: DeepSeekV3, tokenizer: Decoder | None = None, config: ServingConfig | None = None,
                 **changes):
        config = dataclasses.replace(config or ServingConfig(), **changes)
        cfg = model.config
        self.max_len = config.context_bound(cfg)
        if config.speculative and not len(model.mtp):
            raise ValueError("speculative decoding needs a model with an MTP module (num_nextn_predict_layers >= 1)")
        self.config = config
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.speculative = config.speculative
        self.device = next(model.parameters()).device
        # MTP module 1 needs its own layer of the cache when it drafts
        n_layers = cfg.num_hidden_layers + (1 if self.speculative else 0)
        self.cache = new_cache(cfg, config.max_batch, 0, config.cache_dtype, self.device, n_layers)
        self.free_rows = list(range(config.max_batch))
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
        last = (lengths - 1).to(self.device)[:, None]  # [B, 1], each prompt's last position
        self._reserve(T, batch)
        out = self.model.run(ids, positions, cache, attn="naive", logits_at=last)
        for s, hidden, row_logits in zip(batch, out.hidden, out.logits[:, 0]):
            with self._alone(s):
                if s.params.prompt_logprobs is not None:  # scoring: the prefill's states give every position
                    s.prompt_logprobs = prompt_logprobs(self.model.logits, hidden[: len(s.prompt)], s.prompt,
                                                        s.params.prompt_logprobs)
                if s.params.max_new_tokens == 0:
                    self._finish(s, "length")
                else:
                    self._append(s, sample(row_logits, s.params, s.generator), row_logits)
        if self.speculative:
            # MTP slot p reads (h_p, t_{p+1}): the prompt shifted by one, then the token just sampled (any
            # token where none was: the draft of a finished sequence is never read)
            next_ids = torch.zeros_like(ids)
            for i, s in enumerate(batch):
                next_ids[i, : len(s.prompt)] = torch.tensor(s.prompt[1:] + (s.tokens[:1] or [0]))
            draft = self.model.mtp_step(out.hidden, next_ids, positions, cache, attn="naive", logits_at=last)
            self._draft(batch, draft.logits[:, 0])
        self.stats.prompt_tokens += int(lengths.sum())
        self.stats.prefill_time += time.perf_counter() - t0
        self.running += batch
        return batch

    def _decode_step(self, active: list[Sequence]) -> None:
        ids = torch.tensor([[s.tokens[-1]] for s in active], device=self.device)  # [B, 1]
        positions = torch.tensor([[s.length - 1] for s in active], device=self.device)  # [B, 1]
        self._reserve(int(positions.max()) + 1)
        cache = self.cache.rows([s.row for s in active])
        logits = self.model.run(ids, positions, cache, attn="absorb").logits[:, -1]  # [B, V]
        if all(s.params.greedy for s in active):
            for s, t, row_logits in zip(active, logits.argmax(dim=-1).tolist(), logits):
                self._append(s, t, row_logits)
        else:
            for s, row_logits in zip(active, logits):
                with self._alone(s):
                    self._append(s, sample(row_logits, s.params, s.generator), row_logits)

    def _speculative_step(self, active: list[Sequence]) -> None:
        """Feed [last token, draft] at [n, n+1]: position n's logits judge the draft, position n+1's give the
        token after it when the draft is accepted. Then MTP drafts again from wherever each row ended."""
        ids = torch.tensor([[s.tokens[-1], s.draft.token] for s in active], device=self.device)  # [B, 2]
        positions = torch.tensor([[s.length - 1, s.length] for s in active], device=self.device)  # [B, 2]
        self._reserve(int(positions.max()) + 1)
        cache = self.cache.rows([s.row for s in active])
        out = self.model.run(ids, positions, cache, attn="absorb")  # logits [B, 2, V], hidden [B, 2, d]
        next_ids = torch.zeros_like(ids)
        accepted = []
        for i, s in enumerate(active):
            new = [s.tokens[-1]]  # what a failed verification leaves: nothing new (the row is finished then)
            with self._alone(s):
                new = verify(out.logits[i], s.draft, s.params, s.generator)
                s.n_drafted += 1
                s.n_accepted += len(new) - 1
                for t, row_logits in zip(new, out.logits[i]):
                    self._append(s, t, row_logits)
            accepted.append(len(new) - 1)
            next_ids[i] = torch.tensor([new[0], new[-1]])  # the second slot is only read when accepted
        self.stats.drafted += len(active)
        self.stats.accepted += sum(accepted)
        # the draft is read at each row's last real position: n when the draft was rejected, n+1 when kept
        pick = torch.tensor(accepted, device=self.device)[:, None]  # [B, 1]
        draft = self.model.mtp_step(out.hidden, next_ids, positions, cache, attn="absorb", logits_at=pick)
        self._draft(active, draft.logits[:, 0])

    def _draft(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        """Each running sequence's draft of its next-but-one token from MTP's logits [B, V]."""
        for s, row_logits in zip(seqs, logits):
            if not s.done:
                with self._alone(s):
                    s.draft = draft_token(row_logits, s.params, s.generator)

    def _reserve(self, slots: int, admitted: list[Sequence] = ()) -> None:
        """Grow the cache so that every row holds `slots` slots: geometrically, but never past what the
        sequences in flight can use (prompt + max_new_tokens each: a speculative step may write one slot past
        the last token) nor past the context bound."""
        if slots <= self.cache.max_len:
            return
        live = [*self.running, *admitted]
        usable = max((len(s.prompt) + s.params.max_new_tokens for s in live), default=slots)
        grown = max(slots + self.CHUNK, math.ceil(self.cache.max_len * self.GROWTH))
        target = min(grown, usable, self.max_len + 1)
        self.cache.resize(max(target, slots))

    # ----- bookkeeping -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _alone(self, s: Sequence):
        """Work for one sequence of a batch: if it fails (its own sampling, detokenising, stop strings), that
        sequence ends with finish_reason "error" and the others go on."""
        try:
            yield
        except Exception as e:  # anything one sequence's own work raises ends that sequence, not the batch
            log.warning("sequence %d failed: %r", s.id, e)
            s.error = f"generation failed for this request: {e}"
            if not s.done:
                s.finish_reason = "error"
            if s.stream is not None:
                s._new_text = ""

    def _append(self, s: Sequence, token: int, logits: torch.Tensor) -> None:
        """Add `token`, sampled from logits [V], to s and end s if it should end there."""
        if s.done:
            return
        s.tokens.append(token)
        if s.params.logprobs is not None:
            s.logprobs += token_logprobs(logits[None], torch.tensor([token], device=logits.device), s.params.logprobs)
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

