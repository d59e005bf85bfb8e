"""Writing the GGUF file: merged weights in llama.cpp's layout, streamed one tensor at a time (:func:`export_gguf`)."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .._version import __version__
from ..files import atomic_path, check_writable
from ..state import is_peft_model, patch_state, unwrap
from .factors import check_config, rope_factors
from .format import SPEC_KEY, VERSION_KEY, GGUFExport, GGUFExportError, GGUFType, check_gguf_type, require_gguf
from .vocabulary import add_fields, default_tokenizer, vocab_from_gguf, vocab_from_tokenizer

# -- weights ------------------------------------------------------------------------------------


def _merged_state(root: nn.Module) -> dict[str, torch.Tensor]:
    """The transformers model's weights, with active LoRA adapters merged in (the model is not changed)."""
    inner = unwrap(root)
    if not is_peft_model(root):
        return {k: v.detach() for k, v in inner.state_dict().items()}
    from peft.tuners.lora import LoraLayer

    for name, module in inner.named_modules():
        kind = type(module).__module__
        if kind.startswith("peft.tuners.") and not isinstance(module, LoraLayer) and hasattr(module, "base_layer"):
            raise GGUFExportError(
                f"{name} is a PEFT {type(module).__name__} layer; the exporter merges LoRA adapters only. Call "
                "model.merge_and_unload() first."
            )
    state: dict[str, torch.Tensor] = {}
    for name, module in inner.named_modules():
        if isinstance(module, LoraLayer):
            base = module.get_base_layer()
            weight = base.weight.detach().clone()
            if not getattr(module, "merged", False) and not module.disable_adapters:
                for adapter in module.active_adapters:
                    if adapter in module.lora_A:
                        weight = weight + module.get_delta_weight(adapter).detach().to(weight.dtype)
            state[f"{name}.weight"] = weight
            if getattr(base, "bias", None) is not None:
                state[f"{name}.bias"] = base.bias.detach()
        elif hasattr(module, "modules_to_save") and hasattr(module, "original_module"):
            # PEFT's ModulesToSaveWrapper: the trained copy of the active adapter replaces the original.
            active = (
                [a for a in module.active_adapters if a in module.modules_to_save]
                if not module.disable_adapters
                else []
            )
            source = module.modules_to_save[active[0]] if active else module.original_module
            for key, value in source.state_dict().items():
                state[f"{name}.{key}"] = value.detach()
    for key, value in inner.state_dict().items():
        if "lora_" in key or ".base_layer." in key or ".modules_to_save." in key or ".original_module." in key:
            continue
        state.setdefault(key, value.detach())
    return state


def _to_pairs(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder q/k projection rows from transformers' split halves to llama.cpp's adjacent pairs.

    transformers rotates channel i with channel i + d/2 of each head; llama.cpp's llama graph
    rotates channels 2i and 2i + 1. Interleaving the halves of each head makes them the same
    rotation (pair i stays pair i, so the factors keep their order).
    """
    rows = weight.shape[0]
    half = rows // n_heads // 2
    return weight.reshape(n_heads, 2, half, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


_LAYER_TENSORS = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def _llama_tensors(state: dict[str, torch.Tensor], config: Any) -> list[tuple[str, torch.Tensor]]:
    prefix = "model." if any(k.startswith("model.") for k in state) else ""
    out = [("token_embd.weight", state[f"{prefix}embed_tokens.weight"])]
    for i in range(int(config.num_hidden_layers)):
        for hf_name, gguf_name in _LAYER_TENSORS.items():
            tensor = state[f"{prefix}layers.{i}.{hf_name}"]
            if gguf_name == "attn_q.weight":
                tensor = _to_pairs(tensor, int(config.num_attention_heads))
            elif gguf_name == "attn_k.weight":
                tensor = _to_pairs(tensor, int(config.num_key_value_heads))
            out.append((f"blk.{i}.{gguf_name}", tensor))
    out.append(("output_norm.weight", state[f"{prefix}norm.weight"]))
    if not getattr(config, "tie_word_embeddings", False) and "lm_head.weight" in state:
        out.append(("output.weight", state["lm_head.weight"]))
    return out


def _encoding(gguf: Any, tensor: torch.Tensor, dtype: str) -> tuple[Any, Any, int]:
    """(numpy dtype, GGML type, bytes per value) a tensor is written with; norms and rope_freqs stay f32."""
    if tensor.ndim == 1 or dtype == "f32":
        return np.dtype(np.float32), gguf.GGMLQuantizationType.F32, 4
    if dtype == "f16":
        return np.dtype(np.float16), gguf.GGMLQuantizationType.F16, 2
    return np.dtype(np.uint16), gguf.GGMLQuantizationType.BF16, 2  # not uint8: the shape given is the logical one


def _encode(gguf: Any, tensor: torch.Tensor, dtype: str) -> np.ndarray:
    values = tensor.detach().to(torch.float32).cpu().numpy()
    np_dtype, raw, _ = _encoding(gguf, tensor, dtype)
    if raw == gguf.GGMLQuantizationType.BF16:
        return gguf.quants.quantize(values, raw)
    return values.astype(np_dtype, copy=False)


# -- export -------------------------------------------------------------------------------------


def export_gguf(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    tokenizer: Any = None,
    dtype: GGUFType = "f16",
    pre_tokenizer: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> GGUFExport:
    """Write ``model`` (patched or not, LoRA adapters merged) as a GGUF file llama.cpp runs exactly.

    Args:
        model: a loaded Llama or Mistral model (or a PEFT LoRA model of one), with a patch that
            applies to every layer, or none (a plain GGUF).
        path: the ``.gguf`` file to write; it appears only once complete.
        tokenizer: the model's transformers tokenizer (a fast byte-level BPE one), or the path
            of a GGUF file whose vocabulary to copy as is (the exact llama.cpp vocabulary of a
            model that came from a GGUF, pre-tokenizer included). Default: the GGUF file the
            model was loaded from (:func:`hf_prope.gguf.load_gguf`), else the tokenizer saved
            in the model's local folder.
        dtype: ``"f16"`` (default), ``"bf16"`` or ``"f32"`` for the matrices; norms and
            ``rope_freqs`` are always f32 (1e30 does not fit in f16).
        pre_tokenizer: llama.cpp's pre-tokenizer name (``tokenizer.ggml.pre``) when it cannot
            be recognised from the tokenizer (GPT-2's, SmolLM's and Llama 3's are).
        progress: called with (tensors written, total).

    Raises :class:`GGUFExportError` (a ``ValueError``) naming what cannot be exported and what
    would work, and ``PermissionError`` for an unwritable path, before anything is written.
    """
    return write_gguf(model, path, tokenizer=tokenizer, dtype=dtype, pre_tokenizer=pre_tokenizer, progress=progress)


def write_gguf(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    tokenizer: Any,
    dtype: str,
    pre_tokenizer: str | None,
    progress: Callable[[int, int], None] | None = None,
    with_factors: bool = True,
) -> GGUFExport:
    # with_factors=False writes what llama.cpp's own converter would: the same weights with plain
    # RoPE. Only check_in_llama_cpp uses it, to show that the comparison can tell the two apart.
    gguf = require_gguf()
    check_gguf_type(dtype)
    target = Path(path).expanduser()
    if target.suffix != ".gguf":
        raise ValueError(f"The output path must end in .gguf, got {str(path)!r}.")
    if target.is_dir():
        raise ValueError(f"{target} is a folder; give the path of the .gguf file to write.")
    check_writable(target.parent)
    state = patch_state(model)
    graph, config = check_config(state)
    factors = rope_factors(state)
    if tokenizer is None:
        tokenizer = default_tokenizer(unwrap(model))
    if isinstance(tokenizer, (str, os.PathLike)):
        vocab, pre = vocab_from_gguf(Path(tokenizer).expanduser(), int(config.vocab_size))
    else:
        vocab, pre = vocab_from_tokenizer(tokenizer, int(config.vocab_size), pre_tokenizer)
    if pre is None:
        warnings.warn(
            "The tokenizer's pre-tokenizer is not one the exporter recognises, so llama.cpp will split text with its "
            "'default' rule and may tokenize some text differently from transformers (token ids given directly are "
            "unaffected). Pass pre_tokenizer='<llama.cpp name>' to set it.",
            UserWarning,
            stacklevel=2,
        )
    window = getattr(config, "sliding_window", None)
    if window and int(window) < int(config.max_position_embeddings):
        warnings.warn(
            f"This model attends within a sliding window of {window} tokens, which llama.cpp's llama graph does not "
            f"apply: beyond {window} tokens of context the GGUF attends to everything.",
            UserWarning,
            stacklevel=2,
        )
    tensors = _llama_tensors(_merged_state(state.parts.root), config)
    write_factors = with_factors and any(f != 1.0 for f in factors)
    head_dim = 2 * state.parts.n_pairs
    total = len(tensors) + int(write_factors)
    file_type = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "bf16": gguf.LlamaFileType.MOSTLY_BF16,
    }[dtype]

    with atomic_path(target) as tmp:
        writer = gguf.GGUFWriter(tmp, graph)
        source = Path(str(getattr(config, "_name_or_path", "") or "model"))
        name = (source.stem if source.suffix == ".gguf" else source.name) or "model"
        writer.add_name(name)
        writer.add_context_length(int(config.max_position_embeddings))
        writer.add_embedding_length(int(config.hidden_size))
        writer.add_block_count(int(config.num_hidden_layers))
        writer.add_feed_forward_length(int(config.intermediate_size))
        writer.add_head_count(int(config.num_attention_heads))
        writer.add_head_count_kv(int(config.num_key_value_heads))
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_rope_dimension_count(head_dim)
        writer.add_rope_freq_base(float(state.original_rope_parameters["rope_theta"]))
        writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
        writer.add_vocab_size(int(config.vocab_size))
        writer.add_file_type(int(file_type))
        writer.add_string(VERSION_KEY, __version__)
        if state.spec is not None and with_factors:
            writer.add_string(SPEC_KEY, state.spec.to_json())
        add_fields(writer, vocab)
        if write_factors:
            tensors.append(("rope_freqs.weight", torch.tensor(factors, dtype=torch.float32)))
        # Tensor infos first, then one tensor at a time: memory holds one encoded tensor, not the model twice.
        for gguf_name, tensor in tensors:
            np_dtype, raw, width = _encoding(gguf, tensor, dtype)
            writer.add_tensor_info(gguf_name, tuple(tensor.shape), np_dtype, tensor.numel() * width, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for done, (_, tensor) in enumerate(tensors, 1):
            writer.write_tensor_data(_encode(gguf, tensor, dtype))
            if progress is not None:
                progress(done, total)
        writer.close()
    return GGUFExport(
        path=target.resolve(),
        architecture=graph,
        dtype=dtype,
        rope_freqs=tuple(factors) if write_factors else None,
        spec=state.spec,
        n_tensors=total,
        tokenizer_pre=pre,
    )
