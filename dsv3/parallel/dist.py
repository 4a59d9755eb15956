"""The process group and device mesh of a job, and the few collectives the trainer needs.

A job of one process (plain `dsv3 train`) has no process group: every collective here is then the identity,
so the trainer runs one code path whatever the layout. Under torchrun (or `dsv3 train --nproc N`) every
rank runs the same program: gloo on the CPU, NCCL on CUDA, and a mesh of shape (pp, dp, ep).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from dsv3.parallel.layout import Layout

# A rank that waits this long in a collective gives up: the backstop behind torchrun, which takes the
# whole job down as soon as one rank dies.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=5)


@dataclass
class Dist:
    layout: Layout
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    mesh: DeviceMesh | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.mesh is not None

    @property
    def coordinates(self) -> tuple[int, int, int]:
        return self.layout.coordinates(self.rank)

    @property
    def pp_rank(self) -> int:
        return self.coordinates[0]

    @property
    def ep_rank(self) -> int:
        return self.coordinates[2]

    @property
    def data_rank(self) -> int:
        """This rank's share of every batch, among the dp x ep data-parallel ranks of its stage group."""
        _, dp, ep = self.coordinates
        return dp * self.layout.ep + ep

    def group(self, *dims: str):
        """The process group over mesh dims `dims` ("pp", "dp", "ep"; several are flattened); None alone."""
        if self.mesh is None:
            return None
        return self.submesh(*dims).get_group()

    def submesh(self, *dims: str) -> DeviceMesh:
        sub = self.mesh[dims]
        return sub._flatten("_".join(dims)) if len(dims) > 1 else sub

    # ----- collectives that are the identity in a one-process job -------------------------------------
    def all_reduce(self, tensor: torch.Tensor, *dims: str, op=dist.ReduceOp.SUM) -> torch.Tensor:
        """Reduce `tensor` in place over mesh dims `dims` (default: every rank)."""
        if self.mesh is not None:
            dist.all_reduce(tensor, op=op, group=self.group(*dims) if dims else None)
        return tensor

    def broadcast_object(self, obj, src: int = 0):
        if self.mesh is None:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Overwrite `tensor` in place with rank `src`'s."""
        if self.mesh is not None:
            dist.broadcast(tensor, src=src)
        return tensor

    def barrier(self) -> None:
        if self.mesh is not None:
            dist.barrier()

    def close(self) -> None:
        """Leave the job: every rank waits for the others first (a rank that tears its process group down while
        another still talks to it aborts that one)."""
        if self.mesh is not None and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def world_size() -> int:
    """The ranks of the job this process belongs to (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched() -> bool:
    """Whether this process is one rank of a torchrun job."""
    return world_size() > 1


def init(layout: Layout, device: torch.device) -> Dist:
    """Join the job torchrun started (or stand alone) and build the mesh. On CUDA each rank takes the GPU of
    its local rank."""
    if not launched():
        return Dist(layout, device=device)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=COLLECTIVE_TIMEOUT)
    mesh = init_device_mesh(device.type, layout.mesh_shape, mesh_dim_names=("pp", "dp", "ep"))
    return Dist(layout, rank, world, device, mesh)
