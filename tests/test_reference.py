"""Patched attention against the paper's definition, written out here pair by pair.

The oracle never calls hf-prope: it takes the queries/keys before rotation (captured
from the model), rotates pair i (HF layout: channels i and i + d/2) by
``t * theta^(-2i/d)`` if the pair is kept and not at all otherwise, and compares with
what the patched model actually feeds its attention kernel.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny import HEAD_DIM, tiny_model, tokens
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import hf_prope

CAPTURED: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}


def _capture(module, query, key, value, attention_mask, **kwargs):
    CAPTURED[module.layer_idx] = (query.detach().clone(), key.detach().clone())
    kwargs.pop("softcap", None)  # only q/k are checked; both passes run this same function
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register("hfp_capture", _capture)


def _pre_rotation(model, ids):
    """Queries/keys of every layer before RoPE, shaped [batch, heads, seq, head_dim]."""
    store: dict[tuple[int, str], torch.Tensor] = {}
    handles = []
    for layer in model.model.layers:
        att = layer.self_attn
        for which in ("q", "k"):
            norm = getattr(att, f"{which}_norm", None)
            src = norm if norm is not None else getattr(att, f"{which}_proj")

            def hook(mod, inp, out, idx=att.layer_idx, which=which):
                b, t = ids.shape
                if out.dim() == 4 and out.shape[2] == t:  # Gemma 3 norms after the transpose
                    store[(idx, which)] = out.detach().clone()
                else:
                    store[(idx, which)] = out.reshape(b, t, -1, HEAD_DIM).transpose(1, 2).detach().clone()

            handles.append(src.register_forward_hook(hook))
    with torch.no_grad():
        model(ids)
    for h in handles:
        h.remove()
    return store


def paper_rotate(x: torch.Tensor, theta: float, kept: list[bool]) -> torch.Tensor:
    """RoPE with only the kept pairs rotating, from the definition (float64)."""
    x = x.double()
    out = x.clone()
    d = x.shape[-1]
    positions = torch.arange(x.shape[-2], dtype=torch.float64)
    for i in range(d // 2):
        if not kept[i]:
            continue  # frequency 0: the pair passes through
        angle = positions * theta ** (-2 * i / d)
        c, s = torch.cos(angle), torch.sin(angle)
        a, b = x[..., i], x[..., i + d // 2]
        out[..., i] = a * c - b * s
        out[..., i + d // 2] = a * s + b * c
    return out


CASES = [
    ("llama", ("p-rope", {"p": 0.25})),
    ("llama", ("p-rope", {"p": 0.75, "rotate": "lowest"})),
    ("mistral", ("freq-mask", {"keep": [0, 3, 7]})),
    ("qwen3", ("nope", {"layers": [2, 3]})),
    ("qwen2", ("p-rope", {"p": 0.5, "layer_types": ["full_attention"]})),
    ("gemma", ("freq-mask", {"mask": [True, False] * 4})),
    ("gemma2", ("p-rope", {"p": 0.5})),
    ("gemma3_text", ("p-rope", {"p": 0.25, "layer_types": ["full_attention"]})),
    ("gemma3_text", ("freq-mask", {"max_wavelength": 100.0})),
]


@pytest.mark.parametrize("model_type,patch", CASES)
def test_patched_attention_inputs_match_paper_definition(model_type, patch) -> None:
    name, params = patch
    model = tiny_model(model_type, attn="hfp_capture")
    hf_prope.patch_model(model, name, **params)
    ids = tokens(batch=2, length=20)
    pre = _pre_rotation(model, ids)
    CAPTURED.clear()
    with torch.no_grad():
        model(ids)
    spec = hf_prope.get_patch(model)
    n = HEAD_DIM // 2
    for layer in range(model.config.num_hidden_layers):
        lt = model.config.layer_types[layer] if getattr(model.config, "layer_types", None) else None
        theta = 1e6 if (model_type == "gemma3_text" and lt == "full_attention") else 1e4
        applies = (spec.layers is None or layer in spec.layers) and (spec.layer_types is None or lt in spec.layer_types)
        if not applies:
            kept = [True] * n
        elif spec.name == "p-rope":
            r = int(spec.p * HEAD_DIM // 2)
            kept = [i < r for i in range(n)] if spec.rotate == "highest" else [i >= n - r for i in range(n)]
        elif spec.name == "nope":
            kept = [False] * n
        elif spec.keep is not None:
            kept = [i in spec.keep for i in range(n)]
        elif spec.mask is not None:
            kept = list(spec.mask)
        else:
            kept = [2 * math.pi * theta ** (2 * i / HEAD_DIM) <= spec.max_wavelength for i in range(n)]
        q_seen, k_seen = CAPTURED[layer]
        q_ref = paper_rotate(pre[(layer, "q")], theta, kept)
        k_ref = paper_rotate(pre[(layer, "k")], theta, kept)
        torch.testing.assert_close(q_seen.double(), q_ref, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(k_seen.double(), k_ref, atol=2e-5, rtol=1e-5)
        # Unrotated channels pass through bit-exactly (not merely close).
        ch = torch.tensor(kept + kept)
        assert torch.equal(q_seen[..., ~ch], pre[(layer, "q")][..., ~ch])
        assert torch.equal(k_seen[..., ~ch], pre[(layer, "k")][..., ~ch])


@settings(max_examples=40, deadline=None)
@given(
    mask=st.lists(st.booleans(), min_size=HEAD_DIM // 2, max_size=HEAD_DIM // 2),
    m=st.integers(0, 200),
    n=st.integers(0, 200),
    shift=st.integers(0, 50),
    seed=st.integers(0, 2**16),
)
def test_scores_depend_on_relative_position_only(mask, m, n, shift, seed) -> None:
    """q·k after the patched rotation is the same for (m, n) and (m + s, n + s), whatever the mask."""
    model = _PROPERTY_MODEL
    hf_prope.patch_model(model, "freq-mask", mask=mask)
    rot = model.model.rotary_emb
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 1, 1, HEAD_DIM, generator=g)
    k = torch.randn(1, 1, 1, HEAD_DIM, generator=g)
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    def score(pq: int, pk: int) -> float:
        pos = torch.tensor([[pq, pk]])
        cos, sin = rot(q, pos)
        qr, _ = apply_rotary_pos_emb(q, q, cos[:, :1], sin[:, :1])
        kr, _ = apply_rotary_pos_emb(k, k, cos[:, 1:], sin[:, 1:])
        return float((qr * kr).sum())

    a, b = score(m, n), score(m + shift, n + shift)
    assert math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-4)
    if not any(mask):  # NoPE: no dependence on position at all
        assert math.isclose(a, score(m, n + 37), rel_tol=1e-5, abs_tol=1e-5)


_PROPERTY_MODEL = tiny_model("llama")
