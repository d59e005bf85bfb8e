"""Multi-process runs (torchrun, accelerate, DeepSpeed): which process this is, and ZeRO-3's partitioned weights.

Under DeepSpeed ZeRO-3 each process holds only a slice of every parameter (``param.ds_tensor``;
``param`` itself is an empty placeholder). Inside DeepSpeed's engine, hooks gather a module's
weights for its forward pass; outside it (an evaluation before training, a save after it) the
helpers here do the same: :func:`gathered` gathers some parameters for a block,
:func:`gathered_on_main` copies them whole to rank 0's memory one at a time (for its saves),
:func:`gathered_per_module` gathers each module's own weights only while that module runs, so
an evaluation never holds more than one layer's weights in full.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch

__all__ = [
    "rank_and_world",
    "is_partitioned",
    "has_partitioned_parameters",
    "gathered",
    "gathered_on_main",
    "gathered_per_module",
    "parameter_share",
]


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)`` of this process: ``(0, 1)`` unless ``torch.distributed`` is initialised."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def is_partitioned(param: torch.Tensor) -> bool:
    """Whether ``param`` is a DeepSpeed ZeRO-3 parameter (its values spread over the processes)."""
    return hasattr(param, "ds_id")


def has_partitioned_parameters(model: torch.nn.Module) -> bool:
    return any(is_partitioned(p) for p in model.parameters())


@contextlib.contextmanager
def gathered(params: Iterable[torch.Tensor]) -> Iterator[None]:
    """The ZeRO-3 parameters among ``params`` whole on every process inside the block (a no-op for others).

    A collective: every process must enter it with the same parameters. Changes made inside
    are dropped on exit (each process keeps its own slice).
    """
    zero = [p for p in params if is_partitioned(p)]
    if not zero:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(zero, modifier_rank=None):
        yield


@contextlib.contextmanager
def gathered_on_main(params: Iterable[torch.Tensor]) -> Iterator[None]:
    """Inside the block, rank 0's ZeRO-3 parameters among ``params`` are whole, in CPU memory; other ranks' unchanged.

    For a save written by rank 0: the parameters are gathered one at a time (a collective:
    every process enters with the same parameters) and only rank 0 keeps a copy, so no device
    ever holds more than one whole parameter; the copies go on exit.
    """
    zero = list(dict.fromkeys(p for p in params if is_partitioned(p)))
    if not zero:
        yield
        return
    import deepspeed

    main = rank_and_world()[0] == 0
    placeholders: list[tuple[torch.Tensor, torch.Tensor]] = []
    try:
        for p in sorted(zero, key=lambda q: q.ds_id):  # the same order on every process
            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                whole = p.data.detach().to("cpu", copy=True) if main else None
            if whole is not None:
                placeholders.append((p, p.data))
                p.data = whole
        yield
    finally:
        for p, placeholder in placeholders:
            p.data = placeholder


@contextlib.contextmanager
def gathered_per_module(model: torch.nn.Module) -> Iterator[None]:
    """Inside the block, every module of ``model`` gathers its own ZeRO-3 weights for its forward call only.

    For forward passes outside DeepSpeed's engine (whose own hooks are gone once training has
    ended): peak memory is the largest module's weights, not the model's. Every process must
    run the same modules in the same order (the same number of forward passes).
    """
    modules = [m for m in model.modules() if any(is_partitioned(p) for p in m.parameters(recurse=False))]
    if not modules:
        yield
        return
    import deepspeed

    open_: dict[int, list[Any]] = {}

    def before(module: torch.nn.Module, args: Any) -> None:
        context = deepspeed.zero.GatheredParameters(list(module.parameters(recurse=False)), modifier_rank=None)
        context.__enter__()
        open_.setdefault(id(module), []).append(context)

    def after(module: torch.nn.Module, args: Any, output: Any) -> None:
        open_[id(module)].pop().__exit__(None, None, None)

    handles = []
    try:
        for m in modules:
            handles.append(m.register_forward_pre_hook(before))
            handles.append(m.register_forward_hook(after))
        yield
    finally:
        for handle in handles:
            handle.remove()
        for contexts in open_.values():  # a forward that raised midway: release what it gathered
            while contexts:
                contexts.pop().__exit__(None, None, None)


def parameter_share(model: torch.nn.Module) -> dict[str, Any]:
    """How many of the model's parameter values this process holds, and of how many (measured, not assumed).

    Under ZeRO-3 a process holds its slices (``ds_tensor``); otherwise the whole parameter.
    Each tensor counts once (``parameters()`` lists a tied weight once).
    """
    held = total = 0
    for p in model.parameters():
        if is_partitioned(p):
            held += int(p.ds_tensor.numel())
            total += int(p.ds_numel)
        else:
            held += p.numel()
            total += p.numel()
    return {"held": held, "total": total, "share": held / total if total else 1.0}
