"""The closing summary of a run: tokens, time, throughput, MFU, validation figures, and what the same FLOPs
would cost on DeepSeek-V3's own hardware at its own efficiency.

DeepSeek-V3's pre-training took 2.664M H800 GPU-hours for 14.8T tokens (180K per trillion) of a model
whose training FLOPs per token `dsv3.flops` computes; together they give the FLOP/s each H800 delivered
in practice. Dividing a run's FLOPs by that rate prices it as if DeepSeek had run it, at $2 per GPU-hour.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from dsv3.cost import DEFAULT_USD_PER_GPU_HOUR, SECONDS_PER_HOUR, published_runs
from dsv3.utils import human


def deepseek_v3_flops_per_gpu() -> float:
    """The FLOP/s per H800 that DeepSeek-V3's pre-training achieved (its FLOPs over its GPU-seconds)."""
    run = published_runs()[0]  # DeepSeek-V3 pre-training: 14.8T tokens at 4K, 2.664M H800 GPU-hours
    assert run.gpu_hours_reported is not None
    return run.total_flops / (run.gpu_hours_reported * SECONDS_PER_HOUR)


@dataclass
class Summary:
    steps: int
    tokens: int  # training tokens seen, resumed parts included
    epochs: float  # passes over the training split
    wall_seconds: float  # this process, from start to summary (data preparation and samples included)
    train_seconds: float  # optimizer steps only, resumed parts included
    tokens_per_s: float
    mfu: float
    peak_flops: float
    dtype: str
    total_flops: float  # model FLOPs of all training steps
    val_loss: float | None
    val_ppl: float | None
    val_mtp_acc: float | None
    val_maxvio: float | None
    h800_gpu_hours: float
    h800_usd: float

    @classmethod
    def build(cls, *, total_flops: float, **fields: Any) -> Summary:
        hours = total_flops / deepseek_v3_flops_per_gpu() / SECONDS_PER_HOUR
        return cls(total_flops=total_flops, h800_gpu_hours=hours, h800_usd=hours * DEFAULT_USD_PER_GPU_HOUR, **fields)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def lines(self) -> list[str]:
        """The summary as aligned lines for a person."""
        rows = [
            ("tokens seen", f"{self.tokens:,} in {self.steps} steps ({self.epochs:.2f} passes over the training data)"),
            ("wall time", f"{_duration(self.wall_seconds)} (optimizer steps {_duration(self.train_seconds)})"),
            ("throughput", f"{self.tokens_per_s:,.0f} tokens/s, MFU {self.mfu:.1%} of {self.peak_flops / 1e12:.3g} "
                           f"TFLOP/s ({self.dtype} matmul peak of this machine)"),
        ]
        if self.val_loss is not None:
            val = f"loss {self.val_loss:.4f}, perplexity {self.val_ppl:.2f}"
            if self.val_maxvio is not None:
                val += f", MaxVio {self.val_maxvio:.3f}"
            rows.append(("validation", val))
        if self.val_mtp_acc is not None:
            rows.append(("MTP top-1 accuracy", f"{self.val_mtp_acc:.1%} (the speculative acceptance to expect)"))
        rows.append(("on H800s", f"{human(self.total_flops)}FLOPs = {self.h800_gpu_hours * 3600:.3g} GPU-seconds, "
                                 f"${self.h800_usd:.2g} at ${DEFAULT_USD_PER_GPU_HOUR:g}/GPU-hour and DeepSeek-V3's "
                                 f"{deepseek_v3_flops_per_gpu() / 1e12:.0f} TFLOP/s per GPU"))
        width = max(len(k) for k, _ in rows)
        return [f"  {k:<{width}}  {v}" for k, v in rows]


def _duration(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    return f"{m}m {s:02d}s" if m else f"{seconds:.1f}s"
