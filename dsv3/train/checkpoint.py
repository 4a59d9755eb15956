"""Training checkpoints: a model directory plus the training state, saved atomically as a whole.

    RUN/checkpoints/step-00000100/   config.json, model.safetensors       the model (Hugging Face layout)
                                     tokenizer.json, tokenizer_config.json
                                     train_state.safetensors              AdamW moments and steps, RNG state
                                     train_state.json                     step, data position, configs, counters
    RUN/config.json, RUN/model.safetensors, RUN/tokenizer*.json           hard links to the newest checkpoint

A checkpoint is written into a hidden temporary folder, every file fsynced, and only then renamed to
its `step-*` name, so a `step-*` folder is always complete: a process killed at any instant, also in
the middle of a save, leaves the previous checkpoint whole and resume takes the newest one. Old
checkpoints are renamed away before they are deleted, for the same reason. The links at the top of the
run directory are swapped one file at a time with atomic renames; the config and tokenizer never change
during a run, so the top level is always a loadable model: the newest checkpoint's.
No pickle anywhere: tensors go to safetensors, everything else to JSON.
"""

from __future__ import annotations

import json
import os
import re
import shutil

import torch
from safetensors.torch import load_file, save_file

from dsv3.checkpoint import save_pretrained
from dsv3.checkpoint.files import INDEX, SHARD, SINGLE
from dsv3.data import Tokenizer
from dsv3.errors import CheckpointError
from dsv3.utils import atomic_write, atomic_write_text

CHECKPOINTS = "checkpoints"
STATE_TENSORS = "train_state.safetensors"
STATE_JSON = "train_state.json"
FORMAT = "dsv3-train-state-1"
CONFIG_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json")
STEP_DIR = re.compile(r"step-(\d{8})")
TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"


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
        needed = (*CONFIG_FILES, STATE_TENSORS, STATE_JSON)
        has_weights = any(os.path.isfile(os.path.join(path, f)) for f in (SINGLE, INDEX))
        if m and has_weights and all(os.path.isfile(os.path.join(path, f)) for f in needed):
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


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def optimizer_tensors(optimizer: torch.optim.Optimizer, names: dict[int, str]) -> dict[str, torch.Tensor]:
    """AdamW's per-parameter state as `optimizer.<param name>.<exp_avg|exp_avg_sq|step>` tensors."""
    out = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                out[f"optimizer.{names[id(p)]}.{key}"] = value.detach().cpu().contiguous()
    return out


def load_optimizer(optimizer: torch.optim.Optimizer, names: dict[int, str], tensors: dict[str, torch.Tensor],
                   groups: list[dict]) -> None:
    """Put saved moments and steps (and the groups' hyperparameters) back into a freshly built optimizer."""
    sd = optimizer.state_dict()
    index = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            prefix = f"optimizer.{names[id(p)]}."
            state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            if state:
                sd["state"][index] = state
            index += 1
    if len(groups) != len(sd["param_groups"]):
        raise CheckpointError("the checkpoint's optimizer has a different number of parameter groups")
    for group, saved in zip(sd["param_groups"], groups):
        group.update({k: (tuple(v) if isinstance(v, list) else v) for k, v in saved.items() if k != "params"})
    optimizer.load_state_dict(sd)


def save_checkpoint(run_dir: str, step: int, model: torch.nn.Module, tokenizer: Tokenizer,
                    tensors: dict[str, torch.Tensor], state: dict, keep_last: int) -> str:
    """Write checkpoint `step` (model, tokenizer, training state) atomically, point the run directory's model
    files at it, and delete all but the newest `keep_last` checkpoints. Returns its folder."""
    root = os.path.join(run_dir, CHECKPOINTS)
    os.makedirs(root, exist_ok=True)
    final = step_dir(run_dir, step)
    tmp = os.path.join(root, f"{TMP_PREFIX}{os.path.basename(final)}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_pretrained(model, tmp)
    tokenizer.save(tmp)
    atomic_write(os.path.join(tmp, STATE_TENSORS), lambda path: save_file(tensors, path))
    atomic_write_text(os.path.join(tmp, STATE_JSON), json.dumps({"format": FORMAT, **state}, indent=1) + "\n")
    _fsync_dir(tmp)
    if os.path.exists(final):  # the same step saved again (a finished run resumed): swap it out first
        os.rename(final, os.path.join(root, f"{TRASH_PREFIX}{os.path.basename(final)}"))
    os.rename(tmp, final)
    _fsync_dir(root)
    _link_model_files(final, run_dir)
    for _, old in list_checkpoints(run_dir)[:-keep_last]:
        trash = os.path.join(root, TRASH_PREFIX + os.path.basename(old))
        os.rename(old, trash)
        shutil.rmtree(trash, ignore_errors=True)
    remove_leftovers(run_dir)
    return final


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
    _fsync_dir(run_dir)


def read_state(checkpoint: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """The JSON state and the tensors of a checkpoint folder."""
    path = os.path.join(checkpoint, STATE_JSON)
    try:
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
        tensors = load_file(os.path.join(checkpoint, STATE_TENSORS))
    except Exception as e:  # unreadable, not JSON, or a safetensors error (its own exception type)
        raise CheckpointError(f"cannot read the training state in {checkpoint} ({type(e).__name__}: {e}); resume "
                              "from an older checkpoint by deleting this folder") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a dsv3 training state ({FORMAT}); it cannot be resumed")
    return state, tensors
