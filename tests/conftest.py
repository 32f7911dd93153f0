import os

from hypothesis import settings

# Kernels compile before the step that needs them, as numba does by itself:
# the tests check the kernels and their routes, which a step taken by the
# reference while a kernel compiles in the background would skip.  The
# background compile has its own tests (test_background.py), in fresh
# processes and with fresh compile caches.
os.environ.setdefault("EXPECTIGRAD_NP_COMPILE", "wait")

# CI runs the full example budget; a developer can lower it for quick loops.
settings.register_profile("ci", max_examples=100, deadline=None)
settings.register_profile("dev", max_examples=25, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# tests/cudasim runs under numba's CUDA simulator (chosen when numba is first
# imported) or on a GPU: tests/test_cuda_simulator.py runs it in its own process.
collect_ignore = ([] if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
                  or os.environ.get("EXPECTIGRAD_CUDA_TESTS") == "gpu" else ["cudasim"])
