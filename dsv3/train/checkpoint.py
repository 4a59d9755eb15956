"""Training checkpoints: the training state for any layout, a model directory beside it, saved atomically.

    RUN/checkpoints/step-00000100/   state/                               model weights, router biases, AdamW
                                                                          state and RNG, in torch.distributed.
                                                                          checkpoint's sharded format
                                     train_state.json                     step, data position, options, counters
                                     config.json, model.safetensors       the model (Hugging Face layout)
                                     tokenizer.json, tokenizer_config.json
    RUN/config.json, RUN/model.safetensors, RUN/tokenizer*.json           hard links to the newest checkpoint

`state/` is written by torch.distributed.checkpoint, every rank of the job (one process is a job of one
rank) its own shards, as safetensors files whose headers place each shard in the whole tensor: resuming
reads them into any other layout or world size, and a single process reads what a distributed run wrote.
Only tensors go there (DCP's default format pickles; this one cannot): AdamW's hyper-parameters come from
the options, which train_state.json records. The model directory beside it is written by rank 0 alone,
reading `state/` one tensor at a time, so no process ever gathers the model.

A checkpoint is written into a hidden temporary folder, every file fsynced, and only then renamed to
its `step-*` name, so a `step-*` folder is always complete: a process killed at any instant, also in
the middle of a save, leaves the previous checkpoint whole and resume takes the newest one. Old
checkpoints are renamed away before they are deleted, for the same reason. The links at the top of the
run directory are swapped one file at a time with atomic renames; the config and tokenizer never change
during a run, so the top level is always a loadable model: the newest checkpoint's.
No pickle anywhere: tensors go to the checkpoint's shard files and safetensors, everything else to JSON.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import warnings
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors import safe_open

from dsv3.checkpoint.files import INDEX, SHARD, SINGLE
from dsv3.checkpoint.pretrained import write_pretrained
from dsv3.config import ModelConfig
from dsv3.errors import CheckpointError
from dsv3.model import DeepSeekV3
from dsv3.tokenizer import Tokenizer
from dsv3.utils import atomic_write_text, fsync_path, fsync_tree

CHECKPOINTS = "checkpoints"
STATE_DIR = "state"
STATE_JSON = "train_state.json"
FORMAT = "dsv3-train-state-2"
CONFIG_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json")
STEP_DIR = re.compile(r"step-(\d{8})")
TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"
DCP_SHARDING = "DCP_SHARDING_INFO"  # the safetensors header entry where DCP records each shard's offsets


def step_dir(run_dir: str, step: int) -> str:
    return os.path.join(run_dir, CHECKPOINTS, f"step-{step:08d}")


def list_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """(step, folder) of every complete checkpoint of a run, oldest first."""
    root = os.path.join(run_dir, CHECKPOINTS)
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = STEP_DIR.fullmatch(name)
        path = os.path.join(root, name)
        needed = (*CONFIG_FILES, STATE_JSON)
        has_weights = any(os.path.isfile(os.path.join(path, f)) for f in (SINGLE, INDEX))
        if m and has_weights and _state_files(path) and all(os.path.isfile(os.path.join(path, f)) for f in needed):
            found.append((int(m.group(1)), path))
    return sorted(found)


def latest_checkpoint(run_dir: str) -> str | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def remove_leftovers(run_dir: str) -> None:
    """Temporary and half-deleted folders of a process that was killed while saving or pruning."""
    root = os.path.join(run_dir, CHECKPOINTS)
    if os.path.isdir(root):
        for name in os.listdir(root):
            if name.startswith((TMP_PREFIX, TRASH_PREFIX)):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def begin(run_dir: str, step: int, is_main: bool) -> str:
    """The temporary folder checkpoint `step` is written into (made by rank 0; every rank gets its name)."""
    root = os.path.join(run_dir, CHECKPOINTS)
    tmp = os.path.join(root, f"{TMP_PREFIX}{os.path.basename(step_dir(run_dir, step))}")
    if is_main:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    return tmp


def save_state(tmp: str, state: dict[str, Any]) -> None:
    """Every rank writes its shards of `state` (tensors: model and optimizer state, RNG) into tmp/state."""
    writer = dcp.HuggingFaceStorageWriter(os.path.join(tmp, STATE_DIR), save_distributed=True)
    with _one_process_is_fine():
        dcp.save(state, storage_writer=writer, no_dist=not dist.is_initialized())


@contextlib.contextmanager
def _one_process_is_fine() -> Iterator[None]:
    """DCP warns whenever it runs without a process group; a job of one process is meant to."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is .*single process")
        yield


def _state_files(checkpoint: str) -> list[str]:
    folder = os.path.join(checkpoint, STATE_DIR)
    if not os.path.isdir(folder):
        return []
    return sorted(os.path.join(folder, n) for n in os.listdir(folder) if n.endswith(".safetensors"))


def finish(run_dir: str, step: int, tmp: str, cfg: ModelConfig, tokenizer: Tokenizer, state: dict,
           keep_last: int, fp8: bool = False) -> str:
    """Rank 0, after every rank saved its shards: the model directory (read from the shards one tensor at a
    time), the tokenizer and train_state.json; then the atomic rename, the top-level links and the pruning of
    old checkpoints. Returns the checkpoint's folder."""
    root = os.path.join(run_dir, CHECKPOINTS)
    final = step_dir(run_dir, step)
    export_model(tmp, cfg, tmp, fp8=fp8)
    tokenizer.save(tmp)
    atomic_write_text(os.path.join(tmp, STATE_JSON), json.dumps({"format": FORMAT, **state}, indent=1) + "\n")
    fsync_tree(tmp)
    if os.path.exists(final):  # the same step saved again (a finished run resumed): swap it out first
        os.rename(final, os.path.join(root, f"{TRASH_PREFIX}{os.path.basename(final)}"))
    os.rename(tmp, final)
    fsync_path(root)
    _link_model_files(final, run_dir)
    for _, old in list_checkpoints(run_dir)[:-keep_last]:
        trash = os.path.join(root, TRASH_PREFIX + os.path.basename(old))
        os.rename(old, trash)
        shutil.rmtree(trash, ignore_errors=True)
    remove_leftovers(run_dir)
    return final


def export_model(checkpoint: str, cfg: ModelConfig, out: str, fp8: bool = False) -> None:
    """Write the Hugging Face model directory from a checkpoint's sharded state, one tensor at a time; `fp8`: in
    DeepSeek's FP8 release layout (e4m3 weights with 128x128 block scales where the release has them)."""
    with torch.device("meta"):
        skeleton = DeepSeekV3(cfg)
    shapes = {k: (tuple(v.shape), v.dtype) for k, v in skeleton.state_dict().items()}
    chunks = _chunks(_state_files(checkpoint))

    def fetch(key: str) -> torch.Tensor:
        shape, dtype = shapes[key]
        whole = torch.empty(shape, dtype=dtype)
        for file, offsets in chunks[f"model.{key}"]:  # the shards each rank wrote, placed where they belong
            with safe_open(file, framework="pt") as f:
                part = f.get_tensor(f"model.{key}")
            whole[tuple(slice(o, o + n) for o, n in zip(offsets, part.shape))] = part
        return whole

    write_pretrained(out, cfg, shapes, fetch, fp8=fp8)


def _chunks(files: list[str]) -> dict[str, list[tuple[str, list[int]]]]:
    """Where every saved tensor's pieces are: key -> [(file, offsets in the whole tensor)]."""
    out: dict[str, list[tuple[str, list[int]]]] = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            placed = json.loads((f.metadata() or {}).get(DCP_SHARDING, "{}"))
            for key in f.keys():
                offsets = placed.get(key, {}).get("saved_offsets") or [0] * len(f.get_slice(key).get_shape())
                out.setdefault(key, []).append((file, offsets))
    return out


def _link_model_files(checkpoint: str, run_dir: str) -> None:
    """Make RUN/config.json etc. the checkpoint's files: hard links (no copy) swapped in by rename."""
    weights = [n for n in os.listdir(checkpoint) if n in (SINGLE, INDEX) or SHARD.fullmatch(n)]
    for name in (*CONFIG_FILES, *sorted(weights)):
        tmp = os.path.join(run_dir, f"{TMP_PREFIX}{name}")
        if os.path.lexists(tmp):
            os.remove(tmp)
        try:
            os.link(os.path.join(checkpoint, name), tmp)
        except OSError:  # a file system without hard links
            shutil.copyfile(os.path.join(checkpoint, name), tmp)
        os.replace(tmp, os.path.join(run_dir, name))
    fsync_path(run_dir)


def read_state(checkpoint: str) -> dict:
    """The JSON state of a checkpoint folder."""
    path = os.path.join(checkpoint, STATE_JSON)
    try:
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
    except (OSError, ValueError, RecursionError) as e:
        raise CheckpointError(f"cannot read the training state in {checkpoint} ({type(e).__name__}: {e}); resume "
                              "from an older checkpoint by deleting this folder") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a dsv3 training state ({FORMAT}); it cannot be resumed")
    return state


def load_state(checkpoint: str, state: dict[str, Any]) -> None:
    """Fill `state` (state dicts of this rank's layout) from a checkpoint of any layout. Parameters that had
    no AdamW state when it was saved (no gradient yet) are dropped from state["optim"]."""
    try:
        reader = dcp.HuggingFaceStorageReader(os.path.join(checkpoint, STATE_DIR))
        saved = set(reader.read_metadata().state_dict_metadata)
        optim = state.get("optim", {})
        for fqn in [f for f, moments in optim.items() if not all(f"optim.{f}.{k}" in saved for k in moments)]:
            del optim[fqn]
        with _one_process_is_fine():
            dcp.load(state, storage_reader=reader, no_dist=not dist.is_initialized())
    except Exception as e:  # damaged or incomplete shards: DCP raises its own kinds
        raise CheckpointError(f"cannot read the training state in {checkpoint} ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200]}); resume from an older checkpoint by deleting this "
                              "folder") from None

