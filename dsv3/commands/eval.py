"""`dsv3 eval`: evaluate a model on tasks, without a server.

A task is a file, scored as lm-evaluation-harness scores it (`dsv3.eval.tasks`): perplexity of a text file
or of JSONL {"text"} records, or multiple choice from JSONL {"question", "choices", "answer"} records. Or
it is `identity`: ask the model who it is, in English, Chinese and Hindi, and count the answers that claim
another model, the configured identity, or neither (`dsv3.eval.identity`).
"""

from __future__ import annotations

import argparse
import json
import sys

from dsv3.commands import options

HELP = "evaluate a model: perplexity and multiple choice from local files, or `identity`"
IDENTITY = "identity"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Score a model on local tasks. A TASK is a file: a text file or JSONL {\"text\": ...} records give "
        "perplexity (rolling windows, bits per byte); JSONL {\"question\", \"choices\", \"answer\"} records give "
        "multiple-choice accuracy (each choice scored as \" \" + choice after the question). Numbers equal what "
        "lm-evaluation-harness reports through `dsv3 serve` with max_length set to --max-len. Or TASK is "
        "`identity`: ask who the model is and count the answers.")
    parser.add_argument("tasks", nargs="+", metavar="TASK", help="a .txt or .jsonl task file, or 'identity'")
    options.add_model(parser)
    options.add_serving(parser, max_batch=16)
    parser.add_argument("--json", action="store_true", help="print the results as one JSON document, each item's "
                        "log-likelihoods included")
    identity = parser.add_argument_group("the identity task")
    options.add_sampling(identity, temperature=0.7, max_new_tokens=48, top_p=0.95)
    identity.add_argument("--prompts", metavar="FILE",
                          help="JSONL of {\"prompt\", \"language\"} records (default: 32 built-in questions each "
                               "in en, zh, hi)")
    identity.add_argument("--samples", type=int, default=4, metavar="K",
                          help="answers per question, sample j seeded with --seed + j (default: 4)")
    options.add_identity(identity, "the model's own name", "its maker's name")
    identity.add_argument("--examples", type=int, default=3, help="example answers per verdict and language "
                          "(default: 3)")


def run(args: argparse.Namespace) -> int:
    from dsv3.errors import Dsv3Error, InvalidValue
    from dsv3.eval.tasks import read_task

    files = [t for t in args.tasks if t != IDENTITY]
    tasks = [read_task(path) for path in files]  # every file checked before the model loads
    if IDENTITY in args.tasks and args.samples < 1:
        raise InvalidValue("samples", args.samples, "must be at least 1")
    if args.max_batch < 1:
        raise InvalidValue("max_batch", args.max_batch, "must be at least 1")
    if args.max_len is not None and args.max_len < 3:  # before the model loads: no size makes this one work
        raise InvalidValue("max_len", args.max_len, "must be from 3 to the model's max_position_embeddings")
    loaded = options.load_model(args)
    if loaded.directory is None:
        raise Dsv3Error("dsv3 eval needs a trained model with its tokenizer; give --model DIR")
    max_len = args.max_len or loaded.model.config.max_position_embeddings
    if not 3 <= max_len <= loaded.model.config.max_position_embeddings:
        raise InvalidValue("max_len", max_len, f"must be from 3 to the model's max_position_embeddings="
                           f"{loaded.model.config.max_position_embeddings}")
    results = {"model": loaded.name, "max_len": max_len, "tasks": {}}
    for task in tasks:
        results["tasks"][task.name] = _score(args, loaded, task, max_len)
    if IDENTITY in args.tasks:
        results["identity"] = _identity(args, loaded)
    if args.json:
        json.dump(results, sys.stdout, ensure_ascii=False, indent=1)
        print()
        return 0
    if tasks:
        print(f"{loaded.name}, windows and pairs of at most {max_len - 1} tokens:")
        print(table(results["tasks"]))
    if IDENTITY in args.tasks:
        _print_identity(args, loaded, results["identity"])
    return 0


def _score(args: argparse.Namespace, loaded, task, max_len: int) -> dict:
    from tqdm import tqdm

    from dsv3.eval.tasks import evaluate

    bars = []

    def progress(total: int):
        bars.append(tqdm(total=total, desc=task.name, unit="req", file=sys.stderr, disable=None, leave=False))
        return bars[-1].update

    try:
        return evaluate(loaded.model, loaded.tokenizer, task, max_len, args.max_batch, progress)
    finally:
        for bar in bars:
            bar.close()


METRICS = {"perplexity": ("bits_per_byte", "byte_perplexity", "word_perplexity", "token_perplexity"),
           "multiple-choice": ("acc", "acc_norm")}


def table(results: dict) -> str:
    """One line per task: its name, kind, size and metrics."""
    lines = [f"{'task':<28} {'kind':<16} {'items':>6}  metrics"]
    for name, r in results.items():
        n = r.get("documents", r.get("questions"))
        metrics = "  ".join(f"{m} {r[m]:.4f}" for m in METRICS[r["kind"]])
        lines.append(f"{name:<28} {r['kind']:<16} {n:>6}  {metrics}")
    return "\n".join(lines)


def _identity(args: argparse.Namespace, loaded) -> dict:
    from dsv3.chat_template import ChatTemplate
    from dsv3.eval.identity import Judge, ask, builtin_prompts, read_prompts, tally

    params = options.sampling_params(args, ())  # ask() stops each answer at EOS or a new user turn
    prompts = read_prompts(args.prompts) if args.prompts else builtin_prompts()
    template = ChatTemplate.from_config(loaded.tokenizer.config or {})
    answers = ask(options.make_engine(args, loaded), loaded.tokenizer, template, prompts, args.samples, params)
    report = tally(prompts, answers, Judge(args.identity, args.creator), examples=args.examples)
    return {**report, "questions": len(prompts)}


def _print_identity(args: argparse.Namespace, loaded, report: dict) -> None:
    from dsv3.eval.identity import table as identity_table

    print(f"{loaded.name}: {report['questions']} questions x {args.samples} answers at temperature "
          f"{args.temperature:g}")
    print(identity_table(report))
    for e in report["examples"]:
        print(f"  [{e['language']} {e['verdict']}] {e['prompt']} -> {e['answer'][:100]!r}")
