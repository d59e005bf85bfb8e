"""The training layer the training recipes (``lora``, ``ablation``) share.

* :class:`BlockDataset`: fixed-length token blocks as causal-LM examples.
* :class:`PatchRecordCallback`: the patch record in every checkpoint, so a checkpoint folder
  alone is never mistaken for plain RoPE.
* :class:`TrainingRecipe`: a :class:`~hf_prope.recipes.base.Recipe` that trains with
  transformers' ``Trainer``: this machine's defaults, the previous-run rule (an earlier run in
  ``output_dir`` is never mixed with a new one unless ``resume`` or ``overwrite`` says so),
  building the ``Trainer``, and tokens per optimizer step.
* :func:`loss_curve`: a ``[step, value]`` curve out of ``Trainer``'s log history.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, ClassVar, Sequence

import torch
from transformers import TrainerCallback

from .base import Recipe, is_main_process

__all__ = ["BlockDataset", "PatchRecordCallback", "TrainingRecipe", "has_accelerator", "loss_curve"]


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
    ) -> Any:
        """A ``Trainer`` on token blocks, the patch record written into every checkpoint."""
        from transformers import Trainer, default_data_collator

        return Trainer(
            model=model, args=args, train_dataset=BlockDataset(train_blocks),
            eval_dataset=BlockDataset(eval_blocks) if eval_blocks is not None else None,
            data_collator=default_data_collator, callbacks=[PatchRecordCallback(), *callbacks],
        )
