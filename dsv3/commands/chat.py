"""`dsv3 chat`: an interactive multi-turn conversation that streams the model's answers.

Each turn renders the whole conversation through the model's chat template (DeepSeek-V3's format when
the directory has none) and continues it until end-of-sentence. Lines starting with `/` are commands.
"""

from __future__ import annotations

import argparse
import sys

from dsv3.commands import options

HELP = "chat with a model in the terminal (multi-turn, streamed answers)"

COMMANDS_HELP = "/reset starts a new conversation, /exit (or end of input) leaves"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    options.add_model(parser)
    options.add_serving(parser)
    options.add_sampling(parser, temperature=0.7)
    parser.add_argument("--system", metavar="TEXT", help="a system prompt that opens the conversation")


def run(args: argparse.Namespace) -> int:
    from dsv3.chat_template import ChatTemplate

    loaded = options.load_model(args)
    engine = options.make_engine(args, loaded)
    tok = loaded.tokenizer
    if tok.eos_id is None:
        print("note: this model has no end-of-sentence token (stand-in tokenizer); answers end at "
              f"--max-new-tokens {args.max_new_tokens}", file=sys.stderr)
    template = ChatTemplate.from_config(tok.config)
    params = options.sampling_params(args, (tok.eos_id,) if tok.eos_id is not None else ())
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(system)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"chatting with {loaded.name}; {COMMANDS_HELP}", file=sys.stderr)
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            break
        if line.strip() in ("/exit", "/quit"):
            break
        if line.strip() == "/reset":
            messages = list(system)
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        prompt = tok.encode(template.render(messages, add_generation_prompt=True))
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
            messages = list(system)
            continue
        sys.stdout.write("\n")
        sys.stdout.flush()
        messages.append({"role": "assistant", "content": "".join(answer)})
    return 0
