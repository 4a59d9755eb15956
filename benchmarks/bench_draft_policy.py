"""When MTP drafting pays: plain decoding against speculative decoding with the adaptive draft policy (each
sequence drafts while its acceptance pays for the measured cost of a speculative step) and with drafting on
every step, drafting one token per step or two (MTP module 1 applied twice), at high and at low acceptance,
on a model deep enough that the MTP block is a small share of it.

    .venv/bin/python benchmarks/bench_draft_policy.py                  # 16 layers, trained here in ~1 minute
    .venv/bin/python benchmarks/bench_draft_policy.py --layers 24 --json out.json
    .venv/bin/python benchmarks/bench_draft_policy.py --draft-tokens 2 --policies always

The model (the `tiny` preset's widths, `--layers` deep, vocabulary 512) is trained for a few hundred steps
on a small repeated text, with its MTP module, until both heads have learnt it: prompts from that text give
high acceptance. Lower acceptance comes from the same main model with its MTP module moved part or all of
the way to freshly initialised weights (so plain decoding is the same in every case). Greedy,
batch 1, one thread; each configuration is timed over the same prompts, best of --repeats; the speculative
outputs must equal the plain ones token for token. Acceptance is reported over all drafts and per draft
position (position 2 counts a draft kept only when the first was, over the same steps).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from dsv3 import DeepSeekV3, preset
from dsv3.infer import Engine, SamplingParams
from dsv3.tokenizer import Tokenizer

TEXT = (
    "the router sends every token to two experts and a shared one. "
    "each layer reads the latent cache and writes one row for the new token. "
    "a draft from the prediction module is checked by the model in the same step. "
    "long prompts are split into chunks so that running streams keep moving. "
) * 8


def train(layers: int, steps: int, seed: int) -> tuple[DeepSeekV3, Tokenizer]:
    torch.manual_seed(seed)
    tok = Tokenizer.train([TEXT] * 4, vocab_size=400)
    cfg = preset("tiny").replace(num_hidden_layers=layers)
    model = DeepSeekV3(cfg)
    model.init_weights(std=0.02)
    ids = torch.tensor(tok.encode(TEXT * 2))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    T, B = 64, 8
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - T - 1, (B,))
        x = torch.stack([ids[s : s + T] for s in starts])
        y = torch.stack([ids[s + 1 : s + T + 1] for s in starts])
        out = model.run(x, mtp=True)
        loss = F.cross_entropy(out.logits.flatten(0, 1), y.flatten())
        loss = loss + F.cross_entropy(out.mtp_logits[0].flatten(0, 1), y[:, 1:].flatten())  # t_{i+2}
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), tok


def timed(model, tok, prompts, new_tokens: int, speculative: bool, policy: str, repeats: int, draft_tokens: int = 1):
    """Best decode tokens/s over `repeats` runs of the prompts one at a time, and the last run's sequences."""
    params = SamplingParams(max_new_tokens=new_tokens)  # no stop token: every run decodes all new_tokens
    best, seqs, stats = 0.0, None, None
    for _ in range(repeats):
        engine = Engine(model, tok, cache_dtype="fp32", speculative=speculative, draft_policy=policy,
                        draft_tokens=draft_tokens)
        engine.generate([prompts[0]], SamplingParams(max_new_tokens=4))  # warm-up
        engine.stats = type(engine.stats)()
        seqs = [engine.generate([p], params)[0] for p in prompts]
        rate = sum(len(s.tokens) - 1 for s in seqs) / engine.stats.decode_time
        if rate > best:
            best, stats = rate, engine.stats
    return best, seqs, stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--steps", type=int, default=300, help="training steps (default 300)")
    ap.add_argument("--new-tokens", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--draft-tokens", type=int, nargs="+", default=[1, 2], choices=[1, 2],
                    help="drafts per step to compare (default: 1 2)")
    ap.add_argument("--policies", nargs="+", default=["always", "adaptive"], choices=["always", "adaptive"])
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    model, tok = train(args.layers, args.steps, args.seed)
    print(f"trained {args.layers} layers ({sum(p.numel() for p in model.parameters()):,} parameters) in "
          f"{time.perf_counter() - t0:.0f} s")
    sentences = [s.strip() + "." for s in TEXT.split(".")[:4]]
    prompts = [tok.encode(s[: len(s) // 3], bos=True) for s in sentences]
    trained = {k: v.clone() for k, v in model.mtp.state_dict().items()}
    torch.manual_seed(args.seed + 1)
    fresh = DeepSeekV3(model.config)
    fresh.init_weights(std=0.02)
    noise = fresh.mtp.state_dict()
    # the same main model with its MTP module trained, moved part of the way to a fresh one, or fresh: the
    # acceptance falls from ~95% towards 0 while every plain step stays the same
    cases = {"MTP trained": 0.0, "MTP 3/4 fresh": 0.75, "MTP fresh": 1.0}
    results = {}
    print(f"{'case':<14} {'drafts':>6} {'policy':<9} {'tok/s':>7} {'vs plain':>9} {'acceptance':>10} "
          f"{'by position':>15} {'tok/step':>8} {'stopped':>8}")
    with torch.inference_mode():
        for case, mix in cases.items():
            model.mtp.load_state_dict({k: (1 - mix) * trained[k] + mix * noise[k] for k in trained})
            plain, want, _ = timed(model, tok, prompts, args.new_tokens, False, "adaptive", args.repeats)
            results[case] = {"plain": plain}
            print(f"{case:<14} {'':>6} {'plain':<9} {plain:>7.1f} {'1.00x':>9}")
            for k in args.draft_tokens:
                for policy in args.policies:
                    rate, seqs, stats = timed(model, tok, prompts, args.new_tokens, True, policy, args.repeats, k)
                    assert [s.tokens for s in seqs] == [s.tokens for s in want], "speculation changed greedy output"
                    accept = stats.acceptance or 0.0
                    by_position = [a or 0.0 for a in stats.acceptance_by_position]
                    per_step = sum(len(s.tokens) - 1 for s in seqs) / stats.decode_steps
                    results[case][f"{policy}, {k} draft(s)"] = {
                        "draft_tokens": k, "policy": policy, "tokens_per_s": rate, "speedup": rate / plain,
                        "acceptance": accept, "acceptance_by_position": by_position,
                        "draft_proposed": stats.draft_proposed, "draft_accepted": stats.draft_accepted,
                        "tokens_per_step": per_step, "stopped_drafting": stats.stopped_drafting}
                    positions = " / ".join(f"{a:.0%}" for a in by_position) or "-"
                    print(f"{'':<14} {k:>6} {policy:<9} {rate:>7.1f} {rate / plain:>8.2f}x {accept:>10.1%} "
                          f"{positions:>15} {per_step:>8.2f} {stats.stopped_drafting:>8}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"layers": args.layers, "new_tokens": args.new_tokens, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
