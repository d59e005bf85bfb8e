"""A transformers tokenizer, or a GGUF file's own vocabulary, as the GGUF tokenizer fields llama.cpp reads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from ..state import unwrap
from .format import SOURCE_ATTR, GGUFExportError, require_gguf

# -- tokenizer ----------------------------------------------------------------------------------


_NORMAL, _CONTROL, _USER_DEFINED, _UNUSED = 1, 3, 4, 5  # llama.cpp's token types


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


def vocab_from_tokenizer(
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


def vocab_from_gguf(path: Path, vocab_size: int) -> tuple[dict[str, Any], str | None]:
    """Every ``tokenizer.*`` field of a GGUF file, as stored (the exact vocabulary llama.cpp reads)."""
    gguf = require_gguf()
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


def default_tokenizer(model: nn.Module) -> Any:
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


def add_fields(writer: Any, fields: dict[str, Any]) -> None:
    gguf = require_gguf()
    for key, (value, kind) in fields.items():
        if kind.startswith("ARRAY:"):
            writer.add_key_value(key, list(value), gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType[kind[6:]])
        else:
            writer.add_key_value(key, value, gguf.GGUFValueType[kind])
