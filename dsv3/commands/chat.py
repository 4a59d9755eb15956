"""`dsv3 chat`: an interactive multi-turn conversation that streams the model's answers.

Each turn renders the whole conversation through the model's chat template (DeepSeek-V3's format when
the directory has none, or V3.1's with --chat-format v3.1) and continues it until end-of-sentence. Lines
starting with `/` are commands. With --thinking the model reasons first (DeepSeek-V3.1's thinking mode): the
reasoning goes to stderr (dimmed on a terminal), the answer to stdout, and only the answer stays in the
conversation, as V3.1's format wants.
"""

from __future__ import annotations

import argparse
import sys

from dsv3.commands import options
from dsv3.errors import Dsv3Error

HELP = "chat with a model in the terminal (multi-turn, streamed answers)"

COMMANDS_HELP = "/reset starts a new conversation, /exit (or end of input) leaves"
DIM, PLAIN = "\x1b[2m", "\x1b[0m"  # the reasoning's look on a terminal


def add_arguments(parser: argparse.ArgumentParser) -> None:
    options.add_model(parser)
    options.add_serving(parser)
    options.add_processes(parser)
    options.add_sampling(parser, temperature=0.7)
    parser.add_argument("--system", metavar="TEXT", help="a system prompt that opens the conversation")
    parser.add_argument("--chat-format", choices=["v3", "v3.1"], default="v3",
                        help="the chat format of a model whose tokenizer_config.json has no chat_template: "
                             "DeepSeek-V3's, or DeepSeek-V3.1's with its thinking mode (default: v3)")
    parser.add_argument("--thinking", action=argparse.BooleanOptionalAction,
                        help="thinking mode: the model reasons before it answers; the reasoning is shown on "
                             "stderr and left out of the conversation (default: the chat format's own, off for v3.1)")


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
    template = ChatTemplate.from_config(tok.config, builtin=args.chat_format)
    if args.thinking and not template.has_thinking_switch:
        raise Dsv3Error(f"--thinking needs a chat format with a thinking mode, and this model has no chat template "
                        f"({template.name} has none); add --chat-format v3.1")
    params = options.sampling_params(args, (tok.eos_id,) if tok.eos_id is not None else ())
    opening = len(tok.encode(_render(template, [*system, {"role": "user", "content": ""}], args.thinking)))
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
            prompt = tok.encode(_render(template, messages, args.thinking))
            answer = _answer(engine, prompt, params, interactive, thinking=bool(args.thinking))
            messages = messages + [{"role": "assistant", "content": answer}] if answer is not None else list(system)
    return 0


def _read_line(interactive: bool) -> str | None:
    """The next line the user typed (None at the end of input), checked to be text."""
    try:
        line = input("you> " if interactive else "")
    except EOFError:
        return None
    return options.text_argument(line, "that line")


def _render(template, messages: list[dict], thinking: bool | None) -> str:
    try:
        return template.render(messages, add_generation_prompt=True, thinking=thinking)
    except ValueError as e:  # the model's template cannot render this conversation
        raise Dsv3Error(f"{e}; fix the chat_template in tokenizer_config.json") from None


def _answer(engine, prompt: list[int], params, interactive: bool, thinking: bool = False) -> str | None:
    """Stream the model's answer; None when the conversation has outgrown the context (said on stderr). In
    thinking mode the reasoning streams to stderr and the answer alone is returned."""
    from dsv3.infer.reasoning import ReasoningSplitter

    if interactive:
        sys.stdout.write("model> ")
        sys.stdout.flush()
    splitter = ReasoningSplitter() if thinking else None
    shown = _Reasoning()
    answer = []
    try:
        for piece in engine.stream(prompt, params):
            reasoning, piece = splitter.feed(piece) if splitter else ("", piece)
            shown.write(reasoning)
            _say(piece, answer, shown)
        if splitter:
            reasoning, piece = splitter.finish()
            shown.write(reasoning)
            _say(piece, answer, shown)
    except ValueError as e:  # the conversation outgrew the context: say so and start afresh
        shown.close()
        print(f"\n{e}; starting a new conversation", file=sys.stderr)
        return None
    shown.close()
    sys.stdout.write("\n")
    sys.stdout.flush()
    return "".join(answer)


def _say(piece: str, answer: list[str], shown: _Reasoning) -> None:
    if piece:
        shown.close()  # the reasoning is over: its line ends before the answer starts
        answer.append(piece)
        sys.stdout.write(piece)
        sys.stdout.flush()


class _Reasoning:
    """The reasoning of one answer on stderr: dimmed on a terminal, ended by a line break."""

    def __init__(self):
        self.open = False
        self.dim = sys.stderr.isatty()

    def write(self, text: str) -> None:
        if text:
            self.open = True
            sys.stderr.write(f"{DIM}{text}{PLAIN}" if self.dim else text)
            sys.stderr.flush()

    def close(self) -> None:
        if self.open:
            self.open = False
            sys.stderr.write("\n")
            sys.stderr.flush()
