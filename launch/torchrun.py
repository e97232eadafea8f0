"""`torchrun --nproc-per-node N -m launch.torchrun generate|bench throughput ...`

Every rank runs this same program on torchrun's process group (SPMD, like vLLM's external
launcher): `LLM(...)` sees torchrun's environment and uses the `external` executor, rank 0
tokenizes, schedules, samples and prints, the other ranks follow its step broadcasts. The
subcommands take the same arguments as `qshard generate` / `qshard bench throughput`; the
tensor-parallel size and the executor come from torchrun (WORLD_SIZE, `external`).

Failures: a rank that fails reports its error in torchrun's store and exits 1; the others'
collectives fail and rank 0 logs which rank went away (`WorkerFailure`). torchrun's agent then
stops every remaining rank with SIGTERM: a rank keeps up to GRACE_S seconds to finish its
report, then leaves. qshard's own errors (a bad argument, config, checkpoint: QShardError) are
printed once, by rank 0, as one `error: <message>` line (launch.cli.report_error; the traceback
with --debug or QSHARD_DEBUG=1), and every rank that raised one exits 2; the others say nothing.
Ctrl-C (SIGINT to any rank, rank 0 alone included) ends that rank at once with exit 130
("interrupted"), and the agent stops the others.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
import threading

from parallel.state import launched_by_torchrun

# subcommand -> module with add_arguments(parser) / run(args); `serve` will join here
COMMANDS = {
    "generate": "launch.cmd_generate",
    "serve": "launch.cmd_serve",
}
BENCH = {
    "throughput": "launch.bench_throughput",
}
GRACE_S = 5.0

logger = logging.getLogger("launch.torchrun")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="torchrun -m launch.torchrun",
                                     description="qshard under torchrun: one process per tensor-parallel rank")
    parser.add_argument("--log-level", default="INFO", help="rank 0's logging level (other ranks: WARNING)")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module in COMMANDS.items():
        p = sub.add_parser(name)
        _add(p, module)
    bench = sub.add_parser("bench").add_subparsers(dest="bench", required=True)
    for name, module in BENCH.items():
        _add(bench.add_parser(name), module)
    return parser


def _add(p: argparse.ArgumentParser, module: str) -> None:
    importlib.import_module(module).add_arguments(p)
    # torchrun decides these; None tells an explicit --tp apart from the default
    p.set_defaults(_module=module, tp=None, executor=None)


def _on_sigterm(signum, frame) -> None:
    """torchrun's agent stops the survivors of a failure: let this rank finish its report."""
    logging.getLogger("launch.torchrun").warning("rank %s: stopped by torchrun (another rank failed)",
                                                 os.environ.get("RANK"))
    timer = threading.Timer(GRACE_S, lambda: os._exit(128 + signum))
    timer.daemon = True  # a rank that finishes its report sooner exits with its own code
    timer.start()


def main(argv: list[str] | None = None) -> int:
    if not launched_by_torchrun():
        print("launch.torchrun runs under torchrun: torchrun --nproc-per-node N -m launch.torchrun generate ...",
              file=sys.stderr)
        return 2
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    args = build_parser().parse_args(argv)
    level = getattr(logging, str(args.log_level).upper(), logging.INFO) if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format=f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s")
    if args.tp is not None and str(args.tp) != str(world):
        print(f"--tp {args.tp} disagrees with torchrun's {world} ranks: leave --tp out under torchrun",
              file=sys.stderr)
        return 2
    if args.executor not in (None, "auto", "external"):
        print(f"--executor {args.executor} makes no sense under torchrun (it is always 'external')", file=sys.stderr)
        return 2
    args.tp = world if args.command == "generate" else str(world)
    args.executor = "external"
    signal.signal(signal.SIGTERM, _on_sigterm)
    from engine.executor import WorkerFailure
    from kernels.errors import QShardError
    from launch.cli import debug_requested, report_error

    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except WorkerFailure as e:  # every rank logs what it saw; rank 0 also ends with the error line
        logger.error("WorkerFailure: %s", e)
        if rank == 0:
            report_error(e, False)
        _leave(2 if rank == 0 else 1)
    except QShardError as e:
        if rank == 0:
            report_error(e, debug_requested())
            sys.stderr.flush()
        elif debug_requested():
            logger.exception("rank %d: %s", rank, e)
        # The others usually raise the same error: they wait (a little) for rank 0's, since a rank
        # that left first would have torchrun's agent stop rank 0 before it printed the line.
        _report(e, wait_for_rank0_s=0 if rank == 0 else GRACE_S)
        _leave(2)
    except KeyboardInterrupt:
        print(f"rank {rank}: interrupted", file=sys.stderr)
        _leave(130)
    except Exception as e:
        _report(e)
        raise


def _leave(code: int) -> None:
    """Exit now: tearing down a broken process group at interpreter exit can block until
    torchrun's agent kills us, which would hide this rank's exit code."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _report(error: BaseException, wait_for_rank0_s: float = 0) -> None:
    """Leave this rank's error in torchrun's store for the others' diagnosis; then, if asked,
    wait until rank 0 reported one too or is gone."""
    from engine.executor.peers import PeerWatch

    try:
        watch = PeerWatch.from_env(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]))
        if watch is not None:
            watch.report_error(f"rank {os.environ['RANK']}: {type(error).__name__}: {error}")
            if wait_for_rank0_s > 0:
                watch.wait_for_error(0, wait_for_rank0_s)
            watch.stop()
    except Exception:
        pass


if __name__ == "__main__":
    sys.exit(main())
