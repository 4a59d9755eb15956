"""What a training run records: `metrics.jsonl` (one JSON object per line, each with its `step`), TensorBoard
event files when the `tensorboard` package is installed, and the one-line summaries printed as it goes.

Records are of three kinds, told apart by their keys: training records (`loss`, every log interval),
validation records (`val_loss`, every evaluation) and a final `summary` record.
"""

from __future__ import annotations

import json
import os
from typing import Any

from dsv3.errors import Dsv3Error
from dsv3.utils import atomic_write_text

METRICS = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
# per-router lists: plotted by `dsv3 report`, too long for TensorBoard scalars
_LISTS = ("load", "bias", "val_load")


def read_metrics(run_dir: str | os.PathLike, *, strict: bool = True) -> list[dict[str, Any]]:
    """The records of a run's metrics.jsonl. A last line cut short by a killed process is skipped; any other
    line that is not a JSON object raises (unless `strict` is False, when it is skipped too)."""
    path = os.path.join(os.fspath(run_dir), METRICS)
    if not os.path.isfile(path):
        raise Dsv3Error(f"no {METRICS} in {os.fspath(run_dir)}; pass the directory of a training run")
    try:
        with open(path, "rb") as f:
            lines = f.read().split(b"\n")
    except OSError as e:
        raise Dsv3Error(f"cannot read {path} ({e.strerror or e}); check its permissions") from None
    records = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:  # bytes that are not UTF-8, or JSON that is not a record, are not a metrics line
            record = json.loads(line.decode("utf-8"))
            if not isinstance(record, dict) or "step" not in record:
                raise ValueError("not a record with a step")
        except (ValueError, RecursionError):
            if not strict or n >= len(lines) - 1:  # the last line (the file ends with a newline when whole)
                continue
            raise Dsv3Error(f"{path} line {n} is not a metrics record; fix or remove that line") from None
        records.append(record)
    return records


class MetricsLog:
    """Appends records to RUN/metrics.jsonl (flushed at once) and mirrors the scalars to TensorBoard."""

    def __init__(self, run_dir: str, *, resume_step: int | None = None, tensorboard: bool = True):
        """resume_step: keep the records up to that step and drop later ones (written after the checkpoint the
        run resumes from, they would otherwise appear twice); None starts an empty file."""
        self.path = os.path.join(run_dir, METRICS)
        kept = []
        if resume_step is not None and os.path.isfile(self.path):
            kept = [r for r in read_metrics(run_dir, strict=False) if r["step"] <= resume_step]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed by close()
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional: metrics.jsonl holds everything
                SummaryWriter = None
            if SummaryWriter is not None:
                # purge_step drops events a killed run wrote after the checkpoint it resumes from
                self._tb = SummaryWriter(os.path.join(run_dir, TENSORBOARD_DIR), purge_step=resume_step)

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and key not in _LISTS and isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def train_line(r: dict[str, Any]) -> str:
    """One line for a person: the figures of a training record."""
    parts = [f"step {r['step']}", f"loss {r['loss']:.4f}"]
    if r.get("mtp_loss") is not None:
        acc = f" (acc {r['mtp_acc']:.1%})" if r.get("mtp_acc") is not None else ""
        parts.append(f"mtp {r['mtp_loss']:.4f}{acc}")
    if r.get("indexer_kl") is not None:
        parts.append(f"indexer KL {r['indexer_kl']:.4f}")
    parts += [f"lr {r['lr']:.2e}", f"gnorm {r['grad_norm']:.2f}", f"{r['tokens_per_s']:,.0f} tok/s",
              f"MFU {r['mfu']:.1%}"]
    if r.get("maxvio") is not None:
        parts.append(f"MaxVio {r['maxvio']:.2f} (max {r['maxvio_max']:.2f})")
    if r.get("ep_max_ranks"):
        parts.append(f"EP ranks/token {r['ep_max_ranks']}")
    return " | ".join(parts)


def val_line(r: dict[str, Any]) -> str:
    parts = [f"step {r['step']}", f"val loss {r['val_loss']:.4f}", f"ppl {r['val_ppl']:.2f}"]
    if r.get("val_mtp_loss") is not None:
        parts.append(f"val mtp {r['val_mtp_loss']:.4f} (acc {r['val_mtp_acc']:.1%})")
    if r.get("val_maxvio") is not None:
        parts.append(f"val MaxVio {r['val_maxvio']:.3f} (max {r['val_maxvio_max']:.3f})")
    return " | ".join(parts)
