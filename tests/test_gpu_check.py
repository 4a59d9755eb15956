"""benchmarks/gpu_check.py, the one-shot GPU check, kept from rotting: its CPU run (`--device cpu --quick`) must
write every part without an error and with sane figures, and its ~1B config must be what it says."""

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.py")
PARTS = ("environment", "logits_parity", "experts", "train_bf16", "train_fp8", "decode")


def numbers(value, path="report"):
    """Every number in a JSON value, with where it sits."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from numbers(v, f"{path}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from numbers(v, f"{path}[{i}]")
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield path, value


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "gpu_check.json"
    env = {**os.environ, "PYTHONPATH": ROOT}
    run = subprocess.run([sys.executable, SCRIPT, "--device", "cpu", "--quick", "--threads", "1", "--out", str(out)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "gpu_check on cpu (quick)" in run.stdout
    with open(out, encoding="utf-8") as f:
        return json.load(f)


@pytest.mark.slow
def test_every_part_runs_without_error_and_every_figure_is_finite(report):
    parts = report["parts"]
    assert set(parts) == set(PARTS)
    for name in PARTS:
        assert "error" not in parts[name], (name, parts[name].get("error"), parts[name].get("traceback"))
    for path, value in numbers(report):
        assert math.isfinite(value), path


@pytest.mark.slow
def test_figures_are_sane(report):
    p = report["parts"]
    assert p["environment"]["bf16_matmul_tflops"] > 0

    parity = p["logits_parity"]
    assert parity["fp32"]["rel_err"] < 1e-5 and parity["fp32"]["top1_agree"] == 1.0  # the CPU against itself
    for key in ("bf16_autocast", "bf16_weights"):
        assert parity[key]["rel_err"] < 0.25 and parity[key]["top1_agree"] >= 0.8, (key, parity[key])

    experts = p["experts"]
    assert experts["grouped_kernel_ran"]
    assert experts["grouped_vs_loop"]["rel_err"] < 1e-2
    assert experts["grouped"]["forward_ms"] > 0 and experts["loop"]["forward_ms"] > 0

    bf16, fp8 = p["train_bf16"], p["train_fp8"]
    for run in (bf16, fp8):
        assert run["tokens_per_s"] > 0 and 0 < run["mfu_vs_measured_bf16"] < 1
        assert len(run["losses"]) == run["warmup_steps"] + run["timed_steps"]
        assert run["losses"][-1] < run["losses"][0]  # the synthetic batches are learnable
    assert fp8["fp8_gemms"].startswith("emulated")  # the CPU has no FP8 GEMM
    assert not any(k.startswith("_scaled_mm") for k in fp8["matmuls_one_forward_backward_256_tokens"])
    assert abs(fp8["loss_diff_fp8_minus_bf16"]) < 0.05
    assert fp8["tokens_per_s_over_bf16"] > 0

    decode = p["decode"]
    for model in ("tiny", "small"):
        for batch in (1, 4):
            row = decode[model][f"batch_{batch}"]
            assert row["decode_steps"] == decode["new_tokens"] - 1
            assert row["generated_tokens"] == batch * decode["new_tokens"]
            assert row["all_finished_by_length"]
            assert row["decode_tokens_per_s"] > 0 and row["prefill_tokens_per_s"] > 0


def test_the_1b_config_is_what_the_script_says():
    """The full run's model, built on the meta device: ~1.09B parameters, ~334M active, MTP on."""
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("gpu_check", module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    cfg = module.moe_1b()
    counts = module.describe(cfg)  # asserts that the meta model holds exactly the inventory's tensors
    assert 1.0e9 < counts["total"] < 1.2e9
    assert 0.3e9 < counts["active"] < 0.4e9
    assert counts["mtp"] > 0 and counts["built_on_meta"] == counts["total"] + counts["mtp"]
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.n_routed_experts, cfg.num_experts_per_tok) == (2048, 16, 64, 6)
    assert cfg.max_position_embeddings >= module.FULL.train[1]
