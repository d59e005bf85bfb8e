"""Multi-process runs (torchrun, accelerate, DeepSpeed): which process this is, and ZeRO-3's partitioned weights.

Under DeepSpeed ZeRO-3 each process holds only a slice of every parameter (``param.ds_tensor``;
``param`` itself is an empty placeholder). Inside DeepSpeed's engine, hooks gather a module's
weights for its forward pass; outside it (an evaluation before training, a save after it) the
helpers here do the same: :func:`gathered` gathers some parameters for a block,
:func:`gathered_on_main` copies them whole to rank 0's memory one at a time (for its saves),
:func:`gathered_per_module` gathers each module's own weights only while that module runs, so
an evaluation never holds more than one layer's weights in full.

Under FSDP2 (``torch.distributed.fsdp.fully_shard``, what accelerate applies for ``fsdp=...``)
a parameter is a ``DTensor`` holding this process's shard, and each wrapped module gathers its
weights in its own forward call. hf-prope's teachers call the decoder, or one attention
module, directly, past the wrapped modules that own their weights: :func:`fsdp_call` runs such
a call as part of an owner's forward (gathering before, gradients reduced after backward).
:func:`gathered` and :func:`gathered_on_main` gather ``DTensor`` parameters as well.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

__all__ = [
    "rank_and_world",
    "is_partitioned",
    "is_fsdp_sharded",
    "has_partitioned_parameters",
    "fsdp_modules",
    "fsdp_owners",
    "fsdp_call",
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


def is_fsdp_sharded(param: torch.Tensor) -> bool:
    """Whether ``param`` is an FSDP2 shard (a ``DTensor``: this process holds part of it)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed support
        return False
    return isinstance(param, DTensor)


def has_partitioned_parameters(model: torch.nn.Module) -> bool:
    """Whether some of ``model``'s weights are spread over the processes (ZeRO-3 or FSDP2).

    Then every forward pass is a collective: every process must run as many as the others.
    """
    return bool(fsdp_modules(model)) or any(is_partitioned(p) or is_fsdp_sharded(p) for p in model.parameters())


def fsdp_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules of ``model`` (itself included) that FSDP2 wrapped, outermost first."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def fsdp_owners(model: torch.nn.Module, inner: torch.nn.Module) -> list[torch.nn.Module]:
    """The FSDP2-wrapped modules of ``model`` that hold ``inner`` but do not run when ``inner`` is called directly.

    Outermost first; ``inner`` itself is left out (its own forward gathers its weights).
    """
    return [m for m in fsdp_modules(model) if m is not inner and any(sub is inner for sub in m.modules())]


_FSDP_METHOD = "hf_prope_fsdp_forward"


def _run(self: torch.nn.Module, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return fn(*args, **kwargs)


def fsdp_call(owners: Iterable[torch.nn.Module], fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` run as part of each owner's FSDP2 forward (outermost first); plain call if none.

    FSDP2 gathers a wrapped module's weights only in that module's forward call, and reduces
    their gradients after the backward pass that call set up; a submodule called on its own
    (a teacher's decoder, one attention layer) would see this process's shards. Registered
    with ``register_fsdp_forward_method``, torch's own hook for extra forward methods.
    """
    owners = list(owners)
    if not owners:
        return fn(*args, **kwargs)
    from torch.distributed.fsdp import register_fsdp_forward_method

    owner, rest = owners[0], owners[1:]
    if _FSDP_METHOD not in owner.__dict__:
        object.__setattr__(owner, _FSDP_METHOD, types.MethodType(_run, owner))
        register_fsdp_forward_method(owner, _FSDP_METHOD)
    return getattr(owner, _FSDP_METHOD)(fsdp_call, rest, fn, *args, **kwargs)


def _resharded(model: torch.nn.Module) -> None:
    # A forward outside training leaves the root's weights gathered (FSDP2 keeps the root's after
    # forward): reshard, so every parameter is the module's DTensor shard again.
    for m in fsdp_modules(model):
        m.reshard()


@contextlib.contextmanager
def gathered(params: Iterable[torch.Tensor], *, model: torch.nn.Module | None = None) -> Iterator[None]:
    """The ZeRO-3 or FSDP2 parameters among ``params`` whole on every process inside the block (a no-op for others).

    A collective: every process must enter it with the same parameters. Changes made inside
    are dropped on exit (each process keeps its own slice). FSDP2's parameters are swapped in
    the modules that hold them: ``model`` (which holds ``params``) is needed for those.
    """
    params = list(params)
    zero = [p for p in params if is_partitioned(p)]
    with _dtensors_whole(model, params, main_only=False):
        if not zero:
            yield
            return
        import deepspeed

        with deepspeed.zero.GatheredParameters(zero, modifier_rank=None):
            yield


@contextlib.contextmanager
def gathered_on_main(params: Iterable[torch.Tensor], *, model: torch.nn.Module | None = None) -> Iterator[None]:
    """Inside the block, rank 0's ZeRO-3 or FSDP2 parameters among ``params`` are whole, in CPU memory; others' unchanged.

    For a save written by rank 0: the parameters are gathered one at a time (a collective:
    every process enters with the same parameters) and only rank 0 keeps a copy, so no device
    ever holds more than one whole parameter; the copies go on exit. ``model``: as for
    :func:`gathered`.
    """
    params = list(params)
    zero = list(dict.fromkeys(p for p in params if is_partitioned(p)))
    if not zero:
        with _dtensors_whole(model, params, main_only=True):
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
def _dtensors_whole(model: torch.nn.Module | None, params: list[torch.Tensor], *, main_only: bool) -> Iterator[None]:
    """FSDP2's ``DTensor`` parameters among ``params`` replaced in their modules by whole plain ones (a collective).

    Gathered one at a time in a fixed order (the modules' own); with ``main_only`` only rank 0
    keeps the whole copies, in CPU memory. The shards are put back on exit.
    """
    if not any(is_fsdp_sharded(p) for p in params):
        yield
        return
    if model is None:
        raise ValueError("FSDP2-sharded parameters are gathered in their modules: pass model=, the model holding them.")
    owners = _parameter_owners(model, {id(p) for p in params})
    main = rank_and_world()[0] == 0
    swapped: list[tuple[torch.nn.Module, str, torch.nn.Parameter]] = []
    try:
        for places in owners.values():
            shard = places[0][0]._parameters[places[0][1]]
            full = shard.full_tensor()  # every process, the same order
            if main_only and not main:
                continue
            data = full.detach().to("cpu", copy=True) if main_only else full.detach()
            whole = torch.nn.Parameter(data, requires_grad=shard.requires_grad)
            for module, name in places:  # a tied weight: one whole tensor in every place
                swapped.append((module, name, shard))
                module._parameters[name] = whole
        yield
    finally:
        for module, name, shard in reversed(swapped):
            module._parameters[name] = shard


def _parameter_owners(model: torch.nn.Module, wanted: set[int]) -> dict[int, list[tuple[torch.nn.Module, str]]]:
    """Where each wanted DTensor parameter is registered (a tied weight: every place), in module order."""
    places: dict[int, list[tuple[torch.nn.Module, str]]] = {}
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None and id(p) in wanted and is_fsdp_sharded(p):
                places.setdefault(id(p), []).append((module, name))
    return places


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

    Under ZeRO-3 a process holds its slices (``ds_tensor``), under FSDP2 its ``DTensor``'s local
    shard; otherwise the whole parameter. Each tensor counts once (``parameters()`` lists a
    tied weight once).
    """
    _resharded(model)
    held = total = 0
    for p in model.parameters():
        if is_partitioned(p):
            held += int(p.ds_tensor.numel())
            total += int(p.ds_numel)
        elif is_fsdp_sharded(p):
            held += int(p.to_local().numel())
            total += p.numel()
        else:
            held += p.numel()
            total += p.numel()
    return {"held": held, "total": total, "share": held / total if total else 1.0}


def end_process_group() -> None:
    """Leave the process group (torchrun, accelerate) before the process exits; nothing without one.

    A process that exits while gloo's threads are alive can abort after its work is done
    ("terminate called without an active exception", exit -6 on one rank). ``hf-prope run``
    calls this after its recipe; a script that runs a recipe under torchrun should too.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
