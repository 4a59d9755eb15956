"""Continuous batching: one thread owns the Engine and advances every request in flight together.

Requests arrive from the event loop through an inbox; each engine step admits the new ones into free
cache rows and moves all running ones forward by one shared decode step, so ten clients cost about as
many forward passes as one. Each request gets its text back through an asyncio queue. The engine is
touched by this thread only; the event loop only posts to the inbox and flips cancel flags.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from dataclasses import dataclass, field

from dsv3.infer import Engine, SamplingParams, Sequence
from dsv3.infer.logprobs import TokenLogprob

log = logging.getLogger("dsv3.serve")


class QueueFull(Exception):
    """Every cache row is busy and the waiting queue is full."""


@dataclass
class Event:
    text: str
    n_tokens: int  # completion tokens so far
    finish_reason: str | None = None
    error: str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)  # the new tokens', when the request asked
    first: bool = False  # the request's first event (set by the server as it reads them)


@dataclass(eq=False)
class Handle:
    """One request in flight, as the event loop sees it."""

    prompt: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    seq: Sequence | None = None
    cancelled: bool = False
    finished: bool = False
    logprobs_sent: int = 0


class Batcher:
    """Runs `engine` in a background thread. At most max_batch requests run and max_queue wait; past that,
    `submit` raises QueueFull (the server answers 429)."""

    def __init__(self, engine: Engine, max_queue: int = 64):
        self.engine = engine
        self.capacity = engine.max_batch + max_queue
        self.inbox: queue.SimpleQueue[Handle] = queue.SimpleQueue()
        self._count_lock = threading.Lock()
        self._in_flight = 0
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="dsv3-engine", daemon=True)
        self._live: dict[Sequence, Handle] = {}

    # ----- the event loop's side ---------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the current step, end every request with an error event, and join the thread."""
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout)

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def submit(self, prompt: list[int], params: SamplingParams) -> Handle:
        with self._count_lock:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            if self._in_flight >= self.capacity:
                waiting = self.capacity - self.engine.max_batch
                raise QueueFull(f"all {self.engine.max_batch} slots are busy and {waiting} requests wait")
            self._in_flight += 1
        handle = Handle(prompt, params, asyncio.get_running_loop())
        self.inbox.put(handle)
        self._wake.set()
        return handle

    def cancel(self, handle: Handle) -> None:
        """Stop generating for a request (its client left); its cache row is freed at the next step."""
        if not handle.finished:
            handle.cancelled = True
            self._wake.set()

    # ----- the engine thread -------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stopping:
            self._take_inbox()
            for h in list(self._live.values()):
                if h.cancelled:
                    self.engine.cancel(h.seq)
            if not self.engine.has_work():
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                changed = self.engine.step()
            except Exception:  # a bug, not a bad request: fail what is in flight and keep serving
                log.exception("engine step failed; ending the requests in flight")
                self._fail_all("the engine failed while generating; see the server log")
                self.engine.abort_all()
                continue
            for seq in changed:
                h = self._live.get(seq)
                if h is not None:
                    _, text = seq.take()
                    if seq.finish_reason == "error":  # this request alone failed; the others go on
                        self._post(h, Event("", len(seq.tokens), error=seq.error))
                    else:
                        new, h.logprobs_sent = seq.logprobs[h.logprobs_sent :], len(seq.logprobs)
                        self._post(h, Event(text, len(seq.tokens), seq.finish_reason, logprobs=new))
        self._take_inbox()
        self._fail_all("the server is shutting down")

    def _take_inbox(self) -> None:
        while True:
            try:
                h = self.inbox.get_nowait()
            except queue.Empty:
                return
            try:
                h.seq = self.engine.add(h.prompt, h.params)
            except ValueError as e:  # the server checks requests first; this is the last line of defence
                self._post(h, Event("", 0, error=str(e)))
                continue
            self._live[h.seq] = h

    def _post(self, h: Handle, event: Event) -> None:
        if event.finish_reason is not None or event.error is not None:
            h.finished = True
            self._live.pop(h.seq, None)
            with self._count_lock:
                self._in_flight -= 1
        with contextlib.suppress(RuntimeError):  # a closed event loop: nobody is listening any more
            h.loop.call_soon_threadsafe(h.events.put_nowait, event)

    def _fail_all(self, message: str) -> None:
        for h in list(self._live.values()):
            self._post(h, Event("", len(h.seq.tokens), error=message))
