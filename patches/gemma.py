"""Gemma 1, 2 and 3 (text).

Gemma 3 nests ``rope_parameters`` by layer type (sliding layers theta 1e4, global
layers theta 1e6) and its rotary module keeps frequencies per type, so a
``layer_types=`` patch is a config change there (Gemma 4's layout, loadable in plain
transformers). Gemma 2 has layer types but one shared rotary: hooks.
"""

from hf_prope.class_patching import make_arch_functions
from hf_prope.registry import Architecture, register_architecture, register_hint

register_architecture(
    Architecture(
        model_type="gemma",
        family="gemma",
        modeling_module="transformers.models.gemma.modeling_gemma",
        rotary_class_name="GemmaRotaryEmbedding",
        attention_class_name="GemmaAttention",
        base_model_class_name="GemmaModel",
        config_class_name="GemmaConfig",
        causal_lm_class_name="GemmaForCausalLM",
        mlx_lm_reads_rope_scaling=False,  # mlx_lm/models/gemma.py: nn.RoPE(base=rope_theta) only
    )
)
register_architecture(
    Architecture(
        model_type="gemma2",
        family="gemma",
        modeling_module="transformers.models.gemma2.modeling_gemma2",
        rotary_class_name="Gemma2RotaryEmbedding",
        attention_class_name="Gemma2Attention",
        base_model_class_name="Gemma2Model",
        config_class_name="Gemma2Config",
        causal_lm_class_name="Gemma2ForCausalLM",
        mlx_lm_reads_rope_scaling=False,  # mlx_lm/models/gemma2.py: nn.RoPE(base=rope_theta) only
    )
)
register_architecture(
    Architecture(
        model_type="gemma3_text",
        family="gemma",
        modeling_module="transformers.models.gemma3.modeling_gemma3",
        rotary_class_name="Gemma3RotaryEmbedding",
        attention_class_name="Gemma3Attention",
        base_model_class_name="Gemma3TextModel",
        config_class_name="Gemma3TextConfig",
        causal_lm_class_name="Gemma3ForCausalLM",
        rope_per_layer_type=True,
        query_norm="q_norm",  # Gemma 3 normalises each query/key head before rotating it
        key_norm="k_norm",
    )
)

register_hint(
    "gemma3", "For a multimodal Gemma 3, load its text model (Gemma3ForCausalLM) or patch model.language_model."
)

apply_patch_to_gemma, apply_p_rope_to_gemma = make_arch_functions("gemma")
apply_patch_to_gemma2, apply_p_rope_to_gemma2 = make_arch_functions("gemma2")
apply_patch_to_gemma3, apply_p_rope_to_gemma3 = make_arch_functions("gemma3_text", "gemma3")
