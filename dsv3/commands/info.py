"""`dsv3 info`: what a model costs to hold and to run, computed from its config alone."""

from __future__ import annotations

import argparse
import json

from dsv3.commands import options
from dsv3.config import ModelConfig
from dsv3.errors import InvalidValue

HELP = "parameters, active parameters, cache bytes and FLOPs of a model (no weights are allocated)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    options.add_config_source(parser)
    parser.add_argument("--seq-len", type=int, default=4096, help="sequence length for the FLOPs (default 4096)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def summarize(cfg: ModelConfig, seq_len: int) -> dict[str, int | float]:
    from dsv3.flops import flops_per_token
    from dsv3.inventory import count_parameters, naive_cache_bytes_per_token
    from dsv3.model.cache import bytes_per_token

    counts = count_parameters(cfg)
    absorbed, naive = bytes_per_token(cfg, "bf16"), naive_cache_bytes_per_token(cfg)
    return {
        "total_params": counts.total,
        "active_params": counts.active,
        "active_params_with_embedding": counts.active_with_embedding,
        "mtp_params": counts.mtp,
        "total_with_mtp_params": counts.total + counts.mtp,
        "cache_bytes_per_token_absorbed_bf16": absorbed,
        "cache_bytes_per_token_naive_bf16": naive,
        "forward_flops_per_token": flops_per_token(cfg, seq_len).total,
        "seq_len": seq_len,
    }


def run(args: argparse.Namespace) -> int:
    if args.seq_len < 1:
        raise InvalidValue("seq_len", args.seq_len, "must be a positive integer")
    name, cfg = options.config_from_args(args)
    s = summarize(cfg, args.seq_len)
    if args.json:
        print(json.dumps(s, indent=2))
        return 0
    rows = [
        ("total parameters (main model)", f"{s['total_params']:,}"),
        ("active parameters per token", f"{s['active_params']:,}  (excluding the embedding)"),
        ("", f"{s['active_params_with_embedding']:,}  (including the embedding)"),
        (f"MTP parameters ({cfg.num_nextn_predict_layers} module(s))", f"{s['mtp_params']:,}"),
        ("main + MTP", f"{s['total_with_mtp_params']:,}"),
        ("KV cache per token, absorbed (bf16)", f"{s['cache_bytes_per_token_absorbed_bf16']:,} bytes"),
        ("KV cache per token, naive (bf16)", f"{s['cache_bytes_per_token_naive_bf16']:,} bytes"),
        (f"forward FLOPs per token (seq {args.seq_len})", f"{s['forward_flops_per_token']:,.0f}"),
    ]
    print(
        f"{name}: {cfg.num_hidden_layers} layers, d={cfg.hidden_size}, {cfg.n_routed_experts} routed experts "
        f"(top-{cfg.num_experts_per_tok}), vocab {cfg.vocab_size}"
    )
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        print(f"  {label:<{width}}  {value}")
    return 0
