"""`dsv3 generate`: continue a prompt, streaming the text as it is made."""

from __future__ import annotations

import argparse
import sys

from dsv3.commands import options
from dsv3.errors import Dsv3Error

HELP = "continue a prompt with a model (prefill + latent-cache decoding, optional MTP speculation)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    options.add_model(parser)
    options.add_serving(parser)
    options.add_processes(parser)
    options.add_sampling(parser, temperature=0.0)
    parser.add_argument("--stats", action="store_true", help="print prefill and decode tokens/s, the cache's size "
                        "and, when speculating, the MTP acceptance")
    parser.add_argument("prompt", help="the text to continue")


def run(args: argparse.Namespace) -> int:
    if args.nproc is not None:
        from dsv3.commands.launch import launch

        return launch("generate", args.nproc, args.argv)
    loaded = options.load_model(args)
    engine = options.make_engine(args, loaded)
    tok = loaded.tokenizer
    stop_ids = (tok.eos_id,) if tok.eos_id is not None else ()
    params = options.sampling_params(args, stop_ids)
    prompt = tok.encode(options.text_argument(args.prompt, "the prompt"), bos=True)
    try:
        seq = engine.add(prompt, params)
    except ValueError as e:
        raise Dsv3Error(str(e)) from None
    while not seq.done:
        engine.step()
        _, text = seq.take()
        sys.stdout.write(text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    if args.stats:
        s = engine.stats
        decoded = len(seq.tokens) - 1  # the first token comes out of the prefill
        line = (f"prefill: {s.prompt_tokens} tokens in {s.prefill_time * 1e3:.0f} ms; decode: {decoded} tokens at "
                f"{decoded / max(s.decode_time, 1e-9):.1f} tok/s in {s.decode_steps} steps; "
                f"finish: {seq.finish_reason}")
        if s.acceptance is not None:
            line += f"; MTP acceptance {s.acceptance:.1%} ({s.accepted}/{s.drafted})"
            if len(s.draft_proposed) > 1:  # a draft is kept only if the ones before it are: the rates fall with j
                per = zip(s.draft_accepted, s.draft_proposed)
                line += ", by draft position " + ", ".join(f"{j}: {a / p:.1%} ({a}/{p})" for j, (a, p) in
                                                           enumerate(per, start=1))
        cache = engine.cache
        used = engine.pool.peak
        kib = used * cache.block_size * cache.nbytes_per_token() / 2**10
        line += (f"\ncache: {used} block(s) of {cache.block_size} tokens held, {kib:,.1f} KiB ({args.cache_dtype}; "
                 f"the model allows {engine.max_len} tokens)")
        print(line, file=sys.stderr)
    return 0
