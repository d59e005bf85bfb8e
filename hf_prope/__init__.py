"""hf-prope: p-RoPE and frequency-masked rotary embeddings for Hugging Face transformers.

The public API is what ``__all__`` lists::

    import hf_prope
    hf_prope.patch_model(model, "p-rope", p=0.25)   # rotate only the highest 25% of frequencies
    hf_prope.patch_model(model, spec)               # spec = analysis.head_mask(usage, p=0.25): a mask per KV head
    hf_prope.get_patch(model)                       # -> PatchSpec or None
    hf_prope.patch_state(model)                     # spec, rope parameters now and before, layer types, base
    hf_prope.unpatch_model(model)                   # back to the original, bit for bit
    hf_prope.check_model(model)                     # probe: q/k rotate exactly as the patch says
    hf_prope.apply_p_rope_to_llama(p=0.25)          # class level: models built afterwards are patched
    hf_prope.export_gguf(model, "model.gguf")       # llama.cpp runs it with the patch (Llama, Mistral)
    hf_prope.extend_context(model, "yarn:2")        # YaRN / dynamic / linear / a temperature, under the patch

    hf_prope.passkey.passkey_accuracy(model, tokenizer, lengths=[8192, 16384])  # retrieval by length x depth

    usage = hf_prope.analysis.frequency_usage(model, tokenizer, texts)  # which frequencies it uses
    hf_prope.analysis.suggest_p(usage)                                  # which p to try, with evidence

Importing it registers hf-prope's rope types with transformers (``ROPE_INIT_FUNCTIONS``)
so checkpoints saved with them load; makes the config of a patched model also carry the
top-level rope keys older readers (mlx-lm) use (:mod:`hf_prope.legacy_config`); and makes PEFT's
own save write the patch record beside every adapter of a patched base (``Trainer.save_model``,
TRL's trainers, ``checkpoint-N`` folders) and its load (``PeftModel.from_pretrained``,
``AutoPeftModelForCausalLM``) put the recorded patch back on the base, reading only local files
(:mod:`hf_prope.peft_integration`; ``HF_PROPE_PEFT_CHECK=warn`` only warns, ``0`` leaves PEFT
untouched). Importing patches no model class and makes no network request.
"""

import sys as _sys

from . import cli_help as _cli_help
from ._version import __version__

if _cli_help.help_requested():
    # `hf-prope --help` and each command's: answered before torch and transformers are imported.
    _sys.exit(_cli_help.print_help())

from .rope_types import register_rope_types as _register_rope_types  # noqa: E402

_register_rope_types()

from . import analysis, passkey, rotation  # noqa: E402
from . import legacy_config as _legacy_config  # noqa: E402
from . import patches as _patches  # noqa: E402  (registers the architectures)
from .class_patching import ClassPatch, apply_patch_to_class, class_patched, class_patches, revert_class_patches  # noqa: E402
from .context_extension import ContextExtension, extend_context, get_context_extension  # noqa: E402
from .generic import RotationCheckError  # noqa: E402  (and the generic path's fallback)
from .gguf import GGUFExportError, export_gguf  # noqa: E402
from .hub import from_pretrained, push_to_hub, save_pretrained  # noqa: E402
from .patch_record import PatchMismatchError  # noqa: E402
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
    check_model,
    check_patch,
    layer_frequencies,
    patch_model,
    restore_patch,
    unpatch_model,
)
from .peft_integration import install_peft_hooks  # noqa: E402
from .registry import (  # noqa: E402
    NoRotaryEmbeddingError,
    UnsupportedModelError,
    supported_model_types,
)
from .spec import PatchSpec, rotated_pairs  # noqa: E402
from .state import PatchState, get_patch, patch_state  # noqa: E402

install_peft_hooks()
_legacy_config.install()

__all__ = [
    "__version__",
    "PatchSpec",
    "rotated_pairs",
    "patch_model",
    "unpatch_model",
    "get_patch",
    "check_patch",
    "patch_state",
    "PatchState",
    "restore_patch",
    "save_pretrained",
    "push_to_hub",
    "export_gguf",
    "GGUFExportError",
    "from_pretrained",
    "PatchMismatchError",
    "layer_frequencies",
    "analysis",
    "rotation",
    "passkey",
    "extend_context",
    "get_context_extension",
    "ContextExtension",
    "apply_patch_to_class",
    "revert_class_patches",
    "class_patches",
    "class_patched",
    "ClassPatch",
    "supported_model_types",
    "UnsupportedModelError",
    "NoRotaryEmbeddingError",
    "RotationCheckError",
    "check_model",
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
