"""Integer addresses as typed pointers inside compiled code.

The kernels reach arrays they are not passed (parameters and state through
recorded data addresses, NumPy's array objects through ``id``) by turning an
integer address into a pointer and wrapping it with ``numba.carray``.  The
caller keeps every object behind such an address alive for the call.
"""
from __future__ import annotations

from numba import types
from numba.extending import intrinsic

__all__ = ["pointer_like", "pointer_of", "pointer_to"]


def _inttoptr(ptr_type):
    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(ptr_type))
    return codegen


@intrinsic
def pointer_like(typingctx, address, like):
    """A pointer to elements of ``like``'s dtype (``like`` an array)."""
    ptr_type = types.CPointer(like.dtype)
    return ptr_type(address, like), _inttoptr(ptr_type)


@intrinsic
def pointer_of(typingctx, address, dtype):
    """A pointer to ``dtype`` elements (``dtype`` a NumPy scalar class such
    as ``np.uint32``)."""
    ptr_type = types.CPointer(dtype.instance_type)
    return ptr_type(address, dtype), _inttoptr(ptr_type)


@intrinsic
def pointer_to(typingctx, address, scalar):
    """A pointer to elements of ``scalar``'s type (``scalar`` a value)."""
    ptr_type = types.CPointer(scalar)
    return ptr_type(address, scalar), _inttoptr(ptr_type)
