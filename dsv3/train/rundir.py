"""The run directory: one training run's files, and the state a resumed run picks up from.

    RUN/config.json, model.safetensors, tokenizer*.json   the newest checkpoint's model (hard links)
    RUN/checkpoints/step-*/                               checkpoints (see `checkpoint.py`)
    RUN/train_config.json  RUN/metrics.jsonl  RUN/summary.json  RUN/tensorboard/  RUN/plots/

A new run refuses a directory that holds one unless told to resume it or start over. What a checkpoint
holds besides the model: AdamW's moments and steps, the RNG state, every router's bias (sharded as the
layout holds them, see `checkpoint.py`) and the loader's position (JSON). In a job of several ranks, rank 0
alone changes the directory; the others wait for it.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import fields
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from dsv3.config import ModelConfig
from dsv3.data import TokenLoader
from dsv3.errors import Dsv3Error
from dsv3.model import DeepSeekV3
from dsv3.parallel.dist import Dist
from dsv3.parallel.layout import Layout
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
                 "train_config": dict, "tokenizer_sha256": str}


class RunDir:
    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)

    def check(self, *, resume: bool, overwrite: bool) -> list[str]:
        """Refuse to mix a new run into an old one's directory, unless told to resume it or start over; refuse
        to resume a directory that holds no run (a mistyped --out would otherwise start a new one). Changes
        nothing; returns the run's files that are there."""
        if resume and overwrite:
            raise Dsv3Error("--resume continues the run in --out and --overwrite deletes it; give one of them")
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise Dsv3Error(f"the run directory {self.path} is a file; name a folder with --out")
        present = [n for n in RUN_FILES if os.path.exists(os.path.join(self.path, n))]
        if resume and not present:
            raise Dsv3Error(f"there is no training run in {self.path} to resume; check --out, or leave out --resume "
                            "to start a new run there")
        if present and not resume and not overwrite:
            raise Dsv3Error(f"{self.path} already holds a training run; pass --resume to continue it, "
                            f"--overwrite to start it over, or --out DIR for a new one")
        return present

    def claim(self, *, resume: bool, overwrite: bool, d: Dist | None = None) -> None:
        """`check`, then clear an old run when starting over, and make the folder."""
        present = self.check(resume=resume, overwrite=overwrite)
        d = d or Dist(Layout())
        if d.is_main:
            if present and not resume:
                for name in present:
                    path = os.path.join(self.path, name)
                    shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
            os.makedirs(self.path, exist_ok=True)
            ckpt.remove_leftovers(self.path)
        d.barrier()

    def write_json(self, name: str, content: dict) -> None:
        atomic_write_text(os.path.join(self.path, name), json.dumps(content, indent=2) + "\n")

    def latest(self) -> str | None:
        return ckpt.latest_checkpoint(self.path)

    # ----- checkpoints ---------------------------------------------------------------------------------
    def save(self, step: int, model: DeepSeekV3, optimizer: torch.optim.Optimizer, tokenizer: Tokenizer,
             state: dict[str, Any], keep_last: int, d: Dist | None = None, fp8: bool = False) -> str:
        """Checkpoint `step`, every rank together: the model's and AdamW's state and the RNG, sharded as this
        rank holds them, then (rank 0) the model directory (`fp8`: in DeepSeek's FP8 release layout) and `state`
        (step, loader position, options) as JSON. Returns the checkpoint's folder."""
        d = d or Dist(Layout())
        tmp = ckpt.begin(self.path, step, d.is_main)
        d.barrier()
        ckpt.save_state(tmp, _training_state(model, optimizer))
        d.barrier()
        if d.is_main:
            ckpt.finish(self.path, step, tmp, model.config, tokenizer, state, keep_last, fp8=fp8)
        d.barrier()
        return ckpt.step_dir(self.path, step)

    def restore(self, path: str, model: DeepSeekV3, optimizer: torch.optim.Optimizer, loader: TokenLoader,
                tokenizer_sha256: str) -> dict[str, Any]:
        """Load checkpoint `path`, saved under any layout, into this rank's model and optimizer, the loader and
        the RNG; returns its JSON state. A checkpoint of another model or tokenizer is refused, naming what
        differs."""
        state = ckpt.read_state(path)
        missing = [k for k, kind in _STATE_FIELDS.items() if not isinstance(state.get(k), kind)]
        if missing:
            raise Dsv3Error(f"the training state in {path} is damaged ({', '.join(missing)} missing or of the wrong "
                            "type); resume from an older checkpoint by deleting this one")
        _check_same_model(ModelConfig.from_hf(path), model.config, self.path)
        if state["tokenizer_sha256"] != tokenizer_sha256:
            raise Dsv3Error(f"cannot resume {self.path}: it was trained with another tokenizer than the one of "
                            f"the data it is given; resume with the same --data and --tokenizer")
        saved = _training_state(model, optimizer)
        ckpt.load_state(path, saved)
        set_model_state_dict(model, saved["model"])
        groups = get_optimizer_state_dict(model, optimizer)["param_groups"]
        set_optimizer_state_dict(model, optimizer, {"state": saved["optim"], "param_groups": groups},
                                 options=StateDictOptions(strict=False))  # parameters without state yet stay so
        torch.set_rng_state(saved["rng"])
        loader.load_state_dict(state["loader"])
        return state


def _training_state(model: DeepSeekV3, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """What a checkpoint holds for resuming: the model's state dict (router biases included), AdamW's moments
    and step counts, and the RNG, keyed by the parameters' names so any layout maps onto any other. AdamW's
    hyper-parameters are left out: they are the run's options."""
    return {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)["state"],
            "rng": torch.get_rng_state()}


def _check_same_model(saved: ModelConfig, wanted: ModelConfig, run_dir: str) -> None:
    for f in fields(ModelConfig):
        if f.name.startswith("_") or f.name == "extra":
            continue
        a, b = getattr(saved, f.name), getattr(wanted, f.name)
        if a != b:
            raise Dsv3Error(f"cannot resume {run_dir}: its checkpoint's model has {f.name}={a!r} but this run's has "
                            f"{f.name}={b!r}; resume with the same --preset or --config, or start a new run with --out")
