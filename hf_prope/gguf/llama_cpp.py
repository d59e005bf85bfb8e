"""Running a GGUF file in llama.cpp itself (llama-cpp-python) and comparing it with transformers."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..state import unwrap
from .format import require_gguf
from .reader import rope_freqs_of
from .writer import write_gguf

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
    reader = require_gguf().GGUFReader(Path(path))
    if rope_freqs_of(reader) is not None:
        kind = next(t.tensor_type.name for t in reader.tensors if t.name.endswith("attn_q.weight"))
        # A quantised file (llama-quantize keeps rope_freqs) is set beside an f16 plain one.
        dtype = {"F32": "f32", "BF16": "bf16"}.get(kind, "f16")
        with tempfile.TemporaryDirectory() as tmp:
            plain = Path(tmp) / "plain.gguf"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                write_gguf(model, plain, tokenizer=Path(path), dtype=dtype, pre_tokenizer=None, with_factors=False)
            result["plain_rope"] = _agreement(llama_cpp_logits(plain, ids), want)
    return result
