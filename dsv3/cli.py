"""The `dsv3` command: one verb per task, each in its own module under `dsv3.commands`.

A verb's module defines `HELP` (one line), `add_arguments(parser)` and `run(args) -> int`. Modules
are imported only when their verb runs, so `dsv3 info` never pays for the server's imports.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from dsv3.errors import Dsv3Error, InvalidValue

# verb -> (module, one-line help). Keep in the order a user meets them.
COMMANDS: dict[str, tuple[str, str]] = {
    "info": ("dsv3.commands.info", "parameters, active parameters, cache bytes and FLOPs of a model"),
    "prepare": ("dsv3.commands.prepare", "tokenize a corpus into token shards (built-in corpus, files, JSONL)"),
    "train": ("dsv3.commands.train", "pre-train with DeepSeek-V3's recipe; no arguments: the 10-minute quick start"),
    "sft": ("dsv3.commands.sft", "fine-tune on chat data (JSONL or the built-in set), the loss on the answers only"),
    "eval": ("dsv3.commands.eval", "evaluate a model: `dsv3 eval identity` asks who it is and counts the answers"),
    "report": ("dsv3.commands.report", "plots of a training run: losses, learning rate, expert loads, router biases"),
    "audit": ("dsv3.commands.audit", "find (and fix) other models' self-identification in a corpus"),
    "convert": ("dsv3.commands.convert", "convert a checkpoint (FP8 -> bf16, re-shard, change dtype)"),
    "generate": ("dsv3.commands.generate", "continue a prompt with a model"),
    "chat": ("dsv3.commands.chat", "chat with a model in the terminal"),
    "serve": ("dsv3.commands.serve", "serve a model over an OpenAI-compatible HTTP API"),
    "cost": ("dsv3.commands.cost", "FLOPs, GPU-hours and dollars to train a model; DeepSeek-V3's figures reproduced"),
    "plan": ("dsv3.commands.plan", "will it fit: per-GPU memory for training and serving, smallest GPU counts"),
}


def _top_parser() -> argparse.ArgumentParser:
    verbs = "\n".join(f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items())
    return argparse.ArgumentParser(
        prog="dsv3",
        description="DeepSeek-V3 in plain PyTorch.",
        epilog=f"commands:\n{verbs}\n\nRun `dsv3 COMMAND --help` for a command's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="dsv3 COMMAND [options]",
    )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = _top_parser()
    if not argv or argv[0] in ("-h", "--help"):
        top.print_help()
        return 0 if argv else 2
    verb, rest = argv[0], argv[1:]
    if verb not in COMMANDS:
        print(f"dsv3: error: unknown command {verb!r}; choose one of: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[verb][0])
    parser = argparse.ArgumentParser(prog=f"dsv3 {verb}", description=module.HELP)
    module.add_arguments(parser)
    args = parser.parse_args(rest)  # argparse itself exits 2 on usage errors
    args.argv = rest  # for a verb that starts itself again in other processes (train --nproc)
    if "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        verb = f"{verb} (rank {os.environ['RANK']})"  # every rank's errors reach the terminal: say whose
    try:
        return int(module.run(args) or 0)
    except InvalidValue as e:  # the library names its field; say it with the flag that set it
        flag = _flags(parser).get(e.field)
        print(f"dsv3 {verb}: error: {e.as_flag(flag) if flag else e}", file=sys.stderr)
        return 2
    except Dsv3Error as e:
        print(f"dsv3 {verb}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dsv3 {verb}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like: not an error
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silence the flush at exit
        return 0


def _flags(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Each option's destination (the library field it sets) -> its long flag, sub-commands included."""
    out = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                out.update(_flags(sub))
        elif action.option_strings:
            out[action.dest] = max(action.option_strings, key=len)
    return out


if __name__ == "__main__":
    sys.exit(main())
