"""The paged latent cache: how many sequences fit a cache budget, prefix reuse, and chunked prefill.

A randomly initialised `small`-preset model (fp32 weights, eval mode, seeds fixed) in the engine, without a
tokenizer, greedy. Three parts:

1. **Capacity.** A budget of --budget cache tokens and a context bound of --max-len. One row of max_len per
   sequence (the cache before paging) holds floor(budget / max_len) sequences, whatever their lengths. The
   paged engine gets `cache_tokens=budget` and a wide batch (256), is given more requests than fit, and
   admits each while the pool can promise it prompt + max_new_tokens in blocks; the most sequences running or
   prefilling at once is read after each step (admission fills the pool in the first step, and no one is
   admitted again until a sequence finishes) until every admitted prompt is prefilled, then all are
   cancelled. The prefill is chunked (1,024 tokens a step) only to keep those steps small: admission does
   not depend on it.
2. **Time to first token with a shared system prompt.** Each prompt is the same --system-tokens random tokens
   and a different 20-token question. Cold: prefix sharing off (a warmed engine, so allocation and first-call
   costs stay out). Warm: prefix sharing on, after one request with the same system prompt. TTFT runs from
   `engine.add` to the step that gives the sequence its first token; cold and warm requests alternate.
3. **Decode steps while a long prompt arrives.** Four sequences decode; then one --long-prompt-token prompt
   is added. Every step from then until the long prompt has its first token, and --after steps more, is
   timed (each gives the four a token). Without chunking one step carries the whole prefill; with
   `prefill_chunk` the prefill is spread over steps of bounded size.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_paged.py --threads 1
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import torch

from dsv3 import DeepSeekV3, preset
from dsv3.infer import Engine, SamplingParams, ServingConfig

MIXES = {  # name: prompt lengths drawn uniformly (each request then generates --new-tokens)
    "chat": (64, 256),
    "mixed": (64, 256, 1024, 3000),
    "long": (1024, 3000),
}


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))]


def tokens(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(vocab) for _ in range(n)]


def capacity(model, args, rng: random.Random) -> list[dict]:
    vocab = model.config.vocab_size
    rows_fit = args.budget // args.max_len
    out = []
    for name, lengths in MIXES.items():
        engine = Engine(model, None, ServingConfig(max_batch=256, max_len=args.max_len, cache_tokens=args.budget,
                                                   cache_dtype=args.cache_dtype, prefill_chunk=1024))
        params = SamplingParams(max_new_tokens=args.new_tokens)
        lens = [rng.choice(lengths) for _ in range(args.requests)]
        seqs = [engine.add(tokens(rng, n, vocab), params) for n in lens]
        most = committed = steps = 0
        admitted: set[int] = set()
        while steps < args.capacity_steps or engine.prefilling:  # until every admitted prompt is in the cache
            engine.step()
            steps += 1
            most = max(most, len(engine.running) + len(engine.prefilling))
            committed = max(committed, engine.pool.in_use + engine.promised)
            admitted |= {s.id for s in engine.running + engine.prefilling}
        held = engine.pool.in_use
        admitted_lens = [n for n, s in zip(lens, seqs) if s.id in admitted]
        for s in seqs:
            engine.cancel(s)
        engine.step()
        row = {"mix": name, "lengths": list(lengths), "rows_fit": rows_fit, "paged_fit": most,
               "ratio": most / rows_fit, "admitted": len(admitted), "steps": steps,
               "mean_admitted_prompt": statistics.mean(admitted_lens), "blocks_promised": committed,
               "blocks_held_prefilled": held, "blocks_held_peak": engine.pool.peak,
               "pool_blocks": engine.pool.n_blocks - 1, "block_size": engine.block_size}
        out.append(row)
        print(f"capacity {name:>5} {lengths}: rows {rows_fit}, paged {most} ({row['ratio']:.1f}x); mean admitted "
              f"prompt {row['mean_admitted_prompt']:.0f}; blocks promised {committed} of {row['pool_blocks']}, "
              f"held once all prefilled {held} (step {steps}), peak {engine.pool.peak}", flush=True)
    return out


def first_token(engine: Engine, prompt: list[int], params: SamplingParams) -> float:
    """Seconds from `add` to the step that gives the sequence its first token; the sequence is then cancelled."""
    t0 = time.perf_counter()
    seq = engine.add(prompt, params)
    while not seq.tokens:
        engine.step()
    elapsed = time.perf_counter() - t0
    engine.cancel(seq)
    engine.step()
    return elapsed


def ttft(model, args, rng: random.Random) -> dict:
    vocab = model.config.vocab_size
    system = tokens(rng, args.system_tokens, vocab)
    questions = [tokens(rng, 20, vocab) for _ in range(args.questions + 1)]
    params = SamplingParams(max_new_tokens=16)
    config = ServingConfig(max_batch=4, max_len=args.max_len, cache_dtype=args.cache_dtype)
    cold = Engine(model, None, config, prefix_cache=False)
    warm = Engine(model, None, config, prefix_cache=True)
    first_token(cold, tokens(rng, len(system) + 20, vocab), params)  # warm-up: storage and first calls
    first_token(warm, system + questions[0], params)  # the request that caches the system prompt
    hits, looked = warm.stats.prefix_hit_tokens, warm.stats.prefix_lookup_tokens
    cold_s, warm_s = [], []
    for q in questions[1:]:
        cold_s.append(first_token(cold, system + q, params))
        warm_s.append(first_token(warm, system + q, params))
    hit_rate = (warm.stats.prefix_hit_tokens - hits) / (warm.stats.prefix_lookup_tokens - looked)
    row = {"system_tokens": len(system), "question_tokens": 20, "questions": args.questions,
           "cold_ms": [t * 1e3 for t in cold_s], "warm_ms": [t * 1e3 for t in warm_s],
           "cold_median_ms": statistics.median(cold_s) * 1e3, "warm_median_ms": statistics.median(warm_s) * 1e3,
           "hit_rate": hit_rate, "hit_rate_with_first": warm.stats.prefix_hit_rate}
    row["ratio"] = row["cold_median_ms"] / row["warm_median_ms"]
    print(f"ttft: cold {row['cold_median_ms']:.1f} ms, warm {row['warm_median_ms']:.1f} ms (median of "
          f"{args.questions}), {row['ratio']:.1f}x; hit rate {hit_rate:.1%} of the warm prompts' tokens "
          f"({warm.stats.prefix_hit_rate:.1%} with the first request)", flush=True)
    return row


def arrival(model, chunk: int | None, args, rng: random.Random) -> dict:
    """Four decoding sequences, then one long prompt: the step times from its arrival to --after steps past its
    first token, the steps it took to reach that token, and its time to first token."""
    vocab = model.config.vocab_size
    engine = Engine(model, None, ServingConfig(max_batch=8, max_len=args.max_len, cache_dtype=args.cache_dtype,
                                               prefill_chunk=chunk))
    shorts = [engine.add(tokens(rng, 32, vocab), SamplingParams(max_new_tokens=args.max_len - 64))
              for _ in range(4)]
    engine.step()  # their prefill
    before = []
    for _ in range(args.before):
        t0 = time.perf_counter()
        engine.step()
        before.append(time.perf_counter() - t0)
    t_add = time.perf_counter()
    long = engine.add(tokens(rng, args.long_prompt, vocab), SamplingParams(max_new_tokens=args.after + 1))
    steps, to_first, long_ttft, after = [], None, None, 0
    while after < args.after:
        counts = [len(s.tokens) for s in shorts]
        t0 = time.perf_counter()
        engine.step()
        elapsed = time.perf_counter() - t0
        if all(len(s.tokens) > c for s, c in zip(shorts, counts)):  # a step in which the four got a token
            steps.append(elapsed)
        if to_first is None and long.tokens:
            to_first, long_ttft = len(steps), time.perf_counter() - t_add
        elif to_first is not None:
            after += 1
    assert len(steps) == to_first + args.after, "a short sequence missed a token"
    return {"chunk": chunk, "steps": steps, "before": before, "steps_to_first": to_first, "long_ttft": long_ttft}


def chunked(model, args, rng: random.Random) -> list[dict]:
    chunks = [int(c) or None for c in args.chunks.split(",")]
    runs = {c: [] for c in chunks}
    for _ in range(args.repeats):  # alternate the settings, so load from other work falls on all of them
        for c in chunks:
            runs[c].append(arrival(model, c, args, rng))
    out = []
    for c, rs in runs.items():
        steps = [t for r in rs for t in r["steps"]]
        before = [t for r in rs for t in r["before"]]
        row = {"chunk": c, "repeats": len(rs), "steps_timed": len(steps),
               "p50_ms": percentile(steps, 50) * 1e3, "p99_ms": percentile(steps, 99) * 1e3,
               "max_ms": max(steps) * 1e3, "before_p50_ms": percentile(before, 50) * 1e3,
               "steps_to_first": [r["steps_to_first"] for r in rs],
               "long_ttft_s": statistics.median(r["long_ttft"] for r in rs),
               # the steps that carried the prefill: the first chunk's, and the last's (which attends to the most)
               "first_prefill_step_ms": statistics.median(r["steps"][0] for r in rs) * 1e3,
               "last_prefill_step_ms": statistics.median(r["steps"][r["steps_to_first"] - 1] for r in rs) * 1e3,
               "runs": rs}
        out.append(row)
        print(f"arrival of {args.long_prompt} tokens, prefill_chunk {c}: step p50 {row['p50_ms']:.1f} ms, p99 "
              f"{row['p99_ms']:.1f} ms, max {row['max_ms']:.1f} ms over {len(steps)} steps (decode alone: p50 "
              f"{row['before_p50_ms']:.1f} ms); {row['steps_to_first']} steps to its first token, TTFT "
              f"{row['long_ttft_s']:.2f} s (median); prefill steps: first {row['first_prefill_step_ms']:.0f} ms, "
              f"last {row['last_prefill_step_ms']:.0f} ms", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache-dtype", choices=["fp32", "bf16", "fp8"], default="fp32")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budget", type=int, default=16384, help="cache tokens for the capacity part")
    ap.add_argument("--max-len", type=int, default=4096, help="context bound (at most the model's)")
    ap.add_argument("--new-tokens", type=int, default=128, help="max_new_tokens of the capacity requests")
    ap.add_argument("--requests", type=int, default=256, help="requests offered per mix")
    ap.add_argument("--capacity-steps", type=int, default=3)
    ap.add_argument("--system-tokens", type=int, default=1000)
    ap.add_argument("--questions", type=int, default=5)
    ap.add_argument("--long-prompt", type=int, default=4000)
    ap.add_argument("--chunks", default="0,256,512", help="prefill_chunk settings (0: whole prompts)")
    ap.add_argument("--before", type=int, default=5, help="decode steps before the long prompt arrives")
    ap.add_argument("--after", type=int, default=16, help="steps timed after the long prompt's first token")
    ap.add_argument("--repeats", type=int, default=5, help="runs of part 3 per setting, alternated")
    ap.add_argument("--quick", action="store_true", help="a fast smoke run: small sizes, one repeat")
    ap.add_argument("--json", metavar="OUT", help="also write the results here")
    args = ap.parse_args()
    if args.quick:
        args.budget, args.requests, args.capacity_steps, args.questions = 8192, 64, 1, 2
        args.system_tokens, args.long_prompt, args.chunks = 256, 1000, "0,256"
        args.before, args.after, args.repeats = 2, 3, 1
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    cfg = preset(args.preset)
    if args.max_len > cfg.max_position_embeddings:
        raise SystemExit(f"--max-len {args.max_len} exceeds the {args.preset} preset's context of "
                         f"{cfg.max_position_embeddings}")
    if args.long_prompt + args.after + 1 > args.max_len:
        raise SystemExit(f"--long-prompt {args.long_prompt} and its {args.after + 1} new tokens exceed --max-len")
    model = DeepSeekV3(cfg)
    model.init_weights()
    model = model.float().eval()
    rng = random.Random(args.seed)
    print(f"# {args.preset} preset (random weights), fp32 weights, {args.cache_dtype} cache, {args.threads} "
          f"thread(s), block size {ServingConfig().block_size}", flush=True)
    t0 = time.perf_counter()
    result = {"args": vars(args), "capacity": capacity(model, args, rng), "ttft": ttft(model, args, rng),
              "chunked_prefill": chunked(model, args, rng)}
    print(f"# {time.perf_counter() - t0:.0f} s in all")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
