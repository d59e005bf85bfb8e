"""hf_prope.analysis against constructed truth: weights built so the answer is known in advance."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from tiny import HEAD_DIM, MODEL_TYPES, char_tokenizer, save_tiny, tiny_model
from transformers import AutoModelForCausalLM

import hf_prope
from hf_prope import analysis
from hf_prope.cli import main
from hf_prope.spec import PatchSpec

N_PAIRS = HEAD_DIM // 2
TEXT = " ".join(f"Line {i}: the quick brown fox jumps over {i % 7} lazy dogs." for i in range(60))
WINDOW, N_WINDOWS = 48, 3


def _heads_of(model) -> tuple[int, int]:
    return model.config.num_attention_heads, model.config.num_key_value_heads


def _zero_outside(linear: torch.nn.Linear, n_heads: int, pairs: set[int]) -> None:
    """Zero every output channel (weight row and bias) of a q/k projection outside ``pairs``."""
    keep = torch.zeros(HEAD_DIM, dtype=torch.bool)
    for i in pairs:
        keep[i] = keep[i + N_PAIRS] = True  # transformers' layout: pair i is channels i and i + d/2
    rows = keep.repeat(n_heads)
    with torch.no_grad():
        linear.weight[~rows] = 0
        if linear.bias is not None:
            linear.bias[~rows] = 0


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_energy_only_in_chosen_pairs_is_reported_exactly_there(model_type) -> None:
    model = tiny_model(model_type, **({"attention_bias": True} if model_type == "llama" else {}))
    q_pairs, k_pairs = {1, 5}, {2, 5, 7}
    heads, kv_heads = _heads_of(model)
    for layer in model.model.layers:
        _zero_outside(layer.self_attn.q_proj, heads, q_pairs)
        _zero_outside(layer.self_attn.k_proj, kv_heads, k_pairs)
    usage = analysis.frequency_usage(model, char_tokenizer(), TEXT, window=WINDOW, n_windows=N_WINDOWS)
    assert usage.query.shape == (6, heads, N_PAIRS) and usage.key.shape == (6, kv_heads, N_PAIRS)
    for norms, chosen in ((usage.query, q_pairs), (usage.key, k_pairs)):
        nonzero = {i for i in range(N_PAIRS) if bool((norms[..., i] > 0).any())}
        assert nonzero == chosen
        assert bool((norms[..., sorted(chosen)] > 1e-4).all())  # every head, every layer
    assert set(torch.nonzero(usage.model_share("key") > 0).flatten().tolist()) == k_pairs
    assert {t["pair"] for t in usage.top_pairs(3, "key")} == k_pairs


def _reference_norms(model, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain recomputation: hidden state -> input norm -> q/k projection -> per-head norm -> pair norms."""
    arch = hf_prope.registry.get_architecture(model.config.model_type)
    heads, kv_heads = _heads_of(model)
    qs, ks = [], []
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states
        for i, layer in enumerate(model.model.layers):
            x = layer.input_layernorm(hidden[i])
            att = layer.self_attn
            out = []
            for proj, norm_name, n in ((att.q_proj, arch.query_norm, heads), (att.k_proj, arch.key_norm, kv_heads)):
                v = proj(x).view(*x.shape[:2], n, HEAD_DIM)
                if norm_name:
                    v = getattr(att, norm_name)(v)
                pair = torch.sqrt(v[..., :N_PAIRS] ** 2 + v[..., N_PAIRS:] ** 2)
                out.append(pair.mean(dim=(0, 1)))
            qs.append(out[0])
            ks.append(out[1])
    return torch.stack(qs), torch.stack(ks)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_norms_equal_a_plain_recomputation(model_type) -> None:
    model = tiny_model(model_type)
    tok = char_tokenizer()
    usage = analysis.frequency_usage(model, tok, TEXT, window=WINDOW, n_windows=N_WINDOWS)
    ids = analysis.token_windows(tok, TEXT, window=WINDOW, n_windows=N_WINDOWS)
    q, k = _reference_norms(model, ids)
    torch.testing.assert_close(usage.query, q, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(usage.key, k, rtol=1e-5, atol=1e-7)
    assert usage.tokens == WINDOW * N_WINDOWS
    share = usage.layer_share("query")
    torch.testing.assert_close(share.sum(dim=-1), torch.ones(6))
    expected = q.mean(dim=1) / q.mean(dim=1).sum(dim=-1, keepdim=True)
    torch.testing.assert_close(share, expected)


def test_patched_and_peft_models() -> None:
    from peft import LoraConfig, get_peft_model

    tok = char_tokenizer()
    model = tiny_model("llama")
    before = analysis.frequency_usage(model, tok, TEXT, window=WINDOW, n_windows=N_WINDOWS)
    hf_prope.patch_model(model, "p-rope", p=0.5, layers=[2])
    after = analysis.frequency_usage(model, tok, TEXT, window=WINDOW, n_windows=N_WINDOWS)
    # Rotation comes after the measured point: layers up to the patched one read the same queries.
    torch.testing.assert_close(after.query[:3], before.query[:3])
    assert torch.equal(after.frequencies[2, N_PAIRS // 2 :], torch.zeros(N_PAIRS // 2))
    assert torch.equal(after.frequencies[[0, 1, 3]], before.frequencies[[0, 1, 3]])
    assert torch.equal(after.original_frequencies, before.original_frequencies)
    assert after.patch == PatchSpec("p-rope", p=0.5, layers=(2,)).to_dict()
    hf_prope.unpatch_model(model)

    torch.manual_seed(3)
    peft_model = get_peft_model(
        copy.deepcopy(model), LoraConfig(r=4, target_modules=["q_proj", "k_proj"], init_lora_weights=False)
    )
    wrapped = analysis.frequency_usage(peft_model, tok, TEXT, window=WINDOW, n_windows=N_WINDOWS)
    merged = analysis.frequency_usage(peft_model.merge_and_unload(), tok, TEXT, window=WINDOW, n_windows=N_WINDOWS)
    torch.testing.assert_close(wrapped.query, merged.query, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(wrapped.query, before.query, rtol=1e-3)  # the adapter is really measured


def _rotate(vec: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """Rotate each pair (channel i, channel i + d/2) of a head vector by ``angle[i]``."""
    x1, x2 = vec[:N_PAIRS], vec[N_PAIRS:]
    return torch.cat([x1 * torch.cos(angle) - x2 * torch.sin(angle), x2 * torch.cos(angle) + x1 * torch.sin(angle)])


def _positional_model(model_type: str = "llama"):
    """The paper's constructions: constant queries/keys on the highest frequencies.

    Queries and keys come from the projection biases only, so each logit depends on the
    distance alone: k = q makes a diagonal head (peak at distance 0); k = q rotated by one
    token's angle makes a previous-token head (peak at distance 1). Every other head has
    zero queries and keys and attends uniformly.
    """
    extra = {"attention_bias": True} if model_type == "llama" else {}
    model = tiny_model(model_type, **extra)
    heads, kv_heads = _heads_of(model)
    group = heads // kv_heads
    freq = model.model.rotary_emb.inv_freq.float()
    q = torch.zeros(HEAD_DIM)
    q[:2] = 40.0  # the highest quarter of the pairs; large, because distance 19 nearly matches distance 0
    plan = {(1, 0): q.clone(), (3, 2): _rotate(q, freq)}  # (layer, query head) -> key vector
    for index, layer in enumerate(model.model.layers):
        att = layer.self_attn
        with torch.no_grad():
            for proj in (att.q_proj, att.k_proj):
                proj.weight.zero_()
                proj.bias.zero_()
            for (target, head), key in plan.items():
                if index == target:
                    att.q_proj.bias[head * HEAD_DIM : (head + 1) * HEAD_DIM] = q
                    kv = head // group
                    att.k_proj.bias[kv * HEAD_DIM : (kv + 1) * HEAD_DIM] = key
    return model


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_constructed_positional_heads_are_found_and_only_they(model_type) -> None:
    model = _positional_model(model_type)
    impl = model.config._attn_implementation
    found = analysis.positional_heads(model, char_tokenizer(), TEXT, window=WINDOW, n_windows=N_WINDOWS)
    listed = {(h["layer"], h["head"], h["kind"]) for h in found.heads}
    # Qwen2's tiny config slides its window on even layers; the constructed heads sit on odd ones.
    assert listed == {(1, 0, "diagonal"), (3, 2, "previous-token")}
    assert found.diagonal[1, 0] > 0.99 and found.previous[3, 2] > 0.99
    # Every other head spreads its attention evenly: 1/(t+1) on each position on average.
    uniform = sum(1 / (t + 1) for t in range(1, WINDOW)) / (WINDOW - 1)
    others = torch.ones_like(found.diagonal, dtype=torch.bool)
    others[1, 0] = others[3, 2] = False
    if model_type == "llama":
        torch.testing.assert_close(
            found.diagonal[others], torch.full((int(others.sum()),), uniform), rtol=1e-4, atol=1e-6
        )
    assert float(found.diagonal[others].max()) < 0.5 and float(found.previous[others].max()) < 0.5
    # The paper's intervention: without the highest frequencies these heads lose their position
    # (here every logit becomes equal: exactly uniform attention).
    if model_type == "llama":
        torch.testing.assert_close(found.diagonal_after[1, 0], torch.tensor(uniform), rtol=1e-4, atol=1e-6)
    assert {h["share_after"] < 0.1 for h in found.heads} == {True}
    # The model is given back as it was: no patch, its own attention implementation.
    assert hf_prope.get_patch(model) is None and model.config._attn_implementation == impl


def test_intervention_keeps_the_models_own_patch() -> None:
    model = _positional_model()
    hf_prope.patch_model(model, "p-rope", p=0.5)
    found = analysis.positional_heads(model, char_tokenizer(), TEXT, window=WINDOW, n_windows=N_WINDOWS)
    assert hf_prope.get_patch(model) == PatchSpec("p-rope", p=0.5)
    # p=0.5 keeps the highest pairs, which the constructed heads use.
    assert {(h["layer"], h["head"]) for h in found.heads} == {(1, 0), (3, 2)}
    as_dict = analysis.positional_heads(
        model,
        char_tokenizer(),
        TEXT,
        window=WINDOW,
        n_windows=N_WINDOWS,
        intervention=analysis.DEFAULT_INTERVENTION.to_dict(),
    )
    assert torch.equal(as_dict.diagonal_after, found.diagonal_after)
    skipped = analysis.positional_heads(
        model, char_tokenizer(), TEXT, window=WINDOW, n_windows=N_WINDOWS, intervention=None
    )
    assert skipped.diagonal_after is None and skipped.intervention is None


def test_drift_closed_forms() -> None:
    context = 10
    values = analysis.drift(torch.tensor([0.0, math.pi, 2 * math.pi]), context)
    # g = pi: |e^{i d pi} - 1| is 2 for odd d, 0 for even d; g = 2 pi never moves.
    torch.testing.assert_close(values, torch.tensor([0.0, 2 * 5 / context, 0.0]), atol=1e-6, rtol=0)
    small = analysis.drift(torch.tensor([1e-4]), 100)
    torch.testing.assert_close(small, torch.tensor([1e-4 * 99 / 2]), rtol=1e-3, atol=0)  # ~ g * mean distance


def _usage_with(query: torch.Tensor, key: torch.Tensor, freqs: torch.Tensor, spans=None, layer_types=None):
    n_layers = query.shape[0]
    return analysis.FrequencyUsage(
        model_type="llama",
        layers=list(range(n_layers)),
        layer_types=layer_types,
        query=query,
        key=key,
        frequencies=freqs,
        original_frequencies=freqs,
        attention_span=spans or [None] * n_layers,
        tokens=100,
        window=512,
    )


def test_suggestion_follows_the_measurements() -> None:
    freqs = (10_000.0 ** (-torch.arange(N_PAIRS) * 2 / HEAD_DIM)).repeat(2, 1)
    # All the norm in the two highest pairs: every lower pair can stop for free.
    norm = torch.zeros(2, 4, N_PAIRS)
    norm[..., :2] = 1.0
    s = analysis.suggest_p(_usage_with(norm, norm[:, :2], freqs))
    assert (s.p, s.rotated_pairs) == (0.25, 2)
    assert s.spec == PatchSpec("p-rope", p=0.25)
    scores = {c["p"]: c["score"] for c in s.candidates}
    assert scores[0.25] == 0 and scores[0.125] > s.tolerance
    # The same norm spread evenly: cuts now cost; the score is the drift-weighted share, by hand.
    even = torch.ones(2, 4, N_PAIRS)
    s = analysis.suggest_p(_usage_with(even, even[:, :2], freqs), context_length=64, tolerance=0.05)
    moved = analysis.drift(freqs[0], 64)
    for c in s.candidates:
        torch.testing.assert_close(torch.tensor(c["score"]), moved[c["rotated_pairs"] :].sum() / N_PAIRS)
    expected = min(c["p"] for c in s.candidates if float(moved[c["rotated_pairs"] :].sum() / N_PAIRS) <= 0.05)
    assert s.p == expected and 0 < s.p < 1
    assert s.neighbours()[0] < s.p < s.neighbours()[1]
    # A sliding window shortens the distances a layer sees, so the same cut costs less there.
    slid = analysis.suggest_p(_usage_with(even, even[:, :2], freqs, spans=[8, 8]), context_length=64, tolerance=0.05)
    assert slid.p <= s.p and slid.candidates[3]["score"] < s.candidates[3]["score"]


def test_suggestion_per_layer_type() -> None:
    freqs = (10_000.0 ** (-torch.arange(N_PAIRS) * 2 / HEAD_DIM)).repeat(2, 1)
    norm = torch.ones(2, 4, N_PAIRS)
    norm[1, :, 2:] = 0  # the full-attention layer uses only its two highest pairs
    usage = _usage_with(norm, norm[:, :2], freqs, layer_types=["sliding_attention", "full_attention"])
    full = analysis.suggest_p(usage, layer_types=["full_attention"])
    assert full.p == 0.25 and full.spec == PatchSpec("p-rope", p=0.25, layer_types=("full_attention",))
    assert analysis.suggest_p(usage).p > 0.25
    with pytest.raises(ValueError, match="Unknown layer type 'global'"):
        analysis.suggest_p(usage, layer_types=["global"])


def test_check_suggestion_matches_zero_shot_table() -> None:
    model = tiny_model("llama")
    tok = char_tokenizer()
    usage = analysis.frequency_usage(model, tok, TEXT, window=WINDOW, n_windows=N_WINDOWS)
    s = analysis.suggest_p(usage, tolerance=0.05)
    rows = analysis.check_suggestion(model, tok, TEXT, s, n_windows=N_WINDOWS)
    ps = [r["p"] for r in rows]
    assert ps == sorted({p for p in (*s.neighbours(), s.p, 1.0) if p is not None})
    assert [r["p"] for r in rows if r["suggested"]] == [s.p]
    ids = analysis.token_windows(tok, TEXT, window=s.context_length, n_windows=N_WINDOWS)
    for row in rows:
        if row["p"] < 1:
            hf_prope.patch_model(model, "p-rope", p=row["p"])
        with torch.no_grad():
            loss = model(ids, labels=ids).loss  # transformers' own mean loss over every predicted token
        hf_prope.unpatch_model(model)
        assert row["perplexity"] == pytest.approx(math.exp(float(loss)), rel=1e-5)
    assert hf_prope.get_patch(model) is None


def test_bad_input_is_refused_clearly() -> None:
    model = tiny_model("llama")
    tok = char_tokenizer()
    for empty in ("", [], ["  ", ""]):
        with pytest.raises(ValueError, match="texts is empty"):
            analysis.frequency_usage(model, tok, empty)
    with pytest.raises(ValueError, match="has 10 tokens but 3 windows of 48 tokens need 144"):
        analysis.frequency_usage(model, tok, "0123456789", window=48, n_windows=3)
    with pytest.raises(ValueError, match=r"layers \[6\] out of range: this model has 6 decoder layers"):
        analysis.frequency_usage(model, tok, TEXT, layers=[0, 6])
    with pytest.raises(ValueError, match=r"layers \[-1\] out of range"):
        analysis.positional_heads(model, tok, TEXT, layers=[-1])
    with pytest.raises(TypeError, match="list of strings"):
        analysis.frequency_usage(model, tok, [TEXT, 3])
    with pytest.raises(ValueError, match="threshold must be between 0 and 1"):
        analysis.positional_heads(model, tok, TEXT, threshold=50)
    usage = analysis.frequency_usage(model, tok, TEXT, window=WINDOW, n_windows=N_WINDOWS, layers=[1, 2])
    with pytest.raises(ValueError, match=r"Layer 4 was not measured: this report holds layers 1..2"):
        usage.head_share(4)
    with pytest.raises(ValueError, match="no layer types"):
        analysis.suggest_p(usage, layer_types=["full_attention"])
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=128))
    with pytest.raises(hf_prope.NoRotaryEmbeddingError, match="no rotary position embeddings"):
        analysis.frequency_usage(gpt2, tok, TEXT)


def test_analyze_command_writes_a_readable_report(tmp_path, capsys) -> None:
    model_dir = save_tiny(tmp_path / "tiny-gemma3", "gemma3_text")
    data = tmp_path / "text.txt"
    data.write_text(TEXT * 3)
    out = tmp_path / "report"
    code = main(
        [
            "analyze",
            str(model_dir),
            "--out",
            str(out),
            f"dataset={data}",
            "window=48",
            "n_windows=3",
            "grid=[0,0.25,0.5,0.75,1]",
        ]
    )
    assert code == 0
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(
        [
            "report.json",
            "summary.md",
            "frequency_usage.png",
            "frequency_usage_layer3.png",
            "positional_heads.png",
            "perplexity_vs_p.png",
        ]
    )
    report = json.loads((out / "report.json").read_text())
    assert [s["layer_types"] for s in report["suggestions"]] == [None, ["full_attention"], ["sliding_attention"]]
    usage = analysis.FrequencyUsage.from_dict(report["usage"])
    assert usage.query.shape == (6, 4, N_PAIRS) and usage.key.shape == (6, 2, N_PAIRS)
    for curve, suggestion in zip(report["perplexity_by_p"], report["suggestions"]):
        assert [r["p"] for r in curve["rows"]] == sorted({0, 0.25, 0.5, 0.75, 1, suggestion["p"]})
        assert sum(r["suggested"] for r in suggestion["check"]) == 1
    import matplotlib.image

    for name in files:
        if name.endswith(".png"):
            image = matplotlib.image.imread(out / name)
            assert image.shape[0] > 300 and image.shape[1] > 500
    summary = (out / "summary.md").read_text()
    assert "## Suggested p" in summary and "![frequency usage](frequency_usage.png)" in summary
    assert "## Suggested p" in capsys.readouterr().out
    # A report redraws from its JSON alone, to the same summary.
    from hf_prope.recipes.analyze import write_report

    redrawn = tmp_path / "redrawn"
    redrawn.mkdir()
    write_report(redrawn, json.loads((out / "report.json").read_text()))
    assert (redrawn / "summary.md").read_text() == summary
    assert sorted(p.name for p in redrawn.iterdir()) == files


def test_analyze_command_writes_a_per_head_mask_the_patch_takes(tmp_path) -> None:
    model_dir = save_tiny(tmp_path / "tiny-llama", "llama")
    data = tmp_path / "text.txt"
    data.write_text(TEXT * 3)
    out = tmp_path / "report"
    args = ["analyze", str(model_dir), "--out", str(out), f"dataset={data}", "window=48", "n_windows=3"]
    assert main([*args, "check=false", "head_mask_p=0.25", "layer=2"]) == 0
    report = json.loads((out / "report.json").read_text())
    usage = analysis.FrequencyUsage.from_dict(report["usage"])
    spec = hf_prope.PatchSpec.load(out / "head_mask.json")
    assert spec == analysis.head_mask(usage, p=0.25) and spec.select == "2-norm"  # the rule, on the report's own norms
    assert "## Per-head mask" in (out / "summary.md").read_text()
    model = hf_prope.patch_model(AutoModelForCausalLM.from_pretrained(model_dir), str(out / "head_mask.json"))
    assert hf_prope.get_patch(model) == spec
    assert main([*args, "check=false", "head_mask_p=1.5"]) != 0
    # the other rule, limited to pairs that turn within 100 tokens (the tiny model's pairs 0..2), on the same norms
    again = tmp_path / "report-turns"
    limited = [*args[:3], str(again), *args[4:], "check=false", "head_mask_p=0.25", "head_mask_select=2-norm-drift"]
    assert main([*limited, "head_mask_max_wavelength=100", "context_length=48"]) == 0
    turns = hf_prope.PatchSpec.load(again / "head_mask.json")
    usage = analysis.FrequencyUsage.from_dict(json.loads((again / "report.json").read_text())["usage"])
    expected = analysis.head_mask(usage, p=0.25, select="2-norm-drift", context_length=48, max_wavelength=100)
    assert turns == expected and max(i for heads in turns.head_keep for k in heads for i in k) <= 2
    assert main([*args, "check=false", "head_mask_max_wavelength=100"]) != 0  # no head_mask_p: refused


def test_analyze_command_refuses_bad_input_before_writing(tmp_path, capsys) -> None:
    model_dir = save_tiny(tmp_path / "tiny", "llama")
    data = tmp_path / "text.txt"
    data.write_text(TEXT)
    out = tmp_path / "report"
    cases = [
        (["layer=9"], "layer 9 out of range: this model has 6 decoder layers"),
        (["window=4096"], "tokens but 8 windows of 4096 tokens need"),
        (["thresold=0.3"], "threshold"),
        (["threshold=3"], "threshold must be between 0 and 1"),
    ]
    for extra, message in cases:
        code = main(["analyze", str(model_dir), "--out", str(out), f"dataset={data}", *extra])
        err = capsys.readouterr().err
        assert code == 2 and message in err, err
        assert not out.exists() or not any(out.iterdir())
    code = main(["analyze", str(model_dir), "--out", str(out), f"dataset={tmp_path / 'missing.txt'}"])
    assert code == 2 and "does not exist" in capsys.readouterr().err
    gpt2 = tmp_path / "gpt2"
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=128).save_pretrained(gpt2)
    code = main(["analyze", str(gpt2), "--out", str(out), f"dataset={data}"])
    assert code == 2 and "not supported by hf-prope" in capsys.readouterr().err
    assert main(["analyze"]) == 2
