"""The patch record: the small JSON file that makes an adapter carry its patch.

PEFT's ``adapter_config.json`` records only the base model's name, and
``AutoPeftModelForCausalLM.from_pretrained`` would rebuild that base with plain RoPE: same
shapes, no error, a different model. :data:`PATCH_FILE` beside the adapter holds the spec,
the patched and the original ``rope_parameters`` and the fingerprint of the base (type, head
size, depth, width); :func:`check_base_matches` refuses a base that differs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ._version import __version__
from .files import atomic_path, write_atomic
from .spec import PatchSpec
from .state import PatchState

PATCH_FILE = "hf_prope_patch.json"
BASE_CONFIG_FILE = "hf_prope_base_config.json"
PATCH_FILE_VERSION = 1


class PatchMismatchError(ValueError):
    """An adapter's recorded base model does not match the base model given."""


def patch_record(state: PatchState) -> dict[str, Any]:
    """The JSON an adapter carries (from :func:`hf_prope.state.patch_state`): spec, rope parameters, base."""
    return {
        "format_version": PATCH_FILE_VERSION,
        "hf_prope_version": __version__,
        "spec": state.spec.to_dict() if state.spec is not None else None,
        "rope_parameters": state.rope_parameters,
        "original_rope_parameters": state.original_rope_parameters,
        "base_model": state.base,
    }


def record_json(state: PatchState) -> str:
    """:func:`patch_record` as the text of :data:`PATCH_FILE`."""
    return json.dumps(patch_record(state), indent=2, sort_keys=True) + "\n"


def read_patch_record(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    """Read and validate :data:`PATCH_FILE` from a folder, or ``None`` if there is none."""
    path = Path(folder) / PATCH_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(record, dict):
        raise ValueError(f"{path} must hold a JSON object.")
    for key in ("format_version", "spec", "rope_parameters", "base_model"):
        if key not in record:
            raise ValueError(f"{path} is missing the field {key!r}.")
    if record["format_version"] != PATCH_FILE_VERSION:
        raise ValueError(
            f"{path}: field 'format_version' is {record['format_version']!r}; expected {PATCH_FILE_VERSION}."
        )
    if record["spec"] is not None:
        try:
            PatchSpec.from_dict(record["spec"])
        except (TypeError, ValueError) as err:
            raise ValueError(f"{path}: field 'spec' is invalid: {err}") from err
    if not isinstance(record["rope_parameters"], dict):
        raise ValueError(f"{path}: field 'rope_parameters' must be an object.")
    return record


def recorded_spec(record: dict[str, Any]) -> PatchSpec | None:
    """The patch a (validated) record carries, or ``None`` for an unpatched base."""
    return PatchSpec.from_dict(record["spec"]) if record["spec"] is not None else None


def check_base_matches(record: dict[str, Any], base: PatchState) -> None:
    """Refuse a base model whose architecture or head size differs from the one the adapter was trained on."""
    want = record["base_model"]
    got = base.base
    for key in ("model_type", "head_dim", "num_hidden_layers", "hidden_size"):
        if key in want and want[key] != got[key]:
            raise PatchMismatchError(
                f"The adapter was saved from a {want['model_type']} base with {key}={want[key]}, but the base model "
                f"given has {key}={got[key]} ({got['model_type']}). Load it on the base it was trained on."
            )


# The record also rides in the adapter weights' safetensors header, which PEFT itself downloads:
# so a plain ``PeftModel.from_pretrained`` from the Hub leaves it on this machine, and the
# load check (hf_prope.peft_integration) can read it without a request.
SAFETENSORS_KEY = "hf_prope_patch"


def embed_in_safetensors(path: str | os.PathLike[str], state: PatchState) -> None:
    """Add the patch record to a safetensors file's metadata (the tensors are unchanged)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = Path(path)
    with safe_open(path, "pt") as f:
        metadata = dict(f.metadata() or {})
    metadata[SAFETENSORS_KEY] = json.dumps(patch_record(state), sort_keys=True)
    tensors = load_file(path)
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)


def record_from_safetensors(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The patch record in a safetensors file's metadata (reads the header only), or ``None``."""
    from safetensors import safe_open

    try:
        with safe_open(Path(path), "pt") as f:
            text = (f.metadata() or {}).get(SAFETENSORS_KEY)
        record = json.loads(text) if text else None
    except Exception:  # noqa: BLE001 - not a safetensors file or no valid record: nothing to read
        return None
    return record if isinstance(record, dict) and "spec" in record else None


ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"


def write_adapter_record(folder: str | os.PathLike[str], state: PatchState) -> None:
    """Make the adapter PEFT wrote in ``folder`` carry the patch of ``state``.

    :data:`PATCH_FILE`, the base's config (:data:`BASE_CONFIG_FILE`) and the record in the
    weights' safetensors metadata; each file replaced whole, never half-written.
    """
    folder = Path(folder)
    write_atomic(folder / PATCH_FILE, record_json(state))
    write_atomic(folder / BASE_CONFIG_FILE, state.parts.config.to_json_string())
    weights = folder / ADAPTER_WEIGHTS_FILE
    if weights.is_file():
        embed_in_safetensors(weights, state)


def find_record(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The patch record of an adapter folder: :data:`PATCH_FILE`, else its weights' metadata, else ``None``."""
    record = read_patch_record(folder)
    if record is None and (Path(folder) / ADAPTER_WEIGHTS_FILE).is_file():
        record = record_from_safetensors(Path(folder) / ADAPTER_WEIGHTS_FILE)
    return record
