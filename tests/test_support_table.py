"""docs/semantics.md's table of supported model types is what the code does, type by type.

Each row is derived here from a tiny model of the type (transformers' own config class): the
record it is patched by, the rope type a p-RoPE patch on every layer is saved as, whether a patch
on some layers and a per-head mask apply or are refused (and why), what ``hf-prope export`` does
with it (:func:`hf_prope.gguf.factors.check_exportable`) and what a save writes for mlx-lm and
other readers of the old config layout (:mod:`hf_prope.legacy_config`). Refusals are the
library's own errors, classified by their text; one this file does not know shows verbatim, so
no refusal is ever hidden. ``python tests/test_support_table.py`` prints the table.
"""

from __future__ import annotations

import re
import sys
import warnings
from pathlib import Path

import pytest
from tiny import tiny_generic_model, tiny_model

import hf_prope
from hf_prope.gguf.factors import check_exportable
from hf_prope.legacy_config import REFUSAL
from hf_prope.registry import ARCHITECTURES, supported_model_types
from hf_prope.rope_types import has_native_proportional
from hf_prope.state import model_parts

DOC = Path(__file__).resolve().parents[1] / "docs" / "semantics.md"
HEADER = (
    "| model type | record | p-RoPE on every layer saved as | `layers=` / `layer_types=` | per-head masks "
    "| `hf-prope export` (GGUF) | mlx-lm reads |"
)
# The library's refusals, by a phrase of their text -> what the table says.
REASONS = {
    "does not return cos/sin with pair i in channels i and i + d/2": "refused: rotary layout",
    "refuses the patched rope parameters": "refused: config class",
    "needs hf-prope's rotary function": "refused: rotary function",
    "rotate different numbers of pairs": "refused: pairs differ by layer type",
    "its check of the patched rotation failed": "refused: probe",
    "graph passes no frequency factors": "refused: llama.cpp graph",
    "partial rotary": "refused: partial rotary",
}


def _installed() -> list[str]:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    return [t for t in supported_model_types() if t in CONFIG_MAPPING]


def _build(model_type: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tiny_model(model_type) if model_type in ARCHITECTURES else tiny_generic_model(model_type)


def _reason(error: Exception) -> str:
    text = str(error)
    for phrase, label in REASONS.items():
        if phrase in text:
            return label
    return f"refused: {text.split('. ')[0]}"


def _outcome(model_type: str, name: str, **kwargs) -> str:
    model = _build(model_type)
    try:
        hf_prope.patch_model(model, name, p=0.5, **kwargs)
    except ValueError as error:  # RotationCheckError and UnsupportedModelError among them
        return _reason(error)
    return "yes"


def row(model_type: str) -> list[str]:
    """The table's cells for ``model_type``, read from what the library does with a tiny model of it."""
    model = _build(model_type)
    layers = sorted(model_parts(model).attentions)
    hf_prope.patch_model(model, "p-rope", p=0.5)
    params = model.config.rope_parameters
    present = set(getattr(model.config, "layer_types", None) or [])
    entries = [params] if "rope_type" in params else [v for k, v in params.items() if k in present or not present]
    saved = ", ".join(f"`{t}`" for t in sorted({e["rope_type"] for e in entries}))
    written = model.config.to_dict()
    if REFUSAL in (written.get("rope_theta"), written.get("rope_local_base_freq")):
        mlx = "refused: base written as text"
    elif (written.get("rope_scaling") or {}).get("rope_type") == "proportional":
        mlx = "`proportional`: runs it"
    elif written.get("rope_scaling"):
        mlx = f"refused: `{written['rope_scaling']['rope_type']}` unknown"
    else:
        mlx = "nothing written (typed `rope_theta`)"
    try:
        check_exportable(model)
        gguf = "yes"
    except hf_prope.GGUFExportError as error:
        gguf = _reason(error)
    return [
        f"`{model_type}`",
        "hand-written" if model_type in ARCHITECTURES else "generic",
        saved,
        _outcome(model_type, "p-rope", layers=layers[:1]),
        _outcome(model_type, "head-mask"),
        gguf,
        mlx,
    ]


def table(types: list[str]) -> str:
    lines = [HEADER, "|" + "---|" * HEADER.count(" | ") + "---|"]
    lines += ["| " + " | ".join(row(t)) + " |" for t in types]
    return "\n".join(lines)


def _documented() -> dict[str, list[str]]:
    text = DOC.read_text(encoding="utf-8")
    assert HEADER in text, f"{DOC.name} has no table headed {HEADER!r}"
    rows: dict[str, list[str]] = {}
    for line in text.split(HEADER, 1)[1].splitlines()[2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        rows[cells[0].strip("`")] = cells
    return rows


def test_every_supported_type_has_a_row() -> None:
    documented = _documented()
    assert sorted(documented) == supported_model_types()


# Rows are written with transformers' newest release, which has the native "proportional" type.
NEEDS_NATIVE = pytest.mark.skipif(not has_native_proportional(), reason="transformers < 5.5: the rope types differ")


@NEEDS_NATIVE
@pytest.mark.parametrize("model_type", _installed())
def test_row_is_what_the_library_does(model_type: str) -> None:
    documented = _documented()[model_type]
    derived = row(model_type)
    assert documented == derived, (
        f"docs/semantics.md's row for {model_type} no longer says what hf-prope does:\n"
        f"  documented: {documented}\n  derived:    {derived}\n"
        "Regenerate the table with python tests/test_support_table.py."
    )


def test_unknown_refusals_show_verbatim() -> None:
    assert _reason(ValueError("Something new. More.")) == "refused: Something new"
    assert re.match(r"refused: ", _reason(ValueError(next(iter(REASONS)))))


if __name__ == "__main__":
    print(table(_installed()), file=sys.stdout)
