"""The training configuration: one dataclass, defaults that are the quick start, and its checks.

Defaults follow DeepSeek-V3's published recipe (DESIGN section 6) where it carries over to a small
model on a CPU: AdamW (0.9, 0.95), weight decay 0.1, clipping at 1.0, init std 0.006, sequence-wise
balance alpha 1e-4, MTP lambda 0.3 then 0.1, the schedule's shape. Two values are a short run's rather
than DeepSeek's: the learning rate (2.2e-4 is for 671B parameters; 1e-3 trains the small preset
fastest of the rates tried) and the bias update speed: 0.001 keeps up with the router over DeepSeek's
~10^5 steps, but in a run of a few hundred steps the router's preferences grow faster than 0.001 per
step can follow and a few experts take every token; 0.01 keeps the load balanced (BENCHMARKS.md
has both in the balancing ablation).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

from dsv3.config import PRESETS, ModelConfig, preset
from dsv3.errors import Dsv3Error, InvalidValue
from dsv3.parallel.dist import world_size
from dsv3.parallel.layout import PP_SCHEDULES, Layout
from dsv3.train.dsa import STAGES as DSA_STAGES
from dsv3.train.dsa import dsa_model_config
from dsv3.train.fp8 import Fp8Recipe

DTYPES = ("bf16", "fp32", "fp8")
MOMENT_DTYPES = ("bf16", "fp32")
SCHEDULES = ("pretrain", "cosine")
# aux-free: DeepSeek-V3's bias update plus the complementary sequence-wise loss;
# aux-loss: the classic batch-wise auxiliary loss, no bias; none: no balancing at all.
BALANCE_MODES = ("aux-free", "aux-loss", "none")


@dataclass
class TrainConfig:
    """Everything a training run needs besides the model config; `dsv3 train` flags map onto these fields."""

    # model: a preset, or a config.json (which wins when given)
    preset: str = "small"
    model_config: str | None = None
    # data: sources for `dsv3.data.prepare` (none: the built-in corpus), or one prepared dataset folder
    data: list[str] = field(default_factory=list)
    data_dir: str = "data"  # where sources are prepared into (reused while they are unchanged)
    tokenizer: str | None = None  # a tokenizer.json to use instead of training one
    audit: str = "off"  # audit the corpus for other models' self-identification first: off, refuse or clean
    out: str = "runs/small"  # the run directory: a model directory plus checkpoints and metrics
    # batch: batch_size sequences of seq_len tokens per micro-batch, grad_accum micro-batches per step
    batch_size: int = 8
    seq_len: int = 256
    grad_accum: int = 1
    # length: max_steps, or (when None) as many steps as fit time_budget minutes of wall time, counted
    # from the start of the run and including data preparation, evaluation and the final samples
    max_steps: int | None = None
    time_budget: float = 8.0
    # where the weights start: a fresh initialisation, or a Hugging Face model directory (fine-tuning)
    init_from: str | None = None
    # sparse attention (V3.2, dsv3.train.dsa): "warmup" trains only the indexers against dense attention,
    # "sparse" the whole model with top-k attention; a dense model gains fresh indexers of these sizes
    # (None: V3.2's proportions, and a quarter of seq_len kept)
    dsa_stage: str | None = None
    index_n_heads: int | None = None
    index_head_dim: int | None = None
    index_topk: int | None = None
    # optimizer and schedule: "pretrain" is DeepSeek-V3's shape (warm-up, constant, cosine, two tails), "cosine"
    # warm-up then one cosine decay to lr * min_lr_ratio (fine-tuning)
    schedule: str = "pretrain"
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * 0.1 (2.2e-4 -> 2.2e-5 in the paper)
    warmup: float = 0.03  # fraction of the steps spent warming up (at least one step)
    beta1: float = 0.9
    beta2: float = 0.95
    weight_decay: float = 0.1  # on matrices only (projections, experts, embedding, head)
    grad_clip: float = 1.0
    init_std: float = 0.006
    # bf16: autocast matmuls; fp32: everything fp32; fp8: the linear layers' GEMMs in E4M3 with fine-grained
    # scales (dsv3.train.fp8), the rest under bf16 autocast. Master weights and gradients stay fp32.
    dtype: str = "bf16"
    fp8_scaling: str | None = None  # fp8 only: blockwise (tiles and blocks, default) or tensorwise
    fp8_scale_format: str | None = None  # fp8 only: fp32 (default) or ue8m0 (powers of two)
    optimizer_state_dtype: str | None = None  # AdamW's moments: bf16 or fp32 (default: bf16 under fp8, else fp32)
    device: str = "cpu"
    # regional compilation: torch.compile each transformer block (dsv3.parallel.build.apply_compile); the first
    # step then takes a minute or two longer, and on the CPU inductor needs a C++ compiler
    compile: bool = False
    seed: int = 0
    # load balancing
    balance: str = "aux-free"
    bias_gamma: float = 0.01  # bias update speed (the paper's 0.001 is for ~10^5 steps; see above)
    bias_freeze: float = 0.966  # fraction of the steps after which the bias stops moving (last 500B of 14.8T)
    seq_alpha: float = 1e-4  # complementary sequence-wise balance loss (aux-free mode)
    aux_alpha: float = 1e-3  # classic auxiliary loss (aux-loss mode)
    # multi-token prediction: L = L_main + lambda / D * sum_k L_k, lambda = mtp_lambda until mtp_switch
    mtp: bool = True
    mtp_lambda: float = 0.3
    mtp_lambda_late: float = 0.1
    mtp_switch: float = 0.676  # fraction of the steps (the paper: after 10T of 14.8T tokens)
    # logging, evaluation, checkpoints
    log_every: int = 10
    eval_every: int = 100
    eval_windows: int = 64  # validation windows per evaluation, spread over the held-out split
    save_every: int = 100
    keep_last: int = 2
    peak_tflops: float | None = None  # this machine's matmul peak for the MFU; None: measured at start
    samples: int = 3  # texts generated at the end
    sample_tokens: int = 48
    tensorboard: bool = True  # write event files too, when the tensorboard package is installed
    resume: bool = False
    overwrite: bool = False
    # how the ranks of a torchrun job split the model (see dsv3.parallel.layout); dp_shard x ep x pp ranks,
    # dp_shard None: whatever ranks ep and pp leave. A resumed run takes the layout of its new job, not the old.
    dp_shard: int | None = None
    ep: int = 1
    pp: int = 1
    pp_schedule: str = "1f1b"
    reshard: bool = True  # FSDP2 frees gathered weights after each unit's forward (ZeRO-3); False keeps them (ZeRO-2)

    def __post_init__(self) -> None:
        if not isinstance(self.data, (list, tuple)) or not all(isinstance(d, str) for d in self.data):
            raise InvalidValue("data", self.data, "must be a list of paths")
        self.data = list(self.data)
        self.validate()

    def validate(self) -> None:
        """Raise Dsv3Error naming the first field with an invalid value."""

        def need(ok: bool, name: str, what: str) -> None:
            if not ok:
                raise InvalidValue(name, getattr(self, name), what)

        if self.model_config is None:
            need(self.preset in PRESETS, "preset", f"is not one of {', '.join(PRESETS)}")
        for name in ("batch_size", "seq_len", "grad_accum", "log_every", "eval_every", "eval_windows", "save_every",
                     "keep_last"):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v > 0, name, "must be a positive integer")
        need(self.seq_len >= 4, "seq_len", "must be at least 4")
        need(self.max_steps is None or (isinstance(self.max_steps, int) and self.max_steps > 0), "max_steps",
             "must be a positive integer")
        need(self.time_budget > 0, "time_budget", "must be a positive number of minutes")
        need(self.lr > 0, "lr", "must be positive")
        need(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "must lie in [0, 1]")
        for name in ("warmup", "bias_freeze", "mtp_switch"):
            need(0 <= getattr(self, name) <= 1, name, "must be a fraction in [0, 1]")
        need(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "beta1", "and beta2 must lie in [0, 1)")
        for name in ("weight_decay", "bias_gamma", "seq_alpha", "aux_alpha", "mtp_lambda", "mtp_lambda_late",
                     "samples", "sample_tokens"):
            need(getattr(self, name) >= 0, name, "must not be negative")
        need(self.grad_clip > 0, "grad_clip", "must be positive")
        need(self.init_std > 0, "init_std", "must be positive")
        need(self.dtype in DTYPES, "dtype", f"is not one of {', '.join(DTYPES)}")
        need(isinstance(self.compile, bool), "compile", "must be true or false")
        need(self.schedule in SCHEDULES, "schedule", f"is not one of {', '.join(SCHEDULES)}")
        for name in ("fp8_scaling", "fp8_scale_format"):
            need(getattr(self, name) is None or self.dtype == "fp8", name, "only applies with --dtype fp8")
        if self.dtype == "fp8":
            self.fp8_recipe.check()
        need(self.optimizer_state_dtype in (None, *MOMENT_DTYPES), "optimizer_state_dtype",
             f"is not one of {', '.join(MOMENT_DTYPES)}")
        need(self.balance in BALANCE_MODES, "balance", f"is not one of {', '.join(BALANCE_MODES)}")
        need(self.peak_tflops is None or self.peak_tflops > 0, "peak_tflops", "must be positive")
        for name in ("dp_shard", "ep", "pp"):
            v = getattr(self, name)
            need((v is None and name == "dp_shard") or (isinstance(v, int) and not isinstance(v, bool) and v > 0),
                 name, "must be a positive integer")
        need(self.pp_schedule in PP_SCHEDULES, "pp_schedule", f"is not one of {', '.join(PP_SCHEDULES)}")
        need(self.dsa_stage in (None, *DSA_STAGES), "dsa_stage", f"is not one of {', '.join(DSA_STAGES)}")
        need(self.dsa_stage is None or self.pp == 1, "dsa_stage", "does not run with pipeline parallelism; use --pp 1")
        for name in ("index_n_heads", "index_head_dim", "index_topk"):
            v = getattr(self, name)
            need(v is None or (isinstance(v, int) and not isinstance(v, bool) and v > 0), name,
                 "must be a positive integer")
            need(v is None or self.dsa_stage is not None, name, "only applies with --dsa-stage")

    # ----- derived ------------------------------------------------------------------------------------
    def model(self) -> ModelConfig:
        """The model config this run trains: the preset or config.json, without MTP modules when MTP is off, with
        sparse attention for a DSA stage."""
        cfg = ModelConfig.from_hf(self.model_config) if self.model_config else preset(self.preset)
        if self.dsa_stage is not None:
            cfg = dsa_model_config(cfg, self.seq_len, self.index_n_heads, self.index_head_dim, self.index_topk)
        if not self.mtp:
            cfg = cfg.replace(num_nextn_predict_layers=0)
        if cfg.max_position_embeddings < self.seq_len:
            raise InvalidValue("seq_len", self.seq_len, f"exceeds the model's max_position_embeddings="
                               f"{cfg.max_position_embeddings}; use a shorter sequence length")
        return cfg

    @property
    def fp8_recipe(self) -> Fp8Recipe:
        return Fp8Recipe(self.fp8_scaling or "blockwise", self.fp8_scale_format or "fp32")

    @property
    def moments_dtype(self) -> str:
        """AdamW's moment storage: as given, else bf16 under fp8 (DeepSeek-V3's recipe) and fp32 otherwise."""
        return self.optimizer_state_dtype or ("bf16" if self.dtype == "fp8" else "fp32")

    @property
    def layout(self) -> Layout:
        """The layout of this job: dp_shard, when not given, is the ranks of the job over ep x pp (at least 1, so
        that a layout that does not divide the job is refused by `Layout.check` rather than rounded)."""
        dp_shard = self.dp_shard or max(1, world_size() // (self.ep * self.pp))
        return Layout(dp_shard, self.ep, self.pp, self.pp_schedule)

    @property
    def tokens_per_step(self) -> int:
        """Tokens of one optimizer step over every data-parallel rank (batch_size is per rank)."""
        return self.batch_size * self.seq_len * self.grad_accum * self.layout.data_parallel

    # ----- JSON ---------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise Dsv3Error(f"unknown training option(s) {', '.join(unknown)}; check the spelling")
        return cls(**d)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> TrainConfig:
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
            if not isinstance(d, dict):
                raise ValueError("not a JSON object")
            return cls.from_dict(d)
        except InvalidValue as e:
            raise Dsv3Error(f"the training config {os.fspath(path)} holds {e}; fix or remove it") from None
        except (OSError, ValueError, TypeError, RecursionError) as e:
            raise Dsv3Error(f"cannot read the training config {os.fspath(path)} ({e}); fix or remove it") from None

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)
