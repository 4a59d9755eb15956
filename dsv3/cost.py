"""Training cost: FLOPs -> GPU-hours -> days -> dollars, and DeepSeek-V3's published figures reproduced.

GPU-hours = total FLOPs / (peak FLOP/s x MFU) / 3600, where MFU (model FLOPs utilisation) is the
fraction of the dense peak that the run's useful model FLOPs reach (`dsv3.flops` counts them).
Reading it backwards, published GPU-hours and computed FLOPs give the MFU a run must have had.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass

from dsv3.config import ModelConfig, preset
from dsv3.errors import Dsv3Error, InvalidValue
from dsv3.flops import DenseTransformer, FlopsBreakdown, dense_flops_per_token, flops_per_token
from dsv3.hardware import PRECISIONS, Accelerator, accelerator

SECONDS_PER_HOUR = 3600.0
DEFAULT_USD_PER_GPU_HOUR = 2.0  # the rental price DeepSeek-V3's report uses for its $5.576M

_SUFFIXES = {"": 1.0, "K": 1e3, "M": 1e6, "B": 1e9, "T": 1e12}


def parse_count(text: str | float, field: str = "tokens") -> float:
    """'14.8T' -> 1.48e13; accepts K/M/B/T suffixes (either case), plain numbers and 1e12-style exponents."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([kKmMbBtT]?)\s*", str(text))
    if m is None:
        raise InvalidValue(field, text, "is not a count; write a positive number such as 14.8T, 500B or 2e9")
    value = float(m.group(1)) * _SUFFIXES[m.group(2).upper()]
    if not value > 0 or not math.isfinite(value):
        raise InvalidValue(field, text, "must be a positive number")
    return value


def _is_fraction(mfu: object) -> bool:
    return isinstance(mfu, (int, float)) and not isinstance(mfu, bool) and 0 < mfu <= 1


def mfu_from_run(run_dir: str | os.PathLike) -> float:
    """Mean MFU of a training run's metrics.jsonl records, skipping the first (it includes warm-up)."""
    path = os.path.join(os.fspath(run_dir), "metrics.jsonl")
    if not os.path.isfile(path):
        raise Dsv3Error(f"no metrics.jsonl in {os.fspath(run_dir)}; pass the directory a training run wrote")
    values = []
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line.decode("utf-8"))
            except (ValueError, RecursionError):  # not UTF-8 or not JSON
                raise Dsv3Error(f"{path} line {lineno} is not JSON; fix or remove that line") from None
            if isinstance(record, dict) and record.get("mfu") is not None:
                values.append(record["mfu"])
    values = values[1:]
    if not values:
        raise Dsv3Error(f"{path} has no \"mfu\" records after the first; train for more steps or pass --mfu")
    mean = sum(values) / len(values) if all(isinstance(v, (int, float)) for v in values) else None
    if not _is_fraction(mean):
        raise Dsv3Error(f"the mean MFU of {path} is {mean!r}, not a fraction in (0, 1]; check its \"mfu\" records")
    return float(mean)


@dataclass(frozen=True)
class CostEstimate:
    flops: FlopsBreakdown  # training FLOPs per token, by component
    tokens: float
    seq_len: int
    gpu: Accelerator
    precision: str
    mfu: float
    gpus: int
    usd_per_gpu_hour: float

    @property
    def peak_flops(self) -> float:
        return self.gpu.peak(self.precision)

    @property
    def total_flops(self) -> float:
        return self.flops.total * self.tokens

    @property
    def gpu_hours(self) -> float:
        return self.total_flops / (self.peak_flops * self.mfu) / SECONDS_PER_HOUR

    @property
    def days(self) -> float:
        return self.gpu_hours / self.gpus / 24

    @property
    def usd(self) -> float:
        return self.gpu_hours * self.usd_per_gpu_hour


def estimate(
    cfg: ModelConfig,
    tokens: float,
    seq_len: int,
    gpu: Accelerator,
    *,
    precision: str = "bf16",
    mfu: float,
    gpus: int = 1,
    usd_per_gpu_hour: float = DEFAULT_USD_PER_GPU_HOUR,
) -> CostEstimate:
    """The cost of training `cfg` on `tokens` tokens in sequences of `seq_len`."""
    if gpus < 1:
        raise InvalidValue("gpus", gpus, "must be at least 1")
    if not usd_per_gpu_hour >= 0:
        raise InvalidValue("usd_per_gpu_hour", usd_per_gpu_hour, "must not be negative")
    if seq_len < 2:
        raise InvalidValue("seq_len", seq_len, "must be at least 2")
    if not _is_fraction(mfu):
        raise InvalidValue("mfu", mfu, "must be a fraction in (0, 1], e.g. 0.4 for 40% of the peak")
    gpu.peak(precision)  # fails early, naming the GPU, when it has no such peak
    return CostEstimate(
        flops=flops_per_token(cfg, seq_len, training=True),
        tokens=tokens,
        seq_len=seq_len,
        gpu=gpu,
        precision=precision,
        mfu=float(mfu),
        gpus=gpus,
        usd_per_gpu_hour=usd_per_gpu_hour,
    )


# ----- published runs -------------------------------------------------------------------------

# Llama 3.1 405B as its report describes it (grouped-query attention with 8 key/value heads).
LLAMA_31_405B = DenseTransformer(
    "Llama 3.1 405B", num_layers=126, hidden_size=16384, num_heads=128, num_kv_heads=8,
    intermediate_size=53248, vocab_size=128256,
)


@dataclass(frozen=True)
class Stage:
    """One phase of a published training run: so many tokens in sequences of seq_len."""

    tokens: float
    seq_len: int


@dataclass(frozen=True)
class PublishedRun:
    name: str
    model: ModelConfig | DenseTransformer
    stages: tuple[Stage, ...]
    gpu: str
    gpu_hours_reported: float | None
    flops_reported: float | None = None

    @property
    def tokens(self) -> float:
        return sum(s.tokens for s in self.stages)

    @property
    def total_flops(self) -> float:
        """Training FLOPs over all stages (each at its own sequence length)."""
        total = 0.0
        for s in self.stages:
            if isinstance(self.model, DenseTransformer):
                per_token = dense_flops_per_token(self.model, s.seq_len, training=True)
            else:
                per_token = flops_per_token(self.model, s.seq_len, training=True)
            total += per_token.total * s.tokens
        return total

    def implied_mfu(self, precision: str) -> float | None:
        """The MFU the reported GPU-hours imply against the GPU's dense peak at `precision`."""
        if self.gpu_hours_reported is None:
            return None
        peak = accelerator(self.gpu).peak(precision)
        return self.total_flops / (self.gpu_hours_reported * SECONDS_PER_HOUR * peak)

    @property
    def gpu_hours_per_trillion_tokens(self) -> float | None:
        if self.gpu_hours_reported is None:
            return None
        return self.gpu_hours_reported / (self.tokens / 1e12)

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "gpu": self.gpu,
            "tokens": self.tokens,
            "seq_len": [s.seq_len for s in self.stages],
            "total_flops": self.total_flops,
            "flops_reported": self.flops_reported,
            "gpu_hours_reported": self.gpu_hours_reported,
            "implied_mfu": {p: self.implied_mfu(p) for p in PRECISIONS},
            "gpu_hours_per_trillion_tokens": self.gpu_hours_per_trillion_tokens,
        }


# Context extension (DeepSeek-V3 section 4.3): two YaRN stages of 1000 steps each.
_EXT_32K = Stage(1000 * 1920 * 32768, 32768)
_EXT_128K = Stage(1000 * 480 * 131072, 131072)

# DeepSeek-V3's reported H800 GPU-hours (its Table 1); the total is priced at $2 per GPU-hour.
DEEPSEEK_V3_GPU_HOURS = {"pre-training": 2664e3, "context extension": 119e3, "post-training": 5e3}


def published_runs() -> list[PublishedRun]:
    """DeepSeek-V3's pre-training and context extension, and Llama 3.1 405B's pre-training, as reported."""
    v3 = preset("v3")
    ext = DEEPSEEK_V3_GPU_HOURS["context extension"]
    return [
        PublishedRun("DeepSeek-V3 pre-training", v3, (Stage(14.8e12, 4096),), "h800",
                     DEEPSEEK_V3_GPU_HOURS["pre-training"]),
        PublishedRun("DeepSeek-V3 context 4K->32K", v3, (_EXT_32K,), "h800", None),
        PublishedRun("DeepSeek-V3 context 32K->128K", v3, (_EXT_128K,), "h800", None),
        PublishedRun("DeepSeek-V3 context extension (both)", v3, (_EXT_32K, _EXT_128K), "h800", ext),
        PublishedRun("Llama 3.1 405B pre-training", LLAMA_31_405B, (Stage(15.6e12, 8192),), "h100",
                     30.84e6, flops_reported=3.8e25),
    ]


def default_mfu(precision: str) -> float:
    """The MFU DeepSeek-V3's pre-training reached against the H800's `precision` peak (its hours imply it)."""
    mfu = published_runs()[0].implied_mfu(precision)
    assert mfu is not None
    return mfu
