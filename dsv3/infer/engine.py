"""The inference engine: prefill, then decode over the absorbed latent cache, for many sequences at once.

The cache is paged (`PagedLatentCache`, bookkept by `blocks.BlockPool`): a pool of blocks of `block_size`
positions, and per sequence a table of the blocks it holds, so memory follows the tokens actually held
instead of a row of the longest context per sequence. A step admits waiting sequences while there are free
batch slots and the pool can promise each one its worst case (prompt + max_new_tokens, less any prefix
blocks it shares): memory is then taken block by block as tokens arrive, and no sequence ever has to be
preempted. Then it prefills (one right-padded batch), and advances every running sequence by one decode
step in a single batch, whatever their lengths: token i of a row is written at its own position and attends
to its own slots 0..position, so rows of different lengths share a batch with no padding at all. Finished
sequences release their blocks at once (continuous batching).

- **Prefix sharing.** Full blocks are registered under a hash chain of the tokens they hold
  (`blocks.block_keys`); a new prompt that starts with cached blocks (a shared system prompt, the earlier
  turns of a chat) takes them and skips their prefill. Scoring requests (prompt_logprobs) compute every
  position and share nothing.
- **Chunked prefill.** With `prefill_chunk`, a step prefills at most that many prompt tokens, so one long
  prompt is spread over several steps, each also a decode step for the running sequences, instead of
  stalling them all for its whole length.

Prefill runs the "naive" attention (per-head K/V, the fast SDPA kernel over long prompts); decoding runs
the "absorb" one, which attends over the cached latent and never re-expands it (DESIGN section 3). The engine
only schedules: every forward is a call to the model's public `run` or `mtp_step`.

With `speculative=True`, MTP module 1 drafts `draft_tokens` = k tokens per step (k = 2 applies it a second
time to its own output) and the main model checks them in the same forward that produces the next token (see
`speculative.py`): up to k + 1 tokens per step for the price of one main forward over k + 1 tokens plus k MTP
blocks.

State of a running sequence between steps (n = its length - 1):
    tokens[-1] (position n) is sampled but not yet in the cache; main-model slots 0..n-1 are written;
    with speculation, MTP slots 0..n-1 are written too and `drafts` are MTP's guesses for positions
    n + 1..n + k. With k = 2 the second draft also wrote MTP slot n from the module's own state (a stand-in
    for h_n); the next step's MTP pass writes slot n again from the real h_n before anything reads it.
Slots past these hold what rejected drafts left there: each is written again before any query attends to it
(a query at position p reads slots 0..p only, and every forward writes its own positions first), and none is
in a block offered for prefix sharing, so rolling back a rejected draft costs nothing.
While a sequence prefills, slots 0..cached-1 are written (shared blocks included).
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

from dsv3.infer.blocks import ROOT, BlockPool, block_keys
from dsv3.infer.config import ServingConfig
from dsv3.infer.logprobs import TokenLogprob, prompt_logprobs, token_logprobs
from dsv3.infer.sampling import SamplingParams, sample
from dsv3.infer.speculative import Draft, draft_token, verify
from dsv3.infer.text import Decoder, TextStream
from dsv3.model import DeepSeekV3
from dsv3.model.cache import PagedLatentCache

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
    blocks: list[int] = field(default_factory=list)  # its block table: position p lives in blocks[p // size]
    cached: int = 0  # prompt positions whose slots are written, while it prefills
    promised: int = 0  # blocks the pool still owes it (its worst case, less what it holds)
    keys: list[bytes] = field(default_factory=list)  # prefix keys of its leading blocks, registered ones first
    generator: torch.Generator | None = None
    drafts: list[Draft] = field(default_factory=list)  # with speculation: the guesses for the next positions
    drafting: bool = True  # with speculation: still drafting (it stops for good when drafting does not pay)
    mtp_written: int | None = None  # once it stops drafting: the MTP layer's slots 0..mtp_written-1 are written
    n_drafted: int = 0  # draft tokens verified
    n_accepted: int = 0  # of them kept
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
    # draft position j + 1 (the j-th token after a step's last one): drafts verified there, and kept. A draft is
    # kept only if every draft before it is, so draft_accepted falls with j; draft_proposed[0] counts the
    # sequences' drafting steps.
    draft_proposed: list[int] = field(default_factory=list)
    draft_accepted: list[int] = field(default_factory=list)
    stopped_drafting: int = 0  # sequences that stopped drafting because it did not pay
    prefix_hit_tokens: int = 0  # prompt tokens whose prefill a cached block saved
    prefix_lookup_tokens: int = 0  # prompt tokens of the sequences that looked for cached blocks

    @property
    def prefix_hit_rate(self) -> float | None:
        return self.prefix_hit_tokens / self.prefix_lookup_tokens if self.prefix_lookup_tokens else None

    @property
    def drafted(self) -> int:
        return sum(self.draft_proposed)

    @property
    def accepted(self) -> int:
        return sum(self.draft_accepted)

    @property
    def acceptance(self) -> float | None:
        """Draft tokens kept / verified, all positions together."""
        return self.accepted / self.drafted if self.drafted else None

    @property
    def acceptance_by_position(self) -> list[float | None]:
        """Per draft position: kept / verified there."""
        return [a / p if p else None for a, p in zip(self.draft_accepted, self.draft_proposed)]

    def record_drafts(self, proposed: int, accepted: int) -> None:
        """One sequence's drafting step: `proposed` drafts verified, the first `accepted` of them kept."""
        while len(self.draft_proposed) < proposed:
            self.draft_proposed.append(0)
            self.draft_accepted.append(0)
        for j in range(proposed):
            self.draft_proposed[j] += 1
            self.draft_accepted[j] += j < accepted


class Engine:
    """Continues many sequences at once over one paged latent cache (see `ServingConfig`).

    `tokenizer` (anything with `decode`) turns tokens into streamed text and enables stop strings; without
    one, sequences produce tokens only. `Engine(model, tok, max_batch=8)` is `Engine(model, tok,
    ServingConfig(max_batch=8))`.
    """

    DRAFT_PRIOR = 4  # drafting steps' worth of the engine's yield a new sequence's own yield starts from
    DRAFT_PRIOR_RATE = 0.75  # each draft's acceptance (given the earlier ones') assumed before the engine has any
    RECALIBRATE = 64  # decode steps between measurements of what a plain step would cost
    SEEDED_DRAFT_COST = 0.5  # what each draft adds to a step's cost, in plain steps, for seeded sampled sequences
    GROWTH = 1.5  # the cache's storage grows geometrically with the blocks handed out, at least GROW_TOKENS
    GROW_TOKENS = 256

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
        self.draft_tokens = config.draft_tokens if config.speculative else 0
        self.device = next(model.parameters()).device
        self.block_size = config.block_size
        if config.cache_tokens is None:  # room for max_batch sequences of the longest length, as rows had
            blocks = config.max_batch * math.ceil((self.max_len + 1) / self.block_size)
        else:
            blocks = math.ceil(config.cache_tokens / self.block_size)
        self.pool = BlockPool(blocks + 1, self.block_size)  # + the padding block
        # MTP module 1 needs its own layer of the cache when it drafts
        n_layers = cfg.num_hidden_layers + (1 if self.speculative else 0)
        self.cache = PagedLatentCache(cfg, self.block_size, config.cache_dtype, self.device, n_layers)
        self.waiting: deque[Sequence] = deque()
        self.prefilling: list[Sequence] = []
        self.running: list[Sequence] = []
        self.promised = 0  # blocks promised to admitted sequences and not yet handed out
        self._step_costs: dict[int, list[float]] = {}  # batch size -> [plain, speculative] step seconds
        self.stats = Stats()

    @property
    def max_batch(self) -> int:
        return self.config.max_batch

    @property
    def free_slots(self) -> int:
        """Sequences that could start now, as far as the batch width goes."""
        return self.max_batch - len(self.prefilling) - len(self.running)

    def has_work(self) -> bool:
        return bool(self.waiting or self.prefilling or self.running)

    def add(self, prompt: Iterable[int], params: SamplingParams) -> Sequence:
        """Queue a prompt; it is admitted at a step with a free slot and enough cache for its worst case."""
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise ValueError("the prompt is empty; give at least one token")
        if len(prompt) >= self.max_len:
            raise ValueError(f"the prompt has {len(prompt)} tokens but the context holds {self.max_len}")
        vocab = self.model.config.vocab_size
        if not all(0 <= t < vocab for t in prompt):
            raise ValueError(f"the prompt has token ids outside the vocabulary [0, {vocab})")
        worst = self._worst_blocks(len(prompt), params)
        if worst > self.pool.n_blocks - 1:
            raise ValueError(f"the prompt and its max_new_tokens need {worst * self.block_size} tokens of cache but "
                             f"the cache holds {(self.pool.n_blocks - 1) * self.block_size}")
        stream = TextStream(self.tokenizer, params.stop) if self.tokenizer is not None else None
        seq = Sequence(prompt, params, stream=stream, generator=params.generator())
        self.waiting.append(seq)
        return seq

    def cancel(self, seq: Sequence) -> None:
        """Stop a sequence; its blocks are released at the start of the next step. Safe to call from another
        thread."""
        seq.cancelled = True

    def abort_all(self) -> None:
        """Drop every sequence, waiting, prefilling or running, and release their blocks (after a step failed
        half-way)."""
        for s in [*self.waiting, *self.prefilling, *self.running]:
            if not s.done:
                s.finish_reason = "cancelled"
            self._release(s)
        self.waiting.clear()
        self.prefilling, self.running = [], []

    # ----- the loop ----------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[Sequence]:
        """Admit what fits, prefill (a chunk), advance every running sequence once; return the sequences that
        changed."""
        self._update_drafting()
        changed = self._drop_cancelled()
        self._admit()
        prefilled = self._prefill()
        active = [s for s in self.running if not s.done]
        if active:
            t0 = time.perf_counter()
            drafting = [s for s in active if self.speculative and s.drafting]
            plain = [s for s in active if s not in drafting]
            if drafting:
                self._speculative_step(drafting)
            if plain:
                self._decode_step(plain)
            self.stats.decode_time += time.perf_counter() - t0
            self.stats.decode_steps += 1
        changed += [s for s in prefilled if s not in active] + active
        for s in changed:
            if s.done:
                self._release(s)
        for s in active:
            if not s.done:
                self._register(s, s.length - 1)  # decoding has written slots 0..length-2
        self.running = [s for s in self.running if not s.done]
        self.prefilling = [s for s in self.prefilling if not s.done]
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

    # ----- blocks ------------------------------------------------------------------------------------
    def _worst_blocks(self, prompt_len: int, params: SamplingParams) -> int:
        """Blocks a sequence may come to hold: its prompt and every new token (a speculative step writes k slots
        past the last token)."""
        slots = min(prompt_len + params.max_new_tokens, self.max_len) + self.draft_tokens
        return math.ceil(slots / self.block_size)

    def _hold(self, s: Sequence, slots: int) -> None:
        """Give s blocks for positions 0..slots-1, from what was promised to it."""
        while len(s.blocks) * self.block_size < slots:
            block = self.pool.allocate()
            s.blocks.append(block)
            s.promised -= 1
            self.promised -= 1
            if block >= self.cache.n_blocks:
                grown = max(block + 1, math.ceil(self.cache.n_blocks * self.GROWTH),
                            self.cache.n_blocks + self.GROW_TOKENS // self.block_size)
                self.cache.reserve(min(grown, self.pool.n_blocks))

    def _release(self, s: Sequence) -> None:
        self.pool.release(s.blocks)
        self.promised -= s.promised
        s.blocks, s.promised = [], 0

    def _register(self, s: Sequence, written: int) -> None:
        """Offer s's full blocks to later prompts once their slots 0..written-1 are written in every layer (with
        speculation the key holds the token after the block too, so that token must exist)."""
        if not self.config.prefix_cache or s.params.prompt_logprobs is not None:
            return
        size = self.block_size
        if s.mtp_written is not None:  # no longer drafting: later blocks lack the MTP layer's slots
            written = min(written, s.mtp_written)
        n_full = min(written, s.length - (1 if self.speculative else 0)) // size
        if n_full <= len(s.keys):
            return
        tokens = (s.prompt + s.tokens)[len(s.keys) * size : n_full * size + (1 if self.speculative else 0)]
        new = block_keys(tokens, size, self.speculative, s.keys[-1] if s.keys else ROOT)
        for block, key in zip(s.blocks[len(s.keys) :], new):
            self.pool.register(block, key)
        s.keys += new

    # ----- phases ------------------------------------------------------------------------------------
    def _drop_cancelled(self) -> list[Sequence]:
        dropped = [s for s in itertools.chain(self.waiting, self.prefilling, self.running)
                   if s.cancelled and not s.done]
        for s in dropped:
            s.finish_reason = "cancelled"
        self.waiting = deque(s for s in self.waiting if not s.done)
        self.prefilling = [s for s in self.prefilling if not s.done]
        return dropped

    def _admit(self) -> None:
        """Move waiting sequences to prefilling, in order, while a batch slot is free and the pool can promise
        each its worst case. A prompt's leading cached blocks are taken, not promised."""
        size = self.block_size
        while self.waiting and self.free_slots > 0:
            s = self.waiting[0]
            keys = []
            if self.config.prefix_cache and s.params.prompt_logprobs is None:
                # at least the last prompt token is computed: its logits start decoding
                keys = block_keys(s.prompt[: len(s.prompt) - 1 + (1 if self.speculative else 0)], size,
                                  self.speculative)
            shared = self.pool.lookup(keys)
            needed = self._worst_blocks(len(s.prompt), s.params) - len(shared)
            if needed > self.pool.available - self.pool.reclaimable(shared) - self.promised:
                return  # wait for blocks to come back
            self.waiting.popleft()
            self.pool.take(shared)
            s.blocks, s.keys, s.cached = shared, keys[: len(shared)], len(shared) * size
            s.promised = needed
            self.promised += needed
            if self.config.prefix_cache and s.params.prompt_logprobs is None:
                self.stats.prefix_lookup_tokens += len(s.prompt)
                self.stats.prefix_hit_tokens += s.cached
            self.prefilling.append(s)

    def _prefill(self) -> list[Sequence]:
        """Prefill the prefilling sequences in one right-padded batch, at most `prefill_chunk` prompt tokens in
        all (each sequence from where it stands); those whose prompt is complete get their first token and
        start running. Padding sits past each row's chunk: it writes slots that the row's own later tokens
        overwrite before anything attends to them, or the padding block."""
        budget = self.config.prefill_chunk or math.inf
        batch: list[tuple[Sequence, int, int]] = []
        for s in self.prefilling:
            if budget <= 0:
                break
            end = int(min(len(s.prompt), s.cached + budget))
            budget -= end - s.cached
            batch.append((s, s.cached, end))
        if not batch:
            return []
        t0 = time.perf_counter()
        T = max(end - start for _, start, end in batch)
        ids = torch.zeros(len(batch), T, dtype=torch.long)
        positions = torch.zeros(len(batch), T, dtype=torch.long)
        for i, (s, start, end) in enumerate(batch):
            self._hold(s, end)
            ids[i, : end - start] = torch.tensor(s.prompt[start:end])
            positions[i] = torch.arange(start, start + T)
        ids, positions = ids.to(self.device), positions.to(self.device)
        width = max(-(-(start + T) // self.block_size) for _, start, _ in batch)  # covers every padded position
        cache = self.cache.rows([s.blocks for s, _, _ in batch], width)
        last = torch.tensor([end - start - 1 for _, start, end in batch], device=self.device)[:, None]  # [B, 1]
        out = self.model.run(ids, positions, cache, attn="naive", logits_at=last)
        done = []
        for (s, start, end), hidden, row_logits in zip(batch, out.hidden, out.logits[:, 0]):
            with self._alone(s):
                if s.params.prompt_logprobs is not None:  # scoring: the prefill's states give every position
                    self._score_prompt(s, hidden[: end - start], start, end)
                s.cached = end
                if end < len(s.prompt):
                    continue
                done.append(s)
                if s.params.max_new_tokens == 0:
                    self._finish(s, "length")
                else:
                    self._append(s, sample(row_logits, s.params, s.generator), row_logits)
        if self.speculative:
            # MTP slot p reads (h_p, t_{p+1}): the prompt shifted by one, then the token just sampled (any
            # token where none was: the draft of a finished sequence is never read)
            next_ids = torch.zeros_like(ids)
            for i, (s, start, end) in enumerate(batch):
                following = (s.prompt + (s.tokens[:1] or [0]))[start + 1 : end + 1]
                next_ids[i, : end - start] = torch.tensor(following)
            draft = self.model.mtp_step(out.hidden, next_ids, positions, cache, attn="naive", logits_at=last)
            state = torch.take_along_dim(draft.hidden, last[..., None], dim=1)  # [B, 1, d]
            self._draft([s for s, _, _ in batch], draft.logits[:, 0], state, only=done)
        for s, _, end in batch:
            self._register(s, end)
        self.stats.prompt_tokens += sum(end - start for _, start, end in batch)
        self.stats.prefill_time += time.perf_counter() - t0
        self.prefilling = [s for s in self.prefilling if s not in done]
        self.running += done
        return [s for s, _, _ in batch if s in done or s.done]  # a chunk that left the prompt unfinished: no news

    def _score_prompt(self, s: Sequence, hidden: torch.Tensor, start: int, end: int) -> None:
        """Log-probabilities of prompt tokens start+1..end from the states of positions start..end-1."""
        if s.prompt_logprobs is None:
            s.prompt_logprobs = [None]
        n = min(end, len(s.prompt) - 1) - start  # positions whose next token is in the prompt
        if n > 0:
            s.prompt_logprobs += prompt_logprobs(self.model.logits, hidden[:n], s.prompt[start : start + n + 1],
                                                 s.params.prompt_logprobs)[1:]

    # ----- whether drafting pays -----------------------------------------------------------------------
    def _update_drafting(self) -> None:
        for s in self._drafts_that_do_not_pay():
            self.stop_drafting(s)

    def _drafts_that_do_not_pay(self) -> list[Sequence]:
        """The running sequences to stop drafting. A speculative step costs r plain steps (measured, at this
        batch size, for this engine's k drafts: a (k + 1)-token forward and k MTP blocks) and yields 1 + a
        tokens for a sequence that keeps a drafts per step on average (0 <= a <= k): drafting pays while
        a > r - 1. The yield is the sequence's own, pulled towards the engine's (DRAFT_PRIOR steps' worth)
        until it has a history of its own; before the engine has one, each draft is assumed kept at
        DRAFT_PRIOR_RATE given the earlier ones, a = sum of DRAFT_PRIOR_RATE^j over j = 1..k."""
        if not self.speculative or self.config.draft_policy != "adaptive":
            return []
        k = self.draft_tokens
        drafting = [s for s in self.running if s.drafting and not s.done]
        measured = self._cost_ratio(len(drafting))
        assumed = sum(self.DRAFT_PRIOR_RATE**j for j in range(1, k + 1))
        steps = self.stats.draft_proposed[0] if self.stats.draft_proposed else 0  # drafting steps, all sequences
        engine = self.stats.accepted / steps if steps >= self.DRAFT_PRIOR else assumed
        stop = []
        for s in drafting:
            if s.params.seed is not None and not s.params.greedy:
                # when drafting stops changes which random draws a sampled sequence makes: a seeded one decides
                # from its own drafts and a fixed cost, so that its tokens repeat whatever runs beside it
                ratio, prior = 1 + self.SEEDED_DRAFT_COST * k, assumed
            else:
                ratio, prior = measured, engine
            kept_per_step = (s.n_accepted + self.DRAFT_PRIOR * prior) / (s.n_drafted / k + self.DRAFT_PRIOR)
            if ratio is not None and kept_per_step <= ratio - 1:
                stop.append(s)
        return stop

    def stop_drafting(self, s: Sequence) -> None:
        """s decodes plainly from now on, for good: its MTP layer's cache is no longer written."""
        s.drafting, s.mtp_written, s.drafts = False, s.length - 1, []
        self.stats.stopped_drafting += 1

    def _cost_ratio(self, batch: int) -> float | None:
        """A speculative step's measured cost in plain steps, at least 1: it does strictly more work than a plain
        step (a longer forward, and the MTP blocks), so a ratio below 1 is timing noise, and read as such it would
        keep a sequence whose drafts are never kept drafting for good."""
        costs = self._step_costs.get(batch)
        return max(1.0, costs[1] / costs[0]) if costs and costs[0] and costs[1] else None

    def _record_cost(self, batch: int, kind: int, seconds: float) -> None:
        """Running mean of a plain (kind 0) or speculative (kind 1) step's time at this batch size."""
        costs = self._step_costs.setdefault(batch, [0.0, 0.0])
        costs[kind] = seconds if not costs[kind] else 0.8 * costs[kind] + 0.2 * seconds

    def _decode_step(self, active: list[Sequence]) -> None:
        ids = torch.tensor([[s.tokens[-1]] for s in active], device=self.device)  # [B, 1]
        positions = torch.tensor([[s.length - 1] for s in active], device=self.device)  # [B, 1]
        for s in active:
            self._hold(s, s.length)
        cache = self.cache.rows([s.blocks for s in active])
        t0 = time.perf_counter()
        logits = self.model.run(ids, positions, cache, attn="absorb").logits[:, -1]  # [B, V]
        self._record_cost(len(active), 0, time.perf_counter() - t0)
        if all(s.params.greedy for s in active):
            for s, t, row_logits in zip(active, logits.argmax(dim=-1).tolist(), logits):
                self._append(s, t, row_logits)
        else:
            for s, row_logits in zip(active, logits):
                with self._alone(s):
                    self._append(s, sample(row_logits, s.params, s.generator), row_logits)

    def _speculative_step(self, active: list[Sequence]) -> None:
        """Feed [last token, d_1..d_k] at [n..n+k]: position n+j-1's logits judge d_j, and once a draft is
        rejected (or after the last) they give the next token. Then MTP drafts again from wherever each row
        ended."""
        k = self.draft_tokens
        ids = torch.tensor([[s.tokens[-1]] + [d.token for d in s.drafts] for s in active],
                           device=self.device)  # [B, k + 1]
        positions = torch.tensor([list(range(s.length - 1, s.length + k)) for s in active],
                                 device=self.device)  # [B, k + 1]
        for s in active:
            self._hold(s, s.length + k)
        cache = self.cache.rows([s.blocks for s in active])
        B = len(active)
        if self.config.draft_policy == "adaptive" and (B not in self._step_costs or self.stats.decode_steps %
                                                       self.RECALIBRATE == 0):
            # what a plain step would cost here: the same forward for the last tokens alone. It writes slot n
            # with the very values the speculative forward writes there next, so it changes nothing. At a new
            # batch size it runs twice and only the second is timed: the first pays the shape's one-time costs.
            for _ in range(1 if B in self._step_costs else 2):
                t0 = time.perf_counter()
                self.model.run(ids[:, :1], positions[:, :1], cache, attn="absorb")
            self._record_cost(B, 0, time.perf_counter() - t0)
        t0 = time.perf_counter()
        out = self.model.run(ids, positions, cache, attn="absorb")  # logits [B, k+1, V], hidden [B, k+1, d]
        next_ids = torch.zeros_like(ids)
        accepted = []
        for i, s in enumerate(active):
            new = [s.tokens[-1]]  # what a failed verification leaves: nothing new (the sequence is finished then)
            with self._alone(s):
                new = verify(out.logits[i], s.drafts, s.params, s.generator)
                s.n_drafted += k
                s.n_accepted += len(new) - 1
                self.stats.record_drafts(k, len(new) - 1)
                for t, row_logits in zip(new, out.logits[i]):
                    self._append(s, t, row_logits)
            accepted.append(len(new) - 1)
            # MTP slot n+j reads t_{n+j+1} = new[j]; slots past the kept tokens are never read
            next_ids[i] = torch.tensor(new + new[-1:] * (k + 1 - len(new)))
        # the next draft is read at each row's last real position: n + the number of drafts kept
        pick = torch.tensor(accepted, device=self.device)[:, None]  # [B, 1]
        draft = self.model.mtp_step(out.hidden, next_ids, positions, cache, attn="absorb", logits_at=pick)
        self._draft(active, draft.logits[:, 0], torch.take_along_dim(draft.hidden, pick[..., None], dim=1))
        self._record_cost(B, 1, time.perf_counter() - t0)

    def _draft(self, seqs: list[Sequence], logits: torch.Tensor, state: torch.Tensor,
               only: list[Sequence] | None = None) -> None:
        """Each running sequence's k drafts (of those in `only`, when given), from MTP's logits [B, V] and the
        module's output state [B, 1, d] at its last written MTP slot n-1. The first draft (for n+1) is read
        from the logits; each further one is MTP module 1 applied again, to its own last state and the draft
        before, at the next position (n, then n+1, ...), which writes that MTP slot provisionally."""
        rows = [i for i, s in enumerate(seqs) if not s.done and (only is None or s in only)]
        for i in rows:
            with self._alone(seqs[i]):
                seqs[i].drafts = [draft_token(logits[i], seqs[i].params, seqs[i].generator)]
        for j in range(1, self.draft_tokens):
            rows = [i for i in rows if not seqs[i].done]  # a sequence whose own drafting failed is finished
            if not rows:
                return
            chain = [seqs[i] for i in rows]
            for s in chain:
                self._hold(s, s.length + j - 1)
            ids = torch.tensor([[s.drafts[-1].token] for s in chain], device=self.device)  # [B', 1]
            positions = torch.tensor([[s.length + j - 2] for s in chain], device=self.device)  # [B', 1]
            out = self.model.mtp_step(state[rows], ids, positions, self.cache.rows([s.blocks for s in chain]),
                                      attn="absorb")
            state[rows] = out.hidden  # [B', 1, d]
            for s, row_logits in zip(chain, out.logits[:, 0]):
                with self._alone(s):
                    s.drafts.append(draft_token(row_logits, s.params, s.generator))

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

