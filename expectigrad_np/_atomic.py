"""All-or-nothing steps under Ctrl-C.

Python runs a signal handler between bytecodes, so a ``KeyboardInterrupt``
can land between two kernel calls of one step (several dtypes, staged
parameters) and leave it half done; so can the exception of any handler
that raises (a timeout's SIGALRM, say).  ``interrupts_deferred()`` holds
back SIGINT, and the other signals programs give raising handlers
(``_HELD``), for the duration of a block in the main thread, and delivers
each, as the handler that was installed would have, once the block has
finished.
(The one-call compiled route needs none of this: a signal cannot land in
the middle of a compiled call, and the kernel advances every count.)
"""
from __future__ import annotations

import contextlib
import signal
import threading

__all__ = ["interrupts_deferred"]


# The signals whose Python handlers are held back: Ctrl-C, and those that
# programs give handlers which raise (timeouts, termination, profilers,
# user signals).  Another signal's handler runs as Python runs it.
_HELD = tuple(getattr(signal, name) for name in
              ("SIGINT", "SIGTERM", "SIGALRM", "SIGVTALRM", "SIGPROF", "SIGHUP",
               "SIGUSR1", "SIGUSR2") if hasattr(signal, name))


@contextlib.contextmanager
def interrupts_deferred():
    if threading.current_thread() is not threading.main_thread():
        yield                       # signals are only ever handled in the main thread
        return
    held = []
    try:
        for signum in _HELD:
            previous = signal.getsignal(signum)
            if callable(previous):
                held.append((signum, previous))
    except (ValueError, OSError):
        held = []
    if not held:
        yield
        return
    received = []
    for signum, _ in held:
        signal.signal(signum, lambda signum, frame: received.append((signum, frame)))
    try:
        yield
    finally:
        for signum, previous in held:
            signal.signal(signum, previous)
        handlers = dict(held)
        for k, (signum, frame) in enumerate(received):
            try:
                handlers[signum](signum, frame)
            except BaseException:
                # As Python does with signals pending behind one whose handler
                # raised: the others are still delivered, by their handlers.
                for later, _ in received[k + 1:]:
                    signal.raise_signal(later)
                raise
