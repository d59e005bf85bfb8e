"""Zero-shot perplexity of a model under RoPE variants, with one fixed protocol.

The protocol (the one the project's reference figures were measured with): tokenise the
text once with no special tokens, take the *last* ``n_windows * window`` tokens, cut them
into ``n_windows`` non-overlapping windows, run each window from scratch (no context
carried over, no BOS prepended), and report ``exp`` of the mean cross-entropy over every
predicted token (positions 1..window-1 of each window).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from .data import last_windows, python_docs_text, tokenize_text
from .distributed import gathered_per_module, has_partitioned_parameters, rank_and_world
from .patching import check_patch, patch_model, unpatch_model
from .spec import PatchSpec
from .state import get_patch, unwrap

# (label, spec): spec None = the unpatched model; a dict is read with PatchSpec.from_dict.
LabelledSpec = tuple[str, "PatchSpec | dict[str, Any] | None"]

__all__ = ["perplexity", "zero_shot_table", "tokenize_text", "LabelledSpec", "window_nll", "windows_perplexity"]

# Past this many logits per forward pass (512 MiB in float32; a SmolLM2 window of 2,730 tokens),
# the logits are made and scored chunk by chunk from the final hidden states: a 16,384-token window
# of a 49,152-word vocabulary would otherwise hold 3.2 GB of logits, and as much again for the loss.
FULL_LOGITS_LIMIT = 2**27
LOGITS_CHUNK_TOKENS = 1024


def window_nll(model: Any, batch: torch.Tensor, *, logits_chunk: int | None = None) -> torch.Tensor:
    """Summed next-token cross-entropy (float64) of ``batch`` ``(n, window)``, no grad taken here.

    ``logits_chunk``: tokens per chunk of logits (``None``: whole when they are small, else
    :data:`LOGITS_CHUNK_TOKENS`). The chunked path runs the decoder once and the model's own
    output layer (soft-capping included) on each chunk, so peak memory does not grow with the
    vocabulary times the window. Models whose weights are partitioned (ZeRO-3, FSDP2) take the
    whole path, through their wrapped forward.
    """
    if logits_chunk is not None and logits_chunk < 1:
        raise ValueError(f"logits_chunk must be at least 1 token, got {logits_chunk}.")
    vocab = int(getattr(unwrap(model).config, "vocab_size", 0) or 0)
    if has_partitioned_parameters(model):
        logits_chunk = None  # its wrapped forward gathers the weights; the decoder alone would not
    elif logits_chunk is None and batch.numel() * vocab > FULL_LOGITS_LIMIT:
        logits_chunk = LOGITS_CHUNK_TOKENS
    if logits_chunk is None:
        logits = model(input_ids=batch, use_cache=False).logits
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="sum"
        )
        return nll.double()
    from .distillation import output_layer

    hidden = unwrap(model).get_decoder()(input_ids=batch, use_cache=False).last_hidden_state[:, :-1]
    head = output_layer(model)
    targets = batch[:, 1:]
    total = torch.zeros((), dtype=torch.float64, device=batch.device)
    for start in range(0, hidden.shape[1], logits_chunk):
        piece = head(hidden[:, start : start + logits_chunk]).float()
        total += torch.nn.functional.cross_entropy(
            piece.flatten(0, 1), targets[:, start : start + logits_chunk].flatten(), reduction="sum"
        ).double()
    return total


def _nll_sum(
    model: Any,
    windows: torch.Tensor,
    batch_size: int,
    bar: Any,
    *,
    passes: int | None = None,
    logits_chunk: int | None = None,
) -> tuple[float, int]:
    """Summed cross-entropy over every predicted token of every window, and the token count.

    ``passes`` (ZeRO-3): run that many forward passes whatever the windows, the extra ones on
    a window already scored and not counted, so that every process gathers the same weights.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total_nll, total_tokens = 0.0, 0
    starts = list(range(0, windows.shape[0], max(1, batch_size)))
    spare = max(0, (passes or 0) - len(starts))
    # inference_mode would turn the gathered ZeRO-3 weights into inference tensors, which training refuses later.
    grad_off = torch.no_grad() if passes is not None else torch.inference_mode()
    try:
        with grad_off, gathered_per_module(model):
            for _ in range(spare):
                model(input_ids=windows[:1].to(device) if windows.shape[0] else _spare_window(model), use_cache=False)
            for start in starts:
                batch = windows[start : start + batch_size].to(device)
                # Accumulate in Python floats (double) so the result does not depend on batch_size.
                total_nll += float(window_nll(model, batch, logits_chunk=logits_chunk))
                total_tokens += batch[:, 1:].numel()
                bar.update(batch.shape[0])
    finally:
        model.train(was_training)
    return total_nll, total_tokens


def _spare_window(model: Any) -> torch.Tensor:
    return torch.zeros(1, 2, dtype=torch.long, device=next(model.parameters()).device)


def perplexity(
    model: Any,
    input_ids: torch.Tensor,
    *,
    window: int = 512,
    n_windows: int = 16,
    progress: bool | str = False,
    batch_size: int = 1,
    logits_chunk: int | None = None,
) -> float:
    """Perplexity of ``model`` on the last ``n_windows * window`` tokens of ``input_ids``.

    Each window is evaluated from scratch; the mean is over all ``n_windows * (window - 1)``
    predicted tokens. In a distributed run (``torch.distributed`` initialised) every process
    scores a share of the windows and all get the same total. ``progress`` is ``True`` for a
    tqdm bar or a string to use as its description. ``batch_size`` windows run per forward
    pass (same result, more memory). ``logits_chunk``: see :func:`window_nll` (the default
    scores long windows chunk by chunk).
    Raises ``ValueError`` when ``input_ids`` is too short for the windows asked.
    """
    windows = last_windows(input_ids, window, n_windows)
    return windows_perplexity(model, windows, progress=progress, batch_size=batch_size, logits_chunk=logits_chunk)


def windows_perplexity(
    model: Any,
    windows: torch.Tensor,
    *,
    progress: bool | str = False,
    batch_size: int = 1,
    logits_chunk: int | None = None,
) -> float:
    """Perplexity of ``model`` on given windows ``(n, window)`` of ids, each from scratch.

    As :func:`perplexity` (distributed, progress, batching), for windows cut another way, such as
    :func:`hf_prope.data.document_windows` (every window inside one document).
    """
    if windows.dim() != 2 or windows.shape[0] < 1 or windows.shape[1] < 2:
        raise ValueError(f"windows must be (n >= 1, window >= 2) token ids, got shape {tuple(windows.shape)}.")
    rank, world = rank_and_world()
    # Under torchrun each process scores its share of the windows; the sums are then added up.
    mine = windows[rank::world]
    # ZeRO-3 gathers each layer's weights from every process: all must run as many passes as the busiest.
    passes = -(-windows[0::world].shape[0] // max(1, batch_size)) if has_partitioned_parameters(model) else None
    desc = progress if isinstance(progress, str) else "perplexity"
    with tqdm(total=mine.shape[0], desc=desc, unit="window", disable=not progress or rank != 0) as bar:
        nll, count = _nll_sum(model, mine, batch_size, bar, passes=passes, logits_chunk=logits_chunk)
    if world > 1:
        device = next(model.parameters()).device
        sums = torch.tensor([nll, float(count)], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(sums)
        nll, count = float(sums[0]), int(sums[1])
    return math.exp(nll / count)


def zero_shot_table(
    model: Any,
    tokenizer: Any,
    variants: Sequence[LabelledSpec],
    *,
    window: int = 512,
    n_windows: int = 16,
    text: str | None = None,
    progress: bool = True,
    batch_size: int = 1,
    input_ids: torch.Tensor | None = None,
) -> list[dict[str, Any]]:
    """Perplexity of the same model, patched in place with each variant in turn.

    ``variants`` are ``(label, spec)`` pairs; ``spec=None`` means the unpatched model.
    ``text`` defaults to :func:`hf_prope.data.python_docs_text`; ``input_ids`` (1-D) replaces
    it with text already tokenised. Every variant is checked against the model before the
    first forward pass. The model is left unpatched afterwards (even on error). Rows: ``variant``, ``spec`` (dict or None),
    ``perplexity``, ``ratio_to_rope`` (to the first unpatched variant; None if there is none).
    """
    if input_ids is not None:
        ids = input_ids
    else:
        if text is None:
            text = python_docs_text()
        ids = tokenize_text(tokenizer, text)
    windows = last_windows(ids, window, n_windows)  # fails on a short text before any model work
    current = get_patch(model)
    if current is not None:
        raise ValueError(
            f"The model already carries a patch ({current}); unpatch it first so the variants are "
            "measured against its original RoPE."
        )
    specs = [PatchSpec.from_dict(given) if isinstance(given, dict) else given for _, given in variants]
    for spec in specs:  # every variant must fit the model before the first forward pass
        if spec is not None:
            check_patch(model, spec)
    rows: list[dict[str, Any]] = []
    bar = tqdm(total=len(variants) * n_windows, desc="zero-shot perplexity", unit="window", disable=not progress)
    try:
        for (label, _), spec in zip(variants, specs):
            if spec is None:
                unpatch_model(model)
            else:
                patch_model(model, spec)
            bar.set_postfix_str(label)
            nll, count = _nll_sum(model, windows, batch_size, bar)
            ppl = math.exp(nll / count)
            rows.append({"variant": label, "spec": spec.to_dict() if spec is not None else None, "perplexity": ppl})
    finally:
        bar.close()
        unpatch_model(model)
    rope = next((r["perplexity"] for r in rows if r["spec"] is None), None)
    for row in rows:
        row["ratio_to_rope"] = row["perplexity"] / rope if rope else None
    return rows
