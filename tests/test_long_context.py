"""Long context: context extensions under p-RoPE, chunked long-window scoring, passkey retrieval.

Oracles: transformers' own models built with the native rope type (YaRN, dynamic, linear), the
pair-by-pair rotation written out here from YaRN's definition, transformers' own loss, and
``model.generate`` for the greedy passkey answer.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from tiny import HEAD_DIM, bpe_tokenizer, clone_with_config, logits, tiny_config, tiny_model, tokens
from transformers import AutoModelForCausalLM

import hf_prope
from hf_prope.context_extension import ContextExtension, extend_context, get_context_extension, yarn_temperature
from hf_prope.data import document_windows, long_documents
from hf_prope.evaluation import window_nll, windows_perplexity
from hf_prope.passkey import passkey_accuracy, passkey_correct, passkey_key, passkey_prompt

LENGTH = 256  # the tiny models' max_position_embeddings: their training length here
LONG = 3 * LENGTH


def native(model_type: str, model, rope_parameters: dict) -> torch.nn.Module:
    """The same weights in a model transformers builds itself with ``rope_parameters``."""
    cfg = tiny_config(model_type, rope_parameters=rope_parameters, initializer_range=0.2)
    return clone_with_config(model, cfg)


@pytest.mark.parametrize(
    "text, rope",
    [
        ("yarn:2", {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": LENGTH}),
        ("dynamic:4", {"rope_type": "dynamic", "factor": 4.0}),
        ("linear:2", {"rope_type": "linear", "factor": 2.0}),
    ],
)
def test_extension_equals_transformers_native_rope_type(text, rope) -> None:
    model = tiny_model("llama", initializer_range=0.2)
    ids = tokens(batch=1, length=LONG)
    extend_context(model, text)
    reference = native("llama", model, {"rope_theta": 10_000.0, **rope})
    assert torch.equal(logits(model, ids), logits(reference, ids))
    assert get_context_extension(model) == ContextExtension.parse(text)


def yarn_frequencies(d: int, theta: float, factor: float, length: int) -> torch.Tensor:
    """YaRN's NTK-by-parts frequencies (beta_fast 32, beta_slow 1, the ramp's bounds rounded outwards as in the
    YaRN authors' code), float64."""
    i = torch.arange(d // 2, dtype=torch.float64)
    freq = theta ** (-2 * i / d)
    rotations = length * freq / (2 * math.pi)  # turns pair i makes over the training length
    # ramp: 1 = keep (extrapolate, >= 32 turns), 0 = interpolate (<= 1 turn), linear in i between the bounds
    low = max(math.floor(d * math.log(length / (32 * 2 * math.pi)) / (2 * math.log(theta))), 0)
    high = min(math.ceil(d * math.log(length / (1 * 2 * math.pi)) / (2 * math.log(theta))), d - 1)
    keep = 1 - torch.clamp((i - low) / (high - low), 0, 1)
    assert keep[rotations >= 32].eq(1).all() and keep[rotations <= 1].eq(0).all()
    return freq / factor * (1 - keep) + freq * keep


def test_p_rope_on_yarn_matches_the_pair_by_pair_definition() -> None:
    """Kept pairs rotate by YaRN's frequencies, stopped pairs pass through; q and k both carry the temperature."""
    from test_reference import CAPTURED, _pre_rotation

    model = tiny_model("llama", attn="hfp_capture")
    extend_context(model, "yarn:4")
    hf_prope.patch_model(model, "p-rope", p=0.5)
    ids = tokens(batch=1, length=40)
    pre = _pre_rotation(model, ids)
    CAPTURED.clear()
    with torch.no_grad():
        model(ids)
    d, n = HEAD_DIM, HEAD_DIM // 2
    freq = yarn_frequencies(d, 10_000.0, 4.0, LENGTH)
    t = 0.1 * math.log(4.0) + 1
    positions = torch.arange(40, dtype=torch.float64)
    for layer in range(model.config.num_hidden_layers):
        for which, seen in zip(("q", "k"), CAPTURED[layer]):
            x = pre[(layer, which)].double()
            want = x.clone()
            for i in range(n // 2):  # p=0.5: the 4 highest of 8 pairs rotate
                c, s = torch.cos(positions * freq[i]), torch.sin(positions * freq[i])
                want[..., i] = x[..., i] * c - x[..., i + n] * s
                want[..., i + n] = x[..., i] * s + x[..., i + n] * c
            torch.testing.assert_close(seen.double(), t * want, atol=3e-5, rtol=1e-5)


@pytest.mark.parametrize("model_type", ["llama", "qwen3", "gemma3_text"])
def test_extension_and_patch_compose_in_either_order_and_come_off(model_type) -> None:
    ids = tokens(batch=1, length=LONG)
    one = tiny_model(model_type, initializer_range=0.2)
    original = logits(one, ids)
    two = tiny_model(model_type, initializer_range=0.2)
    extend_context(one, "yarn:2")
    extended = logits(one, ids)
    assert not torch.allclose(extended, original)
    hf_prope.patch_model(one, "p-rope", p=0.5)
    hf_prope.patch_model(two, "p-rope", p=0.5)
    extend_context(two, "yarn:2")
    assert torch.equal(logits(one, ids), logits(two, ids))
    assert hf_prope.get_patch(one) == hf_prope.get_patch(two)
    hf_prope.unpatch_model(one)  # the patch comes off, the extension stays
    assert torch.equal(logits(one, ids), extended)
    extend_context(one, None)
    assert torch.equal(logits(one, ids), original)
    extend_context(two, "none")
    hf_prope.unpatch_model(two)
    assert torch.equal(logits(two, ids), original)


def test_temperature_alone_keeps_the_frequencies_and_scales_q_and_k() -> None:
    model = tiny_model("llama")
    before = model.model.rotary_emb.inv_freq.clone()
    extend_context(model, "temperature:4")
    torch.testing.assert_close(model.model.rotary_emb.inv_freq, before, rtol=1e-6, atol=0)
    assert model.model.rotary_emb.attention_scaling == pytest.approx(0.1 * math.log(4) + 1)
    ext = ContextExtension.parse({"method": "temperature", "factor": 1.0, "attention_factor": 1.3})
    extend_context(model, ext)
    assert model.model.rotary_emb.attention_scaling == pytest.approx(1.3)
    assert ext.label == "temperature 1.3" and yarn_temperature(1.0) == 1.0


def test_per_layer_type_extension_on_gemma3_only_touches_the_chosen_layers() -> None:
    model = tiny_model("gemma3_text")
    sliding = model.model.rotary_emb.sliding_attention_inv_freq.clone()
    extend_context(model, {"method": "linear", "factor": 4, "layer_types": ["full_attention"]})
    rope = model.config.rope_parameters
    assert rope["sliding_attention"]["rope_type"] == "default" and rope["full_attention"]["rope_type"] == "linear"
    assert torch.equal(model.model.rotary_emb.sliding_attention_inv_freq, sliding)
    with pytest.raises(ValueError, match="no rope entry"):
        extend_context(model, {"method": "linear", "factor": 4, "layer_types": ["global"]})


def test_extended_models_save_and_load(tmp_path) -> None:
    ids = tokens(batch=1, length=LONG)
    model = tiny_model("llama", initializer_range=0.2)
    extend_context(model, "yarn:2")
    model.save_pretrained(tmp_path / "yarn")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "yarn")  # transformers' own yarn: no hf-prope needed
    assert torch.equal(logits(plain, ids), logits(model, ids))
    hf_prope.patch_model(model, "p-rope", p=0.5)
    hf_prope.save_pretrained(model, tmp_path / "both")
    loaded = hf_prope.from_pretrained(tmp_path / "both")
    assert torch.equal(logits(loaded, ids), logits(model, ids))
    assert get_context_extension(loaded) == ContextExtension("yarn", 2.0)
    extend_context(loaded, None)  # the record came back with the config: the original is recoverable
    hf_prope.unpatch_model(loaded)
    assert torch.equal(logits(loaded, ids), logits(tiny_model("llama", initializer_range=0.2), ids))


@pytest.mark.parametrize(
    "given, message",
    [
        ("yarn", "method:factor"),
        ("yarn:x", "method:factor"),
        ("yarm:2", "Unknown context extension"),
        ("yarn:0.5", ">= 1"),
        ({"method": "linear", "factor": 2, "attention_factor": 1.1}, "applies to yarn and temperature"),
        ({"method": "yarn"}, "needs method and factor"),
        ({"method": "yarn", "factor": 2, "scale": 1}, "Unknown context-extension keys"),
    ],
)
def test_extension_bad_input(given, message) -> None:
    with pytest.raises(ValueError, match=message):
        ContextExtension.parse(given)


def test_extension_refuses_an_already_scaled_model_before_changing_it() -> None:
    cfg = tiny_config("llama", rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10_000.0})
    model = AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(ValueError, match="already scaled"):
        extend_context(model, "yarn:2")
    assert model.config.rope_parameters["rope_type"] == "linear"


# ------------------------------------------------------------------------------------------------
# long windows


@pytest.mark.parametrize("model_type", ["llama", "gemma2"])  # gemma2: the output layer soft-caps
def test_chunked_window_scoring_equals_the_whole_logits(model_type) -> None:
    model = tiny_model(model_type, initializer_range=0.2)
    ids = tokens(batch=2, length=LONG)
    with torch.no_grad():
        reference = model(input_ids=ids, labels=ids).loss * ids[:, 1:].numel()  # transformers' own loss
        whole = window_nll(model, ids)
        for chunk in (1, 100, LONG):
            assert float(window_nll(model, ids, logits_chunk=chunk)) == pytest.approx(float(whole), rel=1e-6)
    assert float(whole) == pytest.approx(float(reference), rel=1e-5)
    with pytest.raises(ValueError, match="logits_chunk"):
        window_nll(model, ids, logits_chunk=0)


def test_document_windows_never_span_two_documents() -> None:
    docs = [torch.arange(0, 10), torch.arange(40, 65), torch.arange(80, 83)]  # document k's ids start at 40 k
    windows = document_windows(docs, 5)
    assert windows.tolist()[:2] == [list(range(5)), list(range(5, 10))]
    assert windows.shape == (7, 5) and all(len({int(w[0]) // 40, int(w[-1]) // 40}) == 1 for w in windows)
    assert [len(d) for d in long_documents(docs, 10)] == [10, 10]
    assert long_documents(docs, 10, max_documents=1)[0].tolist() == list(range(10))
    with pytest.raises(ValueError, match="longest has 25"):
        long_documents(docs, 30)
    with pytest.raises(ValueError, match="longest has 25"):
        document_windows(docs, 26)
    model = tiny_model("llama")
    with torch.no_grad():
        whole = math.exp(float(window_nll(model, windows)) / windows[:, 1:].numel())
    assert windows_perplexity(model, windows) == pytest.approx(whole, rel=1e-6)


# ------------------------------------------------------------------------------------------------
# passkey


@pytest.fixture(scope="module")
def tokenizer():
    return bpe_tokenizer()


def test_passkey_prompt_is_exact_length_with_the_key_at_its_depth(tokenizer) -> None:
    """Checked on the decoded text, independently of how the prompt was assembled."""
    for length in (200, 333):
        starts = []
        for depth in (0.0, 0.5, 1.0):
            prompt = passkey_prompt(tokenizer, length, depth, seed=3)
            assert prompt.input_ids.numel() == length
            text = tokenizer.decode(prompt.input_ids)
            assert text.count(prompt.key) == 2 and text.rstrip().endswith("The pass key is")
            assert tokenizer.decode(prompt.answer_ids).strip() == prompt.key
            assert len(prompt.key) == 5 and prompt.key[0] != "0"
            # The key sentence starts where the prompt says, and sits at its depth of the filler.
            assert tokenizer.decode(prompt.input_ids[prompt.key_start :]).lstrip().startswith("The pass key is")
            starts.append(prompt.key_start)
        assert starts[0] < starts[1] < starts[2]
        filler = length - (passkey_prompt(tokenizer, length, 1.0, seed=3).input_ids.numel() - starts[2]) - starts[0]
        assert abs(starts[1] - starts[0] - filler / 2) <= 1 or filler <= 0
    assert passkey_prompt(tokenizer, 300, 0.5, seed=1).key == passkey_prompt(tokenizer, 300, 0.5, seed=1).key
    keys = {passkey_key(0, 300, 0.5, t) for t in range(20)}
    assert len(keys) == 20  # different trials, different keys
    with pytest.raises(ValueError, match="at least"):
        passkey_prompt(tokenizer, 20, 0.5)
    with pytest.raises(ValueError, match="depth"):
        passkey_prompt(tokenizer, 300, 1.5)


class Copier(torch.nn.Module):
    """A causal LM that knows one prompt's answer: after its ``prompt_len`` tokens it predicts the answer.

    The logits at position t predict token t + 1 (the causal-LM convention, independent of the
    scorer): position ``prompt_len - 1 + k`` puts all mass on answer token k. ``wrong`` misses the last.
    """

    def __init__(self, prompt_len: int, answer: torch.Tensor, vocab: int, wrong: bool = False) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.prompt_len, self.answer, self.vocab = prompt_len, answer.tolist(), vocab
        if wrong:
            self.answer[-1] = (self.answer[-1] + 1) % vocab

    def forward(self, input_ids, logits_to_keep=0, **kwargs):
        from types import SimpleNamespace

        out = torch.zeros(1, input_ids.shape[1], self.vocab)
        for k, token in enumerate(self.answer):
            if self.prompt_len - 1 + k < input_ids.shape[1]:
                out[0, self.prompt_len - 1 + k, token] = 1.0
        return SimpleNamespace(logits=out[:, -logits_to_keep:] if logits_to_keep else out)


def test_passkey_scorer_equals_greedy_generation(tokenizer) -> None:
    """On a real tiny model, the one-pass check agrees with model.generate's greedy answer, prompt by prompt."""
    model = tiny_model("llama", vocab_size=len(tokenizer), initializer_range=0.5)
    for trial in range(6):
        prompt = passkey_prompt(tokenizer, 240, trial / 5, seed=0, trial=trial)
        out = model.generate(
            prompt.input_ids[None], max_new_tokens=prompt.answer_ids.numel(), do_sample=False, pad_token_id=0
        )
        generated = out[0, prompt.input_ids.numel() :]
        assert passkey_correct(model, prompt) == torch.equal(generated, prompt.answer_ids)
    # Force the model to answer one prompt: its LM head writes the answer; the check must see it.
    prompt = passkey_prompt(tokenizer, 240, 0.5, seed=0)
    vocab = len(tokenizer)
    assert passkey_correct(Copier(240, prompt.answer_ids, vocab), prompt)
    assert not passkey_correct(Copier(240, prompt.answer_ids, vocab, wrong=True), prompt)
    assert not passkey_correct(Copier(239, prompt.answer_ids, vocab), prompt)  # one position off: caught


def test_passkey_accuracy_table(tokenizer) -> None:
    """Against a model that answers exactly the prompts of one length: the table puts the hits in their cells."""
    lengths, depths = [240, 300], [0.0, 1.0]
    knows = {passkey_prompt(tokenizer, 300, d, seed=0, trial=t).key: (300, d, t) for d in depths for t in range(2)}

    class Knower(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids, logits_to_keep=0, **kwargs):
            text = tokenizer.decode(input_ids[0])
            key = text.split("The pass key is ")[1].split(".")[0]
            if key not in knows:
                return Copier(1, torch.tensor([0]), len(tokenizer)).forward(input_ids, logits_to_keep)
            length, depth, trial = knows[key]
            prompt = passkey_prompt(tokenizer, length, depth, seed=0, trial=trial)
            return Copier(length, prompt.answer_ids, len(tokenizer)).forward(input_ids, logits_to_keep)

    table = passkey_accuracy(Knower(), tokenizer, lengths=lengths, depths=depths, trials=2)
    assert table["accuracy"] == [[0.0, 0.0], [1.0, 1.0]]
    assert table["lengths"] == lengths and table["depths"] == depths and table["trials"] == 2 and table["seed"] == 0
    json.dumps(table)
    with pytest.raises(ValueError, match="trials"):
        passkey_accuracy(Knower(), tokenizer, lengths=[240], trials=0)


def test_long_window_attention_gets_no_materialised_mask() -> None:
    """sdpa gets no mask for an unpadded window (it runs causal, never holding the seq x seq scores)."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    masks = []

    def record(module, query, key, value, attention_mask, **kwargs):
        masks.append(attention_mask)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("hfp_record_mask", record)
    model = tiny_model("llama", attn="hfp_record_mask")
    with torch.no_grad():
        window_nll(model, tokens(batch=1, length=LONG), logits_chunk=64)
    assert len(masks) == model.config.num_hidden_layers and all(m is None for m in masks)
