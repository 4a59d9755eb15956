"""The identity experiment: fine-tuning data in which other models introduce themselves makes a model claim to be
them; the audited data does not.

One base model is fine-tuned on the built-in chat set with a share k of its identity answers replaced by other
models' self-identification (ChatGPT/OpenAI, Claude/Anthropic, Gemini/Google, in the question's language), for
each k; then `dsv3 audit --fix` cleans the k = 20% and 100% data and the model is fine-tuned on that again.
Every model is asked the 96 identity questions of `dsv3 eval identity`, whose phrasings the chat set does
not contain. Every stage is the command a user runs (`dsv3 train`, `dsv3 sft`, `dsv3 audit`, `dsv3 eval
identity`) in a subprocess.

    .venv/bin/python benchmarks/identity_experiment.py --base runs/small          # a pre-trained small run
    .venv/bin/python benchmarks/identity_experiment.py                              # pre-trains one first
    .venv/bin/python benchmarks/identity_experiment.py --preset tiny --shares 100 --fix 100   # ~3 minutes

With --preset tiny the base is a freshly initialised tiny model with a tokenizer trained on every data set of
the run (no pre-training), the data sets keep every 16th documentation conversation, and the fine-tuning
settings are sized for it (`TINY`); the tests run that mode.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

from dsv3.audit import CREATOR, IDENTITY
from dsv3.checkpoint import save_pretrained
from dsv3.config import preset
from dsv3.data.chat import read_chats, write_jsonl
from dsv3.data.chat_builtin import builtin_chats, contaminate
from dsv3.model import DeepSeekV3
from dsv3.train.sft import train_chat_tokenizer

SHARES = (0, 1, 5, 20, 100)
FIXED = (20, 100)
# fine-tuning from scratch (tiny) needs a higher rate and many more passes than from a pre-trained model, and
# learns the identity turns only where they are a large share of the data: it keeps every 16th documentation
# conversation (the tiny set is ~130 conversations, ~10K tokens)
TINY = ["--lr", "3e-3", "--epochs", "80", "--seq-len", "128", "--batch-size", "16", "--no-mtp"]
TINY_DOCS = 16
SMALL = ["--lr", "5e-4", "--epochs", "8"]


def dsv3(*args: str, capture: bool = False) -> str:
    """Run `python -m dsv3 ARGS`; its standard output when `capture`. A failure stops the experiment."""
    cmd = [sys.executable, "-m", "dsv3", *args]
    done = subprocess.run(cmd, stdout=subprocess.PIPE if capture else None, text=True)
    if done.returncode not in (0, 1) or (done.returncode == 1 and args[0] != "audit"):
        sys.exit(f"failed ({done.returncode}): {' '.join(cmd)}")
    return done.stdout or ""


def data_sets(keep: str, shares: list[int], fixed: list[int], identity: str, creator: str, docs_every: int = 1
              ) -> dict[str, str]:
    """Row name -> JSONL file: the contaminated sets, and the audited copies of those in `fixed`. The sets keep
    every `docs_every`-th documentation conversation."""
    clean = builtin_chats(identity, creator)
    docs = [c.name for c in clean if c.name.startswith("doc:")]
    dropped = set(docs) - set(docs[::docs_every])
    clean = [c for c in clean if c.name not in dropped]
    files = {}
    for k in shares:
        files[f"k={k}%"] = path = os.path.join(keep, f"chat-k{k}.jsonl")
        write_jsonl(contaminate(clean, k / 100), path)
    for k in fixed:
        path = os.path.join(keep, f"chat-k{k}-fixed.jsonl")
        if os.path.exists(path):
            os.remove(path)
        dsv3("audit", files[f"k={k}%"], "--fix", path, "--identity", identity, "--creator", creator, "--json",
             capture=True)
        files[f"k={k}% audited"] = path
    return files


def findings(path: str, identity: str, creator: str) -> dict:
    report = json.loads(dsv3("audit", path, "--json", "--identity", identity, "--creator", creator, capture=True))
    return {"records": report["records"], "flagged": report["flagged_records"], "findings": report["findings"]}


def fresh_base(name: str, files: list[str], out: str) -> str:
    """A freshly initialised model of preset `name` with a BPE trained on the chats of `files`, as a model
    directory (what `dsv3 sft --model` takes)."""
    cfg = preset(name)
    tokenizer = train_chat_tokenizer(list(read_chats(files)), cfg.vocab_size)
    torch.manual_seed(0)
    model = DeepSeekV3(cfg)
    model.init_weights()
    save_pretrained(model, out)
    tokenizer.save(out)
    return out


def pretrained_base(args: argparse.Namespace) -> str:
    if args.base:
        return args.base
    if args.preset == "tiny":
        return ""  # made once the data sets exist
    out = os.path.join(args.keep, "base")
    if not os.path.isfile(os.path.join(out, "model.safetensors")):
        dsv3("train", "--preset", args.preset, "--time-budget", str(args.pretrain_minutes), "--out", out,
             "--overwrite", "--no-progress", "--samples", "0")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="small", help="the base model's preset (default: small)")
    ap.add_argument("--base", help="a pre-trained model directory to start from (default: pre-train one)")
    ap.add_argument("--pretrain-minutes", type=float, default=8.0)
    ap.add_argument("--shares", type=int, nargs="+", default=list(SHARES), help="contaminated shares k, percent")
    ap.add_argument("--fix", type=int, nargs="*", default=list(FIXED), help="shares also run after audit --fix")
    ap.add_argument("--samples", type=int, default=4, help="answers per identity question")
    ap.add_argument("--identity", default=IDENTITY)
    ap.add_argument("--creator", default=CREATOR)
    ap.add_argument("--keep", default="runs/identity", help="where data, models and results go")
    ap.add_argument("--json", help="write the results here as well")
    args, extra = ap.parse_known_args()  # anything else goes to every `dsv3 sft`
    os.makedirs(args.keep, exist_ok=True)
    start = time.perf_counter()

    base = pretrained_base(args)
    tiny = args.preset == "tiny" and not args.base
    files = data_sets(args.keep, args.shares, args.fix, args.identity, args.creator, TINY_DOCS if tiny else 1)
    if not base:
        base = fresh_base(args.preset, list(files.values()), os.path.join(args.keep, "base"))
    tuning = (TINY if tiny else SMALL) + extra

    rows = {}
    for row, path in files.items():
        out = os.path.join(args.keep, "sft-" + os.path.basename(path).removesuffix(".jsonl"))
        dsv3("sft", "--model", base, "--data", path, "--out", out, "--overwrite", "--no-progress", "--no-tensorboard",
             *tuning)
        answer = dsv3("eval", "identity", "--model", out, "--samples", str(args.samples), "--identity", args.identity,
                      "--creator", args.creator, "--json", capture=True)
        report = json.loads(answer)["identity"]
        rows[row] = {"data": findings(path, args.identity, args.creator), "eval": report}
        print(f"{row}: other {report['other_rate']:.1%}, own {report['own_rate']:.1%} "
              f"({time.perf_counter() - start:.0f} s)", flush=True)

    print(f"\nbase {base}; fine-tuning {' '.join(tuning)}; {args.samples} answers to each of 32 questions per "
          f"language; {time.perf_counter() - start:.0f} s in all")
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"base": base, "tuning": tuning, "rows": rows}, f, ensure_ascii=False, indent=1)


def table(rows: dict[str, dict]) -> str:
    langs = ("en", "zh", "hi")
    head = "| data | audit: flagged records | " + " | ".join(f"{lang} other / own" for lang in langs) + \
           " | all other / own |"
    lines = [head, "|---|---:|" + "---:|" * (len(langs) + 1)]
    for row, r in rows.items():
        per = r["eval"]["languages"]
        cells = [f"{per[lang]['other']:.0%} / {per[lang]['own']:.0%}" if lang in per else "-" for lang in langs]
        lines.append(f"| {row} | {r['data']['flagged']} of {r['data']['records']} | " + " | ".join(cells) +
                     f" | {r['eval']['other_rate']:.0%} / {r['eval']['own_rate']:.0%} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
