"""GGUF files for llama.cpp that carry a patch: :func:`export_gguf` writes one, :func:`gguf_patch` reads it back.

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

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from ._version import __version__
from .extras import require
from .files import atomic_path, check_writable
from .patching import layer_frequencies, patch_model
from .rope_types import base_rope_type
from .spec import PatchSpec, rotated_pairs
from .state import PatchState, is_peft_model, patch_state, unwrap

STOPPED_FACTOR = 1e30
# Factors at least this large stop their pair (whoever wrote the file; 1e30 is the convention).
STOPPED_ABOVE = 1e20
SPEC_KEY = "hf_prope.patch_spec"
# Set on a model loaded from a GGUF file (hf_prope.models.load_gguf): the file, whose exact llama.cpp
# vocabulary an export then copies. An attribute of the Python object only: never saved.
SOURCE_ATTR = "hf_prope_gguf_file"
VERSION_KEY = "hf_prope.version"
GGUFType = Literal["f16", "f32", "bf16"]
GGUF_TYPES: tuple[str, ...] = ("f16", "f32", "bf16")
# Base rope types whose frequencies llama.cpp reproduces from freq_base and per-pair factors alone.
_FACTOR_ROPE_TYPES = ("default", "linear", "llama3", "proportional")
_NORMAL, _CONTROL, _USER_DEFINED, _UNUSED = 1, 3, 4, 5  # llama.cpp's token types


class GGUFExportError(ValueError):
    """The model, its patch or its tokenizer cannot be written as a GGUF that llama.cpp runs exactly."""


def check_gguf_type(value: str, *, setting: str = "dtype", unset: str = "") -> None:
    """Raise ``ValueError`` naming ``setting`` unless ``value`` is one of :data:`GGUF_TYPES`."""
    if value not in GGUF_TYPES:
        raise ValueError(f"{setting} must be one of {', '.join(GGUF_TYPES)}{unset}, got {value!r}.")


@dataclass(frozen=True)
class GGUFExport:
    """What :func:`export_gguf` wrote."""

    path: Path
    architecture: str
    dtype: str
    rope_freqs: tuple[float, ...] | None  # None: plain RoPE, no factor tensor written
    spec: PatchSpec | None
    n_tensors: int
    tokenizer_pre: str | None


def _require_gguf() -> Any:
    require("gguf", "Writing and reading GGUF files")
    import gguf

    return gguf


# -- what llama.cpp would compute --------------------------------------------------------------


def _llama_cpp_base_frequencies(theta: float, head_dim: int) -> torch.Tensor:
    # llama.cpp's rotary: pair i turns at theta^(-2i/n_rot) before any factor. Computed in
    # float32 the way transformers computes its default frequencies, so an untouched pair's
    # factor comes out exactly 1.
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))


def _check_rope(state: PatchState, spec: PatchSpec | None) -> None:
    """What a factor tensor cannot carry: a layer-selective ``spec``, the model's own rope type, attention scaling."""
    parts = state.parts
    if spec is not None and spec.is_layer_selective:
        raise GGUFExportError(
            f"The patch applies only to some layers ({spec.describe()}), but llama.cpp shares one "
            "rope_freqs tensor across all layers, so a GGUF cannot carry it. Patch every layer to export, or "
            "serve the model with transformers (hf_prope.from_pretrained)."
        )
    original = state.original_rope_parameters
    rope_type = base_rope_type(original)
    if rope_type not in _FACTOR_ROPE_TYPES:
        raise GGUFExportError(
            f"This model's own rope type is {rope_type!r}, which a GGUF's per-pair frequency factors cannot "
            f"express (it {'scales attention' if rope_type == 'yarn' else 'depends on more than the pair'}); "
            f"exportable rope types: {', '.join(_FACTOR_ROPE_TYPES)}."
        )
    for rotary in parts.rotaries:
        scaling = float(getattr(rotary, "attention_scaling", 1.0))
        if scaling != 1.0:
            raise GGUFExportError(
                f"This model scales attention by {scaling:g} in its rotary embedding, which a GGUF's rope_freqs "
                "cannot carry."
            )
    head_dim = 2 * parts.n_pairs
    config_head_dim = (
        getattr(parts.config, "head_dim", None) or parts.config.hidden_size // parts.config.num_attention_heads
    )
    if head_dim != config_head_dim:
        raise GGUFExportError(
            f"This model rotates {head_dim} of its {config_head_dim} head channels (partial rotary); the exporter "
            "writes full-width rotation only."
        )


def check_exportable(model: nn.Module, spec: PatchSpec | None = None, *, tokenizer: Any = None) -> None:
    """Raise :class:`GGUFExportError` if :func:`export_gguf` would refuse ``model`` patched with ``spec``.

    ``spec`` defaults to the model's own patch; ``tokenizer`` (as :func:`export_gguf` takes it)
    is checked too when given. Cheap and writes nothing: for checks before a long job.
    """
    state = patch_state(model)
    _check_config(state)
    _check_rope(state, spec if spec is not None else state.spec)
    if tokenizer is None:
        return
    vocab_size = int(state.parts.config.vocab_size)
    if isinstance(tokenizer, (str, os.PathLike)):
        _vocab_from_gguf(Path(tokenizer).expanduser(), vocab_size)
    else:
        _vocab_from_tokenizer(tokenizer, vocab_size, None)


def rope_factors(state: PatchState) -> list[float]:
    """The per-pair ``rope_freqs`` factors that make llama.cpp rotate as ``state``'s model does.

    Raises :class:`GGUFExportError` when no factor tensor can express it (a layer-selective
    patch, attention scaling, a length-dependent rope type).
    """
    _check_rope(state, state.spec)
    parts = state.parts
    head_dim = 2 * parts.n_pairs
    rows = layer_frequencies(parts.root)
    if not bool((rows == rows[0]).all()):
        differing = [i for i in range(rows.shape[0]) if not torch.equal(rows[i], rows[0])]
        raise GGUFExportError(
            f"Decoder layers {differing} rotate by other frequencies than layer 0, but llama.cpp shares one "
            "rope_freqs tensor across all layers, so a GGUF cannot carry this model's RoPE."
        )
    base = _llama_cpp_base_frequencies(float(state.original_rope_parameters["rope_theta"]), head_dim).double()
    now = rows[0].double()
    factors = []
    for b, f in zip(base.tolist(), now.tolist()):
        if f == 0.0:
            factors.append(STOPPED_FACTOR)
        else:
            ratio = b / f
            factors.append(1.0 if abs(ratio - 1.0) < 1e-6 else ratio)
    return factors


# -- tokenizer ----------------------------------------------------------------------------------


def _pre_tokenizer_name(pre: dict[str, Any] | None) -> str | None:
    """llama.cpp's name for a byte-level tokenizer's pre-tokenizer, or ``None`` when it has none to match."""
    if not pre:
        return None
    steps = pre["pretokenizers"] if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"  # GPT-2's split after single digits: SmolLM and StarCoder tokenizers
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        pattern = steps[0].get("pattern", {}).get("Regex", "")
        if pattern.startswith("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}"):
            return "llama-bpe"  # Llama 3's split
    return None


def _starts_or_ends_with(tokenizer: Any) -> tuple[bool, bool]:
    ids = tokenizer("a")["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return bool(ids) and bos is not None and ids[0] == bos, bool(ids) and eos is not None and ids[-1] == eos


def _vocab_from_tokenizer(
    tokenizer: Any, vocab_size: int, pre_tokenizer: str | None
) -> tuple[dict[str, Any], str | None]:
    """GGUF tokenizer fields (key -> (value, value type name)) from a transformers byte-level BPE tokenizer."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise GGUFExportError(
            f"The tokenizer ({type(tokenizer).__name__}) is not a fast (tokenizers-backed) one; pass a fast tokenizer "
            "or tokenizer='path/to/a.gguf' to copy a GGUF file's vocabulary."
        )
    data = json.loads(backend.to_str())
    model = data.get("model", {})
    decoder = data.get("decoder") or {}
    if model.get("type") != "BPE" or decoder.get("type") != "ByteLevel":
        raise GGUFExportError(
            f"The exporter writes byte-level BPE vocabularies (GPT-2, Llama 3, SmolLM, Qwen style); this tokenizer is "
            f"{model.get('type')} with a {decoder.get('type')} decoder. Pass tokenizer='path/to/a.gguf' to copy the "
            "vocabulary of a GGUF file of the same model instead."
        )
    vocab = tokenizer.get_vocab()
    if len(vocab) > vocab_size:
        raise GGUFExportError(
            f"The tokenizer has {len(vocab)} tokens but the model's embedding has {vocab_size} rows; they must match."
        )
    tokens: list[str | None] = [None] * vocab_size
    for text, i in vocab.items():
        tokens[i] = text
    added = {int(i): t for i, t in tokenizer.added_tokens_decoder.items()}
    types = []
    for i in range(vocab_size):
        if tokens[i] is None:
            tokens[i], kind = f"[PAD{i}]", _UNUSED  # the embedding is padded beyond the tokenizer
        elif i in added:
            kind = _CONTROL if added[i].special else _USER_DEFINED
        else:
            kind = _NORMAL
        types.append(kind)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    pre = pre_tokenizer or _pre_tokenizer_name(data.get("pre_tokenizer"))
    add_bos, add_eos = _starts_or_ends_with(tokenizer)
    fields: dict[str, Any] = {
        "tokenizer.ggml.model": ("gpt2", "STRING"),
        "tokenizer.ggml.pre": (pre or "default", "STRING"),
        "tokenizer.ggml.tokens": (tokens, "ARRAY:STRING"),
        "tokenizer.ggml.token_type": (types, "ARRAY:INT32"),
        "tokenizer.ggml.merges": (merges, "ARRAY:STRING"),
        "tokenizer.ggml.add_bos_token": (add_bos, "BOOL"),
        "tokenizer.ggml.add_eos_token": (add_eos, "BOOL"),
    }
    for name in ("bos", "eos", "unk", "pad"):
        value = getattr(tokenizer, f"{name}_token_id", None)
        if value is not None:
            key = "unknown" if name == "unk" else ("padding" if name == "pad" else name)
            fields[f"tokenizer.ggml.{key}_token_id"] = (int(value), "UINT32")
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        fields["tokenizer.chat_template"] = (template, "STRING")
    return fields, pre


def _vocab_from_gguf(path: Path, vocab_size: int) -> tuple[dict[str, Any], str | None]:
    """Every ``tokenizer.*`` field of a GGUF file, as stored (the exact vocabulary llama.cpp reads)."""
    gguf = _require_gguf()
    if not path.is_file():
        raise FileNotFoundError(f"No GGUF file at {path} to copy the vocabulary from.")
    reader = gguf.GGUFReader(path)
    fields: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            fields[key] = (field.contents(), f"ARRAY:{field.types[-1].name}")
        else:
            fields[key] = (field.contents(), vtype.name)
    tokens = fields.get("tokenizer.ggml.tokens", ([], ""))[0]
    if len(tokens) != vocab_size:
        raise GGUFExportError(
            f"{path} holds a vocabulary of {len(tokens)} tokens but the model's embedding has {vocab_size} rows; "
            "copy the vocabulary of a GGUF file of this model."
        )
    pre = fields.get("tokenizer.ggml.pre", (None, ""))[0]
    return fields, pre


def vocabulary_for(model: nn.Module, tokenizer: Any) -> Any:
    """What to pass as ``tokenizer`` when exporting ``model`` saved with ``tokenizer``.

    A model loaded from a GGUF file exports that file's own llama.cpp vocabulary (``None``:
    its exact pre-tokenizer); any other model the given tokenizer.
    """
    return None if getattr(unwrap(model), SOURCE_ATTR, None) else tokenizer


def _default_tokenizer(model: nn.Module) -> Any:
    source = getattr(model, SOURCE_ATTR, None)
    if source is not None:
        return Path(source)
    folder = str(getattr(model.config, "_name_or_path", "") or "")
    if folder and Path(folder).is_dir():
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError):
            pass
    raise GGUFExportError(
        "No tokenizer found for this model (it was not loaded from a GGUF file or a folder holding one); pass "
        "tokenizer=<its transformers tokenizer> or tokenizer='path/to/a.gguf' of the same model."
    )


def _add_fields(writer: Any, fields: dict[str, Any]) -> None:
    gguf = _require_gguf()
    for key, (value, kind) in fields.items():
        if kind.startswith("ARRAY:"):
            writer.add_key_value(key, list(value), gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType[kind[6:]])
        else:
            writer.add_key_value(key, value, gguf.GGUFValueType[kind])


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


def _check_config(state: PatchState) -> tuple[str, Any]:
    parts = state.parts
    graph = parts.arch.llama_cpp_graph
    if graph is None:
        raise GGUFExportError(
            f"llama.cpp's {parts.arch.model_type} graph passes no frequency factors to its rotary op, so a GGUF of "
            f"this model would run plain RoPE and silently drop the patch. GGUF export supports "
            f"{', '.join(exportable_model_types())}; serve {parts.arch.model_type} p-RoPE models with transformers "
            "(hf_prope.from_pretrained) or, for a native 'proportional' save, vLLM."
        )
    config = parts.config
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(config, flag, False):
            raise GGUFExportError(f"config.{flag} is set; the exporter writes bias-free Llama/Mistral models only.")
    return graph, config


def exportable_model_types() -> list[str]:
    """Model types whose llama.cpp graph reads per-pair frequency factors (so :func:`export_gguf` takes them)."""
    from .registry import ARCHITECTURES

    return sorted(t for t, a in ARCHITECTURES.items() if a.llama_cpp_graph is not None)


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
            model was loaded from (:func:`hf_prope.models.load_gguf`), else the tokenizer saved
            in the model's local folder.
        dtype: ``"f16"`` (default), ``"bf16"`` or ``"f32"`` for the matrices; norms and
            ``rope_freqs`` are always f32 (1e30 does not fit in f16).
        pre_tokenizer: llama.cpp's pre-tokenizer name (``tokenizer.ggml.pre``) when it cannot
            be recognised from the tokenizer (GPT-2's, SmolLM's and Llama 3's are).
        progress: called with (tensors written, total).

    Raises :class:`GGUFExportError` (a ``ValueError``) naming what cannot be exported and what
    would work, and ``PermissionError`` for an unwritable path, before anything is written.
    """
    return _export(model, path, tokenizer=tokenizer, dtype=dtype, pre_tokenizer=pre_tokenizer, progress=progress)


def _export(
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
    gguf = _require_gguf()
    check_gguf_type(dtype)
    target = Path(path).expanduser()
    if target.suffix != ".gguf":
        raise ValueError(f"The output path must end in .gguf, got {str(path)!r}.")
    if target.is_dir():
        raise ValueError(f"{target} is a folder; give the path of the .gguf file to write.")
    check_writable(target.parent)
    state = patch_state(model)
    graph, config = _check_config(state)
    factors = rope_factors(state)
    if tokenizer is None:
        tokenizer = _default_tokenizer(unwrap(model))
    if isinstance(tokenizer, (str, os.PathLike)):
        vocab, pre = _vocab_from_gguf(Path(tokenizer).expanduser(), int(config.vocab_size))
    else:
        vocab, pre = _vocab_from_tokenizer(tokenizer, int(config.vocab_size), pre_tokenizer)
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
        _add_fields(writer, vocab)
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


# -- checking a file in llama.cpp ---------------------------------------------------------------


def llama_cpp_logits(path: str | os.PathLike[str], ids: Sequence[int], *, f32_cache: bool = False) -> np.ndarray:
    """llama.cpp's logits (llama-cpp-python) for every position of ``ids`` run through the GGUF at ``path``.

    ``f32_cache`` keeps llama.cpp's KV cache in f32 instead of its default f16.
    """
    try:
        from llama_cpp import Llama
    except ImportError:
        raise ImportError(
            "Running a GGUF in llama.cpp needs llama-cpp-python: pip install llama-cpp-python (it builds llama.cpp "
            "from source, a few minutes)"
        ) from None
    cache = {"type_k": 0, "type_v": 0} if f32_cache else {}  # 0 = GGML_TYPE_F32
    llm = Llama(
        model_path=str(path),
        n_ctx=max(64, len(ids)),
        n_batch=min(512, max(64, len(ids))),
        logits_all=True,
        verbose=False,
        seed=0,
        **cache,
    )
    try:
        llm.eval(list(ids))
        return np.array(llm.scores[: len(ids)], dtype=np.float32)
    finally:
        llm.close()


def _agreement(got: np.ndarray, want: np.ndarray) -> dict[str, float]:
    diff = np.abs(got - want)
    return {
        "mean_abs_logit_diff": float(diff.mean()),
        "max_abs_logit_diff": float(diff.max()),
        "argmax_agreement": float(np.mean(got.argmax(-1) == want.argmax(-1))),
    }


def check_in_llama_cpp(model: nn.Module, path: str | os.PathLike[str], ids: Sequence[int]) -> dict[str, Any]:
    """Compare llama.cpp on an exported file with ``model`` in transformers, on the token ids ``ids``.

    Returns the mean and max absolute logit difference and the argmax agreement, for the file
    and (under ``"plain_rope"``) for a plain-RoPE GGUF of the same weights written to a
    temporary file (what llama.cpp's own converter writes), so the figures say how far apart
    two different models are. The file may be quantised (``llama-quantize`` keeps
    ``rope_freqs``); the plain-RoPE file is then f16.
    """
    import tempfile

    with torch.no_grad():
        device = next(unwrap(model).parameters()).device
        want = model(input_ids=torch.tensor([list(ids)], device=device)).logits[0].float().cpu().numpy()
    result: dict[str, Any] = {"tokens": len(ids), **_agreement(llama_cpp_logits(path, ids), want)}
    reader = _require_gguf().GGUFReader(Path(path))
    if _factors(reader) is not None:
        kind = next(t.tensor_type.name for t in reader.tensors if t.name.endswith("attn_q.weight"))
        # A quantised file (llama-quantize keeps rope_freqs) is set beside an f16 plain one.
        dtype = {"F32": "f32", "BF16": "bf16"}.get(kind, "f16")
        with tempfile.TemporaryDirectory() as tmp:
            plain = Path(tmp) / "plain.gguf"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                _export(model, plain, tokenizer=Path(path), dtype=dtype, pre_tokenizer=None, with_factors=False)
            result["plain_rope"] = _agreement(llama_cpp_logits(plain, ids), want)
    return result


# -- reading a patch back ---------------------------------------------------------------------


def read_rope_factors(path: str | os.PathLike[str]) -> list[float] | None:
    """The ``rope_freqs`` factors of a GGUF file, or ``None`` when it has none."""
    return _factors(_require_gguf().GGUFReader(Path(path)))


def _factors(reader: Any) -> list[float] | None:
    for tensor in reader.tensors:
        if tensor.name == "rope_freqs.weight":
            return [float(v) for v in np.asarray(tensor.data, dtype=np.float64).reshape(-1)]
    return None


def _recorded_spec(reader: Any) -> PatchSpec | None:
    field = reader.fields.get(SPEC_KEY)
    if field is None:
        return None
    try:
        return PatchSpec.from_json(str(field.contents()))
    except (TypeError, ValueError):
        return None


def spec_from_factors(
    factors: Sequence[float], inv_freq: Sequence[float], recorded: PatchSpec | None = None
) -> PatchSpec | None:
    """The patch that stops the pairs whose factor is :data:`STOPPED_FACTOR`, or ``None`` when none is stopped.

    ``recorded`` (the spec an hf-prope export stored) is returned when it stops exactly those
    pairs on a model with frequencies ``inv_freq``; otherwise the pairs decide: a p-RoPE
    spec when the rotating pairs are the highest ``rotated_pairs(p, d)``, else a frequency mask.
    """
    keep = [f < STOPPED_ABOVE for f in factors]
    if all(keep):
        return None
    if recorded is not None and not recorded.is_layer_selective and recorded.keep_mask(inv_freq) == keep:
        return recorded
    n = len(keep)
    r = sum(keep)
    if r == 0:
        return PatchSpec("nope")
    if keep == [i < r for i in range(n)] and rotated_pairs(r / n, 2 * n) == r:
        return PatchSpec("p-rope", p=r / n)
    return PatchSpec("freq-mask", mask=tuple(keep))


def gguf_patch(model: nn.Module, path: str | os.PathLike[str]) -> PatchSpec | None:
    """The patch a GGUF file's ``rope_freqs`` carries for ``model`` (loaded from that file), or ``None``."""
    path = Path(path)
    reader = _require_gguf().GGUFReader(path)
    factors = _factors(reader)
    if factors is None:
        return None
    parts = patch_state(model).parts
    if len(factors) != parts.n_pairs:
        raise ValueError(
            f"{path} has {len(factors)} rope_freqs factors but the model has {parts.n_pairs} frequency pairs."
        )
    scaled = [f for f in factors if f < STOPPED_ABOVE and abs(f - 1.0) > 1e-6]
    if scaled:
        warnings.warn(
            f"{path.name} scales {len(scaled)} frequency pairs (e.g. Llama 3's long-context scaling), which "
            "transformers' GGUF loader does not restore; only the stopped pairs are restored as an hf-prope patch.",
            UserWarning,
            stacklevel=3,
        )
    inv_freq = layer_frequencies(model, original=True)[0].tolist()
    return spec_from_factors(factors, inv_freq, _recorded_spec(reader))


def restore_gguf_patch(model: nn.Module, path: str | os.PathLike[str]) -> nn.Module:
    """Patch a model loaded from a GGUF file as the file's ``rope_freqs`` says (nothing when it stops no pair)."""
    spec = gguf_patch(model, path)
    if spec is not None:
        patch_model(model, spec)
    return model
