"""The paged latent cache: blocks held follow the tokens, shared prefixes are computed once, long prompts are
prefilled in chunks between decode steps, and no block outlives its requests. Every comparison is with the
tokens of a cold, unchunked run: reuse and chunking change when work is done, never what comes out."""

from __future__ import annotations

import pytest
import torch
from infer_models import one_thread, trained_tiny

from dsv3.infer import Engine, SamplingParams
from dsv3.infer.blocks import BlockPool, PoolFull, block_keys


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_thread():
        yield


def greedy(n: int) -> SamplingParams:
    _, tok, _ = trained_tiny()
    return SamplingParams(max_new_tokens=n, stop_token_ids=(tok.eos_id,))


def engine(**kw) -> Engine:
    model, tok, _ = trained_tiny()
    return Engine(model, tok, **{"max_batch": 4, "cache_dtype": "fp32", "block_size": 8, **kw})


def prompts() -> list[list[int]]:
    _, tok, _ = trained_tiny()
    system = tok.encode("multi token prediction drafts the next token and the model checks it. " * 2, bos=True)
    return [system + tok.encode(q) for q in (" the latent cache", " a server", " experts are")]


def test_block_pool_counts_references_and_evicts_the_oldest_cached_block():
    pool = BlockPool(4, 2)  # blocks 1..3
    a, b = pool.allocate(), pool.allocate()
    keys = block_keys([1, 2, 3, 4], 2, lookahead=False)
    pool.register(a, keys[0])
    pool.register(b, keys[1])
    assert pool.lookup(keys) == [a, b] and pool.lookup(block_keys([1, 2, 9, 9], 2, False)) == [a]
    pool.take([a])  # a second sequence shares block a
    pool.release([a, b])
    assert pool.in_use == 1 and pool.available == 2  # b is cached, unreferenced: reclaimable
    pool.release([a])
    c, d = pool.allocate(), pool.allocate()  # the free block first, then the oldest cached one (b)
    assert (c, d) == (3, b) and pool.lookup(keys) == [a]
    pool.allocate()  # a, cached, is evicted for it
    with pytest.raises(PoolFull):
        pool.allocate()


@pytest.mark.parametrize("speculative", [False, True])
def test_prefix_hits_give_exactly_the_tokens_of_a_cold_run(speculative):
    cold = [engine(prefix_cache=False, speculative=speculative).generate([p], greedy(24))[0].tokens
            for p in prompts()]
    warm = engine(speculative=speculative)
    first = warm.generate(prompts()[:1], greedy(24))[0]
    rest = warm.generate(prompts()[1:], greedy(24))
    assert [first.tokens] + [s.tokens for s in rest] == cold
    shared = (len(prompts()[0]) - 1) // 8 * 8  # every full block of the common system prompt but the last token's
    assert warm.stats.prefix_hit_tokens >= 2 * (shared - 8)
    again = warm.generate(prompts(), greedy(24))  # whole prompts cached now, each up to its last token
    assert [s.tokens for s in again] == cold and warm.stats.prefix_hit_rate > 0.5
    assert warm.pool.in_use == 0 and warm.promised == 0


def test_chunked_prefill_gives_exactly_the_unchunked_result():
    model, tok, _ = trained_tiny()
    whole = engine(prefix_cache=False).generate(prompts(), SamplingParams(max_new_tokens=16, logprobs=1,
                                                                          prompt_logprobs=1))
    chunked = engine(prefix_cache=False, prefill_chunk=5)
    seqs = [chunked.add(p, SamplingParams(max_new_tokens=16, logprobs=1, prompt_logprobs=1)) for p in prompts()]
    steps = 0
    while chunked.has_work():
        chunked.step()
        steps += 1
    assert steps > sum(len(p) for p in prompts()) // 5  # the prompts really were spread over the steps
    for a, b in zip(whole, seqs):
        assert a.tokens == b.tokens
        assert all(abs(x.logprob - y.logprob) < 1e-5 for x, y in zip(a.logprobs, b.logprobs))
        assert all(x is y is None or abs(x.logprob - y.logprob) < 1e-5
                   for x, y in zip(a.prompt_logprobs, b.prompt_logprobs, strict=True))


def test_chunked_prefill_keeps_running_streams_moving():
    """While a long prompt prefills in chunks, a running sequence gets a token every step."""
    e = engine(prefill_chunk=8, prefix_cache=False)
    running = e.add(prompts()[0], greedy(40))
    e.step()
    long = e.add(prompts()[1] * 4, greedy(4))
    before = len(running.tokens)
    steps = 0
    while len(long.tokens) == 0:
        e.step()
        steps += 1
    assert steps >= len(long.prompt) // 8 and len(running.tokens) - before == min(steps, 40 - before)


def test_the_pool_holds_what_the_tokens_need_and_admits_by_it():
    """A budget of 12 blocks of 8 fits every short request at once, where rows of the full context fit none
    of four; a request wider than the whole pool is refused outright."""
    e = engine(max_batch=8, cache_tokens=12 * 8, prefix_cache=False)
    short = [[1, 5 + i, 7] for i in range(6)]
    seqs = [e.add(p, greedy(8)) for p in short]  # 3 + 8 tokens: 2 blocks each, 12 in all
    e.step()
    assert len(e.running) == 6 and e.pool.in_use <= 12
    while e.has_work():
        e.step()
    assert all(len(s.tokens) > 0 for s in seqs) and e.pool.in_use == 0 and e.promised == 0
    with pytest.raises(ValueError, match="cache holds 96"):
        e.add(list(range(1, 60)), greedy(60))


def test_no_block_outlives_its_request_cancelled_or_failed(monkeypatch):
    e = engine(speculative=True, prefill_chunk=6)
    seqs = [e.add(p, greedy(30)) for p in prompts()]
    e.step()
    e.cancel(seqs[0])  # mid-prefill or mid-decode
    e.step()
    e.cancel(seqs[1])
    e.step()
    assert e.pool.in_use > 0
    while e.has_work():
        e.step()
    assert e.pool.in_use == 0 and e.promised == 0
    # a failure inside a step ends everything in flight; abort_all gives every block back
    seqs = [e.add(p, greedy(30)) for p in prompts()]
    e.step()

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(e.model, "run", broken)
    with pytest.raises(RuntimeError):
        e.step()
    e.abort_all()
    assert e.pool.in_use == 0 and e.promised == 0 and not e.has_work()
    monkeypatch.undo()
    assert e.generate(prompts()[:1], greedy(4))[0].finish_reason == "length"


def test_fp8_and_bf16_paged_caches_decode_like_the_row_cache_did():
    model, tok, _ = trained_tiny()
    for dtype in ("bf16", "fp8"):
        seq = Engine(model, tok, cache_dtype=dtype, block_size=4).generate([tok.encode("the latent cache")],
                                                                          SamplingParams(max_new_tokens=20))[0]
        assert seq.text.startswith(" keeps five hundred"), dtype


def test_paged_reads_equal_contiguous_rows():
    """The model over a paged cache whose blocks are scattered equals the model over a row cache."""
    from dsv3.model.cache import PagedLatentCache, new_cache

    model, _, _ = trained_tiny()
    cfg = model.config
    ids = torch.randint(0, cfg.vocab_size, (2, 21))
    rows = new_cache(cfg, 2, 32, "fp32")
    paged = PagedLatentCache(cfg, 4, "fp32", n_blocks=16)
    tables = [[9, 2, 14, 5, 7, 3], [1, 12, 4, 8, 15, 6]]
    with torch.inference_mode():
        want = model.run(ids[:, :13], cache=rows).logits
        got = model.run(ids[:, :13], cache=paged.rows(tables)).logits
        torch.testing.assert_close(got, want)
        positions = torch.arange(13, 21).expand(2, 8)
        want = model.run(ids[:, 13:], positions, rows, attn="absorb").logits
        got = model.run(ids[:, 13:], positions, paged.rows(tables), attn="absorb").logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_one_row_of_consecutive_blocks_reads_as_a_view_and_equals_the_row_cache():
    from dsv3.model.cache import PagedLatentCache, new_cache

    model, _, _ = trained_tiny()
    cfg = model.config
    ids = torch.randint(0, cfg.vocab_size, (1, 19))
    for dtype in ("fp32", "fp8"):
        rows = new_cache(cfg, 1, 24, dtype)
        paged = PagedLatentCache(cfg, 4, dtype, n_blocks=12)
        view = paged.rows([[3, 4, 5, 6, 7]])
        assert view.first == 12  # block 3's first slot: the row is read without a gather
        with torch.inference_mode():
            want = model.run(ids[:, :11], cache=rows).logits
            got = model.run(ids[:, :11], cache=view).logits
            torch.testing.assert_close(got, want)
            positions = torch.arange(11, 19)[None]
            want = model.run(ids[:, 11:], positions, rows, attn="absorb").logits
            got = model.run(ids[:, 11:], positions, view, attn="absorb").logits
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
