"""`qshard serve`: the OpenAI-compatible HTTP server (launch.server) over any TP size and executor.

    qshard serve --model M --tp 3 --executor mp --host 127.0.0.1 --port 8000 [--api-key KEY]
    torchrun --nproc-per-node 3 -m launch.torchrun serve --model M --port 8000

The port is bound before the model loads (a taken port fails at once). Under torchrun rank 0
serves and the other ranks follow its steps until it shuts down; only rank 0 binds the port.
SIGINT/SIGTERM stop the server: it stops accepting, open streams end, the engine thread stops,
then the executor stops its ranks (mp and Ray kill their followers as soon as the signal comes,
the executors' interrupt contract; torchrun's followers get rank 0's STOP on SIGTERM). A second
signal forces the exit.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import socket
import threading
import time
from pathlib import Path

from kernels.errors import InputError
from launch.cmd_generate import add_model_arguments, executor_options

logger = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $QSHARD_API_KEY, else none)")
    p.add_argument("--served-model-name", default=None,
                   help="the model's name in the API (default: the checkpoint directory's name)")
    p.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--max-in-flight", type=int, default=1024,
                   help="requests accepted and unfinished beyond which new ones get 429")
    p.add_argument("--access-log", action="store_true", help="log every HTTP request")
    # the paged KV cache (passed only when given)
    p.add_argument("--kv-cache-memory", default=None,
                   help="KV-cache bytes per rank: a number with an optional K/M/G suffix (powers of 1024)")
    p.add_argument("--block-size", type=int, default=None, help="positions per KV block")
    p.add_argument("--gpu-memory-utilization", type=float, default=None)
    p.add_argument("--no-prefix-caching", action="store_true", help="do not reuse cached blocks of equal prefixes")


def parse_bytes(text: str) -> int:
    """'512M' -> 536870912; a plain number is bytes."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    t = str(text).strip().lower().removesuffix("ib").removesuffix("b")
    scale = units.get(t[-1:], 1)
    try:
        value = float(t[:-1] if t[-1:] in units else t) * scale
    except ValueError:
        value = -1
    if value < 1:
        raise InputError(f"--kv-cache-memory takes a positive byte count such as 268435456 or 256M, got {text!r}")
    return int(value)


def cache_options(args) -> dict:
    options = {}
    if args.kv_cache_memory is not None:
        options["kv_cache_memory"] = parse_bytes(args.kv_cache_memory)
    if args.block_size is not None:
        options["block_size"] = args.block_size
    if args.gpu_memory_utilization is not None:
        options["gpu_memory_utilization"] = args.gpu_memory_utilization
    if args.no_prefix_caching:
        options["enable_prefix_caching"] = False
    return options


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound now: a bad address or a taken port is an error before any load."""
    if not 0 <= port <= 65535:
        raise InputError(f"--port must be in [0, 65535], got {port}")
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise InputError(f"--host {host!r} does not resolve: {e}") from None
    sock = socket.socket(info[0], socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(info[4])
    except OSError as e:
        sock.close()
        raise InputError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(2048)
    return sock


def run(args) -> int:
    from engine import LLM

    api_key = args.api_key or os.environ.get("QSHARD_API_KEY") or None
    if args.max_in_flight < 1:
        raise InputError(f"--max-in-flight must be >= 1, got {args.max_in_flight}")
    options = {**executor_options(args), **cache_options(args)}
    rank = int(os.environ.get("RANK", "0")) if args.executor == "external" else 0
    sock = bind(args.host, args.port) if rank == 0 else None
    try:
        llm = LLM(args.model, tensor_parallel_size=int(args.tp), executor=args.executor, dtype=args.dtype,
                  device=args.device, max_num_seqs=args.max_num_seqs, seed=args.seed,
                  max_model_len=args.max_model_len, max_num_batched_tokens=args.max_num_batched_tokens, **options)
    except BaseException:
        if sock is not None:
            sock.close()
        raise
    with llm:
        if llm.executor.is_follower:
            logger.info("rank %d: following rank 0's steps", rank)
            llm.executor.follow_until_stop()
            return 0
        return _serve(llm, args, sock, api_key)


def _serve(llm, args, sock: socket.socket, api_key: str | None) -> int:
    import uvicorn

    from engine.async_engine import AsyncEngine
    from engine.llm import load_tokenizer
    from launch.server.app import ServeConfig, create_app

    path = Path(llm.config.model_path)
    name = args.served_model_name or path.name
    config = ServeConfig(model_name=name, max_model_len=llm.config.max_model_len,
                         vocab_size=llm.model_config.vocab_size, aliases=(str(args.model), str(path)),
                         api_key=api_key, max_in_flight=args.max_in_flight)
    engine = AsyncEngine(llm.engine)
    app = create_app(engine, load_tokenizer(path), config)
    server = _uvicorn_server(uvicorn.Config(app, log_config=None, access_log=args.access_log, lifespan="on",
                                            timeout_graceful_shutdown=5, timeout_keep_alive=5))
    host, port = sock.getsockname()[:2]
    logger.info("qshard serve: %s at http://%s:%d/v1 (tp=%d, executor %s%s)", name, host, port,
                llm.config.tensor_parallel_size, llm.executor_name, ", API key required" if api_key else "")
    with _stop_on_signals(server, engine):
        server.run(sockets=[sock])
    sock.close()
    logger.info("server stopped; stopping the engine's ranks")
    start = time.monotonic()
    llm.shutdown()
    logger.info("ranks stopped in %.1f s", time.monotonic() - start)
    return 0


def _uvicorn_server(config):
    """uvicorn's server without its own signal handling (ours stops it: _stop_on_signals)."""
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            yield

    return Server(config)


@contextlib.contextmanager
def _stop_on_signals(server, engine):
    """SIGINT/SIGTERM: stop serving. The engine thread stops after its current step and ends the
    requests in flight with an error event, so open streams close and uvicorn need not wait for
    them; a second signal stops at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signum, frame):
        logger.warning("%s: shutting the server down", signal.Signals(signum).name)
        if server.should_exit:
            server.force_exit = True
        server.should_exit = True
        engine.request_stop()

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
