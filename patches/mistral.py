"""Mistral."""

from hf_prope.patching import make_arch_functions
from hf_prope.registry import Architecture, register_architecture

register_architecture(
    Architecture(
        model_type="mistral",
        family="mistral",
        modeling_module="transformers.models.mistral.modeling_mistral",
        rotary_class_name="MistralRotaryEmbedding",
        attention_class_name="MistralAttention",
        base_model_class_name="MistralModel",
    )
)

apply_patch_to_mistral, apply_p_rope_to_mistral = make_arch_functions("mistral")
