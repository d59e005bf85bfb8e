"""One module per architecture family; importing this package registers them all.

Installed as ``hf_prope.patches`` (the repository keeps it at the top level).
"""

from . import gemma, llama, mistral, qwen

__all__ = ["gemma", "llama", "mistral", "qwen"]
