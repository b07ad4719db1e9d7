"""Endpoint picker for LLM inference gateways."""

__version__ = "0.1.0"  # = pyproject.toml's version (tests/unit/test_makefile.py checks)
# The container image `make image` builds (Containerfile); the reconciler deploys it for the
# simulator engine and for each pool's EPP unless told otherwise.
IMAGE = f"epp:{__version__}"
