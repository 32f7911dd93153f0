"""The cuda backend: ``kernels.py`` (``@cuda.jit`` kernels) driven by
``backend.CudaBucket``.  Importing it imports ``numba.cuda``."""
