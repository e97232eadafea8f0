"""Which ranks of an SPMD job are still there, for naming the one that failed.

Under torchrun no rank owns the others' processes, so each rank publishes its host and pid in
the job's store and bumps a heartbeat counter there every second from a background thread.
When a collective fails, `diagnose` names the ranks whose process is gone (same host: /proc)
or whose heartbeat stopped (any host), plus any error text a rank reported before leaving.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from datetime import timedelta

import torch.distributed as dist

logger = logging.getLogger(__name__)


def pid_alive(pid: int) -> bool:
    """True while `pid` runs on this host (a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except FileNotFoundError:
        return False
    except (OSError, IndexError):  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            return True


class PeerWatch:
    def __init__(self, host: str, port: int, rank: int, world_size: int, namespace: str,
                 interval_s: float = 1.0, timeout_s: float = 10.0):
        self.rank, self.world_size, self.interval_s = rank, world_size, interval_s
        self.ns = namespace
        self.hostname = socket.gethostname()
        timeout = timedelta(seconds=timeout_s)
        # one client per thread: the heartbeat never waits behind a diagnosis
        self.store = dist.TCPStore(host, port, is_master=False, timeout=timeout)
        self._beat_store = dist.TCPStore(host, port, is_master=False, timeout=timeout)
        self._halt = threading.Event()
        self.store.set(self._key("proc", rank), json.dumps({"host": self.hostname, "pid": os.getpid()}))
        self._thread = threading.Thread(target=self._beat, name="qshard-heartbeat", daemon=True)
        self._thread.start()

    @classmethod
    def from_env(cls, rank: int, world_size: int) -> "PeerWatch | None":
        """Over torchrun's store (MASTER_ADDR:MASTER_PORT); None when it cannot be reached."""
        host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
        if not host or not port:
            return None
        run = f"{os.environ.get('TORCHELASTIC_RUN_ID', 'none')}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
        try:
            return cls(host, int(port), rank, world_size, f"qshard/peers/{run}")
        except Exception as e:  # diagnosis is a courtesy; never fail start-up over it
            logger.warning("rank %d: no peer heartbeats (%s); failures will not name the rank", rank, e)
            return None

    def _key(self, kind: str, rank: int) -> str:
        return f"{self.ns}/{kind}/{rank}"

    def _beat(self) -> None:
        while not self._halt.wait(self.interval_s):
            try:
                self._beat_store.add(self._key("beat", self.rank), 1)
            except Exception:  # the store's host is gone: the job is ending
                return

    def stop(self) -> None:
        self._halt.set()

    def report_error(self, text: str) -> None:
        try:
            self.store.set(self._key("error", self.rank), text)
        except Exception:
            pass

    def wait_for_error(self, rank: int, timeout_s: float) -> bool:
        """Wait until `rank` reported an error or its process is gone (same host); True if it did either."""
        deadline = time.monotonic() + timeout_s
        try:
            proc = json.loads(self.store.get(self._key("proc", rank))) if self.store.check([self._key("proc", rank)]) \
                else None
            while time.monotonic() < deadline:
                if self.store.check([self._key("error", rank)]):
                    return True
                if proc and proc["host"] == self.hostname and not pid_alive(proc["pid"]):
                    return True
                time.sleep(0.05)
        except Exception:  # the store is gone: so is the job
            return True
        return False

    def _beats(self, ranks) -> dict[int, int]:
        return {r: self.store.add(self._key("beat", r), 0) for r in ranks}

    def diagnose(self, wait_s: float = 6.0) -> tuple[list[tuple[int, str]], dict[int, str]]:
        """(ranks that are gone, with why; error text reported by any rank)."""
        others = [r for r in range(self.world_size) if r != self.rank]
        gone: list[tuple[int, str]] = []
        errors: dict[int, str] = {}
        try:
            procs = {}
            for r in others:
                if self.store.check([self._key("proc", r)]):
                    procs[r] = json.loads(self.store.get(self._key("proc", r)))
            start, first = time.monotonic(), self._beats(others)
            while True:
                gone = [(r, f"pid {p['pid']} on {p['host']} is gone") for r, p in procs.items()
                        if p["host"] == self.hostname and not pid_alive(p["pid"])]
                if gone:
                    break
                waited = time.monotonic() - start
                if waited >= min(wait_s, 3 * self.interval_s + 0.5):
                    now = self._beats(others)
                    gone = [(r, f"no heartbeat for {waited:.1f}s") for r in others if now[r] == first[r]]
                    if gone or waited >= wait_s:
                        break
                time.sleep(0.2)
            for r in others:
                if self.store.check([self._key("error", r)]):
                    errors[r] = self.store.get(self._key("error", r)).decode()
        except Exception as e:  # the store went with the failure; report what we have
            logger.warning("rank %d: could not finish diagnosing peers: %s", self.rank, e)
        return gone, errors
