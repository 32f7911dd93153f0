import os

from hypothesis import settings

# CI runs the full example budget; a developer can lower it for quick loops.
settings.register_profile("ci", max_examples=100, deadline=None)
settings.register_profile("dev", max_examples=25, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# tests/cudasim runs under numba's CUDA simulator (chosen when numba is first
# imported) or on a GPU: tests/test_cuda_simulator.py runs it in its own process.
collect_ignore = ([] if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
                  or os.environ.get("EXPECTIGRAD_CUDA_TESTS") == "gpu" else ["cudasim"])
