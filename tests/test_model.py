import pytest
import torch

from dsv3 import DeepSeekV3, LatentCache, preset
from dsv3.inventory import count_parameters
from dsv3.model.attention import AttentionContext
from dsv3.model.moe import GroupedExperts, Router


def tiny_model(seed=0, **changes):
    torch.manual_seed(seed)
    model = DeepSeekV3(preset("tiny").replace(**changes))
    model.init_weights(std=0.05)  # larger than the training init so differences would show
    return model


@torch.no_grad()
@pytest.mark.parametrize("q_lora_rank", [32, None])
def test_naive_and_absorbed_attention_agree(q_lora_rank):
    model = tiny_model(q_lora_rank=q_lora_rank)
    ids = torch.randint(0, 512, (2, 40))
    naive = model(ids)
    absorbed = model.set_impl(attn="absorb")(ids)
    assert (naive - absorbed).abs().max() <= 1e-5 * naive.abs().max()


@torch.no_grad()
@pytest.mark.parametrize("attn", ["naive", "absorb"])
def test_token_by_token_decoding_over_the_latent_cache_equals_the_full_forward(attn):
    model = tiny_model().set_impl(attn=attn)
    ids = torch.randint(0, 512, (2, 24))
    full = model(ids)
    cache = LatentCache(model.config, batch_size=2, max_len=32, dtype=torch.float32)
    steps = [model(ids[:, :8], cache=cache)]  # prefill 8, then one token at a time
    for t in range(8, 24):
        steps.append(model(ids[:, t : t + 1], positions=torch.full((2, 1), t), cache=cache))
    decoded = torch.cat(steps, dim=1)
    assert (decoded - full).abs().max() <= 1e-5 * full.abs().max()


@torch.no_grad()
def test_rows_at_different_positions_share_a_decode_step():
    model = tiny_model().set_impl(attn="absorb")
    a, b = torch.randint(0, 512, (1, 10)), torch.randint(0, 512, (1, 6))
    cache = LatentCache(model.config, batch_size=2, max_len=16, dtype=torch.float32)
    # prefill both rows padded to 9 (row b's padding is written past its end and later overwritten)
    padded = torch.cat([a[:, :9], torch.cat([b[:, :5], torch.zeros(1, 4, dtype=torch.long)], 1)])
    model(padded, cache=cache)
    step = model(torch.stack([a[0, 9:10], b[0, 5:6]]), positions=torch.tensor([[9], [5]]), cache=cache)
    assert torch.allclose(step[0, 0], model(a)[0, -1], atol=1e-5)
    assert torch.allclose(step[1, 0], model(b)[0, -1], atol=1e-5)


@pytest.fixture
def grouped_mm_calls(monkeypatch):
    """Counts the grouped-matmul kernel's calls, so a test comparing it with the loop knows it really ran."""
    calls = []
    real = torch._grouped_mm

    def counted(*args, **kwargs):
        calls.append(args[0].dtype)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "_grouped_mm", counted)
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_experts_equal_the_per_expert_loop_including_idle_experts(dtype, grouped_mm_calls):
    torch.manual_seed(0)
    grouped = GroupedExperts(6, 32, 16, impl="grouped")
    torch.nn.init.normal_(grouped.w1, std=0.2), torch.nn.init.normal_(grouped.w2, std=0.2)
    torch.nn.init.normal_(grouped.w3, std=0.2)
    loop = GroupedExperts(6, 32, 16, impl="loop")
    loop.load_state_dict(grouped.state_dict())
    grouped.to(dtype), loop.to(dtype)
    counts = torch.tensor([3, 0, 5, 0, 0, 4])  # experts 1, 3 and 4 receive no tokens
    x = torch.randn(12, 32, dtype=dtype)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    g = torch.randn(12, 32, dtype=dtype)
    y1 = grouped(x1, counts)
    assert grouped_mm_calls == [dtype] * 3  # the grouped kernel ran, once per projection
    y2 = loop(x2, counts)
    assert len(grouped_mm_calls) == 3  # and the reference did not use it
    (y1 * g).sum().backward()
    (y2 * g).sum().backward()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(y1.float(), y2.float(), atol=tol, rtol=tol)
    assert torch.allclose(x1.grad.float(), x2.grad.float(), atol=tol, rtol=tol)
    for name in ("w1", "w2", "w3"):
        ga, gb = getattr(grouped, name).grad, getattr(loop, name).grad
        assert torch.allclose(ga.float(), gb.float(), atol=tol, rtol=tol), name
        assert ga[1].abs().max() == 0 and ga[3].abs().max() == 0  # idle experts get zero gradient


def test_whole_model_grouped_equals_loop_forward_and_backward(grouped_mm_calls):
    ids = torch.randint(0, 512, (2, 20))
    grads = []
    for impl in ("grouped", "loop"):
        model = tiny_model(seed=1).set_impl(experts=impl)
        before = len(grouped_mm_calls)
        out = model.run(ids, mtp=True)
        assert (len(grouped_mm_calls) > before) == (impl == "grouped")  # 2 MoE layers x 3 projections, or none
        (out.logits.square().mean() + out.mtp_logits[0].square().mean()).backward()
        grads.append((out.logits.detach(), model.layers[1].ffn.experts.w2.grad.clone()))
    assert torch.allclose(grads[0][0], grads[1][0], atol=1e-5)
    assert torch.allclose(grads[0][1], grads[1][1], atol=1e-6)


def test_router_bias_steers_selection_but_not_weights():
    cfg = preset("tiny").replace(n_group=1, topk_group=1)
    router = Router(cfg)
    torch.nn.init.normal_(router.weight, std=0.5)
    x = torch.randn(16, cfg.hidden_size)
    before = router(x)
    router.bias[5] = 10.0  # expert 5 now wins every selection
    after = router(x)
    assert (after.indices == 5).any(dim=1).all()
    assert torch.equal(before.scores, after.scores)
    s = after.scores.gather(1, after.indices)
    expected = s / s.sum(-1, keepdim=True) * cfg.routed_scaling_factor  # unbiased scores, normalised, scaled
    assert torch.allclose(after.weights, expected)
    assert after.counts.sum() == 16 * cfg.num_experts_per_tok and after.counts[5] == 16


def test_group_limited_routing_only_picks_from_the_best_groups():
    cfg = preset("tiny").replace(n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=2)
    router = Router(cfg)
    torch.nn.init.normal_(router.weight, std=1.0)
    r = router(torch.randn(64, cfg.hidden_size))
    choice = (r.scores + router.bias).view(64, 4, 2)
    best_groups = choice.topk(2, dim=-1).values.sum(-1).topk(2, dim=-1).indices  # [N, 2]
    chosen_groups = r.indices // 2
    assert all(set(c.tolist()) <= set(g.tolist()) for c, g in zip(chosen_groups, best_groups))


def _rms(x, weight, eps=1e-6):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


@torch.no_grad()
def test_mtp_outputs_follow_the_equations():
    """h' = W_eh [norm_e(emb(t_{i+1})) ; norm_h(h_i)], h = Block(h'), logits = head(norm(h)), computed here from
    the weights themselves: W_eh split into its embedding half and its hidden half, the norms written out."""
    model = tiny_model()
    ids = torch.randint(0, 512, (2, 12))
    out = model.run(ids, mtp=True)
    assert out.logits.shape == (2, 12, 512) and out.mtp_logits[0].shape == (2, 11, 512)
    assert len(out.routing) == 1 and len(out.mtp_routing) == 1
    m, d = model.mtp[0], model.config.hidden_size
    w_e, w_h = m.eh_proj.weight[:, :d], m.eh_proj.weight[:, d:]  # [d, d] each: the embedding half comes first
    emb_next = model.embed.weight[ids[:, 1:]]  # t_{i+1} for positions 0..10
    h_prev = out.hidden[:, :11]  # the main model's last block before its final norm
    h_in = _rms(emb_next, m.enorm.weight) @ w_e.T + _rms(h_prev, m.hnorm.weight) @ w_h.T
    positions = torch.arange(11).expand(2, 11)
    h, _ = m.block(h_in, AttentionContext.build(positions, model.rope(positions), cached=False))
    expected = _rms(h, m.norm.weight) @ model.head.weight.T
    torch.testing.assert_close(out.mtp_logits[0], expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(model(ids), out.logits)  # MTP does not touch the main head
    # the public one-module step computes the same thing (what speculative decoding drafts with)
    step = model.mtp_step(h_prev, ids[:, 1:], positions)
    torch.testing.assert_close(step.logits, out.mtp_logits[0], rtol=1e-6, atol=1e-6)
    picked = model.mtp_step(h_prev, ids[:, 1:], positions, logits_at=torch.tensor([[3], [7]]))
    torch.testing.assert_close(picked.logits[:, 0], out.mtp_logits[0][[0, 1], [3, 7]], rtol=1e-6, atol=1e-6)


def test_implementation_names_are_checked():
    model = tiny_model()
    ids = torch.randint(0, 512, (1, 4))
    for bad in (dict(attn="absorbd"), dict(experts="grouped_mm")):
        with pytest.raises(ValueError, match="is not one of"):
            model.set_impl(**bad)
    with pytest.raises(ValueError, match="attention impl 'absorbd'"):
        model(ids, attn="absorbd")
    with pytest.raises(ValueError, match="experts impl"):
        DeepSeekV3(preset("tiny"), experts_impl="fast")


def test_init_weights_after_meta_build():
    with torch.device("meta"):
        model = DeepSeekV3(preset("tiny"))
    model = model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    assert model.layers[1].ffn.gate.bias.dtype == torch.float32 and model.layers[1].ffn.gate.bias.abs().max() == 0
    assert torch.equal(model.norm.weight, torch.ones_like(model.norm.weight))
    assert torch.equal(model.layers[0].attn.kv_norm.weight, torch.ones(32))
    assert model.layers[1].ffn.experts.w1.std().item() == pytest.approx(0.006, rel=0.05)
    assert model.embed.weight.std().item() == pytest.approx(0.006, rel=0.05)


def test_casting_to_bf16_keeps_the_router_bias_fp32():
    model = tiny_model()
    model.layers[1].ffn.gate.bias.fill_(0.001234567)
    model.to(torch.bfloat16)
    bias = model.layers[1].ffn.gate.bias
    assert bias.dtype == torch.float32 and bias[0].item() == pytest.approx(0.001234567, rel=1e-7)
    assert model.layers[1].ffn.gate.weight.dtype == torch.bfloat16


def test_bf16_autocast_training_step_runs_in_bf16_with_fp32_grads():
    model = tiny_model()
    ids = torch.randint(0, 512, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.run(ids, mtp=True)
        loss = out.logits.float().logsumexp(-1).mean() + out.mtp_logits[0].float().logsumexp(-1).mean()
    loss.backward()
    assert out.logits.dtype == torch.bfloat16
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters() if p.requires_grad)


def test_v3_builds_on_meta_with_the_published_counts():
    counts = count_parameters(preset("v3"))
    assert counts.total == 671_026_419_200
    assert counts.active == 36_625_618_432
    assert counts.active_with_embedding == 37_552_297_472
    assert counts.mtp == 11_610_068_224
