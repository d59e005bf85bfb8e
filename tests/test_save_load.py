"""The config is the truth: save_pretrained -> from_pretrained reproduces the patched model."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from tiny import HEAD_KEEP, MODEL_TYPES, logits, tiny_model, tokens
from transformers import AutoModelForCausalLM

import hf_prope
from hf_prope.legacy_config import LEGACY_KEYS, REFUSAL
from hf_prope.rope_types import has_native_proportional


def _plain_transformers(script: str, cwd) -> subprocess.CompletedProcess:
    """Run ``script`` in a fresh interpreter that must never import hf_prope."""
    guard = textwrap.dedent(
        """
        import sys, importlib.abc
        class _Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "hf_prope" or name.startswith("hf_prope."):
                    raise ImportError("hf_prope must not be imported here")
        sys.meta_path.insert(0, _Block())
        """
    )
    tail = "\nassert not any(m.startswith('hf_prope') for m in sys.modules)\n"
    return subprocess.run(
        [sys.executable, "-c", guard + textwrap.dedent(script) + tail],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.skipif(not has_native_proportional(), reason="transformers < 5.5 has no 'proportional'")
@pytest.mark.parametrize(
    "model_type,params",
    [
        ("llama", {"p": 0.25}),
        ("qwen3", {"p": 0.75}),
        ("gemma2", {"p": 0.5}),
        ("gemma3_text", {"p": 0.25, "layer_types": ["full_attention"]}),
    ],
)
def test_native_checkpoint_loads_in_plain_transformers(model_type, params, tmp_path) -> None:
    model = tiny_model(model_type)
    hf_prope.patch_model(model, "p-rope", **params)
    ids = tokens()
    torch.save({"ids": ids, "logits": logits(model, ids)}, tmp_path / "expected.pt")
    model.save_pretrained(tmp_path / "ckpt")
    saved = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert "proportional" in json.dumps(saved["rope_parameters"])
    result = _plain_transformers(
        f"""
        import torch
        from transformers import AutoModelForCausalLM
        m = AutoModelForCausalLM.from_pretrained("ckpt", attn_implementation={model.config._attn_implementation!r}).eval()
        exp = torch.load("expected.pt", weights_only=True)
        with torch.no_grad():
            got = m(exp["ids"]).logits
        assert torch.equal(got, exp["logits"]), (got - exp["logits"]).abs().max()
        print("OK")
        """,
        tmp_path,
    )
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]


def test_custom_type_fails_loudly_without_hf_prope(tmp_path) -> None:
    """A patch that needs hf-prope's rope type must not load silently as plain RoPE."""
    model = tiny_model("llama")
    hf_prope.patch_model(model, "freq-mask", keep=[0, 3])
    model.save_pretrained(tmp_path / "ckpt")
    result = _plain_transformers(
        """
        from transformers import AutoModelForCausalLM
        AutoModelForCausalLM.from_pretrained("ckpt")
        """,
        tmp_path,
    )
    assert result.returncode != 0
    assert "hf_prope" in result.stderr


@pytest.mark.parametrize("model_type", MODEL_TYPES)
@pytest.mark.parametrize(
    "patch",
    [
        ("freq-mask", {"keep": [0, 1, 2, 5]}),
        ("nope", {"layers": [1, 4]}),
        ("p-rope", {"p": 0.5, "rotate": "lowest"}),
        ("head-mask", {"head_keep": HEAD_KEEP}),
    ],
)
def test_round_trip_reproduces_patched_model(model_type, patch, tmp_path) -> None:
    name, params = patch
    model = tiny_model(model_type)
    hf_prope.patch_model(model, name, **params)
    ids = tokens()
    expected = logits(model, ids)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation=model.config._attn_implementation)
    loaded.eval()
    spec = hf_prope.get_patch(model)
    state = hf_prope.patch_state(loaded)
    assert state.recorded == spec
    if spec.is_layer_selective or spec.is_per_head:
        # hooks cannot live in a config: the patch is recorded but not in effect until restore_patch
        assert hf_prope.get_patch(loaded) is None and state.spec is None and state.pending
        hf_prope.restore_patch(loaded)
    assert hf_prope.get_patch(loaded) == spec and not hf_prope.patch_state(loaded).pending
    assert torch.equal(logits(loaded, ids), expected)
    # and the reloaded model unpatches to the original
    original = tiny_model(model_type)
    hf_prope.unpatch_model(loaded)
    assert torch.equal(logits(loaded, ids), logits(original, ids))


def test_hf_prope_load_of_layer_selective_patch_restores_without_a_warning(tmp_path) -> None:
    import warnings

    from hf_prope.models import load_model

    model = tiny_model("llama")
    hf_prope.patch_model(model, "nope", layers=[2])
    ids = tokens()
    model.save_pretrained(tmp_path)
    char = __import__("tiny").char_tokenizer()
    char.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the warning is for plain loads only
        for loaded in (hf_prope.from_pretrained(tmp_path), load_model(str(tmp_path))[0]):  # the one loader
            assert hf_prope.get_patch(loaded) == hf_prope.get_patch(model)
            assert torch.equal(logits(loaded, ids), logits(model, ids))


def test_missing_extra_names_the_extra(monkeypatch) -> None:
    import importlib.util

    from hf_prope.extras import MissingExtraError, require

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    with pytest.raises(
        MissingExtraError, match=r"matplotlib \(hf-prope's \[recipes\] extra\).*pip install 'hf-prope\[recipes\]'"
    ):
        require("recipes", "The recipes")


def test_plain_load_of_layer_selective_patch_warns(tmp_path) -> None:
    model = tiny_model("llama")
    hf_prope.patch_model(model, "nope", layers=[2])
    model.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="restore_patch"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "edit,match",
    [
        ({"hf_prope_keep": "0,1"}, "hf_prope_keep"),
        ({"hf_prope_base_type": "spiral"}, "hf_prope_base_type"),
    ],
)
def test_corrupted_rope_entry_is_rejected_on_load(edit, match, tmp_path) -> None:
    model = tiny_model("llama")
    hf_prope.patch_model(model, "freq-mask", keep=[0, 3])
    model.save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    config = json.loads(path.read_text())
    # Both copies: transformers reads the top-level one (hf_prope.legacy_config) when it is there.
    config["rope_parameters"].update(edit)
    config["rope_scaling"].update(edit)
    path.write_text(json.dumps(config))
    # transformers' config dataclass may wrap the validator's ValueError in its own error type
    with pytest.raises(Exception, match=match):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_corrupted_spec_in_config_names_the_field(tmp_path) -> None:
    model = tiny_model("llama")
    hf_prope.patch_model(model, "p-rope", p=0.5)
    model.save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    config = json.loads(path.read_text())
    config["hf_prope"]["spec"]["p"] = 3
    path.write_text(json.dumps(config))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"p must be in \[0, 1\]"):
        hf_prope.get_patch(loaded)


# -- the top-level keys older readers use (hf_prope.legacy_config; mlx-lm itself: tests/test_mlx_lm.py) --


def test_unpatched_config_is_left_as_transformers_writes_it(tmp_path) -> None:
    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "plain")
    config = json.loads((tmp_path / "plain" / "config.json").read_text())
    assert not set(LEGACY_KEYS) & set(config)
    hf_prope.patch_model(model, "p-rope", p=0.5)
    hf_prope.unpatch_model(model)  # derived when written: an unpatched model writes none of them again
    model.save_pretrained(tmp_path / "unpatched")
    config = json.loads((tmp_path / "unpatched" / "config.json").read_text())
    assert not set(LEGACY_KEYS) & set(config)


def test_refusal_text_never_reaches_transformers(tmp_path) -> None:
    model = tiny_model("gemma2", initializer_range=0.3)
    hf_prope.patch_model(model, "p-rope", p=0.5)
    model.save_pretrained(tmp_path / "g")
    assert json.loads((tmp_path / "g" / "config.json").read_text())["rope_theta"] == REFUSAL
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "g")
    assert back.config.rope_parameters == model.config.rope_parameters
    assert REFUSAL not in json.dumps(back.config.rope_parameters)
