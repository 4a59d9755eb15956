"""DeepSeek Sparse Attention on this machine: decode speed against dense MLA, and the two training stages.

decode: one model of the `small` preset's shape with sparse attention (a small index_topk, so that the
crossover shows at contexts a CPU can hold) against the very same weights without the indexers (dense MLA).
Each prompt is prefilled in chunks by the engine (paged cache, absorbed decoding); decode tokens/s is the
engine's decode-step time for --new-tokens tokens at batch 1, best of --repeats, the two interleaved.

    .venv/bin/python benchmarks/bench_dsa.py decode --threads 1 --prompts 1024,4096,16384 --index-topk 256

stages: a dense `small` run on the built-in corpus, then the warm-up stage (indexers only, KL to dense
attention) and the sparse stage from it, as `dsv3 train --init-from --dsa-stage` runs them; the validation
loss of each model (sparse attention for the V3.2 ones) against the dense model it came from, and a dense
run continued for the same steps as the sparse stage, the fair comparison for the sparse stage's loss.

    .venv/bin/python benchmarks/bench_dsa.py stages --dense-steps 400 --warmup-steps 100 --sparse-steps 200
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch

from dsv3 import DeepSeekV3, preset


def decode(args) -> list[dict]:
    from dsv3.infer import Engine, SamplingParams

    torch.set_num_threads(args.threads)
    prompts = [int(p) for p in args.prompts.split(",")]
    longest = max(prompts) + args.new_tokens + 16
    dense_cfg = preset("small").replace(max_position_embeddings=max(longest, 4096))
    sparse_cfg = dense_cfg.with_dsa(index_n_heads=4, index_head_dim=32, index_topk=args.index_topk)
    torch.manual_seed(0)
    sparse = DeepSeekV3(sparse_cfg).eval()
    sparse.init_weights()
    dense = DeepSeekV3(dense_cfg).eval()
    missing, unexpected = dense.load_state_dict(sparse.state_dict(), strict=False)
    assert not missing and all(".indexer." in k for k in unexpected)
    print(f"# small preset, fp32, {args.threads} thread(s), batch 1, {args.new_tokens} decoded tokens, best of "
          f"{args.repeats}; sparse attention keeps {args.index_topk} keys (4 indexer heads of 32)")

    def run(model, ids):
        engine = Engine(model, max_batch=1, max_len=len(ids) + args.new_tokens + 8, cache_dtype="fp32",
                        prefill_chunk=args.chunk)
        engine.generate([ids], SamplingParams(max_new_tokens=args.new_tokens + 1))
        return engine.stats.decode_time / engine.stats.decode_steps

    rows = []
    for n in prompts:
        ids = torch.randint(0, dense_cfg.vocab_size, (n,), generator=torch.Generator().manual_seed(n)).tolist()
        best = {"dense": float("inf"), "dsa": float("inf")}
        for _ in range(args.repeats):
            best["dense"] = min(best["dense"], run(dense, ids))
            best["dsa"] = min(best["dsa"], run(sparse, ids))
        row = {"prompt": n, "dense_tok_s": 1 / best["dense"], "dsa_tok_s": 1 / best["dsa"],
               "dsa_over_dense": best["dense"] / best["dsa"]}
        rows.append(row)
        print(f"prompt {n:>6}: dense MLA {row['dense_tok_s']:7.1f} tok/s, DSA {row['dsa_tok_s']:7.1f} tok/s, "
              f"{row['dsa_over_dense']:.2f}x", flush=True)
    return rows


def stages(args) -> dict:
    from dsv3.train import TrainConfig, train

    root = args.out or tempfile.mkdtemp(prefix="bench-dsa-")
    common = dict(seq_len=256, batch_size=8, eval_windows=args.eval_windows, samples=0, tensorboard=False,
                  save_every=10_000, log_every=50, data_dir=args.data_dir)
    log = print if args.verbose else (lambda _: None)

    def run(name, **kw):
        out = os.path.join(root, name)
        cfg = TrainConfig(out=out, overwrite=True, eval_every=kw["max_steps"], **common, **kw)
        start = time.perf_counter()
        summary = train(cfg, log=log, progress=False).summary
        print(f"{name}: {kw['max_steps']} steps in {time.perf_counter() - start:.0f} s, val loss "
              f"{summary.val_loss:.4f}", flush=True)
        return out, summary.val_loss

    dense, dense_loss = run("dense", preset="small", max_steps=args.dense_steps)
    tokenizer = os.path.join(dense, "tokenizer.json")
    start = dict(model_config=dense, init_from=dense, tokenizer=tokenizer, schedule="cosine")
    fresh_loss = run("fresh-indexers", **start, dsa_stage="warmup", lr=1e-12, max_steps=1)[1]
    warm, warm_loss = run("warmup", **start, dsa_stage="warmup", lr=args.warmup_lr, max_steps=args.warmup_steps)
    sparse_start = dict(start, model_config=warm, init_from=warm)
    _, sparse_loss = run("sparse", **sparse_start, dsa_stage="sparse", lr=args.lr, max_steps=args.sparse_steps)
    _, control_loss = run("dense-continued", **start, lr=args.lr, max_steps=args.sparse_steps)
    result = {"dense": dense_loss, "fresh_indexers_sparse": fresh_loss, "after_warmup_sparse": warm_loss,
              "after_sparse_stage": sparse_loss, "dense_continued": control_loss}
    print(json.dumps(result, indent=2))
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    d = sub.add_parser("decode")
    d.add_argument("--threads", type=int, default=1)
    d.add_argument("--prompts", default="1024,4096,16384")
    d.add_argument("--index-topk", type=int, default=256)
    d.add_argument("--new-tokens", type=int, default=32)
    d.add_argument("--chunk", type=int, default=1024, help="prompt tokens prefilled per engine step")
    d.add_argument("--repeats", type=int, default=2)
    s = sub.add_parser("stages")
    s.add_argument("--dense-steps", type=int, default=400)
    s.add_argument("--warmup-steps", type=int, default=100)
    s.add_argument("--sparse-steps", type=int, default=200)
    s.add_argument("--warmup-lr", type=float, default=1e-3)
    s.add_argument("--lr", type=float, default=3e-4, help="the sparse stage's and the dense control's peak rate")
    s.add_argument("--eval-windows", type=int, default=64)
    s.add_argument("--data-dir", default="data")
    s.add_argument("--out", help="keep the runs here (default: a temporary folder)")
    s.add_argument("--verbose", action="store_true")
    for p in (d, s):
        p.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    result = decode(args) if args.what == "decode" else stages(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
