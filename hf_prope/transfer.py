"""Layer-wise attention transfer: teach each patched attention layer to reproduce its unpatched self.

Self-distillation (:mod:`hf_prope.distillation`) gives one signal per token at the very end of
the network, through every layer's backward pass and a full-vocabulary softmax. The patch
changes attention only, so a denser and cheaper signal is each layer's own: run the unpatched
model (the teacher: the same weights, the patch suspended, the adapter disabled) once and keep
every attention module's input and output; then run each patched attention layer on the
teacher's input and ask it to reproduce the teacher's output (as LoLCATs does to linearise
attention). The loss per layer is ``mean((y - y_teacher)^2) / mean(y_teacher^2)`` per sequence
(0 = exact, 1 = as far as an output of zeros), and the objective is its mean over layers::

    targets = teacher_attention(peft_model, input_ids)     # no grad, original RoPE, no adapter
    outputs = student_attention(peft_model, targets, query_stride=4)
    loss, per_layer = attention_transfer_loss(outputs, targets, query_stride=4)

Why it is cheap: no MLP, no LM head, no vocabulary softmax, one layer deep per backward pass;
and the student computes its outputs only at every ``query_stride``-th position (all keys
and values, a random offset each step, so every position is trained on), cutting the
attention's quadratic part by that factor. The student runs each layer's own modules
(its LoRA-wrapped projections, its q/k norms, its rotary function through the patch's hooks)
and only the attention product itself is written here: scaled, soft-capped (Gemma 2, where the
model's attention implementation soft-caps),
causal within the layer's sliding window, with grouped key/value heads. With
``query_stride=1`` it equals the module's own forward pass (tested per architecture).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import rotation
from .distributed import fsdp_call, fsdp_modules, fsdp_owners
from .patching import PositionMaskHook, original_rope
from .state import is_peft_model, model_parts, unwrap

__all__ = ["AttentionTargets", "attention_transfer_loss", "query_positions", "student_attention", "teacher_attention"]


@dataclass
class AttentionTargets:
    """What each attention layer of the teacher saw and produced, in layer order (no gradient).

    ``rotary_calls`` are the rotary modules' calls of the teacher's pass and ``rotary_of_layer``
    which one each layer's cos/sin came from, so that the student's (patched) cos/sin are made
    by the model's own rotary modules the same way, whatever the architecture routes where.
    """

    layers: list[int]
    inputs: list[torch.Tensor]  # the attention module's hidden_states input (post-norm)
    outputs: list[torch.Tensor]  # its output, before the residual connection
    rotary_calls: list[tuple[nn.Module, tuple, dict[str, Any]]] = field(default_factory=list)
    rotary_of_layer: list[int] = field(default_factory=list)

    @classmethod
    def cat(cls, parts: Sequence[AttentionTargets]) -> AttentionTargets:
        """Targets of several batches as one batch (the rotary calls of the first: positions are shared)."""
        first = parts[0]
        if len(parts) == 1:
            return first
        return cls(
            first.layers,
            [torch.cat(ts) for ts in zip(*(p.inputs for p in parts))],
            [torch.cat(ts) for ts in zip(*(p.outputs for p in parts))],
            first.rotary_calls,
            first.rotary_of_layer,
        )

    def to(self, device: torch.device | str) -> AttentionTargets:
        """The same targets on ``device`` (a cache may keep them elsewhere)."""
        move = lambda ts: [t.to(device) for t in ts]  # noqa: E731
        calls = [
            (m, tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args), kwargs)
            for m, args, kwargs in self.rotary_calls
        ]
        return AttentionTargets(self.layers, move(self.inputs), move(self.outputs), calls, list(self.rotary_of_layer))


def _hidden_states_in(args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _attentions(model: nn.Module) -> dict[int, nn.Module]:
    attentions = model_parts(model).attentions
    if not attentions:
        raise ValueError(f"{type(unwrap(model)).__name__} has no attention modules hf-prope knows of.")
    return dict(sorted(attentions.items()))


def teacher_attention(model: nn.Module, input_ids: torch.Tensor) -> AttentionTargets:
    """Every attention layer's input and output in the unpatched, adapter-free model (no gradient).

    ``model`` is the patched student (PEFT-wrapped or not); its decoder runs once with the
    original RoPE and, for a PEFT model, with the adapter disabled; it is unchanged afterwards.
    Full blocks only (no padding): the student's attention is causal over the whole block.
    """
    parts = model_parts(model)
    attentions = _attentions(model)
    seen: dict[int, dict[str, Any]] = {i: {} for i in attentions}
    calls: list[tuple[nn.Module, tuple, dict[str, Any], Any]] = []

    def rotary_hook(module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        calls.append((module, args, dict(kwargs), output))

    def capture(i: int) -> Any:
        def pre(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            seen[i]["input"] = _hidden_states_in(args, kwargs).detach()
            seen[i]["pe"] = kwargs.get("position_embeddings")

        def post(module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
            seen[i]["output"] = (output[0] if isinstance(output, tuple) else output).detach()

        return pre, post

    handles = [r.register_forward_hook(rotary_hook, with_kwargs=True) for r in parts.rotaries]
    try:
        for i, module in attentions.items():
            pre, post = capture(i)
            handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(module.register_forward_hook(post, with_kwargs=True))
        decoder = unwrap(model).get_decoder()
        adapter_off = model.disable_adapter() if is_peft_model(model) else contextlib.nullcontext()
        with torch.no_grad(), adapter_off, original_rope(model):
            fsdp_call(fsdp_owners(model, decoder), decoder, input_ids=input_ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    layers = list(attentions)
    rotary_of_layer = []
    for i in layers:
        if "output" not in seen[i]:
            raise RuntimeError(f"hf-prope: the attention module of layer {i} did not run in the decoder's forward.")
        pe = seen[i]["pe"]
        source = next((n for n, c in enumerate(calls) if pe is not None and c[3][0] is pe[0]), None)
        if source is None:
            raise RuntimeError(
                f"hf-prope: layer {i}'s attention got cos/sin that no rotary module produced in this forward pass; "
                "this transformers version routes position embeddings in a way layer-wise transfer does not follow."
            )
        rotary_of_layer.append(source)
    return AttentionTargets(
        layers=layers,
        inputs=[seen[i]["input"] for i in layers],
        outputs=[seen[i]["output"] for i in layers],
        rotary_calls=[(m, a, k) for m, a, k, _ in calls],
        rotary_of_layer=rotary_of_layer,
    )


def query_positions(length: int, stride: int, offset: int = 0) -> torch.Tensor:
    """The positions the student is computed at: ``offset, offset + stride, ...`` below ``length``."""
    if stride < 1 or not 0 <= offset < stride:
        raise ValueError(f"Expected stride >= 1 and 0 <= offset < stride, got stride={stride}, offset={offset}.")
    return torch.arange(offset, length, stride)


def _apply_rotary(module: nn.Module) -> Any:
    # Looked up at call time in the module's modeling file, as the module's forward does: the
    # patch's prefix fast path wraps it there (hf_prope.rotation).
    return sys.modules[type(module).__module__].apply_rotary_pos_emb


def _student_layer(
    module: nn.Module,
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    queries: torch.Tensor,
    span: int | None,
) -> torch.Tensor:
    """One attention layer's output at positions ``queries``, computed from all of ``x`` as keys and values."""
    b, length, _ = x.shape
    head_dim = int(module.head_dim)
    xq = x[:, queries]
    q = module.q_proj(xq).view(b, len(queries), -1, head_dim)
    k = module.k_proj(x).view(b, length, -1, head_dim)
    v = module.v_proj(x).view(b, length, -1, head_dim).transpose(1, 2)
    if getattr(module, "q_norm", None) is not None:
        q, k = module.q_norm(q), module.k_norm(k)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    rotate = _apply_rotary(module)
    if getattr(cos, rotation.HEAD_TAG, False):  # a head-mask: (batch, kv heads, tokens, d/2), re-tagged once sliced
        q = rotate(q, k[:, :, queries], *rotation.tag_heads(cos[:, :, queries], sin[:, :, queries]))[0]
    else:
        q = rotate(q, q, cos[:, queries], sin[:, queries])[0]
    k = rotate(k, k, cos, sin)[0]
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    keys = torch.arange(length, device=x.device)
    qpos = queries.to(x.device)[:, None]
    allowed = keys[None, :] <= qpos
    if span is not None:
        allowed &= keys[None, :] > qpos - span
    scaling = float(module.scaling)
    # What the model's own attention function does: sdpa has no soft-cap and drops it (Gemma 2 ran
    # sdpa in transformers 5.0; later releases refuse sdpa for it), every other implementation applies it.
    implementation = getattr(getattr(module, "config", None), "_attn_implementation", None)
    softcap = None if implementation == "sdpa" else getattr(module, "attn_logit_softcapping", None)
    if softcap:
        scores = torch.matmul(q, k.transpose(-1, -2)) * scaling
        scores = torch.tanh(scores / softcap) * softcap
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
        weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        out = torch.matmul(weights, v)
    else:
        out = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scaling)
    out = out.transpose(1, 2).reshape(b, len(queries), -1)
    return module.o_proj(out)


def student_attention(
    model: nn.Module, targets: AttentionTargets, *, query_stride: int = 1, offset: int = 0
) -> list[torch.Tensor]:
    """Each patched attention layer's output on the teacher's input, at every ``query_stride``-th position.

    The cos/sin are the model's own (the patch in effect, with its layer hooks), made by its
    rotary modules from the teacher pass's calls. Outputs keep their gradient, layer order.
    """
    parts = model_parts(model)
    attentions = _attentions(model)
    if list(attentions) != targets.layers:
        raise ValueError(f"targets are for layers {targets.layers}, the model has {list(attentions)}.")
    length = targets.inputs[0].shape[1]
    queries = query_positions(length, query_stride, offset)
    made: dict[int, Any] = {}
    outputs = []
    sharded = bool(fsdp_modules(model))  # once: the owners' search scans the model per layer
    for layer, x, source in zip(targets.layers, targets.inputs, targets.rotary_of_layer):
        if source not in made:
            rotary, args, kwargs = targets.rotary_calls[source]
            with torch.no_grad():
                made[source] = rotary(*args, **kwargs)
        module = attentions[layer]
        call: dict[str, Any] = {"position_embeddings": made[source]}
        for hook in module._forward_pre_hooks.values():
            if isinstance(hook, PositionMaskHook):
                changed = hook(module, (), call)
                call = changed[1] if changed is not None else call
        cos, sin = call["position_embeddings"]
        # FSDP2: through the wrapped layer that holds this attention module's weights (the model's
        # own forward, which calls this, is running already).
        owner = [m for m in fsdp_owners(model, module) if m is not model][-1:] if sharded else []
        outputs.append(fsdp_call(owner, _student_layer, module, x, cos, sin, queries, parts.attention_span(layer)))
    return outputs


def attention_transfer_loss(
    student: Sequence[torch.Tensor], targets: AttentionTargets, *, query_stride: int = 1, offset: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean over layers of ``mean((s - t)^2) / mean(t^2)`` at the student's positions (float32), and each layer's.

    Normalising by the teacher's energy puts every layer on the same scale, whatever its
    activation size. Each sequence is normalised by its own energy and the batch averaged, so
    a batch of 2 and 2 accumulated batches of 1 give the same loss. The per-layer values are
    detached (for logging).
    """
    if len(student) != len(targets.outputs) or not student:
        raise ValueError(f"Expected one student output per layer, got {len(student)} for {len(targets.outputs)}.")
    queries = query_positions(targets.outputs[0].shape[1], query_stride, offset)
    losses = []
    for s, t in zip(student, targets.outputs):
        t32 = t[:, queries.to(t.device)].float()
        error = (s.float() - t32).pow(2).flatten(1).mean(1)
        losses.append((error / t32.pow(2).flatten(1).mean(1).clamp_min(1e-12)).mean())
    per_layer = torch.stack(losses)
    return per_layer.mean(), per_layer.detach()
