"""The training loop: `train(TrainConfig(...))` prepares the data, builds (or resumes) the model, runs the
optimizer steps, evaluates, checkpoints, and ends with samples and a summary. `dsv3 train` is a thin layer
over it. The parts it schedules live in their own modules: one optimizer step (`step.py`), the time budget
(`budget.py`), the run directory and its checkpoints (`rundir.py`).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
from tqdm import tqdm

from dsv3.checkpoint.pretrained import load_into
from dsv3.data import DatasetInfo, TokenLoader, check_vocab
from dsv3.data.dataset import MANIFEST
from dsv3.data.prepare import prepare
from dsv3.errors import Dsv3Error
from dsv3.flops import flops_per_token
from dsv3.hardware import check_memory, measure_matmul_peak, usable_device
from dsv3.inventory import inventory
from dsv3.parallel.build import build_model
from dsv3.parallel.dist import Dist, world_size
from dsv3.parallel.dist import init as init_dist
from dsv3.plan import training_bytes_per_rank
from dsv3.train.balance import max_vio, relative_loads
from dsv3.train.budget import TimeBudget
from dsv3.train.config import TrainConfig
from dsv3.train.dsa import freeze_all_but_indexers, is_indexer
from dsv3.train.evaluate import evaluate
from dsv3.train.fp8 import apply_fp8
from dsv3.train.losses import mtp_lambda
from dsv3.train.metrics import MetricsLog, train_line, val_line
from dsv3.train.optim import build_optimizer, lr_at
from dsv3.train.rundir import SUMMARY, TRAIN_CONFIG, RunDir
from dsv3.train.sample import samples
from dsv3.train.step import NonFinite, StepStats, TrainStep
from dsv3.train.summary import Summary
from dsv3.utils import human

PROBE_STEPS = 3  # timed forward+backward passes that size a time-budgeted run (the first one warms up)


class TrainingDiverged(Dsv3Error):
    """The loss or the gradient norm became NaN or infinite."""


@dataclass
class TrainResult:
    run_dir: str
    summary: Summary
    samples: list[str]
    checkpoint: str | None  # the newest checkpoint folder


def train(cfg: TrainConfig, log: Callable[[str], None] = print, progress: bool | None = None) -> TrainResult:
    """Train as `cfg` says and return the summary. `log` receives every line meant for a person; `progress`
    shows a progress bar (None: only when stderr is a terminal)."""
    return Trainer(cfg, log, progress).run()


class Trainer:
    """One training run. Under torchrun every rank builds its own Trainer and runs the same loop; rank 0 alone
    logs, writes metrics and changes the run directory (see `dsv3.parallel`)."""

    def __init__(self, cfg: TrainConfig, log: Callable[[str], None] = print, progress: bool | None = None):
        self.started = time.perf_counter()
        self.cfg, self.progress = cfg, progress
        self._log = log
        self.run_dir = RunDir(cfg.out)
        self.model_cfg = cfg.model()
        cfg.layout.check(self.model_cfg, world_size(), cfg.grad_accum)  # before any work, on every rank
        self.d = init_dist(cfg.layout, usable_device(cfg.device))
        self.device = self.d.device
        check_memory(training_bytes_per_rank(self.model_cfg, cfg.batch_size, cfg.seq_len, self.d.world_size),
                     f"training this model with batches of {cfg.batch_size} x {cfg.seq_len} tokens", self.device,
                     hint="use a smaller model, --batch-size or --seq-len (--grad-accum keeps the tokens per step)")
        self.run_dir.claim(resume=cfg.resume, overwrite=cfg.overwrite, d=self.d)
        self.info = self._prepare_data()
        check_vocab(self.info, self.model_cfg)
        self.tokenizer = self.info.tokenizer()

        torch.manual_seed(cfg.seed)
        if cfg.compile:
            check_compiler(self.device)
        self.model = build_model(self.model_cfg, self.d, init_std=cfg.init_std, seed=cfg.seed,
                                 bf16=cfg.dtype != "fp32", reshard=cfg.reshard, convert=self._convert,
                                 compile=cfg.compile)
        self.model.train()
        self.optimizer = build_optimizer(self.model, cfg)
        self.train_step = TrainStep(self.model, self.optimizer, cfg, self.autocast, self.device, self.d)
        if cfg.balance == "aux-free" and any(g.bias is None for g in self.train_step.gates.values()):
            raise Dsv3Error("--balance aux-free needs routers with a selection bias (topk_method noaux_tc); "
                            "this model routes without one, so use --balance aux-loss or none")
        # every rank draws the global batch, the same on all, and keeps its own rows of it
        self.loader = TokenLoader(self.info, "train", cfg.batch_size * cfg.layout.data_parallel, cfg.seq_len, cfg.seed)
        self.batches = _own_rows(self.loader, self.d, cfg.batch_size)

        self.step, self.tokens, self.train_seconds = 0, 0, 0.0
        self.max_steps = cfg.max_steps
        self.budget: TimeBudget | None = None  # set when the run is sized to cfg.time_budget
        self.last_step_s = 0.0
        resume_step = self._restore() if cfg.resume else None
        self.metrics = MetricsLog(self.run_dir.path, resume_step=resume_step, tensorboard=cfg.tensorboard) \
            if self.d.is_main else None
        if self.d.is_main:
            self.run_dir.write_json(TRAIN_CONFIG, cfg.to_dict())
            self.tokenizer.save(self.run_dir.path)

        dtype = torch.float32 if cfg.dtype == "fp32" else torch.bfloat16  # fp8: emulated, against bf16's peak
        peak = cfg.peak_tflops * 1e12 if cfg.peak_tflops else None
        if peak is None and self.d.is_main:  # measured once; the ranks are assumed alike
            peak = measure_matmul_peak(dtype, self.device)
        self.peak = self.d.broadcast_object(peak) * self.d.world_size  # the job's
        self.flops_per_token = flops_per_token(self.model_cfg, cfg.seq_len, training=True).total
        self.last_eval: dict | None = None
        self.last_saved = self.step if resume_step else -1
        self.last_checkpoint = self.run_dir.latest()

    # ----- set-up ------------------------------------------------------------------------------------
    def _convert(self, model) -> None:
        """Before the parallelisms: the starting weights of a fine-tuning run, then FP8's module switch."""
        if self.cfg.init_from and not self.cfg.resume:
            fresh = is_indexer if self.cfg.dsa_stage else None  # a dense model gains new indexers
            load_into(model, self.cfg.init_from, subset=self.d.layout.pp > 1 or not self.cfg.mtp, keep=fresh)
        if self.cfg.dsa_stage == "warmup":
            freeze_all_but_indexers(model)
        if self.cfg.dtype == "fp8":
            apply_fp8(model, self.cfg.fp8_recipe)

    def log(self, line: str) -> None:
        if self.d.is_main:
            with tqdm.external_write_mode():
                self._log(line)

    def autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.dtype != "fp32")

    def eager(self) -> AbstractContextManager:
        """Around passes that are not training steps (evaluation, samples): with --compile, run the blocks eagerly
        rather than compile a graph for every new shape (evaluation's last batch, each sampled length)."""
        return torch.compiler.set_stance("force_eager") if self.cfg.compile else contextlib.nullcontext()

    def _prepare_data(self) -> DatasetInfo:
        """A prepared dataset folder given as the only source is used as it is; anything else is prepared into
        data_dir (which a later run reuses while the sources and settings are unchanged)."""
        cfg = self.cfg
        if len(cfg.data) == 1 and os.path.isfile(os.path.join(cfg.data[0], MANIFEST)):
            info = DatasetInfo.load(cfg.data[0])
            self.log(f"using the prepared data in {cfg.data[0]} ({human(info.tokens)} tokens)")
            return info
        if self.d.is_main:  # one rank prepares; the others read what it wrote
            prepare(cfg.data, cfg.data_dir, vocab_size=self.model_cfg.vocab_size, tokenizer=cfg.tokenizer,
                    audit=cfg.audit, log=self.log, progress=self.progress)
        self.d.barrier()
        return DatasetInfo.load(cfg.data_dir)

    def _restore(self) -> int:
        """Load the newest checkpoint of the run directory; returns its step (0 when there is none yet)."""
        path = self.run_dir.latest()
        if path is None:
            self.log(f"no checkpoint in {self.run_dir.path} yet: starting from step 0")
            return 0
        state = self.run_dir.restore(path, self.model, self.optimizer, self.loader, self.info.tokenizer_sha256)
        changed = [f"{k} {v!r} -> {getattr(self.cfg, k)!r}" for k, v in state["train_config"].items()
                   if k not in ("resume", "overwrite") and v != getattr(self.cfg, k, v)]
        if changed:
            self.log("resuming with changed options: " + ", ".join(changed))
        self.step, self.tokens, self.train_seconds = state["step"], state["tokens"], state["train_seconds"]
        self.max_steps = self.cfg.max_steps or state["max_steps"]
        self.log(f"resumed {self.run_dir.path} from {os.path.relpath(path, self.run_dir.path)} "
                 f"(step {self.step} of {self.max_steps}, {human(self.tokens)} tokens)")
        return self.step

    def _probe(self) -> tuple[float, float]:
        """Seconds per optimizer step and per evaluation, from a few timed forward+backward passes and one
        validation batch. They change nothing: gradients are dropped, the data position is put back."""
        cfg = self.cfg
        position = self.loader.state_dict()
        times = []
        for _ in range(PROBE_STEPS):
            t0 = time.perf_counter()
            self.train_step.accumulate(self.batches, cfg.mtp_lambda, accuracy=False)
            self.optimizer.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t0)
        self.loader.load_state_dict(position)
        self.train_step.forget_statistics()
        step_s = sum(times[1:]) / (len(times) - 1)
        t0 = time.perf_counter()
        self._run_evaluation(cfg.batch_size, 0)
        eval_s = (time.perf_counter() - t0) * math.ceil(cfg.eval_windows / cfg.batch_size)
        return self.d.broadcast_object((step_s, eval_s))  # rank 0's timing sizes every rank's run

    def _size_to_budget(self) -> int:
        cfg = self.cfg
        self.budget = TimeBudget(cfg.time_budget, self.started)
        step_s, eval_s = self._probe()
        steps = self.budget.plan(step_s, eval_s, cfg.eval_every)
        self.log(f"time budget {cfg.time_budget:g} min: {step_s:.2f} s per step, {eval_s:.1f} s per evaluation "
                 f"-> {steps} steps ({human(steps * cfg.tokens_per_step)} tokens)")
        return steps

    # ----- the loop ----------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        cfg = self.cfg
        if self.max_steps is None:
            self.max_steps = self._size_to_budget()
        n_params = sum(e.numel for e in inventory(self.model_cfg) if not e.fp32)  # the router biases are not
        mtp = "on" if self.model_cfg.num_nextn_predict_layers else "off"
        self.log(f"training {n_params / 1e6:.1f}M parameters ({cfg.dtype}, balance {cfg.balance}, MTP {mtp}) for "
                 f"{self.max_steps} steps of {cfg.tokens_per_step:,} tokens into {self.run_dir.path}"
                 f"{self._layout_words()}; matmul peak {self.peak / 1e12:.3g} TFLOP/s")
        bar = tqdm(total=self.max_steps, initial=self.step, desc="training", unit="step", dynamic_ncols=True,
                   disable=None if self.progress is None else not self.progress)
        window_tokens, window_seconds = 0, 0.0
        if self.budget is not None:
            self.budget.start(self.step)
        try:
            while self.step < self.max_steps:
                t0 = time.perf_counter()
                stats = self.optimizer_step()
                seconds = self.last_step_s = time.perf_counter() - t0
                self.train_seconds += seconds
                window_tokens += cfg.tokens_per_step
                window_seconds += seconds
                bar.update(1)
                bar.set_postfix(loss=f"{stats.loss:.3f}")
                last = self.step == self.max_steps or self._out_of_time(seconds)
                if self.step % cfg.log_every == 0 or last:
                    record = self._train_record(stats, window_tokens / window_seconds)
                    self._write(record)
                    self.log(train_line(record) + self._eta())
                    window_tokens, window_seconds = 0, 0.0
                if self.step % cfg.eval_every == 0 or last:
                    self._evaluate()
                if self.step % cfg.save_every == 0 or last:
                    self._save()
                if last:
                    break
                self._replan(bar)
        finally:
            bar.close()
        if self.step < self.max_steps:
            self.log(f"time budget reached: stopping at step {self.step} of {self.max_steps}")
        return self._finish()

    def _layout_words(self) -> str:
        lay = self.d.layout
        if not self.d.distributed:
            return ""
        pp = f" x pp {lay.pp} ({lay.pp_schedule})" if lay.pp > 1 else ""
        return f" on {self.d.world_size} ranks (dp-shard {lay.dp_shard} x ep {lay.ep}{pp})"

    def _replan(self, bar: tqdm) -> None:
        if self.budget is None:
            return
        warmup = max(1, round(self.cfg.warmup * self.max_steps))
        steps = self.d.broadcast_object(self.budget.replan(self.step, self.max_steps, warmup, self.last_step_s))
        if steps is not None:
            per_step = (time.perf_counter() - self.budget.since) / (self.step - self.budget.first_step)
            self.log(f"time budget: {per_step:.2f} s per step now -> {steps} steps instead of {self.max_steps}")
            self.max_steps = bar.total = steps
            bar.refresh()

    def _out_of_time(self, seconds: float) -> bool:
        """Whether the budget ends the run after this step: rank 0's clock decides for every rank."""
        return self.budget is not None and self.d.broadcast_object(self.budget.out_of_time(seconds))

    def optimizer_step(self) -> StepStats:
        """The next optimizer step at the scheduled rate, MTP weight and bias speed."""
        cfg = self.cfg
        progress = self.step / self.max_steps
        logged = (self.step + 1) % cfg.log_every == 0 or self.step + 1 == self.max_steps
        gamma = cfg.bias_gamma if cfg.balance == "aux-free" and progress < cfg.bias_freeze else 0.0
        if cfg.dsa_stage == "warmup":
            gamma = 0.0  # the routers are frozen with the rest of the model
        try:
            stats = self.train_step(self.batches, lr=lr_at(self.step, self.max_steps, cfg),
                                    mtp_lambda=mtp_lambda(progress, cfg), bias_gamma=gamma, accuracy=logged)
        except NonFinite as e:
            self._close_metrics()
            kept = (f"the last good checkpoint is {self.last_checkpoint}; resume from it with --resume, perhaps "
                    f"with a lower --lr" if self.last_checkpoint else "no checkpoint had been saved yet; try a lower "
                    "--lr")
            raise TrainingDiverged(f"{e} at step {self.step + 1}; training stopped and {kept}") from None
        self.step += 1
        self.tokens += cfg.tokens_per_step
        return stats

    def _eta(self) -> str:
        done = self.train_seconds / max(self.step, 1)
        return f" | eta {_clock((self.max_steps - self.step) * done)}"

    def _train_record(self, stats: StepStats, tokens_per_s: float) -> dict:
        record = {"step": self.step, "tokens": self.tokens, "loss": stats.loss}
        if self.model_cfg.num_nextn_predict_layers:
            record.update(mtp_loss=stats.mtp_loss, mtp_acc=stats.mtp_acc, mtp_lambda=stats.mtp_lambda)
        record.update(lr=stats.lr, grad_norm=stats.grad_norm, tokens_per_s=tokens_per_s,
                      mfu=tokens_per_s * self.flops_per_token / self.peak, elapsed=time.perf_counter() - self.started)
        if stats.loads is not None:
            vio = max_vio(stats.loads)
            record.update(balance_loss=stats.balance_loss, bias_gamma=stats.bias_gamma, maxvio=vio.mean().item(),
                          maxvio_max=vio.max().item(), load=relative_loads(stats.loads))
            biases = self.train_step.biases()
            if biases is not None:
                record["bias"] = [[round(v, 5) for v in row] for row in biases]
        if self.cfg.dsa_stage:
            record["indexer_kl"] = stats.indexer_kl
        if stats.ep_max_ranks:  # expert parallelism: how far tokens travelled, and the bytes on the wire
            record.update(ep_max_ranks=stats.ep_max_ranks, ep_sent_bytes=stats.ep_sent_bytes)
        return record

    def _evaluate(self) -> None:
        record = self._run_evaluation(self.cfg.eval_windows, self.step)
        self._write(record)
        self.log(val_line(record))
        self.last_eval = record

    def _run_evaluation(self, windows: int, step: int) -> dict:
        """Every rank evaluates the same windows (the model's collectives need them all); under pipeline
        parallelism the stages pass them along and the pipeline ranks add up what each measured."""
        cfg, pipeline = self.cfg, self.train_step.pipeline
        extra = {} if pipeline is None else {"forward": pipeline.forward,
                                             "reduce": lambda t: self.d.all_reduce(t, "pp")}
        with self.eager():
            return evaluate(self.model, self.info, cfg.batch_size, cfg.seq_len, windows, self.autocast, self.device,
                            step, **extra)

    def _save(self) -> None:
        if self.last_saved == self.step:
            return
        state = {"step": self.step, "max_steps": self.max_steps, "tokens": self.tokens,
                 "train_seconds": self.train_seconds, "loader": self.loader.state_dict(),
                 "train_config": self.cfg.to_dict(), "tokenizer_sha256": self.info.tokenizer_sha256}
        self.last_checkpoint = self.run_dir.save(self.step, self.model, self.optimizer, self.tokenizer, state,
                                                 self.cfg.keep_last, self.d, fp8=self.cfg.dtype == "fp8")
        self.last_saved = self.step

    def _finish(self) -> TrainResult:
        self._save()
        if self.last_eval is None or self.last_eval["step"] != self.step:  # a finished run resumed
            self._evaluate()
        texts = self._samples()
        if texts:
            self.log("samples:")
            for text in texts:
                self.log("  " + repr(text))
        summary = self._summary()
        self._write({"step": self.step, "summary": summary.as_dict()})
        self._close_metrics()
        if self.d.is_main:
            self.run_dir.write_json(SUMMARY, {**summary.as_dict(), "samples": texts})
        self.log("summary:")
        for line in summary.lines():
            self.log(line)
        self.d.close()
        return TrainResult(self.run_dir.path, summary, texts, self.last_checkpoint)

    def _samples(self) -> list[str]:
        """A few generated texts. Every rank samples alike (the model's collectives need them all) and keeps
        rank 0's choice of token. The sampler runs the whole model: not under pipeline parallelism."""
        cfg = self.cfg
        if self.train_step.pipeline is not None:
            if cfg.samples:
                self.log(f"no samples under pipeline parallelism: generate from {self.run_dir.path} with "
                         "`dsv3 generate --model` instead")
            return []
        with self.eager():
            return samples(self.model, self.tokenizer, cfg.samples, cfg.sample_tokens, seed=cfg.seed,
                           agree=self.d.broadcast if self.d.distributed else None)

    def _write(self, record: dict) -> None:
        if self.metrics is not None:
            self.metrics.write(record)

    def _close_metrics(self) -> None:
        if self.metrics is not None:
            self.metrics.close()

    def _summary(self) -> Summary:
        ev = self.last_eval or {}
        tokens_per_s = self.tokens / self.train_seconds if self.train_seconds else 0.0
        return Summary.build(
            steps=self.step, tokens=self.tokens, epochs=self.tokens / self.info.splits["train"]["tokens"],
            wall_seconds=time.perf_counter() - self.started, train_seconds=self.train_seconds,
            tokens_per_s=tokens_per_s, mfu=tokens_per_s * self.flops_per_token / self.peak, peak_flops=self.peak,
            dtype="bf16" if self.cfg.dtype == "fp8" else self.cfg.dtype,  # FP8 is emulated: bf16's peak
            total_flops=self.tokens * self.flops_per_token, val_loss=ev.get("val_loss"), val_ppl=ev.get("val_ppl"),
            val_mtp_acc=ev.get("val_mtp_acc"), val_maxvio=ev.get("val_maxvio"),
        )


def check_compiler(device: torch.device) -> None:
    """--compile on the CPU: inductor builds its kernels with a C++ compiler; say so before any work if there is
    none (on a GPU it needs Triton, which comes with torch's CUDA builds)."""
    if device.type != "cpu":
        return
    from torch._inductor.cpp_builder import get_cpp_compiler

    try:
        get_cpp_compiler()
    except Exception as e:  # inductor's InvalidCxxCompiler, or whatever the search raised
        raise Dsv3Error(f"--compile needs a C++ compiler on the CPU ({e}); install g++ (apt-get install g++) or "
                        "set CXX, or train without --compile") from None


def _own_rows(loader: TokenLoader, d: Dist, rows: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This data rank's `rows` sequences of each global batch the loader draws (all of it in one process)."""
    mine = slice(d.data_rank * rows, (d.data_rank + 1) * rows)
    for x, y in loader:
        yield x[mine], y[mine]


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m}m{s:02d}s"
