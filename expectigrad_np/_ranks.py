"""Exceptions that reach every rank of a communicator.

An exception object may not pickle, or not rebuild from its arguments, so
between ranks only a report travels: its kind and its text.  The kind is
one of ``KINDS`` where the exception is one (so that ``except OSError``, or
``TypeError``, around a collective call catches on every rank alike), else
the caller's default.  Nothing here imports mpi4py: ``comm`` is any object
with ``allgather``.
"""
from __future__ import annotations

KINDS = (FloatingPointError, TypeError, OSError, ValueError)
_BY_NAME = {k.__name__: k for k in KINDS + (RuntimeError,)}


def report(error, default=ValueError):
    """A rank's error as it travels: ``(kind name, text)``, or None for no
    error.  The text is the message, behind the exception's type name
    where that is not the kind's."""
    if error is None:
        return None
    kind = next((k for k in KINDS if isinstance(error, k)), default)
    name = type(error).__name__
    return kind.__name__, str(error) if name == kind.__name__ else f"{name}: {error}"


def raise_reported(error, reports, says):
    """Raise when some rank reported an error (``reports``, one per rank, in
    rank order): this rank's own ``error`` where it has one, else the first
    report's kind with the message ``says(rank, text)``."""
    for rank, r in enumerate(reports):
        if r is not None:
            if error is not None:
                raise error
            raise _BY_NAME.get(r[0], RuntimeError)(says(rank, r[1]))


def gathered_or_raise(comm, mine, error, what, default=RuntimeError):
    """Every rank's ``mine`` (``comm.allgather``), unless some rank has an
    ``error``: then every rank raises (``raise_reported``), the others'
    message naming ``what`` and the rank."""
    parts = comm.allgather((report(error, default), None if error is not None else mine))
    raise_reported(error, [r for r, _ in parts],
                   lambda rank, text: f"{what} raised on rank {rank}: {text}")
    return [part for _, part in parts]
