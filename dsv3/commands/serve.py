"""`dsv3 serve`: an OpenAI-compatible HTTP API over a model, with continuous batching."""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from dsv3.commands import options
from dsv3.errors import Dsv3Error

HELP = "serve a model over an OpenAI-compatible HTTP API (completions, chat, streaming)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    options.add_model(parser)
    options.add_serving(parser, max_batch=16)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", metavar="KEY", help="require 'Authorization: Bearer KEY' on /v1/ routes")
    parser.add_argument("--max-queue", type=int, default=64, metavar="N", help="requests that may wait for a row; "
                        "past that the server answers 429")
    parser.add_argument("--name", help="the model name clients ask for (default: the directory's or preset's name)")


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from dsv3.chat_template import ChatTemplate
        from dsv3.serve.app import ServerConfig, create_app
    except ImportError:
        raise Dsv3Error("dsv3 serve needs FastAPI and uvicorn; install them with pip install 'dsv3[serve]'") from None
    if args.max_queue < 0:
        raise Dsv3Error(f"--max-queue {args.max_queue} must be at least 0")
    loaded = options.load_model(args)
    engine = options.make_engine(args, loaded)
    config = ServerConfig(model_name=args.name or loaded.name, api_key=args.api_key, max_queue=args.max_queue)
    app = create_app(engine, loaded.tokenizer, config, ChatTemplate.from_config(loaded.tokenizer.config))
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    speculation = ", MTP speculation" if args.speculative else ""
    print(f"serving {config.model_name} on http://{args.host}:{args.port}/v1 ({engine.max_batch} slots, context up "
          f"to {engine.max_len} tokens, {args.cache_dtype} cache{speculation})", file=sys.stderr)
    # uvicorn turns SIGINT/SIGTERM into a graceful shutdown (open streams get a few seconds, then the lifespan
    # hook stops the engine thread) and afterwards re-raises the signal to the handler it found; this one
    # records it, so a stopped server exits 0 instead of dying by the signal it already handled.
    received: list[int] = []
    handled = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, lambda sig, frame: received.append(sig)) for sig in handled}
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=5)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if received:
        print(f"stopped on {signal.Signals(received[0]).name}", file=sys.stderr)
    return 0
