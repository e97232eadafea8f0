"""Stop every rank at once when the driver alone gets SIGINT (Ctrl-C) or SIGTERM.

Python runs a signal handler only when the main thread comes back to the interpreter. A driver
inside a gloo collective may not come back for a long time, and once it does, a graceful STOP
broadcast pairs with whatever collective the followers are still in and waits for the gloo
timeout: that is how one Ctrl-C took 30-122 s. So an `InterruptGuard` also sets a wakeup fd:
the C-level handler writes the signal number to it at once, and a thread reading it calls
`on_signal` (the executor kills its ranks, or marks itself broken) straight away. A killed peer
fails the collective the main thread is in, and the Python-level handler then raises
KeyboardInterrupt (SIGINT) or SystemExit(128 + signum) (SIGTERM), so that the program unwinds
with its cleanup and atexit hooks run (dying by the signal itself would leak semaphores).

A handler the program had installed runs after `on_signal` instead of the raise; a signal the
program ignores stays ignored. Install from the main thread only (elsewhere it does nothing).
"""

from __future__ import annotations

import logging
import signal
import socket
import threading
from typing import Callable

logger = logging.getLogger(__name__)

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class InterruptGuard:
    def __init__(self, on_signal: Callable[[int], None], what: str = "ranks", signals=SIGNALS):
        self.on_signal = on_signal
        self.signals = tuple(signals)
        self.what = what
        self.received: int | None = None  # the first SIGINT/SIGTERM seen
        self._acted = threading.Lock()
        self._handled = 0  # signals the Python-level handler ran for
        self._raised = 0  # signals raised for (a second Ctrl-C raises again)
        self._previous: dict[int, object] = {}
        self._wakeup_previous = -1
        self._sockets: tuple[socket.socket, socket.socket] | None = None

    # -- install / restore ------------------------------------------------------------------------

    def install(self) -> "InterruptGuard":
        if threading.current_thread() is not threading.main_thread():
            return self
        for sig in self.signals:
            previous = signal.getsignal(sig)
            if previous is signal.SIG_IGN or previous is None:  # ignored, or set outside Python
                continue
            self._previous[sig] = previous
            signal.signal(sig, self._handle)
        if self._previous:
            self._start_wakeup()
        return self

    def _start_wakeup(self) -> None:
        reader, writer = socket.socketpair()
        writer.setblocking(False)
        try:
            previous = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
        except ValueError:  # not the main thread of the main interpreter
            reader.close()
            writer.close()
            return
        if previous != -1:  # someone (an asyncio loop) reads it already: leave theirs in place
            signal.set_wakeup_fd(previous)
            reader.close()
            writer.close()
            return
        self._wakeup_previous, self._sockets = previous, (reader, writer)
        threading.Thread(target=self._read_wakeups, args=(reader,), name="qshard-interrupt", daemon=True).start()

    def restore(self) -> None:
        """Put the program's handlers back (idempotent)."""
        if threading.current_thread() is threading.main_thread():
            for sig, previous in self._previous.items():
                if signal.getsignal(sig) == self._handle:
                    signal.signal(sig, previous)
            if self._sockets is not None:
                current = signal.set_wakeup_fd(self._wakeup_previous)
                if current != self._sockets[1].fileno():  # someone set theirs after ours: keep it
                    signal.set_wakeup_fd(current)
        self._previous.clear()
        if self._sockets is not None:
            for s in self._sockets:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()
            self._sockets = None

    # -- the signal ---------------------------------------------------------------------------------

    def _read_wakeups(self, reader: socket.socket) -> None:
        while True:
            try:
                data = reader.recv(64)
            except OSError:
                return
            if not data:
                return
            for signum in data:
                if signum in self._previous:
                    self._act(signum)

    def _act(self, signum: int) -> None:
        """Run on_signal once, from whichever of the wakeup thread and the handler comes first."""
        with self._acted:
            if self.received is not None:
                return
            self.received = signum
        logger.warning("%s received: stopping the %s", signal.Signals(signum).name, self.what)
        try:
            self.on_signal(signum)
        except Exception as e:  # never let cleanup hide the interrupt itself
            logger.warning("stopping the %s after %s: %s", self.what, signal.Signals(signum).name, e)

    def _handle(self, signum, frame) -> None:
        self._act(signum)
        self._handled += 1
        previous = self._previous.get(signum)
        if callable(previous) and previous is not signal.default_int_handler:
            previous(signum, frame)
            return
        if self._handled > self._raised:
            self._raised = self._handled
            raise _exception(signum)

    def raise_now(self) -> None:
        """Raise what the first signal means, unless it was raised already: a collective that
        failed because on_signal killed a peer comes here, so it does not pass for a rank failure."""
        if self.received is None or self._raised:
            return
        self._raised = 1
        raise _exception(self.received)


def _exception(signum: int) -> BaseException:
    return KeyboardInterrupt() if signum == signal.SIGINT else SystemExit(128 + signum)
