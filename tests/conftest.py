import os

from hypothesis import settings

# Kernels compile before the step that needs them, as numba does by itself:
# the tests check the kernels and their routes, which a step taken by the
# reference while a kernel compiles in the background would skip.  The
# background compile has its own tests (test_background.py), in fresh
# processes and with fresh compile caches.
os.environ.setdefault("EXPECTIGRAD_NP_COMPILE", "wait")

# CI runs the full example budget, drawn the same way each run: a failure
# seen in CI reproduces here, and the kernel variants the draws need are
# compiled once (random draws of hyperparameters keep meeting loop masks not
# yet in the compile cache, several seconds each).  "explore" draws anew
# each run, with more examples; "dev" is for quick loops.
settings.register_profile("ci", max_examples=100, deadline=None, derandomize=True)
settings.register_profile("explore", max_examples=300, deadline=None)
settings.register_profile("dev", max_examples=25, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# tests/cudasim runs under numba's CUDA simulator (chosen when numba is first
# imported) or on a GPU: tests/test_cuda_simulator.py runs it in its own process.
collect_ignore = ([] if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
                  or os.environ.get("EXPECTIGRAD_CUDA_TESTS") == "gpu" else ["cudasim"])
