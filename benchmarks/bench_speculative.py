"""MTP speculative decoding against plain decoding on a trained model: acceptance rate, speedup, same output.

The MTP module drafts one token per step and the model verifies it in the same forward (DeepSeek-V3
reports 85-90% acceptance and 1.8x tokens/s). A random model's MTP module guesses at random, so this needs
the model directory that `dsv3 train` writes. Each prompt is decoded greedily both ways, interleaved, best
of --repeats; the outputs must be identical token for token.

    .venv/bin/python benchmarks/bench_speculative.py --model runs/small
"""

from __future__ import annotations

import argparse
import json

import torch

from dsv3.infer import Engine, SamplingParams
from dsv3.infer.loading import load

PROMPTS = [
    "The",
    "In this module,",
    "def main():",
    "Return a new",
    "This function",
    "import os\n",
    "The following example",
    "class",
]


def decode(loaded, prompts: list[list[int]], params: SamplingParams, speculative: bool, cache_dtype: str):
    engine = Engine(loaded.model, loaded.tokenizer, max_batch=len(prompts), cache_dtype=cache_dtype,
                    speculative=speculative, max_len=max(map(len, prompts)) + params.max_new_tokens + 8)
    return engine.generate(prompts, params), engine.stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, metavar="DIR", help="a model directory written by dsv3 train")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--cache-dtype", choices=["fp32", "bf16", "fp8"], default="fp32")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy (outputs must match)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load(args.model, dtype=args.dtype)
    if not len(loaded.model.mtp):
        raise SystemExit(f"{args.model} has no MTP module to draft with")
    # no stop token: every prompt decodes exactly --new-tokens, so both ways do the same work
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=args.temperature, seed=0)
    print(f"# {args.model}: {args.dtype} weights, {args.cache_dtype} cache, {args.threads} thread(s), "
          f"{args.new_tokens} new tokens per prompt, temperature {args.temperature}, best of {args.repeats}")
    decode(loaded, [loaded.tokenizer.encode("warm up", bos=True)], SamplingParams(max_new_tokens=8), True,
           args.cache_dtype)
    rows = []
    for text in PROMPTS:
        prompt = loaded.tokenizer.encode(text, bos=True)
        best = {False: float("inf"), True: float("inf")}
        for _ in range(args.repeats):
            for speculative in (False, True):
                (seq,), stats = decode(loaded, [prompt], params, speculative, args.cache_dtype)
                best[speculative] = min(best[speculative], stats.decode_time)
                if speculative:
                    spec_seq, acceptance, steps = seq, stats.acceptance, stats.decode_steps
                else:
                    plain_seq = seq
        n = len(plain_seq.tokens) - 1  # decoded after the prefill's token
        row = {"prompt": text, "plain_tok_s": n / best[False], "spec_tok_s": n / best[True],
               "acceptance": acceptance, "spec_steps": steps, "identical": plain_seq.tokens == spec_seq.tokens}
        row["speedup"] = row["spec_tok_s"] / row["plain_tok_s"]
        rows.append(row)
        print(f"{text!r:>26}: plain {row['plain_tok_s']:6.1f} tok/s, speculative {row['spec_tok_s']:6.1f} tok/s "
              f"({row['speedup']:.2f}x), acceptance {acceptance:.1%} in {steps} steps, identical: {row['identical']}",
              flush=True)
    total_plain = len(PROMPTS) / sum(1 / r["plain_tok_s"] for r in rows)  # same token count per prompt
    total_spec = len(PROMPTS) / sum(1 / r["spec_tok_s"] for r in rows)
    mean_acc = sum(r["acceptance"] for r in rows) / len(rows)
    print(f"overall: plain {total_plain:.1f} tok/s, speculative {total_spec:.1f} tok/s = "
          f"{total_spec / total_plain:.2f}x; mean acceptance {mean_acc:.1%}; identical outputs "
          f"{sum(r['identical'] for r in rows)}/{len(rows)}")
    # all prompts as one batch: every step reads most experts anyway, so the second token costs less
    prompts = [loaded.tokenizer.encode(text, bos=True) for text in PROMPTS]
    best = {False: float("inf"), True: float("inf")}
    outputs, acceptance = {}, {}
    for _ in range(args.repeats):
        for speculative in (False, True):
            seqs, stats = decode(loaded, prompts, params, speculative, args.cache_dtype)
            best[speculative] = min(best[speculative], stats.decode_time)
            outputs[speculative], acceptance[speculative] = [s.tokens for s in seqs], stats.acceptance
    batch_acc, same = acceptance[True], outputs[True] == outputs[False]
    n = sum(len(t) - 1 for t in outputs[False])
    batch = {"plain_tok_s": n / best[False], "spec_tok_s": n / best[True], "acceptance": batch_acc, "identical": same}
    batch["speedup"] = batch["spec_tok_s"] / batch["plain_tok_s"]
    print(f"batch of {len(prompts)}: plain {batch['plain_tok_s']:.1f} tok/s, speculative {batch['spec_tok_s']:.1f} "
          f"tok/s = {batch['speedup']:.2f}x; acceptance {batch_acc:.1%}; identical outputs: {same}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows, "batch": batch}, f, indent=2)


if __name__ == "__main__":
    main()
