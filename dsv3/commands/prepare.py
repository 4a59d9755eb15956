"""`dsv3 prepare`: turn a corpus into token shards (and a tokenizer) for `dsv3 train`."""

from __future__ import annotations

import argparse

from dsv3.commands import options
from dsv3.data.pack import MIN_VAL_TOKENS
from dsv3.data.prepare import AUDIT_MODES, prepare
from dsv3.errors import Dsv3Error
from dsv3.tokenizer import Tokenizer, check_vocab

HELP = "tokenize a corpus (the built-in one, text files, folders, globs, JSONL) into token shards"
DEFAULT_VOCAB = 8192  # the small preset's vocabulary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sources", nargs="*", metavar="SOURCE",
                        help="text files, folders (recursive), globs, or .jsonl files; none: the built-in corpus "
                             "(Python's documentation topics and standard library)")
    parser.add_argument("--out", default="data", metavar="DIR", help="where the shards go: a new or empty folder, "
                        "or one prepare wrote before (default: data)")
    parser.add_argument("--overwrite", action="store_true", help="replace an --out folder that holds other files")
    parser.add_argument("--vocab-size", type=int, metavar="N",
                        help=f"train a byte-level BPE of N tokens (default: the model's vocab_size with --preset or "
                             f"--config, else {DEFAULT_VOCAB})")
    parser.add_argument("--tokenizer", metavar="PATH",
                        help="use this tokenizer.json (or a folder holding one, e.g. a DeepSeek checkpoint) instead")
    parser.add_argument("--text-field", default="text", metavar="F",
                        help="the field holding each JSONL record's text (default: text)")
    parser.add_argument("--val-fraction", type=float, default=0.01, metavar="X",
                        help=f"share of tokens held out for validation, by whole documents (default: 0.01, "
                             f"at least {MIN_VAL_TOKENS} tokens or a tenth of a small corpus)")
    parser.add_argument("--audit", choices=AUDIT_MODES, default="off",
                        help="check documents with dsv3.audit: refuse to go on if any is flagged, or clean them "
                             "(default: off)")
    options.add_config_source(parser, required=False)
    parser.epilog = "With --preset, --config or --model, the tokenizer is checked to fit the model's vocabulary."


def run(args: argparse.Namespace) -> int:
    if args.tokenizer and args.vocab_size is not None:
        raise Dsv3Error("give --vocab-size (to train a tokenizer) or --tokenizer (to use one), not both")
    source = options.config_from_args(args)
    model = source[1] if source else None
    if model is not None and args.tokenizer:  # fail before tokenizing anything
        check_vocab(Tokenizer.from_file(args.tokenizer), model)
    vocab_size = args.vocab_size if args.vocab_size is not None else model.vocab_size if model else DEFAULT_VOCAB
    info = prepare(args.sources, args.out, vocab_size=vocab_size, tokenizer=args.tokenizer,
                   text_field=args.text_field, val_fraction=args.val_fraction, audit=args.audit,
                   overwrite=args.overwrite)
    if model is not None:
        check_vocab(info, model)
    a = info.audit
    if a.get("mode") == "refuse":
        print(f"audit: {a['documents']} documents checked, none flagged")
    elif a.get("mode") == "clean":
        print(f"audit: {a['documents']} documents checked, {a['changed']} cleaned, {a['dropped']} dropped")
    return 0
