"""Per-KV-head frequency masks (``head-mask``) against independent oracles.

Oracles: today's ``freq-mask`` / ``p-rope`` (a head-mask equal for every head must give the same
bits), attention weights written out pair by pair from the projections with per-head frequencies
(grouped-query attention included), the unpatched model (unpatch, ``original_rope``), and the
2-norm rule computed by hand on the measured norms.
"""

from __future__ import annotations

import copy
import json
import math
import pickle

import pytest
import torch
from tiny import HEAD_DIM, HEAD_KEEP, MODEL_TYPES, N_LAYERS, char_tokenizer, logits, tiny_model, tokens

import hf_prope
from hf_prope import PatchSpec, analysis, rotation
from hf_prope.patching import head_frequencies, layer_frequencies, original_rope, patch_info

N_PAIRS = HEAD_DIM // 2
MASK = (True, False, True, True, False, False, True, False)  # not a prefix: the general path


def _same_for_every_head(keep: list[int]) -> tuple:
    return tuple((tuple(keep), tuple(keep)) for _ in range(N_LAYERS))


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_equal_heads_give_the_freq_mask_bit_for_bit_forward_and_backward(model_type) -> None:
    ids = tokens()
    ours, theirs = tiny_model(model_type), tiny_model(model_type)
    hf_prope.patch_model(theirs, "freq-mask", mask=MASK)
    spec = PatchSpec("head-mask", head_keep=_same_for_every_head([i for i, m in enumerate(MASK) if m]))
    hf_prope.patch_model(ours, spec)
    assert hf_prope.get_patch(ours) == spec
    assert torch.equal(logits(ours, ids), logits(theirs, ids))
    grads = []
    for model in (ours, theirs):
        model.zero_grad()
        model(ids, labels=ids).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert torch.equal(*grads)
    # and it changed the model: the same weights with plain RoPE differ
    assert (logits(tiny_model(model_type), ids) - logits(ours, ids)).abs().max() > 1e-3


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_highest_budget_is_p_rope(model_type) -> None:
    ids = tokens()
    ours, theirs = tiny_model(model_type), tiny_model(model_type)
    hf_prope.patch_model(ours, "head-mask", p=0.25)
    hf_prope.patch_model(theirs, "p-rope", p=0.25)
    assert torch.equal(logits(ours, ids), logits(theirs, ids))
    assert hf_prope.get_patch(ours) == PatchSpec("head-mask", p=0.25, select="highest")


def _oracle_attention(module, hidden, keep_per_kv_head, theta: float, norms=None) -> torch.Tensor:
    """Softmax(q k^T * scale) written out pair by pair: pair i of query head h turns by pos * theta^(-2i/d)
    only where its KV head (h // group) keeps it."""
    b, t, _ = hidden.shape
    d = int(module.head_dim)
    q = module.q_proj(hidden).view(b, t, -1, d)
    k = module.k_proj(hidden).view(b, t, -1, d)
    if norms is not None:
        q, k = norms[0](q), norms[1](k)
    n_q, n_kv = q.shape[2], k.shape[2]
    group = n_q // n_kv

    def rotate(x, head, kv):
        out = x.clone()
        for i in range(d // 2):
            if not keep_per_kv_head[kv][i]:
                continue
            freq = theta ** (-2.0 * i / d)
            for pos in range(t):
                c, s = math.cos(pos * freq), math.sin(pos * freq)
                a, bb = x[:, pos, head, i], x[:, pos, head, i + d // 2]
                out[:, pos, head, i] = a * c - bb * s
                out[:, pos, head, i + d // 2] = bb * c + a * s
        return out[:, :, head]

    weights = []
    for h in range(n_q):
        qh = rotate(q, h, h // group)
        kh = rotate(k, h // group, h // group)
        scores = qh @ kh.transpose(1, 2) * float(module.scaling)
        causal = torch.ones(t, t, dtype=torch.bool).tril()
        weights.append(torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1))
    return torch.stack(weights, dim=1)


def _attention_inputs_and_weights(model, ids) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, the hidden states each (eager) attention got and the attention weights it gave."""
    seen: dict[int, tuple] = {}

    def hook(i):
        def run(module, args, kwargs, output):
            seen[i] = (kwargs["hidden_states"], output[1])

        return run

    handles = [
        layer.self_attn.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(model.model.layers)
    ]
    try:
        with torch.no_grad():
            model(ids, output_attentions=True)
    finally:
        for h in handles:
            h.remove()
    return seen


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotate_heads_is_transformers_formula_per_query_head_bit_for_bit(dtype) -> None:
    """Oracle: transformers' own function on full-width cos/sin written out for every query head."""
    import transformers.models.llama.modeling_llama as modeling

    formula = rotation.transformers_apply(modeling.__name__)
    g = torch.Generator().manual_seed(3)
    b, heads, kv, t, d = 2, 6, 2, 7, 8
    # q/k as attention makes them: (batch, tokens, heads, d) transposed; so is the incoming gradient
    q0 = torch.randn(b, t, heads, d, generator=g).to(dtype)
    k0 = torch.randn(b, t, kv, d, generator=g).to(dtype)
    grads = torch.randn(b, t, heads, d, generator=g).to(dtype), torch.randn(b, t, kv, d, generator=g).to(dtype)
    cos, sin = (torch.randn(b, kv, t, d // 2, generator=g).to(dtype) for _ in range(2))

    def full(x: torch.Tensor) -> torch.Tensor:  # per pair -> per channel, per KV head -> per query head
        return torch.cat([x, x], dim=-1).repeat_interleave(heads // kv, dim=1)

    results = []
    for fn in (
        lambda q, k: rotation.rotate_heads(q, k, cos, sin),
        lambda q, k: (
            formula(q, q, full(cos), full(sin), 0)[0][0],
            formula(k, k, cos.repeat(1, 1, 1, 2), sin.repeat(1, 1, 1, 2), 0)[0][0],
        ),
    ):
        views = [x.clone().requires_grad_().transpose(1, 2) for x in (q0, k0)]
        seen: list[torch.Tensor] = []
        for v in views:  # the gradients as they leave the rotation (a leaf's .grad takes the leaf's layout)
            v.register_hook(seen.append)
        out = fn(*views)
        torch.autograd.backward(out, [x.transpose(1, 2) for x in grads])
        results.append((*out, *sorted(seen, key=lambda x: -x.shape[1])))  # q, k
    for ours, theirs in zip(*results):
        assert ours.dtype == theirs.dtype and torch.equal(ours, theirs)
        assert ours.stride() == theirs.stride()  # a norm's weight gradient downstream sums in layout order
    assert not torch.equal(results[0][0], q0.transpose(1, 2))  # it rotated


def test_under_torch_compile_it_trains_as_in_eager_mode() -> None:
    torch._dynamo.reset()
    model = hf_prope.patch_model(tiny_model("qwen3").train(), "head-mask", head_keep=HEAD_KEEP)
    eager = copy.deepcopy(model)
    ids = tokens()
    results = []
    for run, owner in ((torch.compile(model, backend="inductor"), model), (eager, eager)):
        loss = run(ids, labels=ids).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in owner.named_parameters() if p.grad is not None}))
    (loss, grads), (want_loss, want_grads) = results
    torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=1e-6)
    assert grads.keys() == want_grads.keys()
    for name, grad in want_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-6)


def test_rotate_heads_differentiates_through_cos_and_sin() -> None:
    g = torch.Generator().manual_seed(4)
    q, k = torch.randn(1, 4, 5, 8, generator=g), torch.randn(1, 2, 5, 8, generator=g)
    cos, sin = torch.randn(1, 2, 5, 4, generator=g, requires_grad=True), torch.randn(1, 2, 5, 4, generator=g)
    out = rotation.rotate_heads(q, k, cos, sin)
    (out[0].sum() + out[1].sum()).backward()
    # d/dcos of sum(x1 c - x2 s + x2 c + x1 s) = x1 + x2, summed over the query heads of each group and over k
    want = sum(x.unflatten(1, (2, -1)).sum(2)[..., :4] + x.unflatten(1, (2, -1)).sum(2)[..., 4:] for x in (q, k))
    torch.testing.assert_close(cos.grad, want)


def test_rotate_heads_refuses_cos_of_the_wrong_shape() -> None:
    q, k = torch.zeros(1, 4, 5, 8), torch.zeros(1, 2, 5, 8)
    with pytest.raises(ValueError, match=r"need shape \(batch, 2, tokens, 4\)"):
        rotation.rotate_heads(q, k, torch.zeros(1, 2, 5, 8), torch.zeros(1, 2, 5, 8))


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])  # qwen3: q/k norms before the rotation
def test_attention_matches_a_pair_by_pair_oracle_with_grouped_heads(model_type) -> None:
    model = tiny_model(model_type, attn="eager", layer_types=None, use_sliding_window=False)
    hf_prope.patch_model(model, "head-mask", head_keep=HEAD_KEEP)
    theta = float(model.config.rope_parameters["rope_theta"])
    seen = _attention_inputs_and_weights(model, tokens(batch=2, length=12))
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            attention = layer.self_attn
            hidden, got = seen[i]
            keep = [[j in set(k) for j in range(N_PAIRS)] for k in HEAD_KEEP[i]]
            norms = (attention.q_norm, attention.k_norm) if model_type == "qwen3" else None
            want = _oracle_attention(attention, hidden, keep, theta, norms)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=f"layer {i}")
            # the two KV heads of layer 0 keep different pairs: swapping their masks changes the weights
            if i == 0:
                swapped = _oracle_attention(attention, hidden, keep[::-1], theta, norms)
                assert (swapped - got).abs().max() > 1e-3


def test_frequencies_per_head_and_per_layer() -> None:
    model = hf_prope.patch_model(tiny_model("llama"), "head-mask", head_keep=HEAD_KEEP)
    original = layer_frequencies(model, original=True)
    per_head = head_frequencies(model)
    assert per_head.shape == (N_LAYERS, 2, N_PAIRS)
    for layer, heads in enumerate(HEAD_KEEP):
        for h, keep in enumerate(heads):
            want = torch.tensor([float(original[layer, i]) if i in keep else 0.0 for i in range(N_PAIRS)])
            assert torch.equal(per_head[layer, h], want)
    # per layer: a pair rotates when any head of the layer rotates it
    union = [sorted(set(a) | set(b)) for a, b in HEAD_KEEP]
    assert [[i for i in range(N_PAIRS) if row[i] > 0] for row in layer_frequencies(model)] == union
    assert patch_info(model)["hooked_layers"] == [0, 1, 2, 3, 4]  # layer 5 keeps everything: no hook


def test_unpatch_and_original_rope_give_the_original_bit_for_bit() -> None:
    ids = tokens()
    original = logits(tiny_model("gemma3_text"), ids)
    model = hf_prope.patch_model(tiny_model("gemma3_text"), "head-mask", head_keep=HEAD_KEEP)
    patched = logits(model, ids)
    with original_rope(model):
        assert torch.equal(logits(model, ids), original)
    assert torch.equal(logits(model, ids), patched)
    hf_prope.unpatch_model(model)
    assert torch.equal(logits(model, ids), original) and hf_prope.get_patch(model) is None


def test_copies_and_pickles_keep_the_patch() -> None:
    ids = tokens()
    model = hf_prope.patch_model(tiny_model("llama"), "head-mask", head_keep=HEAD_KEEP)
    expected = logits(model, ids)
    for other in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert torch.equal(logits(other, ids), expected)


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
def test_class_level_head_mask(model_type) -> None:
    ids = tokens()
    spec = PatchSpec("head-mask", head_keep=tuple(tuple(tuple(k) for k in heads) for heads in HEAD_KEEP))
    expected = logits(hf_prope.patch_model(tiny_model(model_type), spec), ids)
    handle = hf_prope.apply_patch_to_class(model_type, spec)
    try:
        built = tiny_model(model_type)
    finally:
        handle.revert()
    assert hf_prope.get_patch(built) == spec
    assert torch.equal(logits(built, ids), expected)


def test_patch_file_round_trip(tmp_path) -> None:
    ids = tokens()
    spec = PatchSpec("head-mask", head_keep=tuple(tuple(tuple(k) for k in heads) for heads in HEAD_KEEP))
    spec.save(tmp_path / "mask.json")
    assert json.loads((tmp_path / "mask.json").read_text())["head_keep"][1] == [[0], [1, 2, 3, 4, 5, 6, 7]]
    assert PatchSpec.load(tmp_path / "mask.json") == spec
    a = hf_prope.patch_model(tiny_model("llama"), str(tmp_path / "mask.json"))
    b = hf_prope.patch_model(tiny_model("llama"), tmp_path / "mask.json")
    assert hf_prope.get_patch(a) == hf_prope.get_patch(b) == spec
    assert torch.equal(logits(a, ids), logits(b, ids))
    with pytest.raises(FileNotFoundError, match="No patch file"):
        hf_prope.patch_model(tiny_model("llama"), str(tmp_path / "missing.json"))
    with pytest.raises(TypeError, match="put them in the file"):
        hf_prope.patch_model(tiny_model("llama"), str(tmp_path / "mask.json"), p=0.5)


@pytest.mark.parametrize(
    "params,error,match",
    [
        ({"head_keep": HEAD_KEEP[:3]}, ValueError, "has 3 layers but this model has 6"),
        ({"head_keep": [[[0], [1], [2]]] * N_LAYERS}, ValueError, "per KV head, not per query head"),
        ({"head_keep": [[[0, 8], [1]]] * N_LAYERS}, ValueError, r"pair indices \[8\]"),
        ({"head_keep": [[[0, 0], [1]]] * N_LAYERS}, ValueError, "more than once"),
        ({"head_keep": HEAD_KEEP, "p": 0.5}, ValueError, "budget p=0.5 is 4"),
        ({"head_keep": HEAD_KEEP, "pairs": 2}, ValueError, "budget is pairs=2"),
        ({"select": "2-norm", "p": 0.25}, ValueError, "hf_prope.analysis.head_mask"),
        ({"p": 0.25, "layers": [1]}, ValueError, "takes no layers"),
        ({"p": 0.25, "pairs": 2}, ValueError, "not both"),
        ({}, ValueError, "needs a budget"),
        ({"pairs": 9}, ValueError, "pairs=9 but this model has 8"),
        ({"p": 0.25, "select": "top"}, ValueError, "select must be one of"),
    ],
)
def test_bad_head_masks_are_refused_before_the_model_changes(params, error, match) -> None:
    ids = tokens()
    model = tiny_model("llama")
    before = logits(model, ids)
    with pytest.raises(error, match=match):
        hf_prope.patch_model(model, "head-mask", **params)
    assert hf_prope.get_patch(model) is None and torch.equal(logits(model, ids), before)


def test_uninstalled_rotary_function_is_a_loud_error() -> None:
    model = hf_prope.patch_model(tiny_model("llama"), "head-mask", head_keep=HEAD_KEEP)
    module = "transformers.models.llama.modeling_llama"
    rotation.uninstall(module)
    try:
        with pytest.raises(RuntimeError, match="head-mask needs hf-prope's rotary function"):
            logits(model, tokens())
    finally:
        rotation.install(module)
    logits(model, tokens())


def _usage(model):
    from pydoc_data.topics import topics

    text = " ".join(list(topics.values())[:20])
    return analysis.frequency_usage(model, char_tokenizer(), text, window=48, n_windows=2)


def test_two_norm_rule_keeps_each_kv_heads_largest_products() -> None:
    model = tiny_model("llama")
    usage = _usage(model)
    spec = analysis.head_mask(usage, p=0.25)
    assert spec.name == "head-mask" and spec.select == "2-norm" and spec.p == 0.25
    r = 2  # p=0.25 of 8 pairs
    for layer in range(N_LAYERS):
        for kv in range(2):
            # by hand: mean |k_i| of the KV head x the summed mean |q_i| of its two query heads
            score = [
                float(usage.key[layer, kv, i])
                * float(usage.query[layer, 2 * kv, i] + usage.query[layer, 2 * kv + 1, i])
                for i in range(N_PAIRS)
            ]
            best = sorted(range(N_PAIRS), key=lambda i: -score[i])[:r]
            assert spec.head_keep[layer][kv] == tuple(sorted(best))
    assert len({k for heads in spec.head_keep for k in heads}) > 1  # the heads do differ on this model
    # 2-norm-drift: the product times mean |e^(i t g_i) - 1| over t = 0 .. context-1, g_i the pair's frequency
    moving = analysis.head_mask(usage, p=0.25, select="2-norm-drift", context_length=30)
    for layer in range(N_LAYERS):
        freqs = usage.original_frequencies[layer]
        for kv in range(2):
            score = []
            for i in range(N_PAIRS):
                moved = sum(abs(2 * math.sin(t * float(freqs[i]) / 2)) for t in range(30)) / 30
                q = float(usage.query[layer, 2 * kv, i] + usage.query[layer, 2 * kv + 1, i])
                score.append(float(usage.key[layer, kv, i]) * q * moved)
            assert moving.head_keep[layer][kv] == tuple(sorted(sorted(range(N_PAIRS), key=lambda i: -score[i])[:r]))
    assert moving.select == "2-norm-drift" and moving != spec
    shared = analysis.head_mask(usage, pairs=3, select="2-norm-shared")
    assert shared.name == "freq-mask" and sum(shared.mask) == 3
    assert analysis.head_mask(usage, p=0.5, select="highest") == PatchSpec("head-mask", p=0.5)
    patched = hf_prope.patch_model(model, spec)
    assert hf_prope.get_patch(patched) == spec
    with pytest.raises(ValueError, match="exactly one"):
        analysis.head_mask(usage)
    with pytest.raises(ValueError, match="every layer"):
        analysis.head_mask(
            analysis.frequency_usage(
                tiny_model("llama"), char_tokenizer(), "x" * 400, window=48, n_windows=2, layers=[0, 1]
            ),
            p=0.25,
        )


def test_max_wavelength_leaves_slow_pairs_out_of_every_choice() -> None:
    usage = _usage(tiny_model("llama"))
    wavelengths = [2 * math.pi / float(f) for f in usage.original_frequencies[0]]
    limit = (wavelengths[4] + wavelengths[5]) / 2  # pairs 0..4 turn within it, 5..7 do not
    r = 3
    for select in ("2-norm", "2-norm-drift"):
        spec = analysis.head_mask(usage, pairs=r, select=select, max_wavelength=limit, context_length=20000)
        free = analysis.head_mask(usage, pairs=r, select=select, context_length=20000)
        assert all(i <= 4 for heads in spec.head_keep for keep in heads for i in keep)
        scores = analysis.head_scores(usage).double()
        if select == "2-norm-drift":
            moved = [analysis.drift(f, 20000) for f in usage.original_frequencies]
            scores = scores * torch.stack(moved).double()[:, None]
        for layer in range(N_LAYERS):
            for kv in range(2):  # by hand: the best r among pairs 0..4 alone
                best = sorted(range(5), key=lambda i: -float(scores[layer, kv, i]))[:r]
                assert spec.head_keep[layer][kv] == tuple(sorted(best))
        # the limit changes something on this model: without it some head keeps a slow pair
        assert any(i > 4 for heads in free.head_keep for keep in heads for i in keep) and spec != free
    shared = analysis.head_mask(usage, pairs=r, select="2-norm-shared", max_wavelength=limit)
    assert not any(shared.mask[5:]) and sum(shared.mask) == r
    with pytest.raises(ValueError, match="leaves 5 pairs to choose from in layer 0, fewer than the 6"):
        analysis.head_mask(usage, pairs=6, max_wavelength=limit)
    with pytest.raises(ValueError, match="positive number of tokens"):
        analysis.head_mask(usage, pairs=r, max_wavelength=0)
    # no effect with "highest": the highest pairs are the fastest
    assert analysis.head_mask(usage, p=0.5, select="highest", max_wavelength=limit) == PatchSpec("head-mask", p=0.5)


@pytest.mark.parametrize("length", [8, 12])  # at the training length, then past it (dynamic's base grows)
def test_under_dynamic_ntk_each_head_turns_by_the_grown_base_past_the_training_length(length) -> None:
    """Dynamic NTK (the long-context reading of a per-head retrofit) under a head-mask: the kept pairs of each
    KV head turn by transformers' documented dynamic base, theta * (factor * t / L - (factor - 1)) ** (d / (d - 2)),
    which is theta itself up to the training length L; stopped pairs stay unrotated."""
    train_length = 8
    model = tiny_model(
        "llama",
        attn="eager",
        layer_types=None,
        use_sliding_window=False,
        max_position_embeddings=train_length,
        initializer_range=0.2,  # sharp attention, so the two bases give visibly different weights
    )
    hf_prope.extend_context(model, "dynamic:2")
    hf_prope.patch_model(model, "head-mask", head_keep=HEAD_KEEP)
    theta = float(model.config.rope_parameters["rope_theta"])
    grown = theta * max(2.0 * length / train_length - 1.0, 1.0) ** (HEAD_DIM / (HEAD_DIM - 2))
    assert (grown > theta) == (length > train_length)
    seen = _attention_inputs_and_weights(model, tokens(batch=1, length=length))
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            hidden, got = seen[i]
            keep = [[j in set(k) for j in range(N_PAIRS)] for k in HEAD_KEEP[i]]
            want = _oracle_attention(layer.self_attn, hidden, keep, grown)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=f"layer {i}")
            if length > train_length:  # the plain base is a different attention: the oracle can tell them apart
                assert (_oracle_attention(layer.self_attn, hidden, keep, theta) - got).abs().max() > 1e-4


def test_under_yarn_a_stopped_pair_keeps_the_attention_scaling_as_freq_mask_does() -> None:
    rope = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64}
    ours, theirs = tiny_model("llama", rope_parameters=dict(rope)), tiny_model("llama", rope_parameters=dict(rope))
    hf_prope.patch_model(theirs, "freq-mask", keep=[0, 2, 3, 6])
    hf_prope.patch_model(ours, "head-mask", head_keep=[[[0, 2, 3, 6], [0, 2, 3, 6]]] * N_LAYERS)
    assert float(model_attention_scaling(ours)) != 1.0
    assert torch.equal(logits(ours, tokens()), logits(theirs, tokens()))


def model_attention_scaling(model) -> float:
    return float(model.model.rotary_emb.attention_scaling)
