"""Compiling a kernel without making the steps wait for it.

On a cold compile cache the first step of a new kernel would wait several
seconds for numba.  Instead, a kernel that is neither compiled in this
process nor in numba's on-disk cache is compiled by a child process, which
writes it to the cache, and until it is there the optimizer takes its steps
with the numpy backend's code on the same state (``CpuBucket.reference``).
The two give the same bits (the kernels follow ``reference.py`` operation
for operation; ``tests/test_background.py`` switches between them mid-run),
so when the switch happens changes the speed of those steps, never their
results.

A child process, not a thread: numba's compiler is Python code that holds
the GIL, and calls into LLVM that release it thousands of times, so a
compiling thread and a stepping thread slow each other down many times
over (measured: a cold compile that takes 5 s alone had not finished after
a minute beside a loop of small steps).  A child uses another core and
shares nothing but the cache; it goes on after this process exits, so the
next process finds the kernel compiled.

``ready(dispatcher, sig, recipe)`` is the one question the backends ask:

* compiled in this process, or loaded now from the on-disk cache: True;
* otherwise ``recipe`` (module, function, arguments: what makes and
  compiles the dispatcher in a fresh process) is queued for a child, and
  the answer is False.  ``finished()`` counts the children that have
  ended, so an optimizer knows when to ask again.

If a child ends without the kernel landing in the cache (no writable cache
directory, an error), or is stopped after ``CHILD_TIMEOUT`` seconds, the
kernel is compiled in the caller's process the next time it is asked for,
as numba would have, and any error is raised there.  A child at work when
this process exits is left to finish (quietly: no ResourceWarning).

``EXPECTIGRAD_NP_COMPILE=wait`` turns this off: every kernel is compiled in
the process, before the step that needs it.  It is also off where the
cache-loading shortcut is (numba versions not checked by
``cpu/loading.py``).  ``wait_all()`` blocks until every queued kernel is in
the cache.
"""
from __future__ import annotations

import atexit
import os
import sys
import threading
import time

__all__ = ["PENDING", "finished", "mode", "pending", "ready", "wait_all"]

# What a backend says of a route whose kernel a child is compiling.
PENDING = "pending"

_queue = []             # recipes waiting for a child
_running = None         # (Popen, recipes, start time) of the child at work
# A child still at work after this many seconds is stopped, and its kernels
# are compiled in the process that asked for them (no kernel takes this long;
# a child that hangs must not keep the steps on the reference for ever).
CHILD_TIMEOUT = 600.0
_ended = 0              # children that have ended
_done = set()           # recipes of ended children, not yet loaded
_held = False           # tests: keep every uncompiled kernel pending
_lock = threading.RLock()   # the state above, between threads' optimizers

_CHILD = ("import json, sys\n"
          "from expectigrad_np.backends.background import _compile_recipes\n"
          "_compile_recipes(json.loads(sys.argv[1]))\n")


def mode():
    """``"background"`` (the default) or ``"wait"``."""
    value = os.environ.get("EXPECTIGRAD_NP_COMPILE", "background").strip().lower()
    if value not in ("background", "wait"):
        raise ValueError(f"EXPECTIGRAD_NP_COMPILE must be 'background' or 'wait', "
                         f"got {value!r}")
    if value == "background":
        from .cpu import loading
        if not loading.enabled():
            return "wait"
    return value


def ready(dispatcher, sig, recipe, wait=False):
    """Whether ``dispatcher`` (a ``cache=True`` CPU dispatcher) has machine
    code for the argument types ``sig``; see the module's docstring.  With
    ``wait``, or in ``"wait"`` mode, compiles now and returns True."""
    sig = tuple(sig)
    if sig in dispatcher.overloads:
        return True
    recipe = _normal(recipe)
    if wait or mode() == "wait":
        dispatcher.compile(sig)         # raises where the compile fails
        return True
    with _lock:
        if _held or _working_on(recipe):
            return False
        compile_here = recipe in _done
    # Loading or compiling takes numba's lock, not this one: other threads'
    # optimizers go on asking meanwhile.
    if _load_cached(dispatcher, sig) or compile_here:
        if compile_here:
            # A child ended, yet the kernel is not in the cache: compile here.
            dispatcher.compile(sig)
        with _lock:
            _done.discard(recipe)
        return True
    with _lock:
        if not _working_on(recipe):
            _queue.append(recipe)
        _poll()
    return False


def _working_on(recipe):
    """Whether ``recipe`` is queued or its child is at work (polled now)."""
    _poll()
    return recipe in _queue or (_running is not None and recipe in _running[1])


def _normal(recipe):
    module, function, args = recipe
    return module, function, tuple(args)


def finished():
    """How many children have ended (checked now, without waiting)."""
    with _lock:
        _poll()
        return _ended


def pending():
    """How many kernels are queued or compiling."""
    with _lock:
        _poll()
        return len(_queue) + (len(_running[1]) if _running is not None else 0)


def _poll():
    """Reap the child at work if it has ended (or stop it past
    ``CHILD_TIMEOUT``); start one for the queue.  Called holding ``_lock``."""
    global _running, _ended
    if _running is not None and _running[0].poll() is None \
            and time.monotonic() - _running[2] > CHILD_TIMEOUT:
        _running[0].kill()
        _running[0].wait()
    if _running is not None and _running[0].poll() is not None:
        _done.update(_running[1])
        _running = None
        _ended += 1
    if _running is None and _queue and not _held:
        # Imported here: a process whose kernels are cached never needs them.
        import json
        import subprocess
        recipes = list(_queue)
        del _queue[:]
        env = dict(os.environ, EXPECTIGRAD_NP_COMPILE="wait",
                   PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        proc = subprocess.Popen(
            [sys.executable, "-c", _CHILD, json.dumps([list(r) for r in recipes])],
            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        if not _started:
            atexit.register(_leave_running)
            _started.append(True)
        _running = (proc, recipes, time.monotonic())


_started = []


def _leave_running():
    """At exit: the child at work goes on and fills the cache for the next
    process.  It is left on purpose, so its ``Popen`` is marked done (no
    "still running" ResourceWarning)."""
    if _running is not None and _running[0].poll() is None:
        _running[0].returncode = 0


def _compile_recipes(recipes):
    """In the child: make and compile each recipe's kernel (numba caches it)."""
    import importlib
    for module, function, args in recipes:
        getattr(importlib.import_module(module), function)(*args)


def _load_cached(dispatcher, sig):
    """Load ``sig`` from numba's on-disk cache, as ``Dispatcher.compile``
    does first; True when loaded."""
    from numba.core.compiler_lock import global_compiler_lock
    with global_compiler_lock:
        if sig in dispatcher.overloads:
            return True
        cres = dispatcher._cache.load_overload(sig, dispatcher.targetctx)
        if cres is None:
            return False
        dispatcher._cache_hits[sig] += 1
        dispatcher.targetctx.insert_user_function(cres.entry_point, cres.fndesc,
                                                  [cres.library])
        dispatcher.add_overload(cres)
        return True


def wait_all(timeout=None):
    """Block until no kernel is queued or compiling (or ``timeout`` seconds
    pass); returns whether none is."""
    end = None if timeout is None else time.monotonic() + timeout
    while pending():
        if end is not None and time.monotonic() >= end:
            return False
        time.sleep(0.01)
    return True
