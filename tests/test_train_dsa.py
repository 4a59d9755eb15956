"""Training sparse attention from a dense run (dsv3.train.dsa): the warm-up changes only the indexers and lowers
their KL to the main attention; the sparse stage trains the model with top-k attention while the indexers learn
from their KL alone; the CLI converts a dense run and refuses what it cannot do."""

import pydoc_data.topics

import pytest
import torch

from dsv3 import DeepSeekV3, load_pretrained, preset
from dsv3.cli import main
from dsv3.data import Tokenizer
from dsv3.train import TrainConfig, train
from dsv3.train.dsa import dsa_model_config, indexer_kl
from dsv3.train.metrics import read_metrics

pytestmark = pytest.mark.usefixtures("single_thread")


def config(out, data, **changes):
    base = dict(preset="tiny", data=[data.path], out=str(out), batch_size=4, seq_len=48, max_steps=12, log_every=1,
                eval_every=100, eval_windows=4, save_every=100, samples=0, peak_tflops=1.0, tensorboard=False,
                dtype="fp32")
    return TrainConfig(**{**base, **changes})


@pytest.fixture(scope="module")
def dense(tmp_path_factory, data):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("dense") / "run"
    train(config(out, data, init_std=0.2), log=lambda _: None, progress=False)  # attention far from uniform
    return str(out)


def test_warmup_changes_only_the_indexers_and_lowers_their_kl(tmp_path, data, dense):
    cfg = config(tmp_path / "warm", data, model_config=dense, init_from=dense, tokenizer=f"{dense}/tokenizer.json",
                 dsa_stage="warmup", index_topk=12, lr=1e-2, max_steps=60)
    train(cfg, log=lambda _: None, progress=False)
    before, after = load_pretrained(dense, torch.float32), load_pretrained(tmp_path / "warm", torch.float32)
    assert after.config.uses_dsa and after.config.index_topk == 12 and not before.config.uses_dsa
    theirs = before.state_dict()
    changed = {k for k, v in after.state_dict().items() if k not in theirs or not torch.equal(v, theirs[k])}
    assert changed and all(".indexer." in k for k in changed), sorted(changed)[:5]
    assert set(after.state_dict()) - set(theirs) == changed - set(theirs)  # the new tensors are the indexers'
    assert len([r for r in read_metrics(tmp_path / "warm") if "indexer_kl" in r]) == 60

    # on text of the corpus: the trained indexers against freshly initialised ones in the same model
    text = pydoc_data.topics.topics[sorted(pydoc_data.topics.topics)[40]]
    ids = torch.tensor(Tokenizer.from_dir(dense).encode(text)[: 4 * 48]).view(4, 48)
    with torch.no_grad():
        trained = indexer_kl(after.run(ids, sparse=False, probe_indexer=True).indexer).item()
        for name, p in after.named_parameters():
            if ".indexer." in name:
                p.copy_(torch.ones_like(p) if name.endswith("norm.weight") else
                        torch.zeros_like(p) if name.endswith("norm.bias") else torch.randn_like(p) * cfg.init_std)
        fresh = indexer_kl(after.run(ids, sparse=False, probe_indexer=True).indexer).item()
    assert trained < 0.8 * fresh, (trained, fresh)


def test_sparse_stage_trains_the_model_and_the_indexer_gets_only_the_kl_gradient(tmp_path, data, dense):
    cfg = config(tmp_path / "sparse", data, model_config=dense, init_from=dense, tokenizer=f"{dense}/tokenizer.json",
                 dsa_stage="sparse", index_topk=12, max_steps=3)
    train(cfg, log=lambda _: None, progress=False)
    model = load_pretrained(tmp_path / "sparse", torch.float32)
    dense_model = load_pretrained(dense, torch.float32)
    assert not torch.equal(model.layers[0].attn.wq_a.weight, dense_model.layers[0].attn.wq_a.weight)

    # gradients: the LM loss reaches no indexer weight; the KL reaches nothing but indexer weights
    ids = torch.randint(0, 512, (2, 40))
    out = model.run(ids, probe_indexer=True)
    assert any(v.isfinite().all() and v.sum() for v in [out.indexer[0].attention])
    lm = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    lm_grads = torch.autograd.grad(lm, list(model.parameters()), allow_unused=True)
    kl_grads = torch.autograd.grad(indexer_kl(out.indexer), list(model.parameters()), allow_unused=True)
    for (name, _), g_lm, g_kl in zip(model.named_parameters(), lm_grads, kl_grads):
        if ".indexer." in name:
            assert g_lm is None or not g_lm.any(), name
        else:
            assert g_kl is None or not g_kl.any(), name
    assert any(g is not None and g.any() for g in kl_grads)


def test_indexer_kl_is_zero_when_the_indexer_matches_attention():
    torch.manual_seed(0)
    model = DeepSeekV3(preset("tiny-dsa"))
    model.init_weights(std=0.05)
    out = model.run(torch.randint(0, 512, (1, 20)), probe_indexer=True)
    probe = out.indexer[0]
    assert indexer_kl(out.indexer) > 0
    probe.index_logp = torch.where(probe.attention > 0, probe.attention.log(), float("-inf"))
    assert indexer_kl([probe]) < 1e-6


def test_dense_configs_gain_indexers_in_v32s_proportions():
    cfg = dsa_model_config(preset("small"), seq_len=256)
    assert (cfg.model_type, cfg.index_n_heads, cfg.index_head_dim, cfg.index_topk) == ("deepseek_v32", 4, 32, 64)
    assert dsa_model_config(preset("v3.2"), 4096).index_topk == 2048  # a V3.2 model keeps its own


def test_cli_dsa_flags(tmp_path, dense, data, capsys):
    assert main(["train", "--init-from", dense, "--preset", "tiny", "--dsa-stage", "warmup"]) == 2
    assert "--init-from brings its own config.json" in capsys.readouterr().err
    assert main(["train", "--preset", "tiny", "--index-topk", "4", "--out", str(tmp_path / "x")]) == 2
    assert "--index-topk 4 only applies with --dsa-stage" in capsys.readouterr().err
    code = main(["train", "--init-from", dense, "--dsa-stage", "warmup", "--data", data.path, "--max-steps", "2",
                 "--batch-size", "2", "--seq-len", "32", "--samples", "0", "--out", str(tmp_path / "w"),
                 "--no-progress", "--peak-tflops", "1", "--no-tensorboard"])
    assert code == 0
    assert "indexer KL" in capsys.readouterr().out
    assert load_pretrained(tmp_path / "w").config.index_topk == 8
