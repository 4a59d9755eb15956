"""Decode speed and cache size: dsv3's engine against transformers' `generate`, on the same weights, in one run.

A randomly initialised model of the `small` preset's shape (all V3 mechanisms on) is saved with
`save_pretrained` and loaded back by `transformers.AutoModelForCausalLM`, so both decode the very same
weights. Decode tokens/s excludes the prefill: for transformers it is the time from its first new token to
its last (a stopping criterion notes each one), per N tokens; for dsv3, the engine's decode-step time. Each
case runs --repeats times, the two implementations interleaved, and the best time counts (the least
disturbed by other load on the machine).
Cache bytes per token are read from the cache objects themselves after a generation.

    .venv/bin/python benchmarks/bench_decode.py --threads 1 --dtype fp32
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings

import torch

from dsv3 import DeepSeekV3, preset, save_pretrained
from dsv3.infer import Engine, SamplingParams

CASES = "1x32,1x1024,8x32,1x4096"  # batch x prompt tokens
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def load_transformers(directory: str, dtype: torch.dtype):
    try:
        import transformers
    except ImportError:
        raise SystemExit("this benchmark compares against transformers: pip install 'transformers>=5'") from None
    transformers.logging.set_verbosity_error()
    return transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).eval()


class _Clock:
    """A stopping criterion that never stops and notes when each new token was made."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids, scores, **kwargs):
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


def hf_decode(hf, ids: torch.Tensor, n: int) -> tuple[float, list[list[int]], object]:
    """Seconds to decode n tokens after the first (greedy), the tokens, and the cache object. The clock runs from
    the first new token (which ends the prefill) to the last, so the prefill's own variance stays out."""
    from transformers import StoppingCriteriaList

    clock = _Clock()
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None, return_dict_in_generate=True)
    with torch.inference_mode():
        out = hf.generate(ids, max_new_tokens=n + 1, min_new_tokens=n + 1,
                          stopping_criteria=StoppingCriteriaList([clock]), **kw)
    return clock.times[-1] - clock.times[0], out.sequences[:, ids.shape[1] :].tolist(), out.past_key_values


def ours_decode(model, ids: torch.Tensor, n: int, cache_dtype: str) -> tuple[float, list[list[int]], Engine]:
    engine = Engine(model, max_batch=ids.shape[0], max_len=ids.shape[1] + n + 8, cache_dtype=cache_dtype)
    seqs = engine.generate(ids.tolist(), SamplingParams(max_new_tokens=n + 1))
    return engine.stats.decode_time, [s.tokens for s in seqs], engine


def hf_cache_bytes_per_token(cache, batch: int) -> float:
    """Bytes per token per sequence held by a transformers cache (its keys and values, every layer)."""
    total, seq_len = 0, None
    for layer in cache.layers:
        total += layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
        seq_len = layer.keys.shape[-2]
    return total / (batch * seq_len)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="weights (and cache) dtype for both")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cases", default=CASES, help=f"comma-separated BATCHxPROMPT cases (default: {CASES})")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cases = [tuple(int(v) for v in c.split("x")) for c in args.cases.split(",")]
    # room for the longest prompt and its new tokens (the context limit changes no weight and no YaRN frequency)
    longest = max(p for _, p in cases) + args.new_tokens + 8
    cfg = preset(args.preset)
    cfg = cfg.replace(max_position_embeddings=max(cfg.max_position_embeddings, longest))
    model = DeepSeekV3(cfg)
    model.init_weights()
    model = model.to(DTYPES[args.dtype]).eval()
    directory = tempfile.mkdtemp(prefix="bench-decode-")
    save_pretrained(model, directory)
    hf = load_transformers(directory, DTYPES[args.dtype])
    n = args.new_tokens
    print(f"# {args.preset} preset, {args.dtype} weights and cache, {args.threads} thread(s), {n} decoded tokens, "
          f"best of {args.repeats}")
    rows = []
    for batch, prompt_len in cases:
        ids = torch.randint(0, cfg.vocab_size, (batch, prompt_len), generator=torch.Generator().manual_seed(prompt_len))
        hf_decode(hf, ids, 2)  # warm-up
        ours_decode(model, ids, 2, args.dtype)
        hf_best = ours_best = float("inf")
        for _ in range(args.repeats):
            t_hf, hf_tokens, hf_cache = hf_decode(hf, ids, n)
            t_ours, our_tokens, engine = ours_decode(model, ids, n, args.dtype)
            hf_best, ours_best = min(hf_best, t_hf), min(ours_best, t_ours)
        agree = sum(a == b for x, y in zip(hf_tokens, our_tokens) for a, b in zip(x, y)) / (batch * (n + 1))
        row = {
            "batch": batch,
            "prompt": prompt_len,
            "hf_tok_s": batch * n / hf_best,
            "ours_tok_s": batch * n / ours_best,
            "same_greedy_tokens": agree,
            "hf_cache_bytes_per_token": hf_cache_bytes_per_token(hf_cache, batch),
            "ours_cache_bytes_per_token": engine.cache.nbytes_per_token(),
        }
        row["speedup"] = row["ours_tok_s"] / row["hf_tok_s"]
        rows.append(row)
        print(f"batch {batch:>2} prompt {prompt_len:>4}: transformers {row['hf_tok_s']:7.1f} tok/s, dsv3 "
              f"{row['ours_tok_s']:7.1f} tok/s, {row['speedup']:.2f}x; greedy tokens identical: {agree:.0%}",
              flush=True)

    layers = cfg.num_hidden_layers
    formula = {d: (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * layers * DTYPES[d].itemsize for d in DTYPES}
    sizes = {d: Engine(model, max_batch=1, max_len=8, cache_dtype=d).cache.nbytes_per_token() for d in DTYPES}
    sizes["fp8"] = Engine(model, max_batch=1, max_len=8, cache_dtype="fp8").cache.nbytes_per_token()
    hf_bytes = rows[0]["hf_cache_bytes_per_token"]
    print(f"cache bytes per token ({layers} layers): transformers ({args.dtype}) {hf_bytes:.0f}; dsv3 fp32 "
          f"{sizes['fp32']} (formula {formula['fp32']}), bf16 {sizes['bf16']} (formula {formula['bf16']}), "
          f"fp8 {sizes['fp8']} = {sizes['fp8'] / sizes['bf16']:.3f}x bf16")
    v3 = preset("v3")
    from dsv3.model.cache import new_cache

    v3_bf16 = new_cache(v3, 1, 1, "bf16", n_layers=v3.num_hidden_layers).nbytes_per_token()
    v3_fp8 = new_cache(v3, 1, 1, "fp8", n_layers=v3.num_hidden_layers).nbytes_per_token()
    print(f"at V3's dims (61 layers): bf16 {v3_bf16} bytes/token ({v3_bf16 // 61} per layer), fp8 {v3_fp8} "
          f"({v3_fp8 // 61} per layer) = {v3_fp8 / v3_bf16:.3f}x")
    assert sizes["fp32"] == formula["fp32"] and sizes["bf16"] == formula["bf16"] and v3_fp8 <= 0.6 * v3_bf16
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows, "cache": {"hf": hf_bytes, **sizes}}, f, indent=2)


if __name__ == "__main__":
    main()
