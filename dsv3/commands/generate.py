"""`dsv3 generate`: continue a prompt, streaming the text as it is made."""

from __future__ import annotations

import argparse
import sys

from dsv3.errors import Dsv3Error

HELP = "continue a prompt with a model (prefill + latent-cache decoding, optional MTP speculation)"


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by generate, chat and serve: which model, in which dtype, with which cache."""
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", metavar="DIR", help="a Hugging Face model directory (config.json + safetensors)")
    src.add_argument("--preset", metavar="NAME", help="a randomly initialised preset model (tiny, small, ...) "
                     "with a byte-level stand-in tokenizer")
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="weights' dtype (default: the checkpoint's; "
                        "fp32 for a preset)")
    parser.add_argument("--cache-dtype", choices=["bf16", "fp32", "fp8"], default="bf16",
                        help="latent cache storage; fp8 is e4m3 with a scale per 128 values (default: bf16)")
    parser.add_argument("--speculative", choices=["mtp"],
                        help="draft tokens with the MTP module, verify with the model")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")


def add_sampling_arguments(parser: argparse.ArgumentParser, temperature: float) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=128, metavar="N")
    parser.add_argument("--temperature", type=float, default=temperature, metavar="T", help="0 is greedy "
                        f"(default: {temperature})")
    parser.add_argument("--top-k", type=int, default=0, metavar="K", help="sample among the K likeliest (0: all)")
    parser.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling mass (default: 1)")
    parser.add_argument("--seed", type=int, default=0, metavar="S", help="sampling seed, and a preset's weights")
    parser.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop before TEXT (repeatable)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    add_sampling_arguments(parser, temperature=0.0)
    parser.add_argument("--stats", action="store_true", help="print prefill and decode tokens/s (and MTP acceptance)")
    parser.add_argument("prompt", help="the text to continue")


def sampling_params(args: argparse.Namespace, stop_token_ids: tuple[int, ...]):
    from dsv3.infer import SamplingParams

    try:
        return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                              top_p=args.top_p, seed=args.seed, stop_token_ids=stop_token_ids, stop=tuple(args.stop))
    except ValueError as e:
        raise Dsv3Error(f"bad sampling option: {e}") from None


def load_model(args: argparse.Namespace):
    """The model and tokenizer named on the command line (a directory or a preset)."""
    import torch

    from dsv3.infer.loading import load

    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load(args.model, args.preset, args.dtype, seed=getattr(args, "seed", 0))
    if args.speculative and not len(loaded.model.mtp):
        raise Dsv3Error(f"--speculative mtp needs a model with an MTP module; {loaded.name} has none")
    return loaded


def make_engine(args: argparse.Namespace, loaded, max_batch: int = 1, max_len: int | None = None):
    from dsv3.infer import Engine

    return Engine(loaded.model, loaded.tokenizer, max_batch=max_batch, max_len=max_len,
                  cache_dtype=args.cache_dtype, speculative=bool(args.speculative))


def run(args: argparse.Namespace) -> int:
    loaded = load_model(args)
    engine = make_engine(args, loaded)
    tok = loaded.tokenizer
    stop_ids = (tok.eos_id,) if tok.eos_id is not None else ()
    params = sampling_params(args, stop_ids)
    prompt = tok.encode(args.prompt, bos=True)
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
        print(line, file=sys.stderr)
    return 0
