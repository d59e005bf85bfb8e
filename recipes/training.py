"""The training layer the training recipes (``lora``, ``ablation``) share.

* :class:`BlockDataset`: fixed-length token blocks as causal-LM examples.
* :class:`PatchRecordCallback`: the patch record in every checkpoint, so a checkpoint folder
  alone is never mistaken for plain RoPE.
* :class:`TrainingRecipe`: a :class:`~hf_prope.recipes.base.Recipe` that trains with
  transformers' ``Trainer``: this machine's defaults, the previous-run rule (an earlier run in
  ``output_dir`` is never mixed with a new one unless ``resume`` or ``overwrite`` says so),
  building the ``Trainer``, and tokens per optimizer step.
* :class:`DistillationTrainer`: ``Trainer`` with the self-distillation loss (``objective=distill|mix``).
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
    "DistillationTrainer",
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
        launch --use_fsdp`` stops inside accelerate after the evaluations have run.
        """
        ta = self.training_args
        asked = bool(ta.fsdp) or os.environ.get("ACCELERATE_USE_FSDP", "").strip().lower() in ("1", "true", "yes")
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
        distillation: dict[str, Any] | None = None,
    ) -> Any:
        """A ``Trainer`` on token blocks, the patch record written into every checkpoint.

        ``distillation`` (``distill_weight``, ``temperature``, ``chunk_tokens``) makes it a
        :class:`DistillationTrainer`.
        """
        from transformers import default_data_collator

        trainer_class: Any = Trainer if distillation is None else DistillationTrainer
        return trainer_class(
            model=model,
            args=args,
            train_dataset=BlockDataset(train_blocks),
            eval_dataset=BlockDataset(eval_blocks) if eval_blocks is not None else None,
            data_collator=default_data_collator,
            callbacks=[PatchRecordCallback(), *callbacks],
            **(distillation or {}),
        )


class DistillationTrainer(Trainer):
    """A ``Trainer`` whose loss is self-distillation (:mod:`hf_prope.distillation`), optionally mixed with the LM loss.

    The teacher is the model being trained with its patch suspended and its adapter disabled,
    run under ``no_grad`` before the student's forward pass; only its final hidden states are
    kept. The student's forward pass goes through the (possibly DDP-wrapped) model as usual,
    so gradient synchronisation, accumulation, checkpointing and mixed precision are
    ``Trainer``'s own. Logs ``distill_kl`` and ``lm_loss`` (means since the last log) beside ``loss``.
    """

    def __init__(self, *args: Any, distill_weight: float, temperature: float, chunk_tokens: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.distill_weight = float(distill_weight)
        self.temperature = float(temperature)
        self.chunk_tokens = int(chunk_tokens)
        # The loss is a mean per batch; let Trainer divide by the accumulation steps (blocks are all full).
        self.model_accepts_loss_kwargs = False
        self._parts: dict[str, list[float]] = {"distill_kl": [], "lm_loss": []}

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, **kwargs: Any) -> Any:
        from hf_prope.distillation import distillation_loss, output_layer, teacher_hidden_states

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
            distill_weight=self.distill_weight,
            chunk_tokens=self.chunk_tokens,
        )
        if model.training:
            self._parts["distill_kl"].append(float(parts["kl"]))
            if self.distill_weight < 1:
                self._parts["lm_loss"].append(float(parts["lm"]))
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs:
            for key, values in self._parts.items():
                if values:
                    logs[key] = sum(values) / len(values)
                    values.clear()
        super().log(logs, *args, **kwargs)
