"""Self-distillation: the teacher is the unpatched base, and the chunked loss is the plain KL.

Oracles: an independently built unpatched model (the teacher's logits), an independently
built patched model (the student's), and the KL written out by hand with ``torch.kl_div``'s
definition over the whole vocabulary at once.
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tiny import MODEL_TYPES, logits, tiny_model, tokens

import hf_prope
from hf_prope.distillation import distillation_loss, output_layer, teacher_hidden_states
from hf_prope.patching import original_rope


def _peft(model):
    torch.manual_seed(3)
    peft = get_peft_model(
        model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    return peft


@pytest.mark.parametrize("model_type", MODEL_TYPES)
@pytest.mark.parametrize("patch", [{"p": 0.25}, {"p": 0.5, "layers": [1, 4]}])
def test_teacher_is_the_unpatched_base_and_the_student_is_untouched(model_type, patch) -> None:
    base = tiny_model(model_type)  # the oracle teacher: never patched, no adapter
    student = _peft(hf_prope.patch_model(copy.deepcopy(base), "p-rope", **patch))
    ids = tokens()
    student_before = logits(student, ids)
    teacher = output_layer(student)(teacher_hidden_states(student, ids))
    torch.testing.assert_close(teacher, logits(base, ids), rtol=1e-5, atol=1e-5)
    # The student (patch and adapter) is exactly as before, and differs from the teacher.
    assert torch.equal(logits(student, ids), student_before)
    assert not torch.allclose(student_before, teacher, atol=1e-3)
    assert hf_prope.get_patch(student) is not None


def test_original_rope_restores_the_patch_even_on_error() -> None:
    model = hf_prope.patch_model(tiny_model("gemma3_text"), "p-rope", p=0.25, layer_types=["full_attention"])
    ids = tokens()
    before = logits(model, ids)
    with pytest.raises(RuntimeError, match="boom"):
        with original_rope(model):
            raise RuntimeError("boom")
    assert torch.equal(logits(model, ids), before)
    plain = tiny_model("gemma3_text")
    with original_rope(model):
        torch.testing.assert_close(logits(model, ids), logits(plain, ids), rtol=1e-5, atol=1e-5)


def _hand_kl(student_logits, teacher_logits, temperature):
    s = torch.log_softmax(student_logits[:, :-1].double() / temperature, -1)
    t = torch.log_softmax(teacher_logits[:, :-1].double() / temperature, -1)
    per_token = (t.exp() * (t - s)).sum(-1)
    return per_token.mean() * temperature**2


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_loss_equals_the_kl_written_out_from_two_independent_models(temperature) -> None:
    # Weights larger than the default init, so that the patch moves the predictions a lot.
    base = tiny_model("llama", initializer_range=0.3)
    patched = hf_prope.patch_model(tiny_model("llama", initializer_range=0.3), "p-rope", p=0.25)  # same weights
    ids = tokens(batch=2, length=20)
    want = _hand_kl(logits(patched, ids), logits(base, ids), temperature)
    student = _peft(hf_prope.patch_model(copy.deepcopy(base), "p-rope", p=0.25))
    with torch.no_grad():
        # LoRA B starts random here (init_lora_weights=False); zero it so the student is the patched base.
        for name, param in student.named_parameters():
            if "lora_B" in name:
                param.zero_()
    hidden = teacher_hidden_states(student, ids)
    got, parts = distillation_loss(
        student(input_ids=ids).logits, hidden, output_layer(student), temperature=temperature, chunk_tokens=7
    )
    assert want.item() > 0.1  # the patch changes the predictions: the check can fail
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    assert parts["kl"].item() == pytest.approx(want.item(), rel=1e-5)


def test_chunked_equals_unchunked_in_value_and_gradient() -> None:
    model = _peft(hf_prope.patch_model(tiny_model("qwen3", initializer_range=0.3), "p-rope", p=0.5))
    ids = tokens(batch=2, length=24)
    hidden = teacher_hidden_states(model, ids)
    results = []
    for chunk in (5, 10_000):
        model.zero_grad()
        loss, parts = distillation_loss(
            model(input_ids=ids).logits,
            hidden,
            output_layer(model),
            temperature=1.5,
            labels=ids,
            distill_weight=0.7,
            chunk_tokens=chunk,
        )
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((loss.item(), parts["lm"].item(), grads))
    (l1, lm1, g1), (l2, lm2, g2) = results
    assert l1 == pytest.approx(l2, rel=1e-6) and lm1 == pytest.approx(lm2, rel=1e-6)
    assert g1.keys() == g2.keys() and g1
    for name in g1:
        scale = g2[name].abs().max().item()
        torch.testing.assert_close(g1[name], g2[name], rtol=1e-4, atol=1e-5 * scale)
    # The mixed loss's LM part is the model's own causal-LM loss.
    assert lm1 == pytest.approx(model(input_ids=ids, labels=ids).loss.item(), rel=1e-5)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"temperature": 0.0}, "temperature must be positive"),
        ({"distill_weight": 1.5}, r"distill_weight must be in \[0, 1\]"),
        ({"distill_weight": 0.5}, "needs labels"),
    ],
)
def test_bad_arguments(kwargs, match) -> None:
    x = torch.zeros(1, 3, 5)
    with pytest.raises(ValueError, match=match):
        distillation_loss(x, torch.zeros(1, 3, 2), lambda h: torch.zeros(h.shape[0], 5), **kwargs)


@pytest.mark.parametrize("distill_weight,temperature", [(1.0, 1.0), (0.6, 2.0), (0.0, 1.0)])
def test_gradient_equals_autograd_of_the_loss_written_out(distill_weight, temperature) -> None:
    """The loss computes its gradient in its forward pass: check it against autograd of the plain formula."""
    g = torch.Generator().manual_seed(0)
    student = torch.randn(2, 6, 11, generator=g, requires_grad=True)
    hidden = torch.randn(2, 6, 5, generator=g)
    head = torch.nn.Linear(5, 11)
    labels = torch.randint(0, 11, (2, 6), generator=g)
    loss, _ = distillation_loss(
        student, hidden, head, temperature=temperature, labels=labels, distill_weight=distill_weight, chunk_tokens=4
    )
    loss.backward()
    got = student.grad.clone()
    plain = student.detach().clone().requires_grad_()
    with torch.no_grad():
        t = torch.log_softmax(head(hidden)[:, :-1] / temperature, -1)
    s = torch.log_softmax(plain[:, :-1] / temperature, -1)
    kl = (t.exp() * (t - s)).sum(-1).mean() * temperature**2
    ce = torch.nn.functional.cross_entropy(plain[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1))
    want = distill_weight * kl + (1 - distill_weight) * ce
    want.backward()
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    torch.testing.assert_close(got, plain.grad, rtol=1e-5, atol=1e-7)
    assert torch.equal(got[:, -1], torch.zeros_like(got[:, -1]))  # the last position predicts nothing
