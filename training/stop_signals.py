"""Ctrl-C and SIGTERM during training: stop at the next consistent point, never inside a write.

While ``deferred_stop()`` is active, the first SIGINT or SIGTERM only sets a flag (and says so in
one line); the training loop checks it between steps, saves a checkpoint there and raises
``TrainingInterrupted``. A second signal raises ``KeyboardInterrupt`` at once, except inside a
``critical()`` section (a checkpoint or log write), where it waits for the section to end. Signal
handlers can only be installed from the main thread; elsewhere the block runs unchanged.
"""
from __future__ import annotations

import contextlib
import signal
import sys
import threading
from typing import Iterator, Optional

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on a signal after step ``step``; the checkpoint of that step is on disk."""

    def __init__(self, step: int, signum: int, checkpoint):
        name = signal.Signals(signum).name
        super().__init__(f"{name} received: stopped after step {step}, checkpoint {checkpoint} saved "
                         "(continue with `train --resume`)")
        self.step, self.signum, self.checkpoint = step, signum, checkpoint

    def __str__(self) -> str:
        return self.args[0]


class StopRequests:
    def __init__(self):
        self.signum: Optional[int] = None
        self.count = 0
        self._critical = 0

    @property
    def requested(self) -> bool:
        return self.count > 0

    def _handle(self, signum, frame) -> None:
        self.count += 1
        self.signum = self.signum or signum
        if self.count == 1:
            sys.stderr.write(f"\n{signal.Signals(signum).name}: finishing this step and saving a checkpoint "
                             "(again to stop at once)\n")
            sys.stderr.flush()
        elif not self._critical:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def critical(self) -> Iterator[None]:
        """A section a second signal must not cut (a file write)."""
        self._critical += 1
        try:
            yield
        finally:
            self._critical -= 1
        if self.count > 1 and not self._critical:
            raise KeyboardInterrupt


@contextlib.contextmanager
def deferred_stop() -> Iterator[StopRequests]:
    requests = StopRequests()
    if threading.current_thread() is not threading.main_thread():
        yield requests
        return
    # a signal the process was started to ignore (SIGINT of a `nohup ... &` job) stays ignored
    previous = {sig: handler for sig in SIGNALS if (handler := signal.getsignal(sig)) is not signal.SIG_IGN}
    for sig in previous:
        signal.signal(sig, requests._handle)
    try:
        yield requests
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)  # None: set outside Python
