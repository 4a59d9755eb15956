"""The options several verbs share, defined once, and the objects they build. Verbs import this module,
never each other.

- `add_config_source`: which model configuration (info, prepare, cost, plan): --preset / --config / --model.
- `add_model`: which model to run (generate, chat, serve): --model DIR or --preset NAME, --dtype, --threads,
  --no-pack.
- `add_serving`: how to run it: --cache-dtype, --speculative (--draft-policy, --draft-tokens), --max-len, the
  paged cache's --block-size, --cache-tokens, --prefill-chunk, --no-prefix-cache, and --max-batch where it applies.
- `add_sampling`: how to pick tokens: --max-new-tokens, --temperature, --top-k, --top-p, --seed, --stop.
- `add_identity`, `add_chat_fields`: the assistant's own name and maker; where the turns are in a JSONL chat
  record (audit, sft, eval).
"""

from __future__ import annotations

import argparse
import os
import sys

from dsv3.config import PRESETS, ModelConfig, preset
from dsv3.errors import Dsv3Error, InvalidValue
from dsv3.parallel.dist import launched


# ----- a configuration -------------------------------------------------------------------------------------
def add_config_source(parser: argparse.ArgumentParser, *, required: bool = True, default: str | None = None) -> None:
    """--preset / --config / --model: where a model's configuration comes from."""
    group = parser.add_mutually_exclusive_group(required=required)
    suffix = f" (default: {default})" if default else ""
    group.add_argument("--preset", choices=list(PRESETS), help=f"a named configuration{suffix}")
    group.add_argument("--config", metavar="CONFIG_JSON", help="a Hugging Face config.json")
    group.add_argument("--model", metavar="DIR", help="a model directory (its config.json)")


def config_from_args(args: argparse.Namespace, default: str | None = None) -> tuple[str, ModelConfig] | None:
    """(a name for people, the configuration) from --preset / --config / --model; None when none was given and
    there is no default."""
    if args.config or args.model:
        path = args.config or args.model
        return path, ModelConfig.from_hf(path)
    name = args.preset or default
    return (name, preset(name)) if name else None


# ----- a model to run --------------------------------------------------------------------------------------
def add_model(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", metavar="DIR", help="a Hugging Face model directory (config.json + safetensors)")
    src.add_argument("--preset", metavar="NAME", help="a randomly initialised preset model (tiny, small, ...) "
                     "with a byte-level stand-in tokenizer")
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="weights' dtype (default: the checkpoint's; "
                        "fp32 for a preset)")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    parser.add_argument("--no-pack", dest="pack", action="store_false",
                        help="keep bf16 weights in torch's plain layout on the CPU (default: reorder them once into "
                             "oneDNN's blocked layout, which decodes faster with the same outputs and memory)")


def add_serving(parser: argparse.ArgumentParser, *, max_batch: int | None = None) -> None:
    """The engine's options (`dsv3.infer.ServingConfig`); --max-batch only where several requests share it."""
    parser.add_argument("--cache-dtype", choices=["bf16", "fp32", "fp8"], default="bf16",
                        help="latent cache storage; fp8 is e4m3 with a scale per 128 values (default: bf16)")
    parser.add_argument("--speculative", choices=["mtp"],
                        help="draft tokens with the MTP module, verify with the model")
    parser.add_argument("--draft-policy", choices=["adaptive", "always"], default="adaptive",
                        help="with --speculative: 'adaptive' lets each sequence draft only while its acceptance "
                             "pays for the measured cost of a speculative step; 'always' drafts every step "
                             "(default: adaptive)")
    parser.add_argument("--draft-tokens", type=int, default=1, metavar="N",
                        help="with --speculative: tokens drafted per step, 1 or 2; 2 applies MTP module 1 a second "
                             "time to its own output and verifies both drafts in one forward (default: 1)")
    parser.add_argument("--max-len", type=int, metavar="N",
                        help="longest sequence, prompt included (default: the model's max_position_embeddings); "
                             "the cache grows with the requests up to it")
    if max_batch is not None:
        parser.add_argument("--max-batch", type=int, default=max_batch, metavar="N",
                            help=f"sequences decoded together (default: {max_batch})")
    parser.add_argument("--block-size", type=int, default=64, metavar="N",
                        help="positions per block of the paged cache (default: 64)")
    parser.add_argument("--cache-tokens", type=int, metavar="N",
                        help="the cache pool's size in tokens, all sequences together; a request waits until the pool "
                             "can hold its prompt + max new tokens (default: --max-batch sequences of --max-len)")
    parser.add_argument("--prefill-chunk", type=int, metavar="TOKENS",
                        help="prefill at most this many prompt tokens per step, between decode steps, so a long "
                             "prompt does not stall the running streams (default: whole prompts)")
    parser.add_argument("--no-prefix-cache", dest="prefix_cache", action="store_false",
                        help="do not reuse cached blocks of prompts that start alike (default: reuse them)")


def load_model(args: argparse.Namespace):
    """The model and tokenizer named on the command line (a directory or a preset)."""
    import torch

    from dsv3.infer.loading import load
    from dsv3.infer.sampling import SEED_RANGE

    if args.threads is not None:
        if args.threads < 1:
            raise InvalidValue("threads", args.threads, "must be at least 1")
        torch.set_num_threads(args.threads)
    seed = getattr(args, "seed", 0)
    if not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:  # it seeds a preset's weights too, before any sampling
        raise InvalidValue("seed", seed, f"must be an integer in [{SEED_RANGE[0]}, {SEED_RANGE[1]}]")
    shard = None
    if launched():  # one rank of a torchrun job: this process loads and runs its slices of the model
        from dsv3.parallel import inference, serving

        serving.init()
        shard = inference.shard
    loaded = load(args.model, args.preset, args.dtype, seed=seed, shard=shard)
    if args.pack and shard is None:  # a sharded model's slices stay plain tensors for the collectives
        from dsv3.infer.packing import pack

        pack(loaded.model)
    if args.speculative and not len(loaded.model.mtp):
        raise Dsv3Error(f"--speculative mtp needs a model with an MTP module; {loaded.name} has none")
    return loaded


def make_engine(args: argparse.Namespace, loaded):
    """The engine for `loaded`. In a torchrun job rank 0 gets a `serving.Leader` and returns; every other rank
    replays the leader's steps here until the leader ends, then exits."""
    from dsv3.infer import Engine, ServingConfig

    config = ServingConfig(max_batch=getattr(args, "max_batch", 1), max_len=args.max_len,
                           cache_dtype=args.cache_dtype, speculative=bool(args.speculative),
                           draft_policy=args.draft_policy, draft_tokens=args.draft_tokens,
                           block_size=args.block_size, cache_tokens=args.cache_tokens,
                           prefill_chunk=args.prefill_chunk, prefix_cache=args.prefix_cache)
    if not launched():
        return Engine(loaded.model, loaded.tokenizer, config)
    import torch.distributed as dist

    from dsv3.parallel import serving

    if dist.get_rank() == 0:
        return serving.Leader(loaded.model, loaded.tokenizer, config)
    serving.follow(serving.Follower(loaded.model, loaded.tokenizer, config))
    sys.exit(0)


def add_processes(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nproc", type=int, metavar="N",
                        help="split the model over N processes on this machine (tensor and expert parallel), as "
                             "`torchrun --standalone --nproc-per-node N -m dsv3 ...` does; rank 0 talks to you")


def is_leader() -> bool:
    """Rank 0 of a torchrun job, or a process on its own: the one that talks to the user."""
    return int(os.environ.get("RANK", "0")) == 0


# ----- sampling --------------------------------------------------------------------------------------------
def add_sampling(parser: argparse.ArgumentParser, temperature: float, *, max_new_tokens: int = 128,
                 top_p: float = 1.0) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens, metavar="N",
                        help=f"tokens to generate at most (default: {max_new_tokens})")
    parser.add_argument("--temperature", type=float, default=temperature, metavar="T", help="0 is greedy "
                        f"(default: {temperature})")
    parser.add_argument("--top-k", type=int, default=0, metavar="K", help="sample among the K likeliest (0: all)")
    parser.add_argument("--top-p", type=float, default=top_p, metavar="P",
                        help=f"nucleus sampling mass (default: {top_p:g})")
    parser.add_argument("--seed", type=int, default=0, metavar="S", help="sampling seed, and a preset's weights")
    parser.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop before TEXT (repeatable)")


def text_argument(text: str, what: str) -> str:
    """Text from the command line or a terminal as the program received it: bytes that are not UTF-8 come in
    as lone surrogates, which no tokenizer can encode; say so instead."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise Dsv3Error(f"{what} is not valid UTF-8 text; check the terminal's or the file's encoding") from None
    return text


def sampling_params(args: argparse.Namespace, stop_token_ids: tuple[int, ...]):
    from dsv3.infer import SamplingParams

    return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, seed=args.seed, stop_token_ids=stop_token_ids, stop=tuple(args.stop))


# ----- identity and chat records ---------------------------------------------------------------------------
def add_identity(parser, identity_help: str, creator_help: str) -> None:
    """--identity and --creator: the assistant's own name and maker (defaults `dsv3.audit.IDENTITY`, `CREATOR`)."""
    from dsv3.audit import CREATOR, IDENTITY

    parser.add_argument("--identity", default=IDENTITY, help=f"{identity_help} (default: {IDENTITY})")
    parser.add_argument("--creator", default=CREATOR, help=f"{creator_help} (default: {CREATOR})")


def add_chat_fields(parser, assistant_help: str) -> None:
    """Where the turns are in a JSONL chat record (`dsv3.audit.sources.Fields`)."""
    add = parser.add_argument
    add("--messages-field", default="messages", help="JSONL field holding chat turns (default: messages)")
    add("--role-field", default="role", help="field of a turn naming the speaker (default: role)")
    add("--content-field", default="content", help="field of a turn holding its text (default: content)")
    add("--assistant-role", default="assistant", help=f"{assistant_help} (default: assistant)")


def chat_fields(args: argparse.Namespace, text_field: str = "text"):
    from dsv3.audit.sources import Fields

    return Fields(text_field, args.messages_field, args.role_field, args.content_field, args.assistant_role)
