"""Reading a GGUF file back: the patch from its ``rope_freqs`` (:func:`gguf_patch`) and the model (:func:`load_gguf`)."""

from __future__ import annotations

import contextlib
import os
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..patching import layer_frequencies, patch_model
from ..spec import PatchSpec, rotated_pairs
from ..state import patch_state
from .format import SOURCE_ATTR, SPEC_KEY, STOPPED_ABOVE, require_gguf

# -- reading a patch back ---------------------------------------------------------------------


def read_rope_factors(path: str | os.PathLike[str]) -> list[float] | None:
    """The ``rope_freqs`` factors of a GGUF file, or ``None`` when it has none."""
    return rope_freqs_of(require_gguf().GGUFReader(Path(path)))


def rope_freqs_of(reader: Any) -> list[float] | None:
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
    if (
        recorded is not None
        and not recorded.is_layer_selective
        and not recorded.is_per_head
        and recorded.keep_mask(inv_freq) == keep
    ):
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
    reader = require_gguf().GGUFReader(path)
    factors = rope_freqs_of(reader)
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


# -- loading a model from a GGUF file -----------------------------------------------------------


def load_gguf(path: str | Path, *, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer from a local GGUF file (dequantised to ``dtype``), with its patch.

    A file whose ``rope_freqs`` stops frequency pairs (as :func:`hf_prope.gguf.export_gguf`
    writes, and Gemma 4's converter) comes back patched; plain
    ``AutoModelForCausalLM.from_pretrained(..., gguf_file=...)`` ignores that tensor and returns
    the model with plain RoPE.
    """
    from transformers import AutoModelForCausalLM

    from ..registry import ARCHITECTURES

    tokenizer = load_gguf_tokenizer(path)
    path = Path(path)
    with _alone(path) as folder:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **_gguf_kwargs(path))
    _forget_gguf_quantization(model)
    # The file names the model (a folder would mean nothing: it was a temporary one, or one holding other files).
    model.config._name_or_path = model.name_or_path = str(path.resolve())
    setattr(model, SOURCE_ATTR, str(path.resolve()))
    if model.config.model_type in ARCHITECTURES:
        restore_gguf_patch(model, path)
    model.eval()
    return model, tokenizer


@contextlib.contextmanager
def _alone(path: Path) -> Iterator[Path]:
    """A folder holding only the GGUF file (a link to it), for transformers to load from.

    transformers reads a GGUF through its folder, and other files there take over: an
    ``adapter_config.json`` (a GGUF saved beside an adapter) makes it load the adapter's base
    model instead, a ``tokenizer.json`` replaces the file's own vocabulary.
    """
    siblings = [p.name for p in path.parent.iterdir() if p.name != path.name]
    if not siblings:
        yield path.parent
        return
    with tempfile.TemporaryDirectory(prefix="hf-prope-gguf-") as tmp:
        (Path(tmp) / path.name).symlink_to(path.resolve())
        yield Path(tmp)


def _gguf_kwargs(path: Path) -> dict[str, Any]:
    # local_files_only: a local directory never needs the Hub, and this must not try it when offline.
    return {"gguf_file": path.name, "local_files_only": True}


def load_gguf_tokenizer(path: str | Path) -> Any:
    """The tokenizer stored in a local GGUF file."""
    from transformers import AutoTokenizer

    require_gguf()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No GGUF file at {path}.")
    with _alone(path) as folder:
        return AutoTokenizer.from_pretrained(folder, **_gguf_kwargs(path))


def _forget_gguf_quantization(model: Any) -> None:
    """Mark a GGUF-loaded model as the plain float model it is.

    transformers dequantises GGUF weights into ordinary float tensors but keeps a GGUF
    "quantizer" tag on the model, which makes ``Trainer`` refuse to train it (even with LoRA)
    and ``save_pretrained`` write a ``quantization_config`` that no float checkpoint has.
    """
    if getattr(getattr(model.config, "quantization_config", None), "quant_method", None) != "gguf":
        return
    model.hf_quantizer = None
    model.is_quantized = False
    del model.config.quantization_config
