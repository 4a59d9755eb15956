"""The run directory: one training run's files, and the state a resumed run picks up from.

    RUN/config.json, model.safetensors, tokenizer*.json   the newest checkpoint's model (hard links)
    RUN/checkpoints/step-*/                               checkpoints (see `checkpoint.py`)
    RUN/train_config.json  RUN/metrics.jsonl  RUN/summary.json  RUN/tensorboard/  RUN/plots/

A new run refuses a directory that holds one unless told to resume it or start over. What a checkpoint
holds besides the model: AdamW's moments and steps, the RNG state, every router's bias and the loader's
position (tensors in safetensors, the rest in JSON).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import fields
from typing import Any

import torch

from dsv3.checkpoint import load_pretrained
from dsv3.config import ModelConfig
from dsv3.data import TokenLoader
from dsv3.errors import Dsv3Error
from dsv3.model import DeepSeekV3
from dsv3.tokenizer import Tokenizer
from dsv3.train import checkpoint as ckpt
from dsv3.train.metrics import TENSORBOARD_DIR
from dsv3.utils import atomic_write_text

TRAIN_CONFIG = "train_config.json"
SUMMARY = "summary.json"
# What `--overwrite` clears (and what marks a folder as holding a run).
RUN_FILES = (ckpt.CHECKPOINTS, "metrics.jsonl", TRAIN_CONFIG, SUMMARY, TENSORBOARD_DIR, "plots", "config.json",
             "model.safetensors", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json")


# what a resumed run reads from train_state.json, and its JSON type
_STATE_FIELDS = {"step": int, "max_steps": int, "tokens": int, "train_seconds": (int, float), "loader": dict,
                 "train_config": dict, "tokenizer_sha256": str, "optimizer_groups": list}


class RunDir:
    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)

    def claim(self, *, resume: bool, overwrite: bool) -> None:
        """Refuse to mix a new run into an old one's directory, unless told to resume it or start over; refuse
        to resume a directory that holds no run (a mistyped --out would otherwise start a new one)."""
        if resume and overwrite:
            raise Dsv3Error("--resume continues the run in --out and --overwrite deletes it; give one of them")
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise Dsv3Error(f"the run directory {self.path} is a file; name a folder with --out")
        present = [n for n in RUN_FILES if os.path.exists(os.path.join(self.path, n))]
        if resume and not present:
            raise Dsv3Error(f"there is no training run in {self.path} to resume; check --out, or leave out --resume "
                            "to start a new run there")
        if present and not resume:
            if not overwrite:
                raise Dsv3Error(f"{self.path} already holds a training run; pass --resume to continue it, "
                                f"--overwrite to start it over, or --out DIR for a new one")
            for name in present:
                path = os.path.join(self.path, name)
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        os.makedirs(self.path, exist_ok=True)
        ckpt.remove_leftovers(self.path)

    def write_json(self, name: str, d: dict) -> None:
        atomic_write_text(os.path.join(self.path, name), json.dumps(d, indent=2) + "\n")

    def latest(self) -> str | None:
        return ckpt.latest_checkpoint(self.path)

    # ----- checkpoints ---------------------------------------------------------------------------------
    def save(self, step: int, model: DeepSeekV3, tokenizer: Tokenizer, optimizer: torch.optim.Optimizer,
             state: dict[str, Any], keep_last: int) -> str:
        """Checkpoint `step`: the model, the tokenizer, AdamW's state, the RNG state and the router biases
        as tensors, and `state` (step, loader position, options, ...) as JSON. Returns its folder."""
        tensors = ckpt.optimizer_tensors(optimizer, _param_names(model))
        tensors["rng.cpu"] = torch.get_rng_state()
        if model.embed.weight.device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(model.embed.weight.device)
        for name, bias in _biases(model):
            tensors[f"balance.{name}"] = bias.detach().cpu().clone()
        state = {**state, "optimizer_groups": [{k: v for k, v in g.items() if k != "params"}
                                               for g in optimizer.param_groups]}
        return ckpt.save_checkpoint(self.path, step, model, tokenizer, tensors, state, keep_last)

    def restore(self, path: str, model: DeepSeekV3, optimizer: torch.optim.Optimizer, loader: TokenLoader,
                tokenizer_sha256: str) -> dict[str, Any]:
        """Load checkpoint `path` into the model, the optimizer, the loader and the RNG; returns its JSON state.
        A checkpoint of another model or tokenizer is refused, naming what differs."""
        state, tensors = ckpt.read_state(path)
        missing = [k for k, kind in _STATE_FIELDS.items() if not isinstance(state.get(k), kind)]
        if missing or "rng.cpu" not in tensors:
            raise Dsv3Error(f"the training state in {path} is damaged ({', '.join(missing) or 'rng.cpu'} missing or "
                            "of the wrong type); resume from an older checkpoint by deleting this one")
        _check_same_model(ModelConfig.from_hf(path), model.config, self.path)
        if state["tokenizer_sha256"] != tokenizer_sha256:
            raise Dsv3Error(f"cannot resume {self.path}: it was trained with another tokenizer than the one of "
                            f"the data it is given; resume with the same --data and --tokenizer")
        loaded = load_pretrained(path, torch.float32)
        model.load_state_dict(loaded.state_dict())
        ckpt.load_optimizer(optimizer, _param_names(model), tensors, state["optimizer_groups"])
        with torch.no_grad():
            for name, bias in _biases(model):
                bias.copy_(tensors[f"balance.{name}"])
        loader.load_state_dict(state["loader"])
        torch.set_rng_state(tensors["rng.cpu"])
        if "rng.cuda" in tensors and torch.cuda.is_available():
            torch.cuda.set_rng_state(tensors["rng.cuda"])
        return state


def _param_names(model: torch.nn.Module) -> dict[int, str]:
    return {id(p): name for name, p in model.named_parameters()}


def _biases(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [(name, b) for name, b in model.named_buffers() if name.endswith("gate.bias")]


def _check_same_model(saved: ModelConfig, wanted: ModelConfig, run_dir: str) -> None:
    for f in fields(ModelConfig):
        if f.name.startswith("_") or f.name == "extra":
            continue
        a, b = getattr(saved, f.name), getattr(wanted, f.name)
        if a != b:
            raise Dsv3Error(f"cannot resume {run_dir}: its checkpoint's model has {f.name}={a!r} but this run's has "
                            f"{f.name}={b!r}; resume with the same --preset or --config, or start a new run with --out")
