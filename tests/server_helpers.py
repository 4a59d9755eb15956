"""A live server for the tests: the trained tiny model behind the real app, on a free port, in a thread."""

from __future__ import annotations

import contextlib
import copy
import http.client
import json
import socket
import threading
import time

import uvicorn
from infer_models import trained_tiny

from dsv3.chat_template import ChatTemplate
from dsv3.infer import Engine
from dsv3.serve.app import ServerConfig, create_app
from dsv3.serve.limits import DeadlineProtocol

KEY = "test-key"
NAME = "tiny-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def live_server(max_batch=16, max_queue=64, api_key=KEY, template: str | None = None, request_timeout=15.0,
                max_body_bytes=8 * 2**20):
    """A server on a free port in a background thread, over its own copy of the trained tiny model."""
    model, tok, _ = trained_tiny()
    engine = Engine(copy.deepcopy(model), tok, max_batch=max_batch, cache_dtype="fp32")
    config = ServerConfig(model_name=NAME, api_key=api_key, max_queue=max_queue, max_body_bytes=max_body_bytes)
    app = create_app(engine, tok, config, ChatTemplate(template) if template else None)
    with serve_app(app, request_timeout) as port:
        yield port, engine


@contextlib.contextmanager
def serve_app(app, request_timeout: float = 15.0):
    """Run `app` with uvicorn on a free port in a background thread; yields the port once it is up."""
    port = free_port()
    protocol = type("Protocol", (DeadlineProtocol,), {"request_timeout": request_timeout})
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", http=protocol))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(15)


def call(port, method, path, body=None, key=KEY, raw=None, headers=None):
    """(status, parsed JSON body) of one request."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"Content-Type": "application/json", **(headers or {})}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    payload = raw if raw is not None else (json.dumps(body) if body is not None else None)
    conn.request(method, path, body=payload, headers=headers)
    resp = conn.getresponse()
    status, data = resp.status, resp.read()
    conn.close()
    return status, json.loads(data)


def wait_up(proc, port, key=None, timeout=60.0, path="/health"):
    """Wait until the server process `proc` answers `path` on `port`; fail with its stderr if it exits first."""
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, proc.stderr.read()
        try:
            if call(port, "GET", path, key=key)[0] == 200:
                return
        except OSError:
            pass
        assert time.monotonic() < deadline, "dsv3 serve did not come up"
        time.sleep(0.2)


def wait_idle(port, timeout=10.0):
    """Poll /health until nothing is in flight, every batch slot is free and no cache block is held (the pool
    never leaks, whatever became of the requests); return the last answer."""
    deadline = time.monotonic() + timeout
    while True:
        _, health = call(port, "GET", "/health")
        if health["in_flight"] == 0 and health["free_slots"] == health["slots"] and not health["cache_blocks_in_use"]:
            return health
        assert time.monotonic() < deadline, f"still busy after {timeout}s: {health}"
        time.sleep(0.05)
