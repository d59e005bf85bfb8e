"""GGUF files for llama.cpp that carry a patch: :func:`export_gguf` writes one, :func:`gguf_patch` reads it back.

One module a job: :mod:`.format` (names, types, the error), :mod:`.factors` (the ``rope_freqs``
factors and what can be expressed), :mod:`.vocabulary` (the tokenizer), :mod:`.writer` (the file),
:mod:`.llama_cpp` (running it in llama.cpp), :mod:`.reader` (reading a patch and a model back).

llama.cpp's own converter does not know hf-prope's rope types (nor transformers' native
``"proportional"``): it logs "Unknown RoPE type" and writes plain RoPE, silently dropping the
patch. llama.cpp can run a patch exactly all the same: its llama graph reads an optional
``rope_freqs`` tensor, one factor per frequency pair shared by every layer, and divides each
pair's angle by it. A factor of 1 leaves a pair as it is; :data:`STOPPED_FACTOR` (1e30, the
value Gemma 4's converter uses) stops it; a model's own frequency scaling (Llama 3's) is a
factor too, so the two multiply.

What can be exported, and why not the rest:

* the architecture's llama.cpp graph must read those factors: ``Architecture.llama_cpp_graph``
  in the registry (``llama`` for Llama and Mistral); the qwen2, qwen3, gemma, gemma2 and
  gemma3 graphs pass no factors to their rotary op, so they are refused;
* the patch must apply to every layer (one factor tensor serves all layers);
* the model's own RoPE must be expressible by factors: ``default``, ``linear``, ``llama3`` and
  ``proportional`` are; ``yarn`` (attention scaling), ``dynamic`` (length-dependent) and
  ``longrope`` are not.

Nothing is written unless every check passes, and the file appears only once complete.
"""

from .factors import check_exportable, exportable_model_types, rope_factors
from .format import (
    GGUF_TYPES,
    SOURCE_ATTR,
    STOPPED_ABOVE,
    STOPPED_FACTOR,
    GGUFExport,
    GGUFExportError,
    GGUFType,
    check_gguf_type,
)
from .llama_cpp import check_in_llama_cpp, llama_cpp_logits
from .reader import gguf_patch, load_gguf, load_gguf_tokenizer, read_rope_factors, restore_gguf_patch, spec_from_factors
from .vocabulary import vocabulary_for
from .writer import export_gguf

__all__ = [
    "GGUF_TYPES",
    "SOURCE_ATTR",
    "STOPPED_ABOVE",
    "STOPPED_FACTOR",
    "GGUFExport",
    "GGUFExportError",
    "GGUFType",
    "check_exportable",
    "check_gguf_type",
    "check_in_llama_cpp",
    "export_gguf",
    "exportable_model_types",
    "gguf_patch",
    "llama_cpp_logits",
    "load_gguf",
    "load_gguf_tokenizer",
    "read_rope_factors",
    "restore_gguf_patch",
    "rope_factors",
    "spec_from_factors",
    "vocabulary_for",
]
