"""Self-distillation: teach a patched model to match its own unpatched self.

A retrofit trained with the language-model loss learns the training text's domain as well,
so its figures mix the patch's cost with domain gain. Distilling from the unpatched model
(the teacher) asks only that the patched student predict what the original predicted, so
the retrofit ends as close to the original as it can get (measured on SmolLM2-135M, p=0.75:
within 1% of the original up to 8192 tokens after 150 steps on one H100).

The teacher is the student's own weights: the adapter disabled and the patch suspended
(:func:`hf_prope.patching.original_rope`), so no second model is held in memory. Only the
teacher's final hidden states are kept; its logits are made chunk by chunk from them with the
model's own output layer, so the full-vocabulary KL never holds a second ``(tokens, vocab)``
tensor::

    hidden = teacher_hidden_states(peft_model, input_ids)           # no grad, original RoPE, no adapter
    logits = peft_model(input_ids=input_ids).logits                  # the student
    loss = distillation_loss(logits, hidden, output_layer(peft_model), temperature=1.0)
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch
import torch.utils.checkpoint
from torch import nn

from .patching import original_rope
from .state import is_peft_model, unwrap

DEFAULT_CHUNK_TOKENS = 1024


def output_layer(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """Final hidden states -> logits, as the model computes them (its LM head, and Gemma's soft-capping)."""
    inner = unwrap(model)
    head = inner.get_output_embeddings()
    cap = getattr(inner.config, "final_logit_softcapping", None)

    def logits(hidden: torch.Tensor) -> torch.Tensor:
        out = head(hidden)
        if cap:
            out = torch.tanh(out / cap) * cap
        return out

    return logits


def teacher_hidden_states(model: nn.Module, input_ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """The unpatched, adapter-free model's final hidden states for ``input_ids`` (no gradient).

    ``model`` is the patched student (PEFT-wrapped or not). Its decoder runs with the original
    RoPE and, for a PEFT model, with the adapter disabled; the model is unchanged afterwards.
    """
    inner = unwrap(model)
    decoder = inner.get_decoder()
    adapter_off = model.disable_adapter() if is_peft_model(model) else contextlib.nullcontext()
    with torch.no_grad(), adapter_off, original_rope(model):
        out = decoder(input_ids=input_ids, use_cache=False, **kwargs)
    return out.last_hidden_state.detach()


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_logits: Callable[[torch.Tensor], torch.Tensor],
    *,
    temperature: float = 1.0,
    labels: torch.Tensor | None = None,
    distill_weight: float = 1.0,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    shift: bool = True,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``KL(teacher || student)`` per token over the full vocabulary, mixed with the LM loss if asked.

    ``student_logits`` is ``(batch, tokens, vocab)``; ``teacher_hidden`` the teacher's final hidden
    states ``(batch, tokens, hidden)`` and ``teacher_logits`` the layer that turns them into
    logits (:func:`output_layer`). Both distributions are softened by ``temperature`` and the KL
    is scaled by ``temperature**2`` (so its gradient does not shrink with it). With ``shift``
    the last position is left out, as the causal-LM loss leaves it out. The returned loss is
    ``distill_weight * KL + (1 - distill_weight) * cross-entropy(labels)``, each the mean over
    tokens; the dict holds both parts (detached) for logging.

    Memory: tokens are processed ``chunk_tokens`` at a time and each chunk is recomputed in the
    backward pass (activation checkpointing), so the teacher's logits and the softmaxes exist
    one chunk at a time, never whole: beyond the student's logits, which any loss needs, the
    peak is one chunk's ``(chunk_tokens, vocab)``.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature!r}.")
    if not 0.0 <= distill_weight <= 1.0:
        raise ValueError(f"distill_weight must be in [0, 1], got {distill_weight!r}.")
    lm_weight = 1.0 - distill_weight
    if lm_weight > 0 and labels is None:
        raise ValueError("distill_weight < 1 mixes in the LM loss, which needs labels.")
    if shift:
        student_logits = student_logits[:, :-1]
        teacher_hidden = teacher_hidden[:, :-1]
        labels = labels[:, 1:] if labels is not None else None
    vocab = student_logits.shape[-1]
    student = student_logits.reshape(-1, vocab)
    hidden = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
    flat_labels = labels.reshape(-1) if labels is not None else None
    n = student.shape[0]

    def chunk_sums(s: torch.Tensor, h: torch.Tensor, y: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        s = s.float()
        with torch.no_grad():
            t_logp = torch.log_softmax(teacher_logits(h).float() / temperature, dim=-1)
        s_logp = torch.log_softmax(s / temperature, dim=-1)
        kl = (t_logp.exp() * (t_logp - s_logp)).sum()
        ce = nn.functional.cross_entropy(s, y, reduction="sum") if y is not None else s.new_zeros(())
        return kl, ce

    kl_sum = student.new_zeros((), dtype=torch.float32)
    ce_sum = student.new_zeros((), dtype=torch.float32)
    for start in range(0, n, max(1, chunk_tokens)):
        end = min(n, start + chunk_tokens)
        y = flat_labels[start:end] if (flat_labels is not None and lm_weight > 0) else None
        args = (student[start:end], hidden[start:end], y)
        if student.requires_grad and torch.is_grad_enabled():
            kl, ce = torch.utils.checkpoint.checkpoint(chunk_sums, *args, use_reentrant=False)
        else:
            kl, ce = chunk_sums(*args)
        kl_sum = kl_sum + kl
        ce_sum = ce_sum + ce
    kl = kl_sum / n * temperature**2
    ce = ce_sum / n
    loss = distill_weight * kl + lm_weight * ce if lm_weight > 0 else kl
    return loss, {"kl": kl.detach(), "lm": ce.detach()}
