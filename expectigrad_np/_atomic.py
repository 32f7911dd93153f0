"""All-or-nothing steps under Ctrl-C.

Python runs a signal handler between bytecodes, so a ``KeyboardInterrupt``
can land between two kernel calls of one step (several dtypes, staged
parameters) and leave it half done.  ``interrupts_deferred()`` holds SIGINT
back for the duration of a block in the main thread and delivers it, as
the handler that was installed would have, once the block has finished.
(The one-call compiled route needs none of this: a signal cannot land in
the middle of a compiled call, and the kernel advances every count.)
"""
from __future__ import annotations

import contextlib
import signal
import threading

__all__ = ["interrupts_deferred"]


@contextlib.contextmanager
def interrupts_deferred():
    if threading.current_thread() is not threading.main_thread():
        yield                       # signals are only ever handled in the main thread
        return
    try:
        previous = signal.getsignal(signal.SIGINT)
    except (ValueError, OSError):
        yield
        return
    if previous is None or previous in (signal.SIG_IGN, signal.SIG_DFL):
        yield
        return
    received = []
    signal.signal(signal.SIGINT, lambda signum, frame: received.append(frame))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received and callable(previous):
            previous(signal.SIGINT, received[0])
