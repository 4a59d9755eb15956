"""Decode tokens/s of one model split over 2 processes x 1 thread (tensor + expert parallel, gloo) against
1 process x 2 threads, at batch 1 and 8, on the same cores in the same run.

    .venv/bin/python benchmarks/bench_split.py                 # `small` preset, random weights (seeded)
    .venv/bin/python benchmarks/bench_split.py --hidden 1024   # a wider config

The model is saved once to a temporary directory; the split run loads its slices from it under
`torch.distributed.run`, as `dsv3 generate --nproc 2` does. Tokens/s counts decode steps only (the engine's
decode time), greedy, after one warm-up generation.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from dsv3 import DeepSeekV3, preset, save_pretrained  # noqa: E402
from dsv3.checkpoint import load_pretrained  # noqa: E402
from dsv3.infer import Engine, SamplingParams, ServingConfig  # noqa: E402


def measure(engine: Engine, batch: int, prompt_len: int, new_tokens: int, vocab: int) -> float:
    """Decode tokens/s of `batch` greedy sequences (after a warm-up run)."""
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, vocab, (prompt_len,), generator=g).tolist() for _ in range(batch)]
    params = SamplingParams(max_new_tokens=new_tokens)
    engine.generate(prompts, SamplingParams(max_new_tokens=8))
    before_t, before_n = engine.stats.decode_time, engine.stats.generated_tokens
    engine.generate(prompts, params)
    decoded = engine.stats.generated_tokens - before_n - batch  # each sequence's first token is the prefill's
    return decoded / (engine.stats.decode_time - before_t)


def run_all(engine: Engine, args, vocab: int) -> dict:
    return {str(b): measure(engine, b, args.prompt, args.new_tokens, vocab) for b in (1, 8)}


def split_rank(args) -> None:
    """One rank of the split run (under torch.distributed.run)."""
    import torch.distributed as dist

    from dsv3.parallel import inference, serving

    serving.init()
    torch.set_num_threads(1)
    model = load_pretrained(args.model_dir, "fp32", shard=inference.shard)
    config = ServingConfig(max_batch=8, cache_dtype="fp32")
    if dist.get_rank() != 0:
        serving.follow(serving.Follower(model, None, config))
        return
    engine = serving.Leader(model, None, config)
    result = run_all(engine, args, model.config.vocab_size)
    engine.close()
    with open(args.out, "w") as f:
        json.dump(result, f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, help="hidden size (default: the small preset's)")
    parser.add_argument("--prompt", type=int, default=64, help="prompt tokens (default 64)")
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens generated per sequence (default 128)")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--rank-of", dest="model_dir", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.model_dir:
        return split_rank(args)
    cfg = preset("small")
    if args.hidden:
        cfg = cfg.replace(hidden_size=args.hidden)
    torch.manual_seed(0)
    model = DeepSeekV3(cfg)
    model.init_weights(std=0.05)
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(model, tmp)
        torch.set_num_threads(2)
        one = run_all(Engine(load_pretrained(tmp, "fp32"), None, max_batch=8, cache_dtype="fp32"), args,
                      cfg.vocab_size)
        out = os.path.join(tmp, "split.json")
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        os.path.abspath(__file__), "--rank-of", tmp, "--out", out, "--prompt", str(args.prompt),
                        "--new-tokens", str(args.new_tokens)], env=env, check=True)
        with open(out) as f:
            two = json.load(f)
    print(f"decode tokens/s, hidden {cfg.hidden_size}, {args.prompt}-token prompts, {args.new_tokens} new tokens")
    print(f"{'batch':>5}  {'1 proc x 2 threads':>18}  {'2 procs x 1 thread':>18}  {'split / one':>11}")
    for b in ("1", "8"):
        print(f"{b:>5}  {one[b]:>18.1f}  {two[b]:>18.1f}  {two[b] / one[b]:>10.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"hidden": cfg.hidden_size, "one_process_two_threads": one, "two_processes": two}, f)


if __name__ == "__main__":
    main()
