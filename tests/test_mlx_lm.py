"""mlx-lm (on mlx's CPU build) runs saves of patched models exactly, or refuses them; never plain RoPE.

mlx-lm reads the transformers-4 layout (top-level ``rope_theta`` / ``rope_scaling``), which
:mod:`hf_prope.legacy_config` adds to every save of a patched model. These tests load the saved
folder with ``mlx_lm.load`` itself and compare its logits with transformers' on the same input.
They skip where mlx-lm is not installed, unless ``HF_PROPE_REQUIRE_MLX=1`` (CI's newest environment).
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import HEAD_KEEP, char_tokenizer, logits, tiny_model, tokens
from transformers import AutoModelForCausalLM

import hf_prope
from hf_prope.legacy_config import LEGACY_KEYS

HAS_MLX = importlib.util.find_spec("mlx_lm") is not None
pytestmark = pytest.mark.skipif(
    not HAS_MLX and os.environ.get("HF_PROPE_REQUIRE_MLX") != "1",
    reason='mlx-lm is not installed (pip install "mlx[cpu]" mlx-lm)',
)
INIT = 0.3  # large weights: plain RoPE is several logits away from the patched model
FULL = {"layer_types": ["full_attention"] * 6, "use_sliding_window": False}  # mlx-lm's Qwen2 has no sliding window
GEMMA3 = {"layer_types": ["sliding_attention", "sliding_attention", "full_attention"] * 2}

EXACT = [
    ("llama", {"p": 0.5}, {}),
    ("llama", {"p": 0.25}, {}),
    ("mistral", {"p": 0.5}, {}),
    ("qwen2", {"p": 0.75}, FULL),
    ("qwen3", {"p": 0.5}, FULL),
    ("gemma3_text", {"p": 0.25, "layer_types": ["full_attention"]}, GEMMA3),  # Gemma 4's layout
]
REFUSED = [
    ("llama", "freq-mask", {"keep": [0, 2, 5]}, {}, ValueError, "Unsupported RoPE type hf_prope"),
    ("llama", "p-rope", {"p": 0.5, "layers": [0, 2]}, {}, ValueError, "Unsupported RoPE type hf_prope"),
    ("mistral", "p-rope", {"p": 0.5, "rotate": "lowest"}, {}, ValueError, "Unsupported RoPE type hf_prope"),
    ("qwen2", "nope", {"layers": [1]}, FULL, ValueError, "Unsupported RoPE type hf_prope"),
    ("qwen3", "freq-mask", {"keep": [0, 2, 5]}, FULL, ValueError, "Unsupported RoPE type hf_prope"),
    ("llama", "head-mask", {"head_keep": HEAD_KEEP}, {}, ValueError, "Unsupported RoPE type hf_prope"),
    ("gemma2", "head-mask", {"head_keep": HEAD_KEEP}, {}, TypeError, "base: str"),
    ("gemma", "p-rope", {"p": 0.5}, {}, TypeError, "base: str"),
    ("gemma2", "p-rope", {"p": 0.5}, {}, TypeError, "base: str"),
    ("gemma3_text", "p-rope", {"p": 0.5}, GEMMA3, TypeError, "base: str"),  # mlx-lm's sliding layers read no type
]


def _mlx_logits(folder: Path, ids: torch.Tensor) -> np.ndarray:
    import mlx.core as mx
    from mlx_lm import load

    model, _ = load(str(folder))
    return np.array(model(mx.array(ids.numpy())).astype(mx.float32))


def _save(model, folder: Path, how: str) -> Path:
    if how == "hf_prope":
        hf_prope.save_pretrained(model, folder, tokenizer=char_tokenizer())
    else:
        model.save_pretrained(folder)
        char_tokenizer().save_pretrained(folder)
    return folder


def _strip_legacy_keys(folder: Path) -> None:
    """What transformers alone would have written: the config without the top-level rope keys."""
    path = folder / "config.json"
    config = json.loads(path.read_text())
    for key in LEGACY_KEYS:
        config.pop(key, None)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize("how", ["transformers", "hf_prope"])
@pytest.mark.parametrize("model_type,params,overrides", EXACT, ids=lambda v: str(v))
def test_native_patch_runs_exactly_in_mlx_lm(model_type, params, overrides, how, tmp_path) -> None:
    model = tiny_model(model_type, initializer_range=INIT, **overrides)
    hf_prope.patch_model(model, "p-rope", **params)
    ids = tokens(1, 24)
    expected = logits(model, ids).numpy()
    folder = _save(model, tmp_path / "saved", how)
    assert np.abs(_mlx_logits(folder, ids) - expected).max() < 2e-4
    # transformers reads the file with its top-level keys back to the same model
    back = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert back.config.rope_parameters == model.config.rope_parameters
    assert torch.equal(logits(back, ids), torch.from_numpy(expected))
    # the oracle can fail: without those keys mlx-lm runs plain RoPE (and theta 10000), far away;
    # only its Qwen3 reads transformers 5's rope_parameters itself
    _strip_legacy_keys(folder)
    stripped = np.abs(_mlx_logits(folder, ids) - expected).max()
    assert stripped < 2e-4 if model_type == "qwen3" else stripped > 0.5


@pytest.mark.parametrize("model_type,name,params,overrides,error,match", REFUSED, ids=lambda v: str(v))
def test_patch_mlx_lm_cannot_express_is_refused(model_type, name, params, overrides, error, match, tmp_path) -> None:
    model = tiny_model(model_type, initializer_range=INIT, **overrides)
    hf_prope.patch_model(model, name, **params)
    ids = tokens(1, 24)
    expected = logits(hf_prope.restore_patch(model), ids)
    folder = _save(model, tmp_path / "saved", "transformers")
    with pytest.raises(error, match=match):
        _mlx_logits(folder, ids)
    back = hf_prope.from_pretrained(folder).eval()  # transformers (with hf-prope) still loads it exactly
    assert torch.equal(logits(back, ids), expected)


@pytest.mark.real_model
def test_smollm2_p_rope_runs_in_mlx_lm(tmp_path) -> None:
    from hf_prope.data import python_docs_text
    from hf_prope.models import EmbeddedModelMissingError, load_embedded

    try:
        model, tokenizer = load_embedded("smollm2-135m")
    except EmbeddedModelMissingError as err:
        pytest.skip(f"smollm2-135m is not installed: {err}")
    hf_prope.patch_model(model, "p-rope", p=0.5)
    ids = tokenizer(python_docs_text()[:2000], return_tensors="pt").input_ids[:, :128]
    expected = logits(model, ids).numpy()
    hf_prope.save_pretrained(model, tmp_path / "smollm2", tokenizer=tokenizer)
    got = _mlx_logits(tmp_path / "smollm2", ids)
    # float32 in both; the difference is rounding (logits span about 40 units)
    assert np.abs(got - expected).max() < 2e-3
    assert (got.argmax(-1) == expected.argmax(-1)).mean() == 1.0


# -- the generic path's types: every one mlx-lm can run unpatched is refused patched -----------------

try:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from hf_prope.registry import GENERIC_CHECKED

    GENERIC = [t for t in GENERIC_CHECKED if t in CONFIG_MAPPING] or ["(none installed)"]
except ImportError:  # pragma: no cover
    GENERIC = ["(none installed)"]


def _mlx_has_model(config: dict) -> bool:
    from mlx_lm.utils import _get_classes

    try:
        _get_classes(config)
    except (Exception, SystemExit):  # mlx-lm's OLMo module exits when ai2-olmo is missing
        return False
    return True


@pytest.mark.parametrize("model_type", GENERIC)
def test_generic_patch_is_refused_where_mlx_lm_runs_the_model(model_type: str, tmp_path) -> None:
    from tiny import tiny_generic_model

    if model_type not in CONFIG_MAPPING:
        pytest.skip(f"{model_type} is not in this transformers")
    ids = tokens(1, 12)
    plain = tiny_generic_model(model_type)
    patched = hf_prope.patch_model(tiny_generic_model(model_type), "p-rope", p=0.5)
    written = patched.config.to_dict()
    if not _mlx_has_model(written):
        pytest.skip(f"mlx-lm has no model for {model_type}")
    # A config class that types rope_theta gets nothing written: none of those may have an mlx-lm model.
    assert "rope_theta" in written and written["rope_theta"] != plain.config.to_dict().get("rope_theta")
    folder = _save(plain, tmp_path / "plain", "transformers")
    # As a checkpoint saved by transformers 4 has it (most on the Hub): the base at the top level too.
    path = folder / "config.json"
    config = json.loads(path.read_text())
    flat = config.get("rope_parameters") or {}
    config.setdefault("rope_theta", flat.get("rope_theta", (flat.get("full_attention") or {}).get("rope_theta")))
    path.write_text(json.dumps(config))
    try:
        _mlx_logits(folder, ids)
    except Exception as error:  # noqa: BLE001 - mlx-lm cannot read this tiny config at all
        pytest.skip(f"mlx-lm does not run the unpatched tiny {model_type} either ({type(error).__name__})")
    with pytest.raises((TypeError, ValueError)):
        _mlx_logits(_save(patched, tmp_path / "patched", "transformers"), ids)
