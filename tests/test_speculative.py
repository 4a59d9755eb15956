"""Drafting two tokens per step by applying MTP module 1 twice (`draft_tokens=2`): greedy output is plain
decoding's, the drafts are the chain computed without a cache, acceptance is counted per draft position, the
sampled rule keeps the target distribution at each position, and the option reaches the CLI and /health."""

from __future__ import annotations

import asyncio

import pytest
import torch
from infer_models import TEXT, one_thread, random_tiny, trained_tiny

from dsv3.cli import main
from dsv3.errors import InvalidValue
from dsv3.infer import Engine, SamplingParams
from dsv3.infer.sampling import probabilities
from dsv3.infer.speculative import Draft, verify


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_thread():
        yield


def engine(**kw) -> Engine:
    model, tok, _ = trained_tiny()
    return Engine(model, tok, **{"max_batch": 3, "cache_dtype": "fp32", "block_size": 4, **kw})


def prompts() -> list[list[int]]:
    """Prompts of 3 to 13 tokens from the training text: with blocks of 4 some end on a block boundary, most
    cross one, and decoding crosses many more."""
    _, tok, _ = trained_tiny()
    ids = tok.encode(TEXT)
    return [ids[start : start + n] for start, n in ((0, 3), (11, 4), (23, 5), (40, 7), (57, 8), (70, 9), (90, 13))]


def reference_drafts(model, ids: list[int]) -> list[int]:
    """The two greedy drafts for the positions after ids[-1] (at position n), computed without a cache: MTP
    module 1 over (h_p, t_{p+1}) for p < n gives d1 at p = n-1; the module again over its own state there and
    d1, at position n, gives d2."""
    n = len(ids) - 1
    with torch.no_grad():
        h = model.run(torch.tensor([ids[:n]])).hidden  # [1, n, d]
        first = model.mtp_step(h, torch.tensor([ids[1:]]), torch.arange(n)[None])
        d1 = int(first.logits[0, -1].argmax())
        chained = torch.cat([h, first.hidden[:, -1:]], dim=1)  # [1, n + 1, d]: h_0..h_{n-1}, then h'_{n-1}
        second = model.mtp_step(chained, torch.tensor([ids[1:] + [d1]]), torch.arange(n + 1)[None])
    return [d1, int(second.logits[0, -1].argmax())]


def test_two_drafts_give_plain_greedy_output_across_blocks_and_batches():
    """Seven prompts through three batch slots (continuous batching), blocks of 4 positions: every sequence's
    tokens are plain decoding's, and two drafts take fewer steps than one."""
    params = SamplingParams(max_new_tokens=30)
    plain = [s.tokens for s in engine().generate(prompts(), params)]
    steps = {}
    for k in (1, 2):
        e = engine(speculative=True, draft_policy="always", draft_tokens=k)
        assert [s.tokens for s in e.generate(prompts(), params)] == plain, f"draft_tokens={k}"
        assert e.pool.in_use == 0 and e.promised == 0
        steps[k] = e.stats.decode_steps
    assert steps[2] < steps[1]


def test_two_drafts_with_prefix_sharing_and_chunked_prefill_give_the_cold_tokens():
    _, tok, _ = trained_tiny()
    system = tok.encode("multi token prediction drafts the next token and the model checks it. ", bos=True)
    shared = [system + tok.encode(q) for q in (" the latent cache", " a server", " experts are")]
    params = SamplingParams(max_new_tokens=20)
    cold = [s.tokens for s in engine(prefix_cache=False).generate(shared, params)]
    warm = engine(speculative=True, draft_tokens=2, draft_policy="always", prefill_chunk=6)
    assert [warm.generate([p], params)[0].tokens for p in shared] == cold
    assert warm.stats.prefix_hit_tokens > 0
    assert [s.tokens for s in warm.generate(shared, params)] == cold
    assert warm.pool.in_use == 0 and warm.promised == 0


def test_drafts_are_the_chain_computed_without_a_cache():
    """After the prefill and after every speculative step (drafts kept or rejected, slots rolled back), the
    engine's drafts are MTP module 1 applied once and then again to its own output, over the sequence so far:
    the MTP layer's cache holds exactly the accepted tokens' rows."""
    model, tok, _ = trained_tiny()
    e = engine(speculative=True, draft_tokens=2, draft_policy="always", max_batch=2)
    seqs = [e.add(tok.encode(p), SamplingParams(max_new_tokens=24)) for p in ("the latent cache", "a server batches")]
    checked = 0
    while e.has_work():
        e.step()
        for s in seqs:
            if not s.done:
                assert [d.token for d in s.drafts] == reference_drafts(model, s.prompt + s.tokens)
                checked += 1
    assert checked > 10 and 0 < e.stats.draft_accepted[1] < e.stats.draft_proposed[1]  # both outcomes at 2


def test_acceptance_is_counted_per_draft_position():
    e = engine(speculative=True, draft_tokens=2, draft_policy="always")
    seqs = e.generate(prompts(), SamplingParams(max_new_tokens=30))
    s = e.stats
    assert len(s.draft_proposed) == len(s.draft_accepted) == 2
    assert s.draft_proposed[0] == s.draft_proposed[1] > 0  # both positions are verified on every drafting step
    assert 0 < s.draft_accepted[1] <= s.draft_accepted[0] <= s.draft_proposed[0]  # the second needs the first
    assert s.accepted == sum(q.n_accepted for q in seqs) and s.drafted == sum(q.n_drafted for q in seqs)
    rates = s.acceptance_by_position
    assert rates == [s.draft_accepted[0] / s.draft_proposed[0], s.draft_accepted[1] / s.draft_proposed[1]]
    assert rates[1] <= rates[0] and s.acceptance == s.accepted / s.drafted
    # each drafting step gives 1 + the drafts kept, less what runs past a sequence's last token (< 3 per sequence)
    surplus = s.draft_proposed[0] + s.accepted - sum(len(q.tokens) - 1 for q in seqs)
    assert 0 <= surplus <= 2 * len(seqs)


def test_sampled_verification_keeps_the_target_distribution_at_each_position():
    """Drafts from poor distributions q1, q2: the first token kept is distributed as p1 and, when d1 was kept,
    the second as p2; d1 is kept at rate sum min(p1, q1) and d2, given d1, at sum min(p2, q2)."""
    target = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0], [-1.0, 0.0, 1.5, 0.5, 0.0], [0.0] * 5])  # [3, V]
    params = SamplingParams(temperature=1.0)
    p1, p2 = probabilities(target[0], params), probabilities(target[1], params)
    q1, q2 = torch.tensor([0.05, 0.05, 0.1, 0.4, 0.4]), torch.tensor([0.4, 0.3, 0.1, 0.1, 0.1])
    g = torch.Generator().manual_seed(0)
    first, second = torch.zeros(5), torch.zeros(5)
    n, kept1, kept2 = 8000, 0, 0
    for _ in range(n):
        d1, d2 = int(torch.multinomial(q1, 1, generator=g)), int(torch.multinomial(q2, 1, generator=g))
        out = verify(target, [Draft(d1, q1), Draft(d2, q2)], params, g)
        assert 1 <= len(out) <= 3
        first[out[0]] += 1
        if len(out) > 1:
            kept1 += 1
            second[out[1]] += 1
            kept2 += len(out) == 3
    assert torch.allclose(first / n, p1, atol=0.02)
    assert torch.allclose(second / kept1, p2, atol=0.03)
    assert abs(kept1 / n - float(torch.minimum(p1, q1).sum())) < 0.02
    assert abs(kept2 / kept1 - float(torch.minimum(p2, q2).sum())) < 0.03


def test_greedy_verification_keeps_the_leading_matches():
    logits = torch.eye(4)[[2, 3, 1]] * 5  # argmax 2 at n, 3 at n+1, 1 at n+2
    params = SamplingParams()
    assert verify(logits, [Draft(2), Draft(3)], params, None) == [2, 3, 1]  # both kept, and the bonus
    assert verify(logits, [Draft(2), Draft(0)], params, None) == [2, 3]  # d2 corrected
    assert verify(logits, [Draft(0), Draft(3)], params, None) == [2]  # d1 rejected: d2 is not looked at


def test_sampled_two_drafts_are_seeded():
    _, tok, _ = trained_tiny()
    params = SamplingParams(max_new_tokens=20, temperature=0.8, top_p=0.95, seed=7)
    runs = [engine(speculative=True, draft_tokens=2).generate([tok.encode("a server")], params)[0].tokens
            for _ in range(2)]
    assert runs[0] == runs[1] and len(runs[0]) == 20


def test_adaptive_policy_stops_two_drafts_that_do_not_pay():
    """A random model's MTP module is almost never right: each sequence stops drafting within a few steps and
    the output stays plain greedy decoding's."""
    model = random_tiny()
    prompts = [[1, 2, 3, 4], [7, 8, 9]]
    params = SamplingParams(max_new_tokens=40)
    plain = Engine(model, max_batch=2, cache_dtype="fp32").generate(prompts, params)
    adaptive = Engine(model, max_batch=2, cache_dtype="fp32", speculative=True, draft_tokens=2)
    seqs = adaptive.generate(prompts, params)
    assert [s.tokens for s in seqs] == [s.tokens for s in plain]
    assert adaptive.stats.stopped_drafting == 2 and adaptive.stats.draft_proposed[0] < 20


def test_drafts_never_kept_stop_even_when_timing_noise_makes_speculation_look_free(monkeypatch):
    """A loaded machine can time a speculative step below a plain one; the policy reads such a ratio as 1 (the
    speculative step does more work), so a sequence whose drafts are never kept still stops drafting."""
    model = random_tiny()
    record = Engine._record_cost
    monkeypatch.setattr(Engine, "_record_cost", lambda self, batch, kind, seconds:
                        record(self, batch, kind, 1.0 if kind == 0 else 0.7))  # speculation timed at 0.7 plain steps
    adaptive = Engine(model, max_batch=2, cache_dtype="fp32", speculative=True)
    adaptive.generate([[1, 2, 3, 4], [7, 8, 9]], SamplingParams(max_new_tokens=40))
    assert adaptive._cost_ratio(2) == 1.0
    assert adaptive.stats.stopped_drafting == 2 and adaptive.stats.draft_proposed[0] < 20


@pytest.mark.parametrize("value", [0, 3, 2.0, True])
def test_draft_tokens_must_be_one_or_two(value):
    model, _, _ = trained_tiny()
    with pytest.raises(InvalidValue, match="draft_tokens"):
        Engine(model, speculative=True, draft_tokens=value)


def test_generate_with_two_drafts_prints_plain_text_and_acceptance_per_position(capsys):
    _, _, directory = trained_tiny()
    args = ["generate", "--model", directory, "--dtype", "fp32", "--max-new-tokens", "24", "--stats"]
    assert main([*args, "the latent cache"]) == 0
    plain = capsys.readouterr()
    assert main([*args, "--speculative", "mtp", "--draft-tokens", "2", "the latent cache"]) == 0
    spec = capsys.readouterr()
    assert spec.out == plain.out
    assert "MTP acceptance" in spec.err and "by draft position 1: " in spec.err and ", 2: " in spec.err


def test_a_bad_draft_tokens_value_exits_2_with_a_sentence(capsys):
    _, _, directory = trained_tiny()
    assert main(["generate", "--model", directory, "--speculative", "mtp", "--draft-tokens", "3", "hello"]) == 2
    err = capsys.readouterr().err
    assert "--draft-tokens 3 must be 1 or 2" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_health_reports_acceptance_per_draft_position():
    pytest.importorskip("fastapi")
    from dsv3.serve.app import ServerConfig, create_app

    e = engine(speculative=True, draft_tokens=2, draft_policy="always")
    e.generate(prompts()[:2], SamplingParams(max_new_tokens=12))
    app = create_app(e, e.tokenizer, ServerConfig(model_name="t"))
    health = next(r.endpoint for r in app.routes if getattr(r, "path", None) == "/health")
    body = asyncio.run(health())
    assert body["draft_tokens"] == 2 and body["mtp_draft_proposed"] == e.stats.draft_proposed
    assert body["mtp_draft_accepted"] == e.stats.draft_accepted
    assert body["mtp_acceptance_by_position"] == e.stats.acceptance_by_position


def test_two_drafts_on_a_sparse_attention_model_give_the_reference_tokens():
    """V3.2's indexer keys are cached beside the latent and rolled back the same way."""
    from dsv3 import DeepSeekV3, preset

    torch.manual_seed(0)
    model = DeepSeekV3(preset("tiny-dsa").replace(max_position_embeddings=256)).eval()
    model.init_weights(std=0.05)
    prompts = [torch.randint(3, 512, (n,)).tolist() for n in (5, 21, 30)]
    plain = Engine(model, None, max_batch=3, cache_dtype="fp32", block_size=8)
    want = [s.tokens for s in plain.generate(prompts, SamplingParams(max_new_tokens=12))]
    spec = Engine(model, None, max_batch=3, cache_dtype="fp32", block_size=8, speculative=True, draft_tokens=2,
                  draft_policy="always")
    assert [s.tokens for s in spec.generate(prompts, SamplingParams(max_new_tokens=12))] == want
