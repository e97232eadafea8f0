"""The step engine behind an asyncio front end (the server): one thread owns the `LLMEngine`.

The engine is not thread-safe, so only its thread touches it: the event loop hands it adds and
aborts through a queue, and the thread steps while any request is unfinished (it sleeps on the
queue otherwise). Each request has a sink, an `asyncio.Queue` of the loop, into which the thread
puts `(request_id, RequestOutput)` after every step that advanced it, or `(request_id,
exception)` when the request failed; `loop.call_soon_threadsafe` crosses the threads.

A step that raises fails the requests it was running (each gets the error; the engine forgets
them) and the thread keeps serving the rest; an executor that broke (`WorkerFailure`: a rank
died) cannot run another step, so from then on every request fails with that error and
`healthy` turns False. The thread records, per request, the time to its first token and the gaps
between later ones, and the generated tokens, for /metrics (`EngineMetrics`).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from engine.engine import LLMEngine
from engine.executor.base import WorkerFailure
from engine.request_output import RequestOutput
from engine.sampling import SamplingParams

logger = logging.getLogger(__name__)

# latency histogram buckets (seconds), the same for time to first token and inter-token latency
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0)
RATE_WINDOW_S = 10.0  # generated tokens/s is measured over this trailing window


class EngineStopped(RuntimeError):
    """The server stopped the engine thread while this request was in flight."""


class Histogram:
    """Cumulative bucket counts, sum and count (Prometheus semantics); the engine thread observes,
    /metrics reads a snapshot under the lock."""

    def __init__(self, buckets=LATENCY_BUCKETS):
        self.buckets = tuple(buckets)
        self.counts = [0] * len(self.buckets)
        self.sum = 0.0
        self.count = 0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        with self._lock:
            for i, bound in enumerate(self.buckets):
                if value <= bound:
                    self.counts[i] += 1
            self.sum += value
            self.count += 1

    def snapshot(self) -> tuple[list[tuple[float, int]], float, int]:
        with self._lock:
            return list(zip(self.buckets, self.counts)), self.sum, self.count


class EngineMetrics:
    """What /metrics reports of the engine thread's work; counters only the engine thread writes."""

    def __init__(self):
        self.ttft = Histogram()
        self.itl = Histogram()
        self.generation_tokens = 0
        self.prompt_tokens = 0
        self.finished: dict[str, int] = {}  # finish reason -> requests
        self.failed = 0
        self.aborted = 0
        self.steps = 0
        # the engine's own numbers (LLMEngine.stats() where it has one), refreshed after every step
        self.engine_stats: dict[str, Any] = {}
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens) of recent steps
        self._lock = threading.Lock()

    def tokens_generated(self, now: float, tokens: int) -> None:
        with self._lock:
            self.generation_tokens += tokens
            self._recent.append((now, tokens))
            while self._recent and self._recent[0][0] < now - RATE_WINDOW_S:
                self._recent.popleft()

    def tokens_per_second(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        with self._lock:
            tokens = sum(n for t, n in self._recent if t >= now - RATE_WINDOW_S)
        return tokens / RATE_WINDOW_S


@dataclass
class _Request:
    request_id: Any
    sink: asyncio.Queue
    arrived: float
    last_token_at: float | None = None
    tokens_seen: int = 0


class AsyncEngine:
    def __init__(self, engine: LLMEngine, loop: asyncio.AbstractEventLoop | None = None, idle_wait_s: float = 0.5):
        self.engine = engine
        self.loop = loop
        self.metrics = EngineMetrics()
        self.idle_wait_s = idle_wait_s
        self.healthy = True
        self.failure: BaseException | None = None  # what broke the executor, once it did
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._requests: dict[Any, _Request] = {}  # the engine thread's own view
        self._in_flight = 0  # requests added and not yet ended (read from the loop for the 429 bound)
        self._count_lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._refresh_stats()

    # -- lifecycle (event loop side) ------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> "AsyncEngine":
        self.loop = loop or self.loop or asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="qshard-engine", daemon=True)
        self._thread.start()
        return self

    def request_stop(self) -> None:
        """Ask the thread to stop after its current step (any thread, a signal handler too): every
        request still in flight then ends with an error, so open streams close at once."""
        self._stopping.set()
        self._commands.put(("wake",))

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop the thread (after its current step); requests left fail with 'shutting down'."""
        if self._thread is None:
            return
        self.request_stop()
        self._thread.join(timeout=timeout_s)
        if self._thread.is_alive():
            logger.warning("engine thread still inside a step %.0f s after shutdown was asked", timeout_s)
        self._thread = None

    @property
    def in_flight(self) -> int:
        return self._in_flight

    # -- requests (event loop side) -------------------------------------------------------------

    def add(self, request_id: Any, prompt_token_ids: list[int], params: SamplingParams, prompt_text: str | None,
            sink: asyncio.Queue, arrived: float | None = None) -> None:
        """Queue a request; its outputs (or its error) arrive in `sink` as (request_id, item)."""
        with self._count_lock:
            self._in_flight += 1
        self._commands.put(("add", request_id, list(prompt_token_ids), params, prompt_text, sink,
                            time.monotonic() if arrived is None else arrived))

    def abort(self, request_id: Any) -> None:
        """Drop a request (a client went away); an unknown or finished one is ignored."""
        self._commands.put(("abort", request_id))

    # -- the engine thread ----------------------------------------------------------------------

    def _run(self) -> None:
        logger.info("engine thread started")
        try:
            while not self._stopping.is_set():
                busy = self.engine.has_unfinished()
                took = self._take_commands(block=not busy)
                if self._stopping.is_set():
                    break
                if self._needs_step():
                    self._step()
                elif took:  # adds/aborts without a step (an abort frees its blocks at once): show it
                    self._refresh_stats()
        except BaseException as e:  # never leave clients waiting on a dead thread
            logger.exception("engine thread failed")
            self._broken(e)
        finally:
            self._end_all(EngineStopped("the server is shutting down"))
            logger.info("engine thread stopped")

    def _needs_step(self) -> bool:
        if self.engine.has_unfinished():
            return True
        # an aborted request's cache is freed by the next step, even an empty one
        scheduler = getattr(self.engine, "scheduler", None)
        return bool(getattr(scheduler, "finished_ids", None))

    def _take_commands(self, block: bool) -> bool:
        """Apply every queued add/abort (waiting for one when idle); True if there were any."""
        try:
            command = self._commands.get(timeout=self.idle_wait_s) if block else self._commands.get_nowait()
        except queue.Empty:
            return False
        while True:
            self._apply(command)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return True

    def _apply(self, command: tuple) -> None:
        kind = command[0]
        if kind == "add":
            _, request_id, ids, params, text, sink, arrived = command
            request = _Request(request_id, sink, arrived)
            if not self.healthy:
                self._fail(request, self.failure)
                return
            try:
                self.engine.add_request(request_id, ids, params, text)
            except Exception as e:  # a bad request: its own error, nobody else's
                self._fail(request, e)
                return
            self._requests[request_id] = request
            self.metrics.prompt_tokens += len(ids)
        elif kind == "abort":
            request = self._requests.pop(command[1], None)
            if request is not None:
                self.engine.abort(request.request_id)
                self.metrics.aborted += 1
                self._ended()

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except WorkerFailure as e:
            logger.error("the executor failed: %s", e)
            self._broken(e)
            return
        except Exception as e:  # this step's requests fail; the engine serves the others
            logger.exception("a step failed; failing its %d requests", len(self._requests))
            for request_id, request in list(self._requests.items()):
                self.engine.abort(request_id)
                self._fail(request, e)
            self._requests.clear()
            return
        now = time.monotonic()
        self.metrics.steps += 1
        new_tokens = 0
        for out in outputs:
            request = self._requests.get(out.request_id)
            if request is None:  # aborted meanwhile
                continue
            new_tokens += self._timings(request, out, now)
            self._send(request, out)
            if out.finished:
                del self._requests[out.request_id]
                reason = out.finish_reason or "stop"
                self.metrics.finished[reason] = self.metrics.finished.get(reason, 0) + 1
                self._ended()
        if new_tokens:
            self.metrics.tokens_generated(now, new_tokens)
        self._refresh_stats()

    def _timings(self, request: _Request, out: RequestOutput, now: float) -> int:
        new = len(out.token_ids) - request.tokens_seen
        if new <= 0:
            return 0
        if request.last_token_at is None:
            self.metrics.ttft.observe(now - request.arrived)
        else:
            self.metrics.itl.observe((now - request.last_token_at) / new)
        request.last_token_at, request.tokens_seen = now, len(out.token_ids)
        out.metrics.setdefault("arrival_time", request.arrived)
        return new

    def _refresh_stats(self) -> None:
        self.metrics.engine_stats = engine_stats(self.engine)

    # -- delivery -------------------------------------------------------------------------------

    def _send(self, request: _Request, item) -> None:
        try:
            self.loop.call_soon_threadsafe(request.sink.put_nowait, (request.request_id, item))
        except RuntimeError:  # the loop is closed: the server is gone
            pass

    def _fail(self, request: _Request, error: BaseException) -> None:
        self.metrics.failed += 1
        self._send(request, error)
        self._ended()

    def _ended(self) -> None:
        with self._count_lock:
            self._in_flight -= 1

    def _broken(self, error: BaseException) -> None:
        self.healthy = False
        self.failure = error
        self._end_all(error)

    def _end_all(self, error: BaseException) -> None:
        for request in self._requests.values():
            self._fail(request, error)
        self._requests.clear()
        while True:  # requests still queued
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                break
            if command[0] == "add":
                self._fail(_Request(command[1], command[5], command[6]), error)


def engine_stats(engine: LLMEngine) -> dict[str, Any]:
    """The engine's numbers: `LLMEngine.stats()` where it has one; else what its scheduler shows
    (running and waiting requests)."""
    stats = getattr(engine, "stats", None)
    if callable(stats):
        try:
            return dict(stats())
        except Exception:  # metrics must never fail a step
            logger.debug("LLMEngine.stats() failed", exc_info=True)
    scheduler = getattr(engine, "scheduler", None)
    out: dict[str, Any] = {"unfinished": len(getattr(engine, "requests", ()))}
    for name in ("running", "waiting"):
        value = getattr(scheduler, name, None)
        if value is not None:
            out[name] = len(value)
    return out
