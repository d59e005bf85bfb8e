"""Qwen 2 and Qwen 3. Both have ``config.layer_types`` (sliding / full attention) but one
rotary module for all layers, so ``layer_types=`` patches use per-layer hooks."""

from hf_prope.class_patching import make_arch_functions
from hf_prope.registry import Architecture, register_architecture

for _version in ("2", "3"):
    register_architecture(
        Architecture(
            model_type=f"qwen{_version}",
            family="qwen",
            modeling_module=f"transformers.models.qwen{_version}.modeling_qwen{_version}",
            rotary_class_name=f"Qwen{_version}RotaryEmbedding",
            attention_class_name=f"Qwen{_version}Attention",
            base_model_class_name=f"Qwen{_version}Model",
            config_class_name=f"Qwen{_version}Config",
            causal_lm_class_name=f"Qwen{_version}ForCausalLM",
            # Qwen 3 normalises each query/key head before rotating it.
            query_norm="q_norm" if _version == "3" else None,
            key_norm="k_norm" if _version == "3" else None,
        )
    )

apply_patch_to_qwen2, apply_p_rope_to_qwen2 = make_arch_functions("qwen2")
apply_patch_to_qwen3, apply_p_rope_to_qwen3 = make_arch_functions("qwen3")
