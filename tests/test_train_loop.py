"""The trainer end to end on the tiny model: the run directory is a model directory that dsv3 and transformers
load, metrics records, balancing modes, gradient accumulation, the time budget, resume refusals, a NaN stop,
a crash in the middle of a save, and the CLI over it all."""

import json
import math
import os
import pydoc_data.topics

import pytest
import torch

from dsv3 import load_pretrained
from dsv3.cli import main
from dsv3.data import Tokenizer
from dsv3.data.prepare import prepare
from dsv3.errors import Dsv3Error
from dsv3.train import TrainConfig, TrainingDiverged, train
from dsv3.train import checkpoint as ckpt
from dsv3.train import step as step_module
from dsv3.train.budget import TimeBudget
from dsv3.train.metrics import read_metrics

pytestmark = pytest.mark.usefixtures("single_thread")


def config(tmp_path, data, **changes):
    base = dict(preset="tiny", data=[data.path], out=str(tmp_path / "run"), batch_size=4, seq_len=32, max_steps=12,
                log_every=1, eval_every=6, eval_windows=8, save_every=5, samples=1, sample_tokens=8, peak_tflops=1.0,
                tensorboard=False)
    return TrainConfig(**{**base, **changes})


def quiet(cfg):
    lines = []
    result = train(cfg, log=lines.append, progress=False)
    return result, lines


@pytest.fixture(scope="module")
def finished(tmp_path_factory, data):
    torch.set_num_threads(1)
    return quiet(config(tmp_path_factory.mktemp("finished"), data, dtype="fp32"))


def weights(path):
    return load_pretrained(path, torch.float32).state_dict()


def test_run_directory_is_a_model_directory_that_dsv3_and_transformers_load(finished):
    result, _ = finished
    run = result.run_dir
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert os.path.isfile(os.path.join(run, name))
    model = load_pretrained(run, torch.float32)
    assert len(model.mtp) == 1
    assert Tokenizer.from_dir(run).vocab_size <= 512
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(run, dtype=torch.float32)
    x = torch.randint(0, 512, (1, 12))
    torch.testing.assert_close(hf(x).logits, model(x), atol=1e-4, rtol=1e-4)
    assert [s for s, _ in ckpt.list_checkpoints(run)] == [10, 12]
    for folder, _, files in os.walk(run):
        assert all(f.endswith((".json", ".jsonl", ".safetensors")) for f in files), folder  # no pickle anywhere


def test_metrics_records_carry_every_figure_and_a_step(finished):
    result, lines = finished
    records = read_metrics(result.run_dir)
    assert all("step" in r for r in records)
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == list(range(1, 13))
    for r in train_records:
        assert {"loss", "mtp_loss", "mtp_acc", "lr", "grad_norm", "tokens_per_s", "mfu", "maxvio", "maxvio_max",
                "load", "bias", "balance_loss"} <= set(r)
        assert len(r["load"]) == len(r["bias"]) == 2 and len(r["load"][0]) == 8  # MoE layer + MTP module, E=8
        assert 0 <= r["mtp_acc"] <= 1 and r["mfu"] > 0 and r["tokens_per_s"] > 0
    val = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in val] == [6, 12]
    assert val[-1]["val_ppl"] == pytest.approx(math.exp(val[-1]["val_loss"]))
    assert {"val_mtp_loss", "val_mtp_acc", "val_maxvio", "val_maxvio_max"} <= set(val[-1])
    assert train_records[-1]["loss"] < train_records[0]["loss"]
    summary = records[-1]["summary"]
    assert summary["tokens"] == 12 * 4 * 32 and summary["val_loss"] == val[-1]["val_loss"]
    assert summary["h800_usd"] > 0
    with open(os.path.join(result.run_dir, "summary.json")) as f:
        assert json.load(f)["samples"] == result.samples
    assert any(line.startswith("step 12 | loss") for line in lines)
    assert any("on H800s" in line for line in lines)


def test_aux_free_moves_the_bias_and_the_other_modes_leave_it_at_zero(tmp_path, data, finished):
    assert any(abs(b) > 0 for row in read_metrics(finished[0].run_dir)[-3]["bias"] for b in row)
    result, _ = quiet(config(tmp_path, data, balance="aux-loss", max_steps=3, samples=0))
    model = load_pretrained(result.run_dir)
    assert torch.count_nonzero(model.layers[1].ffn.gate.bias) == 0
    assert read_metrics(result.run_dir)[0]["balance_loss"] > 0


def test_gradient_accumulation_matches_one_bigger_batch(tmp_path, data):
    a, _ = quiet(config(tmp_path / "a", data, dtype="fp32", batch_size=4, grad_accum=1, max_steps=3, samples=0))
    b, _ = quiet(config(tmp_path / "b", data, dtype="fp32", batch_size=2, grad_accum=2, max_steps=3, samples=0))
    wa, wb = weights(a.run_dir), weights(b.run_dir)
    for k in wa:
        # rounding level: summing in another order moves a weight by ~1e-6, and AdamW's division by a small
        # gradient's running size can grow that a few times on some CPUs (3e-6 on an AMX Xeon)
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=1e-4)
    assert torch.equal(wa["layers.1.ffn.gate.bias"], wb["layers.1.ffn.gate.bias"])  # same loads, same update


def test_no_mtp_trains_a_model_without_mtp_modules(tmp_path, data):
    result, _ = quiet(config(tmp_path, data, mtp=False, max_steps=2, samples=0))
    assert len(load_pretrained(result.run_dir).mtp) == 0
    assert "mtp_loss" not in read_metrics(result.run_dir)[0]


def test_time_budget_sizes_the_run(tmp_path, data):
    result, lines = quiet(config(tmp_path, data, max_steps=None, time_budget=0.3, samples=0, eval_every=50))
    plan = next(line for line in lines if line.startswith("time budget 0.3 min"))
    planned = int(plan.split("-> ")[1].split()[0])
    assert 1 <= result.summary.steps <= planned or any("instead of" in line for line in lines)


class Clock:
    """A clock that reads what the test sets."""

    def __init__(self, now: float = 0.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_time_budget_arithmetic():
    clock = Clock(10.0)
    budget = TimeBudget(minutes=10, started=0.0, clock=clock)  # deadline at 600 s, 10 s gone already
    # 2 s per step, 30 s per evaluation every 100 steps: the end reserve (20 s) and one evaluation are kept free
    assert budget.plan(step_s=2.0, eval_s=30.0, eval_every=100) == int((600 - 50 - 10) / 2.3)
    budget.start(step=0)
    clock.now = 10.0 + 10 * 4.0  # the first 10 steps took 4 s each: twice the probe's pace
    steps = budget.replan(step=10, max_steps=234, warmup=5, last_step_s=4.0)
    assert steps == 10 + int((600 - (30 * 2 + 20) - 50) / 4.0)  # the final evaluation costs twice as much too
    assert budget.replan(step=11, max_steps=234, warmup=5, last_step_s=4.0) is None  # only every 10 steps
    assert budget.replan(step=10, max_steps=234, warmup=12, last_step_s=4.0) is None  # not during the warm-up
    assert budget.replan(step=120, max_steps=234, warmup=5, last_step_s=4.0) is None  # nor past half the run
    clock.now = 10.0 + 10 * 2.3  # at the planned pace (evaluations included) nothing changes
    assert budget.replan(step=10, max_steps=234, warmup=5, last_step_s=2.0) is None
    clock.now = 600 - 50 - 2.5  # the end (50 s) and one more step (2 s) still fit ...
    assert not budget.out_of_time(last_step_s=2.0)
    assert budget.out_of_time(last_step_s=3.0)  # ... a slower step does not, and the slower evaluation neither
    clock.now = 600 - 50 - 31  # the reserve for the save and samples is seconds, not a pace: it does not scale
    assert not budget.out_of_time(last_step_s=2.0 * 1.5)


def test_a_new_run_refuses_an_occupied_directory(finished, data):
    with pytest.raises(Dsv3Error, match="already holds a training run; pass --resume"):
        train(TrainConfig(preset="tiny", data=[data.path], out=finished[0].run_dir))


def test_resume_refuses_a_changed_model(finished, data):
    cfg = TrainConfig(preset="tiny", data=[data.path], out=finished[0].run_dir, resume=True, mtp=False)
    with pytest.raises(Dsv3Error, match="num_nextn_predict_layers=1 but this run's has num_nextn_predict_layers=0"):
        train(cfg)


def test_resume_refuses_another_tokenizer(tmp_path, finished, data):
    corpus = tmp_path / "other.txt"
    corpus.write_text(pydoc_data.topics.topics["if"] * 20)
    other = prepare([str(corpus)], tmp_path / "other", vocab_size=400, log=lambda _: None)
    cfg = TrainConfig(preset="tiny", data=[other.path], out=finished[0].run_dir, resume=True)
    with pytest.raises(Dsv3Error, match="another tokenizer"):
        train(cfg)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, data, monkeypatch):
    real = step_module.compute_losses
    calls = []

    def poisoned(*args, **kwargs):
        calls.append(1)
        losses = real(*args, **kwargs)
        if len(calls) == 7:
            losses.total = losses.total * float("nan")
        return losses

    monkeypatch.setattr(step_module, "compute_losses", poisoned)
    cfg = config(tmp_path, data, eval_every=100)
    with pytest.raises(TrainingDiverged, match=r"the loss became nan at step 7; .*step-00000005"):
        train(cfg, log=lambda _: None, progress=False)
    assert [s for s, _ in ckpt.list_checkpoints(cfg.out)] == [5]
    load_pretrained(cfg.out)


def test_a_crash_in_the_middle_of_a_save_resumes_from_the_previous_checkpoint_exactly(tmp_path, data, monkeypatch,
                                                                                      finished):
    cfg = config(tmp_path, data, dtype="fp32")
    real = ckpt.export_model
    saves = []

    def dies_on_second_save(*args, **kwargs):
        saves.append(1)
        if len(saves) == 2:
            raise KeyboardInterrupt  # the training state of step 10 is written, its model directory is not
        return real(*args, **kwargs)

    monkeypatch.setattr(ckpt, "export_model", dies_on_second_save)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, log=lambda _: None, progress=False)
    monkeypatch.setattr(ckpt, "export_model", real)
    assert ckpt.latest_checkpoint(cfg.out).endswith("step-00000005")
    lines = []
    train(cfg.replace(resume=True), log=lines.append, progress=False)
    assert any("from checkpoints/step-00000005" in line for line in lines)
    ref, got = weights(finished[0].run_dir), weights(cfg.out)
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    losses = [[r["loss"] for r in read_metrics(d) if "loss" in r] for d in (finished[0].run_dir, cfg.out)]
    assert losses[0] == losses[1]


def test_cli_resume_reuses_the_saved_options(tmp_path, data, capsys):
    out = str(tmp_path / "cli")
    common = ["--preset", "tiny", "--data", data.path, "--out", out, "--batch-size", "2", "--seq-len", "16",
              "--peak-tflops", "1", "--samples", "0", "--log-every", "1", "--no-progress", "--no-tensorboard"]
    assert main(["train", *common, "--max-steps", "2", "--save-every", "1", "--eval-windows", "2"]) == 0
    assert main(["train", "--out", out, "--resume", "--max-steps", "3"]) == 0
    with open(os.path.join(out, "train_config.json")) as f:
        saved = json.load(f)
    assert saved["batch_size"] == 2 and saved["seq_len"] == 16 and saved["max_steps"] == 3
    assert [r["step"] for r in read_metrics(out) if "loss" in r] == [1, 2, 3]
    assert main(["train", "--preset", "tiny", "--out", out, "--data", data.path]) == 2
    assert "already holds a training run" in capsys.readouterr().err


def test_cli_help_lists_the_flags_people_rely_on(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--preset", "--config", "--data", "--out", "--max-steps", "--save-every", "--dtype", "--seed",
                 "--resume"):
        assert flag in text


def test_cli_reports_a_bad_option_in_one_line(capsys):
    assert main(["train", "--preset", "tiny", "--batch-size", "0"]) == 2
    assert "--batch-size 0 must be a positive integer" in capsys.readouterr().err
    assert main(["train", "--preset", "tiny", "--seq-len", "9000", "--out", "/nonexistent/x"]) == 2
    assert "--seq-len 9000 exceeds the model's max_position_embeddings=512" in capsys.readouterr().err
