"""Model types without a hand-written record: found from transformers' own classes, checked by a probe.

A model type follows transformers' standard rotary contract when its config carries
``rope_parameters``, its ``*RotaryEmbedding`` module builds ``inv_freq`` through
``ROPE_INIT_FUNCTIONS`` (so hf-prope's rope types reach it) and its attention modules take
``position_embeddings`` and call transformers' attention interface. Such a type is patched
without a record in :mod:`hf_prope.registry`: :func:`architecture_for_type` reads the class names
from transformers' auto mappings, :func:`describe` reads the rest from a built model.

Nothing about the head layout is assumed. A patch on a generic type is checked when it is
applied (:func:`check_rotation`): on a float32 copy of every attention layer, the channels of
each frequency pair are found by rotating pairs one bit-group at a time (the model's own rotary
module with chosen ``inv_freq`` entries, the model's own attention code), and then the patched
layer's queries and keys must equal the original's on every kept pair and the unrotated ones on
every stopped pair. Interleaved pairs, partial rotary and rope sub-heads pass or fail on what
they compute; a patch that fails is undone and refused, never kept silently wrong.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import importlib
import inspect
import math
import threading
from collections.abc import Callable
from typing import Any

import torch
from packaging.version import Version
from torch import nn

from .registry import Architecture, UnsupportedModelError, set_fallback

PROBE_ATTENTION = "hf_prope_probe"
#: The oldest transformers the generic path is tested on (CI's newest environment on 2026-12-07).
GENERIC_MIN_TRANSFORMERS = "5.25"
_CAPTURED = threading.local()


class RotationCheckError(UnsupportedModelError):
    """A generic model type's rotation did not change as the patch says; the patch was not kept."""


# ---------------------------------------------------------------------------------------------
# Discovery


def _auto_names(model_type: str) -> tuple[str | None, str | None]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_MAPPING_NAMES

    def one(value: Any) -> str | None:
        if isinstance(value, (list, tuple)):
            return value[0] if value else None
        return value

    return one(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)), one(MODEL_MAPPING_NAMES.get(model_type))


def _forward_takes(cls: type, name: str) -> bool:
    try:
        return name in inspect.signature(cls.forward).parameters
    except (TypeError, ValueError):
        return False


def _rotary_classes(module: Any) -> list[type]:
    return [
        obj
        for name, obj in vars(module).items()
        if name.endswith("RotaryEmbedding")
        and inspect.isclass(obj)
        and issubclass(obj, nn.Module)
        and not any(w in name for w in ("Vision", "Audio", "Video", "Image"))
    ]


def is_attention_class(cls: type) -> bool:
    """An attention module of the standard contract: it takes ``position_embeddings`` in ``forward``."""
    return "Attention" in cls.__name__ and _forward_takes(cls, "position_embeddings")


@functools.cache
def architecture_for_type(model_type: str) -> Architecture | None:
    """A record for ``model_type`` read from transformers' auto mappings, or ``None`` if it has no standard rotary."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    causal_name, base_name = _auto_names(model_type)
    if causal_name is None or base_name is None or model_type not in CONFIG_MAPPING:
        return None
    causal = getattr(transformers, causal_name, None)
    if causal is None:
        return None
    module_name = causal.__module__
    module = importlib.import_module(module_name)
    rotaries = _rotary_classes(module)
    if rotaries and Version(transformers.__version__) < Version(GENERIC_MIN_TRANSFORMERS):
        # On 5.0 a saved generic model does not load back (a rotary buffer is left on the meta device).
        raise UnsupportedModelError(
            f"Model type {model_type!r} is not supported by hf-prope on this transformers: its generic path needs >= "
            f"{GENERIC_MIN_TRANSFORMERS} (installed: {transformers.__version__}; the releases in between are not "
            f"tested). Upgrade transformers: pip install 'transformers>={GENERIC_MIN_TRANSFORMERS}'."
        )
    prefix = causal_name.removesuffix("ForCausalLM")
    attentions = [
        obj
        for name, obj in vars(module).items()
        if inspect.isclass(obj) and issubclass(obj, nn.Module) and is_attention_class(obj)
    ]
    if not rotaries or not attentions or getattr(module, base_name, None) is None:
        return None
    rotary = next((c for c in rotaries if c.__name__ == f"{prefix}RotaryEmbedding"), rotaries[0])
    attention = next((c for c in attentions if c.__name__ == f"{prefix}Attention"), attentions[0])
    return Architecture(
        model_type=model_type,
        family="generic",
        modeling_module=module_name,
        rotary_class_name=rotary.__name__,
        attention_class_name=attention.__name__,
        base_model_class_name=base_name,
        config_class_name=type(CONFIG_MAPPING[model_type]).__name__
        if not inspect.isclass(CONFIG_MAPPING[model_type])
        else CONFIG_MAPPING[model_type].__name__,
        causal_lm_class_name=causal_name,
        mlx_lm_reads_rope_scaling=False,  # unknown per type: a patched save makes mlx-lm fail (legacy_config)
        generic=True,
    )


def describe(arch: Architecture, model: nn.Module, rotaries: list[nn.Module]) -> Architecture:
    """``arch`` completed from a built model: per-layer-type frequencies and per-head norms, as it has them."""
    config = model.config
    types = sorted(set(getattr(config, "layer_types", None) or []))
    per_type = bool(types) and all(hasattr(rotaries[0], f"{t}_inv_freq") for t in types)
    if not per_type and not isinstance(getattr(rotaries[0], "inv_freq", None), torch.Tensor):
        raise UnsupportedModelError(
            f"{arch.rotary_class_name} keeps its frequencies in another form than transformers' standard "
            "inv_freq buffer (one, or one per layer type), so hf-prope cannot patch model type "
            f"{arch.model_type!r}."
        )
    attention = next((m for m in model.modules() if type(m).__name__ == arch.attention_class_name), None)
    q_norm = "q_norm" if attention is not None and isinstance(getattr(attention, "q_norm", None), nn.Module) else None
    k_norm = "k_norm" if attention is not None and isinstance(getattr(attention, "k_norm", None), nn.Module) else None
    nope = "no_rope_layers" if isinstance(getattr(config, "no_rope_layers", None), (list, tuple)) else None
    return dataclasses.replace(
        arch, rope_per_layer_type=per_type, query_norm=q_norm, key_norm=k_norm, no_rope_layers=nope
    )


def attention_modules(model: nn.Module, arch: Architecture) -> dict[int, nn.Module]:
    """Decoder layer -> its attention module, for every module of the standard contract that has a ``layer_idx``."""
    out: dict[int, nn.Module] = {}
    for m in model.modules():
        idx = getattr(m, "layer_idx", None)
        if isinstance(idx, int) and type(m).__module__ == arch.modeling_module and is_attention_class(type(m)):
            out.setdefault(idx, m)
    return out


# ---------------------------------------------------------------------------------------------
# The probe


def _capture(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any, **kwargs: Any):
    _CAPTURED.qk = (query.detach().clone(), key.detach().clone())
    batch, heads, tokens = query.shape[0], query.shape[1], query.shape[2]
    return torch.zeros(batch, tokens, heads, value.shape[-1], dtype=query.dtype, device=query.device), None


def _register_probe_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(PROBE_ATTENTION, _capture)


def _probe_copy(attention: nn.Module) -> nn.Module:
    """A float32 copy of one attention layer with its hooks, materialised on the CPU if it is on the meta device."""
    params = list(attention.parameters())
    device = params[0].device if params else torch.device("cpu")
    if device.type == "meta":
        clone = copy.deepcopy(attention).to_empty(device="cpu")
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in clone.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    else:
        clone = copy.deepcopy(attention).cpu()
    clone = clone.float()
    config = getattr(clone, "config", None)
    if config is not None:
        config._attn_implementation = PROBE_ATTENTION
    return clone


def _rotary_call(rotary: nn.Module, x: torch.Tensor, position_ids: torch.Tensor, key: str | None) -> Any:
    if key is not None:
        return rotary(x, position_ids, layer_type=key)
    return rotary(x, position_ids)


def _inv_freq_name(key: str | None) -> str:
    return "inv_freq" if key is None else f"{key}_inv_freq"


def _with_pairs(rotary: nn.Module, key: str | None, keep: torch.Tensor) -> nn.Module:
    clone = copy.deepcopy(rotary)
    # Dynamic and longrope rotaries restore ``original_inv_freq`` on short inputs: mask that too.
    for name in (_inv_freq_name(key), "original_inv_freq" if key is None else f"{key}_original_inv_freq"):
        freq = getattr(clone, name, None)
        if isinstance(freq, torch.Tensor):
            setattr(clone, name, torch.where(keep.to(freq.device), freq, torch.zeros_like(freq)))
    return clone


def _cat_embeddings(parts: list[Any]) -> Any:
    if isinstance(parts[0], tuple):
        return tuple(torch.cat([p[i] for p in parts], dim=0) for i in range(len(parts[0])))
    return torch.cat(parts, dim=0)


def _run(attention: nn.Module, hidden: torch.Tensor, embeddings: Any) -> tuple[torch.Tensor, torch.Tensor]:
    _CAPTURED.qk = None
    extra: dict[str, Any] = {}
    if _forward_takes(type(attention), "shared_kv_states"):
        extra["shared_kv_states"] = {}  # Gemma 4's store for layers that reuse another layer's keys
    if _forward_takes(type(attention), "position_ids"):
        # Position 0 everywhere: a position-dependent query temperature (Llama 4, Ministral 3) stays
        # out of the comparison, which is about the rotation position_embeddings bring.
        extra["position_ids"] = torch.zeros(hidden.shape[0], hidden.shape[1], dtype=torch.long)
    with torch.no_grad():
        attention(hidden_states=hidden, position_embeddings=embeddings, attention_mask=None, **extra)
    qk = getattr(_CAPTURED, "qk", None)
    if qk is None:
        raise RotationCheckError(
            f"{type(attention).__name__} does not call transformers' attention interface, so hf-prope cannot see "
            "its rotated queries and keys."
        )
    return qk


def _max_position(config: Any, params: dict[str, Any]) -> int:
    n = params.get("original_max_position_embeddings") or getattr(config, "max_position_embeddings", None) or 4096
    return max(int(n), 16)


def _channel_pairs(changed: list[torch.Tensor], n_pairs: int) -> torch.Tensor:
    """Per channel, the pair it belongs to (-1: not rotated), decoded from one bit per row group."""
    code = torch.zeros_like(changed[0], dtype=torch.long)
    for bit, flags in enumerate(changed):
        code |= flags.long() << bit
    pair = code - 1
    pair[(pair < 0) | (pair >= n_pairs)] = -1
    return pair


def check_rotation(
    parts: Any,
    original_rotary: nn.Module,
    layer_keep: dict[int, torch.Tensor],
    *,
    current_rotary: nn.Module | None = None,
) -> None:
    """Raise :class:`RotationCheckError` unless every layer's q/k rotation changed exactly as ``layer_keep`` says.

    ``layer_keep[i]`` is, for decoder layer ``i``, one flag per pair (``(pairs,)``) or per key/value
    head and pair (``(kv heads, pairs)``): True where the pair must still rotate as in the original.
    """
    _register_probe_attention()
    rotary_now = current_rotary if current_rotary is not None else parts.rotaries[0]
    if any(b.device.type == "meta" for b in rotary_now.buffers()):
        raise RotationCheckError("the rotary module is on the meta device; pass current_rotary")
    # Everything on the CPU in float32, whatever the model's device and the ambient default device
    # (from_pretrained builds under the meta device). The user's random stream is left as it was:
    # a class-level patch probes while the model is being built and initialised.
    with torch.device("cpu"), torch.random.fork_rng(devices=[]):
        _check_all(parts, copy.deepcopy(original_rotary).cpu(), copy.deepcopy(rotary_now).cpu(), layer_keep)


def _check_all(
    parts: Any, original_rotary: nn.Module, rotary_now: nn.Module, layer_keep: dict[int, torch.Tensor]
) -> None:
    config = parts.config
    g = torch.Generator().manual_seed(1234)
    for layer in sorted(parts.attentions):
        key = parts.rope_key_of_layer(layer)
        attention = _probe_copy(parts.attentions[layer])
        # hf-prope's own layer hooks (PositionMaskHook), switched off for the original's runs
        hooks = [h for h in attention._forward_pre_hooks.values() if hasattr(h, "channel_keep")]
        freq = getattr(original_rotary, _inv_freq_name(key)).detach().float().cpu()
        n = int(freq.shape[-1])
        params = config.rope_parameters if key is None else config.rope_parameters[key]
        top = _max_position(config, params) - 1
        hidden_size = int(config.hidden_size)
        hidden = torch.randn(1, 1, hidden_size, generator=g)

        def embed(rotary: nn.Module, position: int, hidden: torch.Tensor = hidden, key: Any = key) -> Any:
            return _rotary_call(rotary, hidden, torch.tensor([[position]]), key)

        bits = max(1, math.ceil(math.log2(n + 1)))
        positions = (top, top * 2 // 3 + 1)
        rope_type = original_rotary.rope_type if key is None else original_rotary.rope_type[key]
        if not any(t in str(rope_type) for t in ("dynamic", "longrope")):
            # Frequencies that do not depend on the length: go far enough for the slowest pair to turn.
            positions = (max(top, (1 << 22) - 1), max(top * 2 // 3 + 1, (1 << 21) + 12345))
        rows = [embed(original_rotary, 0)]
        for bit in range(bits):
            keep = torch.tensor([((j + 1) >> bit) & 1 == 1 for j in range(n)])
            masked = _with_pairs(original_rotary, key, keep)
            rows += [embed(masked, p) for p in positions]
        checks = (1, 7, top, positions[0])
        rows += [embed(original_rotary, p) for p in checks]
        batch = len(rows)
        for h in hooks:
            h.active = False
        try:
            q, k = _run(attention, hidden.expand(batch, 1, hidden_size), _cat_embeddings(rows))
            current = _cat_embeddings([embed(rotary_now, p) for p in checks])
        finally:
            for h in hooks:
                h.active = True
        qc, kc = _run(attention, hidden.expand(len(checks), 1, hidden_size), current)
        _check_layer(layer, q, k, qc, kc, bits, n, layer_keep.get(layer), len(checks), type(attention).__name__)


def _check_layer(
    layer: int,
    q: torch.Tensor,
    k: torch.Tensor,
    qc: torch.Tensor,
    kc: torch.Tensor,
    bits: int,
    n: int,
    keep: torch.Tensor | None,
    n_checks: int,
    name: str,
) -> None:
    # q: (rows, heads, 1, d); row 0 = unrotated, then 2 rows per bit, then the original at each check position.
    heads, kv_heads = q.shape[1], k.shape[1]
    for which, x, xc, n_heads in (("query", q, qc, heads), ("key", k, kc, kv_heads)):
        base = x[0]
        # Relative to each head's scale: a norm after the rotation moves unrotated channels by rounding.
        scale = base.abs().amax(dim=-1, keepdim=True)
        atol = 1e-6 * scale

        def moved(row: torch.Tensor, base: torch.Tensor = base, atol: torch.Tensor = atol) -> torch.Tensor:
            return (row - base).abs() > 1e-5 * base.abs() + atol

        changed = [moved(x[1 + 2 * b]) | moved(x[2 + 2 * b]) for b in range(bits)]
        pair = _channel_pairs(changed, n)  # (heads, 1, d)
        original = x[1 + 2 * bits :]
        for h in range(n_heads):
            owner = pair[h, 0]
            counts = torch.bincount(owner[owner >= 0], minlength=n)
            rotating = bool((counts > 0).any())
            if rotating and not bool((counts == 2).all()):
                raise RotationCheckError(
                    f"layer {layer} ({name}): the {which} channels of head {h} do not split into {n} rotating "
                    f"pairs of two (channels per pair: {counts.tolist()})"
                )
            if keep is None:
                flags = torch.ones(n, dtype=torch.bool)
            elif keep.dim() == 1:
                flags = keep
            else:
                group = h if which == "key" else h // max(1, n_heads // keep.shape[0])
                flags = keep[group]
            channel_keep = torch.zeros(owner.shape, dtype=torch.bool)
            channel_keep[owner >= 0] = flags[owner[owner >= 0]]
            expected = torch.where(channel_keep, original[:, h, 0], base[h, 0].expand(n_checks, -1))
            got = xc[:, h, 0]
            ok = (got - expected).abs() <= 1e-5 * expected.abs() + atol[h, 0]
            if not bool(ok.all()):
                bad = (~ok).any(dim=0).nonzero().flatten().tolist()
                raise RotationCheckError(
                    f"layer {layer} ({name}): after the patch, {which} head {h} channels {bad[:8]} are not what the "
                    "mask says (kept pairs rotate as before, stopped pairs not at all)"
                )


def rotary_layout(rotary: nn.Module, key: str | None) -> torch.Tensor | None:
    """Per channel of the rotary module's cos/sin output, the pair it holds; ``None`` if it returns no (cos, sin)."""
    freq = getattr(rotary, _inv_freq_name(key)).detach().float().cpu()
    n = int(freq.shape[-1])
    x = torch.zeros(1, 1, 1)
    bits = max(1, math.ceil(math.log2(n + 1)))
    changed = []
    for bit in range(bits):
        keep = torch.tensor([((j + 1) >> bit) & 1 == 1 for j in range(n)])
        out = _rotary_call(_with_pairs(rotary, key, keep), x, torch.tensor([[3, 11]]), key)
        if not (isinstance(out, tuple) and len(out) == 2 and out[1].dim() == 3):
            return None
        changed.append((out[1] != 0).any(dim=(0, 1)))
    pair = _channel_pairs(changed, n)
    counts = torch.bincount(pair[pair >= 0], minlength=n)
    if not bool((counts == 2).all()) or bool((pair < 0).any()):
        return None
    return pair


def callable_name(fn: Callable[..., Any]) -> str:
    return getattr(fn, "__qualname__", type(fn).__name__)


set_fallback(architecture_for_type)
