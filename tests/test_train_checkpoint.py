"""Training checkpoints: the model and AdamW round trip through the sharded state, atomic folders, keep-last
pruning, the run directory's model files, and what a save that dies half-way leaves behind."""

import json
import os

import pytest
import torch
from safetensors import safe_open

from dsv3 import DeepSeekV3, load_pretrained, preset
from dsv3.data import Tokenizer
from dsv3.train import TrainConfig
from dsv3.train import checkpoint as ckpt
from dsv3.train.optim import build_optimizer
from dsv3.train.rundir import RunDir


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train(["def f(x):\n    return x + 1\n"] * 20, vocab_size=300)


class Position:
    """A stand-in for the data loader: restore puts its saved position back."""

    def __init__(self):
        self.state = None

    def load_state_dict(self, state):
        self.state = state


def trained(seed=0, steps=2, lr=1e-3):
    torch.manual_seed(seed)
    model = DeepSeekV3(preset("tiny"))
    model.init_weights()
    opt = build_optimizer(model, TrainConfig(lr=lr))
    for _ in range(steps):
        model(torch.randint(0, 512, (2, 8))).float().square().mean().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def save(run, step, model, opt, tokenizer, keep_last=2):
    state = {"step": step, "max_steps": 20, "tokens": 0, "train_seconds": 0.0, "loader": {"at": step},
             "train_config": {}, "tokenizer_sha256": "x"}
    return RunDir(run).save(step, model, opt, tokenizer, state, keep_last)


def test_model_and_optimizer_round_trip_exactly_and_the_next_step_matches(tmp_path, tokenizer):
    model, opt = trained()
    path = save(tmp_path, 5, model, opt, tokenizer)
    torch.manual_seed(123)  # the RNG comes back too
    copy, opt2 = trained(seed=1, steps=0, lr=1e-3)
    loader = Position()
    state = RunDir(tmp_path).restore(path, copy, opt2, loader, "x")
    assert state["step"] == 5 and loader.state == {"at": 5}
    for (n, a), b in zip(model.state_dict().items(), copy.state_dict().values()):
        assert torch.equal(a, b), n
    x = torch.randint(0, 512, (2, 8))
    for m, o in ((model, opt), (copy, opt2)):
        m(x).float().square().mean().backward()
        o.step()
    for (n, a), b in zip(model.named_parameters(), copy.parameters()):
        assert torch.equal(a, b), n


def test_the_state_is_safetensors_with_every_moment(tmp_path, tokenizer):
    model, opt = trained()
    path = save(tmp_path, 5, model, opt, tokenizer)
    files = ckpt._state_files(path)
    assert files and all(f.endswith(".safetensors") for f in files)
    keys = set()
    for f in files:
        with safe_open(f, framework="pt") as st:
            keys |= set(st.keys())
    assert {"optim.layers.1.ffn.experts.w1.exp_avg_sq", "optim.embed.weight.step", "model.layers.1.ffn.gate.bias",
            "rng"} <= keys


def test_save_writes_a_model_directory_links_the_newest_and_keeps_the_last_n(tmp_path, tokenizer):
    model, opt = trained()
    for step in (5, 10, 15):
        save(tmp_path, step, model, opt, tokenizer)
        with torch.no_grad():
            model.head.weight.add_(1.0)
    assert [s for s, _ in ckpt.list_checkpoints(str(tmp_path))] == [10, 15]
    newest = ckpt.latest_checkpoint(str(tmp_path))
    assert newest.endswith("step-00000015")
    assert sorted(os.listdir(newest)) == sorted([*ckpt.CONFIG_FILES, "model.safetensors", ckpt.STATE_DIR,
                                                 ckpt.STATE_JSON])
    assert os.path.samefile(tmp_path / "model.safetensors", os.path.join(newest, "model.safetensors"))
    top, step15 = load_pretrained(tmp_path), load_pretrained(newest)
    assert torch.equal(top.head.weight, step15.head.weight)
    torch.testing.assert_close(step15.head.weight, model.head.weight - 1.0)
    assert ckpt.read_state(newest)["step"] == 15
    assert not [n for n in os.listdir(tmp_path / ckpt.CHECKPOINTS) if n.startswith(".")]


def test_a_save_that_dies_half_way_leaves_the_previous_checkpoint_whole(tmp_path, tokenizer, monkeypatch):
    model, opt = trained()
    save(tmp_path, 5, model, opt, tokenizer)
    before = load_pretrained(tmp_path).head.weight.clone()

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # as a process killed between writing the training state and the model

    monkeypatch.setattr(ckpt, "export_model", killed)
    with torch.no_grad():
        model.head.weight.add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        save(tmp_path, 10, model, opt, tokenizer)
    leftovers = [n for n in os.listdir(tmp_path / ckpt.CHECKPOINTS) if n.startswith(ckpt.TMP_PREFIX)]
    assert leftovers  # the half-written folder is there, under its temporary name
    assert ckpt.latest_checkpoint(str(tmp_path)).endswith("step-00000005")
    assert torch.equal(load_pretrained(tmp_path).head.weight, before)
    ckpt.remove_leftovers(str(tmp_path))
    assert os.listdir(tmp_path / ckpt.CHECKPOINTS) == ["step-00000005"]


def test_incomplete_step_folders_are_never_picked(tmp_path, tokenizer):
    model, opt = trained()
    save(tmp_path, 5, model, opt, tokenizer)
    broken = tmp_path / ckpt.CHECKPOINTS / "step-00000010"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    assert ckpt.latest_checkpoint(str(tmp_path)).endswith("step-00000005")


def test_unreadable_state_is_a_clear_error(tmp_path, tokenizer):
    model, opt = trained()
    path = save(tmp_path, 5, model, opt, tokenizer)
    with open(os.path.join(path, ckpt.STATE_JSON), "w") as f:
        f.write("{not json")
    with pytest.raises(Exception, match="cannot read the training state"):
        ckpt.read_state(path)
    with open(os.path.join(path, ckpt.STATE_JSON), "w") as f:
        json.dump({"format": ckpt.FORMAT}, f)
    shard = ckpt._state_files(path)[0]
    with open(shard, "r+b") as f:
        f.truncate(100)
    with pytest.raises(Exception, match="cannot read the training state"):
        ckpt.load_state(path, {"model": model.state_dict()})
