"""Mistral."""

from hf_prope.class_patching import make_arch_functions
from hf_prope.registry import Architecture, register_architecture

register_architecture(
    Architecture(
        model_type="mistral",
        family="mistral",
        modeling_module="transformers.models.mistral.modeling_mistral",
        rotary_class_name="MistralRotaryEmbedding",
        attention_class_name="MistralAttention",
        base_model_class_name="MistralModel",
        config_class_name="MistralConfig",
        causal_lm_class_name="MistralForCausalLM",
        llama_cpp_graph="llama",  # llama.cpp runs Mistral with its llama graph, which reads rope_freqs
        sliding_window_on_every_layer=True,  # config.sliding_window limits every layer
    )
)

apply_patch_to_mistral, apply_p_rope_to_mistral = make_arch_functions("mistral")
