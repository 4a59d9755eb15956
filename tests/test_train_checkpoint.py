"""Training checkpoints: the optimizer round trip, atomic folders, keep-last pruning, the run directory's
model files, and what a save that dies half-way leaves behind."""

import os

import pytest
import torch

from dsv3 import DeepSeekV3, load_pretrained, preset
from dsv3.data import Tokenizer
from dsv3.train import TrainConfig
from dsv3.train import checkpoint as ckpt
from dsv3.train.optim import build_optimizer


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train(["def f(x):\n    return x + 1\n"] * 20, vocab_size=300)


def trained(seed=0, steps=2):
    torch.manual_seed(seed)
    model = DeepSeekV3(preset("tiny"))
    model.init_weights()
    opt = build_optimizer(model, TrainConfig())
    for _ in range(steps):
        model(torch.randint(0, 512, (2, 8))).float().square().mean().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def names(model):
    return {id(p): n for n, p in model.named_parameters()}


def test_optimizer_state_round_trips_exactly_and_the_next_step_matches():
    model, opt = trained()
    tensors = {k: v.clone() for k, v in ckpt.optimizer_tensors(opt, names(model)).items()}  # as if from a file
    assert "optimizer.layers.1.ffn.experts.w1.exp_avg_sq" in tensors and "optimizer.embed.weight.step" in tensors
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]

    copy = DeepSeekV3(preset("tiny"))
    copy.load_state_dict(model.state_dict())
    opt2 = build_optimizer(copy, TrainConfig(lr=0.5))  # hyperparameters come back from the saved groups
    ckpt.load_optimizer(opt2, names(copy), tensors, groups)
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    x = torch.randint(0, 512, (2, 8))
    for m, o in ((model, opt), (copy, opt2)):
        m(x).float().square().mean().backward()
        o.step()
    for (n, a), b in zip(model.named_parameters(), copy.parameters()):
        assert torch.equal(a, b), n


def save(run, step, model, tokenizer, keep_last=2):
    return ckpt.save_checkpoint(str(run), step, model, tokenizer, {"rng.cpu": torch.get_rng_state()},
                                {"step": step}, keep_last)


def test_save_writes_a_model_directory_links_the_newest_and_keeps_the_last_n(tmp_path, tokenizer):
    model, _ = trained()
    for step in (5, 10, 15):
        save(tmp_path, step, model, tokenizer)
        with torch.no_grad():
            model.head.weight.add_(1.0)
    assert [s for s, _ in ckpt.list_checkpoints(str(tmp_path))] == [10, 15]
    newest = ckpt.latest_checkpoint(str(tmp_path))
    assert newest.endswith("step-00000015")
    assert sorted(os.listdir(newest)) == sorted([*ckpt.CONFIG_FILES, "model.safetensors", ckpt.STATE_TENSORS,
                                                 ckpt.STATE_JSON])
    assert os.path.samefile(tmp_path / "model.safetensors", os.path.join(newest, "model.safetensors"))
    top, step15 = load_pretrained(tmp_path), load_pretrained(newest)
    assert torch.equal(top.head.weight, step15.head.weight)
    state, tensors = ckpt.read_state(newest)
    assert state["step"] == 15 and torch.equal(tensors["rng.cpu"], torch.get_rng_state())
    assert not [n for n in os.listdir(tmp_path / ckpt.CHECKPOINTS) if n.startswith(".")]


def test_a_save_that_dies_half_way_leaves_the_previous_checkpoint_whole(tmp_path, tokenizer, monkeypatch):
    model, _ = trained()
    save(tmp_path, 5, model, tokenizer)
    before = load_pretrained(tmp_path).head.weight.clone()

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # as a process killed between writing the model and the training state

    monkeypatch.setattr(ckpt, "save_file", killed)
    with torch.no_grad():
        model.head.weight.add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        save(tmp_path, 10, model, tokenizer)
    leftovers = [n for n in os.listdir(tmp_path / ckpt.CHECKPOINTS) if n.startswith(ckpt.TMP_PREFIX)]
    assert leftovers  # the half-written folder is there, under its temporary name
    assert ckpt.latest_checkpoint(str(tmp_path)).endswith("step-00000005")
    assert torch.equal(load_pretrained(tmp_path).head.weight, before)
    ckpt.remove_leftovers(str(tmp_path))
    assert os.listdir(tmp_path / ckpt.CHECKPOINTS) == ["step-00000005"]


def test_incomplete_step_folders_are_never_picked(tmp_path, tokenizer):
    model, _ = trained()
    save(tmp_path, 5, model, tokenizer)
    broken = tmp_path / ckpt.CHECKPOINTS / "step-00000010"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    assert ckpt.latest_checkpoint(str(tmp_path)).endswith("step-00000005")


def test_unreadable_state_is_a_clear_error(tmp_path, tokenizer):
    model, _ = trained()
    path = save(tmp_path, 5, model, tokenizer)
    with open(os.path.join(path, ckpt.STATE_JSON), "w") as f:
        f.write("{not json")
    with pytest.raises(Exception, match="cannot read the training state"):
        ckpt.read_state(path)
