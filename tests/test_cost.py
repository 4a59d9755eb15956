"""Cost: published figures reproduced, the arithmetic from FLOPs to dollars, the CLI and its errors."""

import json

import pytest
import torch

from dsv3 import hardware, preset
from dsv3.cli import main
from dsv3.cost import default_mfu, estimate, mfu_from_run, parse_count, published_runs
from dsv3.errors import Dsv3Error, InvalidValue
from dsv3.hardware import GPUS, accelerator, measure_matmul_peak


def _runs():
    return {r.name: r for r in published_runs()}


def _v3_training_flops_per_token(T: int = 4096) -> float:
    """DeepSeek-V3's training FLOPs per token at sequence length T, from DESIGN's published parameter counts
    rather than from dsv3's own code: 2 FLOPs per active matrix weight and per attention-core multiply-add,
    forward and MTP module, times 3 for the backward pass."""
    norms_and_biases = 61 * (2 * 7168 + 1536 + 512) + 7168 + 58 * 256  # not matmul weights
    forward = 2 * (36_625_618_432 - norms_and_biases) + 61 * 2 * 128 * (T / 2) * (192 + 128)
    mtp_active = 11_610_068_224 - 256 * 44_040_192 + 8 * 44_040_192  # the module's 8 of 256 experts
    mtp_norms_and_bias = 3 * 7168 + 2 * 7168 + 1536 + 512 + 256
    mtp = 2 * (mtp_active - mtp_norms_and_bias) + 2 * 7168 * 129280 + 2 * 128 * ((T - 1) / 2) * (192 + 128)
    return 3 * (forward + (T - 1) / T * mtp)  # MTP runs on T - 1 of the T positions


def test_parse_count():
    assert parse_count("14.8T") == pytest.approx(14.8e12)
    assert parse_count("500b") == 500e9
    assert parse_count("2M") == 2e6 and parse_count("3K") == 3000
    assert parse_count("2e9") == 2e9 and parse_count("1000") == 1000
    for bad in ("-5", "0", "abc", "12X", "", "1.5.2T", "nan", "inf"):
        with pytest.raises(InvalidValue, match="tokens="):
            parse_count(bad)


def test_llama_405b_flops_within_5_percent_of_the_reported_3_8e25():
    llama = _runs()["Llama 3.1 405B pre-training"]
    assert llama.flops_reported == 3.8e25
    assert llama.total_flops == pytest.approx(3.8e25, rel=0.05)
    # its report gives 38-43% MFU on H100 in bf16; the GPU-hours include restarts, so a bit lower
    assert 0.3 < llama.implied_mfu("bf16") < 0.43


def test_deepseek_v3_rows():
    runs = _runs()
    pre = runs["DeepSeek-V3 pre-training"]
    assert pre.gpu_hours_per_trillion_tokens == pytest.approx(180e3)  # the report's 180K per trillion tokens
    assert pre.total_flops == pytest.approx(14.8e12 * _v3_training_flops_per_token(), rel=1e-12)  # 3.86e24
    assert pre.implied_mfu("fp8") == pytest.approx(pre.implied_mfu("bf16") / 2, rel=1e-3)
    assert 0.3 < pre.implied_mfu("bf16") < 0.5
    s32, s128 = runs["DeepSeek-V3 context 4K->32K"], runs["DeepSeek-V3 context 32K->128K"]
    assert s32.tokens == 1000 * 1920 * 32768 and s128.tokens == 1000 * 480 * 131072
    both = runs["DeepSeek-V3 context extension (both)"]
    assert both.total_flops == pytest.approx(s32.total_flops + s128.total_flops)
    assert both.gpu_hours_reported == 119e3 and s32.implied_mfu("bf16") is None
    # longer sequences cost more per token: the attention core grows with the context
    assert s128.total_flops > s32.total_flops > s32.tokens / pre.tokens * pre.total_flops


def test_estimate_arithmetic():
    cfg, h800 = preset("v3"), GPUS["h800"]
    flops = 14.8e12 * _v3_training_flops_per_token()
    # the MFU DeepSeek-V3's 2.664M H800 hours imply against the 1979 TFLOP/s FP8 peak, worked out by hand
    assert default_mfu("fp8") == pytest.approx(flops / (2664e3 * 3600 * 1979e12), rel=1e-12)
    est = estimate(cfg, 14.8e12, 4096, h800, precision="fp8", mfu=0.2, gpus=2048)
    assert est.gpu_hours == pytest.approx(flops / (1979e12 * 0.2) / 3600, rel=1e-12)
    assert est.days == pytest.approx(est.gpu_hours / 2048 / 24)
    assert est.usd == pytest.approx(2 * est.gpu_hours)
    est = estimate(cfg, 1e12, 4096, h800, mfu=0.5, usd_per_gpu_hour=3.0)
    assert est.gpu_hours == pytest.approx(1e12 * _v3_training_flops_per_token() / (989.5e12 * 0.5) / 3600)
    assert est.usd == pytest.approx(3 * est.gpu_hours)
    with pytest.raises(InvalidValue, match="mfu=1.01"):
        estimate(cfg, 1e12, 4096, h800, mfu=1.01)
    with pytest.raises(InvalidValue, match="precision='fp8' has no matmul peak on a100"):
        estimate(cfg, 1e12, 4096, GPUS["a100"], precision="fp8", mfu=0.3)


def test_mfu_from_run(tmp_path):
    with pytest.raises(Dsv3Error, match="no metrics.jsonl"):
        mfu_from_run(tmp_path)
    lines = [{"step": 1, "mfu": 0.05}, {"step": 2, "loss": 3.0}, {"step": 3, "mfu": 0.3}, {"step": 4, "mfu": 0.4}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    assert mfu_from_run(tmp_path) == pytest.approx(0.35)  # the first record (warm-up) is left out
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "mfu": 0.2}) + "\n" + json.dumps({"step": 2}))
    with pytest.raises(Dsv3Error, match='no "mfu" records'):
        mfu_from_run(tmp_path)
    (tmp_path / "metrics.jsonl").write_text("{not json\n")
    with pytest.raises(Dsv3Error, match="line 1 is not JSON"):
        mfu_from_run(tmp_path)


def test_accelerator_table():
    for name in ("h800", "h100", "h200", "a100", "b200"):
        gpu = accelerator(name.upper())
        assert gpu.bf16_flops > 0 and gpu.memory_bytes > 70 * 2**30
    assert GPUS["h800"].peak("fp8") == 2 * GPUS["h800"].peak("bf16")
    with pytest.raises(InvalidValue, match="gpu='tpu' is not a GPU of the table"):
        accelerator("tpu")


def test_measured_peak_is_the_best_round(monkeypatch):
    """The peak is 2 n^3 over the fastest round's time per matmul: other work on the machine only ever slows
    a round down. A scripted clock makes the rounds take 0.1, 0.05 and 0.15 s per matmul."""
    ticks = iter([0.0, 0.1,  # one timed matmul: 0.1 s, so 2 matmuls per round fill a fifth of a second
                  0.1,  # the deadline: 1.1
                  0.2, 0.4, 0.4,  # round 1: 2 matmuls in 0.2 s
                  0.5, 0.6, 0.6,  # round 2: 2 in 0.1 s
                  0.7, 1.0, 1.2])  # round 3: 2 in 0.3 s, then past the deadline
    monkeypatch.setattr(hardware.time, "perf_counter", lambda: next(ticks))
    assert measure_matmul_peak(torch.float32, seconds=1.0) == pytest.approx(2 * 2048**3 / 0.05, rel=1e-12)
    with pytest.raises(Dsv3Error, match="FP8 matmuls need a CUDA GPU"):
        measure_matmul_peak(torch.float8_e4m3fn)


# ----- the command ------------------------------------------------------------------------------------


def test_cli_json(capsys):
    args = ["cost", "--preset", "v3", "--tokens", "14.8T", "--gpu", "h800", "--precision", "fp8", "--mfu", "0.25",
            "--gpus", "2048", "--json"]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"total_flops", "gpu_hours", "usd", "days", "flops_per_token", "mfu"} <= set(out)
    assert out["total_flops"] == pytest.approx(14.8e12 * out["flops_per_token"])
    assert out["gpu_hours"] == pytest.approx(out["total_flops"] / (1979e12 * 0.25) / 3600)
    assert out["usd"] == pytest.approx(2 * out["gpu_hours"])
    assert sum(out["flops_per_token_breakdown"].values()) == pytest.approx(out["flops_per_token"])


def test_cli_model_dir_matches_preset(tmp_path, capsys):
    preset("small").save(tmp_path / "config.json")
    common = ["--tokens", "1B", "--seq-len", "1024", "--gpu", "h100", "--mfu", "0.4", "--json"]
    assert main(["cost", "--model", str(tmp_path), *common]) == 0
    from_dir = json.loads(capsys.readouterr().out)
    assert main(["cost", "--preset", "small", *common]) == 0
    assert from_dir["total_flops"] == json.loads(capsys.readouterr().out)["total_flops"]


def test_cli_table_from_run_and_cpu(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "mfu": 0.9}\n{"step": 2, "mfu": 0.2}\n')
    assert main(["cost", "--preset", "tiny", "--tokens", "1M", "--seq-len", "256", "--gpu", "cpu", "--gpus", "1",
                 "--from-run", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "0.200 (mean of" in out and "this machine's CPU" in out and "1M tokens" in out


def test_cli_reproduce(capsys):
    assert main(["cost", "--reproduce"]) == 0
    out = capsys.readouterr().out
    assert "2.664M" in out and "30.84M" in out and "3.80e25" in out and "$5.576M" in out
    assert main(["cost", "--reproduce", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == [r.name for r in published_runs()]
    for r in rows:
        assert {"name", "total_flops", "gpu_hours_reported", "implied_mfu"} <= set(r)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--gpu", "h900"], "--gpu 'h900' is not a GPU of the table"),
        (["--tokens", "-5"], "--tokens '-5' is not a count"),
        (["--tokens", "lots"], "--tokens 'lots' is not a count"),
        (["--mfu", "0"], "--mfu 0.0 must be a fraction in (0, 1]"),
        (["--mfu", "1.5"], "--mfu 1.5 must be a fraction in (0, 1]"),
        (["--gpu", "a100", "--precision", "fp8"], "--precision 'fp8' has no matmul peak on a100"),
        (["--from-run", "/nonexistent/run"], "no metrics.jsonl"),
        (["--gpus", "0"], "--gpus 0 must be at least 1"),
    ],
)
def test_cli_bad_input_exits_2(args, message, capsys):
    assert main(["cost", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
