"""hf-prope: p-RoPE and frequency-masked rotary embeddings for Hugging Face transformers.

The public API is what ``__all__`` lists::

    import hf_prope
    hf_prope.patch_model(model, "p-rope", p=0.25)   # rotate only the highest 25% of frequencies
    hf_prope.get_patch(model)                       # -> PatchSpec or None
    hf_prope.unpatch_model(model)                   # back to the original, bit for bit
    hf_prope.apply_p_rope_to_llama(p=0.25)          # class level: models built afterwards are patched

    usage = hf_prope.analysis.frequency_usage(model, tokenizer, texts)  # which frequencies it uses
    hf_prope.analysis.suggest_p(usage)                                  # which p to try, with evidence

Importing it registers hf-prope's rope types with transformers (``ROPE_INIT_FUNCTIONS``)
so checkpoints saved with them load, and makes ``PeftModel.from_pretrained`` warn when an
adapter's recorded patch is not on the base model; it patches no model class by itself.
"""

from ._version import __version__
from .rope_types import register_rope_types as _register_rope_types

_register_rope_types()

from . import patches as _patches  # noqa: E402  (registers the architectures)
from .patches.gemma import (  # noqa: E402
    apply_p_rope_to_gemma,
    apply_p_rope_to_gemma2,
    apply_p_rope_to_gemma3,
    apply_patch_to_gemma,
    apply_patch_to_gemma2,
    apply_patch_to_gemma3,
)
from .patches.llama import apply_p_rope_to_llama, apply_patch_to_llama  # noqa: E402
from .patches.mistral import apply_p_rope_to_mistral, apply_patch_to_mistral  # noqa: E402
from .patches.qwen import (  # noqa: E402
    apply_p_rope_to_qwen2,
    apply_p_rope_to_qwen3,
    apply_patch_to_qwen2,
    apply_patch_to_qwen3,
)
from .patching import (  # noqa: E402
    ClassPatch,
    PositionMaskHook,
    apply_patch_to_class,
    class_patches,
    get_patch,
    patch_info,
    patch_model,
    restore_patch,
    revert_class_patches,
    unpatch_model,
)
from .registry import (  # noqa: E402
    NoRotaryEmbeddingError,
    UnsupportedModelError,
    supported_model_types,
)
from .spec import PatchSpec, rotated_pairs  # noqa: E402
from .hub import PatchMismatchError, from_pretrained, push_to_hub, save_pretrained  # noqa: E402
from .hub import _install_peft_load_check  # noqa: E402
from . import analysis, rotation  # noqa: E402
from .patching import layer_frequencies  # noqa: E402

_install_peft_load_check()

__all__ = [
    "__version__",
    "PatchSpec",
    "rotated_pairs",
    "patch_model",
    "unpatch_model",
    "get_patch",
    "restore_patch",
    "save_pretrained",
    "push_to_hub",
    "from_pretrained",
    "PatchMismatchError",
    "patch_info",
    "layer_frequencies",
    "analysis",
    "rotation",
    "apply_patch_to_class",
    "revert_class_patches",
    "class_patches",
    "ClassPatch",
    "PositionMaskHook",
    "supported_model_types",
    "UnsupportedModelError",
    "NoRotaryEmbeddingError",
    "apply_p_rope_to_llama",
    "apply_patch_to_llama",
    "apply_p_rope_to_mistral",
    "apply_patch_to_mistral",
    "apply_p_rope_to_qwen2",
    "apply_patch_to_qwen2",
    "apply_p_rope_to_qwen3",
    "apply_patch_to_qwen3",
    "apply_p_rope_to_gemma",
    "apply_patch_to_gemma",
    "apply_p_rope_to_gemma2",
    "apply_patch_to_gemma2",
    "apply_p_rope_to_gemma3",
    "apply_patch_to_gemma3",
]
