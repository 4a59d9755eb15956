"""`dsv3 eval`: evaluate a model. `dsv3 eval identity` asks it who it is, in English, Chinese and Hindi, and
counts the answers that claim another model, the configured identity, or neither (`dsv3.eval.identity`)."""

from __future__ import annotations

import argparse
import json
import sys

from dsv3.commands import options

HELP = "evaluate a model: `dsv3 eval identity` asks who it is and counts the answers"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    tasks = parser.add_subparsers(dest="task", metavar="TASK", required=True)
    identity = tasks.add_parser("identity", help="ask identity questions, classify the answers with the audit's rules",
                                description="Ask identity questions through the chat template, sample answers, and "
                                            "count those that claim another model or maker, the configured "
                                            "identity, or neither.")
    options.add_model(identity)
    options.add_serving(identity, max_batch=32)
    options.add_sampling(identity, temperature=0.7, max_new_tokens=48, top_p=0.95)
    identity.add_argument("--prompts", metavar="FILE",
                          help="JSONL of {\"prompt\", \"language\"} records (default: 32 built-in questions each "
                               "in en, zh, hi)")
    identity.add_argument("--samples", type=int, default=4, metavar="K",
                          help="answers per question, sample j seeded with --seed + j (default: 4)")
    options.add_identity(identity, "the model's own name", "its maker's name")
    identity.add_argument("--examples", type=int, default=3, help="example answers per verdict and language "
                          "(default: 3)")
    identity.add_argument("--json", action="store_true", help="print the report as one JSON document")


def run(args: argparse.Namespace) -> int:
    from dsv3.chat_template import ChatTemplate
    from dsv3.errors import Dsv3Error, InvalidValue
    from dsv3.eval.identity import Judge, ask, builtin_prompts, read_prompts, table, tally

    if args.samples < 1:
        raise InvalidValue("samples", args.samples, "must be at least 1")
    params = options.sampling_params(args, ())  # ask() stops each answer at EOS or a new user turn
    prompts = read_prompts(args.prompts) if args.prompts else builtin_prompts()
    loaded = options.load_model(args)
    if loaded.directory is None:
        raise Dsv3Error("dsv3 eval identity needs a trained model with its tokenizer; give --model DIR")
    template = ChatTemplate.from_config(loaded.tokenizer.config or {})
    answers = ask(options.make_engine(args, loaded), loaded.tokenizer, template, prompts, args.samples, params)
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
