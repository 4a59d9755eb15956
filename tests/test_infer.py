"""The inference engine, sampling, speculative decoding, streaming text, chat templates and the CLI verbs."""

import io
import json
import re
import shutil
import sys

import pytest
import torch
from infer_models import assert_same_or_near_tie, one_thread, random_tiny, trained_tiny

from dsv3.chat_template import ChatTemplate, deepseek_v3_format
from dsv3.cli import main
from dsv3.errors import InvalidValue
from dsv3.infer import Engine, SamplingParams
from dsv3.infer.sampling import probabilities, sample
from dsv3.infer.speculative import Draft, verify
from dsv3.infer.text import TextStream
from dsv3.model.cache import LatentCache
from dsv3.tokenizer import ByteTokenizer

GREEDY = SamplingParams(max_new_tokens=12)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_thread():
        yield


def reference_greedy(model, prompt, n):
    """Greedy decoding the slow, obvious way: the whole sequence through the model for every token."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt) :]


# ----- sampling ------------------------------------------------------------------------------------
def test_top_k_and_top_p_filter_the_distribution():
    logits = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0])
    full = logits.softmax(-1)
    p = probabilities(logits, SamplingParams(temperature=1.0, top_k=2))
    assert torch.allclose(p, torch.cat([full[:2] / full[:2].sum(), torch.zeros(3)]))
    # top_p: the smallest set of likeliest tokens whose mass reaches top_p (0.64 + 0.24 >= 0.8)
    p = probabilities(logits, SamplingParams(temperature=1.0, top_p=0.8))
    assert (p > 0).tolist() == [True, True, False, False, False] and abs(float(p.sum()) - 1) < 1e-6
    assert torch.allclose(probabilities(logits, SamplingParams(temperature=2.0)), (logits / 2).softmax(-1))
    assert sample(logits, SamplingParams(temperature=0.0), torch.Generator()) == 0


def test_seeded_sampling_repeats_and_follows_the_distribution():
    logits = torch.tensor([1.0, 0.5, 0.0, -1.0])
    params = SamplingParams(temperature=0.7, seed=5)
    g1, g2 = params.generator(), params.generator()
    draws = [sample(logits, params, g1) for _ in range(4000)]
    assert draws[:50] == [sample(logits, params, g2) for _ in range(50)]
    freq = torch.bincount(torch.tensor(draws), minlength=4) / len(draws)
    assert torch.allclose(freq, (logits / 0.7).softmax(-1), atol=0.03)


def test_bad_sampling_values_are_rejected():
    for bad in ({"temperature": -1}, {"top_p": 0.0}, {"top_p": 1.5}, {"top_k": -2}, {"max_new_tokens": 0}):
        with pytest.raises(ValueError):
            SamplingParams(**bad)


# ----- streaming text --------------------------------------------------------------------------------
def test_text_stream_pieces_join_to_the_whole_text_across_split_characters():
    tok = ByteTokenizer()
    text = "naïve café — 数字 🙂 done"
    stream = TextStream(tok)
    pieces = [stream.push(t) for t in tok.encode(text)] + [stream.finish()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)  # a character is released only once all its bytes are in
    assert sum(1 for p in pieces if p) > 10  # and text flows as it comes, not all at the end


def test_text_stream_stop_strings_cut_the_text_and_hold_back_prefixes():
    tok = ByteTokenizer()
    stream = TextStream(tok, stop=["END", "\n\n"])
    released = "".join(stream.push(t) for t in tok.encode("abc EN"))
    assert released == "abc "  # "EN" may still become "END": held back
    released += "".join(stream.push(t) for t in tok.encode(" more text E"))
    assert released == "abc EN more text " and not stream.stopped
    released += "".join(stream.push(t) for t in tok.encode("ND tail"))
    assert stream.stopped and released + stream.finish() == "abc EN more text "


# ----- the engine ------------------------------------------------------------------------------------
def test_batched_latent_cache_decoding_equals_full_recomputation():
    """Prompts of different lengths decoded together over the absorbed latent cache give, each, exactly the
    tokens of the no-cache reference (up to genuine near-ties), and the same as decoding each alone."""
    model = random_tiny()
    prompts = [[5, 17, 3], [9, 1, 2, 4, 8, 16, 32, 64, 100], [7]]
    engine = Engine(model, max_batch=3, cache_dtype="fp32")
    batched = [s.tokens for s in engine.generate(prompts, GREEDY)]
    for prompt, got in zip(prompts, batched):
        assert_same_or_near_tie(model, prompt, reference_greedy(model, prompt, 12), got)
        alone = Engine(model, max_batch=1, cache_dtype="fp32").generate([prompt], GREEDY)[0].tokens
        assert_same_or_near_tie(model, prompt, alone, got)


def test_decode_sized_steps_absorbed_equal_naive_with_mtp():
    """What the engine runs for a speculative step (two tokens per row, rows at different lengths, the MTP step
    after it) gives the same logits with the absorbed attention as with the naive one."""
    model = random_tiny()
    cfg = model.config
    caches = {impl: LatentCache(cfg, 3, 16, dtype=torch.float32) for impl in ("naive", "absorb")}
    prompt = torch.randint(0, cfg.vocab_size, (3, 9))
    ids = torch.randint(0, cfg.vocab_size, (3, 2))
    positions = torch.tensor([[9, 10], [4, 5], [7, 8]])
    out = {}
    with torch.no_grad():
        for impl, cache in caches.items():
            model.run(prompt, None, cache, attn="naive")
            step = model.run(ids, positions, cache, attn=impl)
            pick = torch.tensor([[0], [1], [1]])
            draft = model.mtp_step(step.hidden, ids, positions, cache, attn=impl, logits_at=pick)
            out[impl] = (step.logits, step.hidden, draft.logits)
    for a, b in zip(out["naive"], out["absorb"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_cache_grows_with_the_requests_not_with_the_model_context():
    """A model that allows 163,840 tokens takes cache blocks as tokens arrive, and its storage grows with them."""
    model = random_tiny()
    model.config = model.config.replace(max_position_embeddings=163840)
    engine = Engine(model, max_batch=2, cache_dtype="fp32", block_size=16)
    first = engine.cache.n_blocks
    assert engine.max_len == 163840 and first == 1  # the padding block alone
    short = engine.generate([[1, 2, 3]], SamplingParams(max_new_tokens=5))[0]
    assert len(short.tokens) == 5 and engine.cache.n_blocks <= 1 + engine.GROW_TOKENS // 16
    prompt = list(range(1, 41))
    seqs = engine.generate([prompt] * 2 + [list(range(5, 300))], SamplingParams(max_new_tokens=30))
    held = engine.cache.n_blocks * 16
    assert held <= (2 * (40 + 30) + 295 + 30) * engine.GROWTH + engine.GROW_TOKENS and engine.pool.in_use == 0
    assert seqs[0].tokens == Engine(model, max_batch=1, cache_dtype="fp32").generate([prompt], SamplingParams(
        max_new_tokens=30))[0].tokens  # growing kept what was cached
    bounded = Engine(model, cache_dtype="fp32", max_len=20)
    with pytest.raises(ValueError, match="context holds 20"):
        bounded.add(list(range(1, 25)), GREEDY)
    assert bounded.generate([[1, 2]], SamplingParams(max_new_tokens=50))[0].finish_reason == "length"
    assert bounded.cache.n_blocks <= 1 + bounded.GROW_TOKENS // bounded.block_size


def test_rows_are_reused_as_sequences_finish():
    model = random_tiny()
    engine = Engine(model, max_batch=2, cache_dtype="fp32")
    params = [SamplingParams(max_new_tokens=n) for n in (3, 9, 5, 4)]
    seqs = [engine.add([i + 1, i + 2], p) for i, p in enumerate(params)]
    steps = 0
    while engine.has_work():
        engine.step()
        steps += 1
        assert len(engine.running) <= 2
    assert [len(s.tokens) for s in seqs] == [3, 9, 5, 4] and steps < 3 + 9 + 5 + 4
    assert engine.free_slots == 2 and engine.pool.in_use == 0
    for s, p in zip(seqs, params):  # a reused row holds nothing of its previous sequence
        assert s.tokens == Engine(model, max_batch=1, cache_dtype="fp32").generate([s.prompt], p)[0].tokens


def test_stop_tokens_stop_strings_and_cancel():
    model, tok, _ = trained_tiny()
    prompt = tok.encode("the latent cache")
    engine = Engine(model, tok, cache_dtype="fp32")
    free = engine.generate([prompt], SamplingParams(max_new_tokens=30))[0]
    assert free.finish_reason == "length" and len(free.tokens) == 30
    cut = engine.generate([prompt], SamplingParams(max_new_tokens=30, stop=("seventy",)))[0]
    assert cut.finish_reason == "stop" and cut.text == free.text[: free.text.index("seventy")]
    token = free.tokens[4]
    at = engine.generate([prompt], SamplingParams(max_new_tokens=30, stop_token_ids=(token,)))[0]
    assert at.finish_reason == "stop" and at.tokens == free.tokens[: free.tokens.index(token) + 1]
    seq = engine.add(prompt, SamplingParams(max_new_tokens=30))
    engine.step()
    engine.cancel(seq)
    engine.step()
    assert seq.finish_reason == "cancelled" and not engine.running and engine.free_slots == engine.max_batch
    assert engine.pool.in_use == 0
    with pytest.raises(ValueError, match="context"):
        engine.add([1] * engine.max_len, GREEDY)


def test_fp8_cache_engine_runs_and_counts_bytes():
    model, tok, _ = trained_tiny()
    engine = Engine(model, tok, cache_dtype="fp8")
    cfg = model.config
    layers = cfg.num_hidden_layers  # the MTP module's layer only when speculating
    assert engine.cache.nbytes_per_token() == layers * (cfg.kv_lora_rank + 4 + cfg.qk_rope_head_dim * 2)
    seq = engine.generate([tok.encode("the latent cache")], SamplingParams(max_new_tokens=20))[0]
    assert seq.text.startswith(" keeps five hundred")


# ----- speculative decoding -------------------------------------------------------------------------
def test_greedy_speculative_output_equals_plain_greedy():
    model, tok, _ = trained_tiny()
    prompts = [tok.encode(p) for p in ("the latent cache", "multi token", "experts are", "a server", "the model")]
    params = SamplingParams(max_new_tokens=40)
    plain = Engine(model, tok, max_batch=5, cache_dtype="fp32").generate(prompts, params)
    # drafting on every step: this is about verification, not about when drafting pays
    spec_engine = Engine(model, tok, max_batch=5, cache_dtype="fp32", speculative=True, draft_policy="always")
    spec = spec_engine.generate(prompts, params)
    for prompt, a, b in zip(prompts, plain, spec):
        assert_same_or_near_tie(model, prompt, a.tokens, b.tokens)
    acceptance = spec_engine.stats.acceptance
    assert 0.5 < acceptance < 1.0  # both verification outcomes were exercised
    assert spec_engine.stats.decode_steps < 40 * 0.8  # and accepted drafts really saved steps


def test_rejection_sampling_keeps_the_target_distribution():
    """Whatever the draft distribution q, the first kept token is distributed as the target p."""
    target = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0], [0.0, 0.0, 0.0, 0.0, 0.0]])  # [2, V] at n and n+1
    params = SamplingParams(temperature=1.0)
    p = probabilities(target[0], params)
    q = torch.tensor([0.05, 0.05, 0.1, 0.4, 0.4])  # a poor draft: most mass where p has little
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(5)
    n = 6000
    accepted = 0
    for _ in range(n):
        d = int(torch.multinomial(q, 1, generator=g))
        kept = verify(target, [Draft(d, q)], params, g)
        counts[kept[0]] += 1
        accepted += len(kept) - 1
    assert torch.allclose(counts / n, p, atol=0.02)
    assert abs(accepted / n - float(torch.minimum(p, q).sum())) < 0.02  # acceptance rate = sum min(p, q)


def test_sampled_speculative_decoding_is_seeded():
    model, tok, _ = trained_tiny()
    params = SamplingParams(max_new_tokens=20, temperature=0.8, top_p=0.95, seed=7)
    runs = [Engine(model, tok, speculative=True, cache_dtype="fp32").generate([tok.encode("a server")], params)[0]
            for _ in range(2)]
    assert runs[0].tokens == runs[1].tokens and len(runs[0].tokens) == 20


# ----- chat templates --------------------------------------------------------------------------------
def test_deepseek_v3_chat_format():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Why?"}]
    assert deepseek_v3_format(messages) == ("<｜begin▁of▁sentence｜>Be brief.<｜User｜>Hi<｜Assistant｜>Hello."
                                            "<｜end▁of▁sentence｜><｜User｜>Why?<｜Assistant｜>")
    assert ChatTemplate().render(messages) == deepseek_v3_format(messages)


def test_chat_template_from_the_model_directory(tmp_path):
    template = ("{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                "{% if add_generation_prompt %}[assistant] {% endif %}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template, "bos_token": "<s>"}))
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    rendered = ChatTemplate.from_config(config).render([{"role": "user", "content": "hello"}])
    assert rendered == "<s>[user] hello\n[assistant] "
    assert ChatTemplate.from_config({}).source is None  # no template: DeepSeek-V3's format
    with pytest.raises(ValueError, match="role"):
        ChatTemplate().render([{"role": "robot", "content": "x"}])


# ----- the command line ------------------------------------------------------------------------------
def test_generate_preset_quick_start(capsys):
    assert main(["generate", "--preset", "tiny", "--max-new-tokens", "16", "--seed", "3", "The latent cache"]) == 0
    first = capsys.readouterr().out
    assert main(["generate", "--preset", "tiny", "--max-new-tokens", "16", "--seed", "3", "The latent cache"]) == 0
    assert capsys.readouterr().out == first and len(first.strip()) > 0  # seeded: the same weights, the same text


def test_generate_from_a_model_directory_with_speculation(capsys):
    model, tok, directory = trained_tiny()
    args = ["generate", "--model", directory, "--dtype", "fp32", "--max-new-tokens", "24", "--stats"]
    assert main([*args, "the latent cache"]) == 0
    plain = capsys.readouterr()
    assert plain.out.startswith(" keeps five hundred") and "tok/s" in plain.err
    assert main([*args, "--speculative", "mtp", "the latent cache"]) == 0
    spec = capsys.readouterr()
    assert spec.out == plain.out and "MTP acceptance" in spec.err


def test_generate_on_a_long_context_model_allocates_what_the_request_needs(tmp_path, capsys):
    """A config that allows 163,840 tokens (V3's) gets a cache of prompt + new tokens, not of 163,840."""
    _, tok, directory = trained_tiny()
    long = tmp_path / "long"
    shutil.copytree(directory, long)
    config = json.loads((long / "config.json").read_text())
    (long / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 163840}))
    prompt = "the latent cache"
    assert main(["generate", "--model", str(long), "--max-new-tokens", "16", "--stats", prompt]) == 0
    stats = capsys.readouterr().err
    blocks, size = re.search(r"cache: (\d+) block\(s\) of (\d+) tokens held", stats).groups()
    assert int(blocks) == -(-(len(tok.encode(prompt, bos=True)) + 16) // int(size))


def test_chat_streams_answers_over_several_turns(monkeypatch, capsys):
    model, tok, directory = trained_tiny()
    monkeypatch.setattr(sys, "stdin", io.StringIO("the latent cache\nmulti token\n/reset\nmulti token\n"))
    assert main(["chat", "--model", directory, "--max-new-tokens", "8", "--temperature", "0",
                 "--cache-dtype", "fp32", "--dtype", "fp32"]) == 0
    lines = capsys.readouterr().out.splitlines()
    engine = Engine(model, tok, cache_dtype="fp32")
    params = SamplingParams(max_new_tokens=8, stop_token_ids=(tok.eos_id,))

    def answer(*turns):
        messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]
        return engine.generate([tok.encode(deepseek_v3_format(messages))], params)[0].text

    first = answer("the latent cache")
    # the second turn continues the conversation so far; after /reset the same question starts afresh
    expected = [first, answer("the latent cache", first, "multi token"), answer("multi token")]
    assert lines == expected and all(line.strip() for line in lines) and expected[1] != expected[2]


def test_cli_errors_are_one_line(capsys, tmp_path):
    assert main(["generate", "--model", str(tmp_path / "missing"), "hello"]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err
    assert main(["generate", "--preset", "tiny", "--top-p", "2", "hello"]) == 2
    assert "--top-p 2.0 must be a number in (0, 1]" in capsys.readouterr().err
    assert main(["generate", "--preset", "tiny", "--max-len", "1", "hello"]) == 2
    assert "--max-len 1 must be an integer of at least 2 tokens" in capsys.readouterr().err


def test_sequences_stop_drafting_when_it_does_not_pay_and_the_output_stays_greedy():
    """A random model's MTP module is right about 1 time in the vocabulary size: with the adaptive policy each
    sequence stops drafting within a few steps (a speculative step measurably costs more than a plain one),
    with "always" none does, and the greedy tokens are plain decoding's either way."""
    model = random_tiny()
    prompts = [[1, 2, 3, 4], [7, 8, 9]]
    params = SamplingParams(max_new_tokens=40)
    plain = Engine(model, max_batch=2, cache_dtype="fp32").generate(prompts, params)
    adaptive = Engine(model, max_batch=2, cache_dtype="fp32", speculative=True)
    always = Engine(model, max_batch=2, cache_dtype="fp32", speculative=True, draft_policy="always")
    runs = {}
    for name, engine in (("adaptive", adaptive), ("always", always)):
        runs[name] = engine.generate(prompts, params)
        assert [s.tokens for s in runs[name]] == [s.tokens for s in plain]
    assert adaptive.stats.stopped_drafting == 2 and not any(s.drafting for s in runs["adaptive"])
    assert adaptive.stats.drafted < always.stats.drafted and always.stats.stopped_drafting == 0
    with pytest.raises(InvalidValue, match="draft_policy"):
        Engine(model, speculative=True, draft_policy="sometimes")
