"""Llama (also the architecture of SmolLM2)."""

from hf_prope.class_patching import make_arch_functions
from hf_prope.registry import Architecture, register_architecture

register_architecture(
    Architecture(
        model_type="llama",
        family="llama",
        modeling_module="transformers.models.llama.modeling_llama",
        rotary_class_name="LlamaRotaryEmbedding",
        attention_class_name="LlamaAttention",
        base_model_class_name="LlamaModel",
        config_class_name="LlamaConfig",
        causal_lm_class_name="LlamaForCausalLM",
        llama_cpp_graph="llama",  # its graph reads rope_freqs (hf_prope.gguf)
    )
)

apply_patch_to_llama, apply_p_rope_to_llama = make_arch_functions("llama")
