"""Crash-safe checkpoints of an ``Expectigrad`` optimizer in a versioned ``.npz``.

``save(opt, path)`` writes the parameters (optional), the optimizer state
(``mean_sq``, ``count``, ``momentum`` per array), the step counts and the
hyperparameters.  The file is written atomically: into a temporary file in
the same directory, flushed to disk with ``fsync``, then moved over ``path``
with ``os.replace``.  A save interrupted at any point leaves the previous
file at ``path`` as it was (a stray temporary file may remain).

``load(opt, path)`` restores a checkpoint into an optimizer built with the
same parameter layout (groups, shapes, dtypes) and the same
hyperparameters.  Everything is read and checked before anything changes;
a truncated, corrupt or mismatched file raises ``ValueError`` naming the
file, and leaves the optimizer and its parameters untouched.  After
``load``, stepping continues bit for bit as if the run had never stopped.

File layout (format version 1), all plain arrays, no pickle:

``meta``
    a JSON document (0-d unicode array): format name and version, the step
    count, each array's step ``t``, shape and dtype, the group sizes, the
    hyperparameters of every group and ``global_clipnorm``.
``param_{i}``
    parameter ``i`` (group by group), when saved with ``params=True``.
``state_{i}_mean_sq``, ``state_{i}_count``, ``state_{i}_momentum``
    the state of parameter ``i`` as ``Expectigrad.state_dict()`` gives it.

Learning rates.  A number is stored and compared by value.  A schedule from
``expectigrad_np.schedules`` (a frozen dataclass, made of such schedules
only) is stored as its ``repr`` and must have the same ``repr`` on load.
Any other callable (a ``join`` or ``warmup`` of a function, too) cannot be
stored: the file records only that the learning rate was a callable (and
its name, for messages), and on load the optimizer's ``lr`` must be a
callable too; that it computes the same values is the caller's business.
"""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile

import numpy as np

from . import schedules as _schedules
from ._atomic import interrupts_deferred

__all__ = ["FORMAT", "FORMAT_VERSION", "load", "save"]

FORMAT = "expectigrad_np.checkpoint"
FORMAT_VERSION = 1

_HYPER = ("lr", "beta", "eps", "sparse_counter", "clipvalue", "clipnorm",
          "weight_decay", "maximize")
# Recorded since weight decay and maximize exist: a file without them was
# written with their defaults.
_LATER = {"weight_decay": 0.0, "maximize": False}
_STATE_FIELDS = ("mean_sq", "count", "momentum")


# --- learning rates -------------------------------------------------------------

def _is_schedule(lr):
    """A schedule of ``expectigrad_np.schedules`` made of such schedules only
    (its ``repr`` names it in any process; a ``join`` holding a function of
    the user's names that function by its address)."""
    if not (dataclasses.is_dataclass(lr) and not isinstance(lr, type)
            and type(lr).__module__ == _schedules.__name__):
        return False
    return all(_is_schedule(s) for s in getattr(lr, "schedules", ()))


def _encode_lr(lr):
    if _is_schedule(lr):
        return {"schedule": repr(lr)}
    if callable(lr):
        name = getattr(lr, "__qualname__", None) or type(lr).__qualname__
        return {"callable": str(name)}
    return float(lr)


def _lr_matches(stored, lr):
    """None if the optimizer's ``lr`` agrees with the stored one, else why not."""
    if isinstance(stored, dict) and "schedule" in stored:
        if _is_schedule(lr) and repr(lr) == stored["schedule"]:
            return None
        return f"the file has lr={stored['schedule']}, the optimizer lr={lr!r}"
    if isinstance(stored, dict) and "callable" in stored:
        if callable(lr) and not _is_schedule(lr):
            return None
        return (f"the file has a callable lr ({stored['callable']}), the optimizer "
                f"lr={lr!r}; give the optimizer a callable lr")
    if not callable(lr) and isinstance(stored, (int, float)) and float(stored) == lr:
        return None
    return f"the file has lr={stored!r}, the optimizer lr={lr!r}"


# --- save -------------------------------------------------------------------------

def _host(p):
    return np.asarray(p) if isinstance(p, np.ndarray) else p.copy_to_host()


def _collect(opt, params):
    """Everything a checkpoint holds, as ``{name: ndarray}``."""
    sd = opt.state_dict()
    arrays = {}
    entries = []
    for i, p in enumerate(opt.params):
        st = sd["state"][i]
        entries.append({"step": int(st["step"]), "shape": list(p.shape),
                        "dtype": np.dtype(p.dtype).str})
        for field in _STATE_FIELDS:
            if field in st:
                # np.array, not ascontiguousarray: that makes 0-d arrays 1-d.
                arrays[f"state_{i}_{field}"] = np.array(st[field], order="C")
        if params:
            arrays[f"param_{i}"] = np.array(_host(p), order="C")
    groups = []
    for g in opt.param_groups:
        d = {k: g[k] for k in _HYPER}
        d["lr"] = _encode_lr(d["lr"])
        d["size"] = len(g["params"])
        groups.append(d)
    meta = {"format": FORMAT, "version": FORMAT_VERSION, "step": int(sd["step"]),
            "params_saved": bool(params), "global_clipnorm": opt.global_clipnorm,
            "groups": groups, "arrays": entries}
    arrays["meta"] = np.array(json.dumps(meta, allow_nan=False))
    return arrays


def _target(path):
    """The file ``save`` replaces: ``path`` (str, bytes or ``os.PathLike``),
    or, for a symbolic link, the file it points to (the link stays a link).
    Anything that exists and is not a regular file (a FIFO, a device, a
    directory) is refused."""
    import stat
    path = os.fsdecode(os.fspath(path))
    if os.path.islink(path):
        path = os.path.realpath(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return path
    if not stat.S_ISREG(mode):
        raise ValueError(f"cannot save a checkpoint to {path!r}: it exists and is not a "
                         "regular file (a directory, FIFO or device); choose a file path")
    return path


def save(opt, path, *, params=True):
    """Write ``opt``'s checkpoint to ``path`` atomically (see module docs).

    ``params=True`` also stores the parameter values, so that ``load``
    restores the model along with the optimizer.  The file is written at
    exactly ``path`` (no suffix is added).

    Parameters
    ----------
    opt : expectigrad_np.Expectigrad
        The optimizer; no step runs while its snapshot is taken.
    path : str, bytes or os.PathLike
        The file to write.  A symbolic link is written through (the link
        stays); a path that exists and is not a regular file is refused.
    params : bool, default True
        Also store the parameter values.

    Raises
    ------
    ValueError
        ``path`` exists and is not a regular file (a directory, FIFO or
        device).
    OSError
        The file cannot be written; the previous file at ``path`` is intact.
    """
    path = _target(path)
    with opt._lock:             # a consistent snapshot: no step runs meanwhile
        arrays = _collect(opt, params)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".",
                               suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.chmod(tmp, os.stat(path).st_mode & 0o7777)
        except OSError:
            os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_directory(directory)


def _fsync_directory(directory):
    """Make the rename itself durable (POSIX; a no-op where unsupported)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --- load -------------------------------------------------------------------------

class _Refused(ValueError):
    pass


# Members are inflated only when the metadata names them, and only if the
# archive says they inflate to no more than the array they must hold plus a
# .npy header: an archive with a huge extra or oversized member is refused
# without reading it (a zip bomb costs nothing).
_META_MAX_BYTES = 64 << 20
_HEADER_MAX_BYTES = 1 << 16


class _Archive:
    """The members of an ``.npz`` file, read on demand with size checks."""

    def __init__(self, f):
        try:
            z = np.load(f, allow_pickle=False)
        except Exception as exc:  # noqa: BLE001 - zip, npy and decoding errors alike
            raise _Refused(f"it is truncated or corrupt ({type(exc).__name__}: "
                           f"{exc})") from None
        if not isinstance(z, np.lib.npyio.NpzFile):
            raise _Refused("it is a single .npy array, not an .npz archive")
        self.z = z
        self.names = set(z.files)

    def __contains__(self, key):
        return key in self.names

    def get(self, key, max_bytes=_META_MAX_BYTES):
        """Member ``key`` (None if absent), refused if it would inflate to
        more than ``max_bytes`` plus a header."""
        if key not in self.names:
            return None
        try:
            size = self.z.zip.getinfo(key + ".npy").file_size
        except KeyError:
            size = None
        if size is None or size > max_bytes + _HEADER_MAX_BYTES:
            raise _Refused(f"its member {key!r} inflates to {size} bytes, more than the "
                           f"{max_bytes} its array can hold")
        try:
            return self.z[key]
        except Exception as exc:  # noqa: BLE001
            raise _Refused(f"it is truncated or corrupt ({type(exc).__name__}: "
                           f"{exc})") from None


def _meta(arrays):
    raw = arrays.get("meta")
    if raw is None or raw.dtype.kind != "U" or raw.shape != ():
        raise _Refused("it is not an Expectigrad checkpoint (no 'meta' record)")
    try:
        meta = json.loads(str(raw))
    except ValueError as exc:
        raise _Refused(f"its 'meta' record is corrupt ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise _Refused("it is not an Expectigrad checkpoint (wrong format name)")
    if meta.get("version") != FORMAT_VERSION:
        raise _Refused(f"it has format version {meta.get('version')!r}; this "
                       f"version of expectigrad_np reads version {FORMAT_VERSION}")
    step = meta.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise _Refused(f"its 'meta' record has a bad step count {step!r}")
    for key, kind in (("groups", list), ("arrays", list), ("params_saved", bool)):
        if not isinstance(meta.get(key), kind):
            raise _Refused(f"its 'meta' record has a bad {key!r}")
    return meta


def _same_number(a, b):
    if a is None or b is None:
        return a is None and b is None
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b or (isinstance(a, bool) and isinstance(b, bool) and a == b)
    return isinstance(a, (int, float)) and float(a) == float(b)


def _check_layout(opt, meta):
    groups, entries = meta["groups"], meta["arrays"]
    if len(groups) != len(opt.param_groups):
        raise _Refused(f"it has {len(groups)} param groups, the optimizer has "
                       f"{len(opt.param_groups)}")
    for gi, (stored, g) in enumerate(zip(groups, opt.param_groups)):
        where = f"param group {gi}"
        if not isinstance(stored, dict) or stored.get("size") != len(g["params"]):
            size = stored.get("size") if isinstance(stored, dict) else stored
            raise _Refused(f"{where} has {size!r} parameters in the file, "
                           f"{len(g['params'])} in the optimizer")
        for key in _HYPER:
            if key not in stored and key in _LATER:
                stored = dict(stored, **{key: _LATER[key]})
            if key not in stored:
                raise _Refused(f"{where}: the file does not record {key!r}")
            if key == "lr":
                why = _lr_matches(stored["lr"], g["lr"])
                if why is not None:
                    raise _Refused(f"{where}: {why}")
            elif not _same_number(stored[key], g[key]):
                raise _Refused(f"{where}: the file has {key}={stored[key]!r}, the "
                               f"optimizer {key}={g[key]!r}")
    if not _same_number(meta.get("global_clipnorm"), opt.global_clipnorm):
        raise _Refused(f"the file has global_clipnorm={meta.get('global_clipnorm')!r},"
                       f" the optimizer global_clipnorm={opt.global_clipnorm!r}")
    params = opt.params
    if len(entries) != len(params):
        raise _Refused(f"it holds {len(entries)} arrays, the optimizer has "
                       f"{len(params)}")
    for i, (e, p) in enumerate(zip(entries, params)):
        name = opt._names[i]
        if not isinstance(e, dict):
            raise _Refused(f"its record of {name} is corrupt")
        shape = e.get("shape")
        if not isinstance(shape, list) or tuple(shape) != p.shape:
            shape = tuple(shape) if isinstance(shape, list) else shape
            raise _Refused(f"{name} has shape {shape} in the file, {p.shape} in the "
                           "optimizer")
        if e.get("dtype") != np.dtype(p.dtype).str:
            raise _Refused(f"{name} has dtype {e.get('dtype')} in the file, "
                           f"{np.dtype(p.dtype)} in the optimizer")
        t = e.get("step")
        if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t <= meta["step"]:
            raise _Refused(f"{name} has a bad step count {t!r}")


def _array(arrays, key, p, dtype, name):
    a = arrays.get(key, max_bytes=int(np.prod(p.shape)) * np.dtype(dtype).itemsize)
    if a is None:
        raise _Refused(f"the array {key!r} ({name}) is missing")
    if a.shape != p.shape or a.dtype != np.dtype(dtype):
        raise _Refused(f"the array {key!r} ({name}) has shape {a.shape} and dtype "
                       f"{a.dtype}, expected {p.shape} and {np.dtype(dtype)}")
    return a


def _state_dict(opt, meta, arrays):
    """The file's content as ``load_state_dict`` input, every array checked."""
    state, params = {}, []
    sparse, momentum = opt._sparse, opt._momentum
    for i, p in enumerate(opt.params):
        name = opt._names[i]
        t = meta["arrays"][i]["step"]
        entry = {"step": t,
                 "mean_sq": _array(arrays, f"state_{i}_mean_sq", p, p.dtype, name)}
        if sparse[i]:
            entry["count"] = _array(arrays, f"state_{i}_count", p, np.uint32, name)
        elif f"state_{i}_count" in arrays:
            raise _Refused(f"it has a count for {name}, which has no sparse counter")
        if momentum[i] or f"state_{i}_momentum" in arrays:
            # Momentum is kept once a bucket had beta > 0, beta = 0 included.
            entry["momentum"] = _array(arrays, f"state_{i}_momentum", p, p.dtype, name)
        for field in ("mean_sq", "momentum"):
            if field in entry and not np.all(np.isfinite(entry[field])):
                raise _Refused(f"the {field} of {name} holds NaN or infinity")
        if np.any(entry["mean_sq"] < 0):
            raise _Refused(f"the mean_sq of {name} holds negative values")
        state[i] = entry
        if meta["params_saved"]:
            params.append(_array(arrays, f"param_{i}", p, p.dtype, name))
    groups = []
    start = 0
    for g in opt.param_groups:
        d = {k: g[k] for k in _HYPER}
        d["params"] = list(range(start, start + len(g["params"])))
        start += len(g["params"])
        groups.append(d)
    return {"step": meta["step"], "state": state, "param_groups": groups}, params


def load(opt, path):
    """Restore ``opt`` (and its parameters, if the file holds them) from a
    checkpoint written by ``save``.  Raises ``ValueError`` naming ``path``,
    with nothing changed, when the file is truncated, corrupt, of another
    format version, or does not match ``opt``.

    Parameters
    ----------
    opt : expectigrad_np.Expectigrad
        An optimizer with the layout (groups, shapes, dtypes) and the
        hyperparameters of the one saved.  Its parameters are written only
        if the file holds them.
    path : str, bytes or os.PathLike
        A file written by ``save``.

    Raises
    ------
    FileNotFoundError
        ``path`` does not exist.
    ValueError
        The file is truncated, corrupt, of another format version, does not
        match ``opt``, or a parameter to restore is read-only; nothing
        changes.
    """
    path = os.fsdecode(os.fspath(path))
    try:
        with open(path, "rb") as f:   # a missing file is FileNotFoundError, as usual
            arrays = _Archive(f)
            meta = _meta(arrays)
            if opt._dirty:
                opt._refresh()
            _check_layout(opt, meta)
            sd, params = _state_dict(opt, meta, arrays)
        for p, name in zip(opt.params, opt._names):
            if params and isinstance(p, np.ndarray) and not p.flags.writeable:
                raise _Refused(f"{name} is read-only, so its saved value cannot be "
                               "restored; make it writeable first (nothing was changed)")
        # The state and the parameters, all or nothing (also under Ctrl-C):
        # load_state_dict checks everything before it writes anything, and
        # shapes and dtypes were checked, so the copies cannot fail.
        with interrupts_deferred():
            opt.load_state_dict(sd)
            for p, a in zip(opt.params, params):
                if isinstance(p, np.ndarray):
                    np.copyto(p, a)
                else:
                    p.copy_to_device(a)
    except ValueError as exc:
        raise ValueError(f"cannot load checkpoint {path!r}: {exc}") from None
    except (TypeError, KeyError, AttributeError, IndexError) as exc:
        raise ValueError(f"cannot load checkpoint {path!r}: its 'meta' record is "
                         f"malformed ({type(exc).__name__}: {exc})") from None

