"""Layer-wise attention transfer (hf_prope.transfer) against independent oracles.

Oracles: the attention outputs of an independently built, never patched model (the teacher's
targets); the patched model's own forward pass with each attention module fed the teacher's
input (the student's outputs, every architecture, whole-model and layer-selective patches,
sliding windows, soft-capping, q/k norms, LoRA); the loss written out by hand; a gradient step
that lowers every layer's error.
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tiny import HEAD_KEEP, MODEL_TYPES, clone_with_config, tiny_model, tokens

import hf_prope
from hf_prope.state import model_parts
from hf_prope.transfer import (
    AttentionTargets,
    attention_transfer_loss,
    query_positions,
    student_attention,
    teacher_attention,
)

LENGTH = 24  # longer than the tiny sliding window (8), so windows matter


def _lora(model, *, random_b: bool = True):
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], init_lora_weights=not random_b
    )
    peft_model = get_peft_model(model, config)
    if random_b:
        torch.manual_seed(3)
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_" in name:
                    p.normal_(0, 0.2)
    return peft_model


def _attention_outputs(model, ids, feed: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """Each attention module's output in the model's own forward pass (optionally fed these inputs)."""
    attentions = dict(sorted(model_parts(model).attentions.items()))
    outputs: dict[int, torch.Tensor] = {}
    handles = []
    for n, (i, module) in enumerate(attentions.items()):

        def pre(module, args, kwargs, n=n):
            if feed is None:
                return None
            return args, {**kwargs, "hidden_states": feed[n]}

        def post(module, args, kwargs, output, i=i):
            outputs[i] = output[0]

        handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(module.register_forward_hook(post, with_kwargs=True))
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return [outputs[i] for i in attentions]


SPECS = {
    "p=0.5": ("p-rope", dict(p=0.5)),
    "layers": ("p-rope", dict(p=0.25, layers=[1, 4])),  # layer hooks (PositionMaskHook) rather than new frequencies
    "head-mask": ("head-mask", dict(head_keep=HEAD_KEEP)),  # per-KV-head cos/sin through the same hooks
}


@pytest.mark.parametrize("spec", list(SPECS))
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_targets_are_the_unpatched_models_and_the_student_is_the_patched_models_own_attention(model_type, spec):
    ids = tokens(batch=2, length=LENGTH)
    base = tiny_model(model_type)
    original = clone_with_config(base, base.config)  # never patched: the teacher's oracle
    name, params = SPECS[spec]
    peft_model = _lora(hf_prope.patch_model(base, name, **params))

    targets = teacher_attention(peft_model, ids)
    expected = _attention_outputs(original, ids)
    assert targets.layers == list(range(len(expected)))
    for got, want in zip(targets.outputs, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert hf_prope.get_patch(peft_model) is not None  # the patch is back after the teacher pass

    # The student: the patched PEFT model's own forward, each attention module fed the teacher's input.
    own = _attention_outputs(peft_model, ids, feed=targets.inputs)
    with torch.no_grad():
        full = student_attention(peft_model, targets, query_stride=1)
        strided = student_attention(peft_model, targets, query_stride=3, offset=2)
    for got, sub, want in zip(full, strided, own):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(sub, want[:, 2::3], rtol=1e-4, atol=1e-5)
    # The patch changes what the layers do: the student is not trivially the teacher.
    changed = [float((s - t).abs().max()) for s, t in zip(full, targets.outputs)]
    assert max(changed) > 1e-3


def test_unpatched_adapter_free_student_equals_its_teacher() -> None:
    ids = tokens(batch=1, length=LENGTH)
    peft_model = _lora(hf_prope.patch_model(tiny_model("llama"), "p-rope", p=0.25))
    targets = teacher_attention(peft_model, ids)
    with torch.no_grad(), peft_model.disable_adapter(), hf_prope.patching.original_rope(peft_model):
        outputs = student_attention(peft_model, targets, query_stride=2, offset=1)
        loss, per_layer = attention_transfer_loss(outputs, targets, query_stride=2, offset=1)
    assert float(loss) < 1e-10 and per_layer.shape == (len(targets.layers),)


def test_loss_is_the_hand_computation() -> None:
    g = torch.Generator().manual_seed(0)
    teacher = [torch.randn(2, 10, 8, generator=g) * s for s in (1.0, 5.0)]
    student = [torch.randn(2, 4, 8, generator=g) for _ in teacher]  # positions 0, 3, 6, 9
    targets = AttentionTargets(layers=[0, 1], inputs=teacher, outputs=teacher)
    loss, per_layer = attention_transfer_loss(student, targets, query_stride=3, offset=0)
    by_hand = []
    for s, t in zip(student, teacher):
        rows = t[:, [0, 3, 6, 9]]
        each = [((s[b] - rows[b]) ** 2).sum() / s[b].numel() / ((rows[b] ** 2).sum() / rows[b].numel()) for b in (0, 1)]
        by_hand.append((each[0] + each[1]) / 2)  # each sequence by its own energy
    assert per_layer.tolist() == pytest.approx([float(v) for v in by_hand], rel=1e-6)
    assert float(loss) == pytest.approx(sum(float(v) for v in by_hand) / 2, rel=1e-6)
    assert query_positions(10, 3, 1).tolist() == [1, 4, 7]
    with pytest.raises(ValueError, match="0 <= offset < stride"):
        query_positions(10, 3, 3)


def test_one_step_brings_every_layer_closer_to_its_teacher() -> None:
    ids = tokens(batch=2, length=LENGTH)
    peft_model = _lora(hf_prope.patch_model(tiny_model("qwen3"), "p-rope", p=0.25), random_b=False)
    peft_model.train()
    targets = teacher_attention(peft_model, ids)
    loss, before = attention_transfer_loss(
        student_attention(peft_model, targets, query_stride=2), targets, query_stride=2
    )
    loss.backward()
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.grad is not None:
                p -= 0.05 * p.grad
    with torch.no_grad():
        _, after = attention_transfer_loss(
            student_attention(peft_model, targets, query_stride=2), targets, query_stride=2
        )
    # Each layer's output depends only on its own adapter (its input is the teacher's), so each one improves.
    assert (before > 1e-4).all() and (after < before).all(), (before, after)


def test_targets_of_batches_concatenate_and_move() -> None:
    peft_model = _lora(hf_prope.patch_model(tiny_model("llama"), "p-rope", p=0.5))
    a, b = (
        teacher_attention(peft_model, tokens(1, LENGTH, seed=1)),
        teacher_attention(peft_model, tokens(1, LENGTH, seed=2)),
    )
    both = teacher_attention(peft_model, torch.cat([tokens(1, LENGTH, seed=1), tokens(1, LENGTH, seed=2)]))
    joined = AttentionTargets.cat([a, b]).to("cpu")
    for got, want in zip(joined.outputs, both.outputs):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(
            student_attention(peft_model, joined, query_stride=2)[0],
            student_attention(peft_model, both, query_stride=2)[0],
        )
