"""The training loop: `train(TrainConfig(...))` prepares the data, builds (or resumes) the model, runs the
optimizer steps with DeepSeek-V3's balancing and MTP recipe, evaluates, checkpoints, and ends with
samples and a summary. `dsv3 train` is a thin layer over it.

One optimizer step:
    for each of grad_accum micro-batches:  forward (bf16 autocast or fp32) -> L = L_main + MTP + balance
                                           -> backward; add up every router's expert loads
    clip the gradient norm to 1.0 -> AdamW step at the scheduled rate
    -> each router's bias += gamma * sign(mean load - load), from the loads of the whole step
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
from tqdm import tqdm

from dsv3.checkpoint import load_pretrained
from dsv3.config import ModelConfig
from dsv3.data import DatasetInfo, TokenLoader, check_vocab
from dsv3.data.dataset import MANIFEST
from dsv3.data.prepare import prepare
from dsv3.errors import Dsv3Error
from dsv3.flops import flops_per_token
from dsv3.hardware import measure_matmul_peak
from dsv3.model import DeepSeekV3
from dsv3.train import checkpoint as ckpt
from dsv3.train.balance import max_vio, relative_loads, routers, update_biases
from dsv3.train.config import TrainConfig
from dsv3.train.evaluate import evaluate
from dsv3.train.losses import compute_losses, mtp_lambda
from dsv3.train.metrics import TENSORBOARD_DIR, MetricsLog, train_line, val_line
from dsv3.train.optim import build_optimizer, lr_at
from dsv3.train.sample import samples
from dsv3.train.summary import Summary
from dsv3.utils import atomic_write_text, human

TRAIN_CONFIG = "train_config.json"
SUMMARY = "summary.json"
# What `--overwrite` clears from a run directory (and what marks a folder as holding a run).
RUN_FILES = (ckpt.CHECKPOINTS, "metrics.jsonl", TRAIN_CONFIG, SUMMARY, TENSORBOARD_DIR, "plots", "config.json",
             "model.safetensors", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json")
PROBE_STEPS = 3  # timed forward+backward passes that size a time-budgeted run (the first one warms up)
END_RESERVE_S = 20.0  # kept free of a time-budgeted run's steps for the final save and the samples
REPLAN_EVERY = 10  # steps between re-sizings of a time-budgeted run
REPLAN_UNTIL = 0.5  # re-size only before this fraction of the run: well inside the constant learning rate


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
    def __init__(self, cfg: TrainConfig, log: Callable[[str], None] = print, progress: bool | None = None):
        self.started = time.perf_counter()
        self.cfg, self.progress = cfg, progress
        self._log = log
        self.run_dir = os.fspath(cfg.out)
        self.model_cfg = cfg.model()
        self.device = torch.device(cfg.device)
        self._claim_run_dir()
        self.info = self._prepare_data()
        check_vocab(self.info, self.model_cfg)
        self.tokenizer = self.info.tokenizer()

        torch.manual_seed(cfg.seed)
        self.model = DeepSeekV3(self.model_cfg).to(self.device)
        self.model.init_weights(cfg.init_std)
        self.model.train()
        self.gates = routers(self.model)
        if cfg.balance == "aux-free" and any(g.bias is None for g in self.gates):
            raise Dsv3Error("--balance aux-free needs routers with a selection bias (topk_method noaux_tc); "
                            "this model routes without one, so use --balance aux-loss or none")
        self.optimizer = build_optimizer(self.model, cfg)
        self.param_names = {id(p): name for name, p in self.model.named_parameters()}
        self.bias_names = [name for name, _ in self.model.named_buffers() if name.endswith("gate.bias")]
        self.loader = TokenLoader(self.info, "train", cfg.batch_size, cfg.seq_len, cfg.seed)

        self.step, self.tokens, self.train_seconds = 0, 0, 0.0
        self.max_steps = cfg.max_steps
        # a time-budgeted run: when the budget ends, what the final evaluation, save and samples cost at the
        # probe's pace, and that pace (set by _choose_max_steps)
        self.deadline: float | None = None
        self.end_cost = self.probe_step_s = 0.0
        self.last_step_s = 0.0
        resume_step = self._restore() if cfg.resume else None
        self.metrics = MetricsLog(self.run_dir, resume_step=resume_step, tensorboard=cfg.tensorboard)
        atomic_write_text(os.path.join(self.run_dir, TRAIN_CONFIG), _json(cfg.to_dict()))
        self.tokenizer.save(self.run_dir)

        dtype = torch.bfloat16 if cfg.dtype == "bf16" else torch.float32
        self.peak = cfg.peak_tflops * 1e12 if cfg.peak_tflops else measure_matmul_peak(dtype, self.device)
        self.flops_per_token = flops_per_token(self.model_cfg, cfg.seq_len, training=True).total
        self.last_eval: dict | None = None
        self.last_saved = self.step if resume_step else -1
        self.last_checkpoint = ckpt.latest_checkpoint(self.run_dir)

    # ----- set-up ------------------------------------------------------------------------------------
    def log(self, line: str) -> None:
        with tqdm.external_write_mode():
            self._log(line)

    def autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.dtype == "bf16")

    def _claim_run_dir(self) -> None:
        """Refuse to mix a new run into an old one's directory, unless told to resume it or start over."""
        present = [n for n in RUN_FILES if os.path.exists(os.path.join(self.run_dir, n))]
        if present and not self.cfg.resume:
            if not self.cfg.overwrite:
                raise Dsv3Error(f"{self.run_dir} already holds a training run; pass --resume to continue it, "
                                f"--overwrite to start it over, or --out DIR for a new one")
            for name in present:
                path = os.path.join(self.run_dir, name)
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        os.makedirs(self.run_dir, exist_ok=True)
        ckpt.remove_leftovers(self.run_dir)

    def _prepare_data(self) -> DatasetInfo:
        """A prepared dataset folder given as the only source is used as it is; anything else is prepared into
        data_dir (which a later run reuses while the sources and settings are unchanged)."""
        cfg = self.cfg
        if len(cfg.data) == 1 and os.path.isfile(os.path.join(cfg.data[0], MANIFEST)):
            info = DatasetInfo.load(cfg.data[0])
            self.log(f"using the prepared data in {cfg.data[0]} ({human(info.tokens)} tokens)")
            return info
        return prepare(cfg.data, cfg.data_dir, vocab_size=self.model_cfg.vocab_size, tokenizer=cfg.tokenizer,
                       audit=cfg.audit, log=self.log, progress=self.progress)

    def _restore(self) -> int:
        """Load the newest checkpoint of the run directory; returns its step (0 when there is none yet)."""
        path = ckpt.latest_checkpoint(self.run_dir)
        if path is None:
            self.log(f"no checkpoint in {self.run_dir} yet: starting from step 0")
            return 0
        state, tensors = ckpt.read_state(path)
        _check_same_model(ModelConfig.from_hf(path), self.model_cfg, self.run_dir)
        if state["tokenizer_sha256"] != self.info.tokenizer_sha256:
            raise Dsv3Error(f"cannot resume {self.run_dir}: it was trained with another tokenizer than the one of "
                            f"the data in {self.info.path}; resume with the same --data and --tokenizer")
        changed = [f"{k} {v!r} -> {getattr(self.cfg, k)!r}" for k, v in state["train_config"].items()
                   if k not in ("resume", "overwrite") and v != getattr(self.cfg, k, v)]
        if changed:
            self.log("resuming with changed options: " + ", ".join(changed))
        loaded = load_pretrained(path, torch.float32)
        self.model.load_state_dict(loaded.state_dict())
        ckpt.load_optimizer(self.optimizer, self.param_names, tensors, state["optimizer_groups"])
        with torch.no_grad():
            for name in self.bias_names:
                self.model.get_buffer(name).copy_(tensors[f"balance.{name}"])
        self.loader.load_state_dict(state["loader"])
        torch.set_rng_state(tensors["rng.cpu"])
        if "rng.cuda" in tensors and torch.cuda.is_available():
            torch.cuda.set_rng_state(tensors["rng.cuda"])
        self.step, self.tokens, self.train_seconds = state["step"], state["tokens"], state["train_seconds"]
        self.max_steps = self.cfg.max_steps or state["max_steps"]
        self.log(f"resumed {self.run_dir} from {os.path.relpath(path, self.run_dir)} "
                 f"(step {self.step} of {self.max_steps}, {human(self.tokens)} tokens)")
        return self.step

    def _choose_max_steps(self) -> int:
        """Size the run to time_budget minutes: time a few forward+backward passes and one validation batch,
        then count the steps that fit beside the evaluations, checkpoints and samples. The passes change
        nothing (gradients are dropped, the data position is put back). `_replan` corrects the count as the
        real speed shows, so a time-budgeted run is not repeatable step for step: pass --max-steps for that."""
        cfg = self.cfg
        position = self.loader.state_dict()
        times = []
        for _ in range(PROBE_STEPS):
            t0 = time.perf_counter()
            x, y = (t.to(self.device) for t in next(self.loader))
            with self.autocast():
                out = self.model.run(x, mtp=bool(self.model.mtp))
            compute_losses(out, y, cfg, cfg.mtp_lambda).total.backward()
            self.optimizer.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t0)
        self.loader.load_state_dict(position)
        step_s = sum(times[1:]) / (len(times) - 1) * cfg.grad_accum
        t0 = time.perf_counter()
        evaluate(self.model, self.info, cfg.batch_size, cfg.seq_len, cfg.batch_size, self.autocast, self.device, 0)
        eval_s = (time.perf_counter() - t0) * math.ceil(cfg.eval_windows / cfg.batch_size)
        self.deadline = self.started + cfg.time_budget * 60
        self.end_cost, self.probe_step_s = eval_s + END_RESERVE_S, step_s
        left = self.deadline - self.end_cost - time.perf_counter()
        per_step = step_s + eval_s / cfg.eval_every
        steps = max(1, int(left / per_step))
        self.log(f"time budget {cfg.time_budget:g} min: {step_s:.2f} s per step, {eval_s:.1f} s per evaluation "
                 f"-> {steps} steps ({human(steps * cfg.tokens_per_step)} tokens)")
        return steps

    def _replan(self, since: float, first_step: int, bar: tqdm) -> None:
        """Re-size a time-budgeted run from its measured pace (wall time per step since `since`, evaluations
        and checkpoints included), which a machine shared with other work can change at any time. Only after
        the warm-up and in the first half of the run: there the learning rate is the constant peak whatever
        the step count, so the change bends nothing that has already happened."""
        warmup = max(1, round(self.cfg.warmup * self.max_steps))
        if self.deadline is None or self.step <= warmup or self.step >= REPLAN_UNTIL * self.max_steps:
            return
        now = time.perf_counter()
        per_step = (now - since) / (self.step - first_step)
        left = self.deadline - self.end_cost * self._slowdown() - now
        steps = max(self.step + int(left / per_step), math.ceil(self.step / REPLAN_UNTIL))
        if abs(steps - self.max_steps) > 0.05 * self.max_steps:
            self.log(f"time budget: {per_step:.2f} s per step now -> {steps} steps instead of {self.max_steps}")
            self.max_steps = bar.total = steps
            bar.refresh()

    # ----- the loop ----------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        cfg = self.cfg
        if self.max_steps is None:
            self.max_steps = self._choose_max_steps()
        n_params = sum(p.numel() for p in self.model.parameters())
        self.log(f"training {n_params / 1e6:.1f}M parameters ({cfg.dtype}, balance {cfg.balance}, "
                 f"MTP {'on' if self.model.mtp else 'off'}) for {self.max_steps} steps of {cfg.tokens_per_step:,} "
                 f"tokens into {self.run_dir}; matmul peak {self.peak / 1e12:.3g} TFLOP/s")
        bar = tqdm(total=self.max_steps, initial=self.step, desc="training", unit="step", dynamic_ncols=True,
                   disable=None if self.progress is None else not self.progress)
        window_tokens, window_seconds = 0, 0.0
        first_step, since = self.step, time.perf_counter()
        try:
            while self.step < self.max_steps:
                t0 = time.perf_counter()
                stats = self._optimizer_step()
                seconds = self.last_step_s = time.perf_counter() - t0
                self.train_seconds += seconds
                window_tokens += cfg.tokens_per_step
                window_seconds += seconds
                bar.update(1)
                bar.set_postfix(loss=f"{stats['loss']:.3f}")
                last = self.step == self.max_steps or self._out_of_time()
                if self.step % cfg.log_every == 0 or last:
                    record = self._train_record(stats, window_tokens / window_seconds)
                    self.metrics.write(record)
                    self.log(train_line(record) + self._eta())
                    window_tokens, window_seconds = 0, 0.0
                if self.step % cfg.eval_every == 0 or last:
                    self._evaluate()
                if self.step % cfg.save_every == 0 or last:
                    self._save()
                if last:
                    break
                if self.step % REPLAN_EVERY == 0:
                    self._replan(since, first_step, bar)
        finally:
            bar.close()
        if self.step < self.max_steps:
            self.log(f"time budget reached: stopping at step {self.step} of {self.max_steps}")
        return self._finish()

    def _optimizer_step(self) -> dict:
        cfg = self.cfg
        progress = self.step / self.max_steps
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.step, self.max_steps, cfg)
        lam = mtp_lambda(progress, cfg)
        logged = (self.step + 1) % cfg.log_every == 0 or self.step + 1 == self.max_steps
        sums = {"loss": 0.0, "mtp_loss": 0.0, "mtp_acc": 0.0, "balance_loss": 0.0}
        loads = None
        for _ in range(cfg.grad_accum):
            x, y = (t.to(self.device) for t in next(self.loader))
            with self.autocast():
                out = self.model.run(x, mtp=bool(self.model.mtp))
            losses = compute_losses(out, y, cfg, lam, accuracy=logged)
            self._check_finite(losses.total, "the loss")
            (losses.total / cfg.grad_accum).backward()
            sums["loss"] += losses.main.item() / cfg.grad_accum
            if losses.mtp:
                sums["mtp_loss"] += sum(m.item() for m in losses.mtp) / len(losses.mtp) / cfg.grad_accum
            if losses.mtp_acc is not None:
                sums["mtp_acc"] += losses.mtp_acc.item() / cfg.grad_accum
            if losses.balance is not None:
                sums["balance_loss"] += losses.balance.item() / cfg.grad_accum
            if out.routing:
                counts = torch.stack([r.counts for r in out.routing + out.mtp_routing])  # [routers, E]
                loads = counts if loads is None else loads + counts
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self._check_finite(grad_norm, "the gradient norm")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        gamma = cfg.bias_gamma if cfg.balance == "aux-free" and progress < cfg.bias_freeze else 0.0
        if gamma and loads is not None:
            update_biases(self.gates, loads, gamma)
        self.step += 1
        self.tokens += cfg.tokens_per_step
        if not logged:
            sums["mtp_acc"] = None  # not computed (a step cut short by the time budget)
        return {**sums, "lr": self.optimizer.param_groups[0]["lr"], "grad_norm": grad_norm.item(), "mtp_lambda": lam,
                "bias_gamma": gamma, "loads": loads}

    def _check_finite(self, value: torch.Tensor, what: str) -> None:
        if torch.isfinite(value).all():
            return
        self.metrics.close()
        kept = (f"the last good checkpoint is {self.last_checkpoint}; resume from it with --resume, perhaps with "
                f"a lower --lr" if self.last_checkpoint else "no checkpoint had been saved yet; try a lower --lr")
        raise TrainingDiverged(f"{what} became {value.item()} at step {self.step + 1}; training stopped and {kept}")

    def _slowdown(self) -> float:
        """How much slower the last step ran than the probe's: the final evaluation, save and samples will be
        slowed alike, when other work has taken the machine's cores."""
        return max(1.0, self.last_step_s / self.probe_step_s) if self.probe_step_s else 1.0

    def _out_of_time(self) -> bool:
        """Stop once what is left of the budget only covers the end of the run at the current pace."""
        if self.deadline is None:
            return False
        return time.perf_counter() + self.end_cost * self._slowdown() + self.last_step_s > self.deadline

    def _eta(self) -> str:
        done = self.train_seconds / max(self.step, 1)
        return f" | eta {_clock((self.max_steps - self.step) * done)}"

    def _train_record(self, stats: dict, tokens_per_s: float) -> dict:
        record = {"step": self.step, "tokens": self.tokens, "loss": stats["loss"]}
        if self.model.mtp:
            record.update(mtp_loss=stats["mtp_loss"], mtp_acc=stats["mtp_acc"], mtp_lambda=stats["mtp_lambda"])
        record.update(lr=stats["lr"], grad_norm=stats["grad_norm"], tokens_per_s=tokens_per_s,
                      mfu=tokens_per_s * self.flops_per_token / self.peak, elapsed=time.perf_counter() - self.started)
        loads = stats["loads"]
        if loads is not None:
            vio = max_vio(loads)
            record.update(balance_loss=stats["balance_loss"], bias_gamma=stats["bias_gamma"],
                          maxvio=vio.mean().item(), maxvio_max=vio.max().item(), load=relative_loads(loads))
            if self.bias_names:
                record["bias"] = [[round(v, 5) for v in g.bias.tolist()] for g in self.gates]
        return record

    def _evaluate(self) -> None:
        cfg = self.cfg
        record = evaluate(self.model, self.info, cfg.batch_size, cfg.seq_len, cfg.eval_windows, self.autocast,
                          self.device, self.step)
        self.metrics.write(record)
        self.log(val_line(record))
        self.last_eval = record

    def _save(self) -> None:
        if self.last_saved == self.step:
            return
        state = {
            "step": self.step,
            "max_steps": self.max_steps,
            "tokens": self.tokens,
            "train_seconds": self.train_seconds,
            "loader": self.loader.state_dict(),
            "train_config": self.cfg.to_dict(),
            "tokenizer_sha256": self.info.tokenizer_sha256,
            "optimizer_groups": [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups],
        }
        tensors = ckpt.optimizer_tensors(self.optimizer, self.param_names)
        tensors["rng.cpu"] = torch.get_rng_state()
        if self.device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(self.device)
        for name in self.bias_names:
            tensors[f"balance.{name}"] = self.model.get_buffer(name).detach().cpu().clone()
        self.last_checkpoint = ckpt.save_checkpoint(self.run_dir, self.step, self.model, self.tokenizer, tensors,
                                                    state, self.cfg.keep_last)
        self.last_saved = self.step

    def _finish(self) -> TrainResult:
        cfg = self.cfg
        self._save()
        if self.last_eval is None or self.last_eval["step"] != self.step:  # a finished run resumed
            self._evaluate()
        texts = samples(self.model, self.tokenizer, cfg.samples, cfg.sample_tokens, seed=cfg.seed)
        if texts:
            self.log("samples:")
            for text in texts:
                self.log("  " + repr(text))
        ev = self.last_eval or {}
        tokens_per_s = self.tokens / self.train_seconds if self.train_seconds else 0.0
        summary = Summary.build(
            steps=self.step, tokens=self.tokens, epochs=self.tokens / self.info.splits["train"]["tokens"],
            wall_seconds=time.perf_counter() - self.started, train_seconds=self.train_seconds,
            tokens_per_s=tokens_per_s, mfu=tokens_per_s * self.flops_per_token / self.peak, peak_flops=self.peak,
            dtype=cfg.dtype, total_flops=self.tokens * self.flops_per_token, val_loss=ev.get("val_loss"),
            val_ppl=ev.get("val_ppl"), val_mtp_acc=ev.get("val_mtp_acc"), val_maxvio=ev.get("val_maxvio"),
        )
        self.metrics.write({"step": self.step, "summary": summary.as_dict()})
        self.metrics.close()
        atomic_write_text(os.path.join(self.run_dir, SUMMARY), _json({**summary.as_dict(), "samples": texts}))
        self.log("summary:")
        for line in summary.lines():
            self.log(line)
        return TrainResult(self.run_dir, summary, texts, self.last_checkpoint)


def _check_same_model(saved: ModelConfig, wanted: ModelConfig, run_dir: str) -> None:
    for f in fields(ModelConfig):
        if f.name.startswith("_") or f.name == "extra":
            continue
        a, b = getattr(saved, f.name), getattr(wanted, f.name)
        if a != b:
            raise Dsv3Error(f"cannot resume {run_dir}: its checkpoint's model has {f.name}={a!r} but this run's has "
                            f"{f.name}={b!r}; resume with the same --preset or --config, or start a new run with --out")


def _json(d: dict) -> str:
    return json.dumps(d, indent=2) + "\n"


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m}m{s:02d}s"
