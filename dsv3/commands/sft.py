"""`dsv3 sft`: fine-tune a model on chat data, the loss on the assistants' answers only.

The conversations come from JSONL files (`{"messages": [{"role", "content"}, ...]}`, the field names as in
`dsv3 audit`) or, without --data, from the built-in chat set (`dsv3.data.chat_builtin`). They are rendered
with the model's chat template (the Jinja template of its tokenizer_config.json, else DeepSeek-V3's format)
and packed into a masked dataset in --data-dir; then the pre-training loop runs on it from the model's
weights. The run directory is a pre-training run's: checkpoints, --resume, metrics, `dsv3 report`, and a
Hugging Face model directory at the end.
"""

from __future__ import annotations

import argparse
import os

from dsv3.commands.options import add_chat_fields, add_identity, chat_fields
from dsv3.commands.recipe import CLI_ONLY, S, add_recipe_arguments, add_run_directory_arguments, recipe_config
from dsv3.config import PRESETS
from dsv3.train.config import TrainConfig
from dsv3.train.sft import DEFAULT_EPOCHS, SFT_DEFAULTS

HELP = "fine-tune a model on chat data (loss on the answers; cosine schedule from 2e-4, 2 epochs)"

CHAT_ONLY = ("model", "epochs", "identity", "creator", "messages_field", "role_field", "content_field",
             "assistant_role")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = TrainConfig(**SFT_DEFAULTS)
    _model_and_data(parser, d)
    add_recipe_arguments(parser, d, "optimizer (AdamW 0.9/0.95; warm-up, then one cosine decay to a tenth of "
                         "--lr, common SFT practice)", budget=False, processes=False)


def _model_and_data(parser: argparse.ArgumentParser, d: TrainConfig) -> None:
    group = parser.add_argument_group("model and data")
    which = group.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", metavar="DIR", help="the model to fine-tune: a Hugging Face model directory "
                       "(dsv3 train's output or a converted checkpoint) with its tokenizer")
    which.add_argument("--preset", choices=list(PRESETS), default=S,
                       help="start from a freshly initialised model instead, with a tokenizer trained on the chats")
    group.add_argument("--data", nargs="+", metavar="FILE", default=S,
                       help="JSONL chat files (default: the built-in set: answers from Python's documentation, "
                            "greetings, identity turns in English, Chinese and Hindi)")
    group.add_argument("--epochs", type=float, default=DEFAULT_EPOCHS,
                       help=f"passes over the training conversations, unless --max-steps (default: {DEFAULT_EPOCHS:g})")
    add_identity(group, "the built-in set's answer to 'who are you'", "the built-in set's answer to 'who made you'")
    add_chat_fields(group, "the role whose turns are learnt")
    group.add_argument("--out", metavar="DIR", default=S, help="the run directory (default: runs/sft)")
    group.add_argument("--data-dir", metavar="DIR", default=S,
                       help="where the chats are tokenized (default: the run directory's name + '-data')")
    add_run_directory_arguments(group)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """TrainConfig from the flags given over SFT_DEFAULTS; with --resume, over the run's train_config.json."""
    given = {k: v for k, v in vars(args).items() if k not in CLI_ONLY + CHAT_ONLY}
    given.pop("data", None)  # the chat files; the loop reads the prepared folder
    if args.model is not None:
        given.update(model_config=args.model, init_from=args.model)
    given.setdefault("out", os.path.join("runs", "sft"))
    given.setdefault("data_dir", os.path.normpath(given["out"]) + "-data")
    return recipe_config(given, SFT_DEFAULTS)


def run(args: argparse.Namespace) -> int:
    from dsv3.data.chat import read_chats
    from dsv3.data.chat_builtin import builtin_chats, validation_names
    from dsv3.train.sft import finetune

    cfg = config_from_args(args)
    if hasattr(args, "data"):
        conversations, held_out = list(read_chats(list(args.data), chat_fields(args))), None
    else:
        conversations = builtin_chats(args.identity, args.creator)
        held_out = validation_names(conversations)
    finetune(cfg, conversations, epochs=args.epochs, val_names=held_out,
             progress=False if args.no_progress else None)
    return 0
