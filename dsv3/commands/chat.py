"""`dsv3 chat`: an interactive multi-turn conversation that streams the model's answers.

Each turn renders the whole conversation through the model's chat template (DeepSeek-V3's format when
the directory has none) and continues it until end-of-sentence. Lines starting with `/` are commands.
"""

from __future__ import annotations

import argparse
import sys

from dsv3.commands import options
from dsv3.errors import Dsv3Error

HELP = "chat with a model in the terminal (multi-turn, streamed answers)"

COMMANDS_HELP = "/reset starts a new conversation, /exit (or end of input) leaves"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    options.add_model(parser)
    options.add_serving(parser)
    options.add_processes(parser)
    options.add_sampling(parser, temperature=0.7)
    parser.add_argument("--system", metavar="TEXT", help="a system prompt that opens the conversation")


def run(args: argparse.Namespace) -> int:
    from dsv3.chat_template import ChatTemplate

    if args.nproc is not None:
        from dsv3.commands.launch import launch

        return launch("chat", args.nproc, args.argv)
    system = [{"role": "system", "content": options.text_argument(args.system, "--system")}] if args.system else []
    loaded = options.load_model(args)
    engine = options.make_engine(args, loaded)
    tok = loaded.tokenizer
    if tok.eos_id is None:
        print("note: this model has no end-of-sentence token (stand-in tokenizer); answers end at "
              f"--max-new-tokens {args.max_new_tokens}", file=sys.stderr)
    template = ChatTemplate.from_config(tok.config)
    params = options.sampling_params(args, (tok.eos_id,) if tok.eos_id is not None else ())
    opening = len(tok.encode(_render(template, [*system, {"role": "user", "content": ""}])))
    if opening >= engine.max_len:
        raise Dsv3Error(f"the --system prompt alone takes {opening} tokens of the {engine.max_len} the context "
                        "holds, leaving none for a conversation; shorten it or raise --max-len")
    if hasattr(sys.stdin, "reconfigure"):  # bytes that are not UTF-8 are then reported, not a traceback
        sys.stdin.reconfigure(errors="surrogateescape")
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"chatting with {loaded.name}; {COMMANDS_HELP}", file=sys.stderr)
    messages = list(system)
    while (line := _read_line(interactive)) is not None:
        if line.strip() in ("/exit", "/quit"):
            break
        if line.strip() == "/reset":
            messages = list(system)
        elif line.strip():
            messages.append({"role": "user", "content": line})
            answer = _answer(engine, tok.encode(_render(template, messages)), params, interactive)
            messages = messages + [{"role": "assistant", "content": answer}] if answer is not None else list(system)
    return 0


def _read_line(interactive: bool) -> str | None:
    """The next line the user typed (None at the end of input), checked to be text."""
    try:
        line = input("you> " if interactive else "")
    except EOFError:
        return None
    return options.text_argument(line, "that line")


def _render(template, messages: list[dict]) -> str:
    try:
        return template.render(messages, add_generation_prompt=True)
    except ValueError as e:  # the model's template cannot render this conversation
        raise Dsv3Error(f"{e}; fix the chat_template in tokenizer_config.json") from None


def _answer(engine, prompt: list[int], params, interactive: bool) -> str | None:
    """Stream the model's answer; None when the conversation has outgrown the context (said on stderr)."""
    if interactive:
        sys.stdout.write("model> ")
    answer = []
    try:
        for piece in engine.stream(prompt, params):
            answer.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
    except ValueError as e:  # the conversation outgrew the context: say so and start afresh
        print(f"\n{e}; starting a new conversation", file=sys.stderr)
        return None
    sys.stdout.write("\n")
    sys.stdout.flush()
    return "".join(answer)
