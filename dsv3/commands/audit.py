"""`dsv3 audit`: find text in which the speaker claims to be another model, and write a cleaned copy."""

from __future__ import annotations

import argparse
import json
import sys

from dsv3.commands.options import add_chat_fields, add_identity, chat_fields

HELP = "find (and fix) other models' self-identification in a text or JSONL corpus"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="+", metavar="PATH", help="text (.txt/.md) or JSONL files, or folders of them")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of the summary")
    p.add_argument("--fix", metavar="OUT", help="write a cleaned copy to OUT (a file for one input file, else a "
                   "folder) and a log to OUT.log; the input is never modified")
    add_identity(p, "the name a fix gives the assistant", "the maker a fix names")
    p.add_argument("--format", choices=("auto", "jsonl", "text"), default="auto",
                   help="how to read files (default: by suffix, .jsonl/.ndjson or .txt/.md)")
    p.add_argument("--text-field", default="text", help="JSONL field holding a document (default: text)")
    add_chat_fields(p, "role of the turns to judge")
    p.add_argument("--languages", help="comma-separated language codes to audit (default: all in dsv3/audit/lang)")
    p.add_argument("--examples", type=int, default=3, help="examples shown per pattern in the summary (default: 3)")


def run(args: argparse.Namespace) -> int:
    """Exit status 0 when the corpus is clean or a fixed copy was written, 1 when claims were found."""
    from dsv3.audit import Auditor
    from dsv3.audit.scan import scan

    languages = [c.strip() for c in args.languages.split(",")] if args.languages else None
    auditor = Auditor(identity=args.identity, creator=args.creator, languages=languages)
    fields = chat_fields(args, args.text_field)
    report = scan(args.paths, auditor, fields, args.format, out=args.fix, progress=not args.json)
    if args.json:
        json.dump(report.as_dict(), sys.stdout, ensure_ascii=False, indent=1)
        print()
    else:
        print(report.summary(args.examples))
    return 1 if report.flagged and args.fix is None else 0
