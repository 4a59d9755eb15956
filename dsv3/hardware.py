"""Accelerators: their dense matmul peaks and memory, and a measurement of this machine's own peak.

Peaks are the vendors' dense tensor-core figures (the data sheets quote twice as much "with
sparsity"; no training run uses 2:4 sparsity). Memory is the capacity `nvidia-smi` reports, which
is what a planner can spend before the CUDA context and the allocator take their share. The `cpu`
row is measured on this machine: its bf16 peak by timing a square matmul, its memory from the OS.
"""

from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass

import torch

from dsv3.errors import Dsv3Error, InvalidValue

PRECISIONS = ("bf16", "fp8")
MiB = 2**20
GiB = 2**30


@dataclass(frozen=True)
class Accelerator:
    name: str
    description: str
    bf16_flops: float  # dense peak, FLOP/s
    fp8_flops: float | None  # dense peak, FLOP/s; None where there are no FP8 tensor cores
    memory_bytes: int

    def peak(self, precision: str) -> float:
        """Dense peak FLOP/s at `precision` ("bf16" or "fp8")."""
        if precision not in PRECISIONS:
            raise InvalidValue("precision", precision, f"is not one of: {', '.join(PRECISIONS)}")
        flops = self.bf16_flops if precision == "bf16" else self.fp8_flops
        if flops is None:
            raise InvalidValue("precision", precision, f"has no matmul peak on {self.name}, which has no FP8 tensor "
                               "cores; use bf16")
        return flops


# Hopper parts share one compute configuration: 989.5 TFLOP/s dense bf16 and 1979 FP8, half the data
# sheets' "with sparsity" 1979 and 3958. The H800 is the H100 with slower NVLink; the H200 is the H100
# with 141 GB of HBM3e. B200: 2.25 / 4.5 PFLOP/s dense.
_GPUS = [
    Accelerator("a100", "NVIDIA A100 SXM 80GB", 312e12, None, 81920 * MiB),
    Accelerator("h100", "NVIDIA H100 SXM 80GB", 989.5e12, 1979e12, 81559 * MiB),
    Accelerator("h800", "NVIDIA H800 SXM 80GB", 989.5e12, 1979e12, 81559 * MiB),
    Accelerator("h200", "NVIDIA H200 SXM 141GB", 989.5e12, 1979e12, 143771 * MiB),
    Accelerator("b200", "NVIDIA B200 180GB", 2250e12, 4500e12, 183359 * MiB),
]
GPUS: dict[str, Accelerator] = {g.name: g for g in _GPUS}
NAMES = (*GPUS, "cpu")


def accelerator(name: str) -> Accelerator:
    """The table row for `name` (case-insensitive); "cpu" measures this machine (~1-2 s, once per process)."""
    key = name.lower()
    if key == "cpu":
        return cpu()
    if key not in GPUS:
        raise InvalidValue("gpu", name, f"is not a GPU of the table; choose one of: {', '.join(NAMES)}")
    return GPUS[key]


@functools.cache
def cpu() -> Accelerator:
    """This machine's CPU: bf16 matmul peak measured now, memory = physical RAM."""
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    threads = torch.get_num_threads()
    return Accelerator(
        "cpu", f"this machine's CPU ({threads} threads, measured)", measure_matmul_peak(torch.bfloat16), None, memory
    )


def usable_device(name: str) -> torch.device:
    """The torch device `name` ("cpu", "cuda", "cuda:N") if this machine has it; a Dsv3Error naming it if not."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise InvalidValue("device", name, "is not a device; use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise InvalidValue("device", name, "is not a device this code runs on; use cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidValue("device", name, "is not available: this machine has no CUDA GPU that torch can use")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InvalidValue("device", name, f"is not available: this machine has {torch.cuda.device_count()} "
                               "CUDA GPU(s)")
    return device


def available_memory(device: str | torch.device = "cpu") -> int:
    """Bytes a new allocation can take now: free GPU memory on CUDA, MemAvailable of /proc/meminfo on the CPU
    (physical memory where that file is missing)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_memory(needed: float, what: str, device: str | torch.device = "cpu", hint: str = "") -> None:
    """Refuse, with the figures, work that cannot fit: `what` needs `needed` bytes on `device`."""
    have = available_memory(device)
    if needed > have:
        raise Dsv3Error(f"{what} needs about {needed / GiB:,.3g} GiB but {torch.device(device).type} memory has "
                        f"{have / GiB:,.3g} GiB available{'; ' + hint if hint else ''}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_matmul_peak(dtype: torch.dtype, device: str | torch.device = "cpu", seconds: float = 1.0) -> float:
    """FLOP/s of a square n x n matmul in `dtype` on `device`: the best of several timed rounds over ~`seconds`.

    The best round, not the mean, because other processes sharing the machine only ever slow a round
    down. FP8 (torch.float8_e4m3fn) is timed through torch._scaled_mm and needs a GPU with FP8 tensor cores.
    """
    device = torch.device(device)
    n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    if dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        if device.type != "cuda":
            raise Dsv3Error("FP8 matmuls need a CUDA GPU with FP8 tensor cores; measure bf16 on the CPU")
        one = torch.ones((), device=device)
        b = b.t().contiguous().t()  # _scaled_mm wants its second operand column-major

        def matmul() -> torch.Tensor:
            return torch._scaled_mm(a, b, one, one, out_dtype=torch.bfloat16)
    else:

        def matmul() -> torch.Tensor:
            return a @ b

    matmul()  # warm-up: first-call allocation and kernel selection
    _sync(device)
    start = time.perf_counter()
    matmul()
    _sync(device)
    reps = max(1, int(seconds / 5 / max(time.perf_counter() - start, 1e-6)))  # ~5 rounds in `seconds`
    best = float("inf")
    deadline = time.perf_counter() + seconds
    while True:
        t0 = time.perf_counter()
        for _ in range(reps):
            matmul()
        _sync(device)
        best = min(best, (time.perf_counter() - t0) / reps)
        if time.perf_counter() > deadline:
            break
    return 2.0 * n**3 / best
