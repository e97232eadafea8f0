"""Waiting for ranks to start: on progress, not on a fixed deadline.

A rank reports how far it got (`report_key`: "started", "joining", "joined", then
"<layers read>/<layers>" from engine.load_progress); for a local process the driver also counts its CPU time, so that a
rank still importing (nothing reported yet) shows it is alive. On a busy machine a start takes
as long as it takes; the driver gives up only when no waiting rank has moved for `timeout_s`
(ranks can wait on each other while they join, so one rank's pause alone is not a stall), and
then names the ones furthest behind: "rank 1 hung before loading (no progress for 20 s)" or
"rank 2 made no progress for 120 s (last: layer 7 of 30 read)". Ranks join the process group
only after all of them checked in (`wait_for_go`), so the rendezvous' own fixed timeout never
runs while a slow peer is still starting.
"""

from __future__ import annotations

import time


GO_KEY = "start/go"  # set by the driver once every rank checked in: then they all join the group


def report_key(rank: int) -> str:
    return f"progress/{rank}"


def wait_for_go(store, poll_s: float = 0.05) -> None:
    """Wait, without a deadline, until the driver says every rank checked in. Joining the process
    group only then keeps its rendezvous (which has a fixed timeout) from waiting on a rank that
    is still importing on a busy machine; a driver that dies takes this rank with it (mp: orphan
    watch; Ray: an actor dies with its owner)."""
    while not store.check([GO_KEY]):
        time.sleep(poll_s)


def layers_text(done: int, total: int) -> str:
    return f"{done}/{total}"


def cpu_ticks(pid: int) -> int | None:
    """utime + stime of a local process (/proc), None when unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])
    except (OSError, IndexError, ValueError):
        return None


# what ranks report before their layers, in order ("joining": inside the group's rendezvous)
STAGES = ("started", "joining", "joined")
LOADING = len(STAGES) + 1


def stage(text: str | None) -> tuple[int, int]:
    """How far a report says the rank got, for naming the ranks furthest behind."""
    if text is None:
        return (0, 0)
    if text in STAGES:
        return (STAGES.index(text) + 1, 0)
    done, _, _ = text.partition("/")
    return (LOADING, int(done)) if done.isdigit() else (1, 0)


def describe(text: str | None) -> str:
    """The last thing a rank reported, in words."""
    if text is None:
        return "nothing reported"
    if text == "started":
        return "started, not yet in the process group"
    if text == "joining":
        return "joining the process group"
    if text == "joined":
        return "joined the process group"
    done, _, total = text.partition("/")
    return f"layer {done} of {total} read"


class StartupWatch:
    def __init__(self, ranks, timeout_s: float):
        now = time.monotonic()
        self.timeout_s = timeout_s
        self.state: dict[int, tuple] = {r: (None, None) for r in ranks}
        self.since: dict[int, float] = {r: now for r in ranks}  # last progress
        self.busy_since: dict[int, float] = {r: now for r in ranks}  # last CPU time used (local ranks)

    def saw(self, rank: int, text: str | None, pid: int | None = None) -> None:
        """Record what `rank` reported (and, for a local process, its CPU time) now."""
        now, (old_text, old_ticks) = time.monotonic(), self.state[rank]
        ticks = cpu_ticks(pid) if pid else None
        if ticks != old_ticks:
            self.busy_since[rank] = now
        # CPU time is progress, except for a rank that checked in ("started") and polls until every
        # other rank did: it uses CPU without moving on.
        if text != old_text or (ticks != old_ticks and text != "started"):
            self.since[rank] = now
        self.state[rank] = (text, ticks)

    def text(self, rank: int) -> str | None:
        return self.state[rank][0]

    def stalled(self, pending) -> list[int]:
        """The ranks to blame when no pending rank moved for timeout_s, else []."""
        pending = list(pending)
        if not pending:
            return []
        now = time.monotonic()
        if min(now - self.since[r] for r in pending) <= self.timeout_s:
            return []
        behind = min(stage(self.text(r)) for r in pending)
        culprits = [r for r in sorted(pending) if stage(self.text(r)) == behind]
        # of ranks equally far, the ones that used no CPU at all (stopped, not waiting) are to blame
        idle = [r for r in culprits if self.state[r][1] is not None and now - self.busy_since[r] > self.timeout_s]
        return idle or culprits

    def message(self, ranks, where: dict[int, str] | None = None) -> str:
        """Why `ranks` stalled; `where` adds e.g. "pid 123" after a rank's number."""
        now = time.monotonic()
        parts = []
        for r in ranks:
            text, quiet = self.text(r), now - self.since[r]
            name = f"rank {r}" + (f" ({where[r]})" if where and r in where else "")
            if stage(text)[0] < LOADING:
                parts.append(f"{name} hung before loading (no progress for {quiet:.0f} s; last: {describe(text)})")
            else:
                parts.append(f"{name} made no progress for {quiet:.0f} s (last: {describe(text)})")
        return "; ".join(parts)

