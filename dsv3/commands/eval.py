"""`dsv3 eval`: evaluate a model. `dsv3 eval identity` asks it who it is, in English, Chinese and Hindi, and
counts the answers that claim another model, the configured identity, or neither (`dsv3.eval.identity`)."""

from __future__ import annotations

import argparse
import json
import sys

from dsv3.commands.options import add_model, load_model

HELP = "evaluate a model: `dsv3 eval identity` asks who it is and counts the answers"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    tasks = parser.add_subparsers(dest="task", metavar="TASK", required=True)
    identity = tasks.add_parser("identity", help="ask identity questions, classify the answers with the audit's rules",
                                description="Ask identity questions through the chat template, sample answers, and "
                                            "count those that claim another model or maker, the configured "
                                            "identity, or neither.")
    add_model(identity)
    identity.add_argument("--prompts", metavar="FILE",
                          help="JSONL of {\"prompt\", \"language\"} records (default: 32 built-in questions each "
                               "in en, zh, hi)")
    identity.add_argument("--samples", type=int, default=4, metavar="K", help="answers per question (default: 4)")
    identity.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (default: 0.7)")
    identity.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (default: 0.95)")
    identity.add_argument("--max-new-tokens", type=int, default=48, metavar="N",
                          help="longest answer in tokens (default: 48)")
    identity.add_argument("--seed", type=int, default=0, help="seed of the first sample of every question (default: 0)")
    identity.add_argument("--max-batch", type=int, default=32, metavar="N",
                          help="answers decoded together (default: 32)")
    identity.add_argument("--identity", default="dsv3", help="the model's own name (default: dsv3)")
    identity.add_argument("--creator", default="the dsv3 authors", help="its maker's name (default: the dsv3 authors)")
    identity.add_argument("--examples", type=int, default=3, help="example answers per verdict and language "
                          "(default: 3)")
    identity.add_argument("--json", action="store_true", help="print the report as one JSON document")


def run(args: argparse.Namespace) -> int:
    from dsv3.chat_template import ChatTemplate
    from dsv3.errors import Dsv3Error, InvalidValue
    from dsv3.eval.identity import Judge, ask, builtin_prompts, read_prompts, table, tally
    from dsv3.infer import Engine, ServingConfig
    from dsv3.infer.sampling import SamplingParams

    if args.samples < 1:
        raise InvalidValue("samples", args.samples, "must be at least 1")
    if args.max_batch < 1:
        raise InvalidValue("max_batch", args.max_batch, "must be at least 1")
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            seed=args.seed)
    prompts = read_prompts(args.prompts) if args.prompts else builtin_prompts()
    loaded = load_model(args)
    if loaded.directory is None:
        raise Dsv3Error("dsv3 eval identity needs a trained model with its tokenizer; give --model DIR")
    template = ChatTemplate.from_config(loaded.tokenizer.config or {})
    engine = Engine(loaded.model, loaded.tokenizer, ServingConfig(max_batch=args.max_batch))
    answers = ask(engine, loaded.tokenizer, template, prompts, args.samples, params)
    report = tally(prompts, answers, Judge(args.identity, args.creator), examples=args.examples)
    if args.json:
        json.dump(report, sys.stdout, ensure_ascii=False, indent=1)
        print()
        return 0
    print(f"{loaded.name}: {len(prompts)} questions x {args.samples} answers at temperature {args.temperature:g}")
    print(table(report))
    for e in report["examples"]:
        print(f"  [{e['language']} {e['verdict']}] {e['prompt']} -> {e['answer'][:100]!r}")
    return 0
