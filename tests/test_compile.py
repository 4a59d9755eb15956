"""`dsv3 train --compile`: regional compilation of the blocks trains as eager does (same losses in fp32), keeps the
parameter names, compiles one graph for all the MoE layers rather than one per layer, runs evaluation and
samples eagerly, and says what is missing when there is no C++ compiler."""

import pytest
import torch

from dsv3.commands import train as train_command
from dsv3.config import preset
from dsv3.errors import Dsv3Error
from dsv3.model import DeepSeekV3
from dsv3.parallel.build import apply_compile
from dsv3.train import TrainConfig, Trainer, train
from dsv3.train import loop as loop_module
from dsv3.train.metrics import read_metrics

# inductor builds C++ kernels: tens of seconds per graph on a small machine
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("single_thread")]


def config(tmp_path, data, **changes):
    base = dict(preset="tiny", data=[data.path], out=str(tmp_path / "run"), batch_size=4, seq_len=32, max_steps=4,
                log_every=1, eval_every=2, eval_windows=6, save_every=4, samples=1, sample_tokens=4, peak_tflops=1.0,
                tensorboard=False, dtype="fp32")
    return TrainConfig(**{**base, **changes})


def test_compiled_training_gives_eager_losses_in_fp32(tmp_path, data):
    eager = train(config(tmp_path / "eager", data), log=lambda _: None, progress=False)
    compiled = train(config(tmp_path / "compiled", data, compile=True), log=lambda _: None, progress=False)
    records = [[r for r in read_metrics(run.run_dir) if "loss" in r] for run in (eager, compiled)]
    assert [r["step"] for r in records[0]] == [r["step"] for r in records[1]] == [1, 2, 3, 4]
    for e, c in zip(*records):
        for key in ("loss", "mtp_loss", "grad_norm"):
            assert c[key] == pytest.approx(e[key], rel=1e-4), (e["step"], key)
    assert compiled.summary.val_loss == pytest.approx(eager.summary.val_loss, rel=1e-4)  # evaluation ran (eagerly)
    assert len(compiled.samples) == 1  # so did sampling, at shapes no graph was compiled for


def test_one_graph_serves_every_moe_layer():
    """The blocks share their code and dynamo treats parameters as inputs: a model with three MoE layers compiles
    as many graphs as one with a single MoE layer."""
    from torch._dynamo.utils import counters

    graphs = []
    for layers in (2, 4):
        torch._dynamo.reset()
        counters.clear()
        torch.manual_seed(0)
        model = DeepSeekV3(preset("tiny").replace(num_hidden_layers=layers, num_nextn_predict_layers=0))
        model.init_weights()
        apply_compile(model)
        model.run(torch.randint(0, 512, (2, 16))).logits.sum().backward()
        graphs.append(counters["stats"]["unique_graphs"])
        assert all(".ffn." not in name or "_orig_mod" not in name for name, _ in model.named_parameters())
    assert graphs[0] == graphs[1] > 0


def test_state_dict_names_do_not_change():
    model = DeepSeekV3(preset("tiny"))
    names = list(model.state_dict())
    apply_compile(model)
    assert list(model.state_dict()) == names


def test_compile_flag_reaches_the_config():
    parser = __import__("argparse").ArgumentParser()
    train_command.add_arguments(parser)
    assert train_command.config_from_args(parser.parse_args(["--compile"])).compile is True
    assert train_command.config_from_args(parser.parse_args([])).compile is False
    with pytest.raises(Dsv3Error, match="compile"):
        TrainConfig(compile="yes")


def test_no_cpp_compiler_is_one_sentence(tmp_path, data, monkeypatch):
    import torch._inductor.cpp_builder as cpp_builder

    def missing():
        raise RuntimeError("no working C++ compiler found in ('g++',)")

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", missing)
    with pytest.raises(Dsv3Error, match="--compile needs a C\\+\\+ compiler"):
        Trainer(config(tmp_path, data, compile=True), log=lambda _: None, progress=False)
    loop_module.check_compiler(torch.device("meta"))  # not the CPU: nothing to check
