"""Supervised fine-tuning: the pre-training loop on chat data, starting from a model's weights.

    conversations -> chat template -> tokens + loss mask (`dsv3.data.chat`) -> masked dataset folder
                  -> `train()` with init_from = the model, a cosine schedule, and as many steps as the epochs need

Nothing of the loop is specific to fine-tuning: the masked dataset makes the losses count the answers only,
and `TrainConfig.init_from` loads the starting weights, so checkpoints, exact resume, metrics, `dsv3 report`
and the Hugging Face model directory at the end are the pre-training run's. The defaults follow common SFT
practice (`SFT_DEFAULTS`): a peak learning rate well below pre-training's, 3% warm-up, one cosine decay to a
tenth, two passes over the data.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence

from dsv3.chat_template import ChatTemplate
from dsv3.data.chat import Conversation, prepare_chats
from dsv3.data.dataset import DatasetInfo
from dsv3.errors import Dsv3Error, InvalidValue
from dsv3.tokenizer import TOKENIZER_FILE, Tokenizer
from dsv3.train.config import TrainConfig
from dsv3.train.loop import TrainResult, train
from dsv3.train.rundir import RunDir

SFT_DEFAULTS = {"lr": 2e-4, "schedule": "cosine", "warmup": 0.03, "min_lr_ratio": 0.1, "samples": 0,
                "eval_windows": 32}
DEFAULT_EPOCHS = 2.0


def chat_tokenizer(cfg: TrainConfig, conversations: Sequence[Conversation]) -> Tokenizer:
    """The tokenizer to fine-tune with: a resumed run's own, the starting model's, or (a fresh preset model)
    a BPE trained on the conversations' rendered text with the model's vocabulary size."""
    resumed = os.path.join(cfg.out, TOKENIZER_FILE)
    if cfg.resume and os.path.isfile(resumed):
        return Tokenizer.from_file(resumed)
    if cfg.init_from:
        if not os.path.isfile(os.path.join(cfg.init_from, TOKENIZER_FILE)):
            raise Dsv3Error(f"{cfg.init_from} has no {TOKENIZER_FILE}; fine-tuning needs the tokenizer the model "
                            "was trained with")
        return Tokenizer.from_dir(cfg.init_from)
    return train_chat_tokenizer(conversations, cfg.model().vocab_size)


def train_chat_tokenizer(conversations: Sequence[Conversation], vocab_size: int) -> Tokenizer:
    """A byte-level BPE trained on the conversations as DeepSeek-V3's format renders them."""
    template = ChatTemplate()
    return Tokenizer.train([template.render(c.messages, add_generation_prompt=False) for c in conversations],
                           vocab_size=vocab_size)


def epochs_to_steps(info: DatasetInfo, cfg: TrainConfig, epochs: float) -> int:
    """Optimizer steps for `epochs` passes over the training split (at least one)."""
    if not (isinstance(epochs, (int, float)) and math.isfinite(epochs) and epochs > 0):
        raise InvalidValue("epochs", epochs, "must be a positive number")
    return max(1, math.ceil(epochs * info.splits["train"]["tokens"] / cfg.tokens_per_step))


def finetune(cfg: TrainConfig, conversations: Sequence[Conversation], *, epochs: float = DEFAULT_EPOCHS,
             val_names: set[str] | None = None, log: Callable[[str], None] = print,
             progress: bool | None = None) -> TrainResult:
    """Fine-tune as `cfg` says on `conversations`, prepared into `cfg.data_dir` (replacing what is there).
    `cfg.max_steps` None: as many steps as `epochs` passes take. `val_names`: the conversations held out
    (default: 5% by a hash of their names)."""
    RunDir(cfg.out).check(resume=cfg.resume, overwrite=cfg.overwrite)  # before any work
    if os.path.abspath(cfg.data_dir) == os.path.abspath(cfg.out):
        raise InvalidValue("data_dir", cfg.data_dir, "must be another folder than the run directory --out")
    tokenizer = chat_tokenizer(cfg, conversations)
    template = ChatTemplate.from_config(tokenizer.config or {})
    info = prepare_chats(conversations, tokenizer, template, cfg.data_dir, val_names=val_names,
                         min_val_tokens=cfg.seq_len + 1)  # one evaluation window
    log(f"chat data: {info.splits['train']['documents']} training and {info.splits['val']['documents']} validation "
        f"conversations, {info.tokens:,} tokens in {cfg.data_dir}")
    steps = cfg.max_steps if cfg.max_steps is not None else epochs_to_steps(info, cfg, epochs)
    return train(cfg.replace(data=[cfg.data_dir], max_steps=steps), log=log, progress=progress)
