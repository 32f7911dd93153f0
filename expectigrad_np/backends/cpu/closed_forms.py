"""The lazy closed forms (``lazy.py``) compiled, as bucket methods: a mixin
of the buckets of the backends that have numba (cpu, cuda).  ``rows.py``,
which compiles them, is imported on first use."""
from __future__ import annotations

__all__ = ["CompiledRows"]


def _compiled(name):
    """A static method calling ``rows.<name>``."""
    def call(*args):
        from . import rows
        return getattr(rows, name)(*args)
    call.__name__ = name
    return staticmethod(call)


class CompiledRows:
    """``Bucket``'s closed-form methods, compiled."""

    row_coefficients = _compiled("row_coefficients")
    coefficients = _compiled("coefficients")
    window_sum = _compiled("window_sum")
    all_coefficients = _compiled("all_coefficients")
