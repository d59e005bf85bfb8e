"""The model card of a patched model: what the patch is, its rope parameters, how to load and serve it, results.

Written by :mod:`hf_prope.hub` into every save and push. It says how to load the model with
hf-prope and, where the patch is native (``"proportional"``), without it; it warns that PEFT
alone would load an adapter on a plain-RoPE base; and its "Serving" section
(:func:`serving_table`) says which inference engines run the checkpoint with its patch, which
refuse it loudly and which would silently drop it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .files import local_path
from .models import is_embedded_source
from .patch_record import PATCH_FILE
from .state import PatchState


def _license_of(path: str | None) -> str | None:
    if path and Path(path, "README.md").is_file():
        from huggingface_hub import ModelCard

        try:
            return ModelCard.load(Path(path, "README.md")).data.license
        except Exception:  # noqa: BLE001 - a malformed base card must not block saving
            return None
    return None


def model_card(
    state: PatchState,
    *,
    save_method: str,
    repo_id: str | None = None,
    base_model: str | None = None,
    license: str | None = None,
    eval_results: dict[str, float] | None = None,
    gguf_file: str | None = None,
) -> Any:
    """A ``huggingface_hub.ModelCard`` describing the patch, how to load it, and results if given.

    ``state`` is the model's :func:`hf_prope.state.patch_state`; ``base_model`` is left out of
    the card's metadata when it is a local path or a model packaged with hf-prope (it would
    mean nothing on the Hub). ``gguf_file`` names the llama.cpp file saved beside the weights.
    """
    from huggingface_hub import ModelCard, ModelCardData

    spec = state.spec
    config = state.parts.config
    base_model = base_model or getattr(config, "_name_or_path", None) or None
    if base_model and (local_path(base_model) is not None or is_embedded_source(base_model)):
        base_model = None
    license = license or _license_of(getattr(config, "_name_or_path", None))
    tags = ["p-rope", "hf-prope", "rope", config.model_type]
    if save_method == "adapter":
        tags += ["lora", "peft"]
    data = ModelCardData(
        base_model=base_model,
        library_name="peft" if save_method == "adapter" else "transformers",
        tags=tags,
        pipeline_tag="text-generation",
        license=license,
    )
    name = repo_id or "this model"
    words = spec.describe() if spec is not None else "no hf-prope patch (plain RoPE)"
    rope = json.dumps(state.rope_parameters, indent=2, sort_keys=True)
    native = state.native
    lines = [
        "---",
        data.to_yaml(),
        "---",
        "",
        f"# {name}",
        "",
        f"A {config.model_type} model whose rotary position embeddings are patched with "
        "[hf-prope](https://pypi.org/project/hf-prope/) (p-RoPE, Barbero et al., ICLR 2025: *Round and Round "
        "We Go! What makes Rotary Positional Encodings useful?*).",
        "",
        f"**Patch:** {words}.",
        "",
        "```json",
        json.dumps(spec.to_dict() if spec else None, indent=2, sort_keys=True),
        "```",
        "",
        "`rope_parameters` of the patched model:",
        "",
        "```json",
        rope,
        "```",
        "",
        "## Load it",
        "",
        "With hf-prope (restores the patch, and the adapter on its base):",
        "",
        "```python",
        "import hf_prope",
        f'model = hf_prope.from_pretrained("{name}")',
        "```",
        "",
        "Without hf-prope:",
        "",
    ]
    if save_method == "adapter" and native:
        lines += [
            "```python",
            "import json",
            "from huggingface_hub import hf_hub_download",
            "from peft import PeftModel",
            "from transformers import AutoModelForCausalLM",
            f'record = json.load(open(hf_hub_download("{name}", "{PATCH_FILE}")))',
            f'base = AutoModelForCausalLM.from_pretrained("{base_model or "<base model>"}", '
            'rope_parameters=record["rope_parameters"])',
            f'model = PeftModel.from_pretrained(base, "{name}")',
            "```",
            "",
            "Do **not** use `AutoPeftModelForCausalLM.from_pretrained` alone: it rebuilds the base with plain RoPE "
            "(same shapes, no error, a different model).",
        ]
    elif save_method == "adapter":
        lines += [
            "This patch uses hf-prope's own rope type, which plain transformers cannot build; install hf-prope. "
            "Loading the adapter with PEFT alone (`AutoPeftModelForCausalLM.from_pretrained`) silently gives a "
            "plain-RoPE model.",
        ]
    elif native:
        lines += [
            "```python",
            "from transformers import AutoModelForCausalLM",
            f'model = AutoModelForCausalLM.from_pretrained("{name}")   # a rope type transformers builds itself',
            "```",
        ]
    else:
        lines += ["This patch uses hf-prope's own rope type: `pip install hf-prope` and `import hf_prope` first."]
    if spec is not None:
        lines += ["", "## Serving", "", "| engine | with this checkpoint |", "|---|---|"]
        rows = serving_table(state, save_method=save_method, name=name, gguf_file=gguf_file)
        lines += [f"| {engine} | {verdict} |" for engine, verdict in rows]
    if eval_results:
        lines += ["", "## Evaluation", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in eval_results.items()]
    return ModelCard("\n".join(lines) + "\n")


def _mlx_lm_verdict(state: PatchState, save_method: str) -> str:
    """What mlx-lm does with this save, read off the top-level keys it reads (:mod:`hf_prope.legacy_config`)."""
    from .legacy_config import REFUSAL, legacy_rope_keys
    from .rope_types import CUSTOM_TYPES

    if save_method == "adapter":
        return "does not load PEFT adapters: serve a merged save"
    keys = legacy_rope_keys(state.parts.config)
    if state.parts.arch.generic:
        # hf-prope does not know which top-level keys mlx-lm's model of a generic type reads.
        if REFUSAL in keys.values():
            return (
                "fails loudly: `config.json` writes `rope_theta` as text, so no reader of the old layout can run "
                "plain RoPE with it (tested in mlx-lm on the generic types whose unpatched save it runs)"
            )
        return (
            f"not covered: {state.model_type}'s config class types `rope_theta`, so nothing is written for readers "
            f"of the old layout (mlx-lm 0.32 has no {state.model_type} model; tested)"
        )
    if REFUSAL in keys.values():
        return (
            f"fails loudly (a `TypeError` in its rope op): its {state.model_type} model reads no rope type, so "
            "`config.json` gives it no number to run plain RoPE with (tested)"
        )
    if (keys.get("rope_scaling") or {}).get("rope_type") in CUSTOM_TYPES:
        return "refuses to load (`Unsupported RoPE type hf_prope`), loudly (tested)"
    return "exact: `config.json` carries `rope_scaling` = the `proportional` parameters, which it reads (tested)"


def serving_table(
    state: PatchState, *, save_method: str, name: str = "MODEL", gguf_file: str | None = None
) -> list[tuple[str, str]]:
    """(engine, what it does with this checkpoint) for the card's "Serving" section.

    transformers, mlx-lm and llama.cpp rows are tested in this project; the vLLM and SGLang rows are
    read from those engines' sources (rope-type dispatch and config reading), not run, and
    say so.
    """
    from .gguf import exportable_model_types

    spec = state.spec
    assert spec is not None
    model_type = state.model_type
    native = state.native
    selective = spec.is_layer_selective or spec.is_per_head
    rows: list[tuple[str, str]] = []
    if save_method == "adapter":
        rows.append(
            (
                "PEFT with hf-prope imported (`PeftModel` / `AutoPeftModelForCausalLM.from_pretrained`)",
                "exact: hf-prope puts this adapter's recorded patch on the base it is loaded on",
            )
        )
        rows.append(
            (
                "any engine loading the adapter on its base without hf-prope (PEFT alone, vLLM `--enable-lora`, ...)",
                "**silently drops the patch**: the base config has plain RoPE. Serve a merged save "
                '(`hf_prope.save_pretrained(model, path, save_method="merged")`) instead.',
            )
        )
    if native:
        # A native save holds the whole patch in rope_parameters (per layer type where the model nests them).
        how = (
            "native `longrope` rope type (the mask as its per-pair factors)"
            if state.rope_types == {"longrope"}
            else "native `proportional` rope type (transformers >= 5.5)"
        )
        rows.append(("transformers (no hf-prope)", f"exact: {how}"))
    else:
        rows.append(("transformers (no hf-prope)", "refuses to load (unknown rope type `hf_prope`), loudly"))
    rows.append(("transformers + hf-prope", f'exact: `hf_prope.from_pretrained("{name}")`'))
    generic = state.parts.arch.generic
    if not native:
        rows.append(
            ("vLLM", 'refuses the `hf_prope` rope type ("Unknown RoPE scaling type"), loudly (read from its source)')
        )
    elif generic:
        rows.append(("vLLM", f"not checked for {model_type} (hf-prope patches it through its generic path)"))
    elif selective:
        rows.append(("vLLM", "not checked for rope parameters nested by layer type"))
    else:
        rows.append(
            (
                "vLLM",
                "should be exact: it maps `proportional` to its p-RoPE rotary (read from its source, not run here)",
            )
        )
    if native and not generic:
        rows.append(
            (
                "SGLang",
                "probably **silently plain RoPE**: it reads `partial_rotary_factor` from the config's top level, where "
                "transformers 5 does not put it (read from its source, not run here)",
            )
        )
    rows.append(("mlx-lm", _mlx_lm_verdict(state, save_method)))
    if gguf_file is not None:
        rows.append(
            (
                "llama.cpp (and Ollama, LM Studio, llama-cpp-python)",
                f"exact with this repo's `{gguf_file}` (written by hf-prope: a `rope_freqs` tensor stops the unrotated "
                "pairs). llama.cpp's own `convert_hf_to_gguf.py` on the safetensors **silently writes plain RoPE**.",
            )
        )
    elif model_type in exportable_model_types() and not selective:
        rows.append(
            (
                "llama.cpp (and Ollama, LM Studio, llama-cpp-python)",
                f"exact with `hf-prope export {name} --gguf model.gguf` (a `rope_freqs` tensor stops the unrotated pairs; "
                "logits checked against transformers). llama.cpp's own `convert_hf_to_gguf.py` **silently writes plain "
                'RoPE** (it only logs "Unknown RoPE type").',
            )
        )
    else:
        why = (
            "its graph shares one frequency-factor tensor across heads, so a per-head mask cannot be carried"
            if spec.is_per_head and model_type in exportable_model_types()
            else "its graph shares one frequency-factor tensor across layers, so a layer-selective patch cannot be carried"
            if selective and model_type in exportable_model_types()
            else f"llama.cpp's {model_type} graph passes no frequency factors to its rotary op"
        )
        rows.append(
            (
                "llama.cpp",
                f"not servable with the patch: {why}; `hf-prope export` refuses it, and llama.cpp's own converter "
                "**silently writes plain RoPE**",
            )
        )
    return rows
