"""Pipeline parallelism with `torch.distributed.pipelining`: the blocks cut into stages, one schedule per job.

    1f1b       P stages, stage r on pipeline rank r: the embedding on the first rank, the final norm, head and
               MTP modules on the last (which keeps a replica of the embedding for the MTP modules; the two
               copies get the sum of their gradients, so they stay equal)
    dualpipev  2P stages in a V: rank r runs stages r and 2P-1-r, so rank 0 holds the first stage (embedding)
               and the last (norm, head, MTP modules), which share the embedding as DeepSeek arranges it

Each rank keeps a pruned copy of the model: the blocks of its stages, and the embedding, norm, head and MTP
modules where they belong; every other block is an empty placeholder, so parameter names (and with them
checkpoints, the optimizer state and the per-parameter initialisation) are the whole model's.

A stage receives the previous stage's hidden states as its argument and the micro-batch's token ids as a
keyword (every stage needs the sequence length, the first the ids, the last the MTP inputs). The sequence
balance loss of each MoE block is added where the block runs, through `AttachLoss`, instead of being sent
down the pipeline; the last stage returns the head's logits and the MTP logits for the training loss.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleDualPipeV

from dsv3.model import DeepSeekV3
from dsv3.model.attention import AttentionContext
from dsv3.model.moe import Routing
from dsv3.parallel.dist import Dist
from dsv3.parallel.layout import Layout


class Placeholder(nn.Module):
    """Stands in for a block another pipeline rank holds, keeping the model's layer numbering."""


def prune(model: DeepSeekV3, layout: Layout, pp_rank: int) -> None:
    """Keep only what pipeline rank `pp_rank` runs (call on the meta device, before materialising)."""
    stages = layout.local_stages(pp_rank)
    blocks = layout.stage_blocks(len(model.layers))
    mine = {i for s in stages for i in blocks[s]}
    for i in range(len(model.layers)):
        if i not in mine:
            model.layers[i] = Placeholder()
    first, last = 0 in stages, layout.n_stages - 1 in stages
    if not last:
        model.norm = model.head = None
        model.mtp = nn.ModuleList()
    if not first and not (last and len(model.mtp)):
        model.embed = None


def embedding_replica(model: DeepSeekV3, layout: Layout, pp_rank: int) -> bool:
    """Whether this rank's embedding is the 1F1B last stage's replica of the first stage's (for MTP)."""
    return model.embed is not None and 0 not in layout.local_stages(pp_rank)


class AttachLoss(torch.autograd.Function):
    """h, unchanged; in the backward pass `loss` also gets a gradient of 1. A loss computed inside a stage so
    reaches the parameters it depends on, as if it had been added to the training loss. (A copy of h, not h:
    the schedules detach stage outputs in place, which a view of the input would not allow.)"""

    @staticmethod
    def forward(ctx, h: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        return h.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return grad, torch.ones((), dtype=grad.dtype, device=grad.device)


class Stage(nn.Module):
    """One pipeline stage: a view on the model's own modules (nothing is copied), blocks `block_ids`, plus the
    embedding on the first stage and the norm, head and MTP modules on the last.

    `balance(routing, batch)` gives the balance loss of a block's routing (None: none); every block's loads
    are added to `loads` [routers, E] at the router's index among the whole model's routers."""

    def __init__(self, model: DeepSeekV3, block_ids: range, first: bool, last: bool, router_index: dict[int, int],
                 balance: Callable[[list[Routing], int], torch.Tensor | None], device: torch.device):
        super().__init__()
        self.n_layers = model.config.num_hidden_layers
        self.first, self.last = first, last
        self.embed = model.embed if first or last else None
        self.block_ids = list(block_ids)
        self.blocks = nn.ModuleList(model.layers[i] for i in block_ids)
        self.norm, self.head = (model.norm, model.head) if last else (None, None)
        self.mtp = model.mtp if last else nn.ModuleList()
        self.rope = model.rope
        self.router_index = router_index  # layer index (MTP module k: n_layers + k - 1) -> router index
        self.balance = balance
        self.loads = torch.zeros(len(router_index), model.config.n_routed_experts, dtype=torch.long, device=device)
        self.balance_total = 0.0  # the balance losses of this stage since the last reset, for the logs
        self.dry_runs = 0  # forward passes still to come that only infer shapes (their statistics are not kept)

    def forward(self, h: torch.Tensor | None = None, *, ids: torch.Tensor):
        """h [b, T, d] from the previous stage (none on the first), ids [b, T] -> h, or on the last stage the
        head's logits [b, T, V] and each MTP depth's [b, T-k, V]."""
        b, T = ids.shape
        positions = torch.arange(T, device=ids.device).expand(b, T)
        ctx = AttentionContext.build(positions, self.rope(positions), False)
        if self.first:
            h = self.embed(ids)  # [b, T, d]
        routing = []
        for i, block in zip(self.block_ids, self.blocks):
            h, r = block(h, ctx)
            routing.append((i, r))
        out = h
        if self.last:
            logits = [self.head(self.norm(h))]
            for k, module in enumerate(self.mtp, start=1):
                h, r = module(h[:, : T - k], self.embed(ids[:, k:]), ctx.first(T - k))
                routing.append((self.n_layers + k - 1, r))
                logits.append(self.head(module.norm(h)))  # [b, T-k, V]
            out = tuple(logits)
        loss = self._account([(i, r) for i, r in routing if r is not None], b)
        self.dry_runs = max(0, self.dry_runs - 1)
        if loss is None:
            return out
        return (AttachLoss.apply(out[0], loss), *out[1:]) if self.last else AttachLoss.apply(out, loss)

    def _account(self, routing: list[tuple[int, Routing]], batch: int) -> torch.Tensor | None:
        """Add the routers' loads up; return their balance loss (None when off, or not training)."""
        if not routing or self.dry_runs:
            return None
        for layer, r in routing:
            self.loads[self.router_index[layer]] += r.counts
        loss = self.balance([r for _, r in routing], batch) if torch.is_grad_enabled() else None
        if loss is not None:
            self.balance_total += loss.item()
        return loss




class Pipeline:
    """The stages this rank runs and the schedule that drives them through a step's micro-batches."""

    def __init__(self, model: DeepSeekV3, d: Dist, n_microbatches: int,
                 loss_fn: Callable[[tuple[torch.Tensor, ...], torch.Tensor], torch.Tensor],
                 balance: Callable[[list[Routing], int], torch.Tensor | None]):
        layout, pp_rank = d.layout, d.pp_rank
        self.d, self.model = d, model
        index = {layer: i for i, layer in enumerate(model.config.router_layers())}
        blocks = layout.stage_blocks(model.config.num_hidden_layers)
        self.stages = [Stage(model, blocks[s], s == 0, s == layout.n_stages - 1, index, balance, d.device)
                       for s in layout.local_stages(pp_rank)]
        group = d.group("pp")
        self.pipeline_stages = [PipelineStage(stage, s, layout.n_stages, d.device, group=group)
                                for stage, s in zip(self.stages, layout.local_stages(pp_rank))]
        self.loss_fn, self.first_step, self._shapes_known = loss_fn, True, False
        # the gradients are scaled to the mean over micro-batches here, not by the schedule: it scales per stage,
        # and the two stages of a V share the embedding
        self.n_microbatches = n_microbatches
        if layout.pp_schedule == "dualpipev":
            self.schedule = ScheduleDualPipeV(self.pipeline_stages, n_microbatches, loss_fn=self._loss,
                                              scale_grads=False)
        else:
            self.schedule = Schedule1F1B(self.pipeline_stages[0], n_microbatches, loss_fn=self._loss,
                                         scale_grads=False)
        # 1F1B with MTP: the first and the last stage each hold the embedding
        self.tied_embedding = layout.pp_schedule == "1f1b" and model.config.num_nextn_predict_layers > 0
        self.replica = embedding_replica(model, layout, pp_rank)
        self.has_last = any(s.last for s in self.stages)

    def step(self, ids: torch.Tensor, labels: torch.Tensor) -> None:
        """Forward and backward of every micro-batch of ids, labels [n * b, T]; gradients are left in the
        parameters (the mean over micro-batches) and the embedding replicas summed."""
        if self.first_step:
            # the schedule's first step runs every stage and the loss once more on stand-in tensors, to learn the
            # shapes it sends between ranks: keep those passes out of the statistics and the training loss
            for stage in self.stages:
                stage.dry_runs = 1
        self.schedule.step(ids=ids, target=labels if self.has_last else None, return_outputs=False)
        self.first_step = False
        for p in self.model.parameters():
            if p.grad is not None:
                p.grad.div_(self.n_microbatches)
        self._sum_embedding_grads()

    def _loss(self, outputs: tuple[torch.Tensor, ...], labels: torch.Tensor) -> torch.Tensor:
        if self.first_step and not self._shapes_known:
            self._shapes_known = True
            return sum(o.float().sum() for o in outputs) * 0.0  # the shape-inference pass: any loss will do
        return self.loss_fn(outputs, labels)

    def take_loads(self) -> tuple[torch.Tensor, float]:
        """This rank's routers' loads [routers, E] (zero rows for the others) and balance loss since the last
        call, and start counting again."""
        loads = sum(s.loads for s in self.stages)
        balance = sum(s.balance_total for s in self.stages)
        for s in self.stages:
            s.loads.zero_()
            s.balance_total = 0.0
        return loads, balance

    def _sum_embedding_grads(self) -> None:
        """1F1B with MTP: the first stage's embedding and the last stage's replica get the sum of both gradients
        (the ranks in between add zeros)."""
        if not self.tied_embedding:
            return
        embed = self.model.embed
        if embed is None:
            local = torch.zeros(self._embedding_shard_shape(), device=self.d.device)
        else:
            if embed.weight.grad is None:
                embed.weight.grad = torch.zeros_like(embed.weight)
            local = _local(embed.weight.grad)
        self.d.all_reduce(local, "pp")

    def _embedding_shard_shape(self) -> torch.Size:
        """The rows of the embedding this data rank's FSDP2 shard holds (torch.chunk's split of dim 0)."""
        cfg, dp = self.model.config, self.d.layout.data_parallel
        chunks = torch.empty(cfg.vocab_size, 0, device="meta").chunk(dp)
        rows = chunks[self.d.data_rank].shape[0] if self.d.data_rank < len(chunks) else 0
        return torch.Size((rows, cfg.hidden_size))

    @torch.no_grad()
    def forward(self, ids: torch.Tensor) -> tuple[tuple[torch.Tensor, ...] | None, torch.Tensor]:
        """Evaluation: every stage once over ids [b, T], in order, passing hidden states between ranks. Returns
        the last stage's logits on the rank that runs it (None elsewhere) and this rank's routers' loads."""
        out = self._forward(ids)
        return out, self.take_loads()[0]

    def _forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
        layout, me = self.d.layout, self.d.pp_rank
        owner = [r for s in range(layout.n_stages) for r in range(layout.pp) if s in layout.local_stages(r)]
        local = dict(zip(layout.local_stages(me), self.stages))
        b, T = ids.shape
        h = None
        for s in range(layout.n_stages):
            if owner[s] == me:
                if s > 0 and owner[s - 1] != me:
                    h = self._recv(owner[s - 1], (b, T, self.model.config.hidden_size))
                out = local[s](h, ids=ids)
                if s == layout.n_stages - 1:
                    return out
                h = out
                if owner[s + 1] != me:
                    self._send(h, owner[s + 1])
        return None

    def _send(self, h: torch.Tensor, pp_rank: int) -> None:
        torch.distributed.send(h.float().contiguous(), group=self.d.group("pp"), group_dst=pp_rank)

    def _recv(self, pp_rank: int, shape: tuple[int, ...]) -> torch.Tensor:
        h = torch.empty(shape, device=self.d.device)
        torch.distributed.recv(h, group=self.d.group("pp"), group_src=pp_rank)
        return h


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t

