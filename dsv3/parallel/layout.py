"""How the ranks of a job split a model: `--dp-shard D --ep E --pp P`, with D x E x P ranks in all.

    pp        P pipeline stage groups: each holds a contiguous run of blocks (two runs with dualpipev)
    dp, ep    within a stage group, D x E data-parallel ranks, each on its own share of every batch;
              the E ranks of an expert-parallel group split the routed experts between them (a whole
              number of expert groups each, DeepSeek's node-limited routing), and everything else is
              sharded by FSDP2 over all D x E ranks (the experts over the D ranks that hold the same ones)

Rank r sits at mesh coordinate (pp, dp, ep) in row-major order: the E ranks of an expert group are
neighbours (one node, typically), the pipeline is the slowest dimension.
"""

from __future__ import annotations

from dataclasses import dataclass

from dsv3.config import ModelConfig
from dsv3.errors import InvalidValue

PP_SCHEDULES = ("1f1b", "dualpipev")


@dataclass(frozen=True)
class Layout:
    dp_shard: int = 1
    ep: int = 1
    pp: int = 1
    pp_schedule: str = "1f1b"

    @property
    def world_size(self) -> int:
        return self.dp_shard * self.ep * self.pp

    @property
    def data_parallel(self) -> int:
        """Ranks that each train on their own share of a batch."""
        return self.dp_shard * self.ep

    @property
    def n_stages(self) -> int:
        """Pipeline stages: one per pipeline rank, two (a V) with dualpipev."""
        return self.pp * (2 if self.pp > 1 and self.pp_schedule == "dualpipev" else 1)

    @property
    def mesh_shape(self) -> tuple[int, int, int]:
        return self.pp, self.dp_shard, self.ep

    def check(self, cfg: ModelConfig, world_size: int, grad_accum: int) -> None:
        """Raise InvalidValue, before any work, when this layout cannot run `cfg` on `world_size` ranks."""
        for name in ("dp_shard", "ep", "pp"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InvalidValue(name, v, "must be a positive integer")
        if self.pp_schedule not in PP_SCHEDULES:
            raise InvalidValue("pp_schedule", self.pp_schedule, f"is not one of {', '.join(PP_SCHEDULES)}")
        if cfg.n_routed_experts % self.ep:
            raise InvalidValue("ep", self.ep, f"must divide the model's {cfg.n_routed_experts} routed experts")
        if cfg.n_group > 1 and cfg.n_group % self.ep:
            raise InvalidValue("ep", self.ep, f"must divide the model's {cfg.n_group} expert groups, so that each "
                               "rank holds whole groups and a token reaches at most topk_group ranks")
        if self.n_stages > cfg.num_hidden_layers:
            raise InvalidValue("pp", self.pp, f"makes {self.n_stages} pipeline stages, more than the model's "
                               f"{cfg.num_hidden_layers} blocks")
        if self.world_size != world_size:
            raise InvalidValue("dp_shard", self.dp_shard, f"x ep {self.ep} x pp {self.pp} = {self.world_size} must "
                               f"equal the {world_size} ranks of this job")
        if self.pp > 1 and grad_accum < self.n_stages:
            raise InvalidValue("grad_accum", grad_accum, f"gives the pipeline's {self.n_stages} stages fewer "
                               f"micro-batches than stages; use at least {self.n_stages}")

    def coordinates(self, rank: int) -> tuple[int, int, int]:
        """(pp, dp, ep) of global rank `rank`."""
        pp, rest = divmod(rank, self.dp_shard * self.ep)
        dp, ep = divmod(rest, self.ep)
        return pp, dp, ep

    def stage_blocks(self, n_layers: int) -> list[range]:
        """The blocks of each pipeline stage: contiguous runs, the first n % stages runs one longer."""
        out, start = [], 0
        for s in range(self.n_stages):
            size = n_layers // self.n_stages + (1 if s < n_layers % self.n_stages else 0)
            out.append(range(start, start + size))
            start += size
        return out

    def local_stages(self, pp_rank: int) -> list[int]:
        """The stage indices pipeline rank `pp_rank` runs: its own, or with dualpipev the V pair r and 2P-1-r
        (so the first stage, with the embedding, and the last, with the head and the MTP modules, share a rank)."""
        if self.n_stages == self.pp:
            return [pp_rank]
        return [pp_rank, 2 * self.pp - 1 - pp_rank]
