"""The CUDA backend: device arrays in, flat optimizer state on the device.

Imported only when the optimizer meets a device array or
``backend="cuda"``; importing it imports ``numba.cuda``.

Parameters and gradients are numba device arrays or any object exporting
``__cuda_array_interface__`` (CuPy arrays, PyTorch CUDA tensors), used in
place: parameters are wrapped once, zero-copy, with ``cuda.as_cuda_array``;
of a gradient only its address, shape and dtype are read each step.

What one ``CudaBucket.step`` does (one bucket = all arrays of one dtype):

1. once per optimizer step (not again for the second call of a two-pass
   step): one asynchronous host-to-device copy of a small table (per array:
   parameter and gradient addresses, 7 coefficients, 3 flags) from a ring
   of pinned host buffers;
2. if ``check_finite``, norm clipping or a stats-only pass asks for it: one
   launch of ``stats_kernel``;
3. unless stats-only: one launch of ``update_kernel``;
4. only with ``check_finite`` or a stats-only pass: a 2-element
   device-to-host copy of ``[bad, total]``, the one synchronisation
   (the refusal must be raised by ``step()``).

Kernels run on the legacy default stream, which CuPy and PyTorch use by
default, or on the stream given as ``Expectigrad(..., stream=)``; a gradient
exported with another stream in its interface is waited for on the device
(an event), without blocking the host.
"""
from __future__ import annotations

import ctypes
import sys

import numpy as np
from numba import cuda

from .. import layout as L
from ..base import Bucket
from ..cpu.closed_forms import CompiledRows
from . import kernels as KC

__all__ = ["CudaBucket", "as_device_parameter", "check_device_parameters",
           "is_device_array"]

# Zero-gradient elements an eager row-sparse step hands one array entry at
# most (consecutive rows with momentum left).
ZERO_SPAN = 1 << 14

# Pinned staging buffers for the per-step table; a buffer is reused only
# once its copy has run (at most RING steps of lead for the host).
RING = 4
_LEGACY_STREAMS = (None, 0, 1, 2)       # interface 'stream' values needing no wait


def is_device_array(x):
    """True for objects this backend treats as device arrays (an object
    whose interface property raises counts: ``describe`` says why)."""
    try:
        if hasattr(x, "__cuda_array_interface__"):
            return True
    except Exception:  # noqa: BLE001
        return True
    return (KC.SIMULATOR and getattr(x, "__cuda_ndarray__", False) is True
            and not isinstance(x, np.ndarray))


def _torch_stream(g):
    """The stream a torch CUDA tensor was produced on: torch's current
    stream on its device (``cuda_stream`` handle).  torch exports version 2
    of the array interface, which names no stream, so a gradient made under
    ``with torch.cuda.stream(s):`` would otherwise not be waited for.  None
    for anything that is not a torch tensor (torch is never imported here)."""
    torch = sys.modules.get("torch")
    if torch is None or not isinstance(g, torch.Tensor):
        return None
    return int(torch.cuda.current_stream(g.device).cuda_stream)


def as_stream(stream, where="stream"):
    """The numba stream kernels run on: the legacy default stream for None
    (named explicitly: ``cuda.default_stream()`` is the per-thread stream
    under ``CUDA_PYTHON_CUDA_PER_THREAD_DEFAULT_STREAM=1``), a numba stream
    as it is, and for a CuPy stream (``.ptr``), a torch stream
    (``.cuda_stream``) or an integer handle, that stream (0 and 1: the
    legacy default stream, 2: the per-thread default stream)."""
    if stream is None:
        return cuda.legacy_default_stream()
    if hasattr(stream, "synchronize") and hasattr(stream, "handle"):     # numba's
        return stream
    handle = stream
    for attribute in ("cuda_stream", "ptr"):          # torch, CuPy
        if hasattr(stream, attribute):
            handle = getattr(stream, attribute)
            break
    if isinstance(handle, (bool, np.bool_)) or not isinstance(handle, (int, np.integer)):
        raise TypeError(f"{where} must be a numba, CuPy or torch CUDA stream or an integer "
                        f"stream handle, got {type(stream).__name__}")
    handle = int(handle)
    if handle < 0:
        raise ValueError(f"{where} handle must be >= 0, got {handle}")
    if handle in (0, 1):
        return cuda.legacy_default_stream()
    if handle == 2:
        return cuda.per_thread_default_stream()
    return cuda.external_stream(handle)


def stream_handle(stream):
    """The integer handle of a numba stream (1 for the legacy default
    stream, as the array interface writes it)."""
    value = getattr(getattr(stream, "handle", None), "value", None)
    if value is None and isinstance(getattr(stream, "handle", None), int):
        value = stream.handle
    return 1 if not value else int(value)


def _c_strides(shape, itemsize):
    strides, step = [], itemsize
    for dim in reversed(shape):
        strides.append(step)
        step *= dim
    return tuple(reversed(strides))


def _c_contiguous(shape, strides, itemsize):
    if strides is None:
        return True
    want = _c_strides(shape, itemsize)
    return all(dim <= 1 or s == w for dim, s, w in zip(shape, strides, want))


_DTYPES = {np.dtype(t).str: np.dtype(t) for t in (np.float32, np.float64)}


def describe(x, where="the array", host_is_none=False):
    """``(address, shape, dtype, c_contiguous, readonly, stream)`` of a device
    array, read from its ``__cuda_array_interface__`` (simulator arrays: from
    the host array behind them).  With ``host_is_none``, None for an object
    that is not a device array (``is_device_array`` false)."""
    try:
        cai = getattr(x, "__cuda_array_interface__", None)
    except Exception as exc:  # noqa: BLE001 - e.g. torch refuses tensors requiring grad
        raise TypeError(
            f"{where} does not give its __cuda_array_interface__: {exc} (for PyTorch "
            "parameters pass p.detach() or p.data, for gradients p.grad)") from None
    if cai is None:
        if host_is_none and not is_device_array(x):
            return None
        a = x._ary                       # a simulator device array
        return (a.ctypes.data, a.shape, a.dtype, a.flags.c_contiguous,
                not a.flags.writeable, None)
    if cai.get("mask") is not None:
        raise TypeError(f"{where} is a masked device array; masks are not supported")
    shape = tuple(map(int, cai["shape"]))
    typestr = cai["typestr"]
    dtype = _DTYPES.get(typestr) or np.dtype(typestr)
    address, readonly = cai["data"]
    address = int(address or 0)
    if address % dtype.itemsize and int(np.prod(shape)):
        # A misaligned 4- or 8-byte load is CUDA_ERROR_MISALIGNED_ADDRESS on
        # the device: sticky, it ends the CUDA context.
        raise ValueError(
            f"{where} starts at device address {address:#x}, which is not a multiple "
            f"of its itemsize {dtype.itemsize}: the kernels' loads would fault. Pass "
            "an aligned array (a copy, e.g. cupy.ascontiguousarray(a.copy()) or "
            "tensor.clone()); nothing was changed")
    return (address, shape, dtype,
            _c_contiguous(shape, cai.get("strides"), dtype.itemsize),
            bool(readonly), cai.get("stream"))


def as_device_parameter(x, where):
    """A parameter on the device as a numba device array viewing the same
    memory (zero-copy), after the checks the host path makes."""
    address, shape, dtype, contiguous, readonly, _ = describe(x, where)
    if dtype not in (np.float32, np.float64):
        raise TypeError(f"{where} has dtype {dtype}; parameters must be "
                        "float32 or float64")
    if readonly:
        raise ValueError(f"{where} is read-only; parameters are updated in place")
    if not contiguous:
        raise ValueError(f"{where} is not C-contiguous; device parameters must "
                         "be contiguous (e.g. cupy.ascontiguousarray, "
                         "tensor.contiguous())")
    if KC.SIMULATOR:
        if hasattr(x, "__cuda_array_interface__"):
            # Simulated device memory is host memory: view it in place.
            nbytes = int(np.prod(shape)) * dtype.itemsize
            host = (np.frombuffer((ctypes.c_char * nbytes).from_address(address), dtype)
                    if nbytes else np.empty(0, dtype))
            from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray
            return FakeCUDAArray(host.reshape(shape))
        return x
    from numba.cuda.cudadrv.devicearray import DeviceNDArray
    if isinstance(x, DeviceNDArray):
        return x
    return cuda.as_cuda_array(x)


def check_device_parameters(params, names):
    """Every parameter on the device, none sharing memory with another."""
    spans = []
    for p, name in zip(params, names):
        if isinstance(p, np.ndarray):
            raise TypeError(
                f"backend 'cuda' needs device arrays, but {name} is a host "
                "numpy array; move it to the GPU (numba.cuda.to_device, "
                "cupy.asarray, tensor.cuda()) or use backend='cpu'")
        address, shape, dtype, *_ = describe(p, name)
        nbytes = int(np.prod(shape)) * dtype.itemsize
        if nbytes:
            spans.append((address, address + nbytes, name))
    spans.sort()
    for (lo1, hi1, n1), (lo2, hi2, n2) in zip(spans, spans[1:]):
        if lo2 < hi1:        # contiguous arrays: overlapping bytes = shared memory
            raise ValueError(f"{n1} and {n2} share memory; every parameter "
                             "must be a distinct, non-overlapping array")


def _event():
    return cuda.event() if KC.SIMULATOR else cuda.event(timing=False)


def _zeros(size, dtype):
    a = cuda.device_array(max(int(size), 1), dtype)
    _fill_zero(a)
    return a


def _fill_zero(a):
    if KC.SIMULATOR:
        a.copy_to_device(np.zeros(a.shape, a.dtype))
    else:
        KC.zero_kernel[min(1024, (a.size + 255) // 256), 256](a)


class CudaBucket(CompiledRows, Bucket):
    """Flat state of one dtype on the device; one update launch per step.

    ``mean_sq``, ``count`` (if any array uses the sparse counter) and
    ``momentum`` (once any array has ``beta > 0``) are device arrays with one
    segment per parameter, as in ``base.Bucket``.
    """

    backend = "cuda"

    def __init__(self, dtype, slots, params, names, sparse, momentum, chunk=None,
                 stream=None):
        super().__init__(dtype, slots, params, names, sparse, momentum)
        n = len(self.params)
        self._torch_grads = []
        self.kernels = KC.kernels(self.dtype)
        self.stream = as_stream(stream)
        self._handle = stream_handle(self.stream)
        # Interface 'stream' values that need no wait: work on the legacy
        # default stream (1, or 0 and None from old exporters) or the
        # per-thread one (2) is ordered before ours when ours is the legacy
        # stream; on a stream of our own, only that stream's own handle.
        self._no_wait = ((None, 0, 1, 2) if self._handle == 1 else (None, self._handle))
        self.chunk, seg, lo, hi, first, big = KC.make_layout(
            self.sizes, KC.CHUNK if chunk is None else chunk)
        self.n_chunks = int(seg.size)
        self.n_big = int(big.size)
        dev = lambda a: cuda.to_device(np.ascontiguousarray(a))  # noqa: E731
        self.d_offsets = dev(self.offsets)
        self.d_seg, self.d_lo, self.d_hi = dev(seg), dev(lo), dev(hi)
        self.d_first = dev(first)
        self.d_big = dev(big if big.size else np.zeros(1, np.int64))
        nc = max(self.n_chunks, 1)
        self.d_chunk_sq = cuda.device_array((nc, 2), self.dtype)
        self.d_chunk_bad = cuda.device_array(nc, np.int32)
        self.d_sumsq = cuda.device_array((max(n, 1), 2), self.dtype)
        self.d_array_bad = cuda.device_array(max(n, 1), np.int32)
        self.d_scale = cuda.device_array(max(n, 1), self.dtype)
        self.d_result = cuda.to_device(np.array([-1, 0, 0], self.dtype))
        self.d_counter = cuda.to_device(np.zeros(1, np.uint32))
        self.h_result = cuda.pinned_array(3, self.dtype)
        if KC.SIMULATOR:
            self.blocks = KC.SIMULATOR_BLOCKS
        else:
            sms = cuda.get_current_device().MULTIPROCESSOR_COUNT
            self.blocks = int(sms) * KC.BLOCKS_PER_SM

        # Per-step table: [parameter address, gradient address, step t, index
        # of element 0 (n, 4) int64 | coefficients (n, 11) dtype], one byte
        # buffer so that one copy uploads it.
        self._addr_bytes = 8 * len(KC.ADDR_FIELDS) * n
        nbytes = self._addr_bytes + n * len(KC.TABLE_FIELDS) * self.dtype.itemsize
        self._nbytes = max(nbytes, 16)
        self.d_buffer = cuda.device_array(self._nbytes, np.uint8)
        self.d_addr, self.d_table = self._split(self.d_buffer, n)
        self._ring = [cuda.pinned_array(self._nbytes, np.uint8) for _ in range(RING)]
        self._events = [None] * RING
        self._slot = 0
        self.addr = np.zeros((n, len(KC.ADDR_FIELDS)), np.int64)
        self.addr[:, 0] = [describe(p)[0] for p in self.params]
        self._pending = True
        self.grads = [None] * n

    def _zeros(self, size, dtype, name):
        """Zeroed flat state on the device (at least one element: numba
        launches need a nonempty array)."""
        return _zeros(max(size, 1), dtype)

    def _split(self, buffer, n):
        a = self._addr_bytes
        addr = buffer[:a].view(np.int64).reshape(n, len(KC.ADDR_FIELDS)) if n else None
        table = buffer[a:a + n * len(KC.TABLE_FIELDS) * self.dtype.itemsize]
        return addr, table.view(self.dtype).reshape(n, len(KC.TABLE_FIELDS))

    # --- state -----------------------------------------------------------------

    def _fields(self):
        return {name: getattr(self, name) for name in self.STATE_FIELDS
                if name in self.stored}

    def read_state(self, k):
        """Array ``k``'s state as host copies in the parameter's shape."""
        a, b = int(self.offsets[k]), int(self.offsets[k + 1])
        shape = self.shapes[k]
        return {name: (flat[a:b].copy_to_host() if b > a
                       else np.zeros(0, flat.dtype)).reshape(shape)
                for name, flat in self._fields().items()}

    def write_state(self, k, arrays, t=None):
        """Overwrite array ``k``'s state from host arrays; a stored field
        missing from ``arrays`` is zeroed (``t`` is for the host buckets'
        uniform-count flag; the device kernel has no such path)."""
        if "momentum" in arrays:
            self.ensure_momentum()
        a, b = int(self.offsets[k]), int(self.offsets[k + 1])
        if b == a:
            return
        for name, flat in self._fields().items():
            host = np.empty(b - a, flat.dtype)
            host[...] = np.broadcast_to(np.asarray(arrays.get(name, 0)),
                                        self.shapes[k]).reshape(-1)
            flat[a:b].copy_to_device(host)

    # --- stepping -----------------------------------------------------------------

    def load_gradients(self, grads, ids=None):
        """Check this bucket's gradients (device arrays of the parameter's
        shape and dtype, C-contiguous) and record their addresses."""
        addresses = []
        waits = []
        torch_grads = []
        for k, g in enumerate(grads):
            if g is None:
                addresses.append(0)
                continue
            # One read of the array interface (a dict built by a Python
            # property of numba's and CuPy's arrays): the check for a host
            # array comes after it, where the interface is missing.
            where = f"the gradient of {self.names[k]}"
            described = describe(g, where, host_is_none=True)
            if described is None:
                raise TypeError(
                    f"{where} is a host {type(g).__name__}, but its parameter is on "
                    "the device; pass a device array (numba, CuPy, PyTorch CUDA)")
            address, shape, dtype, contiguous, _, stream = described
            if shape != self.shapes[k]:
                raise ValueError(f"{where} has shape {shape}, but its parameter "
                                 f"has shape {self.shapes[k]}")
            if dtype != self.dtype:
                raise TypeError(f"{where} has dtype {dtype}; it must have its "
                                f"parameter's dtype {self.dtype} (cast it on the "
                                "device first)")
            if not contiguous:
                raise ValueError(f"{where} is not C-contiguous; make it contiguous "
                                 "on the device first")
            addresses.append(address)
            if stream is None:
                stream = _torch_stream(g)
                if stream is not None:
                    torch_grads.append(g)
            if stream not in self._no_wait:
                waits.append(stream)
        self.addr[:, 1] = addresses
        # Kept alive until the next step's kernels are queued behind ours.
        self.grads = list(grads)
        self._torch_grads = torch_grads
        self._pending = True
        for stream in waits:
            self._wait_for(stream)

    def _record_torch_use(self):
        """Tell torch's caching allocator that our stream reads the torch
        gradients (``Tensor.record_stream``): their memory is not reused
        until the kernels queued so far have run, even when the training
        loop drops its references before then."""
        if not self._torch_grads:
            return
        torch = sys.modules["torch"]
        handle = self._handle
        for g in self._torch_grads:
            ours = (torch.cuda.default_stream(g.device) if handle in _LEGACY_STREAMS
                    else torch.cuda.ExternalStream(handle, device=g.device))
            g.record_stream(ours)

    def _wait_for(self, stream):
        """Order our stream after work queued on a foreign stream, on the device."""
        event = _event()
        event.record(stream=as_stream(stream))
        event.wait(stream=self.stream)

    def set_coefficients(self, lr, beta, eps, t, clipvalue, clipnorm, active,
                         sparse, momentum, static_key=None, weight_decay=0.0,
                         maximize=False):
        super().set_coefficients(lr, beta, eps, t, clipvalue, clipnorm, active,
                                 sparse, momentum, static_key, weight_decay, maximize)
        self.addr[:, 2] = self.hyper["t"]          # hashed by the mean's rounding
        self.addr[:, 3] = self.flags[:, L.FIRST]   # and each element's index
        self._pending = True

    def _upload(self):
        """Queue the copy of the per-step table (asynchronous, pinned)."""
        slot = self._slot
        self._slot = (slot + 1) % RING
        if self._events[slot] is not None:
            self._events[slot].synchronize()      # its previous copy has run
        host = self._ring[slot]
        n = len(self.params)
        h_addr, h_table = self._split(host, n)
        if n:
            h_addr[...] = self.addr
            h_table[:, :len(KC.COEF_FIELDS)] = self.coef
            h_table[:, len(KC.COEF_FIELDS):] = self.flags[:, :len(KC.TABLE_FLAGS)]
        self.d_buffer.copy_to_device(host, stream=self.stream)
        if self._events[slot] is None:
            self._events[slot] = _event()
        self._events[slot].record(stream=self.stream)
        self._pending = False

    def step(self, check, global_clipnorm, other_sumsq, update=True):
        """One step: at most one stats and one update launch.

        Returns ``(bad, sumsq)``.  They are read back from the device only
        when ``check`` is set or ``update`` is False; otherwise the step is
        fully asynchronous and ``(-1, 0.0)`` is returned.
        """
        active = self.flags[:, L.ACTIVE] != 0
        if self.n_chunks == 0 or not active.any():
            return -1, 0.0
        if self._pending:
            self._upload()
        dt = self.dtype.type
        needs_norm = global_clipnorm < np.inf or bool(
            (self.coef[active, L.CLIPNORM] < np.inf).any())
        use_stats = bool(check or needs_norm or not update)
        grid = min(self.n_chunks, self.blocks)
        if use_stats:
            self.kernels["stats_kernel"][grid, KC.THREADS, self.stream](
                self.d_table, self.d_addr, self.d_seg, self.d_lo, self.d_hi,
                self.d_first, self.d_big, self.n_big, self.d_chunk_sq,
                self.d_chunk_bad, self.d_sumsq, self.d_array_bad, self.d_scale,
                self.d_result, self.d_counter, bool(check), dt(global_clipnorm),
                *self._split_sumsq(other_sumsq))
        if update:
            self.kernels["update_kernel"][grid, KC.THREADS, self.stream](
                self.d_table, self.d_addr, self.d_offsets, self.d_seg, self.d_lo,
                self.d_hi, self.mean_sq, self.count, self.momentum, self.d_scale,
                self.d_result, use_stats)
            self._record_torch_use()
        if not (check or not update):
            return -1, 0.0
        self.d_result.copy_to_host(self.h_result, stream=self.stream)
        self.stream.synchronize()                  # the one synchronisation
        bad, lo, hi = (float(v) for v in self.h_result)
        scl = KC.NORM_SCALE[self.dtype]
        # No norm where no clipping needs one, as the other backends: an
        # infinite one would send lazy row-sparse steps down the dense path.
        return (int(bad) if bad >= 0 else -1), (lo + hi / scl / scl) if needs_norm else 0.0

    def _split_sumsq(self, sumsq):
        """A squared norm (a Python float) as the stats kernel's two sums
        ``(lo, hi)`` in the bucket's dtype (``KC.NORM_SPLIT``)."""
        dt, split = self.dtype.type, KC.NORM_SPLIT[self.dtype]
        if sumsq <= split * split:
            return dt(sumsq), dt(0)
        scl = KC.NORM_SCALE[self.dtype]
        with np.errstate(over="ignore"):      # beyond the dtype: that bucket clips to 0
            return dt(0), dt(sumsq * scl * scl)

    # --- row-sparse steps ---------------------------------------------------------
    # The touched rows (and, eagerly, runs of rows with momentum left) are
    # stepped by ``update_kernel`` itself, each row an array of its own:
    # its parameter address, state offset and index of element 0 point into
    # the parameter, its gradient address into the rows' values (or a zeroed
    # buffer).  The indices and values come to the host (as_rows), which
    # sums duplicates and takes norms; only the touched rows travel back.

    def update_rows(self, k, rows, sel, values, scale, catch=None):
        nrows, rowsize = self.rows_shape(k)
        if rowsize == 0 or rows.size == 0:
            return None
        if catch is not None:
            self.catch_up_rows(k, rows, *catch)
        item = self.dtype.itemsize
        # Pieces: each row with a gradient alone; consecutive rows without
        # one together, up to ZERO_SPAN elements.
        most = max(1, ZERO_SPAN // rowsize)
        n = rows.size
        alone = sel >= 0
        start = np.ones(n, bool)
        start[1:] = alone[1:] | alone[:-1] | (rows[1:] != rows[:-1] + 1)
        run = np.cumsum(start) - 1
        first_of_run = np.flatnonzero(start)
        start |= (np.arange(n) - first_of_run[run]) % most == 0
        first = np.flatnonzero(start)
        count = np.diff(np.append(first, n))
        r0 = rows[first]
        d_values = cuda.to_device(np.ascontiguousarray(values), stream=self.stream)
        zero = self._zero_span(most * rowsize)
        addr = np.empty((first.size, len(KC.ADDR_FIELDS)), np.int64)
        addr[:, 0] = self.addr[k, 0] + r0 * rowsize * item
        g_at = describe(d_values)[0] if values.size else 0
        addr[:, 1] = np.where(sel[first] >= 0, g_at + sel[first] * rowsize * item,
                              describe(zero)[0])
        addr[:, 2] = self.hyper["t"][k]
        addr[:, 3] = self.flags[k, L.FIRST] + r0 * rowsize
        table = np.empty((first.size, len(KC.TABLE_FIELDS)), self.dtype)
        table[:, :len(KC.COEF_FIELDS)] = self.coef[k]
        table[:, len(KC.COEF_FIELDS):] = self.flags[k, :len(KC.TABLE_FLAGS)]
        table[:, KC.ACTIVE] = 1
        offsets = self.offsets[k] + r0 * rowsize
        _, seg, lo, hi, _, _ = KC.make_layout(count * rowsize, KC.CHUNK)
        dev = lambda a: cuda.to_device(np.ascontiguousarray(a), stream=self.stream)  # noqa: E731
        args = (dev(table), dev(addr), dev(offsets), dev(seg), dev(lo), dev(hi))
        scales = dev(np.full(first.size, scale, self.dtype))
        result = dev(np.array([-1, 0, 0], self.dtype))
        grid = min(int(seg.size), self.blocks)
        self.kernels["update_kernel"][grid, KC.THREADS, self.stream](
            *args, self.mean_sq, self.count, self.momentum, scales, result, True)
        # Held until the next row-sparse step: the launch reads them.
        self._rows_keep = (d_values, args, scales, result)
        if not self.flags[k, L.MOMENTUM]:
            return None
        # Which visited rows keep momentum: a byte a row read back (eager
        # steps visit them again, and no other row).
        a, b = self.offsets[k], self.offsets[k + 1]
        d_rows = cuda.to_device(rows, stream=self.stream)
        d_live = cuda.device_array(rows.size, np.uint8, stream=self.stream)
        blocks = min(self.blocks, (rows.size + KC.THREADS - 1) // KC.THREADS)
        KC.live_kernel(self.dtype)[blocks, KC.THREADS, self.stream](
            self.momentum[a:b], d_rows, rowsize, d_live)
        live = d_live.copy_to_host(stream=self.stream)
        self.stream.synchronize()
        return live.astype(bool)

    def _zero_span(self, size):
        zero = getattr(self, "_d_zero", None)
        if zero is None or zero.size < size:
            zero = self._d_zero = _zeros(size, self.dtype)
        return zero

    def catch_up_rows(self, k, rows, B, C, D, R):
        nrows, rowsize = self.rows_shape(k)
        if rows.size == 0 or rowsize == 0:
            return
        a, b = self.offsets[k], self.offsets[k + 1]
        m = self.momentum[a:b] if self.has_momentum else self.momentum
        dev = lambda x: cuda.to_device(np.ascontiguousarray(x), stream=self.stream)  # noqa: E731
        args = (dev(rows), rowsize, dev(B), dev(C), dev(D), dev(R))
        blocks = min(self.blocks, (rows.size + KC.THREADS - 1) // KC.THREADS)
        KC.catch_up_kernel(self.dtype)[blocks, KC.THREADS, self.stream](
            self.params[k].reshape(-1), m, self.mean_sq[a:b], *args,
            bool(self.flags[k, L.MOMENTUM]), not self.flags[k, L.SPARSE])
        self._catch_keep = args
