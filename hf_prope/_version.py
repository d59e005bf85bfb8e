"""The version of hf-prope (read by the packaging, pyproject dynamic version)."""

__version__ = "0.1.0"
