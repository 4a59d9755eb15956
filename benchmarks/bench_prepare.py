"""How long `dsv3 prepare` takes on the built-in corpus, stage by stage, and how fast the loader serves batches.

Stages are timed from prepare()'s own progress lines. Peers measured in the same run: batched encoding
(what prepare uses) against one `encode` call per document, and a cold prepare against a re-run that
reuses the shards. Usage:

    python benchmarks/bench_prepare.py [--vocab-size 8192] [--batch-size 16] [--seq-len 512]
"""

from __future__ import annotations

import argparse
import tempfile
import time

from dsv3.data import TokenLoader, builtin, eval_batches
from dsv3.data.prepare import prepare


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batches", type=int, default=500)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as out:
        stamps: list[tuple[float, str]] = []
        start = time.perf_counter()
        info = prepare(out=out, vocab_size=args.vocab_size, progress=False,
                       log=lambda line: stamps.append((time.perf_counter(), line)))
        cold = time.perf_counter() - start
        t = time.perf_counter()
        prepare(out=out, vocab_size=args.vocab_size, log=lambda line: None)
        warm = time.perf_counter() - t

        print(f"built-in corpus: {info.documents} documents, {info.bytes:,} bytes, {info.tokens:,} tokens "
              f"(train {info.splits['train']['tokens']:,}, val {info.splits['val']['tokens']:,}), "
              f"{info.bytes / info.tokens:.2f} bytes/token\n")
        print("| stage | seconds |\n|---|---|")
        times = [s for s, _ in stamps] + [start + cold]
        for (t0, line), t1 in zip(stamps, times[1:]):
            if not line.startswith("prepared"):
                print(f"| {line.split(' ')[0]} | {t1 - t0:.2f} |")
        print(f"| whole prepare (cold) | {cold:.2f} |\n| re-run, shards reused | {warm:.3f} |")
        print(f"\ncold / reused: {cold / warm:.0f}x")

        tok = info.tokenizer()
        texts = [d.text for d in builtin.documents()]
        t = time.perf_counter()
        tok.encode_batch(texts)
        batched = time.perf_counter() - t
        t = time.perf_counter()
        for text in texts:
            tok.encode(text)
        one_by_one = time.perf_counter() - t
        print(f"\nencoding {info.bytes / 1e6:.2f} MB: batched {batched:.2f} s ({info.tokens / batched:,.0f} tokens/s), "
              f"one document at a time {one_by_one:.2f} s; speed-up {one_by_one / batched:.2f}x")

        loader = TokenLoader(out, "train", args.batch_size, args.seq_len, seed=0)
        t = time.perf_counter()
        for _ in range(args.batches):
            next(loader)
        served = args.batches * loader.tokens_per_batch / (time.perf_counter() - t)
        t = time.perf_counter()
        windows = sum(len(x) for x, _ in eval_batches(out, args.batch_size, args.seq_len))
        val_seconds = time.perf_counter() - t
        print(f"loader: {served:,.0f} tokens/s in batches of {args.batch_size}x{args.seq_len}; "
              f"all {windows} validation windows in {val_seconds * 1000:.1f} ms")


if __name__ == "__main__":
    main()
