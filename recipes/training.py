"""The training layer the training recipes (``lora``, ``ablation``) share.

* :class:`BlockDataset`: fixed-length token blocks as causal-LM examples.
* :class:`PatchRecordCallback`: the patch record in every checkpoint, so a checkpoint folder
  alone is never mistaken for plain RoPE.
* :class:`TrainingRecipe`: a :class:`~hf_prope.recipes.base.Recipe` that trains with
  transformers' ``Trainer``: this machine's defaults, the previous-run rule (an earlier run in
  ``output_dir`` is never mixed with a new one unless ``resume`` or ``overwrite`` says so),
  building the ``Trainer``, and tokens per optimizer step.
* :class:`RetrofitTrainer`: ``Trainer`` with the retrofit losses (``objective=transfer|distill|mix``, staged).
* :func:`loss_curve`: a ``[step, value]`` curve out of ``Trainer``'s log history.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from transformers import Trainer, TrainerCallback

from .base import Recipe, is_main_process

__all__ = [
    "BlockDataset",
    "PatchRecordCallback",
    "RetrofitTrainer",
    "staged_schedule_error",
    "TrainingRecipe",
    "has_accelerator",
    "loss_curve",
    "quiet_library_warnings",
]


class BlockDataset(torch.utils.data.Dataset):
    """Fixed-length token blocks as causal-LM examples (labels = inputs; the model shifts them)."""

    def __init__(self, blocks: torch.Tensor) -> None:
        self.blocks = blocks

    def __len__(self) -> int:
        return int(self.blocks.shape[0])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.blocks[i], "labels": self.blocks[i]}


class PatchRecordCallback(TrainerCallback):
    """Put the patch record in every checkpoint, so a checkpoint folder alone is never mistaken for plain RoPE."""

    def on_save(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        from hf_prope.files import write_atomic
        from hf_prope.patch_record import PATCH_FILE, record_json
        from hf_prope.state import patch_state

        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and model is not None and folder.is_dir():
            write_atomic(folder / PATCH_FILE, record_json(patch_state(model)))


def loss_curve(log_history: Sequence[dict[str, Any]], key: str = "loss") -> list[list[float]]:
    """``[[step, value], ...]`` of one logged quantity (``loss``, ``eval_loss``) from ``Trainer``'s log history."""
    return [[entry["step"], entry[key]] for entry in log_history if key in entry and "step" in entry]


def has_accelerator() -> bool:
    """Whether torch sees a GPU (or another accelerator) on this machine."""
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and hasattr(accelerator, "is_available"):
        return bool(accelerator.is_available())
    return torch.cuda.is_available()


# Library warnings that a recipe's user can do nothing about, each silenced for a stated reason.
_NOISE = (
    # PEFT checks at every checkpoint save whether the base's vocabulary was resized, by reading
    # config.json beside the base; an embedded (GGUF) base has none there. LoRA here never adapts
    # the embeddings, so the vocabulary is never resized and the check has nothing to find.
    (UserWarning, r"Could not find a config file in .* will assume that the vocabulary was not modified"),
    # PEFT reads transformers' is_gradient_checkpointing, deprecated in transformers 5.x: PEFT's to fix.
    (FutureWarning, r".*is_gradient_checkpointing.* is deprecated"),
)


@contextlib.contextmanager
def quiet_library_warnings() -> Iterator[None]:
    """Silence the known library warnings a recipe's user cannot act on (:data:`_NOISE`); others still show."""
    with warnings.catch_warnings():
        for category, message in _NOISE:
            warnings.filterwarnings("ignore", message=message, category=category)
        yield


class TrainingRecipe(Recipe):
    """A recipe that trains with ``Trainer``; subclasses name their outputs and where resume/overwrite live.

    ``outputs`` are the names (in ``self.out``) a run writes; ``run_settings`` is the name of
    the settings object holding ``resume`` and ``overwrite``. Subclasses set ``self.out`` and
    ``self.training_args`` (a ``TrainingArguments``) before calling the helpers.
    """

    outputs: ClassVar[tuple[str, ...]] = ()
    run_settings: ClassVar[str] = ""

    @classmethod
    def machine_defaults(cls) -> dict[str, Any]:
        # Without a GPU, TrainingArguments refuses bf16 and accelerate forms no CPU (gloo) process
        # group under torchrun unless use_cpu is set.
        return {} if has_accelerator() else {"use_cpu": True}

    def _run_flags(self) -> tuple[bool, bool]:
        settings = getattr(self, self.run_settings)
        return bool(settings.resume), bool(settings.overwrite)

    def previous_run(self) -> list[Path]:
        """What an earlier run left in the output folder (among :attr:`outputs`)."""
        return [p for p in (self.out / name for name in self.outputs) if p.exists()]

    def check_sharding(self) -> None:
        """Refuse FSDP where accelerate cannot shard, before any work.

        accelerate switches to FSDP only on GPU-like devices: on a CPU-only machine ``fsdp=...``
        would silently run plain DDP (every process holding the whole model) and ``accelerate
        launch --use_fsdp`` stops inside accelerate after the evaluations have run. FSDP1 is
        refused everywhere: the teacher and the saves follow FSDP2's per-module shards.
        """
        ta = self.training_args
        asked = bool(ta.fsdp) or os.environ.get("ACCELERATE_USE_FSDP", "").strip().lower() in ("1", "true", "yes")
        # fsdp=... takes its version from fsdp_config (transformers' default: 2); accelerate launch --use_fsdp
        # alone from FSDP_VERSION, which accelerate sets to 1 unless --fsdp_version 2 is passed.
        version = str((ta.fsdp_config or {}).get("version", 2)) if ta.fsdp else os.environ.get("FSDP_VERSION", "1")
        if asked and version.strip() in ("", "1"):
            raise ValueError(
                "FSDP version 1 was asked for (fsdp_config version 1, or accelerate launch --use_fsdp without "
                "--fsdp_version 2): the recipes run FSDP2 only, whose per-module DTensor shards the teacher and the "
                "saves gather (FSDP1 flattens the weights). Use version 2: fsdp=true (transformers' default version), "
                "or accelerate launch --use_fsdp --fsdp_version 2."
            )
        if asked and not has_accelerator():
            raise ValueError(
                "FSDP was asked for (fsdp=... or accelerate launch --use_fsdp), but this machine has no GPU: accelerate "
                "shards only on GPU-like devices, so the run would be plain DDP, each process holding the whole model "
                "(or stop in accelerate after the evaluations). Run it on a GPU machine, or shard with DeepSpeed "
                "(deepspeed=<config.json>), whose ZeRO stages run on CPU processes too."
            )

    def check_previous_run(self) -> None:
        """Refuse to mix with or overwrite an earlier run unless ``resume`` or ``overwrite`` says which."""
        resume, overwrite = self._run_flags()
        found = self.previous_run()
        if found and not resume and not overwrite:
            raise FileExistsError(
                f"{self.out} already holds a run ({', '.join(p.name for p in found)}). Pass resume=true to continue "
                "it, overwrite=true to discard it, or choose another output_dir."
            )

    def clear_previous_run(self) -> None:
        """With ``overwrite=true``, delete the earlier run; call only once every check has passed (rank 0 only)."""
        _, overwrite = self._run_flags()
        if overwrite and is_main_process():
            for p in self.previous_run():
                shutil.rmtree(p) if p.is_dir() else p.unlink()

    def tokens_per_step(self, block_size: int) -> int:
        """Tokens per optimizer step over every process."""
        ta = self.training_args
        return ta.per_device_train_batch_size * ta.gradient_accumulation_steps * max(1, ta.world_size) * block_size

    def make_trainer(
        self,
        model: Any,
        args: Any,
        train_blocks: torch.Tensor,
        *,
        eval_blocks: torch.Tensor | None = None,
        callbacks: Sequence[TrainerCallback] = (),
        objective: dict[str, Any] | None = None,
    ) -> Any:
        """A ``Trainer`` on token blocks, the patch record written into every checkpoint.

        ``objective`` (the keyword arguments of :class:`RetrofitTrainer`) makes it one; ``None``
        is ``Trainer`` with the model's own (language-model) loss.
        """
        from transformers import default_data_collator

        trainer_class: Any = Trainer if objective is None else RetrofitTrainer
        return trainer_class(
            model=model,
            args=args,
            train_dataset=BlockDataset(train_blocks),
            eval_dataset=BlockDataset(eval_blocks) if eval_blocks is not None else None,
            data_collator=default_data_collator,
            callbacks=[PatchRecordCallback(), *callbacks],
            **(objective or {}),
        )


def staged_schedule_error(lr_scheduler_type: Any) -> ValueError:
    """Why ``transfer_learning_rate`` cannot go with this schedule (it scales a schedule's factor per step)."""
    name = getattr(lr_scheduler_type, "value", lr_scheduler_type)
    return ValueError(
        f"transfer_learning_rate needs a schedule given as a factor per step; lr_scheduler_type={name} is not one. "
        "Use constant, linear or cosine, or leave transfer_learning_rate unset."
    )


class RetrofitTrainer(Trainer):
    """A ``Trainer`` whose loss retrofits a patch: layer-wise transfer, then self-distillation or the LM loss.

    ``objective`` is the loss after the first ``transfer_steps`` optimizer steps: ``distill``
    (:mod:`hf_prope.distillation`: KL to the unpatched model), ``mix`` (``distill_weight`` x KL +
    the rest x the LM loss), ``lm`` (the model's own loss) or ``transfer`` (every step layer-wise,
    :mod:`hf_prope.transfer`). Transfer steps run at ``transfer_learning_rate`` (the other steps
    at ``learning_rate``), one schedule and one optimizer throughout, so a resumed run picks up
    in the right stage.

    Both teachers are the model being trained with its patch suspended and its adapter
    disabled, run under ``no_grad`` before the student's pass; no second model is held. The
    student's pass goes through the (possibly DDP- or DeepSpeed-wrapped) model's forward call,
    so gradient synchronisation, accumulation, mixed precision and checkpointing are the
    engine's own. ``transfer_blocks`` > 0 trains the transfer stage on that many training blocks
    in turn, their teacher targets computed once and kept (each SmolLM2-135M block of 2048
    tokens: 283 MB in float32); 0 runs the teacher on each batch. Logs ``transfer_loss``,
    ``distill_kl`` and ``lm_loss`` (means since the last log) beside ``loss``.
    """

    def __init__(
        self,
        *args: Any,
        objective: str,
        distill_weight: float = 1.0,
        temperature: float = 1.0,
        chunk_tokens: int = 1024,
        transfer_steps: int = 0,
        transfer_learning_rate: float | None = None,
        transfer_query_stride: int = 4,
        transfer_blocks: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.objective = objective
        self.distill_weight = float(distill_weight)
        self.temperature = float(temperature)
        self.chunk_tokens = int(chunk_tokens)
        self.transfer_steps = int(transfer_steps)
        self.transfer_learning_rate = transfer_learning_rate
        self.transfer_query_stride = int(transfer_query_stride)
        self.transfer_blocks = transfer_blocks
        self._targets: dict[int, Any] = {}  # transfer block index -> its teacher targets
        self._micro = (-1, 0)  # (global step, micro-batches seen in it)
        # The loss is a mean per batch; let Trainer divide by the accumulation steps (blocks are all full).
        self.model_accepts_loss_kwargs = False
        self._parts: dict[str, list[float]] = {"transfer_loss": [], "distill_kl": [], "lm_loss": []}

    def stage(self, step: int | None = None) -> str:
        """The loss at optimizer step ``step`` (default: the current one): ``transfer`` or the final objective."""
        step = self.state.global_step if step is None else step
        return "transfer" if self.objective == "transfer" or step < self.transfer_steps else self.objective

    def create_scheduler(self, num_training_steps: int, optimizer: Any = None) -> Any:
        scheduler = super().create_scheduler(num_training_steps, optimizer)
        rate = self.transfer_learning_rate
        if rate is None or rate == self.args.learning_rate or getattr(scheduler, "_hf_prope_staged", False):
            return scheduler
        if not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
            raise staged_schedule_error(self.args.lr_scheduler_type)
        ratio = rate / self.args.learning_rate
        inner = list(scheduler.lr_lambdas)
        scheduler.lr_lambdas = [self._staged(f, ratio) for f in inner]
        for group, base, factor in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
            group["lr"] = base * factor(scheduler.last_epoch)
        scheduler._last_lr = [g["lr"] for g in scheduler.optimizer.param_groups]
        scheduler._hf_prope_staged = True
        return scheduler

    def _staged(self, inner: Any, ratio: float) -> Any:
        # A plain function, not an object: LambdaLR saves an object's attributes in checkpoints, this trainer with them.
        def factor(step: int) -> float:
            return inner(step) * (ratio if self.stage(step) == "transfer" else 1.0)

        return factor

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, **kwargs: Any) -> Any:
        stage = self.stage() if model.training else self.objective
        if stage != "transfer" and self._targets:
            self._targets.clear()  # the transfer stage is over: its kept targets go
        if stage == "transfer":
            return self._transfer_loss(model, inputs, return_outputs)
        if stage == "lm":
            loss, outputs = super().compute_loss(model, inputs, return_outputs=True, **kwargs)
            if model.training:
                self._parts["lm_loss"].append(float(loss.detach()))
            return (loss, outputs) if return_outputs else loss
        return self._distillation_loss(model, inputs, return_outputs)

    def _distillation_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool) -> Any:
        from hf_prope.distillation import distillation_loss, output_layer, teacher_hidden_states

        weight = self.distill_weight  # 1 for distill (the recipe's distillation settings)
        student = self.accelerator.unwrap_model(model)
        ids = inputs["input_ids"]
        hidden = teacher_hidden_states(student, ids)
        outputs = model(input_ids=ids, use_cache=False)
        loss, parts = distillation_loss(
            outputs.logits,
            hidden,
            output_layer(student),
            temperature=self.temperature,
            labels=inputs.get("labels"),
            distill_weight=weight,
            chunk_tokens=self.chunk_tokens,
        )
        if model.training:
            self._parts["distill_kl"].append(float(parts["kl"]))
            if weight < 1:
                self._parts["lm_loss"].append(float(parts["lm"]))
        return (loss, outputs) if return_outputs else loss

    def _transfer_targets(self, student: Any, inputs: dict[str, Any]) -> Any:
        """The teacher's targets for this micro-batch: of the batch itself, or of the next kept transfer block."""
        from hf_prope.transfer import AttentionTargets, teacher_attention

        pool = self.transfer_blocks
        if pool is None or not student.training:
            return teacher_attention(student, inputs["input_ids"])
        step, seen = self._micro
        self._micro = (self.state.global_step, seen + 1 if step == self.state.global_step else 0)
        batch = inputs["input_ids"].shape[0]
        micro = self.state.global_step * self.args.gradient_accumulation_steps + self._micro[1]
        first = (micro * max(1, self.args.world_size) + self.args.process_index) * batch
        parts = []
        for row in ((first + j) % pool.shape[0] for j in range(batch)):
            if row not in self._targets:
                self._targets[row] = teacher_attention(student, pool[row : row + 1].to(inputs["input_ids"].device))
                if len(self._targets) == 1 and self.args.process_index == 0:
                    size = sum(
                        t.numel() * t.element_size() for t in self._targets[row].inputs + self._targets[row].outputs
                    )
                    print(
                        f"[transfer] keeping the teacher's targets of {pool.shape[0]} blocks: "
                        f"{pool.shape[0] * size / 2**30:.2f} GiB per process, freed when the stage ends",
                        flush=True,
                    )
            parts.append(self._targets[row])
        return AttentionTargets.cat(parts)

    def _transfer_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool) -> Any:
        from transformers.modeling_outputs import CausalLMOutput

        from hf_prope.transfer import attention_transfer_loss, student_attention

        student = self.accelerator.unwrap_model(model)
        targets = self._transfer_targets(student, inputs)
        stride = self.transfer_query_stride
        # A random offset per step (seeded by the run's seed and step: a resumed run draws the same).
        generator = torch.Generator().manual_seed(self.args.seed * 1_000_003 + self.state.global_step)
        offset = int(torch.randint(stride, (1,), generator=generator)) if stride > 1 else 0

        def forward(*args: Any, **kwargs: Any) -> Any:
            with self.accelerator.autocast():
                outputs = student_attention(student, targets, query_stride=stride, offset=offset)
            loss, _ = attention_transfer_loss(outputs, targets, query_stride=stride, offset=offset)
            return CausalLMOutput(loss=loss)

        # Through the wrapper's forward call (DDP, DeepSpeed): that is where gradient sync is prepared.
        with _forward_replaced(student, forward):
            outputs = model(input_ids=inputs["input_ids"])
        loss = outputs["loss"]
        if model.training:
            self._parts["transfer_loss"].append(float(loss.detach()))
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs:
            for key, values in self._parts.items():
                if values:
                    logs[key] = sum(values) / len(values)
                    values.clear()
        super().log(logs, *args, **kwargs)


@contextlib.contextmanager
def _forward_replaced(module: torch.nn.Module, forward: Any) -> Iterator[None]:
    """``module.forward`` is ``forward`` inside the block; whatever was there (accelerate's wrapper) is put back."""
    had = "forward" in module.__dict__
    previous = module.__dict__.get("forward")
    module.forward = forward
    try:
        yield
    finally:
        if had:
            module.forward = previous
        else:
            del module.forward
