"""The generic path (hf_prope.generic): every model type it is checked on, tiny, against independent oracles.

Oracles: an unpatched copy whose rotary ``inv_freq`` buffers are zeroed by hand on the stopped
pairs (frequency 0 = no rotation, whatever the head layout), transformers' native ``proportional``
where it builds the same frequencies, the model-wide patch for a patch on every layer, and for
Gemma 4 a model built by transformers from a full-RoPE config.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import transformers
from packaging.version import Version
from tiny import clone_with_config, logits, tiny_generic_config, tiny_generic_model, tiny_model, tokens

import hf_prope
from hf_prope import PatchSpec, rotation
from hf_prope.generic import GENERIC_MIN_TRANSFORMERS, RotationCheckError, rotary_layout
from hf_prope.registry import ARCHITECTURES, GENERIC_CHECKED, get_architecture
from hf_prope.rope_types import CUSTOM_TYPES, NATIVE_TYPE, has_native_proportional
from hf_prope.spec import rotated_pairs
from hf_prope.state import model_parts

try:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    INSTALLED = [t for t in GENERIC_CHECKED if t in CONFIG_MAPPING]
except ImportError:  # pragma: no cover
    INSTALLED = []

GENERIC_AVAILABLE = Version(transformers.__version__) >= Version(GENERIC_MIN_TRANSFORMERS)
# Types whose layout the installed transformers may not have (older releases): skipped, not failed.
TYPES = INSTALLED or ["(none installed)"]
GEMMA4_FULL_ROPE = {
    "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
    "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
}


def _model(model_type: str, **overrides):
    if model_type not in INSTALLED:
        pytest.skip(f"{model_type} is not in this transformers")
    if not GENERIC_AVAILABLE:
        pytest.skip(f"the generic path needs transformers >= {GENERIC_MIN_TRANSFORMERS}")
    return tiny_generic_model(model_type, **overrides)


def _full_rope(model_type: str):
    """The same weights with full RoPE, built by transformers (Gemma 4's own config is p-RoPE already)."""
    return _model(model_type, rope_parameters=GEMMA4_FULL_ROPE) if model_type == "gemma4_text" else None


def _zeroed(model, p: float):
    """An unpatched copy with the rotary frequencies of every stopped pair set to 0 by hand."""
    ref = copy.deepcopy(model)
    for module in ref.modules():
        if "RotaryEmbedding" not in type(module).__name__:
            continue
        for name, buf in list(module._buffers.items()):
            if buf is not None and name.endswith("inv_freq"):
                n = buf.shape[-1]
                keep = torch.arange(n) < rotated_pairs(p, 2 * n)
                buf.mul_(keep.to(buf.dtype))
    return ref


def _state(model) -> tuple:
    inner = model
    return (
        json.dumps(inner.config.to_dict(), sort_keys=True, default=str),
        {n: b.clone() for n, b in inner.named_buffers()},
        sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in inner.modules()),
    )


def _same_state(a: tuple, b: tuple) -> bool:
    return (
        a[0] == b[0]
        and a[2] == b[2]
        and a[1].keys() == b[1].keys()
        and all(torch.equal(a[1][k], b[1][k]) for k in a[1])
    )


def test_checked_list_is_large_and_names_the_issue_types() -> None:
    required = {
        "gemma4_text", "smollm3", "phi3", "olmo2", "olmo3", "mixtral", "qwen2_moe", "qwen3_moe", "granite",
        "granitemoe", "cohere2", "glm4", "ministral", "starcoder2", "stablelm", "gpt_neox",
    }  # fmt: skip
    assert required <= set(GENERIC_CHECKED)
    assert not set(GENERIC_CHECKED) & set(ARCHITECTURES)  # one record per type: hand-written or generic
    assert len(hf_prope.supported_model_types()) >= 40
    for model_type in INSTALLED if GENERIC_AVAILABLE else []:
        arch = get_architecture(model_type)
        assert arch.generic and arch.llama_cpp_graph is None


@pytest.mark.parametrize("model_type", TYPES)
def test_p_rope_equals_zeroed_frequencies_and_round_trips(model_type: str, tmp_path) -> None:
    model = _model(model_type)
    ids = tokens(1, 12)
    base = logits(model, ids)
    oracle = _zeroed(_full_rope(model_type) or model, 0.5)
    hf_prope.patch_model(model, "p-rope", p=0.5)
    out = logits(model, ids)
    torch.testing.assert_close(out, logits(oracle, ids), rtol=0, atol=1e-5)
    assert not torch.allclose(out, base, atol=1e-4), "the patch changed nothing"
    assert hf_prope.get_patch(model) == PatchSpec("p-rope", p=0.5)
    hf_prope.check_model(model)

    # A plain transformers save / load rebuilds the patch from config.json.
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path).eval()
    assert hf_prope.get_patch(loaded) == PatchSpec("p-rope", p=0.5)
    torch.testing.assert_close(logits(loaded, ids), out, rtol=0, atol=1e-5)

    # Unpatch means full RoPE; for Gemma 4 that is not the config it was built with.
    full = _full_rope(model_type)
    hf_prope.unpatch_model(model)
    assert (
        torch.equal(logits(model, ids), base)
        if full is None
        else torch.allclose(logits(model, ids), logits(full, ids), rtol=0, atol=1e-5)
    )


@pytest.mark.parametrize("model_type", TYPES)
def test_native_proportional_where_it_builds_the_same_frequencies(model_type: str) -> None:
    if not has_native_proportional():
        pytest.skip("transformers < 5.5 has no proportional type")
    model = _model(model_type)
    params = model.config.rope_parameters
    if "rope_type" not in params or params.get("rope_type") != "default":
        pytest.skip("nested or scaled rope parameters: the zeroed-frequency oracle covers it")
    ids = tokens(1, 12)
    native_params = {"rope_type": NATIVE_TYPE, "rope_theta": params["rope_theta"], "partial_rotary_factor": 0.5}
    config = copy.deepcopy(model.config)
    config.rope_parameters = native_params
    native = clone_with_config(model, config)
    same = all(
        torch.equal(a, b)
        for (n, a), (_, b) in zip(_zeroed(model, 0.5).named_buffers(), native.named_buffers())
        if n.endswith("inv_freq")
    )
    zeroed = logits(_zeroed(model, 0.5), ids)
    hf_prope.patch_model(model, "p-rope", p=0.5)
    rope_type = model.config.rope_parameters["rope_type"]
    if rope_type == "longrope":
        # The config class takes no type but its own (Phi-3: default, longrope): the mask is written as
        # longrope factors, which transformers builds without hf-prope.
        assert not _takes(config, native_params) and not _takes(config, _custom(params))
        torch.testing.assert_close(logits(model, ids), zeroed, rtol=0, atol=1e-5)
        assert torch.equal(logits(clone_with_config(model, copy.deepcopy(model.config)), ids), logits(model, ids))
    elif same:
        assert rope_type == NATIVE_TYPE  # loadable without hf-prope
        torch.testing.assert_close(logits(model, ids), logits(native, ids), rtol=0, atol=1e-5)
    else:
        # Partial rotary: "proportional" would recompute other frequencies; hf-prope's own type is used.
        assert rope_type in CUSTOM_TYPES


def _takes(config, rope_parameters) -> bool:
    """Whether the config's class validates these rope parameters (transformers' own check)."""
    trial = copy.deepcopy(config)
    trial.rope_parameters = copy.deepcopy(rope_parameters)
    try:
        trial.validate_rope()
    except ValueError:
        return False
    return True


def _custom(params) -> dict:
    return {**params, "rope_type": CUSTOM_TYPES[0], "hf_prope_base_type": "default", "hf_prope_keep": None}


@pytest.mark.parametrize("model_type", TYPES)
def test_layer_and_head_patches_apply_or_refuse_clearly(model_type: str) -> None:
    model = _model(model_type)
    ids = tokens(1, 12)
    base = logits(model, ids)
    parts = model_parts(model)
    layers = sorted(parts.attentions)
    wide = logits(hf_prope.patch_model(copy.deepcopy(model), "p-rope", p=0.5), ids)
    full = _full_rope(model_type)
    # The layout of the model's full RoPE (Gemma 4's own p-RoPE pairs do not turn, so show none).
    full_parts = model_parts(full) if full is not None else parts
    halves = all(
        (layout := rotary_layout(full_parts.rotaries[0], key)) is not None
        and torch.equal(layout, torch.arange(layout.numel()) % (layout.numel() // 2))
        for key in parts.rope_keys()
    )
    before = _state(model)
    flat = model.config.rope_parameters
    if "rope_type" in flat and hasattr(model.config, "validate_rope") and not _takes(model.config, _custom(flat)):
        # A config class that takes only its own rope types cannot record a patch on some layers.
        for kwargs in ({"layers": layers[:1]}, {}):
            with pytest.raises(ValueError, match="refuses the patched rope parameters"):
                hf_prope.patch_model(model, "head-mask" if not kwargs else "p-rope", p=0.5, **kwargs)
            assert _same_state(before, _state(model))
        return
    if halves:
        hf_prope.patch_model(model, "p-rope", p=0.5, layers=layers)
        torch.testing.assert_close(logits(model, ids), wide, rtol=0, atol=1e-5)
        # One layer at a time (some may be NoPE, as Flint's full-attention layers): one at least changes the
        # output, and none alone does what the patch on all does.
        ones = []
        for layer in layers[:3]:
            hf_prope.patch_model(model, "p-rope", p=0.5, layers=[layer])
            ones.append(logits(model, ids))
        changed = [one for one in ones if not torch.allclose(one, base, atol=1e-5)]
        assert changed
        assert len(changed) == 1 or all(not torch.allclose(one, wide, atol=1e-5) for one in changed)
        hf_prope.unpatch_model(model)  # to full RoPE: for Gemma 4 not what it was built with
        if full is None:
            assert torch.equal(logits(model, ids), base)
        else:
            torch.testing.assert_close(logits(model, ids), logits(full, ids), rtol=0, atol=1e-5)
            model, base = _model(model_type), logits(_model(model_type), ids)
    else:
        with pytest.raises(ValueError, match="patch every layer"):
            hf_prope.patch_model(model, "p-rope", p=0.5, layers=layers[:1])
        assert _same_state(before, _state(model))

    pair_counts = {
        len(getattr(parts.rotaries[0], "inv_freq" if k is None else f"{k}_inv_freq")) for k in parts.rope_keys()
    }
    if halves and len(pair_counts) == 1 and rotation.install(parts.arch.modeling_module):
        try:
            hf_prope.patch_model(model, "head-mask", p=0.5)
        except RotationCheckError as error:  # the probe refused it: the model must be as it was
            assert "left as it was" in str(error)
            assert torch.equal(logits(model, ids), base)
            return
        torch.testing.assert_close(logits(model, ids), wide, rtol=0, atol=1e-5)
    else:
        with pytest.raises(ValueError):
            hf_prope.patch_model(model, "head-mask", p=0.5)
        assert torch.equal(logits(model, ids), base)


@pytest.mark.parametrize("model_type", TYPES)
def test_class_level_patch(model_type: str) -> None:
    expected = logits(hf_prope.patch_model(_model(model_type), "p-rope", p=0.5), tokens(1, 12))
    patch = hf_prope.apply_patch_to_class(model_type, "p-rope", p=0.5)
    try:
        built = _model(model_type)
    finally:
        patch.revert()
    assert hf_prope.get_patch(built) == PatchSpec("p-rope", p=0.5)
    torch.testing.assert_close(logits(built, tokens(1, 12)), expected, rtol=0, atol=1e-5)
    assert hf_prope.get_patch(_model(model_type)) in (None, hf_prope.get_patch(tiny_generic_model(model_type)))


# -- the probe catches what is wrong --------------------------------------------------------------


def test_probe_catches_a_pair_that_still_rotates() -> None:
    model = _model("phi3", partial_rotary_factor=0.5)  # partial rotary: the mask is over its 4 pairs
    hf_prope.patch_model(model, "p-rope", p=0.5)
    hf_prope.check_model(model)
    rotary = model_parts(model).rotaries[0]
    with torch.no_grad():  # a stopped pair turning again (longrope restores inv_freq from original_inv_freq)
        for name, buf in rotary.named_buffers():
            if name.endswith("inv_freq"):
                buf[-1] = 1e-3
    with pytest.raises(RotationCheckError, match="not what the mask says"):
        hf_prope.check_model(model)


def test_probe_refuses_masks_laid_out_wrong_and_leaves_the_model(monkeypatch) -> None:
    """Cohere interleaves its pairs: masking its cos/sin as if halved is wrong, and the probe must say so."""
    model = _model("cohere")
    ids = tokens(1, 12)
    base, before = logits(model, ids), _state(model)
    import hf_prope.patching as patching

    monkeypatch.setattr(patching, "_check_hook_layout", lambda parts, rotary: None)
    with pytest.raises(RotationCheckError, match="left as it was"):
        hf_prope.patch_model(model, "p-rope", p=0.5, layers=[0])
    assert _same_state(before, _state(model))
    assert torch.equal(logits(model, ids), base)
    assert hf_prope.get_patch(model) is None


def test_probe_passes_on_hand_written_architectures() -> None:
    for model_type in ("llama", "qwen3", "gemma3_text"):
        model = tiny_model(model_type)
        hf_prope.check_model(model)
        hf_prope.patch_model(model, "p-rope", p=0.25, layers=[0, 2])
        hf_prope.check_model(model)


def test_unsupported_types_are_refused_with_the_reason() -> None:
    if "beam" not in INSTALLED and "beam" not in CONFIG_MAPPING:
        pytest.skip("no beam in this transformers")
    config = tiny_generic_config("beam")
    model = get_architecture("beam").causal_lm_class(config)
    with pytest.raises(hf_prope.UnsupportedModelError, match="inv_freq"):
        hf_prope.patch_model(model, "p-rope", p=0.5)


# -- Gemma 4 and SmolLM3: the models that already mix RoPE with p-RoPE / NoPE ------------------------


def test_gemma4_own_p_rope_reads_back_changes_and_unpatches() -> None:
    model = _model("gemma4_text")
    full = _full_rope("gemma4_text")
    ids = tokens(1, 12)
    own = logits(model, ids)
    assert hf_prope.get_patch(model) == PatchSpec("p-rope", p=0.25, layer_types=["full_attention"])
    # Its own p-RoPE is p-RoPE over the full RoPE transformers builds from a plain config.
    torch.testing.assert_close(own, logits(_zeroed_layer_type(full, "full_attention", 0.25), ids), rtol=0, atol=1e-5)

    hf_prope.patch_model(model, "p-rope", p=0.5)
    torch.testing.assert_close(logits(model, ids), logits(_zeroed(full, 0.5), ids), rtol=0, atol=1e-5)
    hf_prope.unpatch_model(model)
    assert hf_prope.get_patch(model) is None
    assert model.config.rope_parameters["full_attention"]["rope_type"] == "default"
    torch.testing.assert_close(logits(model, ids), logits(full, ids), rtol=0, atol=1e-5)
    hf_prope.patch_model(model, "p-rope", p=0.25, layer_types=["full_attention"])
    torch.testing.assert_close(logits(model, ids), own, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="different numbers of pairs"):
        hf_prope.patch_model(model, "head-mask", p=0.5)


def _zeroed_layer_type(model, layer_type: str, p: float):
    ref = copy.deepcopy(model)
    rotary = model_parts(ref).rotaries[0]
    for name in (f"{layer_type}_inv_freq", f"{layer_type}_original_inv_freq"):
        buf = getattr(rotary, name)
        n = buf.shape[-1]
        buf.mul_((torch.arange(n) < rotated_pairs(p, 2 * n)).to(buf.dtype))
    return ref


def test_gemma4_and_smollm3_are_analysed() -> None:
    from tiny import char_tokenizer

    from hf_prope import analysis

    text = "The quick brown fox jumps over the lazy dog. " * 20
    gemma4 = _model("gemma4_text")
    usage = analysis.frequency_usage(gemma4, char_tokenizer(), text, window=32, n_windows=2)
    full = [i for i, t in enumerate(gemma4.config.layer_types) if t == "full_attention"]
    sliding = [i for i, t in enumerate(gemma4.config.layer_types) if t == "sliding_attention"]
    # Global layers: 16 pairs, 4 rotating (its own p=0.25); sliding: 8 pairs, all rotating, padded with 0.
    assert usage.frequencies.shape[1] == 16
    assert all(int((usage.frequencies[i] > 0).sum()) == 4 for i in full)
    assert all(int((usage.frequencies[i] > 0).sum()) == 8 for i in sliding)
    assert torch.all(usage.query[sliding][..., 8:] == 0)

    smollm3 = _model("smollm3")
    freqs = hf_prope.layer_frequencies(smollm3)
    assert torch.all(freqs[3] == 0) and torch.all(freqs[:3] > 0)  # its 4th layer is NoPE
    hf_prope.patch_model(smollm3, "p-rope", p=0.5)
    assert int((hf_prope.layer_frequencies(smollm3)[0] > 0).sum()) == 4
    hf_prope.check_model(smollm3)


# -- serving: never silent ---------------------------------------------------------------------------


def test_generic_saves_refuse_readers_that_would_run_plain_rope(tmp_path) -> None:
    from hf_prope.legacy_config import REFUSAL

    model = hf_prope.patch_model(_model("phi3"), "p-rope", p=0.5)
    with pytest.raises(hf_prope.GGUFExportError, match="phi3"):
        hf_prope.export_gguf(model, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()
    model.save_pretrained(tmp_path / "saved")
    written = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert written["rope_theta"] == REFUSAL  # mlx-lm and other old-layout readers fail instead
    # transformers itself reads the patch back.
    assert hf_prope.get_patch(type(model).from_pretrained(tmp_path / "saved")) == PatchSpec("p-rope", p=0.5)


@pytest.mark.parametrize(
    "model_type,loads_as,mlx",
    [
        ("olmo2", "proportional", "fails loudly"),
        ("phi3", "longrope", "fails loudly"),
        ("cohere2_moe", None, "not covered"),
    ],
)
def test_model_card_of_a_generic_save_says_what_serves_it(model_type: str, loads_as, mlx: str) -> None:
    from hf_prope.model_card import serving_table
    from hf_prope.state import patch_state

    model = hf_prope.patch_model(_model(model_type), "p-rope", p=0.5)
    rows = dict(serving_table(patch_state(model), save_method="merged", name="me/m"))
    if not has_native_proportional() and model_type != "phi3":
        loads_as = None
    plain = rows["transformers (no hf-prope)"]
    assert (f"`{loads_as}`" in plain) if loads_as else ("refuses" in plain or "proportional" in plain)
    assert rows["mlx-lm"].startswith(mlx)
    assert f"llama.cpp's {model_type} graph passes no frequency factors" in rows["llama.cpp"]
    assert "SGLang" not in rows and ("not checked" in rows["vLLM"] or "refuses" in rows["vLLM"])


def test_old_transformers_refuse_the_generic_path_clearly() -> None:
    if GENERIC_AVAILABLE or "olmo2" not in CONFIG_MAPPING:
        pytest.skip("the generic path is available here")
    model = get_architecture("llama").causal_lm_class  # any class: the refusal comes before a model is read
    assert model is not None
    with pytest.raises(hf_prope.UnsupportedModelError, match=GENERIC_MIN_TRANSFORMERS):
        get_architecture("olmo2")
