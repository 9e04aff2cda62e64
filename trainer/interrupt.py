"""Graceful stop for long training runs: the first SIGINT (Ctrl-C) or SIGTERM sets a flag that the training
loop polls between steps (it then writes its checkpoint and the bundle of what was learnt); a second one
raises KeyboardInterrupt at once. Handlers are installed only in the main thread and restored on exit."""

from __future__ import annotations

import signal
import sys
import threading

__all__ = ["GracefulStop"]

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class GracefulStop:
    """Context manager; call the instance (``stop()``) to ask whether a stop was requested."""

    def __init__(self, message: str = "stopping after this step and writing what was learnt so far "
                                      "(again to abort)"):
        self.message = message
        self.signal: int | None = None
        self._previous: dict[int, object] = {}

    def __call__(self) -> bool:
        return self.signal is not None

    def _handle(self, signum, frame) -> None:
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signum
        print(f"\n{signal.Signals(signum).name}: {self.message}", file=sys.stderr, flush=True)

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            for sig in _SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
