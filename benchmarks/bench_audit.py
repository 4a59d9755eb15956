"""Throughput of `dsv3 audit` on JSONL, one core, and its precision/recall on the labelled sets.

A synthetic corpus of realistic mixed records is written to a temporary folder: English documents,
chat records, Chinese and Hindi text; about 6% of records mention a model or a company (so the slow
path runs too) and 0.5% contain a claim. Throughput is the audit of that file through the same code
as `dsv3 audit` (read, parse, judge, report), in MB of JSONL per second. The peer, measured in the
same run on the same file, is the floor any JSONL audit pays: reading the lines and `json.loads` on
each.

    .venv/bin/python benchmarks/bench_audit.py            # 100 MB
    .venv/bin/python benchmarks/bench_audit.py --mb 300
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

from dsv3.audit import Auditor
from dsv3.audit.evaluate import evaluate, table
from dsv3.audit.scan import scan

DATA = Path(__file__).parents[1] / "tests" / "data" / "audit"
# eval.jsonl: the labelled set the tests hold to >= 0.95; heldout.jsonl: written after the rules, not tuned on
SETS = [DATA / "eval.jsonl", DATA / "heldout.jsonl"]


def _words(text: str) -> list[str]:
    return text.split()


EN = _words("the of and to in a is that for it as was with be by on not this are from at which but have an they you "
      "were her she there one all we their can has more will about if would what when who so out them time some "
      "could people make like into year your good other than then now look only come its over think also back after "
      "use two how our work first well way even new want because any these give day most us government system "
      "information through development business university students research company program model data training "
      "experts token cache memory attention layer router weights checkpoint cluster budget hours dollars")
ZH = ("的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主"
      "发年动同工也能下过子说产种面而方后多定行学法所民得经")
HI = _words("और के है में की को से एक यह पर भी नहीं था कि हैं जो तो लिए कर गया हो रहा सकता लोग समय काम दिन साल बात देश सरकार "
      "मॉडल डेटा प्रशिक्षण")
MENTIONS = ["I asked ChatGPT about this last week.", "Google released a new version of its search engine.",
            "The Apple store was crowded.", "This meta-analysis covers 40 studies.", "Meta posted record revenue.",
            "Researchers compared Claude and Gemini on long documents.", "Microsoft Copilot is now in Office.",
            "谷歌发布了新的搜索功能。", "OpenAI ने नया मॉडल जारी किया।", "Amazon shipped the order on time."]
CLAIMS = ["I'm ChatGPT, a large language model trained by OpenAI.",
          "As an AI language model developed by OpenAI, I cannot browse the internet.",
          "我是由OpenAI开发的人工智能助手。", "मैं ChatGPT हूँ।", "I was created by Anthropic."]


def _english(rng: random.Random, n_sentences: int) -> str:
    out = []
    for _ in range(n_sentences):
        words = rng.choices(EN, k=rng.randint(8, 25))
        out.append(" ".join(words).capitalize() + rng.choice(".....?!"))
    return " ".join(out)


def _record(rng: random.Random) -> dict:
    r = rng.random()
    if r < 0.55:
        text = _english(rng, rng.randint(3, 40))
    elif r < 0.70:
        text = "".join(rng.choices(ZH, k=rng.randint(100, 1500))) + "。"
    elif r < 0.75:
        text = " ".join(rng.choices(HI, k=rng.randint(30, 400))) + "।"
    else:
        turns = []
        for _ in range(rng.randint(1, 3)):
            turns += [{"role": "user", "content": _english(rng, rng.randint(1, 3))},
                      {"role": "assistant", "content": _english(rng, rng.randint(2, 15))}]
        if rng.random() < 0.06:
            turns[-1]["content"] += " " + rng.choice(MENTIONS)
        if rng.random() < 0.005:
            turns[-1]["content"] = rng.choice(CLAIMS) + " " + turns[-1]["content"]
        return {"id": rng.randrange(10**9), "messages": turns}
    if rng.random() < 0.06:
        text += " " + rng.choice(MENTIONS)
    if rng.random() < 0.005:
        text = rng.choice(CLAIMS) + " " + text
    return {"id": rng.randrange(10**9), "text": text, "source": "synthetic"}


def write_corpus(path: Path, megabytes: float, seed: int = 0) -> int:
    rng = random.Random(seed)
    size = 0
    with open(path, "w", encoding="utf-8") as f:
        while size < megabytes * 1e6:
            line = json.dumps(_record(rng), ensure_ascii=rng.random() < 0.3) + "\n"
            f.write(line)
            size += len(line.encode("utf-8"))
    return size


def peer(path: Path) -> float:
    """Seconds to read every line and json.loads it: the floor of any JSONL audit."""
    start = time.perf_counter()
    with open(path, "rb") as f:
        for line in f:
            json.loads(line)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=100, help="size of the synthetic JSONL file (default 100)")
    args = ap.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one core
    auditor = Auditor()
    for labelled in SETS:
        scores, wrong = evaluate(labelled, auditor)
        print(f"{labelled.parent.name}/{labelled.name}:")
        print(table(scores))
        print("misses and false alarms:", ", ".join(w["id"] for w in wrong) or "none", end="\n\n")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "corpus.jsonl"
        size = write_corpus(path, args.mb)
        peer(path)  # warm the page cache
        t_peer = peer(path)
        start = time.perf_counter()
        report = scan([str(path)], auditor)
        t_audit = time.perf_counter() - start
    mb = size / 1e6
    print(f"corpus: {mb:.0f} MB, {report.records:,} records, {report.texts:,} texts judged, "
          f"{report.flagged_records:,} flagged ({100 * report.flagged_records / report.records:.2f}%)")
    print("| what | seconds | MB/s |\n|---|---:|---:|")
    print(f"| read + json.loads (peer) | {t_peer:.1f} | {mb / t_peer:.0f} |")
    print(f"| dsv3 audit | {t_audit:.1f} | {mb / t_audit:.1f} |")
    print(f"audit / peer time: {t_audit / t_peer:.2f}x")


if __name__ == "__main__":
    main()
