"""bf16 weights reordered for oneDNN (dsv3.infer.packing): the same numbers as the plain layout, in the
full forward, the engine's cached and speculative decoding, and on the command line."""

import copy

import pytest
import torch
from infer_models import one_thread, trained_tiny

from dsv3.cli import main
from dsv3.infer import Engine, SamplingParams, packing
from dsv3.infer.packing import PackedExperts, PackedLinear, pack, packable

pytestmark = pytest.mark.skipif(not packable(torch.nn.Linear(2, 2).bfloat16()),
                                reason="this torch's oneDNN does not multiply bf16 on this CPU")


def bf16_pair():
    model, tok, directory = trained_tiny()
    plain = copy.deepcopy(model).to(torch.bfloat16)
    packed = copy.deepcopy(plain)
    return plain, packed, tok, directory


def test_packed_model_gives_the_plain_layouts_logits():
    plain, packed, _, _ = bf16_pair()
    n = pack(packed)
    cfg = plain.config
    moe_layers = cfg.num_hidden_layers - cfg.first_k_dense_replace + cfg.num_nextn_predict_layers
    assert n > 3 * moe_layers * cfg.n_routed_experts
    assert sum(isinstance(m, PackedExperts) for m in packed.modules()) == moe_layers
    assert isinstance(packed.head, PackedLinear) and not isinstance(packed.layers[0].attn.wkv_b, PackedLinear)
    ids = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode(), one_thread():
        for attn in ("naive", "absorb"):
            a = plain.run(ids, attn=attn, mtp=True)
            b = packed.run(ids, attn=attn, mtp=True)
            assert torch.equal(a.logits, b.logits) and torch.equal(a.mtp_logits[0], b.mtp_logits[0])


def test_packed_engine_decodes_plain_tokens_with_and_without_speculation():
    plain, packed, tok, _ = bf16_pair()
    pack(packed)
    prompts = [tok.encode("the latent cache keeps"), tok.encode("a server batches")]
    params = SamplingParams(max_new_tokens=24)
    with torch.inference_mode(), one_thread():
        expected = [s.tokens for s in Engine(plain, tok, max_batch=2).generate(prompts, params)]
        for speculative in (False, True):
            engine = Engine(packed, tok, max_batch=2, speculative=speculative, draft_policy="always")
            assert [s.tokens for s in engine.generate(prompts, params)] == expected
        assert engine.stats.drafted > 0


def test_pack_leaves_fp32_models_alone():
    model, _, _ = trained_tiny()
    fp32 = copy.deepcopy(model)
    assert not packable(fp32) and pack(fp32) == 0
    assert not any(isinstance(m, (PackedLinear, PackedExperts)) for m in fp32.modules())


def test_generate_packs_bf16_weights_by_default_and_no_pack_gives_the_same_text(capsys, monkeypatch):
    _, _, directory = trained_tiny()
    packed = []
    monkeypatch.setattr(packing, "pack", lambda model: packed.append(pack(model)))
    texts = []
    for extra in ([], ["--no-pack"]):
        with one_thread():
            assert main(["generate", "--model", directory, "--dtype", "bf16", "--max-new-tokens", "16", *extra,
                         "the latent cache"]) == 0
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1] and texts[0].strip()
    assert len(packed) == 1 and packed[0] > 0  # the default run packed, --no-pack did not
