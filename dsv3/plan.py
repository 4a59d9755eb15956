"""Memory planning: will a model fit, for training under a parallel layout or for serving?

Everything is counted from the model's stored tensors (`dsv3.inventory`) and the latent cache's own
layout (`dsv3.model.cache`), so any `ModelConfig` can be planned and the figures agree with `dsv3 info`.

Serving: the weights (bf16, or FP8 with fp32 block scales as DeepSeek released them) are spread
evenly over the GPUs (tensor + expert parallelism); what is left of each GPU's usable memory holds
the latent cache, spread evenly too (each GPU caches the sequences its attention serves, as engines with
data-parallel attention do). "Usable" is a fraction of the memory (`memory_utilization`, 0.9 by default)
because the CUDA context, the kernels' workspaces and allocator fragmentation take the rest. Per rank, as
`dsv3 serve --nproc N` lays it out (`dsv3.parallel.inference`): the split tensors (heads, experts,
vocabulary, MLP widths) take 1/N each, the small replicated ones (norms, the down-projections, the router)
are whole on every rank, and every rank holds the whole latent cache.

Training: `pp` pipeline stages each hold a contiguous run of blocks (the first also the embedding,
the last the final norm, the head and the MTP modules); within a stage the `dp = gpus / pp` ranks
split the routed experts `ep` ways and shard the rest ZeRO-style: stage 1 shards the optimizer
state over the data-parallel ranks, 2 also the gradients, 3 also the weights (FSDP). Expert
weights are sharded over the dp / ep ranks that hold the same experts. The default precisions
are DeepSeek-V3's published recipe: fp32 master weights and gradients, bf16 AdamW moments, and
matmuls reading a bf16 or FP8 copy of the weights. Activations are bf16 and an estimate: what each
block keeps for its backward pass with a fused attention kernel (no T x T matrix), for the
micro-batches a 1F1B pipeline schedule keeps in flight (pp - s on stage s), plus the fp32 logits
of the output heads on the last stage; with full recomputation a block keeps only its input. The
estimate assumes fused norms and a fused MoE combine: dsv3's own eager blocks keep 1.5-1.9x as much
without recomputation (fp32 copies inside RMSNorm, the fp32 router and combine; tests/test_plan.py
measures it from the tensors autograd saves).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dsv3.config import ModelConfig
from dsv3.errors import InvalidValue
from dsv3.hardware import GPUS, Accelerator
from dsv3.inventory import BYTES, Entry, inventory, nbytes
from dsv3.model.cache import bytes_per_token
from dsv3.parallel.inference import split_names
from dsv3.parallel.layout import Layout as ParallelLayout


def _by_layer(entries: list[Entry]) -> dict[int | None, list[Entry]]:
    """Tensors grouped by block (MTP module k's under cfg.mtp_layer_index(k)); None: embedding, final norm, head."""
    out: dict[int | None, list[Entry]] = {}
    for e in entries:
        out.setdefault(e.layer, []).append(e)
    return out


def _check_precision(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise InvalidValue(name, value, f"is not one of: {', '.join(allowed)}")


def _check_utilization(memory_utilization: float) -> None:
    if not 0 < memory_utilization <= 1:
        raise InvalidValue("memory_utilization", memory_utilization, "must be a fraction in (0, 1]")


# ----- serving ------------------------------------------------------------------------------------


def cache_bytes_per_token(cfg: ModelConfig, precision: str = "bf16", *, mtp: bool = False) -> float:
    """Latent cache per token over the main layers (and the MTP modules' with `mtp`), as the cache lays it
    out: (kv_lora_rank + rope) numbers per layer; in fp8 the latent takes 1 byte a number plus an fp32 scale
    per 128 numbers, while the RoPE key stays bf16 (rotated keys lose too much in FP8)."""
    _check_precision("cache", precision, ("bf16", "fp8"))
    layers = cfg.n_layers_with_mtp if mtp else cfg.num_hidden_layers
    return float(bytes_per_token(cfg, precision, layers))


@dataclass(frozen=True)
class ServePlan:
    gpu: Accelerator
    gpus: int
    weights_precision: str
    cache_precision: str
    mtp: bool
    memory_utilization: float
    weight_bytes: float  # all GPUs together
    cache_bytes_per_token: float
    context: int
    batch: int
    split_weight_bytes: float = 0.0  # of weight_bytes, the tensors dsv3's ranks split (the rest are replicated)

    @property
    def usable_bytes_per_gpu(self) -> float:
        return self.gpu.memory_bytes * self.memory_utilization

    @property
    def weight_bytes_per_gpu(self) -> float:
        return self.weight_bytes / self.gpus

    @property
    def cache_budget_bytes(self) -> float:
        """Memory left for the latent cache on all GPUs together (negative: the weights alone do not fit)."""
        return self.gpus * self.usable_bytes_per_gpu - self.weight_bytes

    @property
    def cache_tokens(self) -> int:
        """Tokens of latent cache that fit next to the weights."""
        return max(0, int(self.cache_budget_bytes // self.cache_bytes_per_token))

    @property
    def needed_bytes(self) -> float:
        """Weights plus the cache of `batch` sequences of `context` tokens."""
        return self.weight_bytes + self.context * self.batch * self.cache_bytes_per_token

    @property
    def fits(self) -> bool:
        return self.needed_bytes <= self.gpus * self.usable_bytes_per_gpu

    @property
    def rank_weight_bytes(self) -> float:
        """Weights on one rank of `dsv3 serve --nproc gpus`: its share of the split tensors, all the rest."""
        return self.weight_bytes - self.split_weight_bytes + self.split_weight_bytes / self.gpus

    @property
    def rank_needed_bytes(self) -> float:
        """One rank's weights plus the whole asked-for cache, which every rank holds."""
        return self.rank_weight_bytes + self.context * self.batch * self.cache_bytes_per_token

    @property
    def rank_fits(self) -> bool:
        return self.rank_needed_bytes <= self.usable_bytes_per_gpu

    def min_gpus(self, gpu: Accelerator) -> int:
        """The fewest GPUs of type `gpu` that hold the weights and the asked-for cache."""
        return max(1, math.ceil(self.needed_bytes / (gpu.memory_bytes * self.memory_utilization)))


def plan_serving(
    cfg: ModelConfig,
    gpu: Accelerator,
    gpus: int,
    *,
    weights: str = "fp8",
    cache: str = "bf16",
    context: int = 32768,
    batch: int = 1,
    mtp: bool = False,
    memory_utilization: float = 0.9,
) -> ServePlan:
    """Memory for serving `cfg` on `gpus` GPUs; `mtp` keeps the MTP modules as a speculative-decoding draft."""
    _check_precision("weights", weights, ("bf16", "fp8"))
    _check_utilization(memory_utilization)
    for name, value in (("gpus", gpus), ("context", context), ("batch", batch)):
        if value < 1:
            raise InvalidValue(name, value, "must be at least 1")
    entries = inventory(cfg, mtp=mtp)
    split = split_names(cfg)
    return ServePlan(
        gpu=gpu, gpus=gpus, weights_precision=weights, cache_precision=cache, mtp=mtp,
        memory_utilization=memory_utilization, weight_bytes=nbytes(entries, weights),
        cache_bytes_per_token=cache_bytes_per_token(cfg, cache, mtp=mtp), context=context, batch=batch,
        split_weight_bytes=nbytes([e for e in entries if e.name in split], weights),
    )


def min_gpus_table(plan: ServePlan) -> dict[str, int]:
    """The smallest count of each GPU in the table that serves what `plan` asks for."""
    return {name: plan.min_gpus(g) for name, g in GPUS.items()}


# ----- training -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class GpuLayout:
    """How `gpus` GPUs split the training job (see the module docstring)."""

    gpus: int
    pp: int = 1  # pipeline stages
    ep: int = 1  # expert-parallel degree, within each stage's data-parallel ranks
    zero: int = 3  # 0: replicate; 1: shard optimizer state; 2: and gradients; 3: and weights (FSDP)
    micro_batch: int = 1  # sequences per GPU per micro-step
    seq_len: int = 4096
    micro_batches: int = 1  # micro-steps per optimizer step (gradient accumulation, the pipeline's micro-batches)
    pp_schedule: str = "1f1b"  # or "dualpipev": each GPU holds two stages in a V

    @property
    def dp(self) -> int:
        return self.gpus // self.pp

    def check(self, cfg: ModelConfig) -> None:
        for name in ("gpus", "pp", "ep", "micro_batch", "seq_len", "micro_batches"):
            if getattr(self, name) < 1:
                raise InvalidValue(name, getattr(self, name), "must be at least 1")
        if self.gpus % self.pp:
            raise InvalidValue("gpus", self.gpus, f"must be a multiple of the {self.pp} pipeline stages")
        if self.pp > cfg.num_hidden_layers:
            raise InvalidValue("pp", self.pp, f"exceeds the model's {cfg.num_hidden_layers} blocks")
        if self.dp % self.ep:
            raise InvalidValue("ep", self.ep, f"must divide the {self.dp} data-parallel ranks of a stage "
                               "(GPUs / pipeline stages)")
        if cfg.n_routed_experts % self.ep:
            raise InvalidValue("ep", self.ep, f"must divide the model's {cfg.n_routed_experts} routed experts")
        if self.zero not in (0, 1, 2, 3):
            raise InvalidValue("zero", self.zero, "must be 0, 1, 2 or 3")


@dataclass(frozen=True)
class TrainPrecision:
    master: str = "fp32"  # the weights the optimizer updates
    grads: str = "fp32"
    moments: str = "bf16"  # each of AdamW's two moments
    compute: str = "bf16"  # the copy of the weights the matmuls read: bf16, or fp8 for the FP8 matrices

    def check(self) -> None:
        _check_precision("master", self.master, ("fp32", "bf16"))
        _check_precision("grads", self.grads, ("fp32", "bf16"))
        _check_precision("moments", self.moments, ("fp32", "bf16"))
        _check_precision("compute", self.compute, ("bf16", "fp8"))


def block_activation_numbers(cfg: ModelConfig, layer_idx: int) -> float:
    """Numbers (in bf16 units) one block keeps per token for its backward pass without recomputation: the
    inputs of its matmuls and norms, the attention kernel's q, k, v, output and softmax statistics."""
    d, H = cfg.hidden_size, cfg.num_attention_heads
    attn = (
        2 * d  # attention norm input and output
        + (2 * cfg.q_lora_rank if cfg.q_lora_rank else 0)  # compressed query before and after its norm
        + 2 * cfg.kv_lora_rank + cfg.qk_rope_head_dim  # [c_kv ; k_pe] and the normalised c_kv
        + H * (2 * cfg.qk_head_dim + cfg.v_head_dim)  # q, k, v as the attention kernel reads them
        + H * cfg.v_head_dim  # attention output, the output projection's input
        + 2 * H  # per-head log-sum-exp, fp32
    )
    ffn = 2 * d  # ffn norm input and output
    if not cfg.is_moe_layer(layer_idx):
        return attn + ffn + 3 * cfg.intermediate_size  # gate and up outputs, their product
    I, K = cfg.moe_intermediate_size, cfg.num_experts_per_tok
    routed = K * (d + 3 * I + d)  # per routed copy: expert input, gate, up, product, expert output
    return attn + ffn + 2 * cfg.n_routed_experts + routed + 3 * cfg.n_shared_experts * I  # router scores fp32


@dataclass(frozen=True)
class StageMemory:
    """Bytes per GPU of one pipeline stage."""

    stage: int
    blocks: tuple[int, ...]  # block indices (MTP modules are numbered from num_hidden_layers)
    master: float
    grads: float
    optimizer: float
    working: float  # the compute copy of the weights and, when sharded, one block's gathered weights/gradients
    activations: float  # without recomputation
    activations_recompute: float  # with full recomputation

    @property
    def states(self) -> float:
        return self.master + self.grads + self.optimizer + self.working

    @property
    def total(self) -> float:
        return self.states + self.activations

    @property
    def total_recompute(self) -> float:
        return self.states + self.activations_recompute


@dataclass(frozen=True)
class StageTraffic:
    """Bytes one GPU of a pipeline stage sends per optimizer step, forward and backward passes together (ring
    collectives: a rank sends (g-1)/g of what an all-gather or a reduce-scatter over g ranks moves)."""

    all_to_all: float  # expert parallelism: each routed copy of a token to the rank of its expert, and back
    data_parallel: float  # ZeRO / FSDP: weight all-gathers and gradient reductions
    pipeline: float  # hidden states to the next stage, their gradients to the previous one

    @property
    def total(self) -> float:
        return self.all_to_all + self.data_parallel + self.pipeline


@dataclass(frozen=True)
class TrainPlan:
    gpu: Accelerator
    layout: GpuLayout
    precision: TrainPrecision
    memory_utilization: float
    stages: tuple[StageMemory, ...]
    traffic: tuple[StageTraffic, ...]  # one per stage, as `stages`

    @property
    def tokens_per_gpu(self) -> int:
        """Tokens each data-parallel rank trains on per optimizer step."""
        lay = self.layout
        return lay.micro_batches * lay.micro_batch * lay.seq_len

    def traffic_per_token(self) -> StageTraffic:
        """Bytes sent over the whole job per training token: every stage's traffic (each stage has dp GPUs, which
        share the dp x tokens_per_gpu tokens of a step)."""
        n = self.tokens_per_gpu
        return StageTraffic(*(sum(getattr(t, f) for t in self.traffic) / n
                              for f in ("all_to_all", "data_parallel", "pipeline")))

    @property
    def usable_bytes_per_gpu(self) -> float:
        return self.gpu.memory_bytes * self.memory_utilization

    def worst(self, recompute: bool) -> StageMemory:
        return max(self.stages, key=lambda s: s.total_recompute if recompute else s.total)

    def fits(self, recompute: bool) -> bool:
        worst = self.worst(recompute)
        return (worst.total_recompute if recompute else worst.total) <= self.usable_bytes_per_gpu


def plan_training(
    cfg: ModelConfig,
    gpu: Accelerator,
    layout: GpuLayout,
    precision: TrainPrecision | None = None,
    *,
    memory_utilization: float = 0.9,
) -> TrainPlan:
    """Per-GPU memory and traffic of every pipeline rank when training `cfg` under `layout` (see the module
    docstring). With dualpipev, "stage" r is pipeline rank r, which holds the two stages r and 2P-1-r."""
    precision = precision or TrainPrecision()
    precision.check()
    layout.check(cfg)
    _check_utilization(memory_utilization)
    D, pp = cfg.num_nextn_predict_layers, layout.pp
    ranks = ParallelLayout(pp=pp, pp_schedule=layout.pp_schedule)
    cut = ranks.stage_blocks(cfg.num_hidden_layers)
    layers = _by_layer(inventory(cfg))
    stages, traffic = [], []
    for r in range(pp):
        local = ranks.local_stages(r)
        first, last = 0 in local, ranks.n_stages - 1 in local
        block_ids = [i for s in sorted(local) for i in cut[s]]
        block_ids += [cfg.mtp_layer_index(k) for k in range(1, D + 1)] if last else []
        groups = [layers[i] for i in block_ids]
        # the embedding on the first stage, the final norm and the head on the last
        ends = [w for w in layers[None] if (first if w.group == "embedding" else last)]
        weights = [w for g in groups for w in g] + ends
        states = _stage_states(groups, ends, layout, precision)
        # 1F1B keeps pp - r micro-batches in flight on rank r; DualPipe(V) pp + 1 (DeepSeek-V3 Table 2)
        in_flight = pp + 1 if layout.pp_schedule == "dualpipev" and pp > 1 else pp - r
        activations = _stage_activations(cfg, block_ids, layout, in_flight=in_flight, logits=last)
        stages.append(StageMemory(r, tuple(block_ids), *states, *activations))
        sends = sum((s < ranks.n_stages - 1 and _owner(ranks, s + 1) != r) + (s > 0 and _owner(ranks, s - 1) != r)
                    for s in local)
        traffic.append(_stage_traffic(cfg, weights, block_ids, layout, precision, sends))
    return TrainPlan(gpu, layout, precision, memory_utilization, tuple(stages), tuple(traffic))


def _owner(ranks: ParallelLayout, stage: int) -> int:
    return next(r for r in range(ranks.pp) if stage in ranks.local_stages(r))


def _stage_traffic(cfg: ModelConfig, weights: list[Entry], block_ids: list[int], layout: GpuLayout,
                   precision: TrainPrecision, sends: int) -> StageTraffic:
    """What one GPU holding `weights` (blocks `block_ids`) sends per optimizer step; `sends` is how many
    stage boundaries to other pipeline ranks it sends across (hidden states forward, gradients backward)."""
    d, tokens = cfg.hidden_size, layout.micro_batches * layout.micro_batch * layout.seq_len
    # all-to-all: K copies of every token per MoE layer, (ep-1)/ep of them to other ranks under balanced routing;
    # forward: dispatch (FP8 with a scale per 128 values when the matmuls are FP8, as DeepSeek sends it, else
    # bf16) and combine (bf16); backward: both gradients in bf16
    dispatch = 1 + 4 / 128 if precision.compute == "fp8" else 2.0
    moe = sum(1 for i in block_ids if cfg.is_moe_layer(i))
    off_rank = (layout.ep - 1) / layout.ep
    all_to_all = tokens * moe * cfg.num_experts_per_tok * off_rank * d * (dispatch + 2.0 + 2.0 + 2.0)
    # data parallel: experts over the dp / ep ranks holding the same ones, everything else over all dp
    data_parallel = 0.0
    for w in weights:
        group = layout.dp // layout.ep if w.is_expert else layout.dp
        share = (group - 1) / group * (1 / layout.ep if w.is_expert else 1.0)
        grads = w.numel * (4 if w.fp32 else BYTES[precision.grads])
        data_parallel += share * _dp_bytes(layout, w.nbytes(precision.compute), grads)
    pipeline = sends * layout.micro_batches * layout.micro_batch * layout.seq_len * d * 2.0  # bf16 hidden states
    return StageTraffic(all_to_all, data_parallel, pipeline)


def _dp_bytes(layout: GpuLayout, compute: float, grads: float) -> float:
    """Bytes a collective over the data-parallel group moves per step for one tensor (before the (g-1)/g share):
    ZeRO-3 gathers the weights for the forward and again for the backward pass and reduce-scatters the gradients
    every micro-step; ZeRO-1/2 reduce-scatter the gradients and gather the updated weights once a step; plain
    data parallelism all-reduces the gradients (twice a reduce-scatter's bytes)."""
    if layout.zero == 3:
        return layout.micro_batches * (2 * compute + grads)
    if layout.zero in (1, 2):
        return grads + compute
    return 2 * grads


def _stage_states(groups: list[list[Entry]], ends: list[Entry], layout: GpuLayout,
                  precision: TrainPrecision) -> tuple[float, float, float, float]:
    """(master weights, gradients, optimizer state, working copies) in bytes per GPU of one stage holding the
    blocks `groups` and the tensors `ends`."""
    dp, ep, zero = layout.dp, layout.ep, layout.zero

    def per_gpu(weights: list[Entry], sharded: bool, bytes_of) -> float:
        """Bytes on one GPU: experts split ep ways; when sharded, the rest over dp and experts over dp / ep."""
        total = 0.0
        for w in weights:
            share = 1 / ep if w.is_expert else 1.0
            if sharded:
                share /= (dp // ep) if w.is_expert else dp
            total += bytes_of(w) * share
        return total

    def plain(precision_name: str):
        """Bytes of a weight stored at a plain dtype (the fp32 router bias stays fp32)."""
        return lambda w: w.numel * (4 if w.fp32 else BYTES[precision_name])

    def compute(w: Entry) -> float:
        return w.nbytes(precision.compute)

    weights = [w for g in groups for w in g] + ends
    master = per_gpu(weights, zero >= 3, plain(precision.master))
    grads = per_gpu(weights, zero >= 2, plain(precision.grads))
    optimizer = 2 * per_gpu(weights, zero >= 1, plain(precision.moments))
    largest = max(groups, key=lambda g: per_gpu(g, False, compute))
    if zero >= 3:  # the block being computed and the one being prefetched, gathered
        working = 2 * per_gpu(largest, False, compute)
    elif precision.compute != precision.master:  # a cast copy of the whole stage
        working = per_gpu(weights, False, compute)
    else:
        working = 0.0
    if zero >= 2:  # one block's gradients, whole until they are reduce-scattered
        working += per_gpu(largest, False, plain(precision.grads))
    return master, grads, optimizer, working


def _stage_activations(cfg: ModelConfig, block_ids: list[int], layout: GpuLayout, in_flight: int,
                       logits: bool) -> tuple[float, float]:
    """(without recomputation, with full recomputation) activation bytes of one stage: 1F1B keeps `in_flight`
    micro-batches (pp - s on stage s), plus the fp32 logits of every head on the last stage."""
    tokens = layout.micro_batch * layout.seq_len
    numbers = [block_activation_numbers(cfg, i) for i in block_ids]
    full = 2.0 * tokens * sum(numbers) * in_flight
    kept = 2.0 * tokens * cfg.hidden_size * len(numbers) * in_flight + 2.0 * tokens * max(numbers)
    if logits:  # the main head and every MTP head, for the cross-entropy
        head = 4.0 * tokens * cfg.vocab_size * (1 + cfg.num_nextn_predict_layers)
        full, kept = full + head, kept + head
    return full, kept


def training_bytes_per_rank(cfg: ModelConfig, batch: int, seq_len: int, ranks: int = 1) -> float:
    """What one of `ranks` processes training `cfg` keeps, roughly: its share of the fp32 weights, gradients and
    AdamW's two moments (16 bytes a parameter), the activations of one micro-batch of `batch` sequences as the
    eager model keeps them (up to 2.5x what a fused implementation would, see the module docstring) and the fp32
    logits of every head with their gradients."""
    params = sum(e.numel for e in inventory(cfg))
    layers = range(cfg.n_layers_with_mtp)
    activations = 2.5 * 2.0 * batch * seq_len * sum(block_activation_numbers(cfg, i) for i in layers)
    logits = 3 * 4.0 * batch * seq_len * cfg.vocab_size * (1 + cfg.num_nextn_predict_layers)
    return 16.0 * params / ranks + activations + logits
