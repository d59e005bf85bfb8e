"""Public API: specs, bad input, class-level patching, isolation between models."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from tiny import MODEL_TYPES, logits, rotary_state, same_state, tiny_config, tiny_model, tokens
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaForCausalLM, Qwen2ForCausalLM

import hf_prope
from hf_prope import PatchSpec

# -- the spec -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec",
    [
        PatchSpec("p-rope", p=0.25),
        PatchSpec("p-rope", p=0.75, rotate="lowest", layer_types=("full_attention",)),
        PatchSpec("freq-mask", keep=(0, 1, 2, 5)),
        PatchSpec("freq-mask", mask=(True, False, True)),
        PatchSpec("freq-mask", max_wavelength=512.0, layers=(0, 3)),
        PatchSpec("nope", layers=(3, 7, 11)),
        PatchSpec("rope"),
    ],
)
def test_spec_json_round_trip(spec: PatchSpec) -> None:
    assert PatchSpec.from_json(spec.to_json()) == spec
    assert PatchSpec.from_dict(spec.to_dict()) == spec
    assert spec.describe()


def test_spec_resolution_follows_the_paper() -> None:
    freqs = [10000 ** (-2 * i / 64) for i in range(32)]
    assert PatchSpec("p-rope", p=0.25).keep_mask(freqs) == [True] * 8 + [False] * 24
    assert PatchSpec("p-rope", p=0.75, rotate="lowest").keep_mask(freqs) == [False] * 8 + [True] * 24
    assert PatchSpec("p-rope", p=0.0).keep_mask(freqs) == [False] * 32
    assert sum(PatchSpec("p-rope", p=0.3).keep_mask(freqs)) == int(0.3 * 64 // 2)
    # FoPE's rule: drop pairs whose wavelength 2*pi/theta_i exceeds the bound
    bound = 1000.0
    expected = [2 * math.pi / f <= bound for f in freqs]
    assert PatchSpec("freq-mask", max_wavelength=bound).keep_mask(freqs) == expected
    assert 0 < sum(expected) < 32


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"name": "p-rope"}, ValueError, "needs p"),
        ({"name": "p-rope", "p": 1.5}, ValueError, r"\[0, 1\]"),
        ({"name": "p-rope", "p": -0.1}, ValueError, r"\[0, 1\]"),
        ({"name": "p-rope", "p": float("nan")}, ValueError, r"\[0, 1\]"),
        ({"name": "p-rope", "p": "0.5"}, TypeError, "number"),
        ({"name": "prope", "p": 0.5}, ValueError, "Did you mean 'p-rope'"),
        ({"name": "freq-mask"}, ValueError, "exactly one of"),
        ({"name": "freq-mask", "keep": (1,), "mask": (True,)}, ValueError, "exactly one of"),
        ({"name": "freq-mask", "keep": (1, 1)}, ValueError, "more than once"),
        ({"name": "freq-mask", "keep": (-1,)}, ValueError, "non-negative"),
        ({"name": "freq-mask", "mask": (1, 0)}, TypeError, "True/False"),
        ({"name": "freq-mask", "max_wavelength": 0}, ValueError, "positive"),
        ({"name": "nope", "p": 0.5}, ValueError, "does not take p"),
        ({"name": "p-rope", "p": 0.5, "keep": (1,)}, ValueError, "does not take keep"),
        ({"name": "p-rope", "p": 0.5, "rotate": "middle"}, ValueError, "highest"),
        ({"name": "nope", "layers": (1,), "layer_types": ("full_attention",)}, ValueError, "not both"),
    ],
)
def test_bad_specs_are_rejected_with_the_fix(kwargs, error, match) -> None:
    with pytest.raises(error, match=match):
        PatchSpec(**kwargs)


def test_bad_json_names_the_field() -> None:
    good = PatchSpec("p-rope", p=0.25).to_dict()
    with pytest.raises(ValueError, match="unknown field 'pp'"):
        PatchSpec.from_dict({**good, "pp": 1})
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        PatchSpec.from_dict({**good, "p": 7})
    with pytest.raises(ValueError, match="format_version"):
        PatchSpec.from_dict({**good, "format_version": 99})
    with pytest.raises(ValueError, match="not valid JSON"):
        PatchSpec.from_json("{p-rope")


# -- bad input against a model leaves it untouched -------------------------------------------


@pytest.mark.parametrize(
    "args,kwargs,error,match",
    [
        (("p-rope",), {"p": 2.0}, ValueError, r"\[0, 1\]"),
        (("p-rope",), {"p": float("nan")}, ValueError, r"\[0, 1\]"),
        (("p_rope",), {"p": 0.5}, ValueError, "Did you mean 'p-rope'"),
        (("p-rope",), {"pp": 0.5}, TypeError, "Did you mean 'p'"),
        (("freq-mask",), {"keep": [0, 8]}, ValueError, "8 frequency pairs"),
        (("freq-mask",), {"mask": [True] * 7}, ValueError, "exactly 8 booleans"),
        (("nope",), {"layers": [6]}, ValueError, "6 decoder layers"),
        (("nope",), {"layer_types": ["global"]}, ValueError, "layer types are"),
        (("nope",), {"layer_types": ["full_atention"]}, ValueError, "Did you mean 'full_attention'"),
        ((PatchSpec("nope"),), {"layers": [1]}, TypeError, "put them in the spec"),
        ((42,), {}, TypeError, "name such as 'p-rope'"),
    ],
)
def test_bad_input_leaves_model_unchanged(args, kwargs, error, match) -> None:
    model = tiny_model("qwen2")
    hf_prope.patch_model(model, "p-rope", p=0.5, layers=[0])
    before = rotary_state(model)
    ids = tokens()
    out_before = logits(model, ids)
    with pytest.raises(error, match=match):
        hf_prope.patch_model(model, *args, **kwargs)
    assert same_state(before, rotary_state(model))
    assert torch.equal(logits(model, ids), out_before)


def test_layer_types_on_model_without_layer_types() -> None:
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="use layers="):
        hf_prope.patch_model(model, "p-rope", p=0.5, layer_types=["full_attention"])


def test_unsupported_and_non_rope_models() -> None:
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(hf_prope.NoRotaryEmbeddingError, match="no rotary position embeddings"):
        hf_prope.patch_model(gpt2, "p-rope", p=0.5)
    # A model type transformers does not know (a fork's own modeling code): refused, naming what is supported.
    fork = LlamaForCausalLM(tiny_config("llama"))
    fork.config.model_type = "my_llama_fork"
    with pytest.raises(hf_prope.UnsupportedModelError, match="my_llama_fork.*llama, llama4_text, .*olmo2, "):
        hf_prope.patch_model(fork, "p-rope", p=0.5)
    assert hf_prope.get_patch(fork) is None
    with pytest.raises(TypeError, match="transformers model"):
        hf_prope.patch_model("not a model", "nope")


# -- isolation ---------------------------------------------------------------------------------


def test_patching_one_model_never_changes_another() -> None:
    config = tiny_config("llama")
    torch.manual_seed(0)
    a = LlamaForCausalLM(config).eval()
    b = LlamaForCausalLM(config).eval()  # same config object
    c = copy.deepcopy(a)
    ids = tokens()
    b_before, b_config = logits(b, ids), copy.deepcopy(b.config.to_dict())
    hf_prope.patch_model(a, "p-rope", p=0.25)
    assert torch.equal(logits(b, ids), b_before)
    assert b.config.to_dict() == b_config
    assert hf_prope.get_patch(b) is None and hf_prope.get_patch(c) is None
    assert a.config is a.model.config is a.model.rotary_emb.config
    assert a.config is not b.config


# -- class level -------------------------------------------------------------------------------


def test_class_level_patch_and_revert(tmp_path) -> None:
    plain = tiny_model("llama")
    plain.save_pretrained(tmp_path)
    ids = tokens()
    direct = copy.deepcopy(plain)
    hf_prope.patch_model(direct, "p-rope", p=0.25)
    handle = hf_prope.apply_p_rope_to_llama(p=0.25)
    try:
        assert hf_prope.class_patches() == {"llama": PatchSpec("p-rope", p=0.25)}
        built = LlamaForCausalLM(tiny_config("llama"))
        assert hf_prope.get_patch(built) == PatchSpec("p-rope", p=0.25)
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
        assert torch.equal(logits(loaded, ids), logits(direct, ids))
        other = Qwen2ForCausalLM(tiny_config("qwen2"))  # other architectures untouched
        assert hf_prope.get_patch(other) is None
    finally:
        handle.revert()
    assert hf_prope.class_patches() == {}
    again = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    assert hf_prope.get_patch(again) is None
    assert torch.equal(logits(again, ids), logits(plain, ids))


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_class_level_layer_selective_for_every_arch(model_type) -> None:
    name = "gemma3" if model_type == "gemma3_text" else model_type
    apply_patch = getattr(hf_prope, f"apply_patch_to_{name}")
    handle = apply_patch("nope", layers=[2])
    try:
        model = tiny_model(model_type)
    finally:
        hf_prope.revert_class_patches()
    assert getattr(handle.cls.__init__, "__wrapped__", None) is None  # class restored
    direct = tiny_model(model_type)
    hf_prope.patch_model(direct, "nope", layers=[2])
    ids = tokens()
    assert torch.equal(logits(model, ids), logits(direct, ids))
    assert hf_prope.get_patch(model) == hf_prope.get_patch(direct) == PatchSpec("nope", layers=(2,))


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_class_level_patch_leaves_the_callers_config_alone(model_type) -> None:
    """Every model class of the architecture, built under a class patch from a config, leaves that config as it was."""
    import importlib

    from transformers import PreTrainedModel

    from hf_prope.registry import get_architecture

    arch = get_architecture(model_type)
    module = importlib.import_module(arch.modeling_module)
    classes = [
        c
        for c in vars(module).values()
        if isinstance(c, type)
        and issubclass(c, PreTrainedModel)
        and c.__module__ == module.__name__
        and "__init__" in c.__dict__
    ]
    name = "gemma3" if model_type == "gemma3_text" else model_type
    handle = getattr(hf_prope, f"apply_p_rope_to_{name}")(p=0.5)
    try:
        for cls in classes:
            config = tiny_config(model_type, num_labels=2)
            if cls.config_class is not None and not isinstance(config, cls.config_class):
                continue  # e.g. Gemma 3's multimodal classes take another config type
            before = config.to_dict()
            model = cls(config)
            assert config.to_dict() == before, cls.__name__
            assert not hasattr(config, "hf_prope"), cls.__name__
            assert hf_prope.get_patch(model) == PatchSpec("p-rope", p=0.5), cls.__name__
            inner = [m for m in model.modules() if isinstance(m, arch.base_model_class)]
            assert inner and all(m.config is model.config for m in inner), cls.__name__  # one config per model
    finally:
        handle.revert()
    assert all(getattr(c.__init__, "__wrapped__", None) is None for c in classes)


@pytest.mark.parametrize(
    "scaling",
    [
        {"rope_type": "linear", "factor": 10.0},
        {"rope_type": "dynamic", "factor": 10.0},
        {"rope_type": "yarn", "factor": 10.0},
    ],
)
def test_class_level_identity_keeps_rope_scaling_set_later(scaling) -> None:
    """transformers' own test_model_rope_scaling_from_config, under a class-level p=1.0 patch (the identity)."""
    from transformers import LlamaModel

    def outputs(config):
        torch.manual_seed(42)
        model = LlamaModel(config).eval()
        with torch.no_grad():
            return model(torch.arange(1, 11)[None]).last_hidden_state, model(tokens(1, 384)).last_hidden_state

    config = tiny_config("llama")
    reference_short, reference_long = outputs(copy.deepcopy(config))
    handle = hf_prope.apply_p_rope_to_llama(p=1.0)
    try:
        short, long = outputs(config)
        assert torch.equal(short, reference_short) and torch.equal(long, reference_long)  # p=1.0 is the identity
        config.rope_parameters = {**scaling, "rope_theta": config.rope_parameters["rope_theta"]}
        scaled_short, scaled_long = outputs(config)
    finally:
        handle.revert()
    plain_short, plain_long = outputs(config)  # the same scaled config, no class patch
    assert torch.equal(scaled_long, plain_long) and torch.equal(scaled_short, plain_short)
    assert not torch.allclose(scaled_long, reference_long)  # the scaling set afterwards took effect


def test_arch_function_with_model_argument() -> None:
    model = tiny_model("gemma3_text")
    hf_prope.apply_p_rope_to_gemma3(p=0.25, layer_types=["full_attention"], model=model)
    assert hf_prope.get_patch(model).layer_types == ("full_attention",)
    with pytest.raises(ValueError, match="patches llama models"):
        hf_prope.apply_p_rope_to_llama(p=0.25, model=model)


def test_gemma3_with_one_layer_type_only() -> None:
    """A small Gemma 3 has only sliding layers: its rotary module has no full-attention frequencies to patch."""
    from tiny import HEAD_DIM

    model = tiny_model("gemma3_text", num_hidden_layers=2, layer_types=["sliding_attention"] * 2)
    before = logits(model, tokens())
    hf_prope.patch_model(model, "p-rope", p=0.25)
    theta = 10_000.0  # the sliding layers' base in the tiny config
    expected = torch.tensor([theta ** (-2 * i / HEAD_DIM) if i < 2 else 0.0 for i in range(HEAD_DIM // 2)])
    torch.testing.assert_close(hf_prope.layer_frequencies(model), expected.expand(2, -1))
    hf_prope.unpatch_model(model)
    assert torch.equal(logits(model, tokens()), before)


@pytest.mark.parametrize(
    "args,kwargs,error,match",
    [
        (("nope",), {"layers": [6]}, ValueError, "6 decoder layers"),
        (("nope",), {"layer_types": ["full_atention"]}, ValueError, "Did you mean 'full_attention'"),
        (("freq-mask",), {"keep": [0, 8]}, ValueError, "8 frequency pairs"),
    ],
)
def test_check_patch_raises_what_patch_model_would_and_touches_nothing(args, kwargs, error, match) -> None:
    model = tiny_model("qwen2")
    before = rotary_state(model)
    with pytest.raises(error, match=match):
        hf_prope.check_patch(model, *args, **kwargs)
    with pytest.raises(error, match=match):
        hf_prope.patch_model(model, *args, **kwargs)
    assert same_state(before, rotary_state(model))
    assert hf_prope.check_patch(model, "p-rope", p=0.5, layer_types=["full_attention"]) == PatchSpec(
        "p-rope", p=0.5, layer_types=("full_attention",)
    )
    assert same_state(before, rotary_state(model))  # a valid check changes nothing either


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_patch_state_reads_what_the_model_carries(model_type: str) -> None:
    model = tiny_model(model_type)
    original = copy.deepcopy(model.config.rope_parameters)
    plain = hf_prope.patch_state(model)
    assert plain.spec is None and not plain.patched and plain.native
    assert plain.rope_parameters == original == plain.original_rope_parameters
    assert plain.base == {
        "model_type": model_type,
        "architectures": [type(model).__name__],
        "head_dim": 16,
        "num_hidden_layers": 6,
        "hidden_size": 64,
    }
    assert plain.layer_types == (
        tuple(model.config.layer_types) if getattr(model.config, "layer_types", None) else None
    )
    hf_prope.patch_model(model, "freq-mask", keep=[0, 2])  # not a prefix: hf-prope's own rope type
    state = hf_prope.patch_state(model)
    assert state.spec == PatchSpec("freq-mask", keep=(0, 2)) and state.patched and not state.native
    assert state.original_rope_parameters == original
    assert state.rope_parameters == model.config.rope_parameters != original
    assert state.base == plain.base
