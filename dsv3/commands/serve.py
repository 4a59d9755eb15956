"""`dsv3 serve`: an OpenAI-compatible HTTP API over a model, with continuous batching."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
import socket
import sys

from dsv3.commands import options
from dsv3.errors import Dsv3Error, InvalidValue

HELP = "serve a model over an OpenAI-compatible HTTP API (completions, chat, streaming)"
KEY_ENV = "DSV3_API_KEY"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    options.add_model(parser)
    options.add_serving(parser, max_batch=16)
    options.add_processes(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on, 1-65535 (default: 8000)")
    key = parser.add_mutually_exclusive_group()
    key.add_argument("--api-key", metavar="KEY", help="require 'Authorization: Bearer KEY' on every route but "
                     f"/health and the chat page; a key on the command line shows in `ps`: prefer ${KEY_ENV} or "
                     "--api-key-file")
    key.add_argument("--api-key-file", metavar="FILE", help="read the API key from the first line of FILE")
    parser.add_argument("--max-queue", type=int, default=64, metavar="N", help="requests that may wait for a row; "
                        "past that the server answers 429")
    parser.add_argument("--request-timeout", type=float, default=15.0, metavar="S",
                        help="seconds a client has to send a whole request before its connection is closed "
                             "(default: 15)")
    parser.add_argument("--max-body", type=int, default=8 * 2**20, metavar="BYTES",
                        help="largest request body accepted; larger ones get 413 (default: 8 MiB)")
    parser.add_argument("--name", help="the model name clients ask for (default: the directory's or preset's name)")
    parser.add_argument("--chat-format", choices=["v3", "v3.1"], default="v3",
                        help="the chat format of a model whose tokenizer_config.json has no chat_template: "
                             "DeepSeek-V3's, or DeepSeek-V3.1's with its thinking mode (default: v3)")
    parser.add_argument("--thinking", action=argparse.BooleanOptionalAction,
                        help="thinking mode for chat requests that do not set it in chat_template_kwargs; the "
                             "reasoning is answered as reasoning_content (default: the chat format's own, off "
                             "for v3.1)")


def api_key(args: argparse.Namespace) -> str | None:
    """The key from --api-key, --api-key-file or $DSV3_API_KEY (in that order), or None for an open server."""
    if args.api_key is not None:
        key = args.api_key
    elif args.api_key_file is not None:
        try:
            with open(args.api_key_file, encoding="utf-8") as f:
                key = f.readline().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise Dsv3Error(f"cannot read the API key from {args.api_key_file} ({e}); give a readable text "
                            "file") from None
    else:
        key = os.environ.get(KEY_ENV)
    if key is not None and (not key or any(c.isspace() for c in key)):
        raise Dsv3Error("the API key must be non-empty and hold no spaces or line breaks")
    return key


def check_listen(args: argparse.Namespace) -> socket.socket:
    """The listening socket, bound before anything is announced: a bad address or a port in use is an error
    now, not after "serving on ..." has been printed."""
    if not 1 <= args.port <= 65535:
        raise InvalidValue("port", args.port, "must be a port number from 1 to 65535")
    for name, value, low in (("max_queue", args.max_queue, 0), ("request_timeout", args.request_timeout, 0.1),
                             ("max_body", args.max_body, 1024)):
        if not value >= low:
            raise InvalidValue(name, value, f"must be at least {low}")
    try:
        infos = socket.getaddrinfo(args.host, args.port, type=socket.SOCK_STREAM)
        family, _, _, _, address = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # accepted connections inherit this: without it, a response written in two parts (head, body) waits
        # for the client's delayed ACK, 40 ms per request on a kept-alive connection
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind(address)
    except OSError as e:
        raise Dsv3Error(f"cannot listen on {args.host}:{args.port} ({e.strerror or e}); choose another --host or "
                        "--port") from None
    return sock


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from dsv3.chat_template import ChatTemplate
        from dsv3.serve.app import ServerConfig, create_app
        from dsv3.serve.limits import DeadlineProtocol
    except ImportError:
        raise Dsv3Error("dsv3 serve needs FastAPI and uvicorn; install them with pip install 'dsv3[serve]'") from None
    if args.nproc is not None:
        from dsv3.commands.launch import launch

        return launch("serve", args.nproc, args.argv)
    key = api_key(args)
    sock = check_listen(args) if options.is_leader() else None  # the other ranks only compute
    loaded = options.load_model(args)
    engine = options.make_engine(args, loaded)
    template = ChatTemplate.from_config(loaded.tokenizer.config, builtin=args.chat_format)
    if args.thinking and not template.has_thinking_switch:
        raise Dsv3Error(f"--thinking needs a chat format with a thinking mode, and this model has no chat template "
                        f"({template.name} has none); add --chat-format v3.1")
    config = ServerConfig(model_name=args.name or loaded.name, api_key=key, max_queue=args.max_queue,
                          max_body_bytes=args.max_body, thinking=args.thinking)
    app = create_app(engine, loaded.tokenizer, config, template)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if key is None and not _loopback(args.host):
        print(f"warning: serving on {args.host} without an API key: anyone who can reach this address can use "
              f"the model; set ${KEY_ENV} or pass --api-key-file", file=sys.stderr)
    speculation = f", MTP speculation ({args.draft_tokens} draft(s) per step)" if args.speculative else ""
    print(f"serving {config.model_name} on http://{args.host}:{args.port}/v1 ({engine.max_batch} slots, context up "
          f"to {engine.max_len} tokens, {args.cache_dtype} cache{speculation})", file=sys.stderr)
    protocol = type("Protocol", (DeadlineProtocol,), {"request_timeout": args.request_timeout})
    server = uvicorn.Server(uvicorn.Config(app, http=protocol, log_level="warning", timeout_graceful_shutdown=5))
    # uvicorn turns SIGINT/SIGTERM into a graceful shutdown (open streams get a few seconds, then the lifespan
    # hook stops the engine thread) and afterwards re-raises the signal to the handler it found; this one
    # records it, so a stopped server exits 0 instead of dying by the signal it already handled.
    received: list[int] = []
    handled = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, lambda sig, frame: received.append(sig)) for sig in handled}
    try:
        server.run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if received:
        print(f"stopped on {signal.Signals(received[0]).name}", file=sys.stderr)
    return 0
