"""Ctrl-C (SIGINT) and SIGTERM during scoring: finish the write in progress, then stop.

While armed, a signal interrupts scoring at once (the batch being scored is abandoned: it was
not persisted, a resume redoes it) unless a record is being written, in which case the write
completes first. Disarmed (while the outputs are being written) a signal is only noted.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from dataclasses import dataclass, field
from typing import Any, Iterator

logger = logging.getLogger(__name__)

HANDLED = (signal.SIGINT, signal.SIGTERM)


class Interrupted(BaseException):
    """Raised inside the scoring loop when SIGINT/SIGTERM arrives (a BaseException, like
    KeyboardInterrupt, so document-level ``except Exception`` handlers do not swallow it)."""

    def __init__(self, signum: int):
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum


def exit_code(signum: int) -> int:
    """The shell convention: 128 + signal number (130 for SIGINT, 143 for SIGTERM)."""
    return 128 + signum


@dataclass
class SignalGuard:
    signum: int | None = None
    armed: bool = False
    _writing: int = 0
    _previous: dict[int, Any] = field(default_factory=dict)

    @property
    def stopped(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame: Any) -> None:
        first = self.signum is None
        if first:
            self.signum = signum
        name = signal.Signals(signum).name
        if self.armed and self._writing == 0:
            logger.warning("%s: stopping; finished documents are saved", name)
            raise Interrupted(self.signum)
        if first:
            logger.warning("%s: stopping after the current write", name)

    @contextlib.contextmanager
    def installed(self) -> Iterator["SignalGuard"]:
        """Install the handlers (main thread only; elsewhere signals keep their defaults)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        self._previous = {s: signal.signal(s, self._handle) for s in HANDLED}
        try:
            yield self
        finally:
            for s, handler in self._previous.items():
                signal.signal(s, handler)

    @contextlib.contextmanager
    def arming(self) -> Iterator[None]:
        """Signals interrupt the block (outside :meth:`writing`)."""
        self.armed = True
        try:
            if self.signum is not None:
                raise Interrupted(self.signum)
            yield
        finally:
            self.armed = False

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """A write that a signal must not cut short; a signal that came during it stops right after."""
        self._writing += 1
        try:
            yield
        finally:
            self._writing -= 1
        if self.armed and self._writing == 0 and self.signum is not None:
            raise Interrupted(self.signum)
