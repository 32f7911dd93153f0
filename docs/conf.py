"""Sphinx configuration of the expectigrad_np documentation.

Build with ``pip install ".[docs]"`` and then::

    sphinx-build -W -b html docs docs/_build/html

The build needs no network.  It imports the package from this checkout,
mocks the optional frameworks (torch, keras, tensorflow, mpi4py) so that
their front ends are documented without them, renders the Performance page
from ``docs/_data/*.json`` and runs two examples to draw the figures of
"Why Expectigrad" (``docs/_ext/expectigrad_docs.py``).
"""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(HERE, "_ext"))

import expectigrad_np  # noqa: E402

project = "expectigrad_np"
author = "the expectigrad_np authors"
copyright = "the expectigrad_np authors"  # noqa: A001
release = version = expectigrad_np.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "expectigrad_docs",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "_generated", "_data", "Thumbs.db", ".DS_Store"]
templates_path = []

# MyST: $...$ math, ::: fences and anchors for the guides' headings.
myst_enable_extensions = ["dollarmath", "colon_fence"]
myst_heading_anchors = 3

# numpydoc-style docstrings, rendered by napoleon.
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = False
napoleon_use_ivar = True

autodoc_default_options = {"members": True, "member-order": "bysource",
                           "show-inheritance": False}
autodoc_typehints = "description"
autodoc_typehints_format = "short"
autodoc_preserve_defaults = True
autosummary_generate = False
# The optional frameworks are mocked, installed or not, so every build
# documents the same thing and none of them is needed to build.
autodoc_mock_imports = ["torch", "keras", "tensorflow", "mpi4py"]

# Type names in docstrings ("array_like", "float32 ndarray") are prose, not
# cross-references that must resolve.
nitpicky = False

html_theme = "alabaster"
html_title = f"expectigrad_np {release}"
html_static_path = []
html_theme_options = {
    "description": "Expectigrad on NumPy arrays",
    "fixed_sidebar": True,
}
smartquotes = False
