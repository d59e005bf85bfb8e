"""Tiny, seeded models of every supported architecture, built in code (no downloads).

:data:`ARCHS` holds one tiny config per model type; the config and model classes come from
hf-prope's registry, and ``tests/test_layout.py`` fails when a registered architecture has no
tiny config here (or a tiny config names no registered architecture).
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from hf_prope.registry import get_architecture

HEAD_DIM = 16  # 8 frequency pairs: p=0.25 -> 2 rotate, 0.5 -> 4, 0.75 -> 6
N_LAYERS = 6
VOCAB = 128
MIXED = ["sliding_attention", "full_attention"] * 3

_COMMON: dict[str, Any] = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=N_LAYERS,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=HEAD_DIM,
    vocab_size=VOCAB,
    max_position_embeddings=256,
    pad_token_id=0,
)

# model type -> what its tiny config sets beyond _COMMON (one entry per registered architecture).
ARCHS: dict[str, dict[str, Any]] = {
    "llama": {},
    "mistral": {"sliding_window": None},
    "qwen2": {"layer_types": MIXED, "sliding_window": 8, "use_sliding_window": True},
    "qwen3": {"layer_types": MIXED, "sliding_window": 8, "use_sliding_window": True},
    "gemma": {},
    "gemma2": {"layer_types": MIXED, "sliding_window": 8},
    "gemma3_text": {
        "layer_types": ["sliding_attention"] * 2 + ["full_attention"] + ["sliding_attention"] * 2 + ["full_attention"],
        "sliding_window": 8,
        "rope_parameters": {
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
        },
    },
}
MODEL_TYPES = list(ARCHS)
# A head-mask for every tiny model (6 layers, 2 KV heads, 8 pairs): the heads of a layer differ,
# the layers differ, and layer 5 keeps everything (no hook there), so nothing reduces to a freq-mask.
HEAD_KEEP = [
    [[0, 1, 2, 5], [3, 6]],
    [[0], [1, 2, 3, 4, 5, 6, 7]],
    [[], [0, 7]],
    [[1, 3, 5, 7], [0, 2, 4, 6]],
    [[0, 1], [0, 1, 2]],
    [list(range(8)), list(range(8))],
]


def tiny_config(model_type: str, **overrides: Any) -> Any:
    kwargs = {**_COMMON, **copy.deepcopy(ARCHS[model_type]), **overrides}
    return get_architecture(model_type).config_class(**kwargs)


def tiny_model(model_type: str, *, seed: int = 0, attn: str = "sdpa", **overrides: Any) -> Any:
    """A randomly initialised model (weights fixed by ``seed``) in eval mode."""
    config = tiny_config(model_type, **overrides)
    model_cls = get_architecture(model_type).causal_lm_class
    torch.manual_seed(seed)
    model = model_cls(config)
    if attn == "sdpa" and not model._supports_sdpa:
        attn = "eager"  # Gemma 2's soft-capping has no sdpa path
    model.set_attn_implementation(attn)
    return model.eval()


def clone_with_config(model: Any, config: Any) -> Any:
    """A model of the same class built from ``config`` holding ``model``'s weights."""
    other = type(model)(copy.deepcopy(config))
    other.load_state_dict(model.state_dict())
    other.set_attn_implementation(model.config._attn_implementation)
    return other.eval()


def tokens(batch: int = 2, length: int = 24, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (batch, length), generator=g)


def logits(model: Any, ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, **kwargs).logits


def rotary_state(model: Any) -> dict[str, Any]:
    """Everything about a model that a failed patch must leave unchanged."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    rot = inner.model.rotary_emb
    return {
        "config": copy.deepcopy(inner.config.to_dict()),
        "buffers": {k: v.clone() for k, v in rot.named_buffers()},
        "rope_type": copy.deepcopy(rot.rope_type),
        "hooks": {n: len(m._forward_pre_hooks) for n, m in inner.named_modules()},
    }


def same_state(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return (
        a["config"] == b["config"]
        and a["rope_type"] == b["rope_type"]
        and a["hooks"] == b["hooks"]
        and a["buffers"].keys() == b["buffers"].keys()
        and all(torch.equal(a["buffers"][k], b["buffers"][k]) for k in a["buffers"])
    )


def char_tokenizer() -> Any:
    """A real fast tokenizer with one token per printable ASCII character (fits the tiny vocabulary)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "</s>"]
    chars = [chr(c) for c in range(32, 127)] + ["\n", "\t"]
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    assert len(vocab) <= VOCAB
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", eos_token="</s>")


def bpe_tokenizer(vocab_size: int = 320) -> Any:
    """A real byte-level BPE tokenizer (GPT-2 style) trained on CPython's docs, with ``vocab_size`` tokens.

    Byte-level needs the 256 bytes, so models that use it get ``vocab_size=`` beyond :data:`VOCAB`.
    What llama.cpp's GGUF vocabulary expects (``hf_prope.gguf``).
    """
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 2,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(list(topics.values())[:30], trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )


def save_tiny(folder: Any, model_type: str = "llama", *, seed: int = 0, **overrides: Any) -> Any:
    """A tiny model and its tokenizer saved to ``folder`` (a local model source for recipes); returns the folder.

    The tokenizer is character-level, or byte-level BPE when ``vocab_size`` is larger than :data:`VOCAB`.
    """
    model = tiny_model(model_type, seed=seed, **overrides)
    model.save_pretrained(folder)
    (bpe_tokenizer(model.config.vocab_size) if model.config.vocab_size > VOCAB else char_tokenizer()).save_pretrained(
        folder
    )
    return folder


# ------------------------------------------------------------------------------------------------
# The generic path: tiny models of model types without a hand-written record (hf_prope.generic)

# Shrinks every config that has these fields (sizes, experts, MLA ranks, linear-attention heads).
_GENERIC_SHRINK: dict[str, Any] = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=HEAD_DIM,
    vocab_size=VOCAB,
    max_position_embeddings=256,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=32,
    num_experts=4,
    num_local_experts=4,
    num_experts_per_tok=2,
    n_routed_experts=4,
    n_shared_experts=1,
    first_k_dense_replace=1,
    kv_lora_rank=16,
    q_lora_rank=16,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    v_head_dim=16,
    global_head_dim=32,
    sliding_window=8,
    vocab_size_per_layer_input=VOCAB,
    hidden_size_per_layer_input=16,
    num_kv_shared_layers=0,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    n_group=1,
    topk_group=1,
    linear_num_key_heads=2,
    linear_num_value_heads=2,
    linear_key_head_dim=8,
    linear_value_head_dim=8,
)

# model type -> what its tiny config sets beyond the shrink (most need nothing).
GENERIC_ARCHS: dict[str, dict[str, Any]] = {
    "gemma4_text": {"layer_types": ["sliding_attention", "full_attention"] * 2, "global_head_dim": 32},
    "smollm3": {"no_rope_layers": [1, 1, 1, 0]},
}


def _has(config: Any, name: str) -> bool:
    try:
        return hasattr(config, name)
    except Exception:  # Gemma 4's per-layer fields refuse a global read
        return name in type(config).__dataclass_fields__ if hasattr(type(config), "__dataclass_fields__") else False


def tiny_generic_config(model_type: str, **overrides: Any) -> Any:
    """A tiny config of ``model_type`` built from transformers' own config class (no hand-written record)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    cls = CONFIG_MAPPING[model_type]
    defaults = cls()
    kwargs = {k: v for k, v in _GENERIC_SHRINK.items() if _has(defaults, k)}
    kwargs.update(copy.deepcopy(GENERIC_ARCHS.get(model_type, {})))
    kwargs.update(overrides)
    return cls(**kwargs)


def tiny_generic_model(model_type: str, *, seed: int = 0, **overrides: Any) -> Any:
    """A tiny ``model_type`` model in eval mode, weights drawn wide enough (std 0.2) that positions matter."""
    config = tiny_generic_config(model_type, **overrides)
    torch.manual_seed(seed)
    model = get_architecture(model_type).causal_lm_class(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.2)
    return model.eval()
